"""Redis loader: one hash (or stream entry) per row, RESP commands framed from whole Arrow columns and pipelined.

Layout. ``P`` is ``<prefix>:{<namespace>:<table>}``, with ``%``, ``:``, ``{`` and ``}`` %-escaped in the names so
that two tables never share a key. The braces make ``P`` a hash tag: all keys of a table sit in one cluster
slot, so the Lua scripts below stay cluster-safe.

- ``P:meta`` is a hash: ``schema`` (the Arrow schema as IPC bytes, so that ``read()`` gives the original types
  back), ``live`` (the current area, ``g<N>``), ``form``, ``key``, ``range``, ``seq`` (a counter for areas and
  write numbers), and ``stage:g<N>`` for each area being staged.
- In the hash form (default), the area ``P:g<N>`` is a sorted set, the block index: member = key text, score =
  range value. Each row is the hash ``P:g<N>:<key text>``. In the stream form, ``P:g<N>`` is a stream with one
  entry per row, whose ID is ``<range value>-<n>``, so the stream is its own block index.
- Key text is the key columns' values joined by ``:``: integers in decimal, bytes as 0x-hex, strings with ``%``
  and ``:`` %-escaped. Rows of a table without key columns are keyed ``<range value>:<write number>:<row
  number>``: unique, and produced the same way by every write. A content hash would merge identical rows.
  An append (``write``) of a key that exists sets its fields; ``upsert`` replaces the whole row.

Values. Hash and stream fields are named by column, and a null is an absent field, so ``""`` stays distinct.
Bytes are stored raw and strings as UTF-8. Integers, floats, decimals and bools use Arrow's exact text form
(uint64 max, decimal(38,0) extremes and shortest round-trip floats included). Timestamps, dates, times and
durations are their integer count in the type's unit. Nested values are JSON, with bytes as 0x-hex.

Block index. Scores are doubles, exact only up to 2^53, so a range value beyond ±2^53 fails the write in the
hash form. Stream IDs are exact 64-bit but unsigned, so the stream form refuses negative values. Deleting a range
is one Lua script: ZRANGE BYSCORE in pages, then UNLINK and ZREM. It is O(log N + M) and atomic.

Atomicity. ``write(replace=...)`` stages the rows in a fresh area; one script then deletes the range and RENAMEs
the staged rows in. ``replace_table`` stages a whole area; one transaction flips ``live``, and the old area is
removed afterwards, in pages. A failure before the swap leaves the table as it was and drops the staged keys.
The move script blocks the server while it runs, about 5 µs a row here (0.5 s for 100k rows): the price of
readers never seeing half a range, so replace ranges of partition size, not whole tables.
Plain appends are pipelined and not atomic. The stream form replaces a range only at the tail (a delete, then
an append, not atomic) and has no upsert.

TTL. ``ttl`` seconds sets EXPIRE on every row hash. In the stream form it is set on the stream, refreshed by
each write. Index members of expired rows stay until their range is deleted; reads skip them.
"""

from __future__ import annotations

import functools
import json
import select
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError, ServiceUnavailableError, TerminalError, TransientError
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
from .encoding import hex_strings, is_binary_like, json_strings

EXACT = 2**53  # the largest integer a sorted-set score (a double) holds exactly
CHUNK = 16_384  # rows framed per send: ~10 MB of commands for amp's logs, so memory stays bounded

