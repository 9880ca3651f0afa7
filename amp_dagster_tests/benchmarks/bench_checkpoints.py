"""The cost of a checkpoint: DagsterCheckpoints put and get on a SQLite instance and on a PostgreSQL-backed one.

Every flush of the sync engine ends with one ``put`` of its live checkpoint (the same key, overwritten); every span
of an explicit range load adds a record under a new key; a sync starts with a ``get``. This times each operation
one call at a time, as the engine makes them, with a real checkpoint value (a stream's SyncState with a watermark,
about 400 bytes), ``rounds`` x 100 calls of each per instance, interleaved (one of each operation on one instance,
then on the other, and again). The SQLite instance is Dagster's default (a file under the instance directory); the
PostgreSQL one is dagster-postgres in a database of its own on the local server. The first calls, which open the
connections, are not timed. Checked: ``get`` returns what the last ``put`` wrote, and every range record is there.
PERFORMANCE.md sets no goal for it; issue 7 asks for the figure.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path

from amp_dagster.checkpoints import DagsterCheckpoints
from amp_dagster.flight.protocol import Watermark
from amp_dagster.ranges import RowRange
from amp_dagster.state import KEY_PREFIX, SyncState, live_key, range_key

from ..instances import postgres_instance, sqlite_instance
from .harness import START_BLOCK, load_average, percentile, rounds_note

CALLS_PER_ROUND = 100
WARMUP = 5
OPERATIONS = ("put, live key (overwritten)", "put, new key (range record)", "get, live key")


def value(i: int, pipeline: str) -> str:
    """The checkpoint a stream stores after its ``i``-th flush."""
    block = START_BLOCK + i
    position = Watermark.at("mainnet", block, bytes([i % 256]) * 32)
    state = SyncState(pipeline, "stream", fingerprint="5f0c6b1e2d3a4f58", high=block, position=position,
                      rows=26 * (i + 1), run_id=uuid.uuid4().hex, time="2026-01-01T00:00:00+00:00",
                      timestamp=1_700_000_000 + 12 * i)  # fmt: skip
    return state.to_json()


def main(rows: int, rounds: int) -> None:
    """``rows`` does not apply; ``rounds`` x 100 calls of each operation on each instance."""
    calls = rounds * CALLS_PER_ROUND
    pipeline = f"bench_checkpoints_{uuid.uuid4().hex[:8]}"
    load_before = load_average()
    with (
        tempfile.TemporaryDirectory() as home,
        sqlite_instance(Path(home) / "sqlite") as sqlite,
        postgres_instance(Path(home) / "postgres") as postgres,
    ):
        stores = {"SQLite": DagsterCheckpoints(sqlite), "PostgreSQL": DagsterCheckpoints(postgres)}
        seconds: dict[tuple[str, str], list[float]] = {(s, op): [] for s in stores for op in OPERATIONS}
        for i in range(WARMUP + calls):
            for name, store in stores.items():
                written = value(i, pipeline)
                span = RowRange(START_BLOCK + 10 * i, START_BLOCK + 10 * i + 9)
                steps = (
                    lambda store=store, written=written: store.put(live_key(pipeline), written),
                    lambda store=store, written=written, span=span: store.put(range_key(pipeline, span), written),
                    lambda store=store: store.get(live_key(pipeline)),
                )
                for operation, step in zip(OPERATIONS, steps, strict=True):
                    start = time.perf_counter()
                    got = step()
                    if i >= WARMUP:
                        seconds[name, operation].append(time.perf_counter() - start)
                if got != written:
                    raise AssertionError(f"{name}: get returned {got!r}, not the value just put {written!r}")
        for name, store in stores.items():
            records = store.scan(f"{KEY_PREFIX}{pipeline}/range/")
            if len(records) != WARMUP + calls:
                raise AssertionError(f"{name}: {len(records)} range records, not the {WARMUP + calls} put")
    print(
        f"\n## Checkpoint store: DagsterCheckpoints over Dagster's run storage, {calls:,} calls of each operation per "
        f"instance, interleaved\n(load average {load_before:.2f} before, {load_average():.2f} after; milliseconds)"
    )
    rounds_note(rounds)
    print(f"{'instance':<11} {'operation':<30} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for (name, operation), times in seconds.items():
        ms = [t * 1000 for t in times]
        print(f"{name:<11} {operation:<30} {statistics.median(ms):>10.2f} {percentile(ms, 95):>8.2f} {max(ms):>8.2f}")
    print("no goal: PERFORMANCE.md sets none for a checkpoint write; each flush of the engine pays one put")
