"""The Aria decoder (arXiv 2506.23869): a LLaMA-style transformer over AbsTokenizer ids.

Architecture (``EleutherAI/aria: aria/model.py``, v1 release):

- token embedding -> n_layers x Block -> final LayerNorm -> head;
- Block: pre-LayerNorm (with bias) before attention and before the FFN;
  attention is full multi-head (no GQA), one fused QKV Linear and an output
  Linear, both without bias, RoPE (theta 500k, half-split/NeoX pairing, all
  head dims, rotated in fp32) on q and k, ``F.scaled_dot_product_attention``
  with ``is_causal=True``; FFN is SwiGLU (gate, up, down; no bias);
- untied ``tok_embeddings`` and ``lm_head``; PyTorch default init; no dropout.

Heads: ``TransformerLM`` (next-token logits) and ``TransformerEMB`` (a 512-dim
projection at every position; the ``<E>`` position is the piece embedding used
by the contrastive step). ``ModelConfig.preset("medium")`` is the released model
(658,538,496 parameters).

Parameter names are Aria's, so a released ``model.safetensors`` loads as is and
our checkpoints load into Aria's code (``load_aria_state_dict`` checks it):

    model.tok_embeddings.weight                     [vocab, d]
    model.encode_layers.{i}.norm1.weight / .bias    [d]
    model.encode_layers.{i}.mixed_qkv.weight        [3d, d]   rows: q | k | v, each head-major [H, hd]
    model.encode_layers.{i}.att_proj_linear.weight  [d, d]
    model.encode_layers.{i}.norm2.weight / .bias    [d]
    model.encode_layers.{i}.ff_gate_proj.weight     [ffn, d]
    model.encode_layers.{i}.ff_up_proj.weight       [ffn, d]
    model.encode_layers.{i}.ff_down_proj.weight     [d, ffn]
    model.out_layer_norm.weight / .bias             [d]
    lm_head.weight                                  [vocab, d]   (TransformerLM)
    emb_head.weight                                 [emb_size, d] (TransformerEMB)

Aria's other heads, ``class_head`` (TransformerCL) and ``embedding_adapter``
(the embedding-conditioned LM), are not built here; the loader can skip them.

Training speed: per-block ``torch.compile`` (``compile_blocks``) is the known-good
pattern (compiling the LightningModule fails on torch 2.13 + lightning 2.6.6);
``grad_checkpoint`` recomputes each block in the backward pass; ``attention_backend``
picks the SDPA kernel (cuDNN, flash, ...) for the code run inside it.

    config = ModelConfig.preset("tiny")
    model = TransformerLM(config).compile_blocks()
    logits = model(ids)  # [B, L] -> [B, L, vocab]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from aria_model.kv_cache import KVCache, LayerKV


@dataclass(frozen=True)
class ModelConfig:
    """Decoder shape; the defaults are the released Aria "medium" model."""

    d_model: int = 1536
    n_heads: int = 24  # full MHA; head_dim = d_model / n_heads = 64
    n_layers: int = 16
    ffn_hidden: int = 6144  # SwiGLU hidden width, 4 x d_model as in Aria
    max_seq_len: int = 8192  # pretraining window; also the length of the RoPE tables
    vocab_size: int = 17727  # AbsTokenizer's vocabulary
    rope_theta: float = 500_000.0  # LLaMA-3 base; Aria's value
    norm_eps: float = 1e-5  # nn.LayerNorm's default, which Aria uses
    emb_size: int | None = None  # TransformerEMB projection width (512 in Aria's medium-emb)
    grad_checkpoint: bool = False  # recompute each block in backward (training only)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for the RoPE half-split")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size, optionally with fields overridden (``preset("medium", emb_size=512)``)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**data)


_PRESETS: dict[str, dict[str, Any]] = {
    # CI: trains in seconds on a CPU. Even here the untied 17,727-row embedding and
    # head hold 4.5M of the 5.1M parameters; the trunk is just big enough to learn.
    "tiny": {"d_model": 128, "n_heads": 4, "n_layers": 2, "ffn_hidden": 512, "max_seq_len": 1024},
    # Overnight on a CPU (a few million tokens) or minutes on one H100. Same
    # head_dim (64) and FFN ratio (4x) as medium, so kernels and ratios carry
    # over; 2048 is the contrastive fine-tune length. 51.7M parameters,
    # ~0.36 GFLOP/token for training at 2048.
    "small": {"d_model": 512, "n_heads": 8, "n_layers": 8, "ffn_hidden": 2048, "max_seq_len": 2048},
    # The released Aria model: the ModelConfig defaults.
    "medium": {},
}


# Preferred SDPA kernel first; the others stay allowed, in torch's usual order, for shapes,
# dtypes or devices the preferred one does not support (e.g. every fused kernel on a CPU).
_FALLBACKS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ATTENTION_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_backend(name: str) -> AbstractContextManager:
    """The context that makes ``name`` the first-choice SDPA kernel; ``"auto"`` leaves torch's order.

    It applies when the attention is traced or run inside it, compiled blocks included.
    """
    if name == "auto":
        return nullcontext()
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r}: one of auto, {', '.join(ATTENTION_BACKENDS)}")
    first = ATTENTION_BACKENDS[name]
    return sdpa_kernel([first, *(b for b in _FALLBACKS if b != first)], set_priority=True)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x frequency, [max_seq_len, head_dim / 2], fp32.

    Frequency j is ``theta ** (-2j / head_dim)``. Angles are formed in fp64 because
    ``position * frequency`` reaches 8191 rad, where fp32 keeps only ~3 decimals.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, L, H, hd] by its positions' ``cos``/``sin`` [L, hd / 2].

    Half-split (NeoX) pairing, as Aria: element j pairs with j + hd/2, i.e.
    ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``. Computed in fp32 and cast
    back, so bf16 activations still get exact angles.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then + swiglu(norm2(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.norm1 = nn.LayerNorm(d, eps=config.norm_eps)
        self.mixed_qkv = nn.Linear(d, 3 * d, bias=False)
        self.att_proj_linear = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, eps=config.norm_eps)
        self.ff_gate_proj = nn.Linear(d, config.ffn_hidden, bias=False)
        self.ff_up_proj = nn.Linear(d, config.ffn_hidden, bias=False)
        self.ff_down_proj = nn.Linear(config.ffn_hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        x = x + self._attention(self.norm1(x), cos, sin, kv)
        h = self.norm2(x)
        return x + self.ff_down_proj(F.silu(self.ff_gate_proj(h)) * self.ff_up_proj(h))

    def _attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.mixed_qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # [B, H, L, hd] views: the last dim stays contiguous, which is what the flash and
        # memory-efficient SDPA kernels need, so no copies are made here.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = kv.attend(q, k, v)
        return self.att_proj_linear(out.transpose(1, 2).reshape(batch, length, -1))


class Transformer(nn.Module):
    """The trunk, without a head: ids [B, L] -> final-normed hidden states [B, L, d]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.encode_layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.out_layer_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        # Derived, so not persistent: checkpoints keep exactly Aria's keys.
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(bf16) casts buffers too and to_empty() leaves them uninitialised;
        # the tables are derived, so rebuild them in fp32 after every move or cast.
        super()._apply(fn, recurse)
        self.rope_cos, self.rope_sin = rope_tables(
            self.config.head_dim, self.config.max_seq_len, self.config.rope_theta, device=self.rope_cos.device
        )
        return self

    def forward(
        self, ids: torch.Tensor, cache: KVCache | None = None, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """Hidden states for ``ids``; with ``cache``, the tokens sit at ``start_pos``, ``start_pos + 1``, ...

        Without a cache, ids are a fresh sequence from position 0 (``start_pos`` must be 0).
        With one, their keys/values are written into it and attention covers every
        earlier position already written (prefill a prompt, then decode one token a step).
        ``start_pos`` may be a 0-dim tensor, so a compiled decode step does not
        recompile for every position.
        """
        batch, length = ids.shape
        x = self.tok_embeddings(ids)
        if cache is None:
            if not (isinstance(start_pos, int) and start_pos == 0):
                raise ValueError("start_pos needs a cache: without one, ids start at position 0")
            if length > self.config.max_seq_len:
                raise ValueError(f"sequence of {length} tokens is longer than max_seq_len {self.config.max_seq_len}")
            cos, sin = self.rope_cos[:length], self.rope_sin[:length]
            remat = self.config.grad_checkpoint and self.training and torch.is_grad_enabled()
            for block in self.encode_layers:
                x = checkpoint(block, x, cos, sin, use_reentrant=False) if remat else block(x, cos, sin)
        else:
            if batch != cache.batch_size:
                raise ValueError(f"batch of {batch} rows for a cache of {cache.batch_size}")
            if isinstance(start_pos, int) and start_pos + length > cache.max_seq_len:
                raise ValueError(f"positions up to {start_pos + length - 1} overflow a cache of {cache.max_seq_len}")
            positions = start_pos + torch.arange(length, device=ids.device)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            from_start = isinstance(start_pos, int) and start_pos == 0
            for block, kv in zip(self.encode_layers, cache.layers(positions, from_start)):
                x = block(x, cos, sin, kv)
        return self.out_layer_norm(x)


class _Decoder(nn.Module):
    """The trunk as ``self.model`` (Aria's layout) plus accounting shared by the heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` drops the input table (a lookup, no FLOPs), not the head."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.model.tok_embeddings.weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at ``seq_len``, for MFU.

        PaLM's formula (appendix B; nanoGPT's ``estimate_mfu``): ``6 N + 12 n_layers d seq_len``.
        N counts the matmul weights (every parameter but the input embedding): 2 FLOPs
        per weight forward, 4 backward. The second term is attention's QK^T and AV
        (2 x 2 d seq_len forward per layer, x3 with backward), counted without the
        causal halving, as PaLM does. Checkpointing's recompute is not counted
        (that would be hardware, not model, FLOPs).
        """
        c = self.config
        return 6 * self.num_params(exclude_embeddings=True) + 12 * c.n_layers * c.d_model * seq_len

    def compile_blocks(self, **compile_kwargs: Any) -> _Decoder:
        """``torch.compile`` each block in place (``Module.compile``), keeping parameter names unchanged."""
        for block in self.model.encode_layers:
            block.compile(**compile_kwargs)
        return self


class TransformerLM(_Decoder):
    """Decoder with the language-model head: ids [B, L] -> logits [B, L, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(
        self, ids: torch.Tensor, cache: KVCache | None = None, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        return self.lm_head(self.model(ids, cache=cache, start_pos=start_pos))

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache on the model's device; dtype defaults to the weights' (bf16 weights -> bf16 cache)."""
        c = self.config
        max_seq_len = max_seq_len or c.max_seq_len
        if max_seq_len > c.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} exceeds max_seq_len {c.max_seq_len} (the RoPE tables)")
        weight = self.lm_head.weight
        return KVCache(c.n_layers, batch_size, c.n_heads, c.head_dim, max_seq_len, dtype or weight.dtype, weight.device)


