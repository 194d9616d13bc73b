"""probe_eval: Aria's linear probe on frozen embeddings, against the paper's baselines.

For every task of ``probe_dataset`` the same probe (``aria_model.probe``: one linear layer,
AdamW, 50 epochs, seeded) is trained on the train split and scored on the test split, with
the features of each method:

    method                 features
    aria_contrastive       contrastive_model: the EOS embedding of each 300-note chunk, mean over chunks (Aria's)
    contrastive_scratch    contrastive_scratch: the same, from the model trained without pretraining
    pretrained_mean_pool   pretrained_model: the LM's final hidden states averaged per chunk, then over chunks
    handcrafted            pitch-class, interval, density, duration, pitch-range and polyphony statistics
                           (standardised; the velocity block left out for the demo corpus, whose accent
                           marks only the Irish collections carry)
    majority               the most common train label, no features

Chunks are cut to Aria's probe length (1024 tokens, aria/eval/linear_probe.py), or to the model's
context when it is shorter. Notes come from ``midi_notes`` (files outside the corpus are parsed).

Outputs under ``<home>/probe_eval/``: ``results.parquet`` (task, method, accuracy, macro_f1,
n_train, n_test, then classes, per-class metrics, confusion matrix, config), ``per_class.parquet``,
``confusion/<task>__<method>.png`` and ``embeddings/<method>.parquet`` (file_id, embedding,
n_chunks) for lineage. The table, the PNGs and accuracy and macro-F1 per (task, method) also go
to this step's MLflow run. Everything is seeded and embedding is inference only, so a rerun on the same
inputs writes the same table (the ``seconds`` column aside).
"""


import time
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aria_model.atomic_io import write_parquet_atomic
from aria_model.features import feature_columns
from aria_model.probe_config import EOS, HANDCRAFTED, MAJORITY, MEAN, PROBE_SEQ_LEN, ProbeConfig
from aria_model.probe_data import ProbeDataset, read_probe_dataset
from assets.contrastive_model import ASSET_NAME as CONTRASTIVE_MODEL
from assets.contrastive_model import SCRATCH_ASSET_NAME as CONTRASTIVE_SCRATCH
from assets.contrastive_model import latest_metadata
from assets.metadata import figure_markdown, markdown_table, progress_logger
from assets.pretrained_model import ASSET_NAME as PRETRAINED_MODEL
from assets.probe_dataset import ASSET_NAME as PROBE_DATASET
from assets.probe_dataset import DEMO_LABELS, probe_path
from pipelines.resources import AriaHome, MlflowTracking

# torch and the models load in this step only, not in every process that loads the code location
# (ingest steps, the UI): the functions below import what they run
if TYPE_CHECKING:
    from aria_model.probe import ProbeResult

ASSET_NAME = "probe_eval"
# method -> (the asset whose weights embed, pooling): Aria's EOS embedding or the LM's mean pool
EMBEDDERS = {
    "aria_contrastive": (CONTRASTIVE_MODEL, EOS),
    "contrastive_scratch": (CONTRASTIVE_SCRATCH, EOS),
    "pretrained_mean_pool": (PRETRAINED_MODEL, MEAN),
}
METHODS = (*EMBEDDERS, HANDCRAFTED, MAJORITY)


class ProbeEvalConfig(dg.Config):
    batch_size: int = 32  # chunks per forward pass
    seq_len: int = PROBE_SEQ_LEN  # tokens per 300-note chunk (Aria's probes); capped at the model's context
    device: str | None = None  # None: cuda when available, else cpu
    exclude_feature_blocks: list[str] | None = None  # handcrafted; None: velocity for demo-corpus labels, else none
    epochs: int = ProbeConfig.epochs  # Aria's evaluate_embeddings.sh: 50
    seed: int = ProbeConfig.seed


