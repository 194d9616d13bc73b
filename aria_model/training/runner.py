"""What every training entry point shares: the Trainer, checkpoints and resume, MLflow, Pipes, the CLI.

An entry point (``pretrain``, ``contrastive``) supplies its config, LightningModule,
DataModule and step count; ``fit`` runs it the same way on a laptop, under torchrun, on
SLURM or Kubernetes:

- ``out_dir/checkpoints/step-*.ckpt`` every ``train.checkpoint_every`` optimizer steps and at
  the end, ``last.ckpt`` linking the newest; a rerun resumes from it (or from Lightning's
  SLURM requeue checkpoint when that is further on) at the exact data position, and refuses
  a checkpoint whose model, data or optimizer config differs;
- ``loss.csv`` (one row per optimizer step), ``config.json``, and ``model.pt`` (weights and
  ModelConfig: what the next step loads);
- MLflow: the orchestrator's run (``tracking.run_id``) or a new one nested under
  ``tracking.parent_run_id`` / ``$ARIA_MLFLOW_PARENT_RUN_ID``; params, dataset lineage,
  per-step metrics, the loss-curve plot, and ``model.pt`` registered as a model version;
- Dagster Pipes: when launched by an asset, progress lines stream to the Dagster UI and the
  result comes back as materialization metadata. Only the launch's rank 0 talks to Dagster
  and MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import MLFlowLogger

from aria_model.atomic_io import write_json_atomic
from aria_model.data import SplitDataModule
from aria_model.home import default_home
from aria_model.model import Block, attention_backend
from aria_model.tracking_names import PARENT_RUN_ENV
from aria_model.training.callbacks import StepLog
from aria_model.training.config import RunConfig, TrainConfig

if TYPE_CHECKING:  # mlflow is imported only by a run that tracks: training runs without it installed
    from aria_model.tracking import Tracker

# Sections that must match a checkpoint for a resume to continue the same run; train
# (max_steps, intervals, devices) and tracking may change between restarts.
RESUME_SECTIONS = ("model", "data", "optim")
PIPES_CONTEXT_ENV = "DAGSTER_PIPES_CONTEXT"  # what dagster_pipes itself checks to detect a Pipes launch


@dataclass(frozen=True)
class RunResult:
    """What a finished (or resumed-and-finished) run reports; entry points add their own fields."""

    out_dir: Path
    checkpoint: Path  # last.ckpt: resumable
    weights: Path  # model.pt: weights + model config
    steps: int
    train_loss: float
    val_loss: float
    seconds: float  # this invocation's fit
    resumed_from_step: int
    n_params: int
    mlflow_run_id: str
    model_version: str  # "<registered name>/<version>" of model.pt, "" when not registered

    def metadata(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Fitted:
    trainer: pl.Trainer
    module: pl.LightningModule
    seconds: float
    resumed_from_step: int
    total_steps: int


def precision_for(train: TrainConfig) -> str:
    if train.precision != "auto":
        return train.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and train.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed"
    return "32-true"


def strategy_for(train: TrainConfig):
    if train.strategy != "fsdp":
        return train.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    # Within a node shard fully; across nodes replicate shards (HYBRID) to keep all-gathers on NVLink.
    return FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full",
                        sharding_strategy="HYBRID_SHARD" if train.num_nodes > 1 else "FULL_SHARD")


def fit(config: RunConfig, *, make_module: Callable[[int, bool], pl.LightningModule],
        datamodule: SplitDataModule, tokens_per_micro_batch: int,
        throughput_length: Callable[[Any], int], logger, report: Callable[[str], None],
        same_run_fields: tuple[str, ...] = ()) -> Fitted:
    """Train ``make_module(total_steps, resuming)`` to ``train.max_steps`` (or ``train.epochs``),
    resuming when a checkpoint of the same run is there; save the final checkpoint and model.pt."""
    train = config.train
    out = Path(config.out_dir)
    checkpoints = out / "checkpoints"
    pl.seed_everything(train.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    trainer = pl.Trainer(
        accelerator=train.accelerator, devices=train.devices, num_nodes=train.num_nodes,
        strategy=strategy_for(train), precision=precision_for(train),
        max_steps=1, max_epochs=-1,  # max_steps is set below, once the world size is known
        accumulate_grad_batches=train.grad_accum,
        gradient_clip_val=config.optim.grad_clip or None,
        val_check_interval=train.val_every or None, check_val_every_n_epoch=None,
        limit_val_batches=train.val_batches, num_sanity_val_steps=0,
        use_distributed_sampler=False, deterministic=train.deterministic,
        default_root_dir=out, logger=logger, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[
            ModelCheckpoint(dirpath=checkpoints, filename="step-{step:08d}", auto_insert_metric_name=False,
                            every_n_train_steps=train.checkpoint_every, save_last="link",
                            save_top_k=train.keep_checkpoints, monitor="step", mode="max"),
            ThroughputMonitor(batch_size_fn=lambda batch: batch[0].size(0), length_fn=throughput_length),
            StepLog(out / "loss.csv", tokens_per_micro_batch, train.log_every, report),
        ],
    )
    total_steps = train.max_steps or train.epochs * steps_per_epoch(datamodule, trainer.world_size, train.grad_accum)
    trainer.fit_loop.epoch_loop.max_steps = total_steps

    resume_from = 0
    ckpt_path = latest_checkpoint(out) if train.resume else None
    if ckpt_path:
        resume_from = check_resumable(ckpt_path, config, same_run_fields)
        report(f"resuming {config.run_name} from step {resume_from} ({ckpt_path})")
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config.to_dict(), out / "config.json")
    module = make_module(total_steps, ckpt_path is not None)
    report(f"{config.run_name}: {total_steps} steps, precision {trainer.precision}, attention {train.attention}, "
           f"{trainer.world_size} process(es), out {out}")
    with attention_backend(train.attention):
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        seconds = time.perf_counter() - started
        save_final_checkpoint(trainer, checkpoints)
        # Lightning's in-fit validation schedule drifts when epochs are short (with a dataloader_iter
        # step it counts each epoch's end as a batch), so the final model is validated here if it was not.
        if module.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        export_weights(checkpoints / "last.ckpt", out / "model.pt")
    return Fitted(trainer, module, seconds, resume_from, total_steps)


def steps_per_epoch(datamodule: SplitDataModule, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch: the fewest batches any rank gets, over the accumulation."""
    train = datamodule.split_dataset("train", 0, world_size)
    batches = min(train.batches_per_rank(datamodule.batch_size, datamodule.num_workers))
    if batches == 0:
        raise ValueError("the train split is empty: no training batches")
    return math.ceil(batches / grad_accum)


