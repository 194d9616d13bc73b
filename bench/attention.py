"""SDPA kernels at the training shapes: causal attention forward + backward per backend, in one run.

Which kernel ``F.scaled_dot_product_attention`` should use (``train.attention``) is a measurement,
not a guess: this times each backend on the shapes the presets train at (bf16, head_dim 64),
against torch's own choice ("auto"), and checks each output against auto's. Each backend runs alone
here (no fallback), so a kernel that cannot take a shape says so instead of timing another.

    .venv/bin/python bench/attention.py            # on a GPU machine
    .venv/bin/python bench/attention.py --dry-run  # the same code on a CPU at toy shapes

TFLOP/s counts the causal half only: 4 B H L^2 hd / 2 forward, 2.5x that backward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from aria_model.model import ATTENTION_BACKENDS  # noqa: E402

# (name, batch, heads, length): medium pretraining, small pretraining, small contrastive views
SHAPES = (("medium 4x8192", 4, 24, 8192), ("small 16x2048", 16, 8, 2048), ("contrastive 64x2048", 64, 8, 2048))
HEAD_DIM = 64


def time_backend(name: str, q, k, v, grad, steps: int) -> tuple[float, torch.Tensor]:
    """Median seconds of forward + backward with only backend ``name`` allowed, and the output."""
    seconds = []
    for i in range(steps + 3):
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize() if q.is_cuda else None
        started = time.perf_counter()
        with nullcontext() if name == "auto" else sdpa_kernel(ATTENTION_BACKENDS[name]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)
        torch.cuda.synchronize() if q.is_cuda else None
        if i >= 3:
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), out.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, toy shapes: a crash test")
    args = parser.parse_args(argv)
    device, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    shapes = (("toy 2x256", 2, 4, 256),) if args.dry_run else SHAPES
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print(f"{'shape':<22} {'backend':<10} {'ms fwd+bwd':>10} {'TFLOP/s':>8} {'vs auto':>8} {'max |diff| vs auto':>19}")
    for label, batch, heads, length in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, length, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(batch, heads, length, HEAD_DIM, device=device, dtype=dtype)
        flops = 4 * batch * heads * length**2 * HEAD_DIM / 2 * 3.5
        auto, reference = time_backend("auto", q, k, v, grad, args.steps)
        for name in ("auto", *ATTENTION_BACKENDS):
            if name == "math" and not args.dry_run:
                continue  # materialises L x L scores: minutes and tens of GB at 8192
            try:
                seconds, out = (auto, reference) if name == "auto" else time_backend(name, q, k, v, grad, args.steps)
            except RuntimeError as err:  # a backend that cannot run this shape/device says why
                print(f"{label:<22} {name:<10} unsupported: {str(err).splitlines()[0][:80]}")
                continue
            diff = (out.float() - reference.float()).abs().max().item()
            print(f"{label:<22} {name:<10} {seconds * 1e3:10.2f} {flops / seconds / 1e12:8.1f} "
                  f"{auto / seconds:7.2f}x {diff:19.2e}", flush=True)


if __name__ == "__main__":
    main()
