"""Incremental curation: new data costs work for the new data only.

Token shards: a set built on half the golden files, then grown to all of them, must tokenize only
the new files, carry the shards it did not touch (same inode), rewrite the ones that lost rows from
their stored ids, and still keep every contract of a fresh build. quality_filter: rows of files
already evaluated under the same rules are reused, only new files are evaluated.
"""

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from aria_model import shards
from aria_model.midi import load_midi
from aria_model.notes_table import part_files
from aria_model.quality import QualityConfig, evaluate_quality
from aria_model.shards import (
    SPLITS,
    ShardConfig,
    ShardReport,
    build_token_shards,
    checksum_mismatches,
    cluster_split,
    clusters_in_several_splits,
    read_manifest,
)
from aria_model.tokenizer import AbsTokenizer
from assets import quality_filter as quality_asset
from pipelines.resources import AriaHome
from tests.test_shards import FILES, CuratedHome, folder_bytes, make_curated_home, shard_rows

# Small shards so that half the golden files already close a few shards and leave others open.
CONFIG = ShardConfig(shard_tokens=6_000, row_group_tokens=1_500, split_fractions=(0.5, 0.25, 0.25), workers=1)


@contextmanager
def counting_tokenizer():
    """The file ids handed to the tokenizer (workers=1 tokenizes in this process)."""
    calls: list[str] = []
    original = shards._tokenize_row_groups

    def tokenize(part, groups, wanted):
        calls.extend(wanted)
        return original(part, groups, wanted)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shards, "_tokenize_row_groups", tokenize)
        yield calls


def build(curated: CuratedHome, config: ShardConfig = CONFIG) -> tuple[ShardReport, list[str]]:
    with counting_tokenizer() as calls:
        report = build_token_shards(curated.inputs, curated.home / "token_shards", config)
    return report, calls


@dataclass(frozen=True)
class Grown:
    subset: CuratedHome  # half the files
    full: CuratedHome  # the same home after the other half arrived
    first: Path  # the set built on the subset
    second: Path  # the set grown from it
    report: ShardReport  # of the grown build
    tokenized: list[str]  # file ids the grown build tokenized


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Grown:
    home = tmp_path_factory.mktemp("grown") / "home"
    subset = make_curated_home(home, FILES[::2])
    build(subset)
    first = (home / "token_shards").resolve()
    full = make_curated_home(home, FILES)  # parses only the new files, into a new midi_notes part
    report, tokenized = build(full)
    return Grown(subset, full, first, (home / "token_shards").resolve(), report, tokenized)


def clone(curated: CuratedHome, home: Path) -> CuratedHome:
    """A copy of a home, shard sets included (copied, not linked: the copy can be damaged alone)."""
    shutil.copytree(curated.home, home, symlinks=True)
    moved = {name: home / Path(getattr(curated.inputs, name)).relative_to(curated.home)
             for name in ("notes_dir", "raw_manifest", "dedup", "quality")}
    return replace(curated, home=home, inputs=replace(curated.inputs, **moved))


def entries(root: Path) -> dict[str, dict]:
    """Manifest entry of every shard, by name."""
    return {s["name"]: s for split in read_manifest(root)["splits"].values() for s in split["shards"]}


def rows_by_file(root: Path) -> dict[str, tuple]:
    return {row["file_id"]: (split, row["cluster_id"], row["ids"], row["prefix_metadata"])
            for split, rows in shard_rows(root).items() for row in rows}


def last_shards(root: Path) -> set[str]:
    return {split["shards"][-1]["name"] for split in read_manifest(root)["splits"].values() if split["shards"]}


def assert_contract(root: Path) -> None:
    """What a fresh build guarantees: counts, clusters in one split, checksums."""
    manifest, rows = read_manifest(root), shard_rows(root)
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["files"] == len(rows[split]) == sum(s["rows"] for s in entry["shards"])
        assert entry["tokens"] == sum(row["n_tokens"] for row in rows[split])
        assert entry["clusters"] == len({row["cluster_id"] for row in rows[split]})
        assert all(cluster_split(row["cluster_id"], CONFIG) == split for row in rows[split])
    assert clusters_in_several_splits(root) == [] and checksum_mismatches(root) == []


