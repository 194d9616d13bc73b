"""Labeled probe datasets: which file carries which label, and whether it trains or tests the probe.

A probe dataset is one row per (task, file): ``task, file_id, path, label, split, cluster_id``
(``PROBE_SCHEMA``), plus a content hash of (task, file_id, label, split) for lineage. Two ways in:

1. Tasks on the demo corpus's real labels (``build_demo_probe_dataset``), from its
   ``demo_metadata.json`` (reference/realdata.md):

       task        class          pieces
       style       bach           the Bach chorales
                   palestrina     the Palestrina mass movements
                   irish          ryansMammoth + oneills1850 (Irish and Scottish tunes)
                   german_folk    essenFolksong songs whose ABC origin (O:) names Deutschland
       tune_type   reel, jig, hornpipe, strathspey   the ABC R: field of ryansMammoth + oneills1850

   ``DemoTask.preset(name, more_classes=True)`` adds Luxembourg and Lorraine folk songs to
   ``style`` and slip jig and clog to ``tune_type``. A piece that matches no class (an Essen song
   from China, an O'Neill air) is left out; one that matches two (an Essen origin naming both
   Deutschland and Lothringen) is left out as ambiguous; both are counted in the task's report.

   Pieces per class, by ``DemoCorpusConfig.pieces_per_collection`` (music21 10.5.1, seed 0; 80 and
   400 as built here, after identical files are merged; tiny and full from the corpus listing):

       pieces_per_collection   bach  palestrina  irish  german_folk   reel  jig  hornpipe  strathspey
       3 (tiny)                   3           3      6            1      2    1         0           1
       80 (demo, the default)    80          80    160           41     60   27        18           2
       400                      400         399    799          245    253  138       115          22
       None (full)              410        1318   2906         5296    715  485       399          49

   Two pairs of demo files are byte-identical (Palestrina's Agnus_II_52/53, Ryan's "Higgins Best
   Hornpipe"/"Picnic Reel"): one file is one piece here, whatever its names.

   realdata.md asks for at least 100 pieces per class (``TARGET_PER_CLASS``): the default demo
   preset gives no class of either task that many except ``irish``; ``pieces_per_collection=400``
   gives every style class and reel/jig/hornpipe; strathspey never reaches 100 (49 in the whole
   corpus). The report of each task lists the count per class and the classes below the target,
   and classes below ``min_per_class`` are dropped (never padded, never relabelled).

2. User splits in Aria's eval-splits layout (``read_eval_splits``): a ``metadata.json``
   ``{category: {split: {relpath: label}}}`` with paths relative to a root folder; each category
   becomes a task and the splits are kept as given (reference/aria.md §7.1).

Splits are by piece: every file of a dedup cluster (``opus_dedup``'s ``cluster_id``; a file
without one is its own cluster) lands in the same split, so the probe is never tested on another
performance of a piece it was trained on. Within each class the clusters are ordered by a hash of
``seed:cluster_id`` and taken for test until the class's test share reaches ``test_fraction``:
class-stratified, reproducible, and independent of the order the files are listed in.

Trivial cues. A label must not be readable off what the file format or the converter decides
rather than the music. ``file_cues`` lists such properties of a file (ticks per beat, instruments,
tempo map, channels, the set of velocities) and ``cue_report`` measures, per cue, the share of a
task's pieces whose cue value occurs in one class only. On the demo corpus ticks per beat (10080),
instruments (piano), channels (one) and tempo changes are the same for every collection, but the
velocities are not: they are flat (90) except the accent marks that only the ABC collections
write (96, 109): 57 + 6 of the 160 Irish tunes of the default preset have them, no other piece
does. A linear probe on the velocity mean and standard deviation alone does no better than the
majority class (measured: 0.434 = majority on style at 400 pieces per collection), but a model
that sees every note's velocity could read "accent, so Irish" off them; the velocity features stay
out of a demo-corpus probe (``aria_model.features.feature_columns(exclude=("velocity",))``), and
the same cue reaches Aria's tokens until the demo corpus writes flat velocities. A few Bach
chorales carry an editor's metronome mark (first tempo other than 120 bpm: 2 % of the pieces):
real score content, reported by ``cue_report``, too rare to matter.

    dataset = build_demo_probe_dataset(demo_dir, clusters=read_clusters(home / "opus_dedup" / "dedup.parquet"))
    print(dataset.describe())
    write_probe_dataset(dataset, home / "probe_dataset" / "probe_dataset.parquet")
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aria_model.atomic_io import write_parquet_atomic
from aria_model.midi import INSTRUMENTS, Performance, load_midi
from aria_model.shards import notes_performances
from aria_model.sources import DEMO_METADATA_FILE, sha256_file

logger = logging.getLogger(__name__)

TRAIN, TEST = "train", "test"
TARGET_PER_CLASS = 100  # realdata.md: at least 100 pieces per class for a probe task worth reading
EVAL_SPLITS_METADATA_FILE = "metadata.json"
SEED = 42  # Aria's make_eval_split seed (reference/aria.md §7.1)
CONTENT_HASH_KEY = b"probe_content_hash"
REPORTS_KEY = b"probe_task_reports"

PROBE_SCHEMA = pa.schema([
    pa.field("task", pa.string(), nullable=False),
    pa.field("file_id", pa.string(), nullable=False),  # sha256 of the file, as in the manifest
    pa.field("path", pa.string(), nullable=False),  # absolute, where the file was read
    pa.field("label", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("cluster_id", pa.string(), nullable=False),  # dedup cluster, or the file_id itself
])

IRISH_COLLECTIONS = ("ryansMammoth", "oneills1850")


class ProbeDataError(ValueError):
    """Labels or splits that cannot make a probe dataset."""


@dataclass(frozen=True)
class ClassRule:
    """Which demo pieces form a class: one of ``collections`` and, optionally, a label field's value.

    ``label_key`` is a key of the piece's labels in ``demo_metadata.json`` (``tune_type``, ``origin``);
    ``equals`` compares exactly, ``contains`` case-insensitively as a substring.
    """

    collections: tuple[str, ...]
    label_key: str | None = None
    equals: str | None = None
    contains: str | None = None

    def matches(self, labels: Mapping) -> bool:
        if labels.get("collection") not in self.collections:
            return False
        if self.label_key is None:
            return True
        value = labels.get(self.label_key)
        if not isinstance(value, str):
            return False
        if self.equals is not None and value != self.equals:
            return False
        return self.contains is None or self.contains.lower() in value.lower()


STYLE_CLASSES = {
    "bach": ClassRule(("bach",)),
    "palestrina": ClassRule(("palestrina",)),
    "irish": ClassRule(IRISH_COLLECTIONS),
    # Historical German regions (Schlesien, Boehmen, ...) are written under Deutschland in Essen's O:.
    "german_folk": ClassRule(("essenFolksong",), "origin", contains="deutschland"),
}
MORE_STYLE_CLASSES = {
    # In the whole corpus: 620 and 571 songs, and 106 whose origin names Deutschland and
    # Lothringen (ambiguous, left out, once these classes are on).
    "luxembourg_folk": ClassRule(("essenFolksong",), "origin", contains="luxemburg"),
    "lorraine_folk": ClassRule(("essenFolksong",), "origin", contains="lothringen"),
}
TUNE_TYPES = ("reel", "jig", "hornpipe", "strathspey")
MORE_TUNE_TYPES = ("slip jig", "clog")  # 78 and 37 in the whole corpus


@dataclass(frozen=True)
class DemoTask:
    """A probe task on the demo corpus: its classes and how few pieces a class may have."""

    name: str
    classes: tuple[tuple[str, ClassRule], ...]  # (label, rule), pairs so the task stays hashable
    min_per_class: int = 20  # fewer: the class is dropped (a 0.2 test share leaves ~4 pieces)
    max_per_class: int | None = None  # cap per class (seeded choice), e.g. for balanced classes

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple((label, rule) for label, rule in dict(self.classes).items()))
        if not self.classes:
            raise ValueError(f"task {self.name!r} has no classes")
        if self.min_per_class < 2:
            raise ValueError("min_per_class must be at least 2 (one train and one test piece)")

    @classmethod
    def preset(cls, name: str, more_classes: bool = False, **overrides) -> DemoTask:
        if name == "style":
            classes = STYLE_CLASSES | (MORE_STYLE_CLASSES if more_classes else {})
        elif name == "tune_type":
            tune_types = TUNE_TYPES + (MORE_TUNE_TYPES if more_classes else ())
            classes = {t: ClassRule(IRISH_COLLECTIONS, "tune_type", equals=t) for t in tune_types}
        else:
            raise ValueError(f"unknown demo task {name!r}; known: ['style', 'tune_type']")
        return cls(name, tuple(classes.items()), **overrides)

    def label_of(self, labels: Mapping) -> str | None | tuple[str, ...]:
        """The class of a piece: its label, None when no class matches, all matches when several do."""
        matched = tuple(label for label, rule in self.classes if rule.matches(labels))
        if len(matched) == 1:
            return matched[0]
        return matched or None


DEMO_TASKS = ("style", "tune_type")


@dataclass
class TaskReport:
    """What building one task found: pieces per class and split, and what was left out and why."""

    task: str
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> pieces/train/test
    dropped_classes: dict[str, int] = field(default_factory=dict)  # label -> pieces, under min_per_class
    capped_classes: dict[str, int] = field(default_factory=dict)  # label -> pieces before max_per_class
    unlabeled: int = 0  # pieces no class matches
    ambiguous: int = 0  # pieces several classes match
    duplicate_files: int = 0  # same content listed twice with one label: kept once
    conflicting_files: int = 0  # same content listed with different labels: dropped
    missing_files: int = 0  # listed but not on disk (user splits, missing="skip")
    clusters_in_several_splits: int = 0  # given splits only; a built split never has any
    mixed_label_clusters: int = 0  # dedup clusters holding pieces of several classes
    target_per_class: int = TARGET_PER_CLASS

    @property
    def below_target(self) -> list[str]:
        return [label for label, counts in self.classes.items() if counts["pieces"] < self.target_per_class]

    def describe(self) -> str:
        per_class = ", ".join(
            f"{label} {c['pieces']} ({c.get(TRAIN, 0)} train / {c.get(TEST, 0)} test)"
            for label, c in self.classes.items()
        )
        lines = [f"{self.task}: {per_class or 'no class'}"]
        if self.below_target:
            lines.append(f"  below {self.target_per_class} pieces per class: {', '.join(self.below_target)}")
        if self.dropped_classes:
            lines.append(f"  dropped (too few pieces): {self.dropped_classes}")
        left_out = {name: value for name, value in (
            ("unlabeled", self.unlabeled), ("ambiguous", self.ambiguous),
            ("duplicate content", self.duplicate_files), ("conflicting", self.conflicting_files),
            ("missing", self.missing_files), ("capped", sum(self.capped_classes.values())),
        ) if value}
        if left_out:
            lines.append(f"  left out: {left_out}")
        if self.clusters_in_several_splits:
            lines.append(f"  WARNING: {self.clusters_in_several_splits} clusters are in several splits")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return asdict(self) | {"below_target": self.below_target}


@dataclass(frozen=True)
class ProbeDataset:
    """Probe rows (``PROBE_SCHEMA``) of one or more tasks, with what building them found."""

    table: pa.Table
    reports: dict[str, TaskReport]

    @property
    def content_hash(self) -> str:
        return content_hash(self.table)

    @property
    def tasks(self) -> list[str]:
        return sorted(set(self.table["task"].to_pylist()))

    def rows(self, task: str, split: str | None = None) -> list[dict]:
        return [
            row for row in self.table.to_pylist()
            if row["task"] == task and (split is None or row["split"] == split)
        ]

    def describe(self) -> str:
        return "\n".join(self.reports[task].describe() for task in self.reports)

    def paths(self) -> dict[str, str]:
        """{file_id: path} of every probe file (a file in several tasks once)."""
        return dict(zip(self.table["file_id"].to_pylist(), self.table["path"].to_pylist()))


def probe_performances(notes_dir: str | Path, paths: Mapping[str, str],
                       unreadable: dict[str, str]) -> Iterator[tuple[str, Performance]]:
    """``(file_id, Performance)`` of {file_id: path}: from the ``midi_notes`` table (the notes the
    models trained on), else parsed from the file (eval files the corpus does not hold). A file
    that is in neither and cannot be parsed is left out and put in ``unreadable`` with the reason."""
    found = set()
    for file_id, perf in notes_performances(notes_dir, paths):
        found.add(file_id)
        yield file_id, perf
    for file_id in sorted(set(paths) - found):
        try:
            perf = load_midi(paths[file_id])
        except Exception as exc:  # one bad eval file must not stop the others; the reason is kept
            unreadable[file_id] = f"{paths[file_id]}: {type(exc).__name__}: {exc}"
            continue
        yield file_id, perf


# ---------------------------------------------------------------------------------------------
# Demo corpus tasks


def build_demo_probe_dataset(
    demo_dir: str | Path,
    tasks: Iterable[DemoTask | str] = DEMO_TASKS,
    clusters: Mapping[str, str] | None = None,
    test_fraction: float = 0.2,
    seed: int = SEED,
) -> ProbeDataset:
    """Probe rows of ``tasks`` on the demo corpus in ``demo_dir`` (its ``demo_metadata.json``).

    ``clusters``: file_id -> cluster_id from ``opus_dedup`` (``read_clusters``); files it does not
    list are their own cluster.
    """
    root = Path(demo_dir).resolve()
    pieces = _demo_pieces(root)
    file_ids = {relpath: sha256_file(root / relpath) for relpath in pieces}
    tables, reports = [], {}
    for task in tasks:
        task = DemoTask.preset(task) if isinstance(task, str) else task
        table, report = _demo_task_rows(root, pieces, file_ids, task, clusters or {}, test_fraction, seed)
        logger.info("%s", report.describe())
        tables.append(table)
        reports[task.name] = report
    return _dataset(tables, reports)


def _demo_pieces(root: Path) -> dict[str, dict]:
    metadata_path = root / DEMO_METADATA_FILE
    if not metadata_path.is_file():
        raise ProbeDataError(f"no {DEMO_METADATA_FILE} in {root}: not a demo corpus")
    pieces = json.loads(metadata_path.read_text(encoding="utf-8")).get("pieces")
    if not isinstance(pieces, dict):
        raise ProbeDataError(f'{metadata_path}: expected {{"pieces": {{relpath: labels}}}}')
    return pieces


def _demo_task_rows(
    root: Path, pieces: dict[str, dict], file_ids: dict[str, str], task: DemoTask,
    clusters: Mapping[str, str], test_fraction: float, seed: int,
) -> tuple[pa.Table, TaskReport]:
    report = TaskReport(task.name)
    labelled = []
    for relpath in sorted(pieces):
        label = task.label_of(pieces[relpath])
        if label is None:
            report.unlabeled += 1
        elif isinstance(label, tuple):
            report.ambiguous += 1
        else:
            labelled.append((file_ids[relpath], str(root / relpath), label))
    entries = _unique_files(labelled, report)
    counts = Counter(label for _, label in entries.values())
    # Every class of the task is reported, also one with no piece at all, so a missing class shows.
    for label, _ in task.classes:
        if counts[label] < task.min_per_class:
            report.dropped_classes[label] = counts[label]
    entries = {fid: entry for fid, entry in entries.items() if entry[1] not in report.dropped_classes}
    if task.max_per_class is not None:
        entries = _capped(entries, task.max_per_class, seed, report)
    labels = {file_id: label for file_id, (_, label) in entries.items()}
    split = stratified_cluster_split(labels, clusters, test_fraction, seed, report)
    rows = [
        {"task": task.name, "file_id": file_id, "path": path, "label": label, "split": split[file_id],
         "cluster_id": clusters.get(file_id, file_id)}
        for file_id, (path, label) in entries.items()
    ]
    _count_classes(report, rows, order=[label for label, _ in task.classes])
    return pa.Table.from_pylist(rows, PROBE_SCHEMA), report


def _unique_files(labelled: list[tuple[str, str, str]], report: TaskReport) -> dict[str, tuple[str, str]]:
    """file_id -> (path, label), one entry per content: the same bytes twice are one piece."""
    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for file_id, path, label in labelled:
        by_file[file_id].append((path, label))
    unique = {}
    for file_id, entries in by_file.items():
        if len({label for _, label in entries}) > 1:
            report.conflicting_files += len(entries)
            continue
        report.duplicate_files += len(entries) - 1
        unique[file_id] = entries[0]
    return unique


def _capped(entries: dict[str, tuple[str, str]], cap: int, seed: int, report: TaskReport) -> dict[str, tuple[str, str]]:
    by_label: dict[str, list[str]] = defaultdict(list)
    for file_id in sorted(entries, key=lambda fid: _draw(seed, fid)):
        by_label[entries[file_id][1]].append(file_id)
    kept = {}
    for label, file_ids in by_label.items():
        if len(file_ids) > cap:
            report.capped_classes[label] = len(file_ids)
        kept.update({file_id: entries[file_id] for file_id in file_ids[:cap]})
    return kept


def _draw(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


# ---------------------------------------------------------------------------------------------
# Split


def stratified_cluster_split(
    labels: Mapping[str, str],
    clusters: Mapping[str, str] | None = None,
    test_fraction: float = 0.2,
    seed: int = SEED,
    report: TaskReport | None = None,
) -> dict[str, str]:
    """file_id -> "train"/"test": whole clusters per split, about ``test_fraction`` of each class.

    A cluster belongs to the class most of its files have (ties: the first label in sorted
    order). Within a class, clusters are taken for test in the order of sha256(seed:cluster_id)
    while they fit under round(test_fraction x files); a class of two or more clusters always
    keeps at least one in each split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    clusters = clusters or {}
    members: dict[str, list[str]] = defaultdict(list)
    for file_id in labels:
        members[clusters.get(file_id, file_id)].append(file_id)
    clusters_of_class: dict[str, list[str]] = defaultdict(list)
    for cluster_id, file_ids in members.items():
        votes = Counter(labels[file_id] for file_id in file_ids)
        if report is not None and len(votes) > 1:
            report.mixed_label_clusters += 1
        top = max(votes.values())
        clusters_of_class[min(label for label, n in votes.items() if n == top)].append(cluster_id)

    test_clusters = set()
    for cluster_ids in clusters_of_class.values():
        ordered = sorted(cluster_ids, key=lambda cluster_id: _draw(seed, cluster_id))
        target = round(test_fraction * sum(len(members[c]) for c in ordered))
        taken = []
        for cluster_id in ordered:
            if sum(len(members[c]) for c in taken) + len(members[cluster_id]) <= target:
                taken.append(cluster_id)
        if not taken and len(ordered) > 1:
            taken = [min(ordered[:-1], key=lambda c: len(members[c]))]
        test_clusters.update(taken)
    return {
        file_id: TEST if clusters.get(file_id, file_id) in test_clusters else TRAIN
        for file_id in labels
    }


