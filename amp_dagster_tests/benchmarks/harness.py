"""Side-by-side benchmark runner: interleaved rounds, untimed setup and checks, ratios against a reference."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

BENCH_DIR = Path(os.environ.get("AMP_BENCH_DIR", Path(__file__).resolve().parents[2] / ".bench"))


def _noop() -> None:
    return None


@dataclass
class Case:
    """One way of doing the job. ``run`` is timed; ``setup`` (before) and ``check`` (after) are not."""

    name: str
    run: Callable[[], object]
    setup: Callable[[], object] = _noop
    check: Callable[[], object] = _noop
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds (not the server's)


@dataclass
class Result:
    title: str
    rows: int
    cases: list[Case]

    def rate(self, case: Case, best: bool = False) -> float:
        t = min(case.seconds) if best else statistics.median(case.seconds)
        return self.rows / t if t else float("inf")

    def ratio(self, ours: str, reference: str) -> float:
        """Throughput of ``ours`` over ``reference`` (medians): > 1 means ours is faster."""
        by = {c.name: c for c in self.cases}
        return self.rate(by[ours]) / self.rate(by[reference])


def load_average() -> float:
    return os.getloadavg()[0]


def compare(title: str, rows: int, cases: list[Case], rounds: int = 3) -> Result:
    """Run the cases interleaved (A B C A B C ...), ``rounds`` times, and print a table of rows/s."""
    for _ in range(rounds):
        for case in cases:
            case.setup()
            start, cpu = time.perf_counter(), time.process_time()
            case.run()
            case.seconds.append(time.perf_counter() - start)
            case.cpu.append(time.process_time() - cpu)
            case.check()
    result = Result(title, rows, cases)
    print(f"\n## {title}  ({rows:,} rows, {rounds} rounds, load average {load_average():.2f})")
    print(f"{'case':<44} {'median rows/s':>14} {'best rows/s':>14} {'vs first':>9} {'client CPU s':>13}")
    for case in cases:
        print(
            f"{case.name:<44} {result.rate(case):>14,.0f} {result.rate(case, best=True):>14,.0f} "
            f"{result.rate(case) / result.rate(cases[0]):>8.2f}x {statistics.median(case.cpu):>13.2f}"
        )
    return result


def logs_table(rows: int) -> pa.Table:
    """At least ``rows`` rows of amp's logs schema (then cut to exactly ``rows``), cached as Arrow IPC on disk."""
    from amp_dagster.devserver.chain import Chain

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"logs_{rows}.arrow"
    if path.exists():
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    chain = Chain(seed=42, start_block=15_000_000, blocks=rows // 20 + 1000)
    view = chain.view()
    parts, have, block = [], 0, view.start_block
    while have < rows:
        part = view.tables(block, block + 999, ["logs"])["logs"]
        parts.append(part)
        have += part.num_rows
        block += 1000
    table = pa.concat_tables(parts).slice(0, rows).combine_chunks()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=65_536)
    return table


def batches(table: pa.Table, rows_per_batch: int = 65_536) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=rows_per_batch))
