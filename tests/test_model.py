"""The Aria decoder: sizes, causality, RoPE, Aria's parameter names, KV cache, checkpointing, EMB head."""

import dataclasses
import math

import pytest
import torch

from aria_model.model import (
    ATTENTION_BACKENDS,
    ModelConfig,
    TransformerEMB,
    TransformerLM,
    apply_rope,
    attention_backend,
    load_aria_state_dict,
    rope_tables,
)

TINY = ModelConfig.preset("tiny")


def tiny_lm(seed: int = 0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(dataclasses.replace(TINY, **overrides)).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def aria_names(config: ModelConfig, head: str = "lm_head") -> dict[str, tuple[int, ...]]:
    """Key -> shape of an EleutherAI/aria state dict (aria/model.py, v1), written from the published layout."""
    d, f, v = config.d_model, config.ffn_hidden, config.vocab_size
    names = {"model.tok_embeddings.weight": (v, d)}
    for i in range(config.n_layers):
        layer = f"model.encode_layers.{i}."
        names |= {
            layer + "mixed_qkv.weight": (3 * d, d),
            layer + "att_proj_linear.weight": (d, d),
            layer + "ff_gate_proj.weight": (f, d),
            layer + "ff_up_proj.weight": (f, d),
            layer + "ff_down_proj.weight": (d, f),
            layer + "norm1.weight": (d,),
            layer + "norm1.bias": (d,),
            layer + "norm2.weight": (d,),
            layer + "norm2.bias": (d,),
        }
    names |= {"model.out_layer_norm.weight": (d,), "model.out_layer_norm.bias": (d,)}
    names[f"{head}.weight"] = (v, d) if head == "lm_head" else (config.emb_size, d)
    return names


# --- sizes and config --------------------------------------------------------


def test_medium_has_the_papers_parameter_count():
    config = ModelConfig.preset("medium")
    assert (config.d_model, config.n_heads, config.n_layers, config.ffn_hidden) == (1536, 24, 16, 6144)
    assert (config.max_seq_len, config.vocab_size, config.rope_theta) == (8192, 17727, 500_000.0)
    with torch.device("meta"):
        lm = TransformerLM(config)
        emb = TransformerEMB(dataclasses.replace(config, emb_size=512))
    assert lm.num_params() == 658_538_496
    # 16 layers of 16 d^2 + 4 d, two untied vocab x d tables, the final norm.
    assert lm.num_params() == 16 * (16 * 1536**2 + 4 * 1536) + 2 * 17727 * 1536 + 2 * 1536
    assert lm.num_params(exclude_embeddings=True) == 658_538_496 - 17727 * 1536
    # Aria's embedding model: no lm_head, a 1536 -> 512 head (632.1M).
    assert emb.num_params() == 658_538_496 - 17727 * 1536 + 1536 * 512


def test_presets_config_round_trip_and_errors():
    for name in ("tiny", "small", "medium"):
        config = ModelConfig.preset(name)
        assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.preset("medium") == ModelConfig()
    assert ModelConfig.preset("medium", emb_size=512).emb_size == 512
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*'medium', 'small', 'tiny'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**TINY.to_dict(), "ff_mult": 4})
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="emb_size"):
        TransformerEMB(TINY)


def test_flops_per_token_by_hand():
    # tiny: d 128, 2 layers, ffn 512, vocab 17727. Matmul weights per layer:
    # qkv 3*128*128 + out 128*128 + ffn 3*128*512 = 262,144, norms 4*128; then the final
    # norm and lm_head. 6 N + 12 * layers * d * seq_len (PaLM), seq_len 1024.
    n = 2 * (262_144 + 512) + 256 + 17727 * 128
    assert n == 2_794_624
    assert tiny_lm().flops_per_token(1024) == 6 * n + 12 * 2 * 128 * 1024 == 19_913_472


# --- the network -------------------------------------------------------------


