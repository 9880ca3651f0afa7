"""Apache Iceberg loader (pyiceberg, SQL catalog by default): one catalog commit and one snapshot per write.

Types: :func:`~.lakehouse.portable_type` maps what Iceberg lacks: unsigned integers widen (``uint32`` → ``long``,
``uint64`` → ``decimal(20, 0)``, exact up to 2^64-1), 8- and 16-bit integers become ``int``, nanoseconds become µs
(a sub-microsecond value fails naming the column unless ``truncate_timestamps=True``); ``fixed_size_binary(n)`` →
``fixed[n]``, and lists, structs and maps stay native. The data's Arrow schema is kept in the table property
``amp_dagster.arrow-schema``: data is checked against it Arrow type by Arrow type, and :meth:`read` casts back to
it, so uint64, ``timestamp[ns, +00:00]`` and ``list<item>`` come back exactly as they went in. Range and key
columns must not contain ``.``: pyiceberg reads it as a path into a nested field when it filters.

Writes: batches are cast to the table's types and cut into chunks of ``chunk_rows`` rows. Each chunk becomes one
Parquet file, written on pyiceberg's thread pool while the next chunk is read (``in_flight`` chunks being written,
one being gathered). All files of one call go into ONE fast-append snapshot, committed in ONE transaction with any
delete it needs. (``Transaction.append`` of a reader also makes one snapshot, but it submits every file of the
stream to its executor at once, so memory is not bounded; one ``append`` per chunk bounds memory but makes one
snapshot per chunk, and each snapshot costs a manifest and a manifest list.) Per call:

- ``write``: one APPEND snapshot; with ``replace`` first ``Transaction.delete`` of the range (whole files are
  dropped, partly matching files rewritten): up to three snapshots, one commit. ``delete`` is that alone.
- ``replace_table``: delete everything, reshape the schema if it changed (columns whose type changed are dropped
  and added again), append: two snapshots, one commit. A new table is created by that same commit.
- ``upsert``: per chunk, the last row of each key wins; files that may hold those keys (by column metrics) are
  read, anti-joined with the keys in Arrow and rewritten; the rewrites and the new rows form one OVERWRITE
  snapshot per chunk; one commit.

Nothing is visible before the commit: a failure leaves the previous snapshot current (or no table). The data files
of the append that failed are removed; files rewritten by a staged delete or an earlier upsert chunk are left to
orphan-file cleanup (pyiceberg 0.12 has no orphan-file removal yet; Spark's ``remove_orphan_files`` does it).
Operations that hold no stream (``delete``, ``ensure_table``) are retried when another writer committed first.

Identifiers are ``(namespace, name)`` tuples, never split by us; the SQL catalog itself reads a dot in a namespace
as a level separator (like Iceberg's JDBC catalog), so ``"a.b"`` is nested and an empty level is refused. Table
directories are sanitised names plus a hash, so no identifier becomes a path. Filters are pyiceberg expression
objects, never strings.

The first IcebergLoader built changes pyiceberg's behaviour for the whole process: pyiceberg 0.12 writes and reads a
null ``list<struct>`` as ``[]`` (apache/iceberg-python#3833), and :mod:`.pyiceberg_fix` installs the upstream fix
(#3834) in its place.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import AmpDagsterError, SchemaMismatchError, ServiceUnavailableError, TerminalError, TransientError, scrub
from ..ranges import RowRange
from ..retry import DEFAULT_RETRY, RetryPolicy, retry_call
from . import pyiceberg_fix
from .base import ArrowData, Capabilities, Feed, Loader, TableRef, WriteResult, missing_table, require_driver
from .batches import Tally, checked_batches, chunked, key_columns, last_per_key
from .lakehouse import portable_schema, portable_type
from .postgres import login_refusal
from .schema import canonical, cast_columns, check_schema, require_columns, schema_from_text, schema_to_text, widen

SCHEMA_PROPERTY = "amp_dagster.arrow-schema"
DEFAULT_NAMESPACE = "default"


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
        require_driver("pyiceberg", "iceberg", self.store)
        from sqlalchemy.engine import make_url

        pyiceberg_fix.install()
        if catalog is None:
            if warehouse is None:
                raise TerminalError("IcebergLoader needs a warehouse directory, or a catalog=... configuration")
            root = Path(warehouse).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            catalog = {"type": "sql", "uri": uri or f"sqlite:///{root / 'catalog.db'}", "warehouse": str(root)}
        self._props = {k: str(v) for k, v in catalog.items()}
        self._secrets = [v for k, v in self._props.items() if v and re.search("password|secret|token|credent", k, re.I)]
        uri = self._props.get("uri", "")
        self.where = re.sub(r"//[^/@]*@", "//", uri) or self._props.get("type", "catalog")  # no user:password@
        if uri.startswith(("sqlite", "postgresql")):  # a SQL catalog, as pyiceberg infers it
            url = make_url(uri)
            self.where = f"{url.host}:{url.port or 5432}/{url.database}" if url.host else f"sqlite:{url.database}"
            self._secrets += [url.password] if url.password else []
            if url.get_backend_name() == "postgresql":  # libpq waits minutes for a host that does not answer
                self._props["uri"] = url.set(query={"connect_timeout": "10", **url.query}).render_as_string(False)
        self._name, self._truncate = name, truncate_timestamps
        self._chunk_rows, self._in_flight, self._retry = max(1, chunk_rows), max(1, in_flight), retry
        self._lock = threading.Lock()
        self._catalog_obj: Any = None

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
        with self._translating(None):
            return retry_call(fn, self._retry, _is_transient, f"{what} to the Iceberg catalog at {self.where}")

    def _again(self, fn: Callable[[], Any], what: str) -> Any:
        """Retry an operation that holds no stream (nothing is consumed twice) when another writer committed first.
        Exactly TransientError: an unreachable catalog (a subclass) was retried on connecting already."""
        return retry_call(fn, self._retry, lambda e: type(e) is TransientError, f"Iceberg {what}")

    def _translate(self, exc: BaseException, table: TableRef | None, action: str = "") -> AmpDagsterError:
        from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError, ValidationException
        from sqlalchemy.exc import SQLAlchemyError

        where = f"Iceberg catalog {self.where}" + (f" table {table}" if table else "")
        # pyiceberg retried the commit itself and found a conflict it cannot resolve (or the table got created)
        if isinstance(exc, CommitFailedException | ValidationException | TableAlreadyExistsError):
            return TransientError(f"{where}: another writer committed first ({self._scrub(exc)}). Run the write again.")
        refused = isinstance(exc, SQLAlchemyError) and login_refusal(exc, f"Iceberg catalog at {self.where}")
        if refused:  # a PostgreSQL catalog refused the login: which role or database, and no retry
            return refused
        if isinstance(exc, SQLAlchemyError | ConnectionError | TimeoutError) and _is_transient(exc):
            return ServiceUnavailableError(
                f"Iceberg catalog at {self.where} is unreachable after {self._retry.attempts} attempts: "
                f"{self._scrub(exc)}. Check that its server runs and the host, port and credentials are right."
            )
        return TerminalError(f"{where}: {action + ': ' if action else ''}{type(exc).__name__}: {self._scrub(exc)}")

    def _scrub(self, exc: BaseException) -> str:
        text = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        return scrub(text, *self._secrets)

    def close(self) -> None:
        with self._lock:
            if self._catalog_obj is not None:
                self._catalog_obj.close()
                self._catalog_obj = None

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        from pyiceberg.exceptions import TableAlreadyExistsError

        ready = self._portable(schema, table)

        def run() -> None:
            tbl = self._load(table, missing_ok=True)
            with self._translating(table):
                if tbl is None:
                    try:
                        self._create(table, schema, ready, staged=False)
                        return
                    except TableAlreadyExistsError:  # another writer created it first: check it like any table
                        tbl = self._load(table)
                stored = _stored_schema(tbl)
                added = self._check(tbl, table, schema, stored, can_add=True)
                if not added and stored is not None:
                    return
                txn = tbl.transaction()
                if added:
                    with txn.update_schema() as update:
                        update.union_by_name(pa.schema([ready.field(n) for n in added]))
                merged = widen(stored, schema, added) if stored is not None else schema
                txn.set_properties({SCHEMA_PROPERTY: schema_to_text(merged)})
                txn.commit_transaction()

        self._again(run, f"ensure_table {table}")

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store, replace)
        tbl = self._load(table)
        tally, feed = Tally(), Feed(batches)
        with self._translating(table, feed=feed):
            target = self._target(tbl, table, schema)
            txn, before = tbl.transaction(), len(tbl.snapshots())
            deleted = replace is not None and self._delete(txn, tbl, table, replace)
            appended = self._append(txn, tbl.io, table, target, tally.count(feed))
            return self._commit(txn, tally, before) if deleted or appended else tally.result(commits=0, snapshots=0)

    def delete(self, table: TableRef, rows: RowRange) -> int:
        def run() -> int:
            tbl = self._load(table, missing_ok=True)
            if tbl is None:
                return 0
            _check_range(tbl, table, rows)
            with self._translating(table):
                txn, total = tbl.transaction(), _total(tbl)
                return total - _total(txn.commit_transaction()) if self._delete(txn, tbl, table, rows) else 0

        return self._again(run, f"delete {rows} from {table}")

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        from pyiceberg.expressions import AlwaysTrue
        from pyiceberg.io import load_file_io

        schema, batches = checked_batches(data, table, self.store)
        ready = self._portable(schema, table)
        tbl = self._load(table, missing_ok=True)
        tally, feed = Tally(), Feed(batches)
        with self._translating(table, feed=feed):
            if tbl is None:  # created by the commit that brings the data: a failure leaves no table behind
                txn, before = self._create(table, schema, ready, staged=True), 0
                meta = txn.table_metadata
                io = load_file_io({**self._catalog().properties, **meta.properties}, meta.location)
            else:
                txn, before, io = tbl.transaction(), len(tbl.snapshots()), tbl.io
                if tbl.current_snapshot() is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # "did not match any records" on an emptied table
                        txn.delete(AlwaysTrue())
                _reshape(txn, ready)
                txn.set_properties({SCHEMA_PROPERTY: schema_to_text(schema)})
            self._append(txn, io, table, _arrow(txn.table_metadata.schema()), tally.count(feed))
            return self._commit(txn, tally, before)

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        from pyiceberg.expressions import AlwaysTrue
        from pyiceberg.io.pyarrow import ArrowScan
        from pyiceberg.table import DataScan

        key = list(key_columns(table, self.store))
        schema, batches = checked_batches(data, table, self.store)
        tbl = self._load(table)
        tally, feed = Tally(), Feed(batches)
        with self._translating(table, feed=feed):
            target = self._target(tbl, table, schema)
            txn, before = tbl.transaction(), len(tbl.snapshots())
            for chunk in chunked(self._cast(tally.count(feed), table, target), self._chunk_rows):
                rows = last_per_key(pa.Table.from_batches(chunk, target), key)
                keys, bounds, meta = rows.select(key), _key_bounds(rows, key), txn.table_metadata
                with txn.update_snapshot().overwrite() as overwrite:
                    overwrite.delete_by_predicate(bounds)
                    for task in DataScan(table_metadata=meta, io=tbl.io, row_filter=bounds).plan_files():
                        old = ArrowScan(meta, tbl.io, meta.schema(), AlwaysTrue()).to_table([task])
                        kept = old.join(keys, key, join_type="left anti")
                        if kept.num_rows == old.num_rows:
                            continue
                        overwrite.delete_data_file(task.file)
                        if kept.num_rows:
                            kept = kept.select(target.names).cast(target)
                            for data_file in self._files(meta, tbl.io, [kept.to_batches()]):
                                overwrite.append_data_file(data_file)
                    for data_file in self._files(meta, tbl.io, [rows.to_batches()]):
                        overwrite.append_data_file(data_file)
            return self._commit(txn, tally, before) if tally.rows else tally.result(commits=0, snapshots=0)

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        from pyiceberg.expressions import AlwaysTrue
        from pyiceberg.io.pyarrow import ArrowScan

        tbl = self._load(table)
        if rows is not None:
            _check_range(tbl, table, rows)
        native, stored = _arrow(tbl.schema()), _stored_schema(tbl) or pa.schema([])
        names = [n for n in stored.names if n in native.names] + [n for n in native.names if n not in stored.names]
        target = pa.schema([stored.field(n) if n in stored.names else native.field(n) for n in names])
        with self._translating(table):
            scan = tbl.scan(row_filter=_range_filter(table, rows) if rows else AlwaysTrue())
            tasks, files = list(scan.plan_files()), ArrowScan(tbl.metadata, tbl.io, tbl.schema(), scan.row_filter)

        def batches() -> Iterator[pa.RecordBatch]:
            with self._translating(table):
                for task in tasks:  # file by file: pyiceberg's own reader submits every file to its pool at once
                    for batch in files.to_record_batches([task]):
                        yield cast_columns(batch, target, store=self.store, table=table, reading=True)

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
            raise missing_table(self.store, f"catalog {self.where}", table)
        return tbl

    def _create(self, table: TableRef, schema: pa.Schema, ready: pa.Schema, *, staged: bool) -> Any:
        """Create the table now, or (``staged``) a transaction whose commit creates it."""
        catalog = self._catalog()
        ident = _ident(table)
        warehouse = catalog.properties.get("warehouse")
        location = f"{warehouse.rstrip('/')}/{_directory(ident)}" if warehouse else None
        catalog.create_namespace_if_not_exists(ident[:1])
        create = catalog.create_table_transaction if staged else catalog.create_table
        return create(ident, schema=ready, location=location, properties={SCHEMA_PROPERTY: schema_to_text(schema)})

    def _portable(self, schema: pa.Schema, table: TableRef) -> pa.Schema:
        require_columns(schema, table, self.store)
        for column in (table.range_column, *table.key):
            if "." in column:
                raise SchemaMismatchError(
                    f"Iceberg table {table}: column {column!r} has a '.', which pyiceberg reads as a path into a "
                    "nested field when it deletes or upserts by it. Rename the column in the query (e.g. '_')."
                )
        return portable_schema(schema, store=self.store, small_ints=False, keep_fixed_binary=True, time_as_int=False)

    def _check(self, tbl: Any, table: TableRef, schema: pa.Schema, stored: pa.Schema | None, can_add: bool):
        """Check the data against the table's stored Arrow types (if it has them), then against its Iceberg types,
        which another engine may have changed since: a column dropped there must not silently drop data here."""
        if stored is not None:
            check_schema(self.store, table, stored, schema, can_add=can_add)
        existing = {f.name: _kind(f.type, f.name) for f in _arrow(tbl.schema())}
        incoming = {f.name: (_kind(f.type, f.name), f.nullable) for f in schema}
        return check_schema(self.store, table, existing, incoming, can_add=can_add)

    def _target(self, tbl: Any, table: TableRef, schema: pa.Schema) -> pa.Schema:
        """The table's Arrow schema that data is cast to, after checking that the data fits it."""
        self._check(tbl, table, schema, _stored_schema(tbl), can_add=False)
        return _arrow(tbl.schema())

    def _cast(self, batches: Iterable[pa.RecordBatch], table: TableRef, target: pa.Schema) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield cast_columns(batch, target, store=self.store, table=table, truncate_timestamps=self._truncate)

    def _files(self, meta: Any, io: Any, chunks: Iterable[list[pa.RecordBatch]]) -> list[Any]:
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
                pending.append(write_file(io, meta, iter([task])))  # submits now, returns the result lazily
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
                    io.delete(data_file.file_path)
                except OSError:
                    continue
            raise
        return written

    def _append(self, txn: Any, io: Any, table: TableRef, target: pa.Schema, batches: Iterable) -> bool:
        chunks = chunked(self._cast(batches, table, target), self._chunk_rows)
        files = self._files(txn.table_metadata, io, chunks)
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

    def _commit(self, txn: Any, tally: Tally, before: int) -> WriteResult:
        """Commit; ``before`` is how many snapshots the table had when the transaction began."""
        committed = txn.commit_transaction()
        snapshot = committed.current_snapshot()
        new = len(committed.snapshots()) - before
        return tally.result(commits=1, snapshots=new, snapshot_id=snapshot.snapshot_id if snapshot else None)


