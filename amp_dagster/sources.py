"""Sources: where rows come from. Each yields Arrow batches with their position, and checkpoint markers.

The sync engine consumes any :class:`Source` the same way: it buffers :class:`Data`, commits and stores the
position at each :class:`Checkpoint`, and deletes from a block on :class:`Reorg` or :class:`Rewind`. A source
is restarted with the last stored position, or asked for one range of its range column (a partition, a chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError, TerminalError
from .flight.client import AmpClient
from .flight.protocol import BlockRange, Checkpoint, Cursor, Data, Event, Position, Watermark
from .ranges import BLOCK_NUM, RowRange


@runtime_checkable
class Source(Protocol):
    """Anything the sync engine can read.

    - ``range_column``: the integer column rows are keyed by in the destination (``_block_num`` for chain data),
      or None for a source that can only be read whole;
    - ``schema()``: the rows' Arrow schema before the first batch, where the source can tell (else None), so that
      the destination table can be created or checked before data arrives;
    - ``read(resume, rows=...)``: events after the stored position ``resume`` (None: from the beginning), or
      only the rows whose range column lies in ``rows``. The returned iterator may have a ``close()`` that can be
      called from another thread to stop a read that waits for data.
    """

    range_column: str | None

    def schema(self) -> pa.Schema | None: ...

    def read(self, resume: Position | None = None, *, rows: RowRange | None = None) -> Iterator[Event]: ...


def _restrict(sql: str, column: str, bounds: list[str]) -> str:
    if not bounds:
        return sql
    # the bounds are integers formatted here, never user text; the server pushes the filter down to the scan
    inner = sql.strip().rstrip(";").strip()
    return f"SELECT * FROM ({inner}) AS amp_source WHERE {' AND '.join(bounds)}"


def _bounds(column: str, rows: RowRange | None, after: int | None) -> list[str]:
    quoted = '"' + column.replace('"', '""') + '"'
    bounds = []
    if rows is not None:
        bounds.append(f"{quoted} >= {rows.start}")
        if rows.end is not None:
            bounds.append(f"{quoted} <= {rows.end}")
    if after is not None:
        bounds.append(f"{quoted} > {after}")
    return bounds


class AmpQuerySource:
    """A SQL query over amp, read as a batch query or as a stream.

    - ``stream=False``: one batch query per read. ``rows`` (or ``blocks``, the default range) restricts it to a
      block range (a partition, a chunk); ``resume`` continues after a stored watermark. Both filter on
      ``_block_num``, which the query must select. The final checkpoint's position is the synced range amp
      reported.
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

    def schema(self) -> pa.Schema:
        """The rows' schema, as amp plans the query (nothing runs)."""
        return self.client.schema(self.sql)

    def head(self) -> BlockRange | None:
        """How far amp has synced the tables the query reads (the last block and its hash), from a batch query
        that reads no row; None when amp reports no synced range (a table without data)."""
        result = self.client.query(f"SELECT * FROM ({self.sql.strip().rstrip(';').strip()}) AS amp_head WHERE false")
        for _ in result.reader:
            pass
        return max(result.ranges, key=lambda r: r.end) if result.ranges else None

    def count(self, rows: RowRange) -> int:
        """How many rows the query gives for a block range (amp counts; no row is sent)."""
        inner = _restrict(self.sql, BLOCK_NUM, _bounds(BLOCK_NUM, rows, None))
        table = self.client.query(f"SELECT count(*) AS n FROM ({inner}) AS amp_count").reader.read_all()
        return int(table.column("n")[0].as_py())

    def block_hashes(self, rows: RowRange) -> pa.Table:
        """The distinct (``_block_num``, ``block_hash``) pairs of the query's rows in a block range: which fork each
        block's rows come from (the query must select ``block_hash``)."""
        inner = _restrict(self.sql, BLOCK_NUM, _bounds(BLOCK_NUM, rows, None))
        return self.client.query(
            f"SELECT DISTINCT {BLOCK_NUM}, block_hash FROM ({inner}) AS amp_hashes"
        ).reader.read_all()

    def read(self, resume: Position | None = None, *, rows: RowRange | None = None) -> Iterator[Event]:
        if resume is not None and not isinstance(resume, Watermark):
            raise TerminalError(f"an amp query resumes from a Watermark, not {type(resume).__name__}")
        if self.stream:
            if rows is not None:
                raise ConfigError("an amp stream has no block range; resume from a watermark instead")
            return self.client.stream(self.sql, resume=resume)
        return self._batch(resume, rows if rows is not None else self.blocks)

    def _batch(self, resume: Watermark | None, rows: RowRange | None) -> Iterator[Event]:
        after = None
        if resume:
            if len(resume.blocks) != 1:
                raise TerminalError(f"a batch query resumes from one network's watermark, got {resume.to_json()}")
            (ref,) = resume.blocks.values()
            after = ref.number
        result = self.client.query(_restrict(self.sql, BLOCK_NUM, _bounds(BLOCK_NUM, rows, after)))
        if BLOCK_NUM not in result.schema.names and (rows is not None or resume):
            raise ConfigError(
                f"the query must select {BLOCK_NUM} to be read by block range or resumed; add it to the SELECT "
                f"list. Query: {self.sql[:200]}"
            )
        for batch in result.reader:
            yield Data(batch)
        yield Checkpoint(Watermark.from_ranges(result.ranges) if result.ranges else None, result.ranges)


