"""The compiled quality engine: midi_notes parts -> each file's metrics and rule verdicts, without SQL.

``rule_table`` gives what the ``sql/quality_*.sql`` queries give together, the same columns with
the same values: file_id, every metric, and a column per rule (a per-window rule already joined
over its windows). It reads the parts with pyarrow, only the row groups whose file_id range meets
the batch and only the columns the rules use, READ_ROWS rows at a time, and hands their flat note
arrays to ``quality_kernels.file_metrics`` (one compiled call per read); what is left per file
(ratios, thresholds) is numpy over the files. ``aria_model.quality.evaluate_quality`` runs it in
worker threads (the kernel releases the GIL).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aria_model import quality_kernels as kernels
from aria_model.midi import DRUM, DRUM_CHANNEL, INSTRUMENTS
from aria_model.notes_table import list_values

if TYPE_CHECKING:
    from aria_model.quality import QualityConfig

# The note lists the rules read, as midi_notes stores them.
NOTE_DTYPES = {"onset_ms": np.int64, "duration": np.int32, "pitch": np.uint8, "velocity": np.uint8,
               "channel": np.uint8}
COLUMNS = ["file_id", *NOTE_DTYPES, "instruments"]
READ_ROWS = 1024  # rows read at once: fewer Python steps than row group by row group, the notes still in cache


def rule_table(parts: list[str], file_ids: list[str], config: QualityConfig,
               note_length_cap_ms: int) -> tuple[pa.Table, list[str]]:
    """(file_id, metrics and verdicts of the wanted files found in ``parts``; the file_ids whose
    onsets go back, left out of the table: their notes are not in Aria's order)."""
    settings = _kernel_settings(config, note_length_cap_ms)
    ids, n_instruments, metrics = [], [np.zeros(0, np.int64)], [_no_files(settings)]  # no file: right shapes
    for batch, rows in _wanted_rows(parts, file_ids):
        offsets, notes = _note_arrays(batch)
        ids.extend(batch["file_id"].take(pa.array(rows)).chunks)
        n_instruments.append(_instrument_classes(batch["instruments"])[rows])
        metrics.append(kernels.file_metrics(offsets, rows, *notes, *settings))
    file_id = pa.chunked_array(ids, pa.string()).combine_chunks()
    ints, floats, density, fewest = (np.concatenate(parts_of) for parts_of in zip(*metrics))
    in_order = ints[:, kernels.ONSETS_IN_ORDER] == 1
    out_of_order = pc.filter(file_id, pa.array(~in_order)).to_pylist()
    columns = _columns(np.concatenate(n_instruments), ints, floats, density, fewest, config)
    return pa.table({"file_id": file_id, **columns}).filter(pa.array(in_order)), out_of_order


def _kernel_settings(config: QualityConfig, note_length_cap_ms: int) -> tuple:
    """file_metrics' arguments after the notes."""
    return (DRUM_CHANNEL, note_length_cap_ms // 10, np.array([w.seconds for w in config.density_windows], np.int64),
            np.array([w.seconds for w in config.pitch_windows], np.int64),
            float(config.repetitive_min_length_min) * 60_000, int(config.repetitive_chunks))


def load_kernel(config: QualityConfig, note_length_cap_ms: int) -> None:
    """Compile the kernel (or load it from numba's cache) now rather than in the first batch (a
    benchmark's timing leaves numba's work out)."""
    _no_files(_kernel_settings(config, note_length_cap_ms))


def _no_files(settings: tuple) -> tuple:
    """file_metrics' arrays for no file, from the kernel itself (with the types of a real call)."""
    no_notes = [_read_only(np.zeros(0, dtype)) for dtype in NOTE_DTYPES.values()]
    return kernels.file_metrics(np.zeros(1, np.int64), np.zeros(0, np.int64), *no_notes, *settings)


def _note_arrays(batch: pa.Table) -> tuple[np.ndarray, list[np.ndarray]]:
    """(offsets, NOTE_DTYPES' flat values) of a record batch, read-only as Arrow's zero-copy views are:
    numba compiles a function once per argument types, read-only and writable arrays apart."""
    lists = [list_values(batch[name]) for name in NOTE_DTYPES]
    offsets = lists[0][1]
    if not all(np.array_equal(offsets, other) for _, other in lists[1:]):
        raise ValueError("the note lists of a midi_notes row differ in length")
    dtypes = NOTE_DTYPES.values()
    return offsets, [_read_only(values.astype(dtype, copy=False)) for (values, _), dtype in zip(lists, dtypes)]


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _wanted_rows(parts: list[str], file_ids: list[str]) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(COLUMNS of some row groups that may hold wanted files, the rows of wanted files), about
    READ_ROWS rows at a time. Parts are written in file_id order, so the row groups' file_id
    statistics skip most groups."""
    if not file_ids:
        return
    wanted = set(file_ids)  # a set once: pc.is_in would hash every wanted id again per read
    first, last = file_ids[0], file_ids[-1]
    for part in parts:
        parquet = pq.ParquetFile(part)
        id_column = parquet.schema_arrow.names.index("file_id")
        groups = [group for group in range(parquet.num_row_groups)
                  if _may_hold(parquet.metadata.row_group(group).column(id_column).statistics, first, last)]
        rows_per_group = max(1, parquet.metadata.num_rows // max(1, parquet.num_row_groups))
        step = max(1, READ_ROWS // rows_per_group)
        for start in range(0, len(groups), step):
            table = parquet.read_row_groups(groups[start:start + step], columns=COLUMNS, use_threads=False)
            rows = np.flatnonzero([file_id in wanted for file_id in table["file_id"].to_pylist()])
            if len(rows):
                yield table, rows


def _may_hold(stats: pq.Statistics | None, first: str, last: str) -> bool:
    return stats is None or not stats.has_min_max or (stats.min <= last and stats.max >= first)


def _instrument_classes(instruments: pa.ChunkedArray) -> np.ndarray:
    """Declared instrument classes of each row, drums apart, at least 1 (Aria: piano when none)."""
    names = pc.list_flatten(instruments)
    owner = pc.list_parent_indices(instruments).to_numpy()
    not_drum = pc.fill_null(pc.not_equal(names, INSTRUMENTS[DRUM]), False).to_numpy(zero_copy_only=False)
    return np.maximum(np.bincount(owner[not_drum], minlength=len(instruments)), 1)


def _columns(n_instruments: np.ndarray, ints: np.ndarray, floats: np.ndarray, density: np.ndarray,
             fewest: np.ndarray, config: QualityConfig) -> dict[str, np.ndarray]:
    """The queries' metric columns, in their order, then each rule's verdict (named after the rule)."""
    k = kernels
    n_notes, n_tonal, span = ints[:, k.N_NOTES], ints[:, k.N_TONAL], ints[:, k.SPAN_MS]
    length_s = span / 1000
    notes_per_s = np.divide(n_notes * 1000, span, out=np.zeros(len(span)), where=span != 0)
    per_instrument = notes_per_s / n_instruments
    # DuckDB's avg of integers divides in long double, then rounds to double: so does this
    mean_velocity = np.divide(ints[:, k.VELOCITY_SUM].astype(np.longdouble), n_tonal.astype(np.longdouble),
                              out=np.zeros(len(n_tonal), np.longdouble), where=n_tonal > 0).astype(np.float64)
    pitch_entropy, length_entropy, onset_gap_entropy = (floats[:, j] for j in
                                                        (k.PITCH_ENTROPY, k.LENGTH_ENTROPY, k.ONSET_GAP_ENTROPY))
    silence_s = ints[:, k.LONGEST_GAP_MS] / 1000
    unique_pitches, n_channels = ints[:, k.UNIQUE_PITCHES], ints[:, k.N_CHANNELS]
    tonal = n_tonal > 0
    columns = {
        "n_notes": n_notes, "n_tonal_notes": n_tonal, "length_s": length_s, "notes_per_s": notes_per_s,
        "notes_per_s_per_instrument": per_instrument, "n_instruments": n_instruments, "n_channels": n_channels,
        "mean_velocity": mean_velocity, "pitch_entropy": pitch_entropy, "unique_pitches": unique_pitches,
        "length_entropy": length_entropy, "onset_gap_entropy": onset_gap_entropy, "longest_silence_s": silence_s,
    }
    density_ok = tonal.copy()
    for w, window in enumerate(config.density_windows):
        notes, pitch_notes = density[:, w, 0], density[:, w, 1]
        columns[f"max_notes_per_s_{window.seconds}s"] = notes / window.seconds
        columns[f"max_notes_per_s_per_pitch_{window.seconds}s"] = pitch_notes / window.seconds
        density_ok &= (notes <= float(window.max_notes_per_s) * window.seconds) \
            & (pitch_notes <= float(window.max_notes_per_s_per_pitch) * window.seconds)
    pitch_window_ok = tonal.copy()
    for w, window in enumerate(config.pitch_windows):
        columns[f"min_unique_pitches_{window.seconds}s"] = fewest[:, w].astype(np.int32)
        pitch_window_ok &= fewest[:, w] >= window.min_unique_pitches
    kl, has_kl = floats[:, k.MAX_CHUNK_KL], ints[:, k.HAS_CHUNK_KL] == 1
    columns["max_chunk_kl"] = kl
    c = config
    verdicts = {
        "note_timing_entropy": tonal & (length_entropy >= c.min_length_entropy)
        & (onset_gap_entropy >= c.min_onset_gap_entropy),
        "note_pitch_entropy": tonal & (pitch_entropy >= c.min_pitch_entropy),
        "unique_pitch_count": unique_pitches >= c.min_unique_pitches,
        "mean_note_velocity": tonal & (mean_velocity >= c.min_mean_velocity) & (mean_velocity <= c.max_mean_velocity),
        "max_programs": n_channels <= c.max_programs,
        "max_instruments": n_instruments <= c.max_instruments,
        "total_note_frequency": (span > 0) & (notes_per_s >= c.min_notes_per_s) & (notes_per_s <= c.max_notes_per_s),
        "note_frequency_per_instrument": (span > 0) & (per_instrument >= c.min_notes_per_s_per_instrument)
        & (per_instrument <= c.max_notes_per_s_per_instrument),
        "length": (n_notes > 0) & (length_s >= c.min_length_s) & (length_s <= c.max_length_s),
        "silent_interval": (n_notes > 0) & (silence_s < c.max_silence_s),
        "repetitive_content": tonal & (~has_kl | (kl > c.min_chunk_kl)),
    }
    if config.density_windows:  # a per-window rule with no windows has nothing to fail (no column)
        verdicts["note_density_in_interval"] = density_ok
    if config.pitch_windows:
        verdicts["unique_pitch_count_in_interval"] = pitch_window_ok
    return {**columns, **verdicts}
