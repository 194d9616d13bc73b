"""The vectorised augmentations against a literal, token-by-token port of Aria's.

``port_*`` below restate ariautils' ``export_tempo_aug`` / ``export_pitch_aug`` /
``export_velocity_aug`` and ``export_aug_fn_concat`` on token lists, one token at
a time, taking the same random draws as ``aria_model.augmentation`` documents
(per piece: the tempo factor then a permutation used as shuffle keys; one
integer for pitch or velocity). Every comparison is id for id.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from aria_model.augmentation import export_data_aug, pitch_aug, tempo_aug, velocity_aug
from aria_model.midi import INSTRUMENTS, load_midi
from aria_model.tokenizer import AbsTokenizer

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "midi"  # a copy of /work/shared/golden
# Small and mid-sized files, with drums and several instruments (basic, pop).
FILES = ("basic", "pop", "bwv66.6.mxl", "arabesque", "miditok1_POP909_008", "transcription", "Agnus_01.krn")
TOKENIZER = AbsTokenizer()
NOTE_NAMES = set(INSTRUMENTS) - {"drum"}
SEGMENT_MS, STEP_MS, MAX_DUR_MS = 5000, 10, 5000
PREFIX_IDS = (TOKENIZER.layout.prefix, TOKENIZER.layout.note)


# -- the port -----------------------------------------------------------------------------


def kind(token) -> str:
    """Aria's token type: the string itself for special tokens, else the tuple's first field."""
    return token if isinstance(token, str) else token[0]


def port_concat(tokens: list, augment_piece) -> list:
    """export_aug_fn_concat: pieces end at each <E>; rejoin, then cut or pad to the length."""
    pieces, current = [], []
    for token in tokens:
        current.append(token)
        if token == "<E>":
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    joined = [token for piece in pieces for token in augment_piece(piece)][: len(tokens)]
    return joined + ["<P>"] * (len(tokens) - len(joined))


def port_pitch(tokens: list, rng, shift=None) -> list:
    def piece_fn(piece):
        semitones = shift if shift is not None else int(rng.integers(-5, 6))
        out = []
        for token in piece:
            if kind(token) in NOTE_NAMES:
                instrument, pitch, velocity = token
                inside = 0 <= pitch + semitones <= 127
                out.append((instrument, pitch + semitones, velocity) if inside else "<U>")
            else:
                out.append(token)
        return out

    return port_concat(tokens, piece_fn)


def port_velocity(tokens: list, rng, steps=None) -> list:
    def piece_fn(piece):
        change = 10 * (steps if steps is not None else int(rng.integers(-1, 2)))
        out = []
        for token in piece:
            if kind(token) in NOTE_NAMES:
                instrument, pitch, velocity = token
                if velocity + change >= 120:
                    velocity = 120
                elif velocity + change <= 10:
                    velocity = 10
                else:
                    velocity += change
                token = (instrument, pitch, velocity)
            out.append(token)
        return out

    return port_concat(tokens, piece_fn)


def port_tempo(tokens: list, rng, factor=None, mixup=True) -> list:
    def piece_fn(piece):
        scale = factor if factor is not None else rng.uniform(0.8, 1.2)
        return port_tempo_piece(piece, scale, rng if mixup else None)

    return port_concat(tokens, piece_fn)


def scaled(ms: int, factor: float) -> int:
    return round(ms * factor / STEP_MS) * STEP_MS


def port_tempo_piece(piece: list, factor: float, shuffle_rng) -> list:
    i = 0
    head = []
    while i < len(piece) and (piece[i] == "<S>" or kind(piece[i]) == "prefix"):
        head.append(piece[i])
        i += 1
    groups = defaultdict(list)  # (segment, onset) -> [(read order, event tokens)]
    segment, n_events, marker_time, saw_eos = 0, 0, {}, False
    while i < len(piece):
        token = piece[i]
        if token == "<T>":
            segment += 1
        elif token == "<E>":
            saw_eos = True
        elif token in ("<D>", "<X>"):
            last_segment = max((s for s, _ in groups), default=0)
            last_onset = max((o for s, o in groups if s == last_segment), default=0)
            marker_time[token] = (last_segment, last_onset)
        elif kind(token) in NOTE_NAMES or kind(token) == "drum":
            size = 2 if kind(token) == "drum" else 3
            event = piece[i : i + size]
            i += size
            well_formed = len(event) == size and kind(event[1]) == "onset"
            if size == 3 and well_formed:
                well_formed = kind(event[2]) == "dur"
            if well_formed:
                groups[(segment, event[1][1])].append((n_events, event))
                n_events += 1
            continue
        i += 1  # <U>, <P>, stray onset/dur/prefix/<S> tokens are dropped
    keys = shuffle_rng.permutation(n_events) if shuffle_rng is not None else np.arange(n_events)
    out, previous_segment = [], 0
    for segment, onset in sorted(groups):
        target = scaled(segment * SEGMENT_MS + onset, factor)
        out += ["<T>"] * (target // SEGMENT_MS - previous_segment)
        previous_segment = target // SEGMENT_MS
        for _, event in sorted(groups[(segment, onset)], key=lambda e: keys[e[0]]):
            out += [event[0], ("onset", target % SEGMENT_MS)]
            if len(event) == 3:
                out.append(("dur", max(min(scaled(event[2][1], factor), MAX_DUR_MS), STEP_MS)))
        out += [m for m in ("<D>", "<X>") if marker_time.get(m) == (segment, onset)]
    return head + out + (["<E>"] if saw_eos else [])


def run_port(port, ids: np.ndarray, seed: int, **kwargs) -> np.ndarray:
    tokens = TOKENIZER.decode(ids)
    return np.array(TOKENIZER.encode(port(tokens, np.random.default_rng(seed), **kwargs)), dtype=ids.dtype)


def run_ours(augment, ids: np.ndarray, seed: int, **kwargs) -> np.ndarray:
    return augment(TOKENIZER, ids, np.random.default_rng(seed), **kwargs)


# -- inputs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pieces() -> list[np.ndarray]:
    """Golden files tokenized with a random prefix order and <D> position."""
    rng = np.random.default_rng(0)
    return [TOKENIZER.tokenize_ids(load_midi(GOLDEN / f"{name}.mid"), rng=rng) for name in FILES]


@pytest.fixture(scope="module")
def windows(pieces) -> list[np.ndarray]:
    """Training-like windows: cut blindly from the concatenated pieces, the last one padded."""
    stream = np.concatenate(pieces[:4] + pieces[:4])
    rng = np.random.default_rng(1)
    cuts = [0, *sorted(rng.integers(1, len(stream), size=6).tolist())]
    out = [stream[start : start + 1024] for start in cuts]
    tail = stream[-300:]
    out.append(np.concatenate([tail, np.full(724, TOKENIZER.pad_id, tail.dtype)]))
    assert sum(w[0] not in (TOKENIZER.bos_id, *range(*PREFIX_IDS)) for w in out) >= 3  # mid-piece starts
    assert max((w == TOKENIZER.eos_id).sum() for w in out) >= 2
    return out


def note_ids(*notes) -> list[int]:
    """(pitch, velocity, onset, dur) piano notes, each as three ids."""
    tokens = []
    for pitch, velocity, onset, dur in notes:
        tokens += [("piano", pitch, velocity), ("onset", onset), ("dur", dur)]
    return TOKENIZER.encode(tokens)


def sequence(*body) -> np.ndarray:
    head = TOKENIZER.encode([("prefix", "instrument", "piano"), "<S>"])
    return np.array(head + list(body) + [TOKENIZER.eos_id], dtype=np.uint16)


AUGMENTS = [
    (tempo_aug, port_tempo, [{}, {"factor": 0.8}, {"factor": 1.2}, {"factor": 1.0}, {"mixup": False}]),
    (pitch_aug, port_pitch, [{}, {"shift": -5}, {"shift": 5}, {"shift": 0}]),
    (velocity_aug, port_velocity, [{}, {"steps": -1}, {"steps": 1}, {"steps": 0}]),
]


# -- equality with the port ---------------------------------------------------------------


@pytest.mark.parametrize("augment,port,options", AUGMENTS, ids=["tempo", "pitch", "velocity"])
def test_matches_port_on_golden_files(pieces, augment, port, options):
    for seed, ids in enumerate(pieces):
        for kwargs in options:
            np.testing.assert_array_equal(run_ours(augment, ids, seed, **kwargs), run_port(port, ids, seed, **kwargs))


@pytest.mark.parametrize("augment,port,options", AUGMENTS, ids=["tempo", "pitch", "velocity"])
def test_matches_port_on_concatenated_windows(windows, augment, port, options):
    for seed, ids in enumerate(windows):
        for kwargs in options:
            np.testing.assert_array_equal(run_ours(augment, ids, seed, **kwargs), run_port(port, ids, seed, **kwargs))


def test_tempo_matches_port_on_token_soup():
    """Broken groups, stray tokens and repeated markers: the reader must go off track as Aria's does."""
    lay = TOKENIZER.layout
    alphabet = np.array(
        note_ids((60, 50, 0, 100), (0, 10, 4990, 5000))
        + TOKENIZER.encode([("drum", 36), ("onset", 2500), ("dur", 10), ("prefix", "instrument", "piano")])
        + [TOKENIZER.time_id] * 3
        + [TOKENIZER.dim_id, TOKENIZER.eos_id, TOKENIZER.pad_id, TOKENIZER.unk_id, TOKENIZER.bos_id, lay.onset + 7]
    )
    rng = np.random.default_rng(2)
    for seed in range(300):
        ids = rng.choice(alphabet, size=int(rng.integers(1, 60))).astype(np.uint16)
        np.testing.assert_array_equal(run_ours(tempo_aug, ids, seed), run_port(port_tempo, ids, seed))


