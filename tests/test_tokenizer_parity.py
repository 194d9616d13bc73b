"""Our MIDI loader + AbsTokenizer give Aria's reference ids, token for token.

Four layers of evidence:

(a) golden files: ids made by Aria's own aria-utils (``tests/fixtures/golden``, a
    copy of ``shared/golden`` so the suite is self-contained);
(b) property tests: random MIDI files written with mido, compared with the
    literal restatement of Aria's algorithm in ``tests/aria_reference.py``;
(c) the tokenizer contract's edge cases (DESIGN.md), on small hand-built files
    where 1 tick = 1 ms (500 ticks per beat, 500000 us per beat);
(d) detokenize(tokenize(x)) gives back x up to quantisation.

Prefix tokens are shuffled by Aria, so they are compared as a multiset; from
``<S>`` on, sequences must be identical.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import mido
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aria_model.midi import INSTRUMENTS, MidiError, load_midi
from aria_model.tokenizer import AbsTokenizer
from tests import aria_reference as aria
from tests.midi_builders import midi_bytes

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_CASES = sorted(GOLDEN_DIR.glob("*.json"))
TOKEN_CASES = [p for p in GOLDEN_CASES if "error" not in json.loads(p.read_text())]
ERROR_CASES = [p for p in GOLDEN_CASES if p not in TOKEN_CASES]

TOKENIZER = AbsTokenizer()
BOS_ID = aria.TOKEN_ID[aria.BOS]
DIM_ID = aria.TOKEN_ID[aria.DIM]
FIRST_DUR_ID = aria.TOKEN_ID[("dur", 0)]  # durations, then onsets, close the vocabulary


@functools.cache
def golden(case: Path) -> dict:
    """A golden case, tokens as Aria's tuples; cached because several tests read each."""
    data = json.loads(case.read_text())
    data["midi"] = GOLDEN_DIR / "midi" / data["file"]
    data["tokens"] = [tuple(t) if isinstance(t, list) else t for t in data.get("tokens", [])]
    return data


@functools.cache
def golden_performance(case: Path):
    """Our parse of a golden file (never mutated by the tokenizer, so safe to share)."""
    return load_midi(golden(case)["midi"])


def split_at_bos(seq: list) -> tuple[Counter, list]:
    """(prefix as a multiset, everything from <S> on)."""
    seq = list(seq)
    bos = seq.index(BOS_ID if isinstance(seq[0], int) else aria.BOS)
    return Counter(seq[:bos]), seq[bos:]


def first_difference(ours: list, expected: list) -> str:
    for i, (a, b) in enumerate(zip(ours, expected)):
        if a != b:
            window = slice(max(i - 3, 0), i + 4)
            return (f"first difference at {i}: ours {a!r} vs reference {b!r}; "
                    f"context ours {ours[window]} reference {expected[window]}")
    return f"lengths differ: ours {len(ours)} vs reference {len(expected)}"


def assert_same_sequence(ours, expected) -> None:
    ours_prefix, ours_body = split_at_bos(ours)
    expected_prefix, expected_body = split_at_bos(expected)
    assert ours_prefix == expected_prefix, f"prefix {ours_prefix} vs reference {expected_prefix}"
    assert ours_body == expected_body, first_difference(ours_body, expected_body)


# -- (a) golden parity -------------------------------------------------------------------


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda p: p.stem)
def test_golden_ids(case):
    ids = TOKENIZER.tokenize_ids(golden_performance(case), add_dim_tok=False).tolist()
    assert_same_sequence(ids, golden(case)["ids"])


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda p: p.stem)
def test_golden_tokens_and_encode(case):
    perf = golden_performance(case)
    tokens = TOKENIZER.tokenize(perf, add_dim_tok=False)
    assert_same_sequence(tokens, golden(case)["tokens"])
    assert TOKENIZER.encode(tokens) == TOKENIZER.tokenize_ids(perf, add_dim_tok=False).tolist()


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda p: p.stem)
def test_golden_parsed_note_count(case):
    assert golden_performance(case).n_parsed_notes == golden(case)["n_note_msgs"]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda p: p.stem)