def set_dedup(curated: CuratedHome, **changes) -> None:
    """Rewrite opus_dedup with per-file changes: file_id -> {column: value}."""
    rows = pq.read_table(curated.inputs.dedup).to_pylist()
    for row in rows:
        row.update(changes.get(row["file_id"], {}))
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(curated.inputs.dedup)), curated.inputs.dedup)


# -- token shards ------------------------------------------------------------------------------


def test_adding_files_tokenizes_only_the_new_ones(grown):
    new = grown.full.selected - grown.subset.selected
    assert len(new) >= 3 and sorted(grown.tokenized) == sorted(new)
    build = grown.report.build
    assert build["mode"] == "incremental" and build["previous_set"] == grown.first.name
    assert build["files"]["tokenized"] == len(new) and build["files"]["dropped"] == 0
    assert build["files"]["reused"] + build["files"]["copied"] == len(grown.subset.selected)
    rows = rows_by_file(grown.second)
    assert build["tokens"]["tokenized"] == sum(len(rows[fid][2]) for fid in new)
    assert read_manifest(grown.second)["build"] == build  # the run that wrote the set
    tokenizer = AbsTokenizer()
    for fid in new:
        perf = load_midi(grown.full.path[fid], grown.full.metadata.get(fid))
        assert rows[fid][2] == tokenizer.tokenize_ids(perf).tolist()
    assert_contract(grown.second)


def test_untouched_shards_are_carried_as_the_same_file_and_old_rows_stay_first(grown):
    before, after = entries(grown.first), entries(grown.second)
    carried = [name for name in before if name in after and after[name]["sha256"] == before[name]["sha256"]]
    assert len(carried) == grown.report.build["shards"]["reused"] >= 1
    for name in carried:
        assert os.path.samefile(grown.first / name, grown.second / name)  # a hard link, not a copy
    extended = [name for name in before if name not in carried]
    assert len(extended) == grown.report.build["shards"]["rewritten"] >= 1
    for name in extended:  # each split's open last shard: its old rows, then new ones
        old = pq.read_table(grown.first / name)["file_id"].to_pylist()
        assert name in last_shards(grown.first)
        assert pq.read_table(grown.second / name)["file_id"].to_pylist()[: len(old)] == old
    new_names = sorted(after.keys() - before.keys())
    assert len(new_names) == grown.report.build["shards"]["new"]
    for name in new_names:  # appended after the split's existing shards
        split = name.split("/")[0]
        assert all(shards.shard_index(name) > shards.shard_index(n) for n in before if n.startswith(split + "/"))


def test_unchanged_rerun_carries_every_shard_and_republishes_the_same_set(grown, tmp_path):
    home = clone(grown.full, tmp_path / "home")
    before, link = folder_bytes(home.home / "token_shards"), os.readlink(home.home / "token_shards")
    report, calls = build(home)
    assert calls == [] and report.build["files"]["tokenized"] == 0
    assert report.build["shards"]["reused"] == len(entries(grown.second))
    assert report.build["shards"]["rewritten"] == report.build["shards"]["new"] == 0
    assert os.readlink(home.home / "token_shards") == link and folder_bytes(home.home / "token_shards") == before


def test_incremental_build_is_deterministic(grown, tmp_path):
    """The same previous set and inputs give the same bytes, manifest and all."""
    home = clone(grown.full, tmp_path / "home")
    sets = home.home / ".token_shards"
    shutil.rmtree(sets / grown.second.name)
    os.unlink(home.home / "token_shards")
    os.symlink(os.path.join(sets.name, grown.first.name), home.home / "token_shards")
    build(home)
    assert (home.home / "token_shards").resolve().name == grown.second.name
    assert folder_bytes(home.home / "token_shards") == folder_bytes(grown.second)


