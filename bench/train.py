"""Training throughput: our training path against a plain PyTorch loop of the same architecture, in one run.

Three things are timed, on token shards built from the golden MIDI files (each file
transposed into ``--copies`` distinct files, so an epoch outlasts the timed steps), or on
``--shards`` (e.g. ``$ARIA_HOME/token_shards`` after ``aria demo``):

1. reference: ``bench/reference_model.py``, the textbook decoder of the same shape (the
   parameter count is asserted equal) and the textbook loop; fed batches already in memory.
2. ours: ``aria_model.training.pretrain.pretrain()`` itself (``PretrainModule`` under its
   Lightning ``Trainer`` with ``AriaDataModule``, precision, callbacks and all), timed per
   optimizer step through its progress callback; and our model step alone (``TransformerLM``,
   ``aria_loss``, ``adamw`` and the schedule in a plain loop on the reference's batches), which
   splits the gap into model speed and trainer overhead.
3. the train loader alone (``AriaDataModule.train_dataloader()``: augmentation on, the
   preset's seq_len and batch), whole epochs with 0 and 2 workers, against the trainer's rate.

Goals: ours >= 1.0x the reference's tokens/s; the loader >= 10x the trainer's.

On a CPU (default): the tiny and small presets in fp32, small with batch 1 instead of its 16 so
that a step takes seconds, not minutes. Other jobs' load drifts by the minute, so the plain
loops take turns with pretrain()'s steps (a reference step and one of our model step after each
of its steps) and every rate is that of the median step. For tiny (``--variants``) pretrain()
runs twice more, each time against the reference again: with MLflow tracking on (the pipeline's
default; off in the main row) and with a proposed change (fused AdamW on the CPU).
``--profile`` adds where a tiny pretrain() step goes (cProfile).

With ``--gpu`` (the default when CUDA is available): the medium preset at 4 x 8192 in bf16
autocast, eager and with per-block ``torch.compile``, our model with and without activation
checkpointing (the preset does not checkpoint, nor does the reference), pretrain() compiled with and
without it and with MLflow on, our step with the loss left eager (as before it was compiled), each
``--attention-variants`` SDPA kernel in our step and in pretrain(), plus MFU from
``flops_per_token`` against the card's dense bf16 peak and the peak GPU memory of each row; a
row that runs out of memory says so and the others go on. ``--dry-run-gpu-path`` runs that
same code on this CPU with the tiny model, so a GPU session does not start by finding a crash.

    PYTHONPATH=. .venv/bin/python bench/train.py                       # CPU: tiny + small, ~8 min on 2 cores
    PYTHONPATH=. .venv/bin/python bench/train.py --presets tiny --threads 1 --profile
    PYTHONPATH=. .venv/bin/python bench/train.py --dry-run-gpu-path    # the GPU rows on the CPU, tiny model
    PYTHONPATH=. .venv/bin/python bench/train.py --gpu                 # one H100/H200: medium, ~6 min
    PYTHONPATH=. .venv/bin/python bench/train.py --gpu --rows 'reference|pretrain'  # only some GPU rows

Timings are wall clock on whatever else the machine runs; on a shared machine rerun before
trusting a miss. The cpu ratio column compares CPU seconds per step, which others' load
disturbs less; ``--threads 1`` keeps a step off the second core that other jobs contend for.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import os
import pstats
import re
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning
import mido
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from aria_model.data import AriaDataModule  # noqa: E402
from aria_model.model import ModelConfig, TransformerLM, attention_backend  # noqa: E402
from aria_model.notes_table import update_notes_tables  # noqa: E402
from aria_model.shards import ShardConfig, ShardInputs, build_token_shards, read_manifest  # noqa: E402
from aria_model.sources import build_manifest  # noqa: E402
from aria_model.tokenizer import AbsTokenizer  # noqa: E402
from aria_model.training import lm_module  # noqa: E402
from aria_model.training.config import PretrainConfig  # noqa: E402
from aria_model.training.lm_module import aria_loss  # noqa: E402
from aria_model.training.optim import adamw, warmup_linear_decay  # noqa: E402
from aria_model.training.pretrain import pretrain  # noqa: E402
from bench.common import run_in_scratch  # noqa: E402
from bench.reference_model import ReferenceLM, ReferenceTrainer  # noqa: E402

GOLDEN_MIDI = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "midi"
TRAINER_GOAL = 1.0  # ours / reference tokens/s
LOADER_GOAL = 10.0  # loader / trainer tokens/s
# Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity); H200 has H100 SXM's compute.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12))
PAD_ID = AbsTokenizer().pad_id
DRUMS = 9  # General MIDI's percussion channel: its "notes" are instruments, so they are not transposed


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One preset as timed here: the model and the data shape, and how the step runs."""

    preset: str  # the PretrainConfig preset ours runs
    model: ModelConfig
    seq_len: int
    batch_size: int
    num_workers: int  # the train loader's, in ours
    warmup: int  # steps run before timing (allocator, caches, compilation)
    steps: int  # timed steps
    device: str = "cpu"
    bf16: bool = False  # autocast, as Lightning's "bf16-mixed"
    compiled: bool = False  # torch.compile per transformer block (ours: compile_blocks; the reference alike)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def shape(self) -> str:
        return f"{self.seq_len}x{self.batch_size}"


