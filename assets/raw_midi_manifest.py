"""raw_midi_manifest: one row per MIDI file of the source, identified by content sha256."""


import re

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aria_model.atomic_io import write_parquet_atomic
from aria_model.sources import build_manifest_for_sources
from assets.demo_corpus import demo_corpus
from assets.metadata import markdown_table, peak_rss_metadata
from pipelines.resources import AriaHome, MidiSource

MANIFEST_FILE = "manifest.parquet"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def manifest_path(home: AriaHome):
    return home.asset_dir("raw_midi_manifest") / MANIFEST_FILE


@dg.asset(group_name="ingest", kinds={"python", "parquet"}, deps=[demo_corpus])
def raw_midi_manifest(context: dg.AssetExecutionContext, home: AriaHome, source: MidiSource) -> dg.MaterializeResult:
    """Walk the source folders (Aria-MIDI, MAESTRO, plain trees, or the demo corpus) into one manifest.

    Incremental: files whose (path, size, mtime) match the previous manifest
    keep their sha256 without being read again; adding a folder to the source
    list only reads that folder's files.
    """
    folders = source.folders or [home.asset_dir("demo_corpus")]
    path = manifest_path(home)
    previous = pq.read_table(path) if path.exists() else None
    result = build_manifest_for_sources(folders, previous=previous, layout=source.layout)
    write_parquet_atomic(result.table, path)
    stats = result.stats
    context.log.info(f"{stats.files_seen} files: {stats.files_hashed} hashed, {stats.files_reused} reused")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.table.num_rows,
            "path": dg.MetadataValue.path(str(path)),
            "sources": dg.MetadataValue.md("\n".join(f"- `{folder}`" for folder in folders)),
            "layout": result.layout,
            "unique_contents": len(set(result.table["file_id"].to_pylist())),
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.as_dict().items()},
            "by_collection_or_composer": dg.MetadataValue.md(markdown_table(_label_counts(result.table))),
            **peak_rss_metadata(),
        }
    )


def _label_counts(table) -> list[dict]:
    label = pc.coalesce(table["collection"], table["composer"], "(none)")
    counts = pc.value_counts(label).to_pylist()
    return sorted(({"label": c["values"], "files": c["counts"]} for c in counts), key=lambda r: -r["files"])[:20]


@dg.asset_check(asset=raw_midi_manifest, blocking=True)
def manifest_ids_are_sha256(home: AriaHome) -> dg.AssetCheckResult:
    """Every row has a sha256 file_id and a unique path."""
    table = pq.read_table(manifest_path(home), columns=["file_id", "path"])
    bad_ids = sum(1 for fid in table["file_id"].to_pylist() if not _SHA256_HEX.match(fid))
    duplicate_paths = table.num_rows - len(set(table["path"].to_pylist()))
    return dg.AssetCheckResult(
        passed=bad_ids == 0 and duplicate_paths == 0 and table.num_rows > 0,
        metadata={"rows": table.num_rows, "bad_file_ids": bad_ids, "duplicate_paths": duplicate_paths},
    )
