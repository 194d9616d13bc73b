"""The Dagster code location: ``defs`` (assets, checks, jobs, schedules, sensors, resources)."""

import dagster as dg

from assets import (
                 ablations,
                 contrastive_model,
                 demo_corpus,
                 generation_samples,
                 midi_notes,
                 opus_dedup,
                 pretrained_model,
                 probe_dataset,
                 probe_eval,
                 quality_filter,
                 raw_midi_manifest,
                 token_shards,
)
from pipelines.jobs import JOBS
from pipelines.resources import AriaHome, MidiSource, MlflowTracking
from pipelines.schedules import SCHEDULES, with_model_freshness
from pipelines.sensors import SENSORS, SOURCE_CHECKS

ASSET_MODULES = [demo_corpus, raw_midi_manifest, midi_notes, opus_dedup, quality_filter, token_shards,
                 pretrained_model, contrastive_model, probe_dataset, probe_eval, generation_samples, ablations]
ASSETS = dg.load_assets_from_modules(ASSET_MODULES)
ASSET_CHECKS = dg.load_asset_checks_from_modules(ASSET_MODULES)

defs = dg.Definitions(
    assets=with_model_freshness(ASSETS),
    asset_checks=[*ASSET_CHECKS, *SOURCE_CHECKS],
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources={
        "home": AriaHome(),
        "source": MidiSource(),
        "mlflow": MlflowTracking(),
        # Training steps launch their scripts here; bind pipelines.slurm.PipesSlurmClient (or a k8s
        # client) instead to train on a cluster: see docs/deploy.md.
        "pipes_client": dg.PipesSubprocessClient(),
    },
)
