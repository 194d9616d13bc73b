"""Compiled MidiDict assembly: the rows of ``midi_fast``'s scan -> Performance arrays.

This is ``midi._extract_track``/``_close_notes`` + ``midi._build_performance``
in numba, with the same results bit for bit (``tests/test_midi_fast.py`` checks
every field against the mido path, which stays the readable reference):

1. ``_pair_notes``: Aria's per-track note pairing;
2. ``assemble``: stable sorts by tick, channel removal for ignored program
   families, instrument classes per channel, sustain-pedal folding.

Everything is arrays in and arrays out, so a file costs one compiled call and
no Python object per note or event.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from aria_model.midi import (
    _FAMILY_TO_INSTRUMENT,
    DEFAULT_TEMPO_US,
    DRUM,
    DRUM_CHANNEL,
    IGNORED_FAMILIES,
    INSTRUMENTS,
    PROGRAM_FAMILIES,
)

# Row kinds of the scan: the messages ``midi._extract_track`` keeps.
NOTE_ON, NOTE_OFF, PEDAL, PROGRAM, TEMPO, TEXT = range(6)
KEYS_PER_TRACK = 128 * 16  # (pitch, channel) pairs
N_CHANNELS = 16

# assemble's outcome.
BUILT, TOO_MANY_NOTES, NO_NOTES = range(3)

# Per program family (program // 8): ignored, and the instrument class of the others.
FAMILY_IGNORED = np.array([f in IGNORED_FAMILIES for f in PROGRAM_FAMILIES])
FAMILY_INSTRUMENT = np.array([_FAMILY_TO_INSTRUMENT.get(f, DRUM) for f in PROGRAM_FAMILIES], np.uint8)
PIANO = _FAMILY_TO_INSTRUMENT["piano"]
N_INSTRUMENTS = len(INSTRUMENTS)


@njit(cache=True)
def assemble(tick, kind, channel, a, b, track_ends, max_notes):
    """(outcome, parsed note count, note arrays, tempo map, pedals, declared instruments, removed channels).

    ``max_notes`` < 0: no limit. Arrays are only meaningful when the outcome is BUILT.
    """
    on_row, on_tick, close_number, on_track_ends, end_tick = _pair_notes(tick, kind, channel, a, track_ends)
    n_parsed = len(end_tick)
    pedal_rows, program_rows, tempo_rows = _event_rows(tick, kind, track_ends)
    if len(tempo_rows) == 0:
        tempo_tick, tempo_us = np.zeros(1, np.int64), np.full(1, DEFAULT_TEMPO_US, np.int64)
    else:
        tempo_tick, tempo_us = tick[tempo_rows], a[tempo_rows].astype(np.int64)
    if len(program_rows) == 0:  # as if channel 0 selected the piano at tick 0
        program_channel, program = np.zeros(1, np.uint8), np.zeros(1, np.int32)
    else:
        program_channel, program = channel[program_rows], a[program_rows]
    removed = np.zeros(N_CHANNELS, np.bool_)
    for i in range(len(program)):
        if FAMILY_IGNORED[program[i] // 8] and program_channel[i] != DRUM_CHANNEL:
            removed[program_channel[i]] = True

    ons = _by_start(on_tick, close_number, on_track_ends)
    n = 0
    for j in ons:
        if not removed[channel[on_row[j]]]:
            ons[n] = j
            n += 1
    ons = ons[:n]
    notes, end = on_row[ons], end_tick[close_number[ons]]
    start = tick[notes]
    pitch, velocity, note_channel = a[notes].astype(np.uint8), b[notes].astype(np.uint8), channel[notes]

    instrument, declared = _instruments(program_channel, program, removed, note_channel)
    n_pedals = 0
    for i in pedal_rows:
        if not removed[channel[i]]:
            pedal_rows[n_pedals] = i
            n_pedals += 1
    pedal_rows = pedal_rows[:n_pedals]
    pedal_tick, pedal_channel, pedal_down = tick[pedal_rows], channel[pedal_rows], b[pedal_rows] >= 64
    outcome = BUILT
    if max_notes >= 0 and n_parsed > max_notes:
        outcome = TOO_MANY_NOTES
    elif n == 0:
        outcome = NO_NOTES
    else:
        end = _fold_pedal(end, note_channel, pedal_tick, pedal_channel, pedal_down)
    return (outcome, n_parsed, start, end, pitch, velocity, note_channel, instrument,
            tempo_tick, tempo_us, pedal_tick, pedal_channel, pedal_down, declared, removed)


@njit(cache=True)
def _by_start(on_tick, close_number, on_track_ends):
    """The closed note-ons in Aria's order: stably sorted by start, so ties keep close order.

    Per track, note-ons come in start order already; only those starting on
    the same tick need sorting by close number. Then the tracks are merged.
    """
    ons, start = np.empty(len(on_tick), np.int64), np.empty(len(on_tick), np.int64)
    run_ends = np.empty(len(on_track_ends), np.int64)
    m = 0
    track_start = 0
    for t in range(len(on_track_ends)):
        tie_start = m
        for j in range(track_start, on_track_ends[t]):
            if close_number[j] < 0:  # never closed
                continue
            if on_tick[j] != start[tie_start] and m > tie_start:
                _sort_by_close(ons, close_number, tie_start, m)
                tie_start = m
            ons[m], start[m] = j, on_tick[j]
            m += 1
        _sort_by_close(ons, close_number, tie_start, m)
        run_ends[t] = m
        track_start = on_track_ends[t]
    ons, start = ons[:m], start[:m]
    return ons[_stable_order(start, run_ends)]


@njit(cache=True)
def _sort_by_close(ons, close_number, lo, hi):
    """Sort ons[lo:hi] by close number: insertion sort for a chord's few notes, a real sort beyond."""
    if hi - lo < 2:
        return
    if hi - lo > 32:
        ons[lo:hi] = ons[lo:hi][np.argsort(close_number[ons[lo:hi]])]
        return
    for i in range(lo + 1, hi):
        j, k = ons[i], i
        while k > lo and close_number[ons[k - 1]] > close_number[j]:
            ons[k] = ons[k - 1]
            k -= 1
        ons[k] = j


