"""MLflow lineage and metrics: one parent run per Dagster run, a nested run per asset or script.

Dagster assets use it through ``pipelines.resources.MlflowTracking``; training scripts that Dagster
launches through Pipes use it directly (this module never imports dagster). Everything goes
through an explicit ``MlflowClient`` and run ids, never mlflow's global active run: a process may
talk to several stores, and no ``atexit`` ``end_run`` closes a run that another process still logs to.

Where things live:

- tracking URI: the one passed in, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<home>/mlflow.db``
  (absolute). The model registry is the same store.
- artifacts: an experiment this module creates on a sqlite store keeps them in
  ``<folder of the DB>/mlruns-artifacts/<experiment>``; on an ``mlflow server`` the server decides
  (``--artifacts-destination``). Other database URIs need ``artifact_root``: MLflow's fallback
  would be ``./mlruns`` in whatever the working directory happens to be.

Runs of one Dagster run::

    experiment "aria"
      ingest-1a2b3c4d        parent: aria.run_kind=dagster_run, dagster_run_id=<run id>
        token_shards         child: aria.run_kind=asset, dagster_asset_key, git_commit, code_version
        pretrained_model     child
          train              grandchild, opened by the training script under the asset's run

Each nested run ends with its block (FINISHED, FAILED or KILLED). No step knows when the whole
Dagster run is over, so the parent stays RUNNING until a run-status sensor or hook calls
``end_parent_run``.

Concurrency: Dagster's multiprocess executor starts steps in separate processes at once, and each
asks for the parent of its Dagster run. On a sqlite store, search-then-create runs under an
``fcntl`` lock on ``<db>.lock``; the same lock covers the first connection (which runs MLflow's
schema migrations, unsafe when two processes do it at once) and the experiment's creation. A shared
``mlflow server`` has no such lock: create the parent up front, before the steps start (a first
step that the others depend on, or a run-start hook or sensor calling ``ensure_parent_run``).

A training script launched with ``MLFLOW_TRACKING_URI`` and ``ARIA_MLFLOW_PARENT_RUN_ID`` set::

    tracker = Tracker()
    with tracker.open_run("train", parent_run_id=os.environ[PARENT_RUN_ENV], kind="training") as run_id:
        tracker.log_params(run_id, config)  # nested dataclasses -> dotted keys
        tracker.log_shard_manifest(run_id, home / "token_shards")
        trainer = L.Trainer(logger=MLFlowLogger(tracking_uri=tracker.tracking_uri, run_id=run_id), ...)
        trainer.fit(...)
        tracker.log_loss_curve(run_id)
        tracker.register_checkpoint(run_id, checkpoint_path, "aria-base", alias="candidate")

Lightning's ``MLFlowLogger`` marks the run FINISHED when ``fit`` returns; ``open_run`` still sets the
final status when its block ends (FAILED if registering the checkpoint raised). Only rank 0 opens a
run under DDP. ``"latest"`` is a reserved alias in MLflow 3.

Comparing runs (what ``aria compare`` shows)::

    Tracker(home=home).compare_runs("aria", "train", ["train/loss", "val/loss"], plot_path="loss.png")
"""

from __future__ import annotations

import dataclasses
import fcntl
import numbers
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from aria_model.shards import read_manifest, set_id
from aria_model.tracking_names import (
    ARTIFACTS_DIR,
    DB_FILE,
    DEFAULT_EXPERIMENT,
    LINEAGE_TAGS,
    LOSS_KEYS,
    TAG_DAGSTER_RUN,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_MANIFEST_HASH,
    TAG_RUN_KIND,
    TAG_SHARD_FILES,
    TAG_SHARD_TOKENS,
    TAG_SOURCE_RUN,
    TAG_TOKENIZER_HASH,
    TRACKING_URI_ENV,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARD_COLUMNS = ("split", "name", "rows", "tokens", "row_groups", "sha256")
# A comparison query that names a search field is a filter string; anything else is a run name.
FILTER_PREFIX = re.compile(r"^\s*(attributes?|attr|params?|metrics?|tags?|datasets?)\.", re.IGNORECASE)
# What MLflow accepts in metric and param names; anything else in a metadata key becomes "_".
UNSAFE_KEY_CHARS = re.compile(r"[^\w\-. :/]")
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"


def sqlite_uri(home: Path) -> str:
    """``sqlite:////abs/path/mlflow.db`` for a data home."""
    return f"sqlite:///{(Path(home).expanduser().resolve() / DB_FILE)}"


def resolve_tracking_uri(tracking_uri: str | None = None, home: Path | None = None) -> str:
    """The URI given, else $MLFLOW_TRACKING_URI, else the sqlite file in ``home``."""
    uri = tracking_uri or os.environ.get(TRACKING_URI_ENV)
    if uri:
        return uri
    if home is None:
        raise ValueError(f"no MLflow tracking URI: pass one, set ${TRACKING_URI_ENV}, or name the data home")
    return sqlite_uri(home)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), None for other stores and in-memory sqlite."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI at ``ui_url`` (the route MLflow itself prints)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


