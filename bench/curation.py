"""Curation throughput: opus_dedup, quality_filter, token_shards and the training data loader.

The demo corpus (built into a temp folder, or ``--demo-dir``) is parsed into ``midi_notes``,
then replicated to ``--files`` files as other performances of its pieces, written straight
to ``midi_notes`` parts with pyarrow: each piece keeps its original file and gains copies,
``--exact-share`` of them exact copies of its notes and the rest re-performances (tempo x0.8-1.25,
onsets jittered by 5-20 ms, velocities by up to 10, transposed by 1-3 semitones either way, 2%
of the notes dropped and 2% random ones added), on Aria's decoding timebase (500 ticks per beat
at 500,000 us per beat: 1 tick = 1 ms), so the tick and tempo columns stay exact. Each copy gets
a new file_id and a manifest row; half of them keep the piece's composer and title, the others
have none, as most transcribed files do. Dedup thus has real work of both kinds (exact copies to
collapse, near-duplicates for MinHash, opus keys from Bach's BWV titles).

Then, on that corpus, in one run:

1. ``deduplicate`` as the opus_dedup asset calls it, in a fresh process (its memory is its
   own), on a corpus of its own: the demo pieces lengthened to Aria-MIDI's ~1,700 notes a file
   (``--notes-per-file``) by variations of themselves (mirrored and stretched intervals, the same
   rhythm), then replicated as above. Files/s, MinHash signatures/s, LSH and clustering time,
   peak memory. Each stage is extrapolated to Aria-MIDI's 1,186,253 files (goal: under 10
   minutes on 2 cores, writing included) at the growth measured between every 4th piece (all of
   its copies) and every piece: LSH candidates between different pieces grow faster than the files.
2. ``evaluate_quality`` (the "scores" preset the pipeline uses for the demo corpus), both engines
   in the same run: notes/s of the compiled one (goal >= 10M notes/s) and of DuckDB's (the
   reference it must equal, checked), and bare scans of the note lists they read (DuckDB's and
   pyarrow's): the ceilings.
3. ``build_token_shards`` from the dedup and quality tables just written: tokens/s.
4. ``TokenWindows`` through ``ResumableLoader`` (what ``AriaDataModule`` hands the trainer):
   train-split tokens/s with and without augmentation, 0 and ``--workers`` loader workers.

Every stage reports its wall and CPU seconds and the peak RSS so far (this process, its largest child).
Run on demand, not a test (2 cores, shared: about 4 minutes, 2-3 of them building the demo corpus)::

    PYTHONPATH=. .venv/bin/python bench/curation.py
    PYTHONPATH=. .venv/bin/python bench/curation.py --demo-dir ~/.aria/demo_corpus --files 50000
    PYTHONPATH=. .venv/bin/python bench/curation.py --keep      # keep the temp folder and print it

Timings are wall clock on whatever else the machine runs: on a shared machine, rerun before
trusting a miss.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import datasketch
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from aria_model.atomic_io import AtomicParquetWriter, write_parquet_atomic  # noqa: E402
from aria_model.data import ResumableLoader, TokenWindows, WindowConfig  # noqa: E402
from aria_model.dedup import DedupConfig, DedupResult, NoteParts, deduplicate  # noqa: E402
from aria_model.demo_corpus import DemoCorpusConfig, build_demo_corpus  # noqa: E402
from aria_model.notes_table import (NOTES_SCHEMA, NOTES_WRITE_OPTIONS, PARSER_VERSION,  # noqa: E402
                                    part_files, update_notes_tables)
from aria_model.quality import ENGINES, NOTE_LENGTH_CAP_MS, QualityConfig, evaluate_quality  # noqa: E402
from aria_model.quality_compiled import load_kernel  # noqa: E402
from aria_model.shards import SPLITS, ShardConfig, ShardInputs, build_token_shards  # noqa: E402
from aria_model.sources import MANIFEST_SCHEMA, build_manifest  # noqa: E402
from bench.common import ARIA_MIDI_FILES, ARIA_MIDI_NOTES, run_in_scratch  # noqa: E402

DEDUP_GOAL_S = 600.0  # 1.2M files in under 10 minutes
QUALITY_GOAL_NOTES_PER_S = 10e6
QUALITY_NOTE_LISTS = ("onset_ms", "duration", "pitch", "velocity", "channel")  # what the quality rules read per note
STAGES = ("dedup", "quality", "shards", "loader")  # --stages: in this order, each on the ones before
TRAINER_TOKENS_PER_S: float | None = None  # what the trainer consumes; None until a trainer bench exists

TICKS_PER_BEAT, TEMPO_US = 500, 500_000  # 1 tick = 1 ms (Aria's decoding timebase)
ROWS_PER_GROUP = 64  # parse_to_parquet's batch: one row group per parsed batch
FILES_PER_PART = 4096  # a big corpus has several parts, as update_notes_tables writes it
NOTE_LISTS = ("onset_ms", "duration", "pitch", "velocity", "instrument", "channel",
              "start_tick", "end_tick", "tempo_tick", "tempo_us")


# -- bookkeeping ---------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children, user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident set so far, MB (Linux: KiB units)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return own / 1024, children / 1024


@dataclass
class Row:
    """One line of the report table."""

    stage: str
    seconds: float
    cpu: float | None  # CPU seconds spent in the stage: well above ``seconds`` means several cores worked
    rate: float | None = None  # per second, of ``unit``
    unit: str = ""
    goal: str = ""
    verdict: str = ""
    rss: tuple[float, float] = field(default_factory=peak_rss_mb)


ROWS: list[Row] = []


class Stage:
    """Times a block: wall and CPU seconds (``with Stage() as stage: ...; stage.seconds``)."""

    def __enter__(self) -> "Stage":
        self.started, self.cpu_started = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu = cpu_seconds() - self.cpu_started


def record(stage: str, seconds: float, cpu: float | None = None, rate: float | None = None, unit: str = "",
           goal: str = "", verdict: str = "", quiet: bool = False) -> Row:
    row = Row(stage, seconds, cpu, rate, unit, goal, verdict)
    ROWS.append(row)
    if not quiet:
        rate_text = f"{rate:,.0f} {unit}" if rate is not None else ""
        print(f"  {stage}: {seconds:.2f} s {rate_text} {verdict}".rstrip(), flush=True)
    return row


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISSED"


def print_table() -> None:
    header = (f"{'stage':<34} {'seconds':>8} {'cpu s':>7} {'rate':>12} {'unit':<12} {'goal':<16} {'':<6} "
              f"{'peak RSS MB':>11} {'child MB':>8}")
    print("\n" + header)
    print("-" * len(header))
    for row in ROWS:
        cpu = f"{row.cpu:7.1f}" if row.cpu is not None else " " * 7
        rate = f"{row.rate:12,.0f}" if row.rate is not None else " " * 12
        print(f"{row.stage:<34} {row.seconds:8.1f} {cpu} {rate} {row.unit:<12} {row.goal:<16} {row.verdict:<6} "
              f"{row.rss[0]:11,.0f} {row.rss[1]:8,.0f}")


# -- corpus: the demo corpus, parsed, then replicated --------------------------------------


@dataclass
class Corpus:
    notes_dir: Path
    quarter_notes_dir: Path  # the files of every 4th piece alone: dedup's growth is timed on them
    manifest: Path  # raw_midi_manifest-shaped Parquet
    piece_of: dict[str, int]  # file_id -> index of the demo piece it performs (the truth for dedup)
    notes: int
    length_s: float  # mean first-onset-to-last-end per file
    exact_copies: int


def parse_demo(demo_dir: Path, work: Path, workers: int) -> tuple[pa.Table, pa.Table]:
    """(manifest rows, midi_notes rows) of the demo corpus, one per distinct parsed file."""
    manifest = build_manifest(demo_dir).table
    notes_dir, quarantine_dir = work / "demo_notes", work / "demo_quarantine"
    notes_dir.mkdir(parents=True)
    quarantine_dir.mkdir(parents=True)
    files = list(zip(manifest["file_id"].to_pylist(), manifest["path"].to_pylist()))
    report = update_notes_tables(files, notes_dir, quarantine_dir, workers=workers)
    if report.quarantined:
        print(f"  {report.quarantined} demo files quarantined: {report.reasons}")
    notes = pa.concat_tables(pq.read_table(p) for p in part_files(notes_dir)).sort_by("file_id")
    # A content at several paths: its first path in relpath order, as the pipeline's SQL does.
    manifest = manifest.sort_by([("file_id", "ascending"), ("relpath", "ascending")])
    ids = manifest["file_id"].to_pylist()
    first = [i for i, fid in enumerate(ids) if i == 0 or ids[i - 1] != fid]
    manifest = manifest.take(first)
    manifest = manifest.filter(pc.is_in(manifest["file_id"], value_set=notes["file_id"]))
    return manifest.sort_by("file_id"), notes


def replicate(manifest: pa.Table, notes: pa.Table, n_files: int, exact_share: float, seed: int,
              out: Path) -> Corpus:
    """``n_files`` performances of the parsed demo pieces as midi_notes parts plus a manifest."""
    rng = np.random.default_rng(seed)
    pieces = notes.to_pylist()
    for piece in pieces:
        for name in NOTE_LISTS:
            piece[name] = np.asarray(piece[name])
    meta = {row["file_id"]: row for row in manifest.to_pylist()}
    notes_dir = out / "midi_notes"
    notes_dir.mkdir(parents=True)
    rows, manifest_rows, piece_of = [], [], {}
    exact = 0
    for i in range(n_files):
        index, copy = i % len(pieces), i // len(pieces)
        piece = pieces[index]
        if copy == 0:  # the original file
            row, file_id = piece, piece["file_id"]
        else:
            file_id = hashlib.sha256(f"curation-bench:{seed}:{piece['file_id']}:{copy}".encode()).hexdigest()
            if rng.random() < exact_share:
                row, exact = dict(piece, file_id=file_id), exact + 1
            else:
                row = reperformed(piece, file_id, rng)
        rows.append(row)
        manifest_rows.append(manifest_row(meta[piece["file_id"]], file_id, copy, rng))
        piece_of[file_id] = index
    rows.sort(key=lambda r: r["file_id"])  # update_notes_tables' order: pieces scattered by hash
    for start in range(0, len(rows), FILES_PER_PART):
        write_notes_part(rows[start: start + FILES_PER_PART], notes_dir)
    quarter_dir = out / "midi_notes_quarter"
    quarter_dir.mkdir()
    quarter = [r for r in rows if piece_of[r["file_id"]] % 4 == 0]
    for start in range(0, len(quarter), FILES_PER_PART):
        write_notes_part(quarter[start: start + FILES_PER_PART], quarter_dir)
    manifest_path = out / "raw_midi_manifest.parquet"
    write_parquet_atomic(pa.Table.from_pylist(manifest_rows, schema=MANIFEST_SCHEMA).sort_by("relpath"),
                         manifest_path)
    n_notes = sum(len(r["pitch"]) for r in rows)
    length_s = sum(int(r["duration_ms"]) for r in rows) / len(rows) / 1000
    return Corpus(notes_dir, quarter_dir, manifest_path, piece_of, n_notes, length_s, exact)


def reperformed(piece: dict, file_id: str, rng: np.random.Generator) -> dict:
    """Another performance of ``piece`` as a midi_notes row on the 1 tick = 1 ms timebase."""
    n = len(piece["pitch"])
    keep = rng.random(n) >= 0.02  # a transcriber misses a few notes...
    added = max(1, round(0.02 * n))  # ...and adds a few
    take = np.concatenate([np.flatnonzero(keep), rng.integers(0, n, added)])  # added ones borrow a channel
    tempo, jitter = rng.uniform(0.8, 1.25), rng.uniform(5, 20)
    onset = piece["onset_ms"][take] * tempo + rng.uniform(-jitter, jitter, len(take))
    onset[keep.sum():] = rng.uniform(0, onset.max(), added)
    duration = np.maximum(piece["duration"][take] * tempo, 10)
    pitch = piece["pitch"][take].astype(np.int64) + rng.choice([-3, -2, -1, 1, 2, 3])
    pitch[keep.sum():] = rng.integers(pitch.min(), pitch.max() + 1, added)
    velocity = piece["velocity"][take].astype(np.int64) + rng.integers(-10, 11, len(take))
    order = np.argsort(onset, kind="stable")  # Aria's note order: by start tick
    onset = np.maximum(np.rint(onset[order]), 0).astype(np.int64)
    duration = np.rint(duration[order]).astype(np.int64)
    return {
        "file_id": file_id,
        "n_notes": len(take),
        "n_parsed_notes": len(take) + int(piece["n_parsed_notes"]) - n,
        "duration_ms": int((onset + duration).max() - onset.min()),
        "onset_ms": onset,
        "duration": duration.astype(np.int32),
        "pitch": np.clip(pitch[order], 0, 127).astype(np.uint8),
        "velocity": np.clip(velocity[order], 1, 127).astype(np.uint8),
        "instrument": piece["instrument"][take][order],
        "channel": piece["channel"][take][order],
        "instruments": piece["instruments"],
        "start_tick": onset,
        "end_tick": onset + duration,
        "tempo_tick": np.zeros(1, np.int64),
        "tempo_us": np.full(1, TEMPO_US, np.int64),
        "ticks_per_beat": TICKS_PER_BEAT,
        "parser_version": PARSER_VERSION,
    }


def manifest_row(base: dict, file_id: str, copy: int, rng: np.random.Generator) -> dict:
    """The base piece's manifest row for a copy: half the copies lose composer and title."""
    if copy == 0:
        return dict(base, transcription_score=None)
    relpath = f"{base['relpath'].rsplit('.', 1)[0]}__{copy:04d}.mid"
    row = dict(base, file_id=file_id, relpath=relpath, path=f"/synthetic/{relpath}",
               transcription_score=round(float(rng.uniform(0.6, 1.0)), 3))
    if rng.random() < 0.5:
        row.update(composer=None, composer_raw=None, title=None, opus=None, piece=None)
    return row


