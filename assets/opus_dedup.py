"""opus_dedup: piece clusters (exact copies, opus keys, MinHash near-duplicates), capped per piece."""


import dataclasses
import json
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from aria_model.atomic_io import write_parquet_atomic
from aria_model.dedup import BATCH_ROWS, REASONS, SIGNALS, DedupConfig, DedupStats, NoteParts, deduplicate
from aria_model.notes_table import part_files
from aria_model.sql import run_sql
from assets.metadata import markdown_table, peak_rss_metadata
from assets.raw_midi_manifest import manifest_path, raw_midi_manifest
from pipelines.resources import AriaHome

DEDUP_FILE = "dedup.parquet"
CONFIG_KEY = b"aria.dedup_config"  # Parquet key-value metadata: the DedupConfig the table was made with


class OpusDedupConfig(dg.Config):
    """A DedupConfig preset, with any of its knobs overridden (None keeps the preset's value)."""

    preset: str = "pruned"  # pruned | deduped | metadata_only
    max_per_cluster: int | None = None
    use_opus_key: bool | None = None
    use_content: bool | None = None
    threshold: float | None = None
    num_perm: int | None = None
    ngram: int | None = None
    chord_ms: int | None = None
    min_shingles: int | None = None
    batch_rows: int = BATCH_ROWS  # notes rows of one worker task; only signatures outlive a batch
    workers: int | None = None  # processes reading notes and computing signatures; None: all cores


def dedup_config(config: OpusDedupConfig) -> DedupConfig:
    knobs = {knob.name for knob in dataclasses.fields(DedupConfig)}
    overrides = {name: value for name, value in config.model_dump().items() if name in knobs and value is not None}
    return dataclasses.replace(DedupConfig.preset(config.preset), **overrides)


def dedup_path(home: AriaHome) -> Path:
    return home.asset_dir("opus_dedup") / DEDUP_FILE


@dg.asset(group_name="curation", kinds={"python", "parquet"}, deps=[raw_midi_manifest, dg.AssetKey("midi_notes")])
def opus_dedup(context: dg.AssetExecutionContext, config: OpusDedupConfig, home: AriaHome) -> dg.MaterializeResult:
    """Cluster the current manifest's parsed files into pieces; keep at most max_per_cluster each.

    Reads only the notes of files in the current manifest (quarantined files have none).
    One row per file: cluster_id, rank, kept, reason, linked_by (aria_model.dedup.DEDUP_SCHEMA).
    """
    settings = dedup_config(config)
    metadata = run_sql("dedup_metadata", {"manifest": str(manifest_path(home))})
    notes = _current_notes(home, metadata.column("file_id"), config.batch_rows)
    result = deduplicate(notes, metadata, settings, workers=config.workers)
    path = dedup_path(home)
    write_parquet_atomic(result.table.replace_schema_metadata({CONFIG_KEY: json.dumps(settings.as_dict())}), path)
    stats = result.stats
    context.log.info(
        f"{stats.files} files in {stats.clusters} multi-file clusters: kept {stats.kept}, dropped {stats.dropped} "
        f"({stats.drops_by_reason}) in {stats.seconds:.1f} s on {stats.workers} worker(s)"
    )
    return dg.MaterializeResult(metadata={
        "dagster/row_count": stats.files,
        "path": dg.MetadataValue.path(str(path)),
        **_counts(stats),
        "drops_by_reason": dg.MetadataValue.md(markdown_table(_reason_rows(stats))),
        "drops_by_signal": dg.MetadataValue.md(markdown_table(_signal_rows(stats))),
        "largest_clusters": dg.MetadataValue.md(markdown_table(_cluster_rows(stats))),
        **_timings(stats),
        "config": dg.MetadataValue.json(settings.as_dict()),
        **peak_rss_metadata(),
    })


