"""The Loader seam: the few operations every destination implements, and the plain data that crosses it.

A loader takes Arrow and nothing else. Rows of block-based sources carry ``_block_num``; every loader can delete
the rows whose range column lies in a block range, which serves reorg rollback, partition replacement and
crash trimming alike. Non-block sources name another integer column (a cursor) as their range column.

Shared code branches on :class:`Capabilities`, never on which destination it is talking to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import NotSupportedError, SchemaMismatchError, TerminalError

BLOCK_NUM = "_block_num"


class ArrowStream(Protocol):
    """Anything implementing the Arrow PyCapsule stream interface (polars, DataFusion, duckdb, our QueryResult)."""

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any: ...


ArrowData = pa.RecordBatchReader | pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch] | ArrowStream
"""Anything that yields record batches: a reader, a table, one batch, an iterable of batches, or an Arrow stream."""


@dataclass(frozen=True)
class TableRef:
    """Which table, and how its rows are keyed. Passed to every loader call.

    ``namespace`` is the PostgreSQL schema, the ClickHouse database, the Iceberg namespace, a Delta or LMDB
    sub-directory, or a Redis key prefix. ``range_column`` is the integer column that ranges are deleted by
    (``_block_num`` for chain data, a cursor column otherwise). ``key`` names the columns that identify a row,
    for upserts and key-value stores.

    >>> TableRef("logs", namespace="eth", key=("block_num", "log_index"))
    TableRef(name='logs', namespace='eth', range_column='_block_num', key=('block_num', 'log_index'))
    """

    name: str
    namespace: str | None = None
    range_column: str = BLOCK_NUM
    key: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise TerminalError("TableRef.name must not be empty")
        if isinstance(self.key, str):  # a lone column name is a common slip; keep it a tuple
            object.__setattr__(self, "key", (self.key,))
        else:
            object.__setattr__(self, "key", tuple(self.key))

    def __str__(self) -> str:
        return f"{self.namespace}.{self.name}" if self.namespace else self.name


@dataclass(frozen=True)
class RowRange:
    """Rows whose range column lies in ``start..=end``; ``end=None`` means "and everything after".

    >>> RowRange(100, 199).contains(150), RowRange(100).contains(10**12)
    (True, True)
    """

    start: int
    end: int | None = None

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TerminalError(f"RowRange.{name} must be an integer, got {value!r}")
        if self.start < 0:
            raise TerminalError(f"RowRange.start must not be negative, got {self.start}")
        if self.end is not None and self.end < self.start:
            raise TerminalError(f"RowRange end {self.end} is before its start {self.start}")

    def contains(self, value: int) -> bool:
        return self.start <= value and (self.end is None or value <= self.end)

    def __str__(self) -> str:
        return f"{self.start}..={'' if self.end is None else self.end}"


@dataclass(frozen=True)
class Capabilities:
    """What a destination can do, as data. Callers (the sync engine, the IO managers) read these flags.

    - ``atomic_replace_range``: ``write(replace=...)`` deletes and writes in one commit; readers never see the
      range half-written.
    - ``atomic_replace_table``: ``replace_table`` swaps the new contents in at once and leaves the old table
      untouched when the write fails.
    - ``upsert``: ``upsert`` is implemented.
    - ``add_columns``: new nullable columns in the data are added to an existing table.
    - ``flush_rows``: rows per commit the store is happiest with; buffer at least this many before a write.
    """

    atomic_replace_range: bool
    atomic_replace_table: bool
    upsert: bool
    add_columns: bool
    flush_rows: int = 65_536


@dataclass(frozen=True)
class WriteResult:
    """What a write did: rows and Arrow bytes taken in, and how many commits (snapshots, transactions) it made."""

    rows: int = 0
    bytes: int = 0
    commits: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Loader(ABC):
    """Writes Arrow into one destination. One instance holds one connection (pool) and is reused across calls.

    Loaders are context managers; ``close()`` releases connections. Every method takes a :class:`TableRef`.
    A typical use::

        with PostgresLoader("postgresql://127.0.0.1/test") as loader:
            table = TableRef("logs", namespace="eth")
            loader.ensure_table(table, reader.schema)
            loader.write(table, reader, replace=RowRange(15_000_000, 15_000_999))
    """

    #: human name used in messages ("PostgreSQL", "Delta Lake", ...)
    store: ClassVar[str]
    #: may be overridden per instance when a setting changes what the store can do (e.g. a Redis form)
    capabilities: Capabilities

    @abstractmethod
    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        """Create the table for ``schema`` if it is missing; check an existing one against it.

        A column whose type differs raises :class:`SchemaMismatchError` naming the column. New nullable columns
        are added where ``capabilities.add_columns`` says the store can.
        """

    @abstractmethod
    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        """Append ``data``; with ``replace``, first delete the rows in that range (atomically if the store can).

        Every row written under ``replace`` must lie inside the range, so that writing the same range twice
        leaves exactly one copy.
        """

    @abstractmethod
    def delete(self, table: TableRef, rows: RowRange) -> int:
        """Delete the rows whose range column lies in ``rows``; returns how many were deleted (-1 if unknown)."""

    @abstractmethod
    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        """Make ``data`` the whole content of the table. If the write fails, the old content stays intact."""

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        """Insert rows, replacing existing rows with the same ``table.key`` values."""
        raise NotSupportedError(
            f"upsert is not supported by {self.store}: it has no way to replace rows by key. "
            "Use write(..., replace=RowRange(...)) to replace a range of rows instead."
        )

    @abstractmethod
    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        """The table's rows (optionally only a range) as Arrow, batch by batch."""

    def close(self) -> None:  # noqa: B027 - loaders without connections have nothing to release
        """Release connections; the loader must not be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- helpers the destinations share ------------------------------------------------------------------------


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


def require_columns(schema: pa.Schema, table: TableRef, store: str) -> None:
    """The range column and key columns must exist in the data, with an integer range column."""
    index = schema.get_field_index(table.range_column)
    if index < 0:
        raise SchemaMismatchError(
            f"{store} table {table}: the data has no column {table.range_column!r} to key rows by range. "
            f"Select it in the query, or set TableRef(range_column=...) to an integer column of the data."
        )
    if not pa.types.is_integer(schema.field(index).type):
        raise SchemaMismatchError(
            f"{store} table {table}: range column {table.range_column!r} is {schema.field(index).type}, "
            "but it must be an integer column (a block number or an integer cursor)."
        )
    missing = [k for k in table.key if schema.get_field_index(k) < 0]
    if missing:
        raise SchemaMismatchError(
            f"{store} table {table}: key column(s) {', '.join(map(repr, missing))} are not in the data; "
            f"the data has {', '.join(schema.names)}."
        )


def compare_columns(
    store: str,
    table: TableRef,
    existing: dict[str, str],
    incoming: dict[str, tuple[str, bool]],
    can_add: bool,
) -> list[str]:
    """Compare a table's columns (name -> store type) with the data's (name -> (store type, nullable)).

    Returns the names of new columns to add. Raises :class:`SchemaMismatchError` naming the first column
    whose type differs, a table column the data lacks, a new column that is not nullable (existing rows have
    no value for it), or a new column the store cannot add.
    """
    missing = [name for name in existing if name not in incoming]
    if missing:
        raise SchemaMismatchError(
            f"{store} table {table}: the table has column(s) {', '.join(map(repr, missing))} that the data "
            "lacks. Select them in the query, or recreate the table for the new shape."
        )
    added = []
    for name, (type_, nullable) in incoming.items():
        have = existing.get(name)
        if have is None:
            if not can_add:
                raise SchemaMismatchError(
                    f"{store} table {table}: the data has a new column {name!r} ({type_}) that {store} "
                    f"cannot add. Drop the column from the query or recreate the table."
                )
            if not nullable:
                raise SchemaMismatchError(
                    f"{store} table {table}: the data has a new column {name!r} ({type_}) that is not "
                    "nullable, so existing rows would have no value for it. Make it nullable or recreate "
                    "the table."
                )
            added.append(name)
        elif have != type_:
            raise SchemaMismatchError(
                f"{store} table {table}: column {name!r} is {have} in the table but {type_} in the data. "
                f"Cast the column in the query to match, or recreate the table."
            )
    return added


def key_columns(table: TableRef, store: str) -> Sequence[str]:
    """The table's key, or a clear error for operations that need one."""
    if not table.key:
        raise TerminalError(
            f"{store} table {table}: this operation needs key columns. Set TableRef(key=(...)) to the columns "
            "that identify a row, e.g. ('block_num', 'log_index') for logs."
        )
    return table.key


def missing_table(store: str, where: str, table: TableRef) -> TerminalError:
    return TerminalError(f"{store} {where}: table {table} does not exist. Call ensure_table(table, schema) first.")


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
