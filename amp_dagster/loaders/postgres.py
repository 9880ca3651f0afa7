"""PostgreSQL loader: binary COPY straight from Arrow (pgpq + psycopg 3); replace, trim and swap in one transaction.

Type map (Arrow → PostgreSQL):

- ``uint64`` → ``numeric(20,0)``, exact up to 2^64-1 (default), or ``bigint`` with ``uint64="bigint"``, faster and
  the natural type for block numbers, which fails loudly, naming the column, on any value above 2^63-1 rather
  than wrapping it;
- ``uint32`` → ``bigint``, ``uint16`` → ``integer``, ``uint8``/``int8`` → ``smallint``;
- ``fixed_size_binary``/``binary`` → ``bytea``; ``decimal128(p,s)`` → ``numeric(p,s)``;
- ``timestamp[*, tz]`` → ``timestamptz`` (``timestamp`` without tz). PostgreSQL keeps microseconds: a nanosecond
  value that is not a whole microsecond fails the write, naming the column, unless ``truncate_timestamps=True``.
  Chain timestamps are whole seconds, so amp data never hits this;
- lists of scalars → PostgreSQL arrays (``bytea[]``...); structs, maps and lists of nested values → ``jsonb``
  with bytes as ``0x`` hex strings.

PostgreSQL keeps only the first 63 bytes of a name, so a longer schema, table or column name would silently be
another's (two tables whose names differ after byte 63 are one table). Such names are refused, naming the name,
its length and the limit, before any SQL runs.

The table's Arrow schema is kept in the table comment: data is checked against it Arrow type by Arrow type, and
:meth:`PostgresLoader.read` gives the original types back (``jsonb`` columns parsed back into their nested types).
A full refresh swaps in a new table: grants, triggers and publications on the old one do not carry over.
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import (
    AmpDagsterError,
    AuthenticationError,
    ConfigError,
    SchemaMismatchError,
    ServiceUnavailableError,
    TerminalError,
    TransientError,
    scrub,
)
from ..ranges import RowRange
from ..retry import DEFAULT_RETRY, RetryPolicy, retry_call
from .base import ArrowData, Capabilities, Loader, TableRef, WriteResult, missing_table, require_driver
from .batches import Tally, checked_batches, key_columns
from .encoding import json_arrays, json_strings
from .schema import cast_columns, check_schema, require_columns, schema_from_text, schema_to_text, widen

COMMENT_TAG = "amp_dagster"
NAME_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: the bytes of a name it keeps


@dataclass(frozen=True)
class _Column:
    name: str
    pg_type: str  # exactly as format_type() prints it
    nullable: bool
    convert: Callable[[pa.Array], pa.Array] | None  # Arrow → what the COPY encoder takes; None = as is
    jsonb: bool = False


def _cast(target: pa.DataType) -> Callable[[pa.Array], pa.Array]:
    return lambda a: a.cast(target)


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
    there, libpq reads ``PGPASSWORD`` or ``~/.pgpass``. Connections are pooled (``pool_size``) and checked before
    reuse. Concurrent writers to one table are serialised with a transaction-scoped advisory lock.

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
        for module in ("psycopg", "pgpq", "adbc_driver_postgresql"):
            require_driver(module, "postgres", self.store)
        import psycopg.conninfo

        if uint64 not in ("numeric", "bigint"):
            raise TerminalError(f'PostgresLoader uint64 must be "numeric" or "bigint", got {uint64!r}')
        params.setdefault("application_name", "amp_dagster")
        self._conninfo = psycopg.conninfo.make_conninfo(conninfo, connect_timeout=connect_timeout, **params)
        info = psycopg.conninfo.conninfo_to_dict(self._conninfo)
        self._secret = str(info.get("password") or "")
        self.where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        self._uint64, self._truncate, self._retry = uint64, truncate_timestamps, retry
        self._slots = threading.BoundedSemaphore(pool_size)
        self._idle: queue.LifoQueue = queue.LifoQueue()

    # -- connections ---------------------------------------------------------------------------------------

    def _connect(self):
        import psycopg

        def attempt():
            try:
                return psycopg.connect(self._conninfo, autocommit=False)
            except psycopg.OperationalError as exc:
                refused = login_refusal(exc, f"PostgreSQL at {self.where}")
                if refused is not None:  # terminal: trying the same login again fails the same way
                    raise refused from None
                raise

        try:
            return retry_call(
                attempt,
                self._retry,
                _is_transient,
                f"connecting to PostgreSQL at {self.where}",
            )
        except psycopg.OperationalError as exc:
            raise ServiceUnavailableError(
                f"PostgreSQL at {self.where} is unreachable after {self._retry.attempts} attempts: "
                f"{scrub(str(exc), self._secret)}. Check that the server runs and the host, port and "
                "credentials are right."
            ) from None

    def _checkout(self):
        """An idle pooled connection that still answers, or a new one."""
        import psycopg

        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return self._connect()
            try:
                conn.execute("SELECT 1")  # the server may have dropped it while idle
                conn.rollback()
                return conn
            except psycopg.Error:
                conn.close()

    @contextmanager
    def _cursor(self, table: TableRef | None = None):
        """A cursor inside one transaction, holding the table's advisory lock; errors come out typed."""
        import psycopg

        self._slots.acquire()
        conn = None
        try:
            conn = self._checkout()
            with self._translating(table, errors=psycopg.Error), conn.transaction(), conn.cursor() as cur:
                if table is not None:
                    key = f"{table.namespace or 'public'}.{table.name}"
                    cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
                yield cur
        finally:
            if conn is not None and not conn.closed and not conn.broken:
                self._idle.put(conn)
            self._slots.release()

    def _retrying(self, fn: Callable[[], int | None], what: str):
        """Retry an operation that holds no stream (nothing is consumed twice) on deadlocks and dropped links."""
        return retry_call(fn, self._retry, lambda e: isinstance(e, TransientError), f"PostgreSQL {what}")

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def _translate(self, exc: BaseException, table: TableRef | None, action: str = "") -> AmpDagsterError:
        where = f"PostgreSQL {self.where}" + (f" table {table}" if table else "") + (f" ({action})" if action else "")
        sqlstate = getattr(exc, "sqlstate", None) or "-"
        cls = TransientError if _is_transient(exc) else TerminalError
        return cls(f"{where}: {scrub(str(exc), self._secret)} (SQLSTATE {sqlstate})")

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        require_columns(schema, table, self.store)
        _check_names(table, schema.names)
        cols = self._plan(schema, table)

        def run() -> None:
            with self._cursor(table) as cur:
                _create_schema(cur, table)
                existing = _columns(cur, table)
                stored = _stored_schema(cur, table)
                if not existing:
                    _create_table(cur, _ident(table), cols)
                    _create_indexes(cur, table, _ident(table), _index_names(table))
                    _set_comment(cur, _ident(table), schema)
                    return
                if stored is not None:
                    added = check_schema(self.store, table, stored, schema, can_add=True)
                else:  # a table amp_dagster did not create: compare PostgreSQL types
                    added = check_schema(self.store, table, existing, _types(cols), can_add=True)
                for col in (c for c in cols if c.name in added):
                    cur.execute(_sql("ALTER TABLE {} ADD COLUMN {} " + col.pg_type, _ident(table), _id(col.name)))
                _create_indexes(cur, table, _ident(table), _index_names(table))
                # the comment changes only with new columns (a catalog write on every sync otherwise); a foreign
                # comment is never overwritten
                if (stored is not None and added) or (stored is None and _comment(cur, table) is None):
                    _set_comment(cur, _ident(table), widen(stored, schema, added) if stored else schema)

        self._retrying(run, f"ensure_table {table}")

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store, replace)
        _check_names(table, schema.names)
        tally = Tally()
        with self._cursor(table) as cur:
            cols = self._checked_plan(cur, table, schema)
            if replace is not None:
                _delete(cur, table, replace)
            self._copy(cur, _ident(table), cols, tally.count(batches))
        return tally.result()

    def delete(self, table: TableRef, rows: RowRange) -> int:
        _check_names(table)

        def run() -> int:
            with self._cursor(table) as cur:
                existing = _columns(cur, table)
                if not existing:
                    return 0
                self._check_range(table, rows, existing, _stored_schema(cur, table))
                return _delete(cur, table, rows)

        return self._retrying(run, f"delete {rows} from {table}")

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store)
        _check_names(table, schema.names)
        cols = self._plan(schema, table)
        # a unique stage name: never an existing table, never a collision between two refreshes
        stage = TableRef(f"{_short(table.name)}__amp_stage_{uuid.uuid4().hex[:8]}", table.namespace)
        tally = Tally()
        with self._cursor(table) as cur:
            _create_schema(cur, table)
            _create_table(cur, _ident(stage), cols)
            self._copy(cur, _ident(stage), cols, tally.count(batches))
            _create_indexes(cur, table, _ident(stage), _index_names(stage))
            cur.execute(_sql("DROP TABLE IF EXISTS {}", _ident(table)))
            cur.execute(_sql("ALTER TABLE {} RENAME TO {}", _ident(stage), _id(table.name)))
            for staged, final in zip(_index_names(stage), _index_names(table), strict=True):
                namespaced = TableRef(staged, table.namespace)
                cur.execute(_sql("ALTER INDEX IF EXISTS {} RENAME TO {}", _ident(namespaced), _id(final)))
            _set_comment(cur, _ident(table), schema)
        return tally.result()

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        from psycopg import sql

        key = key_columns(table, self.store)
        schema, batches = checked_batches(data, table, self.store)
        _check_names(table, schema.names)
        tally = Tally()
        with self._cursor(table) as cur:
            cols = self._checked_plan(cur, table, schema)
            names = sql.SQL(", ").join(_id(c.name) for c in cols)
            keys = sql.SQL(", ").join(_id(k) for k in key)
            updates = [sql.SQL("{} = EXCLUDED.{}").format(_id(c.name), _id(c.name)) for c in cols if c.name not in key]
            action = sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(updates) if updates else sql.SQL("DO NOTHING")
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

        _check_names(table)
        with self._cursor() as cur:
            existing = _columns(cur, table)
            if not existing:
                raise missing_table(self.store, self.where, table)
            stored = _stored_schema(cur, table)
            if rows is not None:
                self._check_range(table, rows, existing, stored)
            text = (_sql("SELECT * FROM {}", _ident(table)) + _range_sql(table, rows)).as_string(cur.connection)
        try:
            conn = adbc.connect(self._conninfo)  # the same conninfo: sockets, TLS settings and all
            cursor = conn.cursor()
            cursor.execute(text)
            reader = cursor.fetch_record_batch()
        except Exception as exc:
            raise TerminalError(f"PostgreSQL {self.where}: reading {table}: {scrub(str(exc), self._secret)}") from None
        target = _read_schema(reader.schema, stored)

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                for batch in reader:
                    yield cast_columns(_parse_json(batch, target), target, store=self.store, table=table, reading=True)
            finally:
                cursor.close()
                conn.close()

        return pa.RecordBatchReader.from_batches(target, batches())

    # -- internals -----------------------------------------------------------------------------------------

    def _check_range(self, table: TableRef, rows: RowRange, existing: dict[str, str], stored: pa.Schema | None) -> None:
        """Refuse a range the table's range column cannot hold, before any row is selected.

        The column's type is the Arrow type the table was created for (a ``uint64`` kept as ``bigint`` takes every
        uint64 bound: PostgreSQL compares a bigint with a larger literal exactly, as numeric), or else what its
        PostgreSQL type holds."""
        column = table.range_column
        if stored is not None and stored.get_field_index(column) >= 0:
            arrow = stored.field(column).type
        elif column in existing:
            arrow = _PG_INTEGERS.get(existing[column].split("(")[0])
            if arrow is None:
                raise SchemaMismatchError(
                    f"PostgreSQL table {table}: range column {column!r} is {existing[column]}, not an integer "
                    "type. Set TableRef(range_column=...) to an integer column of the table."
                )
        else:
            raise SchemaMismatchError(
                f"PostgreSQL table {table} has no column {column!r} to select rows by range; it has "
                f"{', '.join(existing)}. Set TableRef(range_column=...) to one of them."
            )
        rows.check(column, arrow, f"{self.store} table {table}")

    def _checked_plan(self, cur, table: TableRef, schema: pa.Schema) -> list[_Column]:
        """The COPY plan for ``schema``, after checking it against the table (Arrow types if it keeps them)."""
        existing = _columns(cur, table)
        if not existing:
            raise missing_table(self.store, self.where, table)
        cols = self._plan(schema, table)
        stored = _stored_schema(cur, table)
        if stored is not None:
            check_schema(self.store, table, stored, schema, can_add=False)
        check_schema(self.store, table, existing, _types(cols), can_add=False)
        return cols

    def _plan(self, schema: pa.Schema, table: TableRef) -> list[_Column]:
        return [self._column(f, table) for f in schema]

    def _column(self, field: pa.Field, table: TableRef) -> _Column:
        t, name, nullable = field.type, field.name, field.nullable
        if pa.types.is_dictionary(t):
            inner = self._column(pa.field(name, t.value_type, nullable), table)
            decode = _cast(t.value_type)
            convert = decode if inner.convert is None else (lambda a, c=inner.convert: c(decode(a)))
            return _Column(name, inner.pg_type, nullable, convert, inner.jsonb)
        if pa.types.is_uint64(t):
            if self._uint64 == "numeric":
                return _Column(name, "numeric(20,0)", nullable, None)
            return _Column(name, "bigint", nullable, self._conform(table, field, pa.int64()))
        if pa.types.is_timestamp(t):
            pg = "timestamp with time zone" if t.tz else "timestamp without time zone"
            return _Column(
                name, pg, nullable, self._conform(table, field, pa.timestamp("us", t.tz)) if t.unit == "ns" else None
            )
        if pa.types.is_time(t):
            pg = "time without time zone"
            return _Column(name, pg, nullable, self._conform(table, field, pa.time64("us")) if t.unit == "ns" else None)
        if pa.types.is_duration(t):
            return _Column(
                name, "interval", nullable, self._conform(table, field, pa.duration("us")) if t.unit == "ns" else None
            )
        if pa.types.is_decimal(t):
            if t.precision > 38:
                raise TerminalError(
                    f"PostgreSQL: column {name!r} is {t}; precision above 38 is not supported. Cast it to "
                    "decimal128 or to a string in the query."
                )
            convert = None if pa.types.is_decimal128(t) else _cast(pa.decimal128(t.precision, t.scale))
            return _Column(name, f"numeric({t.precision},{t.scale})", nullable, convert)
        if pa.types.is_fixed_size_binary(t):
            return _Column(name, "bytea", nullable, None)
        if t in _SCALARS:
            pg, target = _SCALARS[t]
            return _Column(name, pg, nullable, _cast(target) if target is not None else None)
        if pa.types.is_nested(t) and not _is_json(t):  # a list of scalars: a PostgreSQL array
            item = self._column(pa.field(name, t.value_type, True), table)
            return _Column(name, item.pg_type + "[]", nullable, _list_items(item.convert) if item.convert else None)
        if pa.types.is_nested(t):
            return _Column(name, "jsonb", nullable, json_strings, jsonb=True)
        raise TerminalError(
            f"PostgreSQL: column {name!r} has Arrow type {t}, which has no PostgreSQL mapping. "
            "Cast it to a supported type in the query."
        )

    def _conform(self, table: TableRef, field: pa.Field, target: pa.DataType) -> Callable[[pa.Array], pa.Array]:
        """A safe cast to what PostgreSQL stores (microseconds, bigint), failing with the column named."""
        out = pa.schema([pa.field(field.name, target)])

        def apply(array: pa.Array) -> pa.Array:
            batch = pa.RecordBatch.from_arrays([array], names=[field.name])
            return cast_columns(batch, out, store=self.store, table=table, truncate_timestamps=self._truncate).column(0)

        return apply

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
                converted = pa.RecordBatch.from_arrays(
                    [c.convert(a) if c.convert else a for a, c in zip(batch.columns, cols, strict=True)],
                    names=[c.name for c in cols],
                )
                if encoder is None:
                    encoders = {
                        f.name: StringEncoderBuilder.new_with_output(f, Jsonb())
                        if c.jsonb
                        else pgpq.ArrowToPostgresBinaryEncoder.infer_encoder(f)
                        for f, c in zip(converted.schema, cols, strict=True)
                    }
                    encoder = pgpq.ArrowToPostgresBinaryEncoder.new_with_encoders(converted.schema, encoders)
                    copy.write(encoder.write_header())
                copy.write(encoder.write_batch(converted))
            if encoder is not None:
                copy.write(encoder.finish())


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


