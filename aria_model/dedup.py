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
  MinHash signatures over ``note_shingles``, MinHashLSH for candidate pairs, and each candidate
  kept only if its estimated Jaccard similarity reaches the threshold.

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
groups per task, and send back per file only its id, content hash, sizes and, once per distinct
content, a uint32 signature; the main process queries each new signature against the MinHashLSH
and then inserts it, while the workers compute the next batches, and does the union-find. Content
hashes, shingles and signatures are numpy over a whole batch (the signatures bit-identical to
``MinHash.bulk``), so the result is the same for any ``workers`` and batching. Measured on 2 cores
(Xeon VM), 20k-80k re-performed files from 48 takes of each piece, CPU seconds per 1,000 files:

    notes per file    workers (read, hash, shingles, sign)    main process (of it MinHashLSH)
    ~375              0.09-0.10                               0.23-0.26 (0.13)
    ~2,400            0.50-0.57                               0.25-0.28 (0.13-0.15)

That is 3,900-4,300 and 2,100-2,400 files/s wall with workers=2, where the single process it
replaced did 1,400-2,000 and 1,040 (same machine and files): 1.2M files in ~5 min, and in
8.5-9.5 min at Aria-MIDI's ~2,400 notes a file. The main process bounds the short files:
MinHashLSH costs ~130-170 us of CPU and ~5.6 KiB of memory per signature (7 GB at 1.2M, besides
the file ids and hashes). Banding the signatures in numpy finds the same candidate pairs for
~20 us and 0.5 KiB a signature: the next step if the corpus grows.

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
import os
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasketch import LeanMinHash, MinHash, MinHashLSH

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
    lsh_insert_seconds: float = 0.0  # main process
    lsh_query_seconds: float = 0.0  # main process, without verifying the candidates
    seconds: float = 0.0  # wall time of the whole call

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0

    @property
    def signatures_per_s(self) -> float:
        """Per core: signatures / signature_seconds."""
        return self.signatures / self.signature_seconds if self.signature_seconds else 0.0

    @property
    def lsh_queries_per_s(self) -> float:
        return self.signatures / self.lsh_query_seconds if self.lsh_query_seconds else 0.0


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
    return _content_hashes(_FlatNotes.of_one(onset_ms, duration, pitch, velocity))[0]


def note_shingles(onset_ms: np.ndarray, pitch: np.ndarray, config: DedupConfig = DedupConfig()) -> np.ndarray:
    """Sorted distinct uint32 shingles of a performance (the design is in the module docstring)."""
    unused = np.zeros(len(onset_ms), np.int64)  # durations and velocities play no part in shingles
    shingles, _ = _shingles(_FlatNotes.of_one(onset_ms, unused, pitch, unused), config)
    return shingles


@dataclass(frozen=True)
class _FlatNotes:
    """The notes of a batch of files, end to end (int64): file i's are ``[offsets[i], offsets[i + 1])``.

    Content hashes and shingles are computed for the whole batch at once, a few numpy calls per
    batch instead of a dozen per file: most files hold a few hundred notes, where numpy's per-call
    cost would outweigh its work.
    """

    onset: np.ndarray  # from each file's first note
    duration: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of_one(cls, onset_ms, duration, pitch, velocity) -> _FlatNotes:
        columns = [np.asarray(column, np.int64) for column in (onset_ms, duration, pitch, velocity)]
        return cls.of_files(*columns, offsets=np.array([0, len(columns[0])]))

    @classmethod
    def of_batch(cls, batch: pa.RecordBatch | pa.Table) -> _FlatNotes:
        """The note list columns of a ``midi_notes`` batch (NOTE_COLUMNS), checked to agree in length."""
        columns, offsets = [], None
        for name in NOTE_COLUMNS[1:]:
            column = batch.column(name)
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
            bounds = column.offsets.to_numpy()  # absolute positions in .values, whatever the slicing
            columns.append(column.values.to_numpy()[bounds[0]: bounds[-1]].astype(np.int64))
            bounds = bounds - bounds[0]
            if offsets is not None and not np.array_equal(bounds, offsets):
                raise ValueError(f"notes columns {list(NOTE_COLUMNS[1:])} must have equal lengths in each row")
            offsets = bounds
        return cls.of_files(*columns, offsets=offsets.astype(np.int64))

    @classmethod
    def of_files(cls, onset, duration, pitch, velocity, offsets: np.ndarray) -> _FlatNotes:
        first_onset = _per_file(np.minimum, onset, offsets)
        return cls(onset - np.repeat(first_onset, np.diff(offsets)), duration, pitch, velocity, offsets)

    @property
    def files(self) -> int:
        return len(self.offsets) - 1

    def file_of_note(self) -> np.ndarray:
        return np.repeat(np.arange(self.files), np.diff(self.offsets))

    def in_file_order(self, key: np.ndarray, kind: str | None = None) -> np.ndarray:
        """Permutation sorting the notes by file, then by ``key`` (>= 0; stable if kind="stable")."""
        file_bits = max(self.files - 1, 0).bit_length()
        key_bits = int(key.max()).bit_length() if len(key) else 0
        if file_bits + key_bits <= 62:  # one int64 sort; else (a file lasting decades) two keys
            return np.argsort((self.file_of_note() << key_bits) | key, kind=kind)
        return np.lexsort((key, self.file_of_note()))


