"""ClickHouse-specific behaviour on the chdb engine: the DDL and engine created, the type map at its edges, FINAL
semantics of upsert, lightweight DELETE visibility, the EXCHANGE TABLES swap, chdb's one-path rule, HTTP errors."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from amp_dagster.errors import (
    ConfigError,
    SchemaMismatchError,
    ServiceUnavailableError,
    TerminalError,
    TransientError,
)
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.clickhouse import ClickHouseLoader
from amp_dagster.loaders.schema import schema_from_text, schema_to_text
from amp_dagster.ranges import RowRange
from amp_dagster.retry import RetryPolicy

from . import data
from .services import closed_port
from .stores.clickhouse import CHDB_DSN, CRASH_ROWS, ClickHouseHarness, admin

LOG_KEY = ("block_num", "log_index")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    harness = ClickHouseHarness(tmp_path)
    yield harness
    harness.cleanup()


def _one(sql: str, **params):
    rows = admin().query(sql, parameters=params).result_rows
    return rows[0] if rows else None


def _columns(table: TableRef) -> dict[str, str]:
    rows = (
        admin()
        .query(
            "SELECT name, type FROM system.columns "
            "WHERE database = {db:String} AND table = {t:String} ORDER BY position",
            parameters={"db": table.namespace, "t": table.name},
        )
        .result_rows
    )
    return dict(rows)


def _tables(table: TableRef) -> list[str]:
    query = "SELECT name FROM system.tables WHERE database = {db:String} ORDER BY name"
    return [name for (name,) in admin().query(query, parameters={"db": table.namespace}).result_rows]


def _count(table: TableRef, final: bool = False) -> int:
    name = f"`{table.namespace}`.`{table.name}`"
    return admin().command(f"SELECT count() FROM {name}{' FINAL' if final else ''}")


# -- DDL and engine -----------------------------------------------------------------------------------------


def test_keyed_table_is_a_replacing_merge_tree_ordered_by_the_key(store):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    loader.ensure_table(table, data.logs(0, 1).schema)
    engine, sorting_key, comment = _one(
        "SELECT engine, sorting_key, comment FROM system.tables WHERE database = {db:String} AND name = 'logs'",
        db=table.namespace,
    )
    assert (engine, sorting_key) == ("ReplacingMergeTree", "block_num, log_index")
    assert comment.startswith("amp_dagster:")
    index = _one(
        "SELECT expr, type FROM system.data_skipping_indices WHERE database = {db:String} AND table = 'logs'",
        db=table.namespace,
    )
    assert index == ("_block_num", "minmax")


def test_keyless_table_is_a_merge_tree_ordered_by_the_range_column(store):
    loader, table = store.loader(), store.table("items", range_column="cursor")
    loader.ensure_table(table, data.cursor_rows(0, 1).schema)  # pa.table columns are nullable, the key too
    engine_full, sorting_key = _one(
        "SELECT engine_full, sorting_key FROM system.tables WHERE database = {db:String} AND name = 'items'",
        db=table.namespace,
    )
    assert engine_full.startswith("MergeTree ORDER BY (cursor) SETTINGS allow_nullable_key = 1")
    assert sorting_key == "(cursor)"


def test_missing_table_is_a_clear_error(store):
    loader = store.loader()
    with pytest.raises(TerminalError, match=r"does not exist\. Call ensure_table"):
        loader.write(store.table("nowhere"), data.logs(0, 1))


# -- the type map -------------------------------------------------------------------------------------------


def test_every_type_has_the_documented_clickhouse_type_and_reads_back_as_the_original(store):
    loader, table = store.loader(), store.table("types")
    original = data.every_type()
    loader.ensure_table(table, original.schema)
    loader.write(table, original)
    types = _columns(table)
    assert types["_block_num"] == "UInt64"
    assert types["u64"] == "Nullable(UInt64)"
    assert types["hash"] == "Nullable(FixedString(32))"
    assert types["blob"] == types["text"] == "Nullable(String)"
    assert types["amount"] == "Nullable(Decimal(38, 0))"
    assert types["ts"] == "Nullable(DateTime64(9, 'UTC'))"
    assert types["hashes"] == "Nullable(Tuple(v Array(FixedString(32))))"
    assert types["access_list"] == (
        "Nullable(Tuple(v Array(Tuple(address FixedString(20), storage_keys Array(FixedString(32))))))"
    )
    got = loader.read(table).read_all().sort_by("_block_num")
    assert got.schema.equals(original.schema)  # timestamp[ns, tz=+00:00], fixed_size_binary, decimal128...
    assert got.to_pylist() == original.to_pylist()
    # what ClickHouse itself hands back, without the stored schema: the loader casts these back
    native = admin().query_arrow(f"SELECT ts, hash, hashes FROM `{table.namespace}`.types", use_strings=False)
    assert native.schema.field("ts").type == pa.timestamp("ns", tz="UTC")
    assert pa.types.is_struct(native.schema.field("hashes").type)  # the wrapper that carries the list's nulls


def test_nested_nulls_and_arrow_variants_round_trip(store):
    loader, table = store.loader(), store.table("variants")
    item = pa.struct([("n", pa.int64()), ("tags", pa.list_(pa.string()))])  # nullable list inside a struct
    schema = pa.schema(
        [
            pa.field("_block_num", pa.uint64(), nullable=False),
            pa.field("items", pa.list_(item)),  # nullable list of nullable structs
            pa.field("pair", pa.list_(pa.int32(), 2)),
            pa.field("big", pa.large_list(pa.large_string())),
            pa.field("label", pa.dictionary(pa.int8(), pa.string())),
            pa.field("half", pa.float16()),
            pa.field("day", pa.date64()),
            pa.field("view", pa.string_view()),
            pa.field("ms", pa.timestamp("ms")),
        ]
    )
    rows = pa.table(
        {
            "_block_num": [1, 2, 3],
            "items": [[{"n": 1, "tags": ["a", None]}, None, {"n": None, "tags": None}], None, []],
            "pair": [[1, 2], None, [3, 4]],
            "big": [["x"], [], None],
            "label": ["a", None, "a"],
            "half": pa.array([1.5, None, -2.0], pa.float16()),
            "day": [dt.date(2024, 1, 2), None, dt.date(1969, 12, 31)],
            "view": ["v", "", None],
            "ms": [dt.datetime(2024, 1, 1, 0, 0, 0, 123000), None, dt.datetime(1970, 1, 1)],
        },
        schema=schema,
    )
    loader.ensure_table(table, schema)
    loader.write(table, data.in_batches(rows, 2))
    assert _columns(table)["items"] == (
        "Nullable(Tuple(v Array(Nullable(Tuple(n Nullable(Int64), tags Nullable(Tuple(v Array(Nullable(String)))))))))"
    )
    got = loader.read(table).read_all()  # string_view cannot be sorted by pyarrow: sort the Python rows
    assert got.schema.equals(schema)
    assert sorted(got.to_pylist(), key=lambda r: r["_block_num"]) == rows.to_pylist()


@pytest.mark.parametrize(
    ("column", "type_"),
    [("m", pa.map_(pa.string(), pa.int64())), ("t", pa.time64("us")), ("d", pa.duration("s")), ("z", pa.null())],
)
def test_unmapped_types_name_the_column(store, column, type_):
    schema = pa.schema([pa.field("_block_num", pa.uint64()), pa.field(column, type_)])
    with pytest.raises(TerminalError, match=f"column '{column}' has Arrow type"):
        store.loader().ensure_table(store.table("bad"), schema)


def test_nulls_into_a_non_nullable_column_are_refused_by_name(store):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 4)
    loader.ensure_table(table, logs.schema)  # amp's schema: data is NOT NULL
    holes = pa.array([None] + [b"x"] * (logs.num_rows - 1), pa.binary())
    loosened = logs.set_column(logs.schema.get_field_index("data"), pa.field("data", pa.binary()), holes)
    with pytest.raises(TerminalError, match=r"column 'data' is not nullable but the data has 1 null"):
        loader.write(table, loosened)
    loader.write(table, loosened.slice(1))  # nullable in the schema but without nulls: fine
    assert _count(table) == logs.num_rows - 1


def test_identifiers_that_look_quoted_keep_their_quotes(store):
    # clickhouse-connect's quote_identifier would pass `x` through as the identifier x
    loader, table = store.loader(), store.table("`t`")
    rows = pa.table({"_block_num": pa.array([1], pa.uint64()), "`x`": ["a"], '"y"': ["b"]})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    assert list(_columns(table)) == ["_block_num", "`x`", '"y"']
    assert loader.read(table).read_all().to_pylist() == rows.to_pylist()


def test_foreign_table_without_stored_schema_is_compared_by_clickhouse_types(store):
    loader, table = store.loader(), store.table("foreign")
    admin().command(f"CREATE DATABASE IF NOT EXISTS `{table.namespace}`")
    admin().command(
        f"CREATE TABLE `{table.namespace}`.foreign (_block_num UInt64, name LowCardinality(Nullable(String)), "
        "score Float64) ENGINE = MergeTree ORDER BY _block_num"
    )
    rows = pa.table({"_block_num": pa.array([1, 2], pa.uint64()), "name": ["a", None], "score": [0.5, 1.5]})
    loader.write(table, rows)
    assert loader.read(table).read_all().sort_by("_block_num")["name"].to_pylist() == [b"a", None]
    with pytest.raises(SchemaMismatchError, match=r"'score' is Float64 in the table but Int64"):
        loader.write(table, rows.set_column(2, "score", pa.array([1, 2], pa.int64())))
    loader.ensure_table(table, rows.schema)  # adopts the table: the Arrow schema goes into its comment
    assert loader.read(table).read_all().sort_by("_block_num")["name"].to_pylist() == ["a", None]


def test_foreign_comment_is_never_overwritten(store):
    loader, table = store.loader(), store.table("foreign")
    admin().command(f"CREATE DATABASE IF NOT EXISTS `{table.namespace}`")
    admin().command(
        f"CREATE TABLE `{table.namespace}`.foreign (_block_num UInt64, v Int64) ENGINE = MergeTree ORDER BY _block_num "
        "COMMENT 'owned by the analytics team'"
    )
    rows = pa.table({"_block_num": pa.array([1], pa.uint64()), "v": [7], "note": ["n"]})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    assert _one("SELECT comment FROM system.tables WHERE database = {db:String}", db=table.namespace) == (
        "owned by the analytics team",
    )
    assert loader.read(table).read_all().to_pylist() == [{"_block_num": 1, "v": 7, "note": b"n"}]


def test_ensure_table_records_a_column_whose_comment_update_was_lost(store):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    # ADD COLUMN and MODIFY COMMENT are two statements: this is the table when the second one failed
    admin().command(f"ALTER TABLE `{table.namespace}`.logs ADD COLUMN note Nullable(String)")
    wider = logs.append_column(pa.field("note", pa.string()), pa.array(["n"] * logs.num_rows))
    loader.ensure_table(table, wider.schema)
    (comment,) = _one("SELECT comment FROM system.tables WHERE database = {db:String}", db=table.namespace)
    assert schema_from_text(comment.removeprefix("amp_dagster:")).field("note").type == pa.string()
    loader.write(table, wider, replace=RowRange(0, 9))
    got = loader.read(table).read_all()
    assert got.schema.field("note").type == pa.string() and set(got["note"].to_pylist()) == {"n"}


def test_a_read_that_cannot_cast_names_the_column(store):
    from clickhouse_connect.driver.binding import format_str

    loader, table = store.loader(), store.table("lying")
    rows = pa.table({"_block_num": pa.array([1], pa.uint64()), "v": pa.array([300], pa.int64())})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    lie = format_str("amp_dagster:" + schema_to_text(rows.schema.set(1, pa.field("v", pa.int8()))))
    admin().command(f"ALTER TABLE `{table.namespace}`.lying MODIFY COMMENT {lie}")
    with pytest.raises(TerminalError, match=r"table .*lying: column 'v' cannot be read back as int8"):
        loader.read(table).read_all()


# -- upsert, delete, refresh --------------------------------------------------------------------------------


def test_upsert_inserts_versions_and_final_reads_the_last(store):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    changed = logs.set_column(
        logs.schema.get_field_index("data"), logs.schema.field("data"), pa.array([b"v2"] * logs.num_rows)
    )
    loader.upsert(table, changed)
    # both versions are stored until a merge; FINAL (which read() uses) shows the last one only
    assert _count(table) in (logs.num_rows, 2 * logs.num_rows)
    assert _count(table, final=True) == logs.num_rows
    assert set(loader.read(table).read_all()["data"].to_pylist()) == {b"v2"}
    admin().command(f"OPTIMIZE TABLE `{table.namespace}`.logs FINAL")
    assert _count(table) == logs.num_rows


def test_upsert_into_a_table_not_ordered_by_the_key_is_refused(store):
    loader = store.loader()
    logs = data.logs(0, 1)
    loader.ensure_table(store.table("logs"), logs.schema)  # created without a key: a MergeTree
    with pytest.raises(TerminalError, match=r"is a MergeTree ordered by \(_block_num\).*ReplacingMergeTree"):
        loader.upsert(store.table("logs", key=LOG_KEY), logs)


def test_lightweight_delete_is_visible_when_it_returns(store):
    loader, table = store.loader(), store.table("logs")
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    doomed = pc.sum(pc.greater_equal(logs["_block_num"], 60).cast(pa.int64())).as_py()
    assert loader.delete(table, RowRange(60)) == doomed
    assert _count(table) == logs.num_rows - doomed  # another client, at once, no FINAL
    assert loader.delete(table, RowRange(60)) == 0
    assert (
        loader.read(table, RowRange(50, 59)).read_all().num_rows
        == pc.sum(
            pc.and_(pc.greater_equal(logs["_block_num"], 50), pc.less_equal(logs["_block_num"], 59)).cast(pa.int64())
        ).as_py()
    )


def test_replace_table_exchanges_tables_and_leaves_no_staging_behind(store):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    old = data.logs(0, 9)
    loader.ensure_table(table, old.schema)
    loader.write(table, old)
    uuid_before = _one(
        "SELECT uuid FROM system.tables WHERE database = {db:String} AND name = 'logs'", db=table.namespace
    )
    narrower = data.logs(0, 4).drop_columns(["topic3"])  # a full refresh may change the shape
    assert loader.replace_table(table, narrower).rows == narrower.num_rows
    uuid_after = _one(
        "SELECT uuid FROM system.tables WHERE database = {db:String} AND name = 'logs'", db=table.namespace
    )
    assert uuid_after != uuid_before  # a new table was swapped in, not the old one rewritten
    assert "topic3" not in _columns(table) and _count(table) == narrower.num_rows

    def dying():
        yield from old.to_batches(max_chunksize=50)[:2]
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        loader.replace_table(table, pa.RecordBatchReader.from_batches(old.schema, dying()))
    assert _count(table) == narrower.num_rows
    assert _tables(table) == ["logs", "logs__amp_lock_4"]  # and its free lock, the 4th (ensure, write, 2 refreshes)


def test_a_failed_drop_of_the_staging_table_keeps_the_writes_error(store, monkeypatch):
    loader, table = store.loader(), store.table("logs")
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    command = loader._command

    def drop_fails(target, sql, *args, **kwargs):
        if sql.startswith("DROP TABLE") and "__amp_stage_" in sql:
            raise TerminalError("ClickHouse: the DROP failed too")
        return command(target, sql, *args, **kwargs)

    def dying():
        yield logs.to_batches()[0]
        raise RuntimeError("source died")

    monkeypatch.setattr(loader, "_command", drop_fails)
    with pytest.raises(RuntimeError, match="source died"):
        loader.replace_table(table, pa.RecordBatchReader.from_batches(logs.schema, dying()))
    assert _count(table) == logs.num_rows


def test_replace_table_creates_a_missing_table(store):
    loader, table = store.loader(), store.table("fresh", key=LOG_KEY)
    logs = data.logs(0, 3)
    loader.replace_table(table, logs)
    assert _count(table) == logs.num_rows


def _dead_source():
    raise RuntimeError("the source died")
    yield


@pytest.mark.parametrize("failure", ["source", "nulls"])
def test_a_replace_that_fails_on_its_first_batch_deletes_nothing(store, failure):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)  # amp's schema: data is NOT NULL
    loader.write(table, logs)
    if failure == "source":
        bad, error = pa.RecordBatchReader.from_batches(logs.schema, _dead_source()), "the source died"
    else:
        holes = pa.array([None] + [b"x"] * (logs.num_rows - 1), pa.binary())
        bad = logs.set_column(logs.schema.get_field_index("data"), pa.field("data", pa.binary()), holes)
        error = "column 'data' is not nullable"
    with pytest.raises((RuntimeError, TerminalError), match=error):
        loader.write(table, bad, replace=RowRange(0, 9))
    got = loader.read(table).read_all().sort_by([("block_num", "ascending"), ("log_index", "ascending")])
    assert got.equals(logs.sort_by([("block_num", "ascending"), ("log_index", "ascending")]))


def test_replacing_an_empty_range_runs_no_delete(store):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 19)
    first, second = (logs.filter(pc.field("_block_num") < 10), logs.filter(pc.field("_block_num") >= 10))
    loader.ensure_table(table, logs.schema)
    loader.write(table, first, replace=RowRange(0, 9))
    loader.write(table, second, replace=RowRange(10, 19))
    mutations = "SELECT count() FROM system.mutations WHERE database = {db:String}"
    assert _one(mutations, db=table.namespace) == (0,)  # a DELETE is a mutation: none for empty ranges
    loader.write(table, second, replace=RowRange(10, 19))
    assert _one(mutations, db=table.namespace) == (1,)
    assert _count(table, final=True) == logs.num_rows


def test_large_writes_are_split_into_inserts_of_insert_rows(store):
    loader, table = store.loader(insert_rows=100), store.table("logs")
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    result = loader.write(table, data.in_batches(logs, 40))
    batches = -(-logs.num_rows // 40)
    assert result.rows == logs.num_rows
    assert result.commits == -(-batches // 3) > 1  # 40 + 40 + 40 rows reach 100: three batches per INSERT
    assert _count(table) == logs.num_rows


def test_table_without_namespace_goes_to_the_clients_database(store):
    loader, table = store.loader(), TableRef(f"{store.namespace}_plain")
    try:
        loader.ensure_table(table, data.cursor_rows(0, 1).schema.insert(0, pa.field("_block_num", pa.uint64())))
        assert _one("SELECT database FROM system.tables WHERE name = {t:String}", t=table.name) == ("default",)
    finally:
        admin().command(f"DROP TABLE IF EXISTS default.`{table.name}`")


# -- chdb and connections -----------------------------------------------------------------------------------


def test_loaders_on_one_chdb_path_share_it_and_another_path_is_refused(store, tmp_path):
    first, second, table = store.loader(), store.loader(), store.table("logs")
    logs = data.logs(0, 2)
    first.ensure_table(table, logs.schema)
    first.write(table, logs)
    assert second.read(table).read_all().num_rows == logs.num_rows
    other = ClickHouseLoader(f"chdb://{tmp_path / 'elsewhere'}")
    with pytest.raises(
        ConfigError, match=r"chdb runs one engine path per process.*close every client of the other path"
    ):
        other.ensure_table(table, logs.schema)
    assert CHDB_DSN.startswith("chdb:///")


def test_password_in_a_dsn_never_reaches_the_error(store):
    port = closed_port()
    loader = ClickHouseLoader(
        f"http://amp:s3cret-pw@127.0.0.1:{port}/db", connect_timeout=1, retry=RetryPolicy(attempts=1)
    )
    with pytest.raises(ServiceUnavailableError, match=f"ClickHouse at 127.0.0.1:{port} is unreachable") as caught:
        loader.read(store.table("logs"))
    assert "s3cret-pw" not in str(caught.value)


# -- ranges at the edges of their column's type ----------------------------------------------------------------


def test_range_bounds_are_bound_in_the_columns_own_type(store):
    loader, table = store.loader(), store.table("signed", range_column="cursor")
    edges = [-(2**63), -1, 0, 2**63 - 2, 2**63 - 1]
    rows = pa.table({"cursor": pa.array(edges, pa.int64()), "v": pa.array(range(len(edges)))})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    assert loader.read(table, RowRange(2**63 - 1)).read_all()["cursor"].to_pylist() == [2**63 - 1]
    assert sorted(loader.read(table, RowRange(0)).read_all()["cursor"].to_pylist()) == [0, 2**63 - 2, 2**63 - 1]
    for call in (
        lambda: loader.read(table, RowRange(2**63)),
        lambda: loader.delete(table, RowRange(0, 2**63)),
        lambda: loader.write(table, rows.slice(0, 0), replace=RowRange(2**64 - 1)),
    ):
        with pytest.raises(TerminalError, match=r"column 'cursor' \(int64\): its (start|end) \d+ lies outside"):
            call()
    assert _count(table) == len(edges)


def test_a_foreign_tables_range_column_type_comes_from_clickhouse(store):
    loader, table = store.loader(), store.table("foreign")
    admin().command(f"CREATE DATABASE IF NOT EXISTS `{table.namespace}`")
    admin().command(
        f"CREATE TABLE `{table.namespace}`.foreign (_block_num Nullable(UInt16), v Int64) ENGINE = MergeTree ORDER BY v"
    )
    admin().command(f"INSERT INTO `{table.namespace}`.foreign VALUES (1, 1), (65535, 2)")
    with pytest.raises(TerminalError, match=r"'_block_num' \(uint16\): its start 65536 lies outside 0..=65535"):
        loader.delete(table, RowRange(65536))
    assert loader.delete(table, RowRange(65535)) == 1
    assert _count(table) == 1


def test_table_names_of_amp_dagsters_own_tables_are_refused(store):
    loader = store.loader()
    for name in ("logs__amp_stage_0a1b2c3d", "logs__amp_lock_12"):
        with pytest.raises(TerminalError, match=r"amp_dagster's own lock and staging tables"):
            loader.ensure_table(store.table(name), data.logs(0, 0).schema)


# -- a range replace that fails leaves the old rows ----------------------------------------------------------------


@pytest.mark.parametrize("failure", ["source", "nulls"])
def test_a_replace_that_fails_on_a_late_batch_leaves_the_old_rows(store, failure):
    loader, table = store.loader(insert_rows=100), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)  # amp's schema: data is NOT NULL
    loader.write(table, logs)
    forked = data.logs(0, 99, seed=7).to_batches(max_chunksize=60)
    assert len(forked) > 4

    def late_failure():
        yield from forked[:4]  # several INSERTs have gone out by now
        if failure == "source":
            raise RuntimeError("the source died late")
        bad = forked[4]
        holes = pa.array([None] * bad.num_rows, pa.binary())
        yield bad.set_column(bad.schema.get_field_index("data"), pa.field("data", pa.binary()), holes)

    with pytest.raises((RuntimeError, TerminalError), match=r"died late|column 'data' is not nullable"):
        loader.write(
            table, pa.RecordBatchReader.from_batches(forked[0].schema, late_failure()), replace=RowRange(0, 99)
        )
    got = loader.read(table).read_all().sort_by([("block_num", "ascending"), ("log_index", "ascending")])
    assert got.equals(logs.sort_by([("block_num", "ascending"), ("log_index", "ascending")]))
    assert [t for t in _tables(table) if "__amp_stage_" in t] == []


def test_a_replace_stopped_after_its_commit_point_is_completed_by_the_next_writer(store, monkeypatch):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    old, new = data.logs(0, 99), data.logs(50, 99, seed=3)
    loader.ensure_table(table, old.schema)
    loader.write(table, old)
    command = loader._command

    def attach_fails(target, sql, *args, **kwargs):
        if "ATTACH PARTITION" in sql:
            raise TransientError("ClickHouse: the connection dropped")
        return command(target, sql, *args, **kwargs)

    monkeypatch.setattr(loader, "_command", attach_fails)
    with pytest.raises(TransientError, match=r"committed in .*__amp_stage_.*the next write, delete, ensure_table"):
        loader.write(table, new, replace=RowRange(50, 99))
    # the old rows of the range are deleted and the new ones wait in the journaled stage
    assert _count(table, final=True) == _below(old, 50)
    assert len([t for t in _tables(table) if "__amp_stage_" in t]) == 1
    store.loader().delete(table, RowRange(1000))  # any next writer completes it first
    want = pa.concat_tables([old.slice(0, _below(old, 50)), new]).sort_by([("block_num", "ascending")])
    got = loader.read(table).read_all().sort_by([("block_num", "ascending")])
    assert got.num_rows == want.num_rows and got.to_pylist() == want.to_pylist()
    assert [t for t in _tables(table) if "__amp_stage_" in t] == []


def _below(table: pa.Table, block: int) -> int:
    return pc.sum(pc.less(table["_block_num"], block).cast(pa.int64())).as_py()


# -- the table lock ----------------------------------------------------------------------------------------


def _tagged(tag: str, blocks: RowRange, per_block: int = 3) -> pa.Table:
    n = blocks.size * per_block
    return pa.table(
        {
            "_block_num": pa.array([blocks.start + i // per_block for i in range(n)], pa.uint64()),
            "writer": pa.array([tag] * n),
        }
    )


def _slowly(rows: pa.Table) -> pa.RecordBatchReader:
    def batches():
        for batch in rows.to_batches(max_chunksize=60):
            time.sleep(0.01)  # a source that takes its time, so that two writers overlap
            yield batch

    return pa.RecordBatchReader.from_batches(rows.schema, batches())


def test_two_writers_of_overlapping_ranges_never_interleave(store):
    first, second, table = store.loader(insert_rows=60), store.loader(insert_rows=60), store.table("rows")
    ranges = {"a": RowRange(0, 99), "b": RowRange(50, 149)}
    loader_of = {"a": first, "b": second}
    first.ensure_table(table, _tagged("a", ranges["a"]).schema)
    # the two serial outcomes: the later writer holds its whole range, the earlier one the rest of its own
    a_then_b = ["a"] * 50 + ["b"] * 100
    b_then_a = ["a"] * 100 + ["b"] * 50
    for _ in range(8):
        start, errors = threading.Barrier(2), []

        def replace(tag: str, start: threading.Barrier, errors: list) -> None:
            start.wait()
            try:
                loader_of[tag].write(table, _slowly(_tagged(tag, ranges[tag])), replace=ranges[tag])
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=replace, args=(tag, start, errors)) for tag in ranges]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        got = first.read(table).read_all()
        per_block = got.group_by("_block_num").aggregate([("writer", "count"), ("writer", "distinct")])
        per_block = per_block.sort_by("_block_num").to_pylist()
        assert [r["_block_num"] for r in per_block] == list(range(150))
        assert all(r["writer_count"] == 3 and len(r["writer_distinct"]) == 1 for r in per_block), "rows of both"
        assert [r["writer_distinct"][0] for r in per_block] in (a_then_b, b_then_a)


def test_a_second_writer_waits_while_the_first_beats_then_fails_naming_the_table(store):
    first = store.loader(lock_lease=0.5)
    second = store.loader(lock_lease=0.5, lock_wait=1.5)
    table = store.table("rows")
    rows = _tagged("a", RowRange(0, 9))
    first.ensure_table(table, rows.schema)
    inside, go_on = threading.Event(), threading.Event()

    def held():
        yield rows.to_batches()[0]
        inside.set()
        go_on.wait(30)  # the first writer holds the lock, beating, three times its lease

    writing = threading.Thread(
        target=lambda: first.write(table, pa.RecordBatchReader.from_batches(rows.schema, held()))
    )
    writing.start()
    assert inside.wait(30)
    started = time.monotonic()
    with pytest.raises(
        TransientError, match=rf"table {table}: another writer has held its lock \(rows__amp_lock_\d+\)"
    ):
        second.write(table, _tagged("b", RowRange(10, 19)))
    waited = time.monotonic() - started
    go_on.set()
    writing.join()
    assert 1.5 <= waited < 10
    second.write(table, _tagged("b", RowRange(10, 19)))  # free again
    assert _count(table) == 60


def test_the_lock_of_a_dead_writer_on_another_host_is_taken_over_after_its_lease(store):
    loader, table = store.loader(lock_lease=1.0), store.table("rows")
    rows = _tagged("a", RowRange(0, 9))
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    name = f"`{table.namespace}`"
    # what a writer on another machine leaves when it dies mid-refresh: its lock, never beating again, and a stage
    owner = '{"beat": 41, "host": "elsewhere/boot/1", "owner": "0123", "pid": 1, "started": "7"}'
    admin().command(
        f"CREATE TABLE {name}.rows__amp_lock_9 (beat UInt8) ENGINE = Null COMMENT 'amp_dagster_lock:{owner}'"
    )
    admin().command(f"CREATE TABLE {name}.rows__amp_stage_00ff00ff AS {name}.rows")
    admin().command(f"INSERT INTO {name}.rows__amp_stage_00ff00ff SELECT * FROM {name}.rows")
    started = time.monotonic()
    loader.write(table, _tagged("b", RowRange(10, 19)))
    took = time.monotonic() - started
    assert 1.0 <= took < 5, f"taken over after {took:.1f}s"
    assert _tables(table) == ["rows", "rows__amp_lock_10"]  # the stage dropped, the dead lock replaced
    assert _count(table) == 60


# -- SIGKILL during range replaces and full refreshes ------------------------------------------------------------
#
# chdb opens an engine directory in one process at a time (and this process has the test engine open), so each
# writer runs in its own process on its own directory, and the next one opens it after the killed one died.


class _Worker:
    """A crash_worker process, its JSON reports read as they come."""

    def __init__(self, path, mode: str, gen: int) -> None:
        code = "import sys; from amp_dagster_tests.stores.clickhouse import crash_worker; crash_worker(*sys.argv[1:])"
        env = {**os.environ, "AMP_TEST_CHDB_DIR": str(path)}  # the harness module then makes no directory of its own
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(path), mode, str(gen)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reports: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.seen: list[dict] = []

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.reports.put(json.loads(line))
        self.reports.put(None)

    def next(self, at: str, timeout: float = 60) -> dict:
        while True:
            try:
                report = self.reports.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {at!r} report within {timeout}s") from None
            if report is None:
                self.proc.wait()
                raise AssertionError(f"the worker ended before {at!r}: {self.proc.stderr.read()[-3000:]}")
            self.seen.append(report)
            if report["at"] == at:
                return report

    def kill(self) -> list[dict]:
        """SIGKILL it, and every report it made."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()  # reaped: its pid is gone, as a crashed writer's is once its parent collects it
        while (report := self.reports.get(timeout=30)) is not None:
            self.seen.append(report)
        return self.seen


