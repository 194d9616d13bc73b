"""Compiled quality metrics (numba): what ``sql/quality_*.sql`` computes per file, from flat arrays.

``file_metrics`` takes a record batch of midi_notes rows as Arrow-style flat note arrays and their
offsets, and gives every metric of the quality queries for the chosen rows, one compiled call per
batch and no Python object per note. Each step follows its query (the query's comment states the
semantics; the step here says only how it gets the same numbers):

- file stats (quality_file_stats.sql): counts, span, velocity sum, channels; entropies through
  ``duckdb_entropy`` so that they equal DuckDB's in every bit; the pitch entropy adds its terms
  in ascending note count per pitch, the order in which DuckDB's sum meets them (terms of equal
  counts are equal, so ties need no order);
- longest silence (quality_longest_silence.sql): the same walk with the latest end;
- note density (quality_note_density.sql): the same growing window over half-second codes, per
  file and per pitch;
- unique pitches per window (quality_unique_pitch_window.sql): the same runs of window starts per
  pitch, their +1 / -1 edges summed per window start (or sorted and swept, as the query does, when
  the starts far outnumber the notes);
- repetitive content (quality_repetitive_content.sql): chunk histograms, and the KL divergence of
  every pair of chunks summed over the 128 pitches in pitch order, as DuckDB's list_sum does.

The queries read notes in Aria's order, onsets non-decreasing, as midi_notes keeps them; the
kernel flags a file whose onsets go back (``ONSETS_IN_ORDER`` = 0), and ``aria_model.quality``
evaluates such a file with DuckDB instead.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from aria_model.duckdb_entropy import entropy, inlined, workspace

# Columns of file_metrics' integer matrix.
INT_METRICS = (
    "n_notes", "n_tonal_notes", "n_channels", "unique_pitches", "span_ms", "tonal_velocity_sum",
    "longest_gap_ms", "has_chunk_kl", "onsets_in_order",
)
N_NOTES, N_TONAL, N_CHANNELS, UNIQUE_PITCHES, SPAN_MS, VELOCITY_SUM, LONGEST_GAP_MS, HAS_CHUNK_KL, \
    ONSETS_IN_ORDER = range(len(INT_METRICS))
# Columns of its float matrix.
FLOAT_METRICS = ("pitch_entropy", "length_entropy", "onset_gap_entropy", "max_chunk_kl")
PITCH_ENTROPY, LENGTH_ENTROPY, ONSET_GAP_ENTROPY, MAX_CHUNK_KL = range(len(FLOAT_METRICS))

PITCHES = 256  # pitch is a uint8 column; Aria's distributions use 0-127
KL_PITCHES = 128
KL_FLOOR = 1e-5  # Aria's probability for a pitch a chunk lacks
# Edge codes of the unique-pitch sweep: 4 * window start + kind.
RUN_STARTS, FIRST_WINDOW, RUN_ENDED = 0, 1, 2


@njit(cache=True, nogil=True)
def file_metrics(offsets, rows, onset, duration, pitch, velocity, channel, drum_channel, length_cap_tens,
                 density_seconds, pitch_window_seconds, repetitive_min_span_ms, chunks):
    """Metrics of the files ``rows`` (their notes: ``x[offsets[row]:offsets[row + 1]]``).

    Returns (ints: files x INT_METRICS, floats: files x FLOAT_METRICS, density: files x windows x
    (most notes in a window, most notes of one pitch in a window), fewest: files x pitch windows).
    Releases the GIL: evaluate_quality runs batches in threads.
    """
    ints = np.zeros((len(rows), len(INT_METRICS)), np.int64)
    floats = np.zeros((len(rows), len(FLOAT_METRICS)), np.float64)
    density = np.zeros((len(rows), len(density_seconds), 2), np.int64)
    fewest = np.zeros((len(rows), len(pitch_window_seconds)), np.int64)
    # a file's note arrays are taken from these, allocated once for the batch's longest file
    most_notes = max([offsets[row + 1] - offsets[row] for row in rows]) if len(rows) else 0
    tonal = np.empty((3, most_notes), np.int64)  # onset, pitch, duration of the non-drum notes
    work = np.empty((4, most_notes), np.int64)
    entropy_space = workspace(most_notes)
    for i, row in enumerate(rows):
        start, end = offsets[row], offsets[row + 1]
        file_ints = ints[i]
        n_tonal = _walk_notes(onset[start:end], duration[start:end], pitch[start:end], velocity[start:end],
                              channel[start:end], drum_channel, tonal, file_ints)
        if n_tonal <= 0:
            continue
        tonal_onset, tonal_pitch, tonal_duration = tonal[0, :n_tonal], tonal[1, :n_tonal], tonal[2, :n_tonal]
        by_pitch, pitch_starts, present = _group_by_pitch(tonal_pitch, work[0, :n_tonal])
        file_ints[UNIQUE_PITCHES] = len(present)
        floats[i, PITCH_ENTROPY] = _pitch_entropy(pitch_starts[present + 1] - pitch_starts[present], n_tonal)
        floats[i, LENGTH_ENTROPY] = _length_entropy(tonal_duration[1:], length_cap_tens, work[1, :n_tonal - 1],
                                                    entropy_space)
        floats[i, ONSET_GAP_ENTROPY] = _onset_gap_entropy(tonal_onset, work[1, :n_tonal - 1], entropy_space)
        _densest_windows(tonal_onset, tonal_pitch, by_pitch, pitch_starts, present, density_seconds,
                         work[1, :n_tonal], work[2, :n_tonal], density[i])
        # unique-pitch windows start at the first note, drums included
        _fewest_pitches(tonal_onset, onset[start], by_pitch, pitch_starts, present, pitch_window_seconds,
                        work[1, :n_tonal], work[2, :n_tonal], work[3, :n_tonal], fewest[i])
        tonal_span = tonal_onset[-1] - tonal_onset[0]
        if tonal_span >= repetitive_min_span_ms:
            kl = _max_chunk_kl(tonal_onset - tonal_onset[0], tonal_pitch, tonal_span, chunks)
            if kl >= 0:
                file_ints[HAS_CHUNK_KL] = 1
                floats[i, MAX_CHUNK_KL] = kl
    return ints, floats, density, fewest


@inlined
def _walk_notes(onsets, durations, pitches, velocities, channels, drum_channel, tonal, file_ints):
    """One pass over a file's notes: order, span, channels, longest silence, and the non-drum notes
    copied to ``tonal``. Returns how many those are; -1 when the onsets go back (nothing set but
    the note count)."""
    n = len(onsets)
    file_ints[N_NOTES] = n
    if n == 0:
        file_ints[ONSETS_IN_ORDER] = 1
        return 0
    # the longest stretch from the latest end so far to the next onset (the silence query's walk)
    latest_end, gap = onsets[0] + durations[0], 0
    low_channel = high_channel = channels[0]
    n_tonal = velocity_sum = 0
    for j in range(n):
        if j:
            if onsets[j] < onsets[j - 1]:
                return -1
            gap = max(gap, onsets[j] - latest_end)
            latest_end = max(latest_end, onsets[j] + durations[j])
        low_channel, high_channel = min(low_channel, channels[j]), max(high_channel, channels[j])
        if channels[j] != drum_channel:
            tonal[0, n_tonal], tonal[1, n_tonal], tonal[2, n_tonal] = onsets[j], pitches[j], durations[j]
            velocity_sum += velocities[j]
            n_tonal += 1
    file_ints[ONSETS_IN_ORDER] = 1
    file_ints[SPAN_MS] = onsets[-1] + durations[-1] - onsets[0]  # Aria: the end of the last note to start
    file_ints[LONGEST_GAP_MS] = gap
    file_ints[N_CHANNELS] = 1 if low_channel == high_channel else len(np.unique(channels))
    file_ints[N_TONAL] = n_tonal
    file_ints[VELOCITY_SUM] = velocity_sum
    return n_tonal


@inlined
def _group_by_pitch(pitches, grouped):
    """(note positions grouped by pitch into ``grouped``, each group in note order; where pitch p's
    group starts; the pitches present)."""
    starts = np.zeros(PITCHES + 1, np.int64)
    for p in pitches:
        starts[p + 1] += 1
    present = np.flatnonzero(starts[1:])
    starts = np.cumsum(starts)
    filled = starts[:-1].copy()
    for j, p in enumerate(pitches):
        grouped[filled[p]] = j
        filled[p] += 1
    return grouped, starts, present


@inlined
def _pitch_entropy(notes_per_pitch, total):
    """Sorted in place: DuckDB's sum meets the pitches fewest notes first."""
    notes_per_pitch.sort()
    bits, term, notes_before = 0.0, 0.0, 0
    for notes in notes_per_pitch:
        if notes != notes_before:  # equal counts, equal terms
            term, notes_before = notes / total * math.log2(total / notes), notes
        bits += term
    return bits