def _check_names(table: TableRef, columns: Iterable[str] = ()) -> None:
    """Refuse every name PostgreSQL would truncate: the schema, the table, and the columns named by the data and by
    the TableRef. A truncated name silently is another table's or column's."""
    names = [("schema", table.namespace or "public"), ("table", table.name)]
    names += [("column", c) for c in dict.fromkeys([table.range_column, *table.key, *columns])]
    for kind, name in names:
        size = len(name.encode())
        if size > NAME_BYTES:
            fix = (
                "Rename the column in the query (SELECT ... AS a_shorter_name)"
                if kind == "column"
                else f"Choose a {kind} name"
            )
            raise TerminalError(
                f"PostgreSQL table {table}: the {kind} name {name!r} is {size} bytes long; PostgreSQL keeps only the "
                f"first {NAME_BYTES} bytes of a name, so it would silently be another {kind}'s name. {fix} of at "
                f"most {NAME_BYTES} bytes (UTF-8)."
            )


def _short(name: str, limit: int = 30) -> str:
    """A prefix of ``name`` that fits in ``limit`` UTF-8 bytes (PostgreSQL names stop at 63 bytes)."""
    return name.encode()[:limit].decode(errors="ignore")


def _index_names(table: TableRef) -> tuple[str, str]:
    """(range index, key index) names: a readable prefix and a hash of the full name, so long names that share
    their first bytes never share an index name."""
    digest = hashlib.sha1(f"{table.namespace or 'public'}.{table.name}".encode()).hexdigest()[:12]
    return f"{_short(table.name, 24)}_{digest}_range", f"{_short(table.name, 24)}_{digest}_key"


