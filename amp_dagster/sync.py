"""The one sync algorithm: source → bounded queue → buffer → Loader → commit → checkpoint, for every mode.

A reader thread pulls a :class:`~amp_dagster.sources.Source`'s events into a queue bounded in bytes (backpressure:
memory stays bounded whatever the result size); the calling thread buffers them, writes them through the
:class:`~amp_dagster.loaders.base.Loader` seam, and only after the write has committed stores a checkpoint in a
:class:`CheckpointStore` (Dagster's run storage in production, see ``checkpoints.py``). This module imports no
Dagster.

Exactly once, in effect, for every destination, from three rules together:

1. every write is idempotent by range: rows are keyed by their range column (``_block_num``), and a range is
   written with replace semantics (or appended only where the destination is known to be empty);
2. the checkpoint is written only after the data it covers is committed, at a ``ranges_complete`` boundary;
3. before resuming, the destination is trimmed to the checkpoint: rows past it are uncommitted leftovers of a
   run that died between its commit and its checkpoint, and are deleted before the source resumes from it.

A crash at any point therefore leaves either data that the next run replaces, or data past the checkpoint that
the next run deletes first. Reorgs delete from the fork block and move the checkpoint back to the fork's
parent before going on. Run storage has no compare-and-set, so every checkpoint key has exactly one writer:
:meth:`~.state.CheckpointStore.lock` is held for the whole sync. The checkpoint state lives in ``state.py``, the
reader thread and its bounded queue in ``pipe.py``.

Modes:

- ``full_refresh``: the whole source replaces the table in one atomic ``replace_table``;
- ``incremental``: loads ``(checkpoint, head - finality]`` in chunks of ``blocks_per_query`` blocks, one query and
  one replace-range write per chunk, checkpointing after each; or, with explicit ``ranges`` (partitions, a
  backfill), one query and one replace per contiguous span, recorded under its own key and never moving the live
  checkpoint (which is the highest *contiguous* loaded block, explicit ranges included). Cursor sources (a
  Python cursor source, a Flight SQL query with a range column) read everything after their cursor;
- ``stream``: a streaming source (``SETTINGS stream = true``, or a cursor source polled) until stopped, or until a
  block or a number of seconds, flushing by rows, bytes or seconds, or as soon as it has caught up.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from .errors import AmpDagsterError, ConfigError, TerminalError
from .flight.protocol import BlockRange, Checkpoint, Data, Position, Reorg, Rewind, Watermark
from .loaders.base import Loader, TableRef
from .pipe import END, READ_END, Reader, event_size
from .ranges import RowRange, contiguous_end, merge_ranges
from .retry import Backoff, RetryPolicy
from .state import CheckpointStore, SyncState, effective_high, live_key, load_state, range_key, range_records

log = logging.getLogger(__name__)

Mode = Literal["full_refresh", "incremental", "stream"]
MODES: tuple[str, ...] = ("full_refresh", "incremental", "stream")
# a test-only pause between a commit and its checkpoint, so that kill tests can hit exactly that moment
_COMMIT_PAUSE = "AMP_DAGSTER_TEST_COMMIT_PAUSE"


# -- options, progress, result ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """What the sync has done so far, passed to ``SyncOptions.progress`` after every flush."""

    rows: int
    bytes: int
    blocks: int
    last_block: int | None
    head: int | None
    lag_blocks: int | None
    lag_seconds: float | None
    elapsed: float
    checkpoint: SyncState | None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def blocks_per_s(self) -> float:
        return self.blocks / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True)
class SyncOptions:
    """How a sync runs. Every field has a default that suits amp's ``logs`` on a laptop."""

    finality: int = 0  # incremental: blocks behind the head that may still reorg and are not loaded yet
    blocks_per_query: int = 100_000  # incremental: one query and one replace-range write per chunk of blocks
    ranges: tuple[RowRange, ...] = ()  # incremental: explicit ranges to load (partitions, a backfill)
    flush_rows: int | None = None  # stream: rows buffered before a write (None: the loader's preference)
    flush_bytes: int = 64 * 2**20  # stream: bytes buffered before a write (also the spill threshold)
    flush_seconds: float = 5.0  # stream: the longest a completed microbatch waits while catching up
    queue_bytes: int = 128 * 2**20  # reader → writer queue, in Arrow bytes: backpressure on the source
    until_block: int | None = None  # stop at the checkpoint that reaches this block (or cap incremental)
    seconds: float | None = None  # stream: stop after this many seconds
    poll_seconds: float = 5.0  # stream of a cursor source: pause between reads once it has caught up
    lock_wait: float = 30.0  # how long a second sync of the same pipeline waits before failing
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=10, initial_delay=0.5, max_delay=10.0))
    progress: Callable[[Progress], None] | None = None
    stop: threading.Event | None = None  # set it (from a signal handler) to stop cleanly

    def __post_init__(self) -> None:
        for name in ("blocks_per_query", "flush_bytes", "queue_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SyncOptions.{name} must be at least 1, got {getattr(self, name)}")
        if self.finality < 0:
            raise ConfigError(f"SyncOptions.finality must not be negative, got {self.finality}")


