"""Training windows streamed from token shards, with Aria's semantics (``aria/datasets.py``).

``TokenWindows`` is a ``torch.utils.data.IterableDataset`` over one split of
``<home>/token_shards`` (see ``aria_model.shards``). Each item is
``(input, target, loss_mask)``: ``target = input[1:] + [<P>]`` and
``loss_mask = target != <P>``, as Aria's ``TrainingDataset`` returns them.

Windows, as ``aria pretrain-dataset`` cuts them:

- concat (default): the files' ids joined into one stream, cut into consecutive
  non-overlapping ``seq_len`` windows (starting mid-piece, even mid-note), the
  last one padded with ``<P>``;
- ``sep_sequences``: every file starts a new window; each file is chunked into
  ``seq_len`` windows and its remainder padded.

Training (``WindowConfig.training``) adds what Aria does per epoch: a seeded
shuffle of the work units and rows, a fresh prefix order and ``<D>`` position for
every file (Aria re-tokenizes each epoch; the shards store the deterministic
form, so the draw is redone here with the tokenizer's own rule), a window
shuffle buffer (Aria's DataLoader shuffles windows), then the tokenizer's
``export_data_aug`` (tempo, pitch, velocity, in that order) on each window. Val
and test windows are the stored ids, in order, never augmented.

Work is split without overlap or loss: the unit is a Parquet row group; an
epoch's unit order is cut into ``world_size * num_workers`` interleaved slices,
slot ``rank * num_workers + worker_id`` reading its own. Every random draw comes
from ``(seed, epoch, ...)``: a file's prefix/``<D>`` draw from its file_id, a
window's augmentation from (slot, index in the slot's stream), so a stream is
reproducible given (seed, epoch, rank, worker) and a resumed epoch can skip
windows without replaying their augmentation.

``ResumableLoader`` drives epochs (``set_epoch``) and saves ``{epoch, batches}``
so Lightning can resume mid-epoch; ``AriaDataModule`` wraps train and val loaders.

    data = AriaDataModule("~/.aria/token_shards", seq_len=8192, batch_size=32, num_workers=4)
    trainer = Trainer(use_distributed_sampler=False, max_steps=..., ...)
    trainer.fit(model, datamodule=data)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import lightning.pytorch as pl
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aria_model.shards import shard_paths
from aria_model.tokenizer import AbsTokenizer

# Independent random streams derived from (seed, epoch, stream, ...).
_UNIT_ORDER, _ROW_ORDER, _FILE_DRAW, _WINDOW_BUFFER, _AUGMENT = range(5)


@dataclass(frozen=True)
class WindowConfig:
    seq_len: int = 8192  # Aria: 8192 pretraining, 2048 contrastive, 1024 probes
    sep_sequences: bool = False  # Aria's --sep_sequences: each file starts its own windows
    training: bool = True  # per-epoch shuffles, fresh prefix order and <D> position, augmentation
    augment: bool = True  # Aria's tempo/pitch/velocity augmentation; applied only when training
    shuffle_windows: int = 256  # training window shuffle buffer (8192-token windows: 4 MB)
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2 or self.shuffle_windows < 1:
            raise ValueError("need seq_len >= 2 and shuffle_windows >= 1")

    @classmethod
    def for_split(cls, split: str, **settings) -> "WindowConfig":
        """Training semantics for ``train``; val and test read the stored ids as they are."""
        return replace(cls(**settings), training=split == "train")


@dataclass(frozen=True)
class ResumePoint:
    """Where each worker of a partly read epoch goes on from."""

    skip_windows: list[int]  # per worker: windows already delivered
    first_worker: int  # the worker whose turn was next; the resumed loader's worker 0 plays it


@dataclass(frozen=True)
class _Unit:
    """One Parquet row group: the unit of work split across ranks and workers."""

    index: int  # position in the split, keys the unit's row shuffle
    path: Path
    row_group: int
    n_tokens: np.ndarray  # per row


class UnitStream(IterableDataset):
    """A stream over work units (Parquet row groups) dealt to ``world_size * num_workers`` slots.

    What ``ResumableLoader`` needs, shared by the token-window and view-pair datasets:
    ``set_epoch``, ``resume_at``, the per-worker item counts, and the epoch's unit order
    (seeded shuffle for training). Subclasses set ``units``, ``config`` (``seed``,
    ``training``), ``rank`` and ``world_size``, and define ``_item_count(units)`` (items a
    slot yields from its units) and ``_stream(units, slot, skip)``.
    """

    epoch = 0
    resume: ResumePoint | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffles and draws (call before iterating; workers copy it)."""
        self.epoch = epoch

    def resume_at(self, resume: ResumePoint | None) -> None:
        """Make the next iteration go on from ``resume`` (None: from the start of the epoch)."""
        self.resume = resume

    def __iter__(self) -> Iterator:
        # Not a generator: the epoch and skip are read now, when the loader starts this worker.
        worker, num_workers = _worker_slot()
        skip = 0
        if self.resume:
            worker = (worker + self.resume.first_worker) % num_workers
            skip = self.resume.skip_windows[worker]
        slot = self.rank * num_workers + worker
        return self._stream(self._units_of(slot, self.world_size * num_workers), slot, skip)

    def windows_per_worker(self, num_workers: int, rank: int | None = None) -> list[int]:
        """Items each loader worker of ``rank`` (default: this rank) yields in the current epoch."""
        n_workers = max(num_workers, 1)
        first = (self.rank if rank is None else rank) * n_workers
        return [self._item_count(self._units_of(slot, self.world_size * n_workers))
                for slot in range(first, first + n_workers)]

    def batches_per_rank(self, batch_size: int, num_workers: int) -> list[int]:
        """Batches every rank's loader yields this epoch (each worker batches its own items).

        Ranks can differ; under DDP train by ``max_steps`` or limit every rank to the minimum,
        or the ranks that run longer wait forever in the gradient all-reduce.
        """
        return [sum(math.ceil(w / batch_size) for w in self.windows_per_worker(num_workers, rank))
                for rank in range(self.world_size)]

    def _units_of(self, slot: int, n_slots: int) -> list:
        order = np.arange(len(self.units))
        if self.config.training:
            order = self._rng(_UNIT_ORDER).permutation(len(self.units))
        return [self.units[i] for i in order[slot::n_slots]]

    def _rng(self, stream: int, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.epoch, stream, *keys])

    def _item_count(self, units: list) -> int:
        raise NotImplementedError

    def _stream(self, units: list, slot: int, skip: int) -> Iterator:
        raise NotImplementedError