@njit(cache=True)
def _event_rows(tick, kind, track_ends):
    """Rows of the pedal, program and tempo events, each kind stably sorted by tick."""
    rows = np.empty((3, len(kind)), np.int64)
    run_ends = np.empty((3, len(track_ends)), np.int64)
    count = np.zeros(3, np.int64)
    track_start = 0
    for t in range(len(track_ends)):
        for row in range(track_start, track_ends[t]):
            k = np.int64(kind[row]) - PEDAL  # PEDAL, PROGRAM, TEMPO -> 0, 1, 2 (others fall outside)
            if k >= 0 and k < 3:
                rows[k, count[k]] = row
                count[k] += 1
        run_ends[:, t] = count
        track_start = track_ends[t]
    pedal_rows, program_rows, tempo_rows = rows[0, :count[0]], rows[1, :count[1]], rows[2, :count[2]]
    return (pedal_rows[_stable_order(tick[pedal_rows], run_ends[0])],
            program_rows[_stable_order(tick[program_rows], run_ends[1])],
            tempo_rows[_stable_order(tick[tempo_rows], run_ends[2])])


@njit(cache=True)
def _stable_order(key, run_ends):
    """Stable argsort of ``key``, which ascends within each run [previous run end, run end).

    A track's rows ascend in tick, so merging the tracks' runs pairwise sorts
    them in O(n log tracks), usually with nothing to merge.
    """
    n = len(key)
    order = np.arange(n)
    bounds = np.empty(len(run_ends) + 1, np.int64)
    bounds[0] = 0
    n_bounds = 1
    for run_end in run_ends:  # one run while the key keeps ascending across run ends
        if run_end > bounds[n_bounds - 1] and (run_end == n or key[run_end - 1] > key[run_end]):
            bounds[n_bounds] = run_end
            n_bounds += 1
    if bounds[n_bounds - 1] != n:
        bounds[n_bounds] = n
        n_bounds += 1
    buffer = np.empty(n, np.int64)
    while n_bounds > 2:
        merged = 1
        for r in range(0, n_bounds - 1, 2):
            lo, mid = bounds[r], bounds[r + 1]
            hi = bounds[r + 2] if r + 2 < n_bounds else mid
            _merge(key, order, buffer, lo, mid, hi)
            bounds[merged] = hi
            merged += 1
        order, buffer = buffer, order
        n_bounds = merged
    return order


