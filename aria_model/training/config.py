"""Pretraining configuration: typed, grouped dataclasses with named presets.

A run is fully described by one ``PretrainConfig``. It comes from a preset
(``PretrainConfig.preset("tiny")``), optionally a JSON or TOML file with the same
nesting, then ``section.field=value`` overrides from the command line::

    python -m aria_model.training.pretrain --preset small --set train.max_steps=2000 optim.lr=1e-4

Defaults are Aria's (``aria/training/train.py``): AdamW lr 3e-4, weight decay 0.1
on every parameter, betas (0.9, 0.95), eps 1e-5, 200 warmup steps, then linear
decay to 10 % of the peak at the last step.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

from aria_model.model import ATTENTION_BACKENDS, ModelConfig


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # token_shards folder; "" means <ARIA_HOME>/token_shards
    seq_len: int = 0  # training window; 0 means the model's max_seq_len
    batch_size: int = 8  # per device, per micro-step
    num_workers: int = 2
    augment: bool = True  # Aria's tempo/pitch/velocity augmentation on training windows
    sep_sequences: bool = False  # Aria's --sep_sequences: every file starts a window
    shuffle_windows: int = 256


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1  # Aria decays every parameter, norms and embeddings included
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1  # linear decay ends at 10 % of lr
    grad_clip: float = 0.0  # 0: no clipping, as Aria


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 0  # optimizer steps; 0 means epochs x steps per epoch
    epochs: int = 1  # used when max_steps is 0
    grad_accum: int = 1
    precision: str = "auto"  # auto: bf16-mixed on a GPU that has bf16, else 32-true
    accelerator: str = "auto"
    devices: str = "auto"  # "auto", a count ("8") or a list ("0,1")
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    compile: bool = False  # torch.compile each transformer block (not the LightningModule)
    attention: str = "auto"  # first-choice SDPA kernel: auto (torch's order), cudnn, flash, efficient, math
    seed: int = 0
    checkpoint_every: int = 500  # optimizer steps between checkpoints (also the resume granularity)
    keep_checkpoints: int = 2  # newest step checkpoints kept besides last.ckpt
    val_every: int = 500  # optimizer steps between validations; 0: only at the end
    val_batches: int = 50  # per validation, per rank
    log_every: int = 10  # optimizer steps between console/Pipes progress lines
    deterministic: bool = False  # torch deterministic algorithms (slower; used by resume tests)
    resume: bool = True  # continue from out_dir/checkpoints/last.ckpt when it exists

    def __post_init__(self):
        if self.attention != "auto" and self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"train.attention {self.attention!r}: one of auto, {', '.join(ATTENTION_BACKENDS)}")


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""  # "" means $MLFLOW_TRACKING_URI or sqlite:///<ARIA_HOME>/mlflow.db
    experiment: str = "aria"
    run_id: str = ""  # attach to this MLflow run (made by the orchestrator); "" starts one
    parent_run_id: str = ""  # nest the run started here under this one
    register_as: str = "aria-pretrained"  # registered model name for the final checkpoint; "" skips
    enabled: bool = True


class RunConfig:
    """What every run config (pretraining, contrastive) can do: presets, files, overrides, dicts.

    Subclasses are frozen dataclasses of sections and set ``PRESETS`` (name -> factory).
    """

    PRESETS: ClassVar[dict[str, Callable[[], RunConfig]]] = {}

    @classmethod
    def preset(cls, name: str):
        try:
            make = cls.PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose one of {sorted(cls.PRESETS)}") from None
        return make()

    @classmethod
    def from_dict(cls, data: dict[str, Any], base=None):
        """``base`` (default: the defaults) updated with ``data``; a model given by name is a preset."""
        return _update(base or cls(), data, "")

    @classmethod
    def from_file(cls, path: str | Path, base=None):
        path = Path(path)
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.from_dict(data, base)

    def with_overrides(self, assignments: list[str]):
        """Apply ``section.field=value`` strings; values parse as JSON, else stay strings."""
        config = self
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep:
                raise ValueError(f"override {assignment!r} is not of the form section.field=value")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            nested: Any = value
            for part in reversed(key.strip().split(".")):
                nested = {part: nested}
            config = _update(config, nested, "")
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """``section.field -> value``, the form MLflow params and Dagster metadata take."""
        return _flatten(self.to_dict(), "")


@dataclass(frozen=True)
class PretrainConfig(RunConfig):
    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny"))
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    out_dir: str = ""  # "" means <ARIA_HOME>/models/pretrain/<run_name>
    run_name: str = ""  # "" means pretrain


def _update(obj: Any, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a table of fields, got {data!r}")
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    changes = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        if name not in names:
            raise ValueError(f"unknown config field {path!r}; {type(obj).__name__} has {sorted(names)}")
        current = getattr(obj, name)
        if is_dataclass(current):
            if isinstance(value, str):  # a preset name, e.g. model = "small"
                value = type(current).preset(value)
            elif isinstance(value, dict):
                value = dict(value)
                preset = value.pop("preset", None)
                start = type(current).preset(preset) if preset else current
                value = _update(start, value, path)
            changes[name] = value
        else:
            changes[name] = _coerce(value, hints[name], path)
    return replace(obj, **changes)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        return tuple(value)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{path} must be true or false, got {value!r}")
    if hint is float and isinstance(value, int):
        return float(value)
    if hint is str and not isinstance(value, str):
        return str(value)
    if hint is int and not isinstance(value, int):
        raise ValueError(f"{path} must be an integer, got {value!r}")
    return value


def _flatten(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _tiny() -> PretrainConfig:
    # The README demo and CI: about one pass over the demo shards (~300k tokens) in a
    # couple of minutes on a laptop CPU; the 17,727-way head is most of the compute.
    return PretrainConfig(
        model=ModelConfig.preset("tiny"),
        data=DataConfig(seq_len=512, batch_size=4, num_workers=0),
        optim=OptimConfig(lr=1e-3, warmup_steps=15),
        train=TrainConfig(max_steps=150, checkpoint_every=50, val_every=50, val_batches=8, log_every=10),
        run_name="pretrain-tiny",
    )


def _small() -> PretrainConfig:
    # A CPU overnight or a GPU for minutes on a real corpus.
    return PretrainConfig(
        model=ModelConfig.preset("small"),
        data=DataConfig(seq_len=2048, batch_size=16, num_workers=4),
        train=TrainConfig(max_steps=20_000, checkpoint_every=1000, val_every=1000),
        run_name="pretrain-small",
    )


def _medium() -> PretrainConfig:
    # The paper's model at Aria's per-device batch, 4 x 8192 tokens. Aria checkpoints activations;
    # on an 80 GB H100 that costs 23 % of the speed (bench/train.py: 65.5k vs 83.5k tokens/s) and
    # the run fits without it (47 GiB peak, compiled, bf16), so the preset does not. On a card
    # under ~60 GB set model.grad_checkpoint=true (18.6 GiB peak).
    return PretrainConfig(
        model=ModelConfig.preset("medium"),
        data=DataConfig(seq_len=8192, batch_size=4, num_workers=8),
        train=TrainConfig(epochs=75, compile=True, checkpoint_every=2000, val_every=2000),
        run_name="pretrain-medium",
    )


PretrainConfig.PRESETS = {"tiny": _tiny, "small": _small, "medium": _medium}
