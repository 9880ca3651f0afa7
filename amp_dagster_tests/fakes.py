"""Test doubles for engine tests that run in milliseconds: an in-memory loader that passes the loader contract
suite, and a scripted source that plays data, checkpoints, reorgs, rewinds, errors and pauses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.errors import TransientError
from amp_dagster.flight.protocol import (
    ZERO_HASH,
    BlockRange,
    Checkpoint,
    Cursor,
    Data,
    Event,
    Position,
    Reorg,
    Rewind,
    Watermark,
)
from amp_dagster.loaders.base import ArrowData, Capabilities, Feed, Loader, TableRef, WriteResult, missing_table
from amp_dagster.loaders.batches import checked_batches, key_columns, last_per_key
from amp_dagster.loaders.schema import cast_columns, check_schema, require_columns
from amp_dagster.ranges import BLOCK_NUM, RowRange

# -- an in-memory loader ------------------------------------------------------------------------------------


class MemoryLoader(Loader):
    """Tables as Arrow tables in a dict; every write is atomic (swapped in under a lock when it completes).

    ``fail_writes`` makes the next N writes raise after consuming their input (as a store that lost its
    connection at commit); ``write_delay`` slows each write down, for tests of overlap and stop requests.
    """

    store = "memory"
    capabilities = Capabilities(
        atomic_replace_range=True, atomic_replace_table=True, upsert=True, add_columns=True, flush_rows=1_000
    )

    def __init__(self) -> None:
        self.tables: dict[tuple[str | None, str], pa.Table] = {}
        self.range_types: dict[tuple[str | None, str], pa.DataType] = {}
        self.writes: list[tuple[str, RowRange | None, int]] = []  # (operation, range, rows) per call
        self.fail_writes = 0
        self.write_delay = 0.0
        self._lock = threading.Lock()

    def _key(self, table: TableRef) -> tuple[str | None, str]:
        return (table.namespace, table.name)

    def _get(self, table: TableRef) -> pa.Table:
        have = self.tables.get(self._key(table))
        if have is None:
            raise missing_table(self.store, "in memory", table)
        return have

    def ensure_table(self, table: TableRef, schema: pa.Schema) -> None:
        require_columns(schema, table, self.store)
        with self._lock:
            have = self.tables.get(self._key(table))
            if have is None:
                self.tables[self._key(table)] = schema.empty_table()
                return
            added = check_schema(self.store, table, have.schema, schema, can_add=True)
            for name in added:
                field_ = schema.field(name)
                have = have.append_column(field_, pa.nulls(have.num_rows, field_.type))
            self.tables[self._key(table)] = have

    def _collect(self, table: TableRef, checked: tuple, target: pa.Schema) -> pa.Table:
        schema, batches = checked
        check_schema(self.store, table, target, schema, can_add=False)
        feed = Feed(batches)
        with self._translating(table, "write", feed=feed):
            cast = [cast_columns(b, target, store=self.store, table=table) for b in feed]
        if self.write_delay:
            time.sleep(self.write_delay)
        if self.fail_writes:
            self.fail_writes -= 1
            raise TransientError(f"memory table {table}: the write failed at commit (injected)")
        return pa.Table.from_batches(cast, target)

    def _inside(self, have: pa.Table, table: TableRef, rows: RowRange):
        rows.check(table.range_column, have.schema.field(table.range_column).type, f"{self.store} table {table}")
        column = have.column(table.range_column)
        inside = pc.greater_equal(column, pa.scalar(rows.start, column.type))
        if rows.end is not None:
            inside = pc.and_(inside, pc.less_equal(column, pa.scalar(rows.end, column.type)))
        return inside

    def _keep(self, have: pa.Table, table: TableRef, rows: RowRange) -> pa.Table:
        return have.filter(pc.invert(self._inside(have, table, rows)))

    def write(self, table: TableRef, data: ArrowData, *, replace: RowRange | None = None) -> WriteResult:
        checked = checked_batches(data, table, self.store, replace)
        new = self._collect(table, checked, self._get(table).schema)
        with self._lock:
            have = self._get(table)
            if replace is not None:
                have = self._keep(have, table, replace)
            self.tables[self._key(table)] = pa.concat_tables([have, new])
            self.writes.append(("write", replace, new.num_rows))
        return WriteResult(rows=new.num_rows, bytes=new.nbytes, commits=1)

    def delete(self, table: TableRef, rows: RowRange) -> int:
        with self._lock:
            have = self.tables.get(self._key(table))
            if have is None:
                return 0
            kept = self._keep(have, table, rows)
            self.tables[self._key(table)] = kept
            self.writes.append(("delete", rows, have.num_rows - kept.num_rows))
            return have.num_rows - kept.num_rows

    def replace_table(self, table: TableRef, data: ArrowData) -> WriteResult:
        checked = checked_batches(data, table, self.store)
        new = self._collect(table, checked, checked[0])
        with self._lock:
            self.tables[self._key(table)] = new
            self.writes.append(("replace_table", None, new.num_rows))
        return WriteResult(rows=new.num_rows, bytes=new.nbytes, commits=1)

    def upsert(self, table: TableRef, data: ArrowData) -> WriteResult:
        key = list(key_columns(table, self.store))
        checked = checked_batches(data, table, self.store)
        new = last_per_key(self._collect(table, checked, self._get(table).schema), key)
        with self._lock:
            have = self._get(table)
            kept = have.join(new.select(key), key, join_type="left anti") if have.num_rows else have
            self.tables[self._key(table)] = pa.concat_tables([kept.select(have.schema.names).cast(have.schema), new])
            self.writes.append(("upsert", None, new.num_rows))
        return WriteResult(rows=new.num_rows, bytes=new.nbytes, commits=1)

    def read(self, table: TableRef, rows: RowRange | None = None) -> pa.RecordBatchReader:
        have = self._get(table)
        return (have if rows is None else have.filter(self._inside(have, table, rows))).to_reader()

    def rows(self, table: TableRef) -> pa.Table:
        """Every row of the table, for assertions."""
        return self._get(table)


# -- a scripted source ----------------------------------------------------------------------------------------


NETWORK = "testnet"


def block_hash(number: int, fork: int = 0) -> str:
    return f"0x{fork:032x}{number:032x}"


@dataclass
class Chain:
    """A tiny chain for scripts: block ``n`` on fork ``f`` has a known hash; rows carry block and fork."""

    forks: dict[int, int] = field(default_factory=dict)  # block -> fork it is on now

    def hash(self, number: int) -> str:
        return ZERO_HASH if number < 0 else block_hash(number, self.forks.get(number, 0))

    def range(self, start: int, end: int) -> BlockRange:
        parent = ZERO_HASH if start == 0 else self.hash(start - 1)
        return BlockRange(NETWORK, start, end, self.hash(end), parent)

    def rows(self, start: int, end: int, per_block: int = 2) -> pa.RecordBatch:
        blocks = np.repeat(np.arange(start, end + 1, dtype=np.uint64), per_block)
        forks = np.array([self.forks.get(int(b), 0) for b in blocks], dtype=np.int64)
        return pa.RecordBatch.from_arrays(
            [pa.array(blocks), pa.array(np.tile(np.arange(per_block, dtype=np.int64), end - start + 1)),
             pa.array(forks)],
            names=[BLOCK_NUM, "i", "fork"],
        )  # fmt: skip


SCHEMA = pa.schema([(BLOCK_NUM, pa.uint64(), False), ("i", pa.int64(), False), ("fork", pa.int64(), False)])


class ScriptedSource:
    """Plays a script of steps as a streaming source: microbatches, reorgs, rewinds, errors and pauses.

    Steps (tuples): ``("batch", start, end)`` a microbatch of the current chain (its rows, then a checkpoint);
    ``("partial", start, end, rows)`` only the first rows of a microbatch (a cut stream follows);
    ``("reorg", first, end)`` the chain forks at ``first`` (a new fork for ``first..end``) and a microbatch
    ``first..end`` follows; ``("rewind", first)``; ``("error", exc)``; ``("sleep", s)``; ``("wait",)`` waits until
    closed (an idle stream). ``reads`` records the resume positions each read started from.
    """

    range_column = BLOCK_NUM
    stream = True

    def __init__(self, *steps: tuple, per_block: int = 2) -> None:
        self.steps, self.per_block = list(steps), per_block
        self.chain = Chain()
        self.reads: list[Position | None] = []
        self._closed = threading.Event()

    def schema(self) -> pa.Schema:
        return SCHEMA

    def read(self, resume: Position | None = None, *, rows: RowRange | None = None) -> Iterator[Event]:
        self.reads.append(resume)
        return _Play(self)

    def close(self) -> None:
        self._closed.set()


class _Play:
    def __init__(self, source: ScriptedSource) -> None:
        self.source = source
        self._it = self._events()

    def __iter__(self):
        return self

    def __next__(self) -> Event:
        return next(self._it)

    def close(self) -> None:
        self.source._closed.set()

    def _events(self) -> Iterator[Event]:
        s, chain, fork = self.source, self.source.chain, 0
        while s.steps:
            step = s.steps.pop(0)
            kind = step[0]
            if kind in ("batch", "reorg"):
                start, end = step[1], step[2]
                if kind == "reorg":
                    fork = max(chain.forks.values(), default=0) + 1
                    for b in range(start, end + 1):
                        chain.forks[b] = fork
                    yield Reorg(NETWORK, start, end, chain.hash(start - 1))
                r = chain.range(start, end)
                yield Data(chain.rows(start, end, s.per_block), (r,))
                yield Checkpoint(Watermark.from_ranges([r]), (r,))
            elif kind == "partial":
                start, end, count = step[1], step[2], step[3]
                yield Data(chain.rows(start, end, s.per_block).slice(0, count), (chain.range(start, end),))
            elif kind == "rewind":
                yield Rewind(NETWORK, step[1], reason="scripted")
            elif kind == "error":
                raise step[1]
            elif kind == "sleep":
                time.sleep(step[1])
            elif kind == "wait":
                s._closed.wait()
                return


class PagedSource:
    """A cursor source over integer ids: ``pages`` pages of ``size`` rows after the resumed cursor."""

    def __init__(self, pages: int, size: int = 3) -> None:
        self.range_column, self.pages, self.size = "id", pages, size

    def schema(self) -> pa.Schema:
        return pa.schema([("id", pa.int64(), False), ("v", pa.string())])

    def read(self, resume: Position | None = None, *, rows: RowRange | None = None) -> Iterator[Event]:
        after = 0 if resume is None else resume.value
        for page in range(self.pages):
            first = after + page * self.size + 1
            ids = list(range(first, first + self.size))
            batch = pa.RecordBatch.from_pydict({"id": ids, "v": [f"v{i}" for i in ids]}, schema=self.schema())
            yield Data(batch, cursor=Cursor(ids[-1]))
            yield Checkpoint(Cursor(ids[-1]))


class ReplayingSource(ScriptedSource):
    """A stream that always starts after the resumed watermark, as amp does: microbatches of ``size`` blocks up
    to ``end``, then it ends (or waits, with ``wait=True``)."""

    def __init__(self, end: int, size: int = 10, per_block: int = 2, wait: bool = False) -> None:
        super().__init__(per_block=per_block)
        self.end, self.size, self.wait = end, size, wait

    def read(self, resume: Position | None = None, *, rows: RowRange | None = None) -> Iterator[Event]:
        self.reads.append(resume)
        start = 0 if resume is None else resume.blocks[NETWORK].number + 1
        self.steps = [("batch", b, min(b + self.size - 1, self.end)) for b in range(start, self.end + 1, self.size)]
        if self.wait:
            self.steps.append(("wait",))
        return _Play(self)


class BatchChain:
    """A block-keyed batch source with a head, like an amp batch query: ``read(rows=...)`` gives the rows of the
    chain's blocks in that range (``delay`` seconds per batch of ``per_batch`` blocks) and a final checkpoint.
    ``reads`` records each range read."""

    range_column = BLOCK_NUM
    stream = False

    def __init__(self, end: int, per_block: int = 2, per_batch: int = 10, delay: float = 0.0) -> None:
        self.chain, self.end, self.per_block, self.per_batch, self.delay = Chain(), end, per_block, per_batch, delay
        self.reads: list[RowRange | None] = []

    def schema(self) -> pa.Schema:
        return SCHEMA

    def head(self) -> BlockRange:
        return self.chain.range(0, self.end)

    def read(self, resume: Position | None = None, *, rows: RowRange | None = None) -> Iterator[Event]:
        self.reads.append(rows)
        first, last = (0, self.end) if rows is None else (rows.start, min(rows.end, self.end))
        for start in range(first, last + 1, self.per_batch):
            time.sleep(self.delay)
            yield Data(self.chain.rows(start, min(start + self.per_batch - 1, last), self.per_block))
        yield Checkpoint(Watermark.from_ranges([self.head()]), (self.head(),))
