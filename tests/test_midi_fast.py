"""The compiled reader (engine="fast") gives exactly what mido (engine="mido") gives.

Same Performance arrays, or the same MidiError reason (or exception type) when
mido rejects a file; on real files the fast reader must never hand over to
mido. The fuzz builds raw Standard MIDI File bytes (running status, sysex, odd
meta events, wrong chunk lengths and track counts) and mutates real files,
and reports how often the fast reader declined.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aria_model import midi_fast
from aria_model.midi import MidiError, Performance, load_midi
from aria_model.notes_table import parse_to_parquet
from tests.conftest import GOLDEN_MIDI
from tests.midi_builders import notes_file

# MIDI files shipped with music21 (a dependency) for its own tests: more real writers' output.
MUSIC21_MIDI = sorted(Path(importlib.util.find_spec("music21").origin).parent.rglob("*.mid"))


def outcome(data: bytes, engine: str) -> tuple[Performance | str, str | None]:
    """(the Performance, or what was raised as "MidiError: reason" or the exception's type; parsed_by)."""
    try:
        perf = load_midi(data, engine=engine)
        return perf, perf.parsed_by
    except MidiError as exc:
        return f"MidiError: {exc.reason}", exc.parsed_by
    except Exception as exc:  # mido lets some errors through (e.g. a key signature it cannot name)
        return type(exc).__name__, "mido-fallback" if engine == "fast" else engine


def differences(fast: Performance | str, mido: Performance | str) -> list[str]:
    """The fields in which two outcomes differ (``parsed_by`` aside)."""
    if isinstance(fast, str) or isinstance(mido, str):
        return [] if fast == mido else [f"{fast} vs {mido}"]
    found = []
    for name in (f.name for f in dataclasses.fields(Performance) if f.name != "parsed_by"):
        a, b = getattr(fast, name), getattr(mido, name)
        if isinstance(a, np.ndarray):
            if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                found.append(f"{name}: {a} vs {b}")
        elif a != b:
            found.append(f"{name}: {a!r} vs {b!r}")
    return found


def assert_fast_equals_mido(data: bytes) -> str:
    """Compare the engines on one file; return which engine the fast path ended up using."""
    (fast, parsed_by), (mido, _) = outcome(data, "fast"), outcome(data, "mido")
    assert not differences(fast, mido), differences(fast, mido)
    return parsed_by


# -- real files: identical, and never a fallback -----------------------------------------


@pytest.mark.parametrize("path", GOLDEN_MIDI, ids=lambda p: p.name)
def test_golden_file_fast_equals_mido_without_fallback(path):
    assert assert_fast_equals_mido(path.read_bytes()) == "fast"


@pytest.mark.parametrize("path", MUSIC21_MIDI, ids=lambda p: p.name)
def test_music21_test_file_fast_equals_mido_without_fallback(path):
    assert assert_fast_equals_mido(path.read_bytes()) == "fast"


def test_demo_files_fast_equals_mido_without_fallback(tiny_demo_corpus):
    paths = sorted(tiny_demo_corpus.rglob("*.mid"))
    assert paths
    engines = Counter(assert_fast_equals_mido(p.read_bytes()) for p in paths)
    assert engines == {"fast": len(paths)}


def test_engine_is_recorded_and_checked():
    data = notes_file([(60, 0, 100)])
    assert load_midi(data).parsed_by == "fast"
    assert load_midi(data, engine="mido").parsed_by == "mido"
    with pytest.raises(ValueError, match="unknown engine"):
        load_midi(data, engine="symusic")


# -- mido's behaviours, one hand-built file each -----------------------------------------


def vlq(value: int) -> bytes:
    out = [value & 0x7F]
    while value > 0x7F:
        value >>= 7
        out.append(0x80 | (value & 0x7F))
    return bytes(reversed(out))


def chunk(name: bytes, body: bytes, length: int | None = None) -> bytes:
    return name + (len(body) if length is None else length).to_bytes(4, "big") + body


def smf(*tracks: bytes, n_tracks: int | None = None, file_type: int = 1, ticks_per_beat: int = 480,
        header_extra: bytes = b"") -> bytes:
    header = (file_type.to_bytes(2, "big") + (len(tracks) if n_tracks is None else n_tracks).to_bytes(2, "big")
              + ticks_per_beat.to_bytes(2, "big") + header_extra)
    return chunk(b"MThd", header) + b"".join(tracks)


def mtrk(*events: bytes, end: bool = True, length: int | None = None) -> bytes:
    return chunk(b"MTrk", b"".join(events) + (b"\x00\xff\x2f\x00" if end else b""), length)


def ev(delta: int, *payload: int) -> bytes:
    return vlq(delta) + bytes(payload)


NOTE = (ev(0, 0x90, 60, 80), ev(100, 0x80, 60, 0))  # one note, 100 ticks
TEXT = ev(0, 0xFF, 0x01, 5, *b"caf\xe9!")  # latin-1

# name -> (file, which engine load_midi ends up using)
MIDO_BEHAVIOURS = {
    "running status continues a note-on run":
        (smf(mtrk(ev(0, 0x90, 60, 80), ev(0, 62, 80), ev(100, 60, 0), ev(0, 62, 0))), "fast"),
    "running status survives a meta event":
        (smf(mtrk(ev(0, 0x90, 60, 80), ev(0, 0xFF, 0x01, 1, 65), ev(100, 60, 0))), "fast"),
    "a data byte after a sysex starts a sysex":
        (smf(mtrk(*NOTE, ev(0, 0xF0, 2, 1, 0xF7), ev(0, 0x33, 1, 9))), "fast"),
    "unknown meta events lose their delta time":
        (smf(mtrk(ev(0, 0x90, 60, 80), ev(50, 0xFF, 0x60, 1, 0), ev(50, 0x80, 60, 0))), "fast"),
    "messages after end-of-track are read":
        (smf(mtrk(ev(0, 0x90, 60, 80), ev(0, 0xFF, 0x2F, 0), ev(100, 0x80, 60, 0), end=False)), "fast"),
    "missing end-of-track": (smf(mtrk(*NOTE, end=False)), "fast"),
    "latin-1 text and copyright": (smf(mtrk(TEXT, ev(0, 0xFF, 0x02, 2, 0xA9, 0xFF), *NOTE)), "fast"),
    "header counts fewer tracks than the file has":
        (smf(mtrk(*NOTE), mtrk(ev(0, 0x90, 70, 80), ev(9, 0x80, 70, 0)), n_tracks=1), "fast"),
    "negative track count reads nothing": (smf(mtrk(*NOTE), n_tracks=0xFFFF), "fast"),
    "longer header is skipped": (smf(mtrk(*NOTE), header_extra=b"\x01\x02"), "fast"),
    "out-of-range file type": (smf(mtrk(*NOTE), file_type=7), "fast"),
    "absurd tempi":
        (smf(mtrk(ev(0, 0xFF, 0x51, 3, 0, 0, 0), *NOTE, ev(5, 0xFF, 0x51, 3, 0xFF, 0xFF, 0xFF), *NOTE)), "fast"),
    "time signature mido's log2 rejects": (smf(mtrk(ev(0, 0xFF, 0x58, 4, 4, 29, 24, 8), *NOTE)), "mido-fallback"),
    "key signature mido cannot name": (smf(mtrk(ev(0, 0xFF, 0x59, 2, 9, 0), *NOTE)), "mido-fallback"),
    "header counts more tracks than the file has": (smf(mtrk(*NOTE), n_tracks=2), "mido-fallback"),
    "chunk that is not MTrk": (smf(chunk(b"XFIH", b"\x00\x00"), mtrk(*NOTE)), "mido-fallback"),
    "message runs past its chunk": (smf(mtrk(*NOTE, length=10), mtrk(*NOTE)), "mido-fallback"),
    "data byte > 127": (smf(mtrk(ev(0, 0x90, 60, 200), *NOTE)), "mido-fallback"),
    "system real-time message": (smf(mtrk(ev(0, 0xF8), *NOTE)), "mido-fallback"),
    "five-byte delta time": (smf(mtrk(b"\x80\x80\x80\x80\x00\x90\x3c\x50", NOTE[1])), "mido-fallback"),
    "SMPTE division": (smf(mtrk(*NOTE), ticks_per_beat=0xE728), "mido-fallback"),
    "truncated": (smf(mtrk(*NOTE))[:-3], "mido-fallback"),
}


@pytest.mark.parametrize("name", MIDO_BEHAVIOURS)
def test_mido_behaviour(name):
    data, engine = MIDO_BEHAVIOURS[name]
    assert assert_fast_equals_mido(data) == engine


def test_unknown_meta_event_stops_the_clock_as_in_mido():
    # The note-off comes 50 + 50 ticks after the note-on, but mido drops the unknown event's 50.
    perf = load_midi(MIDO_BEHAVIOURS["unknown meta events lose their delta time"][0])
    assert perf.end_tick.tolist() == [50]


def test_unsupported_says_why():
    with pytest.raises(midi_fast.Unsupported, match="system common or real-time"):
        midi_fast.read_performance(MIDO_BEHAVIOURS["system real-time message"][0])


def test_parse_report_counts_fallbacks(tmp_path):
    names = ("running status continues a note-on run", "system real-time message", "truncated")
    for i, name in enumerate(names):
        (tmp_path / f"{i}.mid").write_bytes(MIDO_BEHAVIOURS[name][0])
    files = [(p.stem, str(p)) for p in sorted(tmp_path.glob("*.mid"))]
    report = parse_to_parquet(files, tmp_path / "notes.parquet", tmp_path / "q.parquet", workers=1)
    assert (report.parsed, report.quarantined, report.fallbacks) == (2, 1, 2)


# -- fuzz: generated and mutated files ---------------------------------------------------

FUZZ_SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
SMALL_REAL_FILES = [p.read_bytes() for p in GOLDEN_MIDI if p.stat().st_size < 25_000]

# Half the generated files are odd (bytes > 127 where data belongs, system messages,
# undecodable meta events, wrong chunk lengths and track counts, SMPTE time);
# the other half are well-formed, so the fast path itself is fuzzed too.
deltas = st.one_of(st.integers(0, 3), st.integers(0, 500), st.integers(0, 2**28 - 1))


def data_byte(odd: bool):
    return st.one_of(st.integers(0, 127), st.integers(128, 255)) if odd else st.integers(0, 127)


@st.composite
def channel_message(draw, odd: bool) -> tuple[int, bytes]:
    """(status, data bytes) of a channel message."""
    family = draw(st.sampled_from([0x80, 0x90, 0x90, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0]))
    status = family | draw(st.sampled_from([0, 1, 9, draw(st.integers(0, 15))]))
    if family == 0xB0:  # mostly the sustain pedal
        data = [draw(st.sampled_from([64, 64, 7])), draw(data_byte(odd))]
    else:  # few pitches and velocity 0 often: overlaps and note-on offs
        pitch = draw(st.sampled_from([60, 61, draw(data_byte(odd))]))
        data = [pitch, draw(st.sampled_from([0, 80, draw(data_byte(odd))]))]
    return status, bytes(data[: 1 if family in (0xC0, 0xD0) else 2])


WELL_FORMED_META = [0x01, 0x02, 0x03, 0x51, 0x60, 0x7F]  # text, copyright, name, tempo, unknown, sequencer
ODD_META = [0x00, 0x20, 0x21, 0x2F, 0x51, 0x54, 0x58, 0x59, 0x0A, 0xD8]  # any payload: mido may not decode it


@st.composite
def meta_event(draw, odd: bool) -> bytes:
    meta_type = draw(st.sampled_from(WELL_FORMED_META + (ODD_META if odd else [])))
    if meta_type == 0x51 and not odd:  # tempo, absurd ones included
        payload = draw(st.sampled_from([b"\x07\xa1\x20", b"\x00\x00\x00", b"\xff\xff\xff", b"\x00\x00\x01"]))
    else:  # text with non-ASCII bytes; odd: any payload for any type
        payload = draw(st.binary(max_size=12))
    return bytes([0xFF, meta_type]) + vlq(len(payload)) + payload


@st.composite
def sysex_event(draw, odd: bool) -> bytes:
    payload = bytes(draw(st.lists(data_byte(odd), max_size=6))) + draw(st.sampled_from([b"\xf7", b""]))
    return bytes([draw(st.sampled_from([0xF0, 0xF7]))]) + vlq(len(payload)) + payload


ODD_EVENTS = [b"\xf8", b"\xf1\x10", b"\xf4", b"\x40"]  # real-time, system common, undefined, bare data byte


@st.composite
def track_chunk(draw, odd: bool) -> bytes:
    events = []
    last_status = None  # mido's running status: set by channel messages and sysex, not by meta events
    for _ in range(draw(st.integers(0, 25))):
        what = draw(st.sampled_from(["channel"] * 8 + ["meta", "sysex"] + (["odd"] if odd else [])))
        if what == "channel":
            status, data = draw(channel_message(odd))
            # Leave the status out where it repeats (odd files: anywhere).
            running = draw(st.integers(0, 2)) == 0 and (odd or status == last_status)
            events.append(vlq(draw(deltas)) + (data if running else bytes([status]) + data))
            if not running:
                last_status = status
        elif what == "meta":
            events.append(vlq(draw(deltas)) + draw(meta_event(odd)))
        elif what == "sysex":
            events.append(vlq(draw(deltas)) + draw(sysex_event(odd)))
            last_status = 0xF0
        else:
            events.append(vlq(draw(deltas)) + draw(st.sampled_from(ODD_EVENTS)))
    body = b"".join(events) + draw(st.sampled_from([b"\x00\xff\x2f\x00", b""]))  # end-of-track or not
    length = len(body) + (draw(st.sampled_from([0, 0, 0, -1, 1, 7])) if odd else 0)
    name = draw(st.sampled_from([b"MTrk"] * 6 + [b"XFIH"])) if odd else b"MTrk"
    return chunk(name, body, max(length, 0))


@st.composite
def generated_file(draw) -> tuple[bool, bytes]:
    """(whether the file is odd, its bytes)."""
    odd = draw(st.booleans())
    tracks = draw(st.lists(track_chunk(odd), max_size=4))
    # Track count as the header says: fewer than the chunks always reads fine; odd: more, or negative.
    n_tracks = len(tracks) - draw(st.integers(0, 1)) + (draw(st.sampled_from([0, 1, 0x8000])) if odd else 0)
    return odd, smf(
        *tracks,
        n_tracks=max(n_tracks, 0) % 0x10000,
        file_type=draw(st.sampled_from([0, 1, 2, 5])),
        ticks_per_beat=draw(st.sampled_from([96, 480, 960, 1] * 3 + ([0, 0xE728] if odd else []))),
        header_extra=draw(st.sampled_from([b"", b"\x00\x00"])),
    ) + draw(st.sampled_from([b"", b"trailing bytes"]))


@st.composite
def mutated_real_file(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SMALL_REAL_FILES)))
    rng = random.Random(draw(st.integers(0, 2**32)))
    for _ in range(draw(st.integers(1, 3))):
        if len(data) <= 4:
            break
        at = rng.randrange(4, len(data))  # keep "MThd": not_midi is decided before either engine
        mutation = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        if mutation == "truncate":
            del data[at:]
        elif mutation == "flip":  # half the time to a 7-bit value: a status byte becomes running status
            data[at] = rng.randrange(rng.choice([128, 256]))
        elif mutation == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            del data[at : at + rng.randint(1, 4)]
    return bytes(data)