@dg.asset(
    name=ASSET_NAME,
    group_name="evaluation",
    kinds={"pytorch", "mlflow", "parquet"},
    deps=[dg.AssetKey(PROBE_DATASET), dg.AssetKey(CONTRASTIVE_MODEL), dg.AssetKey(CONTRASTIVE_SCRATCH),
          dg.AssetKey(PRETRAINED_MODEL), dg.AssetKey("midi_notes")],
    pool="gpu",  # embeds with the models: one GPU step at a time
)
def probe_eval(context: dg.AssetExecutionContext, config: ProbeEvalConfig, home: AriaHome,
               mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Linear probes of every method on every task; the results table, per-class metrics and the
    best method's confusion matrix per task as metadata and in MLflow."""
    from aria_model.probe import confusion_figure, per_class_table, write_results
    from aria_model.probe_eval import best_per_task, probe_methods, result_rows

    dataset = read_probe_dataset(probe_path(home))
    labels = latest_metadata(context, PROBE_DATASET).get("labels")
    models = {method: _model_lineage(context, asset) for method, (asset, _) in EMBEDDERS.items()}
    out = home.asset_dir(ASSET_NAME)
    with mlflow.asset_run(context) as run_id:
        features, timings = _features(context, config, home, dataset, models, out)
        covered = set.intersection(*(set(vectors) for vectors in features.values()))
        missing = sorted(set(dataset.table["file_id"].to_pylist()) - covered)
        if missing:
            context.log.warning(f"{len(missing)} probe files have no features (unreadable or no notes): left out")
            dataset = ProbeDataset(dataset.table.filter(pc.field("file_id").isin(sorted(covered))), dataset.reports)
        exclude = config.exclude_feature_blocks
        if exclude is None:
            exclude = ["velocity"] if labels == DEMO_LABELS else []
        results = probe_methods(dataset, features, list(EMBEDDERS), feature_columns(exclude=exclude),
                                epochs=config.epochs, seed=config.seed)
        results_path = write_results(results, home.root)
        per_class_path = out / "per_class.parquet"
        write_parquet_atomic(per_class_table(results), per_class_path)
        confusion_dir = _write_confusions(results, out / "confusion")
        best = best_per_task(results)
        _log_to_mlflow(mlflow, run_id, results, results_path, per_class_path, confusion_dir, models, dataset)
    for result in results:
        context.log.info(f"{result.task:12s} {result.method:22s} accuracy {result.accuracy:.3f}  "
                         f"macro-F1 {result.macro_f1:.3f}  (train {result.n_train}, test {result.n_test})")
    figures = {f"confusion_{task}": figure_markdown(confusion_figure(result), f"{task}: {result.method}")
               for task, result in best.items()}
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(results),
        "path": dg.MetadataValue.path(str(results_path)),
        "results": dg.MetadataValue.md(markdown_table(result_rows(results))),
        "per_class": dg.MetadataValue.md(markdown_table(_per_class_rows(results))),
        "best": dg.MetadataValue.json({task: result.method for task, result in best.items()}),
        **figures,
        "probe_dataset_hash": dataset.content_hash,
        "files_without_features": len(missing),
        "handcrafted_excluded_blocks": ", ".join(exclude) or "none",
        "models": dg.MetadataValue.json(models),
        "embedding": dg.MetadataValue.json(timings),
        **mlflow.run_metadata(run_id),
    })


def _model_lineage(context: dg.AssetExecutionContext, asset: str) -> dict:
    """What a method's features come from: the asset's latest weights, steps and MLflow run."""
    reported = latest_metadata(context, asset)
    weights = reported.get("weights")
    if not weights or not Path(weights).is_file():
        raise dg.Failure(f"{asset}'s latest weights {weights!r} are gone: rematerialize it")
    return {"asset": asset, "weights": weights, "steps": reported.get("steps"), "preset": reported.get("preset"),
            "mlflow_run_id": reported.get("mlflow_run_id"), "model_version": reported.get("model_version")}


def _features(context: dg.AssetExecutionContext, config: ProbeEvalConfig, home: AriaHome, dataset: ProbeDataset,
              models: dict[str, dict], out: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict]]:
    """{method: {file_id: vector}} for every method with features, each also written as Parquet;
    and per method, how it was embedded and how long it took."""
    import torch

    from aria_model.embedding import write_embeddings_parquet
    from aria_model.probe_eval import Embedder, handcrafted_embeddings, model_features

    notes_dir = home.root / "midi_notes"
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    features, timings = {}, {}
    for method, (asset, pooling) in EMBEDDERS.items():
        weights = models[method]["weights"]
        context.log.info(f"{method}: {len(dataset.paths())} files through {asset} ({weights}) on {device}, "
                         f"{pooling} pooling, 300-note chunks of at most {config.seq_len} tokens")
        computed = model_features(Embedder(method, weights, pooling), dataset, notes_dir, device=device,
                                  batch_size=config.batch_size, seq_len=config.seq_len,
                                  progress=progress_logger(context, 100))
        write_embeddings_parquet(computed.embeddings, out / "embeddings" / f"{method}.parquet", key_column="file_id")
        features[method], timings[method] = computed.embeddings.by_key(), computed.timing
    started = time.perf_counter()
    handcrafted = handcrafted_embeddings(dataset, notes_dir)
    write_embeddings_parquet(handcrafted, out / "embeddings" / f"{HANDCRAFTED}.parquet", key_column="file_id")
    features[HANDCRAFTED] = handcrafted.by_key()
    timings[HANDCRAFTED] = {"seconds": round(time.perf_counter() - started, 2)}
    return features, timings