@inlined
def _length_entropy(durations, cap_tens, tens, entropy_space):
    """Entropy of the lengths in tens of ms, rounded half to even (Python's round(x, -1)), capped."""
    for j, d in enumerate(durations):
        q = d // 10
        r = d - 10 * q
        if r > 5 or (r == 5 and q % 2 == 1):
            q += 1
        tens[j] = min(q, cap_tens)
    return entropy(tens, True, entropy_space)  # the query's lengths are DOUBLE


@inlined
def _onset_gap_entropy(onsets, gaps, entropy_space):
    for j in range(len(gaps)):
        gaps[j] = onsets[j + 1] - onsets[j]
    return entropy(gaps, False, entropy_space)


@inlined
def _densest_windows(onsets, pitches, by_pitch, pitch_starts, present, window_seconds, halves, grouped, most):
    """The density query's window that only grows, for every window length in one pass over the notes:
    over all notes (most[w, 0]) and over each pitch's notes (the largest in most[w, 1]). The pitches
    interleave, so their windows' steps overlap in the processor."""
    for j in range(len(onsets)):
        ms = onsets[j] - onsets[0]
        halves[j] = (ms + 999) // 1000 + ms // 1000  # the query's h: 2 * second, + 1 unless on the second
    for k in range(len(by_pitch)):
        grouped[k] = halves[by_pitch[k]]
    sizes = np.zeros(len(window_seconds), np.int64)
    row_of = np.empty(PITCHES, np.int64)  # each present pitch's row of pitch_sizes
    row_of[present] = np.arange(len(present))
    pitch_sizes = np.zeros((len(present), len(window_seconds)), np.int64)
    next_of_pitch = pitch_starts[:-1].copy()  # where each pitch's next note sits in ``grouped``
    for j in range(len(halves)):
        h, p = halves[j], pitches[j]
        k, row = next_of_pitch[p], row_of[p]
        next_of_pitch[p] += 1
        for w in range(len(window_seconds)):
            last_in_window = 2 * window_seconds[w] - 1
            sizes[w] += h <= (halves[j - sizes[w]] | 1) + last_in_window
            pitch_sizes[row, w] += h <= (grouped[k - pitch_sizes[row, w]] | 1) + last_in_window
    for w in range(len(window_seconds)):
        most[w, 0] = sizes[w]
        most[w, 1] = pitch_sizes[:, w].max()