def _per_file(ufunc: np.ufunc, values: np.ndarray, offsets: np.ndarray, empty: int = 0) -> np.ndarray:
    """``ufunc`` reduced over each file's slice of ``values``; ``empty`` for files without notes."""
    sizes = np.diff(offsets)
    reduced = np.full(len(sizes), empty, values.dtype)
    if len(values):
        reduced[sizes > 0] = ufunc.reduceat(values, offsets[:-1][sizes > 0])
    return reduced


def _content_hashes(notes: _FlatNotes) -> list[str]:
    """content_hash of each file: one sort for the whole batch, then one digest per file."""
    # One int64 sort key (exact for onsets below 2^49 ms): np.lexsort over four keys costs 8x more.
    key = (notes.onset << 14) | (notes.pitch << 7) | notes.velocity
    order = notes.in_file_order(key, kind="stable")
    key, duration, file_of = key[order], notes.duration[order], notes.file_of_note()
    offsets = notes.offsets.tolist()
    twins = np.flatnonzero((key[1:] == key[:-1]) & (file_of[1:] == file_of[:-1]))
    for file in np.unique(file_of[twins]).tolist():  # the same note twice: order the copies by duration
        span = slice(offsets[file], offsets[file + 1])
        by_duration = np.lexsort((duration[span], key[span]))
        key[span], duration[span] = key[span][by_duration], duration[span][by_duration]
    digests = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        digest = hashlib.blake2b(key[start:end].tobytes(), digest_size=16)
        digest.update(duration[start:end].tobytes())
        digests.append(digest.hexdigest())
    return digests


