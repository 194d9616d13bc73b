"""Piece clusters for the ``opus_dedup`` step: cap how many performances of one piece we train on.

Aria-MIDI's "pruned" subset, the one Aria was pretrained on, keeps at most 10 files per
(composer, opus, piece number) and drops byte-for-byte repeats of the note content
(reference/aria.md §10). Transcribed YouTube audio holds hundreds of performances of the
same Chopin étude, so without a cap a few famous pieces dominate the training data.

Three signals link files into piece clusters (a union-find joins them all):

- ``exact``: identical note content (``content_hash``): same pitches, velocities, durations and
  onsets relative to the first note, whatever the file bytes. Collapsed first: only the best
  copy can be kept, the others are dropped as ``exact_duplicate``.
- ``opus``: the same ``opus_key`` (composer + catalogue number + piece number), when a file's
  metadata has both a composer and a catalogue number. Titles alone never link files.
- ``minhash``: near-duplicate note content, for the files metadata cannot name (most of them):
  MinHash signatures over ``note_shingles``, LSH bands for candidate pairs, and each candidate
  kept only if its estimated Jaccard similarity reaches the threshold. The signatures and the
  candidates are datasketch 2.0's ``MinHash.bulk`` values and ``MinHashLSH(threshold,
  num_perm)`` query results, computed for the whole corpus at once (``aria_model.minhash_lsh``).

In each cluster the files are ranked by transcription score (high first, unknown last), then
note count, then length, then file_id, and the first ``max_per_cluster`` distinct contents are
kept (the rest are ``over_cap``). A cluster's id is its smallest file_id, so it does not depend on
the order the files arrive in.

Shingle design (``note_shingles``). Two performances of one piece differ in tempo (x0.8-1.25),
velocities, tens of ms of timing, key (a transposition) and the few notes a transcriber dropped
or added. A shingle keeps only what all of these leave alone:

1. Notes whose onsets follow each other within ``chord_ms`` form one event (a chord, even
   rolled or jittered). An event stands for its highest pitch: the melody, usually, and
   independent of the order a chord's notes arrive in or of an inner voice losing a note.
2. Successive events give pitch intervals (transposition-invariant), clipped to an octave
   either way. Timing is left out altogether, and so are velocity and duration.
3. A shingle is ``ngram`` consecutive intervals, written as a base-25 number: an exact uint32
   code, so MinHash takes it through an identity hash (reference/orchestration.md §6: about
   3x faster than hashing bytes) and two shingles never collide.

Measured on 419 real pieces (the demo corpus and the golden MIDI), re-performed as above, with
mild rubato, 2% of the notes dropped and 2% added (exact Jaccard over the shingle sets;
"different pieces" leaves out Paddy O'Rafferty, one tune in two of the collections, at 0.12):

    shingle                                two performances of a piece    two different pieces
                                           5th pct   median               99.9th pct   max
    6 intervals (this design)              0.21      0.39                 0.035        0.098
    5 intervals                            0.26      0.44                 0.056        0.138
    4 x (interval, IOI-ratio class)        0.22      0.41                 0.071        0.176

Rhythm classes looked like free specificity, but a ratio of inter-onset intervals flips class
under timing jitter on fast notes and under rubato about as often as it tells two pieces apart;
one more interval of context separates the pieces twice as well at the same recall. Files with
fewer than ``min_shingles`` distinct shingles get no signature: a few shingles cannot tell a
piece from a common figure (a scale, a repeated note), so such files are never linked by content.

End to end (signatures, LSH, verification, union-find), the pairwise precision and recall of the
clusters against the true pieces: 1.0 and 0.977 on 34 pieces x 12 performances (the proof in
tests/test_dedup.py), 1.0 and 0.997 on 419 pieces x 48 performances (20k files).

Scale. Worker processes read the ``midi_notes`` parts themselves (``NoteParts``), a few row
groups per task, and send back per file only its id, a 16-byte content digest, sizes and, once
per distinct content, a uint32 signature. Content hashes, shingles and signatures are compiled
(numba) loops over a whole batch, so the result is the same for any ``workers`` and batching.
Once every batch is in, the main process bands the signature matrix (28 sorts of it at the
default threshold), checks each candidate pair's similarity, and finds the clusters with a
union-find over the distinct contents and numpy/Arrow columns: no Python object per file.

Measured on 2 cores (Xeon VM), 20k files of ~1,700 notes (Aria-MIDI's ~2B notes over 1.19M files),
50 performances of each of 400 pieces (bench/curation.py), per 1,000 files: the workers spend ~0.17 CPU-s (Parquet
read 0.08, content digest 0.05 of which blake2b 0.04, shingles 0.02, signatures 0.013: 70k
signatures/s a core), the main process ~0.012 s (LSH 0.006 with ~20 candidate pairs a file,
clusters and table 0.003, writing 0.001). The per-file numpy version it replaced took 0.36 and
0.21 (MinHashLSH insert + query: 0.14), and 11.2 s wall against 3.4 s for these 20k files.
With all files of the corpus replicated 60 times (1.2M files, 1.08M signatures, 24M candidates),
the main process took 9.6 s for the LSH and 4.5 s for the clusters and table, peaking at
~1 GB over its input (the signature matrix is 4 bytes x num_perm a distinct content: 555 MB).
So Aria-MIDI's 1.19M files take ~3.5 CPU-min in the workers and ~15 s in the main process:
~2 min on 2 idle cores. The first call on a machine compiles the kernels (~15 s, cached after).

Use::

    from aria_model.dedup import DedupConfig, NoteParts, deduplicate
    result = deduplicate(NoteParts(part_paths, file_ids), metadata, DedupConfig.preset("pruned"))
    result.table   # DEDUP_SCHEMA, one row per file, sorted by file_id
    result.stats   # counts, largest clusters, timings

``notes`` is ``NoteParts`` (``midi_notes`` Parquet files, read in the workers), a ``midi_notes``
table or an iterable of its record batches (read one at a time and sent to the workers; only
signatures are kept), and ``metadata`` has one row per file_id with the manifest's composer,
opus, piece, title and transcription_score. ``workers`` (None: all cores) never changes the result.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numba import njit

from aria_model import minhash_lsh
from aria_model.minhash_lsh import EMPTY
from aria_model.sources import ascii_fold, composer_key

REASONS = ("kept", "exact_duplicate", "over_cap")
SIGNALS = ("exact", "opus", "minhash")
NOTE_COLUMNS = ("file_id", "onset_ms", "duration", "pitch", "velocity")
METADATA_COLUMNS = ("file_id", "composer", "opus", "piece", "title", "transcription_score")

DEDUP_SCHEMA = pa.schema([
    pa.field("file_id", pa.string(), nullable=False),
    pa.field("cluster_id", pa.string(), nullable=False),  # smallest file_id of the cluster
    pa.field("cluster_size", pa.int32(), nullable=False),  # files in the cluster, duplicates included
    pa.field("rank", pa.int32(), nullable=False),  # 1 = first choice of the cluster
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # one of REASONS
    pa.field("linked_by", pa.list_(pa.string()), nullable=False),  # SIGNALS joining it to another file
    pa.field("opus_key", pa.string()),
    pa.field("content_hash", pa.string(), nullable=False),
    pa.field("n_notes", pa.int32(), nullable=False),
    pa.field("length_ms", pa.int64(), nullable=False),
    pa.field("shingles", pa.int32(), nullable=False),  # distinct shingles; 0: no content signature
    pa.field("transcription_score", pa.float64()),
])

# note_shingles' alphabet: intervals between successive events, clipped to an octave either way.
_MAX_INTERVAL = 12
_INTERVALS = 2 * _MAX_INTERVAL + 1
_MAX_EXACT_NGRAM = 6  # 25^6 < 2^32: a 6-gram is its own uint32 code, no hashing and no collisions
BATCH_ROWS = 512  # files per worker task: ~1M notes in a worker at ~2k a file, ~350 KB of results back


@dataclass(frozen=True)
class DedupConfig:
    """Knobs of ``deduplicate``; ``preset(name)`` gives the named settings."""

    max_per_cluster: int = 10  # Aria-MIDI "pruned" (Aria's pretraining data): 10 per (opus, piece)
    use_opus_key: bool = True  # link files with the same opus_key (Aria-MIDI's own dedup signal)
    use_content: bool = True  # link near-duplicate note content (MinHash), for files without metadata
    threshold: float = 0.2  # Jaccard of two performances of a piece: 95% >= 0.21; of two pieces < 0.1
    num_perm: int = 128  # estimates of J=0.2 err by 0.035 (1 sd): pieces at J<0.1 stay 3 sd below
    seed: int = 1  # MinHash permutations; a signature only compares with one of the same seed
    ngram: int = 6  # intervals per shingle (7 events): 5 links common figures, 7 loses recall
    chord_ms: int = 50  # onsets closer than this are one event: chords arrive rolled or jittered
    min_shingles: int = 8  # fewer: no signature. Sets of 8-16 matched no other piece (max J 0.03)

    def __post_init__(self) -> None:
        if self.max_per_cluster < 1:
            raise ValueError(f"max_per_cluster must be at least 1, got {self.max_per_cluster}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 1 <= self.ngram <= _MAX_EXACT_NGRAM:
            raise ValueError(f"ngram must be in 1..{_MAX_EXACT_NGRAM} (shingles are uint32 codes), got {self.ngram}")
        if self.num_perm < 2 or self.chord_ms < 0 or self.min_shingles < 1:
            raise ValueError(f"num_perm >= 2, chord_ms >= 0 and min_shingles >= 1 needed: {self}")

    @classmethod
    def preset(cls, name: str) -> DedupConfig:
        presets = {
            "pruned": cls(),  # Aria-MIDI "pruned": Aria's pretraining set, 10 per piece
            "deduped": cls(max_per_cluster=1),  # Aria-MIDI "deduped": one performance per piece
            "metadata_only": cls(use_content=False),  # Aria-MIDI's own method: exact copies + opus keys
        }
        if name not in presets:
            raise ValueError(f"unknown dedup preset {name!r}; known: {sorted(presets)}")
        return presets[name]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DedupStats:
    """What one ``deduplicate`` call did, and how fast."""

    files: int = 0
    unique_contents: int = 0
    signatures: int = 0  # distinct contents with a content signature
    without_signature: int = 0  # distinct contents too short or too unspecific for one
    opus_keys: int = 0  # files with an opus key
    clusters: int = 0  # clusters of two or more files
    largest_cluster: int = 0
    kept: int = 0
    dropped: int = 0
    drops_by_reason: dict[str, int] = field(default_factory=dict)
    drops_by_signal: dict[str, int] = field(default_factory=dict)  # a drop counts once per signal linking it
    links_by_signal: dict[str, int] = field(default_factory=dict)  # files each signal links to another
    candidate_pairs: int = 0  # LSH candidates
    verified_pairs: int = 0  # candidates whose estimated Jaccard reached the threshold
    largest_clusters: list[dict] = field(default_factory=list)
    workers: int = 1  # processes that read the notes and computed the signatures
    # CPU seconds of each stage, the workers' added up: what a core spends, however busy the machine
    read_seconds: float = 0.0  # reading the notes, content hashes and shingles (workers)
    signature_seconds: float = 0.0  # MinHash values of the shingles (workers)
    lsh_seconds: float = 0.0  # LSH bands and the similarity check of the candidates (main process)
    cluster_seconds: float = 0.0  # metadata, union-find, ranks, the table and these counts (main process)
    seconds: float = 0.0  # wall time of the whole call

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0

    @property
    def signatures_per_s(self) -> float:
        """Per core: signatures / signature_seconds."""
        return self.signatures / self.signature_seconds if self.signature_seconds else 0.0

    @property
    def lsh_signatures_per_s(self) -> float:
        """Signatures banded and their candidates checked, per second of the main process."""
        return self.signatures / self.lsh_seconds if self.lsh_seconds else 0.0


@dataclass(frozen=True)
class DedupResult:
    table: pa.Table  # DEDUP_SCHEMA
    stats: DedupStats


# Metadata signal

_CATALOGUE_ALIASES = {"opus": "op", "kv": "k", "kk": "k"}  # Kk. is Kirkpatrick: Scarlatti's K.
# Op. (opus), BWV (Bach), K./KV (Köchel, or Kirkpatrick for Scarlatti), D. (Deutsch, Schubert),
# Hob. (Hoboken, Haydn), S./LW (Searle, Liszt-Werkverzeichnis: two numberings of Liszt), RV (Vivaldi),
# HWV (Handel), L. (Longo, Scarlatti; Lesure, Debussy), WoO (Beethoven), BB/Sz (two Bartók
# numberings), B. (Burghauser, Dvořák), BuxWV, TWV (Telemann). Longest names first in the alternation.
_CATALOGUE = re.compile(
    r"(?<![a-z'])(opus|buxwv|hwv|bwv|twv|hob|woo|op|kv|kk|lw|rv|bb|sz|k|d|s|l|b)(?![a-z])\.?\s*"  # not "Chopin's 24"
    r"(?:(?P<series>[ivxlc]+|[a-z])\s*[:/.]?\s*)?"  # Hob. XVI:52, LW A172
    r"(?P<number>\d+)(?P<suffix>[a-z](?![a-z0-9]))?"  # BWV 1007a, but not the n of "op10n3"
)
_BARE_NUMBER = re.compile(r"\s*\d+\s*")
# "No. 3", "n3", "#3", "/3", or a dotted movement number: BWV 248.53 is movement 53 of BWV 248.
_PIECE_AFTER_NUMBER = re.compile(r"^(?:\s*[,;.]?\s*(?:(?:no|nr|n|num|number)\.?|#|/)\s*|\.)(\d+)")
_FIRST_NUMBER = re.compile(r"\d+")
_ROMAN = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100}


@functools.lru_cache(maxsize=1 << 16)  # a million files share far fewer distinct opus fields
def opus_key(composer: str | None, opus: str | None, piece: str | None, title: str | None = None) -> str | None:
    """``"chopin|op10|3"`` for Chopin's Op. 10 No. 3, however its metadata spells it; else None.

    The catalogue number comes from ``opus`` (a bare number there means an opus number), or, only
    when ``opus`` has none, from the first catalogue number written in ``title``. The piece number
    comes from ``piece``, else from a "No. 3" right after the catalogue number. A file needs a
    composer and a catalogue number for a key: two files that only share a title ("Nocturne")
    are not the same piece.
    """
    composer = composer_key(composer)
    catalogue = _catalogue_number(opus, bare_number_is_opus=True) or _catalogue_number(title)
    if composer is None or catalogue is None:
        return None
    number, piece_in_text = catalogue
    piece_number = _first_number(piece) or piece_in_text
    return f"{composer}|{number}|{piece_number or ''}"


def _catalogue_number(text: str | None, bare_number_is_opus: bool = False) -> tuple[str, str | None] | None:
    """("op10", "3") from "Op. 10, No. 3": the catalogue number and a piece number after it."""
    if not text:
        return None
    folded = ascii_fold(str(text)).lower()
    match = _CATALOGUE.search(folded)
    if match is None:
        if bare_number_is_opus and _BARE_NUMBER.fullmatch(folded):
            return f"op{int(folded)}", None
        return None
    catalogue = _CATALOGUE_ALIASES.get(match.group(1), match.group(1))
    series = _series(match.group("series"))
    number = f"{catalogue}{series}{int(match.group('number'))}{match.group('suffix') or ''}"
    piece = _PIECE_AFTER_NUMBER.match(folded[match.end():])
    return number, (str(int(piece.group(1))) if piece else None)


def _series(series: str | None) -> str:
    """A group before the number: Hoboken's roman ones as arabic ("xvi" -> "16:"), a letter as it is ("a:")."""
    if not series:
        return ""
    if all(ch in _ROMAN for ch in series):
        values = [_ROMAN[ch] for ch in series]
        arabic = sum(-v if v < nxt else v for v, nxt in zip(values, values[1:] + [0]))
        return f"{arabic}:"
    return f"{series}:"


