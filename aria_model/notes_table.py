"""Parse many MIDI files into the ``midi_notes`` / ``midi_quarantine`` Parquet tables.

One row per file. List columns hold the notes in Aria's order; ``onset_ms`` is
measured from the start of the file and ``duration`` is the pedal-extended note
length, both exactly as Aria computes them. The exact tick timing and tempo map
are kept too, so ``performance_from_row`` rebuilds the Performance and the
tokenizer reproduces Aria's ids from the table without re-reading the MIDI.

Files are parsed in worker processes; finished batches stream into Parquet parts
of at most ``PART_FILES`` files (one row group per batch), so memory stays
bounded by the batches in flight, not by the corpus. A large corpus's parts are
each parsed and written by one worker. ``load_midi``'s fast reader
hands the files it does not support to mido; ``ParseReport.fallbacks`` counts them.
``notes_ms`` and ``list_values`` feed whole row groups to the tokenizer at once.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import traceback
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aria_model.atomic_io import AtomicParquetWriter
from aria_model.midi import MidiError, Performance, load_midi
from aria_model.tempo import elapsed_ms, one_tempo_elapsed_ms, tempo_scales

# Bump when parsing semantics change: parts written by another version are re-parsed.
PARSER_VERSION = 1
# Files of one part at most. Readers open a part per task, and its footer (an entry per row group
# and column) grows with it: at 100k files in one part, opening it cost the tokenizer more than
# its notes. 8,192 files are 128 row groups, ~14M notes at Aria-MIDI's lengths, ~110 MB.
PART_FILES = 8192
# Parts per worker from which workers write whole parts (see parse_into_parts): with fewer, the last
# parts would leave workers idle for longer than writing them here costs.
PARTS_PER_WORKER = 2
Part = tuple[list[tuple[str, str]], Path, Path]  # (file_id, path) pairs, notes part, quarantine part

NOTES_SCHEMA = pa.schema([
    ("file_id", pa.string()),
    ("n_notes", pa.int32()),
    ("n_parsed_notes", pa.int32()),
    ("duration_ms", pa.int64()),  # first onset to last note end
    ("onset_ms", pa.list_(pa.int64())),  # from the start of the file
    ("duration", pa.list_(pa.int32())),  # note lengths in ms, pedal folded in
    ("pitch", pa.list_(pa.uint8())),
    ("velocity", pa.list_(pa.uint8())),
    ("instrument", pa.list_(pa.uint8())),  # index into aria_model.midi.INSTRUMENTS
    ("channel", pa.list_(pa.uint8())),
    ("instruments", pa.list_(pa.string())),  # instrument prefix classes of the file
    ("start_tick", pa.list_(pa.int64())),
    ("end_tick", pa.list_(pa.int64())),
    ("tempo_tick", pa.list_(pa.int64())),
    ("tempo_us", pa.list_(pa.int64())),
    ("ticks_per_beat", pa.int32()),
    ("parser_version", pa.int16()),
])

# The per-note list columns (the others are per file, or a file's tempo map and instrument classes).
NOTE_LISTS = ("onset_ms", "duration", "pitch", "velocity", "instrument", "channel", "start_tick", "end_tick")
# Note lists change little from one note to the next (ticks and onsets grow, pitches and velocities
# wander), so delta-packed and uncompressed they come out smaller than zstd's plain pages, and are
# written ~4x and read ~1.5x faster (2k files of ~1,700 notes: 9 vs 2.3 M notes/s written, 8.1 vs
# 15.6 bytes a note). Encodings apply to the leaf column, hence ".list.element".
NOTES_WRITE_OPTIONS = {
    "compression": "none",
    "use_dictionary": False,
    "column_encoding": {f"{name}.list.element": "DELTA_BINARY_PACKED"
                        for name in (*NOTE_LISTS, "tempo_tick", "tempo_us")},
}

QUARANTINE_SCHEMA = pa.schema([
    ("file_id", pa.string()),
    ("path", pa.string()),
    ("reason", pa.string()),
    ("message", pa.string()),
    ("parser_version", pa.int16()),
])


@dataclass(frozen=True)
class ParseLimits:
    """Files beyond these are quarantined as ``too_long`` instead of parsed into the table."""

    max_notes: int = 500_000  # Maestro's longest piece has ~30k notes
    max_duration_ms: int = 4 * 3600 * 1000  # Aria's length filter stops at 2 h


@dataclass
class ParseReport:
    files: int = 0
    parsed: int = 0
    quarantined: int = 0
    notes: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    fallbacks: int = 0  # files the fast reader handed to mido (parsed or quarantined)

    def add(self, other: ParseReport) -> None:
        """Count ``other``'s parsed files in too (not its ``files`` or ``seconds``)."""
        self.parsed += other.parsed
        self.quarantined += other.quarantined
        self.notes += other.notes
        self.fallbacks += other.fallbacks
        for reason, count in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + count


