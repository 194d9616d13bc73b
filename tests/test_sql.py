"""sql/*.sql through run_sql: parameters are explicit, results match values computed in Python."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aria_model.sql import run_sql


def _notes_part(path, rows):
    table = pa.table({
        "n_notes": pa.array([r[0] for r in rows], pa.int32()),
        "duration_ms": pa.array([r[1] for r in rows], pa.int64()),
        "instruments": pa.array([r[2] for r in rows], pa.list_(pa.string())),
    })
    pq.write_table(table, path)
    return str(path)


def test_notes_summary_matches_python(tmp_path):
    rows = [(100, 60_000, ["piano"]), (300, 120_000, ["piano", "drum"]), (50, 30_000, ["piano"])]
    parts = [_notes_part(tmp_path / "a.parquet", rows[:2]), _notes_part(tmp_path / "b.parquet", rows[2:])]
    (summary,) = run_sql("notes_summary", {"notes": parts}).to_pylist()
    assert summary["files"] == 3
    assert summary["notes"] == 450
    assert summary["hours"] == round(210_000 / 3.6e6, 2)
    assert summary["median_notes_per_file"] == 100
    assert summary["notes_per_second_of_music"] == round(450 / 210, 2)
    assert summary["multi_instrument_files"] == 1


def test_missing_parameter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs parameters"):
        run_sql("notes_summary", {})


def test_quarantine_share(tmp_path):
    pq.write_table(pa.table({"file_id": ["a", "b", "b", "c", "d"]}), tmp_path / "manifest.parquet")
    pq.write_table(pa.table({"file_id": ["b", "z"]}), tmp_path / "q.parquet")
    (row,) = run_sql("quarantine_share", {"manifest": str(tmp_path / "manifest.parquet"),
                                          "quarantine": [str(tmp_path / "q.parquet")]}).to_pylist()
    assert row == {"manifest_files": 4, "quarantined": 1}
