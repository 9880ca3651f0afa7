"""Delta Lake loader specifics: one commit per call, the type map at its edges, path safety, maintenance, bad paths."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import threading
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from amp_dagster.errors import ConfigError, SchemaMismatchError, TerminalError, TransientError
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.delta import ARROW_KEY, DeltaLoader, decode_name, encode_name
from amp_dagster.loaders.lakehouse import portable_type
from amp_dagster.loaders.schema import schema_to_text
from amp_dagster.ranges import RowRange
from amp_dagster.retry import RetryPolicy

from . import data

LOG_KEY = ("block_num", "log_index")


@pytest.fixture
def loader(tmp_path) -> DeltaLoader:
    with DeltaLoader(tmp_path / "base") as loader:
        yield loader


def _table(loader: DeltaLoader, table: TableRef) -> DeltaTable:
    return DeltaTable(str(loader.path(table)))


def _version(loader: DeltaLoader, table: TableRef) -> int:
    return _table(loader, table).version()


def _data_files(loader: DeltaLoader, table: TableRef) -> list:
    return [p for p in loader.path(table).rglob("*.parquet") if "_delta_log" not in p.parts]


def _files_on_disk(loader: DeltaLoader, table: TableRef) -> set[str]:
    return {p.name for p in _data_files(loader, table)}


def _size(paths) -> int:
    """Bytes of the files, skipping those the upkeep deleted meanwhile."""
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size if path.is_file() else 0
    return total


def _bytes_on_disk(loader: DeltaLoader, table: TableRef) -> int:
    return _size(loader.path(table).rglob("*"))


def _live_bytes(loader: DeltaLoader, table: TableRef) -> int:
    return sum(os.path.getsize(uri) for uri in _table(loader, table).file_uris())


def _commit(loader: DeltaLoader, table: TableRef) -> tuple[list[dict], list[dict]]:
    """The files the table's latest commit added and removed, from its Delta log entry."""
    entry = loader.path(table) / "_delta_log" / f"{_version(loader, table):020d}.json"
    actions = [json.loads(line) for line in entry.read_text().splitlines()]
    return [a["add"] for a in actions if "add" in a], [a["remove"] for a in actions if "remove" in a]


# -- one commit per call -----------------------------------------------------------------------------------


def test_every_write_is_exactly_one_commit(loader):
    table = TableRef("logs", namespace="eth", key=LOG_KEY)
    logs = data.logs(0, 199)
    loader.ensure_table(table, logs.schema)
    assert _version(loader, table) == 0

    result = loader.write(table, data.in_batches(logs, 37))  # dozens of batches, one commit
    assert (result.commits, _version(loader, table)) == (1, 1)
    assert _table(loader, table).history(1)[0]["operation"] == "WRITE"

    loader.write(table, data.in_batches(data.logs(0, 99, seed=2), 50), replace=RowRange(0, 99))
    assert _version(loader, table) == 2
    entry = _table(loader, table).history(1)[0]
    assert (entry["operation"], entry["operationParameters"]["mode"]) == ("WRITE", "Overwrite")
    assert entry["operationParameters"]["predicate"] == (
        "_block_num >= '0'::decimal(20, 0) AND _block_num <= '99'::decimal(20, 0)"
    )

    loader.delete(table, RowRange(150))
    assert _version(loader, table) == 3
    loader.replace_table(table, data.in_batches(logs, 64))
    assert _version(loader, table) == 4
    got = loader.read(table).read_all()
    assert got.num_rows == logs.num_rows and got.schema == logs.schema


def test_empty_data_makes_no_commit_but_an_empty_replace_clears_its_range(loader):
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 49)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    assert loader.write(table, logs.slice(0, 0)).commits == 0
    assert _version(loader, table) == 1
    result = loader.write(table, logs.slice(0, 0), replace=RowRange(40, 49))
    assert (result.commits, _version(loader, table)) == (1, 2)
    assert pc.max(loader.read(table).read_all()["_block_num"]).as_py() == 39


def test_a_failed_write_commits_nothing_and_raises_the_source_error(loader):
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs.slice(0, 100))

    class Broken(Exception):
        pass

    def dying():
        yield from logs.to_batches(max_chunksize=100)[:2]
        raise Broken("source died")

    with pytest.raises(Broken, match="source died"):
        loader.write(table, pa.RecordBatchReader.from_batches(logs.schema, dying()))
    with pytest.raises(TerminalError, match="outside the range"):
        loader.write(table, data.in_batches(logs, 10), replace=RowRange(0, 5))
    assert _version(loader, table) == 1
    assert loader.read(table).read_all().num_rows == 100


