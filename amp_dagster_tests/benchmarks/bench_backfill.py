"""P11: a single-run backfill of 1,000 block-range partitions: one query and one replace per contiguous span.

The pipeline's asset (``build_amp_assets``, PostgreSQL, block-range partitions of ``rows / (26 x 1,000)`` blocks, at
least one) has 1,000 dynamic partitions (``--partitions``) registered on a SQLite instance, all but one of 1,001
consecutive ranges: the one at three fifths is left out, so the backfill covers two contiguous spans. One
``dg.materialize`` with the range tags (``dagster/asset_partition_range_start`` / ``_end``: the first and the last
key) loads them all, as a single-run backfill does. Three cases, interleaved, each from a fresh table:

- the data's own load (the reference): ``sync(..., "incremental")`` of the same spans (``SyncOptions(ranges=...)``)
  with the source, loader and checkpoint store the asset uses, without Dagster;
- a plain ``@dg.asset`` on the same partitions (single-run backfill policy) that loads each span of its run with
  one query and one ``PostgresLoader.write``: Dagster's own cost of a 1,000-partition run;
- the amp asset.

How the calls are counted, in every round of every case:

- queries: the dev server runs in its own process, as a subclass of it defined here that logs every DoGet (a query
  that runs; GetFlightInfo, which only plans one, is counted apart) and hands the log over through a Flight
  action. There must be exactly one query of rows per span, restricted to the span's bounds (the engine also asks
  for the head, to refuse ranges that are not final: a query that reads no row, reported beside them);
- writes: ``PostgresLoader``'s mutating methods (write, delete, replace_table, upsert) are wrapped in this process
  (the assets run in process) and their calls logged. There must be exactly one ``write(replace=span)`` per span
  and nothing else.

The table is then checked against the chain (count and sum of ``log_index`` over the spans). The time per
partition beyond the load is (median amp asset run - median sync alone) / partitions, split into Dagster's part
(the plain asset's run) and ours.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import dagster as dg
import psycopg
import pyarrow.compute as pc
import pyarrow.flight as flight
from psycopg import sql

from amp_dagster.assets import block_ranges, build_amp_assets
from amp_dagster.checkpoints import DagsterCheckpoints
from amp_dagster.devserver.server import DevServer
from amp_dagster.flight.client import AmpClient
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.postgres import PostgresLoader
from amp_dagster.partitions import keys_to_ranges
from amp_dagster.pipelines import parse_pipelines
from amp_dagster.ranges import RowRange
from amp_dagster.sync import sync

from ..instances import sqlite_instance
from ..services import POSTGRES_DSN, require_postgres
from .harness import BACKFILL_PARTITIONS, START_BLOCK, Case, compare, devserver, range_query

SQL = "SELECT * FROM eth_rpc.logs"
SCHEMA = f"amp_bench_backfill_{os.getpid()}"
LOGS_PER_BLOCK = 26  # the synthetic chain's average, rounded down
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
BOUNDS = re.compile(r'"_block_num" >= (\d+) AND "_block_num" <= (\d+)')
MUTATING = ("write", "delete", "replace_table", "upsert")


class CountingDevServer(DevServer):
    """The dev server, logging each query it runs (DoGet) and counting those it plans (GetFlightInfo); the Flight
    action ``queries`` returns the log as JSON and empties it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._log: dict = {"run": [], "planned": 0}
        self._log_lock = threading.Lock()

    def get_flight_info(self, context, descriptor):
        with self._log_lock:
            self._log["planned"] += 1
        return super().get_flight_info(context, descriptor)

    def do_get(self, context, ticket):
        with self._log_lock:
            self._log["run"].append(json.loads(ticket.ticket)["query"])
        return super().do_get(context, ticket)

    def do_action(self, context, action):
        if action.type != "queries":
            raise flight.FlightServerError(f"unknown action {action.type!r}; this server knows 'queries'")
        with self._log_lock:
            log, self._log = self._log, {"run": [], "planned": 0}
        return [json.dumps(log).encode()]