def _generations(reports: list[dict], done: int, running: int | None) -> tuple[int, int | None]:
    """The last generation the worker finished and the one it was writing when it died."""
    for report in reports:
        if report["at"] == "start":
            running = report["gen"]
        elif report["at"] == "done":
            done, running = report["gen"], None
    return done, running


def _whole(gen: int) -> list[int]:
    return [CRASH_ROWS + gen, CRASH_ROWS + gen]  # rows, distinct row numbers: all of the generation, once


@pytest.mark.slow
def test_sigkill_during_range_replaces_leaves_old_or_new_rows_of_the_range(tmp_path):
    rng, path = random.Random(9), tmp_path / "chdb"
    around = [2 * (CRASH_ROWS - 1), CRASH_ROWS - 1]  # the rows outside the range: generation -1, twice 0..n-1
    worker = _Worker(path, "replace", 0)
    worker.next("done")  # the table exists with generation 0 in the range
    done, running, found = 0, None, []
    for _ in range(20):
        worker.next("start")
        time.sleep(rng.uniform(0, 0.6))
        done, running = _generations(worker.kill(), done, running)
        worker = _Worker(path, "replace", max(done, running or 0) + 1)
        before, after = worker.next("found"), worker.next("recovered")
        found.append(before)
        gens = {int(g): n for g, n in after["gens"].items() if g != "-1"}
        assert after["gens"]["-1"] == around, "rows outside the range were touched"
        assert len(gens) == 1, f"after a kill in generation {running}, the range holds {gens}"
        ((gen, counts),) = gens.items()
        assert gen in (done, running) and counts == _whole(gen), f"{gens}: neither {done} nor {running} whole"
        assert after["stages"] == [] and len(after["locks"]) == 1
        assert after["seconds"] < 10, "the dead writer's lock was not taken over at once"  # the lease is 30 s
        done, running = gen, None
    worker.next("done")  # and the table takes writes again
    worker.kill()
    # how the kills fell: before the commit point (old rows, a stage to drop), after it (a journaled stage to
    # complete; the range old, new or empty until then)
    journaled = sum(any(is_journal for _, is_journal in f["stages"]) for f in found)
    empty = sum(len([g for g in f["gens"] if g != "-1"]) == 0 for f in found)
    print(f"20 kills: {journaled} after the commit point ({empty} with the range empty until recovery)")


@pytest.mark.slow
def test_sigkill_during_full_refreshes_leaks_no_stage(tmp_path):
    rng, path = random.Random(5), tmp_path / "chdb"
    worker = _Worker(path, "refresh", 0)
    worker.next("done")
    done, running, leaked = 0, None, 0
    for _ in range(6):
        worker.next("reading")  # the refresh has its stage now; the kill lands while it fills or swaps it in
        time.sleep(rng.uniform(0, 0.2))
        done, running = _generations(worker.kill(), done, running)
        worker = _Worker(path, "refresh", max(done, running or 0) + 1)
        before, after = worker.next("found"), worker.next("recovered")
        leaked += len(before["stages"])
        ((gen, counts),) = after["gens"].items()
        assert int(gen) in (done, running) and counts == _whole(int(gen))
        assert after["stages"] == [], "a killed refresh's stage outlived the next writer's start"
        done, running = int(gen), None
    worker.kill()
    print(f"6 kills: {leaked} left a stage for the next writer to drop")
    assert leaked >= 3, f"only {leaked} of 6 kills hit a refresh while it had a stage: the test proves little"
