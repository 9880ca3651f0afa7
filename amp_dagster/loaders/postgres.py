"""PostgreSQL loader: binary COPY straight from Arrow (pgpq + psycopg 3); replace, trim and swap in one transaction.

Type map (Arrow → PostgreSQL):

- ``uint64`` → ``numeric(20,0)``, exact up to 2^64-1 (default), or ``bigint`` with ``uint64="bigint"``, which
  fails loudly, naming the column, on any value above 2^63-1 rather than wrapping it;
- ``uint32`` → ``bigint``, ``uint16`` → ``integer``, ``uint8``/``int8`` → ``smallint``;
- ``fixed_size_binary``/``binary`` → ``bytea``; ``decimal128(p,s)`` → ``numeric(p,s)``;
- ``timestamp[*, tz]`` → ``timestamptz`` (``timestamp`` without tz). PostgreSQL keeps microseconds: a
  nanosecond value that is not a whole microsecond fails the write, naming the column, unless
  ``truncate_timestamps=True``. Chain timestamps are whole seconds, so amp data never hits this;
- lists of scalars → PostgreSQL arrays (``bytea[]``...); structs, maps and lists of nested values → ``jsonb``
  with bytes as ``0x`` hex strings.

The table's Arrow schema is kept in the table comment, so :meth:`PostgresLoader.read` gives the original types
back (``jsonb`` columns come back as JSON text).
"""

from __future__ import annotations

import base64
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

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
from .encoding import json_strings

COMMENT_TAG = "amp_dagster"


@dataclass(frozen=True)
class _Column:
    name: str
    pg_type: str  # exactly as format_type() prints it, so existing tables compare by string
    nullable: bool
    convert: Callable[[pa.Array], pa.Array] | None  # Arrow → what the COPY encoder takes; None = as is
    jsonb: bool = False


def _cast(target: pa.DataType, *, safe: bool = True) -> Callable[[pa.Array], pa.Array]:
    return lambda a: a.cast(target, safe=safe)


_SCALARS: dict[pa.DataType, tuple[str, pa.DataType | None]] = {
    pa.bool_(): ("boolean", None),
    pa.int8(): ("smallint", None),
    pa.int16(): ("smallint", None),
    pa.int32(): ("integer", None),
    pa.int64(): ("bigint", None),
    pa.uint8(): ("smallint", None),
    pa.uint16(): ("integer", None),
    pa.uint32(): ("bigint", None),
    pa.float16(): ("real", None),
    pa.float32(): ("real", None),
    pa.float64(): ("double precision", None),
    pa.string(): ("text", None),
    pa.large_string(): ("text", None),
    pa.string_view(): ("text", None),
    pa.binary(): ("bytea", None),
    pa.large_binary(): ("bytea", None),
    pa.binary_view(): ("bytea", pa.binary()),
    pa.date32(): ("date", None),
    pa.date64(): ("date", pa.date32()),
    pa.null(): ("text", pa.string()),
}