def test_golden_error_is_no_notes(case):
    data = golden(case)
    with pytest.raises(MidiError) as raised:
        load_midi(data["midi"])
    assert raised.value.reason == "no_notes"
    assert aria.reference_error(data["midi"]) == "no_notes"


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda p: p.stem)
def test_oracle_reproduces_golden(case):
    """The oracle used below is itself exact on every file Aria tokenized."""
    data = golden(case)
    assert_same_sequence(aria.reference_tokens(data["midi"]), data["tokens"])
    assert len(aria.reference_parse(data["midi"]).notes) == data["n_note_msgs"]


# -- (b) random MIDI files against the oracle --------------------------------------------

CHANNELS = st.sampled_from([0, 1, 2, 9])  # few channels, so keys collide and overlap
# A small pool makes same-pitch overlaps likely; off-kit drums (34, 82) included.
PITCHES = st.one_of(st.sampled_from([34, 35, 60, 61, 81, 82]), st.integers(0, 127))
# Mostly allowed families (piano, guitar, strings, brass), some ignored (chromatic, synth pad, sfx).
PROGRAMS = st.one_of(st.sampled_from([0, 25, 40, 57, 8, 88, 120]), st.integers(0, 127))
PEDAL_VALUES = st.one_of(st.sampled_from([0, 63, 64, 127]), st.integers(0, 127))
TEMPOS = st.one_of(st.sampled_from([500_000, 250_000, 1_000_000]), st.integers(50_000, 3_000_000))
# 1000 and 2000 ticks at 500000 us give exact half milliseconds, where rounding is half-to-even.
TICKS_PER_BEAT = st.one_of(st.sampled_from([1, 96, 480, 500, 960, 1000, 2000]), st.integers(1, 2000))


Placed = tuple[int, mido.Message]  # (track index, message whose time is an absolute tick)


@st.composite
def note_messages(draw, track, tick, length) -> list[Placed]:
    """Paired notes (off as note_off or note_on velocity 0) plus stray ons and offs."""
    placed = []
    notes = st.tuples(track, tick, length, CHANNELS, PITCHES, st.integers(1, 127), st.booleans())
    for trk, start, dur, ch, pitch, vel, off_is_note_on in draw(st.lists(notes, min_size=2, max_size=30)):
        placed.append((trk, mido.Message("note_on", channel=ch, note=pitch, velocity=vel, time=start)))
        off_kind, off_velocity = ("note_on", 0) if off_is_note_on else ("note_off", vel)
        off = mido.Message(off_kind, channel=ch, note=pitch, velocity=off_velocity, time=start + dur)
        placed.append((trk, off))
    strays = st.tuples(track, tick, CHANNELS, PITCHES, st.sampled_from(["note_on", "note_off"]))
    for trk, at, ch, pitch, kind in draw(st.lists(strays, max_size=4)):
        placed.append((trk, mido.Message(kind, channel=ch, note=pitch, velocity=64, time=at)))
    return placed


@st.composite
def setting_messages(draw, track, tick) -> list[Placed]:
    """Tempo changes, program changes and controllers (mostly the sustain pedal)."""
    placed = []
    tick_or_zero = st.one_of(st.just(0), tick)
    for trk, at, tempo in draw(st.lists(st.tuples(track, tick_or_zero, TEMPOS), max_size=4)):
        placed.append((trk, mido.MetaMessage("set_tempo", tempo=tempo, time=at)))
    programs = st.tuples(track, tick_or_zero, CHANNELS, PROGRAMS)
    for trk, at, ch, program in draw(st.lists(programs, max_size=3)):
        placed.append((trk, mido.Message("program_change", channel=ch, program=program, time=at)))
    controls = st.tuples(track, tick, st.sampled_from([0, 1, 9]), PEDAL_VALUES, st.sampled_from([64, 64, 7]))
    for trk, at, ch, value, control in draw(st.lists(controls, max_size=10)):
        cc = mido.Message("control_change", channel=ch, control=control, value=value, time=at)
        placed.append((trk, cc))
    return placed


