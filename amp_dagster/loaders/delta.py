"""Delta Lake loader: every write is one ``write_deltalake`` commit (append, range replace, overwrite); upserts merge.

Layout: each table is a Delta table in ``base_dir/<namespace>/<name>`` (namespace ``None`` → ``default``). Names
are encoded with :func:`encode_name`: ``[A-Za-z0-9_-]`` stay, every other UTF-8 byte becomes ``~XX``. The encoding
is reversible (:func:`decode_name`), has no ``.``, ``/`` or ``%`` (delta-rs percent-decodes local paths), so no
name can leave ``base_dir``.

Files are written in the order rows arrive, up to ``target_file_size`` each; amp sends rows in
block order, so each file holds a narrow span of blocks. A range replace or delete rewrites only the files that
hold rows of the range (deltalake 1.6 reads the candidates and rewrites whole files; it writes no deletion
vectors), so its cost is the range plus at most a file or two, whatever the table's size. Rows that arrive out of
block order spread a range over more files, and a replace then rewrites more of them. (Partitions by block bucket
would bound that, but deltalake keeps one open writer, a row group and an upload buffer, per partition until the
commit: a write's memory would grow with the blocks it spans, by the whole write for a sparse table.)

Types: :func:`~.lakehouse.portable_type` maps what Delta lacks (unsigned integers widen: ``uint32`` → ``long``,
``uint64`` → ``decimal(20,0)``; left alone, deltalake gives ``uint32`` an ``integer`` column that the top half of its
range overflows; nanoseconds become µs, failing the write on a sub-microsecond value, which deltalake alone
truncates silently, unless ``truncate_timestamps=True``; ``fixed_size_binary`` → ``binary``; times and durations →
their integer count). Each Delta field keeps its original Arrow field in its metadata (``amp_dagster.arrow_field``),
written with the schema in the same commit: data is checked against those Arrow types (``binary`` cannot go into a
table made for ``fixed_size_binary(32)``, though both are Delta ``binary``), and :meth:`DeltaLoader.read` casts
every column back to its original type.

Statistics: deltalake 1.6 writes a decimal's file min/max through a double, so above 2**53 they are rounded, and
above 2**63-1 clamped to it. It trusts them when it prunes files, and drops a file whole, unread, when they say
every row matches: a ``uint64`` range at 2**63 deleted the wrong rows. Tables made here therefore list their
columns in ``delta.dataSkippingStatsColumns`` without the decimals wider than 15 digits (what a double holds
exactly), and such columns get no file statistics: the range predicates read the values themselves, and other
engines are not misled either. (With that list set, deltalake keeps no statistics for struct columns either.)

Predicates are DataFusion SQL: column names are double-quoted with ``"`` doubled, values are integers only
(:class:`RowRange` guarantees it, checked against the column's own type), cast to the column's decimal type where
it has one (a bare literal above 2**63-1 is not a decimal to DataFusion). Replace-range, delete and full refresh
are each one atomic commit (a full refresh that changes the statistics list commits the new list first); a failed
write commits nothing. Upserts merge in chunks of ``merge_rows`` rows, one
commit each. Operations that hold no stream (delete, ensure_table) are retried when another writer committed first.

Upkeep: a range replace leaves the files it replaced behind, for readers of older versions. After commits, a
worker thread of the loader (never the writing call itself) deletes the files no version needs any more once
``vacuum_every`` commits have replaced files, keeping those replaced within the last ``retention_hours`` (for
readers elsewhere) and those of every version a reader or writer in this process still uses; and it compacts a
table once it holds ``compact_files`` files under half the target size (deltalake's OPTIMIZE: one commit marked as
no data change). The loader's next call on that table waits for the upkeep its commits made due, so replaced files
never pile up behind a quick run of writes; ``close()`` waits for it too, and so does the interpreter at exit.
Files of failed writes are deleted a week after they were written (deltalake's own default retention): younger
ones may belong to a write still running elsewhere. Vacuuming deletes files without committing deltalake's VACUUM
START/END entries, so each write stays exactly one version.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import AmpDagsterError, ConfigError, SchemaMismatchError, TerminalError, TransientError
from ..ranges import RowRange
from ..retry import DEFAULT_RETRY, RetryPolicy, retry_call
from .base import ArrowData, Capabilities, Feed, Loader, TableRef, WriteResult, missing_table, require_driver
from .batches import Tally, checked_batches, chunked, key_columns, last_per_key
from .lakehouse import portable_schema
from .schema import cast_columns, check_schema, require_columns, schema_from_text, schema_to_text

ARROW_KEY = "amp_dagster.arrow_field"
STATS = "delta.dataSkippingStatsColumns"
EXACT_DIGITS = 15  # decimal digits a double holds exactly: wider decimals get no (rounded) file statistics
ORPHAN_HOURS = 168  # files no commit ever referenced (failed writes) are deleted this long after they were written

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_ESCAPED = re.compile(r"(?:~[0-9A-F]{2})+")
_INTEGERS = {"byte": pa.int8(), "short": pa.int16(), "integer": pa.int32(), "long": pa.int64()}
_DECIMAL = re.compile(r"decimal\((\d+),(\d+)\)")
_MISSING_FILE = re.compile(r"Object at location (\S+) not found")

# versions that readers and writers in this process still use, by table directory: upkeep keeps their files
_pins: Counter[tuple[Path, int]] = Counter()
_pins_lock = threading.Lock()


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


def _stats_columns(fields: Iterable[tuple[str, str]]) -> str | None:
    """The value of ``delta.dataSkippingStatsColumns`` for columns given as (name, Delta type text): every column
    but the decimals (also nested ones) wider than a double holds; None when there are none."""
    fields = list(fields)
    wide = {n for n, t in fields if any(int(p) > EXACT_DIGITS for p, _ in _DECIMAL.findall(t.replace(" ", "")))}
    if not wide:
        return None
    return ",".join("`" + n.replace("`", "``") + "`" for n, _ in fields if n not in wide)


@dataclass(frozen=True)
class _RangeColumn:
    """A table's range column as stored: the Arrow type its bounds must fit, and its Delta type as Arrow."""

    name: str
    arrow: pa.DataType
    stored: pa.DataType

    def literal(self, value: int) -> str:
        if pa.types.is_decimal(self.stored):
            return f"CAST('{value}' AS DECIMAL({self.stored.precision},{self.stored.scale}))"
        return str(value)

    def scalar(self, value: int) -> pa.Scalar:
        return pa.scalar(Decimal(value) if pa.types.is_decimal(self.stored) else value, self.stored)


