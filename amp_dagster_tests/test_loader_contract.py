"""The loader contract: one suite, run against every destination on its real service, asserting on stored rows."""

from __future__ import annotations

import logging

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
from amp_dagster.loaders.base import TableRef
from amp_dagster.ranges import RowRange

from . import data
from .services import closed_port
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


def _assert_same(store: Harness, got: pa.Table, want: pa.Table, sort=(("_block_num", "ascending"),)) -> None:
    got = got.select(want.schema.names).sort_by(list(sort))
    want = want.sort_by(list(sort))
    assert got.num_rows == want.num_rows
    assert got.schema.types == want.schema.types, "read() gives back the Arrow types written"
    for i, (g, w) in enumerate(zip(got.to_pylist(), want.to_pylist(), strict=True)):
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
    _assert_same(store, _rows(store, loader, table), logs, SORT_LOGS)


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


EDGES = [0, 1, 2**63 - 2, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1]


def test_range_predicates_are_exact_at_the_edges_of_uint64(store: Harness):
    loader, table = store.loader(), store.table("edges")
    rows = pa.table({"_block_num": pa.array(EDGES, pa.uint64()), "v": pa.array(range(len(EDGES)), pa.int64())})
    loader.ensure_table(table, rows.schema)
    try:
        loader.write(table, rows)
    except TerminalError as exc:  # a store that cannot hold such range values must say so, naming the column
        assert "_block_num" in str(exc)
        return
    for rng in (
        RowRange(0, 0),
        RowRange(2**63 - 1, 2**63),
        RowRange(2**63),
        RowRange(2**64 - 1),
        RowRange(1, 2**63 - 2),
    ):
        got = sorted(loader.read(table, rng).read_all()["_block_num"].to_pylist())
        assert got == [b for b in EDGES if rng.contains(b)], f"read {rng}"
    assert loader.delete(table, RowRange(2**63 - 1, 2**63)) in (2, -1)
    assert loader.delete(table, RowRange(2**64 - 1)) in (1, -1)
    got = sorted(_rows(store, loader, table)["_block_num"].to_pylist())
    assert got == [0, 1, 2**63 - 2, 2**63 + 1, 2**64 - 2]
    loader.write(table, rows.slice(3, 2), replace=RowRange(2**63 - 1, 2**63))
    got = sorted(_rows(store, loader, table)["_block_num"].to_pylist())
    assert got == [0, 1, 2**63 - 2, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2]


def test_a_range_beyond_the_column_type_is_refused_before_any_change(store: Harness):
    loader, table = store.loader(), store.table("small")
    rows = pa.table({"_block_num": pa.array([1, 2, 3], pa.uint32()), "v": pa.array([1, 2, 3], pa.int64())})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    with pytest.raises(TerminalError, match=r"'_block_num' \(uint32\).*4294967296"):
        loader.delete(table, RowRange(2**32))
    with pytest.raises(TerminalError, match=r"'_block_num' \(uint32\)"):
        loader.write(table, rows.slice(0, 0), replace=RowRange(0, 2**40))
    assert sorted(_rows(store, loader, table)["_block_num"].to_pylist()) == [1, 2, 3]


def test_duplicate_column_names_are_refused_by_name(store: Harness):
    loader, table = store.loader(), store.table("logs")
    logs = data.logs(0, 2)
    twice = pa.Table.from_arrays([*logs.columns, logs.column("address")], names=[*logs.schema.names, "address"])
    for call in (lambda: loader.ensure_table(table, twice.schema), lambda: loader.write(table, twice)):
        with pytest.raises(SchemaMismatchError, match=r"more than one column named 'address'"):
            call()
    loader.ensure_table(table, logs.schema)
    with pytest.raises(SchemaMismatchError, match=r"more than one column named 'address'"):
        loader.write(table, twice)
    assert _rows(store, loader, table).num_rows == 0


def test_schema_drift_names_each_column_and_how_it_differs(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 4)
    loader.ensure_table(table, logs.schema)
    fewer = logs.drop_columns(["topic3"])
    index = fewer.schema.get_field_index("data")
    drifted = fewer.set_column(index, pa.field("data", pa.string()), pa.array(["x"] * logs.num_rows))
    with pytest.raises(SchemaMismatchError) as caught:
        loader.write(table, drifted)
    message = str(caught.value)
    assert "'topic3' is in the table but not in the data" in message
    assert "'data' is" in message and "in the table but string in the data" in message
    assert "tx_hash" not in message, "only the columns that differ are named, not both whole schemas"


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


def test_unreachable_service_is_a_typed_transient_error(store: Harness, caplog):
    port = closed_port()
    loader = store.unreachable_loader(port)
    if loader is None:
        pytest.skip(f"{store.__class__.__name__}: the store is embedded, there is no service to be down")
    caplog.set_level(logging.DEBUG)
    table = store.table("logs")
    logs = data.logs(0, 1)
    with pytest.raises(ServiceUnavailableError) as caught:
        loader.ensure_table(table, logs.schema)
        loader.write(table, logs)
    error = caught.value
    assert isinstance(error, TransientError) and error.transient
    assert f"127.0.0.1:{port}" in str(error)
    chain, link = [], error
    while link is not None:
        chain.append(f"{link!r} {link}")
        link = link.__cause__ or link.__context__
    assert "s3cret-pw" not in " ".join(chain) + caplog.text
    loader.close()


# -- what the review of the loaders found: each of these once let bad data in -------------------------------


def _with_null_block(logs: pa.Table) -> pa.Table:
    nullable = logs.schema.set(0, logs.schema.field("_block_num").with_nullable(True))
    blocks = pa.array([None, *logs["_block_num"].to_pylist()[1:]], pa.uint64())
    return logs.cast(nullable).set_column(0, nullable.field("_block_num"), blocks)


