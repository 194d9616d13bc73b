"""Generation speed: KV-cached decoding against a full forward per token, and the GPU latency targets.

Both sections run ``aria_model.generation.sample_batch``, the loop ``generate`` and ``aria generate``
use (sampling with Aria's defaults included), on models with random weights: speed does not depend
on what the weights say. The prompt is 2,048 real tokens (a synthetic performance, tokenized).

- ``cpu``: tokens/s at 2k context with the static KV cache (prefill once, one token per step)
  and without it (the whole sequence through the model for every token), for the tiny and small
  presets, fp32. Target: cached >= 10x uncached.
- ``gpu`` (when CUDA is available): the medium preset in bf16, batch 1, 2,048-token prompt.
  Per-token decode latency with the static cache, eager and compiled
  (``torch.compile(mode="reduce-overhead")``: CUDA graphs), target <= 1.5 ms on an H100 (eager is
  ~5.3 ms there; reading the weights once from HBM takes ~0.45 ms); time to first note: prefill
  plus the three tokens of one note (note, onset, duration), target <= 15 ms. The compiled path's
  greedy tokens are checked against eager's.

    flock /tmp/aria-bench.lock .venv/bin/python bench/generate.py                # cpu (+ gpu with CUDA)
    flock /tmp/aria-bench.lock .venv/bin/python bench/generate.py --threads 1    # steadier on a shared CPU
    .venv/bin/python bench/generate.py --sections gpu                           # on a GPU machine
    .venv/bin/python bench/generate.py --dry-run-gpu-path                       # gpu section on CPU, tiny

``--dry-run-gpu-path`` runs the GPU section's code (bf16 weights and cache, the compiled step
with the default inductor backend) on the CPU with the tiny preset, so a first GPU session does
not fail on something a CPU could have caught; its timings say nothing about the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from aria_model.generation import GenerationConfig, GenerationTiming, sample_batch  # noqa: E402
from aria_model.midi import Performance  # noqa: E402
from aria_model.model import ModelConfig, TransformerLM  # noqa: E402
from aria_model.tokenizer import AbsTokenizer  # noqa: E402

TOKENIZER = AbsTokenizer()
CONTEXT = 2048  # prompt tokens
CACHED_OVER_UNCACHED = 10.0  # target, cpu section
STEP_MS_TARGET = 1.5  # target, compiled decode step on an H100
FIRST_NOTE_MS_TARGET = 15.0  # target, prefill + one note on an H100
NOTE_TOKENS = 3  # (instrument, pitch, velocity) (onset) (dur)


def bench_prompt(n_tokens: int = CONTEXT, seed: int = 0) -> np.ndarray:
    """``n_tokens`` ids of a tokenized random performance: prefix, <S>, then notes."""
    rng = np.random.default_rng(seed)
    n_notes = n_tokens // 3 + 10
    onsets = np.cumsum(rng.integers(40, 300, n_notes))
    perf = Performance.from_ms(onset_ms=onsets, duration_ms=rng.integers(50, 1500, n_notes),
                               pitch=rng.integers(30, 100, n_notes), velocity=rng.integers(30, 110, n_notes),
                               instrument=np.zeros(n_notes), channel=np.zeros(n_notes), instruments=("piano",))
    return TOKENIZER.tokenize_ids(perf, add_dim_tok=False, add_eos_tok=False)[:n_tokens].astype(np.int64)


def random_model(preset: str, device: str, dtype: torch.dtype, seed: int = 0) -> TransformerLM:
    # Room for the 2k prompt and the new tokens even in presets trained at shorter lengths.
    config = ModelConfig.preset(preset, max_seq_len=max(ModelConfig.preset(preset).max_seq_len, 4096))
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: a medium model is slow to build on a CPU
        model = TransformerLM(config)
    return model.to(dtype).eval()


def timed(model: TransformerLM, prompt: np.ndarray, config: GenerationConfig, seed: int = 0) -> tuple[torch.Tensor, GenerationTiming]:
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    return sample_batch(model, TOKENIZER, prompt, config, generator)


# -- cpu ---------------------------------------------------------------------------------------


def cpu_section(presets: list[str], cached_tokens: int, uncached_tokens: int) -> list[tuple[str, float]]:
    prompt = bench_prompt()
    print(f"\ncpu: prompt {len(prompt)} tokens, batch 1, fp32, {torch.get_num_threads()} threads, "
          f"sampling temperature 0.98 + min-p 0.035")
    print(f"{'preset':<7} {'params':>7} {'path':<9} {'new tokens':>10} {'first token ms':>14} "
          f"{'ms/token':>9} {'tokens/s':>9} {'ratio':>7}")
    ratios = []
    for preset in presets:
        model = random_model(preset, "cpu", torch.float32)
        params = f"{model.num_params() / 1e6:.1f}M"
        base = GenerationConfig(variations=1)
        _, uncached = timed(model, prompt, dataclasses.replace(base, length=uncached_tokens, use_cache=False))
        _, cached = timed(model, prompt, dataclasses.replace(base, length=cached_tokens))
        ratio = cached.tokens_per_s / uncached.tokens_per_s
        for path, timing, shown in (("uncached", uncached, ""), ("cached", cached, f"{ratio:6.1f}x")):
            print(f"{preset:<7} {params:>7} {path:<9} {timing.steps:>10} {timing.first_token_s * 1e3:>14.0f} "
                  f"{timing.ms_per_step:>9.2f} {timing.tokens_per_s:>9.1f} {shown:>7}")
        ratios.append((preset, ratio))
    return ratios


# -- gpu ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class GpuResult:
    eager: GenerationTiming
    compiled: GenerationTiming
    agree: int
    compared: int
    cudagraph_skips: int  # inductor's count of compiled graphs that run without CUDA graphs


def gpu_section(preset: str, device: str, new_tokens: int, backend: str) -> GpuResult:
    torch._logging.set_logs(cudagraphs=True)  # inductor says so when a graph cannot be captured, and why
    model = random_model(preset, device, torch.bfloat16)
    prompt = bench_prompt()
    base = GenerationConfig(variations=1, cache_dtype=torch.bfloat16, length=new_tokens)
    warm = dataclasses.replace(base, length=16)  # same cache bucket as the timed runs: nothing recompiles
    compiled = dataclasses.replace(base, compile=True, compile_backend=backend)
    print(f"\ngpu path on {device}: preset {preset} ({model.num_params() / 1e6:.0f}M parameters, bf16), prompt "
          f"{len(prompt)} tokens, batch 1; compiling ({backend}) ...", flush=True)
    timed(model, prompt, warm)  # kernels, cuBLAS handles
    _, eager = timed(model, prompt, base)
    timed(model, prompt, dataclasses.replace(compiled, length=16))  # compile, then CUDA-graph warm-up and capture
    _, fast = timed(model, prompt, compiled)
    greedy = dataclasses.replace(base, length=32, temperature=0.0)
    reference, _ = timed(model, prompt, greedy)
    check, _ = timed(model, prompt, dataclasses.replace(greedy, compile=True, compile_backend=backend))
    new_ref, new_check = reference[0, len(prompt):], check[0, len(prompt):]
    n = min(len(new_ref), len(new_check))
    # bf16 kernels of the two paths round differently; once one token differs the rest may too.
    agree = int((new_ref[:n] == new_check[:n]).int().cumprod(0).sum())
    return GpuResult(eager, fast, agree, n, counters["inductor"]["cudagraph_skips"])


def print_gpu(result: GpuResult, dry_run: bool) -> None:
    print(f"{'path':<9} {'new tokens':>10} {'ms/token':>9} {'tokens/s':>9} {'first token ms':>14} "
          f"{'first note ms':>13}")
    for path, timing in (("eager", result.eager), ("compiled", result.compiled)):
        first_note = timing.token_s[NOTE_TOKENS - 1] * 1e3 if timing.steps >= NOTE_TOKENS else float("nan")
        print(f"{path:<9} {timing.steps:>10} {timing.ms_per_step:>9.3f} {timing.tokens_per_s:>9.1f} "
              f"{timing.first_token_s * 1e3:>14.1f} {first_note:>13.1f}")
    print(f"compiled vs eager greedy: the first {result.agree} of {result.compared} tokens agree")
    if dry_run:
        print("CUDA graphs: none on a CPU; the compiled step runs inductor's CPU kernels")
    else:
        print("CUDA graphs: " + (f"skipped {result.cudagraph_skips} times (the cudagraphs log lines above say why)"
                                 if result.cudagraph_skips else "used"))
    step_ms = result.compiled.ms_per_step
    first_note_ms = result.compiled.token_s[NOTE_TOKENS - 1] * 1e3
    speedup = result.eager.ms_per_step / step_ms
    if dry_run:
        print(f"dry run (CPU, not the targeted model): compiled step {step_ms:.2f} ms ({speedup:.1f}x eager); "
              "the targets apply to medium on an H100")
        return
    for name, value, target in (("compiled decode step (H100)", step_ms, STEP_MS_TARGET),
                                ("time to first note (H100)", first_note_ms, FIRST_NOTE_MS_TARGET)):
        verdict = "PASS" if value <= target else "MISSED"
        print(f"target {name} <= {target:g} ms: {value:.2f} ms  {verdict}")
    print(f"compiled / eager step: {speedup:.1f}x faster; "
          "H100 reference: eager ~5.3 ms, weights read once from HBM ~0.45 ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=None, help="cpu,gpu (default: cpu, plus gpu when CUDA is available)")
    parser.add_argument("--presets", default="tiny,small", help="cpu section presets")
    parser.add_argument("--cached-tokens", type=int, default=256, help="new tokens, cached path")
    parser.add_argument("--uncached-tokens", type=int, default=16, help="new tokens, uncached path")
    parser.add_argument("--gpu-tokens", type=int, default=256, help="new tokens per timed gpu run")
    parser.add_argument("--dry-run-gpu-path", action="store_true",
                        help="run the gpu section on the CPU with the tiny preset (checks, not timings)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the gpu section")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = args.sections.split(",") if args.sections else ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
    if args.dry_run_gpu_path:
        sections = ["gpu"]

    if "cpu" in sections:
        ratios = cpu_section(args.presets.split(","), args.cached_tokens, args.uncached_tokens)
        for preset, ratio in ratios:
            verdict = "PASS" if ratio >= CACHED_OVER_UNCACHED else "MISSED"
            print(f"target {preset}: cached / uncached tokens/s at {CONTEXT} context >= "
                  f"{CACHED_OVER_UNCACHED:g}x: {ratio:.1f}x  {verdict}")
    if "gpu" in sections:
        if args.dry_run_gpu_path:
            print_gpu(gpu_section("tiny", "cpu", 32, args.backend), dry_run=True)
        elif not torch.cuda.is_available():
            print("\ngpu section skipped: CUDA is not available (try --dry-run-gpu-path)")
        else:
            print(f"device: {torch.cuda.get_device_name()}")
            print_gpu(gpu_section("medium", "cuda", args.gpu_tokens, args.backend), dry_run=False)


if __name__ == "__main__":
    main()
