"""Find the MIDI files of a source folder and describe them in one manifest table.

A source is a folder tree of ``.mid``/``.midi`` files in one of four layouts,
detected in this order (or forced with ``layout=``):

- ``demo``: the embedded demo corpus, recognised by ``demo_metadata.json`` at the
  root (``{"version", "config", "pieces": {"<relpath>": {labels}}}``); only the
  pieces it lists belong to the source (other files there are cache);
- ``maestro``: a ``maestro-v*.csv`` or ``maestro-v*.json`` index at the root;
- ``aria_midi``: files named ``<file_id>_<segment>.mid`` with a ``metadata.json``
  in their folder or above it (up to three levels above the source root, as
  Aria's loader reads it three directories up from each file);
- ``plain``: anything else; no metadata.

``build_manifest`` returns one row per file keyed by the sha256 of its content
(``file_id``, the file's identity everywhere downstream) with normalised
metadata. Given the previous manifest it re-reads only files whose
(path, size, mtime) changed, so a rerun over a million files costs one listing::

    from aria_model.sources import build_manifest, resolve_source
    result = build_manifest(resolve_source(None) or demo_dir, previous=last_table)
    result.table, result.stats.as_dict()

This module reads metadata files but never parses MIDI.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

SOURCE_ENV_VAR = "ARIA_SOURCE"
LAYOUTS = ("aria_midi", "maestro", "demo", "plain")
MIDI_SUFFIXES = frozenset({".mid", ".midi"})
DEMO_METADATA_FILE = "demo_metadata.json"
ARIA_METADATA_FILE = "metadata.json"
ARIA_METADATA_LEVELS_ABOVE_ROOT = 3  # Aria reads metadata.json three folders up from each file
HASH_CHUNK_BYTES = 1 << 20  # memory per in-flight hash stays at one chunk, whatever the file size
# Same rule as ThreadPoolExecutor's default: hashing is I/O bound and hashlib releases the GIL.
DEFAULT_HASH_WORKERS = min(32, (os.cpu_count() or 1) + 4)

_ARIA_FILE_NAME = re.compile(r"^(\d+)_(\d+)\.midi?$", re.IGNORECASE)
_MAESTRO_INDEX_NAME = re.compile(r"^maestro-v(\d+(?:\.\d+)*)\.(csv|json)$", re.IGNORECASE)

METADATA_TEXT_COLUMNS = (
    "composer",  # canonical key from composer_key(), e.g. "chopin"
    "composer_raw",  # the composer exactly as the source spells it
    "opus",
    "piece",  # piece number within the opus
    "title",
    "genre",
    "performer",
    "collection",
    "tune_type",
    "region",
    "split",
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("file_id", pa.string(), nullable=False),  # sha256 hex of the file content
        pa.field("path", pa.string(), nullable=False),  # absolute
        pa.field("relpath", pa.string(), nullable=False),  # POSIX, relative to the source root
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # layout kind, one of LAYOUTS
        *(pa.field(name, pa.string()) for name in METADATA_TEXT_COLUMNS),
        pa.field("transcription_score", pa.float64()),  # Aria-MIDI per-segment audio score
        pa.field("extra", pa.string(), nullable=False),  # JSON object of every other metadata field
    ]
)

# Source field names that mean one of our columns.
_FIELD_ALIASES = {
    "canonical_composer": "composer",
    "canonical_title": "title",
    "piece_number": "piece",
    "audio_score": "transcription_score",
}

# Aria-MIDI metadata was extracted from video titles by a language model, so the
# same composer arrives under several transliterations.
_COMPOSER_SPELLINGS = {
    "rachmaninov": "rachmaninoff",
    "rachmaninow": "rachmaninoff",
    "tchaikowsky": "tchaikovsky",
    "tschaikowsky": "tchaikovsky",
    "prokofieff": "prokofiev",
    "moussorgsky": "mussorgsky",
    "skryabin": "scriabin",
    "schostakowitsch": "shostakovich",
    "haendel": "handel",
}
_NAME_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv"})
_NOT_A_COMPOSER = frozenset({"unknown", "various", "various artists", "n/a", "none", "null"})
_LETTERS_NFKD_KEEPS = str.maketrans({"ß": "ss", "ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d"})


class SourceError(ValueError):
    """A source folder that cannot be read as a MIDI source."""


class MetadataError(SourceError):
    """A metadata file (metadata.json, MAESTRO index, demo_metadata.json) that cannot be used."""


@dataclass(frozen=True, slots=True)
class MidiFileRecord:
    """One MIDI file of a source, as listed (its content is not read)."""

    path: str
    relpath: str
    size_bytes: int
    mtime_ns: int
    source: str
    metadata: dict[str, Any]  # METADATA_TEXT_COLUMNS, transcription_score and extra


@dataclass(frozen=True)
class ManifestStats:
    """What one build_manifest call did."""

    files_seen: int  # MIDI files listed under the source
    files_hashed: int  # read and hashed (new or changed since the previous manifest)
    files_reused: int  # file_id taken from the previous manifest without reading the file
    files_removed: int  # rows of the previous manifest whose file is gone
    files_skipped: int  # vanished or unreadable between listing and hashing
    bytes_hashed: int
    seconds: float

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


@dataclass(frozen=True)
class ManifestResult:
    """The manifest of one source, what building it did, and the layout it was read as."""

    table: pa.Table  # MANIFEST_SCHEMA, sorted by relpath
    stats: ManifestStats
    layout: str


def resolve_sources(explicit: str | None) -> list[Path]:
    """The source folders: ``explicit``, else $ARIA_SOURCE; several are separated by ``os.pathsep``
    (like PATH). An empty list means the embedded demo corpus."""
    chosen = explicit or os.environ.get(SOURCE_ENV_VAR) or ""
    return [Path(part).expanduser() for part in chosen.split(os.pathsep) if part.strip()]


def build_manifest_for_sources(
    source_dirs: list[str | Path],
    previous: pa.Table | None = None,
    layout: str | None = None,
    workers: int = DEFAULT_HASH_WORKERS,
) -> ManifestResult:
    """One manifest over several source folders, each walked incrementally on its own.

    Rows of ``previous`` under a folder that is no longer listed count as removed.
    """
    if not source_dirs:
        raise SourceError("no source folder given")
    results = []
    claimed = 0
    for folder in source_dirs:
        own_previous = _rows_under(previous, Path(folder)) if previous is not None else None
        claimed += own_previous.num_rows if own_previous is not None else 0
        results.append(build_manifest(folder, previous=own_previous, layout=layout, workers=workers))
    table = pa.concat_tables([r.table for r in results]).sort_by([("path", "ascending")])
    totals = {name: sum(getattr(r.stats, name) for r in results) for name in ManifestStats.__dataclass_fields__}
    totals["files_removed"] += (previous.num_rows if previous is not None else 0) - claimed
    return ManifestResult(
        table=table,
        stats=ManifestStats(**totals),
        layout=",".join(sorted({r.layout for r in results})),
    )


def _rows_under(table: pa.Table, folder: Path) -> pa.Table:
    root = str(folder.expanduser().resolve()).rstrip(os.sep) + os.sep
    return table.filter(pc.starts_with(table["path"], root))


@functools.lru_cache(maxsize=1 << 14)  # a million files share a few thousand composer spellings
def composer_key(raw: str | None) -> str | None:
    """Canonical lower-case ASCII surname key: "Frédéric Chopin" -> "chopin".

    Only the first of several composers counts ("Liszt / Busoni" -> "liszt"):
    arrangers and transcribers come after the composer of the piece.
    """
    if raw is None:
        return None
    text = ascii_fold(raw).lower()
    text = re.sub(r"\(.*?\)", " ", text)  # "(arr. Busoni)"
    first = re.split(r"[/;&]", text)[0].strip()
    if first in _NOT_A_COMPOSER:
        return None
    if "," in first:  # "Bach, Johann Sebastian"
        words = first.split(",")[0].split()
    else:
        words = [word for word in first.split() if word.strip(".") not in _NAME_SUFFIXES]
    key = re.sub(r"[^a-z0-9-]", "", words[-1]).strip("-") if words else ""
    return _COMPOSER_SPELLINGS.get(key, key) or None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in chunks so huge files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def iter_midi_files(source_dir: str | Path, layout: str | None = None) -> Iterator[MidiFileRecord]:
    """Every MIDI file under ``source_dir`` in relpath order, with its metadata.

    Symlinked files and folders are followed; a folder reached twice (a link
    loop, or two links to one folder) is walked once. Dot-named files and
    folders are skipped. ``layout`` forces one of
    LAYOUTS instead of detecting it. Raises SourceError for a missing folder or
    one without MIDI files (at the call, not at the first record), MetadataError
    for a metadata file that cannot be used.
    """
    return _records(*_list_source(source_dir, layout))


def build_manifest(
    source_dir: str | Path,
    previous: pa.Table | None = None,
    layout: str | None = None,
    workers: int = DEFAULT_HASH_WORKERS,
) -> ManifestResult:
    """One MANIFEST_SCHEMA row per MIDI file under ``source_dir``, sorted by relpath.

    Rows of ``previous`` whose (path, size_bytes, mtime_ns) are unchanged keep
    their file_id without the file being read; every other file is hashed in a
    pool of ``workers`` threads. Metadata is always re-read, so edits to the
    metadata files show up. A file that vanishes before it is hashed is skipped
    and counted in ``stats.files_skipped``.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    started = time.perf_counter()
    known_ids = _previous_file_ids(previous)
    root, listing, layout = _list_source(source_dir, layout)
    columns = _ManifestColumns()
    tally = _HashTally()
    for record, file_id in _identified(_records(root, listing, layout), known_ids, workers, tally):
        columns.append(record, file_id)
    stats = ManifestStats(
        files_seen=len(listing),
        files_hashed=tally.hashed,
        files_reused=tally.reused,
        files_removed=len(known_ids),  # whatever the listing did not claim is gone
        files_skipped=tally.skipped,
        bytes_hashed=tally.bytes_hashed,
        seconds=time.perf_counter() - started,
    )
    return ManifestResult(table=columns.to_table(), stats=stats, layout=layout)


