"""Jobs users run: ``dagster job execute -m pipelines.definitions -j <name>`` or ``aria run <name>``."""

from __future__ import annotations

import dagster as dg

INGEST_ASSETS = [
    "demo_corpus", "raw_midi_manifest", "midi_notes", "midi_quarantine",
    "opus_dedup", "quality_filter", "token_shards",
]

ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets(*INGEST_ASSETS),
    description="Demo corpus (when no source is set) -> manifest -> notes + quarantine -> dedup -> quality filter -> token shards.",
)

# The job the README's first command runs; it grows into the full pipeline.
MAIN_JOB = "ingest"
