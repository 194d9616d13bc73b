"""The representation recipe on one machine without Dagster: pretrain, contrastive fine-tune from
those weights and from scratch (same preset and schedule), then the probe table with every baseline.

For a GPU node that has the library but not the orchestrator (or MLflow: ``--no-tracking``). The
data home must hold what ``aria run ingest`` and the ``probe_dataset`` asset wrote there:
``token_shards/``, ``midi_notes/`` and ``probe_dataset/probe.parquet``. The runs write under
``<home>/models/{pretrain,contrastive}/<name>-*`` and the table to
``<home>/recipes/<name>/results.parquet`` (the ``probe_eval`` asset's columns), not over the
pipeline's own ``probe_eval``. Each run resumes from its checkpoints like any training run.

    python -m aria_model.recipe --home .aria --preset small \\
        --pretrain train.max_steps=2000 --contrastive train.max_steps=400

The methods and baselines are the ``probe_eval`` asset's (``aria_model.probe_eval``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from aria_model.atomic_io import write_json_atomic, write_parquet_atomic
from aria_model.features import feature_columns
from aria_model.probe import results_table, results_text
from aria_model.probe_config import EOS, HANDCRAFTED, MEAN, PROBE_SEQ_LEN
from aria_model.probe_data import read_probe_dataset
from aria_model.probe_eval import Embedder, handcrafted_embeddings, model_features, probe_methods, result_rows
from aria_model.training.config import PretrainConfig
from aria_model.contrastive import SCRATCH
from aria_model.training.contrastive import ContrastiveConfig, contrastive
from aria_model.training.pretrain import pretrain

PRETRAINED, SCRATCH_RUN = "aria_contrastive", "contrastive_scratch"


@dataclass(frozen=True)
class RecipeConfig:
    home: Path
    preset: str = "small"
    name: str = ""  # "" means recipe-<preset>
    pretrain_overrides: tuple[str, ...] = ()
    contrastive_overrides: tuple[str, ...] = ()  # applied to both fine-tunes
    tracking: bool = True
    handcrafted_exclude: tuple[str, ...] = ("velocity",)  # demo-corpus labels: see aria_model.probe_data
    probe_seq_len: int = PROBE_SEQ_LEN
    embed_batch_size: int = 32

    @property
    def run_name(self) -> str:
        return self.name or f"recipe-{self.preset}"


def run_recipe(config: RecipeConfig, report: Callable[[str], None] = print) -> Path:
    """Every step in order; returns the results table's path. Step timings go to ``timings.json`` beside it."""
    home, name = config.home.resolve(), config.run_name
    tracking = [] if config.tracking else ["tracking.enabled=false"]
    timings: dict[str, float] = {}
    started = time.perf_counter()
    pretrained = pretrain(PretrainConfig.preset(config.preset).with_overrides([
        f"data.shards={home / 'token_shards'}", f"out_dir={home / 'models' / 'pretrain' / name}",
        f"run_name={name}", *tracking, *config.pretrain_overrides]), report)
    timings["pretrain"] = time.perf_counter() - started
    weights = {}
    for method, init in ((PRETRAINED, str(pretrained.weights)), (SCRATCH_RUN, SCRATCH)):
        run = f"{name}-{method}"
        started = time.perf_counter()
        result = contrastive(ContrastiveConfig.preset(config.preset).with_overrides([
            f"init={init}", f"data.shards={home / 'token_shards'}", f"data.notes={home / 'midi_notes'}",
            f"out_dir={home / 'models' / 'contrastive' / run}", f"run_name={run}", *tracking,
            *config.contrastive_overrides]), report)
        timings[method] = time.perf_counter() - started
        weights[method] = result.weights
    embedders = [Embedder(PRETRAINED, weights[PRETRAINED], EOS), Embedder(SCRATCH_RUN, weights[SCRATCH_RUN], EOS),
                 Embedder("pretrained_mean_pool", pretrained.weights, MEAN)]
    return probe_all(config, embedders, timings, report)


def probe_all(config: RecipeConfig, embedders: Sequence[Embedder], timings: dict[str, float],
              report: Callable[[str], None]) -> Path:
    home = config.home.resolve()
    dataset = read_probe_dataset(home / "probe_dataset" / "probe.parquet")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features = {}
    for embedder in embedders:
        computed = model_features(embedder, dataset, home / "midi_notes", device=device,
                                  batch_size=config.embed_batch_size, seq_len=config.probe_seq_len)
        features[embedder.method] = computed.embeddings.by_key()
        timings[f"embed {embedder.method}"] = computed.timing["seconds"]
    features[HANDCRAFTED] = handcrafted_embeddings(dataset, home / "midi_notes").by_key()
    started = time.perf_counter()
    results = probe_methods(dataset, features, [e.method for e in embedders],
                            feature_columns(exclude=config.handcrafted_exclude))
    timings["probes"] = time.perf_counter() - started
    out = home / "recipes" / config.run_name
    write_parquet_atomic(results_table(results), out / "results.parquet")
    write_json_atomic({step: round(seconds, 1) for step, seconds in timings.items()}, out / "timings.json")
    report(results_text(result_rows(results)))
    report("seconds: " + json.dumps({step: round(seconds, 1) for step, seconds in timings.items()}))
    return out / "results.parquet"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aria_model.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="data home with token_shards, midi_notes, probe_dataset")
    parser.add_argument("--preset", default="small", choices=sorted(PretrainConfig.PRESETS))
    parser.add_argument("--name", default="", help="run name prefix (default recipe-<preset>)")
    parser.add_argument("--pretrain", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--contrastive", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="overrides of both contrastive runs")
    parser.add_argument("--no-tracking", action="store_true", help="no MLflow runs (e.g. mlflow not installed)")
    parser.add_argument("--handcrafted-exclude", default="velocity",
                        help="feature blocks the handcrafted baseline leaves out, comma-separated "
                             "(default velocity: the demo labels' giveaway; '' for your own labels)")
    args = parser.parse_args(argv)
    config = RecipeConfig(args.home, args.preset, args.name, tuple(args.pretrain), tuple(args.contrastive),
                          not args.no_tracking, tuple(b for b in args.handcrafted_exclude.split(",") if b))
    for needed in ("token_shards", "midi_notes", "probe_dataset/probe.parquet"):
        if not (config.home / needed).exists():
            parser.error(f"{config.home / needed} is missing: materialize the ingest job and probe_dataset first")
    run_recipe(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
