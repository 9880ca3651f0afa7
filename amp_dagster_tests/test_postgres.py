"""PostgreSQL specifics: the type map as PostgreSQL sees it, the uint64 and timestamp policies, the comment, the
indexes, locking, pooled connections, and conninfo forms."""

from __future__ import annotations

import threading

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from amp_dagster.errors import TerminalError, TransientError
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.postgres import PostgresLoader
from amp_dagster.ranges import RowRange

from . import data
from .services import POSTGRES_DSN, require_postgres


@pytest.fixture
def schema():
    require_postgres()
    name = f"amp_pg_{threading.get_ident() % 10**6}"
    yield name
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _query(text: str, *params):
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        cur = conn.execute(text, params)
        return cur.fetchall() if cur.description else None


def test_column_types_and_values_as_postgresql_sees_them(schema):
    table = TableRef("types", namespace=schema)
    rows = data.every_type()
    with PostgresLoader(POSTGRES_DSN) as pg:
        pg.ensure_table(table, rows.schema)
        pg.write(table, rows)
    types = dict(
        _query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            schema,
            "types",
        )
    )
    assert types["u64"] == "numeric" and types["u32"] == "bigint" and types["hash"] == "bytea"
    assert types["ts"] == "timestamp with time zone" and types["hashes"] == "ARRAY"
    assert types["access_list"] == "jsonb" and types["amount"] == "numeric" and types["tag"] == "text"
    (row,) = _query(f'SELECT u64, amount, hash, access_list FROM "{schema}".types WHERE _block_num = 1')
    assert int(row[0]) == 2**64 - 1 and int(row[1]) == -(10**38 - 1) and row[2] == b"\xff" * 32
    assert row[3] == []  # jsonb of an empty list
    (row,) = _query(f'SELECT access_list FROM "{schema}".types WHERE _block_num = 0')
    assert row[0] == [{"address": "0x" + "01" * 20, "storage_keys": ["0x" + "01" * 32, "0x" + "02" * 32]}]


def test_uint64_as_bigint_is_natural_and_refuses_overflow_by_name(schema):
    table = TableRef("blocks", namespace=schema)
    blocks = data.chain_tables(0, 9, names=("blocks",))["blocks"]
    with PostgresLoader(POSTGRES_DSN, uint64="bigint") as pg:
        pg.ensure_table(table, blocks.schema)
        pg.write(table, blocks)
        assert _query(f'SELECT pg_typeof(block_num)::text FROM "{schema}".blocks LIMIT 1') == [("bigint",)]
        assert pg.read(table).read_all().column("block_num").to_pylist() == list(range(10))
        big = pa.table({"_block_num": pa.array([1, 2**64 - 1], pa.uint64())})
        wide = TableRef("wide", namespace=schema)
        pg.ensure_table(wide, big.schema)
        with pytest.raises(TerminalError, match=r"'_block_num' holds values from 1 to 18446744073709551615"):
            pg.write(wide, big)
    with pytest.raises(TerminalError, match='uint64 must be "numeric" or "bigint"'):
        PostgresLoader(POSTGRES_DSN, uint64="int")


def test_nanoseconds_fail_by_name_unless_truncation_is_asked_for(schema):
    table = TableRef("precise", namespace=schema)
    rows = pa.table(
        {
            "_block_num": pa.array([1], pa.uint64()),
            "at": pa.array([1_700_000_000_123_456_789], pa.timestamp("ns", "UTC")),
        }
    )
    with PostgresLoader(POSTGRES_DSN) as pg:
        pg.ensure_table(table, rows.schema)
        with pytest.raises(TerminalError, match="'at' has nanoseconds"):
            pg.write(table, rows)
    with PostgresLoader(POSTGRES_DSN, truncate_timestamps=True) as pg:
        pg.write(table, rows)
        assert pg.read(table).read_all().column("at").cast(pa.int64()).to_pylist() == [1_700_000_000_123_456_000]


