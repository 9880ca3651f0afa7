"""LMDB loader and its row codec: round-trips at the edges, key order, index consistency, lookups, a full map,
writemap and crashes, paths; and the atomicity cases of the contract suite again without writemap."""

from __future__ import annotations

import datetime as dt
import json
import resource
import signal
import subprocess
import sys
from decimal import Decimal

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from amp_dagster.errors import SchemaMismatchError, TerminalError, TransientError
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.lmdb import LmdbLoader
from amp_dagster.loaders.rowcodec import RowCodec, iter_values, ordered_keys
from amp_dagster.ranges import RowRange

from . import data
from . import test_loader_contract as contract
from .stores.lmdb import LmdbHarness

LOG_KEY = ("block_num", "log_index")
SORT_LOGS = [("block_num", "ascending"), ("log_index", "ascending")]

# -- the row codec --------------------------------------------------------------------------------------------

ITEM = pa.field("item", pa.int32(), nullable=True)
POINT = pa.struct([pa.field("x", pa.int16()), pa.field("tag", pa.string()), pa.field("raw", pa.binary(), False)])
EDGES = pa.schema(
    [
        pa.field("i8", pa.int8()),
        pa.field("u16", pa.uint16()),
        pa.field("f16", pa.float16()),
        pa.field("f32", pa.float32()),
        pa.field("d32", pa.date32()),
        pa.field("d64", pa.date64()),
        pa.field("t32", pa.time32("ms")),
        pa.field("t64", pa.time64("ns")),
        pa.field("dur", pa.duration("us")),
        pa.field("ts_naive", pa.timestamp("s")),
        pa.field("dec256", pa.decimal256(76, 10)),
        pa.field("dec_scaled", pa.decimal128(10, 4)),
        pa.field("none", pa.null()),
        pa.field("large_s", pa.large_string()),
        pa.field("large_b", pa.large_binary()),
        pa.field("view_s", pa.string_view()),
        pa.field("view_b", pa.binary_view()),
        pa.field("dict", pa.dictionary(pa.int32(), pa.string())),
        pa.field("nullable_items", pa.list_(ITEM)),
        pa.field("large_list", pa.large_list(pa.string())),
        pa.field("fixed_list", pa.list_(pa.int64(), 2)),
        pa.field("nested", pa.list_(pa.list_(pa.string()))),
        pa.field("point", POINT),
        pa.field("deep", pa.struct([pa.field("inner", POINT), pa.field("points", pa.list_(POINT))])),
    ]
)


def edge_rows() -> pa.Table:
    point = {"x": -(2**15), "tag": "ünï\x00", "raw": b"\x00" * 3}
    empty = {"x": None, "tag": None, "raw": b""}
    return pa.table(
        {
            "i8": [-128, 127, None, 0],
            "u16": [0, 65535, None, 1],
            "f16": pa.array(np.array([-0.0, np.inf, 0, -np.inf], np.float16), mask=np.array([0, 0, 1, 0], bool)),
            "f32": [-0.0, -3.4e38, None, 1e-45],
            "d32": [dt.date(1, 1, 1), dt.date(9999, 12, 31), None, dt.date(1970, 1, 1)],
            "d64": [dt.date(1900, 1, 1), dt.date(2262, 1, 1), None, dt.date(1970, 1, 2)],
            "t32": [dt.time(0), dt.time(23, 59, 59, 999000), None, dt.time(12)],
            "t64": [0, 86_400 * 10**9 - 1, None, 1],
            "dur": [-(2**63), 2**63 - 1, None, 0],
            "ts_naive": [dt.datetime(1, 1, 1), dt.datetime(9999, 12, 31, 23, 59, 59), None, dt.datetime(1970, 1, 1)],
            "dec256": [Decimal("-" + "9" * 66 + "." + "9" * 10), Decimal("9" * 66 + "." + "9" * 10), None, Decimal(0)],
            "dec_scaled": [Decimal("-999999.9999"), Decimal("0.0001"), None, Decimal("1.5")],
            "none": [None] * 4,
            "large_s": ["", "ü" * 1000, None, "x"],
            "large_b": [b"", b"\xff" * 70_000, None, b"\x00"],
            "view_s": ["short", "a string longer than twelve bytes", None, ""],
            "view_b": [b"", b"\x00" * 13, None, b"12345678901234567"],
            "dict": ["a", "b", None, "a"],
            "nullable_items": [[1, None, 3], [], None, [None]],
            "large_list": [["x", None], None, [], [""]],
            "fixed_list": [[1, 2], [-(2**63), 2**63 - 1], None, [0, 0]],
            "nested": [[["a"], [], None], [], None, [[None, ""]]],
            "point": [point, empty, None, {"x": 1, "tag": "", "raw": b"\x01"}],
            "deep": [
                {"inner": point, "points": [point, empty]},
                {"inner": None, "points": None},
                None,
                {"inner": empty, "points": []},
            ],
        },
        schema=EDGES,
    )


