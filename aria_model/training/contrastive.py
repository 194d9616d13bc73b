"""Contrastive fine-tune of a pretrained Aria model into the embedding model: the entry point.

Mirrors ``aria_model.training.pretrain`` (same launchers, outputs, resume and Pipes
reporting); the method itself (views, NT-Xent, optimizer) is in ``aria_model.contrastive``.

    # laptop / CI: the tiny preset, from the tiny pretrain run under $ARIA_HOME
    python -m aria_model.training.contrastive --preset tiny
    # from a given model.pt, or from scratch (the paper's ablation)
    python -m aria_model.training.contrastive --preset small --set init=/models/pretrain-small/model.pt
    python -m aria_model.training.contrastive --preset small --set init=scratch run_name=contrastive-small-scratch
    # one node, 8 GPUs; several nodes as for pretraining (torchrun or srun with train.num_nodes)
    python -m aria_model.training.contrastive --preset medium --set train.devices=8 train.strategy=ddp

``init`` is ``scratch``, a weights file (our ``model.pt``, an Aria state dict or a
released ``.safetensors``) or the name of a pretraining run, whose
``<ARIA_HOME>/models/pretrain/<name>/model.pt`` is used. From our ``model.pt`` the
network's shape is the pretrained one (its saved ModelConfig, with this config's
``emb_size`` and ``grad_checkpoint``); from Aria's weights it is ``model``.

Outputs in ``out_dir`` (default ``<ARIA_HOME>/models/contrastive/<run_name>``), as
pretraining's: ``checkpoints/last.ckpt`` and ``step-*.ckpt``, ``loss.csv`` (one row per
optimizer step; ``tokens`` counts both views), ``config.json`` and ``model.pt``
(``{model_config (emb_size included), state_dict, step}``: what
``aria_model.embedding.load_embedding_model`` reads). Rerunning the same command
resumes at the exact data position; a checkpoint with a different model, data,
optimizer, init or tau is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor

from aria_model.atomic_io import write_json_atomic
from aria_model.contrastive import SCRATCH, ContrastiveDataModule, ContrastiveModule, ViewConfig, ViewPairs
from aria_model.embedding import read_weights
from aria_model.home import default_home
from aria_model.model import ModelConfig
from aria_model.training.callbacks import StepLog
from aria_model.training.config import OptimConfig, PretrainConfig, TrainConfig, _flatten, _update
from aria_model.training.pretrain import (
    _checkpoint_step,
    _pipes_session,
    check_resumable,
    export_weights,
    latest_checkpoint,
    precision_for,
    strategy_for,
)

# Besides pretraining's model, data and optim sections: what else makes a checkpoint another run.
RESUME_FIELDS = ("init", "tau")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class ContrastiveDataConfig:
    shards: str = ""  # token_shards folder (its train/val file lists); "" means <ARIA_HOME>/token_shards
    notes: str = ""  # midi_notes folder (the notes views are cut from); "" means <ARIA_HOME>/midi_notes
    seq_len: int = 2048  # Aria's view length (emb-t0.1-s2048)
    min_notes: int = 100  # view length range in notes, Aria v1
    max_notes: int = 650
    batch_size: int = 32  # pairs per device per micro-step: the in-batch negatives (Aria's value is unknown)
    num_workers: int = 2
    augment: bool = False  # Aria's tempo/pitch/velocity augmentation of each view; off in v1's get_dataloaders
    shuffle_pairs: int = 256  # per-worker shuffle buffer of files


@dataclass(frozen=True)
class ContrastiveConfig:
    """One contrastive run; the defaults are Aria's (the presets change the size and the schedule)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("medium", emb_size=512))
    init: str = "pretrain-medium"  # "scratch", a weights file, or a pretrain run name (see the module docstring)
    tau: float = 0.1  # NT-Xent temperature of the paper's checkpoint (Aria's code default is 0.5)
    data: ContrastiveDataConfig = ContrastiveDataConfig()
    # Aria's contrastive optimizer: AdamW 1e-5, wd 0.1, betas (0.9, 0.95), eps 1e-5, 1000 warmup steps, decay to 10 %.
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=1000)
    train: TrainConfig = TrainConfig(epochs=25)  # emb-t0.1-s2048-e25: 25 epochs
    out_dir: str = ""  # "" means <ARIA_HOME>/models/contrastive/<run_name>
    run_name: str = ""  # "" means contrastive

    @classmethod
    def preset(cls, name: str) -> ContrastiveConfig:
        try:
            make = _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown contrastive preset {name!r}; choose one of {sorted(_PRESETS)}") from None
        return make()

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: ContrastiveConfig | None = None) -> ContrastiveConfig:
        return _update(base or cls(), data, "")

    @classmethod
    def from_file(cls, path: str | Path, base: ContrastiveConfig | None = None) -> ContrastiveConfig:
        path = Path(path)
        text = path.read_text()
        return cls.from_dict(tomllib.loads(text) if path.suffix == ".toml" else json.loads(text), base)

    def with_overrides(self, assignments: list[str]) -> ContrastiveConfig:
        """``section.field=value`` strings; pretraining's parser works on any nested config dataclass."""
        return PretrainConfig.with_overrides(self, assignments)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        return _flatten(self.to_dict(), "")


