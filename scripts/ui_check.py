"""Real-browser check of the Dagster and MLflow UIs on a data home where `aria demo` has run.

    .venv/bin/python scripts/ui_check.py --home /tmp/ui-home                  # screenshots into docs/screenshots
    .venv/bin/python scripts/ui_check.py --home /tmp/ui-home --walkthrough    # + schedule, sensor, a new MIDI file

It starts `dagster dev` (DAGSTER_HOME=<home>/dagster, as `aria run` sets it) and `mlflow ui` on
the home's store, on free localhost ports, drives headless Chromium through Selenium, and stops
both servers (their whole process groups) however it ends. Every screenshot is taken only once
the page shows the text that proves it rendered (asset names, metadata labels, run parameters);
each page's text goes into <home>/ui_check_logs/ui_check.json, beside the servers' logs.

Before the servers start, it runs a second pretraining with another learning rate when the
MLflow store holds fewer than two, so the comparison view has two runs to compare.

--walkthrough then does what an operator does (README, "Operations"): with ARIA_SOURCE set to the
demo corpus plus a drop folder (<home>/incoming_midi), it turns on the `retrain` schedule and the
`new_midi_files` sensor, checks the schedule is RUNNING with a next tick, generates a continuation
with `aria generate`, drops it into the folder, and checks that the sensor launches one `ingest`
run for that file alone and that the run succeeds. It turns both off again at the end.

Needs Debian's `apt-get install -y chromium chromium-driver` and `pip install -e '.[ui-check]'`
(Selenium, given the driver's path so that it downloads nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pipelines.cli import DEMO_PRETRAIN_OVERRIDES, prepare_environment, run_job
from pipelines.jobs import MAIN_JOB
from pipelines.schedules import retrain
from pipelines.sensors import NEW_FILES_TAG, new_midi_files

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "install it with `apt-get install -y chromium chromium-driver` (Debian/Ubuntu)"
REPORT_FILE = "ui_check.json"
LOCATION = "aria"  # [tool.dagster] code_location_name
REPOSITORY = "__repository__"  # the repository name Dagster gives a Definitions object
EXPERIMENT = "aria"
PRETRAIN_RUN = "pretrained_model"  # the MLflow run name of every pretraining step
SECOND_PRETRAIN = {"run_name": "pretrain-tiny-lr3e-4", "lr": "3e-4"}
SCHEDULE, SENSOR = retrain.name, new_midi_files.name
DROP_FOLDER = "incoming_midi"


class UiCheckError(RuntimeError):
    """A server, page or walkthrough step that is not as it should be."""


# -- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_until(what: str, ready: Callable[[], Any], timeout: float, poll: float = 1.0,
               alive: Callable[[], None] | None = None) -> Any:
    """Poll ``ready`` until it returns something truthy; ``alive`` raises when waiting is pointless."""
    deadline = time.monotonic() + timeout
    while True:
        if alive:
            alive()
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise UiCheckError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


@contextmanager
def server(name: str, command: list[str], env: dict[str, str], logs: Path,
           healthy: Callable[[], bool], timeout: float) -> Iterator[None]:
    """Run ``command`` in its own process group until the block ends; its output goes to ``logs/<name>.log``."""
    log_path = logs / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            def alive() -> None:
                if process.poll() is not None:
                    raise UiCheckError(f"{name} exited with {process.returncode} before it was ready; "
                                       f"last lines of {log_path}:\n{tail(log_path)}")

            wait_until(f"{name} ({' '.join(command[:3])} ...)", healthy, timeout, alive=alive)
            print(f"{name} is up (log: {log_path})", flush=True)
            yield
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group (dagster dev's webserver, daemon and run workers are in it), then SIGKILL
    whatever is left: even a leader that already exited may have left children behind."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(1)  # the leader is gone; give its children a moment before the SIGKILL sweep


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Dagster:
    """The webserver's GraphQL API: what the UI itself calls."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, query: str, **variables: Any) -> dict:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        if answer.get("errors"):
            raise UiCheckError(f"GraphQL error: {answer['errors']}")
        return answer["data"]

    def location_loaded(self) -> bool:
        try:
            http_get(f"{self.url}/server_info")
            data = self.query("""{ workspaceOrError { ... on Workspace { locationEntries {
                name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        for entry in data["workspaceOrError"]["locationEntries"]:
            if entry["name"] == LOCATION and entry["loadStatus"] == "LOADED":
                loaded = entry["locationOrLoadError"]
                if loaded["__typename"] != "RepositoryLocation":
                    raise UiCheckError(f"code location {LOCATION} failed to load: {loaded.get('message')}")
                return True
        return False

    def job_assets(self, job: str) -> dict[str, float | None]:
        """Asset name -> timestamp (ms) of its latest materialization (None: never), for ``job``'s assets."""
        data = self.query("""query($job: PipelineSelector!) { assetNodes(pipeline: $job) {
                assetKey { path } assetMaterializations(limit: 1) { timestamp } } }""",
                          job={"pipelineName": job, "repositoryName": REPOSITORY, "repositoryLocationName": LOCATION})
        return {"/".join(node["assetKey"]["path"]):
                float(node["assetMaterializations"][0]["timestamp"]) if node["assetMaterializations"] else None
                for node in data["assetNodes"]}

    def selector(self, kind: str, name: str) -> dict:
        return {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION, f"{kind}Name": name}

    def start_schedule(self, name: str) -> None:
        result = self.query("""mutation($s: ScheduleSelector!) { startSchedule(scheduleSelector: $s) {
                __typename ... on PythonError { message } } }""", s=self.selector("schedule", name))["startSchedule"]
        if result["__typename"] == "PythonError" and "already running" not in result["message"]:
            raise UiCheckError(f"cannot start schedule {name}: {result['message']}")

    def start_sensor(self, name: str) -> None:
        result = self.query("""mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) {
                __typename ... on PythonError { message } } }""", s=self.selector("sensor", name))["startSensor"]
        if result["__typename"] == "PythonError":
            raise UiCheckError(f"cannot start sensor {name}: {result['message']}")

    def reset_automation(self, schedule: str, sensor: str) -> None:
        """Back to the status in code (both are STOPPED there)."""
        self.query("""mutation($sc: ScheduleSelector!, $se: SensorSelector!) {
                resetSchedule(scheduleSelector: $sc) { __typename }
                resetSensor(sensorSelector: $se) { __typename } }""",
                   sc=self.selector("schedule", schedule), se=self.selector("sensor", sensor))

    def schedule_state(self, name: str) -> tuple[str, float | None]:
        """(status, timestamp of the next tick) of a schedule."""
        schedule = self.query("""query($s: ScheduleSelector!) { scheduleOrError(scheduleSelector: $s) {
                __typename ... on Schedule { scheduleState { status } futureTicks(limit: 1) { results { timestamp } } }
                ... on PythonError { message } } }""", s=self.selector("schedule", name))["scheduleOrError"]
        if schedule["__typename"] != "Schedule":
            raise UiCheckError(f"schedule {name}: {schedule}")
        ticks = schedule["futureTicks"]["results"]
        return schedule["scheduleState"]["status"], ticks[0]["timestamp"] if ticks else None

    def sensor_ticks(self, name: str, since: float) -> tuple[str, list[dict]]:
        """(status, the ticks evaluated after ``since`` (epoch seconds), newest first) of a sensor."""
        sensor = self.query("""query($s: SensorSelector!, $after: Float) { sensorOrError(sensorSelector: $s) {
                __typename ... on Sensor { sensorState { status
                    ticks(afterTimestamp: $after, limit: 50) { status timestamp skipReason runIds error { message } } } }
                ... on PythonError { message } } }""", s=self.selector("sensor", name), after=since)["sensorOrError"]
        if sensor["__typename"] != "Sensor":
            raise UiCheckError(f"sensor {name}: {sensor}")
        return sensor["sensorState"]["status"], sensor["sensorState"]["ticks"]

    def run(self, run_id: str) -> dict:
        return self.query("""query($id: ID!) { runOrError(runId: $id) { __typename ... on Run {
                runId jobName status tags { key value } } } }""", id=run_id)["runOrError"]

    def materialization_metadata(self, asset: str, run_id: str) -> dict[str, Any]:
        """The numeric and text metadata of ``asset``'s materialization in run ``run_id``."""
        data = self.query("""query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
                assetMaterializations(limit: 5) { runId metadataEntries { label
                    ... on IntMetadataEntry { intValue } ... on TextMetadataEntry { text } } } } } }""",
                          key={"path": [asset]})
        for event in data["assetOrError"]["assetMaterializations"]:
            if event["runId"] == run_id:
                return {e["label"]: e.get("intValue", e.get("text")) for e in event["metadataEntries"]}
        raise UiCheckError(f"run {run_id} did not materialize {asset}")


# -- browser -------------------------------------------------------------------------------------


def find_browser(chromium: str | None, chromedriver: str | None) -> tuple[str, str]:
    browser = chromium or next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if not browser or not Path(browser).exists():
        raise UiCheckError(f"Chromium not found ({chromium or ', '.join(BROWSERS)}); {INSTALL_HINT}")
    driver = chromedriver or shutil.which("chromedriver")
    if not driver or not Path(driver).exists():
        raise UiCheckError(f"chromedriver not found ({chromedriver or 'chromedriver on PATH'}); {INSTALL_HINT}")
    if importlib.util.find_spec("selenium") is None:
        raise UiCheckError("selenium is missing: pip install -e '.[ui-check]'")
    return browser, driver


@contextmanager
def headless_chromium(browser: str, driver_path: str, width: int, height: int) -> Iterator[Any]:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: Chromium will not start its sandbox as root (CI, containers).
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    # A driver path given here means Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        # The window size includes the browser's frame; this makes the page itself width x height.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


def page_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def shown(expected: str, text: str) -> bool:
    """``expected`` is in ``text``, whole or as a label cut in the middle ("contrasti…_scratch")."""
    if expected in text:
        return True
    for line in text.splitlines():
        head, cut, tail = line.strip().partition("…")
        if cut and len(head) + len(tail) >= 6 and expected.startswith(head) and expected.endswith(tail):
            return True
    return False


def wait_for_page(driver, expected: list[str], timeout: float, selector: str | None = None) -> str:
    """The page's text once it holds every ``expected`` string, all its images have loaded and
    ``selector`` (a CSS selector, e.g. of a plot) matches an element."""

    def rendered() -> str | None:
        text = page_text(driver)
        images_done = driver.execute_script("return Array.from(document.images).every(i => i.complete)")
        drawn = selector is None or driver.find_elements("css selector", selector)
        return text if images_done and drawn and all(shown(s, text) for s in expected) else None

    try:
        return wait_until(f"{driver.current_url} to show {expected} and {selector}", rendered, timeout, poll=0.5)
    except UiCheckError:
        text = page_text(driver)
        missing = [s for s in expected if not shown(s, text)]
        raise UiCheckError(f"{driver.current_url} never showed {missing or selector}; the page reads:\n"
                           f"{text[:1500]}") from None


def click(driver, xpath: str, timeout: float) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout).until(expected_conditions.element_to_be_clickable(("xpath", xpath))).click()
    except WebDriverException as exc:  # a timeout, or another element in the way: say which element
        raise UiCheckError(f"{driver.current_url}: cannot click {xpath}: {exc.__class__.__name__}") from None


