"""pretrained_model: Lightning pretraining of the Aria transformer, launched through Dagster Pipes.

The asset only launches ``python -m aria_model.training.pretrain`` (the same script a user runs
by hand, under torchrun or on SLURM) with the ``pipes_client`` resource: a local subprocess by
default, a SLURM job with ``pipelines.slurm.PipesSlurmClient`` (see docs/deploy.md). The script
streams its progress lines to the run's logs, logs to this step's MLflow run, and reports its
final metrics and paths back as this materialization's metadata. Rerunning with the same
``run_name`` resumes from the last checkpoint; a finished run returns at once.
"""


import math
import sys

import dagster as dg

from assets.metadata import figure_markdown
from assets.token_shards import shards_root
from pipelines.resources import AriaHome, MlflowTracking

ASSET_NAME = "pretrained_model"


class PretrainRunConfig(dg.Config):
    preset: str = "tiny"  # tiny (CPU demo) | small | medium (the paper's model, GPUs)
    config_file: str | None = None  # JSON/TOML with the config's sections, applied over the preset
    overrides: list[str] = []  # "section.field=value", applied last, e.g. "train.max_steps=2000"
    run_name: str | None = None  # None: pretrain-<preset>; the same name resumes that run


def run_name(config: PretrainRunConfig) -> str:
    return config.run_name or f"pretrain-{config.preset}"


def pretrain_command(config: PretrainRunConfig, home: AriaHome, mlflow_run_id: str) -> list[str]:
    command = [sys.executable, "-m", "aria_model.training.pretrain", "--preset", config.preset]
    if config.config_file:
        command += ["--config", config.config_file]
    settings = [f"data.shards={shards_root(home)}", f"run_name={run_name(config)}",
                f"out_dir={home.root / 'models' / 'pretrain' / run_name(config)}", f"tracking.run_id={mlflow_run_id}"]
    return command + ["--set", *settings, *config.overrides]


@dg.asset(
    name=ASSET_NAME,
    group_name="training",
    kinds={"pytorch", "mlflow"},
    deps=[dg.AssetKey("token_shards")],
    pool="gpu",  # one training step at a time: see dagster.yaml
)
def pretrained_model(context: dg.AssetExecutionContext, config: PretrainRunConfig, home: AriaHome,
                     mlflow: MlflowTracking, pipes_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """Pretrain (or resume pretraining) on the current token shards; metrics, loss curve and the
    registered model version as metadata."""
    # torch, Lightning and mlflow load in the steps that need them, not in every process that loads
    # the code location (ingest steps, the UI)
    from aria_model.tracking import plot_curves
    from aria_model.training.callbacks import read_step_log
    from aria_model.training.config import PretrainConfig

    PretrainConfig.preset(config.preset)  # fail here, with the valid names, before launching anything
    with mlflow.asset_run(context) as run_id:
        command = pretrain_command(config, home, run_id)
        context.log.info("$ " + " ".join(command))
        reported = pipes_client.run(command=command, context=context,
                                    env={"ARIA_HOME": str(home.root), **mlflow.subprocess_env(run_id)}
                                    ).get_materialize_result()
    metadata = {key: value for key, value in (reported.metadata or {}).items() if not _is_nan(value)}
    steps = read_step_log(home.root / "models" / "pretrain" / run_name(config) / "loss.csv")
    if steps:
        curve = {"train/loss": [(int(r["step"]), float(r["loss"])) for r in steps]}
        metadata["loss_curve"] = figure_markdown(plot_curves(curve, title=run_name(config)), "loss curve")
    return dg.MaterializeResult(metadata={**metadata, **mlflow.run_metadata(run_id)})


@dg.asset_check(asset=pretrained_model)
def validation_loss_is_finite(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The run ended with a finite validation loss (no divergence, a non-empty val split)."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(ASSET_NAME))
    metadata = event.asset_materialization.metadata if event else {}
    val_loss = metadata.get("val_loss")
    value = val_loss.value if val_loss is not None else math.nan
    return dg.AssetCheckResult(passed=math.isfinite(value), metadata={"val_loss": value})


def _is_nan(value) -> bool:
    raw = getattr(value, "value", value)
    return isinstance(raw, float) and math.isnan(raw)