# -- edge cases ---------------------------------------------------------------------------


def test_pitch_leaving_the_keyboard_becomes_unknown():
    ids = sequence(*note_ids((0, 50, 0, 100), (127, 50, 10, 100), (5, 50, 20, 100)))
    lowered = pitch_aug(TOKENIZER, ids, np.random.default_rng(0), shift=-5)
    assert TOKENIZER.decode(lowered[2:11:3]) == ["<U>", ("piano", 122, 50), ("piano", 0, 50)]
    raised = pitch_aug(TOKENIZER, ids, np.random.default_rng(0), shift=1)
    assert TOKENIZER.decode(raised[2:11:3]) == [("piano", 1, 50), "<U>", ("piano", 6, 50)]


def test_pitch_leaves_drums_alone():
    ids = sequence(*TOKENIZER.encode([("drum", 36), ("onset", 0)]), *note_ids((60, 50, 0, 100)))
    shifted = pitch_aug(TOKENIZER, ids, np.random.default_rng(0), shift=3)
    assert TOKENIZER.decode(shifted[2:5]) == [("drum", 36), ("onset", 0), ("piano", 63, 50)]


def test_velocity_is_clamped_to_10_and_120():
    ids = sequence(*note_ids((60, 10, 0, 100), (61, 120, 0, 100), (62, 0, 0, 100)))
    for steps, expected in ((-1, [10, 110, 10]), (1, [20, 120, 10]), (0, [10, 120, 10])):
        out = TOKENIZER.decode(velocity_aug(TOKENIZER, ids, np.random.default_rng(0), steps=steps))
        assert [token[2] for token in out[2:11:3]] == expected