class PostgresLoader(Loader):
    """Loads Arrow into PostgreSQL tables with binary COPY.

    ``conninfo`` is a libpq URL or key=value string; ``params`` add to it (``password=...``). Without a password
    there, libpq reads ``PGPASSWORD`` or ``~/.pgpass``. Connections are pooled (``pool_size``). Concurrent writers to
    one table are serialised with a transaction-scoped advisory lock.

    >>> with PostgresLoader("postgresql://127.0.0.1:5432/test") as pg:  # doctest: +SKIP
    ...     t = TableRef("logs", namespace="eth")
    ...     pg.ensure_table(t, logs.schema)
    ...     pg.write(t, logs, replace=RowRange(0, 999))
    """

    store = "PostgreSQL"
    capabilities = Capabilities(
        atomic_replace_range=True, atomic_replace_table=True, upsert=True, add_columns=True, flush_rows=100_000
    )

    def __init__(
        self,
        conninfo: str = "",
        *,
        pool_size: int = 4,
        uint64: Literal["numeric", "bigint"] = "numeric",
        truncate_timestamps: bool = False,
        connect_timeout: int = 10,
        retry: RetryPolicy = DEFAULT_RETRY,
        **params: str,
    ) -> None:
        import psycopg.conninfo

        if uint64 not in ("numeric", "bigint"):
            raise TerminalError(f'PostgresLoader uint64 must be "numeric" or "bigint", got {uint64!r}')
        self._conninfo = psycopg.conninfo.make_conninfo(
            conninfo, connect_timeout=connect_timeout, application_name="amp_dagster", **params
        )
        info = psycopg.conninfo.conninfo_to_dict(self._conninfo)
        self._secret = str(info.get("password") or "")
        self.where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        self._uri_params = info
        self._uint64, self._truncate, self._retry = uint64, truncate_timestamps, retry
        self._slots = threading.BoundedSemaphore(pool_size)
        self._idle: queue.LifoQueue = queue.LifoQueue()

    # -- connections ---------------------------------------------------------------------------------------

    def _connect(self):
        import psycopg

        def attempt():
            return psycopg.connect(self._conninfo, autocommit=False)

        try:
            return retry_call(attempt, self._retry, _is_transient, f"connecting to PostgreSQL at {self.where}")
        except psycopg.OperationalError as exc:
            raise ServiceUnavailableError(
                f"PostgreSQL at {self.where} is unreachable after {self._retry.attempts} attempts: "
                f"{self._scrub(exc)}. Check that the server runs and the host, port and credentials are right."
            ) from None

    @contextmanager
    def _cursor(self, table: TableRef | None = None):
        """A cursor inside one transaction, holding the table's advisory lock; errors come out typed."""
        import psycopg

        self._slots.acquire()
        conn = None
        try:
            while conn is None:
                try:
                    candidate = self._idle.get_nowait()
                except queue.Empty:
                    candidate = self._connect()
                conn = None if candidate.closed or candidate.broken else candidate
            try:
                with conn.transaction(), conn.cursor() as cur:
                    if table is not None:
                        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (str(table),))
                    yield cur
            except psycopg.Error as exc:
                raise self._translate(exc, table) from None
        finally:
            if conn is not None and not conn.closed and not conn.broken:
                self._idle.put(conn)
            self._slots.release()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def _scrub(self, exc: BaseException) -> str:
        text = str(exc).strip()
        return text.replace(self._secret, "***") if self._secret else text

    def _translate(self, exc: Exception, table: TableRef | None) -> Exception:
        where = f"PostgreSQL {self.where}" + (f" table {table}" if table else "")
        sqlstate = getattr(exc, "sqlstate", None) or "-"
        cls = TransientError if _is_transient(exc) else TerminalError
        return cls(f"{where}: {self._scrub(exc)} (SQLSTATE {sqlstate})")

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        require_columns(schema, table, self.store)
        cols = self._plan(schema)
        with self._cursor(table) as cur:
            _create_schema(cur, table)
            existing = _columns(cur, table)
            if not existing:
                _create_table(cur, _ident(table), cols)
            else:
                added = compare_columns(
                    self.store, table, existing, {c.name: (c.pg_type, c.nullable) for c in cols}, can_add=True
                )
                for col in (c for c in cols if c.name in added):
                    cur.execute(_sql("ALTER TABLE {} ADD COLUMN {} " + col.pg_type, _ident(table), _id(col.name)))
                schema = _merge(_stored_schema(cur, table), schema)
            _create_indexes(cur, table, _ident(table), table.name)
            _set_comment(cur, _ident(table), schema)

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        schema, batches = record_batches(data)
        cols = self._plan(schema)
        tally = Tally()
        with self._cursor(table) as cur:
            self._check(cur, table, cols)
            if replace is not None:
                _delete(cur, table, replace)
            self._copy(cur, _ident(table), cols, tally.count(check_in_range(batches, table, replace)))
        return tally.result()

    def delete(self, table: TableRef, rows: RowRange) -> int:
        with self._cursor(table) as cur:
            return _delete(cur, table, rows) if _columns(cur, table) else 0

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        schema, batches = record_batches(data)
        require_columns(schema, table, self.store)
        cols = self._plan(schema)
        stage = f"{_short(table.name)}__amp_stage"
        staged = _ident(TableRef(stage, table.namespace))
        tally = Tally()
        with self._cursor(table) as cur:
            _create_schema(cur, table)
            cur.execute(_sql("DROP TABLE IF EXISTS {}", staged))
            _create_table(cur, staged, cols)
            self._copy(cur, staged, cols, tally.count(batches))
            _create_indexes(cur, table, staged, stage)
            cur.execute(_sql("DROP TABLE IF EXISTS {}", _ident(table)))
            cur.execute(_sql("ALTER TABLE {} RENAME TO {}", staged, _id(table.name)))
            for purpose in ("range", "key"):
                cur.execute(
                    _sql(
                        "ALTER INDEX IF EXISTS {} RENAME TO {}",
                        _ident(TableRef(_index_name(stage, purpose), table.namespace)),
                        _id(_index_name(table.name, purpose)),
                    )
                )
            _set_comment(cur, _ident(table), schema)
        return tally.result()

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        from psycopg import sql

        key = key_columns(table, self.store)
        schema, batches = record_batches(data)
        cols = self._plan(schema)
        names = sql.SQL(", ").join(_id(c.name) for c in cols)
        keys = sql.SQL(", ").join(_id(k) for k in key)
        updates = [sql.SQL("{} = EXCLUDED.{}").format(_id(c.name), _id(c.name)) for c in cols if c.name not in key]
        action = sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(updates) if updates else sql.SQL("DO NOTHING")
        tally = Tally()
        with self._cursor(table) as cur:
            self._check(cur, table, cols)
            cur.execute(_sql("CREATE TEMP TABLE amp_upsert (LIKE {}) ON COMMIT DROP", _ident(table)))
            self._copy(cur, _id("amp_upsert"), cols, tally.count(batches))
            # the last row wins when the data repeats a key (COPY appends, so ctid follows input order)
            cur.execute(
                sql.SQL(
                    "INSERT INTO {t} ({names}) SELECT DISTINCT ON ({keys}) {names} FROM amp_upsert "
                    "ORDER BY {keys}, ctid DESC ON CONFLICT ({keys}) "
                ).format(t=_ident(table), names=names, keys=keys)
                + action
            )
        return tally.result()

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        import adbc_driver_postgresql.dbapi as adbc

        with self._cursor() as cur:
            stored = _stored_schema(cur, table)
            if not _columns(cur, table):
                raise TerminalError(f"PostgreSQL {self.where}: table {table} does not exist")
            query = _sql("SELECT * FROM {}", _ident(table)) + _range_sql(table, rows)
            text = query.as_string(cur.connection)
        conn = adbc.connect(self._adbc_uri())
        cursor = conn.cursor()
        cursor.execute(text)
        reader = cursor.fetch_record_batch()
        target = _read_schema(reader.schema, stored)

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                for batch in reader:
                    yield _cast_batch(batch, target)
            finally:
                cursor.close()
                conn.close()

        return pa.RecordBatchReader.from_batches(target, batches())

    # -- internals -----------------------------------------------------------------------------------------

    def _plan(self, schema: pa.Schema) -> list[_Column]:
        return [self._column(f) for f in schema]

    def _column(self, field: pa.Field) -> _Column:
        t, name = field.type, field.name
        if pa.types.is_dictionary(t):
            inner = self._column(pa.field(name, t.value_type, field.nullable))
            return _Column(name, inner.pg_type, field.nullable, _then(_cast(t.value_type), inner.convert), inner.jsonb)
        if pa.types.is_uint64(t):
            if self._uint64 == "numeric":
                return _Column(name, "numeric(20,0)", field.nullable, None)
            return _Column(name, "bigint", field.nullable, _checked_int64(name))
        if pa.types.is_timestamp(t):
            pg = "timestamp with time zone" if t.tz else "timestamp without time zone"
            convert = _microseconds(name, t, self._truncate) if t.unit == "ns" else None
            return _Column(name, pg, field.nullable, convert)
        if pa.types.is_time(t):
            convert = _microseconds(name, t, self._truncate) if t.unit == "ns" else None
            return _Column(name, "time without time zone", field.nullable, convert)
        if pa.types.is_duration(t):
            convert = _microseconds(name, t, self._truncate) if t.unit == "ns" else None
            return _Column(name, "interval", field.nullable, convert)
        if pa.types.is_decimal(t):
            if t.precision > 38 or (pa.types.is_decimal256(t) and t.precision > 38):
                raise TerminalError(
                    f"PostgreSQL: column {name!r} is {t}; precision above 38 is not supported. Cast it to "
                    "decimal128 or to a string in the query."
                )
            convert = _cast(pa.decimal128(t.precision, t.scale)) if not pa.types.is_decimal128(t) else None
            return _Column(name, f"numeric({t.precision},{t.scale})", field.nullable, convert)
        if pa.types.is_fixed_size_binary(t):
            return _Column(name, "bytea", field.nullable, None)
        if t in _SCALARS:
            pg, target = _SCALARS[t]
            return _Column(name, pg, field.nullable, _cast(target) if target is not None else None)
        if pa.types.is_nested(t) and not _is_json(t):  # a list of scalars: a PostgreSQL array
            item = self._column(pa.field(name, t.value_type, True))
            if item.convert is None:
                return _Column(name, item.pg_type + "[]", field.nullable, None)
            return _Column(name, item.pg_type + "[]", field.nullable, _list_items(item.convert))
        if pa.types.is_nested(t):
            return _Column(name, "jsonb", field.nullable, json_strings, jsonb=True)
        raise TerminalError(
            f"PostgreSQL: column {name!r} has Arrow type {t}, which has no PostgreSQL mapping. "
            "Cast it to a supported type in the query."
        )

    def _check(self, cur, table: TableRef, cols: list[_Column]) -> None:
        existing = _columns(cur, table)
        if not existing:
            raise TerminalError(
                f"PostgreSQL {self.where}: table {table} does not exist. Call ensure_table(table, schema) first."
            )
        compare_columns(self.store, table, existing, {c.name: (c.pg_type, c.nullable) for c in cols}, can_add=False)

    def _copy(self, cur, target, cols: list[_Column], batches: Iterable[pa.RecordBatch]) -> None:
        import pgpq
        from pgpq._pgpq import Jsonb, StringEncoderBuilder
        from psycopg import sql

        encoder = None
        statement = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(
            target, sql.SQL(", ").join(_id(c.name) for c in cols)
        )
        with cur.copy(statement) as copy:
            for batch in batches:
                converted = _convert(batch, cols)
                if encoder is None:
                    encoders = {
                        f.name: StringEncoderBuilder.new_with_output(f, Jsonb())
                        if c.jsonb
                        else pgpq.ArrowToPostgresBinaryEncoder.infer_encoder(f)
                        for f, c in zip(converted.schema, cols, strict=True)
                    }
                    encoder = pgpq.ArrowToPostgresBinaryEncoder.new_with_encoders(converted.schema, encoders)
                    copy.write(encoder.write_header())
                if converted.num_rows:
                    copy.write(encoder.write_batch(converted))
            if encoder is not None:
                copy.write(encoder.finish())

    def _adbc_uri(self) -> str:
        p = self._uri_params
        auth = quote(str(p.get("user", "")), safe="")
        if p.get("password"):
            auth += ":" + quote(str(p["password"]), safe="")
        host = p.get("host", "localhost")
        return (
            f"postgresql://{auth + '@' if auth else ''}{host}:{p.get('port', 5432)}/{quote(str(p.get('dbname', '')))}"
        )


