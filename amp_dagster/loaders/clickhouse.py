"""ClickHouse loader: Arrow IPC streamed into MergeTree tables with clickhouse-connect (a server or in-process chdb).

Type map (Arrow → ClickHouse; the table COMMENT keeps the Arrow schema, data is checked against it, and ``read()``
gives the original types back): integers → ``Int8..Int64``/``UInt8..UInt64``; ``float16/32`` → ``Float32``;
``bool`` → ``Bool``; ``string``/``binary`` → ``String``; ``fixed_size_binary(n)`` → ``FixedString(n)``;
``decimal(p,s)`` → ``Decimal(p, s)``; ``timestamp[unit, tz]`` → ``DateTime64(0|3|6|9, 'UTC')`` (nanoseconds kept);
``date32/64`` → ``Date32``; lists → ``Array``; structs → named ``Tuple``; nullable fields → ``Nullable(...)``.
ClickHouse has no ``Nullable(Array)``, so a nullable list is kept as ``Nullable(Tuple(v Array(...)))`` and unwrapped
on read (nullable tuples need a recent server: tested on 26.9). Maps, times, durations and nulls are refused with
the column named.

Engine: a table with ``TableRef.key`` is a ``ReplacingMergeTree ORDER BY key`` (``upsert`` is an insert; the last
row inserted for a key wins), read with ``FINAL``; without a key, a ``MergeTree ORDER BY`` the range column. Keyed
tables get a ``minmax`` skip index on the range column so range deletes and reads skip granules. Known limit:
deleting the newest version of a key whose older version lies outside the range brings the older version back
(PostgreSQL would delete the key). Only a key written again with another range value leaves such versions; amp's
keys include the block number, so chain data never does.

Writes: one ``INSERT ... FORMAT ArrowStream`` per ``insert_rows`` rows, streamed batch by batch. chdb runs the engine
in this process, and it gathers an INSERT's rows into one block before writing a part, so peak memory follows
``insert_rows`` (1M logs rows: 367 MB at the default 131,072, 834 MB at 1,048,576; as fast). A server makes a part
per INSERT either way and gets the body streamed; 131,072 rows is still a large insert for it. ``write(replace=...)``
converts the first batch, then runs a lightweight ``DELETE`` (visible when it returns) and inserts: ClickHouse has
no multi-statement transactions, so a failure after the delete leaves the range partly written, but repeating the
write leaves exactly one copy. ``replace_table`` fills a staging table and swaps it in with ``EXCHANGE TABLES``; a
failed write leaves the old table untouched.

Tables amp_dagster did not create (no schema in the comment) are compared by ClickHouse type, with the table's
nullability; ``ensure_table`` adopts one whose comment is empty by writing the schema into it. Identifiers are
backquoted with the driver's ``escape_str``; values are bound server-side (``{lo:UInt64}``), except the table
COMMENT, which DDL takes only as a literal (the driver's ``format_str``).
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import AmpDagsterError, ConfigError, ServiceUnavailableError, TerminalError, TransientError, scrub
from ..ranges import RowRange
from ..retry import DEFAULT_RETRY, RetryPolicy, retry_call
from .base import ArrowData, Capabilities, Loader, TableRef, WriteResult, missing_table, require_driver
from .batches import Tally, checked_batches, key_columns
from .schema import cast_columns, check_schema, require_columns, schema_from_text, schema_to_text, widen

COMMENT_TAG = "amp_dagster:"
_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end-of-stream marker of the Arrow IPC stream format
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOW_CARDINALITY = re.compile(r"^LowCardinality\((.*)\)$")  # a storage detail the data need not match
# server error codes worth retrying: timeouts, overload, too many parts, network, keeper, deadlock avoided
_TRANSIENT_CODES = {159, 202, 203, 209, 210, 241, 242, 252, 285, 319, 473, 999}
_INSERT_SETTINGS = {"async_insert": 0}  # a synchronous insert: the rows are committed when the call returns
_READ_SETTINGS = {"output_format_arrow_string_as_string": 0, "output_format_arrow_compression_method": "none"}
_SCALARS = {pa.bool_(): "Bool", pa.float32(): "Float32", pa.float64(): "Float64", pa.date32(): "Date32"}
_INTEGERS = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64")
_SCALARS.update({getattr(pa, name.lower())(): name for name in _INTEGERS})
_SCALARS.update(dict.fromkeys([pa.string(), pa.large_string(), pa.binary(), pa.large_binary()], "String"))
# Arrow types ClickHouse's Arrow reader does not take, and what they are sent as
_SEND_AS = {
    pa.float16(): pa.float32(),
    pa.date64(): pa.date32(),
    pa.string_view(): pa.string(),
    pa.binary_view(): pa.binary(),
}
_PRECISION = {"s": 0, "ms": 3, "us": 6, "ns": 9}


@dataclass(frozen=True)
class _Meta:
    engine: str
    columns: dict[str, str]  # name → ClickHouse type without a top-level LowCardinality, in table order
    sorting_key: frozenset[str]
    comment: str
    schema: pa.Schema | None  # the Arrow schema kept in the comment

    def target(self, schema: pa.Schema) -> pa.Schema:
        """What data is cast to: the stored Arrow schema, or the data's with the table's nullability."""
        if self.schema is not None:
            return self.schema
        return pa.schema([f.with_nullable(self.nullable(f.name)) if f.name in self.columns else f for f in schema])

    def nullable(self, name: str) -> bool:
        return self.columns.get(name, "").startswith("Nullable(")


class ClickHouseLoader(Loader):
    """Loads Arrow into ClickHouse MergeTree tables, on a server over HTTP or in-process through chdb.

    Pass a ``dsn`` (``http://host:8123/db``, or ``chdb:///path`` for the in-process engine) or ``host``/``port``/
    ``username``/``password``/``database``; other keywords go to ``clickhouse_connect.get_client``. Without a
    password, ``CLICKHOUSE_PASSWORD`` is used. The client is created on first use, with bounded retries.

    >>> with ClickHouseLoader("chdb:///var/lib/amp/chdb") as ch:  # doctest: +SKIP
    ...     t = TableRef("logs", namespace="eth", key=("block_num", "log_index"))
    ...     ch.ensure_table(t, logs.schema)
    ...     ch.write(t, logs, replace=RowRange(0, 999))
    >>> ClickHouseLoader(host="ch.internal", port=8443, secure=True, password=secret)  # doctest: +SKIP
    """

    store = "ClickHouse"
    capabilities = Capabilities(
        atomic_replace_range=False, atomic_replace_table=True, upsert=True, add_columns=True, flush_rows=131_072
    )

    def __init__(
        self,
        dsn: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        database: str | None = None,
        secure: bool = False,
        connect_timeout: int = 10,
        insert_rows: int = 131_072,
        retry: RetryPolicy = DEFAULT_RETRY,
        **options: Any,
    ) -> None:
        parsed = urlparse(dsn or "")
        require_driver("clickhouse_connect", "clickhouse", self.store)
        if parsed.scheme == "chdb":
            require_driver("chdb", "chdb", "ClickHouse in-process (chdb://)")
        password = os.environ.get("CLICKHOUSE_PASSWORD", "") if password is None else password
        self._secrets = (password, parsed.password)
        self._chdb = parsed.scheme == "chdb"
        self._args = dict(dsn=dsn, host=host, port=port, username=username, password=password, **options)
        if database is not None:
            self._args["database"] = database
        if self._chdb:
            self.where = dsn
        else:  # HTTP has no session here, so one client may serve several threads
            self._args.update(secure=secure, connect_timeout=connect_timeout, autogenerate_session_id=False)
            default_port = 8443 if secure or parsed.scheme == "https" else 8123
            self.where = f"{host or parsed.hostname or 'localhost'}:{port or parsed.port or default_port}"
        self._insert_rows, self._retry = insert_rows, retry
        self._conn = None
        self._lock = threading.Lock()
        self._default_db: str | None = None

    # -- connection and errors -----------------------------------------------------------------------------

    def _client(self):
        with self._lock:
            if self._conn is None:
                import clickhouse_connect

                args = {k: v for k, v in self._args.items() if v not in (None, "")}
                try:
                    self._conn = retry_call(
                        lambda: clickhouse_connect.get_client(**args),
                        self._retry,
                        _is_transient,
                        f"connecting to ClickHouse {self.where}",
                    )
                except Exception as exc:
                    raise self._translate(exc, None, "connect") from None
            return self._conn

    def _run(self, fn, table: TableRef | None, what: str, *, retry: bool = True):
        """Call ``fn(client)``; driver errors come out typed, anything else (a dying source) unchanged."""
        from clickhouse_connect.driver.exceptions import ClickHouseError

        client = self._client()
        with self._translating(table, errors=ClickHouseError):
            if not retry:
                return fn(client)
            return retry_call(lambda: fn(client), self._retry, _is_transient, f"ClickHouse {what} on {table}")

    def _command(self, table: TableRef | None, sql: str, params: dict | None = None, settings: dict | None = None):
        return self._run(lambda c: c.command(sql, parameters=params, settings=settings), table, "command")

    def _rows(self, table: TableRef | None, sql: str, params: dict | None = None) -> list[tuple]:
        return self._run(lambda c: c.query(sql, parameters=params).result_rows, table, "query")

    def _translate(self, exc: BaseException, table: TableRef | None, action: str = "") -> AmpDagsterError:
        text, where = scrub(str(exc), *self._secrets), f"ClickHouse {self.where}" + (f" table {table}" if table else "")
        connecting = action == "connect"
        if connecting and self._chdb:
            return ConfigError(
                f"{where}: chdb cannot open its engine ({text}). chdb runs one engine path per process: use one "
                "path, or close every client of the other path first."
            )
        if _is_transient(exc) and getattr(exc, "code", None) is None:
            tries = f" after {self._retry.attempts} attempts" if connecting else ""
            return ServiceUnavailableError(
                f"ClickHouse at {self.where} is unreachable{tries}: {text}. Check that the server runs and that the "
                "host, port and credentials are right."
            )
        return (TransientError if _is_transient(exc) else TerminalError)(f"{where}: {text}")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        require_columns(schema, table, self.store)
        meta = self._meta(table)
        if meta is None:
            self._create(table, schema)
            return
        # against the stored schema, a column that an earlier call added but could not record counts as new
        # again: ADD COLUMN IF NOT EXISTS passes over it and the comment is written
        added = self._check(table, meta, schema, can_add=True)
        for name in added:
            ch_type = _ch_type(name, schema.field(name).type, True)
            self._command(table, f"ALTER TABLE {self._q(table)} ADD COLUMN IF NOT EXISTS {_id(name)} {ch_type}")
        if (added and meta.schema is not None) or not meta.comment:  # never overwrite a foreign comment
            stored = widen(meta.schema, schema, added) if meta.schema is not None else meta.target(schema)
            self._command(table, f"ALTER TABLE {self._q(table)} MODIFY COMMENT {_comment(stored)}")

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store, replace)
        return self._append(table, self._require(table), schema, batches, replace)

    def delete(self, table: TableRef, rows: RowRange) -> int:
        meta = self._meta(table)
        return 0 if meta is None else self._delete(table, meta, rows)

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store)
        # a name per call, so that two refreshes never share a staging table
        stage = TableRef(
            f"{table.name}__amp_stage_{uuid.uuid4().hex[:8]}", table.namespace, table.range_column, table.key
        )
        self._create(stage, schema)
        try:
            result = self._append(stage, self._require(stage), schema, batches)
            verb = "RENAME TABLE {} TO {}" if self._meta(table) is None else "EXCHANGE TABLES {} AND {}"
            self._command(table, verb.format(self._q(stage), self._q(table)))
        except BaseException:
            with suppress(Exception):  # the write's own error is the one to report
                self._command(stage, f"DROP TABLE IF EXISTS {self._q(stage)}")
            raise
        self._command(stage, f"DROP TABLE IF EXISTS {self._q(stage)}")
        return result

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        key = key_columns(table, self.store)
        schema, batches = checked_batches(data, table, self.store)
        meta = self._require(table)
        if meta.engine != "ReplacingMergeTree" or meta.sorting_key != frozenset(key):
            raise TerminalError(
                f"ClickHouse table {table} is a {meta.engine} ordered by ({', '.join(sorted(meta.sorting_key))}), "
                f"so rows cannot be replaced by the key ({', '.join(key)}). Recreate it with replace_table and "
                "TableRef(key=...) set: keyed tables are created as ReplacingMergeTree ordered by the key."
            )
        return self._append(table, meta, schema, batches)

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        meta = self._require(table)
        final = " FINAL" if meta.engine == "ReplacingMergeTree" else ""
        where, params = _range_sql(table, rows)
        sql = f"SELECT * FROM {self._q(table)}{final}{where}"
        stream = self._run(lambda c: c.raw_stream(sql, params, _READ_SETTINGS, fmt="ArrowStream"), table, "read")
        reader = pa.ipc.open_stream(stream)
        stored = meta.schema or pa.schema([])
        target = pa.schema([stored.field(f.name) if f.name in stored.names else f for f in reader.schema])

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                for batch in reader:
                    arrays = [_from_store(a, f.type, f.nullable) for a, f in zip(batch.columns, target, strict=True)]
                    unwrapped = pa.RecordBatch.from_arrays(arrays, names=target.names)
                    yield cast_columns(unwrapped, target, store=self.store, table=table, reading=True)
            finally:
                stream.close()

        return pa.RecordBatchReader.from_batches(target, batches())

    # -- internals -----------------------------------------------------------------------------------------

    def _database(self, table: TableRef) -> str:
        if table.namespace:
            return table.namespace
        if self._default_db is None:
            self._default_db = str(self._command(None, "SELECT currentDatabase()"))
        return self._default_db

    def _q(self, table: TableRef) -> str:
        # always database-qualified: clickhouse-connect passes a dotted table name through without quoting it
        return f"{_id(self._database(table))}.{_id(table.name)}"

    def _meta(self, table: TableRef) -> _Meta | None:
        params = {"db": self._database(table), "name": table.name}
        found = self._rows(
            table,
            "SELECT engine, comment FROM system.tables WHERE database = {db:String} AND name = {name:String}",
            params,
        )
        if not found:
            return None
        engine, comment = found[0]
        columns = self._rows(
            table,
            "SELECT name, type, is_in_sorting_key FROM system.columns "
            "WHERE database = {db:String} AND table = {name:String} ORDER BY position",
            params,
        )
        schema = schema_from_text(comment[len(COMMENT_TAG) :]) if comment.startswith(COMMENT_TAG) else None
        types = {n: _LOW_CARDINALITY.sub(r"\1", t) for n, t, _ in columns}
        return _Meta(engine, types, frozenset(n for n, _, k in columns if k), comment, schema)

    def _require(self, table: TableRef) -> _Meta:
        meta = self._meta(table)
        if meta is None:
            raise missing_table(self.store, self.where, table)
        return meta

    def _check(self, table: TableRef, meta: _Meta, schema: pa.Schema, *, can_add: bool) -> list[str]:
        """Check the data against the stored Arrow schema, or by ClickHouse type for a table amp_dagster did not
        create; returns the columns to add."""
        if meta.schema is not None:
            return check_schema(self.store, table, meta.schema, schema, can_add=can_add)
        incoming = {f.name: (_ch_type(f.name, f.type, meta.nullable(f.name)), f.nullable) for f in schema}
        return check_schema(self.store, table, meta.columns, incoming, can_add=can_add)

    def _create(self, table: TableRef, schema: pa.Schema) -> None:
        if table.namespace:
            self._command(table, f"CREATE DATABASE IF NOT EXISTS {_id(table.namespace)}")
        columns = [f"{_id(f.name)} {_ch_type(f.name, f.type, f.nullable)}" for f in schema]
        order = table.key or (table.range_column,)
        if table.key and table.key[0] != table.range_column:
            columns.append(f"INDEX amp_range {_id(table.range_column)} TYPE minmax GRANULARITY 1")
        nullable_key = any(schema.field(name).nullable for name in order)
        self._command(
            table,
            f"CREATE TABLE IF NOT EXISTS {self._q(table)} ({', '.join(columns)}) "
            f"ENGINE = {'ReplacingMergeTree' if table.key else 'MergeTree'} "
            f"ORDER BY ({', '.join(map(_id, order))})"
            f"{' SETTINGS allow_nullable_key = 1' if nullable_key else ''} COMMENT {_comment(schema)}",
        )

    def _delete(self, table: TableRef, meta: _Meta, rows: RowRange) -> int:
        # counting first (2-20 ms: the range prunes granules) skips the DELETE, a mutation of 25-230 ms, when the
        # range is empty, as it is for most incremental writes
        final = " FINAL" if meta.engine == "ReplacingMergeTree" else ""
        where, params = _range_sql(table, rows)
        count = int(self._rows(table, f"SELECT count() FROM {self._q(table)}{final}{where}", params)[0][0])
        if count:
            self._command(table, f"DELETE FROM {self._q(table)}{where}", params, {"lightweight_deletes_sync": 2})
        return count

    def _append(
        self, table: TableRef, meta: _Meta, schema: pa.Schema, batches, replace: RowRange | None = None
    ) -> WriteResult:
        """Check the data, delete ``replace`` if given, and stream the batches as ``INSERT ... FORMAT ArrowStream``
        statements of ``insert_rows`` rows each."""
        self._check(table, meta, schema, can_add=False)
        tally, target = Tally(), meta.target(schema)
        pending = (self._converted(table, target, batch) for batch in tally.count(batches))
        batch = next(pending, None)  # a source or type error on the first batch fails before anything is deleted
        if replace is not None:
            self._delete(table, meta, replace)
        commits = 0
        while batch is not None:
            body = _ipc_stream(batch, pending, self._insert_rows)
            self._run(
                lambda c, body=body: c.raw_insert(self._q(table), None, body, _INSERT_SETTINGS, "ArrowStream"),
                table,
                "insert",
                retry=False,  # the batches are consumed as they are sent: a retry could not send them again
            )
            commits += 1
            batch = next(pending, None)
        return tally.result(commits)

    def _converted(self, table: TableRef, target: pa.Schema, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch cast to the table's Arrow types (errors name the column), then as ClickHouse takes it."""
        batch = cast_columns(batch, target, store=self.store, table=table)
        arrays = [_to_store(a, f.type, f.nullable) for a, f in zip(batch.columns, target, strict=True)]
        return pa.RecordBatch.from_arrays(arrays, names=target.names)


# -- SQL helpers (identifiers go through the driver's escaping, always backquoted) ------------------------------


def _id(name: str) -> str:
    # clickhouse-connect's quote_identifier passes a name that already looks quoted (`x` or "x") through as it is,
    # which would change its meaning; escape_str is its escaping without that guess
    from clickhouse_connect.driver.binding import escape_str

    return f"`{escape_str(name)}`"


def _comment(schema: pa.Schema) -> str:
    from clickhouse_connect.driver.binding import format_str

    return format_str(COMMENT_TAG + schema_to_text(schema))  # DDL takes no bound parameters


def _range_sql(table: TableRef, rows: RowRange | None) -> tuple[str, dict]:
    if rows is None:
        return "", {}
    clause = f" WHERE {_id(table.range_column)} >= {{lo:UInt64}}"
    if rows.end is None:
        return clause, {"lo": rows.start}
    return f"{clause} AND {_id(table.range_column)} <= {{hi:UInt64}}", {"lo": rows.start, "hi": rows.end}


def _ipc_stream(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch], limit: int) -> Iterator[bytes]:
    """One Arrow IPC stream of ``first`` and the following batches, until ``limit`` rows (``rest`` stays open)."""
    yield first.schema.serialize().to_pybytes()
    batch, rows = first, 0
    while batch is not None:
        yield batch.serialize().to_pybytes()
        rows += batch.num_rows
        batch = next(rest, None) if rows < limit else None
    yield _EOS


