"""The batch toolkit the loaders share: any Arrow input as checked record batches, counted, chunked, deduplicated.

Every write path of every loader takes its input through :func:`checked_batches`, so the rules that keep range
writes idempotent (no null range value, every row inside the range being replaced) hold for all stores alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SchemaMismatchError, TerminalError
from ..ranges import RowRange
from .base import ArrowData, TableRef, WriteResult
from .schema import require_columns


def record_batches(data: ArrowData) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Any ArrowData as a schema and a lazy iterator of record batches (nothing is read ahead).

    Batches of a plain iterable must all have the first one's column names and types: loaders address
    columns by position, so a reordered batch would land in the wrong columns.
    """
    if isinstance(data, pa.RecordBatchReader):
        return data.schema, iter(data)
    if isinstance(data, pa.Table):
        return data.schema, iter(data.to_batches())
    if isinstance(data, pa.RecordBatch):
        return data.schema, iter([data])
    if hasattr(data, "__arrow_c_stream__"):
        reader = pa.RecordBatchReader.from_stream(data)
        return reader.schema, iter(reader)
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise TerminalError(
            "cannot write an empty iterable of record batches: its schema is unknown. "
            "Pass a pyarrow.RecordBatchReader or a Table (which carry a schema) instead."
        )
    return first.schema, _same_shape(first, iterator)


def _same_shape(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    for batch in rest:
        if batch.schema.names != first.schema.names or batch.schema.types != first.schema.types:
            raise SchemaMismatchError(
                f"a record batch has columns {batch.schema} but the first batch had {first.schema}; "
                "every batch of one write must have the same columns in the same order"
            )
        yield batch


def checked_batches(
    data: ArrowData, table: TableRef, store: str, rows: RowRange | None = None
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The data's schema and batches, checked on the way through: the range and key columns exist, the range
    column has no nulls, and with ``rows`` every row lies inside that range. Empty batches are dropped.

    A null or out-of-range value would survive the next delete of its range and be duplicated when the range
    is written again, so every write path goes through this (one vectorised min/max per batch).
    """
    schema, batches = record_batches(data)
    require_columns(schema, table, store)
    if rows is not None:
        rows.check(table.range_column, schema.field(table.range_column).type, f"{store} table {table}")
    return schema, check_in_range(batches, table, rows, store)


def check_in_range(
    batches: Iterable[pa.RecordBatch], table: TableRef, rows: RowRange | None, store: str = "the"
) -> Iterator[pa.RecordBatch]:
    """Pass non-empty batches through, failing on a null range value or, with ``rows``, on a value outside it."""
    for batch in batches:
        if not batch.num_rows:
            continue
        column = batch.column(table.range_column)
        if column.null_count:
            raise TerminalError(
                f"{store} table {table}: {column.null_count} row(s) have no {table.range_column} (null). Every "
                "row must have one, or its range could never be deleted or replaced; filter them out in the query."
            )
        if rows is not None:
            bounds = pc.min_max(column)
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
            if not rows.contains(low) or not rows.contains(high):
                bad = low if not rows.contains(low) else high
                raise TerminalError(
                    f"{store} table {table}: a row has {table.range_column}={bad}, outside the range {rows} being "
                    "replaced. Filter the data to that range (or widen the range) before writing."
                )
        yield batch


class Tally:
    """Counts rows and bytes of batches as they pass, for :class:`WriteResult`."""

    def __init__(self) -> None:
        self.rows = 0
        self.bytes = 0

    def count(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            self.rows += batch.num_rows
            self.bytes += batch.nbytes
            yield batch

    def result(self, commits: int = 1, **extra: Any) -> WriteResult:
        return WriteResult(rows=self.rows, bytes=self.bytes, commits=commits, extra=extra)


def key_columns(table: TableRef, store: str) -> Sequence[str]:
    """The table's key, or a clear error for operations that need one."""
    if not table.key:
        raise TerminalError(
            f"{store} table {table}: this operation needs key columns. Set TableRef(key=(...)) to the columns "
            "that identify a row, e.g. ('block_num', 'log_index') for logs."
        )
    return table.key


def last_per_key(rows: pa.Table, key: Sequence[str]) -> pa.Table:
    """One row per key, the last one: what applying the rows in order would leave (vectorised)."""
    position = "__amp_position"
    numbered = rows.select(list(key)).append_column(position, pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    last = numbered.group_by(list(key), use_threads=False).aggregate([(position, "max")])
    if last.num_rows == rows.num_rows:
        return rows
    return rows.take(np.sort(last[f"{position}_max"].to_numpy()))  # in input order


def chunked(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[list[pa.RecordBatch]]:
    """Batches grouped into lists of at least ``rows`` rows (the last list may be shorter)."""
    chunk: list[pa.RecordBatch] = []
    have = 0
    for batch in batches:
        chunk.append(batch)
        have += batch.num_rows
        if have >= rows:
            yield chunk
            chunk, have = [], 0
    if chunk:
        yield chunk
