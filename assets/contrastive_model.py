"""contrastive_model and contrastive_scratch: Aria's contrastive fine-tune, launched through Dagster Pipes.

Both assets launch ``python -m aria_model.training.contrastive`` (the script a user runs by hand,
under torchrun or on SLURM) with the ``pipes_client`` resource, exactly as ``pretrained_model``
launches pretraining:

- **contrastive_model** starts from the weights ``pretrained_model`` last materialized (its
  ``weights`` metadata): the paper's embedding model. Its MLflow run carries the tag
  ``init_run_id`` = the pretraining run's id, and so does its registered model version
  (``aria-embedding``).
- **contrastive_scratch** trains the same network with the same schedule from random weights
  (``init=scratch``): the paper's from-scratch baseline. It does not depend on pretraining, so
  the graph says so; it registers as ``aria-embedding-scratch``. ``probe_eval`` compares the two
  and checks that they trained the same number of steps.

Rerunning with the same ``run_name`` resumes from the last checkpoint; a finished run returns at once.
"""


import sys
from pathlib import Path
from typing import Any

import dagster as dg

from aria_model.tracking_names import TAG_INIT_RUN
from assets.metadata import figure_markdown
from assets.pretrained_model import ASSET_NAME as PRETRAINED_MODEL
from assets.token_shards import shards_root
from pipelines.resources import AriaHome, MlflowTracking

ASSET_NAME = "contrastive_model"
SCRATCH_ASSET_NAME = "contrastive_scratch"
SCRATCH_REGISTERED_NAME = "aria-embedding-scratch"  # kept apart from the paper model's versions
# Set by the asset from its upstream; an override would break the lineage the run records.
ASSET_SETTINGS = ("init", "data.shards", "data.notes", "run_name", "out_dir", "tracking.run_id")


class ContrastiveRunConfig(dg.Config):
    preset: str = "tiny"  # tiny (CPU demo) | small | medium (the paper's embedding model, GPUs)
    config_file: str | None = None  # JSON/TOML with the config's sections, applied over the preset
    overrides: list[str] = []  # "section.field=value", applied last, e.g. "train.max_steps=2000"
    run_name: str | None = None  # None: contrastive-<preset> (-scratch for the baseline); the same name resumes


def run_name(config: ContrastiveRunConfig, scratch: bool) -> str:
    return config.run_name or f"contrastive-{config.preset}" + ("-scratch" if scratch else "")


def out_dir(home: AriaHome, name: str) -> Path:
    return home.root / "models" / "contrastive" / name


def contrastive_command(config: ContrastiveRunConfig, home: AriaHome, init: str, mlflow_run_id: str,
                        scratch: bool) -> list[str]:
    command = [sys.executable, "-m", "aria_model.training.contrastive", "--preset", config.preset]
    if config.config_file:
        command += ["--config", config.config_file]
    name = run_name(config, scratch)
    settings = [f"init={init}", f"data.shards={shards_root(home)}", f"data.notes={home.root / 'midi_notes'}",
                f"run_name={name}", f"out_dir={out_dir(home, name)}", f"tracking.run_id={mlflow_run_id}"]
    if scratch:
        settings.append(f"tracking.register_as={SCRATCH_REGISTERED_NAME}")
    return command + ["--set", *settings, *config.overrides]