def _first_number(text: str | None) -> str | None:
    match = _FIRST_NUMBER.search(str(text)) if text else None
    return str(int(match.group())) if match else None


# Content signals


def content_hash(onset_ms: np.ndarray, duration: np.ndarray, pitch: np.ndarray, velocity: np.ndarray) -> str:
    """Hex digest of the notes as a multiset: the same notes hash the same whatever the file bytes.

    Onsets count from the first note, and the notes are put in one canonical order first
    (onset, pitch, velocity, then duration), so files listing a chord's notes in a different
    track order hash the same. The intent of Aria's calculate_hash (reference/aria.md §2.3), on
    the notes after pedal folding and tempo, where it hashes the MIDI messages.
    """
    digests, _ = _content_digests(_FlatNotes.of_one(onset_ms, duration, pitch, velocity))
    return digests[0].tobytes().hex()


def note_shingles(onset_ms: np.ndarray, pitch: np.ndarray, config: DedupConfig = DedupConfig()) -> np.ndarray:
    """Sorted distinct uint32 shingles of a performance (the design is in the module docstring)."""
    unused = np.zeros(len(onset_ms), np.int64)  # durations and velocities play no part in shingles
    shingles, _ = _shingles(_FlatNotes.of_one(onset_ms, unused, pitch, unused), config)
    return np.sort(shingles)


