"""P9: peak memory of streaming 5 times more rows (5M vs 1M by default) into each loader and through the sync engine.

Each (loader, size) runs in a fresh process, ``rounds`` times (at least 3 for a figure), interleaved: the process
generates amp logs chunk by chunk and hands the loader a lazy RecordBatchReader, so nothing but the loader can hold
the rows. It reports, for the write alone:

- peak RSS (the kernel's VmHWM): everything resident, which is what the goal (<= 1.1x) is about;
- peak anonymous memory (RssAnon, sampled every 5 ms): heap and other private memory, what the loader holds;
- peak file-backed memory (RssFile + RssShmem, sampled): resident pages of files the process maps (shared
  libraries, and LMDB's data file; RssShmem counts them instead when the file lies on tmpfs).

The table gives the median of each over the processes, and the ratio of the medians at 5x to those at 1x. After the
write the child reads the table back through the loader and checks the row count and the sum of ``log_index``.

The ``engine`` rows are the sync engine's whole path in one process: a dev server (in its own process, as amp would
be) serves the fewest whole blocks that hold ``rows`` rows, and ``sync`` reads them with AmpClient and writes them
through the PostgreSQL loader, checked against the chain the server serves. ``engine`` is stream mode until the
chain head (microbatches of 1,000 blocks, buffered up to the flush thresholds: the loader's 100,000 rows or 64 MiB);
``engine-incr`` is incremental mode (batch queries of 100,000 blocks, each streamed from the reader thread straight
into one COPY). Both hold at most the reader's queue (128 MiB of Arrow) and, in stream mode, one flush's worth of
rows, whatever the size of the result: at 1M rows (about 400 MB of Arrow) both bounds are already reached, so the
5x figure shows whether anything else grows with the rows.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.devserver.chain import Chain
from amp_dagster.devserver.schemas import LOGS
from amp_dagster.loaders.base import Loader, TableRef

from ..services import POSTGRES_DSN, REDIS_URL
from .harness import GOALS, SEED, START_BLOCK, devserver, load_average, rounds_note

ENGINES = {"engine": "stream", "engine-incr": "incremental"}  # the sync engine's rows and their modes
STORES = ("postgres", "redis", "clickhouse", "delta", "iceberg", "lmdb", *ENGINES)
FACTOR = 5
REDIS_BENCH_DB = 15
FIELDS = ("VmHWM", "RssAnon", "RssFile", "RssShmem")
LMDB_NOTE = """\
What LMDB's RSS counts: LMDB memory-maps its data file (data.mdb) and, with writemap=True (the loader's default),
writes rows straight into that mapping. Every page of the file the process has touched is resident in the page
cache and counted in the process's RSS as file-backed memory (the "file" columns), not as anonymous memory: it is
not heap, the loader does not hold it, and the kernel writes it back and drops it when memory is needed. So LMDB's
RSS grows with the size of the database it writes; its anonymous memory is what the loader itself holds."""


class _Peaks:
    """Samples RssAnon and RssFile in a thread: the kernel keeps a high-water mark for the total RSS only."""

    def __init__(self) -> None:
        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._take()

    def _take(self) -> None:
        status = _status()
        self.anon = max(self.anon, status["RssAnon"])
        self.file = max(self.file, status["RssFile"] + status.get("RssShmem", 0.0))

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        self._take()
        return self.anon, self.file


def _status() -> dict[str, float]:
    """Memory figures of this process, in MB."""
    with open("/proc/self/status") as status:
        found = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in status) if k in FIELDS}
    return found


def lazy_logs(rows: int, sums: list[int]) -> pa.RecordBatchReader:
    """``rows`` logs rows generated 500 blocks at a time while the reader is consumed; adds up ``log_index``
    in ``sums`` as it goes."""

    def batches() -> Iterator[pa.RecordBatch]:
        view = Chain(seed=SEED, start_block=START_BLOCK, blocks=rows // 20 + 1000).view()
        left, block = rows, view.start_block
        while left > 0:
            part = view.tables(block, block + 499, ["logs"])["logs"].slice(0, left)
            left -= part.num_rows
            block += 500
            sums.append(pc.sum(part["log_index"].cast(pa.int64())).as_py() or 0)
            yield from part.to_batches(max_chunksize=65_536)

    return pa.RecordBatchReader.from_batches(LOGS, batches())


def _loader(store: str, workdir: str, tag: str) -> Loader:
    if store == "postgres" or store in ENGINES:
        from amp_dagster.loaders.postgres import PostgresLoader

        return PostgresLoader(POSTGRES_DSN)
    if store == "redis":
        from amp_dagster.loaders.redis import RedisLoader

        return RedisLoader(_redis_url(), prefix=tag)
    if store == "clickhouse":
        from amp_dagster.loaders.clickhouse import ClickHouseLoader

        return ClickHouseLoader(f"chdb://{workdir}/chdb")
    if store == "delta":
        from amp_dagster.loaders.delta import DeltaLoader

        return DeltaLoader(f"{workdir}/delta")
    if store == "iceberg":
        from amp_dagster.loaders.iceberg import IcebergLoader

        return IcebergLoader(f"{workdir}/iceberg")
    from amp_dagster.loaders.lmdb import LmdbLoader

    return LmdbLoader(f"{workdir}/lmdb")


def _redis_url() -> str:
    return REDIS_URL.rsplit("/", 1)[0] + f"/{REDIS_BENCH_DB}"


def child(store: str, rows: int, blocks: int) -> None:
    """Run in a fresh process: write ``rows`` rows (the engine: ``blocks`` blocks), print the peaks in MB (RSS
    before, RSS, anon, file), check."""
    workdir = tempfile.mkdtemp(prefix="amp_bench_mem_")
    tag = f"amp_bench_mem_{os.getpid()}"  # the shared services see only this run's schema and keys
    table = TableRef("logs_mem", namespace=tag)
    try:
        with _loader(store, workdir, tag) as loader, contextlib.ExitStack() as stack:
            if store in ENGINES:
                url, head = stack.enter_context(devserver(blocks)).url, START_BLOCK + blocks - 1
                work = functools.partial(_sync, ENGINES[store], loader, table, url, head, tag)
                expected = functools.partial(_chain_sums, blocks)
            else:
                loader.ensure_table(table, LOGS)
                sums: list[int] = []
                work = lambda: loader.write(table, lazy_logs(rows, sums)).rows  # noqa: E731
                expected = lambda: (rows, sum(sums))  # noqa: E731
            before = _status()["VmHWM"]
            peaks = _Peaks()
            written = work()
            anon, file = peaks.stop()
            rss = _status()["VmHWM"]
            stored = total = 0
            for batch in loader.read(table):
                stored += batch.num_rows
                total += pc.sum(batch["log_index"].cast(pa.int64())).as_py() or 0
            want_rows, want_sum = expected()
            got, want = (written, stored, total), (want_rows, want_rows, want_sum)
            assert got == want, f"{store}: wrote, stored, sum of log_index {got} != {want}"
            print(f"{before:.1f} {rss:.1f} {anon:.1f} {file:.1f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _cleanup(store, tag)


def _sync(mode: str, loader: Loader, table: TableRef, url: str, head: int, tag: str) -> int:
    """The sync engine from the dev server into ``loader`` up to the chain head, in ``mode``; the rows written."""
    from amp_dagster.flight.client import AmpClient
    from amp_dagster.sources import AmpQuerySource
    from amp_dagster.state import MemoryCheckpoints
    from amp_dagster.sync import SyncOptions, sync

    stream = mode == "stream"
    sql = "SELECT * FROM eth_rpc.logs" + (" SETTINGS stream = true" if stream else "")
    with AmpClient(url) as client:
        source = AmpQuerySource(client, sql, stream=stream)
        options = SyncOptions(until_block=head)
        return sync(source, loader, table, MemoryCheckpoints(), mode, options, pipeline=tag).rows


def blocks_for(rows: int) -> int:
    """The fewest blocks from the start of the bench's chain that hold at least ``rows`` logs rows."""
    view = Chain(seed=SEED, start_block=START_BLOCK, blocks=rows // 20 + 1000).view()
    have, first = 0, START_BLOCK
    while True:
        numbers = view.tables(first, first + 499, ["logs"])["logs"]["_block_num"]
        if have + len(numbers) >= rows:
            return numbers[rows - have - 1].as_py() - START_BLOCK + 1
        have, first = have + len(numbers), first + 500


def _chain_sums(blocks: int) -> tuple[int, int]:
    """Rows and the sum of ``log_index`` of the chain's first ``blocks`` blocks, 500 blocks at a time."""
    view = Chain(seed=SEED, start_block=START_BLOCK, blocks=blocks).view()
    rows = total = 0
    for first in range(START_BLOCK, START_BLOCK + blocks, 500):
        part = view.tables(first, min(first + 499, START_BLOCK + blocks - 1), ["logs"])["logs"]
        rows += part.num_rows
        total += pc.sum(part["log_index"].cast(pa.int64())).as_py() or 0
    return rows, total


def _cleanup(store: str, tag: str) -> None:
    if store == "postgres" or store in ENGINES:
        import psycopg
        from psycopg import sql

        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tag)))
    elif store == "redis":
        import redis

        client, page = redis.Redis.from_url(_redis_url()), []
        for key in client.scan_iter(match=f"{tag}*", count=10_000):
            page.append(key)
            if len(page) == 10_000:
                client.unlink(*page)
                page = []
        if page:
            client.unlink(*page)