@pytest.mark.parametrize("make", [edge_rows, data.every_type, lambda: data.logs(0, 30)], ids=["edges", "types", "logs"])
def test_codec_round_trips_every_type_and_slice(make):
    table = make()
    codec = RowCodec(table.schema)
    batch = table.combine_chunks().to_batches()[0]
    for part in (batch, batch.slice(1, 2), batch.slice(batch.num_rows - 1), batch.slice(0, 0)):
        values = codec.encode(part)
        assert len(values) == part.num_rows
        back = codec.decode(values)
        assert back.schema == table.schema
        assert back.to_pylist() == part.to_pylist()


def test_codec_keeps_nan_and_signed_zero_bits():
    values = np.array([np.nan, -0.0, 0.0, -np.inf], np.float64)
    batch = pa.record_batch([pa.array(values)], names=["f"])
    back = RowCodec(batch.schema).decode(RowCodec(batch.schema).encode(batch)).column(0).to_numpy()
    assert back.view(np.uint64).tolist() == values.view(np.uint64).tolist()


def test_codec_values_are_compact_rows_not_ipc_streams():
    logs = data.logs(0, 50)
    values = RowCodec(logs.schema).encode(logs.combine_chunks().to_batches()[0])
    lengths = pc.binary_length(values).to_numpy()
    arrow_per_row = logs.nbytes / logs.num_rows  # offsets and validity included
    assert lengths.mean() < arrow_per_row + 8  # a bitmap byte and a length beyond Arrow's own bytes
    one_row = logs.slice(0, 1)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, one_row.schema) as writer:
        writer.write_table(one_row)
    assert lengths.max() * 3 < sink.getvalue().size
    assert not bytes(next(iter_values(values))).startswith(b"\xff\xff\xff\xff")


def test_codec_names_the_column_it_cannot_store():
    with pytest.raises(SchemaMismatchError, match="'m'"):
        RowCodec(pa.schema([("ok", pa.int64()), ("m", pa.map_(pa.string(), pa.int64()))]))
    with pytest.raises(SchemaMismatchError, match=r"'s\.u'"):
        RowCodec(pa.schema([("s", pa.struct([("u", pa.dense_union([pa.field("a", pa.int8())]))]))]))


def test_codec_refuses_nulls_in_a_not_null_column():
    schema = pa.schema([pa.field("p", POINT)])
    bad = pa.array([{"x": 1, "tag": "a", "raw": None}], POINT)
    with pytest.raises(SchemaMismatchError, match=r"'p.raw' is declared not null"):
        RowCodec(schema).encode(pa.record_batch([bad], schema=schema))


# -- ordered keys -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        pa.array([5, -1, 0, -(2**63), 2**63 - 1, 7], pa.int64()),
        pa.array([3, 0, 2**64 - 1, 2**63, 1], pa.uint64()),
        pa.array([-2.5, 0.0, -1e300, 1e-300, float("inf"), float("-inf"), 3.0], pa.float64()),
        pa.array([data.DEC_MIN, Decimal(-1), Decimal(0), data.DEC_MAX, Decimal(5)], pa.decimal128(38, 0)),
        pa.array(["b", "", "a\x00", "a", "a\x00\x00", "ab", "\x00"], pa.string()),
        pa.array([b"\x01" * 32, b"\x00" * 32, b"\xff" * 32], pa.binary(32)),
        pa.array([dt.datetime(1969, 12, 31), dt.datetime(1970, 1, 1), dt.datetime(1, 1, 1)], pa.timestamp("us")),
        pa.array([True, False, True], pa.bool_()),
    ],
    ids=["int64", "uint64", "float64", "decimal", "string", "hash", "timestamp", "bool"],
)
def test_key_bytes_sort_like_the_values(array):
    keys = [bytes(k) for k in iter_values(ordered_keys([array], ["k"]))]
    by_bytes = sorted(range(len(array)), key=keys.__getitem__)
    assert pc.take(array, pa.array(by_bytes)).to_pylist() == pc.take(array, pc.sort_indices(array)).to_pylist()
    assert len(set(keys)) == len(set(array.to_pylist()))


