"""Pretrain the Aria transformer on token shards: one entry point for a laptop, torchrun, SLURM or k8s.

    # laptop / CI (CPU, the tiny preset on the demo shards under $ARIA_HOME)
    python -m aria_model.training.pretrain --preset tiny
    # a config file, then overrides
    python -m aria_model.training.pretrain --config my.toml --set train.max_steps=5000 data.batch_size=16
    # one node, 8 GPUs (Lightning launches the processes itself)
    python -m aria_model.training.pretrain --preset medium --set train.devices=8 train.strategy=ddp
    # several nodes: torchrun on every node (TorchElastic), or srun under sbatch (SLURM), or a PyTorchJob
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HOST:29500 \\
        -m aria_model.training.pretrain --preset medium --set train.num_nodes=4 train.devices=8
    srun python -m aria_model.training.pretrain --preset medium --set train.num_nodes=4 train.devices=8

Outputs in ``out_dir`` (default ``<ARIA_HOME>/models/pretrain/<run_name>``):
``checkpoints/last.ckpt`` and ``checkpoints/step-*.ckpt`` (Lightning: model, optimizer,
scheduler, loop and data-loader position), ``loss.csv`` (one row per optimizer step),
``model.pt`` (weights + model config, what the contrastive step and generation load) and
``config.json``. Rerunning the same command resumes from ``last.ckpt`` at the exact data
position; a run whose model, data or optimizer config differs from the checkpoint's is
refused rather than silently mixed.

Under Dagster Pipes (the ``pretrained_model`` asset) progress lines stream to the Dagster
UI and the final metrics come back as materialization metadata; without Pipes the same
lines go to stdout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from aria_model.data import AriaDataModule
from aria_model.home import default_home
from aria_model.training.config import PretrainConfig
from aria_model.training.lm_module import PretrainModule
from aria_model.training.runner import (
    RunResult,
    cli_main,
    fit,
    logger_for,
    mlflow_run,
    record,
    result_fields,
)


@dataclass(frozen=True)
class PretrainResult(RunResult):
    tokens: int = 0  # training tokens seen (windows x seq_len, padding included)
    tokens_per_s: float = 0.0  # this invocation's own steps only


def resolved(config: PretrainConfig) -> PretrainConfig:
    """Fill the defaults that depend on the data home and the model."""
    home = default_home()
    data = replace(config.data, shards=config.data.shards or str(home / "token_shards"),
                   seq_len=config.data.seq_len or config.model.max_seq_len)
    if data.seq_len > config.model.max_seq_len:
        raise ValueError(f"data.seq_len {data.seq_len} exceeds the model's max_seq_len {config.model.max_seq_len}")
    run_name = config.run_name or "pretrain"
    out_dir = config.out_dir or str(home / "models" / "pretrain" / run_name)
    return replace(config, data=data, run_name=run_name, out_dir=out_dir)


def pretrain(config: PretrainConfig, report=print) -> PretrainResult:
    config = resolved(config)
    data = AriaDataModule(config.data.shards, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                          num_workers=config.data.num_workers, sep_sequences=config.data.sep_sequences,
                          shuffle_windows=config.data.shuffle_windows, seed=config.train.seed,
                          augment=config.data.augment)
    tokens_per_micro_batch = config.data.batch_size * config.data.seq_len
    with mlflow_run(config, kind="pretrain") as (tracker, run_id):
        fitted = fit(config, make_module=lambda total, resuming: PretrainModule(config, total), datamodule=data,
                     tokens_per_micro_batch=tokens_per_micro_batch,
                     throughput_length=lambda batch: batch[0].numel(), logger=logger_for(tracker, run_id),
                     report=report)
        tokens_per_step = tokens_per_micro_batch * config.train.grad_accum * fitted.trainer.world_size
        steps_run = fitted.trainer.global_step - fitted.resumed_from_step
        result = PretrainResult(**result_fields(fitted, config), tokens=fitted.trainer.global_step * tokens_per_step,
                                tokens_per_s=round(steps_run * tokens_per_step / max(fitted.seconds, 1e-9), 1))
        return replace(result, **record(tracker, run_id, config, result))


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, config_type=PretrainConfig, resolve=resolved, run=pretrain,
                    prog="python -m aria_model.training.pretrain",
                    description="Pretrain the Aria transformer on token shards (resumes by itself).")


if __name__ == "__main__":
    sys.exit(main())
