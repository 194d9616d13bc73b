"""Operations: the retrain schedule, the new-MIDI sensor driving a real incremental ingest,
the source-coverage checks, and the `aria compare` / `aria embed` commands."""

import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import torch

from aria_model.model import ModelConfig, TransformerEMB
from aria_model.tracking import Tracker, sqlite_uri
from pipelines.cli import main
from pipelines.definitions import ASSET_CHECKS, ASSETS, defs
from pipelines.jobs import GPU_TAGS, ingest_job
from pipelines.resources import AriaHome, MidiSource, MlflowTracking
from pipelines.schedules import RETRAIN_CONFIG_ENV, retrain
from pipelines.sensors import COVERAGE_CHECKS, NEW_FILES_TAG, SOURCE_CHECKS, new_midi_files
from tests.conftest import GOLDEN_DIR, GOOD_GOLDEN
from tests.midi_builders import notes_file


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as inst:
        yield inst


def test_code_location_has_the_schedule_sensor_checks_and_freshness():
    repository = defs.get_repository_def()
    assert [s.name for s in repository.schedule_defs] == ["retrain"]
    assert [s.name for s in repository.sensor_defs] == ["new_midi_files"]
    checks = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert set(COVERAGE_CHECKS.values()) <= checks
    spec = defs.resolve_assets_def("pretrained_model").specs_by_key[dg.AssetKey("pretrained_model")]
    assert spec.freshness_policy is not None


def test_retrain_schedule_runs_full_with_dated_run_names(tmp_path, monkeypatch):
    monkeypatch.delenv(RETRAIN_CONFIG_ENV, raising=False)
    assert retrain.job_name == "full"
    assert retrain.default_status == dg.DefaultScheduleStatus.STOPPED
    assert retrain.cron_schedule == "0 3 * * 0"
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2025, 6, 1, 3, tzinfo=UTC))
    (request,) = retrain.evaluate_tick(context).run_requests
    ops = request.run_config["ops"]
    assert ops["pretrained_model"]["config"]["run_name"] == "pretrain-2025-06-01"
    assert ops["contrastive_model"]["config"]["run_name"] == "contrastive-2025-06-01"
    assert ops["contrastive_scratch"]["config"]["run_name"] == "contrastive-2025-06-01-scratch"
    assert request.run_key == "retrain-2025-06-01"
    assert request.tags.items() >= GPU_TAGS.items()
    assert dg.validate_run_config(defs.resolve_job_def("full"), request.run_config)

    # A user's run config (bigger presets) keeps its settings; the run names stay dated.
    user_config = tmp_path / "retrain.yaml"
    user_config.write_text("ops:\n  pretrained_model:\n    config:\n      preset: small\n      run_name: mine\n")
    monkeypatch.setenv(RETRAIN_CONFIG_ENV, str(user_config))
    (request,) = retrain.evaluate_tick(context).run_requests
    assert request.run_config["ops"]["pretrained_model"]["config"] == {"preset": "small",
                                                                      "run_name": "pretrain-2025-06-01"}


def _sensor(instance, home: Path, source: Path | None, cursor: str | None = None):
    resources = {"home": AriaHome(path=str(home)), "source": MidiSource(path=str(source) if source else None)}
    context = dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor)
    return new_midi_files.evaluate_tick(context)


def _ingest(instance, home: Path, source: Path, tags: dict) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*ASSETS, *ASSET_CHECKS, *SOURCE_CHECKS],
        # The training assets are loaded (not run): their resources must be bound all the same.
        resources={"home": AriaHome(path=str(home)), "source": MidiSource(path=str(source)),
                   "mlflow": MlflowTracking(), "pipes_client": dg.PipesSubprocessClient()},
        instance=instance,
        selection=ingest_job.selection,
        tags=tags,
    )