class TransformerEMB(_Decoder):
    """Decoder with Aria's embedding head: Linear(d, emb_size) at every position.

    The piece embedding is the head's output at the ``<E>`` position (``embed``).
    """

    def __init__(self, config: ModelConfig):
        if config.emb_size is None:
            raise ValueError(
                "TransformerEMB needs config.emb_size (Aria: 512), e.g. ModelConfig.preset(name, emb_size=512)"
            )
        super().__init__(config)
        self.emb_head = nn.Linear(config.d_model, config.emb_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Projections at every position: [B, L] -> [B, L, emb_size]."""
        return self.emb_head(self.model(ids))

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Row b's projection at ``positions[b]`` (its ``<E>`` index): [B, L], [B] -> [B, emb_size]."""
        hidden = self.model(ids)
        rows = torch.arange(ids.shape[0], device=ids.device)
        # The head is per-position, so project only the picked rows.
        return self.emb_head(hidden[rows, positions])


ARIA_HEADS = ("lm_head", "emb_head", "class_head", "embedding_adapter")
_TRUNK_NAMES = ("tok_embeddings.", "encode_layers.", "out_layer_norm.")


@dataclass(frozen=True)
class AriaLoadReport:
    loaded: int  # tensors copied into the model
    left_at_init: tuple[str, ...]  # our head parameters the state dict lacked (heads_optional)
    skipped: tuple[str, ...]  # head tensors of another Aria head (heads_optional)


def aria_to_ours(name: str) -> str:
    """Our parameter name for an Aria state-dict key.

    The layouts are the same; this removes wrappers Aria's checkpoints may carry
    (``_orig_mod.`` from torch.compile, ``module.`` from DDP/accelerate) and adds
    ``model.`` to a bare trunk key (a ``Transformer`` state dict without a head).
    """
    name = name.replace("_orig_mod.", "")
    name = name.removeprefix("module.")
    if name.startswith(_TRUNK_NAMES):
        name = "model." + name
    return name


def load_aria_state_dict(
    model: _Decoder, state_dict: Mapping[str, torch.Tensor], heads_optional: bool = False
) -> AriaLoadReport:
    """Load an EleutherAI/aria state dict (e.g. a released ``model.safetensors``) into ``model``.

    Every trunk tensor must be present with our shape. Heads must match too unless
    ``heads_optional``, which lets a pretrained LM initialise a TransformerEMB (Aria's
    contrastive start: ``lm_head`` is skipped, ``emb_head`` keeps its init).
    Raises ``ValueError`` naming every missing, unexpected and mis-shaped key.
    """
    theirs = {aria_to_ours(k): v for k, v in state_dict.items()}
    ours = model.state_dict()
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    left_at_init, skipped = (), ()
    if heads_optional:
        left_at_init = tuple(k for k in missing if k.startswith(ARIA_HEADS))
        skipped = tuple(k for k in unexpected if k.startswith(ARIA_HEADS))
        missing = [k for k in missing if k not in left_at_init]
        unexpected = [k for k in unexpected if k not in skipped]
    mis_shaped = [
        f"{k}: {tuple(theirs[k].shape)} vs ours {tuple(ours[k].shape)}"
        for k in sorted(set(ours) & set(theirs))
        if theirs[k].shape != ours[k].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = [(missing, "missing"), (unexpected, "unexpected"), (mis_shaped, "wrong shape")]
        raise ValueError(
            "state dict does not fit this model: "
            + "; ".join(f"{len(keys)} {what}: {', '.join(keys)}" for keys, what in problems if keys)
        )
    matched = {k: theirs[k] for k in ours if k in theirs}
    model.load_state_dict(matched, strict=False)
    return AriaLoadReport(loaded=len(matched), left_at_init=left_at_init, skipped=skipped)
