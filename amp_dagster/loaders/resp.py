"""RESP, Redis's wire protocol, built from whole Arrow columns: commands framed per chunk, replies counted in bulk.

Values. Fields are named by column; a null is an absent field, so ``""`` stays distinct. Bytes are raw, strings
UTF-8, numbers Arrow's exact text (uint64 max, decimal(38,0) extremes and round-trip floats included), temporal
values their integer count in the type's unit, nested values JSON with bytes as 0x-hex. Key text joins the key
columns' values with ``:`` (integers in decimal, bytes as 0x-hex, strings with ``%`` and ``:`` escaped).
"""

from __future__ import annotations

import contextlib
import functools
import select
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .base import TableRef
from .encoding import hex_strings, is_binary_like, json_arrays, json_strings

CHUNK = 16_384  # rows framed per send: ~10 MB of commands for amp's logs, so memory stays bounded


def _b(value: bytes) -> pa.Scalar:
    return pa.scalar(value, pa.binary())


EMPTY = _b(b"")


def arg(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def command(*args: bytes) -> bytes:
    """One whole command, for the few that are not framed from columns."""
    return b"*%d\r\n" % len(args) + b"".join(map(arg, args))


@dataclass
class Write:
    """One write into one area: what each chunk of rows becomes."""

    table: TableRef
    area: bytes
    exp: bytes
    form: str
    number: int = 0  # the write number in keys of rows without key columns
    rows: int = 0
    ttl: int | None = None


class Replies:
    """Counts RESP replies in bulk and keeps the first error; no reply is parsed one by one.

    The commands sent (HSET, ZADD, DEL, EXPIRE, XADD, AUTH, SELECT) answer with an integer (``:``), a simple
    string (``+``), an error (``-``) or a bulk stream ID (``$``, then a line starting with a digit), so every
    reply, and only a reply, starts a line with one of ``:+-$``.
    """

    def __init__(self) -> None:
        self.count, self.error, self._last = 0, "", b"\n"
        self.tail = b""  # the last bytes received, where a short last reply can be read

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
            self._last, self.tail, wait = data[-1:], (self.tail + data[-64:])[-64:], False


class Pipe:
    """One raw socket to the server for pipelined writes, logged in, with its CLIENT ID; threads take turns
    (hold ``lock``). ``login`` is the commands to send first (AUTH, SELECT)."""

    def __init__(self, address: tuple[str, int], timeouts: tuple[float, float], login: list[list[bytes]]) -> None:
        self.address, self.timeouts, self.commands = address, timeouts, [*login, [b"CLIENT", b"ID"]]
        self.sock: socket.socket | None = None
        self.id = 0
        self.lock = threading.Lock()

    def open(self) -> str:
        """Connect unless connected; the server's error if it refused a login command, else ''."""
        # an idle socket with something to read was closed (or reset) by the server, e.g. by its idle timeout:
        # found out before anything is sent, so nothing is sent twice
        if self.sock is not None and select.select([self.sock], [], [], 0)[0]:
            self.close()
        if self.sock is not None:
            return ""
        sock = socket.create_connection(self.address, timeout=self.timeouts[0])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeouts[1])
        sock.sendall(b"".join(command(*c) for c in self.commands))
        replies = Replies()
        while replies.count < len(self.commands):
            replies.drain(sock, wait=True)
        if replies.error:
            sock.close()
            return replies.error
        self.sock, self.id = sock, int(replies.tail.rsplit(b":", 1)[1])  # CLIENT ID answers last, ":<id>"
        return ""

    def send(self, chunks: Iterable[tuple[list, int]]) -> Replies:
        """Send framed chunks (buffers, replies expected) back to back, then wait for every reply. On any failure
        the socket is closed: unread replies would confuse the next write on it. When the chunks themselves fail
        (bad data), the replies to what was sent are awaited first, so that nothing sent lands after the caller
        has cleaned up.

        One thread sends chunk i (the GIL is released in sendall) while the caller's iterator frames chunk i+1, so
        the server never waits for the encoder; at most two chunks are in memory.
        """
        sock, replies, state, sending = self.sock, 0, Replies(), None
        if sock is None:
            raise ConnectionResetError("the connection was closed")

        def push(buffers: list) -> None:
            for buffer in buffers:
                sock.sendall(buffer)
            state.drain(sock, wait=False)

        try:
            with ThreadPoolExecutor(1, thread_name_prefix="amp-redis-send") as pool:
                for buffers, expect in chunks:
                    if sending is not None:
                        sending.result()
                    sending, replies = pool.submit(push, buffers), replies + expect
                if sending is not None:
                    sending.result()
            while state.count < replies:
                state.drain(sock, wait=True)
        except OSError:
            self.close()
            raise
        except Exception:
            with contextlib.suppress(OSError):  # every submitted chunk is sent by now: the pool was shut down
                while state.count < replies:
                    state.drain(sock, wait=True)
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        return state

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- values (whole columns, no per-row Python) ------------------------------------------------------------


def _int_type(t: pa.DataType) -> pa.DataType | None:
    """The integer that a temporal type counts in, or None for other types."""
    temporal = pa.types.is_temporal(t)
    return (pa.int64() if t.bit_width == 64 else pa.int32()) if temporal else None