def _write_confusions(results: list["ProbeResult"], folder: Path) -> Path:
    """One PNG per (task, method); PNGs of an earlier run's other tasks are removed."""
    from aria_model.probe import plot_confusion

    written = {plot_confusion(result, folder / f"{result.task}__{result.method}.png") for result in results}
    for stale in set(folder.glob("*.png")) - written:
        stale.unlink()
    return folder


def _log_to_mlflow(mlflow: MlflowTracking, run_id: str, results: list["ProbeResult"], results_path: Path,
                   per_class_path: Path, confusion_dir: Path, models: dict[str, dict], dataset: ProbeDataset) -> None:
    """Metrics per (task, method), the lineage as params, the tables and the PNGs as artifacts."""
    from aria_model.probe import RESULT_COLUMNS

    tracker = mlflow.tracker()
    summary: dict[str, float | str] = {}
    for result in results:
        summary[f"{result.task}/{result.method}/accuracy"] = result.accuracy
        summary[f"{result.task}/{result.method}/macro_f1"] = result.macro_f1
    summary["probe_dataset.content_hash"] = dataset.content_hash
    for method, model in models.items():
        summary[f"{method}.mlflow_run_id"] = str(model["mlflow_run_id"])
        summary[f"{method}.weights"] = str(model["weights"])
    tracker.log_summary(run_id, summary)
    from aria_model.probe_eval import result_rows

    client = tracker.client
    rows = result_rows(results)
    client.log_table(run_id, {column: [row[column] for row in rows] for column in RESULT_COLUMNS}, "probe_results.json")
    client.log_text(run_id, markdown_table(rows), "probe_results.md")
    client.log_artifact(run_id, str(results_path))
    client.log_artifact(run_id, str(per_class_path))
    client.log_artifacts(run_id, str(confusion_dir), "confusion")


def _per_class_rows(results: list["ProbeResult"]) -> list[dict]:
    return [{"task": r.task, "method": r.method, "class": row["class"], "support": row["support"],
             "precision": round(row["precision"], 3), "recall": round(row["recall"], 3), "f1": round(row["f1"], 3)}
            for r in results for row in r.per_class]


@dg.asset_check(asset=probe_eval, blocking=True)
def every_method_on_every_task(home: AriaHome) -> dg.AssetCheckResult:
    """results.parquet has one row per (task, method) of every task in the probe dataset, with
    metrics in [0, 1] and a non-empty test split."""
    table = pq.read_table(home.root / ASSET_NAME / "results.parquet")
    tasks = set(read_probe_dataset(probe_path(home)).tasks)
    rows = table.to_pylist()
    present = {(row["task"], row["method"]) for row in rows}
    expected = {(task, method) for task in tasks for method in METHODS}
    bad = [f"{row['task']}/{row['method']}" for row in rows  # NaN fails the range test too
           if not (0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0 and row["n_test"] > 0)]
    return dg.AssetCheckResult(
        passed=present == expected and not bad and len(rows) == len(expected),
        metadata={"missing": ", ".join(sorted(f"{t}/{m}" for t, m in expected - present)) or "none",
                  "unexpected": ", ".join(sorted(f"{t}/{m}" for t, m in present - expected)) or "none",
                  "out_of_range": ", ".join(bad) or "none"})


@dg.asset_check(asset=probe_eval)
def scratch_baseline_trained_as_long(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The from-scratch baseline had the same preset and as many steps as the fine-tuned model it
    is compared with (otherwise the table compares schedules, not pretraining)."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(ASSET_NAME))
    models = event.asset_materialization.metadata["models"].value
    finetuned, scratch = models["aria_contrastive"], models["contrastive_scratch"]
    same = (finetuned["steps"], finetuned["preset"]) == (scratch["steps"], scratch["preset"])
    return dg.AssetCheckResult(passed=same, severity=dg.AssetCheckSeverity.WARN, metadata={
        "aria_contrastive": f"{finetuned['preset']}, {finetuned['steps']} steps",
        "contrastive_scratch": f"{scratch['preset']}, {scratch['steps']} steps"})