def read_clusters(dedup_path: str | Path) -> dict[str, str]:
    """file_id -> cluster_id from ``opus_dedup``'s Parquet (``<ARIA_HOME>/opus_dedup/dedup.parquet``)."""
    table = pq.read_table(dedup_path, columns=["file_id", "cluster_id"])
    return dict(zip(table["file_id"].to_pylist(), table["cluster_id"].to_pylist()))


def clusters_in_several_splits(table: pa.Table) -> dict[str, list[str]]:
    """task -> the cluster ids that have files in more than one split (empty lists are left out)."""
    splits_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for task, cluster_id, split in zip(table["task"].to_pylist(), table["cluster_id"].to_pylist(),
                                       table["split"].to_pylist()):
        splits_of[(task, cluster_id)].add(split)
    crossing: dict[str, list[str]] = defaultdict(list)
    for (task, cluster_id), splits in sorted(splits_of.items()):
        if len(splits) > 1:
            crossing[task].append(cluster_id)
    return dict(crossing)


# ---------------------------------------------------------------------------------------------
# User splits: Aria's eval-splits layout


def read_eval_splits(
    root: str | Path,
    metadata_path: str | Path | None = None,
    clusters: Mapping[str, str] | None = None,
    missing: str = "error",
) -> ProbeDataset:
    """Probe rows from ``{category: {split: {relpath: label}}}`` (default ``<root>/metadata.json``).

    Each category is a task; splits and labels are kept exactly as given. A listed file that is
    not under ``root`` raises (``missing="error"``) or is left out and counted (``"skip"``).
    Clusters that the given splits put in several splits are counted in the report, not moved.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    root = Path(root).resolve()
    metadata_path = Path(metadata_path) if metadata_path is not None else root / EVAL_SPLITS_METADATA_FILE
    categories = _eval_splits_metadata(metadata_path)
    clusters = clusters or {}
    file_ids: dict[str, str] = {}
    tables, reports = [], {}
    for category, splits in sorted(categories.items()):
        report = TaskReport(category)
        labelled: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # split -> entries
        absent = []
        for split, files in sorted(splits.items()):
            for relpath, label in sorted(files.items()):
                path = root / relpath
                if not path.is_file():
                    absent.append(relpath)
                    continue
                if relpath not in file_ids:
                    file_ids[relpath] = sha256_file(path)
                labelled[split].append((file_ids[relpath], str(path), str(label)))
        if absent and missing == "error":
            raise ProbeDataError(
                f"{metadata_path}: {len(absent)} files of {category!r} are not under {root}, e.g. {absent[:3]}"
            )
        report.missing_files = len(absent)
        rows = []
        for split, entries in labelled.items():
            for file_id, (path, label) in _unique_files(entries, report).items():
                rows.append({"task": category, "file_id": file_id, "path": path, "label": label,
                             "split": split, "cluster_id": clusters.get(file_id, file_id)})
        table = pa.Table.from_pylist(rows, PROBE_SCHEMA)
        report.clusters_in_several_splits = len(clusters_in_several_splits(table).get(category, []))
        _count_classes(report, rows, order=sorted({row["label"] for row in rows}))
        if report.clusters_in_several_splits:
            logger.warning("%s", report.describe())
        tables.append(table)
        reports[category] = report
    return _dataset(tables, reports)


def _eval_splits_metadata(path: Path) -> dict[str, dict[str, dict[str, str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProbeDataError(f"{path}: cannot read eval splits: {error}") from error
    shape_ok = isinstance(data, dict) and all(
        isinstance(splits, dict) and all(
            isinstance(files, dict) and all(isinstance(label, (str, int)) for label in files.values())
            for files in splits.values()
        )
        for splits in data.values()
    )
    if not shape_ok:
        raise ProbeDataError(f"{path}: expected {{category: {{split: {{relpath: label}}}}}}")
    return data


# ---------------------------------------------------------------------------------------------
# Dataset, hash, storage


def _count_classes(report: TaskReport, rows: list[dict], order: list[str]) -> None:
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        counts[row["label"]][row["split"]] += 1
    report.classes = {
        label: {"pieces": sum(counts[label].values()), **dict(sorted(counts[label].items()))}
        for label in order if label in counts
    }


def _dataset(tables: list[pa.Table], reports: dict[str, TaskReport]) -> ProbeDataset:
    table = pa.concat_tables(tables) if tables else PROBE_SCHEMA.empty_table()
    table = table.sort_by([("task", "ascending"), ("split", "ascending"), ("label", "ascending"),
                           ("file_id", "ascending")])
    return ProbeDataset(table, reports)


def content_hash(table: pa.Table) -> str:
    """sha256 over the sorted (task, file_id, label, split) rows: the labels and split, not where files are."""
    lines = sorted(
        "\t".join(values) + "\n"
        for values in zip(*(table[name].to_pylist() for name in ("task", "file_id", "label", "split")))
    )
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def write_probe_dataset(dataset: ProbeDataset, path: str | Path) -> str:
    """Write the rows atomically as Parquet, the content hash and reports in its metadata; returns the hash."""
    digest = dataset.content_hash
    reports = {task: report.as_dict() for task, report in dataset.reports.items()}
    metadata = {CONTENT_HASH_KEY: digest.encode(), REPORTS_KEY: json.dumps(reports, sort_keys=True).encode()}
    write_parquet_atomic(dataset.table.replace_schema_metadata(metadata), Path(path))
    return digest


def read_probe_dataset(path: str | Path) -> ProbeDataset:
    """The dataset ``write_probe_dataset`` wrote; raises if its rows no longer match their hash."""
    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    stored_hash = metadata.get(CONTENT_HASH_KEY, b"").decode()
    raw_reports = json.loads(metadata.get(REPORTS_KEY, b"{}"))
    table = table.replace_schema_metadata(None).cast(PROBE_SCHEMA)
    if stored_hash != content_hash(table):
        raise ProbeDataError(f"{path}: rows do not match the stored content hash")
    reports = {}
    for task, raw in raw_reports.items():
        raw.pop("below_target", None)
        reports[task] = TaskReport(**raw)
    return ProbeDataset(table, reports)


# ---------------------------------------------------------------------------------------------
# Trivial cues


def file_cues(perf: Performance) -> dict[str, str]:
    """Properties of a file that the format or the converter decides, each as a comparable string."""
    return {
        "ticks_per_beat": str(perf.ticks_per_beat),
        "instruments": ",".join(sorted({INSTRUMENTS[i] for i in np.unique(perf.instrument)})),
        "first_tempo_us": str(int(perf.tempo_us[0])) if len(perf.tempo_us) else "none",
        "tempo_changes": str(max(len(np.unique(perf.tempo_us)) - 1, 0)),
        "channels": str(len(np.unique(perf.channel))),
        "velocities": ",".join(str(v) for v in np.unique(perf.velocity)),
    }


@dataclass(frozen=True)
class CueCheck:
    """How much of a task one cue gives away: the share of pieces whose cue value only one class has."""

    task: str
    cue: str
    pure_fraction: float  # pieces whose value (seen >= min_count times) occurs in a single class
    values: dict[str, dict[str, int]]  # cue value -> label -> pieces

    @property
    def leaks(self) -> bool:
        return self.pure_fraction > 0.0


def cue_report(
    dataset: ProbeDataset, cues: Mapping[str, Mapping[str, str]], task: str, min_count: int = 5
) -> list[CueCheck]:
    """One ``CueCheck`` per cue of ``cues`` ({file_id: file_cues(...)}) over ``task``'s rows.

    A value seen fewer than ``min_count`` times is not counted as pure: a rare tempo shared by
    two pieces of one class says little. A cue with one value over a task of several classes
    cannot leak at all.
    """
    rows = dataset.rows(task)
    cue_names = sorted({name for row in rows for name in cues[row["file_id"]]})
    checks = []
    for name in cue_names:
        values: dict[str, Counter] = defaultdict(Counter)
        for row in rows:
            values[cues[row["file_id"]][name]][row["label"]] += 1
        pure = sum(
            sum(labels.values()) for labels in values.values()
            if len(labels) == 1 and sum(labels.values()) >= min_count
        )
        checks.append(CueCheck(task, name, pure / max(len(rows), 1),
                               {value: dict(labels) for value, labels in sorted(values.items())}))
    return checks