def save_png(driver, path: Path) -> None:
    """The viewport as a 256-colour PNG: UI screenshots lose nothing visible and shrink ~3x."""
    from PIL import Image

    driver.save_screenshot(str(path))
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


class Screenshots:
    """Screenshots, and each page's URL and text when it was taken (ui_check.json)."""

    def __init__(self, driver, out: Path, report: Path, timeout: float) -> None:
        self.driver, self.out, self.report_path, self.timeout = driver, out, report, timeout
        self.report: dict[str, dict] = {}

    def take(self, name: str, url: str | None, expected: list[str], selector: str | None = None,
             prepare: Callable[[Any], None] | None = None, **extra: Any) -> str:
        """Open ``url`` (None: stay), wait for ``expected`` and ``selector``, run ``prepare`` (and wait
        again: what it opened must render too), save ``<name>.png``."""
        if url:
            self.driver.get(url)
        if prepare:
            wait_for_page(self.driver, [], self.timeout, selector)
            prepare(self.driver)
        text = wait_for_page(self.driver, expected, self.timeout, selector)
        path = self.out / f"{name}.png"
        save_png(self.driver, path)
        self.report[name] = {"file": path.name, "url": self.driver.current_url, "expected": expected, "text": text,
                             **extra}
        self.report_path.write_text(json.dumps(self.report, indent=2))
        print(f"{path}: {self.driver.current_url} shows {len(expected)} expected strings", flush=True)
        return text