@inlined
def _fewest_pitches(onsets, first_onset, by_pitch, pitch_starts, present, window_seconds, grouped_ceil,
                    grouped_floor, breaks, fewest):
    """Fewest distinct pitches in a window of Aria's unique_pitch_count_in_interval, per window length.

    A pitch's notes cover runs of window starts, max(0, ceil(first s) - S) to floor(last s), that
    break between two notes more than S + 1 seconds apart (rounded outwards); the gaps that break
    the shortest window, the only ones that can break any, are found once."""
    for k in range(len(by_pitch)):
        ms = onsets[by_pitch[k]] - first_onset
        grouped_ceil[k], grouped_floor[k] = (ms + 999) // 1000, ms // 1000
    n_breaks = 0  # grouped positions after a gap that may break a run
    shortest = window_seconds.min() if len(window_seconds) else 0
    for p in present:
        for k in range(pitch_starts[p] + 1, pitch_starts[p + 1]):
            if grouped_ceil[k] - grouped_floor[k - 1] > shortest + 1:
                breaks[n_breaks] = k
                n_breaks += 1
    last_second = (onsets[-1] - first_onset + 999) // 1000
    edges = np.empty(2 * (len(present) + n_breaks) + 1, np.int64)
    for w, seconds in enumerate(window_seconds):
        last_start = max(0, last_second - seconds)  # Aria's last window: the first to reach the last onset
        edges[0] = FIRST_WINDOW  # the window at 0 counts even where no run starts there
        n_edges, b = 1, 0
        for p in present:
            first, end = pitch_starts[p], pitch_starts[p + 1]
            while first < end:
                after_run = end  # the run from ``first`` ends before the next break of this window
                while b < n_breaks and breaks[b] < end:
                    k = breaks[b]
                    b += 1
                    if grouped_ceil[k] - grouped_floor[k - 1] > seconds + 1:
                        after_run = k
                        break
                start = max(0, grouped_ceil[first] - seconds)
                if start <= last_start:  # edges past the last window change nothing
                    edges[n_edges] = 4 * start + RUN_STARTS
                    n_edges += 1
                ended = grouped_floor[after_run - 1] + 1
                if ended <= last_start:
                    edges[n_edges] = 4 * ended + RUN_ENDED
                    n_edges += 1
                first = after_run
        if last_start <= 8 * n_edges + 4096:
            fewest[w] = _least_covered(edges[:n_edges], last_start)
        else:  # few notes far apart: sort the edges rather than count over every window start
            fewest[w] = _least_covered_sorted(edges[:n_edges], len(present))