def _is_transient(exc: BaseException) -> bool:
    from clickhouse_connect.driver.exceptions import OperationalError

    code = getattr(exc, "code", None)
    return code in _TRANSIENT_CODES or (isinstance(exc, OperationalError) and code is None)


# -- the type map ---------------------------------------------------------------------------------------------


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _ch_type(name: str, t: pa.DataType, nullable: bool) -> str:
    """The ClickHouse type for an Arrow type, spelled the way system.columns prints it."""
    if pa.types.is_dictionary(t):
        return _ch_type(name, t.value_type, nullable)
    if _is_list(t):
        inner = f"Array({_ch_type(name, t.value_type, t.value_field.nullable)})"
        return f"Nullable(Tuple(v {inner}))" if nullable else inner
    if pa.types.is_struct(t) and t.num_fields:
        names = [f.name if _PLAIN_NAME.fullmatch(f.name) and f.name.lower() != "null" else _id(f.name) for f in t]
        inner = (
            f"Tuple({', '.join(f'{n} {_ch_type(name, f.type, f.nullable)}' for n, f in zip(names, t, strict=True))})"
        )
    elif pa.types.is_fixed_size_binary(t):
        inner = f"FixedString({t.byte_width})"
    elif pa.types.is_decimal(t) and t.precision <= 76:
        inner = f"Decimal({t.precision}, {t.scale})"
    elif pa.types.is_timestamp(t):
        inner = f"DateTime64({_PRECISION[t.unit]}, 'UTC')"
    elif t in _SCALARS or t in _SEND_AS:
        inner = _SCALARS[_SEND_AS.get(t, t)]
    else:
        raise TerminalError(
            f"ClickHouse: column {name!r} has Arrow type {t}, which has no ClickHouse mapping here. Cast it in the "
            "query (maps to list<struct<key, value>>, times and durations to integers)."
        )
    return f"Nullable({inner})" if nullable else inner