def write_notes_part(rows: list[dict], notes_dir: Path) -> None:
    """One midi_notes part named and encoded as update_notes_tables writes it, in row groups of ROWS_PER_GROUP."""
    digest = hashlib.sha256("\n".join(r["file_id"] for r in rows).encode()).hexdigest()[:16]
    path = notes_dir / f"part-v{PARSER_VERSION}-{digest}.parquet"
    with AtomicParquetWriter(path, NOTES_SCHEMA, **NOTES_WRITE_OPTIONS) as out:
        for start in range(0, len(rows), ROWS_PER_GROUP):
            out.write(notes_table(rows[start: start + ROWS_PER_GROUP]))


def notes_table(rows: list[dict]) -> pa.Table:
    """NOTES_SCHEMA rows built column by column: list columns from one concatenated array each."""
    columns = {}
    for column in NOTES_SCHEMA:
        values = [r[column.name] for r in rows]
        if column.name in NOTE_LISTS:
            lengths = np.array([len(v) for v in values], np.int64)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            flat = pa.array(np.concatenate(values), column.type.value_type)
            columns[column.name] = pa.ListArray.from_arrays(offsets, flat)
        else:
            columns[column.name] = pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in values],
                                            column.type)
    return pa.table(columns, schema=NOTES_SCHEMA)


