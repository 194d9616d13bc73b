"""Contrastive fine-tune and embeddings: Aria's views and loss, the pair stream, inference, the entry point."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from aria_model.contrastive import (
    ContrastiveModule,
    ViewConfig,
    ViewPairs,
    draw_slice,
    init_from_pretrained,
    nt_xent,
    retrieval_hits,
    split_file_ids,
    view_ids,
)
from aria_model.data import ResumableLoader
from aria_model.embedding import (
    chunk_ids,
    embed_files,
    embed_with_lm_mean_pool,
    load_embedding_model,
    note_slice,
    read_embeddings_parquet,
    write_embeddings_parquet,
)
from aria_model.midi import load_midi
from aria_model.model import ModelConfig, TransformerEMB, TransformerLM
from aria_model.notes_table import part_files
from aria_model.shards import ShardConfig, build_token_shards
from aria_model.tokenizer import AbsTokenizer
from aria_model.training.callbacks import read_step_log
from aria_model.training.contrastive import RESUME_FIELDS, ContrastiveConfig, contrastive, main, resolved
from aria_model.training.runner import check_resumable
from tests.conftest import GOLDEN_DIR
from tests.test_shards import make_curated_home

SHARDS = ShardConfig(shard_tokens=8_000, row_group_tokens=500, split_fractions=(0.6, 0.4, 0.0), seed=1, workers=1)
# A trunk small enough that a training step takes tens of milliseconds on a loaded CI core.
MICRO = ModelConfig(d_model=64, n_heads=2, n_layers=1, ffn_hidden=128, max_seq_len=128)
TOKENIZER = AbsTokenizer()
PIANO_PREFIX = TOKENIZER.tok_to_id[("prefix", "instrument", "piano")]
METADATA_PREFIXES = {i for tok, i in TOKENIZER.tok_to_id.items()
                     if isinstance(tok, tuple) and tok[0] == "prefix" and tok[1] != "instrument"}


def golden(name: str, **metadata):
    return load_midi(GOLDEN_DIR / "midi" / f"{name}.mid", metadata)


def save_model_pt(model, path: Path) -> Path:
    """Our model.pt format, as pretraining exports it."""
    torch.save({"model_config": model.config.to_dict(), "state_dict": model.state_dict(), "step": 0}, path)
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny training steps throughout


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A curated data home whose midi_notes hold 2 files per row group (a corpus has many row groups)."""
    curated = make_curated_home(tmp_path_factory.mktemp("contrastive") / "home")
    for part in part_files(curated.inputs.notes_dir):
        pq.write_table(pq.read_table(part), part, row_group_size=2)
    build_token_shards(curated.inputs, curated.home / "token_shards", SHARDS)
    return curated.home


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model_pt(TransformerLM(MICRO), tmp_path_factory.mktemp("pretrained") / "model.pt")


# -- Aria's loss, slices and views ------------------------------------------------------------------