# -- the checks ----------------------------------------------------------------------------------


def pretrain_runs(home: Path) -> list[dict]:
    """The finished pretraining runs in ``home``'s MLflow store, oldest first."""
    from aria_model.tracking import Tracker, sqlite_uri

    table = Tracker(sqlite_uri(home), home=home).compare_runs(EXPERIMENT, PRETRAIN_RUN, [])
    if table.empty:
        return []
    table = table[table["status"] == "FINISHED"]
    return [{"run_id": row["run_id"], "run_name": row.get("params.run_name"), "lr": row.get("params.optim.lr")}
            for _, row in table.iterrows()]


def ensure_two_pretrain_runs(home: Path) -> list[dict]:
    """The newest two finished pretraining runs with different configs, after training a second one if needed."""
    runs = pretrain_runs(home)
    if len({run["run_name"] for run in runs}) < 2:
        print(f"one pretraining config in {home}/mlflow.db; pretraining a second with lr {SECOND_PRETRAIN['lr']}",
              flush=True)
        config = home / "dagster" / "ui_check_pretrain.yaml"
        config.write_text(json.dumps({  # JSON is YAML; the demo's schedule with another learning rate
            "execution": {"config": {"in_process": {}}},
            "ops": {"pretrained_model": {"config": {
                "preset": "tiny", "run_name": SECOND_PRETRAIN["run_name"],
                "overrides": [*DEMO_PRETRAIN_OVERRIDES, f"optim.lr={SECOND_PRETRAIN['lr']}"]}}},
        }, indent=2))
        if run_job("pretrain", str(home), None, str(config)) != 0:
            raise UiCheckError("the second pretraining run failed")
        runs = pretrain_runs(home)
    latest: dict[str, dict] = {run["run_name"]: run for run in runs}  # the newest run of each config
    chosen = sorted(latest.values(), key=runs.index)[-2:]
    if len(chosen) < 2:
        raise UiCheckError(f"expected two pretraining configs in MLflow, found {list(latest)}")
    return chosen


