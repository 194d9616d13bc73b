"""Token shards from real MIDI: the right files, Aria's ids, piece-disjoint splits, atomic and reproducible."""

import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aria_model import shards
from aria_model.midi import load_midi
from aria_model.notes_table import update_notes_tables
from aria_model.shards import (
    SPLITS,
    ShardConfig,
    ShardError,
    ShardInputs,
    build_token_shards,
    checksum_mismatches,
    cluster_split,
    clusters_in_several_splits,
    read_manifest,
    shard_paths,
)
from aria_model.sources import build_manifest
from aria_model.tokenizer import AbsTokenizer
from assets.token_shards import no_cluster_in_two_splits, shard_checksums_match, token_shards
from pipelines.resources import AriaHome
from tests.conftest import GOLDEN_DIR

# Short and mid-sized files (fast to parse), with and without <D>, several instruments and drums.
FILES = (
    "basic", "pop", "bwv66.6.mxl", "edge_boundary_4999_5001", "edge_durations", "edge_velocity",
    "movement1_exposition.mxl", "miditok1_6338816_Etude_No._4", "miditok1_POP909_008",
    "miditok1_POP909_010", "arabesque", "Agnus_01.krn", "transcription",
)
# Manifest metadata -> what the tokenizer must see as prefix metadata.
MANIFEST_METADATA = {
    "miditok1_6338816_Etude_No._4": ({"composer": "chopin", "extra": '{"form": "Étude"}'},
                                     {"composer": "chopin", "form": "étude"}),
    "arabesque": ({"composer": "debussy", "genre": "Classical"}, {"composer": "debussy", "genre": "classical"}),
}
DROPPED_BY_DEDUP, FAILED_QUALITY, NOT_IN_QUALITY = "edge_durations", "edge_velocity", "pop"
SMALL = ShardConfig(shard_tokens=12_000, row_group_tokens=4_000, split_fractions=(0.5, 0.25, 0.25), workers=1)


@dataclass(frozen=True)
class CuratedHome:
    """A data home with real midi_notes and manifest, and hand-made dedup/quality tables."""

    home: Path
    inputs: ShardInputs
    file_id: dict[str, str]  # golden name -> file_id
    path: dict[str, str]  # file_id -> MIDI path
    cluster: dict[str, str]  # file_id -> cluster_id
    metadata: dict[str, dict]  # file_id -> prefix metadata the tokenizer sees
    selected: set[str]  # file_ids dedup keeps and quality passes


def make_curated_home(home: Path, names=FILES) -> CuratedHome:
    """Call again on the same home with more names to add files (only the new ones are parsed)."""
    source = home.parent / f"{home.name}_source"
    source.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(GOLDEN_DIR / "midi" / f"{name}.mid", source / f"{name}.mid")
    manifest = _manifest_with_metadata(build_manifest(source).table)
    inputs = ShardInputs(home / "midi_notes", home / "raw_midi_manifest" / "manifest.parquet",
                         home / "opus_dedup" / "dedup.parquet", home / "quality_filter" / "quality.parquet")
    inputs.raw_manifest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(manifest, inputs.raw_manifest)
    files = list(zip(manifest["file_id"].to_pylist(), manifest["path"].to_pylist()))
    update_notes_tables(files, inputs.notes_dir, home / "midi_quarantine", workers=1)
    file_id = {Path(path).stem: fid for fid, path in files}
    # Two performances per piece; a file's piece does not depend on which other files are there.
    cluster = {fid: f"piece-{FILES.index(name) // 2}" for name, fid in file_id.items()}
    _write_dedup_and_quality(inputs, file_id, cluster)
    selected = set(cluster) - {file_id[n] for n in (DROPPED_BY_DEDUP, FAILED_QUALITY, NOT_IN_QUALITY) if n in file_id}
    metadata = {file_id[name]: seen for name, (_, seen) in MANIFEST_METADATA.items() if name in file_id}
    return CuratedHome(home, inputs, file_id, {fid: path for fid, path in files}, cluster, metadata, selected)


def _manifest_with_metadata(manifest: pa.Table) -> pa.Table:
    rows = manifest.to_pylist()
    for row in rows:
        row.update(MANIFEST_METADATA.get(Path(row["path"]).stem, ({}, {}))[0])
    return pa.Table.from_pylist(rows, schema=manifest.schema)