def test_forward_shapes():
    ids = random_ids(2, 16)
    assert tiny_lm()(ids).shape == (2, 16, TINY.vocab_size)
    emb = TransformerEMB(dataclasses.replace(TINY, emb_size=512)).eval()
    assert emb(ids).shape == (2, 16, 512)
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        tiny_lm()(random_ids(1, TINY.max_seq_len + 1))


@torch.no_grad()
def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = tiny_lm()
    ids = random_ids(1, 24)
    edited = ids.clone()
    edited[0, 15] = (ids[0, 15] + 1) % TINY.vocab_size
    before, after = model(ids), model(edited)
    assert torch.equal(before[:, :15], after[:, :15])
    assert not torch.allclose(before[:, 15:], after[:, 15:])


def test_rope_is_the_half_split_rotation():
    head_dim, theta, positions = 8, 500_000.0, [0, 1, 7, 1000]
    cos, sin = rope_tables(head_dim, 1001, theta)
    x = torch.randn(1, len(positions), 1, head_dim, dtype=torch.float64)
    got = apply_rope(x.float(), cos[positions], sin[positions]).double()
    # Independent formula: element j and j + hd/2 form the complex number
    # x_j + i x_{j+hd/2}, turned by pos * theta^(-2j/hd).
    half = head_dim // 2
    for t, pos in enumerate(positions):
        for j in range(half):
            z = complex(x[0, t, 0, j], x[0, t, 0, j + half]) * complex(
                math.cos(pos * theta ** (-2 * j / head_dim)), math.sin(pos * theta ** (-2 * j / head_dim))
            )
            assert got[0, t, 0, j].item() == pytest.approx(z.real, abs=1e-5)
            assert got[0, t, 0, j + half].item() == pytest.approx(z.imag, abs=1e-5)


def test_rope_scores_depend_only_on_the_offset():
    head_dim = 64
    cos, sin = rope_tables(head_dim, 8192, 500_000.0)
    q, k = torch.randn(2, head_dim)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q.view(1, 1, 1, -1), cos[[i]], sin[[i]])
        kj = apply_rope(k.view(1, 1, 1, -1), cos[[j]], sin[[j]])
        return (qi * kj).sum().item()

    for i, j in [(5, 2), (40, 40), (9, 30)]:
        for shift in (1, 100, 8000):
            assert score(i + shift, j + shift) == pytest.approx(score(i, j), rel=1e-4, abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_rope_tables_stay_fp32_after_a_cast():
    model = tiny_lm().to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.rope_cos.dtype == torch.float32
    cos, _ = rope_tables(TINY.head_dim, TINY.max_seq_len, TINY.rope_theta)
    assert torch.equal(model.model.rope_cos, cos)
    assert "model.rope_cos" not in model.state_dict()
    # Built on meta and materialised with to_empty (the FSDP path): the tables are real again.
    with torch.device("meta"):
        empty = TransformerLM(TINY)
    assert torch.equal(empty.to_empty(device="cpu").model.rope_cos, cos)


def test_grad_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 32)
    grads, block_calls = [], []
    for remat in (False, True):
        model = tiny_lm(grad_checkpoint=remat).train()
        calls = [0]
        model.model.encode_layers[0].register_forward_pre_hook(
            lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1)
        )
        torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        block_calls.append(calls[0])
    assert block_calls == [1, 2]  # the checkpointed block really ran again in backward
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@torch.no_grad()
def test_emb_head_picks_each_rows_position():
    torch.manual_seed(0)
    model = TransformerEMB(dataclasses.replace(TINY, emb_size=512)).eval()
    ids, positions = random_ids(3, 20), torch.tensor([19, 4, 11])
    picked = model.embed(ids, positions)
    assert picked.shape == (3, 512)
    full = model(ids)
    for row, pos in enumerate(positions):
        torch.testing.assert_close(picked[row], full[row, pos])


