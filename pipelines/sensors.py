"""Watching the MIDI source: the ``new_midi_files`` sensor and the checks that say whether the
token shards and the trained model cover the newest source file.

The sensor lists the source folders (``MidiSource``: ``$ARIA_SOURCE``) every
``ARIA_SENSOR_INTERVAL_S`` seconds (default 60), without reading any file:

- its cursor is a digest of every (path, size, mtime) it listed; an unchanged listing ends the tick;
- otherwise the new or changed files are those whose (path, size, mtime) the last ingest's
  manifest does not hold; if there are any it requests an ``ingest`` run whose run key is the
  digest of those files (asking twice for the same files launches one run) and tagged with their
  count. The ingest steps are incremental, so that run reads and parses only those files;
- a deleted file starts nothing: the next ingest drops it from the manifest.

Nothing is watched while the source is the demo corpus (no ``ARIA_SOURCE``). Like the schedule,
the sensor is STOPPED until it is turned on in the UI (Automation -> new_midi_files).

``token_shards_cover_source`` and ``pretrained_model_covers_source`` pass when the asset was
materialized after the newest source file was modified. They run after their asset in every job,
and the sensor reports them failed (severity WARN) as soon as it sees files that no ingest has
read, so the asset page shows that the shards and the model are behind the source.
"""

import hashlib
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from aria_model.sources import SourceError, iter_midi_files
from assets.raw_midi_manifest import manifest_path
from pipelines.jobs import ingest_job
from pipelines.resources import AriaHome, MidiSource

SENSOR_INTERVAL_S = int(os.environ.get("ARIA_SENSOR_INTERVAL_S", "60"))
NEW_FILES_TAG = "aria/new_midi_files"
# The checks of the assets whose coverage of the source matters: the shards the trainers read, and the model.
COVERAGE_CHECKS = {"token_shards": "token_shards_cover_source", "pretrained_model": "pretrained_model_covers_source"}
NEWER_FILES_SHOWN = 5  # examples of uncovered files in a check's metadata

Listing = dict[str, tuple[int, int]]  # absolute path -> (size_bytes, mtime_ns)


def list_source(folders: Iterable[Path], layout: str | None = None) -> Listing:
    """(size, mtime) of every MIDI file the manifest would hold, by absolute path; reads no file
    but the layouts' metadata indexes. Raises SourceError for a missing or empty folder."""
    return {record.path: (record.size_bytes, record.mtime_ns)
            for folder in folders for record in iter_midi_files(folder, layout)}


def listing_digest(listing: Listing) -> str:
    digest = hashlib.sha256()
    for path in sorted(listing):
        size, mtime = listing[path]
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def not_ingested(listing: Listing, home: AriaHome) -> Listing:
    """The files of ``listing`` whose (path, size, mtime) the last ingest's manifest does not hold."""
    path = manifest_path(home)
    if not path.exists():
        return dict(listing)
    manifest = pq.read_table(path, columns=["path", "size_bytes", "mtime_ns"]).to_pydict()
    ingested = set(zip(manifest["path"], manifest["size_bytes"], manifest["mtime_ns"]))
    return {p: stat for p, stat in listing.items() if (p, *stat) not in ingested}


def coverage(instance: dg.DagsterInstance, asset_name: str, listing: Listing) -> tuple[bool, dict]:
    """Whether ``asset_name``'s latest materialization is newer than every file of ``listing``,
    and metadata saying by how much it is not."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset_name))
    materialized_ns = int(event.timestamp * 1e9) if event else None
    newer = sorted((p for p, (_, mtime) in listing.items() if materialized_ns is None or mtime > materialized_ns),
                   key=lambda p: -listing[p][1])
    newest = max(listing, key=lambda p: listing[p][1]) if listing else None
    metadata = {
        "source_files": len(listing),
        "newer_source_files": len(newer),
        "newest_source_file": newest or "",
        "materialized": "never" if event is None else _iso(event.timestamp),
    }
    if newer:
        metadata["examples"] = _examples(newer)
    return not newer, metadata


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _examples(paths: list[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md("\n".join(f"- `{p}`" for p in paths[:NEWER_FILES_SHOWN]))


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Runs `ingest` when MIDI files are added to or changed in the source folder(s).",
)
def new_midi_files(context: dg.SensorEvaluationContext, home: AriaHome, source: MidiSource):
    if not source.folders:
        return dg.SkipReason("the source is the demo corpus; set ARIA_SOURCE to a MIDI folder to watch it")
    try:
        listing = list_source(source.folders, source.layout)
    except SourceError as exc:
        return dg.SkipReason(f"cannot list the source: {exc}")
    digest = listing_digest(listing)
    if digest == context.cursor:
        return dg.SkipReason(f"no new or changed MIDI files among {len(listing)}")
    new = not_ingested(listing, home)
    if not new:
        return dg.SensorResult(skip_reason=f"the listing changed, but all {len(listing)} files are ingested",
                               cursor=digest)
    context.log.info(f"{len(new)} new or changed MIDI files, e.g. {next(iter(sorted(new)))}")
    behind = {"not_ingested_files": len(new), "examples": _examples(sorted(new))}
    stale = [dg.AssetCheckEvaluation(asset_key=dg.AssetKey(asset), check_name=check, passed=False,
                                     severity=dg.AssetCheckSeverity.WARN, metadata=behind)
             for asset, check in COVERAGE_CHECKS.items()]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"new-midi-{listing_digest(new)[:24]}",
                                    tags={NEW_FILES_TAG: str(len(new))})],
        cursor=digest,
        asset_events=stale,
    )


def _coverage_check(asset_name: str, check_name: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset_name, name=check_name,
                    description=f"{asset_name} was materialized after the newest source file was modified.")
    def check(context: dg.AssetCheckExecutionContext, home: AriaHome, source: MidiSource) -> dg.AssetCheckResult:
        # The demo corpus is the source when none is set, as for raw_midi_manifest.
        folders = source.folders or [home.root / "demo_corpus"]
        try:
            listing = list_source(folders, source.layout)
        except SourceError as exc:
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                       metadata={"error": str(exc)})
        passed, metadata = coverage(context.instance, asset_name, listing)
        return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.WARN, metadata=metadata)

    return check


SOURCE_CHECKS = [_coverage_check(asset, check) for asset, check in COVERAGE_CHECKS.items()]
SENSORS = [new_midi_files]