def experiment_id(home: Path) -> str:
    from aria_model.tracking import Tracker, sqlite_uri

    return Tracker(sqlite_uri(home), home=home).experiment_id(EXPERIMENT)


# The graph's scale and how much it must shrink to fit its viewport (< 1: it does not fit yet).
GRAPH_FIT_JS = """
const view = document.querySelector('[data-svg-viewport]');
const svg = view && view.firstElementChild && view.firstElementChild.querySelector('svg');
if (!svg) return null;
const v = view.getBoundingClientRect(), g = svg.getBoundingClientRect();
return {transform: view.firstElementChild.style.transform, nodes: view.querySelectorAll('foreignObject').length,
        fit: Math.min(1, (v.right - g.left) / g.width, (v.bottom - g.top) / g.height,
                      (g.right - v.left) / g.width, (g.bottom - v.top) / g.height, v.width / g.width, v.height / g.height)};
"""


def settled_graph(driver, timeout: float) -> dict:
    """The graph's state once its zoom has stopped moving (the UI animates it)."""
    last: list[dict | None] = [None]

    def still() -> dict | None:
        state = driver.execute_script(GRAPH_FIT_JS)
        steady = state if state and state == last[0] else None
        last[0] = state
        return steady

    return wait_until("the asset graph to settle", still, timeout, poll=0.5)


