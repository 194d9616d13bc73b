"""Atomic writes leave the old file or the whole new one, and no temp file behind."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aria_model.atomic_io import (
    PARTIAL_PREFIX,
    AtomicParquetWriter,
    remove_partial_files,
    write_bytes_atomic,
    write_json_atomic,
)


def test_failed_rename_leaves_no_partial_file(tmp_path):
    target = tmp_path / "piece.mid"
    target.mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        write_bytes_atomic(target, b"MThd")
    assert [path.name for path in tmp_path.iterdir()] == ["piece.mid"]


def test_parquet_writer_failing_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "table.parquet"
    pq.write_table(pa.table({"x": [1]}), target)
    with pytest.raises(RuntimeError):
        with AtomicParquetWriter(target, pa.schema([("x", pa.int64())])) as out:
            out.write(pa.table({"x": [2, 3]}))
            raise RuntimeError("killed while writing")
    assert pq.read_table(target)["x"].to_pylist() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]


def test_json_round_trip_and_sweeping_leftovers(tmp_path):
    write_json_atomic({"b": 1, "a": "é"}, tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text(encoding="utf-8").startswith('{\n  "a": "é"')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f"{PARTIAL_PREFIX}x.mid.123").write_bytes(b"half")
    assert remove_partial_files(tmp_path) == 1
    assert not list(tmp_path.rglob(f"{PARTIAL_PREFIX}*"))
