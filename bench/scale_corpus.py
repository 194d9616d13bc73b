"""A synthetic Aria-MIDI-like corpus for the scale rehearsal (``bench/scale.py``).

Material: the demo corpus's pieces and the golden MIDI files, parsed with ``load_midi`` (the
pitched notes, pedal already folded into durations). From them:

- a *work* is a run of source pieces cut to a length drawn around Aria-MIDI's ~1,700 notes a file
  (log-normal, so most files are shorter and a few are much longer). Each piece in it has its
  pitches re-mapped by a random monotone map of the work's own: new intervals, so two works that
  share a source piece share almost no dedup shingles, as two different pieces do;
- a *file* is one performance of a work: tempo x0.8-1.25, onsets jittered by ~8 ms, durations
  stretched per note, velocities shifted and jittered, transposed by up to 3 semitones, 1 % of
  the notes dropped, with sustain-pedal strokes. A file's work is drawn so that a few works get
  hundreds of performances and most get one to three, as famous pieces do in Aria-MIDI;
- a share of the files is corrupt (``CORRUPT_KINDS``): cut short, not MIDI at all, or without
  notes. The ingest must quarantine each with that reason.

Files are laid out as Aria-MIDI lays them out: ``<folder>/<id>_0.mid`` under the root and one
``metadata.json`` keyed by id (composer, opus and title for some works; a transcription score for
every file). MIDI bytes come from numpy (one track, 500 ticks per beat at 500,000 us a beat:
1 tick = 1 ms), not from mido message by message.

    spec = CorpusSpec(files=100_000, works=100_000)
    stats = write_corpus(spec, root, pieces=source_pieces(demo_dir), first_id=0, workers=2)
    stats = write_corpus(spec, root, pieces, first_id=spec.files, files=1_000)   # 1 % more, same works
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aria_model.atomic_io import write_json_atomic
from aria_model.midi import DRUM_CHANNEL, MidiError, load_midi

GOLDEN_DIRS = (Path(__file__).resolve().parents[2] / "shared" / "golden" / "midi",
               Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "midi")
METADATA_FILE = "metadata.json"  # the Aria-MIDI layout's index (aria_model.sources)
SPEC_FILE = "scale_corpus.json"  # what the corpus was written with, beside the files
FILES_PER_FOLDER = 1000
TICKS_PER_BEAT, TEMPO_US = 500, 500_000  # 1 tick = 1 ms
# Corrupt kinds and the quarantine reason load_midi gives each.
CORRUPT_KINDS = {"truncated": "truncated", "not_midi": "not_midi", "no_notes": "no_notes"}
GOOD = "good"
COMPOSERS = ("chopin", "beethoven", "bach", "mozart", "liszt", "debussy", "schubert", "rachmaninoff",
             "scarlatti", "haydn", "schumann", "brahms", "ravel", "satie", "scriabin")


@dataclass(frozen=True)
class CorpusSpec:
    files: int  # of the first build; additions extend it with the same works
    works: int  # size of the works universe files are drawn from
    seed: int = 0
    mean_notes: float = 1700.0  # Aria-MIDI: ~2B notes over 1.19M files
    notes_sigma: float = 0.8  # log-normal spread of the notes per file: median ~1,240
    corrupt_share: float = 0.006  # of the files, split evenly over CORRUPT_KINDS
    metadata_share: float = 0.4  # works whose files carry composer/opus/title
    work_skew: float = 2.0  # file -> work index floor(works * u ** skew): higher, more performances per top work

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Piece:
    onset: np.ndarray  # ms from the first note, int64
    duration: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray


@dataclass
class CorpusStats:
    files: int = 0
    notes: int = 0  # written into the good files (the parse may drop a few overlapping notes)
    bytes: int = 0
    by_kind: dict[str, int] | None = None


def source_pieces(demo_dir: Path | None, golden_dirs: tuple[Path, ...] = GOLDEN_DIRS) -> list[Piece]:
    """The pitched notes of every readable demo and golden file (content-distinct by name)."""
    paths = {p.name: p for folder in golden_dirs if folder.is_dir() for p in sorted(folder.glob("*.mid"))}
    if demo_dir is not None:
        paths |= {str(p.relative_to(demo_dir)): p for p in sorted(Path(demo_dir).rglob("*.mid"))}
    pieces = []
    for path in paths.values():
        try:
            perf = load_midi(path)
        except MidiError:
            continue  # the golden set holds files that are meant to fail
        pitched = perf.channel != DRUM_CHANNEL
        if pitched.sum() < 16:
            continue
        onset = perf.onset_ms()[pitched]
        pieces.append(Piece(onset - onset.min(), perf.duration_ms()[pitched].astype(np.int64),
                            perf.pitch[pitched].astype(np.int64), perf.velocity[pitched].astype(np.int64)))
    if not pieces:
        raise ValueError("no source pieces: build the demo corpus or check the golden MIDI folders")
    return pieces


def relpath(file_id: int) -> str:
    return f"{file_id // FILES_PER_FOLDER:04d}/{file_id:07d}_0.mid"


def file_number(path: str) -> int:
    """The id in a corpus file's name (``relpath``'s inverse)."""
    return int(Path(path).name.split("_")[0])


def plan(spec: CorpusSpec, first_id: int, files: int) -> tuple[np.ndarray, np.ndarray]:
    """(work of each file, kind of each file: GOOD or a CORRUPT_KINDS key) for ids first_id.. ."""
    rng = np.random.default_rng([spec.seed, 0, first_id])
    works = np.minimum((spec.works * rng.random(files) ** spec.work_skew).astype(np.int64), spec.works - 1)
    kinds = np.full(files, GOOD, dtype=object)
    corrupt = rng.random(files) < spec.corrupt_share
    kinds[corrupt] = rng.choice(list(CORRUPT_KINDS), int(corrupt.sum()))
    return works, kinds


def work_notes(spec: CorpusSpec, pieces: list[Piece], work: int) -> Piece:
    """The notes of a work: re-mapped source pieces one after another, cut to its drawn length."""
    rng = np.random.default_rng([spec.seed, 1, work])
    mu = np.log(spec.mean_notes) - spec.notes_sigma ** 2 / 2  # so that the mean is mean_notes
    wanted = int(np.clip(rng.lognormal(mu, spec.notes_sigma), 64, 40_000))
    parts, have, start = [], 0, 0
    while have < wanted:
        piece = pieces[rng.integers(len(pieces))]
        parts.append(Piece(piece.onset + start, piece.duration, remapped(piece.pitch, rng), piece.velocity))
        have += len(piece.pitch)
        start += int((piece.onset + piece.duration).max()) + int(rng.integers(500, 3000))
    return Piece(*(np.concatenate([getattr(p, name) for p in parts])[:wanted]
                   for name in ("onset", "duration", "pitch", "velocity")))


def remapped(pitch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pitches through a random monotone map (steps of 0-2 semitones), centred on middle C."""
    low = int(pitch.min())
    steps = rng.choice(3, int(pitch.max()) - low + 1, p=(0.15, 0.55, 0.3))
    mapped = np.cumsum(steps)[pitch - low]
    return np.clip(mapped - int(np.median(mapped)) + 60, 21, 108)


