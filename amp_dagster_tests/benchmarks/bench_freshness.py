"""P8: stream freshness, from a block being produced to its rows committed in PostgreSQL, at 4 blocks per second.

Three processes, as in production: the dev server (amp), the engine (``sync(..., "stream")`` with checkpoints in a
SQLite Dagster instance, the default one, into PostgreSQL) and this one, which produces the blocks and watches the
table. The dev server has no miner: this process asks its control API for one new block every 0.25 s, on a fixed
schedule, and notes the time just before each request (the block exists at some moment between the request and its
answer, so the figure never flatters the engine). Another thread polls the table on its own connection every 5 ms
(``SELECT max(_block_num)``, an index lookup) and notes when each block's rows first become visible to it, which is
after their commit: a block is committed when the table's highest block reaches it (the engine writes blocks in
order). The latency of a block is the difference; blocks without logs rows are left out (their commit shows no row).

The engine first catches up with the 100 blocks the chain starts with; the first blocks produced after that are
warm-up and not counted. At the end the table must hold exactly the chain's rows (count and sum of ``log_index``
against a batch query of the then still chain). ``--seconds`` sets how long blocks are produced (default 60).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
from psycopg import errors, sql

from ..services import POSTGRES_DSN, require_postgres
from .harness import GOALS, MIN_SECONDS, START_BLOCK, devserver, load_average, percentile

RATE = 4.0  # blocks per second
INITIAL_BLOCKS = 100
WARMUP_BLOCKS = 8  # the first live blocks: connections and caches warm up
POLL = 0.005
SCHEMA = f"amp_bench_fresh_{os.getpid()}"
STREAM_SQL = "SELECT * FROM eth_rpc.logs SETTINGS stream = true"


class _Watcher:
    """Polls the destination from its own connection and notes when each block number is first reached."""

    def __init__(self, table: sql.Composable) -> None:
        self.seen: dict[int, float] = {}
        self.polls = 0
        self._query = sql.SQL("SELECT max(_block_num) FROM {}").format(table)
        self._reached = START_BLOCK - 1
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._conn = psycopg.connect(POSTGRES_DSN, autocommit=True)  # each poll sees the latest commit
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(POLL):
            try:
                value = self._conn.execute(self._query).fetchone()[0]
            except errors.UndefinedTable:  # the engine has not created it yet
                continue
            now = time.perf_counter()
            self.polls += 1
            if value is not None and int(value) > self._reached:
                with self._changed:
                    for block in range(self._reached + 1, int(value) + 1):
                        self.seen[block] = now
                    self._reached = int(value)
                    self._changed.notify_all()

    def wait_for(self, block: int, timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._reached >= block, timeout):
                raise AssertionError(f"the table did not reach block {block} within {timeout:g} s")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


def _produce(admin: str, first: int, last: int) -> dict[int, float]:
    """Blocks ``first..=last``, one every 1/RATE s on a fixed schedule; when each was asked for."""
    produced: dict[int, float] = {}
    start = time.perf_counter()
    for i, block in enumerate(range(first, last + 1)):
        delay = start + i / RATE - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        produced[block] = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(f"{admin}/advance?blocks=1", method="POST")) as answer:
            head = json.load(answer)["head"]
        if head != block:
            raise AssertionError(f"the dev server's head is {head} after asking for block {block}")
    return produced


def main(rows: int, rounds: int, seconds: float = MIN_SECONDS) -> None:
    """``rows`` and ``rounds`` do not apply: the blocks are few and small, and one run is a minute of them."""
    require_postgres()
    head = START_BLOCK + INITIAL_BLOCKS - 1
    first, last = head + 1, head + WARMUP_BLOCKS + max(1, round(seconds * RATE))
    table = sql.Identifier(SCHEMA, "logs")
    load_before = load_average()
    with devserver(INITIAL_BLOCKS, admin=True) as served, tempfile.TemporaryDirectory() as home:
        log = Path(home) / "engine.log"
        with open(log, "w") as errors_out:
            engine = subprocess.Popen(
                [sys.executable, "-m", __name__, served.url, SCHEMA, str(last), str(Path(home) / "dagster")],
                stdout=subprocess.PIPE,
                stderr=errors_out,
                text=True,
            )
        watcher = _Watcher(table)
        try:
            watcher.wait_for(head, timeout=180)  # dagster's import and the catch-up, untimed
            produced = _produce(served.admin, first, last)
            out, _ = engine.communicate(timeout=120)
            if engine.returncode != 0:
                raise AssertionError(f"the engine exited with {engine.returncode}")
            result = json.loads(out.strip().splitlines()[-1])
            _check(served.url, table, result["rows"])
            counted = first + WARMUP_BLOCKS
            present = _blocks_with_rows(table, counted)
        except Exception as exc:
            raise AssertionError(f"P8 failed: {exc}\nthe engine's log:\n{log.read_text()[-3000:]}") from exc
        finally:
            if engine.poll() is None:
                engine.kill()
                engine.wait()
            watcher.stop()
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    latencies = [watcher.seen[b] - produced[b] for b in sorted(present)]
    span = last - counted + 1
    print(
        f"\n## P8 stream freshness: a block every {1 / RATE:g} s for {span / RATE:g} s ({span} blocks timed, "
        f"{len(latencies)} with rows), sync stream into PostgreSQL\n(load average {load_before:.2f} before, "
        f"{load_average():.2f} after; produced = just before the control API call that adds the block; committed = "
        f"the first poll that sees its rows, every {POLL * 1000:g} ms from another connection)"
    )
    if seconds < MIN_SECONDS:
        print(f"note: {seconds:g} s of blocks is a smoke run; figures need at least {MIN_SECONDS} s")
    print(
        f"block produced -> rows committed: p50 {percentile(latencies, 50):.3f} s, p95 {percentile(latencies, 95):.3f}"
        f" s, max {max(latencies):.3f} s; the engine committed {result['rows']:,} rows in {result['flushes']} "
        f"flushes; {watcher.polls:,} polls"
    )
    print(GOALS["P8"].line(percentile(latencies, 95), stat="p95"))


def _check(url: str, table: sql.Composable, written: int) -> None:
    """The table holds the chain's rows exactly once: count and sum of log_index against a batch query."""
    import pyarrow.compute as pc

    from amp_dagster.flight.client import AmpClient

    with AmpClient(url) as client:
        chain = client.query("SELECT _block_num, log_index FROM eth_rpc.logs").reader.read_all()
    want = (chain.num_rows, pc.sum(chain["log_index"]).as_py())
    query = sql.SQL("SELECT count(*), sum(log_index) FROM {}").format(table)
    with psycopg.connect(POSTGRES_DSN) as conn:
        got = tuple(int(x) for x in conn.execute(query).fetchone())
    if got != want or written != want[0]:
        raise AssertionError(
            f"the table holds {got} (rows, sum of log_index) and the engine wrote {written} rows; the chain has {want}"
        )


