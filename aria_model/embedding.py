"""Piece embeddings: Aria's inference (``EleutherAI/aria: aria/embedding.py``), batched.

A file's embedding, as ``get_global_embedding_from_midi`` computes it:

- the notes are cut into consecutive chunks of 300 (the last one shorter);
- each chunk is tokenized as the contrastive views are: composer/form/genre
  metadata stripped (the instrument prefix stays: it comes from the file's
  programs, not its metadata), no ``<D>``, cut to ``seq_len`` tokens with
  ``<E>`` forced at the last position;
- the chunk's vector is ``TransformerEMB``'s projection at its ``<E>``;
- the file's vector is the unweighted mean of its chunks' vectors, not normalised.

Aria embeds with ``seq_len`` 2048 and its linear probes use 1024 (``PROBE_SEQ_LEN``).
Aria runs one chunk at a time; here the chunks of many files are batched,
longest first so a batch holds chunks of similar length. Padding goes on the
right, where it cannot change a result: attention is causal, so the output at
``<E>`` never sees the pads after it (batched and one-at-a-time agree to float
rounding).

``pooling="mean"`` is the probe baseline for a pretrained LM that never saw the
contrastive step: the mean of the final hidden states over each chunk's tokens
(pads excluded), then the mean over chunks (``embed_with_lm_mean_pool``).

    model = load_embedding_model(home / "models/contrastive/contrastive-small/model.pt", device="cuda")
    result = embed_files(model, paths, batch_size=64, progress=lambda done, total: ...)
    write_embeddings_parquet(result, home / "embeddings.parquet")

Aria accepts piano-only files; here any file with notes is embedded (the
curated corpus decides what is piano) and ``Embeddings.failures`` lists the
files that could not be read or have no notes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from aria_model.atomic_io import write_parquet_atomic
from aria_model.midi import Performance, load_midi
from aria_model.model import ModelConfig, TransformerEMB, TransformerLM, load_aria_state_dict
from aria_model.tokenizer import AbsTokenizer

NOTES_PER_CHUNK = 300  # Aria's chunk length for embeddings and probes
EMBEDDING_SEQ_LEN = 2048  # Aria's MAX_EMBEDDING_SEQ_LEN, also the contrastive training length
POOLINGS = ("eos", "mean")
Network = TransformerEMB | TransformerLM
SORT_WINDOW = 16  # batches' worth of chunks sorted by length together: less padding, bounded memory


# -- what a chunk is ---------------------------------------------------------------------------


def note_slice(perf: Performance, start: int, stop: int) -> Performance:
    """Notes ``[start, stop)`` with the file's tempo map and instrument classes, and no metadata.

    Aria slices ``note_msgs`` and keeps the instrument messages, so the prefix
    still names the file's instruments; it empties ``metadata`` so an embedding
    cannot read the composer, form or genre off a prefix token.
    """
    notes = slice(start, stop)
    return dataclasses.replace(
        perf, start_tick=perf.start_tick[notes], end_tick=perf.end_tick[notes], pitch=perf.pitch[notes],
        velocity=perf.velocity[notes], channel=perf.channel[notes], instrument=perf.instrument[notes], metadata={})


def chunk_ids(perf: Performance, tokenizer: AbsTokenizer, seq_len: int = EMBEDDING_SEQ_LEN,
              notes_per_chunk: int = NOTES_PER_CHUNK) -> list[np.ndarray]:
    """Each chunk's ids (int64, at most ``seq_len``, ``<E>`` last): what Aria feeds the model."""
    chunks = []
    for start in range(0, perf.n_notes, notes_per_chunk):
        chunk = note_slice(perf, start, start + notes_per_chunk)
        ids = tokenizer.tokenize_ids(chunk, add_dim_tok=False)[:seq_len].astype(np.int64)
        ids[-1] = tokenizer.eos_id  # already there unless the cut removed it
        chunks.append(ids)
    return chunks


