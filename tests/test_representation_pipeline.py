"""The representation half materialized for real: demo corpus -> ... -> pretrain -> contrastive
(fine-tuned and from scratch, through Pipes) -> probe dataset -> probe eval, with a temporary
Dagster instance and a real MLflow sqlite store."""

import json
import shutil
from collections import defaultdict
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from aria_model.probe import RESULT_COLUMNS
from aria_model.probe_data import clusters_in_several_splits, read_probe_dataset
from aria_model.tracking import Tracker
from aria_model.tracking_names import TAG_INIT_RUN
from assets.probe_eval import METHODS
from pipelines.cli import demo_run_config, print_probe_results
from pipelines.definitions import ASSET_CHECKS, ASSETS, defs
from pipelines.jobs import GPU_TAGS, MAIN_JOB, full_job
from pipelines.resources import AriaHome, MidiSource, MlflowTracking
from tests.conftest import GOLDEN_DIR

# 8 pieces per collection: 4 style classes and reel/jig with 4+ pieces each.
PIECES_PER_COLLECTION = 8
# A trunk of 128 positions and a handful of steps: the chain, not the learning, is under test.
PRETRAIN = ["model.max_seq_len=128", "data.seq_len=128", "data.batch_size=2", "data.num_workers=0",
            "optim.warmup_steps=2", "train.max_steps=4", "train.val_every=4", "train.checkpoint_every=4",
            "train.val_batches=2"]
CONTRASTIVE = ["data.seq_len=128", "data.batch_size=4", "data.num_workers=0", "optim.warmup_steps=2",
               "train.max_steps=3", "train.val_every=3", "train.checkpoint_every=3", "train.val_batches=2"]
