"""Quality rules (aria_model.quality, both engines) against plain-Python recomputations, and the
compiled engine against DuckDB's queries (sql/quality_*.sql), table for table and bit for bit.

Every metric is recomputed here with loops, Counter and math.log2, stepping Aria's windows one by
one, on hand-built note lists written as small midi_notes Parquet parts; every rule test runs on
both engines. The differential tests compare the engines on the demo corpus, the golden MIDI files,
degenerate files and hypothesis-drawn note lists.
"""

import hashlib
import math
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aria_model import duckdb_entropy, quality_compiled
from aria_model.midi import DRUM_CHANNEL
from aria_model.notes_table import part_files, update_notes_tables
from aria_model.quality import (
    ENGINES,
    NOTE_LENGTH_CAP_MS,
    RULES,
    DensityWindow,
    PitchWindow,
    QualityConfig,
    evaluate_quality,
)
from assets import demo_corpus, midi_notes, quality_filter, raw_midi_manifest
from pipelines.resources import AriaHome, MidiSource
from tests.conftest import GOLDEN_MIDI, GOOD_GOLDEN


@dataclass
class Piece:
    """One midi_notes row: note lists in Aria's order (by onset)."""

    file_id: str
    onset: list[int]
    duration: list[int]
    pitch: list[int]
    velocity: list[int] | None = None
    channel: list[int] | None = None
    instruments: tuple[str, ...] = ("piano",)

    def __post_init__(self):
        self.velocity = self.velocity or [64] * len(self.onset)
        self.channel = self.channel or [0] * len(self.onset)

    def tonal(self) -> list[tuple[int, int, int, int]]:
        """(onset, duration, pitch, velocity) of the non-drum notes."""
        notes = zip(self.onset, self.duration, self.pitch, self.velocity, self.channel)
        return [(t, d, p, v) for t, d, p, v, c in notes if c != DRUM_CHANNEL]


def write_part(path, pieces: list[Piece]) -> str:
    pq.write_table(pa.table({
        "file_id": [p.file_id for p in pieces],
        "n_notes": pa.array([len(p.onset) for p in pieces], pa.int32()),
        "onset_ms": pa.array([p.onset for p in pieces], pa.list_(pa.int64())),
        "duration": pa.array([p.duration for p in pieces], pa.list_(pa.int32())),
        "pitch": pa.array([p.pitch for p in pieces], pa.list_(pa.uint8())),
        "velocity": pa.array([p.velocity for p in pieces], pa.list_(pa.uint8())),
        "channel": pa.array([p.channel for p in pieces], pa.list_(pa.uint8())),
        "instruments": pa.array([list(p.instruments) for p in pieces], pa.list_(pa.string())),
    }), path)
    return str(path)


def evaluate(tmp_path, pieces: list[Piece], config: QualityConfig = QualityConfig(), **kwargs) -> dict[str, dict]:
    table = evaluate_quality([write_part(tmp_path / "part.parquet", pieces)], config, **kwargs)
    return {row["file_id"]: row for row in table.to_pylist()}


@pytest.fixture(params=list(ENGINES))
def engine(request) -> str:
    """Every rule test runs on both engines."""
    return request.param


# -- plain-Python recomputations of Aria's tests ---------------------------------------------------

def bits(values) -> float:
    counts = Counter(values)
    return -sum(n / len(values) * math.log2(n / len(values)) for n in counts.values())


def window_starts(first_ms: int, last_onset_ms: int, seconds: int):
    """Aria's window starts: every second from first_ms until a window reaches last_onset_ms."""
    start = first_ms
    while True:
        yield start
        if start + seconds * 1000 >= last_onset_ms:
            return
        start += 1000


def density(piece: Piece, seconds: int) -> tuple[float, float]:
    notes = [(t, p) for t, _, p, _ in piece.tonal()]
    most = most_of_one_pitch = 0
    for start in window_starts(notes[0][0], notes[-1][0], seconds):
        inside = [p for t, p in notes if start <= t <= start + seconds * 1000]
        most = max(most, len(inside))
        most_of_one_pitch = max(most_of_one_pitch, max(Counter(inside).values(), default=0))
    return most / seconds, most_of_one_pitch / seconds


def fewest_unique_pitches(piece: Piece, seconds: int) -> int:
    notes = [(t, p) for t, _, p, _ in piece.tonal()]
    return min(len({p for t, p in notes if start <= t <= start + seconds * 1000})
               for start in window_starts(piece.onset[0], notes[-1][0], seconds))


