"""A plain PyTorch LLaMA-style decoder and training step: the baseline ``bench/train.py`` times ours against.

Written the textbook way, independently of ``aria_model.model``, with the same shape as
an Aria preset so the parameter count matches exactly: pre-LayerNorm blocks, separate
q/k/v projections, RoPE with the half-split ``rotate_half`` formulation (cos/sin cast to
the activations' dtype), ``F.scaled_dot_product_attention(is_causal=True)``, a SwiGLU
feed-forward, a final LayerNorm and an untied head. The step is the loop everyone
writes: forward, cross-entropy, backward, AdamW (fused on CUDA), zero_grad; bf16 autocast
on a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.attention_norm = nn.LayerNorm(d_model, eps=eps)
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        self.ffn_norm = nn.LayerNorm(d_model, eps=eps)
        self.w_gate = nn.Linear(d_model, ffn_hidden, bias=False)
        self.w_up = nn.Linear(d_model, ffn_hidden, bias=False)
        self.w_down = nn.Linear(ffn_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        h = self.attention_norm(x)
        # [B, L, d] -> [B, H, L, head_dim]
        q = self.wq(h).view(batch, length, self.n_heads, -1).transpose(1, 2)
        k = self.wk(h).view(batch, length, self.n_heads, -1).transpose(1, 2)
        v = self.wv(h).view(batch, length, self.n_heads, -1).transpose(1, 2)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(attended.transpose(1, 2).reshape(batch, length, d_model))
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, H, L, head_dim] with [L, head_dim] tables (each frequency written twice)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class ReferenceLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, ffn_hidden: int,
                 max_seq_len: int, rope_theta: float, eps: float = 1e-5):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(ReferenceBlock(d_model, n_heads, ffn_hidden, eps) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        head_dim = d_model // n_heads
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        cos, sin = self.cos[:length], self.sin[:length]
        x = self.embedding(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


class ReferenceTrainer:
    """The plain loop's step on one batch; ``step`` returns the loss tensor (no host sync)."""

    def __init__(self, model: ReferenceLM, lr: float = 3e-4, weight_decay: float = 0.1, bf16: bool = False,
                 pad_id: int = -100):
        self.model = model
        device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                           fused=device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.pad_id = pad_id

    def step(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            logits = self.model(source)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), ignore_index=self.pad_id)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