@dataclass(frozen=True)
class SyncResult:
    """What one sync did."""

    pipeline: str
    mode: str
    rows: int
    bytes: int
    first_block: int | None
    last_block: int | None
    checkpoint: SyncState | None
    duration: float
    flushes: int
    reorgs: int
    stopped: str  # why it ended: "done", "until", "seconds" or "stopped"

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.duration if self.duration > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "mode": self.mode,
            "rows": self.rows,
            "bytes": self.bytes,
            "first_block": self.first_block,
            "last_block": self.last_block,
            "checkpoint": None if self.checkpoint is None else json.loads(self.checkpoint.to_json()),
            "duration_s": round(self.duration, 3),
            "rows_per_s": round(self.rows_per_s, 1),
            "flushes": self.flushes,
            "reorgs": self.reorgs,
            "stopped": self.stopped,
        }


class _Stopped(Exception):
    """Raised into a write in progress when the sync is asked to stop: the write aborts, nothing commits."""


# -- the reader thread and its bounded queue ---------------------------------------------------------------------

# -- the stream buffer -------------------------------------------------------------------------------------------


@dataclass
class _Segment:
    """Rows between two checkpoints (one microbatch, one page): their span of range values, and the position
    to store once they are committed."""

    start: int | None = None
    end: int | None = None
    batches: list[pa.RecordBatch] = field(default_factory=list)
    ranges: tuple[BlockRange, ...] = ()
    position: Position | None = None
    complete: bool = False
    rows: int = 0
    bytes: int = 0
    spilled: int = 0  # rows of this segment already written by a spill
    since: float = field(default_factory=time.monotonic)

    def add(self, batch: pa.RecordBatch, low: int, high: int) -> None:
        self.batches.append(batch)
        self.rows += batch.num_rows
        self.bytes += batch.nbytes
        self.start = low if self.start is None else min(self.start, low)
        self.end = high if self.end is None else max(self.end, high)

    def cut(self, first: int, column: str) -> None:
        """Keep only rows whose range value is below ``first``."""
        kept = []
        for batch in self.batches:
            values = batch.column(column)
            batch = batch.filter(pc.less(values, pa.scalar(first, values.type)))
            if batch.num_rows:
                kept.append(batch)
        self.batches = kept
        self.rows = sum(b.num_rows for b in kept)
        self.bytes = sum(b.nbytes for b in kept)
        if self.end is not None:
            self.end = min(self.end, first - 1)


# -- the engine ----------------------------------------------------------------------------------------------------