def test_multi_column_keys_sort_column_by_column():
    names = pa.array(["a", "a\x00", "a", "b", ""])
    nums = pa.array([2, 1, -1, 0, 5], pa.int32())
    keys = [bytes(k) for k in iter_values(ordered_keys([names, nums], ["name", "num"]))]
    got = [(names[i].as_py(), nums[i].as_py()) for i in sorted(range(5), key=keys.__getitem__)]
    assert got == sorted(zip(names.to_pylist(), nums.to_pylist(), strict=True))


def test_null_key_values_are_refused_by_name():
    with pytest.raises(TerminalError, match="key column 'log_index' holds 1 null"):
        ordered_keys([pa.array([1, None], pa.uint32())], ["log_index"])


# -- the loader -------------------------------------------------------------------------------------------------


@pytest.fixture
def loader(tmp_path):
    with LmdbLoader(tmp_path / "env") as opened:
        yield opened


def _databases(loader: LmdbLoader, table: TableRef):
    """The table's rows and index databases, opened on the loader's own environment (LMDB allows one per process)."""
    env = loader._env()
    ident = json.dumps([table.namespace, table.name], ensure_ascii=False).encode()
    return env, env.open_db(b"rows:" + ident, create=False), env.open_db(b"index:" + ident, create=False)


def _assert_index_consistent(loader: LmdbLoader, table: TableRef) -> int:
    """Every index entry points at a stored row with that range value, and every row has exactly one entry."""
    env, rows_db, index_db = _databases(loader, table)
    schema = loader.read(table).schema
    codec = RowCodec(schema)
    with env.begin() as txn:
        rows = dict(txn.cursor(rows_db).iternext())
        entries = list(txn.cursor(index_db).iternext(values=False))
    assert len(entries) == len(rows)
    width = 8  # _block_num is uint64
    assert sorted(e[width:] for e in entries) == sorted(rows)
    stored = codec.decode(pa.array([rows[entry[width:]] for entry in entries], pa.large_binary()))
    assert stored.column("_block_num").to_pylist() == [int.from_bytes(entry[:width], "big") for entry in entries]
    return len(entries)


def _changed_blocks(logs: pa.Table, block: int) -> pa.Table:
    """The same keys (block_num, log_index) moved to another _block_num: what an upsert of re-labelled rows does."""
    return logs.set_column(0, logs.schema.field(0), pa.array([block] * logs.num_rows, pa.uint64()))


def test_index_stays_consistent_through_replace_delete_and_upsert(loader):
    table = TableRef("logs", namespace="eth", key=LOG_KEY)
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    assert _assert_index_consistent(loader, table) == logs.num_rows
    loader.write(table, data.logs(0, 49, seed=3), replace=RowRange(0, 49))
    _assert_index_consistent(loader, table)
    loader.delete(table, RowRange(80))
    _assert_index_consistent(loader, table)
    moved = _changed_blocks(logs.filter(pc.equal(logs["block_num"], 60)), 500)
    loader.upsert(table, moved)
    count = _assert_index_consistent(loader, table)
    # the moved rows' old block no longer claims them: deleting it keeps them, deleting their new block removes them
    loader.delete(table, RowRange(60, 60))
    assert _assert_index_consistent(loader, table) == count
    got = loader.read(table).read_all()
    assert pc.sum(pc.equal(got["_block_num"], 500)).as_py() == moved.num_rows
    assert loader.delete(table, RowRange(500, 500)) == moved.num_rows
    assert _assert_index_consistent(loader, table) == count - moved.num_rows


def test_rows_are_stored_in_key_order(loader):
    table = TableRef("logs", key=("log_index", "block_num"))
    logs = data.logs(0, 40)
    loader.ensure_table(table, logs.schema)
    loader.write(table, data.in_batches(logs.take(np.random.default_rng(7).permutation(logs.num_rows)), 33))
    got = loader.read(table).read_all()
    want = logs.sort_by([("log_index", "ascending"), ("block_num", "ascending")])
    assert got.select(["log_index", "block_num"]).equals(want.select(["log_index", "block_num"]))