def _write_dedup_and_quality(inputs: ShardInputs, file_id: dict[str, str], cluster: dict[str, str]) -> None:
    """Tables with exactly the upstream contracts' columns."""
    ids = sorted(cluster)
    dropped = file_id.get(DROPPED_BY_DEDUP)
    inputs.dedup.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "file_id": ids,
        "cluster_id": [cluster[f] for f in ids],
        "kept": [f != dropped for f in ids],
        "reason": ["over_cap" if f == dropped else "kept" for f in ids],
    }), inputs.dedup)
    failed = file_id.get(FAILED_QUALITY)
    graded = [f for f in ids if f != file_id.get(NOT_IN_QUALITY)]
    inputs.quality.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "file_id": graded,
        "passed": [f != failed for f in graded],
        "failed_rules": pa.array([["min_notes"] if f == failed else [] for f in graded], pa.list_(pa.string())),
    }), inputs.quality)


def copy_home(curated: CuratedHome, home: Path) -> ShardInputs:
    """The curated inputs copied into another home, byte for byte, without its shards."""
    shutil.copytree(curated.home, home, symlinks=True, ignore=shutil.ignore_patterns("*token_shards*"))
    return ShardInputs(*(home / Path(p).relative_to(curated.home) for p in (
        curated.inputs.notes_dir, curated.inputs.raw_manifest, curated.inputs.dedup, curated.inputs.quality)))


def shard_rows(root: Path) -> dict[str, list[dict]]:
    return {split: [row for path in shard_paths(root, split) for row in pq.read_table(path).to_pylist()]
            for split in SPLITS}


def folder_bytes(root: Path) -> dict[str, bytes]:
    root = Path(root).resolve()
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> CuratedHome:
    return make_curated_home(tmp_path_factory.mktemp("shards") / "home")


@pytest.fixture(scope="module")
def built(curated) -> Path:
    build_token_shards(curated.inputs, curated.home / "token_shards", SMALL)
    return curated.home / "token_shards"


def test_only_kept_and_passed_files_are_sharded_with_the_tokenizers_ids(curated, built):
    rows = [row for split_rows in shard_rows(built).values() for row in split_rows]
    assert {row["file_id"] for row in rows} == curated.selected and len(rows) == len(curated.selected)
    tokenizer = AbsTokenizer()
    for row in rows:
        perf = load_midi(curated.path[row["file_id"]], metadata=curated.metadata.get(row["file_id"]))
        assert row["ids"] == tokenizer.tokenize_ids(perf).tolist()
        assert row["n_tokens"] == len(row["ids"]) and row["cluster_id"] == curated.cluster[row["file_id"]]
    with_metadata = {row["file_id"]: row["ids"] for row in rows if row["file_id"] in curated.metadata}
    prefix = tokenizer.tok_to_id
    assert {prefix[("prefix", "composer", "chopin")], prefix[("prefix", "form", "étude")]} <= set(
        with_metadata[curated.file_id["miditok1_6338816_Etude_No._4"]])
    assert prefix[("prefix", "genre", "classical")] in with_metadata[curated.file_id["arabesque"]]


def test_each_piece_cluster_lies_in_the_split_its_hash_picks(curated, built):
    assert clusters_in_several_splits(built) == []
    rows = shard_rows(built)
    for split, split_rows in rows.items():
        assert all(cluster_split(row["cluster_id"], SMALL) == split for row in split_rows)
    assert sum(1 for split_rows in rows.values() if split_rows) >= 2  # the fixture really exercises splits


def test_split_fractions_hold_and_new_clusters_never_move_old_ones():
    clusters = [f"cluster-{i}" for i in range(20_000)]
    config = ShardConfig(split_fractions=(0.8, 0.1, 0.1))
    assigned = {c: cluster_split(c, config) for c in clusters}
    for split, fraction in zip(SPLITS, config.split_fractions):
        assert abs(sum(s == split for s in assigned.values()) / len(clusters) - fraction) < 0.01
    assert all(cluster_split(c, config) == assigned[c] for c in clusters[:100])  # a pure function of the id
    reseeded = ShardConfig(split_fractions=(0.8, 0.1, 0.1), seed=1)
    assert sum(cluster_split(c, reseeded) != assigned[c] for c in clusters) > 1000