def sync(
    source: Any,
    loader: Loader,
    table: TableRef,
    checkpoints: CheckpointStore,
    mode: Mode,
    options: SyncOptions | None = None,
    *,
    pipeline: str | None = None,
    fingerprint: str = "",
    run_id: str | None = None,
) -> SyncResult:
    """Sync ``source`` into ``table`` through ``loader``, checkpointing in ``checkpoints``; see the module doc.

    ``pipeline`` is the stable id the checkpoint is stored under (default: the destination table);
    ``fingerprint`` identifies the query and destination: a stored checkpoint with another fingerprint is
    refused. Transient failures on either side restart from the last checkpoint with backoff; terminal ones
    raise at once. Setting ``options.stop`` (or an exception such as Dagster's interrupt raised in this thread)
    stops the sync cleanly: the last complete flush is checkpointed and nothing is left past the checkpoint.

    >>> result = sync(AmpQuerySource(client, sql, stream=True), PostgresLoader(dsn), TableRef("logs", "eth"),
    ...               MemoryCheckpoints(), "stream", SyncOptions(until_block=15_001_000))  # doctest: +SKIP
    """
    if mode not in MODES:
        raise ConfigError(f"sync mode {mode!r} is not one of {', '.join(MODES)}")
    run = _Run(source, loader, table, checkpoints, mode, options or SyncOptions(),
               pipeline or f"{loader.store}/{table}", fingerprint, run_id or uuid.uuid4().hex)  # fmt: skip
    return run.run()


