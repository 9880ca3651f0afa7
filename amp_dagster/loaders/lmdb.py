"""LMDB loader: rows as compact encoded values under order-preserving keys, with a block index for range deletes.

Layout. One LMDB environment (a directory) per path; a loader shares it with every other loader of this process on
the same path, because LMDB must not be opened twice in one process. A catalog database (``amp_dagster:tables``)
maps each table (the JSON text ``[namespace, name]``, so any name is just bytes) to its Arrow schema, key columns,
range column and row sequence. Each table has two named databases, ``rows:<ident>`` and ``index:<ident>``:

- rows: key → one encoded row (:mod:`.rowcodec`: a fixed-width header of bitmap and fixed columns, then
  length-prefixed variable parts, nested types recursively; written and read over whole columns).
- keys: the ``TableRef.key`` columns encoded so that byte order is value order (big-endian integers with the
  sign flipped, escaped variable-width values). A table without key columns is keyed by range value + a per-table
  sequence number, so its rows keep their arrival order within a block.
- index: range value (big-endian) + row key → empty. A range delete is a cursor scan from the range's start:
  O(log N + M). When the rows themselves are ordered by range (no key columns, or a key that starts with the range
  column) the index stays empty and the scan runs over the rows.

Seams. ``write`` appends in one write transaction, after deleting ``replace``'s range in the same transaction; a key
that already exists fails the write (like a primary key) and names the row. Batches whose keys are in order and
beyond the last stored key (chain data, usually) go in with MDB_APPEND, which skips the B-tree search.
``replace_table`` empties both databases and writes in one transaction. ``upsert`` overwrites by key, keeping the
last of repeated keys, and deletes the index entries of rows whose old version it replaces. ``read`` streams batches
from one read snapshot; ``get`` looks rows up by key. An LMDB write transaction is atomic: any failure aborts it and
leaves the previous content untouched, so every capability flag is true (new nullable columns rewrite the rows
once).

Map size. The map is virtual address space (the file grows only with data), so the default is 1 TiB. If it fills
up anyway, the transaction aborts, the map doubles, and data already in memory (a Table or RecordBatch) is written
again; a stream that cannot be replayed raises a :class:`TransientError` so the caller retries it. Growing the map
ends the read transactions open in this process: such a read fails with a :class:`TransientError` too.

Cost per row that py-lmdb imposes (measured here, 1M logs rows of ~360 bytes, 2 cores): ``putmulti`` takes one
Python tuple of two buffer objects per item. The loader slices them from whole-column buffers in C (``map`` over
``slice``, no Python bytecode per row), which costs ~0.4 µs of the 0.9 µs (MDB_APPEND) to 1.2 µs per item that raw
``putmulti`` needs before the commit, and a keyed row is two items (row and index entry). Reads get one ``bytes``
per row from the cursor, joined in C: ~0.8 µs per row. Range deletes and upserts call ``delete`` once per row or
stale index entry (LMDB has no bulk delete): ~0.75 µs each.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from itertools import islice, repeat
from operator import itemgetter
from typing import Any

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SchemaMismatchError, TerminalError, TransientError
from .base import (
    ArrowData,
    Capabilities,
    Loader,
    RowRange,
    TableRef,
    Tally,
    WriteResult,
    check_in_range,
    compare_columns,
    key_columns,
    record_batches,
    require_columns,
)
from .rowcodec import RowCodec, check_key_type, from_values, iter_values, ordered_keys, strictly_increasing

CATALOG = b"amp_dagster:tables"
_SCAN = 4096  # keys taken per cursor step of a range delete

_ENVS_LOCK = threading.Lock()


@dataclass
class _Shared:
    """One open environment, shared by this process's loaders on its path (LMDB must not be opened twice)."""

    env: lmdb.Environment
    users: int = 0
    growths: int = 0  # growing the map ends every read transaction open in this process


_ENVS: dict[str, _Shared] = {}