# -- SQL helpers (identifiers always go through psycopg.sql quoting) ------------------------------------------


def _id(name: str):
    from psycopg import sql

    return sql.Identifier(name)


def _ident(table: TableRef):
    from psycopg import sql

    return sql.Identifier(table.namespace or "public", table.name)


def _sql(template: str, *parts):
    from psycopg import sql

    return sql.SQL(template).format(*parts)


def _short(name: str, limit: int = 40) -> str:
    """A prefix of ``name`` that fits in ``limit`` UTF-8 bytes (PostgreSQL names stop at 63 bytes)."""
    return name.encode()[:limit].decode(errors="ignore")


def _index_name(table_name: str, purpose: str) -> str:
    return f"{_short(table_name)}__amp_{purpose}"


def _create_schema(cur, table: TableRef) -> None:
    namespace = table.namespace or "public"
    cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (namespace,))
    if cur.fetchone() is None:
        cur.execute(_sql("CREATE SCHEMA IF NOT EXISTS {}", _id(namespace)))


def _create_table(cur, target, cols: list[_Column]) -> None:
    from psycopg import sql

    defs = [sql.SQL("{} " + c.pg_type + ("" if c.nullable else " NOT NULL")).format(_id(c.name)) for c in cols]
    cur.execute(sql.SQL("CREATE TABLE {} ({})").format(target, sql.SQL(", ").join(defs)))


