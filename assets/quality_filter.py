"""quality_filter: Aria's quality rules (aria_model.quality) over the notes of the current manifest."""


import time
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aria_model.atomic_io import write_parquet_atomic
from aria_model.notes_table import part_files
from aria_model.quality import RULES, QualityConfig, evaluate_quality
from aria_model.sql import run_sql
from assets.metadata import markdown_table
from assets.raw_midi_manifest import manifest_path
from pipelines.resources import AriaHome

QUALITY_FILE = "quality.parquet"
QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]


class QualityFilterConfig(dg.Config):
    # aria (Aria's Dec-2024 rules) | scores | light | off; None: scores for the demo corpus, else aria
    preset: str | None = None
    disabled_rules: list[str] = []  # rules to switch off on top of the preset


class PassRateBounds(dg.Config):
    min_pass_rate: float = 0.05  # below this, suspect a broken rule or the wrong corpus
    max_pass_rate: float = 1.0


def quality_path(home: AriaHome) -> Path:
    return home.asset_dir("quality_filter") / QUALITY_FILE


def default_preset(sources: list[str]) -> str:
    """Aria's rules for performances; the score preset when every file is from the demo corpus."""
    return "scores" if sources == ["demo"] else "aria"


@dg.asset(
    group_name="curation",
    deps=[dg.AssetKey("opus_dedup"), dg.AssetKey("midi_notes"), dg.AssetKey("raw_midi_manifest")],
    kinds={"duckdb", "parquet"},
)
def quality_filter(
    context: dg.AssetExecutionContext, config: QualityFilterConfig, home: AriaHome
) -> dg.MaterializeResult:
    """Per file of the current manifest with parsed notes: passed, failed_rules and every metric."""
    manifest = pq.read_table(manifest_path(home), columns=["file_id", "source"])
    preset = config.preset or default_preset(manifest["source"].unique().to_pylist())
    rules = QualityConfig.preset(preset).without(*config.disabled_rules)
    file_ids = manifest["file_id"].unique().to_pylist()
    started = time.perf_counter()
    table = evaluate_quality(part_files(home.asset_dir("midi_notes")), rules, file_ids=file_ids)
    seconds = time.perf_counter() - started
    path = quality_path(home)
    write_parquet_atomic(table, path)
    notes = pc.sum(table["n_notes"]).as_py() or 0
    passed = pc.sum(table["passed"]).as_py() or 0
    context.log.info(f"{passed}/{table.num_rows} files pass ({notes} notes in {seconds:.1f} s)")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": table.num_rows,
        "passed": passed,
        "pass_rate": round(passed / max(table.num_rows, 1), 4),
        "preset": preset,
        "failures_by_rule": dg.MetadataValue.md(markdown_table(_failures_by_rule(path, rules))),
        "metric_quantiles": dg.MetadataValue.md(markdown_table(_metric_quantiles(path))),
        "seconds": round(seconds, 2),
        "notes_per_s": round(notes / seconds) if seconds else 0,
        "files_per_s": round(table.num_rows / seconds, 1) if seconds else 0.0,
        "path": dg.MetadataValue.path(str(path)),
    })


def _failures_by_rule(path: Path, rules: QualityConfig) -> list[dict]:
    counts = run_sql("quality_failures_by_rule", {"quality": str(path)}).to_pylist()
    failing = {row["rule"]: row["files"] for row in counts}
    return [{"rule": rule, "enabled": rule in rules.enabled, "files_failing": failing.get(rule, 0)} for rule in RULES]


def _metric_quantiles(path: Path) -> list[dict]:
    rows = run_sql("quality_metric_quantiles", {"quality": str(path), "quantiles": QUANTILES}).to_pylist()
    return [
        {"metric": row["metric"], "min": _short(row["min"]),
         **{f"p{round(q * 100)}": _short(v) for q, v in zip(QUANTILES, row["quantiles"] or [None] * len(QUANTILES))},
         "max": _short(row["max"])}
        for row in rows
    ]


def _short(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dg.asset_check(asset=quality_filter)
def quality_pass_rate_in_bounds(config: PassRateBounds, home: AriaHome) -> dg.AssetCheckResult:
    """Warn when the share of passing files leaves [min_pass_rate, max_pass_rate]."""
    passed = pq.read_table(quality_path(home), columns=["passed"])["passed"]
    rate = (pc.sum(passed).as_py() or 0) / max(len(passed), 1)
    return dg.AssetCheckResult(
        passed=config.min_pass_rate <= rate <= config.max_pass_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"pass_rate": round(rate, 4), "min": config.min_pass_rate, "max": config.max_pass_rate},
    )


@dg.asset_check(asset=quality_filter, blocking=True)
def quality_metrics_not_null(home: AriaHome) -> dg.AssetCheckResult:
    """Every file with notes has every metric, a verdict and its list of failed rules."""
    table = pq.read_table(quality_path(home))
    with_notes = table.filter(pc.greater(table["n_notes"], 0))
    nulls = {name: with_notes[name].null_count for name in with_notes.column_names if with_notes[name].null_count}
    return dg.AssetCheckResult(
        passed=not nulls,
        metadata={"files_with_notes": with_notes.num_rows, "columns_with_nulls": dg.MetadataValue.json(nulls)},
    )