def test_tempo_resegments_across_5000_ms():
    ids = sequence(*note_ids((60, 50, 4990, 5000)), TOKENIZER.time_id, *note_ids((62, 50, 10, 4990)))
    slower = TOKENIZER.decode(tempo_aug(TOKENIZER, ids, np.random.default_rng(0), factor=1.2))
    # 4990 ms -> 5988 -> 5990: one <T>, onset 990; 5010 ms -> 6012 -> 6010, same segment.
    assert slower[2:10] == [
        "<T>", ("piano", 60, 50), ("onset", 990), ("dur", 5000),
        ("piano", 62, 50), ("onset", 1010), ("dur", 5000), "<E>",
    ]
    faster = TOKENIZER.decode(tempo_aug(TOKENIZER, ids, np.random.default_rng(0), factor=0.8))
    # 4990 -> 3992 -> 3990; 5010 -> 4008 -> 4010: the <T> disappears; 4990 ms lasts 3990.
    assert faster[2:9] == [
        ("piano", 60, 50), ("onset", 3990), ("dur", 4000),
        ("piano", 62, 50), ("onset", 4010), ("dur", 3990), "<E>",
    ]


def test_tempo_rounds_half_to_even_and_clips_durations():
    ids = sequence(*note_ids((60, 50, 20, 10), (61, 50, 60, 100), (62, 50, 60, 4000)))
    # 1.25 is exact in binary, so the half-way cases really are half-way.
    out = TOKENIZER.decode(tempo_aug(TOKENIZER, ids, np.random.default_rng(0), factor=1.25, mixup=False))
    assert out[2:11] == [
        ("piano", 60, 50), ("onset", 20), ("dur", 10),  # 25 ms -> 20, 12.5 ms -> 10
        ("piano", 61, 50), ("onset", 80), ("dur", 120),  # 75 ms -> 80, 125 ms -> 120
        ("piano", 62, 50), ("onset", 80), ("dur", 5000),  # 5000 ms stays the maximum
    ]
    faster = TOKENIZER.decode(tempo_aug(TOKENIZER, ids, np.random.default_rng(0), factor=0.8, mixup=False))
    assert faster[4] == ("dur", 10)  # 8 ms -> 10, never below one step


