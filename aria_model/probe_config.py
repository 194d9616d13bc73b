"""Aria's linear-probe settings, apart from the torch code that runs them: Dagster configs show these
defaults without the code location importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PROBE_SEQ_LEN = 1024  # the linear probes' chunk length (aria/eval/linear_probe.py)
PROBE_TASKS = ("style", "tune_type")  # the demo corpus's labeled tasks (aria_model.probe_data)
EOS, MEAN = "eos", "mean"  # poolings: Aria's <E> embedding of a contrastive model; an LM's mean-pooled hidden states
HANDCRAFTED, MAJORITY = "handcrafted", "majority"  # the baselines without a model


@dataclass(frozen=True)
class ProbeConfig:
    """Aria's probe settings (aria/eval/linear_probe.py and evaluate_embeddings.sh)."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    batch_size: int = 8
    epochs: int = 50
    seed: int = 42
    standardize: bool = False  # Aria: raw embeddings; see the module docstring

    def as_dict(self) -> dict:
        return asdict(self)
