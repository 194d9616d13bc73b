"""Aria's linear probe on frozen feature vectors, its metrics, and the majority-class baseline.

The probe is the one in Aria's ``aria/eval/linear_probe.py`` (reference/aria.md §7.2): a single
``nn.Linear(d, n_classes)`` with bias, cross-entropy, AdamW (lr 3e-4, weight decay 0.1, betas
(0.9, 0.95), eps 1e-5), 100 warmup steps from 1e-6 x lr then linear decay to 10 %, batch 8,
shuffled every epoch, 50 epochs, on CPU. Seeded: the initial weights and every epoch's order come
from ``ProbeConfig.seed`` alone, so a run repeats bit for bit.

Standardisation. Aria's probe trains on the raw (unnormalised) embeddings, with no scaling, so
``ProbeConfig.standardize`` defaults to False and embedding probes keep Aria's behaviour. The
handcrafted features span four orders of magnitude (shares ~0.05, pitches ~60, seconds ~0.3): with
Aria's small lr and fixed step budget a raw probe mostly reads the large-unit columns, so the
handcrafted baseline runs with ``HANDCRAFTED_PROBE`` (mean and standard deviation fitted on the
train split only, then applied to both splits). Measured on the demo corpus at 400 pieces per
collection (velocity block left out): style accuracy 0.908 raw vs 0.976 standardised (macro-F1
0.863 vs 0.970), tune_type macro-F1 0.307 vs 0.437.

Metrics follow Aria's ``evaluate_classifier``: accuracy, macro-F1 as the plain mean of the per-class
F1 over every class of the task (a class never predicted has precision 0), per-class precision,
recall and F1, plus the confusion matrix (rows: true class, columns: predicted).

    features = features_of_files(paths)                     # aria_model.features, {file_id: vector}
    result = probe_task(dataset, "style", features, method="handcrafted", config=HANDCRAFTED_PROBE,
                        columns=feature_columns(exclude=("velocity",)))  # demo corpus: see probe_data
    baseline = majority_task(dataset, "style")
    write_results([result, baseline])            # <ARIA_HOME>/probe_eval/results.parquet
    plot_confusion(result, home / "probe_eval" / "style_handcrafted.png")
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from aria_model.atomic_io import write_bytes_atomic, write_parquet_atomic
from aria_model.home import default_home
from aria_model.probe_config import ProbeConfig
from aria_model.probe_data import TEST, TRAIN, ProbeDataset
from aria_model.training.optim import lr_factor

RESULTS_DIR = "probe_eval"
RESULTS_FILE = "results.parquet"
RESULT_COLUMNS = ("task", "method", "accuracy", "macro_f1", "n_train", "n_test")


HANDCRAFTED_PROBE = ProbeConfig(standardize=True)


@dataclass(frozen=True)
class ProbeResult:
    """One method on one task: headline metrics, per-class rows and the confusion matrix."""

    task: str
    method: str
    accuracy: float
    macro_f1: float
    n_train: int
    n_test: int
    classes: tuple[str, ...]
    per_class: list[dict]  # {"class", "support", "precision", "recall", "f1"} in ``classes`` order
    confusion: np.ndarray  # int64 [true class, predicted class], counts over the test split
    config: dict = field(default_factory=dict)  # what produced it (probe settings, feature columns)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Training


def train_linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, n_classes: int, config: ProbeConfig = ProbeConfig()
) -> nn.Linear:
    """A ``nn.Linear`` trained on (already standardised, if wanted) features and class indices."""
    x = torch.as_tensor(np.asarray(train_x, np.float32))
    y = torch.as_tensor(np.asarray(train_y, np.int64))
    if len(x) == 0:
        raise ValueError("no training examples")
    # fork_rng: the seed decides the initial weights without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = nn.Linear(x.shape[1], n_classes)
    order_rng = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(x) // config.batch_size)  # Aria's DataLoader keeps the last short batch
    total_steps = config.epochs * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    # One thread: a batch of 8 rows has no parallel work, and waiting for a pool of busy cores
    # made each step ~10x slower (measured on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(config.epochs):
            order = torch.randperm(len(x), generator=order_rng)
            for start in range(0, len(x), config.batch_size):
                batch = order[start : start + config.batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, config.warmup_steps, total_steps, config.final_lr_fraction)
                loss = loss_fn(head(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
    finally:
        torch.set_num_threads(threads)
    return head.eval()


def standardize(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every array scaled by the train split's per-column mean and standard deviation."""
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant column stays constant (zero), not NaN
    return [((array - mean) / std).astype(np.float32) for array in (train_x, *others)]


