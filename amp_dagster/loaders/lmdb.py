"""LMDB loader: rows as compact encoded values under order-preserving keys, with a block index for range deletes.

Layout. One LMDB environment (a directory) per path; a loader shares it with every other loader of this process on
the same path, because LMDB must not be opened twice in one process (the first loader's settings apply to all). A
catalog database (``amp_dagster:tables``) maps each table (the JSON text ``[namespace, name]``, so any name is just
bytes) to its Arrow schema, key columns, range column and row sequence. Each table has two named databases,
``rows:<ident>`` and ``index:<ident>``:

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
from one read snapshot; ``get`` looks rows up by key. LMDB never writes over the pages of the last committed
snapshot, so a failed write (or a crash in the middle of one) leaves the previous content untouched, and every
capability flag is true (new nullable columns rewrite the rows once).

Map and memory. ``map_size`` (1 TiB by default) is address space that bounds the environment, not disk; a write
that would outgrow it is rolled back with an error asking for a larger one. With ``writemap=True`` (the default) a
write transaction's dirty pages are the mapped file's own pages: page cache that the kernel writes back and may
evict, so the heap stays flat however much one transaction writes (~130 MB anonymous memory streaming 1M or 5M
logs rows), and writes are faster. The price: LMDB sizes ``data.mdb`` to ``map_size``, as a sparse file (``ls -l``
shows 1 TiB; ``du`` and free space show the real use). Copy it with ``mdb_copy`` or a sparse-aware tool
(``cp --sparse=always``, ``rsync -S``). On a filesystem without sparse files, pass ``writemap=False``: the file then
grows with the data, but a write transaction keeps up to ~512 MB of dirty pages on the heap before LMDB spills them.
Every process opening one path must pass the same ``writemap`` (LMDB's rule).
"""

from __future__ import annotations

import json
import os
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from itertools import islice, repeat
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import AmpDagsterError, SchemaMismatchError, TerminalError, TransientError
from ..ranges import RowRange, integer_bounds
from .base import ArrowData, Capabilities, Loader, TableRef, WriteResult, missing_table, require_driver
from .batches import Tally, checked_batches, key_columns, last_per_key
from .rowcodec import RowCodec, check_key_type, from_values, iter_values, ordered_keys, strictly_increasing
from .schema import cast_columns, check_schema, require_columns, schema_from_text, schema_to_text, widen

lmdb = require_driver("lmdb", "lmdb", "LMDB")  # at import: LmdbLoader names lmdb errors in its signatures
CATALOG = b"amp_dagster:tables"
_SCAN = 4096  # keys taken per cursor step of a range delete

_ENVS_LOCK = threading.Lock()