def test_a_concurrent_commit_is_a_transient_error_and_ours_commits_nothing(loader):
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    head = logs.filter(pc.less(logs["_block_num"], 50))

    def racing():
        batches = head.to_batches(max_chunksize=50)
        yield batches[0]
        # another writer deletes in the range meanwhile; from its own thread, as deltalake pulls this source on a
        # tokio worker that must not start deltalake calls itself
        other = threading.Thread(target=DeltaLoader(loader.base_dir).delete, args=(table, RowRange(10, 19)))
        other.start()
        other.join()
        yield from batches[1:]

    with pytest.raises(TransientError, match=r"concurrent commit.*Retry"):
        loader.write(table, pa.RecordBatchReader.from_batches(logs.schema, racing()), replace=RowRange(0, 49))
    block = loader.read(table).read_all()["_block_num"]
    assert (
        pc.count(block).as_py()
        == logs.num_rows - pc.sum(pc.is_in(logs["_block_num"], pa.array(range(10, 20), pa.uint64()))).as_py()
    )
    assert _version(loader, table) == 2  # create, first write, the other delete: ours did not commit


def test_a_delete_that_lost_a_race_is_retried(tmp_path, monkeypatch):
    loader = DeltaLoader(tmp_path, retry=RetryPolicy(attempts=3, initial_delay=0.001))
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 99)
    below = logs.filter(pc.less(logs["_block_num"], 50))
    loader.ensure_table(table, logs.schema)
    loader.write(table, below)
    opened, open_table = [], loader._open

    def stale(t: TableRef):
        dt = open_table(t)
        if not opened:  # another writer appends rows of the range after we looked: our delete must not miss them
            DeltaLoader(tmp_path).write(table, logs.filter(pc.greater_equal(logs["_block_num"], 50)))
        opened.append(dt)
        return dt

    monkeypatch.setattr(loader, "_open", stale)
    deleted = loader.delete(table, RowRange(40))
    assert len(opened) == 2  # the first attempt conflicted
    kept = logs.filter(pc.less(logs["_block_num"], 40))
    assert deleted == logs.num_rows - kept.num_rows
    assert loader.read(table).read_all().sort_by([("block_num", "ascending"), ("log_index", "ascending")]) == kept


def test_ensure_table_checks_a_table_another_writer_created_first(loader, monkeypatch):
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 1)
    loader.ensure_table(table, logs.schema)  # the other writer's table
    monkeypatch.setattr(loader, "_open", lambda t: None)  # we looked before it was there
    index = logs.schema.get_field_index("data")
    with pytest.raises(SchemaMismatchError, match="'data' is binary in the table but string"):
        loader.ensure_table(table, logs.schema.set(index, pa.field("data", pa.string())))
    assert _version(loader, table) == 0


def test_writes_keep_to_the_file_size_and_row_group_size(tmp_path):
    loader = DeltaLoader(tmp_path, target_file_size=64 * 1024, max_row_group_size=1000)
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 399)
    loader.ensure_table(table, logs.schema)
    assert loader.write(table, data.in_batches(logs, 500)).commits == 1
    files = [pq.ParquetFile(uri.removeprefix("file://")) for uri in _table(loader, table).file_uris()]
    assert len(files) > 1 and _version(loader, table) == 1
    assert max(f.metadata.row_group(i).num_rows for f in files for i in range(f.num_row_groups)) <= 1000
    assert sum(f.metadata.num_rows for f in files) == logs.num_rows


def test_a_file_missing_under_a_read_is_a_typed_error(loader):
    table = TableRef("logs", namespace="eth", key=LOG_KEY)
    loader.ensure_table(table, data.logs(0, 9).schema)
    loader.write(table, data.logs(0, 9))
    for path in loader.path(table).rglob("*.parquet"):  # lost, though the table still lists it
        path.unlink()
    with pytest.raises(TerminalError, match=r"Delta Lake table eth\.logs at .*: read failed"):
        loader.read(table).read_all()


# -- types ---------------------------------------------------------------------------------------------------

EDGES = pa.schema(
    [
        pa.field("_block_num", pa.uint64(), nullable=False),
        pa.field("u8", pa.uint8()),
        pa.field("u16", pa.uint16()),
        pa.field("u32", pa.uint32()),
        pa.field("u64", pa.uint64()),
        pa.field("ts", pa.timestamp("ns", tz="+00:00")),
        pa.field("naive", pa.timestamp("ns")),
        pa.field("t", pa.time64("ns")),
        pa.field("big", pa.large_string()),
        pa.field("tag", pa.dictionary(pa.int8(), pa.string())),
        pa.field("nested", pa.list_(pa.struct([("n", pa.uint64()), ("at", pa.timestamp("ns", tz="UTC"))]))),
    ]
)