def test_rows_without_a_range_value_are_refused(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    bad = _with_null_block(data.logs(0, 9, seed=3))
    # such rows would survive every delete of their range: replaying the range would duplicate them
    attempts = [lambda: loader.write(table, bad), lambda: loader.write(table, bad, replace=RowRange(0, 9))]
    attempts.append(lambda: loader.replace_table(table, bad))
    if loader.capabilities.upsert:
        attempts.append(lambda: loader.upsert(table, bad))
    for attempt in attempts:
        with pytest.raises(TerminalError, match="_block_num"):
            attempt()
    _assert_same(store, _rows(store, loader, table), logs, SORT_LOGS)


@pytest.mark.parametrize(
    ("column", "other"),
    [("tx_hash", pa.binary()), ("tx_index", pa.int64()), ("timestamp", pa.timestamp("us", tz="UTC"))],
    ids=["fixed-binary-as-binary", "uint32-as-int64", "ns-as-us"],
)
def test_data_of_another_arrow_type_is_refused_even_when_the_store_type_is_the_same(store: Harness, column, other):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 4)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    index = logs.schema.get_field_index(column)
    field = logs.schema.field(column).with_type(other)
    confused = logs.set_column(index, field, logs.column(column).cast(other))
    with pytest.raises(SchemaMismatchError, match=repr(column)):
        loader.write(table, data.logs(5, 9).set_column(index, field, data.logs(5, 9).column(column).cast(other)))
    with pytest.raises(SchemaMismatchError, match=repr(column)):
        loader.ensure_table(table, confused.schema)
    _assert_same(store, _rows(store, loader, table), logs, SORT_LOGS)  # still readable, as written


LONG = "ethereum_mainnet_decoded_uniswap_v3_pool_swap_events_"  # 54 bytes: longer than PostgreSQL's 63 with suffixes


def test_long_table_names_sharing_a_prefix_keep_their_keys_through_a_full_refresh(store: Harness):
    loader = store.loader()
    first, second = store.table(LONG + "a", key=LOG_KEY), store.table(LONG + "b", key=LOG_KEY)
    logs = data.logs(0, 9)
    for table in (first, second):
        loader.ensure_table(table, logs.schema)
        loader.write(table, logs)
    loader.replace_table(first, data.logs(0, 4))
    loader.write(first, data.logs(5, 9), replace=RowRange(5, 9))
    if loader.capabilities.upsert:
        for table in (first, second):
            loader.upsert(table, logs.slice(0, 20))
    for table in (first, second):
        _assert_same(store, _rows(store, loader, table), logs, SORT_LOGS)


HOSTILE_RANGE, HOSTILE_KEY = 'blk "num" \'n`', 'k;ey "id" ünï'


def test_hostile_range_and_key_column_names(store: Harness):
    loader = store.loader()
    table = store.table("hostile_keys", range_column=HOSTILE_RANGE, key=(HOSTILE_KEY,))
    rows = pa.table(
        {
            HOSTILE_RANGE: pa.array([1, 1, 2, 3, 4], pa.uint64()),
            HOSTILE_KEY: pa.array([10, 11, 20, 30, 40], pa.int64()),
            "v": pa.array(["a", "b", "c", "d", "e"]),
        }
    )
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    loader.write(table, rows.slice(2, 1), replace=RowRange(2, 2))
    loader.delete(table, RowRange(4))
    if loader.capabilities.upsert:
        loader.upsert(table, pa.table({HOSTILE_RANGE: pa.array([1], pa.uint64()), HOSTILE_KEY: [11], "v": ["B"]}))
    got = _rows(store, loader, table).sort_by(HOSTILE_KEY).select(rows.column_names)
    want = ["a", "B" if loader.capabilities.upsert else "b", "c", "d"]
    assert got[HOSTILE_KEY].to_pylist() == [10, 11, 20, 30] and got["v"].to_pylist() == want


def test_a_source_dying_during_a_range_replace(store: Harness):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    forked = data.logs(50, 99, seed=9)

    def dying():
        yield from forked.to_batches(max_chunksize=100)[:2]
        raise RuntimeError("the source died")

    with pytest.raises(RuntimeError, match="the source died"):
        loader.write(table, pa.RecordBatchReader.from_batches(forked.schema, dying()), replace=RowRange(50, 99))
    if loader.capabilities.atomic_replace_range:
        _assert_same(store, _rows(store, loader, table), logs, SORT_LOGS)
    # whatever was left, replaying the replace leaves exactly one copy
    loader.write(table, forked, replace=RowRange(50, 99))
    _assert_same(
        store, _rows(store, loader, table), pa.concat_tables([logs.slice(0, _below(logs, 50)), forked]), SORT_LOGS
    )


def _below(table: pa.Table, block: int) -> int:
    return pc.sum(pc.less(table["_block_num"], block).cast(pa.int64())).as_py()


def test_sub_microsecond_timestamps_round_trip_or_fail_naming_the_column(store: Harness):
    loader, table = store.loader(), store.table("precise")
    rows = pa.table(
        {
            "_block_num": pa.array([1], pa.uint64()),
            "at": pa.array([1_700_000_000_123_456_789], pa.timestamp("ns", tz="UTC")),
        }
    )
    loader.ensure_table(table, rows.schema)
    try:
        loader.write(table, rows)
    except TerminalError as error:
        assert "'at'" in str(error) and "truncate" in str(error)
        return
    assert _rows(store, loader, table).column("at").to_pylist() == rows.column("at").to_pylist()