def _types(cols: list[_Column]) -> dict[str, tuple[str, bool]]:
    return {c.name: (c.pg_type, c.nullable) for c in cols}


def _create_schema(cur, table: TableRef) -> None:
    namespace = table.namespace or "public"
    # look first: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege when the schema exists
    cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (namespace,))
    if cur.fetchone() is None:
        cur.execute(_sql("CREATE SCHEMA IF NOT EXISTS {}", _id(namespace)))


def _create_table(cur, target, cols: list[_Column]) -> None:
    from psycopg import sql

    defs = [sql.SQL("{} " + c.pg_type + ("" if c.nullable else " NOT NULL")).format(_id(c.name)) for c in cols]
    cur.execute(sql.SQL("CREATE TABLE {} ({})").format(target, sql.SQL(", ").join(defs)))


def _create_indexes(cur, table: TableRef, target, names: tuple[str, str]) -> None:
    from psycopg import sql

    range_index, key_index = names
    cur.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(_id(range_index), target, _id(table.range_column))
    )
    if table.key:
        cur.execute(
            sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})").format(
                _id(key_index), target, sql.SQL(", ").join(_id(k) for k in table.key)
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

    payload = json.dumps({COMMENT_TAG: {"arrow_schema": schema_to_text(schema)}})
    cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(target, sql.Literal(payload)))