def performance_row(file_id: str, perf: Performance) -> dict:
    onset = perf.onset_ms(remove_preceding_silence=False)
    duration = perf.duration_ms()
    return {
        "file_id": file_id,
        "n_notes": perf.n_notes,
        "n_parsed_notes": perf.n_parsed_notes,
        "duration_ms": int((onset + duration).max() - onset.min()),
        "onset_ms": onset,
        "duration": duration.astype(np.int32),
        "pitch": perf.pitch,
        "velocity": perf.velocity,
        "instrument": perf.instrument,
        "channel": perf.channel,
        "instruments": list(perf.instruments),
        "start_tick": perf.start_tick,
        "end_tick": perf.end_tick,
        "tempo_tick": perf.tempo_tick,
        "tempo_us": perf.tempo_us,
        "ticks_per_beat": perf.ticks_per_beat,
        "parser_version": PARSER_VERSION,
    }


def performance_from_row(row: dict, metadata: dict | None = None) -> Performance:
    """Rebuild the exact Performance of a ``midi_notes`` row (as from ``to_pylist``)."""
    return Performance(
        start_tick=np.asarray(row["start_tick"], np.int64),
        end_tick=np.asarray(row["end_tick"], np.int64),
        pitch=np.asarray(row["pitch"], np.uint8),
        velocity=np.asarray(row["velocity"], np.uint8),
        channel=np.asarray(row["channel"], np.uint8),
        instrument=np.asarray(row["instrument"], np.uint8),
        tempo_tick=np.asarray(row["tempo_tick"], np.int64),
        tempo_us=np.asarray(row["tempo_us"], np.int64),
        ticks_per_beat=int(row["ticks_per_beat"]),
        instruments=tuple(row["instruments"]),
        metadata=dict(metadata or {}),
        n_parsed_notes=int(row["n_parsed_notes"]),
    )


def list_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, row i's list being ``values[offsets[i]:offsets[i + 1]]``:
    zero-copy views where the column is one chunk with no nulls."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0]: offsets[-1]]
    return values, (offsets - offsets[0]).astype(np.int64)