# -- 1. dedup ------------------------------------------------------------------------------

# Variations that lengthen a piece: pitches mirrored and stretched about the piece's median pitch,
# so each variation has other intervals than the piece (new shingles) and the same rhythm.
VARIATION_SCALES = (1.0, -1.0, 1.5, -1.5, 0.75, -0.75, 1.25, -1.25, 2.0, -2.0)
VARIATION_GAP_MS = 1000


def lengthened(notes: pa.Table, notes_per_file: float) -> pa.Table:
    """The demo pieces, each followed by variations of itself to ``notes_per_file`` notes on average.

    Every piece grows by the same factor, so the spread of lengths stays the demo corpus's; the
    number of pieces stays too, so dedup's clusters keep their sizes. Rows are on the 1 tick =
    1 ms timebase.
    """
    factor = notes_per_file * notes.num_rows / sum(len(p) for p in notes["pitch"].to_pylist())
    if factor <= 1:
        return notes
    return notes_table([lengthened_piece(piece, factor) for piece in notes.to_pylist()])


def lengthened_piece(piece: dict, factor: float) -> dict:
    onset, duration = np.asarray(piece["onset_ms"], np.int64), np.asarray(piece["duration"], np.int64)
    pitch = np.asarray(piece["pitch"], np.float64)
    n, wanted = len(pitch), round(factor * len(pitch))
    segments = math.ceil(wanted / n)
    if segments > len(VARIATION_SCALES):
        raise ValueError(f"a piece can grow {len(VARIATION_SCALES)}-fold at most, not {factor:.1f}-fold")
    period = int((onset + duration).max() - onset.min()) + VARIATION_GAP_MS
    centre = np.median(pitch)
    onset = np.concatenate([onset - onset.min() + k * period for k in range(segments)])[:wanted]
    pitch = np.concatenate([centre + scale * (pitch - centre) for scale in VARIATION_SCALES[:segments]])[:wanted]
    duration = np.tile(duration, segments)[:wanted]
    return dict(
        piece,
        n_notes=wanted,
        n_parsed_notes=wanted,
        duration_ms=int((onset + duration).max()),
        onset_ms=onset,
        duration=duration.astype(np.int32),
        pitch=np.clip(np.rint(pitch), 21, 108).astype(np.uint8),  # the piano's keys
        velocity=np.tile(piece["velocity"], segments)[:wanted].astype(np.uint8),
        instrument=np.tile(piece["instrument"], segments)[:wanted].astype(np.uint8),
        channel=np.tile(piece["channel"], segments)[:wanted].astype(np.uint8),
        start_tick=onset,
        end_tick=onset + duration,
        tempo_tick=np.zeros(1, np.int64),
        tempo_us=np.full(1, TEMPO_US, np.int64),
        ticks_per_beat=TICKS_PER_BEAT,
    )