def _edges() -> pa.Table:
    at = dt.datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=dt.UTC)  # the last whole µs a timestamp[ns] holds
    return pa.table(
        {
            "_block_num": [0, 1, 2],
            "u8": [255, 0, None],
            "u16": [65535, 0, None],
            "u32": [2**32 - 1, 0, None],
            "u64": [2**64 - 1, 2**63, None],
            "ts": [at, dt.datetime(1970, 1, 1, tzinfo=dt.UTC), None],
            "naive": [at.replace(tzinfo=None), dt.datetime(1900, 1, 1), None],
            "t": [86_399_999_999_999, 0, None],
            "big": ["x" * 1000, "", None],
            "tag": ["a", "b", None],
            "nested": [[{"n": 2**64 - 1, "at": at}], [], None],
        },
        schema=EDGES,
    )


def test_edge_values_round_trip_with_their_original_types(loader):
    table = TableRef("edges")
    edges = _edges()
    loader.ensure_table(table, edges.schema)
    loader.write(table, edges)
    got = loader.read(table).read_all()
    assert got.schema == edges.schema
    assert got.sort_by("_block_num").to_pylist() == edges.to_pylist()


def test_the_delta_types_hold_the_values_exactly(loader):
    table = TableRef("edges")
    loader.ensure_table(table, EDGES)
    loader.write(table, _edges())
    stored = _table(loader, table)
    types = {f.name: f.type.to_json().strip('"') for f in stored.schema().fields}
    assert {k: types[k] for k in ("u8", "u16", "u32", "u64", "ts", "naive", "t", "big")} == {
        "u8": "short",
        "u16": "integer",
        "u32": "long",  # not integer: deltalake would turn uint32 into int32
        "u64": "decimal(20,0)",
        "ts": "timestamp",
        "naive": "timestamp_ntz",
        "t": "long",
        "big": "string",
    }
    # an independent reader (deltalake itself) sees the exact values
    raw = stored.to_pyarrow_table().sort_by("_block_num")
    assert raw["u32"].to_pylist() == [2**32 - 1, 0, None]
    assert raw["u64"].to_pylist() == [Decimal(2**64 - 1), Decimal(2**63), None]
    assert raw["nested"][0].as_py()[0]["n"] == Decimal(2**64 - 1)


def test_sub_microsecond_timestamps_fail_naming_the_column_or_truncate_when_asked(tmp_path):
    ts = pa.table(
        {
            "_block_num": pa.array([1], pa.uint64()),
            "when": pa.array([1_700_000_000_123_456_789], pa.timestamp("ns", tz="UTC")),
        }
    )
    table = TableRef("ts")
    strict = DeltaLoader(tmp_path / "strict")
    strict.ensure_table(table, ts.schema)
    with pytest.raises(TerminalError, match=r"column 'when' has nanoseconds.*truncate_timestamps=True"):
        strict.write(table, ts)
    assert strict.read(table).read_all().num_rows == 0

    lenient = DeltaLoader(tmp_path / "lenient", truncate_timestamps=True)
    lenient.ensure_table(table, ts.schema)
    lenient.write(table, ts)
    assert lenient.read(table).read_all()["when"].cast(pa.int64()).to_pylist() == [1_700_000_000_123_456_000]


DELTA = {"store": "Delta Lake", "small_ints": True, "keep_fixed_binary": False, "time_as_int": True}
ICEBERG = {"store": "Iceberg", "small_ints": False, "keep_fixed_binary": True, "time_as_int": False}
NESTED = pa.struct([("n", pa.uint64()), ("ids", pa.large_list(pa.binary(20)))])