def longest_silence_s(piece: Piece) -> float:
    latest_end, longest = piece.onset[0] + piece.duration[0], 0
    for onset, duration in zip(piece.onset[1:], piece.duration[1:]):
        longest = max(longest, onset - latest_end)
        latest_end = max(latest_end, onset + duration)
    return longest / 1000


def timing_entropies(piece: Piece) -> tuple[float, float]:
    tonal = piece.tonal()
    lengths = [min(round(d, -1), 5000) for _, d, _, _ in tonal[1:]]  # Python rounds half to even
    gaps = [b[0] - a[0] for a, b in zip(tonal, tonal[1:])]
    return bits(lengths), bits(gaps)


def max_chunk_kl(piece: Piece, chunks: int = 5, floor: float = 1e-5) -> float:
    tonal = piece.tonal()
    start, end = tonal[0][0], tonal[-1][0]
    histograms = [Counter() for _ in range(chunks)]
    for t, _, p, _ in tonal:
        chunk = (t - start) * chunks // (end - start)
        if chunk < chunks:  # the last onset itself falls after the last chunk, as in Aria
            histograms[chunk][p] += 1
    shares = [{p: n / sum(h.values()) for p, n in h.items()} for h in histograms if h]
    return max((abs(sum(a.get(p, floor) * math.log2(a.get(p, floor) / b.get(p, floor)) for p in range(128)))
                for i, a in enumerate(shares) for b in shares[i + 1:]), default=0.0)


# -- pieces ------------------------------------------------------------------------------------------

