"""Sources: where rows come from. Each yields Arrow batches with their position, and checkpoint markers.

The sync engine consumes any :class:`Source` the same way: it buffers :class:`Data`, commits and stores the
position at each :class:`Checkpoint`, and deletes from a block on :class:`Reorg` or :class:`Rewind`. A source
is restarted with the last stored position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from .errors import ConfigError, TerminalError
from .flight.client import AmpClient
from .flight.protocol import Checkpoint, Cursor, Data, Event, Position, Watermark
from .ranges import BLOCK_NUM, RowRange


@runtime_checkable
class Source(Protocol):
    """Anything the sync engine can read: events from ``resume`` on (None = from the beginning)."""

    #: the integer column rows are keyed by in the destination (``_block_num`` for chain data), or None
    range_column: str | None

    def read(self, resume: Position | None = None) -> Iterator[Event]: ...


class AmpQuerySource:
    """A SQL query over amp, read as a batch query or as a stream.

    - ``stream=False``: one batch query. ``blocks`` restricts it to a block range (a partition); ``resume``
      continues after a stored watermark. Both filter on ``_block_num``, which the query must select. The final
      checkpoint's position is the synced range amp reported.
    - ``stream=True``: the query runs with ``SETTINGS stream = true`` semantics (the ``amp-stream`` header), from
      ``resume`` on, with reorgs and reconnects handled by the client.

    >>> source = AmpQuerySource(AmpClient(), "SELECT * FROM eth_rpc.logs", blocks=RowRange(0, 999))  # doctest: +SKIP
    >>> [type(e).__name__ for e in source.read()]                                                  # doctest: +SKIP
    ['Data', 'Data', 'Checkpoint']
    """

    range_column = BLOCK_NUM

    def __init__(self, client: AmpClient, sql: str, *, stream: bool = False, blocks: RowRange | None = None) -> None:
        if stream and blocks is not None:
            raise ConfigError("AmpQuerySource: a stream has no block range; use resume= to choose where it starts")
        self.client, self.sql, self.stream, self.blocks = client, sql, stream, blocks

    def read(self, resume: Position | None = None) -> Iterator[Event]:
        if resume is not None and not isinstance(resume, Watermark):
            raise TerminalError(f"an amp query resumes from a Watermark, not {type(resume).__name__}")
        if self.stream:
            yield from self.client.stream(self.sql, resume=resume)
            return
        result = self.client.query(self._restricted(resume))
        if BLOCK_NUM not in result.schema.names and (self.blocks is not None or resume):
            raise ConfigError(
                f"the query must select {BLOCK_NUM} to be read by block range or resumed; add it to the SELECT "
                f"list. Query: {self.sql[:200]}"
            )
        for batch in result.reader:
            yield Data(batch)
        yield Checkpoint(Watermark.from_ranges(result.ranges) if result.ranges else None, result.ranges)

    def _restricted(self, resume: Watermark | None) -> str:
        bounds = []
        if self.blocks is not None:
            bounds.append(f"{BLOCK_NUM} >= {self.blocks.start}")
            if self.blocks.end is not None:
                bounds.append(f"{BLOCK_NUM} <= {self.blocks.end}")
        if resume:
            if len(resume.blocks) != 1:
                raise TerminalError(f"a batch query resumes from one network's watermark, got {resume.to_json()}")
            (ref,) = resume.blocks.values()
            bounds.append(f"{BLOCK_NUM} > {ref.number}")
        if not bounds:
            return self.sql
        # the bounds are integers formatted here, never user text; amp pushes the filter down to the scan
        inner = self.sql.strip().rstrip(";")
        return f"SELECT * FROM ({inner}) AS amp_source WHERE {' AND '.join(bounds)}"


class FlightSqlSource:
    """A batch query against any Flight SQL server; it has no position, so it is read whole every time."""

    range_column = None

    def __init__(self, client: AmpClient, sql: str) -> None:
        self.client, self.sql = client, sql

    def read(self, resume: Position | None = None) -> Iterator[Event]:
        if resume is not None:
            raise TerminalError("a plain Flight SQL query has no position to resume from; read it whole")
        result = self.client.query(self.sql)
        for batch in result.reader:
            yield Data(batch)
        yield Checkpoint(None)


@dataclass(frozen=True)
class Page:
    """One page of a cursor source: its rows and the cursor that comes after them."""

    rows: Any
    cursor: Any


class CursorSource:
    """Rows from a Python function that pages through an API (or anything) with a cursor.

    ``fetch(cursor)`` gets the last stored cursor (``initial`` the first time) and yields pages: ``Page(rows,
    next_cursor)`` or ``(rows, next_cursor)`` tuples. Rows may be an Arrow batch or table, anything with
    ``__arrow_c_stream__`` (polars, DataFusion), a list of dicts or one dict. Give ``schema`` so dict rows get
    stable types. After each page the source emits a checkpoint with the next cursor, so a crash resumes after
    the last committed page.

    >>> def fetch(after):
    ...     start = after or 0
    ...     yield [{"id": i} for i in range(start, start + 2)], start + 2
    >>> [type(e).__name__ for e in CursorSource(fetch).read()]
    ['Data', 'Checkpoint']
    """

    def __init__(
        self,
        fetch: Callable[[Any], Iterable[Page | tuple[Any, Any]]],
        *,
        initial: Any = None,
        schema: pa.Schema | None = None,
        range_column: str | None = None,
    ) -> None:
        self.fetch, self.initial, self.schema, self.range_column = fetch, initial, schema, range_column

    def read(self, resume: Position | None = None) -> Iterator[Event]:
        if resume is not None and not isinstance(resume, Cursor):
            raise TerminalError(f"a cursor source resumes from a Cursor, not {type(resume).__name__}")
        cursor = self.initial if resume is None else resume.value
        for page in self.fetch(cursor):
            rows, after = (page.rows, page.cursor) if isinstance(page, Page) else page
            position = Cursor(after)
            for batch in self._batches(rows):
                yield Data(batch, cursor=position)
            yield Checkpoint(position)

    def _batches(self, rows: Any) -> Iterator[pa.RecordBatch]:
        try:
            if isinstance(rows, dict):
                rows = [rows]
            if isinstance(rows, list):  # API rows arrive as dicts: converted here, at the edge
                reader = pa.Table.from_pylist(rows, schema=self.schema).to_reader()
            elif isinstance(rows, pa.RecordBatch | pa.Table):
                reader = pa.table(rows).to_reader()
            elif hasattr(rows, "__arrow_c_stream__"):
                reader = pa.RecordBatchReader.from_stream(rows)
            else:
                raise TerminalError(
                    f"a cursor source page must hold Arrow data or dicts, got {type(rows).__name__}; yield "
                    "(rows, next_cursor) with rows as a list of dicts, a pyarrow Table or a polars DataFrame"
                )
            for batch in reader:
                if self.schema is not None and batch.schema != self.schema:
                    batch = batch.cast(self.schema)
                if batch.num_rows:
                    yield batch
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            raise TerminalError(f"a page of the cursor source does not fit the declared schema: {exc}") from None
