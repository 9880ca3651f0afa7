"""P2: the PostgreSQL loader (binary COPY via pgpq) against ADBC's adbc_ingest, same rows, same server."""

from __future__ import annotations

import psycopg
from psycopg import sql

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.postgres import PostgresLoader

from ..services import POSTGRES_DSN, require_postgres
from .harness import Case, batches, compare, logs_table

SCHEMA = "amp_bench"


def main(rows: int, rounds: int) -> None:
    require_postgres()
    table = logs_table(rows)
    loader = PostgresLoader(POSTGRES_DSN)
    ours = TableRef("logs_loader", namespace=SCHEMA)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}.logs_loader, {}.logs_adbc").format(
                sql.Identifier(SCHEMA), sql.Identifier(SCHEMA)
            )
        )
    loader.ensure_table(ours, table.schema)

    def truncate(name: str):
        def run():
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                conn.execute(sql.SQL("TRUNCATE {}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(name)))

        return run

    def count_is(name: str):
        def run():
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                got = conn.execute(
                    sql.SQL("SELECT count(*), sum(log_index) FROM {}.{}").format(
                        sql.Identifier(SCHEMA), sql.Identifier(name)
                    )
                ).fetchone()
            want = (rows, sum(table["log_index"].cast("int64").to_pylist()))
            assert tuple(int(x) for x in got) == want, f"{name}: {got} != {want}"

        return run

    # ADBC cannot take uint64 or ns timestamps either: give it the same types our loader sends
    adbc_table = table.cast(
        table.schema.set(
            table.schema.get_field_index("timestamp"),
            table.schema.field("timestamp").with_type(__import__("pyarrow").timestamp("us", tz="+00:00")),
        )
    )

    def adbc_ingest():
        import adbc_driver_postgresql.dbapi as adbc

        with adbc.connect(POSTGRES_DSN) as conn, conn.cursor() as cur:
            cur.adbc_ingest("logs_adbc", batches(adbc_table), mode="create_append", db_schema_name=SCHEMA)
            conn.commit()

    adbc_ingest()  # creates the table with ADBC's own type choices
    compare(
        "P2 PostgreSQL: loader vs adbc_ingest",
        rows,
        [
            Case("adbc_ingest (reference)", adbc_ingest, truncate("logs_adbc"), count_is("logs_adbc")),
            Case(
                "PostgresLoader.write (binary COPY)",
                lambda: loader.write(ours, batches(table)),
                truncate("logs_loader"),
                count_is("logs_loader"),
            ),
        ],
        rounds,
    )
    loader.close()
