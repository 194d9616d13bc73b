"""The ``retrain`` schedule: the ``full`` job on a cron, with fresh training runs each time.

Every tick re-materializes the whole pipeline. Ingest is incremental (only files whose
(path, size, mtime) changed are re-read and re-parsed), and the training assets get run names
dated with the tick (``pretrain-2025-06-01``, ``contrastive-2025-06-01``,
``contrastive-2025-06-01-scratch``): a trainer resumes a run of the same name, so an undated name
would find last week's finished run and return at once instead of retraining.

The schedule is STOPPED until someone turns it on (UI: Automation -> retrain), so a fresh checkout
never starts a GPU job by itself. Settings, read when the code location loads:

    ARIA_RETRAIN_CRON       cron of the ticks (default "0 3 * * 0": Sundays 03:00)
    ARIA_RETRAIN_TIMEZONE   IANA zone of the cron (default UTC)
    ARIA_RETRAIN_CONFIG     a run-config YAML (what `aria run full -c` takes: presets, overrides),
                            read at each tick; the dated run names are set over it
"""

import os
from datetime import timedelta
from pathlib import Path

import dagster as dg
import yaml

from pipelines.jobs import GPU_TAGS, full_job

RETRAIN_CRON = os.environ.get("ARIA_RETRAIN_CRON", "0 3 * * 0")
RETRAIN_TIMEZONE = os.environ.get("ARIA_RETRAIN_TIMEZONE", "UTC")
RETRAIN_CONFIG_ENV = "ARIA_RETRAIN_CONFIG"
# The training assets and the prefix of their dated run names. The from-scratch baseline needs its
# own name: both contrastive assets write to models/contrastive/<run_name>.
RUN_NAME_PREFIXES = {
    "pretrained_model": "pretrain-{date}",
    "contrastive_model": "contrastive-{date}",
    "contrastive_scratch": "contrastive-{date}-scratch",
}
# The model is stale once a weekly retrain is overdue by a day (the time a run may take); the UI
# shows the freshness state of the trained assets against it. Edit with RETRAIN_CRON.
MODEL_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(days=8), warn_window=timedelta(days=7))
FRESHNESS_ASSETS = tuple(RUN_NAME_PREFIXES)


def retrain_run_config(date: str, base: dict | None = None) -> dict:
    """``base`` (a run config) with each training asset's ``run_name`` set to its dated name."""
    config = dict(base or {})
    ops = dict(config.get("ops") or {})
    for asset, pattern in RUN_NAME_PREFIXES.items():
        op = dict(ops.get(asset) or {})
        op["config"] = {**(op.get("config") or {}), "run_name": pattern.format(date=date)}
        ops[asset] = op
    config["ops"] = ops
    return config


def _base_config() -> dict:
    path = os.environ.get(RETRAIN_CONFIG_ENV)
    if not path:
        return {}
    return yaml.safe_load(Path(path).read_text()) or {}


@dg.schedule(
    job=full_job,
    cron_schedule=RETRAIN_CRON,
    execution_timezone=RETRAIN_TIMEZONE,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    tags=GPU_TAGS,
    description="Re-run ingest (incremental) -> pretrain -> finetune -> evaluate with dated training runs.",
)
def retrain(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    date = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return dg.RunRequest(
        run_key=f"retrain-{date}",  # a tick evaluated twice launches one run
        run_config=retrain_run_config(date, _base_config()),
        tags={**GPU_TAGS, "aria/retrain": date},
    )


def with_model_freshness(assets: list) -> list:
    """The asset definitions with MODEL_FRESHNESS attached to the trained models."""
    keys = {dg.AssetKey(name) for name in FRESHNESS_ASSETS}
    return dg.map_asset_specs(
        lambda spec: dg.apply_freshness_policy(spec, MODEL_FRESHNESS) if spec.key in keys else spec, assets)


SCHEDULES = [retrain]