def latest_metadata(context: dg.AssetExecutionContext, asset_name: str) -> dict[str, Any]:
    """The plain values of ``asset_name``'s latest materialization metadata; fails when it has none."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset_name))
    if event is None:
        raise dg.Failure(f"{asset_name} was never materialized: materialize it first "
                         f"(`aria run <job> --with-missing-upstream` does)")
    return {key: getattr(value, "value", value) for key, value in event.asset_materialization.metadata.items()}


def _check_config(config: ContrastiveRunConfig) -> None:
    # torch, Lightning and mlflow load in the steps that need them, not in every process that loads the
    # code location (ingest steps, the UI)
    from aria_model.training.contrastive import ContrastiveConfig

    ContrastiveConfig.preset(config.preset)  # fail here, with the valid names, before launching anything
    fixed = [o for o in config.overrides if o.partition("=")[0].strip() in ASSET_SETTINGS]
    if fixed:
        raise dg.Failure(f"overrides {fixed} are set by the asset ({', '.join(ASSET_SETTINGS)}); "
                         "to fine-tune other weights run `python -m aria_model.training.contrastive` directly")


def _train(context: dg.AssetExecutionContext, config: ContrastiveRunConfig, home: AriaHome, mlflow: MlflowTracking,
           pipes_client: dg.PipesSubprocessClient, init: str, lineage: dict[str, str]) -> dg.MaterializeResult:
    """Launch the entry point under this step's MLflow run, tagged with ``lineage`` first (so the
    registered model version carries it too); metrics, loss curve and lineage as metadata."""
    from aria_model.contrastive import SCRATCH
    from aria_model.tracking import plot_curves
    from aria_model.training.callbacks import read_step_log

    _check_config(config)
    scratch = init == SCRATCH
    with mlflow.asset_run(context) as run_id:
        if lineage.get(TAG_INIT_RUN):
            mlflow.tracker().client.set_tag(run_id, TAG_INIT_RUN, lineage[TAG_INIT_RUN])
        command = contrastive_command(config, home, init, run_id, scratch)
        context.log.info("$ " + " ".join(command))
        reported = pipes_client.run(command=command, context=context,
                                    env={"ARIA_HOME": str(home.root), **mlflow.subprocess_env(run_id)}
                                    ).get_materialize_result()
    name = run_name(config, scratch)
    metadata = {**(reported.metadata or {}), "preset": config.preset, "run_name": name, **lineage}
    steps = read_step_log(out_dir(home, name) / "loss.csv")
    if steps:
        curve = {"train/loss": [(int(r["step"]), float(r["loss"])) for r in steps]}
        metadata["loss_curve"] = figure_markdown(plot_curves(curve, title=name), "loss curve")
    return dg.MaterializeResult(metadata={**metadata, **mlflow.run_metadata(run_id)})


@dg.asset(
    name=ASSET_NAME,
    group_name="training",
    kinds={"pytorch", "mlflow"},
    deps=[dg.AssetKey(PRETRAINED_MODEL), dg.AssetKey("token_shards"), dg.AssetKey("midi_notes")],
    pool="gpu",  # one training step at a time: see dagster.yaml
)
def contrastive_model(context: dg.AssetExecutionContext, config: ContrastiveRunConfig, home: AriaHome,
                      mlflow: MlflowTracking, pipes_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """Contrastive fine-tune (NT-Xent on two slices of a file) of the latest pretrained model:
    the embedding model the probes evaluate."""
    pretrained = latest_metadata(context, PRETRAINED_MODEL)
    weights = pretrained.get("weights")
    if not weights or not Path(weights).is_file():
        raise dg.Failure(f"{PRETRAINED_MODEL}'s latest weights {weights!r} are gone: rematerialize it")
    lineage = {TAG_INIT_RUN: str(pretrained.get("mlflow_run_id", "")),
               "init_model_version": str(pretrained.get("model_version", ""))}
    return _train(context, config, home, mlflow, pipes_client, weights, lineage)


@dg.asset(
    name=SCRATCH_ASSET_NAME,
    group_name="training",
    kinds={"pytorch", "mlflow"},
    deps=[dg.AssetKey("token_shards"), dg.AssetKey("midi_notes")],
    pool="gpu",
)
def contrastive_scratch(context: dg.AssetExecutionContext, config: ContrastiveRunConfig, home: AriaHome,
                        mlflow: MlflowTracking, pipes_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """The same contrastive training from random weights: the paper's baseline without pretraining.
    Give it the same preset and overrides as contrastive_model (probe_eval checks the steps)."""
    from aria_model.contrastive import SCRATCH

    return _train(context, config, home, mlflow, pipes_client, SCRATCH, {})