def test_adding_files_keeps_every_existing_file_in_its_split(curated, built, tmp_path):
    subset = make_curated_home(tmp_path / "home", names=FILES[::2])
    build_token_shards(subset.inputs, subset.home / "token_shards", SMALL)
    before = {row["file_id"]: split for split, rows in shard_rows(subset.home / "token_shards").items() for row in rows}
    after = {row["file_id"]: split for split, rows in shard_rows(built).items() for row in rows}
    assert len(before) >= 4 and all(after[file_id] == split for file_id, split in before.items())


def test_manifest_counts_checksums_and_tokenizer(curated, built):
    manifest = read_manifest(built)
    rows = shard_rows(built)
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["files"] == len(rows[split])
        assert entry["tokens"] == sum(row["n_tokens"] for row in rows[split])
        assert entry["clusters"] == len({row["cluster_id"] for row in rows[split]})
        for shard in entry["shards"]:
            path = built / shard["name"]
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert shard["rows"] == pq.ParquetFile(path).metadata.num_rows
    tokenizer = AbsTokenizer()
    assert manifest["tokenizer"] == {"name": "abs", "config_hash": tokenizer.config.config_hash(),
                                     "vocab_size": tokenizer.vocab_size}
    assert manifest["seed"] == SMALL.seed and set(manifest["inputs"]) == {
        "midi_notes", "raw_midi_manifest", "opus_dedup", "quality_filter"}
    assert manifest["failed"] == [] and manifest["missing_notes"] == []
    assert checksum_mismatches(built) == []


def test_shards_are_whole_row_groups_of_the_configured_size(built):
    for split in SPLITS:
        groups = []  # per row group: the token counts of its rows
        for path in shard_paths(built, split):
            parquet = pq.ParquetFile(path)
            in_shard = [parquet.read_row_group(g, columns=["n_tokens"])["n_tokens"].to_pylist()
                        for g in range(parquet.num_row_groups)]
            assert sum(map(sum, in_shard[:-1])) < SMALL.shard_tokens  # a shard closes at the group reaching it
            groups += in_shard
        for group in groups[:-1]:  # every group but the split's last reaches the target with its last row
            assert sum(group) >= SMALL.row_group_tokens > sum(group[:-1])


def test_rerun_is_byte_identical_whatever_the_workers(curated, built, tmp_path):
    before = folder_bytes(built)
    rerun = build_token_shards(curated.inputs, built, SMALL)
    assert folder_bytes(built) == before
    # The rerun reused the set: every shard carried, nothing tokenized; the manifest keeps the first build's record.
    assert rerun.build["mode"] == "incremental" and rerun.build["files"]["tokenized"] == 0
    assert rerun.build["shards"]["reused"] == sum(len(s["shards"]) for s in rerun.manifest["splits"].values())
    first_build = rerun.manifest["build"]
    assert first_build["mode"] == "full" and first_build["files"]["tokenized"] == len(curated.selected)
    inputs = copy_home(curated, tmp_path / "copy")
    build_token_shards(inputs, tmp_path / "copy" / "token_shards", replace(SMALL, workers=2))
    assert folder_bytes(tmp_path / "copy" / "token_shards") == before


def test_a_failed_write_keeps_the_old_set_and_leaves_nothing_behind(curated, tmp_path, monkeypatch):
    root = tmp_path / "token_shards"
    build_token_shards(curated.inputs, root, SMALL)
    before, target = folder_bytes(root), os.readlink(root)
    abandoned = tmp_path / ".token_shards" / ".staging-999999999"  # a writer killed mid-write
    abandoned.mkdir()
    groups_written = []
    original_write_group = shards._SplitWriter._write_group

    def write_group_then_die(writer, rows):
        groups_written.append(rows.num_rows)
        if len(groups_written) == 4:  # earlier row groups already sit in staged shards
            raise KeyboardInterrupt("killed mid-write")
        original_write_group(writer, rows)

    monkeypatch.setattr(shards._SplitWriter, "_write_group", write_group_then_die)
    reseeded = replace(SMALL, seed=7)
    with pytest.raises(KeyboardInterrupt):
        build_token_shards(curated.inputs, root, reseeded)
    assert os.readlink(root) == target and folder_bytes(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".token_shards", "token_shards"]
    assert [p.name for p in (tmp_path / ".token_shards").iterdir()] == [Path(target).name]
    monkeypatch.undo()
    build_token_shards(curated.inputs, root, reseeded)
    assert os.readlink(root) != target and read_manifest(root)["seed"] == 7
    assert (tmp_path / target).exists()  # the previous set stays for readers still in it