def fit_asset_graph(driver, timeout: float) -> None:
    """Every group expanded, the side panels closed, and the graph zoomed out until all of it is in view
    (the UI fits its width only, and leaves nodes it deems off screen unrendered)."""
    from selenium.webdriver.common.action_chains import ActionChains, ScrollOrigin
    from selenium.webdriver.common.keys import Keys

    click(driver, "//button[normalize-space()='Hide navigation']", timeout)
    click(driver, "//button[.//*[@aria-label='panel_show_right']]", timeout)  # the asset tree beside the graph
    collapsed = settled_graph(driver, timeout)["nodes"]
    # The shortcut of "Expand all groups" in the graph's settings menu.
    ActionChains(driver).key_down(Keys.ALT).send_keys("e").key_up(Keys.ALT).perform()
    wait_until("the groups to expand", lambda: settled_graph(driver, timeout)["nodes"] > collapsed, timeout)
    view = driver.find_element("css selector", "[data-svg-viewport]")
    for _ in range(10):
        state = settled_graph(driver, timeout)
        if state["fit"] >= 1:
            return
        # Ctrl + wheel zooms about the pointer (here the middle of the graph), at 0.2 % per unit of deltaY.
        delta = max(31, round((1 - 0.97 * state["fit"]) / 0.002))
        ActionChains(driver).key_down(Keys.CONTROL).scroll_from_origin(ScrollOrigin.from_element(view), 0, delta) \
            .key_up(Keys.CONTROL).perform()
    raise UiCheckError(f"the asset graph does not fit its view: {driver.execute_script(GRAPH_FIT_JS)}")


def show_markdown(label: str, timeout: float) -> Callable[[Any], None]:
    """Open the dialog of the markdown metadata entry ``label`` (plots are markdown images)."""

    def prepare(driver) -> None:
        click(driver, f"//tr[.//*[normalize-space(text())='{label}']]//*[normalize-space(text())='[Show Markdown]']",
              timeout)
        wait_until(f"the {label} dialog", lambda: driver.find_elements("css selector", "[role=dialog] img"), timeout)

    return prepare


def dagster_screenshots(shots: Screenshots, dagster: Dagster) -> None:
    assets = dagster.job_assets(MAIN_JOB)
    never = sorted(name for name, when in assets.items() if when is None)
    if never:
        raise UiCheckError(f"never materialized in this home: {', '.join(never)}; run `aria demo` first")
    shots.take("dagster_asset_graph", f"{dagster.url}/asset-groups", ["Global asset lineage", *sorted(assets)],
               prepare=lambda driver: fit_asset_graph(driver, shots.timeout), assets=sorted(assets))
    shots.take("dagster_asset_pretrained_model", f"{dagster.url}/assets/pretrained_model",
               ["pretrained_model", "Latest materialization", "val_loss", "model_version", "loss_curve"])
    shots.take("dagster_asset_pretrained_model_loss_curve", f"{dagster.url}/assets/pretrained_model?view=events",
               ["Materialized in run", "loss_curve"], prepare=show_markdown("loss_curve", shots.timeout))


