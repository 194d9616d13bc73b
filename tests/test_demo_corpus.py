"""Tests for aria_model.demo_corpus: real music21 corpus pieces converted to piano MIDI."""

import io
import json
from pathlib import Path

import mido
import music21
import pytest

from aria_model import demo_corpus
from aria_model.atomic_io import PARTIAL_PREFIX
from aria_model.demo_corpus import (
    COLLECTIONS,
    METADATA_FILE,
    DemoCorpusConfig,
    build_demo_corpus,
    corpus_root,
    force_piano,
    list_demo_pieces,
    normalise_tune_type,
    parse_piece,
    read_abc_tunes,
    score_to_piano_midi,
)

RYAN_TUNE_TYPES = {"reel", "jig", "hornpipe", "strathspey", "clog", "slip jig", "highland fling"}
TINY = DemoCorpusConfig.preset("tiny")


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """The tiny preset built once, through the process pool, shared by the read-only tests."""
    out_dir = tmp_path_factory.mktemp("tiny")
    progress_calls = []
    config = DemoCorpusConfig(pieces_per_collection=TINY.pieces_per_collection, workers=2)
    report = build_demo_corpus(out_dir, config, lambda done, total: progress_calls.append((done, total)))
    metadata = json.loads((out_dir / METADATA_FILE).read_text(encoding="utf-8"))
    return out_dir, report, metadata, progress_calls


def midi_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.rglob("*.mid"))


def test_tiny_build_converts_every_selected_piece(tiny_build):
    out_dir, report, metadata, progress_calls = tiny_build
    assert report.selected == len(COLLECTIONS) * TINY.pieces_per_collection
    assert (report.converted, report.cached, report.failed) == (report.selected, 0, 0)
    assert set(report.per_collection) == set(COLLECTIONS)
    assert all(counts["converted"] == TINY.pieces_per_collection for counts in report.per_collection.values())
    assert progress_calls[-1] == (report.selected, report.selected)
    relpaths = {path.relative_to(out_dir).as_posix() for path in midi_files(out_dir)}
    assert relpaths == set(metadata["pieces"])


def test_every_written_file_is_piano_only_with_notes(tiny_build):
    out_dir, _, _, _ = tiny_build
    for path in midi_files(out_dir):
        messages = [message for track in mido.MidiFile(path).tracks for message in track]
        assert any(message.type == "note_on" and message.velocity > 0 for message in messages), path
        assert all(message.program == 0 for message in messages if message.type == "program_change"), path
        assert all(getattr(message, "channel", 0) != 9 for message in messages), path


def test_metadata_file_format(tiny_build):
    _, _, metadata, _ = tiny_build
    assert set(metadata) == {"version", "config", "pieces", "failed"}
    assert metadata["version"] == demo_corpus.FORMAT_VERSION
    assert metadata["config"] == {
        "collections": list(COLLECTIONS),
        "pieces_per_collection": TINY.pieces_per_collection,
        "seed": TINY.seed,
    }
    assert metadata["failed"] == {}
    for relpath, labels in metadata["pieces"].items():
        assert set(labels) == {
            "collection", "composer", "title", "tune_type", "region", "origin", "source",
            "tune_index", "tune_number", "repeats_expanded", "music21_version",
        }
        assert relpath.startswith(labels["collection"] + "/")
        assert (corpus_root() / labels["source"]).is_file()
        assert labels["title"]
        assert labels["music21_version"] == music21.__version__


def test_labels_come_from_the_music(tiny_build):
    _, _, metadata, _ = tiny_build
    by_collection = {}
    for labels in metadata["pieces"].values():
        by_collection.setdefault(labels["collection"], []).append(labels)
    assert {labels["composer"] for labels in by_collection["bach"]} == {"bach"}
    assert {labels["composer"] for labels in by_collection["palestrina"]} == {"palestrina"}
    assert all(labels["tune_type"] in RYAN_TUNE_TYPES for labels in by_collection["ryansMammoth"])
    assert all(labels["region"] for labels in by_collection["essenFolksong"])
    assert all(labels["region"] in labels["origin"] for labels in by_collection["essenFolksong"])
    for collection in ("ryansMammoth", "essenFolksong", "oneills1850"):
        assert all(labels["composer"] is None for labels in by_collection[collection])
        assert all(labels["tune_number"] for labels in by_collection[collection])


def test_rebuild_with_same_config_converts_nothing(tiny_build):
    out_dir, first, metadata, _ = tiny_build
    again = build_demo_corpus(out_dir, DemoCorpusConfig(pieces_per_collection=TINY.pieces_per_collection))
    assert (again.converted, again.cached, again.failed) == (0, first.selected, 0)
    assert json.loads((out_dir / METADATA_FILE).read_text(encoding="utf-8")) == metadata


def test_bigger_config_converts_only_the_missing_pieces(tmp_path):
    small = DemoCorpusConfig(collections=("ryansMammoth",), pieces_per_collection=2, workers=1)
    bigger = DemoCorpusConfig(collections=("ryansMammoth",), pieces_per_collection=4, workers=1)
    build_demo_corpus(tmp_path, small)
    report = build_demo_corpus(tmp_path, bigger)
    assert (report.converted, report.cached) == (2, 2)
    assert len(midi_files(tmp_path)) == 4


def test_selection_is_seeded_and_deterministic():
    same = [list_demo_pieces(DemoCorpusConfig(pieces_per_collection=5, seed=7)) for _ in range(2)]
    other_seed = list_demo_pieces(DemoCorpusConfig(pieces_per_collection=5, seed=8))
    assert same[0] == same[1]
    assert same[0] != other_seed
    assert len(same[0]) == 5 * len(COLLECTIONS)