def cpu_setting(preset: str, args: argparse.Namespace) -> Setting:
    config = PretrainConfig.preset(preset)
    batch = args.small_batch if preset == "small" else config.data.batch_size
    steps = args.small_steps if preset == "small" else args.tiny_steps
    return Setting(preset, config.model, config.data.seq_len, batch, config.data.num_workers, warmup=1, steps=steps)


def gpu_settings(args: argparse.Namespace) -> list[Setting]:
    """Medium at 4 x 8192 on the GPU; the dry run keeps every switch but uses the tiny model on the CPU."""
    config = PretrainConfig.preset("medium")
    if args.dry_run_gpu_path:
        base = Setting("medium", ModelConfig.preset("tiny", max_seq_len=256), 256, 2,
                       num_workers=2, warmup=2, steps=2, device="cpu", bf16=True)
    else:
        base = Setting("medium", config.model, config.data.seq_len, config.data.batch_size, config.data.num_workers,
                       warmup=args.gpu_warmup, steps=args.gpu_steps, device="cuda", bf16=True)
    return [dataclasses.replace(base, compiled=compiled) for compiled in (False, True)]


# -- corpus: real token shards ---------------------------------------------------------------


def transposed_copies(source: Path, target: Path, copies: int) -> None:
    """Each MIDI file of ``source`` as ``copies`` files transposed by 0, +1, -1, +2, ... semitones.

    Distinct contents (the pipeline keys files by content hash) with the golden files' real
    token statistics: enough files that an epoch outlasts the timed steps. Drums stay put.
    """
    target.mkdir(parents=True, exist_ok=True)
    shifts = [(i + 1) // 2 * (1 if i % 2 else -1) for i in range(copies)]
    for path in sorted(source.glob("*.mid")):
        midi = mido.MidiFile(path)
        for shift in shifts:
            moved = mido.MidiFile(type=midi.type, ticks_per_beat=midi.ticks_per_beat)
            for track in midi.tracks:
                moved.tracks.append(mido.MidiTrack(
                    msg.copy(note=min(max(msg.note + shift, 0), 127))
                    if msg.type in ("note_on", "note_off") and msg.channel != DRUMS else msg
                    for msg in track))
            moved.save(target / f"{path.stem}__{shift:+d}.mid")


def build_shards(work: Path, copies: int, workers: int) -> Path:
    """Token shards of the transposed golden files: every file kept by dedup and passed by quality."""
    source = work / "midi"
    transposed_copies(GOLDEN_MIDI, source, copies)
    manifest = build_manifest(source).table
    inputs = ShardInputs(work / "midi_notes", work / "raw_midi_manifest.parquet", work / "opus_dedup.parquet",
                         work / "quality_filter.parquet")
    pq.write_table(manifest, inputs.raw_manifest)
    files = list(zip(manifest["file_id"].to_pylist(), manifest["path"].to_pylist()))
    update_notes_tables(files, inputs.notes_dir, work / "midi_quarantine", workers=workers)
    file_ids = sorted(set(manifest["file_id"].to_pylist()))
    pq.write_table(pa.table({"file_id": file_ids, "cluster_id": file_ids, "kept": [True] * len(file_ids),
                             "reason": ["kept"] * len(file_ids)}), inputs.dedup)
    pq.write_table(pa.table({"file_id": file_ids, "passed": [True] * len(file_ids),
                             "failed_rules": pa.array([[]] * len(file_ids), pa.list_(pa.string()))}), inputs.quality)
    # Small row groups: the loader splits work by row group, and a few MB of ids still give every worker some.
    config = ShardConfig(shard_tokens=2_000_000, row_group_tokens=50_000, workers=workers)
    return build_token_shards(inputs, work / "token_shards", config).root


def describe_shards(root: Path) -> str:
    splits = read_manifest(root)["splits"]
    return ", ".join(f"{name} {split['files']} files {split['tokens']:,} tokens" for name, split in splits.items())


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Timing:
    """Timed steps of one run: wall and CPU seconds (this process's threads) of each, and their tokens."""

    tokens_per_step: int
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_memory: float | None = None  # bytes, on a GPU
    note: str = ""  # why there is no rate (e.g. out of memory)

    def add(self, seconds: float, cpu: float | None = None) -> None:
        self.seconds.append(seconds)
        if cpu is not None:
            self.cpu.append(cpu)

    @property
    def rate(self) -> float:
        """Tokens/s of the median step: a step slowed by another job's burst does not move it."""
        return self.tokens_per_step / statistics.median(self.seconds) if self.seconds else 0.0

    def per_step(self) -> str:
        if not self.seconds:
            return self.note
        if not self.cpu:  # a loader's whole read
            return f"{sum(self.seconds):.1f} s in all"
        return f"{statistics.median(self.seconds) * 1e3:,.0f} ms/step, {statistics.median(self.cpu) * 1e3:,.0f} cpu"

    def spread(self) -> str:
        """The slowest and fastest step's tokens/s: how noisy the machine was."""
        if len(self.seconds) < 2:
            return ""
        return f"{self.tokens_per_step / max(self.seconds):,.0f}-{self.tokens_per_step / min(self.seconds):,.0f}"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def start_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


class PlainLoop:
    """A plain loop's ``step(source, target, mask)`` over ``batches``, one step at a time, timed after warm-up.

    One call of ``step()`` is one training step, so the loop can run on its own (``run``) or
    take turns with another (see ``StepClock``).
    """

    def __init__(self, step, batches: list, setting: Setting):
        self._step, self.batches, self.setting = step, batches, setting
        self.done = 0
        self.timing = Timing(setting.tokens_per_step)

    def step(self) -> None:
        source, target, mask = self.batches[self.done % len(self.batches)]
        synchronize(self.setting.device)
        started, cpu_started = time.perf_counter(), time.process_time()
        self._step(source, target, mask)
        synchronize(self.setting.device)  # a GPU step is done when its kernels are, not when they are queued
        if self.done >= self.setting.warmup:
            self.timing.add(time.perf_counter() - started, time.process_time() - cpu_started)
        self.done += 1

    def run(self) -> Timing:
        start_memory(self.setting.device)
        for _ in range(self.setting.warmup + self.setting.steps):
            self.step()
        self.timing.peak_memory = peak_memory(self.setting.device)
        return self.timing


def sample_batches(shards: Path, setting: Setting, count: int) -> list[tuple[torch.Tensor, ...]]:
    """The first ``count`` training batches of the real loader, on the device (the plain loops' data)."""
    data = AriaDataModule(shards, seq_len=setting.seq_len, batch_size=setting.batch_size, num_workers=0)
    data.setup("fit")
    batches = []
    while len(batches) < count:
        for batch in data.train_dataloader():  # each pass is the next epoch
            batches.append(tuple(t.to(setting.device) for t in batch))
            if len(batches) == count:
                break
    return batches


def shape_only(config: ModelConfig) -> TransformerLM:
    """The model on the meta device: its parameter count and FLOPs without memory."""
    with torch.device("meta"):
        return TransformerLM(config)


def model_params(config: ModelConfig) -> int:
    return shape_only(config).num_params()


def reference_loop(setting: Setting, batches: list) -> PlainLoop:
    c = setting.model
    torch.manual_seed(0)
    with torch.device(setting.device):  # initialised in place: medium's 658M parameters take a while on a CPU
        model = ReferenceLM(c.vocab_size, c.d_model, c.n_heads, c.n_layers, c.ffn_hidden, c.max_seq_len,
                            c.rope_theta, c.norm_eps)
    reference_params, ours = sum(p.numel() for p in model.parameters()), model_params(c)
    assert reference_params == ours, f"reference has {reference_params:,} parameters, ours {ours:,}"
    if setting.compiled:
        for block in model.blocks:
            block.compile()
    # Aria's loss ignores <P> targets; the textbook way is ignore_index.
    trainer = ReferenceTrainer(model, bf16=setting.bf16, pad_id=PAD_ID)
    return PlainLoop(lambda source, target, mask: trainer.step(source, target), batches, setting)


def ours_loop(setting: Setting, batches: list, fused_adamw: bool = False, attention: str = "auto",
              compiled_loss: bool | None = None) -> PlainLoop:
    """Our model step without Lightning: what ``PretrainModule.training_step`` and the optimizer do.

    ``fused_adamw``: the proposal of fused AdamW on a CPU too (``adamw`` fuses on CUDA only; the
    per-parameter loop it falls back to makes a pass over the weights per operation).
    ``attention``: the first-choice SDPA kernel (``train.attention``); ``compiled_loss``: the loss
    through ``torch.compile`` (default: when the blocks are, as ``PretrainModule`` does).
    """
    config = PretrainConfig.preset(setting.preset)
    torch.manual_seed(0)
    with torch.device(setting.device):
        net = TransformerLM(setting.model)
    if setting.compiled:
        net.compile_blocks()
    optimizer = adamw(net.parameters(), config.optim)
    if fused_adamw:
        fuse(optimizer)
    schedule = warmup_linear_decay(optimizer, config.optim, setting.warmup + setting.steps)
    autocast = torch.autocast(setting.device, dtype=torch.bfloat16, enabled=setting.bf16)
    loss_fn = torch.compile(aria_loss) if (setting.compiled if compiled_loss is None else compiled_loss) else aria_loss

    def step(source, target, mask):
        with autocast, attention_backend(attention):  # the kernel picked forward also runs the backward
            loss = loss_fn(net(source), target, mask)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)  # Lightning's default

    return PlainLoop(step, batches, setting)