@pytest.mark.parametrize(
    ("arrow", "delta", "iceberg"),
    [
        (pa.uint8(), pa.int16(), pa.int32()),
        (pa.int8(), pa.int8(), pa.int32()),
        (pa.uint16(), pa.int32(), pa.int32()),
        (pa.uint32(), pa.int64(), pa.int64()),
        (pa.uint64(), pa.decimal128(20, 0), pa.decimal128(20, 0)),
        (pa.timestamp("ns", "+00:00"), pa.timestamp("us", "UTC"), pa.timestamp("us", "UTC")),
        (pa.timestamp("ms"), pa.timestamp("us"), pa.timestamp("us")),
        (pa.time32("s"), pa.int32(), pa.time64("us")),
        (pa.time64("ns"), pa.int64(), pa.time64("us")),
        (pa.binary(32), pa.binary(), pa.binary(32)),
        (pa.dictionary(pa.int8(), pa.large_string()), pa.string(), pa.string()),
        (pa.binary_view(), pa.binary(), pa.binary()),
        (pa.decimal256(10, 2), pa.decimal128(10, 2), pa.decimal128(10, 2)),
        (pa.list_(pa.uint32(), 2), pa.list_(pa.int64()), pa.list_(pa.int64())),
        (
            NESTED,
            pa.struct([("n", pa.decimal128(20, 0)), ("ids", pa.list_(pa.binary()))]),
            pa.struct([("n", pa.decimal128(20, 0)), ("ids", pa.list_(pa.binary(20)))]),
        ),
        (pa.map_(pa.large_string(), pa.uint16()), pa.map_(pa.string(), pa.int32()), pa.map_(pa.string(), pa.int32())),
    ],
)
def test_portable_types_of_delta_and_iceberg(arrow, delta, iceberg):
    assert portable_type(arrow, "c", **DELTA) == delta
    assert portable_type(arrow, "c", **ICEBERG) == iceberg
    for target in (delta, iceberg):  # each stores the values exactly and casts back
        assert pa.array([None], arrow).cast(target).cast(arrow).type == arrow


@pytest.mark.parametrize(
    ("arrow", "options"),
    [
        (pa.decimal256(60, 0), DELTA),
        (pa.decimal256(60, 0), ICEBERG),
        (pa.duration("ns"), ICEBERG),
        (pa.list_view(pa.int64()), DELTA),  # Arrow cannot cast it back from a list
    ],
)
def test_types_without_a_portable_form_are_named(arrow, options):
    with pytest.raises(TerminalError, match=rf"{options['store']}: column 'c' has Arrow type {re.escape(str(arrow))}"):
        portable_type(arrow, "c", **options)


def test_an_unstorable_type_is_named(loader):
    schema = pa.schema([pa.field("_block_num", pa.uint64()), pa.field("huge", pa.decimal256(60, 0))])
    with pytest.raises(TerminalError, match=r"column 'huge'.*decimal256\(60, 0\)"):
        loader.ensure_table(TableRef("x"), schema)


def test_added_columns_and_a_new_shape_keep_their_original_types(loader):
    table = TableRef("items", range_column="cursor")
    rows = data.cursor_rows(0, 10)
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    wider = rows.append_column(pa.field("rank", pa.uint32()), pa.array(range(10), pa.uint32()))
    loader.ensure_table(table, wider.schema)
    loader.write(table, wider)
    got = loader.read(table).read_all()
    assert got.schema.field("rank").type == pa.uint32()
    assert got["rank"].null_count == 10

    # a full refresh may change the shape; data and types swap in with one commit
    reshaped = wider.set_column(1, pa.field("name", pa.large_string()), wider["name"].cast(pa.large_string()))
    loader.replace_table(table, reshaped)
    assert loader.read(table).read_all().schema == reshaped.schema
    with pytest.raises(SchemaMismatchError, match=r"'score'.*double in the table but string"):
        loader.write(table, reshaped.set_column(2, "score", reshaped["score"].cast(pa.string())))


# -- ranges and upserts ---------------------------------------------------------------------------------------


def test_read_a_range_and_a_hostile_range_column(loader):
    column = 'blk "num"; --'
    table = TableRef("t", range_column=column)
    rows = pa.table({column: pa.array(range(100), pa.uint64()), "v": pa.array(range(100), pa.int64())})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    loader.write(table, rows.slice(10, 10), replace=RowRange(10, 19))
    loader.delete(table, RowRange(90))
    got = loader.read(table, RowRange(5, 14)).read_all()
    assert got.schema == rows.schema
    assert sorted(got[column].to_pylist()) == list(range(5, 15))
    assert loader.read(table).read_all().num_rows == 90


def test_upsert_in_several_merges_keeps_the_last_row(tmp_path):
    loader = DeltaLoader(tmp_path, merge_rows=10)
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 9).slice(0, 40)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs.slice(0, 20))
    first = logs.set_column(12, "data", pa.array([b"first"] * 40))
    last = logs.slice(30, 10).set_column(12, "data", pa.array([b"last"] * 10))
    result = loader.upsert(table, data.in_batches(pa.concat_tables([first, last]), 10))
    assert result.rows == 50 and result.commits == 5
    got = loader.read(table).read_all().sort_by([("block_num", "ascending"), ("log_index", "ascending")])
    assert got.num_rows == 40
    assert got["data"].to_pylist() == [b"first"] * 30 + [b"last"] * 10