@dataclass(frozen=True)
class _Table:
    """One table's layout, read from the catalog inside a transaction."""

    schema: pa.Schema
    codec: RowCodec
    key: tuple[str, ...]
    range_column: str
    seq: int
    rows: Any
    index: Any

    @property
    def indexed(self) -> bool:
        return bool(self.key) and self.key[0] != self.range_column

    def index_keys(self, batch: pa.RecordBatch) -> pa.LargeBinaryArray:
        """Range value + row key: encodings concatenate, so this is the key of the columns (range, *key)."""
        names = [self.range_column, *self.key]
        return ordered_keys([batch.column(name) for name in names], names)

    def row_keys(self, batch: pa.RecordBatch, seq: int) -> pa.LargeBinaryArray:
        if self.key:
            return ordered_keys([batch.column(k) for k in self.key], self.key)
        sequence = pa.array(np.arange(seq, seq + batch.num_rows, dtype=np.uint64))
        return ordered_keys([batch.column(self.range_column), sequence], [self.range_column, "sequence"])

    def bound(self, value: int) -> bytes | None:
        """The encoded range value, or None when it lies beyond the range column's type."""
        try:
            array = pa.array([value], self.schema.field(self.range_column).type)
        except (OverflowError, pa.ArrowInvalid):
            return None
        return bytes(next(iter_values(ordered_keys([array], [self.range_column]))))


