"""probe_dataset: labeled files for the linear probes, split train/test by piece.

Labels come from the demo corpus (tasks ``style`` and ``tune_type`` on music21's own labels,
see ``aria_model.probe_data``) or, when ``eval_splits`` is set, from a folder in Aria's
eval-splits layout (``metadata.json``: ``{category: {split: {relpath: label}}}``, kept as given).
Built splits put every file of an ``opus_dedup`` cluster on one side, so the probe is never
tested on a piece it was trained on.

Output: ``<home>/probe_dataset/probe.parquet`` (task, file_id, path, label, split, cluster_id),
its content hash and per-task reports in the Parquet metadata. The materialization reports the
pieces per class and split, the classes under the 100-piece target, and which file properties
give a label away (the trivial-cue check).
"""


from pathlib import Path

import dagster as dg
import pyarrow.compute as pc

from aria_model.probe_data import (
    DEMO_TASKS,
    SEED,
    TARGET_PER_CLASS,
    DemoTask,
    ProbeDataset,
    build_demo_probe_dataset,
    clusters_in_several_splits,
    cue_report,
    file_cues,
    probe_performances,
    read_clusters,
    read_eval_splits,
    read_probe_dataset,
    write_probe_dataset,
)
from aria_model.sources import DEMO_METADATA_FILE
from assets.metadata import markdown_table
from assets.opus_dedup import dedup_path
from pipelines.resources import AriaHome

ASSET_NAME = "probe_dataset"
PROBE_FILE = "probe.parquet"
DEMO_LABELS = "demo_corpus"  # the ``labels`` metadata value of a dataset built from the demo corpus


class ProbeDatasetConfig(dg.Config):
    eval_splits: str | None = None  # a folder in Aria's eval-splits layout; None: the demo corpus's labels
    eval_splits_metadata: str | None = None  # its JSON when not <eval_splits>/metadata.json
    skip_missing: bool = False  # eval splits: leave out (and count) listed files that are not there
    tasks: list[str] = list(DEMO_TASKS)  # demo corpus tasks
    more_classes: bool = False  # demo: Luxembourg and Lorraine folk songs, slip jigs and clogs as well
    min_per_class: int = 20  # demo: a class with fewer pieces is dropped (a 0.2 test share leaves ~4)
    max_per_class: int | None = None  # demo: a seeded cap per class, for balanced classes
    test_fraction: float = 0.2
    seed: int = SEED  # Aria's make_eval_split seed


def probe_path(home: AriaHome) -> Path:
    return home.asset_dir(ASSET_NAME) / PROBE_FILE


def build(config: ProbeDatasetConfig, home: AriaHome) -> tuple[ProbeDataset, str]:
    """The dataset and where its labels came from."""
    dedup = dedup_path(home)
    clusters = read_clusters(dedup) if dedup.exists() else {}
    if config.eval_splits:
        dataset = read_eval_splits(config.eval_splits, config.eval_splits_metadata, clusters,
                                   missing="skip" if config.skip_missing else "error")
        return dataset, f"eval_splits:{Path(config.eval_splits).resolve()}"
    demo_dir = home.root / "demo_corpus"
    if not (demo_dir / DEMO_METADATA_FILE).is_file():
        raise dg.Failure(f"no labels: {demo_dir} holds no demo corpus (a MIDI source is configured?); "
                         "set ops.probe_dataset.config.eval_splits to a folder in Aria's eval-splits layout")
    tasks = [DemoTask.preset(name, more_classes=config.more_classes, min_per_class=config.min_per_class,
                             max_per_class=config.max_per_class) for name in config.tasks]
    return build_demo_probe_dataset(demo_dir, tasks, clusters, config.test_fraction, config.seed), DEMO_LABELS