def _fuzz(strategy, label: str) -> Counter:
    """Compare the engines on every drawn (odd, data); count "fast" and each fallback reason."""
    engines: Counter = Counter()

    @FUZZ_SETTINGS
    @given(case=strategy)
    def compare(case):
        odd, data = case
        engine = assert_fast_equals_mido(data)
        if engine == "fast":
            engines["fast"] += 1
            return
        assert odd, "a well-formed file went to mido"
        try:
            midi_fast.read_performance(data)
        except midi_fast.Unsupported as why:
            engines[f"fallback: {why}"] += 1

    compare()
    print(f"\n{label}: {sum(engines.values())} files, {dict(engines.most_common())}")
    return engines


def test_fuzz_generated_files():
    engines = _fuzz(generated_file(), "generated files")
    # Half the files are odd; the fast path must carry the well-formed ones and then some.
    assert engines["fast"] >= 0.5 * sum(engines.values()), engines


def test_fuzz_mutated_real_files():
    engines = _fuzz(mutated_real_file().map(lambda data: (True, data)), "mutated real files")
    assert engines["fast"] > 0, engines


@st.composite
def dense_track(draw) -> bytes:
    """A long well-formed track: chords (equal starts closed in shuffled order), overlapping
    same-pitch notes, pedal on several channels, program changes, tempo changes."""
    events = []
    for _ in range(draw(st.integers(50, 400))):
        what = draw(st.sampled_from(["on"] * 6 + ["off"] * 5 + ["pedal"] * 2 + ["program", "tempo"]))
        delta = draw(st.sampled_from([0, 0, 0, 1, 30, 480, 20_000]))  # ties, and jumps past many pedal intervals
        ch = draw(st.sampled_from([0, 0, 1, 9]))
        pitch = draw(st.integers(58, 64))
        if what == "on":
            events.append(ev(delta, 0x90 | ch, pitch, draw(st.integers(1, 127))))
        elif what == "off":
            events.append(ev(delta, draw(st.sampled_from([0x80, 0x90])) | ch, pitch, 0))
        elif what == "pedal":
            events.append(ev(delta, 0xB0 | ch, 64, draw(st.sampled_from([0, 63, 64, 127]))))
        elif what == "program":  # mostly kept families; 8-15 (chromatic) removes the channel
            events.append(ev(delta, 0xC0 | ch, draw(st.sampled_from([0, 0, 24, 40, 9]))))
        else:
            events.append(ev(delta, 0xFF, 0x51, 3, *draw(st.sampled_from([b"\x07\xa1\x20", b"\x03\xd0\x90"]))))
    return mtrk(*events)


@settings(FUZZ_SETTINGS, max_examples=80)
@given(tracks=st.lists(dense_track(), min_size=1, max_size=4))
def test_fuzz_dense_multitrack_files(tracks):
    assert assert_fast_equals_mido(smf(*tracks)) == "fast"


def test_a_key_signature_mido_cannot_name_is_a_counted_corrupt_fallback():
    # key_signature meta with 8 sharps: mido raises KeySignatureError (not a ValueError).
    track = b"\x00\xff\x59\x02\x08\x00" + b"\x00\x90\x3c\x40\x10\x80\x3c\x00\x00\xff\x2f\x00"
    data = b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0" + b"MTrk" + len(track).to_bytes(4, "big") + track
    with pytest.raises(MidiError) as err:
        load_midi(data)
    assert err.value.reason == "corrupt" and err.value.parsed_by == "mido-fallback"