def _server_log(url: str) -> dict:
    client = flight.connect(url)
    try:
        (result,) = client.do_action(flight.Action("queries", b""))
        return json.loads(result.body.to_pybytes())
    finally:
        client.close()


class _LoaderCalls:
    """Wraps PostgresLoader's mutating methods while it is entered; ``calls`` lists (method, ``replace`` of a
    write)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, RowRange | None]] = []
        self._originals = {name: getattr(PostgresLoader, name) for name in MUTATING}

    def __enter__(self) -> _LoaderCalls:
        for name, original in self._originals.items():
            setattr(PostgresLoader, name, self._wrap(name, original))
        return self

    def _wrap(self, name: str, original):
        def logged(loader, table, *args, **kwargs):
            self.calls.append((name, kwargs.get("replace")))
            return original(loader, table, *args, **kwargs)

        return logged

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(PostgresLoader, name, original)


def main(rows: int, rounds: int, partitions: int = BACKFILL_PARTITIONS) -> None:
    require_postgres()
    size = max(1, round(rows / (LOGS_PER_BLOCK * partitions)))
    blocks = (partitions + 1) * size
    left_out = partitions * 3 // 5
    server = [sys.executable, "-m", __name__]
    with (
        devserver(blocks, command=server) as served,
        tempfile.TemporaryDirectory() as home,
        sqlite_instance(Path(home)) as instance,
        _LoaderCalls() as loader_calls,
    ):
        config = {"name": "bench.backfill_logs", "source": {"kind": "amp", "sql": SQL, "url": served.url},
                  "destination": {"kind": "postgres", "dsn": POSTGRES_DSN}, "table": "logs_amp", "namespace": SCHEMA,
                  "partitions": {"kind": "block_ranges", "size": size, "start": START_BLOCK}}  # fmt: skip
        pipeline = parse_pipelines({"pipelines": [config]}).pipelines[0]
        (ours,) = build_amp_assets([pipeline])
        ranges = block_ranges(pipeline)
        every = ranges.keys_through(START_BLOCK + blocks - 1)
        keys = every[:left_out] + every[left_out + 1 :]
        ranges.add_keys(instance, keys)
        spans = keys_to_ranges(keys)
        store = DagsterCheckpoints(instance)
        want = _chain_sums(served.url, spans)
        tables = {"alone": "logs_amp", "plain": "logs_plain", "ours": "logs_amp"}

        @dg.asset(key=["bench", "plain_backfill_logs"], partitions_def=ranges.definition,
                  backfill_policy=dg.BackfillPolicy.single_run())  # fmt: skip
        def plain(context) -> dg.MaterializeResult:
            table, written = TableRef(tables["plain"], namespace=SCHEMA), 0
            with AmpClient(served.url) as client, PostgresLoader(POSTGRES_DSN) as loader:
                for span in keys_to_ranges(context.partition_keys):
                    result = client.query(range_query(SQL, span.start, span.end))
                    loader.ensure_table(table, result.schema)
                    written += loader.write(table, result.reader, replace=span).rows
            return dg.MaterializeResult(metadata={"dagster/row_count": written})

        def alone() -> None:
            loader = pipeline.destination.build()
            try:
                sync(pipeline.source_for("incremental"), loader, pipeline.table_ref(), store, "incremental",
                     pipeline.options(ranges=tuple(spans)), pipeline=pipeline.checkpoint_id,
                     fingerprint=pipeline.fingerprint())  # fmt: skip
            finally:
                loader.close()

        def backfill(asset):
            tags = {RANGE_START: keys[0], RANGE_END: keys[-1]}
            return lambda: dg.materialize([asset], instance=instance, tags=tags)

        def fresh(case: str):
            def run() -> None:
                with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(SCHEMA, tables[case])))
                _server_log(served.url)
                loader_calls.calls.clear()

            return run

        counted: dict[str, str] = {}

        def check(case: str):
            def run() -> None:
                log = _server_log(served.url)
                data = [q for q in log["run"] if BOUNDS.search(q)]  # the others read no row (the head's query)
                read = sorted((RowRange(int(a), int(b)) for q in data for a, b in BOUNDS.findall(q)),
                              key=lambda r: r.start)  # fmt: skip
                if len(data) != len(spans) or read != spans:
                    raise AssertionError(f"{case}: the dev server ran {log['run']}, not one query per span of {spans}")
                writes = [("write", span) for span in spans]
                if loader_calls.calls != writes:
                    raise AssertionError(f"{case}: the loader was called {loader_calls.calls}, not {writes}")
                query = sql.SQL("SELECT count(*), sum(log_index) FROM {}").format(sql.Identifier(SCHEMA, tables[case]))
                with psycopg.connect(POSTGRES_DSN) as conn:
                    got = tuple(int(x) for x in conn.execute(query).fetchone())
                if got != want:
                    raise AssertionError(f"{case}: the table holds {got} (rows, sum of log_index), not {want}")
                counted[case] = (f"{len(data)} queries of rows (and {len(log['run']) - len(data)} of the head, "
                                 f"{log['planned']} planned), {len(loader_calls.calls)} replaces")  # fmt: skip

            return run

        labels = {
            "alone": "sync of the spans, no Dagster (reference)",
            "plain": "dg.materialize of the range, plain @dg.asset",
            "ours": "dg.materialize of the range, amp asset",
        }
        runs = {"alone": alone, "plain": backfill(plain), "ours": backfill(ours)}
        try:
            result = compare(
                f"P11 single-run backfill of {partitions:,} partitions of {size} block(s) in {len(spans)} contiguous "
                f"spans ({want[0]:,} rows) into PostgreSQL",
                want[0],
                [Case(labels[c], runs[c], fresh(c), check(c)) for c in labels],
                rounds,
            )
        finally:
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    alone_s, plain_s, ours_s = (statistics.median(c.seconds) for c in result.cases)
    print(
        f"spans {', '.join(str(s) for s in spans)}; last round: " + "; ".join(f"{c}: {n}" for c, n in counted.items())
    )
    print(
        f"P11: one query and one replace per contiguous span ({len(spans)} of each for {partitions:,} partitions) in "
        "every round of every case: meets it"
    )
    per = 1000 / partitions  # milliseconds per partition, per second of difference
    beyond, dagster, ours = ((a - b) * per for a, b in ((ours_s, alone_s), (plain_s, alone_s), (ours_s, plain_s)))
    print(
        f"time per partition beyond the data's own load: {beyond:.2f} ms (median amp asset run {ours_s:.2f} s - "
        f"median sync alone {alone_s:.2f} s, / {partitions:,}); of which Dagster's own (the plain asset's range run): "
        f"{dagster:.2f} ms, and ours on top of it: {ours:.2f} ms"
    )


def _chain_sums(url: str, spans: list[RowRange]) -> tuple[int, int]:
    """Rows and the sum of log_index of the chain inside ``spans``, from one batch query."""
    with AmpClient(url) as client:
        chain = client.query(f"SELECT _block_num, log_index FROM ({SQL}) AS chain").reader.read_all()
    numbers = chain["_block_num"]
    masks = [pc.and_(pc.greater_equal(numbers, s.start), pc.less_equal(numbers, s.end)) for s in spans]
    kept = chain.filter(functools.reduce(pc.or_, masks))
    return kept.num_rows, pc.sum(kept["log_index"]).as_py() or 0


def serve() -> None:
    """The counting dev server in its own process, taking the dev server CLI's options that the harness passes."""
    parser = argparse.ArgumentParser()
    for option in ("--port", "--admin-port", "--blocks", "--start-block", "--seed"):
        parser.add_argument(option, type=int, required=True)
    parser.add_argument("--block-time", type=float, required=True)
    args = parser.parse_args()
    server = CountingDevServer(f"grpc://127.0.0.1:{args.port}", seed=args.seed, start_block=args.start_block,
                               blocks=args.blocks, block_time=args.block_time)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"counting dev server on {server.url}", flush=True)
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    serve()
