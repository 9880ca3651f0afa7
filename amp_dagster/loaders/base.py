"""The Loader seam: the few operations every destination implements, and the plain data that crosses it.

A loader takes Arrow and nothing else. Rows of block-based sources carry ``_block_num``; every loader can delete
the rows whose range column lies in a block range, which serves reorg rollback, partition replacement and
crash trimming alike. Non-block sources name another integer column (a cursor) as their range column.

Shared code branches on :class:`Capabilities`, never on which destination it is talking to.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import pyarrow as pa

from ..errors import AmpDagsterError, MissingDriverError, NotSupportedError, TerminalError
from ..ranges import BLOCK_NUM, RowRange


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

    def count(self, table: TableRef, rows: RowRange | None = None) -> int:
        """How many rows the table holds (in a range). Stores that can count without reading override this."""
        return sum(batch.num_rows for batch in self.read(table, rows))

    def close(self) -> None:  # noqa: B027 - loaders without connections have nothing to release
        """Release connections; the loader must not be used afterwards."""

    # -- errors: one hook, one shape, in every loader ---------------------------------------------------------

    def _translate(self, exc: BaseException, table: TableRef | None, action: str = "") -> AmpDagsterError:
        """A driver's exception as amp_dagster's typed error: transient or terminal, naming the store, where it
        is, the table and the ``action`` that failed, without secrets. Each loader overrides this one hook."""
        where = self.store + (f" table {table}" if table else "")
        return TerminalError(f"{where}: {action + ' failed: ' if action else ''}{exc}")

    @contextmanager
    def _translating(
        self,
        table: TableRef | None,
        action: str = "",
        *,
        feed: Feed | None = None,
        errors: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    ) -> Iterator[None]:
        """Run a block whose driver ``errors`` come out through :meth:`_translate`. Typed errors pass unchanged,
        and so does what the data source itself raised while the driver pulled it (``feed``)."""
        try:
            yield
        except AmpDagsterError:
            raise
        except errors as exc:
            if feed is not None and feed.error is not None:
                raise feed.error from None
            raise self._translate(exc, table, action) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Feed:
    """The batches handed to a driver, remembering what the data source itself raised.

    A driver's own failures are translated into typed errors, but the source's exception must come out unchanged;
    some drivers (deltalake pulls the source on a worker thread) hand it back only as text.
    """

    def __init__(self, batches: Iterable[pa.RecordBatch]) -> None:
        self._batches = batches
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            yield from self._batches
        except Exception as exc:
            self.error = exc
            raise


# -- errors every loader raises the same way ----------------------------------------------------------


def require_driver(module: str, extra: str, store: str) -> Any:
    """Import a destination's driver, or fail naming the ``amp-dagster`` extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDriverError(
            f"{store} needs the Python package {module!r}, which cannot be imported ({exc}). Install it with "
            f"`pip install 'amp-dagster[{extra}]'` (or `uv add 'amp-dagster[{extra}]'`)."
        ) from None


def missing_table(store: str, where: str, table: TableRef) -> TerminalError:
    return TerminalError(f"{store} {where}: table {table} does not exist. Call ensure_table(table, schema) first.")