@cache
def git_state(repo: Path = REPO_ROOT) -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout this code runs from; None when it is not one or git is missing."""
    try:
        top, commit = _git(repo, "rev-parse", "--show-toplevel", "HEAD").split()
        # Installed into site-packages inside some other repository: that commit says nothing about us.
        if Path(top).resolve() != repo.resolve():
            return None
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return commit, dirty


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout


def code_tags() -> dict[str, str]:
    """Git commit and dirty flag of this checkout as run tags (none outside a checkout)."""
    state = git_state()
    if state is None:
        return {}
    commit, dirty = state
    return {TAG_GIT_COMMIT: commit, MLFLOW_GIT_COMMIT: commit, TAG_GIT_DIRTY: str(dirty).lower()}


def flatten_params(config: Any) -> dict[str, str]:
    """Dotted keys of a nested dataclass / mapping config (``model.n_layers``), values as strings.

    Values longer than MLflow's limit (``MAX_PARAM_VAL_LENGTH``) are cut and say how long they were.
    """
    if _children(config) is None:
        raise TypeError(f"params come from a dataclass or a mapping, not {type(config).__name__}")
    flat: dict[str, str] = {}

    def visit(value: Any, key: str) -> None:
        children = _children(value)
        if children is None:
            flat[key] = _truncate(str(value))
            return
        for name, child in children:
            visit(child, f"{key}.{name}" if key else str(name))

    visit(config, "")
    return flat


def _children(value: Any) -> list[tuple[str, Any]] | None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(field.name, getattr(value, field.name)) for field in dataclasses.fields(value)]
    if isinstance(value, Mapping):
        return list(value.items())
    return None


def _truncate(value: str) -> str:
    if len(value) <= MAX_PARAM_VAL_LENGTH:
        return value
    marker = f"...[{len(value)} chars]"
    return value[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker


def plot_curves(curves: Mapping[str, Sequence[tuple[int, float]]], title: str = "") -> Figure:
    """One line per label over step. A bare ``Figure`` renders with Agg and never touches pyplot's
    global state, so it is safe in Dagster step processes and threads without a display."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for label, points in curves.items():
        steps, values = zip(*points)
        axes.plot(steps, values, label=label, linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("value")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize="small")
    return figure