class StepClock:
    """``pretrain``'s report callable: times each optimizer step by its "step k/N" progress line (log_every=1).

    Between two of ours, it runs one step of each loop in ``between`` (in turns, so none always
    follows ours): on a machine other jobs share, every comparison is then made within seconds.
    A step of ours is timed from the end of the previous line's turns to its own line.
    """

    def __init__(self, setting: Setting, between: list[PlainLoop] = ()):
        self.setting, self.between = setting, list(between)
        self.timing = Timing(setting.tokens_per_step)
        self._resumed: tuple[float, float] | None = None

    def __call__(self, line: str) -> None:
        match = re.match(r"step (\d+)/", line)
        if not match:
            return
        now = (time.perf_counter(), time.process_time())
        step = int(match.group(1))
        if self._resumed and step > self.setting.warmup:
            self.timing.add(now[0] - self._resumed[0], now[1] - self._resumed[1])
        turn = step % max(len(self.between), 1)
        for loop in self.between[turn:] + self.between[:turn]:
            loop.step()
        self._resumed = (time.perf_counter(), time.process_time())


def pretrain_config(setting: Setting, shards: Path, out_dir: Path, dry_run: bool,
                    tracking_uri: str | None, attention: str = "auto") -> PretrainConfig:
    overrides = [f"train.attention={attention}",
        f"data.shards={shards}", f"data.seq_len={setting.seq_len}", f"data.batch_size={setting.batch_size}",
        f"data.num_workers={setting.num_workers}", f"out_dir={out_dir}",
        f"train.max_steps={setting.warmup + setting.steps}", f"train.compile={str(setting.compiled).lower()}",
        # One checkpoint and one validation batch, both after the timed steps (pretrain needs them to finish).
        "train.checkpoint_every=1000000000", "train.val_every=0", "train.val_batches=1", "train.log_every=1",
        "train.resume=false",
    ]
    if tracking_uri:  # the pipeline's default: params, per-step metrics, the loss curve; no model registry
        overrides += ["tracking.enabled=true", f"tracking.tracking_uri={tracking_uri}", "tracking.register_as="]
    else:
        overrides += ["tracking.enabled=false"]
    if dry_run:  # what the GPU run gets from precision "auto" on a bf16 card
        overrides += ["train.accelerator=cpu", "train.precision=bf16-mixed"]
    config = PretrainConfig.preset(setting.preset).with_overrides(overrides)
    return dataclasses.replace(config, model=setting.model)


