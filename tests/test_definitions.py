"""The code location loads as `dagster dev` and `dagster definitions validate` load it: every job, asset,
check, schedule and sensor at once (a test that resolves one job at a time misses name clashes)."""

import subprocess
import sys
from pathlib import Path

import dagster as dg

from pipelines.definitions import defs


def test_code_location_loads_whole():
    dg.Definitions.validate_loadable(defs)


def test_code_location_loads_without_torch_or_mlflow():
    """Every step process and the UI load the code location: the ingest steps must not pay for
    torch, Lightning and mlflow (seconds per process), only the steps that train, embed or log."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pipelines.definitions; print(sorted({'torch', 'lightning', 'mlflow'} & set(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert loaded.stdout.strip() == "[]"
