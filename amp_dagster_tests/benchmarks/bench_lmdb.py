"""LMDB: the loader against raw ``putmulti`` of pre-encoded rows (the ceiling) and one IPC stream per row; reads too.

Every write case stores the same thing, keyed by (block_num, log_index): one value per row plus one block-index
entry per row, in one write transaction, committed durably (LMDB syncs on commit). The loader runs with its default
``writemap=True`` (as the ceiling does) and with ``writemap=False`` (dirty pages on the heap until LMDB spills them).
PERFORMANCE.md sets no throughput goal for LMDB: the raw cases are a ceiling (LMDB's own work on bytes encoded
beforehand) and a floor (the anti-pattern), not a like-for-like reference. Its memory goal is P9 (bench_memory).
"""

from __future__ import annotations

import shutil
import struct
from itertools import islice, repeat

import lmdb
import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.lmdb import LmdbLoader
from amp_dagster.loaders.rowcodec import RowCodec, from_values, iter_values, ordered_keys

from .harness import BENCH_DIR, Case, batches, compare, logs_table

KEY = ("block_num", "log_index")
ROOT = BENCH_DIR / "lmdb"
MAP_SIZE = 1 << 40


def _fresh(name: str):
    def run():
        shutil.rmtree(ROOT / name, ignore_errors=True)
        (ROOT / name).mkdir(parents=True)

    return run


def _raw_env(name: str) -> lmdb.Environment:
    return lmdb.open(str(ROOT / name), map_size=MAP_SIZE, max_dbs=4, writemap=True)


def main(rows: int, rounds: int) -> None:
    table = logs_table(rows)
    want_sum = pc.sum(table["log_index"].cast("int64")).as_py()
    codec = RowCodec(table.schema)
    ref = TableRef("logs", key=KEY)

    # -- the ceiling: everything encoded beforehand, the timed part is only LMDB's own work -----------------------
    encoded = []
    for batch in batches(table):
        keys = ordered_keys([batch.column(k) for k in KEY], KEY)
        index = ordered_keys([batch.column(n) for n in ("_block_num", *KEY)], ["_block_num", *KEY])
        encoded.append((keys, codec.encode(batch), index))

    def raw_putmulti():
        with _raw_env("raw") as env:
            rows_db, index_db = env.open_db(b"rows"), env.open_db(b"index")
            with env.begin(write=True) as txn:
                rows_cursor, index_cursor = txn.cursor(rows_db), txn.cursor(index_db)
                for keys, values, index in encoded:  # the keys arrive in order: LMDB's fastest path, MDB_APPEND
                    rows_cursor.putmulti(zip(iter_values(keys), iter_values(values), strict=True), append=True)
                    index_cursor.putmulti(zip(iter_values(index), repeat(b"")), append=True)

    def check_raw():
        with _raw_env("raw") as env, env.begin() as txn:
            rows_db = env.open_db(b"rows", txn=txn, create=False)
            values = list(txn.cursor(rows_db).iternext(keys=False))
        got = codec.decode(from_values(values))
        assert got.num_rows == rows and pc.sum(got["log_index"].cast("int64")).as_py() == want_sum

    # -- the loader ------------------------------------------------------------------------------------------------

    def loader_write(name: str, writemap: bool):
        def run():
            with LmdbLoader(ROOT / name, writemap=writemap) as loader:
                loader.ensure_table(ref, table.schema)  # an empty catalog entry: negligible, but part of a real load
                loader.write(ref, batches(table))

        return run

    def check_loader(name: str, writemap: bool):
        def run():
            with LmdbLoader(ROOT / name, writemap=writemap) as loader:
                got = loader.read(ref).read_all()
            assert got.num_rows == rows and pc.sum(got["log_index"].cast("int64")).as_py() == want_sum

        return run

    def _loader_case(name: str, writemap: bool):
        return loader_write(name, writemap), _fresh(name), check_loader(name, writemap)

    # -- the anti-pattern: an Arrow IPC stream per row, keys packed in Python, one put per row -------------------------

    def ipc_per_row():
        with _raw_env("ipc") as env:
            rows_db, index_db = env.open_db(b"rows"), env.open_db(b"index")
            with env.begin(write=True) as txn:
                for batch in batches(table):
                    columns = zip(*(batch.column(n).to_pylist() for n in ("_block_num", *KEY)), strict=True)
                    for i, (block, number, index) in enumerate(columns):
                        sink = pa.BufferOutputStream()
                        with pa.ipc.new_stream(sink, batch.schema) as writer:
                            writer.write_batch(batch.slice(i, 1))
                        key = struct.pack(">QI", number, index)
                        txn.put(key, sink.getvalue(), db=rows_db)
                        txn.put(struct.pack(">Q", block) + key, b"", db=index_db)

    def check_ipc():
        with _raw_env("ipc") as env, env.begin() as txn:
            rows_db = env.open_db(b"rows", txn=txn, create=False)
            assert txn.stat(rows_db)["entries"] == rows
            first = pa.ipc.open_stream(txn.cursor(rows_db).iternext(keys=False).__next__()).read_all()
            assert first.schema == table.schema and first.num_rows == 1

    compare(
        f"LMDB write: loader vs raw putmulti of pre-encoded rows + index (ceiling), one transaction, {rows:,} logs",
        rows,
        [
            Case("raw putmulti(append), pre-encoded (ceiling)", raw_putmulti, _fresh("raw"), check_raw),
            Case("LmdbLoader.write (writemap=True, default)", *_loader_case("loader", True)),
            Case("LmdbLoader.write, writemap=False", *_loader_case("heap", False)),
            Case("IPC stream per row, put one by one", ipc_per_row, _fresh("ipc"), check_ipc),
        ],
        rounds,
    )
    print("no goal: LMDB has no throughput goal in PERFORMANCE.md; the first case is a ceiling, not a reference")

    # -- reads: the environments the last round left behind ----------------------------------------------------------

    sums: dict[str, int] = {}

    def raw_values():
        with _raw_env("raw") as env, env.begin() as txn:
            values, count = txn.cursor(env.open_db(b"rows", txn=txn, create=False)).iternext(keys=False), 0
            while chunk := list(islice(values, 65_536)):  # the loader's batch size
                count += len(from_values(chunk))
        sums["raw"] = count

    def loader_read():
        with LmdbLoader(ROOT / "loader") as loader:
            sums["loader"] = sum(pc.sum(b["log_index"].cast("int64")).as_py() or 0 for b in loader.read(ref))

    def ipc_read():
        total = 0
        with _raw_env("ipc") as env, env.begin() as txn:
            cursor = txn.cursor(env.open_db(b"rows", txn=txn, create=False))
            for value in cursor.iternext(keys=False):
                total += pa.ipc.open_stream(value).read_next_batch().column("log_index")[0].as_py()
        sums["ipc"] = total

    def checked(name: str, want: int):
        def run():
            assert sums.pop(name) == want, f"{name} read the wrong rows"

        return run

    compare(
        f"LMDB read: every row back as Arrow, {rows:,} logs",
        rows,
        [
            Case("raw cursor, values joined, no decode (ceiling)", raw_values, check=checked("raw", rows)),
            Case("LmdbLoader.read (decode to Arrow batches)", loader_read, check=checked("loader", want_sum)),
            Case("IPC stream per row, opened one by one", ipc_read, check=checked("ipc", want_sum)),
        ],
        rounds,
    )
    shutil.rmtree(ROOT, ignore_errors=True)