_DROP = """local function drop(area, lo, hi, limit)
  local n, seen = 0, 0
  while seen < limit do
    local m = redis.call('ZRANGE', area, lo, hi, 'BYSCORE', 'LIMIT', 0, 1000)
    if #m == 0 then break end
    local keys = {}
    for i, k in ipairs(m) do keys[i] = area .. ':' .. k end
    n = n + redis.call('UNLINK', unpack(keys))
    redis.call('ZREM', area, unpack(m))
    seen = seen + #m
  end
  return n
end
"""
DROP = _DROP + "return drop(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]))"
# delete the range from the live area, move every staged row in (RENAME keeps its TTL), unlist the stage;
# a stage no longer listed was moved already, so a retry after a lost reply changes nothing
MOVE = (
    _DROP
    + """if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then return 0 end
local n = drop(KEYS[1], ARGV[1], ARGV[2], math.huge)
while true do
  local m = redis.call('ZRANGE', KEYS[2], 0, 999, 'WITHSCORES')
  if #m == 0 then break end
  local add, rem = {}, {}
  for i = 1, #m, 2 do
    redis.pcall('RENAME', KEYS[2] .. ':' .. m[i], KEYS[1] .. ':' .. m[i])  -- a staged row may have expired
    add[#add + 1] = m[i + 1]; add[#add + 1] = m[i]; rem[#rem + 1] = m[i]
  end
  redis.call('ZADD', KEYS[1], unpack(add))
  redis.call('ZREM', KEYS[2], unpack(rem))
end
redis.call('HDEL', KEYS[3], ARGV[3])
return n"""
)
# XDEL the range, then set the stream's last ID back to its top entry so that the range can be appended again
XDROP = """local n = 0
while true do
  local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', 1000)
  if #e == 0 then break end
  local ids = {}
  for i, x in ipairs(e) do ids[i] = x[1] end
  n = n + redis.call('XDEL', KEYS[1], unpack(ids))
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  redis.call('XSETID', KEYS[1], top[1] and top[1][1] or '0-0')
end
return n"""
# reads answer one page as two strings, all values and their int32 lengths (-1 = null), so Python parses
# no value one by one
_PUT = """local vals, lens = {}, {}
local function put(v) vals[#vals + 1] = v or ''; lens[#lens + 1] = struct.pack('<i4', v and #v or -1) end
"""
# rows by index rank (the range column first: absent means the row expired)
READ = (
    _PUT
    + """for _, k in ipairs(redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2])) do
  local v = redis.call('HMGET', KEYS[1] .. ':' .. k, unpack(ARGV, 3))
  if v[1] then for i = 1, #ARGV - 2 do put(v[i]) end end
end
return {table.concat(vals), table.concat(lens)}"""
)
XREAD = (
    _PUT
    + """local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
for _, x in ipairs(e) do
  local row = {}
  for i = 1, #x[2], 2 do row[x[2][i]] = x[2][i + 1] end
  for i = 4, #ARGV do put(row[ARGV[i]]) end
end
return {table.concat(vals), table.concat(lens), #e > 0 and e[#e][1] or ''}"""
)


def _b(value: bytes) -> pa.Scalar:
    return pa.scalar(value, pa.binary())


