"""ClickHouse harness: one chdb engine directory per test process, one database per test.

chdb runs one engine path per process (a second path fails while the first has open clients), so every loader
of the test process shares ``CHDB_DSN``; tests are isolated by database instead. A module-level admin client keeps
the engine open between tests (reopening it costs ~0.2 s) and drops each test's databases afterwards.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from functools import cache

import numpy as np
import pyarrow as pa
from clickhouse_connect.driver.binding import escape_str

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.clickhouse import ClickHouseLoader
from amp_dagster.ranges import RowRange
from amp_dagster.retry import RetryPolicy

from . import Harness

_DIR = os.environ.get("AMP_TEST_CHDB_DIR") or tempfile.mkdtemp(prefix="amp_chdb_")
if "AMP_TEST_CHDB_DIR" not in os.environ:
    atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
CHDB_DSN = f"chdb://{os.path.realpath(_DIR)}"


@cache
def admin():
    """A plain clickhouse-connect client on the test engine, independent of the loader under test."""
    import clickhouse_connect

    return clickhouse_connect.get_client(dsn=CHDB_DSN)


class ClickHouseHarness(Harness):
    def make_loader(self, **options) -> ClickHouseLoader:
        admin()  # open the engine before any loader, and keep it open
        return ClickHouseLoader(CHDB_DSN, **options)

    def unreachable_loader(self, port: int) -> ClickHouseLoader:
        # the HTTP client of clickhouse-connect, as for a real server: the code path chdb does not take
        return ClickHouseLoader(
            host="127.0.0.1",
            port=port,
            username="amp",
            password="s3cret-pw",
            connect_timeout=2,
            retry=RetryPolicy(attempts=2, initial_delay=0.01),
        )

    def cleanup(self) -> None:
        super().cleanup()
        client = admin()
        names = client.query(
            "SELECT name FROM system.databases WHERE startsWith(name, {ns:String})", parameters={"ns": self.namespace}
        ).result_rows
        for (name,) in names:
            client.command(f"DROP DATABASE IF EXISTS `{escape_str(name)}` SYNC")


# -- a writer in its own process, for the SIGKILL tests -------------------------------------------------------------

CRASH_TABLE = TableRef("rows", namespace="crash")
CRASH_RANGE = RowRange(100, 199)  # the range replaced over and over; blocks 0..=99 and 200..=299 stay as written
CRASH_ROWS = 12_000  # rows of generation 0; generation g has g more, so a count tells generations apart


def crash_rows(gen: int, blocks: RowRange) -> pa.Table:
    """Generation ``gen``'s rows over ``blocks``: row i is in block start + i % size, numbered i, tagged gen."""
    n = CRASH_ROWS + gen
    i = np.arange(n, dtype=np.int64)
    return pa.table(
        {
            "_block_num": pa.array(blocks.start + i % blocks.size, pa.uint64()),
            "gen": pa.array(np.full(n, gen, dtype=np.int64)),
            "i": pa.array(i),
            "payload": pa.array(np.char.mod("payload-%032d", i).astype(object)),
        }
    )


def crash_state(loader: ClickHouseLoader) -> dict:
    """What the SIGKILL tests check: the rows and distinct row numbers of each generation in the table (-1 for the
    rows around the range), and the stage and lock tables beside it."""
    names = (
        loader._client()
        .query(
            "SELECT name, comment FROM system.tables WHERE database = {db:String} AND name != {t:String}",
            parameters={"db": CRASH_TABLE.namespace, "t": CRASH_TABLE.name},
        )
        .result_rows
    )
    got = loader.read(CRASH_TABLE).read_all()
    per_gen = got.group_by("gen").aggregate([("i", "count"), ("i", "count_distinct")]).to_pylist()
    return {
        "gens": {str(r["gen"]): [r["i_count"], r["i_count_distinct"]] for r in per_gen},
        "stages": [[name, comment.startswith("amp_dagster_replace:")] for name, comment in names if "_stage_" in name],
        "locks": sorted(name for name, _ in names if "__amp_lock_" in name),
    }


def crash_worker(path: str, mode: str, gen: str) -> None:
    """Report the table as found, recover it (``ensure_table``) and report it again, then write generations from
    ``gen`` on (``mode`` "replace": the range CRASH_RANGE; "refresh": the whole table) until killed; "check" stops
    after the reports. Reports are JSON lines on stdout. The lease is long, so a quick recovery shows that a dead
    writer's lock on this host is taken over at once, not after its lease."""
    loader = ClickHouseLoader(f"chdb://{path}", insert_rows=4_000, lock_lease=30.0)
    everything = RowRange(0, 299)

    def report(at: str, **extra) -> None:
        state = crash_state(loader) if loader._meta(CRASH_TABLE) is not None else {}
        print(json.dumps({"at": at, **state, **extra}), flush=True)

    report("found")
    started = time.monotonic()
    loader.ensure_table(CRASH_TABLE, crash_rows(0, everything).schema)
    report("recovered", seconds=time.monotonic() - started)
    g = int(gen)
    if mode == "check":
        return
    if g == 0 and mode == "replace":  # a new table: the rows around the range, and generation 0 in it
        loader.write(CRASH_TABLE, crash_rows(-1, RowRange(0, 99)))
        loader.write(CRASH_TABLE, crash_rows(-1, RowRange(200, 299)))
    while True:
        print(json.dumps({"at": "start", "gen": g}), flush=True)
        if mode == "replace":
            loader.write(CRASH_TABLE, crash_rows(g, CRASH_RANGE).to_batches(2_000), replace=CRASH_RANGE)
        else:  # from a source that takes its time, as amp does: the stage lives for most of the refresh
            rows = crash_rows(g, everything)
            loader.replace_table(CRASH_TABLE, pa.RecordBatchReader.from_batches(rows.schema, _slowly(g, rows)))
        print(json.dumps({"at": "done", "gen": g}), flush=True)
        g += 1


def _slowly(gen: int, rows: pa.Table):
    print(json.dumps({"at": "reading", "gen": gen}), flush=True)  # the loader asks for the first batch
    for batch in rows.to_batches(2_000):
        time.sleep(0.03)
        yield batch