RUN_CONFIG = {"ops": {
    "demo_corpus": {"config": {"preset": "tiny", "pieces_per_collection": PIECES_PER_COLLECTION}},
    "midi_notes": {"config": {"workers": 1}},
    # 40 short pieces: a big validation share so the val split is never empty
    "token_shards": {"config": {"train_fraction": 0.6, "val_fraction": 0.4, "test_fraction": 0.0, "workers": 1}},
    "pretrained_model": {"config": {"preset": "tiny", "overrides": PRETRAIN}},
    "contrastive_model": {"config": {"preset": "tiny", "overrides": CONTRASTIVE}},
    "contrastive_scratch": {"config": {"preset": "tiny", "overrides": CONTRASTIVE}},
    "probe_dataset": {"config": {"min_per_class": 4}},
}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_demo_corpus):
    """``full`` materialized once on a small real demo corpus; yields (home, instance, resources, result)."""
    root = tmp_path_factory.mktemp("representation")
    home = root / "home"
    shutil.copytree(tiny_demo_corpus, home / "demo_corpus")  # its 15 pieces are reused, 25 more are built
    patch = pytest.MonkeyPatch()
    patch.delenv("ARIA_SOURCE", raising=False)
    patch.setenv("ARIA_HOME", str(home))
    resources = {"home": AriaHome(path=str(home)), "source": MidiSource(),
                 "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}"),
                 "pipes_client": dg.PipesSubprocessClient()}
    (root / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        result = dg.materialize([*ASSETS, *ASSET_CHECKS], resources=resources, instance=instance,
                                run_config=RUN_CONFIG, selection=full_job.selection)
        yield home, instance, resources, result
    patch.undo()


def _metadata(instance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def test_full_chain_writes_every_task_and_method(chain):
    home, instance, _, result = chain
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["no_piece_in_both_splits"] and checks["every_method_on_every_task"]
    assert checks["scratch_baseline_trained_as_long"]

    table = pq.read_table(home / "probe_eval" / "results.parquet")
    assert tuple(table.column_names[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    rows = table.to_pylist()
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("style", "tune_type") for m in METHODS}
    assert len(rows) == 2 * len(METHODS)
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 and r["n_train"] > 0 and r["n_test"] > 0
               for r in rows)
    for method in METHODS[:-1]:  # majority has no features
        embeddings = pq.read_table(home / "probe_eval" / "embeddings" / f"{method}.parquet")
        assert embeddings.column_names == ["file_id", "embedding", "n_chunks"]
    assert sorted(p.name for p in (home / "probe_eval" / "confusion").iterdir())[0] == "style__aria_contrastive.png"

    probe = _metadata(instance, "probe_eval")
    assert all(method in probe["results"] for method in METHODS)
    assert {"confusion_style", "confusion_tune_type"} <= set(probe)
    assert probe["handcrafted_excluded_blocks"] == "velocity" and probe["files_without_features"] == 0
    assert probe["models"]["aria_contrastive"]["steps"] == probe["models"]["contrastive_scratch"]["steps"] == 3
    dataset = _metadata(instance, "probe_dataset")
    assert "| style | bach | 8 |" in dataset["pieces_per_class"]
    assert "Below the 100-piece target" in dataset["below_target"] and dataset["labels"] == "demo_corpus"
    assert dataset["content_hash"] == probe["probe_dataset_hash"]


def test_probe_split_never_puts_a_piece_on_both_sides(chain):
    home = chain[0]
    dataset = read_probe_dataset(home / "probe_dataset" / "probe.parquet")  # also verifies the content hash
    assert not clusters_in_several_splits(dataset.table)
    splits = defaultdict(set)
    for row in dataset.table.to_pylist():
        splits[(row["task"], row["cluster_id"])].add(row["split"])
    assert all(len(s) == 1 for s in splits.values())
    for task in ("style", "tune_type"):
        assert {row["split"] for row in dataset.rows(task)} == {"train", "test"}


def test_contrastive_runs_carry_the_pretraining_lineage_in_mlflow(chain):
    home, instance, _, _ = chain
    pretrained = _metadata(instance, "pretrained_model")
    finetuned = _metadata(instance, "contrastive_model")
    scratch = _metadata(instance, "contrastive_scratch")
    assert finetuned[TAG_INIT_RUN] == pretrained["mlflow_run_id"]
    assert finetuned["init"] == pretrained["weights"] and scratch["init"] == "scratch"

    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}")
    run = tracker.client.get_run(finetuned["mlflow_run_id"])
    assert run.data.tags[TAG_INIT_RUN] == pretrained["mlflow_run_id"]
    assert run.data.params["init"] == pretrained["weights"]
    assert tracker.client.get_run(pretrained["mlflow_run_id"]).data.tags["dagster_run_id"] == \
        run.data.tags["dagster_run_id"]
    version = tracker.model_version("aria-embedding", 1)
    assert version.tags[TAG_INIT_RUN] == pretrained["mlflow_run_id"] and version.run_id == run.info.run_id
    scratch_run = tracker.client.get_run(scratch["mlflow_run_id"])
    assert TAG_INIT_RUN not in scratch_run.data.tags and scratch_run.data.params["init"] == "scratch"
    assert tracker.model_version("aria-embedding-scratch", 1).run_id == scratch_run.info.run_id

    probe_run = tracker.client.get_run(_metadata(instance, "probe_eval")["mlflow_run_id"])
    assert {f"style/{m}/accuracy" for m in METHODS} <= set(probe_run.data.metrics)
    assert probe_run.data.params["aria_contrastive.mlflow_run_id"] == finetuned["mlflow_run_id"]
    artifacts = {a.path for a in tracker.client.list_artifacts(probe_run.info.run_id)}
    assert {"results.parquet", "per_class.parquet", "probe_results.json", "confusion"} <= artifacts


def test_rerunning_probe_eval_gives_the_same_table(chain):
    home, instance, resources, _ = chain
    path = home / "probe_eval" / "results.parquet"
    before = pq.read_table(path).drop(["seconds"])
    embeddings = pq.read_table(home / "probe_eval" / "embeddings" / "aria_contrastive.parquet")
    rerun = dg.materialize([*ASSETS, *ASSET_CHECKS], resources=resources, instance=instance,
                           selection=dg.AssetSelection.assets("probe_eval"))
    assert rerun.success
    assert pq.read_table(path).drop(["seconds"]).equals(before)
    assert pq.read_table(home / "probe_eval" / "embeddings" / "aria_contrastive.parquet").equals(embeddings)


def test_demo_prints_the_probe_table(chain, capsys):
    print_probe_results(chain[0])
    out = capsys.readouterr().out
    assert all(method in out for method in METHODS)
    assert "style: bach 8" in out and "below 100 pieces per class" in out


def test_the_recipe_without_dagster_gives_the_asset_table(chain):
    """``aria_model.recipe`` on the home the pipeline built, without MLflow: its own models and table,
    the same methods as ``probe_eval``, the same baselines to the digit, and the asset's table untouched."""
    from aria_model.recipe import RecipeConfig, run_recipe

    home = chain[0]
    asset_table = (home / "probe_eval" / "results.parquet").read_bytes()
    path = run_recipe(RecipeConfig(home, "tiny", pretrain_overrides=tuple(PRETRAIN),
                                   contrastive_overrides=tuple(CONTRASTIVE), tracking=False), report=lambda line: None)
    assert path == home / "recipes" / "recipe-tiny" / "results.parquet"
    assert (home / "probe_eval" / "results.parquet").read_bytes() == asset_table
    assert {"pretrain", "aria_contrastive", "contrastive_scratch", "probes"} <= set(
        json.loads((path.parent / "timings.json").read_text()))
    for run in ("pretrain/recipe-tiny", "contrastive/recipe-tiny-aria_contrastive",
                "contrastive/recipe-tiny-contrastive_scratch"):
        assert (home / "models" / run / "model.pt").is_file()
    ours = {(r["task"], r["method"]): r for r in pq.read_table(path).to_pylist()}
    asset = {(r["task"], r["method"]): r for r in pq.read_table(home / "probe_eval" / "results.parquet").to_pylist()}
    assert set(ours) == set(asset) == {(t, m) for t in ("style", "tune_type") for m in METHODS}
    for key in asset:
        if key[1] in ("handcrafted", "majority"):  # no model: the same features, probe and seed
            assert {c: ours[key][c] for c in RESULT_COLUMNS} == {c: asset[key][c] for c in RESULT_COLUMNS}


def test_jobs_and_the_demo_config():
    selections = {job: {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.executable_asset_keys}
                  for job in ("finetune", "evaluate", MAIN_JOB)}
    assert selections["finetune"] == {"contrastive_model", "contrastive_scratch"}
    assert selections["evaluate"] == {"probe_dataset", "probe_eval"}
    assert selections["finetune"] | selections["evaluate"] | {"pretrained_model", "token_shards"} <= selections[MAIN_JOB]
    for job in ("finetune", "evaluate", MAIN_JOB):
        assert GPU_TAGS.items() <= defs.resolve_job_def(job).tags.items()
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("pretrained_model") not in graph.get(dg.AssetKey("contrastive_scratch")).parent_keys
    demo = demo_run_config()["ops"]
    assert demo["contrastive_model"] == demo["contrastive_scratch"]  # the baseline trains as long
    assert "demo_corpus" not in demo and demo_run_config(probe_corpus=True)["ops"]["demo_corpus"]


def test_user_eval_splits_are_probed_as_given(chain, tmp_path):
    """Aria's eval-splits layout: splits kept as given, a file the corpus lacks is parsed from disk,
    an unreadable one is reported and left out; velocity stays in the handcrafted features."""
    home, instance, resources, _ = chain
    demo = read_probe_dataset(home / "probe_dataset" / "probe.parquet").rows("style")
    chosen = {label: [r for r in demo if r["label"] == label][:5] for label in ("bach", "irish")}
    splits: dict[str, dict[str, str]] = {"train": {}, "test": {}}
    for label, rows in chosen.items():
        for i, row in enumerate(rows):
            relpath = f"{label}/{i}.mid"
            (tmp_path / label).mkdir(exist_ok=True)
            shutil.copy(row["path"], tmp_path / relpath)
            splits["train" if i < 4 else "test"][relpath] = label
    shutil.copy(GOLDEN_DIR / "midi" / "bwv66.6.mxl.mid", tmp_path / "outside_corpus.mid")
    splits["train"]["outside_corpus.mid"] = "bach"
    (tmp_path / "broken.mid").write_bytes(b"not a MIDI file")
    splits["train"]["broken.mid"] = "irish"
    (tmp_path / "metadata.json").write_text(json.dumps({"genre": splits}))

    config = {"ops": {"probe_dataset": {"config": {"eval_splits": str(tmp_path)}}}}
    result = dg.materialize([*ASSETS, *ASSET_CHECKS], resources=resources, instance=instance, run_config=config,
                            selection=dg.AssetSelection.assets("probe_dataset", "probe_eval"))
    assert result.success
    dataset = _metadata(instance, "probe_dataset")
    assert dataset["labels"] == f"eval_splits:{tmp_path.resolve()}" and dataset["unreadable_files"] == 1
    assert "| genre | bach | 6 | 5 | 1 |" in dataset["pieces_per_class"]  # 4 + the outside file in train
    probe = _metadata(instance, "probe_eval")
    assert probe["files_without_features"] == 1 and probe["handcrafted_excluded_blocks"] == "none"
    rows = pq.read_table(home / "probe_eval" / "results.parquet").to_pylist()
    assert {(r["task"], r["method"]) for r in rows} == {("genre", m) for m in METHODS}
    assert all(r["n_train"] == 9 and r["n_test"] == 2 for r in rows)  # 4 + 4 + the outside file; broken left out
    assert sorted(p.name for p in (home / "probe_eval" / "confusion").iterdir())[0] == "genre__aria_contrastive.png"