def test_upsert_with_hostile_column_names(loader):
    key, value = 'k`ey "1"; --', "va`l'ue"
    table = TableRef("t", range_column=key, key=(key,))
    rows = pa.table({key: pa.array(range(5), pa.uint32()), value: pa.array(["old"] * 5)})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    loader.upsert(table, pa.table({key: pa.array([1, 9], pa.uint32()), value: ["new", "added"]}))
    got = loader.read(table).read_all().sort_by(key)
    assert got.to_pydict() == {key: [0, 1, 2, 3, 4, 9], value: ["old", "new", "old", "old", "old", "added"]}


# -- paths ---------------------------------------------------------------------------------------------------

HOSTILE = ["..", ".", "../../escape", "/etc/passwd", "a/b", "%2e%2e", "~7E", "we\"ird'; --", "tåble ✓", ""]


@pytest.mark.parametrize("name", HOSTILE)
def test_names_encode_to_one_safe_reversible_component(name):
    encoded = encode_name(name)
    assert decode_name(encoded) == name
    assert encoded == "" or all(c.isascii() and (c.isalnum() or c in "_-~") for c in encoded)


def test_hostile_names_stay_inside_the_base_dir(tmp_path):
    base = tmp_path / "inside" / "base"
    loader = DeltaLoader(base)
    rows = data.cursor_rows(0, 3)
    for i, name in enumerate(n for n in HOSTILE if n):
        table = TableRef(name, namespace=HOSTILE[-2 - i % 3], range_column="cursor")
        loader.ensure_table(table, rows.schema)
        loader.write(table, rows)
        path = loader.path(table)
        assert path.parent.parent == base
        assert loader.read(table).read_all().num_rows == 3
    outside = {p for p in tmp_path.rglob("*") if base not in (p, *p.parents)}
    assert outside == {tmp_path / "inside"}
    for namespace in os.listdir(base):
        for name in os.listdir(base / namespace):
            assert decode_name(name) in HOSTILE


# -- bad locations ------------------------------------------------------------------------------------------


def test_a_location_that_is_a_file_is_a_clear_terminal_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    loader = DeltaLoader(blocker / "base")
    with pytest.raises(ConfigError, match=r"eth\.logs: cannot create the directory .*not_a_dir.*writable local"):
        loader.ensure_table(TableRef("logs", namespace="eth"), data.logs(0, 1).schema)


def test_an_unwritable_location_is_a_clear_terminal_error():
    loader = DeltaLoader("/proc/amp_dagster_delta")  # not writable, even for root
    with pytest.raises(ConfigError, match=r"/proc/amp_dagster_delta.*writable local directory"):
        loader.ensure_table(TableRef("logs"), data.logs(0, 1).schema)


@pytest.mark.parametrize("base", ["s3://bucket/delta", "/tmp/50%off"])
def test_a_location_deltalake_would_misread_is_refused(base):
    with pytest.raises(ConfigError, match="local directory path"):
        DeltaLoader(base)


def test_a_missing_table_is_named(loader):
    with pytest.raises(TerminalError, match=r"eth\.nope does not exist.*ensure_table"):
        loader.write(TableRef("nope", namespace="eth"), data.logs(0, 1))


# -- maintenance ----------------------------------------------------------------------------------------------


def test_compact_and_vacuum_on_request_keep_the_rows(tmp_path):
    loader = DeltaLoader(tmp_path, vacuum_every=0, compact_files=0)  # no upkeep of its own
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    for start in range(0, 100, 20):
        loader.write(
            table,
            logs.filter(pc.and_(pc.greater_equal(logs["_block_num"], start), pc.less(logs["_block_num"], start + 20))),
        )
    assert len(_table(loader, table).file_uris()) == 5  # writes never compact
    metrics = loader.compact(table)
    assert metrics["numFilesRemoved"] == 5 and len(_table(loader, table).file_uris()) == 1
    assert _table(loader, table).history(1)[0]["operation"] == "OPTIMIZE"
    assert loader.vacuum(table, retention_hours=1, dry_run=True) == []  # replaced just now: kept an hour
    assert len(loader.vacuum(table, dry_run=True)) == 5
    removed = loader.vacuum(table)
    assert len(removed) == 5
    assert _files_on_disk(loader, table) == {os.path.basename(u) for u in _table(loader, table).file_uris()}
    got = loader.read(table).read_all()
    assert got.sort_by([("block_num", "ascending"), ("log_index", "ascending")]) == logs


# -- range predicates at the edges of the column's type ------------------------------------------------------

UINT64_EDGES = [0, 1, 2**53 + 1, 2**63 - 2, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1]
INT64_EDGES = [0, 1, 2**53 + 1, 2**63 - 2, 2**63 - 1]