class TokenWindows(UnitStream):
    """Streaming ``(input, target, loss_mask)`` windows of one split; see the module docstring."""

    def __init__(
        self,
        shards_root: str | Path,
        split: str,
        config: WindowConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
        tokenizer: AbsTokenizer | None = None,
    ):
        self.config = config or WindowConfig.for_split(split)
        self.rank, self.world_size = rank, world_size
        self.tokenizer = tokenizer or AbsTokenizer()
        self.augmentations = self.tokenizer.export_data_aug() if self.config.training and self.config.augment else []
        self.units = _read_units(shard_paths(Path(shards_root).expanduser(), split))

    # -- the stream of one slot ---------------------------------------------------------

    def _item_count(self, units: list[_Unit]) -> int:
        lengths = np.concatenate([u.n_tokens for u in units] or [np.zeros(0, np.int64)]).astype(np.int64)
        if self.config.sep_sequences:
            return int(np.sum(-(-lengths // self.config.seq_len)))
        return math.ceil(int(lengths.sum()) / self.config.seq_len)

    def _stream(self, units: list[_Unit], slot: int, skip: int) -> Iterator[tuple[torch.Tensor, ...]]:
        windows = self._windows(self._sequences(units))
        if self.config.training:
            windows = shuffle_buffer(windows, self.config.shuffle_windows, self._rng(_WINDOW_BUFFER, slot))
        for index, window in enumerate(islice(windows, skip, None), start=skip):
            if self.augmentations:
                window = self._augmented(window, self._rng(_AUGMENT, slot, index))
            yield training_example(window, self.tokenizer.pad_id)

    def _sequences(self, units: list[_Unit]) -> Iterator[np.ndarray]:
        """Each file's ids, in the slot's order; a fresh tokenization draw per file when training."""
        for unit in units:
            table = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=["file_id", "ids"])
            ids = table["ids"].combine_chunks()
            values, offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
            file_ids = table["file_id"].to_pylist()
            rows = np.arange(len(file_ids))
            if self.config.training:
                rows = self._rng(_ROW_ORDER, unit.index).permutation(len(file_ids))
            for row in rows:
                sequence = values[offsets[row] : offsets[row + 1]]
                if self.config.training:
                    draw = self._rng(_FILE_DRAW, _key(file_ids[row]))
                    sequence = redraw_prefix_and_dim(sequence, self.tokenizer, draw)
                yield sequence

    def _windows(self, sequences: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        cut = file_windows if self.config.sep_sequences else concat_windows
        return cut(sequences, self.config.seq_len, self.tokenizer.pad_id)

    def _augmented(self, window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for augment in self.augmentations:
            window = augment(window, rng)
        return window



def _read_units(paths: list[Path]) -> list[_Unit]:
    """Every row group of the split, with its rows' token counts (a small column)."""
    units = []
    for path in paths:
        parquet = pq.ParquetFile(path)
        n_tokens = parquet.read(columns=["n_tokens"])["n_tokens"].to_numpy()
        ends = np.cumsum([parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        for group, (start, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
            units.append(_Unit(index=len(units), path=path, row_group=group, n_tokens=n_tokens[start:end]))
    return units


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _key(text: str) -> int:
    """A stable integer for seeding from a string (Python's hash() changes per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


# -- Aria's pieces: retokenization draw, windows, examples ----------------------------------


def redraw_prefix_and_dim(ids: np.ndarray, tokenizer: AbsTokenizer, rng: np.random.Generator) -> np.ndarray:
    """The ids one ``tokenize_ids(perf, rng=rng)`` draw gives, from its deterministic form.

    The ``<D>`` is taken out and put back with the tokenizer's rule (jittered
    around ``dim_offset`` tokens before the end, moved to precede a note), then the
    prefix tokens are shuffled: the same draws, in the same order, as the tokenizer.
    """
    bos = int(np.argmax(ids == tokenizer.bos_id))  # prefix tokens are all before <S>
    body_end = len(ids) - int(ids[-1] == tokenizer.eos_id)
    body = ids[bos + 1 : body_end]
    dim_at = np.flatnonzero(body == tokenizer.dim_id)
    if len(dim_at):
        body = np.delete(body, dim_at[0])
        body = np.insert(body, tokenizer.dim_position(body, rng), tokenizer.dim_id)
    prefix = ids[:bos].copy()
    rng.shuffle(prefix)
    return np.concatenate([prefix, ids[bos : bos + 1], body, ids[body_end:]])


def concat_windows(sequences: Iterable[np.ndarray], seq_len: int, pad_id: int) -> Iterator[np.ndarray]:
    """Aria's default: one stream of files cut into consecutive ``seq_len`` windows, the last padded."""
    window, filled = np.empty(seq_len, np.uint16), 0
    for sequence in sequences:
        start = 0
        while start < len(sequence):
            take = min(seq_len - filled, len(sequence) - start)
            window[filled : filled + take] = sequence[start : start + take]
            filled, start = filled + take, start + take
            if filled == seq_len:
                yield window
                window, filled = np.empty(seq_len, np.uint16), 0
    if filled:
        window[filled:] = pad_id
        yield window


def file_windows(sequences: Iterable[np.ndarray], seq_len: int, pad_id: int) -> Iterator[np.ndarray]:
    """Aria's ``--sep_sequences``: each file chunked into its own windows, its remainder padded."""
    for sequence in sequences:
        for start in range(0, len(sequence), seq_len):
            window = np.full(seq_len, pad_id, np.uint16)
            chunk = sequence[start : start + seq_len]
            window[: len(chunk)] = chunk
            yield window


def shuffle_buffer(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Yield ``items`` in a random order drawn through a buffer of ``size``."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def training_example(window: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aria's (src, tgt, mask): tgt is src shifted left with <P> appended; mask = tgt != <P>."""
    source = torch.from_numpy(window.astype(np.int64))
    target = torch.empty_like(source)
    target[:-1] = source[1:]
    target[-1] = pad_id
    return source, target, target != pad_id


# -- loaders --------------------------------------------------------------------------------


class ResumableLoader(DataLoader):
    """A DataLoader over ``TokenWindows`` that counts epochs and batches, for mid-epoch resume.

    Each ``iter()`` is one epoch: it calls ``set_epoch`` (Lightning only tells
    samplers, and an IterableDataset has none). ``state_dict`` is ``{epoch,
    batches}``; after ``load_state_dict`` the next ``iter()`` replays that epoch's
    stream and skips the batches already handed out: the loader takes batches
    from its workers in turn, and every worker's window count is known from the
    shards' token counts, so each worker skips exactly its own. Lightning fetches
    one batch ahead of the step it trains, so a checkpoint can count that batch as
    done: a resumed run never repeats a batch and may skip that one. Workers are
    not persistent, so each epoch's workers see the new epoch.
    """

    def __init__(self, dataset: TokenWindows, batch_size: int, num_workers: int = 0, **loader_args):
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=False,
                         **loader_args)
        self._epoch, self._batches = 0, 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self):
        if self._resume:
            epoch, done = self._resume
        elif self._batches:  # the last epoch was left part-read: go on to the next one
            epoch, done = self._epoch + 1, 0
        else:
            epoch, done = self._epoch, 0
        self._resume = None
        self.dataset.set_epoch(epoch)
        self.dataset.resume_at(self._resume_point(done) if done else None)
        batches = super().__iter__()  # workers copy the dataset now
        self.dataset.resume_at(None)
        self._epoch, self._batches = epoch, done
        return self._counted(batches)

    def _counted(self, batches) -> Iterator:
        for batch in batches:
            self._batches += 1
            yield batch
        self._epoch, self._batches = self._epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))
        self._epoch = self._resume[0]

    def _resume_point(self, batches_done: int) -> ResumePoint:
        windows = self.dataset.windows_per_worker(self.num_workers)
        delivered, next_worker = loader_position([math.ceil(w / self.batch_size) for w in windows], batches_done)
        return ResumePoint([min(d * self.batch_size, w) for d, w in zip(delivered, windows)], next_worker)


def loader_position(batches_per_worker: list[int], taken: int) -> tuple[list[int], int]:
    """Batches each worker had delivered once a DataLoader handed out ``taken``, and whose turn is next.

    The loader takes one batch from each worker in turn (worker 0, 1, ...) and
    passes over workers that have no batches left.
    """
    delivered = [0] * len(batches_per_worker)
    remaining = taken
    while active := [w for w, n in enumerate(batches_per_worker) if delivered[w] < n]:
        rounds = min(min(batches_per_worker[w] - delivered[w] for w in active), remaining // len(active))
        if not rounds:  # fewer batches left than active workers: the first ones deliver one each
            for w in active[:remaining]:
                delivered[w] += 1
            return delivered, active[remaining % len(active)]
        for w in active:  # whole rounds: every active worker delivers that many
            delivered[w] += rounds
        remaining -= rounds * len(active)
    return delivered, 0


class SplitDataModule(pl.LightningDataModule):
    """Train and val loaders of a dataset that splits its own work across ranks and workers.

    Use ``Trainer(use_distributed_sampler=False)``: the datasets split the work
    across ranks themselves (rank and world size from the trainer), and a
    DistributedSampler would have nothing to sample. Ranks can get different
    numbers of batches, so under DDP train by ``max_steps`` and bound validation
    with ``limit_val_batches``; a rank that runs out early leaves the others
    waiting in the all-reduce. The train loader is a ``ResumableLoader``:
    Lightning saves its state in checkpoints and restores it, resuming mid-epoch.
    Subclasses say how to build a split's dataset (``split_dataset``).
    """

    def __init__(self, batch_size: int, num_workers: int):
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_data: IterableDataset | None = None
        self.val_data: IterableDataset | None = None

    def split_dataset(self, split: str, rank: int, world_size: int) -> IterableDataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        rank, world_size = self._rank_and_world_size()
        self.train_data = self.split_dataset("train", rank, world_size)
        self.val_data = self.split_dataset("val", rank, world_size)
        # Lightning would run empty epochs until max_steps, which never comes.
        if not any(self.train_data.batches_per_rank(self.batch_size, self.num_workers)):
            raise ValueError(f"the train split yields nothing to train on ({type(self.train_data).__name__} "
                             "of 0 items): are the token shards empty, or did the quality filter drop every file?")

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self.train_data, self.batch_size, self.num_workers,
                               pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_data, batch_size=self.batch_size, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1


class AriaDataModule(SplitDataModule):
    """Token windows of ``<home>/token_shards`` (see ``TokenWindows.batches_per_rank`` for DDP)."""

    def __init__(
        self,
        shards_root: str | Path,
        seq_len: int = 8192,
        batch_size: int = 32,
        num_workers: int = 4,
        sep_sequences: bool = False,
        shuffle_windows: int = WindowConfig.shuffle_windows,
        seed: int = 0,
        augment: bool = True,
    ):
        super().__init__(batch_size, num_workers)
        self.shards_root = Path(shards_root).expanduser()
        self.window_settings = {"seq_len": seq_len, "sep_sequences": sep_sequences,
                                "shuffle_windows": shuffle_windows, "seed": seed, "augment": augment}

    def split_dataset(self, split: str, rank: int, world_size: int) -> TokenWindows:
        config = WindowConfig.for_split(split, **self.window_settings)
        return TokenWindows(self.shards_root, split, config, rank=rank, world_size=world_size)
