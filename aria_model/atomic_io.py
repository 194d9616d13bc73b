"""Atomic file writes: readers see the old file or the whole new one, never a part.

Everything goes to a temp file in the destination folder (same filesystem) and
is renamed into place only after it was completely written. Temp files start
with ``PARTIAL_PREFIX`` so that whoever owns a folder can sweep the leftovers
of a killed writer with ``remove_partial_files``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PARTIAL_PREFIX = ".partial-"


def partial_path(path: Path) -> Path:
    """A unique temp name beside ``path`` (unique per call: threads and processes may write at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f"{PARTIAL_PREFIX}{path.name}.{uuid.uuid4().hex}")


def remove_partial_files(folder: Path) -> int:
    """Delete temp files that killed writers left anywhere under ``folder``."""
    leftovers = list(Path(folder).rglob(f"{PARTIAL_PREFIX}*"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return len(leftovers)


class AtomicParquetWriter:
    """Stream row groups to a temp file; rename into place only if the block exits cleanly."""

    def __init__(self, path: Path, schema: pa.Schema, compression: str = "zstd", **options):
        """``options``: more ``pq.ParquetWriter`` keywords (encodings, dictionaries)."""
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.writer = pq.ParquetWriter(self.tmp, schema, compression=compression, **options)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)

    def __enter__(self) -> "AtomicParquetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.writer.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    with AtomicParquetWriter(path, table.schema) as out:
        out.write(table)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = partial_path(path)
    try:
        # Not tempfile: its 0600 mode would stick to the final file.
        with open(tmp, "xb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(data: Any, path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    write_bytes_atomic(path, text.encode("utf-8"))
