"""Aria's contrastive fine-tune: views, NT-Xent, the view-pair stream and the LightningModule.

Paper: arXiv 2506.23869 ("SimCLR adapted to symbolic music"); code:
``EleutherAI/aria: aria/training/contrastive_finetune.py``. What is Aria's here:

- **views**: two independent slices of one file. A slice has a length drawn
  uniformly from [100, 650] notes and a start drawn uniformly from
  [0, n_notes - 100], clipped at the end of the piece (``draw_slice``), so the
  two may overlap. A file of at most 100 notes gives its whole self twice, as in
  Aria (without augmentation the two views are then identical: an easy positive).
- **view ids**: the slice tokenized without composer/form/genre prefixes (Aria
  empties the metadata; the instrument prefix, taken from the file's programs,
  stays) and without ``<D>``, optionally augmented (Aria's ``export_data_aug``,
  off by default as in v1's ``get_dataloaders``), cut or padded with ``<P>`` to
  ``seq_len`` (2048), ``<E>`` written at the last position when the cut removed
  it (``view_ids``). The embedding is ``TransformerEMB``'s head at the ``<E>``.
- **loss**: symmetric NT-Xent with in-batch negatives only: cosine similarity of
  L2-normalised vectors over tau, cross-entropy in both directions, averaged
  (``nt_xent``). Under DDP each rank's loss uses its own batch, as Aria's
  accelerate loop does: no cross-device gather of negatives.
- **optimizer**: AdamW lr 1e-5, weight decay 0.1, betas (0.9, 0.95), eps 1e-5,
  1000 warmup steps then linear decay to 10 % (``aria_model.training.optim``).
  The paper's checkpoint uses tau 0.1 (the code default is 0.5).

The stream (``ViewPairs``) reads the files of a ``token_shards`` split and
rebuilds their notes from the ``midi_notes`` table (``performance_from_row``),
so views are cut from notes, as Aria cuts them from MidiDicts. Its unit of work
is a ``midi_notes`` row group, dealt to the ``world_size * num_workers`` slots
as ``aria_model.data`` deals token row groups: every file once per epoch, no
overlap. All draws come from ``(seed, epoch, ...)``: the unit order, the row
order within a unit, the slot's shuffle buffer, and a file's two views (keyed
by its file_id, so they do not depend on the number of ranks or workers).
``ContrastiveDataModule`` serves it through ``aria_model.data.ResumableLoader``
for exact mid-epoch resume.

    module = ContrastiveModule(config, total_steps)   # config: training.contrastive.ContrastiveConfig
    trainer.fit(module, datamodule=ContrastiveDataModule(shards, notes, ViewConfig(seq_len=2048), batch_size=32))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import lightning.pytorch as pl
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from aria_model.data import SplitDataModule, UnitStream, _key, shuffle_buffer
from aria_model.embedding import note_slice, read_weights
from aria_model.midi import Performance
from aria_model.model import AriaLoadReport, TransformerEMB, load_aria_state_dict
from aria_model.notes_table import part_files, performance_from_row
from aria_model.shards import NOTE_LIST_COLUMNS, NOTE_SCALAR_COLUMNS, _note_rows, shard_paths
from aria_model.tokenizer import AbsTokenizer
from aria_model.training.optim import adamw, warmup_linear_decay

if TYPE_CHECKING:
    from aria_model.training.contrastive import ContrastiveConfig

SCRATCH = "scratch"  # init value for the paper's ablation: no pretrained weights
# Independent random streams derived from (seed, epoch, stream, ...).
_UNIT_ORDER, _ROW_ORDER, _PAIR_BUFFER, _VIEWS = range(4)

Augmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# -- views ----------------------------------------------------------------------------------------


def draw_slice(n_notes: int, rng: np.random.Generator, min_notes: int = 100, max_notes: int = 650) -> tuple[int, int]:
    """``(start, length)`` of one view, Aria's draw: the length first, then the start.

    The length is uniform in [min_notes, max_notes], the start uniform in
    [0, n_notes - min_notes], and the slice is clipped at the end of the piece,
    so it always holds at least ``min_notes`` notes. A file of at most
    ``min_notes`` notes is taken whole: ``(0, n_notes)``.
    """
    length = int(rng.integers(min_notes, max_notes + 1))
    start = int(rng.integers(0, n_notes - min_notes + 1)) if n_notes > min_notes else 0
    return start, min(length, n_notes - start)


def view_ids(perf_slice: Performance, tokenizer: AbsTokenizer, seq_len: int = 2048,
             augmentations: Sequence[Augmentation] = (), rng: np.random.Generator | None = None,
             ) -> tuple[np.ndarray, int]:
    """A slice's ids (int64, exactly ``seq_len``) and the position of its ``<E>``.

    Composer/form/genre prefixes are dropped (the slice's metadata is emptied),
    ``<D>`` is never inserted, ``augmentations`` run in order with ``rng`` (then
    their ``<P>`` fill is dropped, as Aria drops it), the ids are cut or padded
    to ``seq_len`` and, when no ``<E>`` survived, the last position becomes ``<E>``.
    """
    ids = tokenizer.tokenize_ids(replace(perf_slice, metadata={}), add_dim_tok=False).astype(np.int64)
    for augment in augmentations:
        ids = augment(ids, rng)
    if augmentations:
        ids = ids[ids != tokenizer.pad_id]
    view = np.full(seq_len, tokenizer.pad_id, np.int64)
    kept = ids[:seq_len]
    view[: len(kept)] = kept
    eos = np.flatnonzero(view == tokenizer.eos_id)
    if not len(eos):
        view[-1] = tokenizer.eos_id
        return view, seq_len - 1
    return view, int(eos[0])


# -- loss -----------------------------------------------------------------------------------------


def nt_xent(za: torch.Tensor, zb: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Symmetric NT-Xent over a batch of pairs ``(za[i], zb[i])``; the other rows are the negatives.

    ``sim = normalise(za) @ normalise(zb).T / tau``; cross-entropy of each row of
    ``sim`` (a finds its b) and of each column (b finds its a) against the
    diagonal, the two means averaged.
    """
    sim = F.normalize(za.float(), dim=-1) @ F.normalize(zb.float(), dim=-1).T / tau
    labels = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2


def retrieval_hits(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """How many rows' nearest b (cosine, within the batch) is their own view."""
    sim = F.normalize(za.float(), dim=-1) @ F.normalize(zb.float(), dim=-1).T
    return (sim.argmax(dim=1) == torch.arange(len(sim), device=sim.device)).sum()


# -- the pair stream ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewConfig:
    seq_len: int = 2048  # Aria's contrastive length (emb-t0.1-s2048)
    min_notes: int = 100
    max_notes: int = 650  # v1; earlier Aria versions drew 100..300
    augment: bool = False  # Aria's tempo/pitch/velocity augmentation; v1's get_dataloaders leaves it off
    training: bool = True  # per-epoch shuffles (val/test read in table order with fixed draws)
    shuffle_pairs: int = 256  # per-slot shuffle buffer: mixes files across row groups in a batch
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_notes <= self.max_notes:
            raise ValueError(f"need 1 <= min_notes <= max_notes, got {self.min_notes}, {self.max_notes}")
        if self.seq_len < 2 or self.shuffle_pairs < 1:
            raise ValueError("need seq_len >= 2 and shuffle_pairs >= 1")

    @classmethod
    def for_split(cls, split: str, **settings) -> ViewConfig:
        return replace(cls(**settings), training=split == "train")


class ViewPair(NamedTuple):
    ids_a: torch.Tensor  # [seq_len] int64
    pos_a: torch.Tensor  # () int64: the <E> of view a
    ids_b: torch.Tensor
    pos_b: torch.Tensor
    file_id: str


@dataclass(frozen=True)
class _NotesUnit:
    """The split's rows of one midi_notes row group: the unit of work."""

    index: int  # position in the split, keys the unit's row shuffle
    path: Path
    row_group: int
    rows: np.ndarray  # indices within the row group
    file_ids: tuple[str, ...]


class ViewPairs(UnitStream):
    """Streaming ``ViewPair``s of the files of one token_shards split; see the module docstring.

    Implements what ``ResumableLoader`` needs: ``set_epoch``, ``resume_at`` and
    ``windows_per_worker`` (here: pairs per worker, one per file).
    """

    def __init__(self, shards_root: str | Path, notes_dir: str | Path, split: str, config: ViewConfig | None = None,
                 rank: int = 0, world_size: int = 1, tokenizer: AbsTokenizer | None = None):
        self.config = config or ViewConfig.for_split(split)
        self.rank, self.world_size = rank, world_size
        self.tokenizer = tokenizer or AbsTokenizer()
        self.augmentations = self.tokenizer.export_data_aug() if self.config.training and self.config.augment else []
        split_files = split_file_ids(shards_root, split)
        self.units = _read_units(Path(notes_dir).expanduser(), split_files)
        missing = len(split_files) - sum(len(u.file_ids) for u in self.units)
        if missing:
            raise ValueError(f"{missing} of the {len(split_files)} {split} files are not in {notes_dir}; "
                             f"token_shards and midi_notes disagree (rebuild token_shards)")

    @property
    def n_files(self) -> int:
        return sum(len(u.file_ids) for u in self.units)

    def _item_count(self, units: list[_NotesUnit]) -> int:
        return sum(len(u.file_ids) for u in units)  # one pair per file

    def _stream(self, units: list[_NotesUnit], slot: int, skip: int) -> Iterator[ViewPair]:
        files = self._performances(units)
        if self.config.training:
            files = shuffle_buffer(files, self.config.shuffle_pairs, self._rng(_PAIR_BUFFER, slot))
        # Skipped files cost a notes read but no tokenization: a file's views depend only on its own draw.
        for file_id, perf in islice(files, skip, None):
            yield self.pair(file_id, perf)

    def pair(self, file_id: str, perf: Performance) -> ViewPair:
        """The epoch's two views of one file, drawn from ``(seed, epoch, file_id)``."""
        rng = self._rng(_VIEWS, _key(file_id))
        views = []
        for _ in range(2):
            start, length = draw_slice(perf.n_notes, rng, self.config.min_notes, self.config.max_notes)
            ids, pos = view_ids(note_slice(perf, start, start + length), self.tokenizer, self.config.seq_len,
                                self.augmentations, rng)
            views += [torch.from_numpy(ids), torch.tensor(pos)]
        return ViewPair(*views, file_id)

    def _performances(self, units: list[_NotesUnit]) -> Iterator[tuple[str, Performance]]:
        for unit in units:
            table = pq.ParquetFile(unit.path).read_row_group(
                unit.row_group, columns=[*NOTE_SCALAR_COLUMNS, *NOTE_LIST_COLUMNS]).take(unit.rows)
            rows = list(_note_rows(table))
            order = range(len(rows))
            if self.config.training:
                order = self._rng(_ROW_ORDER, unit.index).permutation(len(rows))
            for i in order:
                yield rows[i]["file_id"], performance_from_row(rows[i])



def split_file_ids(shards_root: str | Path, split: str) -> set[str]:
    """The file_ids of one token_shards split."""
    return {fid for path in shard_paths(Path(shards_root).expanduser(), split)
            for fid in pq.read_table(path, columns=["file_id"])["file_id"].to_pylist()}


def _read_units(notes_dir: Path, wanted: set[str]) -> list[_NotesUnit]:
    """Every midi_notes row group holding wanted files, with those files' rows (first occurrence only)."""
    units, seen = [], set()
    for part in part_files(notes_dir):
        parquet = pq.ParquetFile(part)
        for group in range(parquet.num_row_groups):
            file_ids = parquet.read_row_group(group, columns=["file_id"])["file_id"].to_pylist()
            rows = [i for i, fid in enumerate(file_ids) if fid in wanted and fid not in seen]
            seen.update(file_ids[i] for i in rows)
            if rows:
                units.append(_NotesUnit(len(units), part, group, np.asarray(rows),
                                        tuple(file_ids[i] for i in rows)))
    return units


class ContrastiveDataModule(SplitDataModule):
    """Train and val loaders of view pairs (see ``SplitDataModule`` for DDP and resume)."""

    def __init__(self, shards_root: str | Path, notes_dir: str | Path, views: ViewConfig, batch_size: int,
                 num_workers: int = 2):
        super().__init__(batch_size, num_workers)
        self.shards_root, self.notes_dir = Path(shards_root).expanduser(), Path(notes_dir).expanduser()
        self.views = views

    def split_dataset(self, split: str, rank: int, world_size: int) -> ViewPairs:
        config = replace(self.views, training=split == "train")
        return ViewPairs(self.shards_root, self.notes_dir, split, config, rank=rank, world_size=world_size)


# -- the model ------------------------------------------------------------------------------------


def init_from_pretrained(model: TransformerEMB, path: str | Path) -> AriaLoadReport:
    """Copy a pretrained network's weights into ``model``, Aria's start for the contrastive step.

    ``path``: our ``model.pt`` or an Aria state dict (see ``embedding.read_weights``).
    Every trunk tensor must fit; the LM head is skipped and ``emb_head`` keeps its
    PyTorch default init unless the file has one (Aria loads with ``strict=False``).
    """
    state, _ = read_weights(path)
    return load_aria_state_dict(model, state, heads_optional=True)


class ContrastiveModule(pl.LightningModule):
    """Contrastive fine-tune of ``TransformerEMB`` with NT-Xent; built in ``configure_model``.

    ``load_init`` is False when a checkpoint will restore the weights anyway (a
    resumed run does not need the init file). Like ``PretrainModule``,
    ``training_step`` takes the loader's iterator, so Lightning fetches nothing
    ahead and the train loader's saved position is exact.
    """

    def __init__(self, config: ContrastiveConfig, total_steps: int, load_init: bool = True):
        super().__init__()
        self.config = config
        self.total_steps = total_steps
        self.load_init = load_init
        # In checkpoints only: the runner logs the config to MLflow once, as flat `section.field` params.
        self.save_hyperparameters({"config": config.to_dict(), "total_steps": total_steps}, logger=False)
        self.net: TransformerEMB | None = None
        self.init_report: AriaLoadReport | None = None
        self.flops_per_batch = 0  # set with the network; ThroughputMonitor reads it for MFU
        self._sums: torch.Tensor | None = None  # loss and retrieval hits since the last optimizer step
        self._micro_batches = 0
        self._rows = 0
        self._val = torch.zeros(4, dtype=torch.float64)  # loss sum, batches, hits, rows
        self.last_lr = math.nan
        self.last_train_loss = math.nan
        self.last_train_accuracy = math.nan
        self.last_val_loss = math.nan
        self.last_val_accuracy = math.nan
        self.last_val_step = -1  # the optimizer step the last validation saw

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self.net = TransformerEMB(self.config.model)
        if self.load_init and self.config.init != SCRATCH:
            self.init_report = init_from_pretrained(self.net, self.config.init)
        seq_len, batch_size = self.config.data.seq_len, self.config.data.batch_size
        # Two views per pair; the head runs at one position per view, counted as if at every one.
        self.flops_per_batch = self.net.flops_per_token(seq_len) * seq_len * 2 * batch_size
        if self.config.train.compile:
            self.net.compile_blocks()

    def embed_pairs(self, ids_a, pos_a, ids_b, pos_b) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views' embeddings in one forward pass, as Aria stacks them."""
        z = self.net.embed(torch.cat([ids_a, ids_b]), torch.cat([pos_a, pos_b]))
        return z[: len(ids_a)], z[len(ids_a) :]

    def training_step(self, dataloader_iter) -> torch.Tensor:
        batch, _, _ = next(dataloader_iter)  # (batch, batch_idx, dataloader_idx); StopIteration ends the epoch
        ids_a, pos_a, ids_b, pos_b = (t.to(self.device, non_blocking=True) for t in batch[:4])
        za, zb = self.embed_pairs(ids_a, pos_a, ids_b, pos_b)
        loss = nt_xent(za, zb, self.config.tau)
        step_sums = torch.stack([loss.detach(), retrieval_hits(za.detach(), zb.detach()).float()])
        self._sums = step_sums if self._micro_batches == 0 else self._sums + step_sums
        self._micro_batches += 1
        self._rows += len(ids_a)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Every micro-batch of this step is done: record their mean loss and the hit rate over
        # ranks, and the lr the step uses, before the scheduler moves it.
        local = torch.stack([self._sums[0] / self._micro_batches, self._sums[1],
                             torch.tensor(float(self._rows), device=self._sums.device)])
        loss, hits, rows = self.trainer.strategy.reduce(local, reduce_op="sum").tolist()
        self.last_train_loss = loss / self.trainer.world_size
        self.last_train_accuracy = hits / max(rows, 1)
        self.last_lr = optimizer.param_groups[0]["lr"]
        self._micro_batches, self._rows = 0, 0
        self.log_dict({"train/loss": self.last_train_loss, "train/retrieval_acc": self.last_train_accuracy,
                       "train/lr": self.last_lr}, on_step=True, on_epoch=False,
                      batch_size=self.config.data.batch_size)

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx) -> None:
        ids_a, pos_a, ids_b, pos_b = batch[:4]
        za, zb = self.embed_pairs(ids_a, pos_a, ids_b, pos_b)
        values = [nt_xent(za, zb, self.config.tau), torch.ones((), device=self.device),
                  retrieval_hits(za, zb), torch.tensor(len(ids_a), device=self.device)]
        self._val = self._val + torch.stack([v.double() for v in values])

    def on_validation_epoch_end(self) -> None:
        loss_sum, batches, hits, rows = self.trainer.strategy.reduce(self._val, reduce_op="sum").tolist()
        if not batches:
            return
        # Aria averages the per-batch losses; the hit rate is over every validation pair.
        self.last_val_loss = loss_sum / batches
        self.last_val_accuracy = hits / rows
        self.last_val_step = self.trainer.global_step
        self.log_dict({"val/loss": self.last_val_loss, "val/retrieval_acc": self.last_val_accuracy}, sync_dist=False)

    def configure_optimizers(self):
        optimizer = adamw(self.parameters(), self.config.optim)
        scheduler = warmup_linear_decay(optimizer, self.config.optim, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
