"""Tick -> millisecond conversion over a MIDI tempo map, bit-exact with Aria.

Aria (ariautils ``get_duration_ms``) walks the tempo map once per note in Python,
summing ``delta_tick * (tempo * 1e-6 / ticks_per_beat)`` segment by segment in
float64 and rounding ``seconds * 1e3`` half-to-even. Its walk has quirks that
change token ids, so they are reproduced here rather than "fixed":

- ticks before the first tempo message use the first tempo;
- with a single tempo message at tick t0 > 0, any end tick <= t0 maps to 0 ms;
- when the start tick lies after the last tempo message (and there are several),
  the walk starts one message too early and adds a negative segment at the
  second-to-last tempo before the last one.

The float additions happen in the same order as Aria's loop, so every value is
identical, not just close.
"""

from __future__ import annotations

import numpy as np


def tempo_scales(tempo_us: np.ndarray, ticks_per_beat: int) -> np.ndarray:
    """Seconds per tick for each tempo, computed as mido's ``tick2second`` does."""
    return tempo_us.astype(np.float64) * 1e-6 / ticks_per_beat


def elapsed_ms(
    start_tick: int | np.ndarray,
    end_tick: np.ndarray,
    tempo_tick: np.ndarray,
    tempo_us: np.ndarray,
    ticks_per_beat: int,
) -> np.ndarray:
    """Milliseconds from ``start_tick`` to each ``end_tick`` (int64), as Aria computes them.

    ``start_tick`` is either one tick shared by all ends (onsets measured from the
    first note) or one tick per end (note durations). ``tempo_tick`` must be sorted.
    """
    end = np.asarray(end_tick, dtype=np.int64)
    ticks = np.asarray(tempo_tick, dtype=np.int64)
    scale = tempo_scales(np.asarray(tempo_us), ticks_per_beat)
    if len(ticks) == 0:
        raise ValueError("tempo map is empty")
    if len(ticks) == 1:
        return one_tempo_elapsed_ms(np.asarray(start_tick, dtype=np.int64), end, ticks[0], scale[0])
    if np.ndim(start_tick) == 0:
        seconds = _seconds_from_shared_start(int(start_tick), end, ticks, scale)
    else:
        seconds = _seconds_from_own_starts(np.asarray(start_tick, dtype=np.int64), end, ticks, scale)
    return np.rint(seconds * 1e3).astype(np.int64)


def one_tempo_elapsed_ms(start_tick, end_tick, tempo_tick, scale) -> np.ndarray:
    """``elapsed_ms`` for a tempo map of one entry (at ``tempo_tick``, ``scale`` seconds a tick: see
    ``tempo_scales``), element by element: the tempo may differ per element, so the notes of many
    files convert in one call. Ends at or before the tempo's tick map to 0 ms, as in Aria's walk."""
    seconds = np.where(end_tick > tempo_tick, (end_tick - start_tick) * scale, 0.0)
    return np.rint(seconds * 1e3).astype(np.int64)


def _walk_origin(start: np.ndarray | int, ticks: np.ndarray) -> np.ndarray | int:
    """Index of the tempo message Aria's walk starts from (its off-by-one included)."""
    n = len(ticks)
    first_at_or_after = np.searchsorted(ticks, start, side="left")
    return np.where(first_at_or_after == n, n - 2, np.maximum(first_at_or_after - 1, 0))


def _full_segments(origin, end: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    """How many whole tempo segments the walk adds before the partial one."""
    n_segments = len(ticks) - 1 - origin
    return np.clip(np.searchsorted(ticks, end, side="right") - (origin + 1), 0, n_segments)


def _add_partial(seconds, start, end, origin, n_full, ticks, scale) -> np.ndarray:
    n = len(ticks)
    broke_inside = n_full < n - 1 - origin
    segment = np.where(broke_inside, origin + n_full, n - 1)
    segment_start = np.where(n_full == 0, start, ticks[np.minimum(origin + n_full, n - 1)])
    partial = (end - segment_start) * scale[segment]
    return np.where(broke_inside | (end > ticks[-1]), seconds + partial, seconds)


def _seconds_from_shared_start(start: int, end, ticks, scale) -> np.ndarray:
    origin = int(_walk_origin(start, ticks))
    # One running sum serves every note: the same additions in the same order.
    steps = np.empty(len(ticks) - origin - 1, dtype=np.float64)
    steps[0] = (ticks[origin + 1] - start) * scale[origin]
    steps[1:] = np.diff(ticks[origin + 1 :]) * scale[origin + 1 : -1]
    running = np.concatenate(([0.0], np.cumsum(steps)))
    n_full = _full_segments(origin, end, ticks)
    return _add_partial(running[n_full], start, end, origin, n_full, ticks, scale)


def _seconds_from_own_starts(start: np.ndarray, end, ticks, scale) -> np.ndarray:
    origin = _walk_origin(start, ticks)
    n_full = _full_segments(origin, end, ticks)
    seconds = np.zeros(len(end), dtype=np.float64)
    first = n_full >= 1
    seconds[first] = (ticks[origin[first] + 1] - start[first]) * scale[origin[first]]
    whole = np.diff(ticks) * scale[:-1]
    # Notes rarely span more than a few tempo changes, so this loop is short.
    active = np.nonzero(n_full > 1)[0]
    step = 1
    while active.size:
        seconds[active] += whole[origin[active] + step]
        step += 1
        active = active[n_full[active] > step]
    return _add_partial(seconds, start, end, origin, n_full, ticks, scale)