@dataclass(frozen=True)
class _FlatNotes:
    """The notes of a batch of files end to end, as stored: file i's are ``[offsets[i], offsets[i + 1])``.

    Content hashes and shingles are computed for the whole batch in one compiled call each: most
    files hold a few hundred notes, where numpy's per-call cost would outweigh its work.
    """

    onset: np.ndarray  # ms from the start of the file (int64); any integer type for the others
    duration: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    offsets: np.ndarray  # int64

    @classmethod
    def of_one(cls, onset_ms, duration, pitch, velocity) -> _FlatNotes:
        columns = [np.asarray(column, np.int64) for column in (onset_ms, duration, pitch, velocity)]
        return cls(*columns, offsets=np.array([0, len(columns[0])]))

    @classmethod
    def of_batch(cls, batch: pa.RecordBatch | pa.Table) -> _FlatNotes:
        """The note list columns of a ``midi_notes`` batch (NOTE_COLUMNS), checked to agree in length."""
        columns, offsets = [], None
        for name in NOTE_COLUMNS[1:]:
            column = batch.column(name)
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
            bounds = column.offsets.to_numpy()  # absolute positions in .values, whatever the slicing
            columns.append(column.values.to_numpy()[bounds[0]: bounds[-1]])  # zero-copy
            bounds = bounds - bounds[0]
            if offsets is not None and not np.array_equal(bounds, offsets):
                raise ValueError(f"notes columns {list(NOTE_COLUMNS[1:])} must have equal lengths in each row")
            offsets = bounds
        return cls(*columns, offsets=offsets.astype(np.int64))

    @property
    def files(self) -> int:
        return len(self.offsets) - 1


