"""Aria's quality filters over the ``midi_notes`` table: DuckDB queries (``sql/quality_*.sql``) and
compiled kernels that give the same numbers.

Aria (``ariautils/midi.py``, the ``test_*`` functions) rejects a MIDI file when one of its
heuristics fails: note density in sliding windows, pitch and timing entropy, unique pitches,
silences, velocity, instruments, notes per second, length and repetitiveness. Here each test is a
rule whose thresholds live in ``QualityConfig`` (defaults: the set Aria ran in Dec 2024), and
``evaluate_quality`` gives every file one row: ``file_id``, ``passed``, ``failed_rules`` and every
metric, whether or not its rule is enabled.

    from aria_model.quality import QualityConfig, evaluate_quality
    table = evaluate_quality(notes_parts, QualityConfig.preset("aria"))

Where this differs from Aria, because the notes table is not the raw file Aria's tests read:
note ends include the sustain pedal and channels of ignored instrument families are already gone
(Aria tests first, then removes them); ``max_programs`` counts note channels, as the table keeps
no program numbers; ``n_instruments`` counts the declared instrument classes but drums; ``length``
runs from the first onset (Aria's Dec-2024 ``min_length``; its later ``length`` starts at tick 0).
Windows and chunks use exact integer milliseconds where Aria adds floats of seconds.

Two engines give the same table, bit for bit. ``engine="compiled"`` (the default) reads the parts
with pyarrow and computes every metric in numba kernels (``quality_compiled``, ``quality_kernels``;
the entropies replay DuckDB's summation order through ``duckdb_entropy``). ``engine="duckdb"`` runs
the queries, the reference whose comments define each rule: each batch of files is staged as two
Arrow tables (``quality_stage_files``: one row of note lists per file; ``quality_stage_notes``: one
row of onsets per file and pitch) that the other queries read; the window tests walk each list
once with DuckDB's ``list_reduce``, every window length in one query. tests/test_quality.py holds
the engines to each other on the demo corpus, the golden files and drawn note lists.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from itertools import pairwise, repeat

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aria_model.midi import DRUM, DRUM_CHANNEL, INSTRUMENTS
from aria_model.quality_compiled import rule_table
from aria_model.sql import run_sql

NOTE_LENGTH_CAP_MS = 5000  # Aria's timing entropy caps note lengths at 5 s
DEFAULT_BATCH_FILES = 6_000  # files a worker stages at once: ~0.7 GB at Aria-MIDI lengths; bounds memory, not results
SCAN_BATCH_ROWS = 2048  # rows of a staged table per scan task at most: one DuckDB vector
SCAN_BATCHES = 4  # shares of a staged table's notes that no scan task straddles (measured best of 1-16)


@dataclass(frozen=True)
class DensityWindow:
    """Limits of Aria's note_density_in_interval for windows of ``seconds``."""

    seconds: int
    max_notes_per_s: float
    max_notes_per_s_per_pitch: float


@dataclass(frozen=True)
class PitchWindow:
    """Limit of Aria's unique_pitch_count_in_interval for windows of ``seconds``."""

    seconds: int
    min_unique_pitches: int


# Rule names are Aria's test names, in the order failed_rules lists them.
RULES = (
    "note_density_in_interval",
    "note_timing_entropy",
    "note_pitch_entropy",
    "unique_pitch_count_in_interval",
    "unique_pitch_count",
    "silent_interval",
    "mean_note_velocity",
    "max_programs",
    "max_instruments",
    "total_note_frequency",
    "note_frequency_per_instrument",
    "length",
    "repetitive_content",
)
# Rules aimed at broken or degenerate files rather than at style (our choice, not Aria's).
LIGHT_RULES = ("note_density_in_interval", "unique_pitch_count", "silent_interval", "total_note_frequency")