def _comment(cur, table: TableRef) -> str | None:
    cur.execute(
        "SELECT obj_description(c.oid, 'pg_class') FROM pg_class c JOIN pg_namespace n ON c.relnamespace = n.oid "
        "WHERE n.nspname = %s AND c.relname = %s",
        (table.namespace or "public", table.name),
    )
    row = cur.fetchone()
    return row[0] if row else None


def _stored_schema(cur, table: TableRef) -> pa.Schema | None:
    try:
        return schema_from_text(json.loads(_comment(cur, table))[COMMENT_TAG]["arrow_schema"])
    except (TypeError, ValueError, KeyError):
        return None


def _is_json(t: pa.DataType) -> bool:
    """Whether the Arrow type is stored as jsonb (nested values other than lists of scalars)."""
    listlike = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if listlike:
        return pa.types.is_nested(t.value_type) or pa.types.is_dictionary(t.value_type)
    return pa.types.is_nested(t)


def _read_schema(native: pa.Schema, stored: pa.Schema | None) -> pa.Schema:
    """The original Arrow types of the columns the stored schema knows; PostgreSQL's own for the others."""
    fields = []
    for field in native:
        index = -1 if stored is None else stored.get_field_index(field.name)
        if index >= 0:
            fields.append(stored.field(index))
        else:
            have = field.type.storage_type if isinstance(field.type, pa.BaseExtensionType) else field.type
            fields.append(pa.field(field.name, have, field.nullable))
    return pa.schema(fields)