def result_fields(fitted: Fitted, config: RunConfig) -> dict[str, Any]:
    """The ``RunResult`` fields of a fitted run (the MLflow ones filled in by ``tracked``)."""
    out = Path(config.out_dir)
    module = fitted.module
    return dict(out_dir=out, checkpoint=out / "checkpoints" / "last.ckpt", weights=out / "model.pt",
                steps=fitted.trainer.global_step, train_loss=module.last_train_loss, val_loss=module.last_val_loss,
                seconds=round(fitted.seconds, 3), resumed_from_step=fitted.resumed_from_step,
                n_params=sum(p.numel() for p in module.net.parameters()), mlflow_run_id="", model_version="")


def save_final_checkpoint(trainer: pl.Trainer, checkpoints: Path) -> None:
    """Checkpoint the last step when the schedule did not (max_steps not a multiple of
    checkpoint_every): model.pt is exported from last.ckpt and a rerun resumes from it."""
    last = checkpoints / "last.ckpt"
    if last.exists() and checkpoint_step(last) == trainer.global_step:
        return
    final = checkpoints / f"step-{trainer.global_step:08d}.ckpt"
    trainer.save_checkpoint(final)
    if trainer.is_global_zero:
        last.unlink(missing_ok=True)
        last.symlink_to(final.name)
    trainer.strategy.barrier()


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest resumable state: ``checkpoints/last.ckpt`` or, after a SLURM requeue, the
    ``hpc_ckpt_<n>.ckpt`` Lightning saved on the preemption signal, whichever is further on."""
    candidates = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (checkpoint_step(p), p.stat().st_mtime))


def checkpoint_step(path: Path) -> int:
    return int(_load(path).get("global_step", 0))


def check_resumable(checkpoint: Path, config: RunConfig, same_run_fields: tuple[str, ...] = ()) -> int:
    """The step ``checkpoint`` stopped at; refuses a checkpoint of a different run (its model,
    data, optim sections or any of ``same_run_fields`` differ)."""
    state = _load(checkpoint)
    saved = state.get("hyper_parameters", {}).get("config", {})
    ours = config.to_dict()
    changed = [name for name in (*RESUME_SECTIONS, *same_run_fields) if _plain(saved.get(name)) != _plain(ours[name])]
    if changed:
        raise ValueError(f"{checkpoint} was trained with a different {', '.join(changed)} config; "
                         f"choose another run_name/out_dir or set train.resume=false to start over")
    return int(state.get("global_step", 0))


def _load(checkpoint: Path) -> dict:
    # mmap: a medium checkpoint is ~8 GB, of which these reads touch a few bytes
    return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)


def _plain(value):
    return json.loads(json.dumps(value)) if value is not None else None


def export_weights(checkpoint: Path, target: Path) -> None:
    """``model.pt``: the network's weights and its ModelConfig, without optimizer or loop state."""
    state = _load(checkpoint)
    prefix = "net."
    weights = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    payload = {"model_config": state["hyper_parameters"]["config"]["model"], "state_dict": weights,
               "step": int(state.get("global_step", 0))}
    partial = target.with_name(f".{target.name}.partial")
    torch.save(payload, partial)
    os.replace(partial, target)


