"""Resources shared by the assets: where outputs live, which MIDI source to read, where MLflow records runs."""


from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from aria_model.home import default_home
from aria_model.sources import resolve_sources
from aria_model.tracking_names import (
    DEFAULT_EXPERIMENT,
    PARENT_RUN_ENV,
    TAG_ASSET,
    TAG_CODE_VERSION,
    TAG_DAGSTER_JOB,
    TAG_PARTITION,
    TRACKING_URI_ENV,
)

# mlflow loads in the steps that log to it, not in every process that loads the code location
if TYPE_CHECKING:
    from aria_model.tracking import Tracker


class AriaHome(dg.ConfigurableResource):
    """The data home: every asset writes under ``<home>/<asset name>/``."""

    path: str | None = None  # None: $ARIA_HOME or ./.aria

    @property
    def root(self) -> Path:
        return Path(self.path).expanduser().resolve() if self.path else default_home()

    def asset_dir(self, asset_name: str) -> Path:
        folder = self.root / asset_name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


class MidiSource(dg.ConfigurableResource):
    """The MIDI folders to ingest; unset means the embedded demo corpus."""

    path: str | None = None  # None: $ARIA_SOURCE; several folders separated like PATH; neither: demo corpus
    layout: str | None = None  # aria_midi | maestro | demo | plain; None: detect per folder

    @property
    def folders(self) -> list[Path]:
        return resolve_sources(self.path)


# Dagster metadata values that carry a number, a string or a flag; MLflow has no place for the rest.
_SCALAR_METADATA = (dg.IntMetadataValue, dg.FloatMetadataValue, dg.BoolMetadataValue, dg.TextMetadataValue,
                    dg.PathMetadataValue, dg.UrlMetadataValue)


class MlflowTracking(dg.ConfigurableResource):
    """MLflow runs for assets: one parent run per Dagster run, a nested run per asset step.

    The logic lives in ``aria_model.tracking``; an asset does::

        @dg.asset
        def token_shards(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> dg.MaterializeResult:
            with mlflow.asset_run(context) as run_id:
                metadata = {...}
                mlflow.log_metadata(run_id, metadata)
            return dg.MaterializeResult(metadata={**metadata, **mlflow.run_metadata(run_id)})

    and a step that launches a script through Pipes passes ``env=mlflow.subprocess_env(run_id)``
    so the script's run nests under the asset's.
    """

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<ARIA_HOME>/mlflow.db
    experiment: str = DEFAULT_EXPERIMENT
    ui_url: str | None = None  # e.g. http://localhost:5000 (`mlflow ui`): asset metadata links to the run
    artifact_root: str | None = None  # None: beside a sqlite DB, or the server's; needed for other databases

    def tracker(self) -> "Tracker":
        from aria_model.tracking import Tracker

        return Tracker(self.tracking_uri, home=default_home(), artifact_root=self.artifact_root)

    @contextmanager
    def asset_run(self, context: dg.AssetExecutionContext) -> Iterator[str]:
        """A nested MLflow run for this step under its Dagster run's parent; yields the run id and
        ends it FINISHED, or FAILED when the block raises."""
        tracker = self.tracker()
        dagster_run = context.run
        parent = tracker.ensure_parent_run(self.experiment, dagster_run.run_id,
                                           run_name=f"{dagster_run.job_name}-{dagster_run.run_id[:8]}",
                                           tags={TAG_DAGSTER_JOB: dagster_run.job_name})
        keys = sorted(context.selected_asset_keys, key=lambda key: key.to_user_string())
        tags = {TAG_ASSET: ",".join(key.to_user_string() for key in keys)}
        versions = context.assets_def.code_versions_by_key
        code_versions = sorted({versions[key] for key in keys if versions.get(key)})
        if code_versions:
            tags[TAG_CODE_VERSION] = ",".join(code_versions)
        if context.has_partition_key:
            tags[TAG_PARTITION] = context.partition_key
        # A multi-asset step is one run, named after its op.
        run_name = keys[0].to_user_string() if len(keys) == 1 else context.op_execution_context.op.name
        with tracker.open_run(run_name, parent_run_id=parent, kind="asset", tags=tags) as run_id:
            yield run_id

    def log_metadata(self, run_id: str, metadata: Mapping[str, Any]) -> None:
        """Numeric asset metadata as MLflow metrics, strings and flags as params; tables,
        markdown and JSON stay in Dagster only."""
        values = {key: value.value if isinstance(value, _SCALAR_METADATA) else value for key, value in metadata.items()}
        self.tracker().log_summary(run_id, values)

    def run_metadata(self, run_id: str) -> dict[str, Any]:
        """Asset metadata pointing at the MLflow run: its id, and a link when ``ui_url`` is set."""
        metadata: dict[str, Any] = {"mlflow_run_id": run_id}
        if self.ui_url:
            from aria_model.tracking import run_url

            experiment_id = self.tracker().client.get_run(run_id).info.experiment_id
            metadata["mlflow_run"] = dg.MetadataValue.url(run_url(self.ui_url, experiment_id, run_id))
        return metadata

    def subprocess_env(self, run_id: str) -> dict[str, str]:
        """Variables for a launched script (Pipes adds them to os.environ): the store, and the run
        to nest its own run under."""
        return {TRACKING_URI_ENV: self.tracker().tracking_uri, PARENT_RUN_ENV: run_id}