@pytest.mark.parametrize("key", [LOG_KEY, ("_block_num", "log_index"), ()], ids=["indexed", "range-led", "keyless"])
def test_read_a_range_returns_exactly_its_rows(loader, key):
    table = TableRef("logs", key=key)
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    for rows in (RowRange(10, 19), RowRange(95), RowRange(0, 0), RowRange(200), RowRange(0, 2**64 - 1)):
        got = loader.read(table, rows).read_all()
        block = logs["_block_num"].to_pylist()
        want = logs.filter(pa.array([rows.contains(b) for b in block]))
        assert got.num_rows == want.num_rows
        assert sorted(got["tx_hash"].to_pylist()) == sorted(want["tx_hash"].to_pylist())


def test_point_lookup_by_key(loader):
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 20)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    wanted = logs.take([5, 0, 17])
    keys = pa.table(
        {
            "log_index": pa.concat_arrays([wanted["log_index"].combine_chunks(), pa.array([999_999], pa.uint32())]),
            "block_num": pa.concat_arrays([wanted["block_num"].combine_chunks(), pa.array([3], pa.uint64())]),
            "ignored": pa.array(["a", "b", "c", "d"]),
        }
    )
    got = loader.get(table, keys)
    assert got.to_pylist() == wanted.to_pylist()  # in the order asked, the absent key left out
    as_int64 = keys.set_column(1, "block_num", keys["block_num"].cast(pa.int64()))
    assert loader.get(table, as_int64.to_batches()[0]).to_pylist() == wanted.to_pylist()
    with pytest.raises(SchemaMismatchError, match=r"lack key column.*'log_index'"):
        loader.get(table, keys.drop_columns(["log_index"]))
    with pytest.raises(TerminalError, match=r"'block_num' .*does not fit the table's type uint64"):
        loader.get(table, keys.set_column(1, "block_num", pa.array(["x"] * 4)))
    keyless = TableRef("nokey")
    loader.ensure_table(keyless, logs.schema)
    with pytest.raises(TerminalError, match="needs key columns"):
        loader.get(keyless, keys)


def test_appending_an_existing_key_fails_naming_it_and_writes_nothing(loader):
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs.slice(0, 10))
    overlapping = pa.concat_tables([data.logs(10, 12), logs.slice(3, 1)])
    key = logs.select(list(LOG_KEY)).slice(3, 1).to_pylist()[0]
    with pytest.raises(TerminalError, match=rf"1 row\(s\) have a key \(block_num, log_index\).*{key}.*upsert"):
        loader.write(table, overlapping)
    repeated = pa.concat_tables([data.logs(10, 10), data.logs(10, 10)])
    with pytest.raises(TerminalError, match="repeats"):
        loader.write(table, repeated)
    assert loader.read(table).read_all().num_rows == 10


def test_a_key_longer_than_lmdb_allows_is_a_clear_error(loader):
    table = TableRef("docs", range_column="n", key=("name",))
    rows = pa.table({"n": pa.array([1], pa.int64()), "name": ["x" * 600]})
    loader.ensure_table(table, rows.schema)
    with pytest.raises(TerminalError, match="longer than LMDB's 511-byte limit"):
        loader.write(table, rows)


def test_signed_range_values_and_bounds_beyond_the_type(loader):
    table = TableRef("items", range_column="cursor")
    rows = pa.table({"cursor": pa.array([-5, -1, 0, 3, 2**31 - 1], pa.int32()), "v": ["a", "b", "c", "d", "e"]})
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    for call in (lambda: loader.delete(table, RowRange(2**40)), lambda: loader.read(table, RowRange(1, 2**40))):
        with pytest.raises(TerminalError, match=r"column 'cursor' \(int32\).*1099511627776 lies outside"):
            call()
    assert loader.read(table).read_all()["cursor"].to_pylist() == [-5, -1, 0, 3, 2**31 - 1]
    assert loader.read(table, RowRange(3, 2**31 - 1)).read_all()["cursor"].to_pylist() == [3, 2**31 - 1]
    assert loader.delete(table, RowRange(1, 2**31 - 1)) == 2
    assert loader.delete(table, RowRange(0)) == 1
    assert loader.read(table).read_all()["cursor"].to_pylist() == [-5, -1]


