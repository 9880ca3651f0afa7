"""P9: peak memory of streaming 5 times more rows into each loader (5M vs 1M by default): the ratio must stay ≤ 1.2.

Each (loader, size) runs in a fresh process that generates amp logs chunk by chunk and hands the loader a lazy
RecordBatchReader, so nothing but the loader can hold the rows. The process reports its peak anonymous memory
(RssAnon, sampled every 5 ms: the heap, what the loader holds) and its peak RSS (VmHWM), which also counts file
pages the process maps, such as LMDB's memory-mapped database.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

import pyarrow as pa

from amp_dagster.devserver.chain import Chain
from amp_dagster.devserver.schemas import LOGS
from amp_dagster.loaders.base import Loader, TableRef

from ..services import POSTGRES_DSN, REDIS_URL
from .harness import load_average

STORES = ("postgres", "redis", "clickhouse", "delta", "iceberg", "lmdb")
REDIS_BENCH_DB = 15  # flushed after each run; nothing else uses it


def lazy_logs(rows: int) -> pa.RecordBatchReader:
    """``rows`` logs rows generated 500 blocks at a time while the reader is consumed."""

    def batches() -> Iterator[pa.RecordBatch]:
        view = Chain(seed=42, start_block=15_000_000, blocks=rows // 20 + 1000).view()
        left, block = rows, view.start_block
        while left > 0:
            part = view.tables(block, block + 499, ["logs"])["logs"].slice(0, left)
            left -= part.num_rows
            block += 500
            yield from part.to_batches(max_chunksize=65_536)

    return pa.RecordBatchReader.from_batches(LOGS, batches())


def _loader(store: str, workdir: str) -> Loader:
    if store == "postgres":
        from amp_dagster.loaders.postgres import PostgresLoader

        return PostgresLoader(POSTGRES_DSN)
    if store == "redis":
        from amp_dagster.loaders.redis import RedisLoader

        return RedisLoader(REDIS_URL.rsplit("/", 1)[0] + f"/{REDIS_BENCH_DB}", prefix="amp_bench_mem")
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


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _AnonPeak:
    """Samples RssAnon in a thread: the kernel keeps no high-water mark for anonymous memory alone."""

    def __init__(self) -> None:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


def child(store: str, rows: int) -> None:
    """Run in a fresh process: write ``rows`` rows, check the count, print the peak RSS in MB."""
    workdir = tempfile.mkdtemp(prefix="amp_bench_mem_")
    table = TableRef("logs_mem", namespace="amp_bench_mem")
    try:
        with _loader(store, workdir) as loader:
            loader.delete(table, _everything())
            loader.ensure_table(table, LOGS)
            sampler = _AnonPeak()
            written = loader.write(table, lazy_logs(rows)).rows
            anon = sampler.stop()
            assert written == rows, f"{store}: wrote {written} rows, not {rows}"
            print(f"{anon:.0f} {_status_mb('VmHWM'):.0f}")
            loader.delete(table, _everything())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if store == "redis":
            import redis

            redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + f"/{REDIS_BENCH_DB}").flushdb()


def _everything():
    from amp_dagster.ranges import RowRange

    return RowRange(0)


def main(rows: int, rounds: int) -> None:
    small, large = rows, rows * 5
    print(f"\n## P9 peak memory streaming {large:,} vs {small:,} logs rows (load average {load_average():.2f})")
    print(
        f"{'loader':<12} {'anon MB':>9} {'anon MB 5x':>11} {'ratio':>7}   {'RSS MB':>8} {'RSS MB 5x':>10} {'ratio':>7}"
    )
    for store in STORES:
        (anon_s, rss_s), (anon_l, rss_l) = (_run(store, n) for n in (small, large))
        print(
            f"{store:<12} {anon_s:>9,.0f} {anon_l:>11,.0f} {anon_l / anon_s:>6.2f}x   "
            f"{rss_s:>8,.0f} {rss_l:>10,.0f} {rss_l / rss_s:>6.2f}x"
        )
    del rounds  # one run per size: peak memory is not noisy the way throughput is


def _run(store: str, rows: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-m", "amp_dagster_tests.benchmarks.bench_memory", store, str(rows)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{store} with {rows} rows failed:\n{out.stderr[-3000:]}")
    anon, rss = out.stdout.strip().splitlines()[-1].split()
    return float(anon), float(rss)


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]))
