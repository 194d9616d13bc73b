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

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor

from aria_model.atomic_io import write_json_atomic
from aria_model.data import AriaDataModule, TokenWindows, WindowConfig
from aria_model.home import default_home
from aria_model.model import Block
from aria_model.training.callbacks import StepLog
from aria_model.training.config import PretrainConfig
from aria_model.training.lm_module import PretrainModule

# Sections that must match a checkpoint for a resume to continue the same run; train
# (max_steps, intervals, devices) and tracking may change between restarts.
RESUME_SECTIONS = ("model", "data", "optim")


@dataclass(frozen=True)
class PretrainResult:
    out_dir: Path
    checkpoint: Path  # last.ckpt: resumable
    weights: Path  # model.pt: weights + model config
    steps: int
    tokens: int  # training tokens seen (windows x seq_len, padding included)
    train_loss: float
    val_loss: float
    seconds: float
    tokens_per_s: float  # this invocation's own steps only
    resumed_from_step: int
    n_params: int

    def metadata(self) -> dict[str, float | int | str]:
        values = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


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


def precision_for(config: PretrainConfig) -> str:
    if config.train.precision != "auto":
        return config.train.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and config.train.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed"
    return "32-true"


def strategy_for(config: PretrainConfig):
    if config.train.strategy != "fsdp":
        return config.train.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    # Within a node shard fully; across nodes replicate shards (HYBRID) to keep all-gathers on NVLink.
    return FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full",
                        sharding_strategy="HYBRID_SHARD" if config.train.num_nodes > 1 else "FULL_SHARD")


def steps_per_epoch(config: PretrainConfig, world_size: int) -> int:
    """Optimizer steps in one epoch: the fewest batches any rank gets, over the accumulation."""
    windows = TokenWindows(config.data.shards, "train",
                           WindowConfig.for_split("train", seq_len=config.data.seq_len,
                                                  sep_sequences=config.data.sep_sequences, seed=config.train.seed),
                           world_size=world_size)
    batches = min(windows.batches_per_rank(config.data.batch_size, config.data.num_workers))
    if batches == 0:
        raise ValueError(f"no training windows in {config.data.shards}: the train split is empty")
    return math.ceil(batches / config.train.grad_accum)


def check_resumable(checkpoint: Path, config: PretrainConfig) -> int:
    """The step ``checkpoint`` stopped at; refuses a checkpoint of a different run."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    saved = state.get("hyper_parameters", {}).get("config", {})
    ours = config.to_dict()
    changed = [s for s in RESUME_SECTIONS if _comparable(saved.get(s)) != _comparable(ours[s])]
    if changed:
        raise ValueError(f"{checkpoint} was trained with a different {', '.join(changed)} config; "
                         f"choose another run_name/out_dir or set train.resume=false to start over")
    return int(state.get("global_step", 0))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest resumable state: ``checkpoints/last.ckpt`` or, after a SLURM requeue, the
    ``hpc_ckpt_<n>.ckpt`` Lightning saved on the preemption signal, whichever is further on."""
    candidates = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (_checkpoint_step(p), p.stat().st_mtime))


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))


def _comparable(section):
    return json.loads(json.dumps(section)) if section is not None else None