@dataclass
class _Shared:
    """One open environment, shared by this process's loaders on its path (LMDB must not be opened twice)."""

    env: lmdb.Environment
    catalog: Any  # the catalog database's handle, opened once with the environment
    users: int = 0


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

    def check(self, table: TableRef, rows: RowRange) -> None:
        """Refuse a range the range column's type cannot hold, before any key is read or deleted."""
        rows.check(self.range_column, self.schema.field(self.range_column).type, f"LMDB table {table}")

    def bounds(self, rows: RowRange) -> tuple[bytes, bytes | None]:
        """The encoded keys a checked range spans: its start, and the first value past its end (None when the
        end is the type's largest value, or open)."""
        t = self.schema.field(self.range_column).type
        high = None if rows.end is None or rows.end == integer_bounds(t)[1] else self.encode(rows.end + 1)
        return self.encode(rows.start), high

    def encode(self, value: int) -> bytes:
        array = pa.array([value], self.schema.field(self.range_column).type)
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
        self,
        path: str | os.PathLike,
        *,
        map_size: int = 1 << 40,
        writemap: bool = True,
        max_dbs: int = 1024,
        batch_rows: int = 65_536,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._map_size, self._writemap, self._max_dbs, self._batch_rows = map_size, writemap, max_dbs, batch_rows
        self._shared: _Shared | None = None
        self._catalog = None
        self._schemas: dict[bytes, tuple[pa.Schema, RowCodec]] = {}

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        self._check_schema(table, schema)
        with self._writing(table) as txn:
            t = self._load(txn, table, write=True)
            if t is None:
                self._save(txn, table, schema, 0)
                self._load(txn, table, write=True)  # creates the table's databases
                return
            self._check_layout(t, table)
            added = check_schema(self.store, table, t.schema, schema, can_add=True)
            if added:
                self._add_columns(txn, t, table, widen(t.schema, schema, added))

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store, replace)
        tally = Tally()
        with self._writing(table) as txn:
            t = self._require(txn, table)
            # the data's types are the table's (checked here), so its range check in checked_batches holds for both
            conformed = self._conform(t, table, schema, batches)
            deleted = _delete_range(txn, t, replace) if replace is not None else 0
            self._put_all(txn, t, table, tally.count(conformed), upsert=False)
        return tally.result(deleted=deleted)

    def delete(self, table: TableRef, rows: RowRange) -> int:
        with self._writing(table) as txn:
            t = self._load(txn, table, write=True)
            if t is None:
                return 0
            self._check_layout(t, table)
            t.check(table, rows)
            return _delete_range(txn, t, rows)

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store)
        self._check_schema(table, schema)
        tally = Tally()
        with self._writing(table) as txn:
            self._save(txn, table, schema, 0)
            t = self._load(txn, table, write=True)
            txn.drop(t.rows, delete=False)
            txn.drop(t.index, delete=False)
            self._put_all(txn, t, table, tally.count(batches), upsert=False)
        return tally.result()

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        key_columns(table, self.store)
        schema, batches = checked_batches(data, table, self.store)
        tally = Tally()
        with self._writing(table) as txn:
            t = self._require(txn, table)
            self._put_all(txn, t, table, tally.count(self._conform(t, table, schema, batches)), upsert=True)
        return tally.result()

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        with self._translating(table, errors=lmdb.Error):
            txn = self._env().begin()  # one snapshot for the whole read, released when the batches are done
            try:
                t = self._require(txn, table)
                if rows is not None:
                    t.check(table, rows)
            except BaseException:
                txn.abort()
                raise
        return pa.RecordBatchReader.from_batches(t.schema, self._decoded(txn, t, table, rows))

    def get(self, table: TableRef, keys: pa.Table | pa.RecordBatch) -> pa.Table:
        """The stored rows whose key columns equal a row of ``keys``, in the order of ``keys``; absent keys are
        left out. ``keys`` needs the table's key columns and may hold others."""
        names = key_columns(table, self.store)
        keys = pa.Table.from_batches([keys]) if isinstance(keys, pa.RecordBatch) else keys
        with self._translating(table, errors=lmdb.Error), self._env().begin() as txn:
            t = self._require(txn, table)
            missing = [k for k in names if keys.schema.get_field_index(k) < 0]
            if missing:
                raise SchemaMismatchError(
                    f"LMDB table {table}: the lookup keys lack key column(s) {', '.join(map(repr, missing))}; "
                    f"they have {', '.join(keys.schema.names)}."
                )
            cursor, found, typed = txn.cursor(t.rows), [], pa.schema([t.schema.field(k) for k in names])
            for batch in keys.to_batches(max_chunksize=self._batch_rows):
                columns = cast_columns(batch, typed, store=self.store, table=table).columns
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
                if self.path not in _ENVS:
                    _ENVS[self.path] = _Shared(*self._open())
                shared = self._shared = _ENVS[self.path]
                shared.users += 1
            self._catalog = shared.catalog
        return self._shared.env

    def _open(self) -> tuple[lmdb.Environment, Any]:
        """The environment and its catalog's handle. The catalog is opened (and created) here, once per process:
        ``open_db`` takes LMDB's write lock without releasing the GIL, so opened later it could wait forever for
        another thread's write transaction, which needs the GIL to finish. A path LMDB cannot write fails here."""
        try:
            os.makedirs(self.path, exist_ok=True)
            env = lmdb.open(self.path, map_size=self._map_size, writemap=self._writemap, max_dbs=self._max_dbs)
            return env, env.open_db(CATALOG)
        except (OSError, lmdb.Error) as exc:
            sized = (
                f" With writemap=True LMDB sizes data.mdb to map_size ({self._map_size:,} bytes, a sparse file): "
                "where that is refused, pass a smaller map_size or writemap=False."
            )
            raise TerminalError(
                f"LMDB: cannot open an environment at {self.path}: {exc}. Pass a path to a directory that exists "
                f"or can be created and that this process can write.{sized if self._writemap else ''}"
            ) from None

    @contextmanager
    def _writing(self, table: TableRef) -> Iterator[Any]:
        """One write transaction: it commits if the block completes, and aborts on any error."""
        with self._translating(table, errors=lmdb.Error), self._env().begin(write=True) as txn:
            yield txn

    def _translate(self, exc: BaseException, table: TableRef | None, action: str = "") -> AmpDagsterError:
        where = f"LMDB at {self.path}" + (f", table {table}" if table else "") + (f", {action}" if action else "")
        if isinstance(exc, lmdb.MapFullError | lmdb.MapResizedError):  # resized: another process's map is larger
            return TerminalError(
                f"{where}: the data outgrows the map of {self._env().info()['map_size']:,} bytes (a write that "
                "meets it is rolled back). Close the loaders on this path and open them with a larger map_size "
                "(every process on the path should pass the same)."
            )
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
        if isinstance(exc, lmdb.ReadersFullError):
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
            schema = schema_from_text(meta["schema"])
            self._schemas[meta["schema"]] = (schema, RowCodec(schema))
        schema, codec = self._schemas[meta["schema"]]
        rows, index = (self._env().open_db(p + b":" + ident, txn=txn, create=write) for p in (b"rows", b"index"))
        return _Table(schema, codec, tuple(meta["key"]), meta["range_column"], meta["seq"], rows, index)

    def _save(self, txn, table: TableRef, schema: pa.Schema, seq: int) -> None:
        meta = {
            "schema": schema_to_text(schema),
            "key": list(table.key),
            "range_column": table.range_column,
            "seq": seq,
        }
        txn.put(self._ident(table), json.dumps(meta).encode(), db=self._catalog)

    def _require(self, txn, table: TableRef) -> _Table:
        t = self._load(txn, table, write=False)
        if t is None:
            raise missing_table(self.store, f"at {self.path}", table)
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
        """The batches in the table's column order and exact Arrow types (what its codec encodes)."""
        new = [name for name in schema.names if t.schema.get_field_index(name) < 0]
        if new:
            raise SchemaMismatchError(
                f"LMDB table {table}: the data has new column(s) {', '.join(map(repr, new))}. Call "
                "ensure_table(table, data.schema) first to add them (they must be nullable)."
            )
        check_schema(self.store, table, t.schema, schema, can_add=False)
        return (cast_columns(batch, t.schema, store=self.store, table=table) for batch in batches)

    # -- rows -----------------------------------------------------------------------------------------------

    def _put_all(self, txn, t: _Table, table: TableRef, batches, *, upsert: bool) -> None:
        rows, index, seq = txn.cursor(t.rows), txn.cursor(t.index), t.seq
        for batch in batches:
            if upsert:  # an upsert's later rows win; one index entry per key
                batch = last_per_key(pa.Table.from_batches([batch]), t.key).combine_chunks().to_batches()[0]
            keys = t.row_keys(batch, seq)
            seq += batch.num_rows
            if upsert and t.indexed:
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
            with self._env().begin() as snapshot:
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

    def _add_columns(self, txn, t: _Table, table: TableRef, wider: pa.Schema) -> None:
        """Rewrite every row with the new nullable columns (as nulls) appended, in this transaction."""
        codec, fields = RowCodec(wider), list(wider)[len(t.schema) :]
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
        try:
            with self._translating(table, errors=lmdb.Error):
                for values in _stored_values(txn, t, rows, self._batch_rows):
                    yield t.codec.decode(from_values(values))
        finally:
            with suppress(lmdb.Error):  # the environment may be closed already
                txn.abort()


def _delete_range(txn, t: _Table, rows: RowRange) -> int:
    low, high = t.bounds(rows)
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
    low, high = t.bounds(rows)
    scan = txn.cursor(t.index) if t.indexed else cursor
    if not scan.set_range(low):
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


def _unindex(txn, t: _Table, rows, keys: pa.LargeBinaryArray) -> None:
    """Delete the index entries of the stored rows these keys are about to replace."""
    found = rows.getmulti(iter_values(keys))
    if found:
        old = t.codec.decode(from_values(list(map(itemgetter(1), found))))
        deque(map(partial(txn.delete, db=t.index), iter_values(t.index_keys(old))), maxlen=0)