def test_rebuild_tokenizes_everything_into_the_same_rows(grown, tmp_path):
    """A rebuild packs in midi_notes order, the grown set keeps old rows first: the same rows per
    split (file, cluster, ids), possibly in other shards; each mode is deterministic."""
    home = clone(grown.full, tmp_path / "home")
    report, calls = build(home, replace(CONFIG, rebuild=True))
    assert report.build["mode"] == "full" and report.build["reason"] == "rebuild requested"
    assert sorted(calls) == sorted(grown.full.selected) and report.build["files"]["reused"] == 0
    rebuilt = home.home / "token_shards"
    assert rows_by_file(rebuilt) == rows_by_file(grown.second)
    assert_contract(rebuilt)
    fresh = clone(grown.full, tmp_path / "fresh")
    shutil.rmtree(fresh.home / ".token_shards")
    os.unlink(fresh.home / "token_shards")
    build(fresh)  # no previous set: the same packing as a rebuild
    shards_only = lambda root: {k: v for k, v in folder_bytes(root).items() if k != "manifest.json"}  # noqa: E731
    assert shards_only(fresh.home / "token_shards") == shards_only(rebuilt)
    assert (fresh.home / "token_shards").resolve().name == rebuilt.resolve().name  # build is not in the id


def test_dropping_a_file_rewrites_only_its_shard_from_stored_ids(grown, tmp_path):
    home = clone(grown.full, tmp_path / "home")
    previous = home.home / "token_shards"
    before = entries(previous)
    name = next(n for n, e in before.items() if e["rows"] >= 2 and n not in last_shards(previous))
    old = pq.read_table(previous.resolve() / name).to_pylist()
    dropped = old[0]["file_id"]
    set_dedup(home, **{dropped: {"kept": False, "reason": "over_cap"}})
    report, calls = build(home)
    assert calls == []  # the other rows' ids are copied, nothing is tokenized
    assert report.build["shards"] == {"reused": len(before) - 1, "rewritten": 1, "new": 0, "removed": 0}
    assert report.build["files"] == {"reused": sum(e["rows"] for e in before.values()) - len(old),
                                     "copied": len(old) - 1, "tokenized": 0, "dropped": 1}
    after = entries(home.home / "token_shards")
    assert after.keys() == before.keys() and after[name]["rows"] == len(old) - 1
    assert pq.read_table(home.home / "token_shards" / name).to_pylist() == old[1:]
    assert all(after[n] == before[n] for n in before if n != name)
    assert_contract(home.home / "token_shards")


def test_dropping_from_the_last_shards_gives_the_rebuilds_bytes(grown, tmp_path):
    """Where packing allows (the change is in each split's last shard of a set in notes order),
    incremental and rebuild agree byte for byte."""
    home = clone(grown.full, tmp_path / "home")
    shutil.rmtree(home.home / ".token_shards")
    os.unlink(home.home / "token_shards")
    build(home)  # a fresh set: rows in midi_notes order
    root = home.home / "token_shards"
    name = next(n for n in sorted(last_shards(root)) if entries(root)[n]["rows"] >= 2)
    dropped = pq.read_table(root / name)["file_id"].to_pylist()[-1]
    set_dedup(home, **{dropped: {"kept": False}})
    rebuilt = clone(home, tmp_path / "rebuilt")
    report, calls = build(home)
    assert calls == [] and report.build["shards"]["rewritten"] == 1
    build(rebuilt, replace(CONFIG, rebuild=True))
    shards_only = lambda r: {k: v for k, v in folder_bytes(r).items() if k != "manifest.json"}  # noqa: E731
    assert shards_only(root) == shards_only(rebuilt.home / "token_shards")
    assert root.resolve().name == (rebuilt.home / "token_shards").resolve().name