def test_plain_folder_in_the_way_and_bad_config_are_clear_errors(curated, tmp_path):
    (tmp_path / "token_shards").mkdir()
    with pytest.raises(ShardError, match="plain folder"):
        build_token_shards(curated.inputs, tmp_path / "token_shards", SMALL)
    with pytest.raises(ShardError, match="sum to 1"):
        ShardConfig(split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ShardError, match="row_group_tokens"):
        ShardConfig(shard_tokens=10, row_group_tokens=100)


def test_checksum_check_catches_a_changed_shard(curated, tmp_path):
    root = tmp_path / "token_shards"
    build_token_shards(curated.inputs, root, SMALL)
    shard = shard_paths(root, "train")[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    (root / "train" / "stray.parquet").write_bytes(b"")
    assert checksum_mismatches(root) == ["train/shard-00000.parquet: sha256 differs",
                                         "train/stray.parquet: not in the manifest"]


def test_token_shards_asset_materializes_with_checks(curated, tmp_path):
    home = tmp_path / "home"
    copy_home(curated, home)
    upstream = [dg.AssetSpec(key) for key in ("opus_dedup", "quality_filter", "midi_notes", "raw_midi_manifest")]
    config = {"shard_tokens": 12_000, "row_group_tokens": 4_000, "train_fraction": 0.5, "val_fraction": 0.25,
              "test_fraction": 0.25, "workers": 1}

    def materialize(instance) -> tuple[dict, dict]:
        result = dg.materialize(
            [token_shards, no_cluster_in_two_splits, shard_checksums_match, *upstream],
            resources={"home": AriaHome(path=str(home))},
            run_config=dg.RunConfig({"token_shards": {"config": config}}),
            instance=instance,
        )
        assert result.success
        (materialization,) = result.asset_materializations_for_node("token_shards")
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}, checks

    with dg.instance_for_test() as instance:
        metadata, checks = materialize(instance)
        manifest = read_manifest(home / "token_shards")
        assert metadata["dagster/row_count"] == len(curated.selected)
        assert metadata["tokens"] == sum(manifest["splits"][s]["tokens"] for s in SPLITS)
        assert metadata["tokens_per_s"] > 0
        assert metadata["tokenizer_config_hash"] == AbsTokenizer().config.config_hash()
        assert "| train |" in metadata["splits"] and metadata["train_files"] == manifest["splits"]["train"]["files"]
        assert checks == {"no_cluster_in_two_splits": True, "shard_checksums_match": True}
        sharded = {row["file_id"] for rows in shard_rows(home / "token_shards").values() for row in rows}
        assert sharded == curated.selected
        assert metadata["build_mode"] == "full" and metadata["files_tokenized"] == len(curated.selected)
        assert metadata["shards_new"] == metadata["shards"] and "| files |" in metadata["reuse"]

        dropped = sorted(curated.selected)[0]  # dedup drops one file: its shard is rewritten, nothing tokenized
        dedup = pq.read_table(home / "opus_dedup" / "dedup.parquet")
        kept = pa.array([k and f != dropped for f, k in zip(dedup["file_id"].to_pylist(), dedup["kept"].to_pylist())])
        pq.write_table(dedup.set_column(dedup.schema.get_field_index("kept"), "kept", kept),
                       home / "opus_dedup" / "dedup.parquet")
        metadata, checks = materialize(instance)
    assert checks == {"no_cluster_in_two_splits": True, "shard_checksums_match": True}
    assert metadata["build_mode"] == "incremental" and metadata["files_tokenized"] == 0
    assert metadata["files_dropped"] == 1 and metadata["shards_rewritten"] + metadata["shards_removed"] == 1
    assert metadata["shards_reused"] == metadata["shards"] - metadata["shards_rewritten"]
    assert metadata["dagster/row_count"] == len(curated.selected) - 1


# -- the bulk tokenizer: every row group at once, fed from the note columns ----------------------