def mlflow_screenshots(shots: Screenshots, url: str, experiment: str, runs: list[dict]) -> None:
    ids = [run["run_id"] for run in runs]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment])})

    def training_view(driver) -> None:
        click(driver, "//*[normalize-space(text())='Model training']", shots.timeout)  # the navigation for training
        # The chat panel opens by itself on a first visit and covers a third of the page.
        for button in driver.find_elements("xpath", "//button[@aria-label='Close']"):
            if button.is_displayed():
                button.click()

    shots.take("mlflow_compare_pretrain", f"{url}/#/compare-runs?{query}",
               ["Comparing 2 Runs", *ids, "config/optim/lr", "Model registry"], selector=".js-plotly-plot .parcoords",
               prepare=training_view, runs=runs)

    def differences_only(driver) -> None:
        for section in ("Parameters", "Metrics"):
            click(driver, f"//button[@aria-label='{section} - Show diff only']", shots.timeout)
        heading = driver.find_element("xpath", "//*[normalize-space(text())='Parameters']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)

    shots.take("mlflow_compare_pretrain_differences", None,
               [*(run["run_name"] for run in runs), *(run["lr"] for run in runs), "final/val_loss"],
               prepare=differences_only, runs=runs)


def walkthrough(shots: Screenshots, dagster: Dagster, home: Path, drop: Path, timeout: float) -> dict:
    """Schedule on, sensor on, a new file dropped: the sensor's one ingest run, for that file only."""
    started = time.time()
    dagster.start_schedule(SCHEDULE)
    dagster.start_sensor(SENSOR)
    status, next_tick = dagster.schedule_state(SCHEDULE)
    if status != "RUNNING" or next_tick is None:
        raise UiCheckError(f"schedule {SCHEDULE} is {status} with next tick {next_tick}")
    sensor_status = dagster.sensor_ticks(SENSOR, started)[0]
    if sensor_status != "RUNNING":
        raise UiCheckError(f"sensor {SENSOR} is {sensor_status} after starting it")
    print(f"schedule {SCHEDULE}: {status}, next tick {time.strftime('%Y-%m-%d %H:%M %Z', time.gmtime(next_tick))}")

    # One tick before the drop: the sensor's view of the source as it was.
    before = wait_until(f"a first tick of {SENSOR}", lambda: dagster.sensor_ticks(SENSOR, started)[1], timeout)
    print(f"sensor {SENSOR}: first tick {before[-1]['status']}: {before[-1]['skipReason'] or before[-1]['runIds']}")
    if any(tick["runIds"] for tick in before):
        raise UiCheckError(f"{SENSOR} launched runs before any file was dropped: {before}")

    new_file = drop / f"continuation-{time.strftime('%Y%m%d-%H%M%S')}.mid"
    drop_generated_continuation(home, new_file)
    dropped = time.time()

    def launched() -> list[str]:
        ticks = dagster.sensor_ticks(SENSOR, dropped)[1]
        failed = [tick for tick in ticks if tick["status"] == "FAILURE"]
        if failed:
            raise UiCheckError(f"{SENSOR} tick failed: {failed[0]['error']}")
        return [run_id for tick in ticks for run_id in tick["runIds"]]

    run_ids = wait_until(f"{SENSOR} to launch a run for {new_file.name}", launched, timeout)
    if len(run_ids) != 1:
        raise UiCheckError(f"expected one run for one new file, got {run_ids}")
    run_id = run_ids[0]

    def finished() -> dict | None:
        run = dagster.run(run_id)
        return run if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None

    run = wait_until(f"run {run_id} to finish", finished, timeout, poll=3)
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    manifest = dagster.materialization_metadata("raw_midi_manifest", run_id)
    notes = dagster.materialization_metadata("midi_notes", run_id)
    result = {"run_id": run_id, "job": run["jobName"], "status": run["status"], "new_file": str(new_file),
              "new_files_tag": tags.get(NEW_FILES_TAG), "files_seen": manifest.get("files_seen"),
              "files_hashed": manifest.get("files_hashed"), "files_parsed": notes.get("new_files"),
              "schedule_status": status, "schedule_next_tick": next_tick}
    print(f"sensor run {run_id}: {json.dumps(result)}", flush=True)
    if run["status"] != "SUCCESS" or run["jobName"] != "ingest":
        raise UiCheckError(f"the sensor's run {run_id} ({run['jobName']}) ended {run['status']}")
    # The new file alone is read; it is parsed unless an earlier file had the same content.
    if (tags.get(NEW_FILES_TAG), manifest.get("files_hashed")) != ("1", 1) or notes.get("new_files") not in (0, 1):
        raise UiCheckError(f"the sensor's run read more than the new file: {result}")

    sensor_url = f"{dagster.url}/locations/{REPOSITORY}@{LOCATION}/sensors/{SENSOR}"
    shots.take("dagster_sensor_new_midi_files", sensor_url, [SENSOR, run_id[:8], "Success"],
               prepare=lambda driver: click(driver, "//button[normalize-space()='Runs']", shots.timeout),
               walkthrough=result)
    schedule_url = f"{dagster.url}/locations/{REPOSITORY}@{LOCATION}/schedules/{SCHEDULE}"
    shots.take("dagster_schedule_retrain", schedule_url, [SCHEDULE, "Next tick", "0 3 * * 0"])
    return result


def drop_generated_continuation(home: Path, target: Path) -> None:
    """`aria generate` on a demo piece, its continuation moved into the drop folder in one rename (the
    listing skips dot files, so the sensor never sees half a file)."""
    pieces = sorted(json.loads((home / "demo_corpus" / "demo_metadata.json").read_text())["pieces"])
    seed = int(time.time())
    # A piece drawn by the seed: the demo's tiny model may add no notes, and a rerun should still
    # drop a content the ingest has not parsed yet.
    prompt = home / "demo_corpus" / pieces[seed % len(pieces)]
    out = home / "ui_check_generated"
    command = [sys.executable, "-m", "pipelines.cli", "generate", str(prompt), "--seconds", "10", "--length", "256",
               "--variations", "1", "--seed", str(seed), "--out", str(out)]
    print("$ aria " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT, env={**os.environ, "ARIA_HOME": str(home)})
    staged = target.parent / f".{target.name}"
    shutil.copyfile(out / "0.mid", staged)
    os.replace(staged, target)
    print(f"dropped {target}", flush=True)


def check(args: argparse.Namespace) -> dict:
    home = Path(args.home).expanduser().resolve()
    if not (home / "dagster").is_dir() or not (home / "mlflow.db").is_file():
        raise UiCheckError(f"{home} holds no demo run (no dagster/ or mlflow.db); run `aria demo --home {home}`")
    browser, driver_path = find_browser(args.chromium, args.chromedriver)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = home / "ui_check_logs"
    logs.mkdir(exist_ok=True)

    runs = ensure_two_pretrain_runs(home)
    drop = home / DROP_FOLDER
    source = None
    if args.walkthrough:
        drop.mkdir(exist_ok=True)
        source = os.pathsep.join([str(home / "demo_corpus"), str(drop)])
    env = prepare_environment(str(home), source)
    env["ARIA_SENSOR_INTERVAL_S"] = str(args.sensor_interval)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"  # the UI would try to report usage to a host it cannot reach
    dagster = Dagster(f"http://127.0.0.1:{free_port()}")
    mlflow_url = f"http://127.0.0.1:{free_port()}"
    bin_dir = Path(sys.executable).parent
    dagster_dev = [str(bin_dir / "dagster"), "dev", "-h", "127.0.0.1", "-p", dagster.url.rsplit(":", 1)[1]]
    mlflow_ui = [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                 "--host", "127.0.0.1", "--port", mlflow_url.rsplit(":", 1)[1], "--workers", "1"]

    def mlflow_healthy() -> bool:
        try:
            return http_get(f"{mlflow_url}/health").strip() == b"OK"
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    report: dict[str, Any] = {"report": str(logs / REPORT_FILE)}
    with (server("dagster-dev", dagster_dev, env, logs, dagster.location_loaded, args.server_timeout),
          server("mlflow-ui", mlflow_ui, env, logs, mlflow_healthy, args.server_timeout),
          headless_chromium(browser, driver_path, args.width, args.height) as driver):
        shots = Screenshots(driver, out, logs / REPORT_FILE, args.page_timeout)
        dagster_screenshots(shots, dagster)
        mlflow_screenshots(shots, mlflow_url, experiment_id(home), runs)
        if args.walkthrough:
            try:
                report["walkthrough"] = walkthrough(shots, dagster, home, drop, args.walkthrough_timeout)
            finally:
                dagster.reset_automation(SCHEDULE, SENSOR)
        report["screenshots"] = [str(out / page["file"]) for page in shots.report.values()]
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("ARIA_HOME"), required=not os.environ.get("ARIA_HOME"),
                        help="data home where `aria demo` ran (default: $ARIA_HOME)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "screenshots"),
                        help="folder for the PNGs (default: docs/screenshots)")
    parser.add_argument("--walkthrough", action="store_true",
                        help="also turn on the schedule and sensor, drop a new MIDI file and check its ingest run")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--chromium", help=f"browser binary (default: the first of {', '.join(BROWSERS)} on PATH)")
    parser.add_argument("--chromedriver", help="chromedriver binary (default: chromedriver on PATH)")
    parser.add_argument("--sensor-interval", type=int, default=10,
                        help="seconds between the sensor's ticks (ARIA_SENSOR_INTERVAL_S; default 10)")
    parser.add_argument("--server-timeout", type=float, default=180, help="seconds for each server to come up")
    parser.add_argument("--page-timeout", type=float, default=60, help="seconds for a page to render")
    parser.add_argument("--walkthrough-timeout", type=float, default=600,
                        help="seconds for each walkthrough wait (a tick, the ingest run)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the servers' process groups are still stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        report = check(args)
    except UiCheckError as exc:
        print(f"ui_check: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