def _arg(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


EMPTY = _b(b"")


@dataclass
class _Write:
    """One write into one area: what each chunk of rows becomes."""

    table: TableRef
    area: bytes
    form: str
    number: int = 0  # the write number in keys of rows without key columns
    rows: int = 0
    upsert: bool = False
    ttl: int | None = None


class RedisLoader(Loader):
    """Loads Arrow into Redis: a hash per row plus a sorted-set block index (or a stream per table).

    ``url`` is ``redis://[[user]:password@]host:port/db``. ``prefix`` starts every key. ``form`` is ``"hash"``
    or ``"stream"``. ``ttl`` (seconds) expires rows. ``timeout`` bounds one command, which includes the range
    scripts.

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
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
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
        self.prefix, self.form, self.ttl = prefix, form, ttl
        self._timeouts, self._retry = (connect_timeout, timeout), retry
        if form == "stream":  # a stream cannot replace a middle range atomically nor rows by key
            self.capabilities = Capabilities(False, True, False, True, 65_536)
        self._client = redis.Redis(
            host=self._host, port=self._port, db=self._db, username=self._user, password=self._secret or None,
            socket_connect_timeout=connect_timeout, socket_timeout=timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )  # fmt: skip
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        require_columns(schema, table, self.store)
        self._probe(table, schema)
        meta_key = self._key(table, "meta")

        def update(pipe) -> None:
            meta = pipe.hgetall(meta_key)
            if b"schema" in meta:
                stored = self._stored(table, meta)
                added = compare_columns(self.store, table, _types(stored), _incoming(schema), can_add=True)
                schema_ = pa.schema([*stored, *(schema.field(name) for name in added)])
                pipe.multi()
                pipe.hset(meta_key, "schema", schema_.serialize().to_pybytes())
            else:  # the seq counter may exist from a failed first replace_table: keep counting from it
                pipe.multi()
                pipe.hset(meta_key, mapping={**self._fields(table, schema), "live": b"g0"})

        self._call(lambda: self._client.transaction(update, meta_key), table)

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        schema, batches = record_batches(data)
        meta = self._meta(table, schema)
        tally = Tally()
        batches = tally.count(check_in_range(batches, table, replace))
        live = meta[b"live"]
        if replace is None:
            self._send(self._write(table, live), batches)
        elif self.form == "stream":
            after = "+" if replace.end is None else str(replace.end + 1)
            if replace.end is not None and self._call(
                lambda: self._client.xrevrange(self._key(table, live), "+", after, 1), table
            ):
                raise TerminalError(
                    f"Redis table {table}: the stream form replaces only the tail, but rows after {replace} exist. "
                    'Delete from the range start first, or use form="hash" to replace middle ranges.'
                )
            self.delete(table, replace)
            self._send(self._write(table, live), batches)
        else:
            stage = self._stage(table, lambda w: self._send(w, batches))
            keys = self._key(table, live), self._key(table, stage), self._key(table, "meta")
            self._call(lambda: self._client.eval(MOVE, 3, *keys, *_bounds(replace), b"stage:" + stage), table)
        return tally.result()

    def delete(self, table: TableRef, rows: RowRange) -> int:
        meta = self._call(lambda: self._client.hgetall(self._key(table, "meta")), table)
        if b"live" not in meta:
            return 0
        area = self._key(table, meta[b"live"])
        if meta[b"form"] == b"stream":
            bounds = (str(rows.start), "+" if rows.end is None else str(rows.end))
            return self._call(lambda: self._client.eval(XDROP, 1, area, *bounds), table)
        return self._call(lambda: self._client.eval(DROP, 1, area, *_bounds(rows), 2**62), table)

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        schema, batches = record_batches(data)
        require_columns(schema, table, self.store)
        self._probe(table, schema)
        meta_key = self._key(table, "meta")
        meta = self._call(lambda: self._client.hgetall(meta_key), table)
        tally = Tally()
        stage = self._stage(table, lambda w: self._send(w, tally.count(batches)))
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(meta_key, mapping={**self._fields(table, schema), "live": stage})
        pipe.hdel(meta_key, b"stage:" + stage)
        self._call(pipe.execute, table)
        old = [meta.get(b"live")] + [f[6:] for f in meta if f.startswith(b"stage:")]  # crashed stages go too
        for area in filter(None, old):
            self._drop_area(table, area, meta.get(b"form", self.form.encode()) == b"stream")
            self._call(lambda a=area: self._client.hdel(meta_key, b"stage:" + a), table)
        return tally.result()

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        key_columns(table, self.store)
        if self.form == "stream":
            return super().upsert(table, data)
        schema, batches = record_batches(data)
        meta = self._meta(table, schema)
        tally = Tally()
        self._send(
            _Write(table, self._key(table, meta[b"live"]), "hash", upsert=True, ttl=self.ttl), tally.count(batches)
        )
        return tally.result()

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        meta = self._meta(table)
        schema = self._stored(table, meta)
        area = self._key(table, meta[b"live"])
        names = [table.range_column, *(n for n in schema.names if n != table.range_column)]
        fields = [n.encode() for n in names]
        order = pa.schema([schema.field(n) for n in names])
        pages = (self._stream_pages if meta[b"form"] == b"stream" else self._hash_pages)(table, area, rows, fields)

        def batches() -> Iterator[pa.RecordBatch]:
            for values, lengths, *_ in pages:
                flat, k = _unpack(values, lengths), len(fields)
                columns = [_decode(flat.take(np.arange(i, len(flat), k)), f.type) for i, f in enumerate(order)]
                yield pa.RecordBatch.from_arrays(columns, schema=order).select(schema.names)

        return pa.RecordBatchReader.from_batches(schema, batches())

    def close(self) -> None:
        self._drop_socket()
        self._client.close()

    # -- keys and metadata ----------------------------------------------------------------------------------

    def _key(self, table: TableRef, suffix: str | bytes) -> bytes:
        def esc(name: str) -> str:
            return "".join(f"%{ord(c):02X}" if c in "%:{}" else c for c in name)

        base = f"{esc(self.prefix)}:{{{esc(table.namespace or '')}:{esc(table.name)}}}:".encode()
        return base + (suffix.encode() if isinstance(suffix, str) else suffix)

    def _fields(self, table: TableRef, schema: pa.Schema) -> dict:
        key = json.dumps(list(table.key))
        return {"schema": schema.serialize().to_pybytes(), "form": self.form, "key": key, "range": table.range_column}

    def _meta(self, table: TableRef, data: pa.Schema | None = None) -> dict[bytes, bytes]:
        """The table's metadata; with ``data``, checked to fit the table's columns."""
        meta = self._call(lambda: self._client.hgetall(self._key(table, "meta")), table)
        if b"schema" not in meta:
            raise TerminalError(
                f"Redis {self.where}: table {table} does not exist. Call ensure_table(table, schema) first."
            )
        if data is not None:
            compare_columns(self.store, table, _types(self._stored(table, meta)), _incoming(data), can_add=False)
        return meta

    def _stored(self, table: TableRef, meta: dict[bytes, bytes]) -> pa.Schema:
        want = {b"form": self.form.encode(), b"key": json.dumps(list(table.key)).encode()}
        want[b"range"] = table.range_column.encode()
        for name, value in want.items():
            if meta.get(name) != value:
                raise TerminalError(
                    f"Redis table {table} was created with {name.decode()}={meta.get(name, b'').decode()!r}, but "
                    f"this call uses {value.decode()!r}. Use the table's settings, or replace_table to rebuild it."
                )
        return pa.ipc.read_schema(pa.py_buffer(meta[b"schema"]))

    def _probe(self, table: TableRef, schema: pa.Schema) -> None:
        """Every column must survive the value encoding, and key columns the key encoding."""
        for field in schema:
            try:
                empty = pa.nulls(1, field.type)
                _decode(_encode(empty), field.type)
                if field.name in table.key:
                    _key_text(empty)
            except Exception as exc:
                raise TerminalError(
                    f"Redis table {table}: column {field.name!r} has Arrow type {field.type}, which the Redis loader "
                    f"cannot store{' as a key' if field.name in table.key else ''} ({type(exc).__name__}). Cast it "
                    "in the query."
                ) from None

    def _write(self, table: TableRef, area: bytes) -> _Write:
        number = (
            0
            if table.key or self.form == "stream"
            else self._call(lambda: self._client.hincrby(self._key(table, "meta"), "seq"), table)
        )
        return _Write(table, self._key(table, area), self.form, number, ttl=self.ttl)

    def _stage(self, table: TableRef, load: Callable[[_Write], None]) -> bytes:
        """Load into a fresh area, recorded in meta while it is staged; on failure drop it again."""
        meta_key = self._key(table, "meta")
        stage = b"g%d" % self._call(lambda: self._client.hincrby(meta_key, "seq"), table)
        self._call(lambda: self._client.hset(meta_key, b"stage:" + stage, 1), table)
        try:
            load(self._write(table, stage))
        except BaseException:
            try:
                self._drop_area(table, stage, self.form == "stream")
                self._client.hdel(meta_key, b"stage:" + stage)
            except Exception:  # the original failure matters more; the stage stays listed in meta
                pass
            raise
        return stage

    def _drop_area(self, table: TableRef, area: bytes, stream: bool) -> None:
        key = self._key(table, area)
        if stream:
            self._call(lambda: self._client.unlink(key), table)
            return
        while self._call(lambda: self._client.eval(DROP, 1, key, "-inf", "+inf", 10_000), table):
            pass  # pages of 10k rows, so the server never blocks long

    # -- reading --------------------------------------------------------------------------------------------

    def _hash_pages(self, table: TableRef, area: bytes, rows: RowRange | None, fields: list) -> Iterator[list]:
        low, high = _bounds(rows) if rows else ("-inf", "+inf")
        first = self._call(lambda: self._client.zcount(area, "-inf", f"({low}"), table)
        count = self._call(lambda: self._client.zcount(area, low, high), table)
        for rank in range(first, first + count, 10_000):
            stop = min(rank + 10_000, first + count) - 1
            yield self._call(lambda r=rank, s=stop: self._client.eval(READ, 1, area, r, s, *fields), table)

    def _stream_pages(self, table: TableRef, area: bytes, rows: RowRange | None, fields: list) -> Iterator[list]:
        start, end = (str(rows.start), "+" if rows.end is None else str(rows.end)) if rows else ("-", "+")
        while True:
            page = self._call(lambda s=start: self._client.eval(XREAD, 1, area, s, end, 10_000, *fields), table)
            if not page[2]:
                return
            start = b"(" + page[2]
            yield page

    # -- the write path: whole columns → RESP → one raw pipelined socket -------------------------------------

    def _send(self, w: _Write, batches: Iterable[pa.RecordBatch]) -> None:
        with self._lock:  # one raw socket per loader: writes from several threads take turns
            self._send_locked(w, batches)

    def _send_locked(self, w: _Write, batches: Iterable[pa.RecordBatch]) -> None:
        sock = self._socket(w.table)
        replies, state, sending = 0, _Replies(), None

        def push(buffers: list) -> None:
            for buffer in buffers:
                sock.sendall(buffer)
            state.drain(sock, wait=False)

        # one thread sends chunk i (the GIL is released in sendall) while this one frames chunk i+1, so the
        # server never waits for the encoder; at most two chunks are in memory
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="amp-redis-send") as pool:
                for batch in batches:
                    _guard(w, batch)
                    for start in range(0, batch.num_rows, CHUNK):
                        buffers, expect = _frame(w, batch.slice(start, CHUNK))
                        if sending is not None:
                            sending.result()
                        sending, replies = pool.submit(push, buffers), replies + expect
                if sending is not None:
                    sending.result()
            while state.count < replies:
                state.drain(sock, wait=True)
        except OSError as exc:
            self._drop_socket()
            raise TransientError(
                f"Redis {self.where} table {w.table}: the connection failed mid-write ({self._scrub(exc)}). "
                "Rows sent so far may be stored: run the write again (replace ranges make it idempotent)."
            ) from None
        except BaseException:
            self._drop_socket()  # unread replies would confuse the next write on this socket
            raise
        if state.error:
            raise TerminalError(
                f"Redis {self.where} table {w.table}: the server refused a command: {state.error}. Other rows of "
                "the write may be stored. WRONGTYPE: a key of the table is used by other data; stream IDs: the "
                "stream form appends in range order (delete from the first range to rewrite)."
            )

    def _socket(self, table: TableRef) -> socket.socket:
        if self._sock is not None:
            return self._sock
        hello = [b"AUTH", *([self._user.encode()] if self._user else []), self._secret.encode()] if self._secret else []
        commands = [c for c in (hello, [b"SELECT", str(self._db).encode()]) if c]

        def connect() -> socket.socket:
            sock = socket.create_connection((self._host, self._port), timeout=self._timeouts[0])
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self._timeouts[1])
            sock.sendall(b"".join(b"*%d\r\n" % len(c) + b"".join(map(_arg, c)) for c in commands))
            replies = _Replies()
            while replies.count < len(commands):
                replies.drain(sock, wait=True)
            if replies.error:
                sock.close()
                raise TerminalError(f"Redis {self.where}: the server refused the login: {self._scrub(replies.error)}")
            return sock

        self._sock = self._call(connect, table)
        return self._sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- errors ---------------------------------------------------------------------------------------------

    def _call(self, fn, table: TableRef):
        """Run a command with bounded retries of transient failures; errors come out typed, without secrets."""
        import redis

        try:
            return retry_call(fn, self._retry, _is_transient, f"Redis {self.where}")
        except (TerminalError, TransientError):
            raise
        except (OSError, redis.ConnectionError, redis.TimeoutError) as exc:
            if _is_transient(exc):
                raise ServiceUnavailableError(
                    f"Redis at {self._host}:{self._port} is unreachable after {self._retry.attempts} attempts "
                    f"({self._scrub(exc)}). Check that the server runs and the host and port are right."
                ) from None
            raise TerminalError(f"Redis {self.where} table {table}: {self._scrub(exc)}") from None
        except redis.RedisError as exc:
            raise TerminalError(f"Redis {self.where} table {table}: {self._scrub(exc)}") from None

    def _scrub(self, exc: object) -> str:
        text = str(exc).strip()
        return text.replace(self._secret, "***") if self._secret else text


class _Replies:
    """Counts RESP replies in bulk and keeps the first error; no reply is parsed one by one.

    The commands sent (HSET, ZADD, DEL, EXPIRE, XADD, AUTH, SELECT) answer with an integer (``:``), a simple
    string (``+``), an error (``-``) or a bulk stream ID (``$``, then a line starting with a digit), so every
    reply, and only a reply, starts a line with one of ``:+-$``.
    """

    def __init__(self) -> None:
        self.count, self.error, self._last = 0, "", b"\n"

    def drain(self, sock: socket.socket, wait: bool) -> None:
        """Read what has arrived; with ``wait``, block for at least one read (up to the socket's timeout)."""
        while wait or select.select([sock], [], [], 0)[0]:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            seen = self._last + data
            self.count += sum(seen.count(start) for start in (b"\n:", b"\n+", b"\n-", b"\n$"))
            at = seen.find(b"\n-")
            if at >= 0 and not self.error:
                self.error = seen[at + 2 :].split(b"\r", 1)[0].decode(errors="replace")
            self._last, wait = data[-1:], False


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


def _types(schema: pa.Schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def _incoming(schema: pa.Schema) -> dict[str, tuple[str, bool]]:
    return {f.name: (str(f.type), f.nullable) for f in schema}


def _guard(w: _Write, batch: pa.RecordBatch) -> None:
    if not batch.num_rows:
        return
    column = batch.column(w.table.range_column)
    bounds = pc.min_max(column)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    problem = None
    if column.null_count:
        problem = "is null in some rows: every row needs a range value to be indexed"
    elif w.form == "hash" and (low < -EXACT or high > EXACT):
        problem = f"reaches {high if high > EXACT else low}, beyond ±2^53, where sorted-set scores stop being exact"
    elif w.form == "stream" and low < 0:
        problem = f"is {low}; stream IDs cannot be negative"
    if problem:
        raise TerminalError(
            f"Redis table {w.table}: range column {w.table.range_column!r} {problem}. "
            "Filter or shift the values in the query, or use another range column."
        )
    for name in w.table.key:
        if batch.column(name).null_count:
            raise TerminalError(f"Redis table {w.table}: key column {name!r} is null in some rows; keys need values.")


# -- encodings (whole columns, no per-row Python) ---------------------------------------------------------


def _int_type(t: pa.DataType) -> pa.DataType | None:
    """The integer that a temporal type counts in, or None for other types."""
    temporal = pa.types.is_temporal(t)
    return (pa.int64() if t.bit_width == 64 else pa.int32()) if temporal else None


def _encode(a: pa.Array) -> pa.Array:
    """Any column as binary values, nulls kept."""
    t = a.type
    if pa.types.is_dictionary(t):
        return _encode(a.dictionary_decode())
    if is_binary_like(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return a.cast(pa.binary())
    if pa.types.is_nested(t):
        return json_strings(a).cast(pa.binary())
    if _int_type(t) is not None:
        a = a.cast(_int_type(t))
    return a.cast(pa.string()).cast(pa.binary())


def _decode(v: pa.Array, t: pa.DataType) -> pa.Array:
    """The inverse of :func:`_encode`, back to the original type."""
    if pa.types.is_dictionary(t):
        return _decode(v, t.value_type).dictionary_encode().cast(t)
    if pa.types.is_null(t):
        return pa.nulls(len(v))
    if is_binary_like(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return v.cast(t)
    if pa.types.is_nested(t):
        return _from_json(v, t)
    text = v.cast(pa.string())
    return text.cast(_int_type(t)).cast(t) if _int_type(t) is not None else text.cast(t)


def _key_text(a: pa.Array) -> pa.Array:
    if pa.types.is_nested(a.type):
        raise TypeError("nested values cannot be keys")
    if is_binary_like(a.type):
        return hex_strings(a).cast(pa.binary())
    text = pc.replace_substring(_encode(a).cast(pa.string()), "%", "%25")
    return pc.replace_substring(text, ":", "%3A").cast(pa.binary())


def _join(*parts: bytes | pa.Array, nulls: str = "skip") -> pa.Array:
    """Concatenate per row: bytes are constants (adjacent ones merged into one), arrays give one value a row."""
    merged: list = []
    for part in parts:
        if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += part
        else:
            merged.append(part)
    scalars = (_b(p) if isinstance(p, bytes) else p for p in merged)
    return pc.binary_join_element_wise(*scalars, EMPTY, null_handling=nulls)


def _bulk(column: pa.Array, before: bytes = b"") -> list:
    """``before``, then each value as a RESP bulk string (``$<len>``, CRLF, the value, CRLF): parts for _join.

    A column with nulls comes back as one joined array that is null where the value is, so that a row's join
    leaves the field out whole; fixed-size bytes get a constant length prefix.
    """
    values = _encode(column)
    if pa.types.is_fixed_size_binary(column.type):
        parts = [before + b"$%d\r\n" % column.type.byte_width, values, b"\r\n"]
    else:
        length = pc.binary_length(values).cast(pa.string()).cast(pa.binary())
        parts = [before + b"$", length, b"\r\n", values, b"\r\n"]
    return [_join(*parts, nulls="emit_null")] if values.null_count else parts


def _unpack(values: bytes, lengths: bytes) -> pa.Array:
    """A page of values from the read scripts as one binary array."""
    sizes = np.frombuffer(lengths, "<i4")
    offsets = np.zeros(len(sizes) + 1, np.int32)
    np.cumsum(np.maximum(sizes, 0), out=offsets[1:])
    valid = sizes >= 0
    mask = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.binary(), len(sizes), [mask, pa.py_buffer(offsets), pa.py_buffer(values)])


def _payload(a: pa.Array) -> pa.Buffer:
    """The concatenated values of a binary array, without a copy."""
    if not len(a):
        return pa.py_buffer(b"")
    offsets = np.frombuffer(a.buffers()[1], np.int32)
    return a.buffers()[2][offsets[a.offset] : offsets[a.offset + len(a)]]


def _frame(w: _Write, batch: pa.RecordBatch) -> tuple[list, int]:
    """A chunk of rows as RESP buffers ready to send, and how many replies they will produce."""
    n = batch.num_rows
    ranges = _encode(batch.column(w.table.range_column))
    if w.table.key:
        members = pc.binary_join_element_wise(*(_key_text(batch.column(k)) for k in w.table.key), _b(b":"))
    else:
        numbers = pa.array(np.arange(w.rows, w.rows + n)).cast(pa.string()).cast(pa.binary())
        members = _join(ranges, b":%d:" % w.number, numbers)
    w.rows += n
    fields, nulls = [], []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        fields += _bulk(column, _arg(name.encode()))
        if column.null_count:
            nulls.append(pc.cast(pc.is_null(column), pa.int64()))
    base = (2 if w.form == "hash" else 3) + 2 * batch.num_columns
    verb = b"$4\r\nHSET\r\n" if w.form == "hash" else b"$4\r\nXADD\r\n" + _arg(w.area)
    if nulls:  # the argument count differs per row
        count = pc.subtract(base, pc.multiply(2, functools.reduce(pc.add, nulls)))
        head = [b"*", count.cast(pa.string()).cast(pa.binary()), b"\r\n" + verb]
    else:
        head = [b"*%d\r\n" % base + verb]
    if w.form == "stream":
        rows = _join(*head, *_bulk(_join(ranges, b"-*")), *fields)
        expire = [b"*3\r\n$6\r\nEXPIRE\r\n" + _arg(w.area) + _arg(b"%d" % w.ttl)] if w.ttl else []
        return [_payload(rows), *expire], n + len(expire)
    keys = _bulk(_join(w.area + b":", members))
    parts = [*head, *keys, *fields]
    if w.upsert:  # a row replaced by key must lose the fields it no longer has
        parts = [b"*2\r\n$3\r\nDEL\r\n", *keys, *parts]
    if w.ttl:
        parts += [b"*3\r\n$6\r\nEXPIRE\r\n", *keys, _arg(b"%d" % w.ttl)]
    rows = _join(*parts)
    # the index goes first: an index entry whose row never arrived is skipped by reads and removed by deletes,
    # while a row without an index entry could never be deleted by range
    pairs = _join(*_bulk(ranges), *_bulk(members))
    zadd = b"*%d\r\n$4\r\nZADD\r\n" % (2 + 2 * n) + _arg(w.area)
    return [zadd, _payload(pairs), _payload(rows)], 1 + n * (1 + w.upsert + bool(w.ttl))


# -- nested values: JSON with 0x-hex bytes, parsed back with Arrow's JSON reader ----------------------------

_NIBBLE = np.zeros(256, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _NIBBLE[ord(chr(_c).upper())] = _i


def _json_type(t: pa.DataType) -> pa.DataType:
    """The type JSON text parses into: bytes, decimals and temporal leaves as strings, converted after."""
    if is_binary_like(t) or pa.types.is_decimal(t) or pa.types.is_temporal(t):
        return pa.string()
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_json_type(f.type)).with_nullable(True) for f in t])
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_json_type(t.value_type)).with_nullable(True))
    return t


