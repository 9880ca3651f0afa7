"""PostgreSQL specifics: the type map as PostgreSQL sees it, the uint64 and timestamp policies, the comment, the
indexes, locking, pooled connections, and conninfo forms."""

from __future__ import annotations

import re
import threading
import time

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from amp_dagster.errors import AuthenticationError, ConfigError, SchemaMismatchError, TerminalError, TransientError
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.postgres import PostgresLoader
from amp_dagster.ranges import RowRange
from amp_dagster.retry import RetryPolicy

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


def test_a_range_beyond_the_range_column_type_is_refused_on_read_and_delete(schema):
    table = TableRef("small", namespace=schema)
    rows = pa.table({"_block_num": pa.array([1, 2, 2**32 - 1], pa.uint32()), "v": pa.array([1, 2, 3], pa.int64())})
    with PostgresLoader(POSTGRES_DSN) as pg:
        pg.ensure_table(table, rows.schema)
        pg.write(table, rows)
        for call in (lambda: pg.read(table, RowRange(2**32)), lambda: pg.delete(table, RowRange(5, 2**32))):
            with pytest.raises(TerminalError, match=r"'_block_num' \(uint32\).*4294967296 lies outside 0..=4294967295"):
                call()
        assert pg.read(table, RowRange(2, 2**32 - 1)).read_all()["_block_num"].to_pylist() == [2, 2**32 - 1]
        # a table amp_dagster did not create, with someone else's comment: its PostgreSQL types bound the range
        _query(f'CREATE TABLE "{schema}".theirs (_block_num bigint, amount numeric, note text)')
        _query(f"COMMENT ON TABLE \"{schema}\".theirs IS 'owned by someone else'")
        _query(f"INSERT INTO \"{schema}\".theirs VALUES (1, 1, 'x')")
        theirs = TableRef("theirs", namespace=schema)
        with pytest.raises(TerminalError, match=r"'_block_num' \(int64\).*9223372036854775808 lies outside"):
            pg.delete(theirs, RowRange(2**63))
        assert pg.delete(TableRef("theirs", namespace=schema, range_column="amount"), RowRange(2**64 - 1)) == 0
        with pytest.raises(SchemaMismatchError, match=r"range column 'note' is text, not an integer type"):
            pg.delete(TableRef("theirs", namespace=schema, range_column="note"), RowRange(0))
        with pytest.raises(SchemaMismatchError, match=r"has no column 'nope' to select rows by range"):
            pg.read(TableRef("theirs", namespace=schema, range_column="nope"), RowRange(0))
    assert _query(f'SELECT count(*) FROM "{schema}".theirs') == [(1,)]
    assert _query(f'SELECT count(*) FROM "{schema}".small') == [(3,)]


# -- names PostgreSQL would truncate ------------------------------------------------------------------------


def _tables(schema: str) -> list[str]:
    return [r[0] for r in _query("SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", schema)]


def _too_long(kind: str, name: str) -> str:
    size = len(name.encode())
    return re.escape(f"the {kind} name {name!r} is {size} bytes long; PostgreSQL keeps only the first 63 bytes")


