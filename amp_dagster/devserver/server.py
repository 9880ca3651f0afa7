"""The dev server: an amp-compatible Flight SQL endpoint over the synthetic chain, with reorg and fault injection.

It answers exactly the RPCs amp answers (GetFlightInfo with an Any-packed CommandStatementQuery, then DoGet),
executes SQL with DataFusion, streams microbatches with amp's metadata, follows reorgs and resume cursors as
amp does, and can be told to misbehave (drop a stream, be slow, be unavailable) for tests.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from ..errors import ConfigError
from ..flight.protocol import (
    STATEMENT_QUERY_TYPE_URL,
    BatchMetadata,
    BlockRange,
    Watermark,
    decode_command,
    decode_statement_query,
    normalize_hash,
)
from . import schemas, sql
from .chain import Chain, ChainView, Segment

log = logging.getLogger(__name__)

CHUNK_BLOCKS = 1000  # generated rows are cached per aligned chunk of this many blocks
BATCH_ROWS = 8192  # DataFusion's default batch size, which amp's batches follow (§8)
MAX_FLIGHT_BYTES = 2 * 1024 * 1024  # amp slices batches to about this size per FlightData (§2)


@dataclass
class Fault:
    """A failure to inject into the next calls, like the magic queries of the Go ADBC test server.

    - ``drop``: cut the next ``times`` DoGet streams with UNAVAILABLE. Without ``microbatch``, the cut comes
      before the first data batch that follows ``after_batches`` data batches of the stream (counted across
      microbatches). With ``microbatch=m``, it comes inside the stream's m-th microbatch (0-based, counted from
      the start of each DoGet): after ``after_batches`` of that microbatch's data batches, or just before its
      completion marker if it has fewer, so the client holds rows of a microbatch that never completes;
    - ``slow``: sleep ``delay`` seconds before each batch of the next ``times`` DoGet streams;
    - ``unavailable`` / ``internal``: fail the next ``times`` GetFlightInfo calls with that status.
    """

    kind: Literal["drop", "slow", "unavailable", "internal"]
    after_batches: int = 0
    delay: float = 0.0
    times: int = 1
    microbatch: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("drop", "slow", "unavailable", "internal"):
            raise ValueError(f"unknown fault kind {self.kind!r}: use drop, slow, unavailable or internal")
        if self.after_batches < 0 or self.delay < 0 or self.times < 1:
            raise ValueError(
                f"fault after_batches and delay must not be negative and times must be at least 1, got "
                f"after_batches={self.after_batches}, delay={self.delay}, times={self.times}"
            )
        if self.microbatch is not None and (self.kind != "drop" or self.microbatch < 0):
            raise ValueError(f"microbatch={self.microbatch} applies to drop faults only, as an index >= 0")


class PortInUseError(ConfigError):
    """The dev server or its control API cannot listen: something else holds the port."""

    def __init__(self, service: str, host: str, port: int) -> None:
        super().__init__(
            f"the {service} port {port} on {host} is already in use (another amp or dev server?); "
            "choose another port, or port 0 for a free one"
        )
        self.service, self.host, self.port = service, host, port


def ensure_free(service: str, host: str, port: int) -> None:
    """Raise :class:`PortInUseError` if ``host:port`` is taken, before a server library fails obscurely on it."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # the server itself reports an unknown host
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # as servers bind: connections of a just-stopped server in TIME_WAIT do not make the port busy
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(service, host, port) from None


class _Call(flight.ServerMiddleware):
    def __init__(self, headers: dict) -> None:
        self.headers = headers

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        if not values:
            return None
        value = values[0]
        return value.decode() if isinstance(value, bytes) else value


