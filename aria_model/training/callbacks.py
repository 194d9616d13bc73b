"""Callbacks that make a training run account for itself: a per-step loss log and progress lines."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl

STEP_LOG_COLUMNS = ["step", "epoch", "loss", "lr", "tokens", "elapsed_s"]


class StepLog(pl.Callback):
    """One row per optimizer step in ``loss.csv`` (Aria keeps the same file), plus progress lines.

    The module sets ``last_train_loss`` and ``last_lr`` just before each optimizer
    step. Rows are flushed as they are written, so a killed run keeps them; a
    resumed run first drops the rows after its checkpoint's step, then writes
    those steps again, so the file always holds one curve.
    """

    def __init__(self, path: Path, tokens_per_micro_batch: int, log_every: int,
                 report: Callable[[str], None] = print):
        self.path = Path(path)
        self.tokens_per_micro_batch = tokens_per_micro_batch
        self.tokens_per_step = 0  # known once the trainer knows its world size
        self.max_steps = 0
        self.log_every = max(log_every, 1)
        self.report = report
        self._file = None
        self._writer = None
        self._step = 0
        self._started = 0.0
        self._window = (0, 0.0)  # (step, time) where the current tokens/s window began

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tokens_per_step = self.tokens_per_micro_batch * trainer.accumulate_grad_batches * trainer.world_size
        self.max_steps = trainer.max_steps
        self._step = trainer.global_step
        self._started = time.perf_counter()
        self._window = (self._step, self._started)
        if trainer.is_global_zero:
            self._open(keep_through=self._step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step:
            return  # an accumulation micro-batch: no optimizer step yet
        self._step = trainer.global_step
        if not trainer.is_global_zero:
            return
        now = time.perf_counter()
        self._writer.writerow([self._step, trainer.current_epoch, f"{pl_module.last_train_loss:.6f}",
                               f"{pl_module.last_lr:.6e}", self._step * self.tokens_per_step,
                               f"{now - self._started:.3f}"])
        self._file.flush()
        if self._step % self.log_every == 0 or self._step == self.max_steps:
            self._progress(pl_module, now)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def _progress(self, pl_module: pl.LightningModule, now: float) -> None:
        first_step, since = self._window
        tokens_per_s = (self._step - first_step) * self.tokens_per_step / max(now - since, 1e-9)
        remaining = (self.max_steps - self._step) * self.tokens_per_step / max(tokens_per_s, 1e-9)
        self._window = (self._step, now)
        self.report(f"step {self._step}/{self.max_steps}  loss {pl_module.last_train_loss:.4f}  "
                    f"lr {pl_module.last_lr:.2e}  {tokens_per_s:,.0f} tok/s  eta {remaining / 60:.1f} min")

    def _open(self, keep_through: int) -> None:
        kept = [row for row in read_step_log(self.path) if int(row["step"]) <= keep_through]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(STEP_LOG_COLUMNS)
        self._writer.writerows([row[c] for c in STEP_LOG_COLUMNS] for row in kept)
        self._file.flush()


def read_step_log(path: Path) -> list[dict[str, str]]:
    """The rows of a ``loss.csv``; a half-written last line (the run was killed) is left out."""
    if not Path(path).exists():
        return []
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row for row in rows if None not in row.values() and all(row.get(c) for c in STEP_LOG_COLUMNS)]