def test_table_names_past_63_bytes_are_refused_and_never_reach_another_table(schema):
    """PostgreSQL keeps the first 63 bytes of a name: a longer one would silently be the table named by them."""
    fits = "t" * 63
    short = TableRef(fits, namespace=schema, key=("_block_num",))
    longer = TableRef(fits + "_b", namespace=schema, key=("_block_num",))
    rows = pa.table({"_block_num": pa.array([1, 2, 3], pa.uint64()), "v": pa.array([1, 2, 3], pa.int64())})
    other = pa.table({"_block_num": pa.array([7], pa.uint64()), "v": pa.array([70], pa.int64())})
    with PostgresLoader(POSTGRES_DSN) as pg:
        pg.ensure_table(short, rows.schema)
        pg.write(short, rows)
        calls = {  # the full refresh first: on a truncating loader it replaces the table that fits
            "replace_table": lambda: pg.replace_table(longer, other),
            "ensure_table": lambda: pg.ensure_table(longer, other.schema),
            "write": lambda: pg.write(longer, other),
            "write(replace=)": lambda: pg.write(longer, other, replace=RowRange(7, 7)),
            "upsert": lambda: pg.upsert(longer, other),
            "delete": lambda: pg.delete(longer, RowRange(0)),
            "read": lambda: pg.read(longer),
        }
        for what, call in calls.items():
            with pytest.raises(TerminalError, match=_too_long("table", longer.name)):
                call()
            assert pg.read(short).read_all().to_pydict() == rows.to_pydict(), f"{what} changed the other table"
        # bytes, not characters: 32 two-byte letters are too long
        with pytest.raises(TerminalError, match=_too_long("table", "é" * 32)):
            pg.ensure_table(TableRef("é" * 32, namespace=schema), rows.schema)
        pg.replace_table(short, rows.slice(0, 2))  # the name that fits takes every path
        pg.upsert(short, other)
        assert pg.read(short, RowRange(2)).read_all()["v"].to_pylist() == [2, 70]
    assert _tables(schema) == [fits]


def test_schema_names_past_63_bytes_are_refused(schema):
    namespace = schema + "_" + "n" * (64 - len(schema))
    rows = pa.table({"_block_num": pa.array([1], pa.uint64())})
    try:
        with PostgresLoader(POSTGRES_DSN) as pg, pytest.raises(TerminalError, match=_too_long("schema", namespace)):
            pg.ensure_table(TableRef("t", namespace=namespace), rows.schema)
    finally:  # what a truncating loader would have created
        _query(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace[:63])))
    assert _query("SELECT 1 FROM pg_namespace WHERE nspname = %s", namespace[:63]) == []


def test_column_names_past_63_bytes_are_refused_by_name(schema):
    fits = "c" * 63
    table = TableRef("wide", namespace=schema, key=("_block_num",))
    rows = pa.table({"_block_num": pa.array([1, 2], pa.uint64()), fits: ["a", "b"]})
    longer = rows.append_column(fits + "_2", pa.array(["x", "y"]))
    refused = _too_long("column", fits + "_2")
    with PostgresLoader(POSTGRES_DSN) as pg:
        pg.ensure_table(table, rows.schema)
        pg.write(table, rows)
        for call in (
            lambda: pg.ensure_table(table, longer.schema),
            lambda: pg.write(table, longer),
            lambda: pg.upsert(table, longer),
            lambda: pg.replace_table(table, longer),
        ):
            with pytest.raises(TerminalError, match=refused):
                call()
        # two columns that differ after byte 63 in one new table
        twins = pa.table({"_block_num": pa.array([1], pa.uint64()), fits + "_1": ["a"], fits + "_2": ["b"]})
        with pytest.raises(TerminalError, match=_too_long("column", fits + "_1")):
            pg.ensure_table(TableRef("twins", namespace=schema), twins.schema)
        # a range or key column of the TableRef, before any SQL
        with pytest.raises(TerminalError, match=_too_long("column", "r" * 64)):
            pg.delete(TableRef("wide", namespace=schema, range_column="r" * 64), RowRange(0))
        with pytest.raises(TerminalError, match=_too_long("column", "k" * 64)):
            pg.read(TableRef("wide", namespace=schema, key=("k" * 64,)))
        assert pg.read(table).read_all().to_pydict() == rows.to_pydict()
    assert _tables(schema) == ["wide"]


# -- logins the server refuses --------------------------------------------------------------------------------


def _fails_at_once(pg: PostgresLoader, table: TableRef, error: type, says: str) -> None:
    rows = pa.table({"_block_num": pa.array([1], pa.uint64())})
    for call in (
        lambda: pg.ensure_table(table, rows.schema),
        lambda: pg.write(table, rows),
        lambda: pg.delete(table, RowRange(0)),
        lambda: pg.read(table),
    ):
        started = time.monotonic()
        with pytest.raises(error, match=says) as caught:
            call()
        assert time.monotonic() - started < 2, "a refused login is not retried"
        assert "s3cret-pw" not in str(caught.value)