def main(rows: int, rounds: int) -> None:
    small, large = rows, rows * FACTOR
    print(
        f"\n## P9 peak memory streaming {large:,} vs {small:,} logs rows into each loader, and through the engine\n"
        f"({rounds} fresh process(es) per loader and size, interleaved; load average {load_average():.2f} before)"
    )
    rounds_note(rounds)
    runs: dict[tuple[str, int], list[tuple[float, ...]]] = {}
    blocks = {n: blocks_for(n) for n in (small, large)}
    for _ in range(rounds):
        for store in STORES:
            for n in (small, large):
                runs.setdefault((store, n), []).append(_run(store, n, blocks[n]))
    print(f"load average {load_average():.2f} after; MB, medians; ratio = median at {FACTOR}x / median at 1x")
    print(
        f"{'loader':<11} {'RSS before':>10} {'peak RSS':>9} {f'RSS {FACTOR}x':>9} {'ratio':>6}   "
        f"{'anon':>7} {f'anon {FACTOR}x':>8} {'ratio':>6}   {'file':>6} {f'file {FACTOR}x':>8}"
    )
    verdicts = []
    for store in STORES:
        s, big = (_medians(runs[store, n]) for n in (small, large))
        print(
            f"{store:<11} {s[0]:>10,.0f} {s[1]:>9,.0f} {big[1]:>9,.0f} {big[1] / s[1]:>5.2f}x   "
            f"{s[2]:>7,.0f} {big[2]:>8,.0f} {big[2] / s[2]:>5.2f}x   {s[3]:>6,.0f} {big[3]:>8,.0f}"
        )
        verdicts.append((store, big[1] / s[1]))
    print(f"P9 ratio: median peak RSS at {large:,} rows / median peak RSS at {small:,} rows, per loader")
    for store, value in verdicts:
        print(GOALS["P9"].line(value, label=f" {store}"))
    print(LMDB_NOTE)


def _medians(samples: list[tuple[float, ...]]) -> tuple[float, ...]:
    return tuple(statistics.median(column) for column in zip(*samples, strict=True))


def _run(store: str, rows: int, blocks: int) -> tuple[float, ...]:
    out = subprocess.run(
        [sys.executable, "-m", "amp_dagster_tests.benchmarks.bench_memory", store, str(rows), str(blocks)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{store} with {rows} rows failed:\n{out.stderr[-3000:]}")
    return tuple(float(x) for x in out.stdout.strip().splitlines()[-1].split())


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
