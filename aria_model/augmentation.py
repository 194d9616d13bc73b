"""Aria's training-time augmentations of AbsTokenizer id windows, vectorised with numpy.

A training window is a 1-D id array cut blindly from concatenated tokenized
files: it may start mid-piece (no prefix, no ``<S>``), hold several ``<E>`` and
end in ``<P>`` padding. As in ariautils' ``export_aug_fn_concat``, every
augmentation splits the window after each ``<E>``, augments each piece with its
own random draw, rejoins them and cuts or pads with ``<P>`` back to the
window's length.

- ``tempo_aug``: one factor in [0.8, 1.2] per piece scales every absolute time
  (``<T>`` count x 5000 + onset) and re-quantises it to the 10 ms grid; durations
  are scaled and clipped to [10, 5000]; notes sharing an onset are shuffled
  ("mixup"); ``<T>`` markers are rebuilt, ``<D>`` is re-attached after the
  events at the time where it sat, ``<U>``/``<P>`` and stray tokens are dropped.
- ``pitch_aug``: one shift in [-5, 5] per piece; a note leaving 0..127 becomes
  ``<U>``; drums are untouched.
- ``velocity_aug``: one shift of -1, 0 or +1 velocity steps per piece; every
  note velocity is clipped to [10, 120] (so velocity 0 becomes 10 even unshifted).

Usage, in Aria's order (tempo, pitch, velocity)::

    augmentations = export_data_aug(AbsTokenizer())
    rng = np.random.default_rng(seed)
    for augment in augmentations:
        window = augment(window, rng)

Random draws, per piece and in window order, so a test can replay them:
``tempo_aug`` draws ``rng.uniform`` (unless ``factor`` is given) then
``rng.permutation(number of events)`` as shuffle keys (when ``mixup``);
``pitch_aug`` and ``velocity_aug`` draw one ``rng.integers`` each unless the
shift is given.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from aria_model.tokenizer import AbsTokenizer

Augmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# Tokens that tempo_aug re-attaches after the last event at their time, in this order.
# Aria's optional "<X>" delimiter is handled when the tokenizer's vocabulary has one.
MARKER_TOKENS = ("<D>", "<X>")


def export_data_aug(tokenizer: AbsTokenizer) -> list[Augmentation]:
    """Aria's ``export_data_aug``: tempo (with mixup), pitch, velocity, at Aria's maxima."""
    return [partial(tempo_aug, tokenizer), partial(pitch_aug, tokenizer), partial(velocity_aug, tokenizer)]


def augment_each_piece(
    tokenizer: AbsTokenizer, ids: np.ndarray, augment_piece: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Aria's ``export_aug_fn_concat``: augment each ``<E>``-terminated piece, keep the length."""
    ids = np.asarray(ids)
    cuts = np.flatnonzero(ids == tokenizer.eos_id) + 1
    pieces = [piece for piece in np.split(ids.astype(np.int64), cuts) if len(piece)]
    joined = np.concatenate([augment_piece(piece) for piece in pieces] or [np.zeros(0, np.int64)])
    window = np.full(len(ids), tokenizer.pad_id, dtype=ids.dtype)
    kept = joined[: len(ids)]
    window[: len(kept)] = kept
    return window


# -- pitch and velocity -------------------------------------------------------------


def pitch_aug(
    tokenizer: AbsTokenizer,
    ids: np.ndarray,
    rng: np.random.Generator,
    shift: int | None = None,
    max_shift: int = 5,
) -> np.ndarray:
    """Transpose every note of each piece by ``shift`` (drawn per piece when None)."""

    def shift_piece(piece: np.ndarray) -> np.ndarray:
        semitones = shift if shift is not None else int(rng.integers(-max_shift, max_shift + 1))
        return _shift_pitch(tokenizer, piece, semitones)

    return augment_each_piece(tokenizer, ids, shift_piece)


def velocity_aug(
    tokenizer: AbsTokenizer,
    ids: np.ndarray,
    rng: np.random.Generator,
    steps: int | None = None,
    max_steps: int = 1,
) -> np.ndarray:
    """Move every note velocity of each piece by ``steps`` grid steps (drawn per piece when None)."""

    def shift_piece(piece: np.ndarray) -> np.ndarray:
        n_steps = steps if steps is not None else int(rng.integers(-max_steps, max_steps + 1))
        return _shift_velocity(tokenizer, piece, n_steps)

    return augment_each_piece(tokenizer, ids, shift_piece)