@dg.asset(
    name=ASSET_NAME,
    group_name="evaluation",
    kinds={"python", "parquet"},
    deps=[dg.AssetKey("demo_corpus"), dg.AssetKey("opus_dedup"), dg.AssetKey("midi_notes")],
)
def probe_dataset(context: dg.AssetExecutionContext, config: ProbeDatasetConfig, home: AriaHome) -> dg.MaterializeResult:
    """Labeled probe files per task with a piece-disjoint train/test split; counts per class,
    classes under the 100-piece target and the trivial-cue check as metadata."""
    dataset, labels = build(config, home)
    path = probe_path(home)
    digest = write_probe_dataset(dataset, path)
    context.log.info(dataset.describe())
    table = dataset.table
    paths = dataset.paths()
    unreadable: dict[str, str] = {}
    cues = {file_id: file_cues(perf)
            for file_id, perf in probe_performances(home.root / "midi_notes", paths, unreadable)}
    if unreadable:
        context.log.warning(f"{len(unreadable)} probe files cannot be read; probe_eval leaves them out")
    readable = ProbeDataset(table.filter(pc.field("file_id").isin(list(cues))), dataset.reports)
    checks = [check for task in readable.tasks for check in cue_report(readable, cues, task)]
    below = {task: report.below_target for task, report in dataset.reports.items() if report.below_target}
    return dg.MaterializeResult(metadata={
        "dagster/row_count": table.num_rows,
        "path": dg.MetadataValue.path(str(path)),
        "content_hash": digest,
        "labels": labels,
        "tasks": ", ".join(dataset.tasks),
        "files": len(paths),
        "unreadable_files": len(unreadable),
        "unreadable": dg.MetadataValue.json(dict(list(unreadable.items())[:20])),
        "pieces_per_class": dg.MetadataValue.md(markdown_table(_class_rows(dataset))),
        "below_target": _below_target_text(dataset) if below else f"every class has {TARGET_PER_CLASS}+ pieces",
        "dropped_classes": dg.MetadataValue.json({t: r.dropped_classes for t, r in dataset.reports.items()}),
        "reports": dg.MetadataValue.json({t: r.as_dict() for t, r in dataset.reports.items()}),
        "cue_check": _cue_text(checks),
        "cues": dg.MetadataValue.md(markdown_table(_cue_rows(checks))),
    })


def _class_rows(dataset: ProbeDataset) -> list[dict]:
    return [
        {"task": task, "class": label, "pieces": counts["pieces"], "train": counts.get("train", 0),
         "test": counts.get("test", 0), f"≥ {report.target_per_class}": "yes" if counts["pieces"] >= report.target_per_class else "NO"}
        for task, report in dataset.reports.items() for label, counts in report.classes.items()
    ]


def _below_target_text(dataset: ProbeDataset) -> str:
    parts = []
    for task, report in dataset.reports.items():
        if report.below_target:
            classes = ", ".join(f"{label} ({report.classes[label]['pieces']})" for label in report.below_target)
            parts.append(f"{task}: {classes}")
    return (f"Below the {TARGET_PER_CLASS}-piece target per class: " + "; ".join(parts)
            + ". Accuracies on these classes rest on few test pieces.")


def _cue_text(checks) -> str:
    leaks = [check for check in checks if check.leaks]
    if not leaks:
        return "no trivial cue: no file property (ticks per beat, instruments, tempo map, channels, velocities) gives a label away"
    text = "; ".join(f"{check.task}: '{check.cue}' gives the label away for {100 * check.pure_fraction:.0f}% of the pieces"
                     for check in leaks)
    if any(check.cue == "velocities" for check in leaks):
        text += (". probe_eval leaves the velocity features out of the handcrafted probe on demo labels; "
                 "the models' tokens still carry every note's velocity")
    return text


def _cue_rows(checks) -> list[dict]:
    return [{"task": check.task, "cue": check.cue, "values": len(check.values),
             "pieces given away": f"{100 * check.pure_fraction:.1f}%"} for check in checks]


@dg.asset_check(asset=probe_dataset, blocking=True)
def no_piece_in_both_splits(context: dg.AssetCheckExecutionContext, home: AriaHome) -> dg.AssetCheckResult:
    """No dedup cluster (piece) has files in both the train and the test split of a task. A split
    the asset built never has one; given eval splits are kept as they are, so there it warns."""
    crossing = clusters_in_several_splits(read_probe_dataset(probe_path(home)).table)
    event = context.instance.get_latest_materialization_event(dg.AssetKey(ASSET_NAME))
    labels = event.asset_materialization.metadata["labels"].value if event else DEMO_LABELS
    severity = dg.AssetCheckSeverity.ERROR if labels == DEMO_LABELS else dg.AssetCheckSeverity.WARN
    return dg.AssetCheckResult(
        passed=not crossing, severity=severity,
        metadata={"clusters_in_both_splits": sum(len(ids) for ids in crossing.values()),
                  "examples": dg.MetadataValue.json({task: ids[:5] for task, ids in crossing.items()})})