def _is_text(t: pa.DataType) -> bool:
    return is_binary_like(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def encode(a: pa.Array) -> pa.Array:
    """Any column as binary values, nulls kept."""
    t = a.type
    if pa.types.is_dictionary(t):
        return encode(a.dictionary_decode())
    if _is_text(t):
        return a.cast(pa.binary())
    if pa.types.is_nested(t):
        return json_strings(a).cast(pa.binary())
    if _int_type(t) is not None:
        a = a.cast(_int_type(t))
    return a.cast(pa.string()).cast(pa.binary())


def decode(v: pa.Array, t: pa.DataType) -> pa.Array:
    """The inverse of :func:`encode`, back to the original type."""
    if pa.types.is_dictionary(t):
        return decode(v, t.value_type).dictionary_encode().cast(t)
    if pa.types.is_null(t):
        return pa.nulls(len(v))
    if _is_text(t):
        return v.cast(t)
    if pa.types.is_nested(t):
        return json_arrays(v.cast(pa.string()), t)
    text = v.cast(pa.string())
    return text.cast(_int_type(t)).cast(t) if _int_type(t) is not None else text.cast(t)


def key_text(a: pa.Array) -> pa.Array:
    """A key column as the text that key names are joined from."""
    if pa.types.is_nested(a.type):
        raise TypeError("nested values cannot be keys")
    if is_binary_like(a.type):
        return hex_strings(a).cast(pa.binary())
    text = pc.replace_substring(encode(a).cast(pa.string()), "%", "%25")
    return pc.replace_substring(text, ":", "%3A").cast(pa.binary())


def unpack(values: bytes, lengths: bytes) -> pa.Array:
    """A page of values from the read scripts (all values, and their int32 lengths, -1 = null) as one array."""
    sizes = np.frombuffer(lengths, "<i4")
    offsets = np.zeros(len(sizes) + 1, np.int32)
    np.cumsum(np.maximum(sizes, 0), out=offsets[1:])
    valid = sizes >= 0
    mask = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.binary(), len(sizes), [mask, pa.py_buffer(offsets), pa.py_buffer(values)])


# -- commands ---------------------------------------------------------------------------------------------


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
    values = encode(column)
    if pa.types.is_fixed_size_binary(column.type):
        parts = [before + b"$%d\r\n" % column.type.byte_width, values, b"\r\n"]
    else:
        length = pc.binary_length(values).cast(pa.string()).cast(pa.binary())
        parts = [before + b"$", length, b"\r\n", values, b"\r\n"]
    return [_join(*parts, nulls="emit_null")] if values.null_count else parts


def _payload(a: pa.Array) -> pa.Buffer:
    """The concatenated values of a binary array, without a copy."""
    if not len(a):
        return pa.py_buffer(b"")
    offsets = np.frombuffer(a.buffers()[1], np.int32)
    return a.buffers()[2][offsets[a.offset] : offsets[a.offset + len(a)]]


def frame(w: Write, batch: pa.RecordBatch) -> tuple[list, int]:
    """A chunk of rows as RESP buffers ready to send, and how many replies they will produce."""
    n = batch.num_rows
    ranges = encode(batch.column(w.table.range_column))
    if w.table.key:
        members = pc.binary_join_element_wise(*(key_text(batch.column(k)) for k in w.table.key), _b(b":"))
    else:
        numbers = pa.array(np.arange(w.rows, w.rows + n)).cast(pa.string()).cast(pa.binary())
        members = _join(ranges, b":%d:" % w.number, numbers)
    w.rows += n
    fields, nulls = [], []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        fields += _bulk(column, arg(name.encode()))
        if column.null_count:
            nulls.append(pc.cast(pc.is_null(column), pa.int64()))
    base = (2 if w.form == "hash" else 3) + 2 * batch.num_columns
    verb = b"$4\r\nHSET\r\n" if w.form == "hash" else b"$4\r\nXADD\r\n" + arg(w.area)
    if nulls:  # the argument count differs per row
        count = pc.subtract(base, pc.multiply(2, functools.reduce(pc.add, nulls)))
        head = [b"*", count.cast(pa.string()).cast(pa.binary()), b"\r\n" + verb]
    else:
        head = [b"*%d\r\n" % base + verb]
    if w.form == "stream":
        rows = _join(*head, *_bulk(_join(ranges, b"-*")), *fields)
        expire = [b"*3\r\n$6\r\nEXPIRE\r\n" + arg(w.area) + arg(b"%d" % w.ttl)] if w.ttl else []
        return [_payload(rows), *expire], n + len(expire)
    keys = _bulk(_join(w.area + b":", members))
    parts = [*head, *keys, *fields]
    if w.table.key:  # a key written again is a new row, not the old one with some fields changed (a null is an
        parts = [b"*2\r\n$3\r\nDEL\r\n", *keys, *parts]  # absent field); keys of keyless rows are always new
    # the index goes first: an index entry whose row never arrived is skipped by reads and removed by deletes,
    # while a row without an index entry could never be deleted by range
    zadd = b"*%d\r\n$4\r\nZADD\r\n" % (2 + 2 * n)
    buffers = [zadd + arg(w.area), _payload(_join(*_bulk(ranges), *_bulk(members)))]
    if w.ttl:
        parts += [b"*3\r\n$6\r\nEXPIRE\r\n", *keys, arg(b"%d" % w.ttl)]
        due = arg(b"%d" % (time.time() + w.ttl + 1))
        buffers += [zadd + arg(w.exp), _payload(_join(due, *_bulk(members)))]
    buffers.append(_payload(_join(*parts)))
    return buffers, 1 + bool(w.ttl) + n * (1 + bool(w.table.key) + bool(w.ttl))
