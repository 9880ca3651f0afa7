"""Apache Iceberg loader (pyiceberg, SQL catalog by default): one catalog commit and one snapshot per write.

Type map (Arrow → Iceberg; Iceberg has no unsigned types and, in format v2, microsecond timestamps):

- ``uint64`` → ``decimal(20, 0)``, exact up to 2^64-1 (``long`` would wrap above 2^63-1);
- ``uint32`` → ``long``; ``uint8``/``uint16``/``int8``/``int16`` → ``int``; ``float16`` → ``float``;
- ``timestamp[*, tz]`` → ``timestamptz`` (any zone: the instant is kept), ``timestamp[*]`` → ``timestamp``. A
  nanosecond value that is not a whole microsecond fails naming the column unless ``truncate_timestamps=True``;
- ``fixed_size_binary(n)`` → ``fixed[n]``, ``binary`` → ``binary``, ``decimal128(p≤38, s)`` → ``decimal(p, s)``;
- lists, structs and maps stay native Iceberg ``list``/``struct``/``map`` types.

The data's Arrow schema is kept in the table property ``amp_dagster.arrow-schema``, and :meth:`read` casts back
to it, so uint64, ``timestamp[ns, +00:00]`` and ``list<item>`` come back exactly as they went in.

Writes: batches are cast to the table's types and cut into chunks of ``chunk_rows`` rows. Each chunk becomes one
Parquet file, written on pyiceberg's thread pool while the next chunk is read (``in_flight`` chunks being written,
one being gathered). All files of one call go into ONE fast-append snapshot, committed in ONE transaction with any
delete it needs. (``Transaction.append`` of a reader also makes one snapshot, but it submits every file of the
stream to its executor at once, so memory is not bounded; one ``append`` per chunk bounds memory but makes one
snapshot per chunk, and each snapshot costs a manifest and a manifest list.) Per call:

- ``write``: one APPEND snapshot; with ``replace`` first ``Transaction.delete`` of the range (whole files are
  dropped, partly matching files rewritten): up to three snapshots, one commit. ``delete`` is that alone.
- ``replace_table``: delete everything, reshape the schema if it changed (columns whose type changed are dropped
  and added again), append: two snapshots, one commit.
- ``upsert``: per chunk, the last row of each key wins; files that may hold those keys (by column metrics) are
  read, anti-joined with the keys in Arrow and rewritten; the rewrites and the new rows form one OVERWRITE
  snapshot per chunk; one commit.

Nothing is visible before the commit: a failure leaves the previous snapshot current. The data files of the append
that failed are removed; files rewritten by a staged delete or an earlier upsert chunk are left to orphan-file
cleanup (pyiceberg 0.12 has no orphan-file removal yet; Spark's ``remove_orphan_files`` does it).

Identifiers are ``(namespace, name)`` tuples, never split by us; the SQL catalog itself reads a dot in a namespace
as a level separator (like Iceberg's JDBC catalog), so ``"a.b"`` is nested and an empty level is refused. Table
directories are sanitised names plus a hash, so no identifier becomes a path. Filters are pyiceberg expression
objects, never strings.

pyiceberg 0.12 drops the nulls of ``list<struct>`` columns (they become ``[]``) when it projects arrays, on write
and on read (apache/iceberg-python#3833). Creating a loader patches that one method to re-apply the lost
nulls; the patch does nothing once pyiceberg keeps them itself.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import threading
import uuid
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ServiceUnavailableError, TerminalError, TransientError
from ..retry import DEFAULT_RETRY, RetryPolicy, retry_call
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

SCHEMA_PROPERTY = "amp_dagster.arrow-schema"
DEFAULT_NAMESPACE = "default"

_PRIMITIVES = {
    pa.bool_(): "boolean",
    pa.int32(): "int",
    pa.int64(): "long",
    pa.float32(): "float",
    pa.float64(): "double",
    pa.date32(): "date",
    pa.time64("us"): "time",
    pa.string(): "string",
    pa.binary(): "binary",
}


class IcebergLoader(Loader):
    """Loads Arrow into Apache Iceberg tables through a pyiceberg catalog.

    By default the catalog is a SQL catalog in ``<warehouse>/catalog.db`` (sqlite); ``uri`` points it at another
    database (``postgresql+psycopg://user@host:5432/db``), and ``catalog`` takes any pyiceberg catalog properties
    instead (``{"type": "rest", "uri": ...}``). ``name`` is the catalog name (SQL catalogs keep several apart by
    it). Namespaces are created on demand.

    >>> with IcebergLoader("/data/warehouse") as ice:  # doctest: +SKIP
    ...     t = TableRef("logs", namespace="eth")
    ...     ice.ensure_table(t, logs.schema)
    ...     ice.write(t, logs, replace=RowRange(0, 999))
    """

    store = "Iceberg"
    capabilities = Capabilities(
        atomic_replace_range=True, atomic_replace_table=True, upsert=True, add_columns=True, flush_rows=262_144
    )

    def __init__(
        self,
        warehouse: str | Path | None = None,
        *,
        uri: str | None = None,
        catalog: dict[str, str] | None = None,
        name: str = "amp",
        truncate_timestamps: bool = False,
        chunk_rows: int = 262_144,
        in_flight: int = 2,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if catalog is None:
            if warehouse is None:
                raise TerminalError("IcebergLoader needs a warehouse directory, or a catalog=... configuration")
            root = Path(warehouse).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            catalog = {"type": "sql", "uri": uri or f"sqlite:///{root / 'catalog.db'}", "warehouse": str(root)}
        self._props = {k: str(v) for k, v in catalog.items()}
        self._secrets = [v for k, v in self._props.items() if v and re.search("password|secret|token|credent", k, re.I)]
        self.where = self._props.get("uri") or self._props.get("type", "catalog")
        url = _sql_url(self.where)
        if url is not None:
            self.where = f"{url.host}:{url.port or 5432}/{url.database}" if url.host else f"sqlite:{url.database}"
            self._secrets += [url.password] if url.password else []
            if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
                # libpq waits for a host that does not answer for minutes by default
                self._props["uri"] = url.update_query_dict({"connect_timeout": "10"}).render_as_string(False)
        self._name, self._truncate = name, truncate_timestamps
        self._chunk_rows, self._in_flight, self._retry = max(1, chunk_rows), max(1, in_flight), retry
        self._lock = threading.Lock()
        self._catalog_obj: Any = None
        _keep_null_lists()

    # -- catalog and errors ----------------------------------------------------------------------------------

    @property
    def catalog(self) -> Any:
        """The pyiceberg catalog (connected on first use), for time travel, history and maintenance."""
        return self._catalog()

    def _catalog(self) -> Any:
        from pyiceberg.catalog import load_catalog

        with self._lock:
            if self._catalog_obj is None:
                self._catalog_obj = self._retrying(lambda: load_catalog(self._name, **self._props), "connecting")
            return self._catalog_obj

    def _retrying(self, fn, what: str):
        with self._errors():
            return retry_call(fn, self._retry, _is_transient, f"{what} to the Iceberg catalog at {self.where}")

    @contextmanager
    def _errors(self, table: TableRef | None = None):
        """Library failures as typed errors naming the catalog and table, without secrets; others pass through."""
        from pyiceberg.exceptions import CommitFailedException
        from sqlalchemy.exc import SQLAlchemyError

        where = f"Iceberg catalog {self.where}" + (f" table {table}" if table else "")
        try:
            yield
        except (SQLAlchemyError, ConnectionError, TimeoutError) as exc:
            if _is_transient(exc):
                raise ServiceUnavailableError(
                    f"Iceberg catalog at {self.where} is unreachable after {self._retry.attempts} attempts: "
                    f"{self._scrub(exc)}. Check that its server runs and the host, port and credentials are right."
                ) from None
            raise TerminalError(f"{where}: {self._scrub(exc)}") from None
        except CommitFailedException as exc:
            raise TransientError(
                f"{where}: another writer committed first ({self._scrub(exc)}). Run the write again."
            ) from None

    def _scrub(self, exc: BaseException) -> str:
        text = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def close(self) -> None:
        with self._lock:
            if self._catalog_obj is not None:
                self._catalog_obj.close()
                self._catalog_obj = None

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        require_columns(schema, table, self.store)
        ready = pa.schema([self._ready_field(f) for f in schema])
        tbl = self._load(table, missing_ok=True)
        if tbl is None:
            tbl = self._create(table, schema, ready)
            if tbl is not None:
                return
            tbl = self._load(table)  # another writer created it first: check it like an existing table
        added = self._compare(tbl, table, schema, can_add=True)
        stored = _stored_schema(tbl)
        if not added and stored is not None:
            return
        with self._errors(table):
            txn = tbl.transaction()
            if added:
                with txn.update_schema() as update:
                    update.union_by_name(pa.schema([ready.field(n) for n in added]))
            merged = schema if stored is None else pa.schema([*stored, *(schema.field(n) for n in added)])
            txn.set_properties({SCHEMA_PROPERTY: _encode(merged)})
            txn.commit_transaction()

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        schema, batches = record_batches(data)
        tbl = self._load(table)
        target = self._target(tbl, table, schema)
        tally = Tally()
        with self._errors(table):
            txn = tbl.transaction()
            deleted = replace is not None and self._delete(txn, tbl, table, replace)
            appended = self._append(txn, tbl, table, target, tally.count(check_in_range(batches, table, replace)))
            return self._commit(txn, tbl, tally, changed=deleted or appended)

    def delete(self, table: TableRef, rows: RowRange) -> int:
        tbl = self._load(table, missing_ok=True)
        if tbl is None:
            return 0
        with self._errors(table):
            txn = tbl.transaction()
            if not self._delete(txn, tbl, table, rows):
                return 0
            return _total(tbl) - _total(txn.commit_transaction())

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        from pyiceberg.expressions import AlwaysTrue

        schema, batches = record_batches(data)
        require_columns(schema, table, self.store)
        ready = pa.schema([self._ready_field(f) for f in schema])
        tbl = self._load(table, missing_ok=True) or self._create(table, schema, ready) or self._load(table)
        tally = Tally()
        with self._errors(table):
            txn = tbl.transaction()
            if tbl.current_snapshot() is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "did not match any records" on an emptied table
                    txn.delete(AlwaysTrue())
            _reshape(txn, ready)
            txn.set_properties({SCHEMA_PROPERTY: _encode(schema)})
            target = _arrow(txn.table_metadata.schema())
            self._append(txn, tbl, table, target, tally.count(batches))
            return self._commit(txn, tbl, tally, changed=True)

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        from pyiceberg.io.pyarrow import ArrowScan
        from pyiceberg.table import DataScan

        key = list(key_columns(table, self.store))
        schema, batches = record_batches(data)
        tbl = self._load(table)
        target = self._target(tbl, table, schema)
        tally = Tally()
        with self._errors(table):
            txn = tbl.transaction()
            for chunk in self._chunks(tally.count(batches), table, target):
                rows = _last_per_key(pa.Table.from_batches(chunk, target), key)
                keys, bounds, meta = rows.select(key), _key_bounds(rows, key), txn.table_metadata
                with txn.update_snapshot().overwrite() as overwrite:
                    overwrite.delete_by_predicate(bounds)
                    for task in DataScan(table_metadata=meta, io=tbl.io, row_filter=bounds).plan_files():
                        old = ArrowScan(meta, tbl.io, meta.schema(), _always()).to_table([task])
                        kept = old.join(keys, key, join_type="left anti")
                        if kept.num_rows == old.num_rows:
                            continue
                        overwrite.delete_data_file(task.file)
                        if kept.num_rows:
                            kept = kept.select(target.names).cast(target)
                            for data_file in self._files(meta, tbl, [kept.to_batches()]):
                                overwrite.append_data_file(data_file)
                    for data_file in self._files(meta, tbl, [rows.to_batches()]):
                        overwrite.append_data_file(data_file)
            return self._commit(txn, tbl, tally, changed=tally.rows > 0)

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        from pyiceberg.io.pyarrow import ArrowScan

        tbl = self._load(table)
        native, stored = _arrow(tbl.schema()), _stored_schema(tbl) or pa.schema([])
        names = [n for n in stored.names if n in native.names] + [n for n in native.names if n not in stored.names]
        target = pa.schema([stored.field(n) if n in stored.names else native.field(n) for n in names])
        with self._errors(table):
            scan = tbl.scan(row_filter=_range_filter(table, rows) if rows else _always())
            tasks, files = list(scan.plan_files()), ArrowScan(tbl.metadata, tbl.io, tbl.schema(), scan.row_filter)

        def batches() -> Iterator[pa.RecordBatch]:
            for task in tasks:  # file by file: pyiceberg's own reader submits every file to its pool at once
                for batch in files.to_record_batches([task]):
                    columns = [batch.column(f.name) for f in target]
                    yield pa.RecordBatch.from_arrays(
                        [c if c.type == f.type else c.cast(f.type) for c, f in zip(columns, target, strict=True)],
                        schema=target,
                    )

        return pa.RecordBatchReader.from_batches(target, batches())

    # -- internals -----------------------------------------------------------------------------------------

    def _load(self, table: TableRef, *, missing_ok: bool = False) -> Any:
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        catalog = self._catalog()

        def attempt():
            try:
                return catalog.load_table(_ident(table))
            except (NoSuchTableError, NoSuchNamespaceError):
                return None

        tbl = self._retrying(attempt, f"loading {table} from")
        if tbl is None and not missing_ok:
            raise TerminalError(
                f"Iceberg catalog {self.where}: table {table} does not exist. Call ensure_table(table, schema) first."
            )
        return tbl

    def _create(self, table: TableRef, schema: pa.Schema, ready: pa.Schema) -> Any:
        """Create the table; None if another writer created it first."""
        from pyiceberg.exceptions import TableAlreadyExistsError

        catalog = self._catalog()
        ident = _ident(table)
        warehouse = catalog.properties.get("warehouse")
        location = f"{warehouse.rstrip('/')}/{_directory(ident)}" if warehouse else None
        with self._errors(table):
            catalog.create_namespace_if_not_exists(ident[:1])
            try:
                return catalog.create_table(
                    ident, schema=ready, location=location, properties={SCHEMA_PROPERTY: _encode(schema)}
                )
            except TableAlreadyExistsError:
                return None

    def _compare(self, tbl: Any, table: TableRef, schema: pa.Schema, can_add: bool) -> list[str]:
        existing = {f.name: _text(_ready(f.type, f.name)) for f in _arrow(tbl.schema())}
        incoming = {f.name: (_text(self._ready_field(f).type), f.nullable) for f in schema}
        return compare_columns(self.store, table, existing, incoming, can_add)

    def _target(self, tbl: Any, table: TableRef, schema: pa.Schema) -> pa.Schema:
        """The table's Arrow schema that data is cast to, after checking that the data fits it."""
        require_columns(schema, table, self.store)
        self._compare(tbl, table, schema, can_add=False)
        return _arrow(tbl.schema())

    def _ready_field(self, field: pa.Field) -> pa.Field:
        return pa.field(field.name, _ready(field.type, field.name), field.nullable)

    def _chunks(self, batches: Iterable[pa.RecordBatch], table: TableRef, target: pa.Schema):
        """Batches cast to the table's types, grouped into lists of about ``chunk_rows`` rows."""
        chunk: list[pa.RecordBatch] = []
        rows = 0
        for batch in batches:
            if batch.num_rows:
                chunk.append(self._conform(batch, table, target))
                rows += batch.num_rows
            if rows >= self._chunk_rows:
                yield chunk
                chunk, rows = [], 0
        if chunk:
            yield chunk

    def _conform(self, batch: pa.RecordBatch, table: TableRef, target: pa.Schema) -> pa.RecordBatch:
        arrays = []
        for field in target:
            column = batch.column(field.name)
            if column.type != field.type:
                # a safe cast refuses to drop nanoseconds (or to overflow) instead of doing it silently
                safe = not (self._truncate and (pa.types.is_timestamp(column.type) or pa.types.is_time(column.type)))
                try:
                    column = column.cast(field.type, safe=safe)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise TerminalError(_cast_message(table, field.name, column, exc)) from None
            if not field.nullable and column.null_count:
                raise TerminalError(
                    f"Iceberg table {table}: column {field.name!r} is required but the data has "
                    f"{column.null_count} null(s) in it. Fill them in the query, or recreate the table."
                )
            arrays.append(column)
        return pa.RecordBatch.from_arrays(arrays, schema=target)

    def _files(self, meta: Any, tbl: Any, chunks: Iterable[list[pa.RecordBatch]]) -> list[Any]:
        """Write each chunk as a Parquet file on pyiceberg's pool, at most ``in_flight`` at once.

        On failure, waits for the files in flight and deletes every file written, then re-raises.
        """
        from pyiceberg.io.pyarrow import write_file
        from pyiceberg.table import WriteTask

        write_uuid, counter = uuid.uuid4(), itertools.count()
        written: list[Any] = []
        pending: deque = deque()
        try:
            for chunk in chunks:
                task = WriteTask(
                    write_uuid=write_uuid, task_id=next(counter), schema=meta.schema(), record_batches=chunk
                )
                pending.append(write_file(tbl.io, meta, iter([task])))  # submits now, returns the result lazily
                while len(pending) >= self._in_flight:
                    written.extend(pending.popleft())
            while pending:
                written.extend(pending.popleft())
        except BaseException:
            for results in pending:
                try:
                    written.extend(results)
                except Exception:  # the first failure is the one to report
                    continue
            for data_file in written:
                try:
                    tbl.io.delete(data_file.file_path)
                except OSError:
                    continue
            raise
        return written

    def _append(self, txn: Any, tbl: Any, table: TableRef, target: pa.Schema, batches: Iterable) -> bool:
        files = self._files(txn.table_metadata, tbl, self._chunks(batches, table, target))
        if files:
            with txn.update_snapshot().fast_append() as append:
                for data_file in files:
                    append.append_data_file(data_file)
        return bool(files)

    def _delete(self, txn: Any, tbl: Any, table: TableRef, rows: RowRange) -> bool:
        """Stage the deletion of a range; False when no data file can hold a row of it (nothing staged)."""
        expr = _range_filter(table, rows)
        if not any(True for _ in tbl.scan(row_filter=expr).plan_files()):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pyiceberg warns when metrics matched but no row did
            txn.delete(expr)
        return True

    def _commit(self, txn: Any, tbl: Any, tally: Tally, changed: bool) -> WriteResult:
        if not changed:
            return tally.result(commits=0, snapshots=0)
        before = len(tbl.snapshots())  # the table object is updated in place by the commit
        committed = txn.commit_transaction()
        snapshot = committed.current_snapshot()
        new = len(committed.snapshots()) - before
        return tally.result(commits=1, snapshots=new, snapshot_id=snapshot.snapshot_id if snapshot else None)


# -- types ------------------------------------------------------------------------------------------------------


def _ready(t: pa.DataType, name: str) -> pa.DataType:
    """The Arrow type that Iceberg stores ``t`` as (the map in the module docstring)."""
    if pa.types.is_dictionary(t):
        return _ready(t.value_type, name)
    if pa.types.is_uint64(t):
        return pa.decimal128(20, 0)
    if pa.types.is_uint32(t):
        return pa.int64()
    if pa.types.is_integer(t) and t.bit_width <= 16:
        return pa.int32()
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", "UTC" if t.tz else None)
    if pa.types.is_time(t):
        return pa.time64("us")
    if pa.types.is_date(t):
        return pa.date32()
    if pa.types.is_decimal(t) and t.precision <= 38:
        return pa.decimal128(t.precision, t.scale)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t):
        item = t.value_field
        return pa.list_(pa.field("element", _ready(item.type, name), item.nullable))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _ready(f.type, name), f.nullable) for f in t])
    if pa.types.is_map(t):
        item = t.item_field
        return pa.map_(_ready(t.key_type, name), pa.field("value", _ready(item.type, name), item.nullable))
    if t in _PRIMITIVES or pa.types.is_fixed_size_binary(t):
        return t
    raise TerminalError(
        f"Iceberg: column {name!r} has Arrow type {t}, which has no Iceberg mapping. Cast it to a supported "
        "type (an integer, decimal(≤38), string, binary, timestamp, list or struct) in the query."
    )


