"""demo_corpus: real music from music21's bundled corpus, written as piano MIDI."""


import dagster as dg

from aria_model.demo_corpus import DemoCorpusConfig, build_demo_corpus
from assets.metadata import markdown_table, peak_rss_metadata, progress_logger
from pipelines.resources import AriaHome, MidiSource


class DemoCorpusAssetConfig(dg.Config):
    preset: str = "demo"  # tiny | demo | full
    pieces_per_collection: int | None = None  # overrides the preset; None keeps it
    collections: list[str] | None = None  # None: the preset's collections
    seed: int | None = None


def demo_corpus_config(config: DemoCorpusAssetConfig) -> DemoCorpusConfig:
    base = DemoCorpusConfig.preset(config.preset)
    overrides = {
        "pieces_per_collection": config.pieces_per_collection,
        "collections": tuple(config.collections) if config.collections else None,
        "seed": config.seed,
    }
    return DemoCorpusConfig(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})


@dg.asset(group_name="ingest", kinds={"python"})
def demo_corpus(
    context: dg.AssetExecutionContext, config: DemoCorpusAssetConfig, home: AriaHome, source: MidiSource
) -> dg.MaterializeResult:
    """Seeded subset of music21's corpus (Bach, Palestrina, Irish and German folk tunes) as MIDI.

    Used as the source when no MIDI folder is configured ($ARIA_SOURCE or the
    ``source`` resource); with a source configured it builds nothing.
    """
    if source.folders:
        named = ", ".join(str(folder) for folder in source.folders)
        context.log.info(f"source {named} is configured; the demo corpus is not needed")
        return dg.MaterializeResult(metadata={"skipped_for_source": named, **peak_rss_metadata()})
    out_dir = home.asset_dir("demo_corpus")
    settings = demo_corpus_config(config)
    report = build_demo_corpus(out_dir, settings, progress=progress_logger(context, 50))
    per_collection = [{"collection": name, **counts} for name, counts in sorted(report.per_collection.items())]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": report.selected - report.failed,
            "path": dg.MetadataValue.path(str(out_dir)),
            "converted": report.converted,
            "cached": report.cached,
            "failed": report.failed,
            "seconds": round(report.seconds, 2),
            "per_collection": dg.MetadataValue.md(markdown_table(per_collection)),
            "failures": dg.MetadataValue.json(report.failures),
            "selection": dg.MetadataValue.json(settings.selection()),
            **peak_rss_metadata(),
        }
    )
