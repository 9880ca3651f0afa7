"""Delta Lake loader: every write is one ``write_deltalake`` commit (append, range replace, overwrite); upserts merge.

Layout: each table is a Delta table in ``base_dir/<namespace>/<name>`` (namespace ``None`` → ``default``). Names
are encoded with :func:`encode_name`: ``[A-Za-z0-9_-]`` stay, every other UTF-8 byte becomes ``~XX``. The encoding
is reversible (:func:`decode_name`), has no ``.``, ``/`` or ``%`` (delta-rs percent-decodes local paths), so no
name can leave ``base_dir``.

Types: :func:`~.lakehouse.portable_type` maps what Delta lacks (unsigned integers widen: ``uint32`` → ``long``,
``uint64`` → ``decimal(20,0)``; left alone, deltalake gives ``uint32`` an ``integer`` column that the top half of its
range overflows; nanoseconds become µs, failing the write on a sub-microsecond value, which deltalake alone
truncates silently, unless ``truncate_timestamps=True``; ``fixed_size_binary`` → ``binary``; times and durations →
their integer count). Each Delta field keeps its original Arrow field in its metadata (``amp_dagster.arrow_field``),
written with the schema in the same commit: data is checked against those Arrow types (``binary`` cannot go into a
table made for ``fixed_size_binary(32)``, though both are Delta ``binary``), and :meth:`DeltaLoader.read` casts
every column back to its original type.

Streaming: ``write_deltalake`` pulls a RecordBatchReader batch by batch, so each call streams its whole input into
exactly one commit. Its memory is bounded by the files it keeps open: ``target_file_size`` per file and
``max_row_group_size`` rows per Parquet row group (with deltalake's defaults, ~100 MB files of 1M-row groups, the
peak grew with the input). deltalake pulls the source on a tokio worker thread: a source must not call deltalake
itself (it panics: "Cannot start a runtime from within a runtime"), and its exceptions come back as text, so the
loader keeps and re-raises the source's own exception.

Predicates are DataFusion SQL: column names are double-quoted with ``"`` doubled, values are integers only
(:class:`RowRange` guarantees it). Replace-range, delete and full refresh are each one atomic commit; a failed
write commits nothing (its half-written files stay unreferenced until :meth:`DeltaLoader.vacuum`). Upserts merge
in chunks of ``merge_rows`` rows, one commit each. Compaction and vacuum are separate maintenance calls: compacting
on the write path costs ~25 times the write. Operations that hold no stream (delete, ensure_table, compact,
vacuum) are retried when another writer committed first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import AmpDagsterError, ConfigError, TerminalError, TransientError
from ..ranges import RowRange
from ..retry import DEFAULT_RETRY, RetryPolicy, retry_call
from .base import ArrowData, Capabilities, Feed, Loader, TableRef, WriteResult, missing_table, require_driver
from .batches import Tally, checked_batches, chunked, key_columns, last_per_key
from .lakehouse import portable_schema
from .schema import cast_columns, check_schema, require_columns, schema_from_text, schema_to_text

ARROW_KEY = "amp_dagster.arrow_field"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_ESCAPED = re.compile(r"(?:~[0-9A-F]{2})+")


def encode_name(name: str) -> str:
    """A path component for a table or namespace name: ``"we ird.x"`` → ``"we~20ird~2Ex"``."""
    return _UNSAFE.sub(lambda m: "".join(f"~{b:02X}" for b in m.group().encode()), name)


def decode_name(component: str) -> str:
    """The inverse of :func:`encode_name`."""
    return _ESCAPED.sub(lambda m: bytes.fromhex(m.group().replace("~", "")).decode(), component)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _delta_type(t) -> str:
    """A Delta type as text (``long``, ``decimal(20,0)``, JSON for nested types), to compare and to show."""
    return t.to_json().strip('"')


def _with_origin(target: pa.Schema, original: pa.Schema) -> pa.Schema:
    """The storage schema carrying each original Arrow field in its metadata."""
    return pa.schema(f.with_metadata({ARROW_KEY: schema_to_text(pa.schema([original.field(f.name)]))}) for f in target)


def _origin(field) -> pa.Field | None:
    stored = schema_from_text((field.metadata or {}).get(ARROW_KEY))
    return stored.field(0) if stored is not None else None


class DeltaLoader(Loader):
    """Loads Arrow into Delta Lake tables under a local directory, one commit per write.

    ``target_file_size`` (bytes) and ``max_row_group_size`` (rows) bound what deltalake buffers while it writes.

    >>> with DeltaLoader("/data/delta") as delta:  # doctest: +SKIP
    ...     t = TableRef("logs", namespace="eth", key=("block_num", "log_index"))
    ...     delta.ensure_table(t, logs.schema)
    ...     delta.write(t, logs, replace=RowRange(0, 999))  # /data/delta/eth/logs, one commit
    ...     delta.compact(t)  # maintenance, off the write path
    """

    store = "Delta Lake"
    capabilities = Capabilities(
        atomic_replace_range=True, atomic_replace_table=True, upsert=True, add_columns=True, flush_rows=65_536
    )

    def __init__(
        self,
        base_dir: str | Path,
        *,
        truncate_timestamps: bool = False,
        merge_rows: int = 1_048_576,
        target_file_size: int = 32 * 2**20,
        max_row_group_size: int = 65_536,
        retry: RetryPolicy = DEFAULT_RETRY,
    ):
        require_driver("deltalake", "delta", self.store)
        from deltalake import WriterProperties

        if "://" in str(base_dir) or "%" in str(base_dir):
            raise ConfigError(
                f"Delta Lake: base_dir {str(base_dir)!r} must be a local directory path without '%' (delta-rs "
                "decodes percent escapes in paths). Pass a plain local path."
            )
        self.base_dir = Path(base_dir).absolute()
        self._truncate, self._merge_rows, self._retry = truncate_timestamps, merge_rows, retry
        self._sizes = {
            "target_file_size": target_file_size,
            "writer_properties": WriterProperties(max_row_group_size=max_row_group_size),
        }

    def path(self, table: TableRef) -> Path:
        """The table's directory: ``base_dir/<encoded namespace>/<encoded name>``."""
        parts = [encode_name(table.namespace or "default"), encode_name(table.name)]
        if any(len(p.encode()) > 255 for p in parts):
            raise ConfigError(f"Delta Lake table {table}: the encoded name is longer than 255 bytes. Shorten it.")
        return self.base_dir.joinpath(*parts)

    # -- the Loader seam ------------------------------------------------------------------------------------

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        from deltalake import DeltaTable, Field

        require_columns(schema, table, self.store)
        target = _with_origin(self._portable(schema), schema)

        def run() -> None:
            dt = self._open(table)
            if dt is None:
                path = self._mkdir(table)
                # "ignore": if another writer created it meanwhile, theirs stays and is checked below like any other
                dt = self._call(table, "create", lambda: DeltaTable.create(path, target, "ignore"))
            added = self._check(table, dt, schema, can_add=True)
            if added:
                fields = [Field.from_arrow(f) for f in target if f.name in added]
                self._call(table, "add columns", lambda: dt.alter.add_columns(fields))

        retry_call(run, self._retry, lambda e: isinstance(e, TransientError), f"Delta Lake ensure_table {table}")

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        from deltalake import write_deltalake

        schema, batches = checked_batches(data, table, self.store, replace)
        dt = self._require(table)
        target = self._target(table, dt, schema)
        tally = Tally()
        feed = Feed(self._cast(tally.count(batches), table, target))
        source = iter(feed)
        first = next(source, None)
        if first is None:  # nothing to write: no empty commit, but a replace still empties its range
            return tally.result(commits=int(replace is not None and self.delete(table, replace) > 0))
        reader = pa.RecordBatchReader.from_batches(target, chain([first], source))
        mode, predicate = ("append", None) if replace is None else ("overwrite", self._predicate(table, replace))
        write = lambda: write_deltalake(dt, reader, mode=mode, predicate=predicate, **self._sizes)  # noqa: E731
        self._call(table, "write", write, feed)
        return tally.result()

    def delete(self, table: TableRef, rows: RowRange) -> int:
        if self._open(table) is None:
            return 0
        properties = self._sizes["writer_properties"]
        delete = lambda dt: dt.delete(self._predicate(table, rows), writer_properties=properties)  # noqa: E731
        return self._retrying(table, f"delete {rows}", delete)["num_deleted_rows"]

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        from deltalake import write_deltalake

        schema, batches = checked_batches(data, table, self.store)
        target = _with_origin(self._portable(schema), schema)
        path = self._mkdir(table)
        tally = Tally()
        feed = Feed(self._cast(tally.count(batches), table, target))
        reader = pa.RecordBatchReader.from_batches(target, feed)
        # one commit swaps data and schema (with the original types in its metadata); a failure commits nothing
        write = lambda: write_deltalake(path, reader, mode="overwrite", schema_mode="overwrite", **self._sizes)  # noqa: E731
        self._call(table, "replace", write, feed)
        return tally.result()

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        key = key_columns(table, self.store)
        schema, batches = checked_batches(data, table, self.store)
        dt = self._require(table)
        target = self._target(table, dt, schema)
        predicate = " AND ".join(f"t.{_quote(k)} = s.{_quote(k)}" for k in key)
        # not when_matched_update_all: it quotes names with backticks unescaped, so a backtick in a name breaks it
        updates = {f"t.{_quote(n)}": f"s.{_quote(n)}" for n in target.names}
        inserts = {_quote(n): f"s.{_quote(n)}" for n in target.names}
        properties, tally, commits = self._sizes["writer_properties"], Tally(), 0
        # merging in chunks keeps memory bounded; later chunks merge after earlier ones, so the last row still wins
        for chunk in chunked(self._cast(tally.count(batches), table, target), self._merge_rows):
            # MERGE refuses two source rows for one target row
            source = last_per_key(pa.Table.from_batches(chunk, target), key)

            def merge(source: pa.Table = source) -> None:
                merger = dt.merge(source, predicate, source_alias="s", target_alias="t", writer_properties=properties)
                merger.when_matched_update(updates).when_not_matched_insert(inserts).execute()

            self._call(table, "upsert", merge)
            commits += 1
        return tally.result(commits=commits)

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        import pyarrow.dataset as ds

        dt = self._require(table)

        def scan() -> tuple[pa.Schema, Any]:
            dataset = dt.to_pyarrow_dataset()
            target = pa.schema(_origin(f) or dataset.schema.field(f.name) for f in dt.schema().fields)
            where = None
            if rows is not None:
                column, stored = ds.field(table.range_column), dataset.schema.field(table.range_column).type
                where = column >= pa.scalar(rows.start).cast(stored)
                if rows.end is not None:
                    where &= column <= pa.scalar(rows.end).cast(stored)
            return target, dataset.scanner(columns=target.names, filter=where).to_batches()

        target, scanned = self._call(table, "read", scan)

        def batches() -> Iterator[pa.RecordBatch]:
            with self._translating(table, "read"):
                for batch in scanned:
                    yield cast_columns(batch, target, store=self.store, table=table, reading=True)

        return pa.RecordBatchReader.from_batches(target, batches())

    # -- maintenance: never on the write path ------------------------------------------------------------------

    def compact(self, table: TableRef, target_size: int | None = None) -> dict:
        """Rewrite small files into ~``target_size``-byte ones (one OPTIMIZE commit); returns deltalake's metrics."""
        return self._retrying(table, "compact", lambda dt: dt.optimize.compact(target_size=target_size))

    def vacuum(self, table: TableRef, retention_hours: int = 168, dry_run: bool = False) -> list[str]:
        """Delete files no version newer than ``retention_hours`` references (replaced data, failed writes)."""
        vacuum = lambda dt: dt.vacuum(retention_hours, dry_run=dry_run, enforce_retention_duration=False)  # noqa: E731
        return self._retrying(table, "vacuum", vacuum)

    # -- internals -----------------------------------------------------------------------------------------

    def _open(self, table: TableRef):
        from deltalake import DeltaTable

        path = str(self.path(table))
        return self._call(table, "open", lambda: DeltaTable(path) if DeltaTable.is_deltatable(path) else None)

    def _mkdir(self, table: TableRef) -> str:
        path = self.path(table)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"Delta Lake table {table}: cannot create the directory {path}: {exc.strerror or exc}. "
                "Point DeltaLoader(base_dir=...) at a writable local directory."
            ) from None
        return str(path)

    def _require(self, table: TableRef):
        dt = self._open(table)
        if dt is None:
            raise missing_table(self.store, f"at {self.path(table)}", table)
        return dt

    def _portable(self, schema: pa.Schema) -> pa.Schema:
        return portable_schema(schema, store=self.store, small_ints=True, keep_fixed_binary=False, time_as_int=True)

    def _check(self, table: TableRef, dt, schema: pa.Schema, can_add: bool) -> list[str]:
        """Check the data against the table's Arrow types, or its Delta types if amp_dagster did not create it."""
        from deltalake import Field

        fields = dt.schema().fields
        origins = [_origin(f) for f in fields]
        if all(origins):
            return check_schema(self.store, table, pa.schema(origins), schema, can_add=can_add)
        existing = {f.name: _delta_type(f.type) for f in fields}
        incoming = {f.name: (_delta_type(Field.from_arrow(f).type), f.nullable) for f in self._portable(schema)}
        return check_schema(self.store, table, existing, incoming, can_add=can_add)

    def _target(self, table: TableRef, dt, schema: pa.Schema) -> pa.Schema:
        """The storage schema for writing ``schema`` into the existing table, in the table's column order."""
        self._check(table, dt, schema, can_add=False)
        portable = self._portable(schema)
        return pa.schema(portable.field(f.name).with_nullable(f.nullable) for f in dt.schema().fields)

    def _cast(self, batches: Iterable[pa.RecordBatch], table: TableRef, target: pa.Schema) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield cast_columns(batch, target, store=self.store, table=table, truncate_timestamps=self._truncate)

    def _predicate(self, table: TableRef, rows: RowRange) -> str:
        column = _quote(table.range_column)
        return f"{column} >= {rows.start}" + ("" if rows.end is None else f" AND {column} <= {rows.end}")

    def _retrying(self, table: TableRef, action: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(the table)``, for operations that hold no stream (nothing is consumed twice): retried when another
        writer committed first, on the table as it is then."""
        run = lambda: self._call(table, action, lambda: fn(self._require(table)))  # noqa: E731
        return retry_call(run, self._retry, lambda e: isinstance(e, TransientError), f"Delta Lake {action} {table}")

    def _call(self, table: TableRef, action: str, fn: Callable, feed: Feed | None = None):
        """Run a deltalake call; re-raise the source's own error, else a typed one naming the table and path."""
        with self._translating(table, action, feed=feed):
            return fn()

    def _translate(self, exc: BaseException, table: TableRef | None, action: str = "") -> AmpDagsterError:
        from deltalake.exceptions import CommitFailedError

        where = f"Delta Lake table {table} at {self.path(table)}"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, CommitFailedError):
            return TransientError(f"{where}: {action} conflicted with a concurrent commit ({text}). Retry it.")
        if isinstance(exc, PermissionError) or re.search(r"denied|not a directory|read-only", text, re.IGNORECASE):
            return ConfigError(
                f"{where}: cannot {action}: {text}. Point DeltaLoader(base_dir=...) at a writable local directory."
            )
        return TerminalError(f"{where}: {action} failed: {text}")