def _random_performance(rng, n_notes: int):
    """Notes with every case the tokenizer branches on: drums, tempo maps of one or several entries
    (the first one after tick 0, too), silence before the first note, segments crossed, long notes."""
    from aria_model.midi import DRUM, DRUM_CHANNEL, INSTRUMENTS, Performance

    ticks_per_beat = int(rng.choice([96, 480, 500, 960]))
    start = np.sort(rng.integers(0, 40 * ticks_per_beat * max(1, n_notes // 20), n_notes))
    start += int(rng.integers(0, 4 * ticks_per_beat))
    channel = np.where(rng.random(n_notes) < 0.1, DRUM_CHANNEL, rng.integers(0, 4, n_notes)).astype(np.uint8)
    instrument = np.where(channel == DRUM_CHANNEL, DRUM, rng.integers(0, DRUM, n_notes)).astype(np.uint8)
    n_tempos = int(rng.choice([1, 1, 2, 5]))
    tempo_tick = np.sort(rng.integers(0, int(start.max()) + 2, n_tempos))
    if rng.random() < 0.5:
        tempo_tick[0] = 0
    return Performance(
        start_tick=start.astype(np.int64),
        end_tick=(start + rng.integers(0, 12 * ticks_per_beat, n_notes)).astype(np.int64),
        pitch=rng.integers(0, 128, n_notes).astype(np.uint8),
        velocity=rng.integers(1, 128, n_notes).astype(np.uint8),
        channel=channel,
        instrument=instrument,
        tempo_tick=tempo_tick.astype(np.int64),
        tempo_us=rng.integers(200_000, 1_500_000, n_tempos).astype(np.int64),
        ticks_per_beat=ticks_per_beat,
        instruments=tuple(sorted({INSTRUMENTS[i] for i in instrument.tolist()})),
        n_parsed_notes=n_notes,
    )


def _notes_table(performances) -> pa.Table:
    from aria_model.notes_table import notes_table, performance_row

    return notes_table([performance_row(f"{i:04d}", perf) for i, perf in enumerate(performances)])


@pytest.mark.parametrize("seed", range(6))
def test_bulk_tokenizing_gives_the_per_row_ids(seed):
    """``_tokenize_together`` (one tokenize_ids_many call per row group) against the per-row path
    (``tokenize_ids(performance_from_row(row))``), on random files of 1 to 3,000 notes with prefixes."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 40, 149, 151, *rng.integers(1, 3000, 35).tolist()]  # around <D>'s minimum body
    notes = _notes_table(_random_performance(rng, n) for n in lengths)
    metadata = [{}, {"composer": "chopin"}, {"composer": "bach", "form": "fugue", "genre": "classical"},
                {"composer": "nobody"}]
    wanted = {fid: metadata[i % len(metadata)] for i, fid in enumerate(notes["file_id"].to_pylist())}
    together = shards._tokenize_together(notes, wanted)
    rows, failures = shards._tokenize_rows(notes, wanted)
    assert not failures
    assert together.equals(rows)


def test_row_groups_of_real_files_tokenize_alike_both_ways(tmp_path):
    """Every golden file the parser takes, one midi_notes part: both paths, row group by row group."""
    from tests.conftest import GOLDEN_MIDI

    files = [(hashlib.sha256(p.read_bytes()).hexdigest(), str(p)) for p in GOLDEN_MIDI]
    update_notes_tables(files, tmp_path / "notes", tmp_path / "quarantine", workers=1)
    (part,) = list((tmp_path / "notes").glob("*.parquet"))
    parquet = pq.ParquetFile(part)
    columns = [*shards.NOTE_SCALAR_COLUMNS, *shards.NOTE_LIST_COLUMNS]
    compared = 0
    for group in range(parquet.num_row_groups):
        notes = parquet.read_row_group(group, columns=columns)
        wanted = {fid: {"composer": "debussy"} for fid in notes["file_id"].to_pylist()}
        rows, failures = shards._tokenize_rows(notes, wanted)
        assert not failures and shards._tokenize_together(notes, wanted).equals(rows)
        compared += notes.num_rows
    assert compared >= 20


def test_a_row_the_tokenizer_rejects_is_named_and_the_others_still_tokenized(tmp_path):
    rng = np.random.default_rng(0)
    notes = _notes_table([_random_performance(rng, 30), _random_performance(rng, 30)])
    broken = notes["tempo_tick"].to_pylist()
    broken[1] = []  # no tempo map: the tokenizer cannot place the notes in time
    notes = notes.set_column(notes.schema.get_field_index("tempo_tick"), "tempo_tick",
                             pa.array(broken, notes.schema.field("tempo_tick").type))
    wanted = {fid: {} for fid in notes["file_id"].to_pylist()}
    path = tmp_path / "notes.parquet"
    pq.write_table(notes, path)
    ids, failures = shards._tokenize_row_groups(path, [0], wanted)
    assert ids["file_id"].to_pylist() == ["0000"] and [f["file_id"] for f in failures] == ["0001"]