class FlightSqlSource:
    """A batch query against any Flight SQL server.

    Without ``range_column`` it has no position and is read whole (a full refresh). With an integer
    ``range_column`` (an id, a sequence number) it is read incrementally: after the last value committed
    (``Cursor(value)``) or for a range of values, and each read ends with a checkpoint at the largest value seen.
    """

    def __init__(self, client: AmpClient, sql: str, *, range_column: str | None = None) -> None:
        self.client, self.sql, self.range_column = client, sql, range_column

    def schema(self) -> pa.Schema:
        return self.client.schema(self.sql)

    def read(self, resume: Position | None = None, *, rows: RowRange | None = None) -> Iterator[Event]:
        if self.range_column is None and (resume is not None or rows is not None):
            raise TerminalError(
                "a Flight SQL query without a range_column has no position to resume from, nor ranges: read it "
                "whole (full refresh), or give FlightSqlSource(range_column=...) an increasing integer column"
            )
        if resume is not None and not isinstance(resume, Cursor):
            raise TerminalError(f"a Flight SQL query resumes from a Cursor, not {type(resume).__name__}")
        return self._read(None if resume is None else resume.value, rows)

    def _read(self, after: Any, rows: RowRange | None) -> Iterator[Event]:
        column = self.range_column
        sql = self.sql if column is None else _restrict(self.sql, column, _bounds(column, rows, after))
        result = self.client.query(sql)
        highest = after
        for batch in result.reader:
            if column is not None and batch.num_rows:
                top = pc.max(batch.column(column)).as_py()
                highest = top if highest is None or (top is not None and top > highest) else highest
            yield Data(batch)
        yield Checkpoint(None if column is None or highest is None else Cursor(highest))


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
    the last committed page. ``range_column`` names an integer column that grows with the cursor (an id, a
    timestamp in seconds): the destination keys rows by it.

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
        self.fetch, self.initial, self._schema, self.range_column = fetch, initial, schema, range_column

    def schema(self) -> pa.Schema | None:
        return self._schema

    def read(self, resume: Position | None = None, *, rows: RowRange | None = None) -> Iterator[Event]:
        if rows is not None:
            raise TerminalError("a cursor source reads pages after a cursor, not a range of rows")
        if resume is not None and not isinstance(resume, Cursor):
            raise TerminalError(f"a cursor source resumes from a Cursor, not {type(resume).__name__}")
        return self._pages(self.initial if resume is None else resume.value)

    def _pages(self, cursor: Any) -> Iterator[Event]:
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
                reader = pa.Table.from_pylist(rows, schema=self._schema).to_reader()
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
                if self._schema is not None and batch.schema != self._schema:
                    batch = batch.cast(self._schema)
                if batch.num_rows:
                    yield batch
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            raise TerminalError(f"a page of the cursor source does not fit the declared schema: {exc}") from None