def _content_digests(notes: _FlatNotes) -> tuple[np.ndarray, np.ndarray]:
    """(16-byte content_hash digest of each file as uint8 rows, each file's length in ms)."""
    key = np.empty(len(notes.pitch), np.int64)
    duration = np.empty(len(notes.pitch), np.int64)
    length_ms = np.empty(notes.files, np.int64)
    _canonical_notes(notes.onset, notes.duration, notes.pitch, notes.velocity, notes.offsets, key, duration, length_ms)
    offsets = notes.offsets.tolist()
    digests = bytearray()
    for start, end in itertools.pairwise(offsets):
        digest = hashlib.blake2b(key[start:end], digest_size=16)
        digest.update(duration[start:end])
        digests += digest.digest()
    return np.frombuffer(bytes(digests), np.uint8).reshape(-1, 16), length_ms


@njit(cache=True)
def _canonical_notes(onset, duration, pitch, velocity, offsets, key, key_duration, length_ms):
    """Per file: one int64 key per note (onset from the first note, pitch, velocity), sorted by key
    then duration into ``key``/``key_duration``, and the file's length (first onset to last end)."""
    for file in range(len(offsets) - 1):
        start, end = offsets[file], offsets[file + 1]
        length_ms[file] = 0
        if start == end:
            continue
        first = onset[start:end].min()
        for note in range(start, end):
            relative = np.int64(onset[note]) - first
            # exact for onsets below 2^49 ms; one int64 sorts 8x faster than four keys
            key[note] = (relative << 14) | (np.int64(pitch[note]) << 7) | np.int64(velocity[note])
            key_duration[note] = duration[note]
            ends = relative + key_duration[note]
            length_ms[file] = ends if note == start else max(length_ms[file], ends)
        _sort_by_key_then_duration(key[start:end], key_duration[start:end])


@njit(cache=True)
def _sort_by_key_then_duration(key, duration):
    """In place. Insertion sort: midi_notes rows come in onset order, so only the notes of a chord
    move, a few steps each; input far from that order is merge-sorted instead."""
    budget = 8 * len(key)
    for i in range(1, len(key)):
        moving_key, moving_duration = key[i], duration[i]
        j = i - 1
        while j >= 0 and (key[j] > moving_key or (key[j] == moving_key and duration[j] > moving_duration)):
            key[j + 1], duration[j + 1] = key[j], duration[j]
            j -= 1
        key[j + 1], duration[j + 1] = moving_key, moving_duration
        budget -= i - 1 - j
        if budget < 0:
            for sort_key in (duration, key):  # least significant key first, stable sorts
                order = np.argsort(sort_key, kind="mergesort")
                key[:], duration[:] = key[order], duration[order]
            return