def _parse_json(batch: pa.RecordBatch, target: pa.Schema) -> pa.RecordBatch:
    """jsonb columns parsed back into their nested Arrow types (bytes from 0x-hex), over whole columns."""
    arrays = []
    for column, field in zip(batch.columns, target, strict=True):
        if _is_json(field.type):
            text = column.storage if isinstance(column, pa.ExtensionArray) else column
            column = json_arrays(text, field.type)
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _list_items(convert: Callable[[pa.Array], pa.Array]) -> Callable[[pa.Array], pa.Array]:
    def apply(array: pa.Array) -> pa.Array:
        if pa.types.is_fixed_size_list(array.type):
            array = array.cast(pa.list_(array.type.value_field))
        first, last = array.offsets[0].as_py(), array.offsets[-1].as_py()
        values = convert(array.values.slice(first, last - first))
        mask = pc.is_null(array) if array.null_count else None
        return pa.ListArray.from_arrays(pc.subtract(array.offsets, first), values, mask=mask)

    return apply


_PG_INTEGERS = {"smallint": pa.int16(), "integer": pa.int32(), "bigint": pa.int64(), "numeric": pa.uint64()}
"""The Arrow integer type whose bounds a range column of a table amp_dagster did not create is checked against
(numeric compares exactly with any uint64 bound)."""

