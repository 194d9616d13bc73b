"""The training data module over real token shards: coverage, Aria's windows, augmentation, determinism, resume."""

import json
import math
import shutil

import lightning.pytorch as pl
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from aria_model.data import (
    AriaDataModule,
    ResumableLoader,
    TokenWindows,
    WindowConfig,
    concat_windows,
    file_windows,
    loader_position,
    redraw_prefix_and_dim,
)
from aria_model.midi import load_midi
from aria_model.shards import MANIFEST_FILE, ShardConfig, build_token_shards, shard_paths
from aria_model.tokenizer import AbsTokenizer
from tests.conftest import GOLDEN_DIR
from tests.test_shards import make_curated_home

TOKENIZER = AbsTokenizer()
PAD, BOS, DIM = TOKENIZER.pad_id, TOKENIZER.bos_id, TOKENIZER.dim_id
# Small row groups: the train split has as many units as 2 ranks x 2 workers have slots.
# Seed 1 puts 6 of the 10 curated files (5 pieces) in train and 4 in val.
SHARDS = ShardConfig(shard_tokens=8_000, row_group_tokens=500, split_fractions=(0.6, 0.4, 0.0), seed=1,
                     workers=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    curated = make_curated_home(tmp_path_factory.mktemp("data") / "home")
    build_token_shards(curated.inputs, curated.home / "token_shards", SHARDS)
    return curated.home / "token_shards"


def stored(root, split) -> list[tuple[str, np.ndarray]]:
    """(file_id, ids) of every row of a split, in shard order."""
    rows = []
    for path in shard_paths(root, split):
        table = pq.read_table(path).to_pydict()
        rows += [(fid, np.array(ids, np.uint16)) for fid, ids in zip(table["file_id"], table["ids"])]
    return rows


def canonical(ids: np.ndarray) -> bytes:
    """A file's ids with the per-epoch draws undone: padding cut, prefix sorted, <D> removed."""
    ids = np.asarray(ids)
    ids = ids[: len(ids) - int(np.argmax(ids[::-1] != PAD))]
    bos = int(np.argmax(ids == BOS))
    rest = ids[bos:]
    return np.concatenate([np.sort(ids[:bos]), rest[rest != DIM]]).astype(np.uint16).tobytes()


def sources(windows: TokenWindows, num_workers: int = 0) -> list[torch.Tensor]:
    return [src for src, _, _ in DataLoader(windows, batch_size=None, num_workers=num_workers)]


# -- sharding work across ranks and workers -------------------------------------------------


def test_every_file_is_seen_once_per_epoch_across_two_ranks_and_two_workers(root):
    file_of = {canonical(ids): fid for fid, ids in stored(root, "train")}
    assert len(file_of) >= 5 and len(TokenWindows(root, "train").units) >= 4  # work for every slot
    longest = max(len(ids) for _, ids in stored(root, "train"))
    config = WindowConfig(seq_len=longest + 1, sep_sequences=True, augment=False)  # one window per file
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            windows = TokenWindows(root, "train", config, rank=rank, world_size=2)
            windows.set_epoch(epoch)
            seen += [file_of[canonical(src.numpy())] for src in sources(windows, num_workers=2)]
        assert sorted(seen) == sorted(file_of.values())
        orders.append(seen)
    assert orders[0] != orders[1]  # a fresh shuffle each epoch


def test_batches_per_rank_counts_what_each_rank_loads(root):
    for rank in (0, 1):
        windows = TokenWindows(root, "train", WindowConfig(seq_len=300), rank=rank, world_size=2)
        loaded = sum(1 for _ in DataLoader(windows, batch_size=4, num_workers=2))
        assert loaded == windows.batches_per_rank(batch_size=4, num_workers=2)[rank]


# -- Aria's windows -----------------------------------------------------------------------------


def test_window_cutters_on_small_sequences():
    files = [np.array([10, 11], np.uint16), np.array([20, 21, 22, 23], np.uint16)]
    assert [w.tolist() for w in concat_windows(files, 3, PAD)] == [[10, 11, 20], [21, 22, 23]]
    assert [w.tolist() for w in concat_windows(files, 5, PAD)] == [[10, 11, 20, 21, 22], [23, PAD, PAD, PAD, PAD]]
    assert [w.tolist() for w in file_windows(files, 3, PAD)] == [[10, 11, PAD], [20, 21, 22], [23, PAD, PAD]]


def test_concat_mode_cuts_one_stream_into_full_windows_and_pads_the_last(root):
    seq_len = 1000
    windows = sources(TokenWindows(root, "val", WindowConfig.for_split("val", seq_len=seq_len)))
    stream = np.concatenate([ids for _, ids in stored(root, "val")])
    assert len(windows) == math.ceil(len(stream) / seq_len) and {len(w) for w in windows} == {seq_len}
    joined = torch.cat(windows).numpy()
    assert np.array_equal(joined[: len(stream)], stream) and (joined[len(stream) :] == PAD).all()


def test_per_file_mode_starts_every_file_in_a_new_window(root):
    seq_len = 1000
    windows = sources(TokenWindows(root, "val", WindowConfig.for_split("val", seq_len=seq_len, sep_sequences=True)))
    expected = []
    for _, ids in stored(root, "val"):
        for start in range(0, len(ids), seq_len):
            chunk = ids[start : start + seq_len]
            expected.append(np.concatenate([chunk, np.full(seq_len - len(chunk), PAD, np.uint16)]))
    assert len(windows) == len(expected)
    assert all(np.array_equal(w.numpy(), e) for w, e in zip(windows, expected))


def test_target_is_the_input_shifted_with_pad_appended_and_the_mask_hides_pad(root):
    for split in ("train", "val"):
        examples = list(TokenWindows(root, split, WindowConfig.for_split(split, seq_len=700)))
        for source, target, mask in examples:
            assert source.dtype == target.dtype == torch.int64 and mask.dtype == torch.bool
            assert torch.equal(target[:-1], source[1:]) and target[-1] == PAD
            assert torch.equal(mask, target != PAD)
    last_source, _, last_mask = examples[-1]  # val's stream ends in a padded window
    assert (last_source == PAD).sum() > 0 and (~last_mask).sum() == (last_source == PAD).sum() + 1


def test_redraw_gives_the_tokenizers_own_prefix_orders_and_dim_positions():
    perf = load_midi(GOLDEN_DIR / "midi" / "pop.mid", metadata={"composer": "chopin", "genre": "jazz"})
    deterministic = TOKENIZER.tokenize_ids(perf)
    n_prefix = int(np.argmax(deterministic == BOS))
    assert n_prefix == 8 and (deterministic == DIM).sum() == 1

    def draw(ids):
        return tuple(ids[:n_prefix].tolist()), int(np.flatnonzero(ids == DIM)[0])

    ours = [draw(redraw_prefix_and_dim(deterministic, TOKENIZER, np.random.default_rng(s))) for s in range(400)]
    theirs = [draw(TOKENIZER.tokenize_ids(perf, rng=np.random.default_rng(s))) for s in range(400)]
    assert {position for _, position in ours} == {position for _, position in theirs}
    assert len({prefix for prefix, _ in ours}) > 300  # shuffled, not a few fixed orders
    redrawn = redraw_prefix_and_dim(deterministic, TOKENIZER, np.random.default_rng(0))
    assert canonical(redrawn) == canonical(deterministic) and len(redrawn) == len(deterministic)

    short = TOKENIZER.tokenize_ids(load_midi(GOLDEN_DIR / "midi" / "edge_velocity.mid"))
    assert np.array_equal(redraw_prefix_and_dim(short, TOKENIZER, np.random.default_rng(0)), short)  # no <D>


# -- augmentation and determinism -----------------------------------------------------------


def test_augmentation_changes_training_windows_and_never_val(root):
    def windows(split, **settings):
        return sources(TokenWindows(root, split, WindowConfig.for_split(split, seq_len=1000, **settings)))

    plain, augmented = windows("train", augment=False), windows("train", augment=True)
    assert len(plain) == len(augmented) and {len(w) for w in augmented} == {1000}
    assert sum(not torch.equal(a, p) for a, p in zip(augmented, plain)) > len(plain) // 2
    stream = np.concatenate([ids for _, ids in stored(root, "val")])
    val = torch.cat(windows("val", augment=True)).numpy()
    assert np.array_equal(val[: len(stream)], stream)  # stored ids, in order, untouched


def test_same_seed_and_epoch_give_the_same_windows(root):
    def windows(seed, epoch):
        dataset = TokenWindows(root, "train", WindowConfig(seq_len=500, seed=seed, shuffle_windows=8))
        dataset.set_epoch(epoch)
        return torch.stack(sources(dataset, num_workers=2))

    first = windows(seed=0, epoch=0)
    assert torch.equal(first, windows(seed=0, epoch=0))
    assert not torch.equal(first, windows(seed=0, epoch=1))
    assert not torch.equal(first, windows(seed=1, epoch=0))


# -- resume -------------------------------------------------------------------------------------


def test_loader_position_follows_the_round_robin_over_workers_with_batches_left():
    assert loader_position([2, 5], 0) == ([0, 0], 0)
    assert loader_position([2, 5], 3) == ([2, 1], 1)
    assert loader_position([2, 5], 5) == ([2, 3], 1)
    assert loader_position([3, 1, 3], 5) == ([2, 1, 2], 0)
    assert loader_position([2, 2], 4) == ([2, 2], 0)


def test_resume_mid_epoch_goes_on_with_exactly_the_remaining_batches(root):
    def loader():
        return ResumableLoader(TokenWindows(root, "train", WindowConfig(seq_len=400, shuffle_windows=4)),
                               batch_size=3, num_workers=2)

    uninterrupted = loader()
    [b for b in uninterrupted]
    epoch1 = [source for source, _, _ in uninterrupted]
    assert uninterrupted.state_dict() == {"epoch": 2, "batches": 0}
    per_worker = [math.ceil(w / 3) for w in uninterrupted.dataset.windows_per_worker(2)]
    assert per_worker[0] != per_worker[1]  # so one worker runs out first
    after_one_is_done = 2 * min(per_worker) + 1
    for done in (1, 4, after_one_is_done, len(epoch1) - 1):
        resumed = loader()
        resumed.load_state_dict({"epoch": 1, "batches": done})
        rest = [source for source, _, _ in resumed]
        assert len(rest) == len(epoch1) - done
        assert all(torch.equal(a, b) for a, b in zip(rest, epoch1[done:]))

    partial = loader()
    batches = iter(partial)
    for _ in range(5):
        next(batches)
    assert partial.state_dict() == {"epoch": 0, "batches": 5}


class NextToken(pl.LightningModule):
    """The smallest model that consumes (input, target, mask) like Aria's training step."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(TOKENIZER.vocab_size, 8)
        self.head = torch.nn.Linear(8, TOKENIZER.vocab_size)

    def loss(self, batch):
        source, target, mask = batch
        losses = F.cross_entropy(self.head(self.embed(source)).flatten(0, 1), target.flatten(), reduction="none")
        return (losses * mask.flatten()).sum() / mask.sum()

    def training_step(self, batch, _):
        return self.loss(batch)

    def validation_step(self, batch, _):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_refuses_an_empty_train_split_instead_of_looping(root, tmp_path):
    empty = tmp_path / "token_shards"
    shutil.copytree(root.resolve(), empty)
    manifest = json.loads((empty / MANIFEST_FILE).read_text())
    manifest["splits"]["train"]["shards"] = []
    (empty / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="train split yields nothing"):
        AriaDataModule(empty, seq_len=256, batch_size=2, num_workers=1).setup()


def test_datamodule_trains_validates_and_checkpoints_the_loader_position(root, tmp_path):
    def trainer(max_steps, checkpoints):
        every_3_steps = ModelCheckpoint(dirpath=checkpoints, filename="{step}", every_n_train_steps=3, save_top_k=-1)
        return pl.Trainer(max_steps=max_steps, use_distributed_sampler=False, accelerator="cpu", logger=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=[every_3_steps],
                          num_sanity_val_steps=0, limit_val_batches=2, default_root_dir=tmp_path)

    model, data = NextToken(), AriaDataModule(root, seq_len=256, batch_size=2, num_workers=1)
    first = trainer(max_steps=3, checkpoints=tmp_path / "first")
    first.fit(model, datamodule=data)
    assert first.validate(model, datamodule=data)[0]["val_loss"] > 0
    checkpoint = tmp_path / "first" / "step=3.ckpt"
    (saved,) = torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert saved["epoch"] == 0 and saved["batches"] in (3, 4)  # Lightning may have fetched one batch ahead

    second = trainer(max_steps=5, checkpoints=tmp_path / "second")
    second.fit(NextToken(), datamodule=AriaDataModule(root, seq_len=256, batch_size=2, num_workers=1),
               ckpt_path=checkpoint)
    assert second.global_step == 5
    assert second.train_dataloader.state_dict()["batches"] >= saved["batches"] + 2
