"""Checkpoint state: what a sync stores after each commit, under which keys, and the small store protocol.

The sync engine (``sync.py``) reads and writes it through :class:`CheckpointStore`; ``checkpoints.py`` keeps it in
Dagster's run storage, :class:`MemoryCheckpoints` in memory. Nothing here imports Dagster.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from .errors import AmpDagsterError, TerminalError
from .flight.protocol import Cursor, Position, Watermark
from .ranges import RowRange, contiguous_end

KEY_PREFIX = "amp_dagster/checkpoint/"
STATE_VERSION = 1


class CheckpointStore(Protocol):
    """Where checkpoints live: small string values under string keys, one key per call.

    ``lock(key)`` is held by the one writer of a key for as long as it syncs (other writers wait up to
    ``wait`` seconds, then get a clear error); ``scan(prefix)`` lists the keys under a prefix (explicit range
    records). Implementations: :class:`MemoryCheckpoints` here, ``DagsterCheckpoints`` over run storage.
    """

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...

    def scan(self, prefix: str) -> dict[str, str]: ...

    def lock(self, key: str, wait: float) -> AbstractContextManager[None]: ...


class MemoryCheckpoints:
    """Checkpoints in this process's memory: for tests and one-off syncs that need no resume."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: str) -> str | None:
        return self.values.get(key)

    def put(self, key: str, value: str) -> None:
        self.values[key] = value

    def scan(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self.values.items() if k.startswith(prefix)}

    @contextmanager
    def lock(self, key: str, wait: float) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=wait):
            raise already_syncing(key, wait)
        try:
            yield
        finally:
            lock.release()


def already_syncing(key: str, wait: float, holder: str = "") -> TerminalError:
    pipeline = key.removeprefix(KEY_PREFIX)
    return TerminalError(
        f"pipeline {pipeline!r} is already being synced{' by ' + holder if holder else ''} (waited {wait:g} s for "
        "it). Two syncs of one pipeline never write at once: wait for the other to finish or stop it."
    )


def live_key(pipeline: str) -> str:
    return KEY_PREFIX + pipeline


def range_key(pipeline: str, rows: RowRange) -> str:
    return f"{KEY_PREFIX}{pipeline}/range/{rows.start:020d}-{rows.end:020d}"


@dataclass(frozen=True)
class SyncState:
    """What a checkpoint holds: small, versioned JSON.

    ``high`` is the highest range value committed with every value below it loaded too (the live checkpoint);
    ``position`` is where the source resumes (a watermark ``{network: {number, hash}}`` or a cursor). A range
    record (an explicit range loaded out of order) carries its ``ranges`` instead. ``fingerprint`` identifies the
    query and destination the data came from.
    """

    pipeline: str
    mode: str
    fingerprint: str = ""
    high: int | None = None
    position: Position | None = None
    rows: int = 0
    run_id: str | None = None
    time: str = ""
    ranges: tuple[RowRange, ...] = ()
    timestamp: int | None = None  # Unix seconds of block ``high``, when the source told

    def to_json(self) -> str:
        position: dict | None = None
        if isinstance(self.position, Watermark):
            position = {"watermark": json.loads(self.position.to_json())}
        elif isinstance(self.position, Cursor):
            position = {"cursor": self.position.value}
        return json.dumps(
            {
                "version": STATE_VERSION,
                "pipeline": self.pipeline,
                "mode": self.mode,
                "fingerprint": self.fingerprint,
                "high": self.high,
                "position": position,
                "ranges": [[r.start, r.end] for r in self.ranges],
                "rows": self.rows,
                "timestamp": self.timestamp,
                "run_id": self.run_id,
                "time": self.time,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> SyncState:
        try:
            obj = json.loads(text)
            if obj.get("version") != STATE_VERSION:
                raise ValueError(f"version {obj.get('version')!r}, expected {STATE_VERSION}")
            raw = obj.get("position") or {}
            position: Position | None = None
            if "watermark" in raw:
                position = Watermark.from_json(raw["watermark"])
            elif "cursor" in raw:
                position = Cursor(raw["cursor"])
            return cls(
                pipeline=obj["pipeline"],
                mode=obj["mode"],
                fingerprint=obj.get("fingerprint", ""),
                high=obj.get("high"),
                position=position,
                rows=int(obj.get("rows", 0)),
                run_id=obj.get("run_id"),
                time=obj.get("time", ""),
                ranges=tuple(RowRange(a, b) for a, b in obj.get("ranges", ())),
                timestamp=obj.get("timestamp"),
            )
        except (ValueError, KeyError, TypeError, AmpDagsterError) as exc:
            raise TerminalError(
                f"a stored checkpoint cannot be read ({exc}): {text[:200]!r}. Reset it with "
                "`amp-dagster checkpoints reset NAME` (the destination is then reloaded from the start)."
            ) from None

    def describe(self) -> str:
        """One line for people."""
        where = "nothing committed yet" if self.high is None else f"through {self.high}"
        if isinstance(self.position, Watermark):
            where += " " + ", ".join(f"({n} #{b.number} {b.hash[:12]}…)" for n, b in self.position.blocks.items())
        elif isinstance(self.position, Cursor):
            where += f" (cursor {self.position.to_json()[:60]})"
        return f"{self.pipeline} [{self.mode}] {where}, {self.rows:,} rows, {self.time or 'never'}"


def load_state(store: CheckpointStore, pipeline: str) -> SyncState | None:
    raw = store.get(live_key(pipeline))
    return None if raw is None else SyncState.from_json(raw)


def range_records(store: CheckpointStore, pipeline: str) -> list[SyncState]:
    return [SyncState.from_json(v) for _, v in sorted(store.scan(f"{KEY_PREFIX}{pipeline}/range/").items())]


def effective_high(state: SyncState | None, records: list[SyncState], start: int | None = None) -> int | None:
    """The live checkpoint with explicitly loaded ranges folded in: the highest contiguous loaded value. Without
    a live checkpoint, ranges count from ``start`` (the first block of the pipeline's partitions) when given."""
    high = None if state is None else state.high
    if high is None and start is None:
        return None
    first = start if high is None else high + 1
    reached = contiguous_end(first, [r for record in records for r in record.ranges])
    return None if reached < first and high is None else reached