class DeltaLoader(Loader):
    """Loads Arrow into Delta Lake tables under a local directory, one commit per write, and keeps them tidy.

    - ``target_file_size`` (bytes) and ``max_row_group_size`` (rows) bound what deltalake buffers while it writes;
    - ``vacuum_every``: delete replaced files after this many commits that replaced files (0: never, only
      :meth:`vacuum`);
    - ``retention_hours``: keep replaced files this many hours for readers in other processes (readers in this
      process are always safe). 0 keeps a table at most about twice its size under steady replaces; a reader
      elsewhere still reading a replaced version then fails (transiently) and must read again;
    - ``compact_files``: compact a table once it has this many files under half ``target_file_size`` (0: never,
      only :meth:`compact`).

    >>> with DeltaLoader("/data/delta") as delta:  # doctest: +SKIP
    ...     t = TableRef("logs", namespace="eth", key=("block_num", "log_index"))
    ...     delta.ensure_table(t, logs.schema)
    ...     delta.write(t, logs, replace=RowRange(0, 999))  # /data/delta/eth/logs, one commit
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
        vacuum_every: int = 1,
        retention_hours: int = 0,
        compact_files: int = 32,
        retry: RetryPolicy = DEFAULT_RETRY,
    ):
        require_driver("deltalake", "delta", self.store)
        from deltalake import WriterProperties

        if "://" in str(base_dir) or "%" in str(base_dir):
            raise ConfigError(
                f"Delta Lake: base_dir {str(base_dir)!r} must be a local directory path without '%' (delta-rs "
                "decodes percent escapes in paths). Pass a plain local path."
            )
        _require_setting("vacuum_every", vacuum_every, 0, "commits that replaced files between vacuums, 0: never")
        _require_setting("retention_hours", retention_hours, 0, "hours replaced files are kept")
        _require_setting("compact_files", compact_files, 0, "small files that start a compaction, 0: never")
        self.base_dir = Path(base_dir).absolute()
        self._truncate, self._merge_rows, self._retry = truncate_timestamps, merge_rows, retry
        self._target_size, self._properties = target_file_size, WriterProperties(max_row_group_size=max_row_group_size)
        self._sizes = {"target_file_size": target_file_size, "writer_properties": self._properties}
        self._vacuum_every, self._retention = vacuum_every, retention_hours
        self._compact_files = compact_files
        # upkeep: per-table locks (this loader's calls and the upkeep of one table take turns), commit counts, the
        # tables waiting for upkeep or in it, and the worker thread, which lives while there is work
        self._guard = threading.Lock()
        self._upkept = threading.Condition(self._guard)
        self._locks: dict[Path, threading.RLock] = {}
        self._held = threading.local()
        self._counts: dict[Path, Counter[str]] = {}
        self._pending: dict[Path, TableRef] = {}
        self._busy: set[Path] = set()
        self._swept: set[Path] = set()
        self._worker: threading.Thread | None = None

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
        target = self._storage(schema)

        def run() -> None:
            dt = self._open(table)
            if dt is None:
                path = self._mkdir(table)

                def create():
                    # "ignore": if another writer created it meanwhile, theirs stays and is checked below
                    return DeltaTable.create(path, target, "ignore", configuration=_configuration(target))

                dt = self._call(table, "create", create)
            added = self._check(table, dt, schema, can_add=True)
            if added:
                fields = [Field.from_arrow(f) for f in target if f.name in added]
                self._call(table, "add columns", lambda: dt.alter.add_columns(fields))
            self._keep_statistics_exact(table, dt)

        with self._lock(table):
            retry_call(run, self._retry, lambda e: isinstance(e, TransientError), f"Delta Lake ensure_table {table}")

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        from deltalake import write_deltalake

        schema, batches = checked_batches(data, table, self.store, replace)
        with self._lock(table), self._using(table) as dt:
            if replace is not None:
                replace.check(table.range_column, self._range_column(table, dt).arrow, self._where(table))
            target = self._target(table, dt, schema)
            tally = Tally()
            feed = Feed(self._cast(tally.count(batches), table, target))
            source = iter(feed)
            first = next(source, None)
            if first is None:  # nothing to write: no empty commit, but a replace still empties its range
                return tally.result(commits=int(replace is not None and self.delete(table, replace) > 0))
            reader = pa.RecordBatchReader.from_batches(target, chain([first], source))
            predicate = None if replace is None else self._predicate(table, dt, replace)
            mode = "append" if replace is None else "overwrite"
            write = lambda: write_deltalake(dt, reader, mode=mode, predicate=predicate, **self._sizes)  # noqa: E731
            self._call(table, "write", write, feed)
        self._committed(table, replaced=replace is not None)
        return tally.result()

    def delete(self, table: TableRef, rows: RowRange) -> int:
        def delete(dt) -> int:
            rows.check(table.range_column, self._range_column(table, dt).arrow, self._where(table))
            return dt.delete(self._predicate(table, dt, rows), writer_properties=self._properties)["num_deleted_rows"]

        with self._lock(table):
            deleted = self._retrying(table, f"delete {rows}", delete, missing=0)
        if deleted:
            self._committed(table, replaced=True)
        return deleted

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        from deltalake import write_deltalake

        schema, batches = checked_batches(data, table, self.store)
        target = self._storage(schema)
        configuration = _configuration(target)
        path = self._mkdir(table)
        tally = Tally()
        feed = Feed(self._cast(tally.count(batches), table, target))
        reader = pa.RecordBatchReader.from_batches(target, feed)

        def write() -> None:
            # one commit swaps data and schema (with the original types in its metadata); a failure commits nothing
            write_deltalake(
                path,
                reader,
                mode="overwrite",
                schema_mode="overwrite",
                partition_by=[],
                configuration=configuration,
                **self._sizes,
            )

        with self._lock(table):
            existing = self._open(table)
            stats = (configuration or {}).get(STATS)
            if existing is not None and stats != existing.metadata().configuration.get(STATS):
                # deltalake keeps a table's properties through an overwrite, and the files of this very write
                # must already follow the new shape's statistics list (a commit of its own, before the data's)
                self._set_statistics(table, existing, stats or _all_columns(target))
            self._call(table, "replace", write, feed)
        self._committed(table, replaced=True)
        return tally.result()

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        key = key_columns(table, self.store)
        schema, batches = checked_batches(data, table, self.store)
        tally, commits = Tally(), 0
        with self._lock(table), self._using(table) as dt:
            target = self._target(table, dt, schema)
            predicate = " AND ".join(f"t.{_quote(k)} = s.{_quote(k)}" for k in key)
            # not when_matched_update_all: it quotes names with backticks unescaped, so a backtick in a name breaks it
            updates = {f"t.{_quote(n)}": f"s.{_quote(n)}" for n in target.names}
            inserts = {_quote(n): f"s.{_quote(n)}" for n in target.names}
            # merging in chunks keeps memory bounded; later chunks merge after earlier ones, so the last row wins
            for chunk in chunked(self._cast(tally.count(batches), table, target), self._merge_rows):
                # MERGE refuses two source rows for one target row
                source = last_per_key(pa.Table.from_batches(chunk, target), key)

                def merge(source: pa.Table = source) -> None:
                    merger = dt.merge(
                        source, predicate, source_alias="s", target_alias="t", writer_properties=self._properties
                    )
                    merger.when_matched_update(updates).when_not_matched_insert(inserts).execute()

                self._call(table, "upsert", merge)
                commits += 1
        if commits:
            self._committed(table, replaced=True)
        return tally.result(commits=commits)

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        import pyarrow.dataset as ds

        dt = self._require(table)
        where, pruning = None, None
        if rows is not None:
            column = self._range_column(table, dt)
            rows.check(table.range_column, column.arrow, self._where(table))
            pruning = self._predicate(table, dt, rows)
            where = ds.field(table.range_column) >= column.scalar(rows.start)
            if rows.end is not None:
                where &= ds.field(table.range_column) <= column.scalar(rows.end)
        release = _pin(self.path(table), dt.version())

        def open_dataset() -> tuple[pa.Schema, Any]:
            # the pruning predicate picks the files (by the statistics, which are exact where there are any); the
            # filter then picks the rows, comparing the stored values exactly
            dataset = dt.to_pyarrow_dataset(file_pruning_predicate=pruning)
            return pa.schema(_origin(f) or dataset.schema.field(f.name) for f in dt.schema().fields), dataset

        try:
            target, dataset = self._call(table, "read", open_dataset)
        except BaseException:
            release()
            raise

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                with self._translating(table, "read"):
                    # the scan starts when the reader is first read: pyarrow reads ahead from the moment it exists
                    for batch in dataset.scanner(columns=target.names, filter=where).to_batches():
                        yield cast_columns(batch, target, store=self.store, table=table, reading=True)
            finally:
                release()

        reading = batches()
        weakref.finalize(reading, release)  # a reader dropped unread releases its version too
        return pa.RecordBatchReader.from_batches(target, reading)

    def close(self) -> None:
        """Wait for the upkeep of the tables written (vacuum, compaction) to finish."""
        with self._guard:
            worker = self._worker
        if worker is not None:
            worker.join()

    # -- maintenance: never on the write path ------------------------------------------------------------------

    def compact(self, table: TableRef, target_size: int | None = None) -> dict:
        """Rewrite small files into ~``target_size``-byte ones (one OPTIMIZE commit); returns
        deltalake's metrics. The replaced small files are vacuumed by the loader's policy."""
        size = target_size or self._target_size
        compact = lambda dt: dt.optimize.compact(target_size=size, writer_properties=self._properties)  # noqa: E731
        with self._lock(table):
            metrics = self._retrying(table, "compact", compact)
        if metrics.get("numFilesRemoved"):
            self._committed(table, replaced=True)
        return metrics

    def vacuum(self, table: TableRef, retention_hours: int | None = None, dry_run: bool = False) -> list[str]:
        """Delete (or with ``dry_run`` only list) the files that versions replaced more than ``retention_hours``
        ago (default: the loader's), except those a reader or writer in this process still uses."""
        hours = self._retention if retention_hours is None else retention_hours
        with self._lock(table):
            dt = self._require(table)
            return self._sweep(table, dt, hours, dry_run=dry_run)

    # -- upkeep ------------------------------------------------------------------------------------------------

    def _committed(self, table: TableRef, *, replaced: bool) -> None:
        """Count a commit (``replaced``: it removed files); hand the table to the worker when upkeep is due."""
        path = self.path(table)
        with self._guard:
            counts = self._counts.setdefault(path, Counter())
            counts["commits"] += 1
            counts["replaced"] += replaced
            vacuum = self._vacuum_every and counts["replaced"] >= self._vacuum_every
            # counting small files reads the file list: not after every one of many small appends
            compact = self._compact_files and counts["commits"] >= max(1, self._compact_files // 4)
            if not (vacuum or compact):
                return
            self._pending[path] = table
            self._start_worker()

    def _start_worker(self) -> None:
        """Start the worker unless it runs (called holding the guard)."""
        if self._worker is not None and self._worker.is_alive():
            return
        self._busy.clear()  # a worker that is gone (it ran in the parent of a forked process) holds nothing
        if self._pending:
            self._worker = threading.Thread(target=self._work, name=f"amp-dagster-delta-upkeep-{id(self):x}")
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._guard:
                if not self._pending:
                    self._worker = None
                    return
                path = next(iter(self._pending))
                table = self._pending.pop(path)
                self._busy.add(path)
            try:
                self._upkeep(table, path)
            except Exception as exc:  # upkeep must never fail a write; the next commit tries again
                log.warning("Delta Lake upkeep of table %s at %s failed: %s", table, path, exc)
            finally:
                with self._guard:
                    self._busy.discard(path)
                    self._upkept.notify_all()

    def _upkeep(self, table: TableRef, path: Path) -> None:
        with self._lock(table, after_upkeep=False):
            dt = self._open(table)
            if dt is None:
                return
            with self._guard:
                counts = self._counts[path]
                compact = self._compact_files and counts["commits"] >= max(1, self._compact_files // 4)
                if compact:
                    counts["commits"] = 0
            if compact and self._small_files(dt) >= self._compact_files:
                size, properties = self._target_size, self._properties
                self._call(
                    table, "compact", lambda: dt.optimize.compact(target_size=size, writer_properties=properties)
                )
                with self._guard:
                    counts["replaced"] += 1
                dt = self._require(table)
            with self._guard:
                vacuum = self._vacuum_every and counts["replaced"] >= self._vacuum_every
                if vacuum:
                    counts["replaced"] = 0
                orphans = path not in self._swept
                self._swept.add(path)
            if vacuum or orphans:
                self._sweep(table, dt, self._retention, orphans=orphans)

    def _small_files(self, dt) -> int:
        """How many of the table's files are under half the target size."""
        sizes = pa.table(dt.get_add_actions(flatten=False)).column("size_bytes")
        return pc.sum(pc.less(sizes, self._target_size // 2)).as_py() or 0

    def _sweep(self, table: TableRef, dt, hours: int, *, dry_run: bool = False, orphans: bool = False) -> list[str]:
        """Delete the files versions of ``dt`` replaced more than ``hours`` ago, except those of versions in use
        here (``orphans``: also files no commit references, written more than a week ago); returns their paths
        relative to the table."""
        path = self.path(table)
        with _pins_lock:
            keep = sorted(version for (pinned, version) in _pins if pinned == path)

        def listing(hours: int, full: bool) -> list[str]:
            # a dry run: deltalake's own VACUUM would also commit two log entries
            return dt.vacuum(
                retention_hours=hours, dry_run=True, enforce_retention_duration=False, full=full, keep_versions=keep
            )

        files = self._call(table, "vacuum", lambda: listing(hours, False))
        if orphans:
            files = sorted({*files, *self._call(table, "vacuum", lambda: listing(max(hours, ORPHAN_HOURS), True))})
        if not dry_run:
            for name in files:
                (path / name).unlink(missing_ok=True)
        return files

    @contextmanager
    def _lock(self, table: TableRef, *, after_upkeep: bool = True) -> Iterator[None]:
        """This loader's turn at the table. A call gives way to the upkeep its table is due first (so replaced
        files never pile up behind a quick run of writes), unless its thread already holds the table."""
        path = self.path(table)
        held: Counter[Path] = vars(self._held).setdefault("paths", Counter())
        with self._guard:
            lock = self._locks.setdefault(path, threading.RLock())
            while after_upkeep and not held[path] and (path in self._pending or path in self._busy):
                self._start_worker()
                self._upkept.wait(timeout=1.0)
        with lock:
            held[path] += 1
            try:
                yield
            finally:
                held[path] -= 1

    @contextmanager
    def _using(self, table: TableRef) -> Iterator[Any]:
        """The table, its version pinned while the block runs (upkeep keeps the files it reads)."""
        dt = self._require(table)
        release = _pin(self.path(table), dt.version())
        try:
            yield dt
        finally:
            release()

    # -- internals -----------------------------------------------------------------------------------------

    def _where(self, table: TableRef) -> str:
        return f"{self.store} table {table}"

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

    def _storage(self, schema: pa.Schema) -> pa.Schema:
        """The schema a new table (or a full refresh) gets for ``schema``."""
        return _with_origin(self._portable(schema), schema)

    def _keep_statistics_exact(self, table: TableRef, dt) -> None:
        """Bring the statistics list of a table made here up to its columns (added ones, or a table made before
        the list existed). Files already written keep the statistics they have."""
        fields = dt.schema().fields
        if not all(_origin(f) for f in fields):
            return  # not a table of ours: its properties are its owner's
        stats = _stats_columns((f.name, _delta_type(f.type)) for f in fields)
        have = dt.metadata().configuration.get(STATS)
        if stats is None and have is not None:
            stats = ",".join("`" + f.name.replace("`", "``") + "`" for f in fields)
        if stats is not None and stats != have:
            self._set_statistics(table, dt, stats)

    def _set_statistics(self, table: TableRef, dt, stats: str) -> None:
        self._call(table, "set properties", lambda: dt.alter.set_table_properties({STATS: stats}))

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

    def _range_column(self, table: TableRef, dt) -> _RangeColumn:
        field = next((f for f in dt.schema().fields if f.name == table.range_column), None)
        if field is None:
            raise SchemaMismatchError(
                f"{self._where(table)} has no column {table.range_column!r} to select rows by range. Set "
                "TableRef(range_column=...) to one of its integer columns."
            )
        text = _delta_type(field.type)
        stored, decimal = _INTEGERS.get(text), _DECIMAL.fullmatch(text)
        if decimal and decimal[2] == "0" and int(decimal[1]) >= 20:
            stored = pa.decimal128(int(decimal[1]), 0)
        if stored is None:
            raise SchemaMismatchError(
                f"{self._where(table)}: range column {table.range_column!r} is {text} in the table; a range column "
                "must be an integer (or decimal(20,0), where a uint64 goes)."
            )
        origin = _origin(field)
        if origin is not None and pa.types.is_integer(origin.type):
            arrow = origin.type
        else:
            arrow = stored if pa.types.is_integer(stored) else pa.uint64()
        return _RangeColumn(field.name, arrow, stored)

    def _predicate(self, table: TableRef, dt, rows: RowRange) -> str:
        column = self._range_column(table, dt)
        name = _quote(column.name)
        text = f"{name} >= {column.literal(rows.start)}"
        if rows.end is not None:
            text += f" AND {name} <= {column.literal(rows.end)}"
        return text

    def _retrying(self, table: TableRef, action: str, fn: Callable[[Any], Any], missing: Any = None) -> Any:
        """``fn(the table)``, for operations that hold no stream (nothing is consumed twice): retried when another
        writer committed first, on the table as it is then. A missing table gives ``missing`` if one is given."""

        def run() -> Any:
            dt = self._open(table)
            if dt is None:
                if missing is None:
                    raise missing_table(self.store, f"at {self.path(table)}", table)
                return missing
            release = _pin(self.path(table), dt.version())
            try:
                return self._call(table, action, lambda: fn(dt))
            finally:
                release()

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
        missing = _MISSING_FILE.search(text)
        if missing and not self._referenced(table, missing[1]):
            return TransientError(
                f"{where}: {action} failed: a file it read, {missing[1]}, was replaced and vacuumed by a later "
                "commit meanwhile. Retry it on the table as it is now."
            )
        if isinstance(exc, PermissionError) or re.search(r"denied|not a directory|read-only", text, re.IGNORECASE):
            return ConfigError(
                f"{where}: cannot {action}: {text}. Point DeltaLoader(base_dir=...) at a writable local directory."
            )
        return TerminalError(f"{where}: {action} failed: {text}")

    def _referenced(self, table: TableRef, location: str) -> bool:
        """Whether the table's latest version still lists the file (then it is lost, not just replaced)."""
        from deltalake import DeltaTable

        name = Path(location).name
        try:  # not through _call: its errors would come back here
            return any(Path(uri).name == name for uri in DeltaTable(str(self.path(table))).file_uris())
        except Exception:
            return True


def _all_columns(target: pa.Schema) -> str:
    return ",".join("`" + f.name.replace("`", "``") + "`" for f in target)


def _configuration(target: pa.Schema) -> dict[str, str] | None:
    """A new table's properties: the statistics list, where it needs one."""
    from deltalake import Field

    stats = _stats_columns((f.name, _delta_type(Field.from_arrow(f).type)) for f in target)
    return None if stats is None else {STATS: stats}


def _pin(path: Path, version: int) -> Callable[[], None]:
    """Keep ``version``'s files from upkeep until the returned function is called (once; later calls do nothing)."""
    with _pins_lock:
        _pins[path, version] += 1
    released = threading.Event()

    def release() -> None:
        with _pins_lock:
            if released.is_set():
                return
            released.set()
            _pins[path, version] -= 1
            if _pins[path, version] <= 0:
                del _pins[path, version]

    return release


def _require_setting(name: str, value: Any, least: int, meaning: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"Delta Lake: {name} must be an integer >= {least} ({meaning}), got {value!r}")
