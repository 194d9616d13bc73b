"""token_shards: AbsTokenizer ids of the kept-and-passed files, Parquet shards split train/val/test by piece.

Incremental: shards of the previous set whose files are all still selected are carried over, shards
that lost files are rewritten from their stored ids, and only files new to the set are tokenized
(see aria_model.shards). ``rebuild: true`` tokenizes everything afresh.
"""


import dagster as dg

from aria_model.shards import (
    MANIFEST_FILE,
    SPLITS,
    ShardConfig,
    ShardInputs,
    build_token_shards,
    checksum_mismatches,
    clusters_in_several_splits,
)
from assets.metadata import markdown_table, peak_rss_metadata
from assets.raw_midi_manifest import manifest_path
from pipelines.resources import AriaHome

ASSET_NAME = "token_shards"
DEDUP_FILE = "opus_dedup/dedup.parquet"
QUALITY_FILE = "quality_filter/quality.parquet"


class TokenShardsConfig(dg.Config):
    shard_tokens: int = ShardConfig.shard_tokens
    row_group_tokens: int = ShardConfig.row_group_tokens
    train_fraction: float = ShardConfig.split_fractions[0]
    val_fraction: float = ShardConfig.split_fractions[1]
    test_fraction: float = ShardConfig.split_fractions[2]
    seed: int = ShardConfig.seed  # salts the cluster -> split hash
    workers: int | None = None  # None: all cores
    rebuild: bool = False  # ignore the previous set: tokenize every file (packing in midi_notes order)


def shards_root(home: AriaHome):
    """``<home>/token_shards``: a link to the current shard set (see aria_model.shards)."""
    return home.root / ASSET_NAME


def shard_inputs(home: AriaHome) -> ShardInputs:
    return ShardInputs(
        notes_dir=home.root / "midi_notes",
        raw_manifest=manifest_path(home),
        dedup=home.root / DEDUP_FILE,
        quality=home.root / QUALITY_FILE,
    )


@dg.asset(
    name=ASSET_NAME,
    group_name="curation",
    kinds={"python", "parquet"},
    deps=[dg.AssetKey("opus_dedup"), dg.AssetKey("quality_filter"), dg.AssetKey("midi_notes"),
          dg.AssetKey("raw_midi_manifest")],
)
def token_shards(context: dg.AssetExecutionContext, config: TokenShardsConfig, home: AriaHome) -> dg.MaterializeResult:
    """Tokenize every file dedup keeps and the quality filter passes into train/val/test shards.

    A piece cluster never straddles splits. The previous set's shards are reused where their files
    still are selected, so new data costs tokenizing the new files only. The new shard set replaces
    the old one in a single atomic swap; an unchanged rerun writes identical bytes.
    """
    settings = ShardConfig(
        shard_tokens=config.shard_tokens,
        row_group_tokens=config.row_group_tokens,
        split_fractions=(config.train_fraction, config.val_fraction, config.test_fraction),
        seed=config.seed,
        workers=config.workers,
        rebuild=config.rebuild,
    )
    report = build_token_shards(shard_inputs(home), shards_root(home), settings)
    manifest = report.manifest
    build = report.build
    context.log.info(
        f"{report.files} files, {report.tokens} tokens in {report.seconds:.1f} s ({build['mode']}: {build['reason']}); "
        f"shards reused {build['shards']['reused']}, rewritten {build['shards']['rewritten']}, "
        f"new {build['shards']['new']}; files tokenized {build['files']['tokenized']}")
    per_split = [
        {"split": s, **{k: manifest["splits"][s][k] for k in ("files", "tokens", "clusters")},
         "shards": len(manifest["splits"][s]["shards"])}
        for s in SPLITS
    ]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": report.files,
            "tokens": report.tokens,
            **{f"{row['split']}_{k}": row[k] for row in per_split for k in ("files", "tokens")},
            "shards": sum(row["shards"] for row in per_split),
            "splits": dg.MetadataValue.md(markdown_table(per_split)),
            "tokenizer": manifest["tokenizer"]["name"],
            "tokenizer_config_hash": manifest["tokenizer"]["config_hash"],
            "failed_files": len(manifest["failed"]),
            "missing_notes": len(manifest["missing_notes"]),
            "build_mode": build["mode"],
            "build_reason": build["reason"],
            **{f"shards_{k}": v for k, v in build["shards"].items()},
            **{f"files_{k}": v for k, v in build["files"].items()},
            **{f"tokens_{k}": v for k, v in build["tokens"].items()},
            "reuse": dg.MetadataValue.md(markdown_table(_reuse_rows(build))),
            "unusable_shards": dg.MetadataValue.json(build["unusable_shards"]),
            "known_failures": build["known_failures"],  # rejected by an earlier build, not retried
            "seconds": round(report.seconds, 2),
            "tokens_per_s": round(report.tokens_per_s),  # of the whole set, reused or not
            "tokenized_tokens_per_s": round(build["tokens"]["tokenized"] / report.seconds) if report.seconds else 0,
            "path": dg.MetadataValue.path(str(shards_root(home))),
            "manifest": dg.MetadataValue.path(str(shards_root(home) / MANIFEST_FILE)),
            **peak_rss_metadata(),
        }
    )


def _reuse_rows(build: dict) -> list[dict]:
    """What this run did with shards, files and tokens: reused as they were, copied from stored ids,
    tokenized afresh, dropped."""
    kinds = ("reused", "rewritten", "new", "removed", "copied", "tokenized", "dropped")
    return [{"what": what, **{kind: build[what].get(kind, "") for kind in kinds}}
            for what in ("shards", "files", "tokens")]


@dg.asset_check(asset=token_shards, blocking=True)
def no_cluster_in_two_splits(home: AriaHome) -> dg.AssetCheckResult:
    """Every piece cluster lies in exactly one split, so val/test never hear a training piece."""
    shared = clusters_in_several_splits(shards_root(home))
    return dg.AssetCheckResult(passed=not shared, metadata={"shared_clusters": len(shared),
                                                            "examples": dg.MetadataValue.json(shared[:20])})


@dg.asset_check(asset=token_shards, blocking=True)
def shard_checksums_match(home: AriaHome) -> dg.AssetCheckResult:
    """Each shard's bytes match the manifest's sha256, and no shard is missing or unlisted."""
    problems = checksum_mismatches(shards_root(home))
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": len(problems),
                                                              "examples": dg.MetadataValue.json(problems[:20])})
