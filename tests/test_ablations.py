"""Ablation sweeps: nested piece-disjoint subsets, rel shards with the abs shards' notes, loss per note,
and one sweep end to end at micro scale (its summary and its MLflow runs)."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aria_model.ablations import (
    ProbeSettings,
    SweepTracking,
    contrastive_epochs_sweep,
    in_fraction,
    note_count,
    retokenized_shards,
    subset_shards,
    summed_loss,
    validation_loss_per_note,
)
from aria_model.model import ModelConfig, TransformerLM
from aria_model.probe_data import PROBE_SCHEMA, ProbeDataset
from aria_model.rel_tokenizer import RelTokenizer
from aria_model.shards import SHARD_SCHEMA, SPLITS, ShardConfig, build_token_shards, read_manifest, shard_paths
from aria_model.tokenizer import AbsTokenizer
from aria_model.tracking import Tracker
from aria_model.training.contrastive import ContrastiveConfig
from aria_model.training.lm_module import masked_loss_sum
from tests.test_shards import make_curated_home

SHARDS = ShardConfig(shard_tokens=8_000, row_group_tokens=500, split_fractions=(0.6, 0.4, 0.0), seed=1, workers=1)
MICRO = ModelConfig(d_model=32, n_heads=2, n_layers=1, ffn_hidden=64, max_seq_len=128, emb_size=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny training steps throughout


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    curated = make_curated_home(tmp_path_factory.mktemp("ablations") / "home")
    build_token_shards(curated.inputs, curated.home / "token_shards", SHARDS)
    return curated.home


def _rows(root: Path, split: str) -> list[dict]:
    return [row for path in shard_paths(root, split) for row in pq.read_table(path).to_pylist()]


# -- subsets -------------------------------------------------------------------------------------


def test_fractions_are_nested_and_cover_about_their_share():
    clusters = [f"piece-{i}" for i in range(4000)]
    kept = {f: {c for c in clusters if in_fraction(c, f)} for f in (0.1, 0.25, 0.5, 1.0)}
    assert kept[0.1] <= kept[0.25] <= kept[0.5] <= kept[1.0] == set(clusters)
    for fraction, members in kept.items():
        assert abs(len(members) / len(clusters) - fraction) < 0.03


def test_subset_shards_keep_whole_clusters_of_the_train_split_and_the_full_val_split(home, tmp_path):
    full = home / "token_shards"
    subsets = {f: subset_shards(full, tmp_path / str(f), f) for f in (0.1, 0.25, 0.5)}
    train_clusters = {}
    for fraction, root in subsets.items():
        rows = _rows(root, "train")
        clusters = {row["cluster_id"] for row in rows}
        train_clusters[fraction] = {row["file_id"] for row in rows}
        # whole clusters: every train file of a kept cluster is there
        assert {row["file_id"] for row in _rows(full, "train") if row["cluster_id"] in clusters} == \
            train_clusters[fraction]
        assert all(in_fraction(c, fraction) for c in clusters)
        assert _rows(root, "val") == _rows(full, "val")
        val_clusters = {row["cluster_id"] for row in _rows(root, "val")}
        assert not clusters & val_clusters  # piece-disjoint
        manifest = read_manifest(root)
        assert manifest["splits"]["train"]["files"] == len(rows)
        assert manifest["tokenizer"] == read_manifest(full)["tokenizer"]
    assert train_clusters[0.1] <= train_clusters[0.25] <= train_clusters[0.5]


# -- rel shards ----------------------------------------------------------------------------------


def test_rel_shards_decode_to_the_notes_of_the_abs_shards(home, tmp_path):
    full = home / "token_shards"
    rel_root = retokenized_shards(full, tmp_path / "rel", "rel")
    abs_root = retokenized_shards(full, tmp_path / "abs", "abs")
    absolute, relative = AbsTokenizer(), RelTokenizer()
    assert read_manifest(rel_root)["tokenizer"]["name"] == "rel"
    for split in SPLITS:
        source, rel, again = _rows(full, split), _rows(rel_root, split), _rows(abs_root, split)
        assert [r["file_id"] for r in rel] == [r["file_id"] for r in source]
        for src, r, a in zip(source, rel, again):
            want = absolute.detokenize_ids(np.array(src["ids"]))
            got = relative.detokenize_ids(np.array(r["ids"]))
            for field in ("onset_ms", "pitch", "velocity"):
                want_values = want.onset_ms(False) if field == "onset_ms" else getattr(want, field)
                got_values = got.onset_ms(False) if field == "onset_ms" else getattr(got, field)
                np.testing.assert_array_equal(got_values, want_values)
            np.testing.assert_array_equal(got.end_tick - got.start_tick, want.end_tick - want.start_tick)
            assert relative.dim_id not in r["ids"]
            # the abs arm is the stored ids less their <D>
            assert a["ids"] == [i for i in src["ids"] if i != absolute.dim_id]


# -- loss per note -------------------------------------------------------------------------------


def test_note_count_counts_one_token_per_note_in_either_tokenizer(home):
    abs_tok, rel_tok = AbsTokenizer(), RelTokenizer()
    row = _rows(home / "token_shards", "train")[0]
    perf = abs_tok.detokenize_ids(np.array(row["ids"]))
    assert note_count(row["ids"], abs_tok) == perf.n_notes == note_count(rel_tok.tokenize_ids(perf), rel_tok)


def test_validation_loss_per_note_on_a_hand_built_case(tmp_path):
    """A model whose logits are all zero predicts every token with probability 1/V: the summed loss
    is log(V) per predicted token, and per note that sum over the notes."""
    torch.manual_seed(0)
    model = TransformerLM(replace(MICRO, emb_size=None)).eval()
    torch.nn.init.zeros_(model.lm_head.weight)
    vocab = MICRO.vocab_size
    inputs = torch.tensor([[5, 6, 7, 8], [9, 10, 3, 3]])
    targets = torch.tensor([[6, 7, 8, 9], [10, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])  # 5 predicted tokens
    total, count = summed_loss(model, iter([(inputs, targets, mask)]))
    assert count == 5 and total == pytest.approx(5 * math.log(vocab), rel=1e-5)
    with torch.no_grad():
        logits = model(inputs)
    assert float(masked_loss_sum(logits, targets, mask)[0]) == pytest.approx(total, rel=1e-6)

    # The same through a one-file shard set: every token after the first is predicted once.
    tok = AbsTokenizer()
    notes = [tok.layout.note + i for i in range(3)]
    ids = [tok.bos_id, notes[0], tok.layout.onset, tok.layout.dur + 1, notes[1], tok.layout.onset + 2,
           tok.layout.dur + 1, notes[2], tok.layout.onset + 4, tok.layout.dur + 1, tok.eos_id]
    root = _one_file_shards(tmp_path, ids)
    result = validation_loss_per_note(model, root, tok, seq_len=64)
    assert result["val_notes"] == 3 and result["val_tokens"] == len(ids) - 1
    assert result["val_loss_per_note"] == pytest.approx((len(ids) - 1) * math.log(vocab) / 3, rel=1e-5)
    assert result["val_loss_per_token"] == pytest.approx(math.log(vocab), rel=1e-5)


def _one_file_shards(tmp_path: Path, ids: list[int]) -> Path:
    root = tmp_path / "shards"
    (root / "val").mkdir(parents=True)
    table = pa.table({"file_id": ["f"], "cluster_id": ["c"], "ids": [ids], "n_tokens": [len(ids)],
                      "prefix_metadata": ["{}"]}, schema=SHARD_SCHEMA)
    pq.write_table(table, root / "val" / "shard-00000.parquet")
    empty = {"files": 0, "tokens": 0, "clusters": 0, "shards": []}
    val = {"files": 1, "tokens": len(ids), "clusters": 1,
           "shards": [{"name": "val/shard-00000.parquet", "rows": 1, "tokens": len(ids), "row_groups": 1}]}
    (root / "manifest.json").write_text(json.dumps({"splits": {"train": empty, "val": val, "test": empty}}))
    return root


# -- a sweep end to end --------------------------------------------------------------------------


def _probe_dataset(home: Path) -> ProbeDataset:
    """Two classes by file order, both in train and test: a probe that runs, not one that means much."""
    rows = _rows(home / "token_shards", "train") + _rows(home / "token_shards", "val")
    table = pa.Table.from_pylist([
        {"task": "style", "file_id": row["file_id"], "path": row["file_id"], "label": "ab"[i % 2],
         "split": "train" if i < len(rows) - 2 else "test", "cluster_id": row["cluster_id"]}
        for i, row in enumerate(rows)], schema=PROBE_SCHEMA)
    return ProbeDataset(table, {})


def test_contrastive_epochs_sweep_writes_one_row_and_one_mlflow_run_per_variant(home, tmp_path):
    torch.manual_seed(0)
    pretrained = tmp_path / "model.pt"
    lm = TransformerLM(replace(MICRO, emb_size=None))
    torch.save({"model_config": lm.config.to_dict(), "state_dict": lm.state_dict(), "step": 0}, pretrained)
    base = ContrastiveConfig.preset("tiny").with_overrides([
        "model.emb_size=32", "data.seq_len=128", "data.batch_size=4", "data.num_workers=0", "optim.warmup_steps=1",
        "train.val_every=0", "train.val_batches=1", "train.checkpoint_every=100"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = contrastive_epochs_sweep(home, pretrained, base, _probe_dataset(home), epochs=(0, 1), inits=("pretrained",),
                                      probe=ProbeSettings(tasks=("style",), epochs=2, seq_len=128),
                                      tracking=SweepTracking(tracking_uri=uri, experiment="ablations-test"),
                                      report=lambda line: None)
    summary = pq.read_table(home / "ablations" / "contrastive_epochs" / "summary.parquet").to_pylist()
    assert [(row["init"], row["epochs"]) for row in summary] == [("pretrained", 0), ("pretrained", 1)]
    assert all(0 <= row["style/accuracy"] <= 1 for row in summary)
    assert summary[0]["steps"] == 0 and summary[1]["steps"] > 0
    assert result.plot_path.stat().st_size > 0

    tracker = Tracker(uri)
    variants = tracker.compare_runs("ablations-test", f"tags.`mlflow.parentRunId` = '{result.mlflow_run_id}'",
                                    ["style/accuracy"])
    assert sorted(variants["params.ablation.epochs"]) == ["0", "1"]
    assert sorted(variants["run_id"]) == sorted(result.variant_run_ids)
    assert variants["metrics.style/accuracy"].notna().all()
    # the training run of the 1-epoch variant nests under its variant run
    trained = tracker.compare_runs("ablations-test", "attributes.run_name = 'contrastive-pretrained-e1'", [])
    assert len(trained) == 1
    artifacts = {f.path for f in tracker.client.list_artifacts(result.mlflow_run_id)}
    assert {"summary.parquet", "contrastive_epochs.png"} <= artifacts


def test_each_sweep_is_a_gpu_tagged_job_of_its_own_asset():
    from pipelines.definitions import defs
    from pipelines.jobs import GPU_TAGS

    for sweep in ("contrastive_epochs", "data_scale", "tokenizer"):
        job = defs.resolve_job_def(f"ablate_{sweep}")
        assert job.tags == GPU_TAGS
        assert [key.to_user_string() for key in job.asset_layer.executable_asset_keys] == [f"ablation_{sweep}"]