def test_a_file_whose_cluster_moves_changes_split_without_tokenizing(grown, tmp_path):
    home = clone(grown.full, tmp_path / "home")
    rows = rows_by_file(home.home / "token_shards")
    file_id = sorted(grown.full.selected)[0]
    split = rows[file_id][0]
    cluster = next(c for c in (f"moved-{i}" for i in range(100)) if cluster_split(c, CONFIG) != split)
    set_dedup(home, **{file_id: {"cluster_id": cluster}})
    report, calls = build(home)
    assert calls == [] and report.build["files"]["tokenized"] == 0 and report.build["files"]["copied"] >= 1
    moved = rows_by_file(home.home / "token_shards")[file_id]
    assert moved == (cluster_split(cluster, CONFIG), cluster, rows[file_id][2], rows[file_id][3])
    assert_contract(home.home / "token_shards")


def test_changed_prefix_metadata_tokenizes_that_file_again(grown, tmp_path):
    home = clone(grown.full, tmp_path / "home")
    file_id = grown.full.file_id["basic"]
    assert file_id in grown.full.selected and file_id not in grown.full.metadata
    manifest = pq.read_table(home.inputs.raw_manifest)
    composer = pa.array(["bach" if f == file_id else c for f, c in zip(manifest["file_id"].to_pylist(),
                                                                       manifest["composer"].to_pylist())], pa.string())
    pq.write_table(manifest.set_column(manifest.schema.get_field_index("composer"), "composer", composer),
                   home.inputs.raw_manifest)
    report, calls = build(home)
    assert calls == [file_id] and report.build["files"]["tokenized"] == 1
    ids = rows_by_file(home.home / "token_shards")[file_id][2]
    assert ids == AbsTokenizer().tokenize_ids(load_midi(home.path[file_id], {"composer": "bach"})).tolist()
    assert AbsTokenizer().tok_to_id[("prefix", "composer", "bach")] in ids
    assert_contract(home.home / "token_shards")


def test_a_corrupt_previous_shard_is_tokenized_again_not_carried(grown, tmp_path):
    home = clone(grown.full, tmp_path / "home")
    root = home.home / "token_shards"
    name = sorted(entries(root))[0]
    victims = pq.read_table(root / name)["file_id"].to_pylist()
    (root / name).write_bytes(b"not a parquet file")
    report, calls = build(home)
    assert report.build["unusable_shards"] == [name] and sorted(calls) == sorted(victims)
    assert rows_by_file(root) == rows_by_file(grown.second) and checksum_mismatches(root) == []


def test_a_file_the_tokenizer_rejected_is_not_retried_until_a_rebuild(grown, tmp_path, monkeypatch):
    home = clone(grown.full, tmp_path / "home")
    shutil.rmtree(home.home / ".token_shards")
    os.unlink(home.home / "token_shards")
    victim = sorted(grown.full.selected)[0]
    original = shards._tokenize_row_groups

    def reject_victim(part, groups, wanted):
        ids, failures = original(part, groups, {f: m for f, m in wanted.items() if f != victim})
        return ids, failures + [{"file_id": victim, "error": "ValueError: test"}] * (victim in wanted)

    monkeypatch.setattr(shards, "_tokenize_row_groups", reject_victim)
    build(home)
    monkeypatch.undo()
    failed = [{"file_id": victim, "error": "ValueError: test",
               "prefix_metadata": shards.prefix_key(grown.full.metadata.get(victim, {}))}]
    assert read_manifest(home.home / "token_shards")["failed"] == failed
    report, calls = build(home)
    assert calls == [] and report.build["known_failures"] == 1 and report.manifest["failed"] == failed
    report, calls = build(home, replace(CONFIG, rebuild=True))
    assert calls.count(victim) == 1 and report.manifest["failed"] == []
    assert rows_by_file(home.home / "token_shards") == rows_by_file(grown.second)


def test_other_shard_settings_mean_a_full_build(grown, tmp_path):
    home = clone(grown.full, tmp_path / "home")
    report, calls = build(home, replace(CONFIG, row_group_tokens=1_000))
    assert report.build["mode"] == "full" and "row_group_tokens" in report.build["reason"]
    assert sorted(calls) == sorted(grown.full.selected)