def test_the_arrow_schema_lives_in_the_comment_and_foreign_comments_are_kept(schema):
    table = TableRef("logs", namespace=schema)
    logs = data.logs(0, 2)
    with PostgresLoader(POSTGRES_DSN) as pg:
        pg.ensure_table(table, logs.schema)
        (comment,) = _query("SELECT obj_description(%s::regclass, 'pg_class')", f'"{schema}".logs')[0]
        assert '"amp_dagster"' in comment
        _query(f'CREATE TABLE "{schema}".theirs (_block_num bigint, note text)')
        _query(f"COMMENT ON TABLE \"{schema}\".theirs IS 'owned by someone else'")
        theirs = TableRef("theirs", namespace=schema)
        rows = pa.table({"_block_num": pa.array([1], pa.int64()), "note": ["x"]})
        pg.ensure_table(theirs, rows.schema)
        pg.write(theirs, rows)
        assert _query("SELECT obj_description(%s::regclass, 'pg_class')", f'"{schema}".theirs') == [
            ("owned by someone else",)
        ]


def test_indexes_survive_a_full_refresh_of_a_long_name(schema):
    name = "x" * 60
    table = TableRef(name, namespace=schema, key=("block_num", "log_index"))
    with PostgresLoader(POSTGRES_DSN) as pg:
        pg.ensure_table(table, data.logs(0, 1).schema)
        pg.replace_table(table, data.logs(0, 5))
        pg.replace_table(table, data.logs(0, 3))
        indexes = _query("SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s", schema, name)
        assert len(indexes) == 2 and any("UNIQUE" in i[0] for i in indexes)
        with pytest.raises(TerminalError, match="duplicate key"):
            pg.write(table, data.logs(0, 0))
        tables = _query("SELECT tablename FROM pg_tables WHERE schemaname = %s", schema)
        assert tables == [(name,)], "no stage table is left behind"


def test_upsert_keeps_the_last_of_repeated_keys(schema):
    table = TableRef("logs", namespace=schema, key=("block_num", "log_index"))
    logs = data.logs(0, 0).slice(0, 3)
    with PostgresLoader(POSTGRES_DSN) as pg:
        pg.ensure_table(table, logs.schema)
        field = logs.schema.field("data")
        versions = [
            logs.set_column(logs.schema.get_field_index("data"), field, pa.array([v] * 3)) for v in (b"1", b"2", b"3")
        ]
        pg.upsert(table, pa.concat_tables(versions))
        assert pg.read(table).read_all().column("data").to_pylist() == [b"3"] * 3


def test_writers_of_one_table_take_turns(schema):
    """The advisory lock is keyed by the resolved name: TableRef("t") and TableRef("t", "public") are one table."""
    table = TableRef("locked", namespace=schema)
    logs = data.logs(0, 1)
    with PostgresLoader(POSTGRES_DSN) as pg:
        pg.ensure_table(table, logs.schema)
        holder = psycopg.connect(POSTGRES_DSN)
        holder.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{schema}.locked",))
        done = threading.Event()
        writer = threading.Thread(target=lambda: (pg.write(table, logs), done.set()))
        writer.start()
        assert not done.wait(0.5), "the write did not wait for the lock"
        holder.rollback()  # release
        writer.join(10)
        assert done.is_set()
        holder.close()
        assert pg.read(table).read_all().num_rows == logs.num_rows


def test_a_dropped_pooled_connection_is_replaced_silently(schema):
    table = TableRef("logs", namespace=schema)
    logs = data.logs(0, 1)
    with PostgresLoader(POSTGRES_DSN, application_name="amp_dagster_pooltest") as pg:
        pg.ensure_table(table, logs.schema)
        _query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'amp_dagster_pooltest'")
        pg.write(table, logs)  # the idle connection was killed: the pool notices and reconnects
        assert pg.delete(table, RowRange(0)) == logs.num_rows


def test_key_value_conninfo_reads_and_writes(schema):
    table = TableRef("logs", namespace=schema)
    logs = data.logs(0, 1)
    with PostgresLoader("host=127.0.0.1 port=5432 dbname=test") as pg:
        pg.ensure_table(table, logs.schema)
        pg.write(table, logs)
        assert (
            pg.read(table, RowRange(1)).read_all().num_rows
            == logs.filter(pa.compute.equal(logs["_block_num"], 1)).num_rows
        )


def test_deadlocks_and_dropped_links_are_transient():
    from amp_dagster.loaders.postgres import _is_transient

    assert _is_transient(psycopg.errors.DeadlockDetected()) and _is_transient(psycopg.errors.SerializationFailure())
    assert _is_transient(psycopg.OperationalError("connection lost"))
    assert not _is_transient(psycopg.errors.UndefinedTable()) and not _is_transient(TerminalError("x"))
    assert _is_transient(TransientError("x"))