# -- weights -----------------------------------------------------------------------------------


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """The state dict in ``path`` and, for our ``model.pt``, the ModelConfig saved with it.

    Reads our ``model.pt`` (``{model_config, state_dict, step}``, from pretraining or
    the contrastive step), a plain torch state dict (an Aria checkpoint) or a
    ``.safetensors`` file (Aria's released weights; needs the safetensors package).
    Tensors are memory-mapped, so reading a large file costs little until used.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path), None
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if isinstance(payload, dict) and "state_dict" in payload and "model_config" in payload:
        return payload["state_dict"], ModelConfig.from_dict(payload["model_config"])
    return payload, None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               config: ModelConfig | None = None) -> TransformerEMB | TransformerLM:
    """The network in ``path`` in eval mode: a TransformerEMB if it has an embedding head, else the LM.

    ``config`` is needed only for files that carry none (Aria's weights, e.g.
    ``ModelConfig.preset("medium", emb_size=512)`` for the released embedding model).
    """
    state, saved = read_weights(path)
    config = saved or config
    if config is None:
        raise ValueError(f"{path} holds no model_config; pass config=ModelConfig.preset(...)")
    emb_head = next((v for k, v in state.items() if k.endswith("emb_head.weight")), None)
    if emb_head is None:
        model = TransformerLM(config)
    else:
        model = TransformerEMB(dataclasses.replace(config, emb_size=int(emb_head.shape[0])))
    load_aria_state_dict(model, state)
    return model.to(device=device, dtype=dtype).eval()


def load_embedding_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         config: ModelConfig | None = None) -> TransformerEMB:
    """The contrastive model in ``path`` (ours or, with ``config``, Aria's), ready for ``embed_*``."""
    model = load_model(path, device, dtype, config)
    if not isinstance(model, TransformerEMB):
        raise ValueError(f"{path} has no embedding head (a pretrained LM?); use pooling='mean' with load_model")
    return model


# -- embedding ----------------------------------------------------------------------------------


@dataclass
class Embeddings:
    """One row per embedded file, in input order; files that failed are in ``failures`` only."""

    keys: list[str]  # paths or file_ids
    matrix: np.ndarray  # [files, dim] float32
    n_chunks: np.ndarray  # [files] int32
    failures: list[dict[str, str]] = field(default_factory=list)  # {"key", "error"}

    def by_key(self) -> dict[str, np.ndarray]:
        """``{key: vector}``, the form ``aria_model.probe`` takes its features in."""
        return dict(zip(self.keys, self.matrix))


def embed_performances(
    model: Network,
    items: Iterable[tuple[str, Performance]],
    batch_size: int = 32,
    seq_len: int = EMBEDDING_SEQ_LEN,
    notes_per_chunk: int = NOTES_PER_CHUNK,
    pooling: str = "eos",
    progress: Callable[[int, int | None], None] | None = None,
    total: int | None = None,
) -> Embeddings:
    """Embed ``(key, Performance)`` pairs; ``progress(files handled, total)`` after each batch window."""
    embedder = _Embedder(model, batch_size, seq_len, notes_per_chunk, pooling)
    return embedder.run(items, total, progress)


def embed_files(
    model: Network,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    seq_len: int = EMBEDDING_SEQ_LEN,
    notes_per_chunk: int = NOTES_PER_CHUNK,
    pooling: str = "eos",
    progress: Callable[[int, int | None], None] | None = None,
) -> Embeddings:
    """Embed MIDI files (keys: the paths as given); unreadable or empty files go to ``failures``."""
    embedder = _Embedder(model, batch_size, seq_len, notes_per_chunk, pooling)

    def loaded() -> Iterator[tuple[str, Performance]]:
        for path in paths:
            try:
                perf = load_midi(path)
            except Exception as exc:  # one bad file must not stop the rest; the reason is returned
                embedder.fail(str(path), exc)
                continue
            yield str(path), perf

    return embedder.run(loaded(), len(paths), progress)


def embed_performance(model: Network, perf: Performance, seq_len: int = EMBEDDING_SEQ_LEN,
                      notes_per_chunk: int = NOTES_PER_CHUNK, pooling: str = "eos",
                      batch_size: int = 32) -> np.ndarray:
    """One file's vector (float32): Aria's ``get_global_embedding_from_midi``."""
    result = embed_performances(model, [("", perf)], batch_size, seq_len, notes_per_chunk, pooling)
    if result.failures:
        raise ValueError(result.failures[0]["error"])
    return result.matrix[0]


def embed_with_lm_mean_pool(model: Network, perf: Performance, seq_len: int = EMBEDDING_SEQ_LEN,
                            notes_per_chunk: int = NOTES_PER_CHUNK, batch_size: int = 32) -> np.ndarray:
    """The LM baseline's vector [d_model]: hidden states averaged per chunk, then over chunks.

    For many files use ``embed_files``/``embed_performances`` with ``pooling="mean"``.
    """
    return embed_performance(model, perf, seq_len, notes_per_chunk, "mean", batch_size)


class _Embedder:
    """Collects files' chunks, runs them in length-sorted batches, averages each file's chunk vectors.

    Every file's chunks are added at once and each flush runs every pending
    chunk, so after a flush all files added so far are complete.
    """

    def __init__(self, model: Network, batch_size: int, seq_len: int, notes_per_chunk: int, pooling: str):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "eos" and not isinstance(model, TransformerEMB):
            raise ValueError("pooling='eos' needs a TransformerEMB (the contrastive model)")
        if seq_len > model.config.max_seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
        self.model, self.batch_size, self.pooling = model, batch_size, pooling
        self.seq_len, self.notes_per_chunk = seq_len, notes_per_chunk
        self.tokenizer = AbsTokenizer()
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.n_chunks: list[int] = []
        self.failures: list[dict[str, str]] = []
        self._pending_files: list[tuple[str, int]] = []  # (key, its chunk count)
        self._pending_chunks: list[np.ndarray] = []

    def run(self, items: Iterable[tuple[str, Performance]], total: int | None,
            progress: Callable[[int, int | None], None] | None) -> Embeddings:
        for key, perf in items:
            try:
                self.add(key, perf)
            except Exception as exc:  # e.g. no notes: reported, not raised
                self.fail(key, exc)
            if len(self._pending_chunks) >= self.batch_size * SORT_WINDOW:
                self.flush()
                if progress:
                    progress(len(self.keys) + len(self.failures), total)
        self.flush()
        if progress:
            progress(len(self.keys) + len(self.failures), total)
        return self.result()

    def add(self, key: str, perf: Performance) -> None:
        if perf.n_notes == 0:
            raise ValueError("performance has no notes")
        chunks = chunk_ids(perf, self.tokenizer, self.seq_len, self.notes_per_chunk)
        self._pending_files.append((key, len(chunks)))
        self._pending_chunks.extend(chunks)

    def fail(self, key: str, exc: Exception) -> None:
        self.failures.append({"key": key, "error": f"{type(exc).__name__}: {exc}"})

    def flush(self) -> None:
        chunks = self._pending_chunks
        if not chunks:
            return
        vectors = np.empty((len(chunks), self._width()), np.float32)
        order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]))
        for first in range(0, len(order), self.batch_size):
            picked = order[first : first + self.batch_size]
            vectors[picked] = self._run([chunks[i] for i in picked])
        start = 0
        for key, count in self._pending_files:
            # Aria's torch.mean over the chunk vectors; float64 so the sum's order cannot matter.
            self.vectors.append(vectors[start : start + count].astype(np.float64).mean(axis=0).astype(np.float32))
            self.keys.append(key)
            self.n_chunks.append(count)
            start += count
        self._pending_files, self._pending_chunks = [], []

    def result(self) -> Embeddings:
        matrix = np.stack(self.vectors) if self.vectors else np.zeros((0, self._width()), np.float32)
        return Embeddings(self.keys, matrix, np.asarray(self.n_chunks, np.int32), self.failures)

    def _width(self) -> int:
        config = self.model.config
        return config.emb_size if self.pooling == "eos" else config.d_model

    @torch.inference_mode()
    def _run(self, chunks: list[np.ndarray]) -> np.ndarray:
        device = next(self.model.parameters()).device
        lengths = torch.tensor([len(c) for c in chunks])
        ids = torch.full((len(chunks), int(lengths.max())), self.tokenizer.pad_id, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, : len(chunk)] = torch.from_numpy(chunk)
        ids, lengths = ids.to(device), lengths.to(device)
        if self.pooling == "eos":
            out = self.model.embed(ids, lengths - 1)
        else:
            hidden = self.model.model(ids).float()
            real = (torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]).float()
            out = (hidden * real[..., None]).sum(dim=1) / lengths[:, None]
        return out.float().cpu().numpy()


# -- storage ------------------------------------------------------------------------------------


def write_embeddings_parquet(embeddings: Embeddings, path: str | Path, key_column: str = "path") -> None:
    """``key_column`` (string), ``embedding`` (list<float32>), ``n_chunks`` (int32); written atomically."""
    matrix = np.ascontiguousarray(embeddings.matrix, np.float32)
    offsets = np.arange(len(matrix) + 1, dtype=np.int32) * matrix.shape[1]
    table = pa.table({
        key_column: pa.array(embeddings.keys, pa.string()),
        "embedding": pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1))),
        "n_chunks": pa.array(embeddings.n_chunks, pa.int32()),
    })
    write_parquet_atomic(table, Path(path))


def read_embeddings_parquet(path: str | Path) -> Embeddings:
    """What ``write_embeddings_parquet`` wrote (keys from its first column)."""
    table = pq.read_table(path)
    vectors = table["embedding"].combine_chunks()
    width = len(vectors[0]) if len(vectors) else 0
    matrix = vectors.values.to_numpy().reshape(len(vectors), width) if width else np.zeros((0, 0), np.float32)
    return Embeddings(table.column(0).to_pylist(), matrix, table["n_chunks"].to_numpy(), [])