def lightning_run(setting: Setting, shards: Path, work: Path, dry_run: bool = False,
                  between: list[PlainLoop] = (), tracking: bool = False, attention: str = "auto") -> Timing:
    """``pretrain()`` as the pipeline runs it, steps timed by its own progress lines.

    ``tracking``: MLflow on, into a sqlite store in ``work`` (the pipeline's default; off otherwise).
    """
    out_dir = Path(tempfile.mkdtemp(prefix="pretrain-", dir=work))
    clock = StepClock(setting, between)
    tracking_uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}" if tracking else None
    start_memory(setting.device)
    try:
        pretrain(pretrain_config(setting, shards, out_dir, dry_run, tracking_uri, attention), report=clock)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # medium's checkpoint is ~8 GB
    clock.timing.peak_memory = peak_memory(setting.device)
    return clock.timing


def loader_rate(shards: Path, setting: Setting, num_workers: int, min_tokens: int) -> Timing:
    """The trainer's train loader alone: whole epochs (workers start, shuffle buffer fills) until ``min_tokens``.

    One "step" of the Timing is the whole read; its CPU time is left out (the workers' is not this process's).
    """
    data = AriaDataModule(shards, seq_len=setting.seq_len, batch_size=setting.batch_size, num_workers=num_workers)
    data.setup("fit")
    loader = data.train_dataloader()
    tokens = 0
    started = time.perf_counter()
    while tokens < min_tokens:
        for source, _, _ in loader:
            tokens += source.numel()
    timing = Timing(tokens)
    timing.add(time.perf_counter() - started)
    return timing