class Tracker:
    """An MLflow store: experiments, the parent run of a Dagster run, nested runs and what they log.

    ``Tracker()`` reads ``$MLFLOW_TRACKING_URI``; ``Tracker(home=path)`` falls back to the data
    home's sqlite file when that is unset. ``artifact_root`` (a folder or object-store URI) holds
    the artifacts of experiments created from here; it is required for database stores other
    than sqlite, optional otherwise.
    """

    def __init__(self, tracking_uri: str | None = None, *, home: Path | None = None,
                 artifact_root: str | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri, home)
        self.artifact_root = artifact_root
        db = sqlite_path(self.tracking_uri)
        self._lock_path = db.with_name(db.name + ".lock") if db else None
        if db:
            db.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            # The first client of a process opens the store, which migrates a new or old schema.
            self.client = MlflowClient(self.tracking_uri)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive across processes on one host for sqlite stores; a no-op for servers.
        Never nest it: two flocks on the same file in one process wait on each other."""
        if self._lock_path is None:
            yield
            return
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            yield

    # -- experiments and runs --------------------------------------------------------------

    def experiment_id(self, name: str = DEFAULT_EXPERIMENT) -> str:
        """The experiment's id, created if missing with an explicit artifact location (see module doc)."""
        with self._lock():
            found = self.client.get_experiment_by_name(name)
            if found is None:
                try:
                    return self.client.create_experiment(name, artifact_location=self._artifact_location(name))
                except MlflowException as exc:  # a server's other client was first
                    if exc.error_code != ALREADY_EXISTS:
                        raise
                    found = self.client.get_experiment_by_name(name)
        if found.lifecycle_stage != "active":
            raise ValueError(f"MLflow experiment {name!r} is deleted: restore it "
                             f"(mlflow experiments restore --experiment-id {found.experiment_id}) or use another name")
        return found.experiment_id

    def _artifact_location(self, experiment: str) -> str | None:
        folder = re.sub(r"[^\w.-]+", "_", experiment)
        if self.artifact_root:
            return f"{self.artifact_root.rstrip('/')}/{folder}"
        db = sqlite_path(self.tracking_uri)
        if db:
            return str(db.parent / ARTIFACTS_DIR / folder)
        if self.tracking_uri.split(":", 1)[0] in ("http", "https", "databricks"):
            return None  # the server's artifact destination
        raise ValueError(f"{self.tracking_uri}: pass artifact_root, or artifacts would land in ./mlruns")

    def ensure_parent_run(self, experiment: str, dagster_run_id: str, *, run_name: str | None = None,
                          tags: Mapping[str, str] | None = None) -> str:
        """The id of the Dagster run's parent run, created if no process created it yet.

        Race-free between processes on one host with a sqlite store (file lock). With a shared
        server, call this once before the run's steps start (see the module docstring); should two
        parents exist anyway, every later caller gets the oldest.
        """
        experiment_id = self.experiment_id(experiment)
        with self._lock():
            if found := self._find_parent(experiment_id, dagster_run_id):
                return found
            run = self.client.create_run(
                experiment_id, run_name=run_name or f"dagster-{dagster_run_id[:8]}",
                tags={**code_tags(), **(tags or {}), TAG_RUN_KIND: "dagster_run", TAG_DAGSTER_RUN: dagster_run_id})
        return run.info.run_id

    @contextmanager
    def open_run(self, run_name: str, *, parent_run_id: str | None = None, experiment: str | None = None,
                 kind: str = "step", tags: Mapping[str, str] | None = None) -> Iterator[str]:
        """A run (nested under ``parent_run_id``, else top-level in ``experiment``) for the block;
        yields its id and ends it FINISHED, FAILED on an exception, KILLED on an interrupt.

        A nested run lands in its parent's experiment and inherits its ``dagster_run_id`` tag.
        """
        inherited: dict[str, str] = {}
        if parent_run_id:
            parent = self.client.get_run(parent_run_id)
            experiment_id = parent.info.experiment_id
            inherited = {MLFLOW_PARENT_RUN_ID: parent_run_id}
            if TAG_DAGSTER_RUN in parent.data.tags:
                inherited[TAG_DAGSTER_RUN] = parent.data.tags[TAG_DAGSTER_RUN]
        else:
            experiment_id = self.experiment_id(experiment or DEFAULT_EXPERIMENT)
        run = self.client.create_run(experiment_id, run_name=run_name,
                                     tags={**code_tags(), **inherited, **(tags or {}), TAG_RUN_KIND: kind})
        status = "FINISHED"
        try:
            yield run.info.run_id
        except Exception:
            status = "FAILED"
            raise
        except BaseException:  # KeyboardInterrupt, or Dagster terminating the step
            status = "KILLED"
            raise
        finally:
            self.client.set_terminated(run.info.run_id, status)

    def end_parent_run(self, experiment: str, dagster_run_id: str, success: bool) -> str | None:
        """Mark a finished Dagster run's parent FINISHED or FAILED (from a run-status sensor or hook).
        Returns its id, or None when the run logged nothing to MLflow."""
        parent = self._find_parent(self.experiment_id(experiment), dagster_run_id)
        if parent:
            self.client.set_terminated(parent, "FINISHED" if success else "FAILED")
        return parent

    def _find_parent(self, experiment_id: str, dagster_run_id: str) -> str | None:
        query = f"tags.{TAG_DAGSTER_RUN} = '{dagster_run_id}' and tags.`{TAG_RUN_KIND}` = 'dagster_run'"
        found = self.client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1)
        return found[0].info.run_id if found else None

    # -- logging ---------------------------------------------------------------------------

    def log_params(self, run_id: str, config: Any) -> dict[str, str]:
        """Log a nested config (dataclasses, mappings) as flat params; returns what was logged.
        ``log_batch`` sends them in chunks of MLflow's 100-params-per-request limit."""
        params = flatten_params(config)
        self.client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
        return params

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])

    def log_summary(self, run_id: str, values: Mapping[str, Any]) -> None:
        """Numbers as metrics, strings and flags as params (e.g. a step's report). Keys are made
        MLflow-safe; other values (tables, markdown) are left out."""
        metrics: dict[str, float] = {}
        params: dict[str, str] = {}
        for key, value in values.items():
            key = UNSAFE_KEY_CHARS.sub("_", key)
            if isinstance(value, (bool, str)):
                params[key] = str(value)
            elif isinstance(value, numbers.Real):
                metrics[key] = float(value)
        if metrics:
            self.log_metrics(run_id, metrics)
        if params:
            self.log_params(run_id, params)

    def log_shard_manifest(self, run_id: str, shards_root: Path, context: str = "training") -> str:
        """Record the token-shard set a run read as an MLflow dataset input; returns the manifest hash.

        The dataset is the manifest's shard list (split, name, rows, tokens, row groups, sha256),
        not the tokens; its digest is the set id (``aria_model.shards.set_id``), its source the set's
        folder. File and token counts and the tokenizer hash go on the input and on the run as tags.
        """
        root = Path(shards_root).resolve()  # through the token_shards link: the exact set read
        manifest = read_manifest(root)
        digest = set_id(manifest)
        rows = [{"split": split, **{key: shard[key] for key in SHARD_COLUMNS[1:]}}
                for split, part in manifest["splits"].items() for shard in part["shards"]]
        with warnings.catch_warnings():
            # MLflow registers the local-file source under two schemes ("" and "file") and then warns
            # that a path matches both; the integer-schema hint is about serving models, not lineage.
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer")
            dataset = mlflow.data.from_pandas(pd.DataFrame(rows, columns=list(SHARD_COLUMNS)), source=str(root),
                                              name="token_shards", digest=digest)
            # to_dict() is the dataset's public form (it infers the schema); the fluent log_input
            # would need an active run.
            entity = DatasetEntity(**dataset.to_dict())
        summary = {
            TAG_MANIFEST_HASH: digest,
            TAG_SHARD_FILES: str(sum(part["files"] for part in manifest["splits"].values())),
            TAG_SHARD_TOKENS: str(sum(part["tokens"] for part in manifest["splits"].values())),
            TAG_TOKENIZER_HASH: manifest["tokenizer"]["config_hash"],
        }
        input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), *(InputTag(k, v) for k, v in summary.items())]
        self.client.log_inputs(run_id, [DatasetInput(entity, tags=input_tags)])
        self.client.log_batch(run_id, tags=[RunTag(key, value) for key, value in summary.items()])
        return digest

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of a metric, in step order."""
        history = sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        return [(metric.step, metric.value) for metric in history]

    def log_loss_curve(self, run_id: str, metric_keys: Sequence[str] = LOSS_KEYS,
                       artifact_file: str = "loss_curve.png") -> str | None:
        """A PNG of the run's metric histories overlaid (train and val loss by default), logged as an
        artifact; returns its artifact path, or None when none of the keys has values."""
        curves = {key: points for key in metric_keys if (points := self.metric_history(run_id, key))}
        if not curves:
            return None
        run_name = self.client.get_run(run_id).info.run_name
        self.client.log_figure(run_id, plot_curves(curves, title=run_name), artifact_file)
        return artifact_file

    # -- model registry ----------------------------------------------------------------------

    def register_checkpoint(self, run_id: str, checkpoint: Path, model_name: str, *, artifact_path: str = "checkpoint",
                            alias: str | None = None, tags: Mapping[str, str] | None = None,
                            description: str | None = None) -> ModelVersion:
        """Log a checkpoint (file or folder) to the run and register it as a version of ``model_name``.

        The version's tags give its lineage: the source run, and the run's Dagster run id, shard
        manifest hash, tokenizer hash and git commit (the current checkout's when the run has none).
        The checkpoint is registered as it is (the Lightning ``.ckpt`` that resumes training and
        that the model code loads), not as an MLflow pytorch flavour: that needs no pickled class,
        no dependency inference (seconds per call) and no active run. Get it back with
        ``download_checkpoint``.
        """
        checkpoint = Path(checkpoint)
        if checkpoint.is_dir():
            self.client.log_artifacts(run_id, str(checkpoint), artifact_path)
        else:
            self.client.log_artifact(run_id, str(checkpoint), artifact_path)
        known = {**code_tags(), **self.client.get_run(run_id).data.tags}
        lineage = {key: known[key] for key in LINEAGE_TAGS if key in known}
        try:
            self.client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != ALREADY_EXISTS:
                raise
        version = self.client.create_model_version(
            model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
            tags={**lineage, TAG_SOURCE_RUN: run_id, **(tags or {})}, description=description)
        if alias:
            self.client.set_registered_model_alias(model_name, alias, version.version)
        return version

    def model_version(self, model_name: str, version_or_alias: str | int) -> ModelVersion:
        """A version by number (``3``, ``"3"``) or alias (``"champion"``)."""
        if str(version_or_alias).isdigit():
            return self.client.get_model_version(model_name, str(version_or_alias))
        return self.client.get_model_version_by_alias(model_name, str(version_or_alias))

    def download_checkpoint(self, model_name: str, version_or_alias: str | int, destination: Path) -> Path:
        """Copy a registered checkpoint into ``destination``; returns the local path of what was
        registered (the checkpoint folder). ``models:/`` URIs are resolved here, against this
        store: ``mlflow.artifacts.download_artifacts("models:/...")`` would ask the default
        registry, ``./mlflow.db``."""
        version = self.model_version(model_name, version_or_alias)
        uri = self.client.get_model_version_download_uri(model_name, version.version)
        Path(destination).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination),
                                                        tracking_uri=self.tracking_uri))

    # -- comparison --------------------------------------------------------------------------

    def compare_runs(self, experiment: str, run_name_or_filter: str, metric_keys: Sequence[str] = LOSS_KEYS, *,
                     plot_path: Path | None = None) -> pd.DataFrame:
        """Runs of an experiment side by side: one row per run, oldest first, with its params
        (``params.<key>``) and the final value of each metric (``metrics.<key>``, the value at the
        last step).

        ``run_name_or_filter``: a run name (every asset run of e.g. ``pretrained_model``), or an
        MLflow filter string (``"params.lr = '0.0003' and metrics.`val/loss` < 2"``). With
        ``plot_path``, writes a PNG of every run's metric histories overlaid.
        """
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no MLflow experiment {experiment!r} in {self.tracking_uri}")
        if FILTER_PREFIX.match(run_name_or_filter):
            query = run_name_or_filter
        else:
            query = f"attributes.run_name = '{run_name_or_filter}'"
        runs = self._search(found.experiment_id, query)
        table = pd.DataFrame([_comparison_row(run, metric_keys) for run in runs])
        if plot_path is not None:
            curves = {f"{run.info.run_name} {run.info.run_id[:8]}: {key}": points
                      for run in runs for key in metric_keys
                      if (points := self.metric_history(run.info.run_id, key))}
            plot_curves(curves, title=f"{experiment}: {run_name_or_filter}").savefig(plot_path)
        return table

    def _search(self, experiment_id: str, query: str) -> list[Run]:
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"],
                                           page_token=token)
            runs += page
            token = page.token
            if not token:
                return runs


def _comparison_row(run: Run, metric_keys: Sequence[str]) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
        TAG_DAGSTER_RUN: run.data.tags.get(TAG_DAGSTER_RUN),
        **{f"params.{key}": value for key, value in sorted(run.data.params.items())},
        **{f"metrics.{key}": run.data.metrics.get(key) for key in metric_keys},
    }
