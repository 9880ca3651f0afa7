"""Iceberg-specific behaviour: commits and snapshots per call, the type map at its edges, both SQL catalogs."""

from __future__ import annotations

import os
import re
import time
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from amp_dagster.errors import AuthenticationError, ConfigError, SchemaMismatchError, TerminalError
from amp_dagster.loaders import pyiceberg_fix
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.iceberg import IcebergLoader
from amp_dagster.ranges import RowRange
from amp_dagster.retry import RetryPolicy

from . import data, services

LOG_KEY = ("block_num", "log_index")
SORT_LOGS = [("block_num", "ascending"), ("log_index", "ascending")]


@pytest.fixture
def loader(tmp_path):
    with IcebergLoader(tmp_path / "warehouse", chunk_rows=500) as ice:
        yield ice


def _table(loader: IcebergLoader, ref: TableRef):
    return loader.catalog.load_table((ref.namespace, ref.name))


def _commits(loader: IcebergLoader, ref: TableRef) -> int:
    """Catalog commits so far: every commit writes one metadata file and logs the previous one."""
    return len(_table(loader, ref).metadata.metadata_log) + 1


def _data_files(loader: IcebergLoader, ref: TableRef) -> set[str]:
    root = Path(_table(loader, ref).location()) / "data"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def test_one_commit_and_one_snapshot_per_write(loader):
    ref = TableRef("logs", namespace="eth", key=LOG_KEY)
    logs = data.logs(0, 199)  # ~5,500 rows: more than ten 500-row chunks
    loader.ensure_table(ref, logs.schema)
    commits = _commits(loader, ref)

    result = loader.write(ref, data.in_batches(logs, 97))
    assert (result.rows, result.commits, result.extra["snapshots"]) == (logs.num_rows, 1, 1)
    tbl = _table(loader, ref)
    assert _commits(loader, ref) == commits + 1
    assert [s.summary.operation.value for s in tbl.snapshots()] == ["append"]
    assert int(tbl.current_snapshot().summary["added-data-files"]) == pytest.approx(logs.num_rows / 500, abs=2)

    # a range replace: deletes and the append, one commit
    forked = data.logs(100, 199, seed=2)
    result = loader.write(ref, data.in_batches(forked, 97), replace=RowRange(100, 199))
    assert result.commits == 1 and _commits(loader, ref) == commits + 2
    assert _table(loader, ref).current_snapshot().summary.operation.value == "append"
    got = loader.read(ref).read_all()
    want = pa.concat_tables([logs.filter(pc.less(logs["_block_num"], 100)), forked])
    assert got.sort_by(SORT_LOGS).equals(want.sort_by(SORT_LOGS))


def test_empty_writes_and_deletes_of_nothing_commit_nothing(loader):
    ref = TableRef("logs", namespace="eth")
    logs = data.logs(0, 9)
    loader.ensure_table(ref, logs.schema)
    loader.write(ref, logs)
    commits = _commits(loader, ref)
    assert loader.write(ref, logs.slice(0, 0)).commits == 0
    assert loader.write(ref, logs.slice(0, 0), replace=RowRange(500, 600)).commits == 0
    assert loader.delete(ref, RowRange(1_000)) == 0
    assert _commits(loader, ref) == commits
    assert loader.delete(ref, RowRange(5)) == logs.filter(pc.greater_equal(logs["_block_num"], 5)).num_rows