def random_piece(seed: int, n: int = 400, with_drums: bool = False) -> Piece:
    """Chords, repeated pitches, onsets on whole seconds, equal onsets of one pitch and pitches that
    come and go, on purpose."""
    rng = random.Random(seed)
    onset, t = [], 0
    for _ in range(n):
        t += rng.choice([0, 0, 30, 125, 250, 500, 1000, 2000, rng.randrange(1, 3000)])
        onset.append(t - t % 1000 if rng.random() < 0.1 else t)
    onset.sort()
    channel = [DRUM_CHANNEL if with_drums and rng.random() < 0.15 else 0 for _ in onset]
    if with_drums:
        channel[0] = DRUM_CHANNEL  # Aria's unique-pitch windows then start on a drum note
    return Piece(
        file_id=f"random-{seed}",
        onset=onset,
        duration=[rng.choice([0, 4, 5, 15, 25, 95, 105, 400, 4996, 5004, 9000]) + rng.randrange(3) for _ in onset],
        # pitches 48 and 0 stop, and 71, 72 and 127 start, halfway through
        pitch=[rng.choice([60, 60, 62, 64, 65, 67, 69, 48, 0] if i < n // 2 else [60, 62, 64, 67, 69, 71, 72, 127])
               for i in range(n)],
        velocity=[rng.randrange(1, 128) for _ in onset],
        channel=channel,
        instruments=("piano", "drum") if with_drums else ("piano",),
    )


RANDOM_PIECES = [random_piece(seed, with_drums=seed % 3 == 2) for seed in range(9)]


@pytest.fixture(scope="module", params=list(ENGINES))
def random_results(tmp_path_factory, request):
    return evaluate(tmp_path_factory.mktemp("random"), RANDOM_PIECES, engine=request.param)


@pytest.mark.parametrize("piece", RANDOM_PIECES, ids=lambda p: p.file_id)
def test_note_density_windows_match_stepping_each_window(random_results, piece):
    row = random_results[piece.file_id]
    for seconds in (3, 5, 10, 45):
        notes_per_s, per_pitch = density(piece, seconds)
        assert row[f"max_notes_per_s_{seconds}s"] == pytest.approx(notes_per_s)
        assert row[f"max_notes_per_s_per_pitch_{seconds}s"] == pytest.approx(per_pitch)


@pytest.mark.parametrize("piece", RANDOM_PIECES, ids=lambda p: p.file_id)
def test_unique_pitches_per_window_match_stepping_each_window(random_results, piece):
    row = random_results[piece.file_id]
    for seconds in (30, 60, 120):
        assert row[f"min_unique_pitches_{seconds}s"] == fewest_unique_pitches(piece, seconds)


@pytest.mark.parametrize("piece", RANDOM_PIECES, ids=lambda p: p.file_id)
def test_whole_file_metrics_match_python(random_results, piece):
    row, tonal = random_results[piece.file_id], piece.tonal()
    span_ms = piece.onset[-1] + piece.duration[-1] - piece.onset[0]
    length_entropy, onset_gap_entropy = timing_entropies(piece)
    assert row["pitch_entropy"] == pytest.approx(bits([p for _, _, p, _ in tonal]))
    assert row["length_entropy"] == pytest.approx(length_entropy)
    assert row["onset_gap_entropy"] == pytest.approx(onset_gap_entropy)
    assert row["unique_pitches"] == len({p for _, _, p, _ in tonal})
    assert row["mean_velocity"] == pytest.approx(sum(v for *_, v in tonal) / len(tonal))
    assert row["longest_silence_s"] == pytest.approx(longest_silence_s(piece))
    assert row["length_s"] == pytest.approx(span_ms / 1000)
    assert row["notes_per_s"] == pytest.approx(len(piece.onset) * 1000 / span_ms)
    assert row["notes_per_s_per_instrument"] == pytest.approx(len(piece.onset) * 1000 / span_ms)  # drums don't count
    assert row["n_tonal_notes"] == len(tonal) and row["n_notes"] == len(piece.onset)
    assert row["n_channels"] == len(set(piece.channel))  # one channel, or the drums' besides


def test_any_window_lengths_and_drums_leading_by_part_of_a_second(tmp_path, engine):
    # 1 s and 2 s windows break a pitch's run of window starts at most of its gaps; a drum 737 ms
    # before the first non-drum note puts the unique-pitch windows off the density windows' seconds
    pieces = [random_piece(seed, n=200, with_drums=seed % 2 == 0) for seed in range(20, 26)]
    for piece in pieces[::2]:  # these start on a drum note
        piece.onset = [0] + [t + 737 for t in piece.onset[1:]]
    config = QualityConfig(density_windows=(DensityWindow(1, 60, 15), DensityWindow(7, 45, 10)),
                           pitch_windows=(PitchWindow(1, 1), PitchWindow(2, 3), PitchWindow(13, 3)))
    rows = evaluate(tmp_path, pieces, config, engine=engine)
    for piece in pieces:
        row = rows[piece.file_id]
        for seconds in (1, 7):
            notes_per_s, per_pitch = density(piece, seconds)
            assert row[f"max_notes_per_s_{seconds}s"] == pytest.approx(notes_per_s)
            assert row[f"max_notes_per_s_per_pitch_{seconds}s"] == pytest.approx(per_pitch)
        for seconds in (1, 2, 13):
            assert row[f"min_unique_pitches_{seconds}s"] == fewest_unique_pitches(piece, seconds)


def test_windows_hold_the_notes_on_both_ends(tmp_path, engine):
    # [0 s, 3 s] holds all seven notes of pitch 60, the one at 3000 ms included
    edge = Piece("edge", onset=[0, 500, 1000, 1500, 2000, 2500, 3000, 9000], duration=[100] * 8, pitch=[60] * 7 + [62])
    row = evaluate(tmp_path, [edge], engine=engine)["edge"]
    assert row["max_notes_per_s_3s"] == row["max_notes_per_s_per_pitch_3s"] == pytest.approx(7 / 3)
    assert density(edge, 3) == pytest.approx((7 / 3, 7 / 3))


def test_unique_pitch_windows_stop_at_the_first_reaching_the_last_onset(tmp_path, engine):
    # windows start every second up to the one starting at 100 s, which ends on the last onset (130 s)
    # and holds 2 pitches; one more window would hold only the last note
    onset = [1000 * i for i in range(101)] + [130_000]
    piece = Piece("tail", onset=onset, duration=[500] * len(onset), pitch=[61 + i % 10 for i in range(101)] + [60])
    row = evaluate(tmp_path, [piece], engine=engine)["tail"]
    assert row["min_unique_pitches_30s"] == fewest_unique_pitches(piece, 30) == 2


def test_timing_entropy_rounds_half_to_even_and_caps_at_5_s(tmp_path, engine):
    # 15 -> 20 and 25 -> 20 (half to even), 5004 and 9000 -> 5000; the first note's length is skipped
    piece = Piece("f", onset=[0, 100, 300, 600, 1000, 1500], duration=[777, 15, 25, 5004, 9000, 40], pitch=[60] * 6)
    row = evaluate(tmp_path, [piece], engine=engine)["f"]
    assert row["length_entropy"] == pytest.approx(bits([20, 20, 5000, 5000, 40]))
    assert row["onset_gap_entropy"] == pytest.approx(bits([100, 200, 300, 400, 500]))


def test_silence_is_measured_from_the_latest_end_so_far(tmp_path, engine):
    # the long first note covers the second; the gap runs from 9000 (its end) to 12000
    piece = Piece("f", onset=[0, 1000, 12000, 12500], duration=[9000, 500, 100, 30000], pitch=[60, 62, 64, 65])
    assert evaluate(tmp_path, [piece], engine=engine)["f"]["longest_silence_s"] == 3.0


def test_silence_follows_aria_through_negative_note_lengths(tmp_path, engine):
    # midi_notes holds some negative lengths; Aria's loop starts from the first note's end regardless
    piece = Piece("f", onset=[0, 100, 5000, 5100], duration=[-26, 50, -10, 400], pitch=[60, 62, 64, 65])
    row = evaluate(tmp_path, [piece], engine=engine)["f"]
    assert row["longest_silence_s"] == pytest.approx(longest_silence_s(piece)) == 4.85


def test_silence_never_spans_two_files(tmp_path, engine):
    early = Piece("a-early", [0], [100], [60])
    late = Piece("b-late", [50_000, 51_000], [2000, 100], [60, 62])  # stored right after a-early
    rows = evaluate(tmp_path, [early, late], engine=engine)
    assert rows["b-late"]["longest_silence_s"] == 0 and rows["a-early"]["longest_silence_s"] == 0


def test_notes_per_second_uses_the_end_of_the_last_note_to_start(tmp_path, engine):
    # Aria divides by (end of note_msgs[-1]) - first start, not by the latest end
    piece = Piece("f", onset=[0, 1000, 2000], duration=[10000, 100, 2000], pitch=[60, 62, 64])
    row = evaluate(tmp_path, [piece], engine=engine)["f"]
    assert row["length_s"] == 4.0 and row["notes_per_s"] == 0.75


def test_instruments_and_channels(tmp_path, engine):
    piece = Piece("f", onset=[0, 10, 20, 30], duration=[5] * 4, pitch=[60, 38, 62, 64], channel=[0, DRUM_CHANNEL, 1, 2],
                  instruments=("piano", "strings", "drum"))
    row = evaluate(tmp_path, [piece], engine=engine)["f"]
    assert row["n_instruments"] == 2  # drums are no instrument class of their own
    assert row["n_channels"] == 4
    assert row["notes_per_s_per_instrument"] == pytest.approx(row["notes_per_s"] / 2)


def long_piece(file_id: str, chunk_pitches: list[list[int]], minutes: float = 25.0) -> Piece:
    """Five chunks of notes every 500 ms over ``minutes``, chunk i cycling through chunk_pitches[i]."""
    count = int(minutes * 60 * 2)
    chunks = [i * 5 // count for i in range(count)]
    pitch = [chunk_pitches[c][i % len(chunk_pitches[c])] for i, c in enumerate(chunks)]
    return Piece(file_id, onset=[500 * i for i in range(count)], duration=[400] * count, pitch=pitch)


def test_repetitive_content_matches_python_kl(tmp_path, engine):
    varied = long_piece("varied", [[60, 62], [60, 64, 67], [50, 52, 53, 55], [70], [60, 61, 62, 63, 64]])
    loop = long_piece("loop", [[60, 62, 64, 65]] * 5)
    short = long_piece("short", [[60]] * 5, minutes=10)
    rows = evaluate(tmp_path, [varied, loop, short], engine=engine)
    assert rows["varied"]["max_chunk_kl"] == pytest.approx(max_chunk_kl(varied))
    assert rows["varied"]["max_chunk_kl"] > 0.2 and "repetitive_content" not in rows["varied"]["failed_rules"]
    assert rows["loop"]["max_chunk_kl"] == pytest.approx(max_chunk_kl(loop)) and rows["loop"]["max_chunk_kl"] < 0.2
    assert "repetitive_content" in rows["loop"]["failed_rules"]
    assert rows["short"]["max_chunk_kl"] == 0.0 and "repetitive_content" not in rows["short"]["failed_rules"]


# -- thresholds, rule switches, presets ----------------------------------------------------------------

def good_piece(file_id: str = "good") -> Piece:
    """60 s of a varied, unquantised line: passes every Aria rule."""
    rng = random.Random(1)
    onset = sorted(rng.randrange(0, 60_000) for _ in range(360))
    return Piece(file_id, onset=onset, duration=[rng.randrange(50, 2000) for _ in onset],
                 pitch=[rng.randrange(40, 90) for _ in onset], velocity=[rng.randrange(40, 90) for _ in onset])


def test_a_varied_piece_passes_every_rule(tmp_path, engine):
    row = evaluate(tmp_path, [good_piece()], engine=engine)["good"]
    assert row["passed"] and row["failed_rules"] == []


def test_failed_rules_name_exactly_the_rules_whose_threshold_is_crossed(tmp_path, engine):
    good = good_piece()
    quiet = Piece("quiet", good.onset, good.duration, good.pitch, velocity=[10] * len(good.onset))
    gap = Piece("gap", [*good.onset, 90_000], [*good.duration, 100], [*good.pitch, 60])  # 28+ s of silence
    rows = evaluate(tmp_path, [good, quiet, gap], engine=engine)
    assert rows["quiet"]["failed_rules"] == ["mean_note_velocity"] and not rows["quiet"]["passed"]
    assert "silent_interval" in rows["gap"]["failed_rules"] and rows["gap"]["longest_silence_s"] > 20


def test_thresholds_come_from_the_config(tmp_path, engine):
    config = QualityConfig(min_mean_velocity=70.0, max_silence_s=5.0)
    row = evaluate(tmp_path, [good_piece()], config, engine=engine)["good"]
    assert "mean_note_velocity" in row["failed_rules"]
    assert ("silent_interval" in row["failed_rules"]) == (row["longest_silence_s"] >= 5.0)


def test_switched_off_rules_keep_their_metrics_but_never_fail(tmp_path, engine):
    quiet = Piece("quiet", [0, 40_000], [100, 100], [60, 61], velocity=[5, 5])
    full = evaluate(tmp_path, [quiet], engine=engine)["quiet"]
    assert "mean_note_velocity" in full["failed_rules"]
    lenient = evaluate(tmp_path, [quiet], QualityConfig().without("mean_note_velocity"), engine=engine)["quiet"]
    assert "mean_note_velocity" not in lenient["failed_rules"] and lenient["mean_velocity"] == 5
    off = evaluate(tmp_path, [quiet], QualityConfig.preset("off"), engine=engine)["quiet"]
    assert off["passed"] and off["failed_rules"] == [] and off["longest_silence_s"] == pytest.approx(39.9)


def test_presets_and_config_mistakes():
    light = QualityConfig.preset("light")
    assert light.enabled < set(RULES) and "note_timing_entropy" not in light.enabled
    assert QualityConfig.preset("aria").enabled == set(RULES) and not QualityConfig.preset("off").enabled
    with pytest.raises(ValueError, match="unknown quality preset"):
        QualityConfig.preset("heavy")
    with pytest.raises(ValueError, match="unknown quality rules"):
        QualityConfig().without("silence")
    with pytest.raises(ValueError, match="whole seconds"):
        QualityConfig(pitch_windows=(PitchWindow(0, 5),))
    with pytest.raises(ValueError, match="above 0"):
        QualityConfig(repetitive_min_length_min=0)


def test_per_window_rules_fail_when_any_window_fails(tmp_path, engine):
    # a trill of one pitch: 20 notes/s of pitch 60 for 4 s breaks the 15/s-per-pitch limit over 3 s
    trill = Piece("trill", onset=[50 * i for i in range(80)], duration=[40] * 80, pitch=[60] * 80)
    row = evaluate(tmp_path, [trill], engine=engine)["trill"]
    assert row["max_notes_per_s_per_pitch_3s"] > 15 and "note_density_in_interval" in row["failed_rules"]


# -- degenerate files ----------------------------------------------------------------------------

def test_degenerate_files_get_null_free_metrics_and_clear_failures(tmp_path, engine):
    pieces = [
        Piece("one_note", [0], [500], [60]),
        Piece("same_pitch", [250 * i for i in range(400)], [200] * 400, [60] * 400),
        Piece("ten_hours_apart", [0, 36_000_000], [1000, 1000], [60, 64]),
        Piece("drums_only", [0, 500, 1000], [10] * 3, [36, 38, 42], channel=[DRUM_CHANNEL] * 3, instruments=("drum",)),
        Piece("empty", [], [], []),
    ]
    rows = evaluate(tmp_path, pieces, engine=engine)
    assert set(rows) == {p.file_id for p in pieces}
    for row in rows.values():
        assert all(value is not None for value in row.values()), row
        assert not row["passed"] and row["failed_rules"]
    assert rows["one_note"]["length_s"] == 0.5 and rows["one_note"]["longest_silence_s"] == 0
    assert {"note_pitch_entropy", "unique_pitch_count"} <= set(rows["same_pitch"]["failed_rules"])
    apart = rows["ten_hours_apart"]
    assert apart["longest_silence_s"] == 35_999 and apart["min_unique_pitches_30s"] == 0
    assert rows["drums_only"]["n_tonal_notes"] == 0 and "note_density_in_interval" in rows["drums_only"]["failed_rules"]


def test_a_million_notes_in_one_file(tmp_path):
    """Both engines at once (the same table from each: see assert_engines_agree)."""
    n = 1_000_000
    piece = Piece("huge", onset=[i * 7 for i in range(n)], duration=[5 + i % 3000 for i in range(n)],
                  pitch=[40 + i % 48 for i in range(n)], velocity=[1 + i % 127 for i in range(n)])
    table = assert_engines_agree([write_part(tmp_path / "part.parquet", [piece, good_piece()])], workers=1)
    row = {row["file_id"]: row for row in table.to_pylist()}["huge"]
    assert row["n_notes"] == n and row["max_notes_per_s_3s"] == pytest.approx(density(
        Piece("head", piece.onset[:2000], piece.duration[:2000], piece.pitch[:2000]), 3)[0])
    assert "note_density_in_interval" in row["failed_rules"]


def test_only_the_asked_files_in_batches(tmp_path, engine):
    pieces = [random_piece(seed, n=50) for seed in range(5)]
    wanted = [pieces[3].file_id, pieces[0].file_id, pieces[4].file_id, "not-in-the-parts"]
    rows = evaluate(tmp_path, pieces, file_ids=wanted, batch_files=2, engine=engine)
    assert list(rows) == sorted(wanted[:3])
    in_one_batch = evaluate(tmp_path, pieces, engine=engine)
    for file_id, row in rows.items():
        alone = in_one_batch[file_id]
        assert row.pop("failed_rules") == alone.pop("failed_rules")
        assert row == pytest.approx(alone)


def test_the_same_rows_bit_for_bit_whatever_the_workers_and_batches(tmp_path, engine):
    """One DuckDB thread per batch (the compiled engine replays its order): entropies summed in one
    order, so reruns and any batching agree exactly (DuckDB's threads reorder the sums and change
    the last bit from run to run)."""
    part = write_part(tmp_path / "part.parquet", [random_piece(seed, n=400) for seed in range(12)])
    alone = evaluate_quality([part], workers=1, engine=engine)
    assert evaluate_quality([part], workers=1, engine=engine).equals(alone)
    assert evaluate_quality([part], workers=2, batch_files=5, engine=engine).equals(alone)


# -- the compiled engine against DuckDB's, bit for bit ---------------------------------------------

def assert_engines_agree(parts: list[str], config: QualityConfig = QualityConfig(), **kwargs) -> pa.Table:
    """Both engines on the same parts give the same table: schema, rows, every float to the last bit."""
    compiled = evaluate_quality(parts, config, engine="compiled", **kwargs)
    reference = evaluate_quality(parts, config, engine="duckdb", **kwargs)
    assert compiled.schema.equals(reference.schema)
    assert compiled["file_id"].equals(reference["file_id"])
    for name in compiled.column_names:
        if not compiled[name].equals(reference[name]):
            ours, theirs = compiled[name].to_pylist(), reference[name].to_pylist()
            file_id, mine, duck = next((f, a, b) for f, a, b in zip(compiled["file_id"].to_pylist(), ours, theirs)
                                       if a != b)
            pytest.fail(f"{name} of {file_id}: compiled {mine!r}, duckdb {duck!r}")
    return compiled


def parsed_parts(midi_files: list, tmp_path) -> list[str]:
    """The midi_notes parts of these MIDI files, parsed as the ingest does."""
    files = [(hashlib.sha256(path.read_bytes()).hexdigest(), str(path)) for path in midi_files]
    update_notes_tables(files, tmp_path / "notes", tmp_path / "quarantine", workers=1)
    return [str(part) for part in part_files(tmp_path / "notes")]


def test_engines_agree_on_the_golden_files(tmp_path):
    parts = parsed_parts(GOLDEN_MIDI, tmp_path)
    for config in (QualityConfig.preset("aria"), QualityConfig.preset("scores")):
        table = assert_engines_agree(parts, config)
    assert table.num_rows >= len(GOLDEN_MIDI) - 1  # the empty file is quarantined


def test_engines_agree_on_the_tiny_demo_corpus(tmp_path, tiny_demo_corpus):
    parts = parsed_parts(sorted(tiny_demo_corpus.rglob("*.mid")), tmp_path)
    for config in (QualityConfig.preset("scores"), QualityConfig.preset("aria")):
        assert_engines_agree(parts, config, workers=2, batch_files=7)


@pytest.mark.slow
def test_engines_agree_on_the_demo_corpus(tmp_path, demo_corpus_dir):
    parts = parsed_parts(sorted(demo_corpus_dir.rglob("*.mid")), tmp_path)
    for config in (QualityConfig.preset("scores"), QualityConfig.preset("aria")):
        assert_engines_agree(parts, config)


def test_engines_agree_on_degenerate_files(tmp_path):
    """(A million notes in one file: test_a_million_notes_in_one_file.)"""
    drums_leading = random_piece(30, n=300, with_drums=True)
    drums_leading.channel[:5] = [DRUM_CHANNEL] * 5  # the unique-pitch windows start 5 drum notes early
    pieces = [
        Piece("empty", [], [], []),
        Piece("one_note", [0], [500], [60]),
        Piece("same_pitch", [250 * i for i in range(400)], [200] * 400, [60] * 400),
        Piece("ten_hours_of_silence", [0, 36_000_000], [1000, 1000], [60, 64]),
        Piece("drums_only", [0, 500, 1000], [10] * 3, [36, 38, 42], channel=[DRUM_CHANNEL] * 3, instruments=("drum",)),
        drums_leading,
        Piece("onsets_go_back", [0, 500, 100, 2000], [10] * 4, [60, 61, 62, 63]),  # never in midi_notes: DuckDB's
    ]
    part = write_part(tmp_path / "part.parquet", pieces)
    assert assert_engines_agree([part], workers=1).num_rows == len(pieces)
    assert assert_engines_agree([part], file_ids=[]).num_rows == 0  # the empty batch's schema


def test_the_compiled_engine_leaves_onsets_out_of_order_to_duckdb(tmp_path):
    part = write_part(tmp_path / "part.parquet", [Piece("back", [0, 500, 100], [10] * 3, [60, 61, 62]), good_piece()])
    table, out_of_order = quality_compiled.rule_table([part], ["back", "good"], QualityConfig(), NOTE_LENGTH_CAP_MS)
    assert out_of_order == ["back"] and table["file_id"].to_pylist() == ["good"]


def test_entropy_replays_duckdbs_map_bit_for_bit():
    """Keys as BIGINT and as DOUBLE, few and many distinct (the map rehashes at 14, 30, 60, ...
    keys), dense and sparse (the counting table's two paths)."""
    con = duckdb.connect(config={"threads": 1})
    rng = random.Random(3)
    space = duckdb_entropy.workspace(5000)
    for trial in range(60):
        keys = [rng.randrange(rng.choice([3, 14, 30, 300, 10**9])) for _ in range(rng.choice([0, 1, 5, 200, 5000]))]
        for as_double, sql_type in ((False, "BIGINT"), (True, "DOUBLE")):
            expected = con.sql(f"SELECT list_entropy($keys::{sql_type}[])", params={"keys": keys}).fetchall()[0][0]
            assert duckdb_entropy.entropy(np.array(keys, np.int64), as_double, space) == expected, (trial, sql_type)


DIFFERENTIAL_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def note_lists(draw, file_id: str) -> Piece:
    """A midi_notes row: ties, onsets on and around whole seconds, drums (leading too), channels,
    lengths around the rounding halves and the 5 s cap (negative ones too), and pieces past 20
    minutes (repetitive content)."""
    n = draw(st.integers(0, 400))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    long_piece = draw(st.booleans())
    drums, channels = draw(st.sampled_from([0.0, 0.2, 0.9])), draw(st.sampled_from([1, 2, 16]))
    pitches = rng.sample(range(128), draw(st.sampled_from([1, 3, 12, 60])))
    step = 1_500_000 // max(n, 1) if long_piece else 700
    onset, t = [], rng.randrange(3000)
    for _ in range(n):
        t += rng.choice([0, 0, 1, 999, 1000, 1001, 30_000, rng.randrange(2 * step + 1)])
        onset.append(t)
    return Piece(
        file_id, onset,
        duration=[rng.choice([0, 5, 15, 25, 4995, 5004, 9000, -26, rng.randrange(-50, 12_000)]) for _ in onset],
        pitch=[rng.choice(pitches) for _ in onset],
        velocity=[rng.randrange(1, 128) for _ in onset],
        channel=[DRUM_CHANNEL if rng.random() < drums else rng.choice([0, 1, 2, 10, 15][:channels + 1]) for _ in onset],
        instruments=tuple(rng.sample(["piano", "drum", "strings", "brass"], rng.randrange(5))),
    )


@st.composite
def quality_configs(draw) -> QualityConfig:
    """Aria's and the score preset, and windows, chunks and a repetitive-content length of any size."""
    config = draw(st.sampled_from([QualityConfig.preset("aria"), QualityConfig.preset("scores")]))
    if draw(st.booleans()):
        seconds = st.integers(1, 60)
        config = replace(
            config,
            density_windows=tuple(DensityWindow(s, 20, 5) for s in draw(st.lists(seconds, max_size=4, unique=True))),
            pitch_windows=tuple(PitchWindow(s, 4) for s in draw(st.lists(seconds, max_size=3, unique=True))),
            repetitive_chunks=draw(st.integers(1, 7)),
            repetitive_min_length_min=draw(st.sampled_from([0.01, 0.5, 20.0])),
        )
    return config


@DIFFERENTIAL_SETTINGS
@given(pieces=st.integers(1, 4).flatmap(lambda n: st.tuples(*(note_lists(f"file-{i}") for i in range(n)))),
       config=quality_configs())
def test_engines_agree_on_drawn_note_lists(pieces, config):
    with tempfile.TemporaryDirectory() as folder:
        part = write_part(Path(folder) / "part.parquet", list(pieces))
        assert assert_engines_agree([part], config, workers=1).num_rows == len(pieces)


# -- the real asset ----------------------------------------------------------------------------

def test_quality_filter_asset_on_real_files(tmp_path, mixed_source):
    home = tmp_path / "home"
    upstream = dg.load_assets_from_modules([demo_corpus, raw_midi_manifest, midi_notes])
    checks = dg.load_asset_checks_from_modules([raw_midi_manifest, midi_notes, quality_filter])
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        result = dg.materialize(
            [*upstream, *checks, quality_filter.quality_filter, dg.AssetSpec("opus_dedup")],
            resources={"home": AriaHome(path=str(home)), "source": MidiSource(path=str(mixed_source))},
            instance=instance,
            selection=["demo_corpus", "raw_midi_manifest", "midi_notes", "midi_quarantine", "quality_filter"],
        )
        assert result.success
        event = instance.get_latest_materialization_event(dg.AssetKey("quality_filter"))
    metadata = {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}
    table = pq.read_table(home / "quality_filter" / "quality.parquet")
    assert table.num_rows == metadata["dagster/row_count"] == len(GOOD_GOLDEN)  # the bad files never parsed
    assert metadata["passed"] == sum(table["passed"].to_pylist()) and metadata["notes_per_s"] > 0
    assert metadata["engine"] == "compiled"
    assert "| note_density_in_interval | True |" in metadata["failures_by_rule"]
    assert "| pitch_entropy |" in metadata["metric_quantiles"]
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["quality_metrics_not_null"].passed
    assert "pass_rate" in checks["quality_pass_rate_in_bounds"].metadata


def test_scores_preset_relaxes_only_what_quantised_scores_cannot_meet():
    from aria_model.quality import SCORE_PRESET_CHANGES

    aria, scores = QualityConfig.preset("aria"), QualityConfig.preset("scores")
    assert scores.enabled == aria.enabled - {"note_timing_entropy"}
    for field, value in SCORE_PRESET_CHANGES.items():
        assert getattr(scores, field) == value
    assert scores.max_silence_s == aria.max_silence_s and scores.density_windows == aria.density_windows


def test_switching_engines_re_evaluates_every_file():
    from assets.quality_filter import rules_hash

    rules = QualityConfig.preset("aria")
    assert rules_hash(rules, "compiled") != rules_hash(rules, "duckdb") == rules_hash(rules, "duckdb")


def test_default_preset_follows_the_source():
    from assets.quality_filter import default_preset

    assert default_preset(["demo"]) == "scores"
    assert default_preset(["maestro"]) == "aria"
    assert default_preset(["demo", "plain"]) == "aria"