def _tiny() -> ContrastiveConfig:
    # The README demo and CI: a few dozen steps on a CPU in well under a minute. The lr is
    # far above Aria's 1e-5 so that so short a run visibly learns.
    return ContrastiveConfig(
        model=ModelConfig.preset("tiny", emb_size=512),
        init="pretrain-tiny",
        data=ContrastiveDataConfig(seq_len=512, batch_size=8, num_workers=0),
        optim=OptimConfig(lr=3e-4, warmup_steps=5),
        train=TrainConfig(max_steps=30, checkpoint_every=15, val_every=15, val_batches=4, log_every=10),
        run_name="contrastive-tiny",
    )


def _small() -> ContrastiveConfig:
    return ContrastiveConfig(
        model=ModelConfig.preset("small", emb_size=512),
        init="pretrain-small",
        data=ContrastiveDataConfig(seq_len=2048, batch_size=32, num_workers=4),
        train=TrainConfig(epochs=25, checkpoint_every=1000, val_every=1000),
        run_name="contrastive-small",
    )


def _medium() -> ContrastiveConfig:
    # The paper's embedding model (medium-emb). Estimated, not measured: 2 x 32 views of 2048
    # tokens per device take ~10 GB of weights and AdamW state plus ~20 GB of checkpointed bf16
    # activations, well inside an 80 GB GPU.
    return ContrastiveConfig(
        model=ModelConfig.preset("medium", emb_size=512, grad_checkpoint=True),
        init="pretrain-medium",
        data=ContrastiveDataConfig(seq_len=2048, batch_size=32, num_workers=8),
        train=TrainConfig(epochs=25, compile=True, checkpoint_every=2000, val_every=2000),
        run_name="contrastive-medium",
    )


_PRESETS = {"tiny": _tiny, "small": _small, "medium": _medium}


@dataclass(frozen=True)
class ContrastiveResult:
    out_dir: Path
    checkpoint: Path  # last.ckpt: resumable
    weights: Path  # model.pt: weights + model config (emb_size included)
    init: str  # the weights it started from, or "scratch"
    steps: int
    pairs: int  # view pairs trained on
    tokens: int  # both views' tokens, padding included
    train_loss: float
    val_loss: float
    val_retrieval_acc: float  # in-batch top-1: a view finds its partner among batch_size candidates
    seconds: float
    pairs_per_s: float  # this invocation's own steps only
    resumed_from_step: int
    n_params: int

    def metadata(self) -> dict[str, float | int | str]:
        values = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def resolve_init(init: str, home: Path) -> str:
    """``scratch`` or the absolute path of the weights file ``init`` names."""
    if init == SCRATCH:
        return init
    if not init:
        raise ValueError("init is empty: give a pretrained model.pt, a pretrain run name, or 'scratch'")
    path = Path(init).expanduser()
    if "/" not in init and path.suffix not in WEIGHT_SUFFIXES:
        path = home / "models" / "pretrain" / init / "model.pt"
    if not path.is_file():
        raise ValueError(f"init weights {path} not found (pretrain first, or set init=scratch)")
    return str(path.resolve())


def resolved(config: ContrastiveConfig) -> ContrastiveConfig:
    """Fill the defaults that depend on the data home and on the pretrained weights."""
    home = default_home()
    init = resolve_init(config.init, home)
    model = config.model
    if init != SCRATCH:
        _, saved = read_weights(init)
        if saved is not None:
            model = replace(saved, emb_size=config.model.emb_size, grad_checkpoint=config.model.grad_checkpoint)
    if model.emb_size is None:
        raise ValueError("model.emb_size is not set (Aria: 512)")
    data = replace(config.data, shards=config.data.shards or str(home / "token_shards"),
                   notes=config.data.notes or str(home / "midi_notes"))
    if data.seq_len > model.max_seq_len:
        raise ValueError(f"data.seq_len {data.seq_len} exceeds the model's max_seq_len {model.max_seq_len}")
    run_name = config.run_name or "contrastive"
    out_dir = config.out_dir or str(home / "models" / "contrastive" / run_name)
    return replace(config, model=model, init=init, data=data, run_name=run_name, out_dir=out_dir)


def view_config(config: ContrastiveConfig) -> ViewConfig:
    d = config.data
    return ViewConfig(seq_len=d.seq_len, min_notes=d.min_notes, max_notes=d.max_notes, augment=d.augment,
                      shuffle_pairs=d.shuffle_pairs, seed=config.train.seed)


def steps_per_epoch(config: ContrastiveConfig, world_size: int) -> int:
    """Optimizer steps in one epoch: the fewest batches any rank gets, over the accumulation."""
    pairs = ViewPairs(config.data.shards, config.data.notes, "train", view_config(config), world_size=world_size)
    batches = min(pairs.batches_per_rank(config.data.batch_size, config.data.num_workers))
    if batches == 0:
        raise ValueError(f"no training files in {config.data.shards}: the train split is empty")
    return math.ceil(batches / config.train.grad_accum)