def _needs_conversion(t: pa.DataType, nullable: bool) -> bool:
    if pa.types.is_dictionary(t) or t in _SEND_AS or pa.types.is_fixed_size_list(t):
        return True
    if _is_list(t):
        return nullable or _needs_conversion(t.value_type, t.value_field.nullable)
    return pa.types.is_struct(t) and any(_needs_conversion(f.type, f.nullable) for f in t)


def _to_store(array: pa.Array, t: pa.DataType, nullable: bool) -> pa.Array:
    """An Arrow array as ClickHouse takes it: views and dictionaries cast, nullable lists wrapped in a struct."""
    if not _needs_conversion(t, nullable):
        return array
    if pa.types.is_dictionary(t):
        return _to_store(array.dictionary_decode(), t.value_type, nullable)
    if _is_list(t):
        if pa.types.is_fixed_size_list(t):
            array, t = array.cast(pa.list_(t.value_field)), pa.list_(t.value_field)
        inner = _map_values(array, lambda v: _to_store(v, t.value_type, t.value_field.nullable))
        if not nullable:
            return inner
        return pa.StructArray.from_arrays([inner], names=["v"], mask=_nulls(array))
    if pa.types.is_struct(t):
        children = [_to_store(array.field(i), f.type, f.nullable) for i, f in enumerate(t)]
        return pa.StructArray.from_arrays(children, names=[f.name for f in t], mask=_nulls(array))
    return array.cast(_SEND_AS[t])