def guarded(measure, setting: Setting) -> Timing:
    """``measure()``, or a Timing that says "out of memory" (the other rows still run)."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        start_memory(setting.device)
        return Timing(setting.tokens_per_step, note="out of memory")


# -- report ----------------------------------------------------------------------------------


@dataclass
class Row:
    what: str
    shape: str
    ours: Timing
    reference: Timing | None = None
    goal: float | None = None
    extra: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference and self.reference.rate and self.ours.rate:
            return self.ours.rate / self.reference.rate
        return None

    @property
    def cpu_ratio(self) -> float | None:
        """The ratio by CPU seconds per step: what other jobs' load disturbs least."""
        if self.reference and self.reference.cpu and self.ours.cpu:
            return statistics.median(self.reference.cpu) / statistics.median(self.ours.cpu) * (
                self.ours.tokens_per_step / self.reference.tokens_per_step)
        return None


ROWS: list[Row] = []


def add_row(what: str, shape: str, ours: Timing, reference: Timing | None = None, goal: float | None = None,
            extra: str = "") -> Row:
    row = Row(what, shape, ours, reference, goal, extra)
    ROWS.append(row)
    ratio = f"  {row.ratio:.2f}x" if row.ratio else ""
    print(f"  {what} [{shape}]: {ours.rate:,.0f} tok/s{ratio}  {ours.per_step()}  {extra}".rstrip(), flush=True)
    return row


def print_table() -> None:
    header = (f"{'what':<58} {'seq x batch':>11} {'ours tok/s':>11} {'ref tok/s':>10} {'ratio':>7} {'goal':>7} "
              f"{'':<6} {'cpu ratio':>9} {'ours per step':<26} {'ours, step range':<17} notes")
    print("\n" + header)
    print("-" * len(header))
    for row in ROWS:
        reference = f"{row.reference.rate:10,.0f}" if row.reference else " " * 10
        ratio = f"{row.ratio:6.2f}x" if row.ratio else " " * 7
        goal = f">={row.goal:g}x" if row.goal else ""
        verdict = ("PASS" if row.ratio >= row.goal else "MISSED") if row.goal and row.ratio else ""
        rate = f"{row.ours.rate:11,.0f}" if row.ours.rate else f"{'-':>11}"
        cpu_ratio = f"{row.cpu_ratio:8.2f}x" if row.cpu_ratio else " " * 9
        print(f"{row.what:<58} {row.shape:>11} {rate} {reference} {ratio} {goal:>7} {verdict:<6} {cpu_ratio} "
              f"{row.ours.per_step():<26} {row.ours.spread():<17} {row.extra}")


# -- CPU: tiny and small ---------------------------------------------------------------------


