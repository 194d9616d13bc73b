"""Source discovery and the raw MIDI manifest, on small synthetic trees in each layout."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pytest

from aria_model import sources
from aria_model.sources import (
    MANIFEST_SCHEMA,
    MetadataError,
    SourceError,
    build_manifest,
    composer_key,
    iter_midi_files,
    build_manifest_for_sources,
    resolve_sources,
)


def write_midi(path: Path, content: bytes | None = None) -> Path:
    """A stand-in MIDI file: this module hashes bytes and never parses them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if content is not None else b"MThd" + path.name.encode())
    return path


def rows_by_relpath(table: pa.Table) -> dict[str, dict]:
    return {row["relpath"]: row for row in table.to_pylist()}


def count_hash_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every file the manifest builder reads, still hashing it for real."""
    reads: list[str] = []
    real_sha256_file = sources.sha256_file

    def counting_sha256_file(path):
        reads.append(Path(path).name)
        return real_sha256_file(path)

    monkeypatch.setattr(sources, "sha256_file", counting_sha256_file)
    return reads


@pytest.fixture
def aria_tree(tmp_path: Path) -> Path:
    root = tmp_path / "aria-midi-v1"
    for name in ("000001_0.mid", "000001_1.mid", "000042_0.mid", "000007_0.mid"):
        write_midi(root / "data" / "aa" / name)
    metadata = {
        "1": {
            "metadata": {
                "composer": "Frédéric Chopin",
                "opus": 10,
                "piece_number": 3.0,
                "title": "Etude in E major",
                "genre": "classical",
                "performer": "Some Pianist",
                "form": "etude",
            },
            "audio_scores": {"0": 0.95, "1": 0.8},
        },
        "42": {"metadata": {"composer": "Johann Sebastian Bach"}},  # no audio_scores
    }
    (root / "metadata.json").write_text(json.dumps(metadata))
    return root


def test_aria_midi_segments_get_their_metadata_and_audio_score(aria_tree: Path):
    result = build_manifest(aria_tree)
    rows = rows_by_relpath(result.table)

    assert result.layout == "aria_midi"
    assert [relpath.removeprefix("data/aa/") for relpath in rows] == [
        "000001_0.mid",
        "000001_1.mid",
        "000007_0.mid",
        "000042_0.mid",
    ]
    first = rows["data/aa/000001_0.mid"]
    assert first["source"] == "aria_midi"
    assert (first["composer"], first["composer_raw"]) == ("chopin", "Frédéric Chopin")
    assert (first["opus"], first["piece"], first["title"]) == ("10", "3", "Etude in E major")
    assert (first["genre"], first["performer"]) == ("classical", "Some Pianist")
    assert first["transcription_score"] == 0.95
    assert json.loads(first["extra"]) == {"form": "etude", "aria_file_id": "000001", "aria_segment": 0}
    assert rows["data/aa/000001_1.mid"]["transcription_score"] == 0.8
    assert rows["data/aa/000042_0.mid"]["composer"] == "bach"
    assert rows["data/aa/000042_0.mid"]["transcription_score"] is None
    assert rows["data/aa/000007_0.mid"]["composer"] is None  # id absent from metadata.json


def test_aria_metadata_json_is_found_above_the_source_root(aria_tree: Path):
    records = list(iter_midi_files(aria_tree / "data" / "aa"))

    assert {record.source for record in records} == {"aria_midi"}
    assert [record.relpath for record in records][0] == "000001_0.mid"
    assert records[0].metadata["composer"] == "chopin"


def test_metadata_json_too_far_above_the_root_is_not_aria(tmp_path: Path):
    (tmp_path / "metadata.json").write_text("{}")
    source = tmp_path / "a" / "b" / "c" / "d"
    write_midi(source / "1_0.mid")

    assert build_manifest(source).layout == "plain"


def test_maestro_csv_metadata(tmp_path: Path):
    write_midi(tmp_path / "2018" / "first.midi")
    write_midi(tmp_path / "2004" / "second.midi")
    write_midi(tmp_path / "2004" / "unlisted.midi")
    (tmp_path / "maestro-v3.0.0.csv").write_text(
        "canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration\n"
        '"Frédéric Chopin","Ballade No. 1",train,2018,2018/first.midi,2018/first.wav,598.5\n'
        '"Franz Liszt / Ferruccio Busoni",Rhapsody,test,2004,2004/second.midi,2004/second.wav,10.0\n',
        encoding="utf-8",
    )

    result = build_manifest(tmp_path)
    rows = rows_by_relpath(result.table)

    assert result.layout == "maestro"
    first = rows["2018/first.midi"]
    assert (first["composer"], first["title"], first["split"]) == ("chopin", "Ballade No. 1", "train")
    assert json.loads(first["extra"]) == {
        "year": "2018",
        "audio_filename": "2018/first.wav",
        "duration": "598.5",
    }
    assert (rows["2004/second.midi"]["composer"], rows["2004/second.midi"]["split"]) == ("liszt", "test")
    assert rows["2004/unlisted.midi"]["composer"] is None


def test_maestro_column_oriented_json_metadata(tmp_path: Path):
    write_midi(tmp_path / "2006" / "piece.midi")
    index = {
        "canonical_composer": {"0": "Johann Sebastian Bach"},
        "canonical_title": {"0": "Prelude and Fugue in C major, BWV 846"},
        "split": {"0": "validation"},
        "year": {"0": 2006},
        "midi_filename": {"0": "2006/piece.midi"},
        "duration": {"0": 120.25},
    }
    (tmp_path / "maestro-v3.0.0.json").write_text(json.dumps(index))

    row = build_manifest(tmp_path).table.to_pylist()[0]

    assert (row["source"], row["composer"], row["split"]) == ("maestro", "bach", "validation")
    assert row["title"] == "Prelude and Fugue in C major, BWV 846"
    assert json.loads(row["extra"]) == {"year": 2006, "duration": 120.25}


def test_demo_metadata_labels_become_columns_or_extra(tmp_path: Path):
    write_midi(tmp_path / "ryansMammoth" / "tune.mid")
    write_midi(tmp_path / "bach" / "bwv66.6.mid")
    pieces = {
        "ryansMammoth/tune.mid": {
            "collection": "ryansMammoth",
            "title": "Boys of Blue Hill",
            "tune_type": "hornpipe",
            "meter": "4/4",
            "source": "ryansMammoth/book1.abc",  # a label named like a column stays a label
        },
        "bach/bwv66.6.mid": {"collection": "bach", "composer": "bach", "region": None},
    }
    demo_metadata = {"version": 1, "config": {"seed": 0}, "pieces": pieces}
    (tmp_path / "demo_metadata.json").write_text(json.dumps(demo_metadata))

    rows = rows_by_relpath(build_manifest(tmp_path).table)

    tune = rows["ryansMammoth/tune.mid"]
    assert (tune["source"], tune["collection"], tune["tune_type"]) == ("demo", "ryansMammoth", "hornpipe")
    assert json.loads(tune["extra"]) == {"meter": "4/4", "source": "ryansMammoth/book1.abc"}
    assert (rows["bach/bwv66.6.mid"]["composer"], rows["bach/bwv66.6.mid"]["region"]) == ("bach", None)


def test_demo_source_is_only_the_pieces_its_index_lists(tmp_path: Path):
    write_midi(tmp_path / "bach" / "listed.mid")
    write_midi(tmp_path / "bach" / "cached_from_a_bigger_config.mid")
    pieces = {"bach/listed.mid": {"collection": "bach"}, "bach/not_built.mid": {"collection": "bach"}}
    (tmp_path / "demo_metadata.json").write_text(json.dumps({"version": 1, "config": {}, "pieces": pieces}))

    result = build_manifest(tmp_path)

    assert result.table.column("relpath").to_pylist() == ["bach/listed.mid"]
    assert result.stats.files_seen == 1


def test_demo_index_listing_nothing_on_disk_is_an_error(tmp_path: Path):
    write_midi(tmp_path / "other.mid")
    (tmp_path / "demo_metadata.json").write_text(json.dumps({"pieces": {"gone.mid": {}}}))

    with pytest.raises(SourceError, match="none of the pieces listed in .*demo_metadata.json"):
        build_manifest(tmp_path)


def test_dot_named_files_and_folders_are_skipped(tmp_path: Path):
    for relpath in ("song.mid", "._song.mid", ".git/objects/x.mid", "sub/.partial.mid"):
        write_midi(tmp_path / relpath)

    assert build_manifest(tmp_path).table.column("relpath").to_pylist() == ["song.mid"]


def test_plain_nested_tree_with_any_case_extension(tmp_path: Path):
    for relpath in ("b/Song.MID", "a/deep/er/x.Midi", "top.mid", "notes.txt", "a/not_midi.mid.bak"):
        write_midi(tmp_path / relpath)

    result = build_manifest(tmp_path)

    assert result.layout == "plain"
    assert result.table.column("relpath").to_pylist() == ["a/deep/er/x.Midi", "b/Song.MID", "top.mid"]
    assert result.table.schema == MANIFEST_SCHEMA
    for name in ("composer", "composer_raw", "opus", "piece", "title", "transcription_score", "split"):
        assert result.table.column(name).null_count == 3
    assert set(result.table.column("extra").to_pylist()) == {"{}"}


def test_plain_layout_does_not_guess_composers_from_names(tmp_path: Path):
    write_midi(tmp_path / "Chopin_Ballade_1.mid")

    row = build_manifest(tmp_path).table.to_pylist()[0]

    assert row["composer"] is None and row["title"] is None


def test_forced_layout_overrides_detection(aria_tree: Path):
    result = build_manifest(aria_tree, layout="plain")

    assert result.layout == "plain"
    assert result.table.column("composer").null_count == result.table.num_rows


def test_unknown_forced_layout_is_rejected(aria_tree: Path):
    with pytest.raises(ValueError, match="unknown source layout 'midi'"):
        build_manifest(aria_tree, layout="midi")


def test_file_id_is_sha256_of_content_and_shared_by_copies(tmp_path: Path):
    content = b"MThd\x00\x00\x00\x06" + bytes(range(256)) * 50
    write_midi(tmp_path / "one.mid", content)
    write_midi(tmp_path / "copy" / "two.mid", content)

    table = build_manifest(tmp_path, workers=1).table

    assert table.column("file_id").to_pylist() == [hashlib.sha256(content).hexdigest()] * 2
    assert table.column("size_bytes").to_pylist() == [len(content)] * 2
    assert table.column("path").to_pylist()[0] == str((tmp_path / "copy" / "two.mid").resolve())


def test_schema_is_fixed_across_layouts(aria_tree: Path, tmp_path: Path):
    write_midi(tmp_path / "plain" / "x.mid")

    assert build_manifest(aria_tree).table.schema == MANIFEST_SCHEMA
    assert build_manifest(tmp_path / "plain").table.schema == MANIFEST_SCHEMA


def test_rebuild_reuses_unchanged_files_without_reading_them(aria_tree: Path, monkeypatch):
    first = build_manifest(aria_tree)
    reads = count_hash_reads(monkeypatch)

    second = build_manifest(aria_tree, previous=first.table)

    assert reads == []
    assert (second.stats.files_reused, second.stats.files_hashed, second.stats.bytes_hashed) == (4, 0, 0)
    assert second.table.equals(first.table)


def test_rebuild_rehashes_changed_drops_deleted_and_adds_new(aria_tree: Path, monkeypatch):
    folder = aria_tree / "data" / "aa"
    first = build_manifest(aria_tree)
    changed = write_midi(folder / "000001_1.mid", b"MThd changed content")
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (folder / "000007_0.mid").unlink()
    write_midi(folder / "000099_0.mid")
    reads = count_hash_reads(monkeypatch)

    second = build_manifest(aria_tree, previous=first.table)
    rows = rows_by_relpath(second.table)

    assert sorted(reads) == ["000001_1.mid", "000099_0.mid"]
    stats = second.stats
    assert (stats.files_seen, stats.files_hashed, stats.files_reused, stats.files_removed) == (4, 2, 2, 1)
    assert rows["data/aa/000001_1.mid"]["file_id"] == hashlib.sha256(b"MThd changed content").hexdigest()
    assert "data/aa/000007_0.mid" not in rows


def test_metadata_edits_show_up_without_rehashing(aria_tree: Path, monkeypatch: pytest.MonkeyPatch):
    first = build_manifest(aria_tree)
    metadata_file = aria_tree / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["7"] = {"metadata": {"composer": "Claude Debussy"}, "audio_scores": {"0": 0.5}}
    metadata_file.write_text(json.dumps(metadata))
    reads = count_hash_reads(monkeypatch)

    row = rows_by_relpath(build_manifest(aria_tree, previous=first.table).table)["data/aa/000007_0.mid"]

    assert reads == []
    assert (row["composer"], row["transcription_score"]) == ("debussy", 0.5)


def test_file_vanishing_before_hashing_is_skipped_and_counted(tmp_path: Path, monkeypatch):
    write_midi(tmp_path / "stays.mid")
    doomed = write_midi(tmp_path / "vanishes.mid")
    real_sha256_file = sources.sha256_file

    def delete_then_hash(path):
        if Path(path).name == doomed.name:
            doomed.unlink()
        return real_sha256_file(path)

    monkeypatch.setattr(sources, "sha256_file", delete_then_hash)
    result = build_manifest(tmp_path)

    assert result.table.column("relpath").to_pylist() == ["stays.mid"]
    assert (result.stats.files_seen, result.stats.files_skipped, result.stats.files_hashed) == (2, 1, 1)


def test_symlinks_are_followed_without_looping(tmp_path: Path):
    source = tmp_path / "source"
    target = write_midi(tmp_path / "elsewhere" / "linked.mid", b"linked content")
    write_midi(source / "real" / "own.mid")
    (source / "link.mid").symlink_to(target)
    (source / "real" / "loop").symlink_to(source, target_is_directory=True)
    (source / "dangling.mid").symlink_to(tmp_path / "missing.mid")

    rows = rows_by_relpath(build_manifest(source).table)

    assert list(rows) == ["link.mid", "real/own.mid"]
    assert rows["link.mid"]["file_id"] == hashlib.sha256(b"linked content").hexdigest()


def test_order_and_content_are_deterministic(aria_tree: Path):
    first = build_manifest(aria_tree, workers=1).table
    second = build_manifest(aria_tree, workers=8).table

    assert first.equals(second)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("Frédéric Chopin", "chopin"),
        ("Johann Sebastian Bach", "bach"),
        ("J.S. Bach", "bach"),
        ("Bach, Johann Sebastian", "bach"),
        ("Ludwig van Beethoven", "beethoven"),
        ("Antonín Dvořák", "dvorak"),
        ("Camille Saint-Saëns", "saint-saens"),
        ("Johann Strauss II", "strauss"),
        ("Sergei Rachmaninov", "rachmaninoff"),
        ("Franz Liszt / Ferruccio Busoni", "liszt"),
        ("Bach (arr. Busoni)", "bach"),
        ("Unknown", None),
        ("  ", None),
        (None, None),
    ],
)
def test_composer_key(raw, key):
    assert composer_key(raw) == key


def test_missing_source_folder_is_named(tmp_path: Path):
    missing = tmp_path / "nowhere"

    with pytest.raises(SourceError, match="does not exist: .*nowhere"):
        build_manifest(missing)
    assert issubclass(SourceError, ValueError)


def test_folder_without_midi_files_is_named(tmp_path: Path):
    (tmp_path / "readme.txt").write_text("no music here")

    with pytest.raises(SourceError, match=f"no MIDI files .* under {re.escape(str(tmp_path))}"):
        build_manifest(tmp_path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "cannot read metadata"),
        ("[1, 2]", "expected an object keyed by Aria-MIDI file id"),
        ('{"1": "chopin"}', "entry '000001' is str"),
        ('{"1": {"audio_scores": [0.9]}}', "field 'audio_scores' is list"),
    ],
)
def test_malformed_aria_metadata_names_the_file(aria_tree: Path, content: str, problem: str):
    (aria_tree / "metadata.json").write_text(content)

    with pytest.raises(MetadataError, match=problem) as error:
        build_manifest(aria_tree)
    assert str(aria_tree / "metadata.json") in str(error.value)


def test_maestro_csv_without_midi_filename_names_the_file(tmp_path: Path):
    write_midi(tmp_path / "2018" / "a.midi")
    (tmp_path / "maestro-v3.0.0.csv").write_text("canonical_composer,canonical_title\nChopin,Ballade\n")

    with pytest.raises(MetadataError, match="maestro-v3.0.0.csv: no midi_filename column"):
        build_manifest(tmp_path)


def test_malformed_demo_metadata_names_the_file(tmp_path: Path):
    write_midi(tmp_path / "x.mid")
    (tmp_path / "demo_metadata.json").write_text('{"pieces": ["x.mid"]}')

    with pytest.raises(MetadataError, match="demo_metadata.json: expected"):
        build_manifest(tmp_path)


def test_forcing_maestro_without_an_index_is_an_error(tmp_path: Path):
    write_midi(tmp_path / "x.mid")

    with pytest.raises(MetadataError, match="no maestro-v"):
        build_manifest(tmp_path, layout="maestro")


def test_previous_manifest_without_needed_columns_is_rejected(aria_tree: Path):
    with pytest.raises(ValueError, match="previous manifest lacks column"):
        build_manifest(aria_tree, previous=pa.table({"path": ["x"]}))


def test_resolve_sources_prefers_explicit_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("ARIA_SOURCE", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert resolve_sources(str(tmp_path / "explicit")) == [tmp_path / "explicit"]
    assert resolve_sources(None) == [tmp_path / "a", tmp_path / "b"]

    monkeypatch.delenv("ARIA_SOURCE")
    assert resolve_sources(None) == []


def test_several_sources_make_one_manifest_each_walked_incrementally(tmp_path: Path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, names in ((first, ["a.mid", "b.mid"]), (second, ["c.mid"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(name.encode())
    alone = build_manifest_for_sources([first])
    both = build_manifest_for_sources([first, second], previous=alone.table)
    assert both.table["relpath"].to_pylist() == ["a.mid", "b.mid", "c.mid"]
    assert (both.stats.files_hashed, both.stats.files_reused, both.stats.files_removed) == (1, 2, 0)
    only_second = build_manifest_for_sources([second], previous=both.table)
    assert (only_second.stats.files_reused, only_second.stats.files_removed) == (1, 2)
