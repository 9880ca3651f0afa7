"""P2: the PostgreSQL loader (binary COPY via pgpq) against ADBC's adbc_ingest, same rows, same server, same tables.

Like for like: each reference table is a copy of the loader's (``CREATE TABLE ... (LIKE ... INCLUDING ALL)``: the
same column types and the same index on ``_block_num``), so both sides write the same bytes into the same layout,
at the loader's default types (uint64 as ``numeric(20,0)``, the P2 goal) and with ``uint64="bigint"``. ADBC takes
neither uint64 nor nanoseconds, so it gets the data already cast to the types of those columns, before the timed
span; the loader casts inside its span. Connection handling is the same on both sides: each timed run opens a new
connection (a new loader, a new ADBC connection), writes in one transaction, commits and closes it.
"""

from __future__ import annotations

import os

import psycopg
import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.postgres import PostgresLoader

from ..services import POSTGRES_DSN, require_postgres
from .harness import GOALS, Case, batches, compare, logs_table

SCHEMA = f"amp_bench_{os.getpid()}"  # its own schema per run: the server is shared


def adbc_types(schema: pa.Schema, uint64: pa.DataType) -> pa.Schema:
    """The Arrow types ADBC writes into the loader's columns: what the loader casts to before its COPY."""

    def visit(t: pa.DataType) -> pa.DataType:
        if t == pa.uint64():
            return uint64
        if t == pa.uint32():
            return pa.int64()
        if pa.types.is_timestamp(t):
            return pa.timestamp("us", tz=t.tz)
        return t

    return pa.schema([f.with_type(visit(f.type)) for f in schema])


def main(rows: int, rounds: int) -> None:
    import adbc_driver_postgresql.dbapi as adbc

    require_postgres()
    table = logs_table(rows)
    want = (rows, pc.sum(table["log_index"].cast(pa.int64())).as_py(), pc.sum(table["tx_index"]).as_py())
    _run(f"CREATE SCHEMA {SCHEMA}")
    try:
        for name, uint64 in (("logs_numeric", "numeric"), ("logs_bigint", "bigint")):
            with PostgresLoader(POSTGRES_DSN, uint64=uint64) as loader:
                loader.ensure_table(TableRef(name, namespace=SCHEMA), table.schema)
            _run(f"CREATE TABLE {SCHEMA}.adbc_{name} (LIKE {SCHEMA}.{name} INCLUDING ALL)")
        prepared = {  # in the same 65,536-row chunks as the loader's input
            "numeric": table.cast(adbc_types(table.schema, pa.decimal128(20, 0))),
            "bigint": table.cast(adbc_types(table.schema, pa.int64())),
        }

        def adbc_ingest(uint64: str):
            def run():
                with adbc.connect(POSTGRES_DSN) as conn, conn.cursor() as cur:
                    cur.adbc_ingest(
                        f"adbc_logs_{uint64}", batches(prepared[uint64]), mode="append", db_schema_name=SCHEMA
                    )
                    conn.commit()

            return run

        def write(uint64: str):
            def run():
                with PostgresLoader(POSTGRES_DSN, uint64=uint64) as loader:
                    loader.write(TableRef(f"logs_{uint64}", namespace=SCHEMA), batches(table))

            return run

        def truncate(name: str):
            return lambda: _run(f"TRUNCATE {SCHEMA}.{name}")

        def check(name: str):
            def run():
                got = _run(f"SELECT count(*), sum(log_index), sum(tx_index) FROM {SCHEMA}.{name}")
                if tuple(int(x) for x in got) != want:
                    raise AssertionError(f"{name} holds {got} (rows, sum of log_index, tx_index), not {want}")

            return run

        def case(title: str, name: str, run):
            return Case(title, run, truncate(name), check(name))

        labels = {
            ("adbc", "numeric"): "adbc_ingest, numeric(20,0) (reference)",
            ("ours", "numeric"): "PostgresLoader default, numeric(20,0)",
            ("adbc", "bigint"): "adbc_ingest, bigint (reference)",
            ("ours", "bigint"): "PostgresLoader uint64=bigint",
        }
        result = compare(
            "P2 PostgreSQL: loader vs adbc_ingest into identical tables, a new connection per run",
            rows,
            [
                case(labels["adbc", "numeric"], "adbc_logs_numeric", adbc_ingest("numeric")),
                case(labels["ours", "numeric"], "logs_numeric", write("numeric")),
                case(labels["adbc", "bigint"], "adbc_logs_bigint", adbc_ingest("bigint")),
                case(labels["ours", "bigint"], "logs_bigint", write("bigint")),
            ],
            rounds,
        )
        result.goal(GOALS["P2"], labels["ours", "numeric"], labels["adbc", "numeric"])
        result.goal(GOALS["P2"], labels["ours", "bigint"], labels["adbc", "bigint"], " at uint64=bigint")
    finally:
        _run(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def _run(*statements: str):
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        for statement in statements:
            cur = conn.execute(statement)
        return cur.fetchone() if cur.description else None