def _metadata(instance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def test_sensor_ignores_the_demo_corpus(instance, tmp_path, monkeypatch):
    monkeypatch.delenv("ARIA_SOURCE", raising=False)
    result = _sensor(instance, tmp_path / "home", None)
    assert not result.run_requests and "demo corpus" in result.skip_message


def test_sensor_requests_ingest_of_new_files_only(instance, tmp_path):
    home, source = tmp_path / "home", tmp_path / "source"
    source.mkdir()
    for name in GOOD_GOLDEN:
        shutil.copy(GOLDEN_DIR / "midi" / name, source / name)

    first = _sensor(instance, home, source)
    (request,) = first.run_requests
    assert request.tags[NEW_FILES_TAG] == str(len(GOOD_GOLDEN))
    # Same files, same run key: a re-evaluated tick cannot launch a second run for them.
    assert _sensor(instance, home, source).run_requests[0].run_key == request.run_key
    unchanged = _sensor(instance, home, source, cursor=first.cursor)
    assert not unchanged.run_requests and "no new or changed" in unchanged.skip_message

    assert _ingest(instance, home, source, request.tags).success
    assert _metadata(instance, "midi_notes")["new_files"] == len(GOOD_GOLDEN)

    (source / "new piece.mid").write_bytes(notes_file([(60 + i % 12, 250 * i, 250 * i + 200) for i in range(64)]))
    second = _sensor(instance, home, source, cursor=first.cursor)
    (request,) = second.run_requests
    assert request.tags[NEW_FILES_TAG] == "1"
    # The sensor reports the shards and the model behind the source until an ingest reads the file.
    stale = {event.check_name: event.passed for event in second.asset_events}
    assert stale == {check: False for check in COVERAGE_CHECKS.values()}

    result = _ingest(instance, home, source, request.tags)
    assert result.success
    assert _metadata(instance, "raw_midi_manifest")["files_hashed"] == 1
    assert _metadata(instance, "midi_notes")["new_files"] == 1  # only the new file was parsed
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks[COVERAGE_CHECKS["token_shards"]] is True

    # Everything listed is ingested now: a changed cursor alone starts nothing.
    after = _sensor(instance, home, source, cursor=first.cursor)
    assert not after.run_requests and after.cursor == second.cursor


def test_aria_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "run", "tokenize", "generate", "compare", "embed"):
        assert f"aria {command}" in text
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_aria_compare_prints_differing_params_and_plots_curves(tmp_path, capsys):
    home = tmp_path / "home"
    tracker = Tracker(sqlite_uri(home), home=home)
    run_ids = []
    for lr, losses in (("0.001", [3.0, 2.5, 2.2]), ("0.003", [3.0, 2.1, 1.8])):
        with tracker.open_run("pretrained_model", experiment="aria") as run_id:
            tracker.log_params(run_id, {"optim": {"lr": lr}, "model": {"d_model": 128}})
            for step, loss in enumerate(losses):
                tracker.log_metrics(run_id, {"train/loss": loss, "val/loss": loss + 0.1}, step=step)
        run_ids.append(run_id)
    plot = tmp_path / "compare.png"
    assert main(["compare", "--home", str(home), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert all(run_id[:8] in text for run_id in run_ids)
    assert "optim.lr" in text and "0.003" in text and "1.8000" in text  # the final train/loss
    assert "model.d_model" not in text and "1 params identical" in text
    assert plot.stat().st_size > 0
    assert main(["compare", "--home", str(home), "--filter", "params.`optim.lr` = '0.001'"]) == 0
    text = capsys.readouterr().out
    assert run_ids[0][:8] in text and run_ids[1][:8] not in text


def _save_embedding_model(folder: Path, emb_size: int) -> Path:
    config = ModelConfig.preset("tiny", emb_size=emb_size)
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    payload = {"model_config": config.to_dict(), "state_dict": TransformerEMB(config).state_dict(), "step": 0}
    torch.save(payload, folder / "model.pt")
    return folder / "model.pt"


def test_aria_embed_writes_one_row_per_file(tmp_path, capsys):
    home, midi = tmp_path / "home", tmp_path / "midi"
    (midi / "sub").mkdir(parents=True)
    shutil.copy(GOLDEN_DIR / "midi" / GOOD_GOLDEN[0], midi / GOOD_GOLDEN[0])
    shutil.copy(GOLDEN_DIR / "midi" / GOOD_GOLDEN[1], midi / "sub" / GOOD_GOLDEN[1])
    (midi / "broken.mid").write_bytes(b"not midi")
    out = tmp_path / "embeddings.parquet"

    assert main(["embed", str(midi), "--home", str(home), "--out", str(out)]) == 2
    assert "aria run finetune" in capsys.readouterr().err  # says how to get a model

    _save_embedding_model(home / "models" / "contrastive" / "contrastive-tiny", emb_size=512)
    _save_embedding_model(home / "models" / "contrastive" / "contrastive-tiny-scratch", emb_size=64)  # newer
    assert main(["embed", str(midi), "--home", str(home), "--out", str(out), "--device", "cpu"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 2  # the unreadable file is reported, not embedded
    assert sorted(Path(p).name for p in table["path"].to_pylist()) == sorted(GOOD_GOLDEN[:2])
    assert {len(vector) for vector in table["embedding"].to_pylist()} == {512}  # not the -scratch baseline
    assert "broken.mid" in capsys.readouterr().err