# Quantised scores have a handful of note values (their length entropy is low by construction, so
# note_timing_entropy is off) and folk tunes are short and diatonic: a scale's 7 pitches, not 12.
# With these the 400-piece demo corpus keeps 93 % of its files instead of 0.25 %.
SCORE_PRESET_CHANGES = {
    "min_unique_pitches": 7,
    "min_pitch_entropy": 2.0,
    "min_length_s": 8.0,
    "pitch_windows": (PitchWindow(30, 5), PitchWindow(60, 6), PitchWindow(120, 7)),
}


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of every rule (Aria's Dec-2024 values) and which rules decide ``passed``."""

    enabled: frozenset[str] = frozenset(RULES)
    density_windows: tuple[DensityWindow, ...] = (
        DensityWindow(3, 60, 15), DensityWindow(5, 45, 10), DensityWindow(10, 40, 8), DensityWindow(45, 30, 6),
    )
    min_length_entropy: float = 2.5  # bits, note lengths rounded to 10 ms
    min_onset_gap_entropy: float = 0.0  # bits
    min_pitch_entropy: float = 3.0  # bits
    pitch_windows: tuple[PitchWindow, ...] = (PitchWindow(30, 5), PitchWindow(60, 8), PitchWindow(120, 10))
    min_unique_pitches: int = 12
    max_silence_s: float = 20.0  # a silence this long fails
    min_mean_velocity: float = 20.0
    max_mean_velocity: float = 105.0
    max_programs: int = 12
    max_instruments: int = 7
    min_notes_per_s: float = 1.5
    max_notes_per_s: float = 30.0
    min_notes_per_s_per_instrument: float = 1.0
    max_notes_per_s_per_instrument: float = 25.0
    min_length_s: float = 30.0
    max_length_s: float = math.inf  # Aria's v1 config adds 7200
    repetitive_min_length_min: float = 20.0  # shorter pieces are not checked
    repetitive_chunks: int = 5
    min_chunk_kl: float = 0.2  # bits; chunks this alike or closer are repetitive

    def __post_init__(self):
        _check_rule_names(self.enabled)
        seconds = [w.seconds for w in (*self.density_windows, *self.pitch_windows)]
        if not all(isinstance(s, int) and s >= 1 for s in seconds):
            raise ValueError(f"window lengths are whole seconds >= 1 (Aria's windows step by 1 s), got {seconds}")
        if not self.repetitive_min_length_min > 0:  # a piece spanning no time has no chunks: 0 / 0
            raise ValueError(f"repetitive_min_length_min must be above 0, got {self.repetitive_min_length_min}")

    @classmethod
    def preset(cls, name: str) -> QualityConfig:
        """``aria``: every rule on; ``light``: only LIGHT_RULES; ``off``: metrics only, every file passes;
        ``scores``: for score-derived MIDI such as the demo corpus (see SCORE_PRESET_CHANGES)."""
        presets = {"aria": RULES, "light": LIGHT_RULES, "off": (), "scores": RULES}
        if name not in presets:
            raise ValueError(f"unknown quality preset {name!r}; presets are {sorted(presets)}")
        config = cls(enabled=frozenset(presets[name]))
        if name == "scores":
            config = replace(config.without("note_timing_entropy"), **SCORE_PRESET_CHANGES)
        return config

    def without(self, *rules: str) -> QualityConfig:
        _check_rule_names(rules)
        return replace(self, enabled=self.enabled - set(rules))


def _check_rule_names(names: Iterable[str]) -> None:
    unknown = set(names) - set(RULES)
    if unknown:
        raise ValueError(f"unknown quality rules {sorted(unknown)}; rules are {list(RULES)}")


def evaluate_quality(
    notes_parts: Iterable[str],
    config: QualityConfig = QualityConfig(),
    file_ids: Iterable[str] | None = None,
    batch_files: int = DEFAULT_BATCH_FILES,
    con: duckdb.DuckDBPyConnection | None = None,
    workers: int | None = None,
    engine: str = "compiled",
) -> pa.Table:
    """One row per file of the midi_notes parts (or of ``file_ids`` among them), in file_id order.

    Columns: file_id, passed, failed_rules (enabled rules that failed, in RULES order), then the
    metrics. ``engine``: "compiled" (numba kernels; ~6x DuckDB's speed in bench/curation.py) or
    "duckdb" (the ``sql/quality_*.sql`` queries, the reference); both give the same table, bit for bit.
    Files go at most ``batch_files`` at a time (DuckDB stages them as Arrow tables). Given
    ``con``, the batches run in this process one after another (DuckDB's on ``con``'s threads).
    Otherwise they run ``workers`` at a time (None: all cores). The compiled engine's run in
    threads: its kernel and pyarrow's reads release the GIL, and a worker process costs a fork of
    this one (in bench/curation.py, a ~2 GB process: 7-8 M notes/s in processes, 13-14 M in
    threads). DuckDB's run in processes, this one among them, each with a single-threaded in-memory
    DuckDB: several DuckDB threads sum an entropy's terms in an order that varies from run to run
    (its last bit with it), one thread per batch gives the same rows on every run and for any
    batching, and the processes keep both cores busier than DuckDB's two threads do (~15 % faster
    measured).
    """
    parts = [str(p) for p in notes_parts]
    if not parts:
        raise ValueError("no midi_notes parts to evaluate")
    if batch_files < 1:
        raise ValueError(f"batch_files must be at least 1, got {batch_files}")
    if engine not in ENGINES:
        raise ValueError(f"unknown quality engine {engine!r}; engines are {list(ENGINES)}")
    wanted = sorted(set(file_ids)) if file_ids is not None else _file_ids(parts)
    if con is not None:
        evaluate = partial(_evaluate_batch, con=con) if engine == "duckdb" else _evaluate_compiled
        batches = [evaluate(parts, batch, config) for batch in _batches(wanted, batch_files)]
        return pa.concat_tables(batches).sort_by("file_id")
    evaluate = ENGINES[engine]
    workers = workers or os.cpu_count() or 1
    # equal batches, as many for every worker (the last to finish sets the time), at most batch_files
    rounds = max(1, math.ceil(len(wanted) / (workers * batch_files)))
    size = max(1, math.ceil(len(wanted) / (workers * rounds)))
    jobs = list(_batches(wanted, size))
    if len(jobs) == 1 or workers == 1:
        batches = [evaluate(parts, batch, config) for batch in jobs]
    elif engine == "compiled":
        with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
            batches = list(pool.map(evaluate, repeat(parts), jobs, repeat(config)))
    else:
        pa.array([0])  # pyarrow imports pandas on its first array (~0.3 s): the workers fork with it
        # this process takes every workers-th batch itself rather than wait: one fork and one
        # result sent back fewer
        own, others = jobs[::workers], [job for i, job in enumerate(jobs) if i % workers]
        with ProcessPoolExecutor(min(workers - 1, len(others))) as pool:
            from_pool = pool.map(evaluate, repeat(parts), others, repeat(config))
            batches = [evaluate(parts, job, config) for job in own] + list(from_pool)
    return pa.concat_tables(batches).sort_by("file_id")


def _evaluate_alone(parts: list[str], file_ids: list[str], config: QualityConfig) -> pa.Table:
    """A batch on a DuckDB of its own with one thread (see evaluate_quality)."""
    return _evaluate_batch(parts, file_ids, config, duckdb.connect(config={"threads": 1}))


def _evaluate_compiled(parts: list[str], file_ids: list[str], config: QualityConfig) -> pa.Table:
    """A batch through the compiled engine; a file whose onsets go back (midi_notes holds none)
    through the queries, which define the rules for notes in any order."""
    rules, out_of_order = rule_table(parts, file_ids, config, NOTE_LENGTH_CAP_MS)
    rows = _verdict([rules], config)
    if out_of_order:
        rows = pa.concat_tables([rows, _evaluate_alone(parts, out_of_order, config)]).sort_by("file_id")
    return rows


# The engines' batch functions (DuckDB's run in worker processes: module-level, so they pickle).
ENGINES = {"compiled": _evaluate_compiled, "duckdb": _evaluate_alone}


def _file_ids(parts: list[str]) -> list[str]:
    """Every file_id of the parts, sorted, from their file_id column alone (with pyarrow: opening a
    DuckDB for it took longer than the read; ParquetFile.read: half the time of read_table, which
    goes through the datasets layer)."""
    ids = pc.unique(pa.chunked_array(
        [pq.ParquetFile(part).read(columns=["file_id"], use_threads=False)["file_id"] for part in parts], pa.string()))
    return ids.take(pc.sort_indices(ids)).to_pylist()


def _batches(ids: list[str], size: int) -> Iterator[list[str]]:
    yield ids[:size]  # even with no files: the empty batch gives the result its schema
    for start in range(size, len(ids), size):
        yield ids[start : start + size]


# The staged batch: quality_stage_files' rows, and quality_stage_notes' rows built from them.
STAGED_TABLES = ("quality_files", "quality_pitch_notes")


def _evaluate_batch(parts: list[str], file_ids: list[str], config: QualityConfig, con) -> pa.Table:
    stage = {"notes": parts, "file_ids": file_ids, "drum_channel": DRUM_CHANNEL, "drum_instrument": INSTRUMENTS[DRUM]}
    # Arrow tables, not DuckDB temp tables: writing list columns into DuckDB storage costs more
    # than every query that reads them
    files = run_sql("quality_stage_files", stage, con)
    con.register("quality_files", _scan_batches(files, files["n_notes"]))
    try:
        pitches = run_sql("quality_stage_notes", {}, con)
        con.register("quality_pitch_notes", _scan_batches(pitches, pc.list_value_length(pitches["onsets"])))
        results = [
            run_sql("quality_file_stats", _file_stats_params(config), con),
            run_sql("quality_longest_silence", {"max_silence_s": config.max_silence_s}, con),
            *_per_window(con, "quality_note_density", _density_params(config.density_windows), config.density_windows),
            *_per_window(con, "quality_unique_pitch_window", _pitch_window_params(config.pitch_windows),
                         config.pitch_windows),
            run_sql("quality_repetitive_content", _repetition_params(config), con),
        ]
    finally:
        for name in STAGED_TABLES:
            con.unregister(name)
    return _verdict(results, config)


def _scan_batches(table: pa.Table, notes: pa.ChunkedArray) -> pa.Table:
    """The same rows, in record batches (DuckDB scans an Arrow table one batch per task) of at most
    SCAN_BATCH_ROWS rows that never straddle a 1/SCAN_BATCHES share of the ``notes`` (per row). The
    staged rows come shortest list first: cut by rows alone, the longest lists would all go to one
    thread; cut much finer, list_reduce would step through vectors of a few long lists."""
    weights = notes.to_numpy().astype(np.int64) + 1
    ends = np.cumsum(weights)
    share = np.searchsorted(ends, np.arange(1, SCAN_BATCHES) * ends[-1] / SCAN_BATCHES) if len(ends) else []
    cuts = np.unique(np.concatenate([[0], share, np.arange(0, len(ends), SCAN_BATCH_ROWS), [len(ends)]]))
    batches = [b for a, z in pairwise(cuts) for b in table.slice(a, z - a).to_batches()]
    return pa.Table.from_batches(batches, table.schema)


def _file_stats_params(config: QualityConfig) -> dict:
    names = (
        "min_length_entropy", "min_onset_gap_entropy", "min_pitch_entropy", "min_unique_pitches",
        "min_mean_velocity", "max_mean_velocity", "max_programs", "max_instruments", "min_notes_per_s",
        "max_notes_per_s", "min_notes_per_s_per_instrument", "max_notes_per_s_per_instrument",
        "min_length_s", "max_length_s",
    )
    return {"note_length_cap_ms": NOTE_LENGTH_CAP_MS, **{name: getattr(config, name) for name in names}}


def _density_params(windows: tuple[DensityWindow, ...]) -> dict:
    return {
        "windows": [w.seconds for w in windows],
        "max_notes_per_s": [float(w.max_notes_per_s) for w in windows],
        "max_notes_per_s_per_pitch": [float(w.max_notes_per_s_per_pitch) for w in windows],
    }


def _pitch_window_params(windows: tuple[PitchWindow, ...]) -> dict:
    return {"windows": [w.seconds for w in windows], "min_unique_pitches": [w.min_unique_pitches for w in windows]}


def _per_window(con, query: str, params: dict, windows: tuple) -> list[pa.Table]:
    """Run a query that gives one row per file and window (in f, then window order) and split it into
    one table per window, its metrics named after the window (file_id and verdicts keep their names)."""
    if not windows:
        return []
    table = run_sql(query, params, con)
    per_window = []
    for i, window in enumerate(windows):
        rows = table.take(pa.array(range(i, table.num_rows, len(windows)), pa.int64())).drop_columns(["window_s"])
        per_window.append(_suffixed(rows, f"_{window.seconds}s"))
    return per_window


def _repetition_params(config: QualityConfig) -> dict:
    return {
        "min_length_min": config.repetitive_min_length_min,
        "chunks": config.repetitive_chunks,
        "min_chunk_kl": config.min_chunk_kl,
    }


def _suffixed(table: pa.Table, suffix: str) -> pa.Table:
    """Name a per-window query's metrics after its window; file_id and rule verdicts keep their names."""
    keep = {"file_id", *RULES}
    return table.rename_columns([n if n in keep else n + suffix for n in table.column_names])


def _verdict(results: list[pa.Table], config: QualityConfig) -> pa.Table:
    """Join the per-query results (each one row per staged file, in the same order; the compiled
    engine's single table of every metric and verdict) into the output.

    A rule checked per window (density, unique pitches) passes only when every window passes; one
    configured with no windows has nothing to fail.
    """
    file_id = results[0]["file_id"]
    rule_passed: dict[str, pa.ChunkedArray] = {}
    metrics: dict[str, pa.ChunkedArray] = {}
    for table in results:
        assert table["file_id"].equals(file_id), "quality queries must list the staged files in one order"
        for name in table.column_names[1:]:
            if name in RULES:
                rule_passed[name] = pc.and_(rule_passed[name], table[name]) if name in rule_passed else table[name]
            else:
                metrics[name] = table[name]
    enabled = [rule for rule in RULES if rule in config.enabled and rule in rule_passed]
    # failed[i, j]: file i fails rule enabled[j] (a NULL verdict fails)
    failed = np.zeros((len(file_id), len(enabled)), dtype=bool)
    for j, rule in enumerate(enabled):
        failed[:, j] = ~pc.fill_null(rule_passed[rule], False).to_numpy(zero_copy_only=False)
    files, rules = np.nonzero(failed)  # file by file, rules in RULES order
    offsets = np.concatenate([[0], np.cumsum(np.bincount(files, minlength=len(file_id)))]).astype(np.int32)
    return pa.table({
        "file_id": file_id,
        "passed": pa.array(~failed.any(axis=1), pa.bool_()),
        "failed_rules": pa.ListArray.from_arrays(
            offsets, pa.array(np.array(enabled, dtype=object)[rules], pa.string())
        ),
        **metrics,
    })