def _shingles(notes: _FlatNotes, config: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Distinct shingles of each file (note_shingles, unsorted), end to end, and their offsets per file."""
    shingles = np.empty(len(notes.pitch), np.uint32)  # a file has fewer shingles than notes
    counts = np.zeros(notes.files, np.int64)
    _batch_shingles(notes.onset, notes.pitch, notes.offsets, config.chord_ms, config.ngram, shingles, counts)
    return shingles[: counts.sum()].copy(), np.concatenate([[0], np.cumsum(counts)])


@njit(cache=True)
def _batch_shingles(onset, pitch, offsets, chord_ms, ngram, shingles, counts):
    """Each file's distinct shingles, packed one file after another into ``shingles``."""
    longest = 0
    for file in range(len(offsets) - 1):
        longest = max(longest, offsets[file + 1] - offsets[file])
    tops = np.empty(longest, np.int64)
    written = 0
    for file in range(len(offsets) - 1):
        start, end = offsets[file], offsets[file + 1]
        if start == end:
            continue
        events = _event_tops(onset[start:end], pitch[start:end], chord_ms, tops)
        counts[file] = _distinct_shingles(tops[:events], ngram, shingles[written:])
        written += counts[file]


@njit(cache=True)
def _event_tops(onset, pitch, chord_ms, tops):
    """The highest pitch of each event (notes whose onsets follow within chord_ms) into ``tops``; how many."""
    for note in range(1, len(onset)):
        if onset[note] < onset[note - 1]:  # midi_notes rows come in onset order, other input may not
            order = np.argsort(onset, kind="mergesort")
            return _sorted_event_tops(onset[order], pitch[order], chord_ms, tops)
    return _sorted_event_tops(onset, pitch, chord_ms, tops)


@njit(cache=True)
def _sorted_event_tops(onset, pitch, chord_ms, tops):
    events = 0
    for note in range(len(onset)):
        if note == 0 or np.int64(onset[note]) - np.int64(onset[note - 1]) > chord_ms:
            tops[events] = pitch[note]
            events += 1
        else:
            tops[events - 1] = max(tops[events - 1], np.int64(pitch[note]))
    return events


@njit(cache=True)
def _distinct_shingles(tops, ngram, out):
    """The distinct ``ngram``-interval shingles of the event tops into ``out``, first seen first; how many.

    Intervals are clipped to an octave and written as base-25 digits: an exact uint32 code
    (25^6 < 2^32). An open-addressing set of twice their number finds the repeats.
    """
    windows = len(tops) - ngram
    if windows <= 0:
        return 0
    for event in range(len(tops) - 1):  # tops become the intervals, in place
        tops[event] = min(max(tops[event + 1] - tops[event], -_MAX_INTERVAL), _MAX_INTERVAL) + _MAX_INTERVAL
    bits = 4
    while (1 << bits) < 2 * windows:
        bits += 1
    table = np.full(1 << bits, EMPTY, np.uint32)
    found = 0
    for window in range(windows):
        code = np.uint32(0)
        for interval in tops[window: window + ngram]:
            code = np.uint32(code * np.uint32(_INTERVALS) + np.uint32(interval))
        slot = np.int64(np.uint32(code * np.uint32(0x9E3779B1)) >> np.uint32(32 - bits))  # multiplicative hashing
        while table[slot] != EMPTY and table[slot] != code:
            slot = (slot + 1) & ((1 << bits) - 1)
        if table[slot] == EMPTY:
            table[slot] = code
            out[found] = code
            found += 1
    return found


# Fingerprints of a batch of files, computed in the worker processes


@dataclass(frozen=True)
class NoteParts:
    """``midi_notes`` Parquet parts, which the worker processes read themselves, a few row groups at a time.

    The note lists never pass through the main process: it gets a few numbers and a signature
    per file back. ``file_ids`` keeps those files' rows only (None: every row). A task is about
    ``batch_rows`` rows; only the 2 tasks in flight per worker hold notes.
    """

    paths: Sequence[str | Path]
    file_ids: pa.Array | pa.ChunkedArray | Sequence[str] | None = None
    batch_rows: int = BATCH_ROWS

    def tasks(self) -> list[_RowGroups]:
        """Row groups holding about ``batch_rows`` wanted rows each; groups without any are not read."""
        tasks = []
        for path in map(str, self.paths):
            part = pq.ParquetFile(path)
            _check_columns(part.schema_arrow.names)
            sizes = [part.metadata.row_group(group).num_rows for group in range(part.metadata.num_row_groups)]
            wanted = np.ones(sum(sizes), bool)
            if self.file_ids is not None:
                ids = part.read(columns=["file_id"], use_threads=False).column("file_id")
                wanted = pc.is_in(ids, value_set=_string_array(self.file_ids).cast(ids.type)).to_numpy()
            groups, rows, read = [], [], 0  # rows: positions among the ``read`` rows of ``groups``
            for group, end in enumerate(np.cumsum(sizes).tolist()):
                found = np.flatnonzero(wanted[end - sizes[group]: end])
                if len(found):
                    groups.append(group)
                    rows.append(found + read)
                    read += sizes[group]
                if groups and (sum(map(len, rows)) >= self.batch_rows or group == len(sizes) - 1):
                    selected = np.concatenate(rows)
                    tasks.append(_RowGroups(path, tuple(groups), None if len(selected) == read else selected))
                    groups, rows, read = [], [], 0
        return tasks


def _string_array(values: pa.Array | pa.ChunkedArray | Sequence[str]) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values if isinstance(values, pa.Array) else pa.array(list(values), pa.string())


@dataclass(frozen=True)
class _RowGroups:
    """One task: row groups of a part, and which of their rows (None: all)."""

    path: str
    groups: tuple[int, ...]
    rows: np.ndarray | None

    def read(self) -> pa.Table:
        notes = _open_part(self.path, *_file_version(self.path)).read_row_groups(
            list(self.groups), columns=list(NOTE_COLUMNS), use_threads=False  # one core per worker
        )
        return notes if self.rows is None else notes.take(self.rows)


def _file_version(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_mtime_ns, status.st_size


@functools.lru_cache(maxsize=4)
def _open_part(path: str, mtime_ns: int, size: int) -> pq.ParquetFile:
    """A part opened once per process: a footer of 20k row groups takes longer to parse than a task."""
    return pq.ParquetFile(path)


def _check_columns(names: list[str]) -> None:
    missing = [name for name in NOTE_COLUMNS if name not in names]
    if missing:
        raise ValueError(f"notes lack column(s) {missing}; they have {names}")




@dataclass
class _BatchPrints:
    """What a worker sends back for a batch of files: a few numbers each, and the new signatures."""

    file_ids: pa.Array  # string
    digests: np.ndarray  # uint8, files x 16: content_hash
    n_notes: np.ndarray
    length_ms: np.ndarray
    shingle_counts: np.ndarray
    signed: np.ndarray  # rows with a signature: the first of each content with min_shingles shingles or more
    signatures: np.ndarray  # uint32, len(signed) x num_perm
    read_seconds: float
    signature_seconds: float


def _fingerprint_batch(batch: pa.RecordBatch | pa.Table | _RowGroups, config: DedupConfig) -> _BatchPrints:
    """One task, in a worker (or in this process when workers=1): the fingerprints of a batch of files."""
    started = time.process_time()
    if isinstance(batch, _RowGroups):
        batch = batch.read()
    _check_columns(batch.schema.names)
    notes = _FlatNotes.of_batch(batch)
    digests, length_ms = _content_digests(notes)
    if config.use_content:
        shingles, offsets = _shingles(notes, config)
    else:
        shingles, offsets = np.zeros(0, np.uint32), np.zeros(notes.files + 1, np.int64)
    counts = np.diff(offsets)
    first_of_content = {digest.tobytes(): row for row, digest in reversed(list(enumerate(digests)))}
    signed = np.array(sorted(row for row in first_of_content.values() if counts[row] >= config.min_shingles), np.int64)
    read_done = time.process_time()
    is_signed = np.zeros(notes.files, bool)
    is_signed[signed] = True
    selected = shingles[np.repeat(is_signed, counts)]
    offsets = np.concatenate([[0], np.cumsum(counts[signed])])
    signatures = minhash_lsh.signatures(selected, offsets, config.num_perm, config.seed)
    file_ids = batch.column("file_id")
    return _BatchPrints(
        file_ids=(file_ids.combine_chunks() if isinstance(file_ids, pa.ChunkedArray) else file_ids).cast(pa.string()),
        digests=digests,
        n_notes=np.diff(notes.offsets),
        length_ms=length_ms,
        shingle_counts=counts,
        signed=signed,
        signatures=signatures,
        read_seconds=read_done - started,
        signature_seconds=time.process_time() - read_done,
    )


def _in_order(function: Callable, tasks: Iterable, workers: int) -> Iterator:
    """``function(task)`` for each task, in task order: in ``workers`` processes, 2 tasks each in flight."""
    if workers <= 1:
        yield from map(function, tasks)
        return
    in_flight: deque = deque()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for task in tasks:
            in_flight.append(pool.submit(function, task))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


# The main process: the batches joined into columns, one signature per distinct content


@dataclass
class _Prints:
    """Every file's fingerprint, in arrival order, and one signature per distinct signed content."""

    file_ids: pa.Array  # string
    digests: np.ndarray  # uint8, files x 16
    content: np.ndarray  # content number of each file: equal digests, equal numbers
    first_file: np.ndarray  # per content: its first file
    n_notes: np.ndarray
    length_ms: np.ndarray
    shingle_counts: np.ndarray
    signatures: np.ndarray  # uint32, signed contents x num_perm
    signed_content: np.ndarray  # the content of each signature

    @property
    def files(self) -> int:
        return len(self.file_ids)


def _fingerprint(notes: pa.Table | Iterable[pa.RecordBatch] | NoteParts, config: DedupConfig, stats: DedupStats,
                 workers: int | None) -> _Prints:
    """Content hash, size and (once per distinct content) MinHash signature of every file."""
    if isinstance(notes, NoteParts):
        tasks = notes.tasks()
    elif isinstance(notes, pa.Table):
        tasks = notes.to_batches(max_chunksize=BATCH_ROWS)  # zero-copy slices
    else:
        tasks = notes
    workers = workers or os.cpu_count() or 1
    if isinstance(tasks, list):
        workers = min(workers, len(tasks))
    stats.workers = max(workers, 1)
    batches = []
    for batch in _in_order(functools.partial(_fingerprint_batch, config=config), tasks, workers):
        stats.read_seconds += batch.read_seconds
        stats.signature_seconds += batch.signature_seconds
        batches.append(batch)
    _open_part.cache_clear()
    return _joined(batches, config.num_perm)


def _joined(batches: list[_BatchPrints], num_perm: int) -> _Prints:
    """The batches as columns; a content signed in several batches keeps its first signature."""
    def column(name: str, dtype) -> np.ndarray:
        return np.concatenate([getattr(batch, name) for batch in batches] or [np.zeros(0, dtype)]).astype(dtype)

    digests = column("digests", np.uint8).reshape(-1, 16)
    content, first_file = _group_digests(digests)
    starts = np.cumsum([0] + [len(batch.file_ids) for batch in batches])
    signed_files = np.concatenate([batch.signed + start for batch, start in zip(batches, starts)] or [np.zeros(0, int)])
    _, first_signature = np.unique(content[signed_files], return_index=True)  # the first of each content
    keep = np.zeros(len(signed_files), bool)
    keep[first_signature] = True
    signatures = np.empty((len(first_signature), num_perm), np.uint32)  # filled batch by batch: no second copy
    row = 0
    for batch, kept in zip(batches, np.split(keep, np.cumsum([len(batch.signed) for batch in batches])[:-1])):
        signatures[row: row + kept.sum()] = batch.signatures[kept]
        row += kept.sum()
        batch.signatures = None
    return _Prints(
        file_ids=pa.concat_arrays([batch.file_ids for batch in batches]) if batches else pa.array([], pa.string()),
        digests=digests,
        content=content,
        first_file=first_file,
        n_notes=column("n_notes", np.int64),
        length_ms=column("length_ms", np.int64),
        shingle_counts=column("shingle_counts", np.int64),
        signatures=signatures,
        signed_content=content[signed_files[keep]],
    )


def _group_digests(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(content number of each row, first row of each content): rows with equal digests are one content."""
    halves = digests.view(">u8")  # two big-endian uint64 a digest: the 128 bits, exactly
    order = np.lexsort((halves[:, 1], halves[:, 0]))  # stable: a content's rows stay in arrival order
    new = np.ones(len(order), bool)
    new[1:] = np.any(halves[order[1:]] != halves[order[:-1]], axis=1)
    content = np.empty(len(order), np.int64)
    content[order] = np.cumsum(new) - 1
    return content, order[new]


# Clustering and the cap


def deduplicate(
    notes: pa.Table | Iterable[pa.RecordBatch] | NoteParts,
    metadata: pa.Table | None = None,
    config: DedupConfig = DedupConfig(),
    workers: int | None = None,
) -> DedupResult:
    """Cluster the files of ``notes`` into pieces and cap each piece at ``config.max_per_cluster``.

    ``notes`` needs NOTE_COLUMNS with one row per file; ``metadata`` (optional) METADATA_COLUMNS
    with one row per file_id, files missing from it counting as without metadata. The result
    does not depend on the order of the rows, on how they are batched, or on ``workers``: the
    processes that fingerprint the batches (None: all cores; 1: this process only).
    """
    started = time.perf_counter()
    stats = DedupStats()
    prints = _fingerprint(notes, config, stats, workers)
    if pc.count_distinct(prints.file_ids, mode="all").as_py() != prints.files:
        raise ValueError("notes must have one row per file_id")
    lsh_started = time.process_time()
    near_pairs, stats.candidate_pairs = minhash_lsh.near_duplicate_pairs(prints.signatures, config.threshold)
    stats.lsh_seconds = time.process_time() - lsh_started
    cluster_started = time.process_time()
    meta = _metadata_columns(metadata, prints.file_ids)
    opus_keys = pa.array(_opus_keys(meta) if config.use_opus_key else [None] * prints.files, pa.string())
    table, clusters = _dedup_table(prints, meta, opus_keys, near_pairs, config)
    _summarise(table, clusters, prints, near_pairs, meta, stats)
    stats.cluster_seconds = time.process_time() - cluster_started
    stats.seconds = time.perf_counter() - started
    return DedupResult(table=table, stats=stats)


def _metadata_columns(metadata: pa.Table | None, file_ids: pa.Array) -> dict[str, pa.Array]:
    """METADATA_COLUMNS but file_id, aligned to ``file_ids`` (null where a file or column has none)."""
    rows = pa.nulls(len(file_ids), pa.int64())
    if metadata is not None and metadata.num_rows:
        ids = metadata.column("file_id").combine_chunks()
        if pc.count_distinct(ids, mode="all").as_py() != len(ids):
            raise ValueError("metadata must have one row per file_id")
        rows = pc.index_in(file_ids, value_set=ids.cast(file_ids.type))
    columns = {}
    for name in METADATA_COLUMNS[1:]:
        if metadata is None or name not in metadata.column_names:
            columns[name] = pa.nulls(len(file_ids))
        else:
            columns[name] = metadata.column(name).combine_chunks().take(rows)
    columns["transcription_score"] = columns["transcription_score"].cast(pa.float64())
    return columns


def _opus_keys(meta: dict[str, pa.Array]) -> list[str | None]:
    fields = zip(*(meta[name].to_pylist() for name in ("composer", "opus", "piece", "title")))
    return [opus_key(*row) for row in fields]


@dataclass(frozen=True)
class _Clusters:
    """Per file: its cluster, the signals linking it to another file, and its file_id's sort position."""

    codes: np.ndarray  # cluster number 0..k-1
    linked: dict[str, np.ndarray]  # SIGNALS -> bool per file
    id_order: np.ndarray  # files sorted by file_id
    id_rank: np.ndarray  # position of each file in id_order


def _clusters(prints: _Prints, opus_keys: pa.Array, near_pairs: np.ndarray) -> _Clusters:
    """Union of the three signals over the distinct contents (the copies of one are one node):
    a file's content joins the content of its opus key's first file, and near-duplicate pairs of
    signatures join their contents."""
    files = np.arange(prints.files)
    key = pc.fill_null(opus_keys.dictionary_encode().indices, -1).to_numpy().astype(np.int64)  # -1: no key
    has_key = key >= 0
    first_of_key = np.full(int(key.max(initial=-1)) + 1, prints.files, np.int64)
    np.minimum.at(first_of_key, key[has_key], files[has_key])
    parent = np.arange(len(prints.first_file))
    _join(parent, np.column_stack([files[has_key], first_of_key[key[has_key]]]), prints.content)
    _join(parent, near_pairs, prints.signed_content)
    roots = _roots(parent)[prints.content]
    files_with_key = np.zeros(prints.files, np.int64)
    files_with_key[has_key] = np.bincount(key[has_key])[key[has_key]]
    signed_in_pair = np.zeros(len(prints.signed_content), bool)
    signed_in_pair[near_pairs[:, 0]] = signed_in_pair[near_pairs[:, 1]] = True
    content_in_pair = np.zeros(len(prints.first_file), bool)
    content_in_pair[prints.signed_content[signed_in_pair]] = True
    linked = {
        "exact": np.bincount(prints.content)[prints.content] > 1,
        "opus": files_with_key > 1,
        "minhash": content_in_pair[prints.content],  # every copy of a content takes part in its links
    }
    id_order = pc.sort_indices(prints.file_ids).to_numpy()
    id_rank = np.empty(prints.files, np.int64)
    id_rank[id_order] = files
    return _Clusters(np.unique(roots, return_inverse=True)[1].reshape(-1), linked, id_order, id_rank)


@njit(cache=True)
def _join(parent, pairs, node_of):
    """Union-find: join the nodes ``node_of[pairs[k, 0]]`` and ``node_of[pairs[k, 1]]`` for every k."""
    for k in range(len(pairs)):
        a, b = _root(parent, node_of[pairs[k, 0]]), _root(parent, node_of[pairs[k, 1]])
        parent[max(a, b)] = min(a, b)


@njit(cache=True)
def _roots(parent):
    for node in range(len(parent)):
        parent[node] = _root(parent, node)
    return parent


@njit(cache=True)
def _root(parent, item):
    while parent[item] != item:
        parent[item] = parent[parent[item]]  # path halving keeps the trees flat
        item = parent[item]
    return item


def _dedup_table(prints: _Prints, meta: dict[str, pa.Array], opus_keys: pa.Array, near_pairs: np.ndarray,
                 config: DedupConfig) -> tuple[pa.Table, _Clusters]:
    clusters = _clusters(prints, opus_keys, near_pairs)
    cluster = clusters.codes
    score = meta["transcription_score"].to_numpy(zero_copy_only=False)  # NaN where unknown
    duplicate = _duplicates(prints.content, score, clusters.id_rank)
    rank = _ranks(cluster, duplicate, score, prints.n_notes, prints.length_ms, clusters.id_rank)
    kept = ~duplicate & (rank <= config.max_per_cluster)
    smallest_id = np.full(cluster.max(initial=-1) + 1, prints.files, np.int64)
    np.minimum.at(smallest_id, cluster, clusters.id_rank)
    signals = sum(clusters.linked[signal].astype(np.int64) << bit for bit, signal in enumerate(SIGNALS))
    table = pa.table({
        "file_id": prints.file_ids,
        "cluster_id": prints.file_ids.take(clusters.id_order[smallest_id[cluster]]),
        "cluster_size": np.bincount(cluster)[cluster].astype(np.int32),
        "rank": rank.astype(np.int32),
        "kept": kept,
        "reason": pa.array(REASONS).take(np.where(duplicate, 1, np.where(kept, 0, 2))),
        "linked_by": _SIGNAL_LISTS.take(np.asarray(signals, np.int64)),
        "opus_key": opus_keys,
        "content_hash": _hex(prints.digests),
        "n_notes": prints.n_notes.astype(np.int32),
        "length_ms": prints.length_ms,
        "shingles": prints.shingle_counts.astype(np.int32),
        "transcription_score": meta["transcription_score"],
    }, schema=DEDUP_SCHEMA)
    return table.take(clusters.id_order), clusters  # sorted by file_id


# linked_by of each combination of signals, bit k standing for SIGNALS[k]
_SIGNAL_LISTS = pa.array([[signal for bit, signal in enumerate(SIGNALS) if code >> bit & 1]
                          for code in range(1 << len(SIGNALS))], pa.list_(pa.string()))
_HEX_DIGITS = np.array([f"{byte:02x}".encode() for byte in range(256)], "S2")


def _hex(digests: np.ndarray) -> pa.Array:
    """Each uint8 row as a lowercase hex string, without a Python object per row."""
    width = 2 * digests.shape[1]
    offsets = np.arange(0, width * len(digests) + 1, width, dtype=np.int32)
    data = _HEX_DIGITS[digests].tobytes()
    return pa.StringArray.from_buffers(len(digests), pa.py_buffer(offsets), pa.py_buffer(data))


def _best_first(score: np.ndarray) -> np.ndarray:
    """Sort key putting high transcription scores first and unknown ones last."""
    return np.where(np.isnan(score), np.inf, -score)


def _duplicates(content: np.ndarray, score: np.ndarray, id_rank: np.ndarray) -> np.ndarray:
    """True for every copy of a content but its best one (highest score, then smallest file_id)."""
    order = np.lexsort((id_rank, _best_first(score), content))
    duplicate = np.zeros(len(order), bool)
    duplicate[order[1:]] = content[order[1:]] == content[order[:-1]]
    return duplicate


def _ranks(cluster: np.ndarray, duplicate: np.ndarray, score: np.ndarray, n_notes: np.ndarray,
           length_ms: np.ndarray, id_rank: np.ndarray) -> np.ndarray:
    """1-based rank in the cluster: distinct contents before copies, then score, notes, length, id."""
    order = np.lexsort((id_rank, -length_ms, -n_notes, _best_first(score), duplicate, cluster))
    starts = np.flatnonzero(np.diff(cluster[order], prepend=-1) != 0)
    position = np.arange(len(order)) - np.repeat(starts, np.diff(starts, append=len(order)))
    rank = np.empty(len(order), np.int64)
    rank[order] = position + 1
    return rank


def _summarise(table: pa.Table, clusters: _Clusters, prints: _Prints, near_pairs: np.ndarray,
               meta: dict[str, pa.Array], stats: DedupStats) -> None:
    """Counts of ``table`` (sorted by file_id) into ``stats``; ``clusters`` is in arrival order."""
    order = clusters.id_order  # arrival order -> table order
    kept = table.column("kept").to_numpy()
    reason = pc.index_in(table.column("reason"), value_set=pa.array(REASONS)).to_numpy()
    linked = {signal: clusters.linked[signal][order] for signal in SIGNALS}
    stats.files = prints.files
    stats.unique_contents = len(prints.first_file)
    stats.signatures = len(prints.signatures)
    stats.without_signature = stats.unique_contents - stats.signatures
    stats.verified_pairs = len(near_pairs)
    stats.opus_keys = prints.files - table.column("opus_key").null_count
    stats.kept = int(kept.sum())
    stats.dropped = stats.files - stats.kept
    stats.drops_by_reason = _nonzero({name: np.sum(reason == k) for k, name in enumerate(REASONS) if k})
    stats.drops_by_signal = _nonzero({signal: np.sum(~kept & linked[signal]) for signal in SIGNALS})
    stats.links_by_signal = _nonzero({signal: np.sum(linked[signal]) for signal in SIGNALS})
    sizes = np.bincount(clusters.codes)
    stats.clusters = int(np.sum(sizes > 1))
    stats.largest_cluster = int(sizes.max(initial=0))
    stats.largest_clusters = _largest_clusters(table, clusters.codes[order], linked, meta, order)


def _nonzero(counts: dict) -> dict[str, int]:
    return {name: int(count) for name, count in counts.items() if count}


def _largest_clusters(table: pa.Table, cluster: np.ndarray, linked: dict[str, np.ndarray],
                      meta: dict[str, pa.Array], order: np.ndarray, top: int = 10) -> list[dict]:
    """The ``top`` biggest clusters of two or more files, each named by its first-ranked file.

    ``table`` is sorted by file_id and ``cluster`` in its order, so a cluster's first row holds its id.
    """
    sizes = np.bincount(cluster)
    first_row = np.full(len(sizes), len(cluster), np.int64)
    np.minimum.at(first_row, cluster, np.arange(len(cluster)))
    largest = [c for c in np.lexsort((first_row, -sizes)).tolist() if sizes[c] > 1][:top]
    rank, kept = table.column("rank").to_numpy(), table.column("kept").to_numpy()
    result = []
    for code in largest:
        members = np.flatnonzero(cluster == code)
        first = order[members[rank[members] == 1][0]]  # its file in arrival order, where meta is
        result.append({
            "cluster_id": table.column("cluster_id")[int(members[0])].as_py(),
            "files": int(sizes[code]),
            "kept": int(kept[members].sum()),
            "composer": meta["composer"][int(first)].as_py(),
            "title": meta["title"][int(first)].as_py(),
            "linked_by": _nonzero({signal: linked[signal][members].sum() for signal in sorted(SIGNALS)}),
        })
    return result
