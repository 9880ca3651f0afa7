"""The Flight SQL client: batch queries as lazy Arrow readers, and streams of typed events that survive reorgs.

``query`` needs nothing amp-specific, so it works against any Flight SQL server; ``stream`` speaks amp's
streaming protocol (``AMP_PROTOCOL.md`` §2 to §5): it detects reorgs, emits a checkpoint at every completed
microbatch, resumes with ``amp-resume`` and reconnects after transient failures.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from ..errors import AmpDagsterError, AuthenticationError, ConfigError, QueryError, ServiceUnavailableError
from ..retry import NO_RETRY, Backoff, RetryPolicy
from .protocol import (
    BatchMetadata,
    BlockRange,
    Checkpoint,
    Data,
    Event,
    ProtocolError,
    RangeTracker,
    Rewind,
    Watermark,
    encode_statement_query,
    parse_metadata,
)

log = logging.getLogger(__name__)

DEFAULT_URL = "grpc://127.0.0.1:1602"
TOKEN_ENV = "AMP_AUTH_TOKEN"
# A query is retried a few times; a long-running stream more patiently (the server may be redeploying).
QUERY_RETRY = RetryPolicy(attempts=4, initial_delay=0.25, max_delay=5.0)
STREAM_RETRY = RetryPolicy(attempts=8, initial_delay=0.5, max_delay=30.0)
_SCHEMES = ("grpc://", "grpc+tcp://", "grpc+tls://")
_TRANSPORT_HINTS = ("rst_stream", "connection reset", "socket closed", "broken pipe", "goaway", "stream removed",
                    "stream terminated", "end of tcp stream", "connection refused", "keepalive")  # fmt: skip


class AmpClient:
    """A client for amp (or any Flight SQL server).

    ``url`` is ``grpc://host:port`` or ``grpc+tls://host:port``. The bearer token comes from ``token`` or the
    ``AMP_AUTH_TOKEN`` environment variable; it is sent as ``authorization: Bearer ...`` and never logged.
    ``timeout`` bounds, in seconds, each attempt to plan a query (GetFlightInfo): a server that accepts the
    connection but never answers then fails as unavailable instead of hanging; reading rows has no deadline.

    >>> client = AmpClient("grpc://127.0.0.1:1602")                           # doctest: +SKIP
    >>> result = client.query('SELECT block_num, hash FROM "_/eth_rpc@0.0.0".blocks LIMIT 3')  # doctest: +SKIP
    >>> table = result.reader.read_all(); result.ranges                          # doctest: +SKIP
    [BlockRange(network='mainnet', start=15000000, end=15000999, ...)]
    >>> for event in client.stream("SELECT * FROM eth_rpc.logs SETTINGS stream = true"):  # doctest: +SKIP
    ...     ...  # Data, Checkpoint, Reorg or Rewind
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        tls_root_certs: bytes | str | None = None,
        disable_server_verification: bool = False,
        query_retry: RetryPolicy = QUERY_RETRY,
        stream_retry: RetryPolicy = STREAM_RETRY,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        if not url.startswith(_SCHEMES):
            raise ConfigError(f"amp url {url!r} must start with grpc://, grpc+tcp:// or grpc+tls://")
        self.url = url
        self._token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._tls = {"tls_root_certs": tls_root_certs, "disable_server_verification": disable_server_verification}
        self.query_retry, self.stream_retry = query_retry, stream_retry
        # a deadline for planning calls only: reading a large result or a stream legitimately takes hours
        self.timeout = timeout
        self._headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self._clients: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AmpClient(url={self.url!r}, token={'***' if self._token else None})"

    # -- public API ----------------------------------------------------------------------------------------

    def schema(self, sql: str) -> pa.Schema:
        """The result schema of ``sql`` (the server plans the query but does not run it)."""
        return self._flight_info(sql, streaming=False, resume=None).schema

    def query(self, sql: str) -> QueryResult:
        """Run a batch query. Rows are read lazily, batch by batch, through ``result.reader``."""
        info = self._flight_info(sql, streaming=False, resume=None)
        return QueryResult(self, sql, info)

    def stream(self, sql: str, resume: Watermark | str | None = None) -> AmpStream:
        """Run a streaming query; iterate the result for :class:`Data`, :class:`Checkpoint`, :class:`Reorg`
        and :class:`Rewind` events. ``resume`` (a watermark or its JSON) continues after a checkpoint."""
        if isinstance(resume, str):
            resume = Watermark.from_json(resume)
        return AmpStream(self, sql, resume)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> AmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------------

    def _client(self, location: str | None = None) -> flight.FlightClient:
        target = location or self.url
        with self._lock:
            client = self._clients.get(target)
            if client is None:
                kwargs = self._tls if target.startswith("grpc+tls") else {}
                client = self._clients[target] = flight.FlightClient(target, **kwargs)
            return client

    def _endpoint_client(self, endpoint: flight.FlightEndpoint) -> flight.FlightClient:
        for location in endpoint.locations:
            uri = location.uri.decode() if isinstance(location.uri, bytes) else str(location.uri)
            if uri and not uri.startswith("arrow-flight-reuse-connection"):
                return self._client(uri)
        return self._client()  # no location: redeem the ticket where it was issued

    def _options(self, extra: list[tuple[bytes, bytes]] = (), timeout: float | None = None) -> flight.FlightCallOptions:
        headers = list(self._headers) + list(extra)
        if self._token:
            headers.append((b"authorization", f"Bearer {self._token}".encode()))
        return flight.FlightCallOptions(headers=headers, timeout=timeout)

    def _flight_info(
        self, sql: str, streaming: bool | None, resume: Watermark | None, retry: RetryPolicy | None = None
    ) -> flight.FlightInfo:
        headers = []
        if streaming is not None:
            headers.append((b"amp-stream", b"true" if streaming else b"false"))
        if resume:
            headers.append((b"amp-resume", resume.to_json().encode()))
        descriptor = flight.FlightDescriptor.for_command(encode_statement_query(sql))
        options = self._options(headers, timeout=self.timeout)
        policy = self.query_retry if retry is None else retry
        return self._retrying(lambda: self._client().get_flight_info(descriptor, options), sql, policy)

    def _retrying(self, call, sql: str, policy: RetryPolicy):
        backoff = Backoff(policy, f"amp at {self.url}")
        while True:
            try:
                return call()
            except Exception as exc:
                error = self.translate(exc, sql)
                if not backoff.pause(error):
                    raise error from None

    def translate(self, exc: BaseException, sql: str | None = None) -> AmpDagsterError:
        """A Flight or transport exception as amp_dagster's typed error, with the server's own message."""
        if isinstance(exc, AmpDagsterError):
            return exc
        message = server_message(exc)
        where = f"amp at {self.url}"
        query = f" Query: {_short(sql)}" if sql else ""
        if _is_transient(exc, message):
            return ServiceUnavailableError(f"{where} is unavailable: {message}")
        if isinstance(exc, flight.FlightUnauthenticatedError | flight.FlightUnauthorizedError):
            return AuthenticationError(
                f"{where} rejected the credentials: {message}. Set the bearer token with token=... or "
                f"the {TOKEN_ENV} environment variable."
            )
        code = _status_code(exc)
        hint = {
            "INVALID_ARGUMENT": "Fix the SQL.",
            "NOT_FOUND": "Check the dataset and table names.",
            "UNIMPLEMENTED": "The server does not offer this call.",
            "RESOURCE_EXHAUSTED": "The query needs more memory than the server allows; narrow its block range.",
        }.get(code, "")
        return QueryError(f"{where} failed the query ({code}): {message}. {hint}{query}".strip(), code, message)


