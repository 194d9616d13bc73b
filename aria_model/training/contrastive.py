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

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from aria_model.contrastive import (
    SCRATCH,
    ContrastiveDataModule,
    ContrastiveModule,
    ViewConfig,
)
from aria_model.embedding import read_weights
from aria_model.home import default_home
from aria_model.model import ModelConfig
from aria_model.training.config import (
    OptimConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)
from aria_model.training.runner import (
    RunResult,
    cli_main,
    fit,
    logger_for,
    mlflow_run,
    record,
    result_fields,
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
class ContrastiveConfig(RunConfig):
    """One contrastive run; the defaults are Aria's (the presets change the size and the schedule)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("medium", emb_size=512))
    init: str = "pretrain-medium"  # "scratch", a weights file, or a pretrain run name (see the module docstring)
    tau: float = 0.1  # NT-Xent temperature of the paper's checkpoint (Aria's code default is 0.5)
    data: ContrastiveDataConfig = ContrastiveDataConfig()
    # Aria's contrastive optimizer: AdamW 1e-5, wd 0.1, betas (0.9, 0.95), eps 1e-5, 1000 warmup steps, decay to 10 %.
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=1000)
    train: TrainConfig = TrainConfig(epochs=25)  # emb-t0.1-s2048-e25: 25 epochs
    tracking: TrackingConfig = TrackingConfig(register_as="aria-embedding")
    out_dir: str = ""  # "" means <ARIA_HOME>/models/contrastive/<run_name>
    run_name: str = ""  # "" means contrastive


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


ContrastiveConfig.PRESETS = {"tiny": _tiny, "small": _small, "medium": _medium}


@dataclass(frozen=True)
class ContrastiveResult(RunResult):
    init: str = ""  # the weights it started from, or "scratch"
    pairs: int = 0  # view pairs trained on
    tokens: int = 0  # both views' tokens, padding included
    val_retrieval_acc: float = math.nan  # in-batch top-1: a view finds its partner among batch_size candidates
    pairs_per_s: float = 0.0  # this invocation's own steps only


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


def contrastive(config: ContrastiveConfig, report=print) -> ContrastiveResult:
    config = resolved(config)
    data = ContrastiveDataModule(config.data.shards, config.data.notes, view_config(config),
                                 config.data.batch_size, config.data.num_workers)
    report(f"contrastive {config.run_name}: pairs of {config.data.seq_len}-token views, tau {config.tau}, "
           f"init {config.init}")
    with mlflow_run(config, kind="contrastive") as (tracker, run_id):
        fitted = fit(config, make_module=lambda total, resuming: ContrastiveModule(config, total, load_init=not resuming),
                     datamodule=data, tokens_per_micro_batch=2 * config.data.batch_size * config.data.seq_len,
                     throughput_length=lambda batch: batch[0].numel() + batch[2].numel(),
                     logger=logger_for(tracker, run_id), report=report, same_run_fields=RESUME_FIELDS)
        module = fitted.module
        if module.init_report:
            report(f"initialised from {config.init}: {module.init_report.loaded} tensors, "
                   f"at init: {', '.join(module.init_report.left_at_init) or 'none'}")
        pairs_per_step = config.data.batch_size * config.train.grad_accum * fitted.trainer.world_size
        steps = fitted.trainer.global_step
        result = ContrastiveResult(
            **result_fields(fitted, config), init=config.init, pairs=steps * pairs_per_step,
            tokens=steps * pairs_per_step * 2 * config.data.seq_len, val_retrieval_acc=module.last_val_accuracy,
            pairs_per_s=round((steps - fitted.resumed_from_step) * pairs_per_step / max(fitted.seconds, 1e-9), 2))
        return replace(result, **record(tracker, run_id, config, result))


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, config_type=ContrastiveConfig, resolve=resolved, run=contrastive,
                    prog="python -m aria_model.training.contrastive",
                    description="Contrastive fine-tune of a pretrained Aria model into the embedding model "
                                "(resumes by itself).")


if __name__ == "__main__":
    sys.exit(main())