def test_type_map_and_exact_round_trip(loader):
    ref = TableRef("types", namespace="edge")
    original = data.every_type()
    loader.ensure_table(ref, original.schema)
    loader.write(ref, original)
    iceberg = {f.name: (str(f.field_type), f.required) for f in _table(loader, ref).schema().fields}
    assert iceberg["_block_num"] == ("decimal(20, 0)", True)
    assert iceberg["u64"][0] == "decimal(20, 0)" and iceberg["u32"][0] == "long" and iceberg["i32"][0] == "int"
    assert iceberg["hash"][0] == "fixed[32]" and iceberg["address"][0] == "fixed[20]" and iceberg["blob"][0] == "binary"
    assert iceberg["ts"][0] == "timestamptz" and iceberg["amount"][0] == "decimal(38, 0)"
    assert iceberg["hashes"][0].startswith("list<fixed[32]>") and "struct<" in iceberg["access_list"][0]

    # plain pyiceberg sees the exact values in Iceberg types
    raw = _table(loader, ref).scan().to_arrow().sort_by("_block_num")
    assert raw["u64"].to_pylist() == [Decimal(0), Decimal(data.UINT64_MAX), None, Decimal(2**63)]
    assert raw["u32"].to_pylist() == [0, 2**32 - 1, None, 7]
    assert raw["ts"].type == pa.timestamp("us", "UTC")

    # and the loader gives the original Arrow types back, value for value
    got = loader.read(ref).read_all().sort_by("_block_num")
    assert got.schema == original.schema
    assert got.equals(original)


def test_a_null_list_of_structs_is_stored_as_null(loader):
    """pyiceberg 0.12 writes it as [] (iceberg-python#3833); the file itself must hold the null."""
    ref = TableRef("types", namespace="edge")
    loader.ensure_table(ref, data.EVERY_TYPE)
    loader.write(ref, data.every_type())
    files = [task.file.file_path for task in _table(loader, ref).scan().plan_files()]
    stored = pa.concat_tables([pq.read_table(f, columns=["_block_num", "access_list"]) for f in files])
    by_block = dict(zip(stored["_block_num"].to_pylist(), stored["access_list"].to_pylist(), strict=True))
    assert by_block[Decimal(2)] is None and by_block[Decimal(1)] == []


def test_canary_pyiceberg_itself_still_loses_null_lists_of_structs(loader, monkeypatch):
    """When this fails, pyiceberg keeps the nulls itself: delete loaders/pyiceberg_fix.py."""
    from pyiceberg.io.pyarrow import ArrowProjectionVisitor

    monkeypatch.setattr(ArrowProjectionVisitor, "list", pyiceberg_fix.install())
    column = pa.list_(pa.struct([("a", pa.int64())]))
    rows = pa.table({"l": pa.array([None, [{"a": 1}]], column)})
    loader.catalog.create_namespace_if_not_exists("plain")
    tbl = loader.catalog.create_table(("plain", "lists"), schema=rows.schema)
    tbl.append(rows)
    stored = pq.read_table(next(iter(tbl.scan().plan_files())).file.file_path)
    assert stored["l"].to_pylist() == [[], [{"a": 1}]]


def test_nanoseconds_fail_unless_truncation_is_asked_for(tmp_path):
    ts = pa.timestamp("ns", tz="+00:00")
    schema = pa.schema([pa.field("_block_num", pa.uint64()), pa.field("at", ts)])
    whole = pa.table({"_block_num": [1], "at": pa.array([1_700_000_000_123_456_000], ts)}, schema=schema)
    sub = pa.table({"_block_num": [2], "at": pa.array([1_700_000_000_123_456_789], ts)}, schema=schema)
    ref = TableRef("times", namespace="edge")
    with IcebergLoader(tmp_path / "w") as loader:
        loader.ensure_table(ref, schema)
        loader.write(ref, whole)
        with pytest.raises(TerminalError, match=r"'at' has nanoseconds.*truncate_timestamps=True"):
            loader.write(ref, sub)
        assert loader.read(ref).read_all().equals(whole)
    with IcebergLoader(tmp_path / "w", truncate_timestamps=True) as loader:
        loader.write(ref, sub)
        got = loader.read(ref, RowRange(2, 2)).read_all()
        assert got["at"].type == ts and got["at"].cast(pa.int64()).to_pylist() == [1_700_000_000_123_456_000]