class _CallFactory(flight.ServerMiddlewareFactory):
    """Keeps each call's headers for the handlers and checks the bearer token when one is configured."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def start_call(self, info, headers):
        call = _Call(headers)
        if self.token is not None and call.header("authorization") != f"Bearer {self.token}":
            raise flight.FlightUnauthenticatedError("invalid or missing bearer token")
        return call


class ChainData:
    """Rows of the chain's tables, generated per chunk and cached by the chunk's fork history."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self._cache: OrderedDict[tuple, tuple[pa.Table, np.ndarray]] = OrderedDict()
        self._bytes, self._max_bytes = 0, max_bytes
        self._lock = threading.Lock()

    def rows(self, view: ChainView, table: str, start: int, end: int) -> list[pa.RecordBatch]:
        start, end = max(start, view.start_block), min(end, view.head)
        out: list[pa.RecordBatch] = []
        for chunk_start in range(start - start % CHUNK_BLOCKS, end + 1, CHUNK_BLOCKS):
            data, numbers = self._chunk(view, table, chunk_start)
            lo, hi = np.searchsorted(numbers, start, "left"), np.searchsorted(numbers, end, "right")
            if hi > lo:
                out.extend(data.slice(lo, hi - lo).to_batches())
        return out

    def _chunk(self, view: ChainView, table: str, chunk_start: int) -> tuple[pa.Table, np.ndarray]:
        first, last = max(chunk_start, view.start_block), min(chunk_start + CHUNK_BLOCKS - 1, view.head)
        key = (table, first, last, _forks_between(view.segments, first - 1, last))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = view.tables(first, last, [table])[table].combine_chunks()
        entry = (data, data.column(schemas.BLOCK_NUM).to_numpy())
        with self._lock:
            self._cache[key] = entry
            self._bytes += data.nbytes
            while self._bytes > self._max_bytes and len(self._cache) > 1:
                _, (old, _) = self._cache.popitem(last=False)
                self._bytes -= old.nbytes
        return entry


def random_reorg(rng: random.Random, synced: int, max_depth: int) -> tuple[int, int]:
    """The depth (1..max_depth, at most the synced blocks) and new length (1..2*depth) of a random reorg.

    Shorter and longer forks as well as same-height ones: a sync that ignores a reorg then visibly keeps orphaned
    rows or misses new ones, even on a query that has rows in every block.
    """
    depth = rng.randint(1, max(1, min(max_depth, synced)))
    return depth, rng.randint(1, 2 * depth)


def _forks_between(segments: tuple[Segment, ...], first: int, last: int) -> tuple[Segment, ...]:
    """The fork segments that decide blocks ``first..=last`` (a chunk's content and its parent hash)."""
    out = []
    for i, seg in enumerate(segments):
        ends = segments[i + 1].start - 1 if i + 1 < len(segments) else None
        if seg.start <= last and (ends is None or ends >= first):
            out.append(seg)
    return tuple(out)