def bench_cpu(args: argparse.Namespace, shards: Path, work: Path) -> None:
    for preset in args.presets:
        setting = cpu_setting(preset, args)
        variants = preset in args.variants
        print(f"{preset}: {setting.model.n_layers} layers x d {setting.model.d_model}, "
              f"{model_params(setting.model):,} parameters, seq_len {setting.seq_len} x batch {setting.batch_size} "
              f"(preset batch {PretrainConfig.preset(preset).data.batch_size}), fp32, {setting.warmup} warm-up + "
              f"{setting.steps} timed steps each, loader workers in ours {setting.num_workers}; the reference and "
              f"our model step take turns with pretrain()'s steps", flush=True)
        batches = sample_batches(shards, setting, setting.warmup + setting.steps)
        reference, model_step = reference_loop(setting, batches), ours_loop(setting, batches)
        trainer = lightning_run(setting, shards, work, between=[reference, model_step])
        add_row(f"{preset}: reference (plain PyTorch loop)", setting.shape, reference.timing)
        add_row(f"{preset}: ours, pretrain() (Lightning + loader)", setting.shape, trainer, reference.timing,
                goal=TRAINER_GOAL)
        add_row(f"{preset}: ours, model step (no Lightning)", setting.shape, model_step.timing, reference.timing)
        if variants:
            # Each variant is another pretrain(), against a reference timed in turns with it again.
            reference = reference_loop(setting, batches)
            tracked = lightning_run(setting, shards, work, between=[reference], tracking=True)
            add_row(f"{preset}: ours, pretrain(), MLflow on (pipeline default)", setting.shape, tracked,
                    reference.timing)
            reference, model_step = reference_loop(setting, batches), ours_loop(setting, batches, fused_adamw=True)
            with fused_adamw_in_pretrain():
                fused = lightning_run(setting, shards, work, between=[reference, model_step])
            add_row(f"{preset}: ours, pretrain(), fused AdamW (proposal)", setting.shape, fused, reference.timing)
            add_row(f"{preset}: ours, model step, fused AdamW (proposal)", setting.shape, model_step.timing,
                    reference.timing)
        bench_loader(shards, setting, trainer, args.loader_tokens, preset)


def fuse(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """The proposal: fused AdamW kernels on a CPU too (``adamw`` fuses on CUDA only)."""
    for group in optimizer.param_groups:  # AdamW.step reads the switch from each group
        group["fused"] = True
    return optimizer


@contextmanager
def fused_adamw_in_pretrain():
    """``PretrainModule`` builds its optimizer with fused AdamW kernels on the CPU too, while inside."""
    calls = []

    def fused_adamw(parameters, config):
        calls.append(fuse(adamw(parameters, config)))
        return calls[-1]

    original = lm_module.adamw
    lm_module.adamw = fused_adamw
    try:
        yield
    finally:
        lm_module.adamw = original
    assert calls, "PretrainModule no longer builds its optimizer with lm_module.adamw: update the proposal's patch"


def bench_loader(shards: Path, setting: Setting, trainer: Timing | None, min_tokens: int, name: str) -> None:
    """The train loader at 0 and 2 workers (and the preset's count) against the trainer's rate."""
    for num_workers in sorted({0, 2, setting.num_workers}):
        timing = loader_rate(shards, setting, num_workers, min_tokens)
        add_row(f"{name}: train loader, augmented, {num_workers} workers", setting.shape, timing,
                trainer if trainer and trainer.rate else None, goal=LOADER_GOAL, extra="ratio: loader / trainer")


# -- GPU: medium -----------------------------------------------------------------------------


def peak_flops(args: argparse.Namespace) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if not torch.cuda.is_available():
        return None, "no GPU: give --peak-tflops for an MFU"
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops, f"{flops / 1e12:g} TFLOP/s, the dense bf16 peak of {key} ({name})"
    return None, f"unknown peak for {name}: give --peak-tflops"


def bench_gpu(args: argparse.Namespace, shards: Path, work: Path) -> None:
    settings = gpu_settings(args)
    device = settings[0].device
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # as pretrain() does
        print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} "
              f"GiB", flush=True)
    peak, peak_text = peak_flops(args)
    flops_per_token = shape_only(settings[0].model).flops_per_token(settings[0].seq_len)
    print(f"MFU: {flops_per_token / 1e9:.2f} GFLOP/token (flops_per_token at {settings[0].seq_len}) against "
          f"{peak_text}", flush=True)
    batches = sample_batches(shards, settings[0], settings[0].warmup + settings[0].steps)
    selected = re.compile(args.rows) if args.rows else None

    def run(what: str, setting: Setting, measure, *measure_args, reference: Timing | None = None,
            goal: float | None = None, **measure_kwargs) -> Timing | None:
        if selected and not selected.search(what):
            return None
        print(f"  {what} ...", flush=True)
        start_memory(device)
        # Memory earlier rows failed to free (it would make this row run out early).
        held = torch.cuda.memory_allocated() if device == "cuda" else 0
        timing = guarded(lambda: measure(*measure_args, **measure_kwargs), setting)
        mfu = f"MFU {timing.rate * flops_per_token / peak:.1%}" if peak and timing.rate else ""
        memory = f"peak {timing.peak_memory / 2**30:.1f} GiB" if timing.peak_memory else ""
        leftover = f"{held / 2**30:.1f} GiB held before the row" if held > 2**30 else ""
        add_row(what, setting.shape, timing, reference, goal, ", ".join(filter(None, (mfu, memory, leftover))))
        return timing

    name = "dry run, tiny model" if args.dry_run_gpu_path else "medium"
    preset_trainer = None
    for setting in settings:  # the preset's model: no activation checkpointing
        mode = "compiled blocks" if setting.compiled else "eager"
        remat = dataclasses.replace(setting, model=dataclasses.replace(setting.model, grad_checkpoint=True))
        reference = run(f"{name} {mode}: reference", setting, run_plain, reference_loop, setting, batches)
        run(f"{name} {mode}: ours model step (preset)", setting, run_plain, ours_loop, setting, batches,
            reference=reference)
        run(f"{name} {mode}: ours model step, checkpointing", remat, run_plain, ours_loop, remat, batches,
            reference=reference)
        if setting.compiled:  # the preset trains compiled; eager pretrain() rows would add little to eager steps
            preset_trainer = run(f"{name} {mode}: ours pretrain() (preset)", setting, lightning_run, setting, shards,
                                 work, args.dry_run_gpu_path, reference=reference, goal=TRAINER_GOAL)
            run(f"{name} {mode}: ours pretrain(), checkpointing", remat, lightning_run, remat, shards, work,
                args.dry_run_gpu_path, reference=reference, goal=TRAINER_GOAL)
            run(f"{name} {mode}: ours pretrain() (preset), MLflow on", setting, lightning_run, setting, shards, work,
                args.dry_run_gpu_path, reference=reference, goal=TRAINER_GOAL, tracking=True)
            run(f"{name} {mode}: ours model step, loss not compiled (before)", setting, run_plain,
                partial(ours_loop, compiled_loss=False), setting, batches, reference=reference)
            for backend in args.attention_variants:
                run(f"{name} {mode}: ours model step, {backend} attention", setting, run_plain,
                    partial(ours_loop, attention=backend), setting, batches, reference=reference)
                run(f"{name} {mode}: ours pretrain(), {backend} attention", setting, lightning_run, setting, shards,
                    work, args.dry_run_gpu_path, reference=reference, goal=TRAINER_GOAL, attention=backend)
    bench_loader(shards, settings[0], preset_trainer, args.loader_tokens, name)