@pytest.mark.parametrize("kind", [pa.uint64(), pa.int64()], ids=str)
def test_range_predicates_are_exact_at_the_edges_with_one_file_per_value(loader, kind):
    # one file per value, so that deltalake decides file by file which to skip, rewrite or drop whole
    edges = UINT64_EDGES if kind == pa.uint64() else INT64_EDGES
    table = TableRef("edges")
    rows = pa.table({"_block_num": pa.array(edges, kind), "v": pa.array(range(len(edges)), pa.int64())})
    loader.ensure_table(table, rows.schema)
    for i in range(len(edges)):
        loader.write(table, rows.slice(i, 1))
    assert len(_table(loader, table).file_uris()) == len(edges)

    def blocks(rows: RowRange | None = None) -> list[int]:
        return sorted(loader.read(table, rows).read_all()["_block_num"].to_pylist())

    top = edges[-1]
    ranges = [RowRange(0, 0), RowRange(2**53, 2**53 + 1), RowRange(2**63 - 2, 2**63 - 2), RowRange(top), RowRange(1)]
    if kind == pa.uint64():
        ranges += [RowRange(2**63 - 1, 2**63), RowRange(2**63), RowRange(1, 2**63 - 2)]
    for rng in ranges:
        assert blocks(rng) == [b for b in edges if rng.contains(b)], f"read {rng}"

    cut = [RowRange(2**53 + 1, 2**53 + 1), RowRange(top)]
    cut += [RowRange(2**63 - 1, 2**63)] if kind == pa.uint64() else []
    left = list(edges)
    for rng in cut:
        assert loader.delete(table, rng) == sum(rng.contains(b) for b in left), f"delete {rng}"
        left = [b for b in left if not rng.contains(b)]
        assert blocks() == left, f"delete {rng}"

    again = RowRange(2**63 - 2, 2**63 - 1)
    new = rows.filter(pc.is_in(rows["_block_num"], pa.array([2**63 - 2, 2**63 - 1], kind)))
    loader.write(table, new.set_column(1, "v", pa.array([100, 101], pa.int64())), replace=again)
    got = loader.read(table).read_all().sort_by("_block_num")
    assert got["_block_num"].to_pylist() == sorted({*left, 2**63 - 2, 2**63 - 1})
    assert {b: v for b, v in zip(got["_block_num"].to_pylist(), got["v"].to_pylist(), strict=True)}[2**63 - 1] == 101
    assert pc.sum(pc.greater_equal(got["v"], 100)).as_py() == 2


def test_a_range_beyond_an_int64_column_is_refused_before_any_change(loader):
    table = TableRef("cursor", range_column="cursor")
    rows = pa.table({"cursor": pa.array([1, 2**63 - 1], pa.int64()), "v": pa.array([1, 2], pa.int64())})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    too_far = RowRange(2**63)
    for call in (
        lambda: loader.delete(table, too_far),
        lambda: loader.read(table, too_far),
        lambda: loader.write(table, rows.slice(0, 0), replace=too_far),
    ):
        with pytest.raises(TerminalError, match=r"'cursor' \(int64\).*9223372036854775808 lies outside"):
            call()
    assert _version(loader, table) == 1
    assert loader.read(table).read_all()["cursor"].to_pylist() == [1, 2**63 - 1]


def test_a_duplicated_range_column_is_refused_on_every_path(loader):
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 2)
    twice = pa.Table.from_arrays([*logs.columns, logs["_block_num"]], names=[*logs.schema.names, "_block_num"])
    with pytest.raises(SchemaMismatchError, match=r"more than one column named '_block_num'"):
        loader.ensure_table(TableRef("fresh"), twice.schema)
    assert not loader.path(TableRef("fresh")).exists()
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    for call in (
        lambda: loader.ensure_table(table, twice.schema),
        lambda: loader.write(table, twice),
        lambda: loader.write(table, twice, replace=RowRange(0, 2)),
        lambda: loader.upsert(table, twice),
        lambda: loader.replace_table(table, twice),
    ):
        with pytest.raises(
            SchemaMismatchError, match=r"Delta Lake table logs.*more than one column named '_block_num'"
        ):
            call()
    assert _version(loader, table) == 1
    assert loader.read(table).read_all().num_rows == logs.num_rows