def _text(t: pa.DataType) -> str:
    """The Iceberg name of an Iceberg-ready Arrow type (``long``, ``fixed[32]``, ``list<struct<a: int>>``)."""
    if t in _PRIMITIVES:
        return _PRIMITIVES[t]
    if pa.types.is_decimal(t):
        return f"decimal({t.precision}, {t.scale})"
    if pa.types.is_fixed_size_binary(t):
        return f"fixed[{t.byte_width}]"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_list(t):
        return f"list<{_text(t.value_type)}>"
    if pa.types.is_map(t):
        return f"map<{_text(t.key_type)}, {_text(t.item_type)}>"
    return "struct<" + ", ".join(f"{f.name}: {_text(f.type)}" for f in t) + ">"


def _arrow(schema: Any) -> pa.Schema:
    """An Iceberg schema as the Arrow schema pyiceberg writes and reads (large types, field ids dropped)."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    return schema_to_pyarrow(schema, include_field_ids=False)


def _reshape(txn: Any, ready: pa.Schema) -> None:
    """Give an (emptied) table the columns of ``ready``: drop the ones that differ, add the new ones."""
    current = _arrow(txn.table_metadata.schema())
    drop = [
        f.name
        for f in current
        if ready.get_field_index(f.name) < 0
        or _text(_ready(f.type, f.name)) != _text(ready.field(f.name).type)
        or f.nullable != ready.field(f.name).nullable
    ]
    add = [f for f in ready if f.name in drop or current.get_field_index(f.name) < 0]
    if drop:
        with txn.update_schema(allow_incompatible_changes=True) as update:
            for name in drop:
                update.delete_column((name,))
    if add:
        with txn.update_schema(allow_incompatible_changes=True) as update:
            update.union_by_name(pa.schema(add))


def _cast_message(table: TableRef, name: str, column: pa.Array, exc: Exception) -> str:
    where = f"Iceberg table {table}: column {name!r}"
    if pa.types.is_timestamp(column.type) or pa.types.is_time(column.type):
        return (
            f"{where} has nanoseconds that Iceberg (microsecond precision) would drop. Round it in the query, "
            "or pass truncate_timestamps=True to truncate to microseconds."
        )
    return f"{where} ({column.type}) does not fit the table's type: {exc}. Cast it in the query."


def _encode(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _stored_schema(tbl: Any) -> pa.Schema | None:
    encoded = tbl.properties.get(SCHEMA_PROPERTY)
    if not encoded:
        return None
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))


# -- rows ---------------------------------------------------------------------------------------------------------


def _always() -> Any:
    from pyiceberg.expressions import AlwaysTrue

    return AlwaysTrue()


def _range_filter(table: TableRef, rows: RowRange) -> Any:
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThanOrEqual, Reference

    # plain ints bind to long and to decimal(20, 0) columns alike, up to 2^64-1
    expr = GreaterThanOrEqual(Reference(table.range_column), rows.start)
    return expr if rows.end is None else And(expr, LessThanOrEqual(Reference(table.range_column), rows.end))


def _key_bounds(rows: pa.Table, key: list[str]) -> Any:
    """min <= key <= max on every orderable key column: prunes the files an upsert has to look into."""
    from pyiceberg.expressions import AlwaysTrue, And, GreaterThanOrEqual, LessThanOrEqual, Reference

    expr = AlwaysTrue()
    for name in key:
        column = rows.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_decimal(column.type)) or column.null_count:
            continue
        bounds = pc.min_max(column)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low is not None:
            expr = And(expr, GreaterThanOrEqual(Reference(name), low), LessThanOrEqual(Reference(name), high))
    return expr


def _last_per_key(rows: pa.Table, key: list[str]) -> pa.Table:
    """One row per key: the last one, as if the rows were applied in order."""
    position = "__amp_position"
    numbered = rows.select(key).append_column(position, pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    last = numbered.group_by(key, use_threads=False).aggregate([(position, "max")])
    if last.num_rows == rows.num_rows:
        return rows
    return rows.take(last[f"{position}_max"])


def _total(tbl: Any) -> int:
    snapshot = tbl.current_snapshot()
    return int(snapshot.summary["total-records"]) if snapshot is not None and snapshot.summary else 0


# -- names, connections, secrets ------------------------------------------------------------------------------


def _ident(table: TableRef) -> tuple[str, str]:
    namespace = table.namespace or DEFAULT_NAMESPACE
    if any(not level.strip() for level in namespace.split(".")):  # checked only: the tuple keeps the string whole
        raise TerminalError(
            f"Iceberg namespace {namespace!r} has an empty level: Iceberg's SQL catalog reads each dot in a "
            "namespace as a level separator. Use a namespace without leading, trailing or doubled dots."
        )
    return (namespace, table.name)


def _directory(ident: tuple[str, ...]) -> str:
    """A directory name for a table: readable, safe on any file system, unique through a hash of the names."""
    digest = hashlib.sha256("\x00".join(ident).encode()).hexdigest()[:12]
    parts = [re.sub(r"[^A-Za-z0-9_-]+", "_", part).strip("_")[:40] or "_" for part in ident]
    return f"{parts[0]}.db/{parts[1]}-{digest}"


def _sql_url(uri: str) -> Any:
    """The SQLAlchemy URL of a SQL catalog's ``uri``; None for other catalogs."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(uri)
    except ArgumentError:
        return None


def _is_transient(exc: BaseException) -> bool:
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

    if isinstance(exc, ConnectionError | TimeoutError | DisconnectionError | InterfaceError):
        return True
    if isinstance(exc, OperationalError):
        text = str(exc.orig or exc).lower()
        # connection failures and sqlite's "database is locked"; not "no such table" or syntax errors
        return any(s in text for s in ("connect", "refused", "timeout", "timed out", "locked", "terminat", "closed"))
    return False


def _keep_null_lists() -> None:
    """Put back the nulls that pyiceberg's projection of ``list<struct>`` arrays loses (iceberg-python#3833)."""
    from pyiceberg.io.pyarrow import ArrowProjectionVisitor

    original = ArrowProjectionVisitor.list
    if getattr(original, "amp_keeps_nulls", False):
        return

    def keep_nulls(self, list_type, list_array, value_array):
        result = original(self, list_type, list_array, value_array)
        if result is None or list_array is None or result.null_count == list_array.null_count:
            return result
        return pc.if_else(list_array.is_null(), pa.scalar(None, result.type), result)

    keep_nulls.amp_keeps_nulls = True  # type: ignore[attr-defined]
    ArrowProjectionVisitor.list = keep_nulls