def test_a_table_ref_with_another_key_is_refused(loader):
    logs = data.logs(0, 3)
    loader.ensure_table(TableRef("logs", key=LOG_KEY), logs.schema)
    with pytest.raises(SchemaMismatchError, match=r"keyed by \('block_num', 'log_index'\).*replace_table"):
        loader.write(TableRef("logs", key=("tx_hash",)), logs)


def test_reading_a_missing_table_names_it(loader):
    with pytest.raises(TerminalError, match="table nowhere does not exist"):
        loader.read(TableRef("nowhere"))


def test_failed_replace_of_a_new_table_leaves_no_table(loader):
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 20)

    def dying():
        yield from logs.to_batches(max_chunksize=10)[:2]
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        loader.replace_table(table, pa.RecordBatchReader.from_batches(logs.schema, dying()))
    with pytest.raises(TerminalError, match="does not exist"):
        loader.read(table)
    loader.replace_table(table, logs)
    assert loader.read(table).read_all().num_rows == logs.num_rows


def test_loaders_on_one_path_share_the_environment(tmp_path):
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 5)
    first, second = LmdbLoader(tmp_path / "env"), LmdbLoader(tmp_path / "env")
    first.ensure_table(table, logs.schema)
    first.write(table, logs)
    assert first._env() is second._env()
    first.close()
    assert second.read(table).read_all().num_rows == logs.num_rows
    second.close()
    with LmdbLoader(tmp_path / "env") as third:  # reopened after the last one closed
        assert third.read(table).read_all().num_rows == logs.num_rows


@pytest.mark.parametrize("writemap", [True, False], ids=["writemap", "heap"])
def test_a_full_map_rolls_back_and_names_the_fix(tmp_path, writemap):
    table = TableRef("logs", key=LOG_KEY)
    first, more = data.logs(0, 5), data.logs(6, 400)  # ~ 1 MB of rows and index: far beyond the map
    with LmdbLoader(tmp_path / "env", map_size=256 * 1024, writemap=writemap) as small:
        small.ensure_table(table, first.schema)
        small.write(table, first)
        for attempt in (more, data.in_batches(more, 100)):
            with pytest.raises(TerminalError, match=r"outgrows the map of 262,144 bytes.*rolled back.*larger map_size"):
                small.write(table, attempt, replace=RowRange(0))
            assert small.read(table).read_all().sort_by(SORT_LOGS).equals(first.sort_by(SORT_LOGS).combine_chunks())
    with LmdbLoader(tmp_path / "env", map_size=16 << 20, writemap=writemap) as larger:  # reopened: LMDB takes it
        larger.write(table, more)
        assert larger.read(table).read_all().num_rows == first.num_rows + more.num_rows


def test_writemap_sizes_the_file_to_the_map_sparsely(tmp_path):
    """The trade-off the module docstring describes: with writemap the file's apparent size is the map's."""
    logs = data.logs(0, 50)
    for writemap in (True, False):
        with LmdbLoader(tmp_path / str(writemap), writemap=writemap) as loader:
            loader.ensure_table(TableRef("logs"), logs.schema)
            loader.write(TableRef("logs"), logs)
        file = (tmp_path / str(writemap) / "data.mdb").stat()
        assert file.st_blocks * 512 < 8 << 20  # the disk holds only what was written, either way
        assert (file.st_size == 1 << 40) is writemap


_CRASHING_WRITER = """
import os, signal, sys
import pyarrow as pa
from amp_dagster.ranges import RowRange
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.lmdb import LmdbLoader
from amp_dagster_tests import data

loader = LmdbLoader(sys.argv[1], writemap=sys.argv[2] == "True")
table = TableRef("logs", key=("block_num", "log_index"))
loader.ensure_table(table, data.logs(0, 0).schema)
loader.write(table, data.logs(0, 99))

def dying():
    yield from data.logs(0, 2_000, seed=7).to_batches(max_chunksize=5_000)  # dirties thousands of pages
    os.kill(os.getpid(), signal.SIGKILL)

loader.write(table, pa.RecordBatchReader.from_batches(data.logs(0, 0).schema, dying()), replace=RowRange(0))
"""