def test_wide_decimals_get_no_file_statistics_and_the_rest_do(loader):
    # deltalake passes a decimal's min/max through a double: above 2**53 they are rounded, above 2**63-1 clamped
    table = TableRef("stats")
    rows = pa.table({"_block_num": pa.array([2**63 + 1], pa.uint64()), "v": pa.array([7], pa.int64())})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    stats = json.loads(_commit(loader, table)[0][0]["stats"])
    assert stats["minValues"] == {"v": 7}
    wider = rows.append_column(pa.field("amount", pa.uint64()), pa.array([5], pa.uint64()))
    wider = wider.append_column(pa.field("n", pa.uint32()), pa.array([3], pa.uint32()))
    loader.ensure_table(table, wider.schema)
    loader.write(table, wider)
    stats = json.loads(_commit(loader, table)[0][0]["stats"])
    assert stats["minValues"] == {"v": 7, "n": 3}
    assert _table(loader, table).metadata().configuration["delta.dataSkippingStatsColumns"] == "`v`,`n`"


# -- layout: a replace rewrites the files of its range only ------------------------------------------------


def test_a_small_replace_in_a_big_table_rewrites_only_a_small_share_of_it(tmp_path):
    loader = DeltaLoader(tmp_path, target_file_size=256 * 1024, max_row_group_size=8192)
    table = TableRef("big")
    rows = pa.table({"_block_num": pa.array(np.arange(200_000), pa.uint64()), "v": pa.array(np.arange(200_000))})
    loader.ensure_table(table, rows.schema)
    assert loader.write(table, data.in_batches(rows, 65_536)).commits == 1  # in block order, as amp sends them
    files = _table(loader, table).file_uris()
    total = sum(os.path.getsize(uri) for uri in files)

    small = RowRange(123_000, 123_009)
    new = pa.table({"_block_num": pa.array(range(123_000, 123_010), pa.uint64()), "v": pa.array([-1] * 10)})
    loader.write(table, new, replace=small)
    added, removed = _commit(loader, table)
    assert len(files) >= 8
    assert (len(added), len(removed)) == (1, 1), "only the file holding the range is rewritten"
    assert removed[0]["size"] * 4 <= total
    got = loader.read(table).read_all()
    assert got.num_rows == 200_000 and pc.sum(pc.equal(got["v"], -1)).as_py() == 10
    assert sorted(loader.read(table, small).read_all()["v"].to_pylist()) == [-1] * 10


def test_a_table_made_before_the_statistics_list_gets_it_and_stays_exact(loader):
    table = TableRef("old")
    rows = pa.table({"_block_num": pa.array([1, 2, 2**63 + 5], pa.uint64()), "v": pa.array([1, 2, 3], pa.int64())})
    # what earlier versions made: no partitions, no statistics list, the Arrow fields in the metadata
    fields = [
        pa.field(f.name, portable_type(f.type, f.name, **DELTA), f.nullable).with_metadata(
            {ARROW_KEY: schema_to_text(pa.schema([f]))}
        )
        for f in rows.schema
    ]
    loader.path(table).mkdir(parents=True)
    DeltaTable.create(str(loader.path(table)), pa.schema(fields))
    loader.ensure_table(table, rows.schema)  # adds the statistics list: one commit
    assert _table(loader, table).metadata().configuration == {"delta.dataSkippingStatsColumns": "`v`"}
    loader.write(table, rows)
    loader.write(table, rows.slice(1, 1), replace=RowRange(2, 2**63 + 4))
    assert loader.delete(table, RowRange(2**63 + 5)) == 1
    got = loader.read(table, RowRange(0, 10)).read_all().sort_by("v")
    assert got.to_pydict() == {"_block_num": [1, 2], "v": [1, 2]}
    loader.replace_table(table, rows)
    assert loader.read(table).read_all().sort_by("v") == rows