def dedup_metadata(manifest: Path) -> pa.Table:
    return pq.read_table(manifest, columns=["file_id", "composer", "opus", "piece", "title", "transcription_score"])


@dataclass
class DedupRun:
    """One deduplicate call as the opus_dedup asset makes it, and the writing of its table."""

    result: DedupResult
    seconds: float  # wall, deduplicate + write
    cpu: float  # CPU seconds of the process and of its workers
    write_seconds: float
    start_rss_mb: float  # the process that called deduplicate, before the call: mostly its imports
    peak_rss_mb: float  # its peak
    worker_rss_mb: float  # its largest worker's peak


def timed_dedup(parts: list[str], manifest: Path, workers: int, out: Path) -> DedupRun:
    multiprocessing.set_start_method(None, force=True)  # the platform's, as the pipeline has, not spawn
    # Load the compiled code (its workers fork with it) before timing: once per process, it would
    # otherwise weigh on the smaller run and hide how the stages grow.
    deduplicate(pq.ParquetFile(parts[0]).read_row_group(0), workers=1)
    metadata = dedup_metadata(manifest)
    config = DedupConfig.preset("pruned")
    start_rss = memory_mb("VmRSS")
    with Stage() as stage:
        result = deduplicate(NoteParts(parts), metadata, config, workers=workers)
        with Stage() as write:
            write_parquet_atomic(result.table, out)
    return DedupRun(result, stage.seconds, stage.cpu, write.seconds, start_rss, memory_mb("VmHWM"), peak_rss_mb()[1])


