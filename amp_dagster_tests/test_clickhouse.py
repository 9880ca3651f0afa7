"""ClickHouse-specific behaviour on the chdb engine: the DDL and engine created, the type map at its edges, FINAL
semantics of upsert, lightweight DELETE visibility, the EXCHANGE TABLES swap, chdb's one-path rule, HTTP errors."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from amp_dagster.errors import ConfigError, SchemaMismatchError, ServiceUnavailableError, TerminalError
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.clickhouse import ClickHouseLoader
from amp_dagster.loaders.schema import schema_from_text, schema_to_text
from amp_dagster.ranges import RowRange
from amp_dagster.retry import RetryPolicy

from . import data
from .services import closed_port
from .stores.clickhouse import CHDB_DSN, ClickHouseHarness, admin

LOG_KEY = ("block_num", "log_index")


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