def _note_fields(tokenizer: AbsTokenizer, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which ids are note tokens, and their pitch and velocity level (valid where a note)."""
    lay = tokenizer.layout
    n_levels = len(tokenizer.velocities)
    is_note = (ids >= lay.note) & (ids < lay.drum)
    offset = ids - lay.note
    return is_note, offset // n_levels % 128, offset % n_levels


def _shift_pitch(tokenizer: AbsTokenizer, piece: np.ndarray, semitones: int) -> np.ndarray:
    is_note, pitch, _ = _note_fields(tokenizer, piece)
    shifted = pitch + semitones
    in_range = (shifted >= 0) & (shifted <= 127)
    moved = np.where(in_range, piece + semitones * len(tokenizer.velocities), tokenizer.unk_id)
    return np.where(is_note, moved, piece)


def _shift_velocity(tokenizer: AbsTokenizer, piece: np.ndarray, steps: int) -> np.ndarray:
    is_note, _, level = _note_fields(tokenizer, piece)
    # Aria clamps to [one step, top level]: 10..120 on the default grid.
    clamped = np.clip(level + steps, 1, len(tokenizer.velocities) - 1)
    return np.where(is_note, piece - level + clamped, piece)


# -- tempo ------------------------------------------------------------------------------


def tempo_aug(
    tokenizer: AbsTokenizer,
    ids: np.ndarray,
    rng: np.random.Generator,
    factor: float | None = None,
    max_change: float = 0.2,
    mixup: bool = True,
) -> np.ndarray:
    """Scale each piece's timing by ``factor`` (drawn per piece in [1 - max_change, 1 + max_change]).

    With ``mixup``, events that shared a time in the source come out in a random order.
    """

    def retime_piece(piece: np.ndarray) -> np.ndarray:
        scale = factor if factor is not None else rng.uniform(1 - max_change, 1 + max_change)
        return _retime_piece(tokenizer, piece, scale, rng if mixup else None)

    return augment_each_piece(tokenizer, ids, retime_piece)


def _retime_piece(
    tokenizer: AbsTokenizer, piece: np.ndarray, factor: float, shuffle_rng: np.random.Generator | None
) -> np.ndarray:
    """One piece through Aria's tempo_aug: head kept, events re-timed, ``<T>`` rebuilt."""
    c, lay = tokenizer.config, tokenizer.layout
    head_len = _head_length(tokenizer, piece)
    head, body = piece[:head_len], piece[head_len:]
    starts, swallowed = _read_events(tokenizer, body)
    live = ~swallowed
    segment = np.cumsum((body == tokenizer.time_id) & live)[starts]
    src_ms = segment * c.segment_ms + (body[starts + 1] - lay.onset) * c.time_step_ms
    keys = shuffle_rng.permutation(len(starts)) if shuffle_rng is not None else np.arange(len(starts))
    order = np.lexsort((keys, src_ms))  # by time; events at the same time by their random key
    markers = _marker_slots(tokenizer, body, live, starts, src_ms, src_ms[order])
    events = _write_events(tokenizer, body, starts[order], src_ms[order], factor, markers)
    saw_eos = ((body == tokenizer.eos_id) & live).any()
    tail = np.array([tokenizer.eos_id] if saw_eos else [], dtype=np.int64)
    return np.concatenate([head, events, tail])


def _write_events(
    tokenizer: AbsTokenizer,
    body: np.ndarray,
    starts: np.ndarray,
    src_ms: np.ndarray,
    factor: float,
    markers: list[tuple[int, int]],
) -> np.ndarray:
    """Events in output order at their scaled times, each preceded by the ``<T>`` it crosses."""
    c, lay = tokenizer.config, tokenizer.layout
    events = body[starts]
    tgt_ms = _scale_ms(src_ms, factor, c.time_step_ms)
    n_time = np.diff(tgt_ms // c.segment_ms, prepend=0)
    span = np.where(events < lay.drum, 3, 2)  # notes carry a duration, drum hits do not
    length = n_time + span + np.bincount([slot for slot, _ in markers], minlength=len(events))
    end = np.cumsum(length)
    first = end - length + n_time
    out = np.full(int(end[-1]) if len(end) else 0, tokenizer.time_id, dtype=np.int64)
    out[first] = events
    out[first + 1] = lay.onset + (tgt_ms % c.segment_ms) // c.time_step_ms
    is_note = span == 3
    src_dur_ms = (body[starts[is_note] + 2] - lay.dur) * c.time_step_ms
    tgt_dur_ms = np.clip(_scale_ms(src_dur_ms, factor, c.time_step_ms), c.time_step_ms, c.max_dur_ms)
    out[first[is_note] + 2] = lay.dur + tgt_dur_ms // c.time_step_ms
    after_event = first + span
    for slot, marker in markers:
        out[after_event[slot]] = marker
        after_event[slot] += 1
    return out


def _scale_ms(ms: np.ndarray, factor: float, step: int) -> np.ndarray:
    """``round(ms * factor / step) * step`` with Aria's float operations and half-to-even rounding."""
    return np.round(ms * factor / step).astype(np.int64) * step


def _head_length(tokenizer: AbsTokenizer, piece: np.ndarray) -> int:
    """Length of the leading run of ``<S>`` and prefix tokens, which tempo_aug keeps as is."""
    lay = tokenizer.layout
    in_head = (piece == tokenizer.bos_id) | ((piece >= lay.prefix) & (piece < lay.note))
    first_other = np.flatnonzero(~in_head)
    return int(first_other[0]) if len(first_other) else len(piece)


def _read_events(tokenizer: AbsTokenizer, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start of every event Aria's reader keeps, and the tokens it swallows in broken groups.

    Aria reads a note as the next three tokens and a drum hit as the next two,
    whatever they are, and drops the group unless it is (note, onset, dur) or
    (drum, onset). Complete groups only cover onset/dur tokens, so the reader can
    go off track only at a broken group (in tokenizer output: an event cut by the
    window's end); those few are replayed in order.
    """
    lay = tokenizer.layout
    n = len(body)
    ahead = np.concatenate([body, [-1, -1]])
    is_note = (body >= lay.note) & (body < lay.drum)
    is_drum = (body >= lay.drum) & (body < lay.dur)
    onset_next = (ahead[1 : n + 1] >= lay.onset) & (ahead[1 : n + 1] < lay.size)
    dur_after = (ahead[2 : n + 2] >= lay.dur) & (ahead[2 : n + 2] < lay.onset)
    complete = (is_note & onset_next & dur_after) | (is_drum & onset_next)
    span = np.where(is_note, 3, 2)  # read only at note and drum tokens
    swallowed = np.zeros(n, dtype=bool)
    read_up_to = 0
    for broken in np.flatnonzero((is_note | is_drum) & ~complete).tolist():
        if broken >= read_up_to:  # not itself inside an earlier broken group
            read_up_to = broken + int(span[broken])
            swallowed[broken:read_up_to] = True
    return np.flatnonzero(complete & ~swallowed), swallowed


def _marker_slots(
    tokenizer: AbsTokenizer,
    body: np.ndarray,
    live: np.ndarray,
    starts: np.ndarray,
    src_ms: np.ndarray,
    src_sorted: np.ndarray,
) -> list[tuple[int, int]]:
    """(output event index, marker id) for each marker tempo_aug re-attaches.

    Aria remembers the latest time read before the (last) marker, (0, 0) if none,
    and writes the marker after the events at that time; with no event there, the
    marker is lost.
    """
    slots = []
    for marker in [tokenizer.tok_to_id[name] for name in MARKER_TOKENS if name in tokenizer.tok_to_id]:
        seen_at = np.flatnonzero((body == marker) & live)
        if not len(seen_at):
            continue
        at_ms = src_ms[starts < seen_at[-1]].max(initial=0)
        slot = np.searchsorted(src_sorted, at_ms, side="right") - 1
        if slot >= 0 and src_sorted[slot] == at_ms:
            slots.append((int(slot), marker))
    return slots