def memory_mb(field: str) -> float:
    """A memory figure of this process from /proc (Linux), MB. VmHWM, unlike ru_maxrss, is not
    inherited from the process that started this one."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_dedup(corpus: Corpus, notes_dir: Path, workers: int, out: Path) -> DedupRun:
    """timed_dedup in a fresh process, so that its peak memory is dedup's, not this bench's corpus's."""
    parts = [str(p) for p in part_files(notes_dir)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return fresh.submit(timed_dedup, parts, corpus.manifest, workers, out).result()


def bench_dedup(manifest: pa.Table, notes: pa.Table, args: argparse.Namespace, out: Path) -> None:
    """deduplicate on the demo pieces lengthened to ``args.notes_per_file`` and replicated to ``args.files``."""
    print(f"dedup (deduplicate) on pieces lengthened to {args.notes_per_file:,.0f} notes a file:", flush=True)
    with Stage() as stage:
        corpus = replicate(manifest, lengthened(notes, args.notes_per_file), args.files, args.exact_share, args.seed,
                           out)
    print(f"  {notes.num_rows} pieces -> {args.files:,} files ({corpus.exact_copies:,} exact copies), "
          f"{corpus.notes:,} notes, {corpus.notes / args.files:,.0f} notes and {corpus.length_s:.0f} s a file")
    record("dedup corpus: lengthen + replicate", stage.seconds, stage.cpu, args.files / stage.seconds, "files/s")
    table = out / "opus_dedup.parquet"
    run_dedup(corpus, corpus.quarter_notes_dir, args.workers, table)  # warm-up: compiled code and caches
    small = run_dedup(corpus, corpus.quarter_notes_dir, args.workers, table)  # every 4th piece: the growth
    full = run_dedup(corpus, corpus.notes_dir, args.workers, table)
    stats = full.result.stats
    per_core = " per core" if stats.workers > 1 else ""  # worker times add up: rates are per core
    record(f"dedup: read+hash+shingle{per_core}", stats.read_seconds, None, stats.files / stats.read_seconds,
           "files/s")
    record(f"dedup: MinHash signatures{per_core}", stats.signature_seconds, None, stats.signatures_per_s,
           "signatures/s")
    record("dedup: LSH bands + check", stats.lsh_seconds, None, stats.lsh_signatures_per_s, "signatures/s")
    record("dedup: clusters + table", stats.cluster_seconds, None, stats.files / stats.cluster_seconds, "files/s")
    record("dedup: write table", full.write_seconds, None, stats.files / full.write_seconds, "files/s")
    record(f"dedup: whole, {plural(stats.workers, 'worker')}", full.seconds, full.cpu, stats.files / full.seconds,
           "files/s")
    report_dedup_work(full.result, corpus)
    report_dedup_extrapolation(full, small, corpus)


def dedup_table(corpus: Corpus, out: Path, workers: int) -> Path:
    """The opus_dedup table of ``corpus``, for the shard stage (untimed: dedup is timed on its own corpus)."""
    path = out / "opus_dedup.parquet"
    run_dedup(corpus, corpus.notes_dir, workers, path)
    return path


def report_dedup_work(result: DedupResult, corpus: Corpus) -> None:
    stats = result.stats
    table = result.table.select(["file_id", "cluster_id"]).to_pylist()
    truth = {r["file_id"]: corpus.piece_of[r["file_id"]] for r in table}
    predicted = {r["file_id"]: r["cluster_id"] for r in table}
    precision, recall = pairwise_precision_recall(truth, predicted)
    print(f"  {stats.files:,} files, {stats.unique_contents:,} distinct contents, {stats.signatures:,} signatures; "
          f"{stats.candidate_pairs:,} LSH candidate pairs, {stats.verified_pairs:,} verified; "
          f"files linked by signal {stats.links_by_signal}")
    print(f"  {stats.clusters:,} clusters (largest {stats.largest_cluster}) for {len(set(truth.values()))} pieces; "
          f"kept {stats.kept:,}, dropped {stats.drops_by_reason}; pairwise precision {precision:.3f}, "
          f"recall {recall:.3f} against the true pieces")


def pairwise_precision_recall(truth: dict, predicted: dict) -> tuple[float, float]:
    """Over all pairs of files: precision and recall of "same cluster" for "same piece"."""
    def pairs(counts) -> int:
        return sum(n * (n - 1) // 2 for n in counts)

    together = pairs(Counter((truth[f], predicted[f]) for f in truth).values())
    return (together / max(pairs(Counter(predicted.values()).values()), 1),
            together / max(pairs(Counter(truth.values()).values()), 1))


def report_dedup_extrapolation(full: DedupRun, small: DedupRun, corpus: Corpus) -> None:
    """Each stage of dedup extrapolated to Aria-MIDI's 1,186,253 files from two corpus sizes.

    Every 4th piece with all its copies, then every piece: the files per piece stay, so pairs of
    near-duplicates grow with the files and only spurious candidates (pairs of different pieces)
    grow faster. Each stage's CPU seconds at the two sizes are extrapolated by ``_extrapolated``.
    The workers' stage spreads over the cores; the LSH, clusters and writing run in one process
    after it. The sum is an idle machine's time; times this run's wall / that sum at this size,
    it is the time at this run's load.
    """
    stats, small_stats = full.result.stats, small.result.stats
    files, small_files = stats.files, small_stats.files
    cores = min(os.cpu_count() or 1, stats.workers)

    def parts(run: DedupRun) -> dict[str, float]:
        s = run.result.stats
        timed = {"workers: read, hash, shingle, sign": s.read_seconds + s.signature_seconds,
                 "LSH: bands, candidate check": s.lsh_seconds,
                 "clusters, ranks, table": s.cluster_seconds,
                 "write the table": run.write_seconds}
        # Starting processes, listing tasks, moving batches: what the stages leave of the CPU seconds.
        return {**timed, "the rest (pool, transfers)": max(run.cpu - sum(timed.values()), 0.0)}

    spread = {"workers: read, hash, shingle, sign", "the rest (pool, transfers)"}  # over the cores
    here, small_parts = parts(full), parts(small)
    print(f"  extrapolated to {ARIA_MIDI_FILES:,} files at {corpus.notes / files:,.0f} notes a file "
          f"(goal < {DEDUP_GOAL_S / 60:.0f} min on {plural(cores, 'core')}), stage by stage:")
    print(f"    {'stage':<36} {f'CPU s, {small_files:,} files':>22} {f'{files:,} files':>14} {'growth':>13}"
          f" {'1.2M files':>11}")
    idle_here = idle = 0.0
    for name, seconds in here.items():
        at_scale, growth = _extrapolated(small_parts[name], seconds, small_files, files)
        share = cores if name in spread else 1
        at_scale /= share
        idle_here, idle = idle_here + seconds / share, idle + at_scale
        print(f"    {name:<36} {small_parts[name]:22.2f} {seconds:14.2f} {f'files^{growth:.2f}':>13}"
              f" {at_scale / 60:7.1f} min{' (/' + str(cores) + ' cores)' if share > 1 else ''}")
    load = full.seconds / idle_here
    at_load = idle * load
    print(f"    {'total on an idle machine':<88} {idle / 60:7.1f} min {verdict(idle < DEDUP_GOAL_S)}")
    print(f"    {f'total at this run load (wall {full.seconds:.1f} s = {load:.2f} x the idle model here)':<88} "
          f"{at_load / 60:7.1f} min {verdict(at_load < DEDUP_GOAL_S)}")
    record("dedup 1.2M files, idle machine", idle, None, goal=f"< {DEDUP_GOAL_S / 60:.0f} min",
           verdict=verdict(idle < DEDUP_GOAL_S), quiet=True)
    record("dedup 1.2M files, this load", at_load, None, goal=f"< {DEDUP_GOAL_S / 60:.0f} min",
           verdict=verdict(at_load < DEDUP_GOAL_S), quiet=True)
    report_dedup_scaling(full, small)


def report_dedup_scaling(full: DedupRun, small: DedupRun) -> None:
    """Candidate pairs and memory at the two sizes, extrapolated the same way."""
    stats, small_stats = full.result.stats, small.result.stats
    scale = ARIA_MIDI_FILES / stats.files
    pairs, growth = _extrapolated(small_stats.candidate_pairs, stats.candidate_pairs, small_stats.files, stats.files)
    print(f"  LSH candidate pairs {small_stats.candidate_pairs:,} -> {stats.candidate_pairs:,} (files^{growth:.2f}): "
          f"~{pairs / 1e6:,.0f}M at 1.2M files; checked at "
          f"{stats.candidate_pairs / stats.lsh_seconds:,.0f} candidates/s with their bands")
    per_file = (full.peak_rss_mb - small.peak_rss_mb) / (stats.files - small_stats.files)
    signatures_mb = stats.signatures * scale * DedupConfig.preset("pruned").num_perm * 4 / 1e6  # uint32 values
    print(f"  peak memory of the deduplicate process: {small.peak_rss_mb:,.0f} MB ({small_stats.files:,} files), "
          f"{full.peak_rss_mb:,.0f} MB ({stats.files:,}), {full.start_rss_mb:,.0f} MB of it before the call "
          f"(imports); {per_file * 1e3:,.1f} kB a file: ~{full.peak_rss_mb + per_file * (ARIA_MIDI_FILES - stats.files):,.0f}"
          f" MB at 1.2M files (of it the uint32 signature matrix ~{signatures_mb:,.0f} MB); each worker "
          f"{full.worker_rss_mb:,.0f} MB")


def _extrapolated(small: float, large: float, small_files: int, files: int) -> tuple[float, float]:
    """(the amount at ARIA_MIDI_FILES, its growth exponent g between the two sizes).

    The larger of two lines through the two points: a fixed part plus a part per file, and
    files^g, which is above it when g > 1 (work growing faster than the files).
    """
    if small_files >= files or small <= 0 or large <= 0:
        return large * ARIA_MIDI_FILES / files, 1.0
    affine = large + max(large - small, 0.0) / (files - small_files) * (ARIA_MIDI_FILES - files)
    growth = math.log(large / small) / math.log(files / small_files)
    return max(affine, large * (ARIA_MIDI_FILES / files) ** growth), growth


# -- 2. quality ----------------------------------------------------------------------------


def bench_quality(corpus: Corpus, out: Path, repeat: int) -> Path:
    """Both engines of evaluate_quality on the same parts, in the same run: the compiled one against the
    goal, DuckDB's as the reference it must equal (checked here too)."""
    print("quality filter (evaluate_quality, compiled and DuckDB engines):", flush=True)
    parts = part_files(corpus.notes_dir)
    config = QualityConfig.preset("scores")  # the pipeline's preset for the demo source
    load_kernel(config, NOTE_LENGTH_CAP_MS)  # numba's compile (or cache load) is not the filter's time
    tables, rates = {}, {}
    for engine in ENGINES:
        best, tables[engine] = fastest(repeat, lambda engine=engine: evaluate_quality(parts, config, engine=engine))
        rates[engine] = corpus.notes / best.seconds
        goal = f">= {QUALITY_GOAL_NOTES_PER_S / 1e6:.0f}M notes/s" if engine == "compiled" else "reference"
        record(f"quality filter: {engine}", best.seconds, best.cpu, rates[engine], "notes/s", goal,
               verdict(rates[engine] >= QUALITY_GOAL_NOTES_PER_S) if engine == "compiled" else "")
    table = tables["compiled"]
    same = table.equals(tables["duckdb"])
    print(f"  {table.num_rows:,} files ({corpus.notes:,} notes), best of {repeat}, {os.cpu_count()} workers "
          "(compiled: threads, DuckDB: processes): "
          f"compiled {rates['compiled'] / rates['duckdb']:.1f}x DuckDB, "
          f"{'the same table' if same else 'TABLES DIFFER'}; {pc.sum(table['passed']).as_py():,} pass")
    failures = Counter(rule for rules in table["failed_rules"].to_pylist() for rule in rules)
    print(f"  failures by rule: {dict(failures.most_common())}")
    bench_quality_scan(parts, corpus.notes, repeat)
    path = out / "quality_filter.parquet"
    write_parquet_atomic(table, path)
    return path


def bench_quality_scan(parts: list[Path], notes: int, repeat: int) -> None:
    """What reading the note lists the rules use costs alone, all cores: DuckDB's scan (what its engine
    reads through) and pyarrow's (the compiled engine's reader). No filter runs faster than its reader."""
    sums = ", ".join(f"sum(list_sum({column}))" for column in QUALITY_NOTE_LISTS)
    con = duckdb.connect()
    scans = {
        "DuckDB": lambda: con.sql(f"SELECT {sums} FROM read_parquet($parts)",
                                  params={"parts": [str(p) for p in parts]}).fetchall(),
        "pyarrow": lambda: pq.read_table(parts, columns=list(QUALITY_NOTE_LISTS)),
    }
    for reader, scan in scans.items():
        best, _ = fastest(repeat, scan)
        record(f"quality: {reader} scan only", best.seconds, best.cpu, notes / best.seconds, "notes/s")


def fastest(repeat: int, run: Callable[[], object]) -> tuple[Stage, object]:
    """The fastest of ``repeat`` timed runs, and what it returned."""
    best = None
    for _ in range(repeat):
        with Stage() as stage:
            result = run()
        if best is None or stage.seconds < best[0].seconds:
            best = stage, result
    return best


# -- 3. token shards -----------------------------------------------------------------------


def bench_shards(corpus: Corpus, dedup: Path, quality: Path, out: Path, workers: int,
                 row_group_tokens: int, min_files: int) -> Path:
    print("token shards (build_token_shards):", flush=True)
    selected = pq.read_table(dedup, columns=["file_id", "kept"]).join(
        pq.read_table(quality, columns=["file_id", "passed"]), "file_id")
    n_selected = pc.sum(pc.and_(selected["kept"], selected["passed"])).as_py() or 0
    if n_selected < min_files:
        print(f"  only {n_selected} files kept and passed: sharding every file as kept and passed instead")
        everything = pq.read_table(dedup, columns=["file_id", "cluster_id"])
        dedup, quality = out / "all_kept.parquet", out / "all_passed.parquet"
        write_parquet_atomic(everything.append_column("kept", pa.array([True] * everything.num_rows)), dedup)
        write_parquet_atomic(pa.table({"file_id": everything["file_id"],
                                       "passed": pa.array([True] * everything.num_rows)}), quality)
    root = out / "token_shards"
    config = ShardConfig(workers=workers, row_group_tokens=row_group_tokens)
    with Stage() as stage:
        report = build_token_shards(ShardInputs(corpus.notes_dir, corpus.manifest, dedup, quality), root, config)
    record("token shards: tokenize + write", stage.seconds, stage.cpu, report.tokens / stage.seconds, "tokens/s")
    splits = report.manifest["splits"]
    print(f"  {report.files:,} files, {report.tokens:,} tokens ({report.files / stage.seconds:,.0f} files/s, "
          f"{plural(workers, 'worker')}); " + ", ".join(f"{s} {v['files']:,} files / {v['tokens']:,} tokens / "
                                              f"{sum(sh['row_groups'] for sh in v['shards'])} row groups"
                                              for s, v in ((s, splits[s]) for s in SPLITS))
          + f"; {len(report.manifest['failed'])} failed")
    return root


# -- 4. data loader ------------------------------------------------------------------------


def bench_loader(root: Path, seq_len: int, batch_size: int, workers: int, min_tokens: int) -> None:
    """Whole epochs of the train split per setting, until ``min_tokens`` were read.

    Whole epochs, each starting its workers as training does: training fills a 256-window
    shuffle buffer before its first window, so a part of an epoch would time mostly the filling.
    """
    print(f"data loader (ResumableLoader over TokenWindows, train split, seq_len {seq_len}, batch {batch_size}, "
          f"whole epochs until {min_tokens:,} tokens):", flush=True)
    for augment in (False, True):
        for num_workers in sorted({0, workers}):
            dataset = TokenWindows(root, "train", WindowConfig(seq_len=seq_len, training=True, augment=augment))
            loader = ResumableLoader(dataset, batch_size, num_workers)
            first_batch, tokens, real, windows, epochs = None, 0, 0, 0, 0
            with Stage() as stage:
                while tokens < min_tokens:
                    for source, _, mask in loader:  # each pass is the next epoch
                        first_batch = first_batch or time.perf_counter() - stage.started
                        tokens += source.numel()
                        real += int(mask.sum())
                        windows += len(source)
                    epochs += 1
                    if not windows:
                        break  # an empty train split
            rate = tokens / stage.seconds
            trainer = f"{rate / TRAINER_TOKENS_PER_S:.1f}x trainer" if TRAINER_TOKENS_PER_S else "no trainer ref"
            setting = f"{'augmented' if augment else 'plain'}, {plural(num_workers, 'worker')}"
            record(f"loader: {setting}", stage.seconds, stage.cpu, rate, "tokens/s", trainer)
            print(f"    {epochs} epochs, {windows:,} windows, {real / max(tokens, 1):.1%} of tokens real (not <P>), "
                  f"first batch after {first_batch or 0:.2f} s")


# -- run -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="an existing demo corpus folder (default: build the demo preset into a temp folder)")
    parser.add_argument("--files", type=int, default=20_000, help="files after replication (default 20000)")
    parser.add_argument("--exact-share", type=float, default=0.1,
                        help="share of the copies that are exact note copies (default 0.1)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes for parsing, tokenizing and loading (default: all cores)")
    parser.add_argument("--seq-len", type=int, default=8192, help="loader window (default 8192, Aria's pretraining)")
    parser.add_argument("--batch-size", type=int, default=8, help="loader batch (default 8)")
    parser.add_argument("--loader-tokens", type=int, default=8_000_000,
                        help="whole train epochs are read per loader setting until this many tokens (default 8M)")
    parser.add_argument("--row-group-tokens", type=int, default=250_000,
                        help="shard row group size (default 250k: the demo's few M train tokens still make "
                             "enough row groups for every loader worker; the pipeline's default is 1M)")
    parser.add_argument("--min-shard-files", type=int, default=500,
                        help="fewer kept-and-passed files than this: shard every file instead (default 500)")
    parser.add_argument("--repeat", type=int, default=1, help="timed quality passes, best reported (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="replication draws (default 0)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder and print its path")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, of {','.join(STAGES)} (default: all; shards "
                             "needs quality, loader needs shards)")
    parser.add_argument("--notes-per-file", type=float, default=ARIA_MIDI_NOTES / ARIA_MIDI_FILES,
                        help="dedup's corpus: the demo pieces lengthened to this many notes a file on average "
                             "(default: Aria-MIDI's ~1,700; 0: the demo pieces as they are)")
    args = parser.parse_args(argv)
    args.stages = [stage for stage in args.stages.split(",") if stage]
    if unknown := set(args.stages) - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(unknown)}; known: {list(STAGES)}")
    if "shards" in args.stages and "quality" not in args.stages or \
            "loader" in args.stages and "shards" not in args.stages:
        parser.error("shards needs quality, loader needs shards")
    if args.files < 8:
        parser.error("--files must be at least 8 (a quarter of the pieces is timed separately)")

    run_in_scratch(args, run, prefix="curation-bench-")


def run(args: argparse.Namespace, work: Path) -> None:
    load = os.getloadavg()
    print(f"python {sys.version.split()[0]}, datasketch {datasketch.__version__}, duckdb {duckdb.__version__}, "
          f"{os.cpu_count()} cores, load average {load[0]:.2f} at start (other jobs' load slows every stage: "
          f"compare seconds with cpu s); seed {args.seed}")
    with Stage() as total:
        demo_dir = args.demo_dir
        if demo_dir is None:
            demo_dir = work / "demo_corpus"
            print("demo corpus:", flush=True)
            with Stage() as stage:
                report = build_demo_corpus(demo_dir, DemoCorpusConfig.preset("demo"))
            record("corpus: build demo corpus", stage.seconds, stage.cpu, report.selected / stage.seconds, "pieces/s")
        else:
            print(f"demo corpus: {demo_dir}", flush=True)
        with Stage() as stage:
            manifest, notes = parse_demo(demo_dir, work, args.workers)
        record("corpus: parse to midi_notes", stage.seconds, stage.cpu, notes.num_rows / stage.seconds, "files/s")
        with Stage() as stage:
            corpus = replicate(manifest, notes, args.files, args.exact_share, args.seed, work / "bench")
        print(f"  {notes.num_rows} pieces -> {args.files:,} files ({corpus.exact_copies:,} exact copies), "
              f"{corpus.notes:,} notes, {corpus.notes / args.files:,.0f} notes and {corpus.length_s:.0f} s a file")
        record("corpus: replicate -> midi_notes", stage.seconds, stage.cpu, args.files / stage.seconds, "files/s")

        if "dedup" in args.stages:
            bench_dedup(manifest, notes, args, work / "dedup_bench")
        if "quality" in args.stages:
            quality = bench_quality(corpus, work / "bench", args.repeat)
        if "shards" in args.stages:
            dedup = dedup_table(corpus, work / "bench", args.workers)
            shards = bench_shards(corpus, dedup, quality, work / "bench", args.workers, args.row_group_tokens,
                                  args.min_shard_files)
        if "loader" in args.stages:
            bench_loader(shards, args.seq_len, args.batch_size, args.workers, args.loader_tokens)
    record("total", total.seconds, total.cpu, quiet=True)
    print_table()
    print("seconds: wall; cpu s: this process's threads and its finished children. dedup 1.2M rows: estimated "
          "seconds. peak RSS: the highest so far when the stage ended (this process; its largest finished child). "
          f"Load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.")


if __name__ == "__main__":
    main()