def test_presets_nest_so_growing_reuses_the_smaller_build():
    tiny = set(list_demo_pieces(DemoCorpusConfig.preset("tiny")))
    demo = list_demo_pieces(DemoCorpusConfig.preset("demo"))
    assert tiny <= set(demo)
    assert len(demo) == len(COLLECTIONS) * DemoCorpusConfig.preset("demo").pieces_per_collection
    assert DemoCorpusConfig.preset("full").pieces_per_collection is None


def test_full_listing_skips_analyses_and_duplicate_transcriptions():
    full = list_demo_pieces(DemoCorpusConfig(collections=("bach", "oneills1850"), pieces_per_collection=None))
    bach_sources = [piece.source for piece in full if piece.collection == "bach"]
    assert not any(source.endswith(".rntxt") for source in bach_sources)
    assert "bach/bwv277.mxl" in bach_sources and "bach/bwv277.krn" not in bach_sources
    oneills = [piece for piece in full if piece.collection == "oneills1850"]
    tunes_by_source = {piece.source: read_abc_tunes(corpus_root() / piece.source) for piece in oneills}
    book_fields = [tunes_by_source[piece.source][piece.tune_index - 1].header.get("B", "") for piece in oneills]
    oneill_numbers = [demo_corpus.ONEILL_NUMBER.search(book_field) for book_field in book_fields]
    numbers = [int(match.group(1)) for match in oneill_numbers if match]
    assert len(numbers) == len(set(numbers)) > 1500
    assert len({piece.relpath for piece in full}) == len(full)


def test_failing_piece_is_reported_and_the_rest_is_written(tmp_path, monkeypatch):
    config = DemoCorpusConfig(collections=("ryansMammoth",), pieces_per_collection=3, workers=1)
    broken = list_demo_pieces(config)[1]
    real_parse = demo_corpus.parse_piece

    def parse_failing_on_one(path, abc_tune_text):
        if path.name == Path(broken.source).name:
            raise RuntimeError("unreadable score")
        return real_parse(path, abc_tune_text)

    monkeypatch.setattr(demo_corpus, "parse_piece", parse_failing_on_one)
    report = build_demo_corpus(tmp_path, config)
    assert (report.converted, report.failed) == (2, 1)
    assert report.failures == {broken.relpath: "RuntimeError: unreadable score"}
    metadata = json.loads((tmp_path / METADATA_FILE).read_text(encoding="utf-8"))
    assert metadata["failed"] == report.failures
    assert broken.relpath not in metadata["pieces"] and len(metadata["pieces"]) == 2
    assert not (tmp_path / broken.relpath).exists()


def test_build_leaves_no_partial_files_and_cleans_stale_ones(tmp_path):
    stale = tmp_path / "ryansMammoth" / f"{PARTIAL_PREFIX}killed.mid.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    one_tune = DemoCorpusConfig(collections=("ryansMammoth",), pieces_per_collection=1, workers=1)
    build_demo_corpus(tmp_path, one_tune)
    assert not list(tmp_path.rglob(f"{PARTIAL_PREFIX}*"))
    assert len(midi_files(tmp_path)) == 1


def test_force_piano_rewrites_programs_and_drum_channel():
    track = mido.MidiTrack([
        mido.Message("program_change", channel=0, program=53),
        mido.Message("note_on", channel=0, note=60, velocity=90),
        mido.Message("note_on", channel=9, note=36, velocity=90),
        mido.Message("note_off", channel=9, note=36, time=10),
    ])
    midi_file = mido.MidiFile(tracks=[track])
    force_piano(midi_file)
    assert track[0].program == 0
    assert [message.channel for message in track] == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("source", "tune_index", "repeats_expanded"),
    [
        ("bach/bwv1.6.mxl", None, True),  # parts declared as instruments on channels 1-7
        ("palestrina/Agnus_01.krn", None, True),  # music21 gives it Voice Oohs (program 53)
        ("essenFolksong/han1.abc", 19, True),  # one TimeSignature object shared by three bars
        ("ryansMammoth/ConnaughtLassesReel.abc", 1, False),  # a `:|` with no matching `|:`
    ],
)
def test_awkward_scores_convert_to_piano(source, tune_index, repeats_expanded):
    path = corpus_root() / source
    abc_text = read_abc_tunes(path)[tune_index - 1].text if tune_index else None
    midi_bytes, expanded = score_to_piano_midi(parse_piece(path, abc_text))
    assert expanded == repeats_expanded
    messages = [message for track in mido.MidiFile(file=io.BytesIO(midi_bytes)).tracks for message in track]
    assert {message.program for message in messages if message.type == "program_change"} <= {0}
    assert any(message.type == "note_on" for message in messages)


def test_tune_type_spellings_are_normalised():
    assert normalise_tune_type(" Slip  Jig") == "slip jig"
    assert normalise_tune_type("slipjig") == "slip jig"
    assert normalise_tune_type("double jig") == "jig"
    assert normalise_tune_type("Reel") == "reel"
    assert normalise_tune_type("") is None


def test_config_rejects_unknown_collection_and_preset():
    with pytest.raises(ValueError, match="unknown collections"):
        DemoCorpusConfig(collections=("mozart",))
    with pytest.raises(ValueError, match="unknown preset"):
        DemoCorpusConfig.preset("huge")


def test_cli_on_a_built_corpus_reports_everything_cached(tiny_build, capsys):
    out_dir, report, _, _ = tiny_build
    demo_corpus.main([str(out_dir), "--preset", "tiny", "--workers", "1"])
    assert f"0 converted, {report.selected} cached, 0 failed" in capsys.readouterr().out
