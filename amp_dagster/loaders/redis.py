"""Redis loader: one hash (or stream entry) per row, RESP commands framed from whole Arrow columns and pipelined.

Keys. ``P`` is ``<prefix>:{<namespace>:<table>}`` (``%:{}`` %-escaped in the names, so two tables never share a
key); the braces make it a hash tag, so all keys of a table sit in one cluster slot and the scripts stay
cluster-safe. ``P:meta`` is a hash: ``schema`` (the Arrow schema), ``live`` (the current area ``g<N>``), ``form``,
``key``, ``range``, ``seq`` (a counter), and ``stage:g<N>`` for each area being staged or waiting to be dropped.
``P:lock`` and ``P:owner`` are the table's lock; ``P:exp`` lists rows with a TTL. In the hash form (default) the
area ``P:g<N>`` is a sorted set, the block index (member = key text, score = range value), and each row is the hash
``P:g<N>:<key text>``. In the stream form ``P:g<N>`` is a stream whose entry IDs are ``<range value>-<n>``.
Key text joins the key columns' values with ``:``; rows without key columns are keyed ``<range value>:<write
number>:<row number>``: a content hash would merge identical rows. A key written again replaces the whole row (DEL,
then HSET): the last row wins. How values are encoded: resp.py.

Ranges. Scores are doubles, exact up to 2^53, so the hash form refuses range values beyond ±2^53; stream IDs are
unsigned, so the stream form refuses negative ones. Deleting a range is one script, ZRANGE BYSCORE in pages then
UNLINK and ZREM: O(log N + M) and atomic.

Concurrency. Writes, deletes and full refreshes hold the table's lock, a 1.5 s lease renewed by a heartbeat, so a
dead writer's lock passes on within 1.5 s; fencing keeps a writer that lost its lock from changing anything
afterwards (redis_lock.py). Under the lock, every listed stage is dead.

Atomicity. ``write(replace=...)`` stages rows in a fresh area; one script then deletes the range and RENAMEs them
in. ``replace_table`` stages a whole area; one script flips ``live`` and lists the old area, dropped in pages
afterwards. A failure before the commit leaves the table as it was and drops the staged keys. The move blocks the
server about 5 µs a row (0.5 s for 100k rows): the price of readers never seeing half a range, so replace ranges
of partition size (a move longer than the lease still commits, but lets a waiting writer in right after it).
Plain appends are pipelined and not atomic. The stream form replaces only a tail range (a delete, then an append,
not atomic) and has no upsert.

TTL. ``ttl`` seconds sets EXPIRE on each row hash and lists the row in ``P:exp``, scored by when it expires; each
write of the hash form unindexes the listed rows that are gone, so the index holds no more than the live rows and
those expired since the last write (reads skip these). The stream form sets it on the stream, at each write.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import AmpDagsterError, ConfigError, ServiceUnavailableError, TerminalError, TransientError, scrub
from ..ranges import RowRange
from ..retry import DEFAULT_RETRY, RetryPolicy, retry_call
from . import resp
from .base import ArrowData, Capabilities, Loader, TableRef, WriteResult, missing_table, require_driver
from .batches import Tally, checked_batches, key_columns
from .redis_lock import LEASE_MS, Held, holding
from .redis_scripts import DELETE, DISCARD, FLIP, MOVE, READ, STAGE, SWEEP, TRIM, XDELETE, XREAD
from .schema import cast_columns, check_schema, require_columns, schema_from_text, schema_to_text, widen

EXACT = 2**53  # the largest integer a sorted-set score (a double) holds exactly
PAGE = 10_000  # index members per script call in long server-side loops, so the server never blocks long


class RedisLoader(Loader):
    """Loads Arrow into Redis: a hash per row plus a sorted-set block index (or a stream per table).

    ``url`` is ``redis://[[user]:password@]host:port/db``. ``prefix`` starts every key. ``form`` is ``"hash"``
    or ``"stream"``. ``ttl`` (seconds) expires rows. ``timeout`` bounds one command, which includes the range
    scripts. ``lock_wait`` (seconds) bounds the wait for another writer of the same table.

    The server's user needs CLIENT ID and CLIENT KILL besides the data commands: the table lock fences writers
    with them (redis_lock.py).

    >>> with RedisLoader("redis://127.0.0.1:6379/0", ttl=86_400) as rd:  # doctest: +SKIP
    ...     t = TableRef("logs", namespace="eth", key=("block_num", "log_index"))
    ...     rd.ensure_table(t, logs.schema)
    ...     rd.write(t, logs, replace=RowRange(0, 999))  # a row: HGETALL amp:{eth:logs}:g0:15000000:3
    """

    store = "Redis"
    capabilities = Capabilities(
        atomic_replace_range=True, atomic_replace_table=True, upsert=True, add_columns=True, flush_rows=65_536
    )

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "amp",
        form: Literal["hash", "stream"] = "hash",
        ttl: int | None = None,
        connect_timeout: float = 10.0,
        timeout: float = 300.0,
        lock_wait: float = 60.0,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        require_driver("redis", "redis", self.store)
        import redis
        from redis.connection import parse_url

        if form not in ("hash", "stream"):
            raise ConfigError(f'RedisLoader form must be "hash" or "stream", got {form!r}')
        if ttl is not None and (not isinstance(ttl, int) or ttl <= 0):
            raise ConfigError(f"RedisLoader ttl must be a positive number of seconds, got {ttl!r}")
        if url.startswith("rediss://"):
            raise ConfigError("RedisLoader does not speak TLS yet: use a redis:// URL (or a TLS tunnel)")
        info = parse_url(url)
        self._host, self._port, self._db = info.get("host", "localhost"), int(info.get("port", 6379)), info.get("db", 0)
        self._user, self._secret = info.get("username"), info.get("password") or ""
        self.where = f"{self._host}:{self._port}/{self._db}"
        self.prefix, self.form, self.ttl, self.lock_wait = prefix, form, ttl, lock_wait
        self._retry = retry
        if form == "stream":  # a stream cannot replace a middle range atomically nor rows by key
            self.capabilities = Capabilities(False, True, False, True, 65_536)
        self._client = redis.Redis(
            host=self._host, port=self._port, db=self._db, username=self._user, password=self._secret or None,
            socket_connect_timeout=connect_timeout, socket_timeout=timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )  # fmt: skip
        auth = (
            [[b"AUTH", *([self._user.encode()] if self._user else []), self._secret.encode()]] if self._secret else []
        )
        self._pipe = resp.Pipe(
            (self._host, self._port), (connect_timeout, timeout), [*auth, [b"SELECT", b"%d" % self._db]]
        )

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        require_columns(schema, table, self.store)
        self._probe(table, schema)
        meta_key = self._key(table, "meta")

        def update(pipe) -> None:
            meta = pipe.hgetall(meta_key)
            if b"schema" in meta:
                stored = self._stored(table, meta)
                added = check_schema(self.store, table, stored, schema, can_add=True)
                pipe.multi()
                pipe.hset(meta_key, "schema", schema_to_text(widen(stored, schema, added)))
            else:  # the seq counter may exist from a failed first replace_table: keep counting from it
                pipe.multi()
                pipe.hset(meta_key, mapping={**self._fields(table, schema), "live": b"g0"})

        self._call(lambda: self._client.transaction(update, meta_key), table)

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store, replace)
        tally = Tally()
        with self._locked(table) as held:
            meta, stored = self._open(table, schema, held)
            batches = (cast_columns(b, stored, store=self.store, table=table) for b in tally.count(batches))
            if replace is None:
                self._send(self._write(table, meta[b"live"]), batches, held)
            elif self.form == "stream":
                after = "+" if replace.end is None else str(replace.end + 1)
                live = self._key(table, meta[b"live"])
                if replace.end is not None and self._call(lambda: self._client.xrevrange(live, "+", after, 1), table):
                    raise TerminalError(
                        f"Redis table {table}: the stream form replaces only the tail, but rows after {replace} "
                        'exist. Delete from the range start first, or use form="hash" to replace middle ranges.'
                    )
                self._drop(table, meta, replace, held)
                self._send(self._write(table, meta[b"live"]), batches, held)
            else:
                bounds = _bounds(replace)
                self._stage(table, held, batches, lambda stage: self._fenced(table, MOVE, held, stage, *bounds, stage))
            if self.form == "hash":
                self._trim(table, held)
        return tally.result()

    def delete(self, table: TableRef, rows: RowRange) -> int:
        meta = self._call(lambda: self._client.hgetall(self._key(table, "meta")), table)
        if b"live" not in meta:
            return 0
        self._check(table, meta, rows)
        with self._locked(table) as held:
            return self._drop(table, meta, rows, held)

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        schema, batches = checked_batches(data, table, self.store)
        self._probe(table, schema)
        tally = Tally()
        with self._locked(table) as held:
            self._sweep(table, held)
            settings = [x for pair in self._fields(table, schema).items() for x in pair]
            self._stage(
                table, held, tally.count(batches), lambda stage: self._fenced(table, FLIP, held, None, stage, *settings)
            )
            self._sweep(table, held)  # the old area
        return tally.result()

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        key_columns(table, self.store)
        if self.form == "stream":
            return super().upsert(table, data)
        return self.write(table, data)  # every write replaces whole rows by key

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        meta = self._meta(table)
        schema = self._stored(table, meta)
        if rows is not None:
            self._check(table, meta, rows)
        area = self._key(table, meta[b"live"])
        names = [table.range_column, *(n for n in schema.names if n != table.range_column)]
        fields = [n.encode() for n in names]
        order = pa.schema([schema.field(n) for n in names])
        pages = (self._stream_pages if meta[b"form"] == b"stream" else self._hash_pages)(table, area, rows, fields)

        def batches() -> Iterator[pa.RecordBatch]:
            for values, lengths, *_ in pages:
                flat, k = resp.unpack(values, lengths), len(fields)
                columns = [resp.decode(flat.take(np.arange(i, len(flat), k)), f.type) for i, f in enumerate(order)]
                yield pa.RecordBatch.from_arrays(columns, schema=order).select(schema.names)

        return pa.RecordBatchReader.from_batches(schema, batches())

    def close(self) -> None:
        self._pipe.close()
        self._client.close()

    # -- keys, metadata and the lock ------------------------------------------------------------------------

    def _key(self, table: TableRef, suffix: str | bytes) -> bytes:
        def esc(name: str) -> str:
            return "".join(f"%{ord(c):02X}" if c in "%:{}" else c for c in name)

        base = f"{esc(self.prefix)}:{{{esc(table.namespace or '')}:{esc(table.name)}}}:".encode()
        return base + (suffix.encode() if isinstance(suffix, str) else suffix)

    def _fields(self, table: TableRef, schema: pa.Schema) -> dict:
        key = json.dumps(list(table.key))
        return {"schema": schema_to_text(schema), "form": self.form, "key": key, "range": table.range_column}

    def _meta(self, table: TableRef) -> dict[bytes, bytes]:
        meta = self._call(lambda: self._client.hgetall(self._key(table, "meta")), table)
        if b"schema" not in meta:
            raise missing_table(self.store, self.where, table)
        return meta

    def _open(self, table: TableRef, data: pa.Schema, held: Held) -> tuple[dict[bytes, bytes], pa.Schema]:
        """Under the lock: the table's metadata and stored schema, with the data checked against it."""
        meta = self._meta(table)
        stored = self._stored(table, meta)
        check_schema(self.store, table, stored, data, can_add=False)
        if any(f.startswith(b"stage:") for f in meta):
            self._sweep(table, held)
        return meta, stored

    def _stored(self, table: TableRef, meta: dict[bytes, bytes]) -> pa.Schema:
        want = {b"form": self.form, b"key": json.dumps(list(table.key)), b"range": table.range_column}
        for name, value in want.items():
            if meta.get(name) != value.encode():
                raise TerminalError(
                    f"Redis table {table} was created with {name.decode()}={meta.get(name, b'').decode()!r}, but "
                    f"this call uses {value!r}. Use the table's settings, or replace_table to rebuild it."
                )
        schema = schema_from_text(meta[b"schema"])
        if schema is None:
            raise TerminalError(f"Redis table {table}: its stored schema is unreadable; rebuild it with replace_table.")
        return schema

    def _check(self, table: TableRef, meta: dict[bytes, bytes], rows: RowRange) -> None:
        """A range must fit the stored range column's type before it selects anything."""
        t = self._stored(table, meta).field(table.range_column).type
        rows.check(table.range_column, t, f"Redis {self.where} table {table}")

    def _probe(self, table: TableRef, schema: pa.Schema) -> None:
        """Every column must survive the value encoding, and key columns the key encoding."""
        for field in schema:
            try:
                empty = pa.nulls(1, field.type)
                resp.decode(resp.encode(empty), field.type)
                if field.name in table.key:
                    resp.key_text(empty)
            except Exception as exc:
                raise TerminalError(
                    f"Redis table {table}: column {field.name!r} has Arrow type {field.type}, which the Redis loader "
                    f"cannot store{' as a key' if field.name in table.key else ''} ({type(exc).__name__}). Cast it "
                    "in the query."
                ) from None

    @contextlib.contextmanager
    def _locked(self, table: TableRef) -> Iterator[Held]:
        """Hold the table's lock for this loader's raw socket (see redis_lock.py), waiting up to ``lock_wait``."""
        with self._pipe.lock:
            me = self._open_pipe(table)
        lock = self._key(table, "lock")

        def busy() -> TransientError:
            return TransientError(
                f"Redis {self.where} table {table}: another writer has held its lock ({lock.decode()!r}) for more "
                f"than {self.lock_wait:g}s. Try again later; a dead writer's lock expires within "
                f"{LEASE_MS / 1000:g}s."
            )

        call = functools.partial(self._call, table=table)
        with holding(self._client, lock, self._key(table, "owner"), me, self.lock_wait, call, busy) as held:
            yield held

    def _fenced(self, table: TableRef, script: str, held: Held, area: bytes | None, *args) -> Any:
        """Run a fenced script (redis_scripts.py) on the table, with ``area`` as its third key if given."""
        keys = [self._key(table, "meta"), self._key(table, "lock")] + ([self._key(table, area)] if area else [])
        base = self._key(table, "")
        return self._call(lambda: self._client.eval(script, len(keys), *keys, held.token, base, *args), table)

    def _refuse(self, code: int, table: TableRef) -> NoReturn:
        """Raise for a fenced script's refusal: -2 the lock was lost, -1 the stage was dropped."""
        what = "lost the table's lock" if code == -2 else "had its staged rows dropped"
        raise TransientError(
            f"Redis {self.where} table {table}: this writer {what}: its heartbeat stalled past the "
            f"{LEASE_MS / 1000:g}s lease (a paused process or a blocked server), so another writer may have taken "
            "over. Nothing was changed since; run it again (an append may be partly stored)."
        )

    def _write(self, table: TableRef, area: bytes) -> resp.Write:
        keyless = not table.key and self.form == "hash"
        number = self._call(lambda: self._client.hincrby(self._key(table, "meta"), "seq"), table) if keyless else 0
        return resp.Write(table, self._key(table, area), self._key(table, "exp"), self.form, number, ttl=self.ttl)

    def _stage(
        self, table: TableRef, held: Held, batches: Iterable[pa.RecordBatch], commit: Callable[[bytes], int]
    ) -> None:
        """Load into a fresh area, listed in meta while it is staged, then ``commit`` it with a script (-2 or -1:
        refused). A failed load or a refused commit drops the area again. After a commit of unknown outcome the
        area may be live, so it is left alone: if it is still listed, the next sweep drops it."""
        stage = self._fenced(table, STAGE, held, None)
        if stage == -2:
            self._refuse(stage, table)
        try:
            self._send(self._write(table, stage), batches, held)
        except BaseException:
            self._discard(table, held, stage)
            raise
        code = self._call(lambda: commit(stage), table)
        if code < 0:
            self._discard(table, held, stage)
            self._refuse(code, table)

    def _discard(self, table: TableRef, held: Held, stage: bytes) -> None:
        with contextlib.suppress(Exception):  # the original failure matters more; the stage stays listed
            while self._fenced(table, DISCARD, held, stage, stage, PAGE):
                pass

    def _sweep(self, table: TableRef, held: Held) -> None:
        """Drop every listed stage: under the lock, none of them belongs to a running writer. A writer that lost
        the lock stops (its next fenced step refuses): the stages may be another writer's now."""
        for field in self._call(lambda: self._client.hkeys(self._key(table, "meta")), table):
            if field.startswith(b"stage:"):
                while (code := self._fenced(table, SWEEP, held, field[6:], field[6:], PAGE)) > 0:
                    pass
                if code < 0:
                    return

    def _drop(self, table: TableRef, meta: dict[bytes, bytes], rows: RowRange, held: Held) -> int:
        if meta[b"form"] == b"stream":
            n = self._fenced(table, XDELETE, held, None, str(rows.start), "+" if rows.end is None else str(rows.end))
        else:
            n = self._fenced(table, DELETE, held, None, *_bounds(rows))
        if n < 0:
            self._refuse(n, table)
        return n

    def _trim(self, table: TableRef, held: Held) -> None:
        while self._fenced(table, TRIM, held, "exp", time.time(), PAGE) == PAGE:
            pass

    # -- reading --------------------------------------------------------------------------------------------

    def _hash_pages(self, table: TableRef, area: bytes, rows: RowRange | None, fields: list) -> Iterator[list]:
        low, high = _bounds(rows) if rows else ("-inf", "+inf")
        first = self._call(lambda: self._client.zcount(area, "-inf", f"({low}"), table)
        count = self._call(lambda: self._client.zcount(area, low, high), table)
        for rank in range(first, first + count, PAGE):
            stop = min(rank + PAGE, first + count) - 1
            yield self._call(lambda r=rank, s=stop: self._client.eval(READ, 1, area, r, s, *fields), table)

    def _stream_pages(self, table: TableRef, area: bytes, rows: RowRange | None, fields: list) -> Iterator[list]:
        start, end = (str(rows.start), "+" if rows.end is None else str(rows.end)) if rows else ("-", "+")
        while True:
            page = self._call(lambda s=start: self._client.eval(XREAD, 1, area, s, end, PAGE, *fields), table)
            if not page[2]:
                return
            start = b"(" + page[2]
            yield page

    # -- the write path: whole columns → RESP → one raw pipelined socket -------------------------------------

    def _send(self, w: resp.Write, batches: Iterable[pa.RecordBatch], held: Held) -> None:
        """Frame and send every batch, then count the replies; one raw socket per loader, so threads take turns.
        It must be the socket the lock names: another one would escape the fencing."""

        def chunks() -> Iterator[tuple[list, int]]:
            for batch in batches:
                _guard(w, batch)
                for start in range(0, batch.num_rows, resp.CHUNK):
                    yield resp.frame(w, batch.slice(start, resp.CHUNK))

        with self._pipe.lock:
            if self._open_pipe(w.table) != held.owner:  # closed since the lock was taken: by a writer taking over?
                self._refuse(-2, w.table)
            try:
                replies = self._pipe.send(chunks())
            except OSError as exc:
                raise TransientError(
                    f"Redis {self.where} table {w.table}: the connection failed mid-write "
                    f"({scrub(str(exc), self._secret)}). Rows sent so far may be stored: run the write again "
                    "(replace ranges make it idempotent)."
                ) from None
        if replies.error:
            raise TerminalError(
                f"Redis {self.where} table {w.table}: the server refused a command: {replies.error}. Other rows of "
                "the write may be stored. WRONGTYPE: a key of the table is used by other data; stream IDs: the "
                "stream form appends in range order (delete from the first range to rewrite)."
            )

    def _open_pipe(self, table: TableRef) -> int:
        """The raw socket, connected; its client id."""
        refused = self._call(self._pipe.open, table)
        if refused:
            raise TerminalError(
                f"Redis {self.where}: the server refused the login: {scrub(refused, self._secret)}. The user needs "
                "AUTH, SELECT and CLIENT ID (and CLIENT KILL, with which the table lock fences writers)."
            )
        return self._pipe.id

    # -- errors ---------------------------------------------------------------------------------------------

    def _call(self, fn, table: TableRef):
        """Run a command with bounded retries of transient failures; errors come out typed, without secrets."""
        import redis

        with self._translating(table, errors=(OSError, redis.RedisError)):
            return retry_call(fn, self._retry, _is_transient, f"Redis {self.where}")

    def _translate(self, exc: BaseException, table: TableRef | None, action: str = "") -> AmpDagsterError:
        import redis

        if _is_transient(exc) and not isinstance(exc, redis.ResponseError):
            return ServiceUnavailableError(
                f"Redis at {self._host}:{self._port} is unreachable after {self._retry.attempts} attempts "
                f"({scrub(str(exc), self._secret)}). Check that the server runs and the host and port are right."
            )
        where = f"Redis {self.where}" + (f" table {table}" if table else "") + (f" ({action})" if action else "")
        return TerminalError(f"{where}: {scrub(str(exc), self._secret)}")


