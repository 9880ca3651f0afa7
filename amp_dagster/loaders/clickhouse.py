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
per INSERT either way and gets the body streamed; 131,072 rows is still a large insert for it. Plain appends and
upserts insert into the table itself: a failed append may leave some of its INSERTs stored.

Concurrency. Every write, delete, upsert, ``ensure_table`` and ``replace_table`` holds the table's lock; reads take
none. ClickHouse has no lock primitive, but ``CREATE TABLE`` of an existing name fails, on chdb and on a server (a
Replicated database makes it cluster-wide), so the lock is a small ``Null`` table ``<table>__amp_lock_<n>`` beside
the table, whose COMMENT records its owner (token, host, pid) and a heartbeat counter bumped every ``lock_lease / 5``
seconds. The highest ``n`` is the lock; it stays behind, marked free, when released. A writer takes the lock by
creating ``n + 1`` when ``n`` is free or its owner is dead, and holds it if ``n + 1`` is then the highest (a writer
acting on a stale view re-creates a dropped lower number and backs off); it drops the lower numbers. An owner is
dead when its heartbeat has not moved for ``lock_lease`` seconds, or at once when it ran on this host (same kernel
boot and pid namespace, Linux) and its process is gone. A second writer waits up to ``lock_wait`` seconds, then
fails with a TransientError naming the table. After taking a dead owner's lock, a writer kills the statements the
dead owner may still have running on a server (every statement under a lock carries a ``query_id`` naming the table
and the owner: ``KILL QUERY ... SYNC``); on chdb they died with its process. A holder whose heartbeat fails checks
before each commit step that it still holds the lock and stops with a TransientError otherwise.

Range replace (``write(replace=...)``). All batches are checked, converted and inserted into a staging table
``<table>__amp_stage_<hex>`` (``CREATE TABLE ... AS`` the table); a failure up to here drops it and leaves the table
as it was. The commit point is one ``ALTER TABLE stage MODIFY COMMENT`` that records the range in the stage (its
journal). Then the range is deleted (a lightweight ``DELETE``, visible when it returns), the staged parts are
attached with ``ATTACH PARTITION ALL FROM stage`` (hard links, so the rows are written once; ``ALL`` needs a recent
server: tested on 26.9) and the stage is dropped.
A concurrent reader sees the old rows until the DELETE returns, the new rows once the ATTACH returns, and between
the two (the few milliseconds of the ATTACH) no rows of the range: ClickHouse has no multi-statement transaction,
so ``capabilities.atomic_replace_range`` is False. After an exception or a SIGKILL past the commit point, the range
holds the old rows, none, or (some of) the new rows until the next writer takes the lock: every write, delete,
upsert, ``ensure_table`` and ``replace_table`` first completes each journaled stage (the DELETE and the ATTACH
again: the staged rows all lie in the range, so repeating them is exact) and drops every other stage, all of them
dead since their writers held the lock. So once the next writer has held the lock, a replace has left the old rows
or the new rows of its range, never neither and never both. ``replace_table`` fills a stage created for the new
schema and swaps it in with ``EXCHANGE TABLES`` (``RENAME`` for a new table); a failure or a kill before the swap
leaves the old table intact, and a stage left by a killed writer (before or after its swap) is dropped by the next.