def run_plain(make_loop, setting: Setting, batches: list) -> Timing:
    return make_loop(setting, batches).run()


# -- profile ---------------------------------------------------------------------------------


def profile_tiny(shards: Path, work: Path, args: argparse.Namespace) -> None:
    """cProfile of a tiny pretrain() run: where a step's time goes, the trainer's own share included."""
    setting = dataclasses.replace(cpu_setting("tiny", args), warmup=2, steps=args.tiny_steps)
    profiler = cProfile.Profile()
    profiler.enable()
    timing = lightning_run(setting, shards, work)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO()).stats

    def per_call(filename: str, function: str) -> float:
        """Mean seconds of one call (the busiest function of that name if several match)."""
        matches = [(stat[3], stat[1]) for (file, _, name), stat in stats.items()
                   if file.endswith(filename) and name == function]
        seconds, calls = max(matches, default=(0.0, 0))
        return seconds / calls if calls else 0.0

    # One call of each per optimizer step (no accumulation).
    parts = {
        "training_step": per_call("lm_module.py", "training_step"),
        "  forward (TransformerLM)": per_call("aria_model/model.py", "forward"),
        "  loss (aria_loss)": per_call("lm_module.py", "aria_loss"),
        "  the batch from the loader (0 workers: made here)": per_call("loops/fetchers.py", "__next__"),
        "backward": per_call("autograd/graph.py", "_engine_run_backward"),
        "AdamW's arithmetic": per_call("optim/adam.py", "adam"),
        "on_before_optimizer_step (loss sync, log_dict)": per_call("lm_module.py", "on_before_optimizer_step"),
        "ThroughputMonitor.on_train_batch_end": per_call("throughput_monitor.py", "on_train_batch_end"),
        "StepLog.on_train_batch_end (loss.csv)": per_call("training/callbacks.py", "on_train_batch_end"),
    }
    step = per_call("training_epoch_loop.py", "advance")
    print(f"\nprofile: tiny pretrain() under cProfile ({timing.rate:,.0f} tok/s), ms per optimizer step:")
    for label, seconds in parts.items():
        print(f"  {label:<52} {seconds * 1e3:9.1f}")
    rest = step - sum(seconds for label, seconds in parts.items() if not label.startswith(" "))
    print(f"  {'the rest: Lightning loop and its other hooks':<52} {rest * 1e3:9.1f}")
    print(f"  {'the whole step':<52} {step * 1e3:9.1f}")


