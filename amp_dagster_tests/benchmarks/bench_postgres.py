"""P2: the PostgreSQL loader (binary COPY via pgpq) against ADBC's adbc_ingest, same rows, same server.

Both tables carry the same index on _block_num (the loader always creates one, for range deletes). ADBC stores
uint64 as bigint; the loader's default is the exact numeric(20,0), so it is measured both ways.
"""

from __future__ import annotations

import psycopg
import pyarrow as pa

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.postgres import PostgresLoader

from ..services import POSTGRES_DSN, require_postgres
from .harness import Case, batches, compare, logs_table

SCHEMA = "amp_bench"


def main(rows: int, rounds: int) -> None:
    require_postgres()
    table = logs_table(rows)
    numeric, bigint = PostgresLoader(POSTGRES_DSN), PostgresLoader(POSTGRES_DSN, uint64="bigint")
    _run(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE", f"CREATE SCHEMA {SCHEMA}")
    targets = {"logs_numeric": numeric, "logs_bigint": bigint}
    for name, loader in targets.items():
        loader.ensure_table(TableRef(name, namespace=SCHEMA), table.schema)
    # ADBC takes neither uint64 exactly nor ns timestamps: hand it the types our loader sends PostgreSQL
    ts = table.schema.get_field_index("timestamp")
    adbc_table = table.cast(table.schema.set(ts, table.schema.field(ts).with_type(pa.timestamp("us", tz="+00:00"))))

    def adbc_ingest():
        import adbc_driver_postgresql.dbapi as adbc

        with adbc.connect(POSTGRES_DSN) as conn, conn.cursor() as cur:
            cur.adbc_ingest("logs_adbc", batches(adbc_table), mode="create_append", db_schema_name=SCHEMA)
            conn.commit()

    adbc_ingest()  # creates the table with ADBC's own type choices (uint64 -> bigint), then the same index
    _run(f"CREATE INDEX ON {SCHEMA}.logs_adbc (_block_num)")
    want = (rows, sum(table["log_index"].cast("int64").to_pylist()))

    def truncate(name: str):
        return lambda: _run(f"TRUNCATE {SCHEMA}.{name}")

    def check(name: str):
        def run():
            got = _run(f"SELECT count(*), sum(log_index) FROM {SCHEMA}.{name}")
            if tuple(int(x) for x in got) != want:
                raise AssertionError(f"{name} holds {got}, not {want}")

        return run

    def write(name: str):
        return lambda: targets[name].write(TableRef(name, namespace=SCHEMA), batches(table))

    compare(
        "P2 PostgreSQL: loader vs adbc_ingest (same index on both)",
        rows,
        [
            Case("adbc_ingest (reference; uint64 as bigint)", adbc_ingest, truncate("logs_adbc"), check("logs_adbc")),
            Case("PostgresLoader uint64=bigint", write("logs_bigint"), truncate("logs_bigint"), check("logs_bigint")),
            Case(
                "PostgresLoader default (numeric(20,0))",
                write("logs_numeric"),
                truncate("logs_numeric"),
                check("logs_numeric"),
            ),
        ],
        rounds,
    )
    for loader in targets.values():
        loader.close()


def _run(*statements: str):
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        for statement in statements:
            cur = conn.execute(statement)
        return cur.fetchone() if cur.description else None