def notes_ms(notes: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``onset_ms()`` (from the first note) and ``duration_ms()`` of every row's Performance
    (``performance_from_row``), end to end, and the rows' note offsets: the whole table at once
    where a file has one tempo (most do), file by file through the tempo map otherwise."""
    start, offsets = list_values(notes["start_tick"])
    end, _ = list_values(notes["end_tick"])
    tempo_tick, tempo_offsets = list_values(notes["tempo_tick"])
    tempo_us, _ = list_values(notes["tempo_us"])
    ticks_per_beat = notes["ticks_per_beat"].to_numpy()
    lengths = np.diff(offsets)
    file_of = np.repeat(np.arange(len(lengths)), lengths)
    first_tempo = tempo_offsets[:-1]
    scale = tempo_scales(tempo_us[first_tempo], ticks_per_beat)[file_of]
    at = tempo_tick[first_tempo][file_of]
    onset = one_tempo_elapsed_ms(start[offsets[:-1]][file_of], start, at, scale)
    duration = one_tempo_elapsed_ms(start, end, at, scale)
    for row in np.flatnonzero(np.diff(tempo_offsets) != 1):
        notes_of, tempo_of = slice(offsets[row], offsets[row + 1]), slice(tempo_offsets[row], tempo_offsets[row + 1])
        tempo = (tempo_tick[tempo_of], tempo_us[tempo_of], int(ticks_per_beat[row]))
        onset[notes_of] = elapsed_ms(int(start[offsets[row]]), start[notes_of], *tempo)
        duration[notes_of] = elapsed_ms(start[notes_of], end[notes_of], *tempo)
    return onset, duration, offsets


def parse_one(file_id: str, path: str, limits: ParseLimits) -> tuple[str, dict, str | None]:
    """("notes" or "quarantine", row, which engine parsed it: see ``Performance.parsed_by``); never raises."""
    try:
        perf = load_midi(path, max_notes=limits.max_notes)
        row = performance_row(file_id, perf)
        if row["duration_ms"] > limits.max_duration_ms:
            raise MidiError("too_long", f"{row['duration_ms'] / 3.6e6:.1f} h exceeds {limits.max_duration_ms / 3.6e6:.1f} h")
        return "notes", row, perf.parsed_by
    except MidiError as exc:
        return "quarantine", _quarantine_row(file_id, path, exc.reason, exc.message), exc.parsed_by
    except OSError as exc:
        return "quarantine", _quarantine_row(file_id, path, "unreadable", f"{type(exc).__name__}: {exc}"), None
    except Exception as exc:  # a parser bug must not stop the corpus; keep the evidence
        where = traceback.extract_tb(exc.__traceback__)[-1]
        message = f"{type(exc).__name__}: {exc} at {where.filename}:{where.lineno}"
        return "quarantine", _quarantine_row(file_id, path, "parser_error", message), None


def _quarantine_row(file_id: str, path: str, reason: str, message: str) -> dict:
    return {"file_id": file_id, "path": path, "reason": reason, "message": message, "parser_version": PARSER_VERSION}


def _parse_batch(batch: list[tuple[str, str]], limits: ParseLimits) -> tuple[pa.Table, pa.Table, int]:
    """(notes rows, quarantine rows, how many files the fast reader handed to mido)."""
    notes, quarantine = [], []
    fallbacks = 0
    for file_id, path in batch:
        kind, row, parsed_by = parse_one(file_id, path, limits)
        (notes if kind == "notes" else quarantine).append(row)
        fallbacks += parsed_by == "mido-fallback"
    return notes_table(notes), pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), fallbacks


def notes_table(rows: list[dict]) -> pa.Table:
    """``performance_row`` rows as a NOTES_SCHEMA table: each list column is one concatenated array
    and its offsets, not a Python object per note (``from_pylist`` took a third of a batch's time)."""
    if not rows:
        return NOTES_SCHEMA.empty_table()
    columns = {}
    for column in NOTES_SCHEMA:
        values = [row[column.name] for row in rows]
        if pa.types.is_list(column.type) and column.name != "instruments":
            lengths = np.fromiter((len(v) for v in values), np.int64, len(values))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat = np.concatenate(values).astype(column.type.value_type.to_pandas_dtype(), copy=False)
            columns[column.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        else:
            columns[column.name] = pa.array(values, column.type)
    return pa.table(columns, schema=NOTES_SCHEMA)


def _batches(files: list[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    for i in range(0, len(files), size):
        yield files[i : i + size]


def _parse_in_workers(
    batches: Iterable[tuple[int, list]], limits: ParseLimits, workers: int
) -> Iterator[tuple[int, tuple[pa.Table, pa.Table, int]]]:
    """Yield (tag, parsed batch) for (tag, batch) pairs in input order, with at most 2 batches per
    worker in flight."""
    if workers <= 1:
        for tag, batch in batches:
            yield tag, _parse_batch(batch, limits)
        return
    in_flight: deque = deque()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for tag, batch in batches:
            in_flight.append((tag, pool.submit(_parse_batch, batch, limits)))
            if len(in_flight) >= 2 * workers:
                tag, done = in_flight.popleft()
                yield tag, done.result()
        while in_flight:
            tag, done = in_flight.popleft()
            yield tag, done.result()


def parse_to_parquet(
    files: list[tuple[str, str]],
    notes_path: Path,
    quarantine_path: Path,
    limits: ParseLimits = ParseLimits(),
    workers: int | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> ParseReport:
    """Parse ``(file_id, path)`` pairs into two Parquet files, each written atomically.

    Files are processed in file_id order and batches are written in that order,
    so a rerun on the same input writes identical files whatever the scheduling.
    """
    return parse_into_parts([(files, notes_path, quarantine_path)], limits, workers, batch_size, progress)


def parse_into_parts(
    parts: list[Part],
    limits: ParseLimits = ParseLimits(),
    workers: int | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> ParseReport:
    """``parse_to_parquet`` for each (files, notes path, quarantine path).

    With parts enough to keep every worker busy, each worker parses and writes whole parts: parsed
    notes then never travel through this process, which had them unpickled and encoded a third of
    the time the workers spent parsing (measured). Otherwise the parts are written here, one after
    the other, from batches the workers parse. Both ways write the same bytes.
    """
    started = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(parts) >= PARTS_PER_WORKER * workers:
        report = _parse_parts_in_workers(parts, limits, workers, batch_size, progress)
    else:
        report = _parse_parts_here(parts, limits, workers, batch_size, progress)
    report.seconds = time.perf_counter() - started
    return report


def _parse_parts_here(parts: list[Part], limits: ParseLimits, workers: int, batch_size: int,
                      progress: Callable[[int, int], None] | None) -> ParseReport:
    """Parts written by this process, one after the other, from batches parsed in ``workers``
    processes (one pool for all parts: none waits for the next part to begin)."""
    report = ParseReport(files=sum(len(files) for files, _, _ in parts))
    tagged = ((index, batch) for index, (files, _, _) in enumerate(parts) for batch in _batches(sorted(files), batch_size))
    with closing(_parse_in_workers(tagged, limits, workers)) as results:
        parsed = next(results, None)
        for index, (_, notes_path, quarantine_path) in enumerate(parts):
            with AtomicParquetWriter(notes_path, NOTES_SCHEMA, **NOTES_WRITE_OPTIONS) as notes_out, \
                    AtomicParquetWriter(quarantine_path, QUARANTINE_SCHEMA) as quarantine_out:
                while parsed is not None and parsed[0] == index:
                    notes, quarantine, fallbacks = parsed[1]
                    notes_out.write(notes)
                    quarantine_out.write(quarantine)
                    _count(report, notes, quarantine, fallbacks)
                    if progress:
                        progress(report.parsed + report.quarantined, report.files)
                    parsed = next(results, None)
    return report


def _parse_part(part: Part, limits: ParseLimits, batch_size: int) -> ParseReport:
    return _parse_parts_here([part], limits, 1, batch_size, None)


def _parse_parts_in_workers(parts: list[Part], limits: ParseLimits, workers: int, batch_size: int,
                            progress: Callable[[int, int], None] | None) -> ParseReport:
    """Each part parsed and written by one worker; progress as parts finish."""
    report = ParseReport(files=sum(len(files) for files, _, _ in parts))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done in as_completed([pool.submit(_parse_part, part, limits, batch_size) for part in parts]):
            report.add(done.result())
            if progress:
                progress(report.parsed + report.quarantined, report.files)
    return report


def _count(report: ParseReport, notes: pa.Table, quarantine: pa.Table, fallbacks: int) -> None:
    report.parsed += notes.num_rows
    report.quarantined += quarantine.num_rows
    report.fallbacks += fallbacks
    report.notes += pc.sum(notes["n_notes"]).as_py() or 0
    for reason in quarantine["reason"].to_pylist():
        report.reasons[reason] = report.reasons.get(reason, 0) + 1


QUARANTINE_REASONS = MidiError.REASONS + ("unreadable", "parser_error")


def part_files(folder: Path) -> list[Path]:
    """The Parquet parts of a notes or quarantine folder written by this parser version."""
    return sorted(Path(folder).glob(f"part-v{PARSER_VERSION}-*.parquet"))


def _known_file_ids(folder: Path) -> set[str]:
    ids: set[str] = set()
    for part in part_files(folder):
        ids.update(pq.read_table(part, columns=["file_id"])["file_id"].to_pylist())
    return ids


def _drop_stale_parts(folder: Path) -> int:
    """Parts of other parser versions describe notes this parser would not produce."""
    stale = [p for p in Path(folder).glob("part-v*.parquet") if p not in set(part_files(folder))]
    for part in stale:
        part.unlink()
    return len(stale)


def update_notes_tables(
    files: list[tuple[str, str]],
    notes_dir: Path,
    quarantine_dir: Path,
    limits: ParseLimits = ParseLimits(),
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ParseReport:
    """Parse the files whose file_id is in neither table yet into new parts of at most PART_FILES
    files (of equal sizes), in file_id order.

    Parts are named by a digest of the file_ids they hold, so rerunning on the
    same input adds nothing and rewrites nothing. Several paths with the same
    content are parsed once (the first path in sorted order).
    """
    _drop_stale_parts(notes_dir)
    _drop_stale_parts(quarantine_dir)
    known = _known_file_ids(notes_dir) | _known_file_ids(quarantine_dir)
    first_path: dict[str, str] = {}
    for file_id, path in sorted(files):
        first_path.setdefault(file_id, path)
    new = [(fid, path) for fid, path in first_path.items() if fid not in known]
    if not new:
        return ParseReport()
    count = math.ceil(len(new) / PART_FILES)
    parts = []
    for chunk in (new[i * len(new) // count: (i + 1) * len(new) // count] for i in range(count)):
        digest = hashlib.sha256("\n".join(fid for fid, _ in chunk).encode()).hexdigest()[:16]
        name = f"part-v{PARSER_VERSION}-{digest}.parquet"
        parts.append((chunk, Path(notes_dir) / name, Path(quarantine_dir) / name))
    return parse_into_parts(parts, limits, workers, progress=progress)