@torch.no_grad()
def test_compile_blocks_keeps_names_and_outputs():
    model, ids = tiny_lm(), random_ids(2, 16)
    names, expected = list(model.state_dict()), model(ids)
    # fullgraph: a graph break inside a block would cost the fusion the compile is for.
    model.compile_blocks(backend="eager", fullgraph=True)
    assert list(model.state_dict()) == names
    torch.testing.assert_close(model(ids), expected)


# --- Aria's parameter names ---------------------------------------------------


def test_aria_names_and_medium_shapes_load_on_meta():
    config = ModelConfig.preset("medium")
    published = aria_names(config)
    assert len(published) == 1 + 9 * 16 + 2 + 1
    with torch.device("meta"):
        model = TransformerLM(config)
        # As a torch.compile'd Aria model saves them.
        state = {"_orig_mod." + k: torch.empty(shape) for k, shape in published.items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == published
    assert load_aria_state_dict(model, state).loaded == len(published)

    wrong = dict(state)
    wrong["_orig_mod.model.encode_layers.3.ff_up_proj.weight"] = torch.empty(6144, 1024, device="meta")
    with pytest.raises(ValueError, match=r"1 wrong shape: model\.encode_layers\.3\.ff_up_proj\.weight: \(6144, 1024\)"):
        load_aria_state_dict(model, wrong)
    partial = {k: v for k, v in state.items() if "encode_layers.15." not in k}
    with pytest.raises(ValueError, match=r"9 missing: model\.encode_layers\.15\.att_proj_linear\.weight"):
        load_aria_state_dict(model, partial)
    extra = state | {"model.encode_layers.0.rotary_emb.inv_freq": torch.empty(32, device="meta")}
    with pytest.raises(ValueError, match=r"1 unexpected: model\.encode_layers\.0\.rotary_emb\.inv_freq"):
        load_aria_state_dict(model, extra)


@torch.no_grad()
def test_round_trip_through_aria_names_gives_identical_outputs():
    source, ids = tiny_lm(seed=3), random_ids(2, 12)
    ours = source.state_dict()
    aria_state = {name: ours[name].clone() for name in aria_names(TINY)}
    for wrap in ("", "module.", "_orig_mod."):
        target = tiny_lm(seed=4)
        report = load_aria_state_dict(target, {wrap + k: v for k, v in aria_state.items()})
        assert report.loaded == len(aria_state) and not report.left_at_init and not report.skipped
        assert torch.equal(target(ids), source(ids))
    # A bare trunk (Aria's Transformer, no head) maps onto model.*.
    trunk = {k.removeprefix("model."): v for k, v in aria_state.items() if k.startswith("model.")}
    target = tiny_lm(seed=4)
    with pytest.raises(ValueError, match="1 missing: lm_head.weight"):
        load_aria_state_dict(target, trunk)
    assert load_aria_state_dict(target, trunk, heads_optional=True).left_at_init == ("lm_head.weight",)
    assert torch.equal(target.model(ids), source.model(ids))


def test_pretrained_lm_initialises_the_embedding_model():
    lm = tiny_lm(seed=5)
    emb = TransformerEMB(dataclasses.replace(TINY, emb_size=512))
    with pytest.raises(ValueError, match=r"1 missing: emb_head\.weight; 1 unexpected: lm_head\.weight"):
        load_aria_state_dict(emb, lm.state_dict())
    report = load_aria_state_dict(emb, lm.state_dict(), heads_optional=True)
    assert report.left_at_init == ("emb_head.weight",) and report.skipped == ("lm_head.weight",)
    assert torch.equal(emb.model.encode_layers[1].mixed_qkv.weight, lm.model.encode_layers[1].mixed_qkv.weight)


# --- KV cache -----------------------------------------------------------------


def greedy(model: TransformerLM, prompt: torch.Tensor, steps: int, use_cache: bool) -> torch.Tensor:
    ids = prompt
    if not use_cache:
        for _ in range(steps):
            # The full forward, with only the last position sent through the 17,727-wide head.
            logits = model.lm_head(model.model(ids)[:, -1])
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        return ids
    cache = model.new_cache(prompt.shape[0], max_seq_len=prompt.shape[1] + steps)
    logits = model(prompt, cache=cache, start_pos=0)
    for _ in range(steps):
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        logits = model(next_ids, cache=cache, start_pos=ids.shape[1] - 1)
    return ids


@torch.no_grad()
def test_cached_greedy_generation_equals_uncached():
    model, prompt = tiny_lm(seed=7), random_ids(2, 8, seed=8)
    # Last step's decode writes position 57; the cache is sized prompt + steps = 58.
    with_cache = greedy(model, prompt, steps=50, use_cache=True)
    assert torch.equal(with_cache, greedy(model, prompt, steps=50, use_cache=False))
    assert not torch.equal(with_cache[0, 8:], with_cache[1, 8:])  # rows really differ


@torch.no_grad()
def test_cached_prefill_in_chunks_and_decode_match_a_full_forward():
    model, ids = tiny_lm(seed=9), random_ids(3, 40, seed=10)
    full = model(ids)
    cache = model.new_cache(3, max_seq_len=64)
    # Chunked prefill: the second chunk needs the causal mask offset by its start.
    parts = [model(ids[:, :17], cache=cache, start_pos=0), model(ids[:, 17:30], cache=cache, start_pos=17)]
    parts += [model(ids[:, t : t + 1], cache=cache, start_pos=torch.tensor(t)) for t in range(30, 40)]
    # fp32 everywhere: only summation order differs between the two paths.
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overflow a cache of 64"):
        model(ids[:, :1], cache=cache, start_pos=64)
    with pytest.raises(ValueError, match="batch of 2 rows for a cache of 3"):
        model(ids[:2, :1], cache=cache, start_pos=40)
    with pytest.raises(ValueError, match="start_pos needs a cache"):
        model(ids[:, :1], start_pos=5)


@torch.no_grad()
def test_prefill_from_position_0_ignores_stale_slots_and_matches_the_masked_path():
    """A prefill at start_pos 0 attends causally over its own tokens only; the masked path over the
    whole buffer (start_pos given as a tensor) gives the same logits and writes the same cache."""
    model, ids, stale = tiny_lm(seed=13), random_ids(2, 24, seed=14), random_ids(2, 40, seed=15)
    reused, masked = model.new_cache(2, max_seq_len=48), model.new_cache(2, max_seq_len=48)
    model(stale, cache=reused, start_pos=0)  # an earlier generation's slots, some beyond the new prompt
    causal = model(ids, cache=reused, start_pos=0)
    torch.testing.assert_close(causal, model(ids, cache=masked, start_pos=torch.tensor(0)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal, model(ids), rtol=1e-5, atol=1e-5)
    for written, expected in zip(reused.k + reused.v, masked.k + masked.v):
        torch.testing.assert_close(written[:, :, :24], expected[:, :, :24])
    step = torch.tensor(24)
    torch.testing.assert_close(model(ids[:, :1], cache=reused, start_pos=step),
                               model(ids[:, :1], cache=masked, start_pos=step), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_bf16_cache_stays_close_to_fp32():
    model, ids = tiny_lm(seed=11), random_ids(1, 12, seed=12)
    cache = model.new_cache(1, max_seq_len=16, dtype=torch.bfloat16)
    assert cache.dtype == torch.bfloat16
    logits = model(ids, cache=cache, start_pos=0)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=5e-2)


def test_attention_backend_prefers_a_kernel_and_falls_back_where_it_cannot_run():
    """On a CPU only math runs: every named backend still gives auto's output; a wrong name is refused."""
    model = tiny_lm().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        expected = model(ids)
        for name in ATTENTION_BACKENDS:
            with attention_backend(name):
                torch.testing.assert_close(model(ids), expected)
    with pytest.raises(ValueError, match="attention backend 'fast'"):
        attention_backend("fast")
