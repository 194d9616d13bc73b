"""Token shards: AbsTokenizer ids of the curated files in Parquet, split train/val/test by piece.

Which files: those ``opus_dedup`` keeps (``kept``) and ``quality_filter`` passes
(``passed``), tokenized from the ``midi_notes`` table with the raw manifest's
composer/form/genre as prefix metadata, so the ids are exactly
``AbsTokenizer().tokenize_ids(load_midi(path, metadata))``. Workers take ~512 files
at a time straight from the note columns through ``AbsTokenizer.tokenize_ids_many``
(one compiled pass); a batch with a file the tokenizer rejects goes row by row
(``performance_from_row``), which names that file.

Stored ids are the tokenizer's deterministic form: prefix tokens in vocabulary
order, ``<D>`` at the centre of Aria's jitter (100 tokens before the end, moved to
precede a note) and a final ``<E>``. Aria re-tokenizes every epoch (fresh prefix
order, fresh ``<D>`` position); ``aria_model.data`` redraws both per epoch from
these ids for training, with Aria's exact rule, and reads val/test as stored.

One row per file: ``file_id, cluster_id, ids (list<uint16>), n_tokens,
prefix_metadata`` (the JSON of the metadata its prefix tokens came from). Row
groups hold about ``row_group_tokens`` tokens (the data loader's unit of work and
shuffling); shards hold whole row groups up to about ``shard_tokens``. The split
of a file is its piece cluster's: a hash of ``seed:cluster_id`` against the split
fractions, so no piece is in two splits and new files never move an existing
cluster (as long as the cluster keeps its id).

Incremental: a build starts from the current set when that set was made with the
same tokenizer, notes parser, seed, split fractions and shard sizes (else, or
with ``rebuild=True``, every file is tokenized afresh in ``midi_notes`` order).
Per previous shard (its checksum verified first):

- every row still selected, in the same cluster, with the same prefix metadata:
  the file is carried into the new set unchanged (a hard link; a copy where
  links fail), checksum and all;
- some rows gone (file dropped, prefix metadata changed, cluster moved): the
  shard is rewritten under its name from its remaining rows' stored ids;
- the split's last shard, while under ``shard_tokens``, is rewritten with the
  split's new rows appended, so small ingests fill it instead of adding tiny shards.

New rows of a split follow its previous shards: first the files whose cluster
moved them here (stored ids copied), then the files not in the previous set (or
whose prefix metadata changed, or whose shard failed its checksum), tokenized,
in ``midi_notes`` order. Only those are tokenized; a file the tokenizer rejected
before (same prefix metadata) is listed as failed again without a retry. A rebuild orders every file by
``midi_notes``, an incremental build keeps the old rows where they are, so the
two agree byte for byte only where the new rows come last in ``midi_notes``
order or the changes touch only each split's last shard; each mode is
deterministic, and an unchanged rerun carries every shard and republishes the
same set. The manifest's ``build`` section counts what was reused, rewritten and
tokenized by the run that wrote the set.

Layout under the data home; the visible folder is a symlink to the current set::

    token_shards -> .token_shards/<set id>/
        manifest.json                       tokenizer hash, seed, counts, checksums, input digests, build
        train/shard-00000.parquet ...
        val/shard-00000.parquet ...
        test/shard-00000.parquet ...

A new set is written to a hidden staging folder and published by swapping the
symlink (one atomic rename): readers see the old set or the whole new one, and
a killed writer leaves only a hidden staging folder, removed by the next run.
The set id is a digest of the manifest's content (everything but ``build``), so
an unchanged rerun publishes the same bytes under the same name. The previous
set is kept, for readers still in it.

    report = build_token_shards(ShardInputs(notes_dir, manifest, dedup, quality), home / "token_shards")
    report.manifest["splits"]["train"]["tokens"], report.tokens_per_s, report.build["files"]["tokenized"]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aria_model.atomic_io import write_json_atomic
from aria_model.midi import Performance
from aria_model.notes_table import (
    PARSER_VERSION,
    list_values,
    notes_ms,
    part_files,
    performance_from_row,
)
from aria_model.sources import sha256_file
from aria_model.tokenizer import AbsTokenizer

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: prefix_metadata column, shards reused across builds
SHARD_SCHEMA = pa.schema([
    ("file_id", pa.string()),
    ("cluster_id", pa.string()),
    ("ids", pa.list_(pa.uint16())),
    ("n_tokens", pa.int32()),
    ("prefix_metadata", pa.string()),  # JSON of the metadata behind the prefix tokens: a change re-tokenizes
])
STORED_IDS = ("AbsTokenizer.tokenize_ids without rng: prefix tokens in vocabulary order, "
              "<D> 100 tokens before the end, <E> last")
# Manifest columns that become prefix tokens; "form" has no column and comes from ``extra``.
PREFIX_METADATA = ("composer", "form", "genre")
# The midi_notes columns performance_from_row needs.
NOTE_LIST_COLUMNS = ("start_tick", "end_tick", "pitch", "velocity", "channel", "instrument", "tempo_tick", "tempo_us")
NOTE_SCALAR_COLUMNS = ("file_id", "ticks_per_beat", "n_parsed_notes", "instruments")
UNBOUNDED_TOKENS = 2**62  # shard_tokens of a rewrite: the rewritten shard stays one file
TASK_FILES = 512  # files a tokenizer task takes: ~0.9M notes at Aria-MIDI lengths, the part opened once
# ids do not gain from dictionary pages (17k distinct values). Split into byte streams (high bytes
# apart from low ones) zstd packs them into 1.2 bytes a token instead of 1.6, and writes 53 instead of
# 33 M tokens/s: the shard writer is the one process every tokenizer worker feeds.
SHARD_WRITE_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": ["cluster_id", "prefix_metadata"],
    "column_encoding": {"ids.list.element": "BYTE_STREAM_SPLIT"},
}


class ShardError(ValueError):
    """Inputs or an output folder that token shards cannot be built from or into."""


@dataclass(frozen=True)
class ShardConfig:
    shard_tokens: int = 64_000_000  # ~128 MB of ids before compression; Aria-MIDI gives a few hundred shards
    row_group_tokens: int = 1_000_000  # the loader's unit: ~2 MB, thousands per corpus to spread over ranks x workers
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train, val, test; Aria holds out 5% for val
    seed: int = 0  # salts the cluster -> split hash; the same seed keeps every cluster in its split
    workers: int | None = None  # tokenizer processes; None: all cores
    rebuild: bool = False  # ignore the previous set: tokenize every file, packed in midi_notes order

    def __post_init__(self):
        if len(self.split_fractions) != len(SPLITS) or min(self.split_fractions) < 0:
            raise ShardError(f"split_fractions needs {len(SPLITS)} non-negative fractions, got {self.split_fractions}")
        if not math.isclose(sum(self.split_fractions), 1.0, abs_tol=1e-9):
            raise ShardError(f"split_fractions must sum to 1, got {sum(self.split_fractions)}")
        if not 0 < self.row_group_tokens <= self.shard_tokens:
            raise ShardError("need 0 < row_group_tokens <= shard_tokens")


@dataclass(frozen=True)
class ShardInputs:
    """Where the upstream assets' outputs are."""

    notes_dir: Path  # midi_notes parts
    raw_manifest: Path  # raw_midi_manifest: file_id, path, composer, genre, extra
    dedup: Path  # opus_dedup: file_id, cluster_id, kept
    quality: Path  # quality_filter: file_id, passed