# -- quality_filter ----------------------------------------------------------------------------


def run_quality(home: Path, **config) -> tuple[dict, list[list[str]]]:
    """Materialize quality_filter in process; the file ids each evaluate_quality call was given."""
    asked = []

    def evaluate(parts, rules, file_ids=None, **kwargs):
        asked.append(sorted(file_ids))
        return evaluate_quality(parts, rules, file_ids=file_ids, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quality_asset, "evaluate_quality", evaluate)
        result = quality_asset.quality_filter(
            dg.build_asset_context(), config=quality_asset.QualityFilterConfig(**config), home=AriaHome(path=str(home)))
    return {k: getattr(v, "value", v) for k, v in result.metadata.items()}, asked


def test_quality_filter_evaluates_only_new_files(tmp_path):
    home = tmp_path / "home"
    subset = make_curated_home(home, FILES[::2])
    path = subset.inputs.quality
    path.unlink()  # the hand-made table of the shard tests
    metadata, asked = run_quality(home)
    assert metadata["evaluated"] == metadata["dagster/row_count"] == len(FILES[::2]) and metadata["reused"] == 0
    assert metadata["reuse_mode"] == "full: no previous table"
    first = path.read_bytes()

    metadata, asked = run_quality(home)  # unchanged: nothing evaluated, the same bytes
    assert metadata["evaluated"] == 0 and metadata["reused"] == len(FILES[::2]) and asked == []
    assert path.read_bytes() == first

    full = make_curated_home(home, FILES)
    path.write_bytes(first)  # make_curated_home wrote its hand-made table there
    metadata, asked = run_quality(home)
    new = sorted(set(full.file_id.values()) - set(subset.file_id.values()))
    assert asked == [new] and metadata["evaluated"] == len(new) and metadata["reused"] == len(FILES[::2])
    table = pq.read_table(path)
    assert table["file_id"].to_pylist() == sorted(full.file_id.values())
    everything = evaluate_quality(part_files(full.inputs.notes_dir), QualityConfig.preset(metadata["preset"]))
    assert_same_rows(table, everything)
    metadata, asked = run_quality(home, rebuild=True)
    assert metadata["evaluated"] == len(FILES) and metadata["reused"] == 0 and asked == [sorted(full.file_id.values())]
    assert_same_rows(pq.read_table(path), table)


def assert_same_rows(table: pa.Table, other: pa.Table) -> None:
    """Equal rows; floats to 1e-12, as DuckDB's entropy sums may add in another order in another batch."""
    assert table.schema.remove_metadata().equals(other.schema.remove_metadata())
    for row, expected in zip(table.to_pylist(), other.to_pylist(), strict=True):
        assert row == {k: pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for k, v in expected.items()}


def test_quality_filter_drops_unlisted_files_and_reevaluates_when_rules_change(tmp_path):
    home = tmp_path / "home"
    curated = make_curated_home(home, FILES[:5])
    curated.inputs.quality.unlink()
    run_quality(home)
    manifest = pq.read_table(curated.inputs.raw_manifest)
    gone = curated.file_id[FILES[0]]
    pq.write_table(manifest.filter(pc.not_equal(manifest["file_id"], gone)), curated.inputs.raw_manifest)
    metadata, asked = run_quality(home)
    assert asked == [] and metadata["evaluated"] == 0 and metadata["reused"] == metadata["dagster/row_count"] == 4
    assert metadata["reuse_mode"].startswith("incremental: 1 rows")
    assert gone not in pq.read_table(curated.inputs.quality)["file_id"].to_pylist()
    metadata, asked = run_quality(home, preset="light")
    assert metadata["reuse_mode"] == "full: the rules changed" and metadata["evaluated"] == 4
    metadata, asked = run_quality(home, preset="light")
    assert metadata["evaluated"] == 0
    assert metadata["rules_hash"] == quality_asset.rules_hash(QualityConfig.preset("light"))
