"""scripts/ui_check.py: its server teardown and browser lookup (fast), and the whole check against real
`dagster dev`, `mlflow ui` and headless Chromium (slow: needs a demo home, Chromium and Selenium)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "ui_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ui_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ui_check = load_script()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has stopped all the same.
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")


def test_missing_chromium_names_the_packages(tmp_path):
    with pytest.raises(ui_check.UiCheckError, match="apt-get install -y chromium chromium-driver"):
        ui_check.find_browser(str(tmp_path / "no-chromium"), None)
    with pytest.raises(ui_check.UiCheckError, match="chromedriver not found"):
        ui_check.find_browser(sys.executable, str(tmp_path / "no-driver"))


def test_a_server_that_never_gets_healthy_is_stopped_with_its_children(tmp_path):
    """The servers' children (dagster dev's webserver and daemon) must not outlive a failed check."""
    child_pid = tmp_path / "child.pid"
    # A leader that starts a child ignoring SIGTERM, then exits: only a group kill reaches the child.
    command = [sys.executable, "-c",
               ("import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', "
                "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)']); "
                f"open({str(child_pid)!r}, 'w').write(str(child.pid))")]
    with (pytest.raises(ui_check.UiCheckError, match="exited with 0 before it was ready"),
          ui_check.server("stub", command, dict(os.environ), tmp_path, lambda: False, timeout=30)):
        pass
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_the_block_failing_stops_the_server(tmp_path):
    process_file = tmp_path / "server.pid"
    command = [sys.executable, "-c",
               f"import os, time; open({str(process_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"]
    with (pytest.raises(RuntimeError, match="a page failed"),
          ui_check.server("stub", command, dict(os.environ), tmp_path, process_file.exists, timeout=30)):
        raise RuntimeError("a page failed")
    assert not alive(int(process_file.read_text()))


@pytest.mark.slow
def test_ui_check_end_to_end(tmp_path):
    """Screenshots of the asset graph, two asset pages and MLflow's comparison, then the walkthrough.

    Uses the demo home in $ARIA_UI_CHECK_HOME when set (it gains a second pretraining run and an
    ingested file), else builds one with `aria demo` (minutes)."""
    try:
        ui_check.find_browser(None, None)
    except ui_check.UiCheckError as exc:  # no Chromium, driver or Selenium
        pytest.skip(str(exc))
    home = Path(os.environ.get("ARIA_UI_CHECK_HOME") or tmp_path / "home")
    if not (home / "mlflow.db").exists():
        subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--home", str(home)], cwd=REPO_ROOT, check=True)
    out = tmp_path / "screenshots"
    done = subprocess.run([sys.executable, str(SCRIPT), "--home", str(home), "--out", str(out), "--walkthrough"],
                          check=False, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    from PIL import Image

    from pipelines.definitions import defs

    report = json.loads((home / "ui_check_logs" / ui_check.REPORT_FILE).read_text())
    for name, page in report.items():
        with Image.open(out / page["file"]) as image:
            assert image.size == (1600, 1000), name
            assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 8, f"{name} is blank"
    job_assets = {key.to_user_string() for key in defs.resolve_job_def("full").asset_layer.executable_asset_keys}
    graph_text = report["dagster_asset_graph"]["text"]
    # The graph cuts long names in the middle ("contrasti…_scratch").
    assert [name for name in sorted(job_assets) if not ui_check.shown(name, graph_text)] == []
    assert "loss_curve" in report["dagster_asset_pretrained_model"]["text"]
    runs = report["mlflow_compare_pretrain"]["runs"]
    assert len({run["run_name"] for run in runs}) == 2
    assert all(run["run_id"] in report["mlflow_compare_pretrain"]["text"] for run in runs)
    walk = report["dagster_sensor_new_midi_files"]["walkthrough"]
    assert (walk["job"], walk["status"], walk["new_files_tag"], walk["files_hashed"]) == ("ingest", "SUCCESS", "1", 1)
    assert walk["files_parsed"] in (0, 1)  # 0: an earlier file had the same content
    assert walk["run_id"][:8] in report["dagster_sensor_new_midi_files"]["text"]
    assert walk["schedule_status"] == "RUNNING" and walk["schedule_next_tick"] > time.time()