def pretrain(config: PretrainConfig, report=print) -> PretrainResult:
    config = resolved(config)
    out = Path(config.out_dir)
    checkpoints = out / "checkpoints"
    last = checkpoints / "last.ckpt"
    pl.seed_everything(config.train.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    tokens_per_micro_batch = config.data.batch_size * config.data.seq_len
    trainer = pl.Trainer(
        accelerator=config.train.accelerator, devices=config.train.devices, num_nodes=config.train.num_nodes,
        strategy=strategy_for(config), precision=precision_for(config),
        max_steps=1, max_epochs=-1,  # max_steps is set below, once the world size is known
        accumulate_grad_batches=config.train.grad_accum,
        gradient_clip_val=config.optim.grad_clip or None,
        val_check_interval=config.train.val_every or None, check_val_every_n_epoch=None,
        limit_val_batches=config.train.val_batches, num_sanity_val_steps=0,
        use_distributed_sampler=False, deterministic=config.train.deterministic,
        default_root_dir=out, logger=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[
            ModelCheckpoint(dirpath=checkpoints, filename="step-{step:08d}", auto_insert_metric_name=False,
                            every_n_train_steps=config.train.checkpoint_every, save_last="link",
                            save_top_k=config.train.keep_checkpoints, monitor="step", mode="max"),
            ThroughputMonitor(batch_size_fn=lambda batch: batch[0].size(0), length_fn=lambda batch: batch[0].numel()),
            StepLog(out / "loss.csv", tokens_per_micro_batch, config.train.log_every, report),
        ],
    )
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch(config, trainer.world_size)
    trainer.fit_loop.epoch_loop.max_steps = total_steps
    tokens_per_step = tokens_per_micro_batch * config.train.grad_accum * trainer.world_size

    resume_from = 0
    ckpt_path = latest_checkpoint(out) if config.train.resume else None
    if ckpt_path:
        resume_from = check_resumable(ckpt_path, config)
        report(f"resuming {config.run_name} from step {resume_from} ({ckpt_path})")
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config.to_dict(), out / "config.json")

    module = PretrainModule(config, total_steps)
    data = AriaDataModule(config.data.shards, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                          num_workers=config.data.num_workers, sep_sequences=config.data.sep_sequences,
                          shuffle_windows=config.data.shuffle_windows, seed=config.train.seed,
                          augment=config.data.augment)
    report(f"pretraining {config.run_name}: {total_steps} steps x {tokens_per_step:,} tokens, "
           f"precision {trainer.precision}, {trainer.world_size} process(es), out {out}")
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - started
    if config.train.val_every == 0 or trainer.global_step % max(config.train.val_every, 1):
        trainer.validate(module, datamodule=data, verbose=False)  # the final model's validation loss
    weights = out / "model.pt"
    if trainer.is_global_zero:
        export_weights(last, weights)
    steps_run = trainer.global_step - resume_from
    return PretrainResult(
        out_dir=out, checkpoint=last, weights=weights, steps=trainer.global_step,
        tokens=trainer.global_step * tokens_per_step, train_loss=module.last_train_loss,
        val_loss=module.last_val_loss, seconds=round(seconds, 3),
        tokens_per_s=round(steps_run * tokens_per_step / max(seconds, 1e-9), 1), resumed_from_step=resume_from,
        n_params=sum(p.numel() for p in module.net.parameters()),
    )


def export_weights(checkpoint: Path, target: Path) -> None:
    """``model.pt``: the network's weights and its ModelConfig, without optimizer or loop state."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    prefix = "net."
    weights = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    payload = {"model_config": state["hyper_parameters"]["config"]["model"], "state_dict": weights,
               "step": int(state.get("global_step", 0))}
    partial = target.with_name(f".{target.name}.partial")
    torch.save(payload, partial)
    os.replace(partial, target)


def _is_launch_rank_zero() -> bool:
    """True in the process a launcher started first (or the only one): only it talks to Dagster."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def _pipes_session():
    if PipesEnvVarParamsLoader().is_dagster_pipes_process() and _is_launch_rank_zero():
        return open_dagster_pipes()
    return nullcontext(None)


def load_config(args: argparse.Namespace) -> PretrainConfig:
    config = PretrainConfig.preset(args.preset) if args.preset else PretrainConfig()
    if args.config:
        config = PretrainConfig.from_file(args.config, base=config)
    return config.with_overrides(args.set or [])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m aria_model.training.pretrain",
                                     description="Pretrain the Aria transformer on token shards (resumes by itself).")
    parser.add_argument("--preset", choices=["tiny", "small", "medium"], help="start from a named preset")
    parser.add_argument("--config", type=Path, help="JSON or TOML file with the config's sections, applied next")
    parser.add_argument("--set", nargs="*", metavar="SECTION.FIELD=VALUE", help="overrides, applied last")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = resolved(load_config(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    with _pipes_session() as pipes:
        def report(line: str) -> None:
            print(line, flush=True)
            if pipes is not None:
                pipes.log.info(line)

        result = pretrain(config, report)
        if pipes is not None:
            pipes.report_asset_materialization(metadata=result.metadata())
    return 0


if __name__ == "__main__":
    sys.exit(main())