def _blocks_with_rows(table: sql.Composable, first: int) -> set[int]:
    query = sql.SQL("SELECT DISTINCT _block_num FROM {} WHERE _block_num >= %s").format(table)
    with psycopg.connect(POSTGRES_DSN) as conn:
        return {int(b) for (b,) in conn.execute(query, (first,))}


def child(url: str, schema: str, until: int, home: str) -> None:
    """The engine, in its own process: stream into PostgreSQL until block ``until``; prints the result as JSON."""
    from amp_dagster.checkpoints import DagsterCheckpoints
    from amp_dagster.flight.client import AmpClient
    from amp_dagster.loaders.base import TableRef
    from amp_dagster.loaders.postgres import PostgresLoader
    from amp_dagster.sources import AmpQuerySource
    from amp_dagster.sync import SyncOptions, sync

    from ..instances import sqlite_instance

    with sqlite_instance(Path(home)) as instance, AmpClient(url) as client, PostgresLoader(POSTGRES_DSN) as loader:
        source = AmpQuerySource(client, STREAM_SQL, stream=True)
        result = sync(source, loader, TableRef("logs", namespace=schema), DagsterCheckpoints(instance), "stream",
                      SyncOptions(until_block=until), pipeline=f"bench/{schema}")  # fmt: skip
    print(json.dumps(result.to_json()), flush=True)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