class QueryResult:
    """A batch query's rows, read lazily through :attr:`reader`, and the synced ranges of its final marker.

    ``ranges`` is known once the reader is exhausted: for amp, per network, the block range the referenced
    tables are synced over (``[]`` for a server that sends no amp metadata). Passing the result itself where an
    Arrow stream is accepted (``pa.RecordBatchReader.from_stream``, polars, a loader) reads it the same way.
    """

    def __init__(self, client: AmpClient, sql: str, info: flight.FlightInfo) -> None:
        self.schema: pa.Schema = info.schema
        self._client, self._sql, self._info = client, sql, info
        self._ranges: tuple[BlockRange, ...] | None = None
        self.reader = pa.RecordBatchReader.from_batches(self.schema, self._batches())

    @property
    def ranges(self) -> tuple[BlockRange, ...]:
        if self._ranges is None:
            raise RuntimeError("QueryResult.ranges is known only after the reader has been read to the end")
        return self._ranges

    def __arrow_c_stream__(self, requested_schema: Any = None):
        return self.reader.__arrow_c_stream__(requested_schema)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return iter(self.reader)

    def _batches(self) -> Iterator[pa.RecordBatch]:
        client, options, ranges = self._client, self._client._options(), []
        for endpoint in self._info.endpoints:
            flight_client = client._endpoint_client(endpoint)
            backoff, delivered = Backoff(client.query_retry, f"amp at {client.url}: reading a result"), False
            while True:
                found: list[BlockRange] = []
                try:
                    for batch, metadata in _chunks(flight_client.do_get(endpoint.ticket, options)):
                        if metadata is not None and metadata.ranges_complete:
                            found.extend(metadata.ranges)
                        if batch.num_rows:
                            delivered = True
                            yield batch
                    break
                except Exception as exc:
                    # before the first row, a transient failure is retried; after it, the caller must decide
                    error = client.translate(exc, self._sql)
                    if delivered or not backoff.pause(error):
                        raise error from None
            ranges.extend(found)
        self._ranges = tuple(ranges)