def _create_indexes(cur, table: TableRef, target, name: str) -> None:
    from psycopg import sql

    cur.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
            _id(_index_name(name, "range")), target, _id(table.range_column)
        )
    )
    if table.key:
        cur.execute(
            sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})").format(
                _id(_index_name(name, "key")), target, sql.SQL(", ").join(_id(k) for k in table.key)
            )
        )


def _columns(cur, table: TableRef) -> dict[str, str]:
    cur.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON a.attrelid = c.oid JOIN pg_namespace n ON c.relnamespace = n.oid "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (table.namespace or "public", table.name),
    )
    return dict(cur.fetchall())


def _range_sql(table: TableRef, rows: RowRange | None):
    from psycopg import sql

    if rows is None:
        return sql.SQL("")
    clause = sql.SQL(" WHERE {} >= {}").format(_id(table.range_column), sql.Literal(rows.start))
    if rows.end is not None:
        clause += sql.SQL(" AND {} <= {}").format(_id(table.range_column), sql.Literal(rows.end))
    return clause


def _delete(cur, table: TableRef, rows: RowRange) -> int:
    cur.execute(_sql("DELETE FROM {}", _ident(table)) + _range_sql(table, rows))
    return cur.rowcount


def _set_comment(cur, target, schema: pa.Schema) -> None:
    from psycopg import sql

    payload = json.dumps({COMMENT_TAG: {"arrow_schema": base64.b64encode(schema.serialize()).decode()}})
    cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(target, sql.Literal(payload)))