def linear_probe(
    train_x: np.ndarray,
    train_labels: Sequence[str],
    test_x: np.ndarray,
    test_labels: Sequence[str],
    *,
    task: str,
    method: str,
    config: ProbeConfig = ProbeConfig(),
    classes: Sequence[str] | None = None,
) -> ProbeResult:
    """Train the probe on the train split, score it on the test split.

    ``classes`` (default: every label of either split, sorted) fixes the class order of the
    outputs and of the metrics; a class absent from the test split still counts in macro-F1.
    """
    started = time.perf_counter()
    classes = tuple(classes) if classes is not None else tuple(sorted(set(train_labels) | set(test_labels)))
    index = {label: i for i, label in enumerate(classes)}
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    if config.standardize:
        train_x, test_x = standardize(train_x, test_x)
    head = train_linear_probe(train_x, np.array([index[label] for label in train_labels]), len(classes), config)
    with torch.no_grad():
        predicted = head(torch.as_tensor(test_x)).argmax(dim=-1).numpy()
    true = np.array([index[label] for label in test_labels], np.int64)
    return _result(task, method, classes, true, predicted, len(train_labels),
                   config.as_dict() | {"d_features": int(train_x.shape[1])}, time.perf_counter() - started)


def majority_baseline(
    train_labels: Sequence[str], test_labels: Sequence[str], *, task: str, classes: Sequence[str] | None = None
) -> ProbeResult:
    """Predict the most common train label for every test example (ties: first in sorted order)."""
    classes = tuple(classes) if classes is not None else tuple(sorted(set(train_labels) | set(test_labels)))
    index = {label: i for i, label in enumerate(classes)}
    counts = Counter(train_labels)
    top = max(counts.values())
    majority = min(label for label, n in counts.items() if n == top)
    true = np.array([index[label] for label in test_labels], np.int64)
    predicted = np.full(len(true), index[majority], np.int64)
    return _result(task, "majority", classes, true, predicted, len(train_labels), {"predicts": majority}, 0.0)


# ---------------------------------------------------------------------------------------------
# On a probe dataset