def test_schema_evolution_then_a_full_refresh_in_a_new_shape(loader):
    ref = TableRef("logs", namespace="eth", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(ref, logs.schema)
    loader.write(ref, logs)
    wider = logs.append_column(pa.field("note", pa.string()), pa.array(["n"] * logs.num_rows))
    loader.ensure_table(ref, wider.schema)
    assert not _table(loader, ref).schema().find_field("note").required
    first = _table(loader, ref).current_snapshot().snapshot_id

    # a full refresh whose columns changed type, went away and appeared: one commit, old snapshot kept
    reshaped = wider.drop_columns(["topic3"])
    reshaped = reshaped.set_column(
        reshaped.schema.get_field_index("data"), pa.field("data", pa.string(), False), pa.array(["d"] * logs.num_rows)
    )
    reshaped = reshaped.append_column(pa.field("extra", pa.int32(), False), pa.array([7] * logs.num_rows, pa.int32()))
    commits = _commits(loader, ref)
    assert loader.replace_table(ref, data.in_batches(reshaped, 50)).commits == 1
    assert _commits(loader, ref) == commits + 1
    got = loader.read(ref).read_all()
    assert got.schema == reshaped.schema
    assert got.sort_by(SORT_LOGS).equals(reshaped.sort_by(SORT_LOGS))
    old = _table(loader, ref).scan(snapshot_id=first).to_arrow()
    assert old.num_rows == logs.num_rows and "topic3" in old.column_names
    binary = reshaped.set_column(reshaped.schema.get_field_index("data"), logs.schema.field("data"), logs["data"])
    with pytest.raises(SchemaMismatchError, match="'data' is string in the table but binary in the data"):
        loader.write(ref, binary)


def test_a_failed_write_leaves_no_snapshot_and_no_files(loader):
    ref = TableRef("logs", namespace="eth")
    logs = data.logs(0, 99)
    loader.ensure_table(ref, logs.schema)
    loader.write(ref, logs.slice(0, 100))
    files, snapshots = _data_files(loader, ref), len(_table(loader, ref).snapshots())

    def dying():
        yield from logs.to_batches(max_chunksize=300)[:6]  # several 500-row files written by then
        raise RuntimeError("the source failed mid-write")

    for attempt in (loader.write, loader.replace_table):
        with pytest.raises(RuntimeError, match="mid-write"):
            attempt(ref, pa.RecordBatchReader.from_batches(logs.schema, dying()))
    assert _data_files(loader, ref) == files
    assert len(_table(loader, ref).snapshots()) == snapshots
    assert loader.read(ref).read_all().equals(logs.slice(0, 100))


def test_a_failed_first_full_refresh_leaves_no_table(loader, tmp_path):
    ref = TableRef("fresh", namespace="eth")
    logs = data.logs(0, 99)

    def dying():
        yield from logs.to_batches(max_chunksize=300)[:6]  # several 500-row files written by then
        raise RuntimeError("the source failed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        loader.replace_table(ref, pa.RecordBatchReader.from_batches(logs.schema, dying()))
    assert not loader.catalog.table_exists((ref.namespace, ref.name))
    assert list((tmp_path / "warehouse").rglob("*.parquet")) == []
    assert loader.replace_table(ref, data.in_batches(logs, 300)).commits == 1
    assert loader.read(ref).read_all().sort_by(SORT_LOGS).equals(logs.sort_by(SORT_LOGS))
    assert len(_table(loader, ref).snapshots()) == 1


@pytest.mark.parametrize(("range_column", "key"), [("blk.num", ()), ("b", ("log.index",))])
def test_a_dot_in_a_range_or_key_column_is_refused(loader, range_column, key):
    ref = TableRef("dotted", namespace="eth", range_column=range_column, key=key)
    rows = pa.table({"blk.num": pa.array([1], pa.uint64()), "b": pa.array([1]), "log.index": pa.array([0])})
    dotted = repr(range_column if "." in range_column else key[0])
    with pytest.raises(SchemaMismatchError, match=rf"column {re.escape(dotted)} has a '\.'.*Rename"):
        loader.ensure_table(ref, rows.schema)
    with pytest.raises(SchemaMismatchError, match=re.escape(dotted)):
        loader.replace_table(ref, rows)
    assert not loader.catalog.table_exists((ref.namespace, ref.name))


def test_a_range_beyond_the_range_column_type_is_refused_on_read_and_delete(loader):
    ref = TableRef("small", namespace="eth")
    rows = pa.table({"_block_num": pa.array([1, 2, 2**32 - 1], pa.uint32()), "v": pa.array([1, 2, 3], pa.int64())})
    loader.ensure_table(ref, rows.schema)
    loader.write(ref, rows)
    snapshots = len(_table(loader, ref).snapshots())
    for call in (lambda: loader.read(ref, RowRange(2**32)), lambda: loader.delete(ref, RowRange(5, 2**32))):
        with pytest.raises(TerminalError, match=r"'_block_num' \(uint32\).*4294967296 lies outside 0..=4294967295"):
            call()
    assert len(_table(loader, ref).snapshots()) == snapshots
    assert loader.read(ref, RowRange(2, 2**32 - 1)).read_all()["_block_num"].to_pylist() == [2, 2**32 - 1]
    # a table another engine made (no Arrow schema kept with it): its Iceberg types bound the range
    loader.catalog.create_table(
        ("eth", "theirs"),
        schema=pa.schema([("_block_num", pa.int64()), ("amount", pa.decimal128(20, 0)), ("note", pa.string())]),
    )
    theirs = TableRef("theirs", namespace="eth")
    with pytest.raises(TerminalError, match=r"'_block_num' \(int64\).*9223372036854775808 lies outside"):
        loader.delete(theirs, RowRange(2**63))
    assert loader.delete(TableRef("theirs", namespace="eth", range_column="amount"), RowRange(2**64 - 1)) == 0
    with pytest.raises(SchemaMismatchError, match=r"range column 'note' is large_string, not an integer type"):
        loader.delete(TableRef("theirs", namespace="eth", range_column="note"), RowRange(0))
    with pytest.raises(SchemaMismatchError, match=r"has no column 'nope' to select rows by range"):
        loader.read(TableRef("theirs", namespace="eth", range_column="nope"), RowRange(0))


def test_a_delete_that_lost_a_race_is_retried(tmp_path, monkeypatch):
    ref = TableRef("logs", namespace="eth")
    logs = data.logs(0, 99)
    loader = IcebergLoader(tmp_path / "w", retry=RetryPolicy(attempts=3, initial_delay=0.001))
    loader.ensure_table(ref, logs.schema)
    loader.write(ref, logs.filter(pc.less(logs["_block_num"], 50)))
    loaded, load = [], loader._load

    def stale(table: TableRef, **kw):
        tbl = load(table, **kw)
        if not loaded:  # another writer commits after we loaded the table: our commit must fail, then retry
            with IcebergLoader(tmp_path / "w") as other:
                other.write(ref, logs.filter(pc.greater_equal(logs["_block_num"], 50)))
        loaded.append(tbl)
        return tbl

    monkeypatch.setattr(loader, "_load", stale)
    deleted = loader.delete(ref, RowRange(40))
    assert len(loaded) == 2
    kept = logs.filter(pc.less(logs["_block_num"], 40))
    assert deleted == logs.num_rows - kept.num_rows
    assert loader.read(ref).read_all().sort_by(SORT_LOGS).equals(kept.sort_by(SORT_LOGS))
    loader.close()


def test_file_errors_are_typed_errors_naming_the_table(loader):
    ref = TableRef("logs", namespace="eth")
    loader.ensure_table(ref, data.logs(0, 9).schema)
    loader.write(ref, data.logs(0, 9))
    for task in _table(loader, ref).scan().plan_files():
        os.remove(task.file.file_path)
    with pytest.raises(TerminalError, match=r"Iceberg catalog sqlite:.* table eth\.logs: FileNotFoundError"):
        loader.read(ref).read_all()
    data_dir = Path(_table(loader, ref).location()) / "data"
    for path in data_dir.iterdir():
        path.unlink()
    data_dir.rmdir()
    data_dir.write_text("a file where the data directory should be")
    with pytest.raises(TerminalError, match=r"table eth\.logs: FileExistsError.*non-directory"):
        loader.write(ref, data.logs(0, 9))


def test_where_names_the_catalog_without_credentials(tmp_path):
    rest = IcebergLoader(catalog={"type": "rest", "uri": "https://me:pw@catalog.example.com/api", "token": "t0k"})
    assert rest.where == "https://catalog.example.com/api"
    pg = IcebergLoader(tmp_path, uri="postgresql+psycopg://me:pw@db.example.com/iceberg")
    assert pg.where == "db.example.com:5432/iceberg"
    assert IcebergLoader(tmp_path).where == f"sqlite:{tmp_path / 'catalog.db'}"


def test_upsert_across_chunks_keeps_the_last_row_of_each_key(loader):
    ref = TableRef("logs", namespace="eth", key=LOG_KEY)
    logs = data.logs(0, 49)  # ~1,400 rows: three chunks of 500
    loader.ensure_table(ref, logs.schema)
    loader.write(ref, logs)
    first, last = logs.slice(0, 10), logs.slice(0, 10)
    first = first.set_column(12, logs.schema.field("data"), pa.array([b"first"] * 10))
    last = last.set_column(12, logs.schema.field("data"), pa.array([b"last"] * 10))
    batches = [*first.to_batches(), *logs.slice(10, 990).to_batches(max_chunksize=500), *last.to_batches()]
    result = loader.upsert(ref, pa.RecordBatchReader.from_batches(logs.schema, batches))
    assert result.commits == 1
    got = loader.read(ref).read_all().sort_by(SORT_LOGS)
    assert got.num_rows == logs.num_rows
    assert got["data"].to_pylist()[:10] == [b"last"] * 10
    assert got.slice(10).equals(logs.sort_by(SORT_LOGS).slice(10))


def test_identifiers_never_become_paths(tmp_path):
    ref = TableRef("../../escape; rm -rf /", namespace="ns/'\"; --")
    rows = pa.table({"_block_num": pa.array([1, 2], pa.uint64()), "v": ["a", "b"]})
    with IcebergLoader(tmp_path / "warehouse") as loader:
        loader.ensure_table(ref, rows.schema)
        loader.write(ref, rows)
        assert loader.read(ref).read_all().equals(rows)
        assert loader.catalog.list_tables((ref.namespace,)) == [(ref.namespace, ref.name)]
        # a dot nests namespaces in Iceberg's SQL catalog; an empty level is refused before anything is created
        nested = TableRef("t.with.dots", namespace="eth.mainnet")
        loader.ensure_table(nested, rows.schema)
        loader.write(nested, rows)
        assert loader.catalog.list_tables(("eth", "mainnet")) == [("eth", "mainnet", "t.with.dots")]
        with pytest.raises(TerminalError, match=r"namespace '\.\./up' has an empty level"):
            loader.ensure_table(TableRef("t", namespace="../up"), rows.schema)
    assert sorted(os.listdir(tmp_path)) == ["warehouse"]
    assert sorted(os.listdir(tmp_path / "warehouse")) == ["catalog.db", "eth_mainnet.db", "ns_--.db"]


def test_catalog_properties_instead_of_a_warehouse(tmp_path):
    (tmp_path / "w").mkdir()
    props = {"type": "sql", "uri": f"sqlite:///{tmp_path / 'cat.db'}", "warehouse": str(tmp_path / "w")}
    ref = TableRef("items", range_column="cursor")
    with IcebergLoader(catalog=props) as loader:
        loader.ensure_table(ref, data.cursor_rows(0, 1).schema)
        loader.write(ref, data.cursor_rows(0, 10))
        assert loader.catalog.list_tables(("default",)) == [("default", "items")]
    with IcebergLoader(catalog=props) as again:
        assert again.read(ref, RowRange(5)).read_all().equals(data.cursor_rows(5, 5))


@pytest.fixture
def pg_catalog():
    services.require_postgres()
    name = f"amp_t_{uuid.uuid4().hex[:10]}"  # SQL catalogs keep catalogs apart by name in shared tables
    yield name
    with psycopg.connect(services.POSTGRES_DSN, autocommit=True) as conn:
        for table in ("iceberg_tables", "iceberg_namespace_properties"):
            conn.execute(f"DELETE FROM {table} WHERE catalog_name = %s", (name,))


def test_postgresql_catalog_end_to_end(tmp_path, pg_catalog):
    ref = TableRef("logs", namespace="eth", key=LOG_KEY)
    logs, forked = data.logs(0, 59), data.logs(20, 39, seed=2)
    with IcebergLoader(tmp_path / "w", uri=services.POSTGRES_DSN, name=pg_catalog) as loader:
        loader.ensure_table(ref, logs.schema)
        loader.write(ref, data.in_batches(logs, 100))
        loader.write(ref, forked, replace=RowRange(20, 39))
        assert loader.delete(ref, RowRange(50)) == logs.filter(pc.greater_equal(logs["_block_num"], 50)).num_rows
        changed = data.logs(45, 54)
        changed = changed.set_column(12, logs.schema.field("data"), pa.array([b"changed"] * changed.num_rows))
        loader.upsert(ref, changed)
    with psycopg.connect(services.POSTGRES_DSN) as conn:
        rows = conn.execute(
            "SELECT table_namespace, table_name FROM iceberg_tables WHERE catalog_name = %s", (pg_catalog,)
        ).fetchall()
    assert rows == [("eth", "logs")]
    block = logs["_block_num"]
    keep = pc.or_(pc.less(block, 20), pc.and_(pc.greater(block, 39), pc.less(block, 45)))
    want = pa.concat_tables([logs.filter(keep), forked, changed]).sort_by(SORT_LOGS)
    with IcebergLoader(tmp_path / "w", uri=services.POSTGRES_DSN, name=pg_catalog) as fresh:
        assert fresh.read(ref).read_all().sort_by(SORT_LOGS).equals(want)
        fresh.replace_table(ref, data.logs(0, 4))
        assert fresh.read(ref).read_all().sort_by(SORT_LOGS).equals(data.logs(0, 4).sort_by(SORT_LOGS))


@pytest.mark.parametrize(
    ("uri", "error", "says"),
    [
        (
            "postgresql+psycopg://amp_no_such_role:s3cret-pw@127.0.0.1:5432/test",
            AuthenticationError,
            'role "amp_no_such_role" does not exist',
        ),
        ("postgresql+psycopg://127.0.0.1:5432/amp_no_such_db", ConfigError, 'database "amp_no_such_db" does not exist'),
    ],
)
def test_a_postgresql_catalog_that_refuses_the_login_fails_at_once_naming_why(tmp_path, uri, error, says):
    services.require_postgres()
    ref, rows = TableRef("t", namespace="eth"), pa.table({"_block_num": pa.array([1], pa.uint64())})
    took = []
    # one retry would sleep 3 s: a call that ends within 2 s made one attempt
    with IcebergLoader(tmp_path / "w", uri=uri, retry=RetryPolicy(attempts=2, initial_delay=3, jitter=False)) as ice:
        for call in (
            lambda: ice.ensure_table(ref, rows.schema),
            lambda: ice.write(ref, rows),
            lambda: ice.delete(ref, RowRange(0)),
            lambda: ice.read(ref),
        ):
            started = time.monotonic()
            with pytest.raises(error, match=says) as caught:
                call()
            took.append(time.monotonic() - started)
            assert "s3cret-pw" not in str(caught.value)
    assert max(took[1:]) < 2, f"a refused login is not retried (the first call also imports the catalog): {took}"


def test_the_fix_is_installed_by_the_first_loader_not_by_the_import():
    import subprocess
    import sys

    script = (
        "from pyiceberg.io.pyarrow import ArrowProjectionVisitor as V\n"
        "original = V.list\n"
        "import amp_dagster.loaders.iceberg as m\n"
        "assert V.list is original, 'importing the module must not patch pyiceberg'\n"
        "import tempfile\n"
        "m.IcebergLoader(tempfile.mkdtemp())\n"
        "assert V.list is not original, 'building a loader installs the fix'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