def _stored_schema(cur, table: TableRef) -> pa.Schema | None:
    cur.execute(
        "SELECT obj_description(c.oid, 'pg_class') FROM pg_class c JOIN pg_namespace n ON c.relnamespace = n.oid "
        "WHERE n.nspname = %s AND c.relname = %s",
        (table.namespace or "public", table.name),
    )
    row = cur.fetchone()
    try:
        encoded = json.loads(row[0])[COMMENT_TAG]["arrow_schema"]
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))
    except (TypeError, ValueError, KeyError):
        return None


def _merge(stored: pa.Schema | None, incoming: pa.Schema) -> pa.Schema:
    if stored is None:
        return incoming
    new = [f for f in incoming if stored.get_field_index(f.name) < 0]
    return pa.schema([*stored, *new])


def _read_schema(native: pa.Schema, stored: pa.Schema | None) -> pa.Schema:
    """The original Arrow types, where PostgreSQL's column maps back losslessly (jsonb stays JSON text)."""
    fields = []
    for field in native:
        have = field.type.storage_type if isinstance(field.type, pa.BaseExtensionType) else field.type
        index = -1 if stored is None else stored.get_field_index(field.name)
        want = stored.field(index) if index >= 0 else None
        if want is not None and not _is_json(want.type):
            fields.append(pa.field(field.name, want.type, want.nullable))
        else:
            fields.append(pa.field(field.name, have, field.nullable))
    return pa.schema(fields)