def _json_leaves(a: pa.Array, t: pa.DataType) -> pa.Array:
    mask = pc.is_null(a) if a.null_count else None
    if pa.types.is_struct(t):
        children = [_json_leaves(a.field(i), f.type) for i, f in enumerate(t)]
        return pa.StructArray.from_arrays(children, names=[f.name for f in t], mask=mask)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        offsets = pc.subtract(a.offsets, a.offsets[0])
        return pa.ListArray.from_arrays(offsets, _json_leaves(a.flatten(), t.value_type), mask=mask)
    if is_binary_like(t):
        return _unhex(a).cast(t)
    return a.cast(t)


def _unhex(text: pa.Array) -> pa.Array:
    text = pc.utf8_slice_codeunits(text, 2).cast(pa.large_string())  # drop "0x"
    offsets = np.frombuffer(text.buffers()[1], np.int64)[text.offset : text.offset + len(text) + 1]
    raw = np.frombuffer(text.buffers()[2], np.uint8)[offsets[0] : offsets[-1]] if text.buffers()[2] else []
    nibbles = _NIBBLE[np.asarray(raw, np.uint8)]
    body = (nibbles[0::2] << 4) | nibbles[1::2]
    validity = pc.is_valid(text).buffers()[1] if text.null_count else None
    buffers = [validity, pa.py_buffer((offsets - offsets[0]) // 2), pa.py_buffer(body.tobytes())]
    return pa.Array.from_buffers(pa.large_binary(), len(text), buffers, text.null_count)


def _from_json(v: pa.Array, t: pa.DataType) -> pa.Array:
    import pyarrow.json as pj

    if not len(v):
        return pa.array([], t)
    lines = _join(b'{"v":', pc.fill_null(v, _b(b"null")), b"}\n")
    text = _payload(lines)
    parsed = pj.read_json(
        pa.BufferReader(text),
        read_options=pj.ReadOptions(block_size=max(1 << 20, text.size + 1)),
        parse_options=pj.ParseOptions(explicit_schema=pa.schema([("v", _json_type(t))])),
    )
    return _json_leaves(parsed.column("v").combine_chunks(), t).cast(t)
