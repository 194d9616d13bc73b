"""The ingest job materialized for real: temporary DAGSTER_HOME, real files, real Parquet."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from aria_model.notes_table import part_files
from pipelines.definitions import ASSET_CHECKS, ASSETS
from pipelines.jobs import ingest_job
from pipelines.resources import AriaHome, MidiSource, MlflowTracking
from tests.conftest import BAD_FILES, GOOD_GOLDEN

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as inst:
        yield inst


def _run_ingest(instance, home: Path, source: Path | None, run_config: dict | None = None):
    # Resources of assets outside the ingest selection must still be bound for the code location to load.
    resources = {"home": AriaHome(path=str(home)), "source": MidiSource(path=str(source) if source else None),
                 "mlflow": MlflowTracking(), "pipes_client": dg.PipesSubprocessClient()}
    return dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        resources=resources,
        instance=instance,
        run_config=run_config,
        selection=ingest_job.selection,
    )


def _metadata(result, key: str) -> dict:
    event = result.asset_materializations_for_node(key)
    (mat,) = [m for m in event if m.asset_key == dg.AssetKey(key)] if event else [None]
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def _materialization(instance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def test_ingest_quarantines_bad_files_and_ingests_all_good_ones(instance, tmp_path, mixed_source):
    home = tmp_path / "home"
    result = _run_ingest(instance, home, mixed_source)
    assert result.success
    notes = _materialization(instance, "midi_notes")
    quarantine = _materialization(instance, "midi_quarantine")
    assert notes["dagster/row_count"] == len(GOOD_GOLDEN)
    assert notes["new_notes"] > 1000 and notes["notes_per_s"] > 0
    assert quarantine["dagster/row_count"] == len(BAD_FILES)
    for reason in {r for _, r in BAD_FILES.values()}:
        assert f"| {reason} | 1 |" in quarantine["by_reason"]
    assert _materialization(instance, "demo_corpus")["skipped_for_source"] == str(mixed_source)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["manifest_ids_are_sha256"] and checks["notes_rows_are_consistent"]
    assert checks["quarantine_share_is_small"] is False  # 4 of 7 files are bad: the warning fires
    manifest = pq.read_table(home / "raw_midi_manifest" / "manifest.parquet")
    assert manifest.num_rows == len(GOOD_GOLDEN) + len(BAD_FILES)


def test_rerun_is_incremental_and_idempotent(instance, tmp_path, mixed_source):
    home = tmp_path / "home"
    _run_ingest(instance, home, mixed_source)
    snapshot = {p.name: p.read_bytes() for p in part_files(home / "midi_notes")}
    assert _run_ingest(instance, home, mixed_source).success
    manifest = _materialization(instance, "raw_midi_manifest")
    assert manifest["files_hashed"] == 0 and manifest["files_reused"] == len(GOOD_GOLDEN) + len(BAD_FILES)
    assert _materialization(instance, "midi_notes")["new_files"] == 0
    assert {p.name: p.read_bytes() for p in part_files(home / "midi_notes")} == snapshot


def test_demo_corpus_is_the_default_source(instance, tmp_path, monkeypatch):
    monkeypatch.delenv("ARIA_SOURCE", raising=False)
    home = tmp_path / "home"
    config = {"ops": {"demo_corpus": {"config": {"preset": "tiny", "collections": ["bach", "ryansMammoth"]}}}}
    assert _run_ingest(instance, home, None, config).success
    demo = _materialization(instance, "demo_corpus")
    assert demo["dagster/row_count"] == 6 and demo["failed"] == 0
    manifest = pq.read_table(home / "raw_midi_manifest" / "manifest.parquet")
    assert set(manifest["collection"].to_pylist()) == {"bach", "ryansMammoth"}
    assert manifest["tune_type"].drop_null().to_pylist()  # labels travel with the files
    assert _materialization(instance, "midi_notes")["dagster/row_count"] == 6
    assert _materialization(instance, "opus_dedup")["dagster/row_count"] == 6
    quality = _materialization(instance, "quality_filter")
    assert quality["preset"] == "scores" and quality["dagster/row_count"] == 6
    shards = _materialization(instance, "token_shards")
    assert shards["dagster/row_count"] == quality["passed"] > 0


def test_cli_job_execute_with_source_and_home_env(tmp_path, mixed_source):
    """`dagster job execute -m pipelines.definitions -j ingest` exactly as the README says."""
    home = tmp_path / "home"
    env = {**os.environ, "ARIA_SOURCE": str(mixed_source), "ARIA_HOME": str(home),
           "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    (tmp_path / "dagster_home").mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", tmp_path / "dagster_home")  # the instance config we ship
    command = [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines.definitions", "-j", "ingest"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RUN_SUCCESS" in done.stdout + done.stderr
    assert len(part_files(home / "midi_notes")) == 1
    assert pq.read_table(part_files(home / "midi_quarantine")[0]).num_rows == len(BAD_FILES)