@pytest.mark.parametrize("writemap", [True, False], ids=["writemap", "heap"])
def test_a_process_killed_in_the_middle_of_a_write_leaves_the_committed_rows(tmp_path, writemap):
    """With writemap the killed write's pages are already in the file; they must stay unreferenced."""
    done = subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(tmp_path / "env"), str(writemap)], check=False)
    assert done.returncode == -signal.SIGKILL
    with LmdbLoader(tmp_path / "env", writemap=writemap) as loader:
        table = TableRef("logs", key=LOG_KEY)
        want = data.logs(0, 99).sort_by(SORT_LOGS).combine_chunks()
        assert loader.read(table).read_all().sort_by(SORT_LOGS).equals(want)
        loader.write(table, data.logs(100, 120))
        assert _assert_index_consistent(loader, table) == data.logs(0, 120).num_rows


def test_a_file_size_limit_with_writemap_names_the_fix(tmp_path):
    """writemap sizes data.mdb to the map: a file system or limit that refuses it must lead to the two ways out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, hard))  # Python ignores SIGXFSZ: ftruncate fails EFBIG
    try:
        with pytest.raises(TerminalError, match=r"File too large.*1,099,511,627,776 bytes.*map_size or writemap=False"):
            LmdbLoader(tmp_path / "env").ensure_table(TableRef("logs"), data.logs(0, 1).schema)
        with LmdbLoader(tmp_path / "env", writemap=False) as loader:
            loader.ensure_table(TableRef("logs"), data.logs(0, 1).schema)
            loader.write(TableRef("logs"), data.logs(0, 1))
            assert loader.read(TableRef("logs")).read_all().num_rows == data.logs(0, 1).num_rows
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_unusable_path_is_a_clear_terminal_error(tmp_path, where):
    (tmp_path / "plain_file").write_text("not a directory")
    path = tmp_path / "plain_file" / "env" if where == "under_a_file" else "/proc/amp_dagster_lmdb_env"
    loader = LmdbLoader(path)
    with pytest.raises(TerminalError, match=r"cannot open an environment at .*writ") as caught:
        loader.ensure_table(TableRef("logs"), data.logs(0, 1).schema)
    assert not isinstance(caught.value, TransientError)
    assert str(path) in str(caught.value)
    loader.close()


def test_lmdb_itself_sees_the_committed_rows(loader):
    """An independent check: count the table's rows with py-lmdb directly, without the codec."""
    table = TableRef("logs", key=LOG_KEY)
    logs = data.logs(0, 30)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    env, rows_db, index_db = _databases(loader, table)
    with env.begin() as txn:
        assert txn.stat(rows_db)["entries"] == logs.num_rows
        assert txn.stat(index_db)["entries"] == logs.num_rows
    assert isinstance(env, lmdb.Environment)


def test_ordered_batches_use_append_only_where_it_is_safe(loader):
    """MDB_APPEND silently skips keys not above the last one: sorted data below or equal to it must still land."""
    table = TableRef("logs", key=LOG_KEY)
    high, low = data.logs(50, 99), data.logs(0, 49)
    loader.ensure_table(table, high.schema)
    loader.write(table, high)  # empty table, ordered keys: appended
    loader.write(table, low)  # ordered, but below the last key
    assert loader.read(table).read_all().num_rows == high.num_rows + low.num_rows
    with pytest.raises(TerminalError, match="already holds"):
        loader.write(table, high.slice(high.num_rows - 1))  # ordered, equal to the last key
    assert _assert_index_consistent(loader, table) == high.num_rows + low.num_rows


# -- the contract's write-path and atomicity cases again with writemap=False (the contract suite runs the default)


test_every_type_round_trips = contract.test_every_type_round_trips
test_replace_range_twice_leaves_one_copy = contract.test_replace_range_twice_leaves_one_copy
test_delete_a_bounded_range = contract.test_delete_a_bounded_range
test_failed_replace_table_leaves_the_old_table_intact = contract.test_failed_replace_table_leaves_the_old_table_intact
test_a_source_dying_during_a_range_replace = contract.test_a_source_dying_during_a_range_replace
test_rows_without_a_range_value_are_refused = contract.test_rows_without_a_range_value_are_refused
test_upsert_by_key_or_a_clear_refusal = contract.test_upsert_by_key_or_a_clear_refusal
test_new_nullable_column_is_added_or_named = contract.test_new_nullable_column_is_added_or_named


class _HeapHarness(LmdbHarness):
    def make_loader(self, **options) -> LmdbLoader:
        loader = super().make_loader(writemap=False, **options)
        assert not loader._env().flags()["writemap"]
        return loader


@pytest.fixture
def store(tmp_path):
    harness = _HeapHarness(tmp_path)
    yield harness
    harness.cleanup()
