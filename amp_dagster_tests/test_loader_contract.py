"""The loader contract: one suite, run against every destination on its real service, asserting on stored rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from amp_dagster.errors import (
    NotSupportedError,
    SchemaMismatchError,
    ServiceUnavailableError,
    TerminalError,
    TransientError,
)
from amp_dagster.loaders.base import RowRange, TableRef
from amp_dagster.loaders.encoding import json_strings

from . import data
from .stores import HARNESSES, Harness, load

LOG_KEY = ("block_num", "log_index")
SORT_LOGS = [("block_num", "ascending"), ("log_index", "ascending")]


@pytest.fixture(params=sorted(HARNESSES))
def store(request, tmp_path) -> Harness:
    from . import services

    if request.param == "postgres":
        services.require_postgres()
    if request.param == "redis":
        services.require_redis()
    harness = load(request.param)(tmp_path)
    yield harness
    harness.cleanup()


def _rows(store: Harness, loader, table: TableRef) -> pa.Table:
    return store.read_back(loader, table)


def _comparable(store: Harness, table: pa.Table) -> list[dict]:
    """Rows as Python values, nested columns parsed from JSON where the store keeps them as JSON text."""
    columns = {}
    for field in table.schema:
        column = table.column(field.name)
        if field.name in store.read_types:
            column = column.cast(store.read_types[field.name])
        if store.nested_as_json and pa.types.is_nested(field.type) and not _is_scalar_list(field.type):
            column = json_strings(column)
        columns[field.name] = column
    rows = pa.table(columns).to_pylist()
    for row in rows:
        for name, value in row.items():
            if isinstance(value, str) and store.nested_as_json and name in ("access_list",):
                row[name] = json.loads(value)
    return rows


def _is_scalar_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and not pa.types.is_nested(t.value_type)


def _assert_same(store: Harness, got: pa.Table, want: pa.Table, sort=(("_block_num", "ascending"),)) -> None:
    got = got.select(want.schema.names).sort_by(list(sort))
    want = want.sort_by(list(sort))
    assert got.num_rows == want.num_rows
    got_rows, want_rows = _comparable(store, got), _comparable(store, want)
    for i, (g, w) in enumerate(zip(got_rows, want_rows, strict=True)):
        assert g == w, f"row {i} differs"


# -- types ------------------------------------------------------------------------------------------------


def test_every_type_round_trips(store: Harness):
    loader, table = store.loader(), store.table("types")
    original = data.every_type()
    loader.ensure_table(table, original.schema)
    result = loader.write(table, original)
    assert result.rows == 4
    _assert_same(store, _rows(store, loader, table), original)


# -- append ---------------------------------------------------------------------------------------------


def test_append_accumulates_rows(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    first, second = data.logs(0, 9), data.logs(10, 19)
    loader.ensure_table(table, first.schema)
    loader.write(table, first)
    loader.write(table, second)
    _assert_same(store, _rows(store, loader, table), pa.concat_tables([first, second]), SORT_LOGS)


def test_empty_batches_and_empty_data(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 4)
    loader.ensure_table(table, logs.schema)
    assert loader.write(table, logs.slice(0, 0)).rows == 0
    empty = logs.schema.empty_table().to_batches()
    batches = [pa.RecordBatch.from_pylist([], schema=logs.schema), *logs.to_batches(max_chunksize=7), *empty]
    batches.insert(3, pa.RecordBatch.from_pylist([], schema=logs.schema))
    assert loader.write(table, pa.RecordBatchReader.from_batches(logs.schema, batches)).rows == logs.num_rows
    _assert_same(store, _rows(store, loader, table), logs, SORT_LOGS)


def test_reader_of_many_batches(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 199)
    loader.ensure_table(table, logs.schema)
    reader = data.in_batches(logs, 97)  # ~50 uneven batches
    result = loader.write(table, reader)
    assert result.rows == logs.num_rows
    assert result.bytes > 0
    got = _rows(store, loader, table)
    assert got.num_rows == logs.num_rows
    assert pc.sum(got["log_index"].cast(pa.int64())).as_py() == pc.sum(logs["log_index"].cast(pa.int64())).as_py()
    assert pc.count_distinct(got["tx_hash"]).as_py() == pc.count_distinct(logs["tx_hash"]).as_py()


# -- ranges ---------------------------------------------------------------------------------------------


def test_replace_range_twice_leaves_one_copy(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    before, after = data.logs(0, 99, seed=1), data.logs(100, 199, seed=1)
    loader.ensure_table(table, before.schema)
    loader.write(table, before, replace=RowRange(0, 99))
    loader.write(table, after, replace=RowRange(100, 199))
    forked = data.logs(0, 99, seed=2)  # the same blocks, different content (a reorg, a re-materialization)
    loader.write(table, forked, replace=RowRange(0, 99))
    loader.write(table, data.in_batches(forked, 500), replace=RowRange(0, 99))
    _assert_same(store, _rows(store, loader, table), pa.concat_tables([forked, after]), SORT_LOGS)


def test_delete_from_block_keeps_rows_below(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 199)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    deleted = loader.delete(table, RowRange(150))
    below = logs.filter(pc.less(logs["_block_num"], 150))
    assert deleted in (-1, logs.num_rows - below.num_rows)
    got = _rows(store, loader, table)
    assert pc.max(got["_block_num"]).as_py() == 149
    _assert_same(store, got, below, SORT_LOGS)


def test_delete_a_bounded_range(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    loader.delete(table, RowRange(20, 49))
    keep = logs.filter(
        pc.invert(pc.and_(pc.greater_equal(logs["_block_num"], 20), pc.less_equal(logs["_block_num"], 49)))
    )
    _assert_same(store, _rows(store, loader, table), keep, SORT_LOGS)


def test_delete_on_a_missing_table_deletes_nothing(store: Harness):
    loader = store.loader()
    assert loader.delete(store.table("never_written"), RowRange(0)) in (0, -1)


def test_replace_range_rejects_rows_outside_it(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 49)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    with pytest.raises(TerminalError, match=r"_block_num=4\d.*outside the range 0..=39"):
        loader.write(table, logs, replace=RowRange(0, 39))
    if loader.capabilities.atomic_replace_range:
        _assert_same(store, _rows(store, loader, table), logs, SORT_LOGS)


def test_cursor_column_instead_of_block_number(store: Harness):
    loader, table = store.loader(), store.table("items", range_column="cursor", key=("cursor",))
    rows = data.cursor_rows(0, 100)
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    loader.write(table, data.cursor_rows(50, 50), replace=RowRange(50, 99))
    loader.delete(table, RowRange(90))
    got = _rows(store, loader, table)
    _assert_same(store, got, data.cursor_rows(0, 90), [("cursor", "ascending")])


def test_range_column_must_exist_and_be_an_integer(store: Harness):
    loader = store.loader()
    with pytest.raises(SchemaMismatchError, match="'missing_col'"):
        loader.ensure_table(store.table("x", range_column="missing_col"), data.logs(0, 1).schema)
    with pytest.raises(SchemaMismatchError, match=r"'name'.*must be an integer"):
        loader.ensure_table(store.table("y", range_column="name"), data.cursor_rows(0, 1).schema)


# -- full refresh ------------------------------------------------------------------------------------------


def test_replace_table_swaps_in_the_new_content(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    old, new = data.logs(0, 49, seed=1), data.logs(0, 29, seed=5)
    loader.ensure_table(table, old.schema)
    loader.write(table, old)
    result = loader.replace_table(table, data.in_batches(new, 100))
    assert result.rows == new.num_rows
    _assert_same(store, _rows(store, loader, table), new, SORT_LOGS)


def test_failed_replace_table_leaves_the_old_table_intact(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    old, new = data.logs(0, 49, seed=1), data.logs(0, 99, seed=5)
    loader.ensure_table(table, old.schema)
    loader.write(table, old)

    class SourceDied(Exception):
        pass

    def dying():
        batches = new.to_batches(max_chunksize=200)
        yield from batches[:3]
        raise SourceDied("the source failed mid-write")

    with pytest.raises(SourceDied):
        loader.replace_table(table, pa.RecordBatchReader.from_batches(new.schema, dying()))
    _assert_same(store, _rows(store, loader, table), old, SORT_LOGS)
    # and the table is still writable afterwards
    loader.write(table, data.logs(50, 59))
    assert _rows(store, loader, table).num_rows == old.num_rows + data.logs(50, 59).num_rows


# -- upsert ---------------------------------------------------------------------------------------------------


def test_upsert_by_key_or_a_clear_refusal(store: Harness):
    loader = store.loader()
    table = store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs.slice(0, 100))
    changed = logs.slice(50, 100)  # 50 existing rows and 50 new ones
    data_field = logs.schema.field("data")
    changed = changed.set_column(
        changed.schema.get_field_index("data"), data_field, pa.array([b"changed"] * changed.num_rows)
    )
    if not loader.capabilities.upsert:
        with pytest.raises(NotSupportedError, match=f"not supported by {loader.store}"):
            loader.upsert(table, changed)
        return
    # a repeated key inside one upsert: the last row wins
    doubled = pa.concat_tables([logs.slice(50, 1), changed.slice(0, 1)])  # row 50: old, then changed
    loader.upsert(table, changed)
    loader.upsert(table, doubled)
    want = pa.concat_tables([logs.slice(0, 50), changed])
    _assert_same(store, _rows(store, loader, table), want, SORT_LOGS)


def test_upsert_needs_key_columns(store: Harness):
    loader = store.loader()
    if not loader.capabilities.upsert:
        pytest.skip(f"{loader.store} has no upsert; its refusal is tested above")
    table = store.table("nokey")
    logs = data.logs(0, 1)
    loader.ensure_table(table, logs.schema)
    with pytest.raises(TerminalError, match="needs key columns"):
        loader.upsert(table, logs)


# -- schemas ----------------------------------------------------------------------------------------------


def test_type_mismatch_names_the_column(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 4)
    loader.ensure_table(table, logs.schema)
    changed = logs.set_column(logs.schema.get_field_index("data"), "data", pc.cast(logs["tx_index"], pa.string()))
    with pytest.raises(SchemaMismatchError, match="'data'"):
        loader.ensure_table(table, changed.schema)
    with pytest.raises(SchemaMismatchError, match="'data'"):
        loader.write(table, changed)
    assert _rows(store, loader, table).num_rows == 0


def test_missing_column_names_the_column(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 4)
    loader.ensure_table(table, logs.schema)
    with pytest.raises(SchemaMismatchError, match="'topic3'"):
        loader.write(table, logs.drop_columns(["topic3"]))


def test_new_nullable_column_is_added_or_named(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs.slice(0, 10))
    wider = logs.append_column(pa.field("note", pa.string(), nullable=True), pa.array(["n"] * logs.num_rows))
    if not loader.capabilities.add_columns:
        with pytest.raises(SchemaMismatchError, match="'note'"):
            loader.ensure_table(table, wider.schema)
        return
    loader.ensure_table(table, wider.schema)
    loader.write(table, wider.slice(10))
    got = _rows(store, loader, table).sort_by(SORT_LOGS)
    assert got.num_rows == logs.num_rows
    assert got["note"].to_pylist() == [None] * 10 + ["n"] * (logs.num_rows - 10)
    required = wider.append_column(pa.field("must", pa.int64(), nullable=False), pa.array([1] * logs.num_rows))
    with pytest.raises(SchemaMismatchError, match=r"'must'.*not nullable"):
        loader.ensure_table(table, required.schema)


# -- identifiers and failures -----------------------------------------------------------------------------


HOSTILE_TABLE = "we\"ird'; DROP TABLE victim; -- tåble"
HOSTILE_COLUMNS = ["sp ace", 'quo"te', "semi;colon", "ünï`cödé", "back\\slash'"]


def test_hostile_identifiers_are_quoted_not_executed(store: Harness):
    loader = store.loader()
    victim = store.table("victim")
    sentinel = data.logs(0, 0)
    loader.ensure_table(victim, sentinel.schema)
    loader.write(victim, sentinel)

    table = store.table(HOSTILE_TABLE, namespace=store.namespace + " ns\"';--")
    rows = pa.table(
        {
            "_block_num": pa.array([1, 2, 3], pa.uint64()),
            **{c: pa.array([f"{c}-{i}" for i in range(3)]) for c in HOSTILE_COLUMNS},
        }
    )
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows, replace=RowRange(1, 3))
    loader.delete(table, RowRange(3))
    got = _rows(store, loader, table).sort_by("_block_num")
    assert got.select(rows.schema.names).to_pylist() == rows.slice(0, 2).to_pylist()
    assert _rows(store, loader, victim).num_rows == sentinel.num_rows


def test_unreachable_service_is_a_typed_transient_error(store: Harness):
    loader = store.unreachable_loader()
    if loader is None:
        pytest.skip(f"{store.__class__.__name__}: the store is embedded, there is no service to be down")
    table = store.table("logs")
    logs = data.logs(0, 1)
    with pytest.raises(ServiceUnavailableError) as caught:
        loader.ensure_table(table, logs.schema)
        loader.write(table, logs)
    error = caught.value
    assert isinstance(error, TransientError) and error.transient
    assert "127.0.0.1:" in str(error)
    assert "s3cret-pw" not in str(error) and "s3cret-pw" not in repr(error.__cause__ or "")
    loader.close()