def _records(root: Path, listing: list[tuple[str, int, int]], layout: str) -> Iterator[MidiFileRecord]:
    metadata_for = _metadata_reader(root, layout)  # outside the generator: bad index files fail now
    return (
        MidiFileRecord(
            path=os.path.join(root, relpath),
            relpath=relpath,
            size_bytes=size_bytes,
            mtime_ns=mtime_ns,
            source=layout,
            metadata=metadata_for(relpath),
        )
        for relpath, size_bytes, mtime_ns in listing
    )


@dataclass
class _HashTally:
    hashed: int = 0
    reused: int = 0
    skipped: int = 0
    bytes_hashed: int = 0


def _identified(
    records: Iterator[MidiFileRecord],
    known_ids: dict[str, tuple[int, int, str]],
    workers: int,
    tally: _HashTally,
) -> Iterator[tuple[MidiFileRecord, str]]:
    """Pair each record with its file_id, in input order, dropping files that cannot be read.

    Claims each record's path from ``known_ids``. At most a few files per
    worker are in flight, so memory stays flat over a million-file listing.
    """
    window = workers * 4
    pending: deque[tuple[MidiFileRecord, str | Future[str | None]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256") as pool:
        for record in records:
            known = known_ids.pop(record.path, None)
            if known is not None and known[:2] == (record.size_bytes, record.mtime_ns):
                pending.append((record, known[2]))
            else:
                pending.append((record, pool.submit(_hash_or_none, record.path)))
            if len(pending) >= window:
                yield from _settled(pending.popleft(), tally)
        while pending:
            yield from _settled(pending.popleft(), tally)


def _settled(
    entry: tuple[MidiFileRecord, str | Future[str | None]], tally: _HashTally
) -> Iterator[tuple[MidiFileRecord, str]]:
    record, file_id = entry
    if isinstance(file_id, str):
        tally.reused += 1
        yield record, file_id
        return
    digest = file_id.result()
    if digest is None:
        tally.skipped += 1
        return
    tally.hashed += 1
    tally.bytes_hashed += record.size_bytes
    yield record, digest


def _hash_or_none(path: str) -> str | None:
    try:
        return sha256_file(path)
    except OSError as error:  # vanished, or unreadable: one bad file must not stop the run
        logger.warning("skipping %s: %s", path, error)
        return None


def _previous_file_ids(previous: pa.Table | None) -> dict[str, tuple[int, int, str]]:
    """path -> (size_bytes, mtime_ns, file_id) from a previous manifest."""
    if previous is None:
        return {}
    needed = ("path", "size_bytes", "mtime_ns", "file_id")
    missing = [name for name in needed if name not in previous.column_names]
    if missing:
        raise ValueError(f"previous manifest lacks column(s) {missing}; it has {previous.column_names}")
    paths, sizes, mtimes, ids = (previous.column(name).to_pylist() for name in needed)
    return {path: (size, mtime, file_id) for path, size, mtime, file_id in zip(paths, sizes, mtimes, ids)}


class _ManifestColumns:
    """Column lists that grow one row at a time and become a MANIFEST_SCHEMA table."""

    def __init__(self) -> None:
        self._columns: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}

    def append(self, record: MidiFileRecord, file_id: str) -> None:
        row = {
            "file_id": file_id,
            "path": record.path,
            "relpath": record.relpath,
            "size_bytes": record.size_bytes,
            "mtime_ns": record.mtime_ns,
            "source": record.source,
            **record.metadata,
        }
        for name, values in self._columns.items():
            values.append(row.get(name))

    def to_table(self) -> pa.Table:
        return pa.table(self._columns, schema=MANIFEST_SCHEMA)


# Listing and layout detection


def _list_source(source_dir: str | Path, layout: str | None) -> tuple[Path, list[tuple[str, int, int]], str]:
    """(root, sorted [(relpath, size_bytes, mtime_ns)], layout) of a source folder."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown source layout {layout!r}; expected one of {LAYOUTS}")
    root = Path(source_dir).expanduser().resolve()
    if not root.exists():
        raise SourceError(f"MIDI source folder does not exist: {root}")
    if not root.is_dir():
        raise SourceError(f"MIDI source is not a folder: {root}")
    listing = sorted(_walk_midi_files(root))
    if not listing:
        raise SourceError(f"no MIDI files (.mid/.midi) found under {root}")
    layout = layout or _detect_layout(root, [relpath for relpath, _, _ in listing])
    if layout == "demo":
        listing = _only_demo_pieces(root, listing)
    return root, listing, layout


def _only_demo_pieces(root: Path, listing: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """The listing cut to the pieces demo_metadata.json lists.

    The demo index names the pieces of the current config; other files in the
    folder are the cache of an earlier, bigger config and are not part of the source.
    """
    pieces = _demo_labels(root)
    selected = [entry for entry in listing if entry[0] in pieces]
    if not selected:
        raise SourceError(f"none of the pieces listed in {root / DEMO_METADATA_FILE} is under {root}")
    return selected


def _walk_midi_files(root: Path) -> Iterator[tuple[str, int, int]]:
    walked: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        identity = _inode(folder)
        if identity is None or identity in walked:
            subfolders.clear()  # a symlink loop or a second link to a walked folder
            continue
        walked.add(identity)
        # Sorted: which of two links to one folder gets walked must not vary.
        subfolders[:] = sorted(name for name in subfolders if not _hidden(name))
        relfolder = Path(os.path.relpath(folder, root)).as_posix()
        for name in names:
            if not _hidden(name) and os.path.splitext(name)[1].lower() in MIDI_SUFFIXES:
                relpath = name if relfolder == "." else f"{relfolder}/{name}"
                listed = _listed_file(os.path.join(folder, name), relpath)
                if listed is not None:
                    yield listed


def _hidden(name: str) -> bool:
    # macOS copies leave "._x.mid" resource forks beside every file, and atomic
    # writers and version control keep their temp files and folders under dot names.
    return name.startswith(".")


def _inode(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _listed_file(path: str, relpath: str) -> tuple[str, int, int] | None:
    try:
        status = os.stat(path)  # follows symlinks: a linked file's own size and mtime
    except OSError as error:  # a dangling symlink, or a file deleted while we walk
        logger.warning("skipping %s: %s", path, error)
        return None
    return relpath, status.st_size, status.st_mtime_ns


def _detect_layout(root: Path, relpaths: list[str]) -> str:
    if (root / DEMO_METADATA_FILE).is_file():
        return "demo"
    if _maestro_index(root) is not None:
        return "maestro"
    aria = _AriaMidiMetadata(root)
    if any(aria.metadata_file_for(relpath) is not None for relpath in relpaths if _aria_ids(relpath)):
        return "aria_midi"
    return "plain"


# Metadata, per layout


def _metadata_reader(root: Path, layout: str) -> Callable[[str], dict[str, Any]]:
    """relpath -> normalised metadata for a source of the given layout."""
    if layout == "aria_midi":
        return _AriaMidiMetadata(root).for_file
    if layout == "plain":
        # relpath already carries the file name; guessing titles or composers from it would
        # put noise where downstream steps (opus keys, probe labels) expect metadata.
        return lambda relpath: _normalised({})
    labels_by_relpath = _maestro_labels(root) if layout == "maestro" else _demo_labels(root)
    return lambda relpath: _normalised(labels_by_relpath.get(relpath, {}))


class _AriaMidiMetadata:
    """Metadata of ``<file_id>_<segment>.mid`` files from the nearest metadata.json above them."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._top = root
        for _ in range(ARIA_METADATA_LEVELS_ABOVE_ROOT):
            self._top = self._top.parent
        self._file_in: dict[Path, Path | None] = {}
        self._file_for_relfolder: dict[str, Path | None] = {}
        self._entries: dict[Path, dict[str, Any]] = {}

    def metadata_file_for(self, relpath: str) -> Path | None:
        relfolder = relpath.rpartition("/")[0]
        # Keyed by the folder's string: a Path per file costs more than the lookup at 1M files.
        if relfolder not in self._file_for_relfolder:
            self._file_for_relfolder[relfolder] = self._nearest_metadata_file(self._root / relfolder)
        return self._file_for_relfolder[relfolder]

    def for_file(self, relpath: str) -> dict[str, Any]:
        ids = _aria_ids(relpath)
        if ids is None:
            return _normalised({})
        file_id, segment = ids
        labels: dict[str, Any] = {"aria_file_id": file_id, "aria_segment": int(segment)}
        metadata_file = self.metadata_file_for(relpath)
        if metadata_file is not None:
            labels.update(self._labels(metadata_file, file_id, segment))
        return _normalised(labels)

    def _nearest_metadata_file(self, folder: Path) -> Path | None:
        if folder not in self._file_in:
            candidate = folder / ARIA_METADATA_FILE
            if candidate.is_file():
                self._file_in[folder] = candidate
            elif folder == self._top or folder.parent == folder:
                self._file_in[folder] = None
            else:
                self._file_in[folder] = self._nearest_metadata_file(folder.parent)
        return self._file_in[folder]

    def _labels(self, metadata_file: Path, file_id: str, segment: str) -> dict[str, Any]:
        entries = self._load(metadata_file)
        # Keys are the integer id as a string; names may zero-pad it ("000042_0.mid").
        entry = entries.get(file_id, entries.get(str(int(file_id))))
        if entry is None:
            return {}
        if not isinstance(entry, dict):
            raise MetadataError(
                f"{metadata_file}: entry {file_id!r} is {type(entry).__name__}, expected an object"
            )
        labels = {key: value for key, value in entry.items() if key not in ("metadata", "audio_scores")}
        labels.update(_object_field(entry, "metadata", metadata_file, file_id))
        scores = _object_field(entry, "audio_scores", metadata_file, file_id)
        labels["transcription_score"] = scores.get(segment, scores.get(str(int(segment))))
        return labels

    def _load(self, metadata_file: Path) -> dict[str, Any]:
        if metadata_file not in self._entries:
            entries = _read_json(metadata_file)
            if not isinstance(entries, dict):
                raise MetadataError(
                    f"{metadata_file}: expected an object keyed by Aria-MIDI file id, "
                    f"got {type(entries).__name__} (pass layout='plain' if this is not an Aria-MIDI tree)"
                )
            self._entries[metadata_file] = entries
        return self._entries[metadata_file]


def _aria_ids(relpath: str) -> tuple[str, str] | None:
    """(file_id, segment) from an Aria-MIDI file name, None for other names."""
    match = _ARIA_FILE_NAME.match(relpath.rsplit("/", 1)[-1])
    return (match.group(1), match.group(2)) if match else None


def _object_field(entry: dict[str, Any], field: str, metadata_file: Path, file_id: str) -> dict[str, Any]:
    value = entry.get(field) or {}
    if not isinstance(value, dict):
        raise MetadataError(
            f"{metadata_file}: entry {file_id!r} field {field!r} is {type(value).__name__}, "
            "expected an object"
        )
    return value


def _maestro_index(root: Path) -> Path | None:
    """The newest maestro-v*.csv/json at the root; csv wins a tie (it is the primary release file)."""
    candidates = []
    for child in root.iterdir():
        match = _MAESTRO_INDEX_NAME.match(child.name)
        if match and child.is_file():
            version = tuple(int(part) for part in match.group(1).split("."))
            candidates.append((version, match.group(2).lower() == "csv", child.name, child))
    return max(candidates)[-1] if candidates else None


def _maestro_labels(root: Path) -> dict[str, dict[str, Any]]:
    index = _maestro_index(root)
    if index is None:
        raise MetadataError(f"no maestro-v*.csv or maestro-v*.json index in {root}")
    rows = _maestro_csv_rows(index) if index.suffix.lower() == ".csv" else _maestro_json_rows(index)
    labels: dict[str, dict[str, Any]] = {}
    for number, row in enumerate(rows):
        if not row.get("midi_filename"):
            raise MetadataError(f"{index}: row {number} has no midi_filename")
        labels[Path(row.pop("midi_filename")).as_posix()] = row
    return labels


def _maestro_csv_rows(index: Path) -> list[dict[str, Any]]:
    try:
        with open(index, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            if "midi_filename" not in (reader.fieldnames or []):
                raise MetadataError(f"{index}: no midi_filename column (columns: {reader.fieldnames})")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise MetadataError(f"{index}: cannot read MAESTRO index: {error}") from error


def _maestro_json_rows(index: Path) -> list[dict[str, Any]]:
    """Rows of a MAESTRO json: column-oriented in v3 ({"column": {"0": value}}), a row list in v2."""
    data = _read_json(index)
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return [dict(row) for row in data]
    if not isinstance(data, dict) or not all(isinstance(column, dict) for column in data.values()):
        raise MetadataError(f"{index}: expected {{column: {{row: value}}}} or a list of row objects")
    if "midi_filename" not in data:
        raise MetadataError(f"{index}: no midi_filename column (columns: {sorted(data)})")
    row_keys = sorted(data["midi_filename"], key=lambda key: (len(key), key))  # "10" after "9"
    return [{name: column.get(key) for name, column in data.items()} for key in row_keys]


def _demo_labels(root: Path) -> dict[str, dict[str, Any]]:
    metadata_file = root / DEMO_METADATA_FILE
    if not metadata_file.is_file():
        raise MetadataError(f"no {DEMO_METADATA_FILE} in {root}")
    pieces = _read_json(metadata_file)
    pieces = pieces.get("pieces") if isinstance(pieces, dict) else None
    if not isinstance(pieces, dict) or not all(isinstance(labels, dict) for labels in pieces.values()):
        raise MetadataError(f'{metadata_file}: expected {{"pieces": {{"<relpath>": {{labels}}}}}}')
    return pieces


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MetadataError(f"{path}: cannot read metadata: {error}") from error


# Normalisation


def _normalised(labels: Mapping[str, Any]) -> dict[str, Any]:
    """Labels of any layout -> our metadata columns, with every other field kept in ``extra``."""
    metadata: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for field, value in labels.items():
        column = _FIELD_ALIASES.get(field, field)
        if column in METADATA_TEXT_COLUMNS and column != "composer_raw":
            metadata[column] = _text(value)
        elif column == "transcription_score" and (score := _score(value)) is not None:
            metadata[column] = score
        elif value is not None:  # includes a score that is not a number: kept, not lost
            extra[field] = value
    if "composer" in metadata:
        metadata["composer_raw"] = metadata["composer"]
        metadata["composer"] = composer_key(metadata["composer"])
    metadata["extra"] = json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str)
    return metadata


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # piece number 3.0 -> "3"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value).strip() or None


def _score(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def ascii_fold(text: str) -> str:
    """Accents and ligatures folded to plain ASCII ("Dvořák" -> "Dvorak", "Straße" -> "Strasse")."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_LETTERS_NFKD_KEEPS))
    return decomposed.encode("ascii", "ignore").decode("ascii")
