"""Range replaces under SIGKILL and under a second writer, for the stores whose own tests do not cover it
(ClickHouse and Redis have store-specific versions with their lock takeover): a range always holds the old or
the new rows of one write, never a mix nor neither, and the table is writable again at once."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from amp_dagster.pipelines import parse_pipelines
from amp_dagster.ranges import RowRange

from .destinations import destination, require
from .stores import load

pytestmark = pytest.mark.slow

STORES = ["delta", "iceberg", "lmdb", "postgres"]
BLOCKS, RANGE = 600, RowRange(200, 399)  # the range replaced again and again, among rows that must not move
PER_BLOCK = 25


def rows(start: int, end: int, generation: int, writer: int = 0) -> pa.Table:
    blocks = [b for b in range(start, end + 1) for _ in range(PER_BLOCK)]
    return pa.table({
        "_block_num": pa.array(blocks, pa.uint64()),
        "i": pa.array([i % PER_BLOCK for i in range(len(blocks))], pa.int64()),
        "generation": pa.array([generation] * len(blocks), pa.int64()),
        "writer": pa.array([writer] * len(blocks), pa.int64()),
        "payload": pa.array([b"x" * 200] * len(blocks), pa.binary()),
    })  # fmt: skip


# A worker process: on start it reports what the range holds (one line), then replaces it with new generations,
# reporting each commit, until it is killed.
WORKER = """
import sys, json, time
sys.path.insert(0, {root!r})
import pyarrow.compute as pc
from amp_dagster.pipelines import parse_pipelines
from amp_dagster.ranges import RowRange
from amp_dagster_tests.test_loader_faults import rows, RANGE, PER_BLOCK
p = parse_pipelines({spec!r}).pipelines[0]
loader, table = p.destination.build(), p.table_ref()
got = loader.read(table).read_all()
block = got["_block_num"]
inside = got.filter(pc.and_(pc.greater_equal(block, RANGE.start), pc.less_equal(block, RANGE.end)))
outside = got.num_rows - inside.num_rows
print(json.dumps({{"generations": sorted(set(inside["generation"].to_pylist())), "inside": inside.num_rows,
                  "outside": outside}}), flush=True)
started = time.monotonic()
generation = {first}
while True:
    loader.write(table, rows(RANGE.start, RANGE.end, generation), replace=RANGE)
    print(json.dumps({{"committed": generation, "after": time.monotonic() - started}}), flush=True)
    generation += 1
"""


def _spec(name: str, harness) -> dict:
    return {"pipelines": [{"name": "faults", "source": {"sql": "SELECT 1"}, "table": "faults",
                           "namespace": harness.namespace,
                           "destination": destination(name, harness, own_process=True)}]}  # fmt: skip


def _kills(name: str, tmp_path: Path, kills: int, seed: int) -> list[str]:
    """Kill a replacing worker ``kills`` times; returns the problems seen (none expected)."""
    import json

    harness = load(name)(tmp_path)
    spec = _spec(name, harness)
    problems, rng = [], random.Random(seed)
    root = str(Path(__file__).resolve().parents[1])
    try:
        setup = parse_pipelines(spec).pipelines[0]
        loader = setup.destination.build()
        table = setup.table_ref()
        first = rows(0, BLOCKS - 1, 0)
        loader.ensure_table(table, first.schema)
        loader.write(table, first)
        loader.close()
        committed, generation = {0}, 1
        for _ in range(kills + 1):
            script = WORKER.format(root=root, spec=spec, first=generation)
            worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": root})  # fmt: skip
            state = json.loads(worker.stdout.readline() or "{}")
            if state.get("inside") != (RANGE.end - RANGE.start + 1) * PER_BLOCK or len(state["generations"]) != 1:
                problems.append(f"{name}: after a kill the range holds {state}")
            elif state["generations"][0] not in committed | {generation - 1}:
                problems.append(f"{name}: the range holds generation {state['generations']} never written")
            if state.get("outside") != (BLOCKS - (RANGE.end - RANGE.start + 1)) * PER_BLOCK:
                problems.append(f"{name}: rows outside the range changed: {state}")
            # the kill lands at a random moment: before the first commit, between commits, or inside one
            deadline = time.monotonic() + rng.uniform(0.05, 1.5)
            while time.monotonic() < deadline:
                line = worker.stdout.readline()
                if not line:
                    problems.append(f"{name}: the worker died on its own (writable again at once?)")
                    break
                done = json.loads(line)
                committed.add(done["committed"])
                if done["committed"] == generation and done["after"] > 20:
                    problems.append(f"{name}: the first write after a kill took {done['after']:.1f} s")
            worker.kill()
            worker.wait(30)
            generation += 1000  # each worker's generations are its own
    finally:
        harness.cleanup()
    return problems


@pytest.mark.timeout(900)
def test_range_replaces_killed_at_random_moments_leave_old_or_new_rows(tmp_path):
    for name in STORES:
        require(name)
    found: dict[str, list[str]] = {}
    threads = [threading.Thread(target=lambda n=n: found.setdefault(n, _kills(n, tmp_path / n, 20, seed=len(n))))
               for n in STORES]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert set(found) == set(STORES), f"a store's kill loop did not finish: {sorted(set(STORES) - set(found))}"
    assert not [p for problems in found.values() for p in problems], found


@pytest.mark.parametrize("name", STORES)
def test_two_writers_of_overlapping_ranges_leave_one_writers_rows_per_range(name, tmp_path):
    require(name)
    harness = load(name)(tmp_path)
    try:
        spec = parse_pipelines(_spec(name, harness)).pipelines[0]
        table = spec.table_ref()
        setup = spec.destination.build()
        setup.ensure_table(table, rows(0, 0, 0).schema)
        setup.close()
        errors: list[Exception] = []

        def write(writer: int) -> None:
            loader = spec.destination.build()  # each writer has its own connections
            try:
                for generation in range(8):
                    start = 100 * (generation % 3) + 50 * writer  # [0..149], [100..249], ... overlapping
                    for attempt in range(20):
                        try:
                            loader.write(table, rows(start, start + 149, generation, writer),
                                         replace=RowRange(start, start + 149))  # fmt: skip
                            break
                        except Exception as exc:  # a conflict with the other writer: transient, retried
                            if not getattr(exc, "transient", False) or attempt == 19:
                                raise
                            time.sleep(0.05)
            except Exception as exc:
                errors.append(exc)
            finally:
                loader.close()

        threads = [threading.Thread(target=write, args=(w,)) for w in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not errors, errors
        check = spec.destination.build()
        got = check.read(table).read_all()
        check.close()
        by_block: dict[int, set] = {}
        counts: dict[int, int] = {}
        for block, writer, generation in zip(got["_block_num"].to_pylist(), got["writer"].to_pylist(),
                                             got["generation"].to_pylist(), strict=True):  # fmt: skip
            by_block.setdefault(block, set()).add((writer, generation))
            counts[block] = counts.get(block, 0) + 1
        mixed = {b: v for b, v in by_block.items() if len(v) != 1}
        assert not mixed, f"blocks holding rows of two writes: {dict(list(mixed.items())[:5])}"
        assert set(counts.values()) == {PER_BLOCK}, "every block holds exactly one write's rows"
    finally:
        harness.cleanup()
