"""Run the DuckDB queries kept as ``sql/<name>.sql``, with every parameter passed explicitly.

DuckDB resolves ``$name`` from session variables too, so a forgotten parameter
could silently pick one up; ``run_sql`` refuses to run unless each named
parameter of the file is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def load_sql(name: str) -> str:
    path = SQL_DIR / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no query named {name!r} in {SQL_DIR}")
    return path.read_text()


def run_sql(name: str, params: dict[str, Any], con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Execute ``sql/<name>.sql`` and return its result as an Arrow table."""
    sql = load_sql(name)
    con = con or duckdb.connect()
    expected = {p for statement in con.extract_statements(sql) for p in statement.named_parameters}
    missing = expected - set(params)
    if missing:
        raise ValueError(f"query {name!r} needs parameters {sorted(missing)}")
    return con.sql(sql, params={k: v for k, v in params.items() if k in expected}).to_arrow_table()