# A refused login reaches libpq as text without its SQLSTATE, so the server's words tell which it was: 28P01 (the
# password), 28000 (no such role, NOLOGIN, pg_hba.conf, another method), 3D000 (no such database), 42501.
_LOGIN_REFUSALS: tuple[tuple[re.Pattern[str], type[TerminalError], str], ...] = (
    (
        re.compile(r'password authentication failed for user "([^"]*)"'),
        AuthenticationError,
        'the password of role "{0}" was rejected. Check the password (the password setting, PGPASSWORD or ~/.pgpass)',
    ),
    (
        re.compile(r'role "([^"]*)" does not exist'),
        AuthenticationError,
        'role "{0}" does not exist. Check the user name (user=..., or user@ in the URL), or create the role',
    ),
    (
        re.compile(r'role "([^"]*)" is not permitted to log in'),
        AuthenticationError,
        'role "{0}" may not log in (it is NOLOGIN). Log in as another role, or ALTER ROLE "{0}" LOGIN',
    ),
    (
        re.compile(r"((?:no pg_hba\.conf entry|pg_hba\.conf rejects connection) for [^\n]*)"),
        AuthenticationError,
        "the server's pg_hba.conf admits no such login ({0}). Ask its administrator for an entry",
    ),
    (
        re.compile(r'(\w+) authentication failed for user "([^"]*)"'),
        AuthenticationError,
        '{0} authentication of role "{1}" failed. Check the user name and the credentials',
    ),
    (
        re.compile(r"fe_sendauth: no password supplied"),
        AuthenticationError,
        "the server asks for a password and none was given. Set it in the password setting, PGPASSWORD or ~/.pgpass",
    ),
    (
        re.compile(r'database "([^"]*)" does not exist'),
        ConfigError,
        'database "{0}" does not exist. Check the database name (dbname=..., or the path of the URL), or create it',
    ),
    (
        re.compile(r'permission denied for database "([^"]*)"'),
        AuthenticationError,
        'the role may not connect to database "{0}". GRANT CONNECT ON DATABASE "{0}" to it',
    ),
)


def login_refusal(exc: BaseException, where: str) -> TerminalError | None:
    """The terminal error for a login the server refused (which role, password, rule or database), or None when the
    connection failed otherwise (a server that is down or full is worth trying again). Never holds a password:
    only the role and database names the server gave are repeated."""
    text = str(exc)
    for pattern, error, message in _LOGIN_REFUSALS:
        found = pattern.search(text)
        if found:
            return error(f"{where}: {message.format(*found.groups())}.")
    return None


def _is_transient(exc: BaseException) -> bool:
    import psycopg
    from psycopg import errors

    if isinstance(exc, AmpDagsterError):
        return exc.transient
    if isinstance(exc, errors.DeadlockDetected | errors.SerializationFailure | errors.LockNotAvailable):
        return True
    # connection-level failures (refused, reset, server shutting down) are OperationalError without a SQLSTATE
    # or with class 08, 57P or 53 (insufficient resources)
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None) or ""
        return state == "" or state.startswith(("08", "57P", "53"))
    return False