@njit(cache=True)
def _merge(key, order, out, lo, mid, hi):
    """out[lo:hi] = the stable merge of order[lo:mid] and order[mid:hi] by key."""
    i, j = lo, mid
    for k in range(lo, hi):
        if j >= hi or (i < mid and key[order[i]] <= key[order[j]]):
            out[k] = order[i]
            i += 1
        else:
            out[k] = order[j]
            j += 1


@njit(cache=True)
def _instruments(program_channel, program, removed, note_channel):
    """(instrument per note, which instrument classes the file declares).

    A non-drum channel plays the family of its last program (in tick order), or
    the piano when it has notes but no program; channel 9 is the drum kit.
    """
    of_channel = np.full(N_CHANNELS, DRUM, np.uint8)
    mapped = np.zeros(N_CHANNELS, np.bool_)
    for i in range(len(program)):
        ch = program_channel[i]
        if ch != DRUM_CHANNEL and not removed[ch]:
            of_channel[ch] = FAMILY_INSTRUMENT[program[i] // 8]
            mapped[ch] = True
    declared = np.zeros(N_INSTRUMENTS, np.bool_)
    instrument = np.empty(len(note_channel), np.uint8)
    for i in range(len(note_channel)):
        ch = note_channel[i]
        if ch == DRUM_CHANNEL:
            declared[DRUM] = True
        elif not mapped[ch]:
            of_channel[ch] = PIANO
            mapped[ch] = True
        instrument[i] = of_channel[ch]
    for ch in range(N_CHANNELS):
        if mapped[ch]:
            declared[of_channel[ch]] = True
    return instrument, declared


@njit(cache=True)
def _fold_pedal(end, note_channel, pedal_tick, pedal_channel, pedal_down):
    """Note ends strictly inside a pedal interval of their channel move to its release (drums excepted).

    Intervals per channel, as ``midi.pedal_intervals``: a down opens one unless
    one is open, an up closes the open one, and one left open closes at the end
    of the last note in start order.
    """
    if len(pedal_tick) == 0:
        return end
    # Intervals as they close, then grouped by channel (a stable counting sort keeps them ascending).
    n_pedals = len(pedal_tick)
    iv_channel, iv_down, iv_up = np.empty(n_pedals, np.int64), np.empty(n_pedals, np.int64), np.empty(n_pedals, np.int64)
    down_since = np.full(N_CHANNELS, -1, np.int64)
    n_iv = 0
    for i in range(n_pedals):
        ch = pedal_channel[i]
        if pedal_down[i] and down_since[ch] < 0:
            down_since[ch] = pedal_tick[i]
        elif not pedal_down[i] and down_since[ch] >= 0:
            iv_channel[n_iv], iv_down[n_iv], iv_up[n_iv] = ch, down_since[ch], pedal_tick[i]
            n_iv += 1
            down_since[ch] = -1
    for ch in range(N_CHANNELS):
        if down_since[ch] >= 0:
            iv_channel[n_iv], iv_down[n_iv], iv_up[n_iv] = ch, down_since[ch], end[-1]
            n_iv += 1
    first = np.zeros(N_CHANNELS + 1, np.int64)
    for i in range(n_iv):
        first[iv_channel[i] + 1] += 1
    first = np.cumsum(first)
    slot = first[:-1].copy()
    starts, ups = np.empty(n_iv, np.int64), np.empty(n_iv, np.int64)
    for i in range(n_iv):
        ch = iv_channel[i]
        starts[slot[ch]], ups[slot[ch]] = iv_down[i], iv_up[i]
        slot[ch] += 1

    folded = end.copy()
    # k: per channel, the last interval starting before the previous note's end. Notes come in
    # start order, so ends mostly ascend and k moves a step or two; far jumps use a binary search.
    last = first[:-1] - 1
    for i in range(len(end)):
        ch = note_channel[i]
        lo, hi = first[ch], first[ch + 1]
        if ch == DRUM_CHANNEL or lo == hi:
            continue
        value, k = end[i], last[ch]
        for _ in range(4):
            if k + 1 < hi and starts[k + 1] < value:
                k += 1
            elif k >= lo and starts[k] >= value:
                k -= 1
            else:
                break
        else:
            k = lo + np.searchsorted(starts[lo:hi], value) - 1
        last[ch] = k
        if k >= lo and value < ups[k]:
            folded[i] = ups[k]
    return folded


@njit(cache=True)
def _pair_notes(tick, kind, channel, a, track_ends):
    """Aria's note pairing (``midi._extract_track``): the note-ons and when each closed.

    Returns per note-on (in row order): its row, its tick and its close number
    (the order in which notes close, which Aria's stable sort keeps for equal
    starts; -1 if never closed); how many note-ons each track ends after; and
    per close number, the end tick. Per track and per (pitch, channel) key,
    open note-ons form a queue in arrival order (a linked list through
    ``next_open``); a note-off closes every open note of its key that did not
    start on its tick.
    """
    n_on = 0
    for k in kind:
        n_on += k == NOTE_ON
    on_row, on_tick, close_number = np.empty(n_on, np.int64), np.empty(n_on, np.int64), np.empty(n_on, np.int64)
    next_open = np.empty(n_on, np.int64)
    on_track_ends = np.empty(len(track_ends), np.int64)
    end_tick = np.empty(n_on, np.int64)
    first_open = np.empty(KEYS_PER_TRACK, np.int64)
    last_open = np.empty(KEYS_PER_TRACK, np.int64)
    n_ons, n_notes = 0, 0
    track_start = 0
    for t in range(len(track_ends)):
        first_open[:] = -1  # note-ons left open at a track's end are dropped
        last_open[:] = -1
        for row in range(track_start, track_ends[t]):
            if kind[row] == NOTE_ON:
                key = a[row] * 16 + channel[row]
                j = n_ons
                on_row[j], on_tick[j], close_number[j], next_open[j] = row, tick[row], -1, -1
                n_ons += 1
                if first_open[key] < 0:
                    first_open[key] = j
                else:
                    next_open[last_open[key]] = j
                last_open[key] = j
            elif kind[row] == NOTE_OFF:
                key = a[row] * 16 + channel[row]
                now = tick[row]
                # Close the key's open notes that started before now; keep same-tick ones only
                # when something else was closed with them (Aria).
                j = first_open[key]
                staying_first, staying_last = -1, -1
                closed_any = False
                while j >= 0:
                    following = next_open[j]
                    if on_tick[j] != now:
                        close_number[j], end_tick[n_notes] = n_notes, now
                        n_notes += 1
                        closed_any = True
                    else:
                        next_open[j] = -1
                        if staying_first < 0:
                            staying_first = j
                        else:
                            next_open[staying_last] = j
                        staying_last = j
                    j = following
                if closed_any:
                    first_open[key], last_open[key] = staying_first, staying_last
                else:
                    first_open[key], last_open[key] = -1, -1
        on_track_ends[t] = n_ons
        track_start = track_ends[t]
    return on_row, on_tick, close_number, on_track_ends, end_tick[:n_notes]