def check_same_run(checkpoint: Path, config: ContrastiveConfig) -> int:
    """pretraining's ``check_resumable`` (model, data, optim) plus the init weights and tau."""
    step = check_resumable(checkpoint, config)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["hyper_parameters"]["config"]
    changed = [name for name in RESUME_FIELDS if saved.get(name) != getattr(config, name)]
    if changed:
        raise ValueError(f"{checkpoint} was trained with a different {', '.join(changed)}; "
                         f"choose another run_name/out_dir or set train.resume=false to start over")
    return step


def contrastive(config: ContrastiveConfig, report=print) -> ContrastiveResult:
    config = resolved(config)
    out = Path(config.out_dir)
    checkpoints = out / "checkpoints"
    last = checkpoints / "last.ckpt"
    pl.seed_everything(config.train.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    tokens_per_micro_batch = 2 * config.data.batch_size * config.data.seq_len
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
            ThroughputMonitor(batch_size_fn=lambda batch: batch[0].size(0),
                              length_fn=lambda batch: batch[0].numel() + batch[2].numel()),
            StepLog(out / "loss.csv", tokens_per_micro_batch, config.train.log_every, report),
        ],
    )
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch(config, trainer.world_size)
    trainer.fit_loop.epoch_loop.max_steps = total_steps
    pairs_per_step = config.data.batch_size * config.train.grad_accum * trainer.world_size

    resume_from = 0
    ckpt_path = latest_checkpoint(out) if config.train.resume else None
    if ckpt_path:
        resume_from = check_same_run(ckpt_path, config)
        report(f"resuming {config.run_name} from step {resume_from} ({ckpt_path})")
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config.to_dict(), out / "config.json")

    module = ContrastiveModule(config, total_steps, load_init=ckpt_path is None)
    data = ContrastiveDataModule(config.data.shards, config.data.notes, view_config(config),
                                 config.data.batch_size, config.data.num_workers)
    report(f"contrastive {config.run_name}: {total_steps} steps x {pairs_per_step} pairs of "
           f"{config.data.seq_len}-token views, tau {config.tau}, init {config.init}, "
           f"precision {trainer.precision}, {trainer.world_size} process(es), out {out}")
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - started
    if module.init_report:
        report(f"initialised from {config.init}: {module.init_report.loaded} tensors, "
               f"at init: {', '.join(module.init_report.left_at_init) or 'none'}")
    save_final_checkpoint(trainer, checkpoints)
    # Lightning's in-fit validation schedule drifts when epochs are short (with a dataloader_iter
    # step it counts each epoch's end as a batch), so the final model is checked here if it was not.
    if module.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=data, verbose=False)
    weights = out / "model.pt"
    if trainer.is_global_zero:
        export_weights(last, weights)
    steps_run = trainer.global_step - resume_from
    return ContrastiveResult(
        out_dir=out, checkpoint=last, weights=weights, init=config.init, steps=trainer.global_step,
        pairs=trainer.global_step * pairs_per_step, tokens=trainer.global_step * pairs_per_step * 2 * config.data.seq_len,
        train_loss=module.last_train_loss, val_loss=module.last_val_loss,
        val_retrieval_acc=module.last_val_accuracy, seconds=round(seconds, 3),
        pairs_per_s=round(steps_run * pairs_per_step / max(seconds, 1e-9), 2), resumed_from_step=resume_from,
        n_params=sum(p.numel() for p in module.net.parameters()),
    )


def save_final_checkpoint(trainer: pl.Trainer, checkpoints: Path) -> None:
    """Checkpoint the last step when the schedule did not (max_steps not a multiple of checkpoint_every).

    ``model.pt`` is exported from ``last.ckpt`` and a rerun resumes from it, so both
    must hold the final weights. Saved as ModelCheckpoint names its files, with
    ``last.ckpt`` linked to it.
    """
    last = checkpoints / "last.ckpt"
    if last.exists() and _checkpoint_step(last) == trainer.global_step:
        return
    final = checkpoints / f"step-{trainer.global_step:08d}.ckpt"
    trainer.save_checkpoint(final)
    if trainer.is_global_zero:
        last.unlink(missing_ok=True)
        last.symlink_to(final.name)
    trainer.strategy.barrier()


def load_config(args: argparse.Namespace) -> ContrastiveConfig:
    config = ContrastiveConfig.preset(args.preset) if args.preset else ContrastiveConfig()
    if args.config:
        config = ContrastiveConfig.from_file(args.config, base=config)
    return config.with_overrides(args.set or [])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m aria_model.training.contrastive",
                                     description="Contrastive fine-tune of a pretrained Aria model into the "
                                                 "embedding model (resumes by itself).")
    parser.add_argument("--preset", choices=sorted(_PRESETS), help="start from a named preset")
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

        result = contrastive(config, report)
        if pipes is not None:
            pipes.report_asset_materialization(metadata=result.metadata())
    return 0


if __name__ == "__main__":
    sys.exit(main())
