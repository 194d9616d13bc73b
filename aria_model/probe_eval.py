"""Probe evaluation of trained models: every method's features of a probe dataset, then Aria's
linear probe per task, with the handcrafted and majority baselines.

The ``probe_eval`` asset and ``aria_model.recipe`` (a whole recipe on a GPU node without Dagster)
both run this, so a table made either way means the same thing:

    embedders = [Embedder("aria_contrastive", contrastive_weights, EOS),
                 Embedder("contrastive_scratch", scratch_weights, EOS),
                 Embedder("pretrained_mean_pool", pretrained_weights, MEAN)]
    features = {e.method: model_features(e, dataset, notes_dir, device="cuda").embeddings.by_key()
                for e in embedders}
    features[HANDCRAFTED] = handcrafted_embeddings(dataset, notes_dir).by_key()
    results = probe_methods(dataset, features, [e.method for e in embedders], feature_columns())

Features are read from the ``midi_notes`` table (the notes the models trained on); eval files the
corpus does not hold are parsed from their MIDI file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from aria_model.embedding import Embeddings, embed_performances, load_embedding_model, load_model
from aria_model.features import handcrafted_features
from aria_model.probe import HANDCRAFTED_PROBE, ProbeResult, majority_task, probe_task
from aria_model.probe_config import EOS, HANDCRAFTED, PROBE_SEQ_LEN, ProbeConfig
from aria_model.probe_data import ProbeDataset, probe_performances



@dataclass(frozen=True)
class Embedder:
    """A method whose features come from a model: its weights file and how a chunk is pooled."""

    method: str
    weights: str | Path
    pooling: str  # EOS or MEAN


@dataclass
class ModelFeatures:
    embeddings: Embeddings
    timing: dict  # seq_len, pooling, device, seconds, files_per_s, chunks, failed


def model_features(embedder: Embedder, dataset: ProbeDataset, notes_dir: str | Path, *, device: str,
                   batch_size: int = 32, seq_len: int = PROBE_SEQ_LEN,
                   progress: Callable[[int, int | None], None] | None = None) -> ModelFeatures:
    """One model's vector per probe file: 300-note chunks cut to ``seq_len`` (capped at the model's
    context), pooled as ``embedder.pooling`` says, averaged over the file's chunks."""
    paths = dataset.paths()
    network = (load_embedding_model if embedder.pooling == EOS else load_model)(embedder.weights, device)
    seq_len = min(seq_len, network.config.max_seq_len)
    started = time.perf_counter()
    unreadable: dict[str, str] = {}
    embedded = embed_performances(network, probe_performances(notes_dir, paths, unreadable), batch_size, seq_len,
                                  pooling=embedder.pooling, progress=progress, total=len(paths))
    seconds = time.perf_counter() - started
    return ModelFeatures(embedded, {
        "seq_len": seq_len, "pooling": embedder.pooling, "device": str(device), "seconds": round(seconds, 2),
        "files_per_s": round(len(embedded.keys) / max(seconds, 1e-9), 1), "chunks": int(embedded.n_chunks.sum()),
        "failed": len(embedded.failures) + len(unreadable)})


def handcrafted_embeddings(dataset: ProbeDataset, notes_dir: str | Path) -> Embeddings:
    """``aria_model.features`` of every readable probe file, as Embeddings (one chunk each)."""
    vectors = {file_id: handcrafted_features(perf)
               for file_id, perf in probe_performances(notes_dir, dataset.paths(), {})}
    keys = sorted(vectors)
    matrix = np.stack([vectors[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
    return Embeddings(keys, matrix, np.ones(len(keys), np.int32))


def probe_methods(dataset: ProbeDataset, features: Mapping[str, Mapping[str, np.ndarray]],
                  embedding_methods: Sequence[str], handcrafted_columns: np.ndarray, *,
                  epochs: int = ProbeConfig.epochs, seed: int = ProbeConfig.seed) -> list[ProbeResult]:
    """Every method on every task: the embedding methods with Aria's probe, then the handcrafted
    features (standardised) and the majority class."""
    aria = ProbeConfig(epochs=epochs, seed=seed)
    handcrafted = replace(HANDCRAFTED_PROBE, epochs=epochs, seed=seed)
    results = []
    for task in dataset.tasks:
        results += [probe_task(dataset, task, features[method], method=method, config=aria)
                    for method in embedding_methods]
        results.append(probe_task(dataset, task, features[HANDCRAFTED], method=HANDCRAFTED, config=handcrafted,
                                  columns=handcrafted_columns))
        results.append(majority_task(dataset, task))
    return results


def best_per_task(results: Sequence[ProbeResult]) -> dict[str, ProbeResult]:
    """Highest macro-F1 per task (then accuracy; ties go to the earlier result)."""
    best: dict[str, ProbeResult] = {}
    for result in results:
        current = best.get(result.task)
        if current is None or (result.macro_f1, result.accuracy) > (current.macro_f1, current.accuracy):
            best[result.task] = result
    return best


def result_rows(results: Sequence[ProbeResult]) -> list[dict]:
    return [{"task": r.task, "method": r.method, "accuracy": round(r.accuracy, 3), "macro_f1": round(r.macro_f1, 3),
             "n_train": r.n_train, "n_test": r.n_test} for r in results]