def performed(notes: Piece, rng: np.random.Generator) -> tuple[Piece, np.ndarray, np.ndarray]:
    """One performance of a work's notes, and its pedal strokes (down ms, up ms)."""
    keep = rng.random(len(notes.pitch)) >= 0.01
    tempo = rng.uniform(0.8, 1.25)
    onset = np.maximum(np.rint(notes.onset[keep] * tempo + rng.normal(0, 8, keep.sum())), 0).astype(np.int64)
    duration = np.maximum(np.rint(notes.duration[keep] * tempo * rng.uniform(0.85, 1.15, keep.sum())), 20)
    velocity = notes.velocity[keep] + int(rng.integers(-15, 16)) + np.rint(rng.normal(0, 6, keep.sum()))
    pitch = np.clip(notes.pitch[keep] + int(rng.integers(-3, 4)), 0, 127)
    end = int((onset + duration).max())
    down = np.cumsum(rng.uniform(1500, 4000, max(1, end // 1500))).astype(np.int64)
    down = down[down < end]
    up = down + rng.uniform(300, 1400, len(down)).astype(np.int64)
    return (Piece(onset, duration.astype(np.int64), pitch, np.clip(velocity, 1, 127).astype(np.int64)),
            down, np.minimum(up, np.append(down[1:] - 1, end)))


def midi_bytes(notes: Piece, pedal_down: np.ndarray, pedal_up: np.ndarray) -> bytes:
    """A format-0 MIDI file: note on/off and CC64 events on channel 0 at 1 tick = 1 ms."""
    n, m = len(notes.pitch), len(pedal_down)
    tick = np.concatenate([notes.onset + notes.duration, pedal_down, pedal_up, notes.onset])
    # At one tick: note offs, then the pedal, then note ons (a repeated note ends before it restarts).
    order_key = np.concatenate([np.zeros(n), np.ones(2 * m), np.full(n, 2)])
    status = np.concatenate([np.full(n, 0x80), np.full(2 * m, 0xB0), np.full(n, 0x90)])
    data1 = np.concatenate([notes.pitch, np.full(2 * m, 64), notes.pitch])
    data2 = np.concatenate([np.zeros(n, np.int64), np.full(m, 127), np.zeros(m, np.int64), notes.velocity])
    order = np.lexsort((order_key, tick))
    delta = np.diff(tick[order], prepend=0)
    events = vlq_events(delta, status[order], data1[order], data2[order])
    tempo = bytes([0, 0xFF, 0x51, 3]) + TEMPO_US.to_bytes(3, "big")
    track = tempo + events + bytes([0, 0xFF, 0x2F, 0])
    header = b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big")
    return header + TICKS_PER_BEAT.to_bytes(2, "big") + b"MTrk" + len(track).to_bytes(4, "big") + track


def vlq_events(delta: np.ndarray, status: np.ndarray, data1: np.ndarray, data2: np.ndarray) -> bytes:
    """Events as (variable-length delta, status, data1, data2) bytes, all events at once."""
    width = 1 + (delta >= 1 << 7) + (delta >= 1 << 14) + (delta >= 1 << 21)
    size = width + 3
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    out = np.zeros(int(size.sum()), np.uint8)
    for k in range(4):  # byte k of the delta, most significant first, where the delta has one
        has = width > k
        shift = 7 * (width[has] - 1 - k)
        more = np.where(k < width[has] - 1, 0x80, 0)
        out[start[has] + k] = ((delta[has] >> shift) & 0x7F) | more
    for offset, values in enumerate((status, data1, data2)):
        out[start + width + offset] = values
    return out.tobytes()


def corrupt_bytes(kind: str, good: bytes, rng: np.random.Generator) -> bytes:
    if kind == "truncated":  # cut inside the track: a download or a copy that stopped
        return good[: int(rng.integers(30, max(31, len(good) // 2)))]
    if kind == "not_midi":
        return b"RIFF" + rng.integers(0, 256, int(rng.integers(64, 4096)), dtype=np.uint8).tobytes()
    if kind == "no_notes":
        return midi_bytes(Piece(*(np.zeros(0, np.int64),) * 4), np.zeros(0, np.int64), np.zeros(0, np.int64))
    raise ValueError(f"unknown corrupt kind {kind!r}")


_PIECES: list[Piece] = []  # the workers' material, set before they fork


def _write_files(spec: CorpusSpec, root: str, ids: np.ndarray, works: np.ndarray, kinds: np.ndarray) -> CorpusStats:
    stats = CorpusStats(by_kind={})
    for file_id, work, kind in zip(ids.tolist(), works.tolist(), kinds.tolist()):
        rng = np.random.default_rng([spec.seed, 2, file_id])
        notes, down, up = performed(work_notes(spec, _PIECES, work), rng)
        data = midi_bytes(notes, down, up)
        if kind != GOOD:
            data = corrupt_bytes(kind, data, rng)
        else:
            stats.notes += len(notes.pitch)
        path = Path(root) / relpath(file_id)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        stats.files += 1
        stats.bytes += len(data)
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
    return stats


def write_corpus(spec: CorpusSpec, root: Path, pieces: list[Piece], first_id: int = 0,
                 files: int | None = None, workers: int | None = None) -> CorpusStats:
    """Write files ``first_id .. first_id + files`` (default: the spec's count) and merge their
    entries into ``metadata.json``. Deterministic for a spec, whatever ``workers``."""
    global _PIECES
    files = spec.files if files is None else files
    root.mkdir(parents=True, exist_ok=True)
    works, kinds = plan(spec, first_id, files)
    ids = np.arange(first_id, first_id + files)
    _PIECES = pieces
    chunks = [slice(start, start + 2000) for start in range(0, files, 2000)]
    args = [(spec, str(root), ids[c], works[c], kinds[c]) for c in chunks]
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_write_files, *zip(*args)))
    else:
        parts = [_write_files(*a) for a in args]
    _merge_metadata(spec, root, ids, works)
    write_json_atomic({"spec": spec.as_dict(), "files": first_id + files}, root / SPEC_FILE)
    total = CorpusStats(by_kind={})
    for part in parts:
        total.files, total.notes, total.bytes = total.files + part.files, total.notes + part.notes, total.bytes + part.bytes
        for kind, count in part.by_kind.items():
            total.by_kind[kind] = total.by_kind.get(kind, 0) + count
    return total


def trim_corpus(spec: CorpusSpec, root: Path) -> None:
    """Remove the files added after the spec's first build (and their metadata), so a rehearsal can
    add them again to a corpus built earlier."""
    for path in root.rglob("*_0.mid"):
        if file_number(path) >= spec.files:
            path.unlink()
    entries = json.loads((root / METADATA_FILE).read_text())
    write_json_atomic({key: value for key, value in entries.items() if int(key) < spec.files}, root / METADATA_FILE)
    write_json_atomic({"spec": spec.as_dict(), "files": spec.files}, root / SPEC_FILE)


def built_spec(root: Path) -> tuple[CorpusSpec | None, int]:
    """(the spec a corpus folder was written with, how many files it holds), (None, 0) if none."""
    path = root / SPEC_FILE
    if not path.exists():
        return None, 0
    written = json.loads(path.read_text())
    return CorpusSpec(**written["spec"]), written["files"]


def _merge_metadata(spec: CorpusSpec, root: Path, ids: np.ndarray, works: np.ndarray) -> None:
    path = root / METADATA_FILE
    entries = json.loads(path.read_text()) if path.exists() else {}
    rng = np.random.default_rng([spec.seed, 3, int(ids[0]) if len(ids) else 0])
    scores = np.round(rng.uniform(0.5, 1.0, len(ids)), 3)
    for file_id, work, score in zip(ids.tolist(), works.tolist(), scores.tolist()):
        entry: dict = {"audio_scores": {"0": score}}
        if np.random.default_rng([spec.seed, 4, work]).random() < spec.metadata_share:
            entry["metadata"] = {"composer": COMPOSERS[work % len(COMPOSERS)], "opus": f"Op. {work + 1}",
                                 "piece_number": "1", "title": f"Work {work}", "genre": "classical"}
        entries[str(file_id)] = entry
    write_json_atomic(entries, path)