def task_arrays(
    dataset: ProbeDataset, task: str, features: Mapping[str, np.ndarray], split: str,
    columns: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(features [n, d], labels) of one split of a task, rows in file_id order."""
    rows = sorted(dataset.rows(task, split), key=lambda row: row["file_id"])
    missing = [row["file_id"] for row in rows if row["file_id"] not in features]
    if missing:
        raise KeyError(f"{len(missing)} {task}/{split} files have no features, e.g. {missing[:3]}")
    matrix = np.stack([np.asarray(features[row["file_id"]], np.float32) for row in rows]) if rows else np.zeros((0, 0))
    if columns is not None and len(rows):
        matrix = matrix[:, columns]
    return matrix, [row["label"] for row in rows]


def probe_task(
    dataset: ProbeDataset,
    task: str,
    features: Mapping[str, np.ndarray],
    *,
    method: str,
    config: ProbeConfig = ProbeConfig(),
    columns: np.ndarray | None = None,
    train_split: str = TRAIN,
    test_split: str = TEST,
) -> ProbeResult:
    """The linear probe on ``task`` of ``dataset`` with {file_id: vector} ``features``.

    ``columns`` picks feature columns (``aria_model.features.feature_columns``).
    """
    train_x, train_labels = task_arrays(dataset, task, features, train_split, columns)
    test_x, test_labels = task_arrays(dataset, task, features, test_split, columns)
    result = linear_probe(train_x, train_labels, test_x, test_labels, task=task, method=method, config=config,
                          classes=_task_classes(dataset, task))
    if columns is not None:
        result = replace(result, config=result.config | {"columns": [int(c) for c in columns]})
    return result


def majority_task(dataset: ProbeDataset, task: str, train_split: str = TRAIN, test_split: str = TEST) -> ProbeResult:
    train_labels = [row["label"] for row in dataset.rows(task, train_split)]
    test_labels = [row["label"] for row in dataset.rows(task, test_split)]
    return majority_baseline(train_labels, test_labels, task=task, classes=_task_classes(dataset, task))


def _task_classes(dataset: ProbeDataset, task: str) -> tuple[str, ...]:
    return tuple(sorted({row["label"] for row in dataset.rows(task)}))


# ---------------------------------------------------------------------------------------------
# Metrics


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    flat = np.asarray(true, np.int64) * n_classes + np.asarray(predicted, np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_metrics(confusion: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """Precision, recall and F1 per class; 0 where the denominator is 0, as Aria scores them."""
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(true_positive), where=both > 0)
    return [
        {"class": label, "support": int(support[i]), "precision": float(precision[i]),
         "recall": float(recall[i]), "f1": float(f1[i])}
        for i, label in enumerate(classes)
    ]


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over every class (rows of ``confusion``)."""
    rows = per_class_metrics(confusion, [str(i) for i in range(len(confusion))])
    return float(np.mean([row["f1"] for row in rows])) if rows else 0.0


def _result(task: str, method: str, classes: tuple[str, ...], true: np.ndarray, predicted: np.ndarray,
            n_train: int, config: dict, seconds: float) -> ProbeResult:
    confusion = confusion_matrix(true, predicted, len(classes))
    per_class = per_class_metrics(confusion, classes)
    return ProbeResult(
        task=task,
        method=method,
        accuracy=float(np.trace(confusion) / confusion.sum()) if confusion.sum() else 0.0,
        macro_f1=macro_f1(confusion),
        n_train=n_train,
        n_test=len(true),
        classes=classes,
        per_class=per_class,
        confusion=confusion,
        config=config,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------
# Outputs


def results_table(results: Sequence[ProbeResult]) -> pa.Table:
    """One row per result: ``RESULT_COLUMNS`` first, then classes, per-class rows and the confusion."""
    return pa.table({
        "task": pa.array([r.task for r in results], pa.string()),
        "method": pa.array([r.method for r in results], pa.string()),
        "accuracy": pa.array([r.accuracy for r in results], pa.float64()),
        "macro_f1": pa.array([r.macro_f1 for r in results], pa.float64()),
        "n_train": pa.array([r.n_train for r in results], pa.int64()),
        "n_test": pa.array([r.n_test for r in results], pa.int64()),
        "n_classes": pa.array([len(r.classes) for r in results], pa.int32()),
        "classes": pa.array([list(r.classes) for r in results], pa.list_(pa.string())),
        "per_class": pa.array([json.dumps(r.per_class) for r in results], pa.string()),
        "confusion": pa.array([r.confusion.tolist() for r in results], pa.list_(pa.list_(pa.int64()))),
        "config": pa.array([json.dumps(r.config, sort_keys=True, default=str) for r in results], pa.string()),
        "seconds": pa.array([r.seconds for r in results], pa.float64()),
    })


def per_class_table(results: Sequence[ProbeResult]) -> pa.Table:
    """Long form: one row per (task, method, class) with support, precision, recall and F1."""
    rows = [{"task": r.task, "method": r.method, **row} for r in results for row in r.per_class]
    return pa.Table.from_pylist(rows, pa.schema([
        ("task", pa.string()), ("method", pa.string()), ("class", pa.string()), ("support", pa.int64()),
        ("precision", pa.float64()), ("recall", pa.float64()), ("f1", pa.float64()),
    ]))


def results_text(rows: Sequence[Mapping]) -> str:
    """``results_table`` rows (or ``RESULT_COLUMNS`` dicts) as a fixed-width text table."""
    lines = [f"{'task':12s} {'method':22s} {'accuracy':>8s} {'macro_f1':>8s} {'n_train':>7s} {'n_test':>6s}"]
    lines += [f"{row['task']:12s} {row['method']:22s} {row['accuracy']:8.3f} {row['macro_f1']:8.3f} "
              f"{row['n_train']:7d} {row['n_test']:6d}" for row in rows]
    return "\n".join(lines)


def write_results(results: Sequence[ProbeResult], home: str | Path | None = None) -> Path:
    """Write ``results_table(results)`` atomically to ``<home>/probe_eval/results.parquet``."""
    path = Path(home or default_home()) / RESULTS_DIR / RESULTS_FILE
    write_parquet_atomic(results_table(results), path)
    return path


def confusion_figure(result: ProbeResult):
    """The confusion matrix as a matplotlib Figure (counts in the cells)."""
    # The Agg canvas directly: no pyplot, so no global backend is switched and no window opens.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(result.classes)
    figure = Figure(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(result.confusion, cmap="Blues")
    axes.set_xticks(range(n), result.classes, rotation=45, ha="right")
    axes.set_yticks(range(n), result.classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{result.task} / {result.method}\naccuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f}",
                   fontsize=9)
    darkest = result.confusion.max() if result.confusion.size else 0
    for (row, column), count in np.ndenumerate(result.confusion):
        axes.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > darkest / 2 else "black", fontsize=8)
    figure.tight_layout()
    return figure


def plot_confusion(result: ProbeResult, path: str | Path) -> Path:
    """The confusion matrix as a PNG, written atomically."""
    buffer = io.BytesIO()
    confusion_figure(result).savefig(buffer, format="png")
    path = Path(path)
    write_bytes_atomic(path, buffer.getvalue())
    return path
