"""midi_notes / midi_quarantine tables: exact round trip, incremental and idempotent writes."""

import hashlib
import shutil

import numpy as np
import pyarrow.parquet as pq

from aria_model import notes_table
from aria_model.midi import load_midi
from aria_model.notes_table import part_files, performance_from_row, update_notes_tables
from aria_model.tokenizer import AbsTokenizer
from tests.conftest import BAD_FILES, GOLDEN_DIR, GOOD_GOLDEN


def _files(folder):
    paths = sorted(p for p in folder.rglob("*.mid"))
    return [(hashlib.sha256(p.read_bytes()).hexdigest(), str(p)) for p in paths]


def test_good_files_parsed_bad_files_quarantined_with_distinct_reasons(mixed_source, tmp_path):
    report = update_notes_tables(_files(mixed_source), tmp_path / "notes", tmp_path / "q", workers=2)
    assert report.parsed == len(GOOD_GOLDEN)
    assert report.quarantined == len(BAD_FILES)
    quarantine = pq.read_table(part_files(tmp_path / "q")[0]).to_pylist()
    reasons = {row["path"].rsplit("/", 1)[-1]: row["reason"] for row in quarantine}
    assert reasons == {name: reason for name, (_, reason) in BAD_FILES.items()}
    assert all(row["message"] for row in quarantine)


def test_rows_rebuild_the_exact_performance(mixed_source, tmp_path):
    files = _files(mixed_source)
    update_notes_tables(files, tmp_path / "notes", tmp_path / "q", workers=1)
    tokenizer = AbsTokenizer()
    path_of = dict(files)
    for row in pq.read_table(part_files(tmp_path / "notes")[0]).to_pylist():
        from_table = tokenizer.tokenize_ids(performance_from_row(row))
        from_file = tokenizer.tokenize_ids(load_midi(path_of[row["file_id"]]))
        assert np.array_equal(from_table, from_file)
        assert len(row["onset_ms"]) == row["n_notes"] == len(row["duration"])


def test_rerun_adds_nothing_and_new_file_gets_its_own_part(mixed_source, tmp_path):
    files = _files(mixed_source)
    update_notes_tables(files, tmp_path / "notes", tmp_path / "q", workers=2)
    before = {p.name: p.read_bytes() for p in part_files(tmp_path / "notes")}
    again = update_notes_tables(files, tmp_path / "notes", tmp_path / "q", workers=2)
    assert again.files == 0
    assert {p.name: p.read_bytes() for p in part_files(tmp_path / "notes")} == before

    extra = mixed_source / "copy_of_basic.mid"
    extra.write_bytes((mixed_source / "basic.mid").read_bytes())  # same content: same file_id
    assert update_notes_tables(_files(mixed_source), tmp_path / "notes", tmp_path / "q").files == 0
    shutil.copy(GOLDEN_DIR / "midi" / "edge_velocity.mid", mixed_source / "new.mid")
    added = update_notes_tables(_files(mixed_source), tmp_path / "notes", tmp_path / "q", workers=1)
    assert added.files == 1
    assert len(part_files(tmp_path / "notes")) == 2
    assert not list((tmp_path / "notes").glob(".*tmp*"))


def test_same_input_writes_identical_bytes_whatever_the_workers(mixed_source, tmp_path):
    files = _files(mixed_source)
    update_notes_tables(files, tmp_path / "a", tmp_path / "qa", workers=1)
    update_notes_tables(files, tmp_path / "b", tmp_path / "qb", workers=2)
    (a,), (b,) = part_files(tmp_path / "a"), part_files(tmp_path / "b")
    assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_workers_writing_whole_parts_write_the_same_bytes(mixed_source, tmp_path, monkeypatch):
    files = _files(mixed_source)
    monkeypatch.setattr(notes_table, "PART_FILES", 2)  # parts enough for each of 2 workers to write its own
    seen = []
    here = update_notes_tables(files, tmp_path / "a", tmp_path / "qa", workers=1)
    by_workers = update_notes_tables(files, tmp_path / "b", tmp_path / "qb", workers=2,
                                     progress=lambda done, total: seen.append((done, total)))
    parts = part_files(tmp_path / "a")
    assert len(parts) >= notes_table.PARTS_PER_WORKER * 2
    assert [p.name for p in part_files(tmp_path / "b")] == [p.name for p in parts]
    for folder_a, folder_b in (("a", "b"), ("qa", "qb")):
        for a, b in zip(part_files(tmp_path / folder_a), part_files(tmp_path / folder_b)):
            assert a.read_bytes() == b.read_bytes()
    assert (by_workers.parsed, by_workers.quarantined, by_workers.notes, by_workers.reasons) == \
        (here.parsed, here.quarantined, here.notes, here.reasons)
    assert seen[-1] == (len(files), len(files)) and len(seen) == len(parts)
