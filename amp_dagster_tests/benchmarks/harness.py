"""Side-by-side benchmark runner: interleaved rounds, untimed setup and checks, ratios printed beside their goals."""

from __future__ import annotations

import contextlib
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

BENCH_DIR = Path(os.environ.get("AMP_BENCH_DIR", Path(__file__).resolve().parents[2] / ".bench"))
MIN_ROUNDS = 3  # PERFORMANCE.md: at least 3 interleaved rounds (or fresh processes) per figure
QUIET_LOAD = 1.5  # PERFORMANCE.md: measure only below about this load average
MIN_SECONDS = 60  # P8: freshness over at least a minute of blocks
BACKFILL_PARTITIONS = 1000  # P11: the partitions of the single-run backfill
START_BLOCK, SEED = 15_000_000, 42  # the benchmarks' chain


def _noop() -> None:
    return None


@dataclass(frozen=True)
class Goal:
    """A goal of PERFORMANCE.md: the figure must be at least (or, ``at_most``, at most) ``target``; a ratio
    unless ``unit`` says otherwise (" s": seconds)."""

    id: str
    target: float
    at_most: bool = False
    unit: str = "x"

    def line(
        self, median: float, best: float | None = None, ratio: str = "", label: str = "", stat: str = "median"
    ) -> str:
        """The verdict, and on a second line (if given) what the figure divides by what."""
        met = median <= self.target if self.at_most else median >= self.target
        unit = self.unit
        best_text = f", best {best:.2f}{unit}" if best is not None else ""
        sign = "<=" if self.at_most else ">="
        verdict = f"{self.id}{label}: {median:.2f}{unit} {stat}{best_text}; goal {sign} {self.target:.2f}{unit}: "
        return verdict + ("meets it" if met else "MISSES it") + (f"\n    ({ratio})" if ratio else "")


GOALS = {
    "P1": Goal("P1", 1.0),
    "P2": Goal("P2", 1.0),
    "P3": Goal("P3", 0.9),
    "P4": Goal("P4", 0.9),
    "P5": Goal("P5", 0.9),
    "P6": Goal("P6", 0.9),
    "P7": Goal("P7", 1.15, at_most=True),
    "P8": Goal("P8", 0.5, at_most=True, unit=" s"),
    "P9": Goal("P9", 1.1, at_most=True),
    "P10": Goal("P10", 0.1, at_most=True, unit=" s"),
}


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

    def ratio(self, ours: str, reference: str, best: bool = False) -> float:
        """Throughput of ``ours`` over ``reference`` (medians, or best against best): > 1 means ours is faster."""
        by = {c.name: c for c in self.cases}
        return self.rate(by[ours], best) / self.rate(by[reference], best)

    def goal(self, goal: Goal, ours: str, reference: str, label: str = "") -> None:
        """Print the throughput ratio of ``ours`` to ``reference`` beside the goal."""
        ratio = f"rows/s of '{ours}' / rows/s of '{reference}'; best = fastest round of each; above 1: ours is faster"
        print(goal.line(self.ratio(ours, reference), self.ratio(ours, reference, best=True), ratio, label))


def load_average() -> float:
    return os.getloadavg()[0]


def rounds_note(rounds: int) -> None:
    if rounds < MIN_ROUNDS:
        print(f"note: {rounds} round(s) is a smoke run; figures need at least {MIN_ROUNDS}")


def compare(title: str, rows: int, cases: list[Case], rounds: int = MIN_ROUNDS) -> Result:
    """Run the cases interleaved (A B C A B C ...), ``rounds`` times, and print a table of rows/s."""
    load_before = load_average()
    for _ in range(rounds):
        for case in cases:
            case.setup()
            start, cpu = time.perf_counter(), time.process_time()
            case.run()
            case.seconds.append(time.perf_counter() - start)
            case.cpu.append(time.process_time() - cpu)
            case.check()
    result = Result(title, rows, cases)
    load = f"load average {load_before:.2f} before, {load_average():.2f} after"
    print(f"\n## {title}\n({rows:,} rows, {rounds} interleaved rounds, {load})")
    rounds_note(rounds)
    print(f"{'case':<52} {'median rows/s':>14} {'best rows/s':>14} {'vs first':>9} {'client CPU s':>13}")
    for case in cases:
        print(
            f"{case.name:<52} {result.rate(case):>14,.0f} {result.rate(case, best=True):>14,.0f} "
            f"{result.rate(case) / result.rate(cases[0]):>8.2f}x {statistics.median(case.cpu):>13.2f}"
        )
    return result


def default(cls: type, parameter: str):
    """The default of a constructor parameter: the setting a loader runs with unless told otherwise, read from its
    public signature so that the reference follows the loader when that default changes."""
    return inspect.signature(cls).parameters[parameter].default


def logs_table(rows: int) -> pa.Table:
    """Exactly ``rows`` rows of amp's logs schema in 65,536-row chunks, cached as Arrow IPC on disk and memory-mapped
    (the same chunking whether the cache was just written or already there)."""
    from amp_dagster.devserver.chain import Chain

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"logs_{rows}.arrow"
    if not path.exists():
        chain = Chain(seed=42, start_block=15_000_000, blocks=rows // 20 + 1000)
        view = chain.view()
        parts, have, block = [], 0, view.start_block
        while have < rows:
            part = view.tables(block, block + 999, ["logs"])["logs"]
            parts.append(part)
            have += part.num_rows
            block += 1000
        table = pa.concat_tables(parts).slice(0, rows).combine_chunks()
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # renamed into place: a killed run leaves no half file
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=65_536)
        partial.replace(path)
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def batches(table: pa.Table, rows_per_batch: int = 65_536) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=rows_per_batch))


def range_query(sql: str, start: int, end: int) -> str:
    """``sql`` restricted to blocks ``start..=end`` as AmpQuerySource restricts it: what a plain asset writes by hand
    to load the same rows."""
    return f'SELECT * FROM ({sql}) AS amp_source WHERE "_block_num" >= {start} AND "_block_num" <= {end}'


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Served:
    """A dev server running in its own process: its Flight URL and, if it serves one, its control API URL."""

    url: str
    admin: str | None


@contextlib.contextmanager
def devserver(blocks: int, *, admin: bool = False, command: Sequence[str] = ()) -> Iterator[Served]:
    """A dev server in its own process (as amp would be) over ``blocks`` blocks of the benchmarks' chain, standing
    still (no miner: a benchmark that wants new blocks asks for them). ``command`` runs another server module that
    takes the same options."""
    from ..services import closed_port

    port, admin_port = closed_port(), closed_port() if admin else -1
    argv = [*(command or (sys.executable, "-m", "amp_dagster.cli", "devserver")), "--port", str(port),
            "--admin-port", str(admin_port), "--blocks", str(blocks), "--block-time", "0",
            "--start-block", str(START_BLOCK), "--seed", str(SEED)]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:  # its log, read only if it fails to start (a pipe could fill up)
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            if not server.stdout.readline():  # it prints a line once it serves
                log.seek(0)
                raise RuntimeError(f"the dev server did not start ({' '.join(argv)}):\n{log.read()[-3000:]}")
            yield Served(f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}" if admin else None)
        finally:
            server.terminate()
            server.wait(timeout=30)
