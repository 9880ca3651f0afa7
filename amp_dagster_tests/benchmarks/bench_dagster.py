"""P10: our overhead per Dagster run, on top of materialize() of an equivalent plain asset doing the same load.

Two assets partitioned by the same block ranges (10 blocks a partition, a dynamic partitions definition registered
on the instance), each loading one partition of the dev server's ``eth_rpc.logs`` into its own PostgreSQL table of
the same shape:

- the plain one, a ``@dg.asset`` written as a user would without amp_dagster: open an AmpClient and a
  PostgresLoader, run the same batch query the engine runs for a range, ``ensure_table``, ``write`` with
  ``replace=`` the partition's range, return a MaterializeResult with the row count;
- ours, the asset ``build_amp_assets`` makes for the same pipeline: the resource drives the sync engine (the range
  as one query and one replace, its range record in run storage), per-partition row counts and the metadata the UI
  shows (checkpoint, schema, timings).

Each run is an in-process ``dg.materialize`` of one partition on one warm SQLite instance (the default), the two
assets alternating on the same partition, ``rounds`` x 10 pairs after two untimed pairs; the dev server runs in its
own process. After every run the table's rows in the partition's range are checked against the chain (count, sum
of ``log_index``). The figure is the median over the pairs of (our run - the plain run), in seconds.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import psycopg
import pyarrow.compute as pc
from psycopg import sql

from amp_dagster.assets import block_ranges, build_amp_assets
from amp_dagster.flight.client import AmpClient
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.postgres import PostgresLoader
from amp_dagster.partitions import key_range
from amp_dagster.pipelines import parse_pipelines

from ..instances import sqlite_instance
from ..services import POSTGRES_DSN, require_postgres
from .harness import GOALS, START_BLOCK, devserver, load_average, percentile, range_query, rounds_note

SQL = "SELECT * FROM eth_rpc.logs"
SCHEMA = f"amp_bench_dagster_{os.getpid()}"
PARTITION_BLOCKS, PARTITIONS = 10, 50
RUNS_PER_ROUND, WARMUP_PAIRS = 10, 2


def main(rows: int, rounds: int) -> None:
    """``rows`` does not apply (a partition is 10 blocks, about 260 rows); ``rounds`` x 10 pairs of runs."""
    require_postgres()
    pairs = rounds * RUNS_PER_ROUND
    blocks = PARTITION_BLOCKS * PARTITIONS
    load_before = load_average()
    with devserver(blocks) as served, tempfile.TemporaryDirectory() as home, sqlite_instance(Path(home)) as instance:
        config = {"name": "bench.amp_logs", "source": {"kind": "amp", "sql": SQL, "url": served.url},
                  "destination": {"kind": "postgres", "dsn": POSTGRES_DSN}, "table": "logs_amp", "namespace": SCHEMA,
                  "partitions": {"kind": "block_ranges", "size": PARTITION_BLOCKS, "start": START_BLOCK}}  # fmt: skip
        pipeline = parse_pipelines({"pipelines": [config]}).pipelines[0]
        (ours,) = build_amp_assets([pipeline])
        ranges = block_ranges(pipeline)
        keys = ranges.keys_through(START_BLOCK + blocks - 1)
        ranges.add_keys(instance, keys)
        plain_table = TableRef("logs_plain", namespace=SCHEMA)

        @dg.asset(key=["bench", "plain_logs"], partitions_def=ranges.definition)
        def plain(context) -> dg.MaterializeResult:
            span = key_range(context.partition_key)
            with AmpClient(served.url) as client, PostgresLoader(POSTGRES_DSN) as loader:
                result = client.query(range_query(SQL, span.start, span.end))
                loader.ensure_table(plain_table, result.schema)
                written = loader.write(plain_table, result.reader, replace=span)
            return dg.MaterializeResult(metadata={"dagster/row_count": written.rows})

        with AmpClient(served.url) as client:
            chain = client.query(f"SELECT _block_num, log_index FROM ({SQL}) AS chain").reader.read_all()

        def check(table: str, key: str) -> None:
            span = key_range(key)
            inside = chain.filter(pc.and_(pc.greater_equal(chain["_block_num"], span.start),
                                          pc.less_equal(chain["_block_num"], span.end)))  # fmt: skip
            want = (inside.num_rows, pc.sum(inside["log_index"]).as_py() or 0)
            query = sql.SQL("SELECT count(*), coalesce(sum(log_index), 0) FROM {} WHERE _block_num BETWEEN %s AND %s")
            with psycopg.connect(POSTGRES_DSN) as conn:
                got = conn.execute(query.format(sql.Identifier(SCHEMA, table)), (span.start, span.end)).fetchone()
            if tuple(int(x) for x in got) != want:
                raise AssertionError(f"{table} holds {got} (rows, sum of log_index) in {span}, not {want}")

        cases = {"plain": (plain, "logs_plain"), "ours": (ours, "logs_amp")}
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        try:
            for i in range(WARMUP_PAIRS + pairs):
                key = keys[i % len(keys)]
                for name, (asset, table) in cases.items():
                    start = time.perf_counter()
                    dg.materialize([asset], instance=instance, partition_key=key)
                    if i >= WARMUP_PAIRS:
                        seconds[name].append(time.perf_counter() - start)
                    check(table, key)
        finally:
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    differences = [a - b for a, b in zip(seconds["ours"], seconds["plain"], strict=True)]
    print(
        f"\n## P10 our overhead per Dagster run: materialize() of one partition ({PARTITION_BLOCKS} blocks) of the amp "
        f"asset vs a plain asset doing the same load\n({pairs} pairs of runs, interleaved, on one warm SQLite "
        f"instance; load average {load_before:.2f} before, {load_average():.2f} after)"
    )
    rounds_note(rounds)
    labels = {"plain": "plain @dg.asset: query + PostgresLoader.write", "ours": "amp asset (build_amp_assets)"}
    print(f"{'case':<52} {'median s':>9} {'best s':>8} {'p95 s':>7}")
    for name, times in seconds.items():
        print(f"{labels[name]:<52} {statistics.median(times):>9.3f} {min(times):>8.3f} {percentile(times, 95):>7.3f}")
    print(
        GOALS["P10"].line(
            statistics.median(differences),
            ratio="median over the pairs of (seconds of the amp asset's run - seconds of the plain asset's run)",
        )
    )