def _current_notes(home: AriaHome, file_ids: pa.ChunkedArray, batch_rows: int) -> NoteParts:
    """The midi_notes rows of ``file_ids``, for the dedup workers to read a few row groups at a time."""
    parts = [str(part) for part in part_files(home.asset_dir("midi_notes"))]
    return NoteParts(parts, file_ids, batch_rows)


def _counts(stats: DedupStats) -> dict[str, int]:
    return {
        "kept": stats.kept,
        "dropped": stats.dropped,
        "clusters": stats.clusters,  # of two or more files
        "largest_cluster": stats.largest_cluster,
        "unique_contents": stats.unique_contents,
        "signatures": stats.signatures,
        "contents_without_signature": stats.without_signature,
        "files_with_opus_key": stats.opus_keys,
        "lsh_candidate_pairs": stats.candidate_pairs,
        "verified_pairs": stats.verified_pairs,
    }


def _reason_rows(stats: DedupStats) -> list[dict]:
    return [{"reason": reason, "files": stats.drops_by_reason.get(reason, 0)} for reason in REASONS if reason != "kept"]


def _signal_rows(stats: DedupStats) -> list[dict]:
    return [
        {"signal": signal, "dropped files": stats.drops_by_signal.get(signal, 0),
         "linked files": stats.links_by_signal.get(signal, 0)}
        for signal in SIGNALS
    ]


def _cluster_rows(stats: DedupStats) -> list[dict]:
    return [
        {"cluster": cluster["cluster_id"][:12], "files": cluster["files"], "kept": cluster["kept"],
         "composer": cluster["composer"] or "", "title": cluster["title"] or "",
         "linked by": ", ".join(f"{signal} {count}" for signal, count in cluster["linked_by"].items())}
        for cluster in stats.largest_clusters
    ]


def _timings(stats: DedupStats) -> dict[str, float]:
    return {  # stages in CPU seconds (the workers' added up), the whole in wall seconds
        "seconds": round(stats.seconds, 3),
        "workers": stats.workers,
        "files_per_s": round(stats.files_per_s, 1),
        "read_seconds": round(stats.read_seconds, 3),
        "signature_seconds": round(stats.signature_seconds, 3),
        "lsh_seconds": round(stats.lsh_seconds, 3),
        "cluster_seconds": round(stats.cluster_seconds, 3),
        "signatures_per_s": round(stats.signatures_per_s, 1),
        "lsh_signatures_per_s": round(stats.lsh_signatures_per_s, 1),
    }


@dg.asset_check(asset=opus_dedup, blocking=True)
def dedup_keeps_at_most_the_cap(home: AriaHome) -> dg.AssetCheckResult:
    """No piece cluster keeps more files than the cap the table was written with, and none keeps zero."""
    path = dedup_path(home)
    cap = json.loads(pq.read_schema(path).metadata[CONFIG_KEY])["max_per_cluster"]
    counts = run_sql("dedup_cluster_caps", {"dedup": str(path), "cap": cap}).to_pylist()[0]
    return dg.AssetCheckResult(
        passed=counts["over_cap"] == 0 and counts["none_kept"] == 0, metadata={"cap": cap, **counts}
    )


@dg.asset_check(asset=opus_dedup, blocking=True)
def dedup_has_one_row_per_parsed_file(home: AriaHome) -> dg.AssetCheckResult:
    """Every current manifest file that has notes has exactly one row, and nothing else has one."""
    parts = [str(part) for part in part_files(home.asset_dir("midi_notes"))]
    if not parts:
        rows = pq.read_metadata(dedup_path(home)).num_rows
        return dg.AssetCheckResult(passed=rows == 0, metadata={"expected_files": 0, "unexpected": rows})
    counts = run_sql(
        "dedup_coverage", {"manifest": str(manifest_path(home)), "notes": parts, "dedup": str(dedup_path(home))}
    ).to_pylist()[0]
    passed = counts["missing"] == 0 and counts["repeated"] == 0 and counts["unexpected"] == 0
    return dg.AssetCheckResult(passed=passed, metadata=counts)