def test_settings_that_cannot_work_are_named():
    for setting, message in (
        ({"vacuum_every": -1}, "vacuum_every must be an integer >= 0"),
        ({"retention_hours": 1.5}, "retention_hours must be an integer >= 0"),
        ({"compact_files": "8"}, "compact_files must be an integer >= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            DeltaLoader("/tmp/amp_dagster_unused", **setting)


# -- upkeep: vacuum and compaction after commits -----------------------------------------------------------------


@pytest.mark.slow
def test_a_hundred_small_range_replaces_keep_the_table_within_twice_its_size(tmp_path):
    loader = DeltaLoader(tmp_path)  # the default policy
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 199)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    starts = np.random.default_rng(3).integers(0, 195, size=100)
    expected = logs
    for i, start in enumerate(starts.tolist()):
        new = data.logs(start, start + 4, seed=i + 2)
        loader.write(table, new, replace=RowRange(start, start + 4))
        block = expected["_block_num"]
        outside = pc.or_(pc.less(block, start), pc.greater(block, start + 4))
        expected = pa.concat_tables([expected.filter(outside), new])
        # the upkeep of this replace may not have run yet, but that of every earlier one has
        waiting = _size(_data_files(loader, table)) - _live_bytes(loader, table)
        assert waiting <= sum(r["size"] for r in _commit(loader, table)[1]), f"replace {i}"
    loader.close()
    assert _bytes_on_disk(loader, table) <= 2 * _live_bytes(loader, table), "the whole directory, Delta log included"
    assert _files_on_disk(loader, table) == {os.path.basename(u) for u in _table(loader, table).file_uris()}
    order = [("_block_num", "ascending"), ("log_index", "ascending")]
    assert loader.read(table).read_all().sort_by(order) == expected.sort_by(order)


def test_replaced_files_stay_for_the_retention_and_go_after_it(tmp_path):
    loader = DeltaLoader(tmp_path, retention_hours=1)
    table = TableRef("t")
    rows = pa.table({"_block_num": pa.array(range(100), pa.uint64()), "v": pa.array(range(100), pa.int64())})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    loader.write(table, rows.slice(0, 10), replace=RowRange(0, 9))
    loader.close()
    assert len(_files_on_disk(loader, table)) == 2  # the replaced one is kept for an hour
    assert len(loader.vacuum(table, retention_hours=0)) == 1
    assert _files_on_disk(loader, table) == {os.path.basename(u) for u in _table(loader, table).file_uris()}


def test_upkeep_keeps_the_files_of_a_read_in_progress(tmp_path):
    loader = DeltaLoader(tmp_path)
    table = TableRef("t")
    rows = pa.table({"_block_num": pa.array(range(3000), pa.uint64()), "v": pa.array(range(3000), pa.int64())})
    loader.ensure_table(table, rows.schema)
    for start in range(0, 3000, 100):  # 30 files
        loader.write(table, rows.slice(start, 100))
    started = _files_on_disk(loader, table)
    reader = loader.read(table)
    loader.write(table, rows.set_column(1, "v", pa.array([-1] * 3000)), replace=RowRange(0))  # every file replaced
    loader.close()  # the upkeep ran
    assert loader.vacuum(table) == []
    assert started <= _files_on_disk(loader, table), "the files of the version being read stay"
    got = reader.read_all()
    assert got.num_rows == 3000 and pc.min(got["v"]).as_py() == 0, "the reader sees the version it started on"
    assert len(loader.vacuum(table)) == 30  # released once read
    assert _files_on_disk(loader, table) == {os.path.basename(u) for u in _table(loader, table).file_uris()}
    loader.read(table)  # a reader dropped unread releases its version too
    loader.write(table, rows, replace=RowRange(0))
    loader.close()
    assert _files_on_disk(loader, table) == {os.path.basename(u) for u in _table(loader, table).file_uris()}


def test_a_read_whose_files_another_process_vacuumed_is_transient(tmp_path):
    loader = DeltaLoader(tmp_path, vacuum_every=0)
    table = TableRef("t")
    rows = pa.table({"_block_num": pa.array(range(3000), pa.uint64()), "v": pa.array(range(3000), pa.int64())})
    loader.ensure_table(table, rows.schema)
    for start in range(0, 3000, 100):
        loader.write(table, rows.slice(start, 100))
    reader = loader.read(table)
    loader.write(table, rows, replace=RowRange(0))
    live = {os.path.basename(u) for u in _table(loader, table).file_uris()}
    for path in _data_files(loader, table):  # what a vacuum elsewhere, which knows no pins here, does
        if path.name not in live:
            path.unlink()
    with pytest.raises(TransientError, match=r"read failed: a file it read, .*, was replaced and vacuumed"):
        reader.read_all()
    assert loader.read(table).read_all().num_rows == 3000


def test_small_files_are_compacted_after_the_writes(tmp_path):
    loader = DeltaLoader(tmp_path, compact_files=4)
    table = TableRef("t")
    rows = pa.table({"_block_num": pa.array(range(400), pa.uint64()), "v": pa.array(range(400), pa.int64())})
    loader.ensure_table(table, rows.schema)
    for start in range(0, 400, 10):  # 40 small appends
        loader.write(table, rows.slice(start, 10))
    loader.close()
    stored = _table(loader, table)
    assert "OPTIMIZE" in {h["operation"] for h in stored.history()}
    assert len(stored.file_uris()) < 4
    assert _files_on_disk(loader, table) == {os.path.basename(u) for u in stored.file_uris()}, "and vacuumed"
    assert loader.read(table).read_all().sort_by("_block_num") == rows
