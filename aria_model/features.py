"""Handcrafted features of a ``Performance``: the baseline a learned embedding has to beat.

One fixed-length float32 vector per file, in named blocks (``FEATURE_NAMES``, ``FEATURE_BLOCKS``):

    block          size  what
    pitch_class      12  share of notes on each pitch class C..B (sums to 1)
    interval         25  share of melodic intervals -12..+12 semitones (wider ones clipped to +-12)
    interval_kind     5  share of |interval| that is 0, 1-2, 3-4, 5-12, and over an octave (unclipped)
    density           2  notes and onset events per second
    velocity          2  mean and standard deviation of the velocity
    duration          2  mean and standard deviation of the note length, seconds
    pitch             4  mean, standard deviation, lowest and highest MIDI pitch
    polyphony         2  mean and largest number of notes sounding at an onset

The melody is the top line: onsets closer than ``CHORD_MS`` form one event (a chord, rolled or
jittered in a performance), an event stands for its highest pitch, and intervals are taken between
successive events, as ``aria_model.dedup`` reads a melody. Times are the milliseconds Aria's
tokenizer sees (``Performance.onset_ms``/``duration_ms``: tempo map and sustain pedal applied).

    from aria_model.features import handcrafted_features, FEATURE_NAMES
    vector = handcrafted_features(load_midi(path))          # shape (len(FEATURE_NAMES),)
    matrix = features_of_files({file_id: path, ...})        # {file_id: vector}

The blocks differ in scale by four orders of magnitude (shares ~0.05, pitches ~60), so a linear
probe on them needs standardised inputs (``aria_model.probe.ProbeConfig.standardize``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from aria_model.midi import Performance, load_midi

CHORD_MS = 50  # onsets closer than this are one event, as in aria_model.dedup
MAX_INTERVAL = 12  # intervals clip to an octave either way
# Upper bounds (inclusive) of |interval| per kind; the last kind is everything above an octave.
INTERVAL_KIND_BOUNDS = (("unison", 0), ("step", 2), ("third", 4), ("leap", 12))
PITCH_CLASS_NAMES = ("C", "Cs", "D", "Ds", "E", "F", "Fs", "G", "Gs", "A", "As", "B")

_BLOCK_NAMES = {
    "pitch_class": tuple(f"pitch_class_{name}" for name in PITCH_CLASS_NAMES),
    "interval": tuple(f"interval_{step:+d}" for step in range(-MAX_INTERVAL, MAX_INTERVAL + 1)),
    "interval_kind": tuple(f"interval_{kind}" for kind, _ in INTERVAL_KIND_BOUNDS) + ("interval_over_octave",),
    "density": ("notes_per_second", "onsets_per_second"),
    "velocity": ("velocity_mean", "velocity_std"),
    "duration": ("duration_mean_s", "duration_std_s"),
    "pitch": ("pitch_mean", "pitch_std", "pitch_min", "pitch_max"),
    "polyphony": ("polyphony_mean", "polyphony_max"),
}
FEATURE_NAMES: tuple[str, ...] = tuple(name for names in _BLOCK_NAMES.values() for name in names)


def _block_slices() -> dict[str, slice]:
    slices, start = {}, 0
    for block, names in _BLOCK_NAMES.items():
        slices[block] = slice(start, start + len(names))
        start += len(names)
    return slices


FEATURE_BLOCKS: dict[str, slice] = _block_slices()


def feature_columns(blocks: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> np.ndarray:
    """Column indices of the named blocks (all when None) minus ``exclude``, in vector order.

    The demo corpus needs ``exclude=("velocity",)``: its velocities are flat except the accent
    marks only the ABC collections write (see ``aria_model.probe_data`` on trivial cues).
    """
    chosen = set(FEATURE_BLOCKS if blocks is None else blocks) - set(exclude)
    unknown = chosen - set(FEATURE_BLOCKS)
    if unknown:
        raise ValueError(f"unknown feature blocks {sorted(unknown)}; known: {list(FEATURE_BLOCKS)}")
    return np.concatenate(
        [np.arange(FEATURE_BLOCKS[block].start, FEATURE_BLOCKS[block].stop) for block in FEATURE_BLOCKS if block in chosen]
        or [np.zeros(0, np.int64)]
    )


def handcrafted_features(perf: Performance) -> np.ndarray:
    """The feature vector of one performance (all zeros for one without notes)."""
    vector = np.zeros(len(FEATURE_NAMES), np.float64)
    if perf.n_notes == 0:
        return vector.astype(np.float32)
    onset = perf.onset_ms().astype(np.float64)
    duration = perf.duration_ms().astype(np.float64)
    pitch = perf.pitch.astype(np.int64)
    velocity = perf.velocity.astype(np.float64)
    event_start, top_pitch = melody_events(onset, pitch)
    intervals = np.diff(top_pitch)

    vector[FEATURE_BLOCKS["pitch_class"]] = np.bincount(pitch % 12, minlength=12) / len(pitch)
    vector[FEATURE_BLOCKS["interval"]] = _shares(np.clip(intervals, -MAX_INTERVAL, MAX_INTERVAL) + MAX_INTERVAL,
                                                 2 * MAX_INTERVAL + 1)
    vector[FEATURE_BLOCKS["interval_kind"]] = _shares(_interval_kinds(np.abs(intervals)), len(INTERVAL_KIND_BOUNDS) + 1)
    length_s = (np.max(onset + duration) - onset.min()) / 1000
    if length_s > 0:
        vector[FEATURE_BLOCKS["density"]] = (len(pitch) / length_s, len(event_start) / length_s)
    vector[FEATURE_BLOCKS["velocity"]] = (velocity.mean(), velocity.std())
    vector[FEATURE_BLOCKS["duration"]] = (duration.mean() / 1000, duration.std() / 1000)
    vector[FEATURE_BLOCKS["pitch"]] = (pitch.mean(), pitch.std(), pitch.min(), pitch.max())
    sounding = sounding_at_onsets(onset, duration)
    vector[FEATURE_BLOCKS["polyphony"]] = (sounding.mean(), sounding.max())
    return vector.astype(np.float32)


def melody_events(onset_ms: np.ndarray, pitch: np.ndarray, chord_ms: int = CHORD_MS) -> tuple[np.ndarray, np.ndarray]:
    """(start ms, highest pitch) of each event; notes sorted by onset, chained within ``chord_ms``.

    A note starts a new event when it comes more than ``chord_ms`` after the previous note, so
    a rolled chord whose notes follow each other closely stays one event.
    """
    starts_event = np.concatenate([[True], np.diff(onset_ms) > chord_ms])
    first = np.flatnonzero(starts_event)
    return onset_ms[first], np.maximum.reduceat(pitch, first)


def sounding_at_onsets(onset_ms: np.ndarray, duration_ms: np.ndarray) -> np.ndarray:
    """Notes sounding at each distinct onset time (started at or before it, not yet ended)."""
    # A zero-length note still sounds at its own onset.
    end = onset_ms + np.maximum(duration_ms, 1)
    times = np.unique(onset_ms)
    started = np.searchsorted(np.sort(onset_ms), times, side="right")
    ended = np.searchsorted(np.sort(end), times, side="right")
    return started - ended


def _interval_kinds(size: np.ndarray) -> np.ndarray:
    bounds = np.array([bound for _, bound in INTERVAL_KIND_BOUNDS])
    return np.searchsorted(bounds, size, side="left")


def _shares(codes: np.ndarray, bins: int) -> np.ndarray:
    if len(codes) == 0:
        return np.zeros(bins)
    return np.bincount(codes, minlength=bins) / len(codes)


def features_of_files(paths: Mapping[str, str | Path]) -> dict[str, np.ndarray]:
    """{file_id: feature vector} for {file_id: MIDI path}; a file that fails to load raises."""
    return {file_id: handcrafted_features(load_midi(path)) for file_id, path in paths.items()}