# one retry would sleep 3 s: a call that ends within 2 s made one attempt
SLOW_RETRY = RetryPolicy(attempts=2, initial_delay=3, jitter=False)


def test_a_missing_role_fails_at_once_naming_it(schema):
    role = f"amp_no_such_role_{threading.get_ident() % 10**6}"
    with PostgresLoader(f"postgresql://{role}:s3cret-pw@127.0.0.1:5432/test", retry=SLOW_RETRY) as pg:
        _fails_at_once(pg, TableRef("t", namespace=schema), AuthenticationError, f'role "{role}" does not exist')


def test_a_role_that_may_not_log_in_fails_at_once_naming_it(schema):
    role = f"amp_nologin_{threading.get_ident() % 10**6}"
    _query(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
    try:
        with PostgresLoader(f"postgresql://{role}:s3cret-pw@127.0.0.1:5432/test", retry=SLOW_RETRY) as pg:
            _fails_at_once(pg, TableRef("t", namespace=schema), AuthenticationError, f'role "{role}" may not log in')
    finally:
        _query(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_missing_database_fails_at_once_naming_it(schema):
    with PostgresLoader("postgresql://127.0.0.1:5432/amp_no_such_db", password="s3cret-pw", retry=SLOW_RETRY) as pg:
        _fails_at_once(pg, TableRef("t", namespace=schema), ConfigError, 'database "amp_no_such_db" does not exist')


def test_a_rejected_password_is_an_authentication_error_without_the_password():
    """The local server trusts every login, so the server's words for SQLSTATE 28P01 are given here as text."""
    from amp_dagster.loaders.postgres import login_refusal

    said = 'connection to server at "db", port 5432 failed: FATAL:  password authentication failed for user "amp"'
    error = login_refusal(psycopg.OperationalError(said), "PostgreSQL at db:5432/test")
    assert isinstance(error, AuthenticationError)
    assert str(error).startswith('PostgreSQL at db:5432/test: the password of role "amp" was rejected')
    unreachable = psycopg.OperationalError('connection to server at "db", port 5432 failed: Connection refused')
    assert login_refusal(unreachable, "PostgreSQL at db:5432/test") is None


# -- uint64 stored as bigint at its edges ------------------------------------------------------------------------


def test_uint64_as_bigint_selects_exactly_at_the_edges(schema):
    table = TableRef("edges", namespace=schema)
    values = [0, 1, 2**63 - 2, 2**63 - 1]
    rows = pa.table({"_block_num": pa.array(values, pa.uint64()), "v": pa.array(range(4), pa.int64())})
    with PostgresLoader(POSTGRES_DSN, uint64="bigint") as pg:
        pg.ensure_table(table, rows.schema)
        pg.write(table, rows)
        beyond = pa.table({"_block_num": pa.array([2**63], pa.uint64()), "v": pa.array([9], pa.int64())})
        with pytest.raises(TerminalError, match=r"'_block_num' holds values from 9223372036854775808 to "):
            pg.write(table, beyond, replace=RowRange(2**63))
        # the table's range column is uint64: every uint64 bound is valid and selects exactly what it names
        for rng in (RowRange(2**63 - 1), RowRange(2**63 - 2, 2**63), RowRange(2**63), RowRange(1, 2**64 - 1)):
            got = sorted(pg.read(table, rng).read_all()["_block_num"].to_pylist())
            assert got == [v for v in values if rng.contains(v)], f"read {rng}"
        assert pg.delete(table, RowRange(2**63, 2**64 - 1)) == 0
        assert pg.delete(table, RowRange(2**63 - 1, 2**64 - 1)) == 1
        pg.write(table, rows.slice(2, 2), replace=RowRange(2**63 - 2, 2**64 - 1))
        assert sorted(pg.read(table).read_all()["_block_num"].to_pylist()) == values
