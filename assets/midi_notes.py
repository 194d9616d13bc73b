"""midi_notes + midi_quarantine: parse every new manifest file with Aria's MIDI semantics."""


import dagster as dg
import pyarrow.parquet as pq

from aria_model.notes_table import ParseLimits, part_files, update_notes_tables
from aria_model.sql import run_sql
from assets.metadata import markdown_table, peak_rss_metadata, progress_logger
from assets.raw_midi_manifest import manifest_path, raw_midi_manifest
from pipelines.resources import AriaHome

# The quarantine check warns when more of the current manifest than this is unusable.
MAX_QUARANTINE_SHARE = 0.2


class MidiNotesConfig(dg.Config):
    workers: int | None = None  # None: all cores
    max_notes: int = ParseLimits.max_notes
    max_duration_s: float = ParseLimits.max_duration_ms / 1000


@dg.multi_asset(
    specs=[
        dg.AssetSpec("midi_notes", deps=[raw_midi_manifest], group_name="ingest", kinds={"python", "parquet"},
                     description="One row per parsed file: note lists (onset_ms, duration, pitch, velocity, "
                                 "instrument) plus exact ticks and tempo map."),
        dg.AssetSpec("midi_quarantine", deps=[raw_midi_manifest], group_name="ingest", kinds={"parquet"},
                     description="Files that could not be parsed, with a reason class and the parser's message."),
    ],
)
def midi_notes(context: dg.AssetExecutionContext, config: MidiNotesConfig, home: AriaHome):
    """Parse new files in worker processes; bad files go to the quarantine, the run goes on."""
    manifest = pq.read_table(manifest_path(home), columns=["file_id", "path"])
    files = list(zip(manifest["file_id"].to_pylist(), manifest["path"].to_pylist()))
    notes_dir, quarantine_dir = home.asset_dir("midi_notes"), home.asset_dir("midi_quarantine")
    limits = ParseLimits(max_notes=config.max_notes, max_duration_ms=int(config.max_duration_s * 1000))
    report = update_notes_tables(
        files, notes_dir, quarantine_dir, limits, config.workers, progress=progress_logger(context, 200)
    )
    context.log.info(f"parsed {report.parsed} new files ({report.notes} notes), quarantined {report.quarantined}")
    speed = {
        "new_files": report.files,
        "seconds": round(report.seconds, 2),
        "files_per_s": round(report.files / report.seconds, 1) if report.seconds else 0.0,
        "notes_per_s": round(report.notes / report.seconds) if report.seconds else 0,
    }
    notes_parts = [str(p) for p in part_files(notes_dir)]
    quarantine_parts = [str(p) for p in part_files(quarantine_dir)]
    summary = run_sql("notes_summary", {"notes": notes_parts}).to_pylist()[0] if notes_parts else {"files": 0}
    by_reason = run_sql("quarantine_by_reason", {"quarantine": quarantine_parts}).to_pylist() if quarantine_parts else []
    yield dg.MaterializeResult(
        asset_key="midi_notes",
        metadata={
            "dagster/row_count": summary["files"],
            "new_notes": report.notes,
            # New files the compiled reader handed to mido (unsupported or corrupt bytes).
            "mido_fallbacks": report.fallbacks,
            "corpus": dg.MetadataValue.md(markdown_table([summary])),
            "path": dg.MetadataValue.path(str(notes_dir)),
            **speed,
            **peak_rss_metadata(),
        },
    )
    yield dg.MaterializeResult(
        asset_key="midi_quarantine",
        metadata={
            "dagster/row_count": sum(row["files"] for row in by_reason),
            "new": report.quarantined,
            "by_reason": dg.MetadataValue.md(markdown_table(by_reason)),
            "path": dg.MetadataValue.path(str(quarantine_dir)),
        },
    )


@dg.asset_check(asset="midi_notes", blocking=True)
def notes_rows_are_consistent(home: AriaHome) -> dg.AssetCheckResult:
    """Every row has notes, and its note lists have one entry per note."""
    bad = 0
    rows = 0
    lists = ("onset_ms", "duration", "pitch", "velocity", "instrument")
    for part in part_files(home.asset_dir("midi_notes")):
        # A part holds every file of one ingest: read ~1.7M notes at a time, not the part.
        for batch in pq.ParquetFile(part).iter_batches(batch_size=1024, columns=["n_notes", *lists]):
            n = batch["n_notes"].to_numpy()
            rows += len(n)
            bad += int((n <= 0).sum())
            for name in lists:
                bad += int((batch[name].value_lengths().to_numpy() != n).sum())
    return dg.AssetCheckResult(passed=bad == 0, metadata={"rows": rows, "inconsistent": bad})


@dg.asset_check(asset="midi_quarantine")
def quarantine_share_is_small(home: AriaHome) -> dg.AssetCheckResult:
    """Warn when more of the current manifest is quarantined than MAX_QUARANTINE_SHARE."""
    parts = [str(p) for p in part_files(home.asset_dir("midi_quarantine"))]
    if not parts:
        return dg.AssetCheckResult(passed=True, metadata={"quarantined_share": 0.0})
    counts = run_sql("quarantine_share", {"manifest": str(manifest_path(home)), "quarantine": parts}).to_pylist()[0]
    share = counts["quarantined"] / max(counts["manifest_files"], 1)
    return dg.AssetCheckResult(
        passed=share <= MAX_QUARANTINE_SHARE,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"quarantined_share": round(share, 4), "limit": MAX_QUARANTINE_SHARE, **counts},
    )