def _shingles(notes: _FlatNotes, config: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct shingles of each file (note_shingles), end to end, and their offsets per file."""
    if not len(notes.onset):
        return np.zeros(0, np.uint32), np.zeros(notes.files + 1, np.int64)
    # Events: notes in onset order (the order inside a chord does not matter to its maximum), a new
    # event at each file's first note and wherever the onset moves on by more than chord_ms.
    onset, pitch, file_of = notes.onset, notes.pitch, notes.file_of_note()
    first_notes = notes.offsets[:-1][np.diff(notes.offsets) > 0]
    steps = np.diff(onset)
    steps[first_notes[1:] - 1] = 0  # from one file's last note to the next file's first
    if np.any(steps < 0):  # midi_notes rows come in onset order, other input may not
        order = notes.in_file_order(onset, kind="stable")
        onset, pitch = onset[order], pitch[order]
        steps = np.diff(onset)
    new_event = np.zeros(len(onset), bool)
    new_event[1:] = steps > config.chord_ms
    new_event[first_notes] = True
    starts = np.flatnonzero(new_event)
    event_pitch, event_file = np.maximum.reduceat(pitch, starts), file_of[starts]
    intervals = (np.clip(np.diff(event_pitch), -_MAX_INTERVAL, _MAX_INTERVAL) + _MAX_INTERVAL).astype(np.uint32)
    windows = len(intervals) - config.ngram + 1
    if windows <= 0:
        return np.zeros(0, np.uint32), np.zeros(notes.files + 1, np.int64)
    code = intervals[:windows].copy()
    for offset in range(1, config.ngram):  # exact base-_INTERVALS digits; DedupConfig keeps it within uint32
        code = code * np.uint32(_INTERVALS) + intervals[offset: offset + windows]
    inside_a_file = event_file[:windows] == event_file[config.ngram:]  # its first and last event
    # Distinct (file, shingle) pairs, sorted: np.unique's sort and mask, on one uint64 per pair.
    keyed = np.sort((event_file[:windows][inside_a_file].astype(np.uint64) << np.uint64(32)) | code[inside_a_file])
    first = np.ones(len(keyed), bool)
    first[1:] = keyed[1:] != keyed[:-1]
    keyed = keyed[first]
    counts = np.bincount((keyed >> np.uint64(32)).astype(np.int64), minlength=notes.files)
    return keyed.astype(np.uint32), np.concatenate([[0], np.cumsum(counts)])


# The MurmurHash3 finaliser datasketch's affine32 scheme applies to each input hash (datasketch.minhash._fmix).
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
_SCHEME = "affine32"  # datasketch 2.0's default: the scheme of every signature here


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own permutations ``a * h + b mod 2^32`` of MinHash(num_perm, seed)."""
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
    return a, b


def _signatures(shingles: np.ndarray, offsets: np.ndarray, config: DedupConfig, chunk: int = 1 << 13) -> np.ndarray:
    """MinHash hash values (files x num_perm, uint32) of each file's shingles.

    Bit-identical to ``MinHash.bulk(shingle_lists, num_perm, seed, hashfunc=int)`` (tests check it)
    and 5x faster: bulk hashes each shingle through a Python call and builds a MinHash per file.
    Shingles already are uniform uint32 values, so the hash is the identity before affine32's
    finaliser (reference/orchestration.md §6). Permuted values are num_perm x chunk, 4 MiB at
    128 x 8192: one file's set is too small a unit for numpy, a batch's too big for the cache.
    """
    a, b = _permutations(config.num_perm, config.seed)
    a, b = a[:, None], b[:, None]
    files = len(offsets) - 1
    values = np.full((config.num_perm, files), np.iinfo(np.uint32).max, np.uint32)
    s1, m1, s2, m2, s3 = _FMIX32
    hashed = shingles ^ (shingles >> s1)
    hashed *= m1
    hashed ^= hashed >> s2
    hashed *= m2
    hashed ^= hashed >> s3
    file_of = np.repeat(np.arange(files), np.diff(offsets))
    permuted = np.empty((config.num_perm, min(chunk, len(hashed))), np.uint32)
    for start in range(0, len(hashed), chunk):
        part = permuted[:, : len(hashed[start: start + chunk])]
        np.multiply(a, hashed[start: start + chunk], out=part)  # uint32 arithmetic wraps: mod 2^32
        part += b
        owner = file_of[start: start + chunk]
        firsts = np.flatnonzero(np.diff(owner, prepend=-1))
        rows = owner[firsts]  # a file cut by the chunk's end takes the smaller of its two minima
        values[:, rows] = np.minimum(values[:, rows], np.minimum.reduceat(part, firsts, axis=1))
    return np.ascontiguousarray(values.T)


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

    file_ids: list[str]
    content_hashes: list[str]
    n_notes: np.ndarray
    length_ms: np.ndarray
    shingle_counts: np.ndarray
    signed: list[int]  # rows with a signature: the first of each content with min_shingles shingles or more
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
    hashes = _content_hashes(notes)
    if config.use_content:
        shingles, offsets = _shingles(notes, config)
    else:
        shingles, offsets = np.zeros(0, np.uint32), np.zeros(notes.files + 1, np.int64)
    counts = np.diff(offsets)
    first_of_content = {digest: row for row, digest in reversed(list(enumerate(hashes)))}
    signed = sorted(row for row in first_of_content.values() if counts[row] >= config.min_shingles)
    read_done = time.process_time()
    is_signed = np.zeros(notes.files, bool)
    is_signed[signed] = True
    selected = shingles[np.repeat(is_signed, counts)]
    signatures = _signatures(selected, np.concatenate([[0], np.cumsum(counts[signed])]), config)
    return _BatchPrints(
        file_ids=batch.column("file_id").to_pylist(),
        content_hashes=hashes,
        n_notes=np.diff(notes.offsets),
        length_ms=_per_file(np.maximum, notes.onset + notes.duration, notes.offsets),
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


# The main process: every file's fingerprint, and the LSH index of the signatures as they arrive


class _Fingerprints:
    """Per file, in arrival order; a signature per distinct content, in a MinHashLSH.

    Each new signature is queried against the ones before it, then inserted: every pair that
    shares a band is found once (from its later member), as inserting all and then querying all
    would find it, but the index works while the workers compute the next batches.
    """

    def __init__(self, config: DedupConfig, stats: DedupStats):
        self.config, self.stats = config, stats
        self.file_ids: list[str] = []
        self.content_hashes: list[str] = []
        self.signature_hash: list[str] = []  # content hash of each signature
        self._signed_contents: set[str] = set()
        self._columns: dict[str, list[np.ndarray]] = {"n_notes": [], "length_ms": [], "shingle_counts": []}
        self._signatures = np.zeros((0, config.num_perm), np.uint32)  # grown by doubling
        self._pairs: list[np.ndarray] = []
        self._lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)

    def add(self, batch: _BatchPrints) -> None:
        self.file_ids += batch.file_ids
        self.content_hashes += batch.content_hashes
        for name, parts in self._columns.items():
            parts.append(getattr(batch, name))
        self.stats.read_seconds += batch.read_seconds
        self.stats.signature_seconds += batch.signature_seconds
        new = [k for k, row in enumerate(batch.signed) if batch.content_hashes[row] not in self._signed_contents]
        for k in new:
            self._signed_contents.add(batch.content_hashes[batch.signed[k]])
        self.signature_hash += [batch.content_hashes[batch.signed[k]] for k in new]
        self._index(batch.signatures[new])

    def column(self, name: str) -> np.ndarray:
        return np.concatenate(self._columns[name]) if self._columns[name] else np.zeros(0, np.int64)

    def _index(self, signatures: np.ndarray) -> None:
        first, last = len(self.signature_hash) - len(signatures), len(self.signature_hash)
        if last > len(self._signatures):
            grown = np.empty((max(last, 2 * len(self._signatures), 1024), self.config.num_perm), np.uint32)
            grown[:first] = self._signatures[:first]
            self._signatures = grown
        self._signatures[first:last] = signatures
        earlier, later = [], []
        query_seconds = insert_seconds = 0.0
        for key in range(first, last):
            minhash = LeanMinHash(seed=self.config.seed, hashvalues=self._signatures[key], scheme=_SCHEME)
            started = time.process_time()
            found = self._lsh.query(minhash)
            queried = time.process_time()
            self._lsh.insert(key, minhash, check_duplication=False)
            insert_seconds += time.process_time() - queried
            query_seconds += queried - started
            earlier += found
            later += [key] * len(found)
        self.stats.lsh_query_seconds += query_seconds
        self.stats.lsh_insert_seconds += insert_seconds
        pairs = np.array([earlier, later], np.int64).T.reshape(-1, 2)
        self.stats.candidate_pairs += len(pairs)
        self._pairs.append(pairs[_estimated_jaccard(self._signatures, pairs) >= self.config.threshold])

    def near_duplicate_pairs(self) -> np.ndarray:
        """Index pairs (i < j) of signatures whose LSH candidates pass the estimated-Jaccard check, sorted."""
        pairs = np.concatenate(self._pairs) if self._pairs else np.zeros((0, 2), np.int64)
        self.stats.verified_pairs = len(pairs)
        return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _fingerprint(notes: pa.Table | Iterable[pa.RecordBatch] | NoteParts, config: DedupConfig, stats: DedupStats,
                 workers: int | None) -> _Fingerprints:
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
    prints = _Fingerprints(config, stats)
    for batch in _in_order(functools.partial(_fingerprint_batch, config=config), tasks, workers):
        prints.add(batch)
    _open_part.cache_clear()
    return prints


def _estimated_jaccard(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Share of equal MinHash values per pair, a chunk of pairs at a time to bound memory."""
    return np.concatenate([
        (signatures[pairs[start: start + chunk, 0]] == signatures[pairs[start: start + chunk, 1]]).mean(axis=1)
        for start in range(0, len(pairs), chunk)
    ] or [np.zeros(0)])


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
    if len(set(prints.file_ids)) != len(prints.file_ids):
        raise ValueError("notes must have one row per file_id")
    meta = _metadata_columns(metadata, prints.file_ids)
    opus_keys = [opus_key(*fields) if config.use_opus_key else None
                 for fields in zip(meta["composer"], meta["opus"], meta["piece"], meta["title"])]
    files_of_content = _indices_by_key(prints.content_hashes)
    near_pairs = prints.near_duplicate_pairs()
    # A content's first file joins the cluster for all its copies: the exact signal joins them to it.
    first_file = np.array([files_of_content[digest][0] for digest in prints.signature_hash], np.int64)
    groups = {
        "exact": [files for files in files_of_content.values() if len(files) > 1],
        "opus": [files for key, files in _indices_by_key(opus_keys).items() if key is not None and len(files) > 1],
        "minhash": first_file[near_pairs].tolist(),
    }
    linked = {signal: _members(groups[signal], len(prints.file_ids)) for signal in ("exact", "opus")}
    # but every copy of a content takes part in its content's near-duplicate links
    linked["minhash"] = _members([files_of_content[prints.signature_hash[i]] for i in np.unique(near_pairs).tolist()],
                                 len(prints.file_ids))
    table = _dedup_table(prints, meta, opus_keys, groups, linked, config)
    _summarise(table, prints, meta, stats)
    stats.seconds = time.perf_counter() - started
    return DedupResult(table=table, stats=stats)


def _indices_by_key(keys: list) -> dict:
    indices = defaultdict(list)
    for index, key in enumerate(keys):
        indices[key].append(index)
    return indices


def _metadata_columns(metadata: pa.Table | None, file_ids: list[str]) -> dict[str, list]:
    """METADATA_COLUMNS but file_id, aligned to ``file_ids`` (None where a file or column has none)."""
    columns = {name: [None] * len(file_ids) for name in METADATA_COLUMNS[1:]}
    if metadata is None or metadata.num_rows == 0:
        return columns
    ids = metadata.column("file_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError("metadata must have one row per file_id")
    row_of = {file_id: row for row, file_id in enumerate(ids)}
    rows = [row_of.get(file_id) for file_id in file_ids]
    for name in columns:
        if name in metadata.column_names:
            values = metadata.column(name).to_pylist()
            columns[name] = [None if row is None else values[row] for row in rows]
    return columns


def _dedup_table(prints: _Fingerprints, meta: dict[str, list], opus_keys: list[str | None],
                 groups: dict[str, list[list[int]]], linked: dict[str, np.ndarray], config: DedupConfig) -> pa.Table:
    size = len(prints.file_ids)
    file_ids = np.array(prints.file_ids, dtype=str)
    content = np.array(prints.content_hashes, dtype=str)
    cluster = _cluster_codes(size, [group for signal in SIGNALS for group in groups[signal]])
    score = np.array([np.nan if s is None else s for s in meta["transcription_score"]], np.float64)
    n_notes = prints.column("n_notes")
    length_ms = prints.column("length_ms")
    duplicate = _duplicates(content, score, file_ids)
    rank = _ranks(cluster, duplicate, score, n_notes, length_ms, file_ids)
    kept = ~duplicate & (rank <= config.max_per_cluster)
    table = pa.table({
        "file_id": file_ids,
        "cluster_id": _smallest_per_cluster(file_ids, cluster),
        "cluster_size": np.bincount(cluster)[cluster].astype(np.int32),
        "rank": rank.astype(np.int32),
        "kept": kept,
        "reason": np.where(duplicate, "exact_duplicate", np.where(kept, "kept", "over_cap")),
        "linked_by": [[signal for signal in SIGNALS if linked[signal][i]] for i in range(size)],
        "opus_key": opus_keys,
        "content_hash": content,
        "n_notes": n_notes.astype(np.int32),
        "length_ms": length_ms,
        "shingles": prints.column("shingle_counts").astype(np.int32),
        "transcription_score": meta["transcription_score"],
    }, schema=DEDUP_SCHEMA)
    return table.sort_by("file_id")


def _cluster_codes(size: int, groups: list[list[int]]) -> np.ndarray:
    """Cluster number 0..k-1 of each item, joining every group's items (union-find)."""
    parent = list(range(size))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]  # path halving keeps the trees flat
            item = parent[item]
        return item

    for group in groups:
        first = root(group[0])
        for other in group[1:]:
            parent[root(other)] = first
    _, codes = np.unique([root(item) for item in range(size)], return_inverse=True)
    return codes.reshape(-1)


def _members(groups: list[list[int]], size: int) -> np.ndarray:
    mask = np.zeros(size, bool)
    for group in groups:
        mask[group] = True
    return mask


def _best_first(score: np.ndarray) -> np.ndarray:
    """Sort key putting high transcription scores first and unknown ones last."""
    return np.where(np.isnan(score), np.inf, -score)


def _duplicates(content_hashes: np.ndarray, score: np.ndarray, file_ids: np.ndarray) -> np.ndarray:
    """True for every copy of a content but its best one (highest score, then smallest file_id)."""
    order = np.lexsort((file_ids, _best_first(score), content_hashes))
    sorted_hashes = content_hashes[order]
    duplicate = np.zeros(len(order), bool)
    duplicate[order[1:]] = sorted_hashes[1:] == sorted_hashes[:-1]
    return duplicate


def _ranks(cluster: np.ndarray, duplicate: np.ndarray, score: np.ndarray, n_notes: np.ndarray,
           length_ms: np.ndarray, file_ids: np.ndarray) -> np.ndarray:
    """1-based rank in the cluster: distinct contents before copies, then score, notes, length, id."""
    order = np.lexsort((file_ids, -length_ms, -n_notes, _best_first(score), duplicate, cluster))
    starts = np.flatnonzero(np.diff(cluster[order], prepend=-1) != 0)
    position = np.arange(len(order)) - np.repeat(starts, np.diff(starts, append=len(order)))
    rank = np.empty(len(order), np.int64)
    rank[order] = position + 1
    return rank


def _smallest_per_cluster(file_ids: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """Each item's cluster id: the smallest file_id of its cluster."""
    order = np.lexsort((file_ids, cluster))
    first = np.flatnonzero(np.diff(cluster[order], prepend=-1) != 0)
    return file_ids[order[first]][cluster]


def _summarise(table: pa.Table, prints: _Fingerprints, meta: dict[str, list], stats: DedupStats) -> None:
    rows = table.select(["file_id", "cluster_id", "rank", "kept", "reason", "linked_by", "opus_key"]).to_pylist()
    stats.files = len(rows)
    stats.unique_contents = len(set(prints.content_hashes))
    stats.signatures = len(prints.signature_hash)
    stats.without_signature = stats.unique_contents - stats.signatures
    stats.opus_keys = sum(row["opus_key"] is not None for row in rows)
    stats.kept = sum(row["kept"] for row in rows)
    stats.dropped = stats.files - stats.kept
    stats.drops_by_reason = dict(Counter(row["reason"] for row in rows if not row["kept"]))
    stats.drops_by_signal = dict(Counter(s for row in rows if not row["kept"] for s in row["linked_by"]))
    stats.links_by_signal = dict(Counter(s for row in rows for s in row["linked_by"]))
    sizes = Counter(row["cluster_id"] for row in rows)
    stats.clusters = sum(1 for size in sizes.values() if size > 1)
    stats.largest_cluster = max(sizes.values(), default=0)
    stats.largest_clusters = _largest_clusters(rows, sizes, meta, prints.file_ids)


def _largest_clusters(rows: list[dict], sizes: Counter, meta: dict[str, list], file_ids: list[str],
                      top: int = 10) -> list[dict]:
    """The ``top`` biggest clusters of two or more files, each named by its first-ranked file."""
    index_of = {file_id: index for index, file_id in enumerate(file_ids)}
    first = {row["cluster_id"]: index_of[row["file_id"]] for row in rows if row["rank"] == 1}
    kept = Counter(row["cluster_id"] for row in rows if row["kept"])
    signals = defaultdict(Counter)
    for row in rows:
        signals[row["cluster_id"]].update(row["linked_by"])
    largest = sorted((c for c, size in sizes.items() if size > 1), key=lambda c: (-sizes[c], c))[:top]
    return [{
        "cluster_id": cluster,
        "files": sizes[cluster],
        "kept": kept[cluster],
        "composer": meta["composer"][first[cluster]],
        "title": meta["title"][first[cluster]],
        "linked_by": dict(sorted(signals[cluster].items())),
    } for cluster in largest]
