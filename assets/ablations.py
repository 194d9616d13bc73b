"""The paper's follow-up experiments: one asset per sweep (``aria_model.ablations`` does the work).

- **ablation_contrastive_epochs**: probe accuracy after 0 / 1 / ... contrastive epochs, from the
  latest ``pretrained_model`` and from scratch.
- **ablation_data_scale**: pretraining on nested fractions of the train split (whole piece
  clusters), then contrastive + probe; validation loss and probe accuracy per fraction.
- **ablation_tokenizer**: absolute vs relative time, same model, notes and steps; validation loss
  per note and tempo drift of continuations.

Each trains in this step's process (the variants are small and sequential; for GPU-sized sweeps
see the README's "Experiments" recipe), logs one MLflow run per variant nested under the sweep's
run, itself under this step's run, and writes ``<home>/ablations/<sweep>/summary.parquet`` and a
PNG, shown here as metadata. The defaults are the CPU demo scale: a few steps per variant.
"""


from typing import TYPE_CHECKING

import dagster as dg

from aria_model.probe_config import PROBE_TASKS, ProbeConfig
from aria_model.probe_data import read_probe_dataset
from assets.contrastive_model import latest_metadata
from assets.metadata import figure_markdown, markdown_table
from assets.pretrained_model import ASSET_NAME as PRETRAINED_MODEL
from assets.probe_dataset import ASSET_NAME as PROBE_DATASET
from assets.probe_dataset import probe_path
from assets.token_shards import shards_root
from pipelines.resources import AriaHome, MlflowTracking

# torch, Lightning and the training code load in the step that trains, not in every step process
# that loads the code location (ingest steps, the UI)
if TYPE_CHECKING:
    from aria_model.ablations import ProbeSettings, SweepResult, SweepTracking
    from aria_model.training.config import PretrainConfig
    from aria_model.training.contrastive import ContrastiveConfig

# The demo scale: each variant trains for seconds to a minute on a CPU.
TINY_PRETRAIN = ["train.max_steps=40", "train.val_every=20", "train.checkpoint_every=40", "optim.warmup_steps=5"]
TINY_CONTRASTIVE = ["train.max_steps=15", "train.val_every=15", "train.checkpoint_every=15"]


class ProbeSweepConfig(dg.Config):
    probe_tasks: list[str] = list(PROBE_TASKS)
    probe_epochs: int = ProbeConfig.epochs  # Aria's 50
    device: str | None = None  # None: cuda when available, else cpu


class ContrastiveEpochsConfig(ProbeSweepConfig):
    epochs: list[int] = [0, 1, 2]  # the paper's question: [0, 1, 5, 10, 25] (a GPU's worth)
    inits: list[str] = ["pretrained", "scratch"]
    preset: str = "tiny"  # contrastive preset: data, optimizer and batch of every variant
    overrides: list[str] = []  # "section.field=value" over the preset (train.epochs is the sweep's)


class DataScaleConfig(ProbeSweepConfig):
    fractions: list[float] = [0.1, 0.25, 0.5, 1.0]
    pretrain_preset: str = "tiny"
    pretrain_overrides: list[str] = TINY_PRETRAIN  # the same steps for every fraction
    contrastive_preset: str = "tiny"
    contrastive_overrides: list[str] = TINY_CONTRASTIVE


class TokenizerAblationConfig(dg.Config):
    tokenizers: list[str] = ["abs", "rel"]
    pretrain_preset: str = "tiny"
    pretrain_overrides: list[str] = TINY_PRETRAIN
    prompts: int = 3  # held-out files continued per model
    variations: int = 2  # continuations per prompt
    length: int = 256  # new tokens per continuation
    prompt_seconds: float = 10.0


def _probe(config: ProbeSweepConfig) -> "ProbeSettings":
    import torch

    from aria_model.ablations import ProbeSettings

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ProbeSettings(tasks=tuple(config.probe_tasks), epochs=config.probe_epochs, device=device)


def _tracking(mlflow: MlflowTracking, run_id: str) -> "SweepTracking":
    from aria_model.ablations import SweepTracking

    return SweepTracking(tracking_uri=mlflow.tracker().tracking_uri, experiment=mlflow.experiment, parent_run_id=run_id)


def _pretrain_config(home: AriaHome, preset: str, overrides: list[str]) -> "PretrainConfig":
    from aria_model.training.config import PretrainConfig

    config = PretrainConfig.preset(preset).with_overrides(overrides)
    return PretrainConfig.from_dict({"data": {"shards": str(shards_root(home).resolve())}}, base=config)