def _from_store(array: pa.Array, t: pa.DataType, nullable: bool) -> pa.Array:
    """Undo :func:`_to_store`'s wrapping of nullable lists; the types are cast afterwards, by cast_columns."""
    if _is_list(t) and _needs_conversion(t, nullable):
        lists = array.field(0) if nullable else array
        inner = _map_values(lists, lambda v: _from_store(v, t.value_type, t.value_field.nullable))
        return type(inner).from_arrays(inner.offsets, inner.values, mask=_nulls(array)) if nullable else inner
    if pa.types.is_struct(t) and _needs_conversion(t, nullable):
        children = [_from_store(array.field(i), f.type, f.nullable) for i, f in enumerate(t)]
        return pa.StructArray.from_arrays(children, names=[f.name for f in t], mask=_nulls(array))
    return array


def _map_values(lists: pa.Array, convert) -> pa.Array:
    """Rebuild a list array with ``convert`` applied to its values, keeping offsets and nulls."""
    offsets = lists.offsets
    start, end = offsets[0].as_py(), offsets[-1].as_py()
    values = convert(lists.values.slice(start, end - start))
    return type(lists).from_arrays(pc.subtract(offsets, start), values, mask=_nulls(lists))


def _nulls(array: pa.Array) -> pa.Array | None:
    return pc.is_null(array) if array.null_count else None