def _is_transient(exc: BaseException) -> bool:
    import redis

    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    if isinstance(exc, redis.ResponseError):
        return str(exc).startswith(("BUSY", "LOADING", "TRYAGAIN"))
    return isinstance(exc, OSError | redis.ConnectionError | redis.TimeoutError)


def _bounds(rows: RowRange) -> tuple[str, str]:
    """Score bounds; past 2^53 no stored score can lie (writes refuse it), so clamping keeps them exact."""
    high = "+inf" if rows.end is None or rows.end >= EXACT else str(rows.end)
    return ("+inf" if rows.start > EXACT else str(rows.start)), high


def _guard(w: resp.Write, batch: pa.RecordBatch) -> None:
    """What keys and the block index cannot hold (null range values are refused by checked_batches)."""
    for name in w.table.key if w.form == "hash" else ():
        if nulls := batch.column(name).null_count:
            raise TerminalError(
                f"Redis table {w.table}: key column {name!r} has {nulls} null value(s) in a batch of "
                f"{batch.num_rows} rows, and a row's key names its hash. Fill or filter them in the query, or key "
                "the table by columns without nulls."
            )
    bounds = pc.min_max(batch.column(w.table.range_column))
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if w.form == "hash" and (low < -EXACT or high > EXACT):
        problem = f"reaches {high if high > EXACT else low}, beyond ±2^53, where sorted-set scores stop being exact"
    elif w.form == "stream" and low < 0:
        problem = f"is {low}; stream IDs cannot be negative"
    else:
        return
    raise TerminalError(
        f"Redis table {w.table}: range column {w.table.range_column!r} {problem}. "
        "Filter or shift the values in the query, or use another range column."
    )