# -- run -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="existing token_shards (default: build from the golden files)")
    parser.add_argument("--copies", type=int, default=12,
                        help="transposed copies of each golden file when building shards (default 12: ~1.7M tokens)")
    parser.add_argument("--presets", default="tiny,small", help="CPU presets, comma-separated (default tiny,small)")
    parser.add_argument("--tiny-steps", type=int, default=12, help="timed steps of each, tiny (default 12)")
    parser.add_argument("--small-steps", type=int, default=3, help="timed steps of each, small (default 3)")
    parser.add_argument("--variants", default="tiny",
                        help="presets that also time pretrain() with MLflow on and with the proposed fused AdamW, "
                             "comma-separated (default tiny; '' for none)")
    parser.add_argument("--small-batch", type=int, default=1,
                        help="small's batch (preset 16: minutes a step on 2 cores; default 1)")
    parser.add_argument("--loader-tokens", type=int, default=1_000_000,
                        help="whole loader epochs are read until this many tokens (default 1M)")
    parser.add_argument("--gpu", action="store_true", default=None,
                        help="medium on the GPU (default: when CUDA is available)")
    parser.add_argument("--dry-run-gpu-path", action="store_true",
                        help="run the GPU rows on this CPU with the tiny model (a crash test, not a measurement)")
    parser.add_argument("--gpu-steps", type=int, default=10, help="timed steps per GPU row (default 10)")
    parser.add_argument("--gpu-warmup", type=int, default=3,
                        help="untimed steps per GPU row, compilation included (default 3)")
    parser.add_argument("--rows", help="GPU rows to run: a regex on their names (default: all)")
    parser.add_argument("--attention-variants", default="",
                        help="GPU: SDPA kernels (train.attention: cudnn, flash, efficient) timed in extra compiled "
                             "rows, comma-separated (default none: torch 2.11 already picks cuDNN on an H100)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (default: by name)")
    parser.add_argument("--profile", action="store_true", help="also profile a tiny pretrain() run (cProfile)")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's, one per core); 1 is steadier on a shared machine")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder and print its path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.presets = [p for p in args.presets.split(",") if p]
    if unknown := set(args.presets) - {"tiny", "small"}:
        parser.error(f"--presets takes tiny and small on a CPU (medium: --gpu), not {sorted(unknown)}")
    args.variants = [p for p in args.variants.split(",") if p]
    args.attention_variants = [b for b in args.attention_variants.split(",") if b]
    if args.gpu is None:
        args.gpu = torch.cuda.is_available()
    if args.gpu and not torch.cuda.is_available() and not args.dry_run_gpu_path:
        parser.error("--gpu needs CUDA (or add --dry-run-gpu-path)")

    run_in_scratch(args, run, prefix="train-bench-")


def run(args: argparse.Namespace, work: Path) -> None:
    load = os.getloadavg()
    print(f"torch {torch.__version__}, lightning {lightning.__version__}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores, load average {load[0]:.2f} at start", flush=True)
    shards = args.shards
    if shards is None:
        started = time.perf_counter()
        shards = build_shards(work / "corpus", args.copies, workers=os.cpu_count() or 1)
        print(f"shards from {args.copies} transposed copies of the golden files in "
              f"{time.perf_counter() - started:.0f} s:", end=" ")
    print(f"{describe_shards(shards)}", flush=True)
    if args.gpu or args.dry_run_gpu_path:
        bench_gpu(args, shards, work)
    else:
        bench_cpu(args, shards, work)
    if args.profile:
        profile_tiny(shards, work, args)
    print_table()
    print(f"tok/s: tokens of a step over the median step's wall seconds; ratio: ours / reference (loader rows: "
          f"loader / trainer); cpu ratio: the same by median CPU seconds per step. Per step: median wall ms and "
          f"this process's CPU ms (loader workers not counted). "
          f"Load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.")


if __name__ == "__main__":
    main()