class _Run:
    def __init__(self, source, loader, table, store, mode, options, pipeline, fingerprint, run_id) -> None:
        self.source, self.loader, self.table, self.store = source, loader, table, store
        self.mode, self.options, self.pipeline, self.fingerprint, self.run_id = (
            mode, options, pipeline, fingerprint, run_id)  # fmt: skip
        self.column = table.range_column
        self.blockwise = isinstance(getattr(source, "range_column", None), str) and hasattr(source, "head")
        self.started = time.monotonic()
        self.committed: SyncState | None = None
        self.rows = self.bytes = self.flushes = self.reorgs = 0
        self.first_block: int | None = None
        self.last_block: int | None = None
        self.head: int | None = None
        self.last_timestamp: int | None = None
        self.stopped = "done"
        self.flush_rows = options.flush_rows or loader.capabilities.flush_rows
        self.deadline = None if options.seconds is None else self.started + options.seconds
        self.schema_known = False

    # -- orchestration ---------------------------------------------------------------------------------------

    def run(self) -> SyncResult:
        self._validate()
        key = live_key(self.pipeline)
        with self.store.lock(key, self.options.lock_wait):
            self.committed = load_state(self.store, self.pipeline)
            stored = "" if self.committed is None else self.committed.fingerprint
            if stored and self.fingerprint and stored != self.fingerprint:
                raise ConfigError(
                    f"pipeline {self.pipeline!r} changed (its query or destination) since its checkpoint was "
                    f"written ({self.committed.describe()}). Its rows no longer match what it would load: run "
                    f"`amp-dagster checkpoints reset {self.pipeline}` to start over (the next sync reloads "
                    "from the start), or restore the previous query and destination."
                )
            try:
                if self.mode == "incremental" and self.options.ranges:
                    self._each_span()
                else:
                    self._retrying(self._attempt)
            except _Stopped:  # asked to stop in the middle of a write: it aborted, nothing of it committed
                pass
        return self._result()

    def _validate(self) -> None:
        streaming = getattr(self.source, "stream", False)
        if self.mode != "stream" and streaming:
            raise ConfigError(f"a streaming source is read in stream mode, not {self.mode}: set mode: stream")
        if self.mode == "stream" and not streaming and getattr(self.source, "range_column", None) is None:
            raise ConfigError("stream mode needs a streaming amp query or a cursor source with a range column")
        if self.mode != "full_refresh" and getattr(self.source, "range_column", None) is None:
            raise ConfigError(
                f"{self.mode} mode needs a source with a position: an amp query, a Flight SQL query with "
                "range_column=..., or a cursor source with range_column=...; this one can only be read whole "
                "(mode: full_refresh)"
            )
        if self.options.ranges and (self.mode != "incremental" or not hasattr(self.source, "read")):
            raise ConfigError("explicit ranges are loaded in incremental mode")

    def _retrying(self, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` until it completes; a transient failure restarts it from the last checkpoint."""
        backoff = Backoff(self.options.retry, f"sync of {self.pipeline}")
        while True:
            done_before = self.flushes
            try:
                attempt()
                return
            except AmpDagsterError as exc:
                if self.flushes > done_before:
                    backoff.reset()  # it made progress before failing: the budget starts over
                if not exc.transient or self._should_stop() or not backoff.pause(exc):
                    raise
                log.warning("sync of %s restarts from its checkpoint after: %s", self.pipeline, exc)

    def _should_stop(self) -> bool:
        if self.options.stop is not None and self.options.stop.is_set():
            self.stopped = "stopped"
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped = "seconds"
            return True
        return False

    def _attempt(self) -> None:
        if self.mode == "full_refresh":
            self._full_refresh()
        elif self.mode == "incremental" and self.blockwise and not getattr(self.source, "stream", False):
            self._chunks()
        else:
            self._follow()

    # -- table and checkpoints ---------------------------------------------------------------------------------

    def _ensure(self, schema: pa.Schema | None) -> None:
        if schema is not None and not self.schema_known:
            self.loader.ensure_table(self.table, schema)
            self.schema_known = True

    def _source_schema(self) -> pa.Schema | None:
        schema = getattr(self.source, "schema", None)
        return schema() if callable(schema) else None

    def _checkpoint(self, key: str, state: SyncState) -> SyncState:
        pause = os.environ.get(_COMMIT_PAUSE)
        if pause:  # the kill tests wait for this line, then kill the process inside the pause
            print(f"amp-dagster: committed, checkpoint {key} pending", file=sys.stderr, flush=True)
            time.sleep(float(pause))
        state = replace(state, run_id=self.run_id, time=datetime.now(UTC).isoformat(timespec="seconds"),
                        fingerprint=self.fingerprint, pipeline=self.pipeline)  # fmt: skip
        self.store.put(key, state.to_json())
        return state

    def _commit_live(self, high: int | None, position: Position | None, rows: int, timestamp: int | None = None):
        before = self.committed.rows if self.committed else 0
        state = SyncState(self.pipeline, self.mode, high=high, position=position, rows=before + rows,
                          timestamp=timestamp)  # fmt: skip
        self.committed = self._checkpoint(live_key(self.pipeline), state)
        self.flushes += 1
        self._report()

    def _bounds(self, batch: pa.RecordBatch) -> tuple[int, int]:
        bounds = pc.min_max(batch.column(self.column))
        return bounds["min"].as_py(), bounds["max"].as_py()

    def _stats(self, batch: pa.RecordBatch) -> tuple[int, int, int, int]:
        low, high = self._bounds(batch)
        return batch.num_rows, batch.nbytes, low, high

    def _count(self, batch: pa.RecordBatch) -> None:
        """A committed batch, in the run's totals."""
        if batch.num_rows:
            self._counted([self._stats(batch)])

    def _counted(self, stats: list[tuple[int, int, int, int]]) -> int:
        """Committed batches' (rows, bytes, low, high) in the run's totals; returns their rows. Counted only once
        committed, so that a write that failed and was retried is not counted twice."""
        for rows, size, low, high in stats:
            self.first_block = low if self.first_block is None else min(self.first_block, low)
            self.last_block = high if self.last_block is None else max(self.last_block, high)
            self.rows += rows
            self.bytes += size
        return sum(s[0] for s in stats)

    def _report(self) -> None:
        if self.options.progress is None:
            return
        lag_seconds = None if self.last_timestamp is None else max(0.0, time.time() - self.last_timestamp)
        high = None if self.committed is None else self.committed.high
        blocks = 0 if self.first_block is None or self.last_block is None else self.last_block - self.first_block + 1
        self.options.progress(
            Progress(
                rows=self.rows, bytes=self.bytes, blocks=blocks, last_block=high, head=self.head,
                lag_blocks=None if self.head is None or high is None else max(0, self.head - high),
                lag_seconds=lag_seconds, elapsed=time.monotonic() - self.started, checkpoint=self.committed,
            )
        )  # fmt: skip

    def _result(self) -> SyncResult:
        return SyncResult(
            pipeline=self.pipeline, mode=self.mode, rows=self.rows, bytes=self.bytes, first_block=self.first_block,
            last_block=self.last_block, checkpoint=self.committed, duration=time.monotonic() - self.started,
            flushes=self.flushes, reorgs=self.reorgs, stopped=self.stopped,
        )  # fmt: skip

    # -- writing from the queue --------------------------------------------------------------------------------

    def _data_of_read(self, reader: Reader, seen: dict) -> Iterator[pa.RecordBatch]:
        """The Data batches of one read, up to its end; its last Checkpoint is kept in ``seen``, and its batches'
        figures in ``seen["counts"]`` until the write commits (:meth:`_counted`)."""
        while True:
            if self._should_stop():
                raise _Stopped()
            item = reader.pipe.get(0.5)
            if item is None:
                continue
            if item is END or item is READ_END:
                return
            if isinstance(item, Data):
                if item.batch.num_rows:
                    seen.setdefault("counts", []).append(self._stats(item.batch))
                    yield item.batch
            elif isinstance(item, Checkpoint):
                seen["checkpoint"] = item
            elif isinstance(item, Reorg | Rewind):
                raise TerminalError(f"a batch read reported {item}; only streams reorg")

    def _reader_of(self, reader: Reader, seen: dict) -> pa.RecordBatchReader:
        """The rows of one read as a RecordBatchReader; its schema is the first batch's, else the source's."""
        batches = self._data_of_read(reader, seen)
        first = next(batches, None)
        schema = first.schema if first is not None else self._source_schema()
        if schema is None:
            return pa.RecordBatchReader.from_batches(pa.schema([]), iter(()))

        def chained() -> Iterator[pa.RecordBatch]:
            if first is not None:
                yield first
            yield from batches

        return pa.RecordBatchReader.from_batches(schema, chained())

    def _read_into(self, reads: list[tuple[Position | None, RowRange | None]]) -> Reader:
        """A reader thread that performs ``reads`` in turn, each followed by ``READ_END``."""

        def produce(put, reader: Reader) -> None:
            for resume, rows in reads:
                events = self.source.read(resume, rows=rows) if rows is not None else self.source.read(resume)
                reader.current = events
                for event in events:
                    if not put(event, event_size(event)):
                        return
                if not put(READ_END, 0):
                    return

        return Reader(produce, self.options.queue_bytes)

    def _full_refresh(self) -> None:
        reader = self._read_into([(None, None)])
        seen: dict = {}
        try:
            data = self._reader_of(reader, seen)
            if not data.schema.names:
                raise TerminalError(f"{self.pipeline}: the source has no rows and no schema to create a table from")
            self.loader.replace_table(self.table, data)
        finally:
            reader.stop()
        rows, final = self._counted(seen.get("counts", [])), seen.get("checkpoint")
        self._commit_live(self.last_block, final.position if final else None, rows)

    def _chunks(self) -> None:
        """Incremental over an amp batch query: ``(checkpoint, head - finality]`` in chunks."""
        records = range_records(self.store, self.pipeline)
        high = effective_high(self.committed, records)
        head = self.source.head()
        if head is None:
            log.info("%s: amp reports no synced blocks yet; nothing to load", self.pipeline)
            return
        self.head = head.end
        end = head.end - self.options.finality
        if self.options.until_block is not None:
            end = min(end, self.options.until_block)
        start = head.start if high is None else high + 1
        if start > end:
            return
        loaded = merge_ranges(r for record in records for r in record.ranges)
        chunks = [RowRange(s, min(s + self.options.blocks_per_query - 1, end))
                  for s in range(start, end + 1, self.options.blocks_per_query)]  # fmt: skip
        todo = [c for c in chunks if not any(c.start >= r.start and r.end is not None and c.end <= r.end
                                             for r in loaded)]  # fmt: skip
        self._ensure(self._source_schema())
        reader = self._read_into([(None, c) for c in todo])
        try:
            for chunk in chunks:
                rows = 0
                if chunk in todo:
                    seen: dict = {}
                    self.loader.write(self.table, self._reader_of(reader, seen), replace=chunk)
                    rows = self._counted(seen.get("counts", []))
                reached = contiguous_end(start, [RowRange(start, chunk.end), *loaded])
                at_head = reached == head.end
                position = Watermark.at(head.network, head.end, head.hash) if at_head else None
                self._commit_live(reached, position, rows, head.timestamp if at_head else None)
        finally:
            reader.stop()

    def _each_span(self) -> None:
        """Explicit ranges: one query and one replace per contiguous span, each recorded under its own key."""
        spans = merge_ranges(self.options.ranges)
        if any(span.end is None for span in spans):
            raise ConfigError(f"explicit ranges must have an end: {', '.join(map(str, spans))}")
        head = self.source.head() if self.blockwise else None
        if head is not None:
            self.head = head.end
            final = head.end - self.options.finality
            if spans[-1].end > final:
                # a range recorded as loaded is never read again: one that is not final yet would stay incomplete
                raise TerminalError(
                    f"{self.pipeline}: blocks {RowRange(max(final + 1, spans[-1].start), spans[-1].end)} are not "
                    f"final yet (amp's head is {head.end}, finality {self.options.finality}); load them once amp "
                    "has synced them, e.g. when the incremental sensor adds their partition"
                )
        self._ensure(self._source_schema())
        for span in spans:
            key = range_key(self.pipeline, span)

            def load(span: RowRange = span, key: str = key) -> None:
                reader, seen = self._read_into([(None, span)]), {}
                try:
                    self.loader.write(self.table, self._reader_of(reader, seen), replace=span)
                finally:
                    reader.stop()
                state = SyncState(self.pipeline, self.mode, ranges=(span,), rows=self._counted(seen.get("counts", [])))
                self._checkpoint(key, state)
                self.flushes += 1
                self._report()

            with self.store.lock(key, self.options.lock_wait):
                self._retrying(load)
        self.committed = load_state(self.store, self.pipeline)

    # -- following a stream or a cursor --------------------------------------------------------------------------

    def _follow(self) -> None:
        """Stream mode, and incremental reads of cursor sources: trim to the checkpoint, resume, buffer, flush."""
        high = None if self.committed is None else self.committed.high
        position = None if self.committed is None else self.committed.position
        # rows past the checkpoint were written by a run that died before checkpointing them: delete them first
        clean_from = None
        if high is not None:
            self._delete(RowRange(high + 1))
            clean_from = high + 1
        self._ensure(self._source_schema())
        follow = _Follower(self, clean_from)
        polling = self.mode == "stream" and not getattr(self.source, "stream", False)
        reader = self._read_stream(position, polling)
        try:
            follow.consume(reader)
        except BaseException:
            reader.stop()
            follow.abandon()
            raise
        reader.stop()

    def _read_stream(self, position: Position | None, polling: bool) -> Reader:
        def produce(put, reader: Reader) -> None:
            resume = position
            while True:
                events = self.source.read(resume)
                reader.current = events
                for event in events:
                    if not put(event, event_size(event)):
                        return
                    if isinstance(event, Checkpoint) and event.position is not None:
                        resume = event.position
                if not polling:
                    return
                # a cursor source has caught up: poll again after a pause (the queue tells us when to stop)
                for _ in range(int(self.options.poll_seconds * 10) or 1):
                    if not put(None, 0):
                        return
                    time.sleep(0.1)

        return Reader(produce, self.options.queue_bytes)

    def _delete(self, rows: RowRange) -> None:
        self.loader.delete(self.table, rows)


class _Follower:
    """The writer side of stream mode: buffers segments, flushes them, checkpoints, rolls back on reorgs."""

    def __init__(self, sync: _Run, clean_from: int | None) -> None:
        self.sync = sync
        self.segments: list[_Segment] = []
        # every row at or past clean_from is absent from the destination (None: unknown, so replace to be sure)
        self.clean_from = clean_from
        # the incomplete segment already partly written by a spill
        self.partial: _Segment | None = None

    def consume(self, reader: Reader) -> None:
        sync = self.sync
        while True:
            if sync._should_stop():
                self._finish()
                return
            item = reader.pipe.get(0.25)
            if item is None:  # idle: completed segments that waited long enough are written now
                if self._complete() and self._waited() >= sync.options.flush_seconds:
                    self._flush()
                continue
            if item is END:
                self._finish()
                return
            if isinstance(item, Data):
                self._data(item)
            elif isinstance(item, Checkpoint):
                self._checkpoint(item)
                reached = self._reached()
                if reached or self._due(caught_up=reader.pipe.empty):
                    self._flush()
                if reached:
                    sync.stopped = "until"
                    self._finish()
                    return
            elif isinstance(item, Reorg):
                sync.reorgs += 1
                self._rollback(item.first_block, item.network, item.parent_hash)
            elif isinstance(item, Rewind):
                self._rollback(item.first_block, item.network, None)

    # -- buffering -------------------------------------------------------------------------------------------

    def _open(self) -> _Segment:
        if not self.segments or self.segments[-1].complete:
            self.segments.append(_Segment())
        return self.segments[-1]

    def _data(self, event: Data) -> None:
        sync, batch = self.sync, event.batch
        segment = self._open()
        if event.ranges:
            start, end = min(r.start for r in event.ranges), max(r.end for r in event.ranges)
            if segment.ranges and segment.ranges != event.ranges:
                raise TerminalError(f"a microbatch {event.ranges} began before {segment.ranges} completed")
            segment.ranges = event.ranges
            segment.start, segment.end = start, end
        if not batch.num_rows:
            return
        low, high = sync._bounds(batch)
        if event.ranges:
            if low < segment.start or high > segment.end:
                raise TerminalError(
                    f"{sync.pipeline}: rows with {sync.column} {low}..={high} arrived in the microbatch "
                    f"{segment.start}..={segment.end}; every row must lie inside its microbatch's range"
                )
        else:
            committed = None if sync.committed is None else sync.committed.high
            if committed is not None and low <= committed:
                raise TerminalError(
                    f"{sync.pipeline}: the source gave a row with {sync.column}={low}, at or below the last committed "
                    f"value {committed}. A cursor source's range column must grow with its cursor, or rows could "
                    "be loaded twice; pick an increasing column (an id, a sequence number)."
                )
        segment.add(batch, low, high)
        if sum(s.bytes for s in self.segments) >= sync.options.flush_bytes:
            self._flush(spill=True)

    def _checkpoint(self, event: Checkpoint) -> None:
        segment = self._open()
        if event.ranges and segment.start is None:
            segment.start = min(r.start for r in event.ranges)
            segment.end = max(r.end for r in event.ranges)
        segment.ranges = event.ranges or segment.ranges
        segment.position, segment.complete = event.position, True

    def _complete(self) -> list[_Segment]:
        done = []
        for segment in self.segments:
            if not segment.complete:
                break
            done.append(segment)
        return done

    def _waited(self) -> float:
        complete = self._complete()
        return time.monotonic() - complete[0].since if complete else 0.0

    def _due(self, caught_up: bool) -> bool:
        complete, options = self._complete(), self.sync.options
        if not complete:
            return False
        rows, size = sum(s.rows for s in complete), sum(s.bytes for s in complete)
        return (
            caught_up
            or rows >= self.sync.flush_rows
            or size >= options.flush_bytes
            or self._waited() >= options.flush_seconds
        )

    def _reached(self) -> bool:
        until = self.sync.options.until_block
        complete = self._complete()
        return until is not None and bool(complete) and complete[-1].end is not None and complete[-1].end >= until

    # -- writing ---------------------------------------------------------------------------------------------

    def _flush(self, spill: bool = False) -> None:
        sync = self.sync
        complete = self._complete()
        take = list(self.segments) if spill else complete
        if not take:
            return
        batches = [b for s in take for b in s.batches]
        starts = [s.start for s in take if s.start is not None]
        ends = [s.end for s in take if s.end is not None]
        if starts:
            first = starts[0]
            # append where the destination is known to be empty past this point, or to continue a microbatch
            # that a spill began; otherwise replace everything from the first block on (leftovers included)
            append = take[0] is self.partial or (self.clean_from is not None and first >= self.clean_from)
            if batches:
                data = pa.RecordBatchReader.from_batches(batches[0].schema, batches)
                sync._ensure(batches[0].schema)
                sync.loader.write(sync.table, data, replace=None if append else RowRange(first))
            elif not append:
                sync._delete(RowRange(first))
            self.clean_from = max(ends) + 1
        for batch in batches:
            sync._count(batch)
        written = sum(s.rows for s in take)
        for segment in take:
            segment.spilled += segment.rows
            segment.batches, segment.rows, segment.bytes = [], 0, 0
        self.partial = take[-1] if spill and not take[-1].complete else None
        if complete:
            last = complete[-1]
            high = last.end if last.end is not None else (None if sync.committed is None else sync.committed.high)
            if last.ranges and last.ranges[0].timestamp is not None:
                sync.last_timestamp = last.ranges[0].timestamp
            stamp = last.ranges[0].timestamp if last.ranges else None
            sync._commit_live(high, last.position, sum(s.spilled for s in complete), stamp)
            self.segments = self.segments[len(complete) :]
        elif written:
            sync._report()

    def _rollback(self, first: int, network: str, parent_hash: str | None) -> None:
        """Rows at or past ``first`` are void (a reorg, or a microbatch resent after a reconnect)."""
        sync = self.sync
        kept = []
        for segment in self.segments:
            if segment.start is not None and segment.start >= first:
                continue  # wholly void
            if segment.end is not None and segment.end >= first:
                segment.cut(first, sync.column)
                if segment.complete and parent_hash:
                    segment.position = Watermark.at(network, first - 1, parent_hash)
            kept.append(segment)
        self.segments = kept
        if self.partial is not None and self.partial not in kept:
            self.partial = None
        if self.clean_from is None or self.clean_from > first:
            sync._delete(RowRange(first))
            self.clean_from = first
        committed = sync.committed
        if parent_hash and committed is not None and committed.high is not None and committed.high >= first:
            # the stored checkpoint names a block that is no longer canonical: fall back to the fork's parent
            sync._commit_live(first - 1, Watermark.at(network, first - 1, parent_hash), 0)

    def _finish(self) -> None:
        """Write what completed, and leave nothing past the checkpoint."""
        self._flush()
        if self.partial is not None or any(s.spilled for s in self.segments):
            self._trim()
        self.segments, self.partial = [], None

    def _trim(self) -> None:
        committed = self.sync.committed
        starts = [s.start for s in self.segments if s.start is not None]
        first = committed.high + 1 if committed is not None and committed.high is not None else min(starts)
        self.sync._delete(RowRange(first))

    def abandon(self) -> None:
        """After a failure or an interrupt: best effort to leave nothing past the checkpoint (the next run
        trims anyway)."""
        if self.partial is not None or any(s.spilled for s in self.segments):
            with suppress(Exception):
                self._trim()