@inlined
def _least_covered(edges, last_start):
    """The fewest runs covering a window start in 0..last_start: the edges' +1 / -1 summed per start."""
    change = np.zeros(last_start + 1, np.int64)
    for edge in edges:
        change[edge // 4] += 1 - edge % 4
    covered, least = 0, len(edges)
    for start in range(last_start + 1):
        covered += change[start]
        least = min(least, covered)
    return least


@inlined
def _least_covered_sorted(edges, most):
    """The same, as the query reduces its edges: sorted, runs starting before the first window before
    runs ended at one start, the count taken after each edge that is not a start."""
    pitches, least = 0, most
    for edge in np.sort(edges):
        pitches += 1 - edge % 4
        if edge % 4 != RUN_STARTS:
            least = min(least, pitches)
    return least


@inlined
def _max_chunk_kl(since_first, pitches, span, chunks):
    """Largest KL divergence (bits) between two non-empty chunks, earlier against later; -1 for no pair."""
    histograms = np.zeros((chunks, PITCHES), np.int64)
    notes = np.zeros(chunks, np.int64)
    for t, p in zip(since_first, pitches):
        chunk = chunks * t // span
        if chunk < chunks:  # a note on the last onset falls outside the last chunk, as in Aria
            histograms[chunk, p] += 1
            notes[chunk] += 1
    most = -1.0
    for a in range(chunks):
        for b in range(a + 1, chunks):
            if notes[a] and notes[b]:
                kl = 0.0
                for p in range(KL_PITCHES):
                    share_a = histograms[a, p] / notes[a] if histograms[a, p] else KL_FLOOR
                    share_b = histograms[b, p] / notes[b] if histograms[b, p] else KL_FLOOR
                    kl += share_a * math.log2(share_a / share_b)
                most = max(most, abs(kl))
    return most
