"""MLflow lineage and metrics against a real sqlite store: runs, params, dataset inputs, plots,
registry, comparison, and the Dagster resource.

One store serves the module (creating its schema takes about a second); each test uses its own
experiment or Dagster run id. dagster and torch are imported inside the tests that need them, so
that the spawned processes of the race test start quickly.
"""

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.image
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from aria_model.atomic_io import write_json_atomic
from aria_model.shards import MANIFEST_FILE, set_id
from aria_model.tracking import (
    Tracker,
    flatten_params,
    git_state,
    run_url,
    sqlite_uri,
)
from aria_model.tracking_names import (
    ARTIFACTS_DIR,
    TAG_ASSET,
    TAG_DAGSTER_RUN,
    TAG_GIT_COMMIT,
    TAG_MANIFEST_HASH,
    TAG_RUN_KIND,
    TAG_SHARD_FILES,
    TAG_SOURCE_RUN,
    TAG_TOKENIZER_HASH,
    TRACKING_URI_ENV,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aria_home")


@pytest.fixture(scope="module")
def tracker(home) -> Tracker:
    return Tracker(sqlite_uri(home))


def _run(tracker: Tracker, experiment: str, name: str = "run") -> str:
    return tracker.client.create_run(tracker.experiment_id(experiment), run_name=name).info.run_id


def _log_curve(tracker: Tracker, run_id: str, key: str, values: list[float]) -> None:
    for step, value in enumerate(values):
        tracker.log_metrics(run_id, {key: value}, step=step)


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and matplotlib.image.imread(path).shape[0] > 100


def test_default_store_is_in_the_data_home_and_nothing_lands_in_cwd(home, tracker, tmp_path, monkeypatch):
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    local = Tracker(home=home)
    assert local.tracking_uri == tracker.tracking_uri == f"sqlite:///{home.resolve()}/mlflow.db"
    experiment = local.client.get_experiment(local.experiment_id("cwd-check"))
    assert experiment.artifact_location == str(home.resolve() / ARTIFACTS_DIR / "cwd-check")
    with local.open_run("plot", experiment="cwd-check") as run_id:
        _log_curve(local, run_id, "train/loss", [3.0, 2.0])
        local.log_loss_curve(run_id)
    assert list(tmp_path.iterdir()) == []
    assert (Path(experiment.artifact_location) / run_id / "artifacts" / "loss_curve.png").exists()

    elsewhere = Tracker(tracker.tracking_uri, artifact_root=str(tmp_path / "bucket"))
    assert elsewhere.client.get_experiment(elsewhere.experiment_id("my runs")).artifact_location == str(
        tmp_path / "bucket" / "my_runs")

    monkeypatch.setenv(TRACKING_URI_ENV, tracker.tracking_uri)
    assert Tracker().tracking_uri == tracker.tracking_uri
    with pytest.raises(ValueError, match="no MLflow tracking URI"):
        monkeypatch.delenv(TRACKING_URI_ENV)
        Tracker()


def test_parent_per_dagster_run_and_nested_runs(tracker):
    parent = tracker.ensure_parent_run("nesting", "dagster-run-1", run_name="ingest-dagster-")
    assert tracker.ensure_parent_run("nesting", "dagster-run-1") == parent
    assert tracker.ensure_parent_run("nesting", "dagster-run-2") != parent

    asset_tags = {TAG_ASSET: "token_shards"}
    with tracker.open_run("token_shards", parent_run_id=parent, kind="asset", tags=asset_tags) as child:
        # A script's run inside the asset's: it ends first, so the asset's run exists throughout.
        with tracker.open_run("train", parent_run_id=child, kind="training") as grandchild:
            tracker.log_metrics(grandchild, {"train/loss": 1.0})
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.open_run("opus_dedup", parent_run_id=parent, kind="asset") as failed:
            raise RuntimeError("boom")

    runs = {run_id: tracker.client.get_run(run_id) for run_id in (parent, child, grandchild, failed)}
    assert runs[parent].data.tags[TAG_RUN_KIND] == "dagster_run"
    assert runs[parent].info.status == "RUNNING"  # until the Dagster run ends
    assert runs[child].data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert runs[grandchild].data.tags[MLFLOW_PARENT_RUN_ID] == child
    assert {runs[r].data.tags[TAG_DAGSTER_RUN] for r in runs} == {"dagster-run-1"}
    assert runs[child].data.tags[TAG_ASSET] == "token_shards" and runs[child].info.run_name == "token_shards"
    assert runs[grandchild].data.tags[TAG_RUN_KIND] == "training"
    assert [runs[r].info.status for r in (child, grandchild, failed)] == ["FINISHED", "FINISHED", "FAILED"]
    state = git_state()
    assert state is None or runs[child].data.tags[TAG_GIT_COMMIT] == state[0]

    assert tracker.end_parent_run("nesting", "dagster-run-1", success=True) == parent
    assert tracker.client.get_run(parent).info.status == "FINISHED"
    assert tracker.end_parent_run("nesting", "never-ran", success=True) is None


def _parent_from_new_process(tracking_uri: str, dagster_run_id: str, start, results) -> None:
    start.wait()  # both processes open the new store and ask for the parent at the same moment
    results.put(Tracker(tracking_uri).ensure_parent_run("race", dagster_run_id))


def test_processes_starting_together_share_one_parent_run(tmp_path):
    uri = sqlite_uri(tmp_path)  # a fresh store: its schema migration races too
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_parent_from_new_process, args=(uri, "dagster-run-race", start, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    ids = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert ids[0] == ids[1]
    tracker = Tracker(uri)
    assert len(tracker.client.search_runs([tracker.experiment_id("race")])) == 1


@dataclass
class _Optimizer:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class _TrainConfig:
    preset: str = "tiny"
    optimizer: _Optimizer = field(default_factory=_Optimizer)
    extra: dict = field(default_factory=lambda: {"note": "x" * (MAX_PARAM_VAL_LENGTH + 50), "nested": {"k": 1}})


def test_nested_config_becomes_flat_params_within_mlflow_limits(tracker):
    flat = flatten_params(_TrainConfig())
    assert flat["preset"] == "tiny" and flat["optimizer.lr"] == "0.0003" and flat["optimizer.betas"] == "(0.9, 0.95)"
    assert flat["extra.nested.k"] == "1"
    assert len(flat["extra.note"]) == MAX_PARAM_VAL_LENGTH
    assert flat["extra.note"].endswith(f"[{MAX_PARAM_VAL_LENGTH + 50} chars]")
    with pytest.raises(TypeError):
        flatten_params(3)

    run_id = _run(tracker, "params")
    many = {"config": _TrainConfig(), "layers": {f"layer_{i:03d}": i for i in range(250)}}  # over MLflow's 100 per call
    logged = tracker.log_params(run_id, many)
    params = tracker.client.get_run(run_id).data.params
    assert params == logged and len(params) == 255
    assert params["config.optimizer.lr"] == "0.0003" and params["layers.layer_249"] == "249"


def _shard_set(folder: Path) -> dict:
    """A token-shard manifest as aria_model.shards writes it (the parts lineage reads)."""
    shard = {"rows": 3, "tokens": 300, "row_groups": 1, "sha256": "ab" * 32}
    manifest = {
        "format_version": 2,
        "tokenizer": {"name": "abs", "config_hash": "4a0e25b36a242769", "vocab_size": 17727},
        "splits": {
            "train": {"files": 5, "tokens": 500, "clusters": 4, "shards": [
                {"name": "train/shard-00000.parquet", **shard}, {"name": "train/shard-00001.parquet", **shard,
                                                                  "rows": 2, "tokens": 200}]},
            "val": {"files": 1, "tokens": 90, "clusters": 1, "shards": [
                {"name": "val/shard-00000.parquet", **shard, "rows": 1, "tokens": 90}]},
            "test": {"files": 0, "tokens": 0, "clusters": 0, "shards": []},
        },
        "build": {"mode": "full"},
    }
    folder.mkdir(parents=True)
    write_json_atomic(manifest, folder / MANIFEST_FILE)
    return manifest


def test_shard_manifest_is_recorded_as_the_runs_dataset_input(tracker, tmp_path):
    manifest = _shard_set(tmp_path / ".token_shards" / "set")
    (tmp_path / "token_shards").symlink_to(Path(".token_shards") / "set")
    run_id = _run(tracker, "lineage")
    digest = tracker.log_shard_manifest(run_id, tmp_path / "token_shards")
    assert digest == set_id(manifest)

    run = tracker.client.get_run(run_id)
    (logged,) = run.inputs.dataset_inputs
    assert logged.dataset.name == "token_shards" and logged.dataset.digest == digest
    assert str(tmp_path / ".token_shards" / "set") in logged.dataset.source  # the set itself, not the link
    assert '"num_rows": 3' in logged.dataset.profile  # one row per shard
    input_tags = {tag.key: tag.value for tag in logged.tags}
    assert input_tags[MLFLOW_DATASET_CONTEXT] == "training" and input_tags[TAG_MANIFEST_HASH] == digest
    assert run.data.tags[TAG_MANIFEST_HASH] == digest and run.data.tags[TAG_SHARD_FILES] == "6"
    assert run.data.tags[TAG_TOKENIZER_HASH] == "4a0e25b36a242769"


def test_loss_curve_is_logged_as_a_png_artifact(tracker, tmp_path):
    run_id = _run(tracker, "curves")
    assert tracker.log_loss_curve(run_id) is None  # nothing logged yet: no empty plot
    _log_curve(tracker, run_id, "train/loss", [9.0, 6.0, 4.5, 3.9, 3.5])
    tracker.log_metrics(run_id, {"val/loss": 5.0}, step=2)
    tracker.log_metrics(run_id, {"val/loss": 4.1}, step=4)
    assert tracker.log_loss_curve(run_id) == "loss_curve.png"
    assert tracker.metric_history(run_id, "val/loss") == [(2, 5.0), (4, 4.1)]

    assert [a.path for a in tracker.client.list_artifacts(run_id)] == ["loss_curve.png"]
    local = tracker.client.download_artifacts(run_id, "loss_curve.png", str(tmp_path))
    assert _is_png(Path(local))


def test_checkpoint_is_registered_with_lineage_and_loads_back(tracker, tmp_path):
    import torch

    model = torch.nn.Linear(4, 2)
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    parent = tracker.ensure_parent_run("registry", "dagster-run-registry")
    with tracker.open_run("train", parent_run_id=parent, kind="training") as run_id:
        tracker.client.set_tag(run_id, TAG_MANIFEST_HASH, "0123456789abcdef")
        first = tracker.register_checkpoint(run_id, checkpoint, "aria-test")
        second = tracker.register_checkpoint(run_id, checkpoint, "aria-test", artifact_path="again", alias="champion")
    assert (first.version, second.version) == (1, 2)

    version = tracker.model_version("aria-test", "champion")
    assert version.version == 2 and version.run_id == run_id
    assert version.tags[TAG_SOURCE_RUN] == run_id
    assert version.tags[TAG_DAGSTER_RUN] == "dagster-run-registry"
    assert version.tags[TAG_MANIFEST_HASH] == "0123456789abcdef"
    state = git_state()
    assert state is None or version.tags[TAG_GIT_COMMIT] == state[0]

    folder = tracker.download_checkpoint("aria-test", "champion", tmp_path / "download")
    restored = torch.nn.Linear(4, 2)
    restored.load_state_dict(torch.load(folder / "last.ckpt")["state_dict"])
    assert torch.equal(restored.weight, model.weight)
    assert (tracker.download_checkpoint("aria-test", 1, tmp_path / "v1") / "last.ckpt").exists()


def test_compare_runs_tabulates_params_and_final_metrics_and_overlays_curves(tracker, tmp_path):
    for lr, losses in (("0.001", [5.0, 4.0, 3.0]), ("0.0003", [5.0, 4.5, 4.2])):
        with tracker.open_run("pretrain", experiment="compare") as run_id:
            tracker.log_params(run_id, {"lr": lr, "preset": "tiny"})
            _log_curve(tracker, run_id, "train/loss", losses)
            tracker.log_metrics(run_id, {"val/loss": losses[-1] + 0.5}, step=2)
    with tracker.open_run("other", experiment="compare"):
        pass

    plot = tmp_path / "compare.png"
    table = tracker.compare_runs("compare", "pretrain", ["train/loss", "val/loss"], plot_path=plot)
    assert list(table["params.lr"]) == ["0.001", "0.0003"]  # oldest first
    assert list(table["metrics.train/loss"]) == [3.0, 4.2]  # the value at the last step
    assert list(table["metrics.val/loss"]) == [3.5, 4.7]
    assert set(table["status"]) == {"FINISHED"} and set(table["run_name"]) == {"pretrain"}
    assert _is_png(plot)

    only = tracker.compare_runs("compare", "params.lr = '0.0003'", ["train/loss"])
    assert list(only["run_id"]) == [table["run_id"][1]]
    with pytest.raises(ValueError, match="no MLflow experiment"):
        tracker.compare_runs("no-such-experiment", "pretrain", ["train/loss"])


def test_asset_run_is_nested_under_the_dagster_runs_parent(tracker, tmp_path):
    import dagster as dg

    from pipelines.resources import MlflowTracking

    @dg.asset(code_version="2")
    def counted(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> dg.MaterializeResult:
        with mlflow.asset_run(context) as run_id:
            metadata = {"dagster/row_count": 3, "rate": dg.MetadataValue.float(1.5), "mode": "full",
                        "tokens (M)": 0.25,
                        "table": dg.MetadataValue.md("| a |\n|---|\n| 1 |")}
            mlflow.log_metadata(run_id, metadata)
        return dg.MaterializeResult(metadata={**metadata, **mlflow.run_metadata(run_id)})

    @dg.asset(deps=[counted])
    def broken(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> None:
        with mlflow.asset_run(context):
            raise ValueError("bad input")

    resource = MlflowTracking(tracking_uri=tracker.tracking_uri, experiment="dagster", ui_url="http://localhost:5000/")
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        result = dg.materialize([counted, broken], resources={"mlflow": resource}, instance=instance,
                                raise_on_error=False)
    assert not result.success

    experiment_id = tracker.experiment_id("dagster")
    runs = tracker.client.search_runs([experiment_id], f"tags.{TAG_DAGSTER_RUN} = '{result.run_id}'")
    (parent,) = [run for run in runs if run.data.tags[TAG_RUN_KIND] == "dagster_run"]
    children = {run.info.run_name: run for run in runs if run.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id}
    assert set(children) == {"counted", "broken"} and len(runs) == 3
    counted_run = children["counted"]
    assert counted_run.info.status == "FINISHED" and children["broken"].info.status == "FAILED"
    assert counted_run.data.tags[TAG_ASSET] == "counted" and counted_run.data.tags["code_version"] == "2"
    assert counted_run.data.metrics == {"dagster/row_count": 3.0, "rate": 1.5, "tokens _M_": 0.25}
    assert counted_run.data.params == {"mode": "full"}

    metadata = result.asset_materializations_for_node("counted")[0].metadata
    assert metadata["mlflow_run_id"].value == counted_run.info.run_id
    assert metadata["mlflow_run"].value == run_url("http://localhost:5000", experiment_id, counted_run.info.run_id)
    assert resource.subprocess_env(counted_run.info.run_id)[TRACKING_URI_ENV] == tracker.tracking_uri