class DevServer(flight.FlightServerBase):
    """A local amp: Flight SQL over a synthetic, deterministic EVM chain that grows, forks and misbehaves on cue.

    The chain is a pure function of ``seed`` and the sequence of operations on it (advances, reorgs): a new
    server with the same seed serves the same canonical blocks, so a test can kill one and start another on the
    same port. With ``block_time`` > 0 a miner thread adds a block every ``block_time`` seconds and, with
    probability ``reorg_probability`` after each block, replaces up to ``max_reorg_depth`` blocks with a new
    fork of random length (1 to twice the depth), drawn from ``random.Random(seed)``.

    >>> server = DevServer(blocks=100, block_time=0.5)          # doctest: +SKIP
    >>> server.url                                                  # doctest: +SKIP
    'grpc://127.0.0.1:40123'
    >>> server.reorg(depth=5, length=2)                            # doctest: +SKIP
    95
    >>> server.pause()       # the chain stands still: a batch query now gives the canonical result  # doctest: +SKIP
    >>> server.inject(Fault("drop", microbatch=1, after_batches=3))  # doctest: +SKIP
    >>> server.shutdown()                                          # doctest: +SKIP
    """

    def __init__(
        self,
        location: str = "grpc://127.0.0.1:0",
        *,
        chain: Chain | None = None,
        seed: int = 0,
        network: str = "mainnet",
        start_block: int = 0,
        blocks: int = 1000,
        txs_per_block: int = 20,
        block_time: float = 0.0,
        reorg_probability: float = 0.0,
        max_reorg_depth: int = 6,
        microbatch_blocks: int = 1000,
        dataset: sql.Dataset | None = None,
        token: str | None = None,
        keepalive: bool = True,
        tls_certificates: list | None = None,
    ) -> None:
        self.chain = chain or Chain(seed, network, start_block, blocks, txs_per_block)
        self.dataset = dataset or sql.Dataset()
        self.microbatch_blocks = microbatch_blocks
        self.keepalive = keepalive
        self.data = ChainData()
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._mining = threading.Lock()  # held for each miner step, so pause() returns between steps
        self._paused = False
        self._tls = bool(tls_certificates)
        self._host, port = _host_port(location)
        ensure_free("Flight", self._host.strip("[]"), port)
        try:
            super().__init__(location, middleware={"call": _CallFactory(token)}, tls_certificates=tls_certificates)
        except pa.ArrowException:
            # lost a race for the port: say so rather than gRPC's "did not start properly"
            ensure_free("Flight", self._host.strip("[]"), port)
            raise
        self._miner = None
        if block_time > 0:
            self._miner = threading.Thread(
                target=self._mine, args=(block_time, reorg_probability, max_reorg_depth, seed), daemon=True
            )
            self._miner.start()

    # -- control -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"grpc{'+tls' if self._tls else ''}://{self._host}:{self.port}"

    def reorg(self, depth: int, length: int | None = None) -> int:
        """Replace the last ``depth`` blocks with ``length`` blocks of a new fork (default: as many); returns the
        first replaced block. A shorter fork lowers the head, a longer one raises it (see :meth:`Chain.reorg`)."""
        first = self.chain.reorg(depth, length)
        log.info("reorg of depth %d: blocks from %d replaced, head now %d", depth, first, self.chain.head)
        return first

    def advance(self, blocks: int = 1) -> int:
        """Add ``blocks`` blocks now (also while paused); returns the new head."""
        return self.chain.advance(blocks)

    def pause(self) -> None:
        """Stop the miner: no new blocks and no random reorgs until :meth:`resume`.

        When it returns, no miner step is under way, so ``chain.view()`` and a batch query over the same SQL give
        the canonical chain's result, the reference a streamed destination must equal. Explicit ``advance`` and
        ``reorg`` calls still apply. A server without a miner (``block_time=0``) stands still anyway.
        """
        with self._mining:
            self._paused = True

    def resume(self) -> None:
        """Let the miner go on where it stopped; its random draws continue the same seeded sequence."""
        with self._mining:
            self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, *kinds: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind in kinds:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def status(self) -> dict:
        view = self.chain.view()
        return {
            "network": view.network,
            "start_block": view.start_block,
            "head": view.head,
            "head_hash": normalize_hash(view.block_hash(view.head)) if view.head >= view.start_block else None,
            "forks": len(view.history) - 1,
            "paused": self._paused,
            "url": self.url,
        }

    def shutdown(self) -> None:
        self._stopping.set()  # open streams end themselves, so shutdown does not wait for them forever
        super().shutdown()

    def _mine(self, block_time: float, reorg_probability: float, max_depth: int, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stopping.wait(block_time):
            with self._mining:
                if self._paused:
                    continue
                self.chain.advance(1)
                if reorg_probability and rng.random() < reorg_probability:
                    self.reorg(*random_reorg(rng, self.chain.head - self.chain.start_block + 1, max_depth))

    # -- RPCs ----------------------------------------------------------------------------------------------

    def get_flight_info(self, context, descriptor):
        fault = self._take_fault("unavailable", "internal")
        if fault is not None:
            error = flight.FlightUnavailableError if fault.kind == "unavailable" else flight.FlightInternalError
            raise error(f"injected fault: {fault.kind}")
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise pa.ArrowInvalid("unsupported flight descriptor type: PATH")
        try:
            type_url, message = decode_command(descriptor.command)
        except ValueError as exc:
            raise pa.ArrowInvalid(f"ProtocolBuffers decoding error: {exc}") from None
        if type_url != STATEMENT_QUERY_TYPE_URL:
            raise pa.ArrowInvalid(f"unsupported flight descriptor command: {type_url}")
        call = context.get_middleware("call")
        query = decode_statement_query(message)
        with _status():
            prepared = sql.prepare(query, call.header("amp-stream"))
            frame, _ = sql.plan(self._planning_context(), prepared, self.dataset)
        cursor = _parse_cursor(call.header("amp-resume"))  # amp ignores a malformed cursor silently
        ticket = json.dumps({"query": query, "streaming": prepared.streaming, "cursor": cursor}).encode()
        endpoint = flight.FlightEndpoint(ticket, [])
        return flight.FlightInfo(frame.schema(), descriptor, [endpoint], -1, -1)

    def do_get(self, context, ticket):
        try:
            spec = json.loads(ticket.ticket)
            prepared = sql.Prepared(sql.prepare(spec["query"], None).text, bool(spec["streaming"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise pa.ArrowInvalid(f"ticket decoding error: {exc}") from None
        with _status():
            frame, optimized = sql.plan(self._planning_context(), prepared, self.dataset)
            schema = frame.schema()
            tables = sql.referenced_tables(frame, optimized)
            if prepared.streaming:
                start = self._stream_start(optimized, schema, spec.get("cursor"))
                per_block = schemas.BLOCK_NUM not in schema.names and not sql.keeps_block_order(optimized)
                batches = self._stream(context, prepared, schema, tables, start, per_block)
            else:
                batches = self._batch(prepared, schema, tables)
        return flight.GeneratorStream(schema, self._with_faults(batches))

    # -- batch queries -------------------------------------------------------------------------------------

    def _batch(self, prepared: sql.Prepared, schema: pa.Schema, tables: set[str]) -> Iterator:
        view = self.chain.view()
        synced = view.head >= view.start_block
        ranges = (self._range(view, view.start_block, view.head),) if tables and synced else ()
        data_meta, final_meta = BatchMetadata(ranges, False).encode(), BatchMetadata(ranges, True).encode()
        data = {name: self.data.rows(view, name, view.start_block, view.head) for name in tables}
        sent = False
        for batch in self._execute(prepared, schema, data, partitions=None):
            sent = True
            yield batch, data_meta, False
        if not sent:  # amp still sends one (empty) data batch before the marker
            yield _empty(schema), data_meta, False
        yield _empty(schema), final_meta, True

    # -- streaming queries ---------------------------------------------------------------------------------

    def _stream_start(self, optimized, schema: pa.Schema, cursor: dict | None) -> int:
        operation = sql.non_incremental_operation(optimized)
        if operation:
            raise sql.QueryError(
                "INVALID_ARGUMENT",
                "invalid query: non-incremental queries are not supported for streaming, "
                f"query contains non-incremental operation: {operation}",
            )
        if sql.has_join(optimized) and schemas.BLOCK_NUM in schema.names:
            raise sql.QueryError(
                "INVALID_ARGUMENT",
                "invalid query: selecting _block_num in a multi-table streaming query is not supported; "
                "use block_num() instead",
            )
        view = self.chain.view()
        if cursor is None:
            return view.start_block
        ref = Watermark.from_json(cursor).blocks.get(view.network)
        if ref is None:
            raise sql.QueryError(
                "INTERNAL",
                f"streaming query execution error: the resume cursor has no entry for network {view.network!r}",
            )
        restart = view.locate(ref.number, bytes.fromhex(ref.hash[2:]))
        return ref.number if restart is None else restart  # an unknown hash restarts at the cursor block itself

    def _stream(
        self, context, prepared: sql.Prepared, schema: pa.Schema, tables: set[str], start: int, per_block: bool
    ) -> Iterator:
        last: tuple[int, bytes] | None = None  # (number, hash) of the previous microbatch's end
        view = self.chain.view()
        if view.head < view.start_block:  # nothing synced: amp sends one empty marker and closes
            yield _empty(schema), BatchMetadata((), True).encode(), True
            return
        while not self._stopping.is_set():
            if context.is_cancelled():
                return
            view = self.chain.view()
            if last is not None:
                restart = view.locate(*last)
                start = last[0] if restart is None else restart
            if start > view.head:
                self.chain.wait(view.version, timeout=0.5)
                continue
            end = min(start + self.microbatch_blocks - 1, view.head)
            block_range = self._range(view, start, end)
            data_meta = BatchMetadata((block_range,), False).encode()
            if self.keepalive:  # amp's keep-alive timer ticks once as a microbatch starts
                yield _empty(schema), data_meta, False
            for batch in self._microbatch(view, prepared, schema, tables, start, end, per_block):
                yield batch, data_meta, False
            yield _empty(schema), BatchMetadata((block_range,), True).encode(), True
            last = (end, view.block_hash(end))
            start = end + 1
        raise flight.FlightUnavailableError("the dev server is shutting down")

    def _microbatch(
        self,
        view: ChainView,
        prepared: sql.Prepared,
        schema: pa.Schema,
        tables: set[str],
        start: int,
        end: int,
        per_block: bool,
    ) -> Iterator[pa.RecordBatch]:
        """The rows of blocks ``start..=end``, ordered by block as amp orders them (§2).

        amp sorts by ``_block_num`` and drops it when not selected. A query without it whose plan does not keep
        the scan's order (UNION ALL, joins, aggregates) runs block by block here instead, so joins match rows of
        the same block only; its outputs are gathered into batches of up to BATCH_ROWS rows.
        """
        if not per_block:
            data = {name: self.data.rows(view, name, start, end) for name in tables}
            yield from self._execute(prepared, schema, data, partitions=1)
            return
        pending: list[pa.RecordBatch] = []
        rows = 0
        for number in range(start, end + 1):
            data = {name: self.data.rows(view, name, number, number) for name in tables}
            for batch in self._execute(prepared, schema, data, partitions=1):
                if batch.num_rows:
                    pending.append(batch)
                    rows += batch.num_rows
            if rows >= BATCH_ROWS or (number == end and pending):
                yield from _slices(pa.concat_batches(pending))
                pending, rows = [], 0

    # -- shared --------------------------------------------------------------------------------------------

    def _execute(self, prepared: sql.Prepared, schema: pa.Schema, data: dict, partitions: int | None) -> Iterator:
        ctx = sql.context(self.dataset, data, partitions)
        frame = ctx.sql(prepared.text)
        if prepared.streaming and schemas.BLOCK_NUM in schema.names:
            from datafusion import col

            frame = frame.sort(col(schemas.BLOCK_NUM))  # rows of a microbatch are ordered by block (§2)
        try:
            for chunk in frame.execute_stream():
                batch = chunk.to_pyarrow()
                if batch.schema != schema:
                    batch = pa.RecordBatch.from_arrays(batch.columns, schema=schema)
                yield from _slices(batch)
        except Exception as exc:
            if isinstance(exc, flight.FlightError | GeneratorExit):
                raise
            raise flight.FlightInternalError(f"query execution error | Caused by: {exc}") from None

    def _with_faults(self, batches: Iterator) -> Iterator[tuple[pa.RecordBatch, bytes]]:
        """The (batch, app_metadata) pairs to send, cut or slowed by an armed fault, and cut at shutdown."""
        fault = self._take_fault("drop", "slow")
        sent = microbatch = in_microbatch = 0  # data batches of the stream; microbatch index; its data batches
        for batch, metadata, complete in batches:
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay)
            if self._stopping.is_set():  # as a killed server would: mid-microbatch if need be
                raise flight.FlightUnavailableError("the dev server is shutting down")
            if fault is not None and fault.kind == "drop":
                if fault.microbatch is None:
                    cut = batch.num_rows > 0 and sent >= fault.after_batches
                else:
                    due = complete or (batch.num_rows > 0 and in_microbatch >= fault.after_batches)
                    cut = microbatch == fault.microbatch and due
                if cut:
                    raise flight.FlightUnavailableError("injected fault: the stream was dropped")
            if batch.num_rows:
                sent += 1
                in_microbatch += 1
            if complete:
                microbatch += 1
                in_microbatch = 0
            yield batch, metadata

    def _planning_context(self):
        return sql.context(self.dataset, self._empty_tables())

    def _empty_tables(self) -> dict:
        return {name: [_empty(schema)] for name, schema in schemas.TABLES.items()}

    def _range(self, view: ChainView, start: int, end: int) -> BlockRange:
        return BlockRange(
            network=view.network,
            start=start,
            end=end,
            hash=normalize_hash(view.block_hash(end)),
            prev_hash=normalize_hash(view.parent_hash(start)),
            timestamp=view.timestamp(end),
        )


def _empty(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


def _slices(batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
    """Zero-copy slices of about MAX_FLIGHT_BYTES each, as amp's encoder cuts them."""
    size = batch.nbytes
    if batch.num_rows == 0 or size <= MAX_FLIGHT_BYTES:
        yield batch
        return
    pieces = -(-size // MAX_FLIGHT_BYTES)
    step = max(1, batch.num_rows // pieces)
    for offset in range(0, batch.num_rows, step):
        yield batch.slice(offset, step)


def _host_port(location: str) -> tuple[str, int]:
    """Host (as written, brackets kept) and port of a ``grpc://host:port`` location; port 0 when none is given."""
    netloc = location.split("://", 1)[-1]
    host, colon, port = netloc.rpartition(":")
    if not colon or not port.isdigit():
        return netloc or "127.0.0.1", 0
    return host or "127.0.0.1", int(port)


def _parse_cursor(header: str | None) -> dict | None:
    if not header:
        return None
    try:
        return json.loads(Watermark.from_json(header).to_json())
    except Exception:
        return None


class _status:
    """Turns the SQL layer's refusals into the gRPC status amp would send."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, sql.QueryError):
            if exc.code == "INTERNAL":
                raise flight.FlightInternalError(str(exc)) from None
            if exc.code == "NOT_FOUND":
                raise pa.ArrowKeyError(str(exc)) from None
            raise pa.ArrowInvalid(str(exc)) from None
        return False