# -- types, rows ------------------------------------------------------------------------------------------------


def _kind(t: pa.DataType, column: str) -> str:
    """What Iceberg stores ``t`` as, comparable across Arrow spellings (``int16`` and ``int32`` are both int)."""
    options = {"small_ints": False, "keep_fixed_binary": True, "time_as_int": False}
    return str(canonical(portable_type(t, column, store="Iceberg", **options)))


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
        or _kind(f.type, f.name) != _kind(ready.field(f.name).type, f.name)
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


def _stored_schema(tbl: Any) -> pa.Schema | None:
    return schema_from_text(tbl.properties.get(SCHEMA_PROPERTY))


def _check_range(tbl: Any, table: TableRef, rows: RowRange) -> None:
    """Refuse a range the table's range column cannot hold, before any file is planned or deleted.

    The column's type is the Arrow type the table was created for or, in a table without it, the Iceberg type's
    (a ``decimal(p, 0)`` holds uint64 bounds and compares with any of them exactly)."""
    column = table.range_column
    stored = _stored_schema(tbl)
    if stored is not None and stored.get_field_index(column) >= 0:
        arrow = stored.field(column).type
    else:
        native = _arrow(tbl.schema())
        if native.get_field_index(column) < 0:
            raise SchemaMismatchError(
                f"Iceberg table {table} has no column {column!r} to select rows by range; it has "
                f"{', '.join(native.names)}. Set TableRef(range_column=...) to one of them."
            )
        arrow = native.field(column).type
        if pa.types.is_decimal(arrow) and arrow.scale == 0:
            arrow = pa.uint64()
        elif not pa.types.is_integer(arrow):
            raise SchemaMismatchError(
                f"Iceberg table {table}: range column {column!r} is {arrow}, not an integer type. Set "
                "TableRef(range_column=...) to an integer column of the table."
            )
    rows.check(column, arrow, f"Iceberg table {table}")


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


def _total(tbl: Any) -> int:
    snapshot = tbl.current_snapshot()
    return int(snapshot.summary["total-records"]) if snapshot is not None and snapshot.summary else 0


# -- names, connections ---------------------------------------------------------------------------------------


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


def _is_transient(exc: BaseException) -> bool:
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

    if isinstance(exc, ConnectionError | TimeoutError | DisconnectionError | InterfaceError):
        return True
    if isinstance(exc, OperationalError):
        if login_refusal(exc, "") is not None:
            return False
        text = str(exc.orig or exc).lower()
        # connection failures and sqlite's "database is locked"; not "no such table" or syntax errors
        return any(s in text for s in ("connect", "refused", "timeout", "timed out", "locked", "terminat", "closed"))
    return False