# -- MLflow ------------------------------------------------------------------------------------


@contextmanager
def mlflow_run(config: RunConfig, kind: str) -> Iterator[tuple[Tracker | None, str | None]]:
    """The MLflow run this process logs to, with params and dataset lineage logged; (None, None)
    on ranks other than the launch's 0 and when tracking is off."""
    tracking = config.tracking
    if not (tracking.enabled and is_launch_rank_zero()):
        yield None, None
        return
    from aria_model.tracking import Tracker

    tracker = Tracker(tracking.tracking_uri or None, home=default_home())
    if tracking.run_id:
        run = nullcontext(tracking.run_id)  # the orchestrator's run: its owner ends it
    else:
        parent = tracking.parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
        run = tracker.open_run(config.run_name, parent_run_id=parent, experiment=tracking.experiment, kind=kind)
    with run as run_id:
        tracker.log_params(run_id, config)
        tracker.log_shard_manifest(run_id, Path(config.data.shards))
        yield tracker, run_id


def logger_for(tracker: Tracker | None, run_id: str | None):
    """Lightning's MLflow logger attached to our run (per-step metrics), or no logger."""
    return MLFlowLogger(tracking_uri=tracker.tracking_uri, run_id=run_id) if run_id else False


def record(tracker: Tracker | None, run_id: str | None, config: RunConfig, result: RunResult) -> dict[str, str]:
    """Final metrics, the loss-curve plot and model.pt as a registered model version; returns the
    ``mlflow_run_id``/``model_version`` fields for the result."""
    if not run_id or not result.weights.exists():
        return {}
    tracker.log_summary(run_id, {f"final/{k}": v for k, v in result.metadata().items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    tracker.log_loss_curve(run_id)
    fields = {"mlflow_run_id": run_id, "model_version": ""}
    if config.tracking.register_as:
        version = tracker.register_checkpoint(run_id, result.weights, config.tracking.register_as,
                                              tags={"steps": str(result.steps),
                                                    "model": json.dumps(config.model.to_dict())})
        fields["model_version"] = f"{config.tracking.register_as}/{version.version}"
    return fields


# -- launching -----------------------------------------------------------------------------------


def is_launch_rank_zero() -> bool:
    """True in the process a launcher started first (or the only one): only it talks to Dagster and MLflow."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def pipes_session():
    # Dagster sets this variable in the processes it launches; only then is dagster-pipes (a
    # standalone, dependency-free package, not dagster) imported, so the library runs without it.
    if PIPES_CONTEXT_ENV in os.environ and is_launch_rank_zero():
        from dagster_pipes import open_dagster_pipes

        return open_dagster_pipes()
    return nullcontext(None)


def cli_main(argv: list[str] | None, *, config_type: type[RunConfig], resolve: Callable[[RunConfig], RunConfig],
             run: Callable[[RunConfig, Callable[[str], None]], RunResult], prog: str, description: str) -> int:
    """``--preset``, ``--config FILE``, ``--set section.field=value ...``, ``--print-config``; then the
    run, reporting through Dagster Pipes when launched by an asset."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", choices=sorted(config_type.PRESETS), help="start from a named preset")
    parser.add_argument("--config", type=Path, help="JSON or TOML file with the config's sections, applied next")
    parser.add_argument("--set", nargs="*", metavar="SECTION.FIELD=VALUE", help="overrides, applied last")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        config = config_type.preset(args.preset) if args.preset else config_type()
        if args.config:
            config = config_type.from_file(args.config, base=config)
        config = resolve(config.with_overrides(args.set or []))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    with pipes_session() as pipes:
        def report(line: str) -> None:
            print(line, flush=True)
            if pipes is not None:
                pipes.log.info(line)

        result = run(config, report)
        if pipes is not None:
            pipes.report_asset_materialization(
                metadata={k: v for k, v in result.metadata().items() if not (isinstance(v, float) and math.isnan(v))})
    return 0
