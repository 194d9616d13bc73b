"""Static key/value cache for generation with the decoders in ``aria_model.model``.

One preallocated ``[B, H, Lmax, head_dim]`` buffer pair per layer, in a chosen
dtype (bf16 on GPU, as Aria's inference; fp32 for exact tests). A forward call
with a cache writes the new keys/values at their absolute positions and attends
over the whole buffer under a boolean mask ``key_position <= query_position``.
Every row of the batch shares the same positions (prefill of equal-length
prompts, then one token per step), as in Aria's ``sample_batch``.

Attending over all ``Lmax`` slots (masked) instead of only the filled prefix keeps
every decode step the same shape, so a compiled/CUDA-graphed decode step never
recompiles; the cost is attention over empty slots, small next to the matmuls
at Aria's 1536 width. Stale slots from an earlier use are harmless: a slot is
visible only once its position has been written in this generation. A prefill
from position 0 sees only its own tokens, so it attends over them with the causal
kernels (flash, cuDNN) rather than a mask over the whole buffer, which only the
slower memory-efficient kernel takes.

    model = TransformerLM(config)
    cache = model.new_cache(batch_size=2, max_seq_len=4096)
    logits = model(prompt, cache=cache, start_pos=0)           # prefill
    logits = model(next_ids[:, None], cache=cache, start_pos=t)  # one decode step
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LayerKV(NamedTuple):
    """One layer's cache buffers plus this call's positions and mask (built by ``KVCache.layers``)."""

    k: torch.Tensor  # [B, H, Lmax, head_dim]
    v: torch.Tensor
    positions: torch.Tensor  # [L] absolute positions of the call's tokens
    mask: torch.Tensor | None  # [L, Lmax] bool, True where the query may attend; None: a prefill from 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store ``k``/``v`` ([B, H, L, hd], already rotated) and attend ``q`` over the cache."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        self.k.index_copy_(2, self.positions, k)
        self.v.index_copy_(2, self.positions, v)
        if self.mask is None:
            out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q.to(self.k.dtype), self.k, self.v, attn_mask=self.mask)
        return out.to(q.dtype)


class KVCache:
    """Per-layer static K/V buffers ``[batch_size, n_heads, max_seq_len, head_dim]``."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, n_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.key_positions = torch.arange(max_seq_len, device=device)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def layers(self, positions: torch.Tensor, from_start: bool = False) -> list[LayerKV]:
        """Every layer's view for a call whose tokens sit at ``positions`` (shared by all rows);
        ``from_start``: they are positions 0, 1, ... (a prefill), so nothing else in the cache counts."""
        mask = None if from_start else positions[:, None] >= self.key_positions[None, :]
        return [LayerKV(k, v, positions, mask) for k, v in zip(self.k, self.v)]
