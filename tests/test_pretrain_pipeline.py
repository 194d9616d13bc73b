"""The pretrain job as users run it: `dagster job execute -j pretrain`, Pipes, MLflow lineage and comparison."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from aria_model.shards import build_token_shards
from aria_model.tracking import TAG_DAGSTER_RUN, TAG_GIT_COMMIT, TAG_MANIFEST_HASH, Tracker
from tests.test_pretrain import QUICK, SHARDS
from tests.test_shards import make_curated_home

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    curated = make_curated_home(tmp_path_factory.mktemp("pipeline") / "home")
    build_token_shards(curated.inputs, curated.home / "token_shards", SHARDS)
    return curated.home


def run_pretrain_job(home: Path, run_name: str, *overrides: str) -> subprocess.CompletedProcess:
    settings = [o for o in QUICK if not o.startswith("tracking.")] + list(overrides)
    config = {"ops": {"pretrained_model": {"config": {"preset": "tiny", "run_name": run_name, "overrides": settings}}}}
    config_file = home / f"{run_name}.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "ARIA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    (home / "dagster").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines.definitions",
                           "-j", "pretrain", "-c", str(config_file)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_pretrain_job_trains_through_pipes_and_records_lineage_in_mlflow(home, monkeypatch):
    first = run_pretrain_job(home, "run-a", "train.max_steps=6", "train.val_every=3", "train.checkpoint_every=3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_pretrain_job(home, "run-b", "train.max_steps=6", "train.val_every=3", "train.checkpoint_every=3",
                              "optim.lr=0.003")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # The script's progress lines reached the Dagster run's logs through Pipes.
    assert "step 6/6" in first.stderr + first.stdout

    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("pretrained_model"))
        metadata = event.asset_materialization.metadata
        dagster_run_id = event.run_id
    assert metadata["steps"].value == 6 and metadata["val_loss"].value > 0
    assert Path(metadata["weights"].value).exists() and "loss_curve" in metadata
    assert metadata["model_version"].value == "aria-pretrained/2"

    tracker = Tracker(home=home)
    run = tracker.client.get_run(metadata["mlflow_run_id"].value)
    parent = tracker.client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags[TAG_DAGSTER_RUN] == dagster_run_id == run.data.tags[TAG_DAGSTER_RUN]
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["model.d_model"] == "128"
    assert not [name for name in run.data.params if name.startswith("config/")]  # each param once
    assert [step for step, _ in tracker.metric_history(run.info.run_id, "train/loss")] == list(range(6))
    assert "val/loss" in run.data.metrics and run.data.tags[TAG_MANIFEST_HASH]
    assert "loss_curve.png" in [f.path for f in tracker.client.list_artifacts(run.info.run_id)]
    version = tracker.model_version("aria-pretrained", 2)
    assert version.tags[TAG_DAGSTER_RUN] == dagster_run_id and version.run_id == run.info.run_id
    assert version.tags[TAG_MANIFEST_HASH] == run.data.tags[TAG_MANIFEST_HASH] and version.tags[TAG_GIT_COMMIT]

    table = tracker.compare_runs("aria", "pretrained_model", ["train/loss", "val/loss"], plot_path=home / "cmp.png")
    assert len(table) == 2 and set(table["params.optim.lr"]) == {"0.001", "0.003"}
    assert (home / "cmp.png").stat().st_size > 0