def _is_json(t: pa.DataType) -> bool:
    """Whether the Arrow type is stored as jsonb (nested values other than lists of scalars)."""
    listlike = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if listlike:
        return pa.types.is_nested(t.value_type) or pa.types.is_dictionary(t.value_type)
    return pa.types.is_nested(t)


def _cast_batch(batch: pa.RecordBatch, target: pa.Schema) -> pa.RecordBatch:
    columns = []
    for column, field in zip(batch.columns, target, strict=True):
        if isinstance(column.type, pa.BaseExtensionType):
            column = column.storage
        columns.append(column if column.type == field.type else column.cast(field.type))
    return pa.RecordBatch.from_arrays(columns, schema=target)


def _convert(batch: pa.RecordBatch, cols: list[_Column]) -> pa.RecordBatch:
    arrays = [c.convert(a) if c.convert else a for a, c in zip(batch.columns, cols, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, names=[c.name for c in cols])


def _then(first: Callable, second: Callable | None) -> Callable:
    return first if second is None else (lambda a: second(first(a)))


def _list_items(convert: Callable[[pa.Array], pa.Array]) -> Callable[[pa.Array], pa.Array]:
    def apply(array: pa.Array) -> pa.Array:
        if pa.types.is_fixed_size_list(array.type):
            array = array.cast(pa.list_(array.type.value_field))
        offsets = pc.subtract(array.offsets, array.offsets[0])
        mask = pc.is_null(array) if array.null_count else None
        return pa.ListArray.from_arrays(offsets, convert(array.flatten()), mask=mask)

    return apply


def _checked_int64(name: str) -> Callable[[pa.Array], pa.Array]:
    def apply(array: pa.Array) -> pa.Array:
        try:
            return array.cast(pa.int64())
        except pa.ArrowInvalid:
            worst = pc.max(array).as_py()
            raise TerminalError(
                f"PostgreSQL: column {name!r} holds {worst}, above bigint's maximum 9223372036854775807. "
                'Use PostgresLoader(uint64="numeric") to store uint64 exactly as numeric(20,0).'
            ) from None

    return apply


def _microseconds(name: str, t: pa.DataType, truncate: bool) -> Callable[[pa.Array], pa.Array]:
    if pa.types.is_timestamp(t):
        target = pa.timestamp("us", t.tz)
    elif pa.types.is_time(t):
        target = pa.time64("us")
    else:
        target = pa.duration("us")

    def apply(array: pa.Array) -> pa.Array:
        try:
            return array.cast(target, safe=not truncate)
        except pa.ArrowInvalid:
            raise TerminalError(
                f"PostgreSQL: column {name!r} has nanoseconds that PostgreSQL (microsecond precision) would "
                "drop. Round it in the query, or pass truncate_timestamps=True to truncate to microseconds."
            ) from None

    return apply


def _is_transient(exc: BaseException) -> bool:
    import psycopg
    from psycopg import errors

    if isinstance(exc, errors.DeadlockDetected | errors.SerializationFailure | errors.LockNotAvailable):
        return True
    # connection-level failures (refused, reset, server shutting down) are OperationalError without a SQLSTATE
    # or with class 08 / 57P
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None) or ""
        return state == "" or state.startswith(("08", "57P", "53"))
    return False