def test_nt_xent_matches_a_hand_computed_value():
    za = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zb = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # not unit length: the loss normalises
    # tau 0.5: sim / tau = [[2, sqrt 2], [0, sqrt 2]]
    r2 = math.sqrt(2)
    a_finds_b = [-math.log(math.exp(2) / (math.exp(2) + math.exp(r2))), -math.log(math.exp(r2) / (1 + math.exp(r2)))]
    b_finds_a = [-math.log(math.exp(2) / (math.exp(2) + 1)), math.log(2)]
    expected = (sum(a_finds_b) / 2 + sum(b_finds_a) / 2) / 2
    assert nt_xent(za, zb, tau=0.5).item() == pytest.approx(expected, rel=1e-6)
    assert nt_xent(3 * za, zb, tau=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_retrieval_hits_count_rows_whose_nearest_partner_is_their_own():
    za = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert retrieval_hits(za, torch.tensor([[2.0, 0.0], [1.0, 1.0]])).item() == 2
    assert retrieval_hits(torch.tensor([[1.0, 0.0], [1.0, 0.1]]), za).item() == 1


def test_slices_respect_arias_bounds_over_many_draws():
    rng = np.random.default_rng(0)
    n = 1000
    draws = [draw_slice(n, rng) for _ in range(5000)]
    starts = np.array([s for s, _ in draws])
    lengths = np.array([length for _, length in draws])
    assert starts.min() == 0 and starts.max() == n - 100  # start uniform in [0, n - 100]
    assert lengths.min() >= 100 and lengths.max() == 650
    assert np.all(starts + lengths <= n)
    # Clipped only at the end of the piece: an unclipped slice is as long as drawn, <= 650.
    assert np.all((lengths == np.minimum(650, n - starts)) | (starts + lengths < n))
    assert 0.05 < np.mean(lengths == n - starts) < 0.5


@pytest.mark.parametrize("n_notes", [1, 54, 99, 100])
def test_a_file_of_at_most_min_notes_is_taken_whole(n_notes):
    rng = np.random.default_rng(1)
    assert {draw_slice(n_notes, rng) for _ in range(50)} == {(0, n_notes)}


def test_view_ids_have_no_metadata_prefix_no_dim_and_their_eos_at_the_reported_position():
    perf = golden("arabesque", composer="debussy", genre="classical")
    assert METADATA_PREFIXES & set(TOKENIZER.tokenize_ids(perf).tolist())  # the file itself has them
    ids, pos = view_ids(note_slice(perf, 100, 400), TOKENIZER, seq_len=2048)
    assert ids.shape == (2048,) and ids.dtype == np.int64
    assert ids[0] == PIANO_PREFIX and ids[1] == TOKENIZER.bos_id  # the instrument prefix only
    assert not METADATA_PREFIXES & set(ids.tolist()) and TOKENIZER.dim_id not in ids
    assert ids[pos] == TOKENIZER.eos_id and TOKENIZER.eos_id not in ids[:pos]
    assert np.all(ids[pos + 1 :] == TOKENIZER.pad_id) and TOKENIZER.pad_id not in ids[:pos]
    assert TOKENIZER.detokenize_ids(ids[: pos + 1]).n_notes == 300

    cut, cut_pos = view_ids(note_slice(perf, 100, 400), TOKENIZER, seq_len=64)
    assert cut_pos == 63 and cut[63] == TOKENIZER.eos_id and np.array_equal(cut[:63], ids[:63])


def test_augmented_views_keep_the_layout():
    perf = golden("miditok1_6338816_Etude_No._4")
    plain, _ = view_ids(note_slice(perf, 0, 200), TOKENIZER, 1024)
    augmented = [view_ids(note_slice(perf, 0, 200), TOKENIZER, 1024, TOKENIZER.export_data_aug(),
                          np.random.default_rng(seed)) for seed in range(4)]
    for ids, pos in augmented:
        assert ids[pos] == TOKENIZER.eos_id and np.all(ids[pos + 1 :] == TOKENIZER.pad_id)
        assert TOKENIZER.dim_id not in ids
    assert any(not np.array_equal(ids, plain) for ids, _ in augmented)


# -- the pair stream -----------------------------------------------------------------------------


def _rank_stream(home: Path, rank: int, epoch: int, config: ViewConfig) -> list:
    pairs = ViewPairs(home / "token_shards", home / "midi_notes", "train", config, rank=rank, world_size=2)
    pairs.set_epoch(epoch)
    return list(DataLoader(pairs, batch_size=None, num_workers=2))


def test_pairs_cover_every_train_file_once_per_epoch_across_2_ranks_x_2_workers_deterministically(home):
    config = ViewConfig(seq_len=96)
    train = split_file_ids(home / "token_shards", "train")
    assert len(train) >= 4
    streams = [_rank_stream(home, rank, 0, config) for rank in range(2)]
    seen = [pair.file_id for stream in streams for pair in stream]
    assert sorted(seen) == sorted(train)  # every file once: no overlap, none lost
    assert all(streams), "a rank got no files: the split is not spread"
    counts = ViewPairs(home / "token_shards", home / "midi_notes", "train", config, world_size=2)
    assert [sum(counts.windows_per_worker(2, rank)) for rank in range(2)] == [len(s) for s in streams]

    again = [_rank_stream(home, rank, 0, config) for rank in range(2)]
    for first, second in zip(streams, again):
        assert [p.file_id for p in first] == [p.file_id for p in second]
        assert all(torch.equal(x, y) for p, q in zip(first, second) for x, y in zip(p[:4], q[:4]))
    pair = streams[0][0]
    assert pair.ids_a.shape == (96,) and pair.ids_a[pair.pos_a] == TOKENIZER.eos_id
    assert pair.ids_b[pair.pos_b] == TOKENIZER.eos_id

    next_epoch = {p.file_id: p for rank in range(2) for p in _rank_stream(home, rank, 1, config)}
    assert set(next_epoch) == train
    assert any(not torch.equal(p.ids_a, next_epoch[p.file_id].ids_a) for s in streams for p in s)


def test_a_short_file_gives_its_whole_self_twice(home):
    pairs = ViewPairs(home / "token_shards", home / "midi_notes", "val", ViewConfig(seq_len=512))
    pair = pairs.pair("basic", golden("basic"))  # 54 notes < min_notes
    assert torch.equal(pair.ids_a, pair.ids_b) and pair.pos_a == pair.pos_b
    whole = TOKENIZER.tokenize_ids(golden("basic"), add_dim_tok=False)
    assert np.array_equal(pair.ids_a[: len(whole)].numpy(), whole)


def test_the_loader_resumes_mid_epoch_with_exactly_the_remaining_batches(home):
    config = ViewConfig(seq_len=64)

    def loader():
        return ResumableLoader(ViewPairs(home / "token_shards", home / "midi_notes", "train", config), batch_size=2)

    straight = loader()
    epochs = [list(straight) for _ in range(2)]
    interrupted = loader()
    batches = iter(interrupted)
    taken = [next(batches)]
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(resumed)
    assert [b.file_id for b in taken + rest] == [b.file_id for b in epochs[0]]
    assert all(torch.equal(x.ids_a, y.ids_a) for x, y in zip(taken + rest, epochs[0]))
    assert [b.file_id for b in resumed] == [b.file_id for b in epochs[1]]


# -- embeddings -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emb_model() -> TransformerEMB:
    torch.manual_seed(1)
    return TransformerEMB(replace(MICRO, emb_size=512)).eval()


def test_embeddings_are_the_mean_of_one_chunk_at_a_time_embeddings(emb_model, tmp_path):
    names = ["miditok1_6338816_Etude_No._4", "bwv66.6.mxl", "arabesque"]
    paths = [GOLDEN_DIR / "midi" / f"{name}.mid" for name in names] + [tmp_path / "missing.mid"]
    result = embed_files(emb_model, paths, batch_size=3, seq_len=128)
    assert result.keys == [str(p) for p in paths[:3]] and result.matrix.shape == (3, 512)
    assert result.failures[0]["key"] == str(paths[3])
    for row, name in enumerate(names):
        chunks = chunk_ids(golden(name), TOKENIZER, seq_len=128)
        assert len(chunks) == math.ceil(golden(name).n_notes / 300) == result.n_chunks[row]
        with torch.no_grad():
            one_by_one = [emb_model.embed(torch.from_numpy(c)[None], torch.tensor([len(c) - 1]))[0] for c in chunks]
        expected = torch.stack(one_by_one).mean(dim=0).numpy()
        np.testing.assert_allclose(result.matrix[row], expected, atol=1e-5, rtol=0)
        for chunk in chunks:
            assert len(chunk) <= 128 and chunk[-1] == TOKENIZER.eos_id and TOKENIZER.dim_id not in chunk
    again = embed_files(emb_model, paths, batch_size=2, seq_len=128)
    np.testing.assert_allclose(again.matrix, result.matrix, atol=1e-5, rtol=0)
    assert np.array_equal(embed_files(emb_model, paths, batch_size=3, seq_len=128).matrix, result.matrix)

    write_embeddings_parquet(result, tmp_path / "embeddings.parquet")
    table = pq.read_table(tmp_path / "embeddings.parquet")
    assert table.column_names == ["path", "embedding", "n_chunks"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    back = read_embeddings_parquet(tmp_path / "embeddings.parquet")
    assert back.keys == result.keys and np.array_equal(back.matrix, result.matrix)
    assert np.array_equal(back.by_key()[str(paths[1])], result.matrix[1]) and list(back.n_chunks) == [2, 1, 5]


def test_lm_mean_pool_averages_hidden_states_over_tokens_then_chunks():
    torch.manual_seed(2)
    lm = TransformerLM(MICRO).eval()
    perf = golden("miditok1_6338816_Etude_No._4")  # 569 notes: a full and a partial chunk
    with torch.no_grad():
        per_chunk = [lm.model(torch.from_numpy(c)[None])[0].mean(dim=0) for c in chunk_ids(perf, TOKENIZER, 128)]
    expected = torch.stack(per_chunk).mean(dim=0).numpy()
    got = embed_with_lm_mean_pool(lm, perf, seq_len=128, batch_size=2)
    assert got.shape == (MICRO.d_model,)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


# -- initialisation and the entry point -------------------------------------------------------------


def test_init_from_a_pretrained_model_pt_copies_the_trunk(pretrained, tmp_path):
    lm_state = torch.load(pretrained, weights_only=False)["state_dict"]
    torch.manual_seed(3)
    emb = TransformerEMB(replace(MICRO, emb_size=512))
    head_before = emb.emb_head.weight.clone()
    report = init_from_pretrained(emb, pretrained)
    trunk = {k: v for k, v in lm_state.items() if k.startswith("model.")}
    assert all(torch.equal(emb.state_dict()[k], v) for k, v in trunk.items()) and report.loaded == len(trunk)
    assert report.left_at_init == ("emb_head.weight",) and report.skipped == ("lm_head.weight",)
    assert torch.equal(emb.emb_head.weight, head_before)
    # An Aria checkpoint: a bare state dict whose keys carry torch.compile's prefix.
    aria = tmp_path / "aria.pt"
    torch.save({k.replace("model.", "model._orig_mod.", 1): v for k, v in lm_state.items()}, aria)
    other = TransformerEMB(replace(MICRO, emb_size=512))
    init_from_pretrained(other, aria)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in trunk.items())


def test_the_module_starts_from_the_pretrained_weights_or_from_scratch(home, pretrained):
    config = resolved(quick_config(home, pretrained, home / "unused"))
    assert config.model == replace(MICRO, emb_size=512)  # the shape comes from the pretrained model.pt
    module = ContrastiveModule(config, total_steps=10)
    module.configure_model()
    lm_state = torch.load(pretrained, weights_only=False)["state_dict"]
    assert torch.equal(module.net.model.tok_embeddings.weight, lm_state["model.tok_embeddings.weight"])
    scratch = ContrastiveModule(replace(config, init="scratch"), total_steps=10)
    scratch.configure_model()
    assert not torch.equal(scratch.net.model.tok_embeddings.weight, lm_state["model.tok_embeddings.weight"])


def quick_config(home: Path, init: Path, out_dir: Path, *overrides: str) -> ContrastiveConfig:
    return ContrastiveConfig.preset("tiny").with_overrides([
        f"data.shards={home / 'token_shards'}", f"data.notes={home / 'midi_notes'}", f"init={init}",
        f"out_dir={out_dir}", "data.seq_len=96", "train.log_every=100", *overrides])


def test_a_tiny_run_lowers_the_loss_and_exports_an_embedding_model(home, pretrained, tmp_path):
    n_train = len(split_file_ids(home / "token_shards", "train"))
    # One batch holds every training file, so each step's loss is over the same candidates.
    config = quick_config(home, pretrained, tmp_path / "run", f"data.batch_size={n_train}", "train.max_steps=25",
                          "train.val_every=10", "train.checkpoint_every=10", "optim.lr=2e-3", "optim.warmup_steps=3")
    lines = []
    result = contrastive(config, report=lines.append)
    losses = [float(row["loss"]) for row in read_step_log(result.out_dir / "loss.csv")]
    assert len(losses) == 25 and losses[0] == pytest.approx(math.log(n_train), abs=0.3)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert math.isfinite(result.val_loss) and 0 <= result.val_retrieval_acc <= 1
    assert result.steps == 25 and result.pairs == 25 * n_train and result.resumed_from_step == 0
    assert any("initialised from" in line for line in lines)
    metadata = result.metadata()
    assert metadata["weights"] == str(tmp_path / "run" / "model.pt") and metadata["init"] == str(pretrained)

    saved = torch.load(result.weights, weights_only=False)
    assert saved["model_config"]["emb_size"] == 512 and saved["step"] == 25
    model = load_embedding_model(result.weights)
    vector = embed_files(model, [GOLDEN_DIR / "midi" / "arabesque.mid"], seq_len=96).matrix[0]
    assert vector.shape == (512,) and np.isfinite(vector).all()

    # The last steps were after the last scheduled checkpoint: a longer rerun goes on from step 25.
    longer = contrastive(config.with_overrides(["train.max_steps=27"]), report=lambda _: None)
    assert longer.resumed_from_step == 25 and longer.steps == 27
    assert [int(r["step"]) for r in read_step_log(longer.out_dir / "loss.csv")] == list(range(1, 28))


def test_a_run_resumes_mid_epoch_and_reproduces_the_uninterrupted_losses(home, pretrained, tmp_path):
    """Three pairs per batch: two batches an epoch, so the step-3 checkpoint is mid-epoch."""
    settings = ["data.batch_size=3", "train.max_steps=6", "train.checkpoint_every=3", "train.val_every=0",
                "train.deterministic=true", "optim.lr=1e-3", "optim.warmup_steps=2"]
    straight = contrastive(quick_config(home, pretrained, tmp_path / "straight", *settings), report=lambda _: None)
    restarted = tmp_path / "restarted"
    shutil.copytree(straight.out_dir, restarted, symlinks=True)
    (restarted / "checkpoints" / "last.ckpt").unlink()
    shutil.copy(restarted / "checkpoints" / "step-00000003.ckpt", restarted / "checkpoints" / "last.ckpt")
    config = quick_config(home, pretrained, restarted, *settings)
    again = contrastive(config, report=lambda _: None)
    assert again.resumed_from_step == 3 and again.steps == 6
    expected, got = read_step_log(straight.out_dir / "loss.csv"), read_step_log(restarted / "loss.csv")
    assert [r["step"] for r in got] == [str(s) for s in range(1, 7)]
    assert [(r["loss"], r["lr"]) for r in got] == [(r["loss"], r["lr"]) for r in expected]
    with pytest.raises(ValueError, match="different tau"):
        check_resumable(restarted / "checkpoints" / "last.ckpt", resolved(replace(config, tau=0.5)), RESUME_FIELDS)


def test_the_command_line_prints_the_resolved_config_and_rejects_missing_weights(home, pretrained, tmp_path, capsys):
    args = ["--preset", "tiny", "--set", f"data.shards={home / 'token_shards'}", f"init={pretrained}",
            f"out_dir={tmp_path}", "tau=0.2", "data.seq_len=96"]
    assert main([*args, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["emb_size"] == 512 and printed["model"]["d_model"] == MICRO.d_model
    assert printed["tau"] == 0.2 and printed["data"]["shards"] == str(home / "token_shards")
    assert printed["init"] == str(pretrained) and printed["data"]["batch_size"] == 8
    assert main(["--preset", "tiny", "--set", f"init={tmp_path / 'nothing.pt'}", "--print-config"]) == 2
    assert "not found" in capsys.readouterr().err
    assert ContrastiveConfig.preset("medium").optim.lr == 1e-5 and ContrastiveConfig.preset("medium").tau == 0.1
    assert ContrastiveConfig.preset("medium").optim.warmup_steps == 1000