def test_tempo_reattaches_dim_after_its_time_and_drops_unknown_and_padding():
    body = (
        note_ids((60, 50, 0, 100), (64, 50, 500, 100))
        + [TOKENIZER.dim_id, TOKENIZER.unk_id]
        + note_ids((67, 50, 500, 100), (72, 50, 900, 100))
    )
    ids = sequence(*body)
    out = TOKENIZER.decode(tempo_aug(TOKENIZER, ids, np.random.default_rng(0), factor=1.0, mixup=False))
    assert out[2:] == TOKENIZER.decode(
        note_ids((60, 50, 0, 100), (64, 50, 500, 100), (67, 50, 500, 100))
        + [TOKENIZER.dim_id]
        + note_ids((72, 50, 900, 100))
        + [TOKENIZER.eos_id, TOKENIZER.pad_id]  # <U> dropped; the window is padded back
    )


def test_tempo_drops_an_event_cut_by_the_window_end():
    ids = sequence(*note_ids((60, 50, 0, 100)))[:-1]
    cut = np.concatenate([ids, TOKENIZER.encode([("piano", 62, 50), ("onset", 10)])]).astype(np.uint16)
    out = TOKENIZER.decode(tempo_aug(TOKENIZER, cut, np.random.default_rng(0), factor=1.0))
    assert out == TOKENIZER.decode(cut[:5]) + ["<P>", "<P>"]


def test_mixup_shuffles_only_within_an_onset():
    chord = note_ids(*[(60 + k, 50, 100, 200) for k in range(6)])
    ids = sequence(*note_ids((40, 50, 0, 100)), *chord, *note_ids((30, 50, 300, 100)))
    orders = set()
    for seed in range(20):
        out = TOKENIZER.decode(tempo_aug(TOKENIZER, ids, np.random.default_rng(seed), factor=1.0))
        assert out[2] == ("piano", 40, 50) and out[-4] == ("piano", 30, 50)
        chord_notes = out[5:23:3]
        assert sorted(n[1] for n in chord_notes) == list(range(60, 66))
        orders.add(tuple(n[1] for n in chord_notes))
    assert len(orders) > 10


# -- invariants ---------------------------------------------------------------------------


def notes_with_times(ids: np.ndarray) -> list[tuple]:
    perf = TOKENIZER.detokenize_ids(ids)
    rows = zip(perf.start_tick, perf.end_tick - perf.start_tick, perf.pitch, perf.velocity, perf.instrument)
    return sorted(tuple(int(v) for v in row) for row in rows)


def test_identity_settings_keep_the_notes(pieces):
    rng = np.random.default_rng(3)
    for ids in pieces:
        assert notes_with_times(tempo_aug(TOKENIZER, ids, rng, factor=1.0)) == notes_with_times(ids)
        np.testing.assert_array_equal(pitch_aug(TOKENIZER, ids, rng, shift=0), ids)
        np.testing.assert_array_equal(velocity_aug(TOKENIZER, ids, rng, steps=0), ids)


def test_length_dtype_and_determinism(windows):
    augmentations = TOKENIZER.export_data_aug()
    assert [a.func for a in augmentations] == [a.func for a in export_data_aug(TOKENIZER)]
    assert [a.func for a in augmentations] == [tempo_aug, pitch_aug, velocity_aug]  # Aria's order
    for ids in windows:
        for augment in augmentations:
            first = augment(ids, np.random.default_rng(7))
            assert first.shape == ids.shape and first.dtype == ids.dtype
            np.testing.assert_array_equal(first, augment(ids, np.random.default_rng(7)))


def test_each_piece_draws_its_own_shift(pieces):
    window = np.concatenate([pieces[0], pieces[0]])
    half = len(pieces[0])
    outs = [pitch_aug(TOKENIZER, window, np.random.default_rng(seed)) for seed in range(10)]
    assert any((out[:half] != out[half:]).any() for out in outs)