Tables amp_dagster did not create (no schema in the comment) are compared by ClickHouse type, with the table's
nullability; ``ensure_table`` adopts one whose comment is empty by writing the schema into it. Identifiers are
backquoted with the driver's ``escape_str``; values are bound server-side (range bounds in the range column's own
type, ``{lo:UInt64}``), except COMMENTs, which DDL takes only as literals (the driver's ``format_str``). Table names
ending in ``__amp_lock_<n>`` or ``__amp_stage_<hex>`` are refused: they are the loader's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
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
LOCK_TAG = "amp_dagster_lock:"  # a lock table's comment: its owner and heartbeat, as JSON
JOURNAL_TAG = "amp_dagster_replace:"  # a stage's comment once its range replace is committed: the range, as JSON
_LOCK, _STAGE = "__amp_lock_", "__amp_stage_"
_SIBLING = re.compile(r"__amp_(?:lock_(\d+)|stage_([0-9a-f]+))")  # what follows the table's name in ours
_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end-of-stream marker of the Arrow IPC stream format
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOW_CARDINALITY = re.compile(r"^LowCardinality\((.*)\)$")  # a storage detail the data need not match
# server error codes worth retrying: timeouts, overload, too many parts, network, keeper, deadlock avoided
_TRANSIENT_CODES = {159, 202, 203, 209, 210, 241, 242, 252, 285, 319, 473, 999}
_TABLE_EXISTS, _UNKNOWN_TABLE = 57, 60
_INSERT_SETTINGS = {"async_insert": 0}  # a synchronous insert: the rows are committed when the call returns
_READ_SETTINGS = {"output_format_arrow_string_as_string": 0, "output_format_arrow_compression_method": "none"}
_SCALARS = {pa.bool_(): "Bool", pa.float32(): "Float32", pa.float64(): "Float64", pa.date32(): "Date32"}
_INTEGERS = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64")
_SCALARS.update({getattr(pa, name.lower())(): name for name in _INTEGERS})
_SCALARS.update(dict.fromkeys([pa.string(), pa.large_string(), pa.binary(), pa.large_binary()], "String"))
_INTEGER_TYPES = {name: getattr(pa, name.lower())() for name in _INTEGERS}
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


@dataclass(frozen=True)
class _Sibling:
    """A table amp_dagster keeps beside a table: a lock (``epoch`` set) or a stage, with its comment."""

    name: str
    comment: str
    epoch: int | None

    @property
    def owner(self) -> dict[str, Any]:
        """A lock's owner and heartbeat; empty if the comment is not ours."""
        if not self.comment.startswith(LOCK_TAG):
            return {}
        try:
            return json.loads(self.comment[len(LOCK_TAG) :])
        except ValueError:
            return {}

    @property
    def journal(self) -> tuple[str, RowRange] | None:
        """A committed stage's range column and range; None for a stage that was never committed."""
        if not self.comment.startswith(JOURNAL_TAG):
            return None
        entry = json.loads(self.comment[len(JOURNAL_TAG) :])
        return entry["column"], RowRange(entry["start"], entry["end"])


@dataclass
class _Hold:
    """A held table lock: the lock table, the owner record written into its comment, and the heartbeat's state."""

    table: TableRef
    lock: TableRef
    epoch: int
    owner: dict[str, Any]
    lost: str = ""  # why the lock may be lost, set by the heartbeat
    tag: str = ""  # the query_id prefix of statements under this lock
    stop: threading.Event = field(default_factory=threading.Event)


class ClickHouseLoader(Loader):
    """Loads Arrow into ClickHouse MergeTree tables, on a server over HTTP or in-process through chdb.

    Pass a ``dsn`` (``http://host:8123/db``, or ``chdb:///path`` for the in-process engine) or ``host``/``port``/
    ``username``/``password``/``database``; other keywords go to ``clickhouse_connect.get_client``. Without a
    password, ``CLICKHOUSE_PASSWORD`` is used. The client is created on first use, with bounded retries.
    ``lock_wait`` (seconds) bounds the wait for another writer of the same table; ``lock_lease`` is how long the
    owner of a lock whose heartbeat stopped counts as alive (one on this host whose process is gone is dead at once).

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
        lock_wait: float = 60.0,
        lock_lease: float = 5.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        **options: Any,
    ) -> None:
        parsed = urlparse(dsn or "")
        require_driver("clickhouse_connect", "clickhouse", self.store)
        if parsed.scheme == "chdb":
            require_driver("chdb", "chdb", "ClickHouse in-process (chdb://)")
        if lock_lease <= 0 or lock_wait < 0:
            raise ConfigError(
                f"ClickHouseLoader: lock_lease must be positive and lock_wait not negative, got lock_lease="
                f"{lock_lease} and lock_wait={lock_wait}"
            )
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
        self.lock_wait, self.lock_lease = lock_wait, lock_lease
        # two clients: lock traffic (heartbeats above all) must not queue behind a long insert or an open read
        # stream, which hold a chdb client's handle for as long as they run
        self._conns: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # the lock this thread holds, if any
        self._default_db: str | None = None

    # -- connection and errors -----------------------------------------------------------------------------

    def _client(self, role: str = "data"):
        with self._lock:
            if role not in self._conns:
                import clickhouse_connect

                args = {k: v for k, v in self._args.items() if v not in (None, "")}
                try:
                    self._conns[role] = retry_call(
                        lambda: clickhouse_connect.get_client(**args),
                        self._retry,
                        _is_transient,
                        f"connecting to ClickHouse {self.where}",
                    )
                except Exception as exc:
                    raise self._translate(exc, None, "connect") from None
            return self._conns[role]

    def _run(self, fn, table: TableRef | None, what: str, *, retry: bool = True, role: str = "data"):
        """Call ``fn(client, settings)``; driver errors come out typed, anything else (a dying source) unchanged.
        Under a lock, ``settings`` carries a fresh ``query_id`` naming the table and the lock's owner, so that a
        writer taking over a dead owner's lock can kill what it left running on a server."""
        from clickhouse_connect.driver.exceptions import ClickHouseError

        client, hold, tries = self._client(role), getattr(self._local, "hold", None), 0

        def attempt():
            nonlocal tries
            tries += 1
            if tries > 1 and hold is not None and role == "data":
                self._check_held(hold)  # a retry is a new step: sent only while the lock is still this writer's
            return fn(client, {"query_id": f"{hold.tag}-{uuid.uuid4().hex[:12]}"} if hold else {})

        with self._translating(table, errors=ClickHouseError):
            if not retry:
                return attempt()
            return retry_call(attempt, self._retry, _is_transient, f"ClickHouse {what} on {table}")

    def _command(
        self, table: TableRef | None, sql: str, params: dict | None = None, settings: dict | None = None, retry=True
    ):
        """Run a statement; ``retry=False`` for one that must not run twice when an answer is lost."""
        return self._run(
            lambda c, q: c.command(sql, parameters=params, settings={**(settings or {}), **q}),
            table,
            "command",
            retry=retry,
        )

    def _rows(self, table: TableRef | None, sql: str, params: dict | None = None, role: str = "data") -> list[tuple]:
        return self._run(
            lambda c, q: c.query(sql, parameters=params, settings=q).result_rows, table, "query", role=role
        )

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
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        require_columns(schema, table, self.store)
        self._create_database(table)
        with self._locked(table):
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
        with self._locked(table, existing=True) as hold:
            meta = self._require(table)
            if replace is None:
                self._check(table, meta, schema, can_add=False)
                return self._append(table, meta, schema, batches, hold)
            self._range_type(table, meta, replace)
            self._check(table, meta, schema, can_add=False)
            first = next(batches, None)
            if first is None:  # nothing to write: the replace is a delete, one statement, no stage needed
                self._check_held(hold)
                self._delete(table, meta, replace)
                return Tally().result(0)
            batches = itertools.chain([first], batches)
            stage = self._stage(table)
            self._command(stage, f"CREATE TABLE IF NOT EXISTS {self._q(stage)} AS {self._q(table)}")  # same layout
            try:
                result = self._append(stage, meta, schema, batches, hold)
                self._check_held(hold)
                journal = {"column": table.range_column, "start": replace.start, "end": replace.end}
                self._command(stage, f"ALTER TABLE {self._q(stage)} MODIFY COMMENT {_literal(JOURNAL_TAG, journal)}")
            except BaseException:
                with suppress(Exception):  # the write's own error is the one to report; the next writer drops it
                    self._drop(stage)
                raise
            try:
                self._apply(table, meta, stage, replace, hold)
            except AmpDagsterError as exc:
                raise type(exc)(
                    f"{exc} The new rows of {replace} are committed in {stage}: the next write, delete, ensure_table "
                    f"or replace_table on {table} moves them in."
                ) from None
            return result

    def delete(self, table: TableRef, rows: RowRange) -> int:
        meta = self._meta(table)
        if meta is None:
            return 0
        self._range_type(table, meta, rows)
        with self._locked(table) as hold:
            meta = self._meta(table)  # the table may have been swapped while this writer waited
            if meta is None:
                return 0
            self._range_type(table, meta, rows)
            self._check_held(hold)
            return self._delete(table, meta, rows)

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store)
        self._create_database(table)
        with self._locked(table) as hold:
            stage = self._stage(table)
            self._create(stage, schema)
            try:
                result = self._append(stage, self._require(stage), schema, batches, hold)
                self._check_held(hold)
                verb = "RENAME TABLE {} TO {}" if self._meta(table) is None else "EXCHANGE TABLES {} AND {}"
                # not retried: a second EXCHANGE would swap the old table back; when the answer is lost, the
                # stage name holds either table, and dropping it below leaves the table old or new
                self._command(table, verb.format(self._q(stage), self._q(table)), retry=False)
            except BaseException:
                with suppress(Exception):  # the write's own error is the one to report; the next writer drops it
                    self._drop(stage)
                raise
            with suppress(Exception):  # the refresh is done; the next writer drops what is left of the old table
                self._drop(stage)  # the old table, since the exchange
            return result

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        key = key_columns(table, self.store)
        schema, batches = checked_batches(data, table, self.store)
        with self._locked(table, existing=True) as hold:
            meta = self._require(table)
            if meta.engine != "ReplacingMergeTree" or meta.sorting_key != frozenset(key):
                raise TerminalError(
                    f"ClickHouse table {table} is a {meta.engine} ordered by ({', '.join(sorted(meta.sorting_key))}), "
                    f"so rows cannot be replaced by the key ({', '.join(key)}). Recreate it with replace_table and "
                    "TableRef(key=...) set: keyed tables are created as ReplacingMergeTree ordered by the key."
                )
            self._check(table, meta, schema, can_add=False)
            return self._append(table, meta, schema, batches, hold)

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        meta = self._require(table)
        final = " FINAL" if meta.engine == "ReplacingMergeTree" else ""
        where, params = _range_sql(table, rows, None if rows is None else self._range_type(table, meta, rows))
        sql = f"SELECT * FROM {self._q(table)}{final}{where}"
        stream = self._run(
            lambda c, q: c.raw_stream(sql, params, {**_READ_SETTINGS, **q}, fmt="ArrowStream"), table, "read"
        )
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

    # -- the table lock ----------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, table: TableRef, *, existing: bool = False) -> Iterator[_Hold]:
        """Hold the table's lock, with the stages of dead writers completed or dropped first; with ``existing``,
        fail before taking it if the table does not exist."""
        if re.search(f"(?:{_SIBLING.pattern})$", table.name):
            raise TerminalError(
                f"ClickHouse table {table}: names ending in __amp_lock_<n> or __amp_stage_<hex> are amp_dagster's "
                "own lock and staging tables. Choose another table name."
            )
        hold, stages = self._acquire(table, existing)
        hold.tag = self._tag(table) + hold.owner["owner"]
        self._local.hold = hold
        beating = threading.Thread(target=self._beat, args=(hold,), name="amp-clickhouse-lock", daemon=True)
        beating.start()
        try:
            self._recover(table, hold, stages)
            yield hold
        finally:
            self._local.hold = None
            hold.stop.set()
            beating.join()
            # a free lock lets the next writer in at once; if marking it fails, it is taken over after its lease
            with suppress(Exception):
                self._lock_command(hold.lock, {**hold.owner, "free": True})

    def _acquire(self, table: TableRef, existing: bool) -> tuple[_Hold, list[_Sibling]]:
        token = uuid.uuid4().hex
        owner = {"owner": token, **_process()}
        deadline, pause, seen, superseded, tried = time.monotonic() + self.lock_wait, 0.01, {}, None, False
        while True:
            locks, stages, exists = self._siblings(table)
            if existing and not exists and not tried:  # once a lock may be this writer's, _locked releases it
                raise missing_table(self.store, self.where, table)
            top = locks[-1] if locks else None
            if top is not None and top.owner.get("owner") == token:  # the highest: this writer holds the lock
                break
            if top is None or top.owner.get("free") or self._dead(top, seen):
                superseded, tried = top, True
                epoch = 1 if top is None else top.epoch + 1
                self._create_lock(table, epoch, {**owner, "beat": 0})
                continue  # held only if it is the highest now
            if time.monotonic() > deadline:
                raise TransientError(
                    f"ClickHouse {self.where} table {table}: another writer has held its lock ({top.name}) for more "
                    f"than {self.lock_wait:g}s. Try again later; the lock of a writer that died is taken over "
                    f"within {self.lock_lease:g}s (lock_lease), at once when it ran on this host."
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
        hold = _Hold(table, self._sibling(table, top.name), top.epoch, {**owner, "beat": 0})
        for lower in locks[:-1]:
            self._drop(self._sibling(table, lower.name))
        if superseded is not None and not superseded.owner.get("free"):
            # the dead owner's statements may still run on a server (a client's death does not stop them): end
            # them, then look at the stages again, which one of them may have changed
            self._command(
                table,
                "KILL QUERY WHERE startsWith(query_id, {tag:String}) AND NOT startsWith(query_id, {mine:String}) SYNC",
                {"tag": self._tag(table), "mine": self._tag(table) + token},
            )
            stages = self._siblings(table)[1]
        return hold, stages

    def _siblings(self, table: TableRef) -> tuple[list[_Sibling], list[_Sibling], bool]:
        """The table's locks (lowest epoch first) and stages, and whether the table itself exists."""
        found = self._rows(
            table,
            "SELECT name, comment FROM system.tables WHERE database = {db:String} "
            "AND (name = {name:String} OR startsWith(name, {p:String}))",
            {"db": self._database(table), "name": table.name, "p": table.name + "__amp_"},
            role="lock",
        )
        locks, stages, exists = [], [], False
        for name, comment in found:
            exists = exists or name == table.name
            match = _SIBLING.fullmatch(name, len(table.name))
            if match and match.group(1):
                locks.append(_Sibling(name, comment, int(match.group(1))))
            elif match:
                stages.append(_Sibling(name, comment, None))
        return sorted(locks, key=lambda s: s.epoch), stages, exists

    def _dead(self, lock: _Sibling, seen: dict[str, tuple[str, float]]) -> bool:
        """Whether the lock's owner is dead: its process is gone from this host, or its comment (heartbeat) has
        not changed for ``lock_lease`` seconds of this writer's watching (no clocks compared across hosts; a live
        but silent owner counts as dead too, and finds out at its next commit step)."""
        if _alive(lock.owner) is False:
            return True
        comment, since = seen.get(lock.name, (None, 0.0))
        if comment != lock.comment:
            seen[lock.name] = (lock.comment, time.monotonic())
            return False
        return time.monotonic() - since >= self.lock_lease

    def _create_lock(self, table: TableRef, epoch: int, owner: dict[str, Any]) -> None:
        """Create lock table ``epoch``; an existing one (another writer was first) is not an error."""
        from clickhouse_connect.driver.exceptions import ClickHouseError

        lock = self._sibling(table, f"{table.name}{_LOCK}{epoch}")
        sql = f"CREATE TABLE {self._q(lock)} (beat UInt8) ENGINE = Null COMMENT {_literal(LOCK_TAG, owner)}"
        client = self._client("lock")
        try:
            client.command(sql)
        except ClickHouseError as exc:  # after a lost answer, the next listing shows whether it was created
            if getattr(exc, "code", None) != _TABLE_EXISTS and not _is_transient(exc):
                raise self._translate(exc, table, "take the lock") from None

    def _lock_command(self, lock: TableRef, owner: dict[str, Any]) -> None:
        self._client("lock").command(f"ALTER TABLE {self._q(lock)} MODIFY COMMENT {_literal(LOCK_TAG, owner)}")

    def _beat(self, hold: _Hold) -> None:
        """Bump the lock's heartbeat until released; note when the lock may be lost (a waiter may take it over
        ``lock_lease`` after the last beat it saw, so the holder gives up earlier)."""
        last = time.monotonic()
        while not hold.stop.wait(self.lock_lease / 5):
            hold.owner["beat"] += 1
            try:
                self._lock_command(hold.lock, hold.owner)
                last = time.monotonic()
            except Exception as exc:
                if getattr(exc, "code", None) == _UNKNOWN_TABLE:
                    hold.lost = f"its lock {hold.lock.name} was taken over"
                    return
                if time.monotonic() - last > 0.6 * self.lock_lease:
                    hold.lost = f"its heartbeat failed for {time.monotonic() - last:.1f}s ({exc})"
                    return

    def _check_held(self, hold: _Hold, *, ask: bool = True) -> None:
        """Before a step that changes the table: the lock is still this writer's (its heartbeat works and, with
        ``ask``, no one took it over while this process stood still)."""
        if ask and not hold.lost:
            locks = self._siblings(hold.table)[0]
            if not locks or locks[-1].owner.get("owner") != hold.owner["owner"]:
                hold.lost = f"its lock {hold.lock.name} was taken over"
        if hold.lost:
            raise TransientError(
                f"ClickHouse {self.where} table {hold.table}: the write stopped because {hold.lost}, so another writer "
                "may have the table. Run it again: a range replace or full refresh that stopped before its commit "
                "changed nothing, an append may be partly stored."
            )

    def _recover(self, table: TableRef, hold: _Hold, stages: list[_Sibling]) -> None:
        """Under the lock every stage is dead: complete the committed range replaces, drop the rest."""
        for found in stages:
            stage = self._sibling(table, found.name)
            journal = found.journal
            meta = None if journal is None else self._meta(table)
            if journal is not None and meta is not None:
                column, rows = journal
                self._apply(dataclasses.replace(table, range_column=column), meta, stage, rows, hold)
            else:
                self._drop(stage)

    def _apply(self, table: TableRef, meta: _Meta, stage: TableRef, rows: RowRange, hold: _Hold) -> None:
        """Move a committed stage in: delete the range, attach the staged parts, drop the stage. Every step may be
        repeated after a crash: the staged rows all lie in the range, so a second DELETE removes the ones a first
        ATTACH brought in, and a second ATTACH brings them all. A writer that lost the lock stops: the writer that
        took it completes the stage, and two writers repeating the steps at once could attach the rows twice."""
        self._check_held(hold, ask=False)
        self._delete(table, meta, rows)
        self._check_held(hold, ask=False)
        # not retried: a second ATTACH would bring the rows in twice; the journal's DELETE and ATTACH make it exact
        self._command(table, f"ALTER TABLE {self._q(table)} ATTACH PARTITION ALL FROM {self._q(stage)}", retry=False)
        self._drop(stage)

    def _tag(self, table: TableRef) -> str:
        """The query_id prefix of statements under this table's lock."""
        digest = hashlib.sha1(f"{self._database(table)}\0{table.name}".encode()).hexdigest()[:16]
        return f"amp-{digest}-"

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

    def _sibling(self, table: TableRef, name: str) -> TableRef:
        return TableRef(name, table.namespace, table.range_column, table.key)

    def _stage(self, table: TableRef) -> TableRef:
        # a name per call, so that two refreshes never share a staging table
        return self._sibling(table, f"{table.name}{_STAGE}{uuid.uuid4().hex[:8]}")

    def _drop(self, table: TableRef) -> None:
        # SYNC: an Atomic database would otherwise keep the data on disk for minutes
        self._command(table, f"DROP TABLE IF EXISTS {self._q(table)} SYNC")

    def _create_database(self, table: TableRef) -> None:
        if table.namespace:  # the lock lives in the table's database, so it must exist before the lock
            self._command(table, f"CREATE DATABASE IF NOT EXISTS {_id(table.namespace)}")

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

    def _range_type(self, table: TableRef, meta: _Meta, rows: RowRange) -> pa.DataType:
        """The stored Arrow type of the range column, after checking that ``rows`` fits it (a bound beyond the
        column's type would otherwise be wrapped or compared in another type)."""
        name = table.range_column
        if meta.schema is not None and name in meta.schema.names:
            t = meta.schema.field(name).type
        else:
            ch_type = meta.columns.get(name)
            if ch_type is None:
                raise TerminalError(f"ClickHouse table {table} has no range column {name!r}; set TableRef.range_column")
            t = _INTEGER_TYPES.get(ch_type.removeprefix("Nullable(").removesuffix(")"))
            if t is None:
                raise TerminalError(
                    f"ClickHouse table {table}: its range column {name!r} is {ch_type}, not an integer, so rows "
                    "cannot be selected by range. Set TableRef.range_column to an integer column."
                )
        rows.check(name, t, f"ClickHouse {self.where} table {table}")
        return t

    def _check(self, table: TableRef, meta: _Meta, schema: pa.Schema, *, can_add: bool) -> list[str]:
        """Check the data against the stored Arrow schema, or by ClickHouse type for a table amp_dagster did not
        create; returns the columns to add."""
        if meta.schema is not None:
            return check_schema(self.store, table, meta.schema, schema, can_add=can_add)
        incoming = {f.name: (_ch_type(f.name, f.type, meta.nullable(f.name)), f.nullable) for f in schema}
        return check_schema(self.store, table, meta.columns, incoming, can_add=can_add)

    def _create(self, table: TableRef, schema: pa.Schema) -> None:
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
        where, params = _range_sql(table, rows, self._range_type(table, meta, rows))
        count = int(self._rows(table, f"SELECT count() FROM {self._q(table)}{final}{where}", params)[0][0])
        if count:
            self._command(table, f"DELETE FROM {self._q(table)}{where}", params, {"lightweight_deletes_sync": 2})
        return count

    def _append(self, table: TableRef, meta: _Meta, schema: pa.Schema, batches, hold: _Hold) -> WriteResult:
        """Stream the (checked) batches into ``table`` as ``INSERT ... FORMAT ArrowStream`` statements of
        ``insert_rows`` rows each, cast to ``meta``'s types."""
        tally, target = Tally(), meta.target(schema)
        pending = (self._converted(table, target, batch) for batch in tally.count(batches))
        batch, commits = next(pending, None), 0
        while batch is not None:
            self._check_held(hold, ask=False)
            body = _ipc_stream(batch, pending, self._insert_rows)
            self._run(
                lambda c, q, body=body: c.raw_insert(
                    self._q(table), None, body, {**_INSERT_SETTINGS, **q}, "ArrowStream"
                ),
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


def _literal(tag: str, entry: dict[str, Any]) -> str:
    from clickhouse_connect.driver.binding import format_str

    return format_str(tag + json.dumps(entry, sort_keys=True))


def _range_sql(table: TableRef, rows: RowRange | None, t: pa.DataType | None) -> tuple[str, dict]:
    """The WHERE clause for ``rows``, its bounds bound in the column's own type ``t`` (checked to fit it)."""
    if rows is None:
        return "", {}
    column, ch_type = _id(table.range_column), _SCALARS[t]
    clause = f" WHERE {column} >= {{lo:{ch_type}}}"
    if rows.end is None:
        return clause, {"lo": rows.start}
    return f"{clause} AND {column} <= {{hi:{ch_type}}}", {"lo": rows.start, "hi": rows.end}


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


# -- lock owners: who holds a lock, and whether that process still runs ------------------------------------------


@cache
def _host() -> str | None:
    """This kernel boot and pid namespace, where the OS tells (Linux): two processes with the same value share a
    pid space, so one can see whether the other still runs. None elsewhere: locks then rely on the lease alone."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def _process() -> dict[str, Any]:
    """This process, as a lock records its owner."""
    host = _host()
    return {"host": host, "pid": os.getpid(), "started": host and _started(os.getpid())}


def _alive(owner: dict[str, Any]) -> bool | None:
    """Whether a lock's owner process still runs, when it ran on this host; None when this host cannot tell. The
    start time guards against a reused pid."""
    host = _host()
    if host is None or owner.get("host") != host or not isinstance(owner.get("pid"), int):
        return None
    return _started(owner["pid"]) == owner.get("started")


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
