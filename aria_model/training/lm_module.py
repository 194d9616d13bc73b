"""The LightningModule that pretrains ``TransformerLM`` with Aria's loss and schedule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from aria_model.model import TransformerLM
from aria_model.training.config import PretrainConfig
from aria_model.training.optim import adamw, warmup_linear_decay


def aria_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Aria's training loss: masked token cross-entropy averaged over its non-zero entries.

    Aria divides by the count of non-zero masked losses rather than by the mask;
    the two differ only when a token's loss underflows to exactly 0.
    """
    losses = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none") * mask.flatten()
    return losses.sum() / torch.count_nonzero(losses).clamp(min=1)


def masked_loss_sum(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over masked tokens and their count: exact means across batches and ranks."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none") * mask.flatten()
    return losses.sum(), mask.sum()


class PretrainModule(pl.LightningModule):
    """Next-token pretraining. The network is built in ``configure_model`` (sharded under FSDP).

    ``training_step`` takes the loader's iterator instead of a batch: Lightning then
    fetches nothing ahead of the step, so the train loader's saved position (see
    ``aria_model.data.ResumableLoader``) counts exactly the batches trained on and
    a resumed run continues with the very next one.
    """

    def __init__(self, config: PretrainConfig, total_steps: int):
        super().__init__()
        self.config = config
        self.total_steps = total_steps
        # In checkpoints only: the runner logs the config to MLflow once, as flat `section.field` params.
        self.save_hyperparameters({"config": config.to_dict(), "total_steps": total_steps}, logger=False)
        self.net: TransformerLM | None = None
        self.seq_len = config.data.seq_len or config.model.max_seq_len
        self.flops_per_batch = 0  # set with the network; ThroughputMonitor reads it for MFU
        self._loss = aria_loss
        self._loss_sum: torch.Tensor | None = None  # on the device: no host sync per micro-batch
        self._micro_batches = 0  # since the last optimizer step
        self.last_lr = math.nan
        self._val = torch.zeros(2, dtype=torch.float64)  # summed masked loss and token count
        self.last_train_loss = math.nan
        self.last_val_loss = math.nan
        self.last_val_step = -1  # the optimizer step last_val_loss was measured at

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self.net = TransformerLM(self.config.model)
        # forward + backward FLOPs of one micro-batch
        self.flops_per_batch = self.net.flops_per_token(self.seq_len) * self.seq_len * self.config.data.batch_size
        if self.config.train.compile:
            self.net.compile_blocks()
            # Blocks alone leave the loss eager: several memory-bound passes over [tokens, vocab] that fuse.
            self._loss = torch.compile(aria_loss)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def training_step(self, dataloader_iter) -> torch.Tensor:
        batch, _, _ = next(dataloader_iter)  # (batch, batch_idx, dataloader_idx); StopIteration ends the epoch
        source, target, mask = (t.to(self.device, non_blocking=True) for t in batch)
        loss = self._loss(self.net(source), target, mask)
        detached = loss.detach().float()
        self._loss_sum = detached if self._micro_batches == 0 else self._loss_sum + detached
        self._micro_batches += 1
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # All micro-batches of this step are done: record their mean loss (over ranks) and the
        # lr the step uses, before the scheduler moves it.
        loss = self.trainer.strategy.reduce(self._loss_sum / self._micro_batches, reduce_op="mean")
        self._micro_batches = 0
        self.last_train_loss = float(loss)
        self.last_lr = optimizer.param_groups[0]["lr"]
        self.log_dict({"train/loss": self.last_train_loss, "train/lr": self.last_lr}, on_step=True, on_epoch=False,
                      batch_size=self.config.data.batch_size)

    def validation_step(self, batch, batch_idx) -> None:
        source, target, mask = batch
        loss_sum, count = masked_loss_sum(self.net(source), target, mask)
        self._val = self._val.to(self.device) + torch.stack([loss_sum.detach().double(), count.double()])

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        totals = self.trainer.strategy.reduce(self._val, reduce_op="sum")
        self.last_val_step = self.trainer.global_step
        if totals[1] == 0:
            return
        self.last_val_loss = float(totals[0] / totals[1])
        self.log_dict({"val/loss": self.last_val_loss, "val/ppl": math.exp(min(self.last_val_loss, 50.0))},
                      sync_dist=False)

    def configure_optimizers(self):
        optimizer = adamw(self.parameters(), self.config.optim)
        scheduler = warmup_linear_decay(optimizer, self.config.optim, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