class LmdbLoader(Loader):
    """Loads Arrow into an LMDB environment: tables of encoded rows under their keys, readable back as Arrow.

    >>> with LmdbLoader(tmp_path / "chain") as db:  # doctest: +SKIP
    ...     t = TableRef("logs", namespace="eth", key=("block_num", "log_index"))
    ...     db.ensure_table(t, logs.schema)
    ...     db.write(t, logs, replace=RowRange(0, 999))
    ...     db.get(t, pa.table({"block_num": pa.array([7], pa.uint64()), "log_index": pa.array([0], pa.uint32())}))
    """

    store = "LMDB"
    capabilities = Capabilities(
        atomic_replace_range=True, atomic_replace_table=True, upsert=True, add_columns=True, flush_rows=65_536
    )

    def __init__(
        self, path: str | os.PathLike, *, map_size: int = 1 << 40, max_dbs: int = 1024, batch_rows: int = 65_536
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._map_size, self._max_dbs, self._batch_rows = map_size, max_dbs, batch_rows
        self._shared: _Shared | None = None
        self._catalog = None
        self._schemas: dict[bytes, tuple[pa.Schema, RowCodec]] = {}

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        self._check_schema(table, schema)

        def work(txn, *_):
            t = self._load(txn, table, write=True)
            if t is None:
                self._save(txn, table, schema, 0)
                self._load(txn, table, write=True)  # creates the table's databases
                return
            self._check_layout(t, table)
            existing = {f.name: str(f.type) for f in t.schema}
            incoming = {f.name: (str(f.type), f.nullable) for f in schema}
            added = compare_columns(self.store, table, existing, incoming, can_add=True)
            if added:
                self._add_columns(txn, t, table, [schema.field(name) for name in added])

        self._writing(table, None, work)

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        def work(txn, schema, batches):
            t = self._require(txn, table)
            deleted = _delete_range(txn, t, replace) if replace is not None else 0
            tally = Tally()
            batches = check_in_range(self._conform(t, table, schema, batches), table, replace)
            self._put_all(txn, t, table, tally.count(batches), upsert=False)
            return tally, deleted

        tally, deleted = self._writing(table, data, work)
        return tally.result(deleted=deleted)

    def delete(self, table: TableRef, rows: RowRange) -> int:
        def work(txn, *_):
            t = self._load(txn, table, write=True)
            if t is None:
                return 0
            self._check_layout(t, table)
            return _delete_range(txn, t, rows)

        return self._writing(table, None, work)

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        def work(txn, schema, batches):
            self._check_schema(table, schema)
            self._save(txn, table, schema, 0)
            t = self._load(txn, table, write=True)
            txn.drop(t.rows, delete=False)
            txn.drop(t.index, delete=False)
            tally = Tally()
            self._put_all(txn, t, table, tally.count(batches), upsert=False)
            return tally

        return self._writing(table, data, work).result()

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        key_columns(table, self.store)

        def work(txn, schema, batches):
            t = self._require(txn, table)
            tally = Tally()
            self._put_all(txn, t, table, tally.count(self._conform(t, table, schema, batches)), upsert=True)
            return tally

        return self._writing(table, data, work).result()

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        txn = self._begin(write=False)  # one snapshot for the whole read, released when the batches are done
        try:
            with self._typed(table):
                t = self._require(txn, table)
        except BaseException:
            txn.abort()
            raise
        return pa.RecordBatchReader.from_batches(t.schema, self._decoded(txn, t, table, rows))

    def get(self, table: TableRef, keys: pa.Table | pa.RecordBatch) -> pa.Table:
        """The stored rows whose key columns equal a row of ``keys``, in the order of ``keys``; absent keys are
        left out. ``keys`` needs the table's key columns and may hold others."""
        names = key_columns(table, self.store)
        keys = pa.Table.from_batches([keys]) if isinstance(keys, pa.RecordBatch) else keys
        with self._typed(table), self._begin(write=False) as txn:
            t = self._require(txn, table)
            missing = [k for k in names if keys.schema.get_field_index(k) < 0]
            if missing:
                raise SchemaMismatchError(
                    f"LMDB table {table}: the lookup keys lack key column(s) {', '.join(map(repr, missing))}; "
                    f"they have {', '.join(keys.schema.names)}."
                )
            cursor, found = txn.cursor(t.rows), []
            for batch in keys.to_batches(max_chunksize=self._batch_rows):
                columns = [self._cast_key(t, table, batch.column(k), k) for k in names]
                pairs = cursor.getmulti(iter_values(ordered_keys(columns, names)))
                if pairs:
                    found.append(t.codec.decode(from_values(list(map(itemgetter(1), pairs)))))
        return pa.Table.from_batches(found, schema=t.schema)

    def close(self) -> None:
        if self._shared is not None:
            with _ENVS_LOCK:
                self._shared.users -= 1
                if self._shared.users == 0:
                    self._shared.env.close()
                    del _ENVS[self.path]
            self._shared = None

    # -- transactions ---------------------------------------------------------------------------------------

    def _env(self) -> lmdb.Environment:
        if self._shared is None:
            with _ENVS_LOCK:
                shared = _ENVS.get(self.path)
                if shared is None:
                    try:
                        os.makedirs(self.path, exist_ok=True)
                        env = lmdb.open(self.path, map_size=self._map_size, max_dbs=self._max_dbs)
                        env.open_db(CATALOG)
                    except (OSError, lmdb.Error) as exc:
                        raise TerminalError(
                            f"LMDB: cannot open an environment at {self.path}: {exc}. Pass a path to a directory "
                            "that exists or can be created and that this process can write."
                        ) from None
                    shared = _ENVS[self.path] = _Shared(env)
                shared.users += 1
            self._shared = shared
            self._catalog = shared.env.open_db(CATALOG)
        return self._shared.env

    def _begin(self, write: bool):
        env = self._env()
        with self._typed(None):
            try:
                return env.begin(write=write)
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                env.set_mapsize(0)
                return env.begin(write=write)

    @contextmanager
    def _typed(self, table: TableRef | None):
        try:
            yield
        except lmdb.Error as exc:
            raise self._translate(exc, table) from None

    def _writing(self, table: TableRef, data: ArrowData | None, work: Callable) -> Any:
        """Run ``work(txn, schema, batches)`` in one write transaction: it all commits, or it all aborts."""
        schema, batches = record_batches(data) if data is not None else (None, None)
        replayable = data is None or isinstance(data, pa.Table | pa.RecordBatch)
        while True:
            txn = self._begin(write=True)
            try:
                result = work(txn, schema, batches)
                txn.commit()
                return result
            except lmdb.MapFullError:
                txn.abort()
                old, new = self._grow(getattr(data, "nbytes", 0))
                if not replayable:
                    raise TransientError(
                        f"LMDB at {self.path}, table {table}: the map ({old:,} bytes) filled up and the write was "
                        f"rolled back. The map is now {new:,} bytes; write the data again (or pass a larger map_size)."
                    ) from None
                schema, batches = record_batches(data) if data is not None else (None, None)
            except lmdb.Error as exc:
                txn.abort()
                raise self._translate(exc, table) from None
            except BaseException:
                txn.abort()
                raise

    def _grow(self, hint: int) -> tuple[int, int]:
        env = self._env()
        info, page = env.info(), env.stat()["psize"]
        used = (info["last_pgno"] + 1) * page
        size = max(2 * info["map_size"], 2 * (used + 2 * hint))
        try:  # fails while another thread of this process holds a write transaction
            env.set_mapsize(-(-size // page) * page)
            self._shared.growths += 1
        except lmdb.Error as exc:
            raise TransientError(f"LMDB at {self.path}: the map is full and could not grow now ({exc}).") from None
        if env.info()["map_size"] <= info["map_size"]:
            raise TerminalError(f"LMDB at {self.path}: the map is full at {info['map_size']:,} bytes and cannot grow")
        return info["map_size"], env.info()["map_size"]

    def _translate(self, exc: lmdb.Error, table: TableRef | None) -> Exception:
        where = f"LMDB at {self.path}" + (f", table {table}" if table else "")
        if isinstance(exc, lmdb.BadValsizeError):
            return TerminalError(
                f"{where}: a key is longer than LMDB's {self._env().max_key_size()}-byte limit ({exc}). Key the "
                "table by shorter columns (numbers or hashes rather than long text)."
            )
        if isinstance(exc, lmdb.DbsFullError):
            return TerminalError(
                f"{where}: the environment already holds max_dbs={self._max_dbs} named databases (two per table). "
                "Pass a larger max_dbs to LmdbLoader."
            )
        if isinstance(exc, lmdb.ReadersFullError | lmdb.MapResizedError | lmdb.InvalidError):
            # InvalidError: this process grew the map (or closed the loader) while a read was open
            return TransientError(f"{where}: {exc}. Try again.")
        return TerminalError(f"{where}: {exc}")

    # -- tables ---------------------------------------------------------------------------------------------

    def _ident(self, table: TableRef) -> bytes:
        ident = json.dumps([table.namespace, table.name], ensure_ascii=False).encode()
        if len(ident) + 6 > self._env().max_key_size():
            raise TerminalError(
                f"LMDB table {table}: namespace and name take {len(ident)} bytes, more than LMDB's database names "
                f"allow ({self._env().max_key_size() - 6}). Use a shorter name."
            )
        return ident

    def _load(self, txn, table: TableRef, write: bool) -> _Table | None:
        ident = self._ident(table)
        raw = txn.get(ident, db=self._catalog)
        if raw is None:
            return None
        meta = json.loads(raw)
        if meta["schema"] not in self._schemas:
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(meta["schema"])))
            self._schemas[meta["schema"]] = (schema, RowCodec(schema))
        schema, codec = self._schemas[meta["schema"]]
        rows, index = (self._env().open_db(p + b":" + ident, txn=txn, create=write) for p in (b"rows", b"index"))
        return _Table(schema, codec, tuple(meta["key"]), meta["range_column"], meta["seq"], rows, index)

    def _save(self, txn, table: TableRef, schema: pa.Schema, seq: int) -> None:
        meta = {
            "schema": base64.b64encode(schema.serialize()).decode(),
            "key": list(table.key),
            "range_column": table.range_column,
            "seq": seq,
        }
        txn.put(self._ident(table), json.dumps(meta).encode(), db=self._catalog)

    def _require(self, txn, table: TableRef) -> _Table:
        t = self._load(txn, table, write=False)
        if t is None:
            raise TerminalError(f"LMDB at {self.path}: table {table} does not exist. Call ensure_table() first.")
        self._check_layout(t, table)
        return t

    def _check_schema(self, table: TableRef, schema: pa.Schema) -> None:
        require_columns(schema, table, self.store)
        RowCodec(schema)  # names the first column whose type the codec cannot store
        for name in table.key:
            check_key_type(schema.field(name))

    def _check_layout(self, t: _Table, table: TableRef) -> None:
        if t.key != table.key or t.range_column != table.range_column:
            raise SchemaMismatchError(
                f"LMDB table {table}: it is keyed by {t.key} with range column {t.range_column!r}, but the "
                f"TableRef says key {table.key} and range column {table.range_column!r}. Use the same TableRef, "
                "or rebuild the table with replace_table()."
            )

    def _conform(self, t: _Table, table: TableRef, schema: pa.Schema, batches) -> Iterator[pa.RecordBatch]:
        new = [name for name in schema.names if t.schema.get_field_index(name) < 0]
        if new:
            raise SchemaMismatchError(
                f"LMDB table {table}: the data has new column(s) {', '.join(map(repr, new))}. Call "
                "ensure_table(table, data.schema) first to add them (they must be nullable)."
            )
        existing = {f.name: str(f.type) for f in t.schema}
        compare_columns(self.store, table, existing, {f.name: (str(f.type), f.nullable) for f in schema}, False)
        for batch in batches:
            yield pa.RecordBatch.from_arrays([batch.column(name) for name in t.schema.names], schema=t.schema)

    def _cast_key(self, t: _Table, table: TableRef, column: pa.Array, name: str) -> pa.Array:
        want = t.schema.field(name).type
        try:
            return column if column.type == want else column.cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise SchemaMismatchError(
                f"LMDB table {table}: key column {name!r} is {want} in the table; the lookup keys hold {column.type} "
                "values that do not convert. Cast the keys to the table's type."
            ) from None

    # -- rows -----------------------------------------------------------------------------------------------

    def _put_all(self, txn, t: _Table, table: TableRef, batches, *, upsert: bool) -> None:
        rows, index, seq = txn.cursor(t.rows), txn.cursor(t.index), t.seq
        for batch in batches:
            if not batch.num_rows:
                continue
            keys = t.row_keys(batch, seq)
            seq += batch.num_rows
            if upsert:
                batch, keys = _last_per_key(batch, keys)
                if t.indexed:
                    _unindex(txn, t, rows, keys)
            values = t.codec.encode(batch)
            pairs = zip(iter_values(keys), iter_values(values), strict=True)
            consumed, added = rows.putmulti(pairs, overwrite=upsert, append=_appends(rows, keys))
            if added < consumed:
                raise self._duplicates(t, table, batch, keys, consumed - added)
            if t.indexed:
                entries = t.index_keys(batch)
                index.putmulti(zip(iter_values(entries), repeat(b"")), append=_appends(index, entries))
        if seq != t.seq and not t.key:
            self._save(txn, table, t.schema, seq)

    def _duplicates(self, t: _Table, table: TableRef, batch, keys, count: int) -> TerminalError:
        """Name one offending key: one repeated in the data, or else one the table held before this write."""
        counts = pc.value_counts(keys)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        if len(repeated):
            culprit = repeated[0]
        else:
            with self._begin(write=False) as snapshot:
                held = snapshot.cursor(t.rows).getmulti(iter_values(keys), values=False)
            culprit = pa.scalar(held[0], pa.large_binary()) if held else None
        example = ""
        if culprit is not None:
            row = pc.index(keys, culprit).as_py()
            example = f", e.g. {batch.select(list(t.key)).slice(row, 1).to_pylist()[0]}"
        return TerminalError(
            f"LMDB table {table}: {count} row(s) have a key ({', '.join(t.key)}) that the table already holds or "
            f"that the data repeats{example}. Use upsert() to replace rows by key, or write(..., "
            "replace=RowRange(...)) to replace their range."
        )

    def _add_columns(self, txn, t: _Table, table: TableRef, fields: list[pa.Field]) -> None:
        """Rewrite every row with the new nullable columns (as nulls) appended, in this transaction."""
        wider = pa.schema([*t.schema, *fields])
        codec = RowCodec(wider)
        cursor, writer = txn.cursor(t.rows), txn.cursor(t.rows)
        more = cursor.first()
        while more:
            chunk = list(islice(cursor.iternext(), self._batch_rows))
            old = t.codec.decode(from_values(list(map(itemgetter(1), chunk))))
            nulls = [pa.nulls(old.num_rows, f.type) for f in fields]
            values = codec.encode(pa.RecordBatch.from_arrays([*old.columns, *nulls], schema=wider))
            writer.putmulti(zip(map(itemgetter(0), chunk), iter_values(values), strict=True))
            more = cursor.set_range(chunk[-1][0]) and cursor.next()
        self._save(txn, table, wider, t.seq)

    def _decoded(self, txn, t: _Table, table: TableRef, rows: RowRange | None) -> Iterator[pa.RecordBatch]:
        growths = self._shared.growths
        try:
            for values in _stored_values(txn, t, rows, self._batch_rows):
                yield t.codec.decode(from_values(values))
        except lmdb.Error as exc:
            if self._shared is not None and self._shared.growths != growths:
                raise TransientError(
                    f"LMDB at {self.path}, table {table}: a write grew the map while this read was open, which "
                    "ends the read transactions of this process. Read again."
                ) from None
            raise self._translate(exc, table) from None
        finally:
            with suppress(lmdb.Error):  # the environment may be closed already
                txn.abort()


def _delete_range(txn, t: _Table, rows: RowRange) -> int:
    low = t.bound(rows.start)
    high = None if rows.end is None else t.bound(rows.end + 1)
    if low is None:
        return 0
    scanned = t.index if t.indexed else t.rows
    cursor, deleted = txn.cursor(scanned), 0
    drop_scanned, drop_row = partial(txn.delete, db=scanned), partial(txn.delete, db=t.rows)
    while cursor.set_range(low):
        keys = list(islice(cursor.iternext(values=False), _SCAN))
        cut = len(keys) if high is None else bisect_left(keys, high)
        deque(map(drop_scanned, keys[:cut]), maxlen=0)
        if t.indexed:  # index key = range value + row key
            deque(map(drop_row, map(itemgetter(slice(len(low), None)), keys[:cut])), maxlen=0)
        deleted += cut
        if cut < _SCAN:
            break
    return deleted


def _stored_values(txn, t: _Table, rows: RowRange | None, size: int) -> Iterator[list[bytes]]:
    """The stored values, ``size`` at a time, of every row or of the rows in a range (in range order)."""
    cursor = txn.cursor(t.rows)
    if rows is None:
        if cursor.first():
            values = cursor.iternext(keys=False)
            while chunk := list(islice(values, size)):
                yield chunk
        return
    low = t.bound(rows.start)
    high = None if rows.end is None else t.bound(rows.end + 1)
    scan = txn.cursor(t.index) if t.indexed else cursor
    if low is None or not scan.set_range(low):
        return
    items = scan.iternext(values=False) if t.indexed else scan.iternext()
    while chunk := list(islice(items, size)):
        if t.indexed:
            cut = len(chunk) if high is None else bisect_left(chunk, high)
            found = cursor.getmulti(map(itemgetter(slice(len(low), None)), chunk[:cut]))
        else:
            found = chunk[: len(chunk) if high is None else bisect_left(chunk, (high,))]
            cut = len(found)
        if found:
            yield list(map(itemgetter(1), found))
        if cut < len(chunk):
            return


def _appends(cursor, keys: pa.LargeBinaryArray) -> bool:
    """Whether the keys can go in with MDB_APPEND (no B-tree search, full pages): chain data arrives in key order.

    Only when every key is greater than the one before and than the database's last key, as LMDB skips (rather
    than rejects) an appended key that is not.
    """
    return strictly_increasing(keys) and (not cursor.last() or bytes(next(iter_values(keys))) > cursor.key())


def _last_per_key(batch: pa.RecordBatch, keys: pa.LargeBinaryArray) -> tuple[pa.RecordBatch, pa.LargeBinaryArray]:
    """Keep the last row of each key (an upsert's later rows win), in input order."""
    positions = pa.table({"k": keys, "i": pa.array(np.arange(len(keys)))})
    last = positions.group_by("k", use_threads=False).aggregate([("i", "max")])["i_max"]
    if len(last) == len(keys):
        return batch, keys
    keep = pc.sort_indices(last)
    keep = pc.take(last, keep)
    return batch.take(keep), keys.take(keep)


def _unindex(txn, t: _Table, rows, keys: pa.LargeBinaryArray) -> None:
    """Delete the index entries of the stored rows these keys are about to replace."""
    found = rows.getmulti(iter_values(keys))
    if found:
        old = t.codec.decode(from_values(list(map(itemgetter(1), found))))
        deque(map(partial(txn.delete, db=t.index), iter_values(t.index_keys(old))), maxlen=0)