@dataclass(frozen=True)
class ShardReport:
    root: Path
    manifest: dict  # of the published set
    seconds: float
    build: dict = field(default_factory=dict)  # what this run reused, rewrote and tokenized (see _Build)

    @property
    def tokens(self) -> int:
        return sum(split["tokens"] for split in self.manifest["splits"].values())

    @property
    def files(self) -> int:
        return sum(split["files"] for split in self.manifest["splits"].values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# -- build --------------------------------------------------------------------------------


def build_token_shards(inputs: ShardInputs, root: Path, config: ShardConfig = ShardConfig()) -> ShardReport:
    """Shard the kept-and-passed files into a new set at ``root``, reusing the current set where it can."""
    started = time.perf_counter()
    root = Path(root)
    cluster_of = select_files(inputs.dedup, inputs.quality)
    split_of = {cluster: cluster_split(cluster, config) for cluster in set(cluster_of.values())}
    metadata = prefix_metadata(inputs.raw_manifest, cluster_of.keys())
    prefix_of = {fid: prefix_key(metadata.get(fid, {})) for fid in cluster_of}
    header = _manifest_header(config)
    with _staging_folder(root) as staging:
        previous, build = _previous_set(root, header, config)
        plan = _reuse_plan(*previous, cluster_of, prefix_of, config, build) if previous else []
        stored = {fid for shard in plan for fid, k, m in zip(shard.file_ids, shard.keep, shard.move) if k or m}
        # The tokenizer is deterministic: a file it rejected with the same prefix would fail again.
        failed = [f for f in (previous[1]["failed"] if previous else [])
                  if prefix_of.get(f["file_id"]) == f["prefix_metadata"] and f["file_id"] not in stored]
        build["known_failures"] = len(failed)
        known = stored | {f["file_id"] for f in failed}
        to_tokenize = {fid: cluster for fid, cluster in cluster_of.items() if fid not in known}
        writers = _reuse_previous_shards(staging, plan, previous, to_tokenize, cluster_of, split_of, config, build)
        tokenized = set()
        jobs = _note_row_groups(inputs.notes_dir, to_tokenize, metadata)
        for ids, failures in _in_workers(_tokenize_row_groups, jobs, config.workers or os.cpu_count() or 1):
            _route(_shard_rows(ids, cluster_of, prefix_of), split_of, writers)
            tokenized.update(ids["file_id"].to_pylist())
            build["files"]["tokenized"] += ids.num_rows
            build["tokens"]["tokenized"] += int(pc.sum(ids["n_tokens"]).as_py() or 0)
            failed += [failure | {"prefix_metadata": prefix_of[failure["file_id"]]} for failure in failures]
        splits = {split: writer.close() for split, writer in writers.items()}
        build["shards"]["new"] = sum(writer.new_shards for writer in writers.values())
        missing = sorted(to_tokenize.keys() - tokenized - {f["file_id"] for f in failed})
        manifest = header | {
            "inputs": input_digests(inputs),
            "splits": splits,
            "failed": sorted(failed, key=lambda f: f["file_id"]),  # the tokenizer rejected them (rebuild retries)
            "missing_notes": missing,  # selected, but not in midi_notes
            "build": build,  # how the run that wrote this set got its rows; not part of the set id
        }
        write_json_atomic(manifest, staging / MANIFEST_FILE)
        _publish(staging, root, set_id(manifest))
    return ShardReport(root=root, manifest=read_manifest(root), seconds=time.perf_counter() - started, build=build)


def select_files(dedup_path: Path, quality_path: Path) -> dict[str, str]:
    """file_id -> cluster_id of every file dedup keeps and the quality filter passes."""
    dedup = _unique_by_file_id(pq.read_table(dedup_path, columns=["file_id", "cluster_id", "kept"]), dedup_path)
    quality = _unique_by_file_id(pq.read_table(quality_path, columns=["file_id", "passed"]), quality_path)
    joined = dedup.join(quality, "file_id", join_type="inner")
    kept = joined.filter(pc.and_(pc.fill_null(joined["kept"], False), pc.fill_null(joined["passed"], False)))
    return dict(zip(kept["file_id"].to_pylist(), kept["cluster_id"].to_pylist()))


def _unique_by_file_id(table: pa.Table, path: Path) -> pa.Table:
    if pc.count_distinct(table["file_id"]).as_py() != table.num_rows:
        raise ShardError(f"{path}: file_id is not unique")
    return table


def cluster_split(cluster_id: str, config: ShardConfig) -> str:
    """The split of a piece cluster: a uniform draw from its hash, cut by the split fractions."""
    digest = hashlib.sha256(f"{config.seed}:{cluster_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    for split, upper in zip(SPLITS, np.cumsum(config.split_fractions)):
        if draw < upper:
            return split
    return SPLITS[-1]  # float rounding just below 1.0


def prefix_metadata(raw_manifest: Path, file_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """Composer/form/genre of each file (first path in path order), lower-cased as prefix tokens are."""
    columns = [c for c in ("file_id", "path", "composer", "genre", "extra") if c in pq.read_schema(raw_manifest).names]
    table = pq.read_table(raw_manifest, columns=columns)
    table = table.filter(pc.is_in(table["file_id"], value_set=pa.array(list(file_ids), pa.string())))
    metadata: dict[str, dict[str, str]] = {}
    for row in table.sort_by([("file_id", "ascending"), ("path", "ascending")]).to_pylist():
        if row["file_id"] not in metadata:
            metadata[row["file_id"]] = _row_prefix_metadata(row)
    return metadata


def _row_prefix_metadata(row: dict) -> dict[str, str]:
    extra = json.loads(row["extra"]) if row.get("extra") and '"form"' in row["extra"] else {}
    values = {key: row.get(key) or extra.get(key) for key in PREFIX_METADATA}
    return {key: str(value).strip().lower() for key, value in values.items() if value}


def prefix_key(metadata: dict[str, str]) -> str:
    """The ``prefix_metadata`` column: one canonical JSON per metadata dict."""
    return json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# -- reuse of the previous set --------------------------------------------------------------


def _manifest_header(config: ShardConfig) -> dict:
    """Everything a set's bytes depend on besides its rows; a previous set is reused only if all match."""
    tokenizer = _tokenizer()
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": tokenizer.name, "config_hash": tokenizer.config.config_hash(),
                      "vocab_size": tokenizer.vocab_size},
        "stored_ids": STORED_IDS,
        "notes_parser_version": PARSER_VERSION,  # the notes a file_id stands for
        "seed": config.seed,
        "split_fractions": dict(zip(SPLITS, config.split_fractions)),
        "shard_tokens": config.shard_tokens,
        "row_group_tokens": config.row_group_tokens,
    }


def _new_build(mode: str, reason: str, previous_set: str | None = None) -> dict:
    """The manifest's ``build`` section, counted as the build goes."""
    return {
        "mode": mode,  # incremental | full
        "reason": reason,
        "previous_set": previous_set,
        "shards": dict.fromkeys(("reused", "rewritten", "new", "removed"), 0),
        # reused: in carried shards; copied: stored ids written again (rewritten shards, moved clusters)
        "files": dict.fromkeys(("reused", "copied", "tokenized", "dropped"), 0),
        "tokens": dict.fromkeys(("reused", "copied", "tokenized"), 0),
        "unusable_shards": [],  # previous shards whose checksum failed: their files were tokenized again
        "known_failures": 0,  # files the previous set's tokenizer rejected, listed again without a retry
    }


def _previous_set(root: Path, header: dict, config: ShardConfig) -> tuple[tuple[Path, dict] | None, dict]:
    """(folder, manifest) of the current set if this build may reuse it, and the build record."""
    if config.rebuild:
        return None, _new_build("full", "rebuild requested")
    if not (root.is_symlink() and (root / MANIFEST_FILE).is_file()):
        return None, _new_build("full", "no previous set")
    folder = root.resolve()
    try:
        manifest = read_manifest(folder)
    except ValueError as exc:  # a JSONDecodeError: treat as no set
        return None, _new_build("full", f"previous manifest unreadable: {exc}")
    changed = sorted(key for key, value in header.items() if manifest.get(key) != value)
    if changed:
        return None, _new_build("full", "previous set has other " + ", ".join(changed))
    return (folder, manifest), _new_build("incremental", f"reusing set {folder.name}", folder.name)


@dataclass
class _PreviousShard:
    """One shard of the previous set and what becomes of each of its rows."""

    split: str
    index: int  # the NNNNN of its name
    entry: dict  # its manifest entry (name, rows, tokens, row_groups, sha256)
    path: Path
    file_ids: list[str]
    clusters: list[str]
    n_tokens: np.ndarray
    keep: np.ndarray  # still selected, same cluster, same prefix metadata: the row stays where it is
    move: np.ndarray  # still selected, same prefix metadata, other cluster: its ids move to the new rows

    @property
    def kept_tokens(self) -> int:
        return int(self.n_tokens[self.keep].sum())


def _reuse_plan(folder: Path, manifest: dict, cluster_of: dict[str, str], prefix_of: dict[str, str],
                config: ShardConfig, build: dict) -> list[_PreviousShard]:
    """Every previous shard whose bytes match its checksum, in manifest order, with its rows' fate.

    Only the small columns are read here; a shard's ids are read only if it is rewritten.
    """
    entries = [(split, entry) for split in SPLITS for entry in manifest["splits"][split]["shards"]]
    paths = [folder / entry["name"] for _, entry in entries]
    with ThreadPoolExecutor(max_workers=config.workers or os.cpu_count() or 1) as pool:
        digests = list(pool.map(_sha256_or_none, paths))  # hashlib releases the GIL
    plan = []
    for (split, entry), path, digest in zip(entries, paths, digests):
        if digest != entry["sha256"]:
            build["unusable_shards"].append(entry["name"])
            continue
        rows = pq.read_table(path, columns=["file_id", "cluster_id", "prefix_metadata", "n_tokens"])
        file_ids, clusters, prefixes = (rows[c].to_pylist() for c in ("file_id", "cluster_id", "prefix_metadata"))
        same_ids = np.array([prefix_of.get(f) == p for f, p in zip(file_ids, prefixes)], dtype=bool)
        same_cluster = np.array([cluster_of.get(f) == c for f, c in zip(file_ids, clusters)], dtype=bool)
        build["files"]["dropped"] += sum(f not in cluster_of for f in file_ids)
        plan.append(_PreviousShard(split, shard_index(entry["name"]), entry, path, file_ids, clusters,
                                   rows["n_tokens"].to_numpy(), same_ids & same_cluster, same_ids & ~same_cluster))
    return plan


def _sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def shard_index(name: str) -> int:
    """``train/shard-00012.parquet`` -> 12."""
    return int(Path(name).stem.rsplit("-", 1)[1])


def _reuse_previous_shards(staging: Path, plan: list[_PreviousShard], previous: tuple[Path, dict] | None,
                           to_tokenize: dict[str, str], cluster_of: dict[str, str], split_of: dict[str, str],
                           config: ShardConfig, build: dict) -> dict[str, _SplitWriter]:
    """Carry, rewrite or drop each previous shard; return the split writers, holding the rows that go
    before the tokenized ones (the open last shard's rows, then the moved rows)."""
    moved = [fid for shard in plan for fid, move in zip(shard.file_ids, shard.move) if move]
    receiving = {split_of[cluster_of[fid]] for fid in [*to_tokenize, *moved]}
    open_shards = {split: _open_shard(plan, split, config) for split in receiving}
    writers = {}
    for split in SPLITS:
        opened = open_shards.get(split)
        # New shards go after every previous name of the split (or continue its open shard).
        previous_names = previous[1]["splits"][split]["shards"] if previous else []
        first = opened.index if opened else 1 + max((shard_index(e["name"]) for e in previous_names), default=-1)
        writers[split] = _SplitWriter(staging, split, config, first_index=first, continues=opened is not None)
    for shard in plan:
        kept = int(shard.keep.sum())
        if shard is open_shards.get(shard.split):
            writers[shard.split].add(_stored_rows(shard, shard.keep))
        elif kept == len(shard.keep):
            _link_or_copy(shard.path, staging / shard.entry["name"])
            writers[shard.split].carry(shard.entry, shard.clusters)
            build["shards"]["reused"] += 1
            build["files"]["reused"] += kept
            build["tokens"]["reused"] += shard.kept_tokens
            continue
        elif kept:
            rewrite = _SplitWriter(staging, shard.split, replace(config, shard_tokens=UNBOUNDED_TOKENS),
                                   first_index=shard.index)
            rewrite.add(_stored_rows(shard, shard.keep))
            writers[shard.split].carry(*rewrite.close_single())
        else:
            build["shards"]["removed"] += 1
            continue
        build["shards"]["rewritten"] += 1
        build["files"]["copied"] += kept
        build["tokens"]["copied"] += shard.kept_tokens
    for shard in plan:  # after every open shard's rows, so each split's rows keep one order
        if shard.move.any():
            rows = _stored_rows(shard, shard.move)
            clusters = pa.array([cluster_of[f] for f in rows["file_id"].to_pylist()], pa.string())
            _route(rows.set_column(1, "cluster_id", clusters), split_of, writers)
            build["files"]["copied"] += rows.num_rows
            build["tokens"]["copied"] += int(pc.sum(rows["n_tokens"]).as_py() or 0)
    return writers


def _open_shard(plan: list[_PreviousShard], split: str, config: ShardConfig) -> _PreviousShard | None:
    """The split's last previous shard if new rows can fill it: it keeps rows and is under shard_tokens."""
    in_split = [shard for shard in plan if shard.split == split]
    last = in_split[-1] if in_split else None
    return last if last and last.keep.any() and last.kept_tokens < config.shard_tokens else None


def _stored_rows(shard: _PreviousShard, mask: np.ndarray) -> pa.Table:
    """The masked rows of a previous shard, ids and all, as the writer takes them."""
    rows = pq.read_table(shard.path, columns=list(SHARD_SCHEMA.names)).cast(SHARD_SCHEMA)
    return rows.filter(pa.array(mask, pa.bool_()))


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link shares the previous set's bytes; a copy where the filesystem refuses links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# -- tokenize -------------------------------------------------------------------------------


def _note_row_groups(
    notes_dir: Path, cluster_of: dict[str, str], metadata: dict[str, dict]
) -> Iterator[tuple[Path, list[int], dict[str, dict]]]:
    """(part, row groups, {file_id: prefix metadata}) of about TASK_FILES wanted files each, for every
    midi_notes row group holding wanted files.

    Only file ids are read here, once per part: the workers read the notes themselves, so no
    note data passes through this process, and each opens a part (its footer) once per task.
    """
    if not cluster_of:
        return
    for part in part_files(notes_dir):
        parquet = pq.ParquetFile(part)
        file_ids = parquet.read(columns=["file_id"])["file_id"].to_pylist()
        groups: list[int] = []
        wanted: dict[str, dict] = {}
        start = 0
        for group in range(parquet.num_row_groups):
            end = start + parquet.metadata.row_group(group).num_rows
            chosen = {fid: metadata.get(fid, {}) for fid in file_ids[start:end] if fid in cluster_of}
            start = end
            if chosen:
                groups.append(group)
                wanted |= chosen
            if len(wanted) >= TASK_FILES:
                yield part, groups, wanted
                groups, wanted = [], {}
        if wanted:
            yield part, groups, wanted


def _in_workers(fn: Callable, jobs: Iterable[tuple], workers: int) -> Iterator:
    """``fn(*job)`` for every job, in job order, with at most two jobs per worker in flight."""
    if workers <= 1:
        for job in jobs:
            yield fn(*job)
        return
    in_flight: deque = deque()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for job in jobs:
            in_flight.append(pool.submit(fn, *job))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


@cache
def _tokenizer() -> AbsTokenizer:
    """One tokenizer per process: its lookup tables are built on first use."""
    return AbsTokenizer()


def _tokenize_row_groups(part: Path, groups: list[int], wanted: dict[str, dict]) -> tuple[pa.Table, list[dict]]:
    """(file_id, ids, n_tokens) of the wanted rows; a file the tokenizer rejects is reported, not raised."""
    notes = pq.ParquetFile(part).read_row_groups(groups, columns=[*NOTE_SCALAR_COLUMNS, *NOTE_LIST_COLUMNS])
    file_ids = notes["file_id"].to_pylist()
    notes = notes.filter(pa.array([fid in wanted for fid in file_ids]))
    try:
        return _tokenize_together(notes, wanted), []
    except Exception:  # some file the tokenizer rejects: the row by row path tells which
        return _tokenize_rows(notes, wanted)


def _tokenize_together(notes: pa.Table, wanted: dict[str, dict]) -> pa.Table:
    """The ids of every row in one ``tokenize_ids_many`` call, fed straight from the note columns."""
    tokenizer = _tokenizer()
    file_ids = notes["file_id"].to_pylist()
    if not file_ids:
        return _ids_table([], [])
    onset, duration, offsets = notes_ms(notes)
    pitch, velocity, instrument, channel = (list_values(notes[name])[0]
                                            for name in ("pitch", "velocity", "instrument", "channel"))
    prefix_of: dict[tuple, np.ndarray] = {}  # a row group's files share a few instrument sets and metadata
    prefixes = []
    for file_id, instruments in zip(file_ids, notes["instruments"].to_pylist()):
        metadata = wanted[file_id]
        key = (tuple(instruments), prefix_key(metadata))
        if key not in prefix_of:
            prefix_of[key] = tokenizer.prefix_ids(key[0], metadata)
        prefixes.append(prefix_of[key])
    ids, id_offsets = tokenizer.tokenize_ids_many(onset, duration, pitch, velocity, instrument, channel, offsets,
                                                  prefixes)
    return pa.table({
        "file_id": pa.array(file_ids, pa.string()),
        "ids": pa.ListArray.from_arrays(pa.array(id_offsets.astype(np.int32)), pa.array(ids)),
        "n_tokens": pa.array(np.diff(id_offsets).astype(np.int32)),
    })


def _tokenize_rows(notes: pa.Table, wanted: dict[str, dict]) -> tuple[pa.Table, list[dict]]:
    """``tokenize_ids(performance_from_row(row))`` row by row: the reference ``_tokenize_together``
    must equal, and what names the files the tokenizer rejects."""
    tokenizer = _tokenizer()
    file_ids, ids, failures = [], [], []
    for row in _note_rows(notes):
        try:
            ids.append(tokenizer.tokenize_ids(performance_from_row(row, wanted[row["file_id"]])))
            file_ids.append(row["file_id"])
        except Exception as exc:  # one bad file must not stop the corpus; its reason goes to the manifest
            failures.append({"file_id": row["file_id"], "error": f"{type(exc).__name__}: {exc}"})
    return _ids_table(file_ids, ids), failures


def notes_performances(notes_dir: str | Path, file_ids: Iterable[str] | None = None) -> Iterator[tuple[str, Performance]]:
    """``(file_id, Performance)`` of the ``midi_notes`` rows (all, or those in ``file_ids``), in table order.

    The corpus is embedded from the notes table rather than re-parsing its MIDI files.
    """
    wanted = set(file_ids) if file_ids is not None else None
    for part in part_files(Path(notes_dir)):
        parquet = pq.ParquetFile(part)
        for group in range(parquet.num_row_groups):
            if wanted is not None:
                ids = parquet.read_row_group(group, columns=["file_id"])["file_id"].to_pylist()
                if not wanted.intersection(ids):
                    continue
            table = parquet.read_row_group(group, columns=[*NOTE_SCALAR_COLUMNS, *NOTE_LIST_COLUMNS])
            for row in _note_rows(table):
                if wanted is None or row["file_id"] in wanted:
                    yield row["file_id"], performance_from_row(row)


def _note_rows(notes: pa.Table) -> Iterator[dict]:
    """Rows as dicts whose note lists are numpy views: far cheaper than ``to_pylist`` on long lists."""
    lists = {name: list_values(notes[name]) for name in NOTE_LIST_COLUMNS}
    for i, row in enumerate(notes.select(list(NOTE_SCALAR_COLUMNS)).to_pylist()):
        yield row | {name: values[offsets[i] : offsets[i + 1]] for name, (values, offsets) in lists.items()}


def _ids_table(file_ids: list[str], ids: list[np.ndarray]) -> pa.Table:
    lengths = np.array([len(x) for x in ids], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(ids).astype(np.uint16) if ids else np.zeros(0, np.uint16)
    return pa.table({
        "file_id": pa.array(file_ids, pa.string()),
        "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "n_tokens": pa.array(lengths),
    })


def _shard_rows(ids: pa.Table, cluster_of: dict[str, str], prefix_of: dict[str, str]) -> pa.Table:
    """Tokenized rows with their cluster and prefix metadata, in the shard schema."""
    file_ids = ids["file_id"].to_pylist()
    return pa.table({
        "file_id": ids["file_id"], "cluster_id": pa.array([cluster_of[f] for f in file_ids], pa.string()),
        "ids": ids["ids"], "n_tokens": ids["n_tokens"],
        "prefix_metadata": pa.array([prefix_of[f] for f in file_ids], pa.string()),
    }, schema=SHARD_SCHEMA)


def _route(rows: pa.Table, split_of: dict[str, str], writers: dict) -> None:
    """Send each row to its cluster's split."""
    if not rows.num_rows:
        return
    splits = np.array([split_of[c] for c in rows["cluster_id"].to_pylist()])
    for split, writer in writers.items():
        writer.add(rows.filter(pa.array(splits == split)))


class _SplitWriter:
    """Rows of one split into ``<split>/shard-NNNNN.parquet`` files of whole row groups.

    Shards are numbered from ``first_index``; shards carried over from the previous
    set (or rewritten apart) are listed beside them with ``carry``.
    """

    def __init__(self, staging: Path, split: str, config: ShardConfig, first_index: int = 0, continues: bool = False):
        self.folder = staging / split
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split, self.config = split, config
        self.next_index = first_index
        self.continues = continues  # the first shard written is the previous set's open shard, extended
        self.pending: list[pa.Table] = []
        self.pending_tokens = 0
        self.writer: pq.ParquetWriter | None = None
        self.shard: dict = {}
        self.shards: list[dict] = []  # written here
        self.carried: list[dict] = []  # written elsewhere
        self.clusters: set[str] = set()

    def add(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        self.pending.append(rows)
        self.pending_tokens += int(pc.sum(rows["n_tokens"]).as_py())
        self.clusters.update(rows["cluster_id"].to_pylist())
        while self.pending_tokens >= self.config.row_group_tokens:
            self._write_full_group()

    def carry(self, entry: dict, clusters: Iterable[str]) -> None:
        self.carried.append(entry)
        self.clusters.update(clusters)

    @property
    def new_shards(self) -> int:
        return len(self.shards) - (1 if self.continues and self.shards else 0)

    def close(self) -> dict:
        """Write what is left and describe the split for the manifest."""
        if self.pending_tokens:
            self._write_group(pa.concat_tables(self.pending))
            self.pending, self.pending_tokens = [], 0
        self._close_shard()
        shards = sorted(self.carried + self.shards, key=lambda shard: shard["name"])
        return {
            "files": sum(s["rows"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "clusters": len(self.clusters),
            "shards": shards,
        }

    def close_single(self) -> tuple[dict, set[str]]:
        """Close a writer that wrote one shard: (its manifest entry, its clusters)."""
        self.close()
        (entry,) = self.shards
        return entry, self.clusters

    def _write_full_group(self) -> None:
        """Cut the buffered rows right after the row that reaches ``row_group_tokens``."""
        rows = pa.concat_tables(self.pending)
        reached = np.cumsum(rows["n_tokens"].to_numpy())
        cut = int(np.searchsorted(reached, self.config.row_group_tokens)) + 1
        self._write_group(rows.slice(0, cut))
        self.pending = [rows.slice(cut)]
        self.pending_tokens = int(reached[-1] - reached[cut - 1])

    def _write_group(self, rows: pa.Table) -> None:
        if self.writer is None:
            self._open_shard()
        # One chunk per column: the bytes then depend on the rows only, not on how they arrived.
        self.writer.write_table(rows.combine_chunks(), row_group_size=rows.num_rows)
        self.shard["rows"] += rows.num_rows
        self.shard["tokens"] += int(pc.sum(rows["n_tokens"]).as_py())
        self.shard["row_groups"] += 1
        if self.shard["tokens"] >= self.config.shard_tokens:
            self._close_shard()

    def _open_shard(self) -> None:
        name = f"{self.split}/shard-{self.next_index:05d}.parquet"
        self.next_index += 1
        self.writer = pq.ParquetWriter(self.folder.parent / name, SHARD_SCHEMA, **SHARD_WRITE_OPTIONS)
        self.shard = {"name": name, "rows": 0, "tokens": 0, "row_groups": 0}

    def _close_shard(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        self.shard["sha256"] = sha256_file(self.folder.parent / self.shard["name"])
        self.shards.append(self.shard)


def input_digests(inputs: ShardInputs) -> dict[str, str]:
    """What the shards were built from. midi_notes parts are immutable and named by the
    digest of their file_ids, so their names and sizes identify the notes table."""
    parts = "\n".join(f"{p.name}:{p.stat().st_size}" for p in part_files(inputs.notes_dir))
    return {
        "midi_notes": hashlib.sha256(parts.encode()).hexdigest(),
        "raw_midi_manifest": sha256_file(inputs.raw_manifest),
        "opus_dedup": sha256_file(inputs.dedup),
        "quality_filter": sha256_file(inputs.quality),
    }


def set_id(manifest: dict) -> str:
    """A digest of the set's content: the manifest less ``build`` (how it was made is not what it is)."""
    content = {key: value for key, value in manifest.items() if key != "build"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# -- publish: staging folder + symlink swap ---------------------------------------------


def _sets_folder(root: Path) -> Path:
    """Hidden sibling holding every shard set; ``root`` links to the current one."""
    return root.parent / f".{root.name}"


@contextmanager
def _staging_folder(root: Path) -> Iterator[Path]:
    """A fresh hidden folder for the new set, removed if the block fails before publishing."""
    if root.exists() and not root.is_symlink():
        raise ShardError(f"{root} is a plain folder, not a link to a shard set; move it away to publish")
    sets = _sets_folder(root)
    sets.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(sets)
    staging = sets / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_abandoned_staging(sets: Path) -> None:
    """What writers killed mid-write left (a staging folder, a temp link) is never published."""
    for leftover in [*sets.glob(".staging-*"), *sets.glob(".link-*")]:
        pid = int(leftover.name.rsplit("-", 1)[1])
        if pid == os.getpid() or _process_alive(pid):
            continue
        if leftover.is_symlink():
            leftover.unlink()
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return True


def _publish(staging: Path, root: Path, set_id: str) -> None:
    """Name the staged set by its content digest and point ``root`` at it in one rename."""
    sets = _sets_folder(root)
    final = sets / set_id
    previous = os.readlink(root) if root.is_symlink() else None
    if final.exists():  # an unchanged rerun: the same shards are already published (the staged
        shutil.rmtree(staging)  # copies of carried shards are links: removing them leaves the bytes)
    else:
        os.rename(staging, final)
    link = sets / f".link-{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(os.path.join(sets.name, set_id), link)
    os.replace(link, root)
    _prune_sets(sets, keep={set_id, Path(previous).name if previous else set_id})


def _prune_sets(sets: Path, keep: set[str]) -> None:
    """Drop sets older than the previous one; the previous stays for readers still in it."""
    for folder in sets.iterdir():
        if not folder.name.startswith(".") and folder.name not in keep:
            shutil.rmtree(folder)


# -- read ---------------------------------------------------------------------------------


def read_manifest(root: Path) -> dict:
    return json.loads((Path(root) / MANIFEST_FILE).read_text())


def shard_paths(root: Path, split: str) -> list[Path]:
    """The shard files of one split, in manifest order, resolved into the current set."""
    root = Path(root).resolve()
    return [root / shard["name"] for shard in read_manifest(root)["splits"][split]["shards"]]


def clusters_in_several_splits(root: Path) -> list[str]:
    """Cluster ids that occur in more than one split (should be none)."""
    seen: dict[str, str] = {}
    shared = set()
    for split in SPLITS:
        for path in shard_paths(root, split):
            for cluster in set(pq.read_table(path, columns=["cluster_id"])["cluster_id"].to_pylist()):
                if seen.setdefault(cluster, split) != split:
                    shared.add(cluster)
    return sorted(shared)


def checksum_mismatches(root: Path) -> list[str]:
    """Shards whose bytes differ from the manifest's sha256, and files the manifest does not list."""
    root = Path(root).resolve()
    listed = {shard["name"]: shard["sha256"] for split in read_manifest(root)["splits"].values()
              for shard in split["shards"]}
    problems = [f"{name}: missing" for name in listed if not (root / name).exists()]
    problems += [f"{name}: sha256 differs" for name, digest in listed.items()
                 if (root / name).exists() and sha256_file(root / name) != digest]
    on_disk = {str(p.relative_to(root)) for p in root.glob("*/*.parquet")}
    problems += [f"{name}: not in the manifest" for name in sorted(on_disk - listed.keys())]
    return problems