def _contrastive_config(home: AriaHome, preset: str, overrides: list[str]) -> "ContrastiveConfig":
    from aria_model.training.contrastive import ContrastiveConfig

    config = ContrastiveConfig.preset(preset).with_overrides(overrides)
    return ContrastiveConfig.from_dict({"data": {"shards": str(shards_root(home).resolve()),
                                                 "notes": str(home.root / "midi_notes")}}, base=config)


def _metadata(result: "SweepResult", mlflow: MlflowTracking, run_id: str) -> dict:
    rows = [{key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}
            for row in result.table.to_pylist()]
    return {
        "dagster/row_count": result.table.num_rows,
        "path": dg.MetadataValue.path(str(result.summary_path)),
        "summary": dg.MetadataValue.md(markdown_table(rows)),
        "plot": figure_markdown(result.figure, result.name),
        "sweep_mlflow_run_id": result.mlflow_run_id,
        **mlflow.run_metadata(run_id),
    }


@dg.asset(
    group_name="ablations",
    kinds={"pytorch", "mlflow", "parquet"},
    deps=[dg.AssetKey(PRETRAINED_MODEL), dg.AssetKey(PROBE_DATASET), dg.AssetKey("token_shards"),
          dg.AssetKey("midi_notes")],
    pool="gpu",
)
def ablation_contrastive_epochs(context: dg.AssetExecutionContext, config: ContrastiveEpochsConfig, home: AriaHome,
                                mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Probe accuracy per contrastive epoch count, from the pretrained LM and from scratch."""
    from aria_model.ablations import contrastive_epochs_sweep

    weights = latest_metadata(context, PRETRAINED_MODEL).get("weights")
    if not weights:
        raise dg.Failure(f"{PRETRAINED_MODEL} reported no weights: rematerialize it")
    base = _contrastive_config(home, config.preset, config.overrides)
    with mlflow.asset_run(context) as run_id:
        result = contrastive_epochs_sweep(home.root, weights, base, read_probe_dataset(probe_path(home)),
                                          epochs=config.epochs, inits=config.inits, probe=_probe(config),
                                          tracking=_tracking(mlflow, run_id), report=context.log.info)
    return dg.MaterializeResult(metadata=_metadata(result, mlflow, run_id))


@dg.asset(
    group_name="ablations",
    kinds={"pytorch", "mlflow", "parquet"},
    deps=[dg.AssetKey("token_shards"), dg.AssetKey(PROBE_DATASET), dg.AssetKey("midi_notes")],
    pool="gpu",
)
def ablation_data_scale(context: dg.AssetExecutionContext, config: DataScaleConfig, home: AriaHome,
                        mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Pretraining on nested fractions of the train split; validation loss and probe accuracy per fraction."""
    from aria_model.ablations import data_scale_sweep

    with mlflow.asset_run(context) as run_id:
        result = data_scale_sweep(home.root, _pretrain_config(home, config.pretrain_preset, config.pretrain_overrides),
                                  _contrastive_config(home, config.contrastive_preset, config.contrastive_overrides),
                                  read_probe_dataset(probe_path(home)), fractions=config.fractions,
                                  probe=_probe(config), tracking=_tracking(mlflow, run_id), report=context.log.info)
    return dg.MaterializeResult(metadata=_metadata(result, mlflow, run_id))


@dg.asset(
    group_name="ablations",
    kinds={"pytorch", "mlflow", "parquet"},
    deps=[dg.AssetKey("token_shards")],
    pool="gpu",
)
def ablation_tokenizer(context: dg.AssetExecutionContext, config: TokenizerAblationConfig, home: AriaHome,
                       mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Absolute vs relative tokenizer: validation loss per note and tempo drift of continuations."""
    from aria_model.ablations import tokenizer_sweep
    from aria_model.generation import GenerationConfig

    generation = GenerationConfig(variations=config.variations, length=config.length,
                                  prompt_seconds=config.prompt_seconds)
    with mlflow.asset_run(context) as run_id:
        result = tokenizer_sweep(home.root, _pretrain_config(home, config.pretrain_preset, config.pretrain_overrides),
                                 tokenizers=config.tokenizers, prompts=config.prompts, generation=generation,
                                 tracking=_tracking(mlflow, run_id), report=context.log.info)
    return dg.MaterializeResult(metadata=_metadata(result, mlflow, run_id))