@st.composite
def random_midi(draw) -> dict:
    """Keywords for ``midi_bytes``: a valid SMF exercising the parser with stray,
    overlapping, zero-length and very long notes, tempo maps changing mid-piece,
    ignored programs, drums and pedals left down."""
    tpb = draw(TICKS_PER_BEAT)
    n_tracks = draw(st.integers(1, 4))
    file_type = 1 if n_tracks > 1 else draw(st.sampled_from([0, 1]))
    track = st.integers(0, n_tracks - 1)
    # 40 beats: 20 s at the default tempo, so gaps and notes often exceed 5 s. The
    # half-beat grid makes events share ticks (same-tick on/off, pedal at note end).
    tick = st.one_of(st.integers(0, 40 * tpb), st.integers(0, 80).map(lambda k: k * tpb // 2))
    short = st.integers(1, 2 * tpb)
    # Short notes twice as likely as zero-length (dropped) or long (> 5 s at 120 bpm) ones.
    length = st.one_of(short, short, st.just(0), st.integers(10 * tpb, 30 * tpb))
    placed = draw(note_messages(track, tick, length)) + draw(setting_messages(track, tick))
    # midi_bytes sorts stably by tick, so shuffling first puts same-tick messages in any order.
    draw(st.randoms(use_true_random=False)).shuffle(placed)
    tracks = [[msg for trk, msg in placed if trk == index] for index in range(n_tracks)]
    return {"tracks": tracks, "ticks_per_beat": tpb, "type_": file_type}


PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, print_blob=True, suppress_health_check=list(HealthCheck),
)


@PROPERTY_SETTINGS
@given(midi=random_midi(), keep_silence=st.booleans())
def test_random_files_match_reference(midi, keep_silence):
    data = midi_bytes(**midi)
    expected_error = aria.reference_error(data)
    if expected_error is not None:
        with pytest.raises(MidiError) as raised:
            TOKENIZER.tokenize_ids(load_midi(data))
        assert raised.value.reason == expected_error
        return
    perf = load_midi(data)
    assert perf.n_parsed_notes == len(aria.reference_parse(data).notes)
    options = dict(remove_preceding_silence=not keep_silence)
    expected = aria.reference_tokens(data, **options)
    assert_same_sequence(TOKENIZER.tokenize(perf, add_dim_tok=False, **options), expected)
    assert_same_sequence(TOKENIZER.tokenize_ids(perf, add_dim_tok=False, **options).tolist(),
                         aria.encode(expected))


# -- (c) the tokenizer contract on hand-built files (1 tick = 1 ms) ----------------------


def piano_file(
    notes: list[tuple],
    pedals: tuple[tuple[int, int], ...] = (),
    programs: tuple[tuple[int, int], ...] = (),
) -> bytes:
    """One track at 500 ticks/beat and 120 bpm, so ticks are milliseconds.

    ``notes`` are (start_ms, length_ms, pitch, velocity[, channel]); ``pedals``
    are (tick, CC64 value) on channel 0; ``programs`` are (channel, program) at tick 0.
    """
    setup = [mido.MetaMessage("set_tempo", tempo=500_000, time=0)]
    setup += [mido.Message("program_change", channel=ch, program=p, time=0) for ch, p in programs]
    offs, ons = [], []
    for start, length, pitch, velocity, *channel in notes:
        ch = channel[0] if channel else 0
        ons.append(mido.Message("note_on", channel=ch, note=pitch, velocity=velocity, time=start))
        offs.append(mido.Message("note_off", channel=ch, note=pitch, time=start + length))
    pedal_msgs = [mido.Message("control_change", control=64, value=v, time=at) for at, v in pedals]
    # midi_bytes keeps this order within a tick: note-offs first, as sequencers write them.
    return midi_bytes([setup + offs + pedal_msgs + ons], type_=0)


def body(data: bytes, **options) -> list:
    """Our tokens between <S> and <E>, checked against the oracle on the way."""
    tokens = TOKENIZER.tokenize(load_midi(data), add_dim_tok=False, **options)
    assert_same_sequence(tokens, aria.reference_tokens(data, **options))
    return tokens[tokens.index(aria.BOS) + 1: -1]


def onsets(tokens: list) -> list:
    return [t for t in tokens if t == aria.TIME or t[0] == "onset"]


def durations(tokens: list) -> list[int]:
    return [t[1] for t in tokens if isinstance(t, tuple) and t[0] == "dur"]


def velocities(tokens: list) -> list[int]:
    return [t[2] for t in tokens if isinstance(t, tuple) and t[0] == "piano"]


def test_segment_boundary_4999_and_5001():
    tokens = body(piano_file([(0, 100, 60, 80), (4999, 100, 62, 80), (5001, 100, 64, 80)]))
    assert onsets(tokens) == [("onset", 0), ("onset", 4990), "<T>", ("onset", 0)]


def test_onsets_near_segment_end_snap_down_within_segment():
    starts = [4985, 4986, 4994, 4995, 4999]
    tokens = body(piano_file([(0, 50, 50, 80)] + [(s, 50, 60 + i, 80) for i, s in enumerate(starts)]))
    assert onsets(tokens) == [("onset", o) for o in (0, 4980, 4990, 4990, 4990, 4990)]


def test_half_way_onset_ties_follow_aria_binary_search():
    tokens = body(piano_file([(0, 50, 50, 80), (5, 50, 60, 80), (15, 50, 61, 80), (25, 50, 62, 80)]))
    assert onsets(tokens) == [("onset", o) for o in (0, 0, 20, 20)]


def test_zero_length_note_is_dropped_by_parser():
    perf = load_midi(piano_file([(0, 0, 60, 80), (100, 200, 62, 80)]))
    assert perf.n_notes == perf.n_parsed_notes == 1
    assert perf.pitch.tolist() == [62]


def test_durations_snap_to_10_ms_from_10_to_5000():
    lengths = [4, 15, 4995, 5004, 7000]
    notes = [(i * 8000, length, 60, 80) for i, length in enumerate(lengths)]
    assert durations(body(piano_file(notes))) == [10, 20, 4990, 5000, 5000]


def test_duration_rounding_to_0_ms_becomes_10():
    # 5000 ticks per beat at 120 bpm: 1 tick = 0.1 ms, so a 3-tick note lasts 0 ms.
    data = midi_bytes([[mido.Message("note_on", note=60, velocity=80, time=0),
                        mido.Message("note_off", note=60, time=3)]], ticks_per_beat=5000)
    assert durations(body(data)) == [10]


def test_exact_half_milliseconds_round_half_to_even():
    # 1000 ticks per beat at 120 bpm: 1 tick = 0.5 ms exactly. Aria rounds with
    # Python's round(): 14.5 -> 14 (then grid 10), while half-up would give 15 (grid 20).
    notes = [(0, 29), (29, 29), (2000, 31)]  # (start, length) in ticks
    messages = []
    for i, (start, length) in enumerate(notes):
        messages += [mido.Message("note_on", note=60 + i, velocity=80, time=start),
                     mido.Message("note_off", note=60 + i, time=start + length)]
    tokens = body(midi_bytes([messages], ticks_per_beat=1000))
    assert onsets(tokens) == [("onset", 0), ("onset", 10), ("onset", 1000)]
    assert durations(tokens) == [10, 10, 20]


def test_velocity_grid():
    # Aria's grid is 0..120; a sounding note never gets velocity 0.
    velocities_in = [1, 4, 10, 64, 120, 125, 127]
    notes = [(i * 100, 50, 60 + i, v) for i, v in enumerate(velocities_in)]
    assert velocities(body(piano_file(notes))) == [10, 10, 10, 60, 120, 120, 120]


def test_note_on_with_velocity_0_ends_a_note():
    data = midi_bytes([[mido.Message("note_on", note=60, velocity=90, time=0),
                        mido.Message("note_on", note=60, velocity=0, time=300)]])
    tokens = body(data)
    assert tokens == [("piano", 60, 90), ("onset", 0), ("dur", 300)]


def test_pedal_extends_only_notes_ending_strictly_inside_it():
    notes = [
        (0, 100, 60, 80),   # ends before the pedal goes down: unchanged
        (0, 200, 62, 80),   # ends exactly when it goes down: unchanged (strict)
        (0, 500, 64, 80),   # ends while it is down: extended to the release at 900
        (0, 900, 65, 80),   # ends exactly at the release: unchanged
        (0, 1000, 67, 80),  # ends after the release: unchanged
    ]
    tokens = body(piano_file(notes, pedals=((200, 127), (400, 100), (900, 0), (950, 0))))
    assert durations(tokens) == [100, 200, 900, 900, 1000]


def test_pedal_left_down_ends_with_the_last_starting_note():
    # The last note in start order ends at 1100 although an earlier one ends at 3000.
    notes = [(0, 3000, 60, 80), (100, 200, 62, 80), (1000, 100, 64, 80)]
    tokens = body(piano_file(notes, pedals=((50, 127),)))
    assert durations(tokens) == [3000, 1000, 100]


def test_note_crossing_a_segment_boundary_is_not_split():
    tokens = body(piano_file([(0, 50, 50, 80), (4999, 601, 60, 80), (5200, 50, 62, 80)]))
    assert tokens[3:] == [("piano", 60, 80), ("onset", 4990), ("dur", 600),
                          "<T>", ("piano", 62, 80), ("onset", 200), ("dur", 50)]


def test_gaps_longer_than_a_segment_give_several_time_tokens():
    tokens = body(piano_file([(0, 50, 60, 80), (12000, 50, 62, 80), (23000, 50, 64, 80)]))
    assert onsets(tokens) == [("onset", 0), "<T>", "<T>", ("onset", 2000), "<T>", "<T>", ("onset", 3000)]


def test_keeping_preceding_silence_gives_leading_time_tokens():
    data = piano_file([(12000, 50, 60, 80)])
    assert onsets(body(data)) == [("onset", 0)]
    assert onsets(body(data, remove_preceding_silence=False)) == ["<T>", "<T>", ("onset", 2000)]


def test_prefix_tokens_come_before_bos():
    notes = [(0, 100, 60, 80, 0), (50, 100, 62, 80, 1), (60, 10, 36, 100, 9), (70, 100, 64, 80, 3)]
    # Channel 2 declares a guitar without notes (Aria still lists it); channel 3 is
    # a chromatic-percussion instrument, which Aria removes with its notes.
    data = piano_file(notes, programs=((1, 40), (2, 25), (3, 12)))
    perf = load_midi(data, metadata={"composer": "chopin"})
    expected = {("prefix", "instrument", x) for x in ("piano", "strings", "guitar", "drum")}
    expected.add(("prefix", "composer", "chopin"))
    for seed in range(20):
        tokens = TOKENIZER.decode(TOKENIZER.tokenize_ids(perf, rng=np.random.default_rng(seed)))
        bos = tokens.index(aria.BOS)
        assert set(tokens[:bos]) == expected and bos == len(expected)
        assert all(t[0] != "prefix" for t in tokens[bos + 1:] if isinstance(t, tuple))
    reference = aria.reference_tokens(data, metadata={"composer": "chopin"})
    assert_same_sequence(TOKENIZER.tokenize(perf, add_dim_tok=False), reference)


def long_file() -> bytes:
    """~90 notes with drums and segment changes: a body well over 150 tokens."""
    notes = [(i * 137, 120, 40 + i % 40, 70) for i in range(80)]
    notes += [(i * 1111 + 3, 10, 36 + i % 3, 100, 9) for i in range(10)]
    return piano_file(notes)


def test_dim_token_sits_about_100_tokens_before_the_end_and_never_splits_a_note():
    data = long_file()
    perf = load_midi(data)
    plain = TOKENIZER.tokenize_ids(perf, add_dim_tok=False).tolist()
    reference_bodies = {
        jitter: aria.encode(aria.reference_tokens(data, dim_jitter=jitter)) for jitter in range(-10, 11)
    }
    for seed in range(200):
        ids = TOKENIZER.tokenize_ids(perf, rng=np.random.default_rng(seed)).tolist()
        assert ids.count(DIM_ID) == 1
        at = ids.index(DIM_ID)
        assert ids[at + 1] < FIRST_DUR_ID, "<D> between a note and its onset/duration"
        assert 88 <= len(ids) - at <= 114
        without = ids[:at] + ids[at + 1:]
        assert_same_sequence(without, plain)
        assert any(split_at_bos(ids)[1] == split_at_bos(ref)[1] for ref in reference_bodies.values())


def test_dim_token_without_rng_is_deterministic():
    perf = load_midi(long_file())
    first = TOKENIZER.tokenize_ids(perf).tolist()
    assert first == TOKENIZER.tokenize_ids(perf).tolist()
    assert first.count(DIM_ID) == 1


def test_no_dim_token_in_short_bodies():
    perf = load_midi(piano_file([(i * 90, 100, 60, 80) for i in range(50)]))  # body: 150 tokens, no <T>
    for seed in range(20):
        assert DIM_ID not in TOKENIZER.tokenize_ids(perf, rng=np.random.default_rng(seed)).tolist()


# -- (d) detokenize(tokenize(x)) == x up to quantisation --------------------------------


def quantised_notes(perf) -> Counter:
    """What decoding must give back: times on the 10 ms grid, velocities on Aria's grid."""
    expected = Counter()
    onset_ms, duration_ms = perf.onset_ms().tolist(), perf.duration_ms().tolist()
    for i, (onset, duration) in enumerate(zip(onset_ms, duration_ms)):
        start = onset // aria.SEGMENT_MS * aria.SEGMENT_MS + aria.quantize_onset(onset % aria.SEGMENT_MS)
        pitch, instrument = int(perf.pitch[i]), INSTRUMENTS[perf.instrument[i]]
        if instrument != "drum":
            velocity = aria.quantize_velocity(int(perf.velocity[i]))
            expected[(start, aria.quantize_duration(duration), pitch, velocity, instrument)] += 1
        elif 35 <= pitch <= 81:  # off-kit drums have no token and do not come back
            expected[(start, aria.TIME_STEP_MS, pitch, TOKENIZER.config.drum_velocity, "drum")] += 1
    return expected


def decoded_notes(perf) -> Counter:
    rows = zip(perf.onset_ms(remove_preceding_silence=False).tolist(), perf.duration_ms().tolist(),
               perf.pitch.tolist(), perf.velocity.tolist(), perf.instrument.tolist())
    return Counter((on, dur, p, v, INSTRUMENTS[i]) for on, dur, p, v, i in rows)


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda p: p.stem)
def test_detokenize_round_trip(case):
    perf = golden_performance(case)
    decoded = TOKENIZER.detokenize(TOKENIZER.tokenize(perf))
    assert decoded_notes(decoded) == quantised_notes(perf)
    assert set(decoded.instruments) == set(perf.instruments)