class AmpStream:
    """The events of one streaming query, reconnecting from the last checkpoint after transient failures.

    Iterate it once. ``watermark`` is the last checkpoint seen (what to store and resume from). After a reconnect
    that interrupted a microbatch, a :class:`Rewind` event says which delivered rows will be sent again.
    """

    def __init__(self, client: AmpClient, sql: str, resume: Watermark | None) -> None:
        self._client, self._sql = client, sql
        self.watermark: Watermark | None = resume
        self.reconnects = 0
        self._reader: flight.FlightStreamReader | None = None
        self._closed = False

    def __iter__(self) -> Iterator[Event]:
        tracker = RangeTracker(self.watermark)
        pending: dict[str, int] = {}  # network -> first block of rows delivered since the last checkpoint
        backoff = Backoff(self._client.stream_retry, f"amp stream at {self._client.url}")
        while not self._closed:
            try:
                for event in self._connection(tracker):
                    if isinstance(event, Data):
                        for r in event.ranges:
                            pending.setdefault(r.network, r.start)
                    elif isinstance(event, Checkpoint):
                        pending.clear()
                        backoff.reset()  # progress: the failure budget starts over
                    else:  # a reorg voids pending rows at and after its block; the consumer deletes them
                        pending.pop(event.network, None)
                    yield event
                return  # the server ended the stream (amp does so only when no table has data)
            except Exception as exc:
                if self._closed:
                    return
                error = self._client.translate(exc, self._sql)
                if not backoff.pause(error):
                    raise error from None
                self.reconnects += 1
                log.warning("amp stream resumes from %s", self.watermark.to_json() if self.watermark else "the start")
                for network, first in sorted(pending.items()):
                    yield Rewind(network, first, reason=str(error))
                pending.clear()
                tracker.reset(self.watermark)

    def _connection(self, tracker: RangeTracker) -> Iterator[Event]:
        # the stream's own reconnect loop retries; no second retry loop inside it
        info = self._client._flight_info(self._sql, streaming=True, resume=self.watermark, retry=NO_RETRY)
        endpoint = info.endpoints[0]
        client = self._client._endpoint_client(endpoint)
        self._reader = client.do_get(endpoint.ticket, self._client._options())
        for batch, metadata in _chunks(self._reader):
            if metadata is None:
                raise ProtocolError("a streaming batch arrived without app_metadata; is this an amp server?")
            yield from tracker.observe(metadata.ranges)
            if batch.num_rows:
                yield Data(batch, metadata.ranges)
            if metadata.ranges_complete and metadata.ranges:
                self.watermark = Watermark.from_ranges(metadata.ranges, self.watermark)
                yield Checkpoint(self.watermark, metadata.ranges)

    def close(self) -> None:
        """Stop the stream; safe to call from another thread."""
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()

    def __enter__(self) -> AmpStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(reader: flight.FlightStreamReader) -> Iterator[tuple[pa.RecordBatch, BatchMetadata | None]]:
    """(batch, parsed app_metadata) pairs until the end of the stream."""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        yield chunk.data, parse_metadata(chunk.app_metadata)


def server_message(exc: BaseException) -> str:
    """The server's message without pyarrow's prefixes and debug suffixes."""
    text = str(exc)
    text = re.split(r"\. Detail: |\. gRPC client debug context: |\n", text, maxsplit=1)[0]
    text = re.sub(r"^Flight returned [\w ]+? error, with message: ", "", text)
    return text.strip().rstrip(".")


def _status_code(exc: BaseException) -> str:
    for cls, code in (
        (pa.ArrowInvalid, "INVALID_ARGUMENT"),
        (pa.ArrowKeyError, "NOT_FOUND"),
        (pa.ArrowNotImplementedError, "UNIMPLEMENTED"),
        (flight.FlightInternalError, "INTERNAL"),
        (pa.ArrowCapacityError, "RESOURCE_EXHAUSTED"),
        (pa.ArrowMemoryError, "RESOURCE_EXHAUSTED"),
    ):
        if isinstance(exc, cls):
            return code
    return "UNKNOWN"


def _is_transient(exc: BaseException, message: str) -> bool:
    if isinstance(exc, flight.FlightUnavailableError | flight.FlightTimedOutError | flight.FlightCancelledError):
        return True
    if isinstance(exc, ConnectionError | pa.ArrowIOError | flight.FlightInternalError | flight.FlightServerError):
        lowered = message.lower()
        return isinstance(exc, ConnectionError) or any(hint in lowered for hint in _TRANSPORT_HINTS)
    return False


def _short(sql: str, limit: int = 300) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
