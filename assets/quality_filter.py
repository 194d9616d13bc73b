"""quality_filter: Aria's quality rules (aria_model.quality) over the notes of the current manifest.

Incremental: a file's row depends only on its notes (its file_id is their content hash) and on the
rules, so rows of the previous ``quality.parquet`` written under the same rules hash (the resolved
QualityConfig, the engine, the rule SQL and kernels, aria_model.quality and the notes parser
version; kept in the Parquet metadata) are reused, and only file_ids without one are evaluated,
reading only the midi_notes parts that hold them. Files no longer in the manifest drop out.
``rebuild: true`` evaluates all. ``engine``: the compiled kernels (default) or DuckDB's queries,
the reference they equal bit for bit.
"""


import dataclasses
import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aria_model import duckdb_entropy, quality_compiled, quality_kernels
from aria_model import quality as quality_rules
from aria_model.atomic_io import write_parquet_atomic
from aria_model.notes_table import PARSER_VERSION, part_files
from aria_model.quality import RULES, QualityConfig, evaluate_quality
from aria_model.sql import SQL_DIR, run_sql
from assets.metadata import markdown_table, peak_rss_metadata
from assets.raw_midi_manifest import manifest_path
from pipelines.resources import AriaHome

QUALITY_FILE = "quality.parquet"
QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]
RULES_HASH_KEY = b"aria.quality_rules_hash"  # Parquet key-value metadata of quality.parquet


class QualityFilterConfig(dg.Config):
    # aria (Aria's Dec-2024 rules) | scores | light | off; None: scores for the demo corpus, else aria
    preset: str | None = None
    disabled_rules: list[str] = []  # rules to switch off on top of the preset
    rebuild: bool = False  # evaluate every file, even those the previous table holds under the same rules
    workers: int | None = None  # batches evaluated at once (compiled: threads; DuckDB: processes, one thread each); None: all cores
    engine: str = "compiled"  # compiled (numba kernels) | duckdb (the rules' SQL: the reference, 5-7x slower)


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
    path = quality_path(home)
    digest = rules_hash(rules, config.engine)
    parts = part_files(home.asset_dir("midi_notes"))
    started = time.perf_counter()
    reused, mode = (None, "full: rebuild requested") if config.rebuild else previous_rows(path, digest, file_ids)
    evaluated = _evaluate_missing(parts, rules, file_ids, reused, config.workers, config.engine)
    if reused is not None and evaluated is not None and not _same_columns(reused, evaluated):
        reused, mode = None, "full: the previous table has other columns"
        evaluated = _evaluate_missing(parts, rules, file_ids, None, config.workers, config.engine)
    seconds = time.perf_counter() - started
    table = pa.concat_tables([t for t in (reused, evaluated) if t is not None]).sort_by("file_id")
    table = table.combine_chunks().replace_schema_metadata({RULES_HASH_KEY: digest.encode()})
    write_parquet_atomic(table, path)
    n_evaluated = evaluated.num_rows if evaluated is not None else 0
    notes = (pc.sum(evaluated["n_notes"]).as_py() or 0) if n_evaluated else 0
    passed = pc.sum(table["passed"]).as_py() or 0
    context.log.info(f"{passed}/{table.num_rows} files pass; {n_evaluated} evaluated ({notes} notes in "
                     f"{seconds:.1f} s), {table.num_rows - n_evaluated} reused ({mode})")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": table.num_rows,
        "passed": passed,
        "pass_rate": round(passed / max(table.num_rows, 1), 4),
        "preset": preset,
        "engine": config.engine,
        "evaluated": n_evaluated,
        "reused": table.num_rows - n_evaluated,
        "reuse_mode": mode,
        "rules_hash": digest,
        "failures_by_rule": dg.MetadataValue.md(markdown_table(_failures_by_rule(path, rules))),
        "metric_quantiles": dg.MetadataValue.md(markdown_table(_metric_quantiles(path))),
        "seconds": round(seconds, 2),
        "notes_per_s": round(notes / seconds) if seconds else 0,  # of the evaluated files
        "files_per_s": round(n_evaluated / seconds, 1) if seconds else 0.0,
        "path": dg.MetadataValue.path(str(path)),
        **peak_rss_metadata(),
    })


def rules_hash(rules: QualityConfig, engine: str = "compiled") -> str:
    """What a file's row depends on besides its notes: the thresholds, the engine, the rules' SQL and
    kernels, and the notes parser version. Any change re-evaluates every file once (so does a switch
    of engine, although both give the same rows: a table then always holds one engine's)."""
    digest = hashlib.sha256()
    config = dataclasses.asdict(rules)
    digest.update(json.dumps(config, sort_keys=True, default=sorted).encode())  # default: the enabled frozenset
    digest.update(f"parser {PARSER_VERSION} engine {engine}".encode())
    modules = (quality_rules, quality_compiled, quality_kernels, duckdb_entropy)
    for code in [*sorted(SQL_DIR.glob("quality_*.sql")), *(Path(module.__file__) for module in modules)]:
        digest.update(code.name.encode() + b"\0" + code.read_bytes() + b"\0")
    return digest.hexdigest()


def previous_rows(path: Path, digest: str, file_ids: list[str]) -> tuple[pa.Table | None, str]:
    """Rows of the previous table for files still in the manifest, if it was written under ``digest``."""
    if not path.exists():
        return None, "full: no previous table"
    previous = (pq.read_schema(path).metadata or {}).get(RULES_HASH_KEY)
    if previous != digest.encode():
        return None, "full: the rules changed" if previous else "full: the previous table records no rules hash"
    table = _arrow_list_names(pq.read_table(path).replace_schema_metadata(None))
    kept = table.filter(pc.is_in(table["file_id"], value_set=pa.array(file_ids, pa.string())))
    return kept, f"incremental: {table.num_rows - kept.num_rows} rows of files no longer listed dropped"


def _evaluate_missing(parts: list[Path], rules: QualityConfig, file_ids: list[str],
                      reused: pa.Table | None, workers: int | None, engine: str) -> pa.Table | None:
    """Evaluate the files without a reused row, reading only the parts that hold them (None: nothing to do)."""
    if reused is None:
        return evaluate_quality(parts, rules, file_ids=file_ids, workers=workers, engine=engine)
    missing = set(file_ids) - set(reused["file_id"].to_pylist())
    holding = _parts_holding(parts, missing) if missing else []
    if not holding:
        return None
    return evaluate_quality(holding, rules, file_ids=sorted(missing), workers=workers, engine=engine)


def _parts_holding(parts: list[Path], file_ids: set[str]) -> list[Path]:
    """The midi_notes parts with a row of one of ``file_ids`` (files in none were quarantined)."""
    wanted = pa.array(sorted(file_ids), pa.string())
    return [part for part in parts
            if pc.any(pc.is_in(pq.read_table(part, columns=["file_id"])["file_id"], value_set=wanted)).as_py()]


def _arrow_list_names(table: pa.Table) -> pa.Table:
    """Parquet hands lists back as ``list<element>``; evaluate_quality makes ``list<item>``. One naming
    keeps reused and fresh rows one schema, and an unchanged rerun's file byte-identical."""
    fields = [pa.field(f.name, pa.list_(f.type.value_type), f.nullable) if pa.types.is_list(f.type) else f
              for f in table.schema]
    return table.cast(pa.schema(fields))


def _same_columns(reused: pa.Table, evaluated: pa.Table) -> bool:
    return reused.schema.remove_metadata().equals(evaluated.schema.remove_metadata())


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
