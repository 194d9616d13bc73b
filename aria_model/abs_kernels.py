"""Compiled loops of ``AbsTokenizer``: the bodies of many performances, and their full id sequences.

A loop over notes in numba, where numpy needed a pass (and a temporary array) per step: on
Aria-MIDI-length files the bodies come ~6x faster (68 vs 12 M notes/s measured on one core), which
``token_shards`` feels as a third less tokenizer time. ``tests/test_shards.py`` holds the bulk path
to ``tokenize_ids`` file by file, and ``tests/test_tokenizer_parity.py`` holds ``tokenize_ids`` to
Aria's reference.

The vocabulary reaches the loops as a ``Layout`` of plain numbers and tables (numba takes no
tokenizer object).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit


class Layout(NamedTuple):
    """What the body loop needs of an ``AbsTokenizer``: id offsets, quantisation tables, settings."""

    segment_ms: int
    include_drums: bool
    drum_channel: int
    time_id: int
    note: int  # first (inst, pitch, vel) id
    n_velocities: int
    velocity_index: np.ndarray  # grid index of each MIDI velocity
    drum: int  # first (drum, note) id
    drum_first: int  # MIDI note of the first drum token
    drum_stop: int
    unk: int
    dur: int  # first (dur) id; ids from here on complete the note before them
    duration_index: np.ndarray  # grid index of each duration 0..max_dur_ms
    max_dur_ms: int
    onset: int  # first (onset) id
    onset_index: np.ndarray  # grid index of each in-segment ms


@njit(cache=True)
def bodies(onset, duration, pitch, velocity, instrument, channel, offsets, layout):
    """The bodies of several performances end to end, and their offsets (see ``AbsTokenizer._bodies``)."""
    files = len(offsets) - 1
    starts = np.zeros(files + 1, np.int64)
    for file in range(files):  # sizes first, so the body is allocated once
        size, previous = 0, 0
        for note in range(offsets[file], offsets[file + 1]):
            segment = onset[note] // layout.segment_ms
            size += max(segment - previous, 0)
            previous = segment
            if channel[note] != layout.drum_channel:
                size += 3
            elif layout.include_drums:
                size += 2
        starts[file + 1] = starts[file] + size
    body = np.empty(starts[files], np.int64)
    for file in range(files):
        at, previous = starts[file], 0
        for note in range(offsets[file], offsets[file + 1]):
            segment = onset[note] // layout.segment_ms
            for _ in range(max(segment - previous, 0)):  # a <T> per segment crossed
                body[at] = layout.time_id
                at += 1
            previous = segment
            onset_id = layout.onset + layout.onset_index[onset[note] % layout.segment_ms]
            pitch_of = np.int64(pitch[note])
            if channel[note] != layout.drum_channel:
                body[at] = (layout.note + np.int64(instrument[note]) * 128 * layout.n_velocities
                            + pitch_of * layout.n_velocities + layout.velocity_index[velocity[note]])
                body[at + 1] = onset_id
                body[at + 2] = layout.dur + layout.duration_index[min(max(np.int64(duration[note]), 0),
                                                                      layout.max_dur_ms)]
                at += 3
            elif layout.include_drums:
                in_kit = layout.drum_first <= pitch_of < layout.drum_stop
                body[at] = layout.drum + pitch_of - layout.drum_first if in_kit else layout.unk
                body[at + 1] = onset_id
                at += 2
    return body, starts


@njit(cache=True)
def assemble(body, starts, prefix, prefix_offsets, dim_min_body, dim_offset, completes_from, bos, dim, eos):
    """Each performance's ``prefix <S> body <E>``, ``<D>`` inserted ``dim_offset`` tokens before the
    end of bodies longer than ``dim_min_body`` and moved back while it would precede a token that
    completes a note (id >= ``completes_from``): ``tokenize_ids`` without rng. (ids uint16, offsets)."""
    files = len(starts) - 1
    offsets = np.zeros(files + 1, np.int64)
    for file in range(files):
        length = starts[file + 1] - starts[file]
        n_prefix = prefix_offsets[file + 1] - prefix_offsets[file]
        offsets[file + 1] = offsets[file] + n_prefix + length + 2 + (length > dim_min_body)
    ids = np.empty(offsets[files], np.uint16)
    for file in range(files):
        at = offsets[file]
        for token in prefix[prefix_offsets[file]: prefix_offsets[file + 1]]:
            ids[at] = token
            at += 1
        ids[at] = bos
        at += 1
        first, length = starts[file], starts[file + 1] - starts[file]
        dim_at = length
        if length > dim_min_body:
            dim_at = length - dim_offset
            while body[first + dim_at] >= completes_from:
                dim_at -= 1
        for i in range(length):
            ids[at + i + (i >= dim_at)] = body[first + i]
        if dim_at < length:
            ids[at + dim_at] = dim
        ids[offsets[file + 1] - 1] = eos
    return ids, offsets
