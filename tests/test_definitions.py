"""The code location loads as `dagster dev` and `dagster definitions validate` load it: every job, asset,
check, schedule and sensor at once (a test that resolves one job at a time misses name clashes)."""

import dagster as dg

from pipelines.definitions import defs


def test_code_location_loads_whole():
    dg.Definitions.validate_loadable(defs)
