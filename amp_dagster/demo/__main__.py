"""``make demo``: the demo code location run headless through Dagster against a local amp, in about a minute.

A dev server serves a synthetic chain; the real ``Definitions`` of ``amp_dagster.definitions`` run in-process on a
Dagster instance under ``.demo/headless`` (the project's ``dagster.yaml``): the incremental sensors tick and their
run requests are executed (each run loads one block range and runs its checks), the stream sensor launches the
streaming asset for a bounded while during which the chain forks, a single-run backfill replaces three ranges,
and a summary read back from the stores compares every table with amp's own count. No service is needed: the
stores are Delta Lake, Iceberg and ClickHouse (chdb) under ``.demo/headless``, unless ``AMP_DEMO_DESTINATION`` says
``postgres`` or ``redis``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..checks import MAX_LAG_BLOCKS

ROOT = Path(__file__).resolve().parents[2]  # the repository: dagster.yaml
START = 15_000_000
FIRST_BLOCKS = 250  # the chain at the start: two closed 100-block ranges behind a finality of 10
STREAM_BLOCKS = 60  # the stream follows the chain this many blocks past the head, through a fork
REORG_DEPTH = 5
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amp_dagster.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(".demo/headless"),
                        help="the stores and the Dagster instance (emptied first; default .demo/headless)")  # fmt: skip
    args = parser.parse_args(argv)
    started = time.monotonic()
    work = args.dir.expanduser().absolute()
    shutil.rmtree(work, ignore_errors=True)
    home = work / "dagster_home"
    home.mkdir(parents=True)
    settings = ROOT / "dagster.yaml"
    if settings.exists():
        shutil.copy(settings, home / "dagster.yaml")  # pools, run retries, monitoring: the instance `make dev` uses
    else:
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    from ..devserver.server import DevServer

    server = DevServer(start_block=START, blocks=FIRST_BLOCKS, seed=1, microbatch_blocks=20)
    try:
        os.environ.update(AMP_URL=server.url, AMP_DEMO_DIR=str(work), AMP_DEMO_START_BLOCK=str(START),
                          DAGSTER_HOME=str(home))  # fmt: skip
        Demo(server, work, started).run()
    finally:
        server.shutdown()
    return 0


class Demo:
    def __init__(self, server, work: Path, started: float) -> None:
        import dagster as dg

        warnings.filterwarnings("ignore", category=dg.BetaWarning)
        warnings.filterwarnings("ignore", category=dg.PreviewWarning)
        from ..assets import pipeline_of
        from ..definitions import defs  # after the environment above: the location reads it when it loads

        self.dg, self.defs, self.server, self.work, self.started = dg, defs, server, work, started
        self.pipelines = [pipeline_of(spec) for a in defs.assets for spec in a.specs]
        self.instance = dg.DagsterInstance.get()
        self.job = defs.resolve_implicit_global_asset_job_def()
        self.cursors: dict[str, str | None] = {}
        self.runs = self.steps = 0

    # -- steps ---------------------------------------------------------------------------------------------------

    def run(self) -> None:
        head = self.server.chain.head
        self.step(f"A local amp: {self.server.url}, a synthetic chain at blocks {START}..{head}")
        self.show_location()

        self.step("Incremental sensors, first tick: register the closed block ranges and load each in a run")
        self.tick()
        console.print(f"  (freshness warns while a table is more than {MAX_LAG_BLOCKS} blocks behind amp's head: here "
                      "until the second range is loaded)")  # fmt: skip

        self.step(f"The stream sensor launches eth/transfers_live; the chain grows {STREAM_BLOCKS} blocks and forks "
                  f"({REORG_DEPTH} blocks replaced) while it streams")  # fmt: skip
        self.stream()

        self.step("Incremental sensors, two more ticks: the range the chain closed meanwhile, then nothing new")
        self.tick()
        self.tick()

        self.step("A single-run backfill of eth/logs over its three ranges: one query, one replace (rows unchanged)")
        self.backfill()

        self.step("Read back from the stores")
        self.summary()

    def show_location(self) -> None:
        table = Table(title="the demo code location (amp_dagster/demo/defs/eth/defs.yaml)", title_justify="left")
        for column in ("asset", "mode", "partitions", "destination", "pool"):
            table.add_column(column)
        for p in self.pipelines:
            parts = f"{p.partitions.size}-block ranges" if p.partitions else "-"
            table.add_row(p.name.replace(".", "/"), p.mode, parts, p.destination.location(), p.pool or "-")
        console.print(table)
        checks = sum(1 for _ in self.defs.resolve_asset_graph().asset_check_keys)
        sensors = ", ".join(s.name for s in self.defs.sensors)
        console.print(f"{checks} asset checks; sensors: {sensors}")

    def tick(self) -> None:
        dg = self.dg
        skipped: dict[str, list[str]] = {}
        for sensor in self.defs.sensors:
            if not sensor.name.endswith("_incremental"):
                continue
            context = dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get(sensor.name),
                                              definitions=self.defs, sensor_name=sensor.name)  # fmt: skip
            result = sensor(context)
            if isinstance(result, dg.SkipReason):
                skipped.setdefault(result.skip_message or "", []).append(sensor.name)
                continue
            for request in result.dynamic_partitions_requests or []:
                self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            self.cursors[sensor.name] = result.cursor
            for request in result.run_requests or []:
                self.execute(request.asset_selection, partition_key=request.partition_key, tags=request.tags)
        for reason, names in skipped.items():
            console.print(f"  {', '.join(names)}: skipped: {reason}")

    def execute(self, selection, *, partition_key: str | None = None, tags: dict[str, str]) -> Any:
        begun = time.monotonic()
        result = self.job.execute_in_process(instance=self.instance, asset_selection=list(selection),
                                             partition_key=partition_key, tags=tags, run_config=QUIET,
                                             raise_on_error=False)  # fmt: skip
        self.runs += 1
        if not result.success:
            failure = next((e for e in result.all_events if e.is_failure), None)
            raise SystemExit(f"run {result.run_id} failed: {failure.message if failure else 'see its events'}")
        checks = "  ".join(_check(e) for e in result.get_asset_check_evaluations())
        events = result.get_asset_materialization_events()
        if any(e.materialization.partition is None for e in events):
            events = events[-1:]  # a stream also reports progress while it runs: show where it ended
        for event in sorted(events, key=lambda e: e.materialization.partition or ""):
            m = event.materialization
            rows = m.metadata.get("dagster/partition_row_count") or m.metadata.get("dagster/row_count")
            where, took = m.partition or "whole asset", time.monotonic() - begun
            console.print(f"  run {result.run_id[:8]}  {m.asset_key.to_user_string():20} {where:26} "
                          f"{rows.value if rows else '-':>6} rows  {took:4.1f} s  {checks}")  # fmt: skip
        return result

    def stream(self) -> None:
        dg = self.dg
        from ..checkpoints import DagsterCheckpoints
        from ..state import load_state

        sensor = next(s for s in self.defs.sensors if s.name.endswith("_stream"))
        context = dg.build_sensor_context(instance=self.instance, definitions=self.defs, sensor_name=sensor.name)
        (request,) = sensor(context).run_requests
        pipeline = next(p for p in self.pipelines if p.mode == "stream")
        head = self.server.chain.head
        until = head + STREAM_BLOCKS
        console.print(f"  {sensor.name}: launch {request.run_key} with tags {request.tags}")
        console.print(f"  this run stops at block {until} (tag amp/until_block); a stream otherwise runs until stopped")
        store, events = DagsterCheckpoints(self.instance), []

        def drive() -> None:  # the chain: a fork once the stream has caught up, then new blocks
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                state = load_state(store, pipeline.checkpoint_id)
                if state is not None and state.high is not None and state.high >= head:
                    break
                time.sleep(0.2)
            first = self.server.reorg(depth=REORG_DEPTH)
            events.append(f"reorg: blocks {first}..{head} replaced by a new fork")
            for _ in range(STREAM_BLOCKS // 10):
                time.sleep(0.3)
                self.server.advance(10)

        driver = threading.Thread(target=drive, name="chain", daemon=True)
        driver.start()
        tags = {**request.tags, "amp/until_block": str(until), "amp/seconds": "120"}
        result = self.execute(request.asset_selection, tags=tags)
        driver.join(5)
        last = result.get_asset_materialization_events()[-1].materialization.metadata
        for line in events:
            console.print(f"  {line}")
        value = {k: v.value for k, v in last.items()}
        console.print(f"  the stream stopped at block {value['amp/last_block']} ({value['amp/stopped']}), "
                      f"{value['amp/reorgs']} reorg undone; checkpoint {value['amp/checkpoint_block']}")  # fmt: skip

    def backfill(self) -> None:
        logs = next(p for p in self.pipelines if p.name == "eth.logs")
        keys = sorted(self.instance.get_materialized_partitions(self.dg.AssetKey(["eth", "logs"])))
        before = self.count(logs)
        tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        self.execute([self.dg.AssetKey(["eth", "logs"])], tags=tags)
        after = self.count(logs)
        console.print(f"  eth/logs holds {after} rows after the backfill, {before} before: "
                      f"{'the ranges were replaced, not appended' if after == before else 'DIFFERENT'}")  # fmt: skip

    def count(self, pipeline) -> int:
        loader = pipeline.destination.build()
        try:
            return loader.count(pipeline.table_ref())
        finally:
            loader.close()

    def summary(self) -> None:
        import pyarrow.compute as pc

        from ..checkpoints import DagsterCheckpoints
        from ..partitions import keys_to_ranges
        from ..ranges import RowRange, merge_ranges
        from ..state import effective_high, load_state, range_records

        store = DagsterCheckpoints(self.instance)
        table = Table(title=f"the stores, read back ({self.work})", title_justify="left")
        for column in ("table", "store", "rows", "blocks in the store", "checkpoint", "amp's rows, same blocks"):
            table.add_column(column, justify="right" if column in ("rows", "checkpoint") else "left")
        all_equal = True
        for p in self.pipelines:
            loader = p.destination.build()
            try:
                rows = loader.count(p.table_ref())
                bounds = [pc.min_max(b.column(p.range_column)) for b in loader.read(p.table_ref()) if b.num_rows]
                low = min((b["min"].as_py() for b in bounds), default=None)
                high = max((b["max"].as_py() for b in bounds), default=None)
            finally:
                loader.close()
            start = p.partitions.start if p.partitions else None
            checkpoint = effective_high(load_state(store, p.checkpoint_id), range_records(store, p.checkpoint_id),
                                        start)  # fmt: skip
            if p.partitions is not None:
                loaded = keys_to_ranges(self.instance.get_materialized_partitions(self.dg.AssetKey(p.name.split("."))))
            else:
                loaded = [] if checkpoint is None else [RowRange(START, checkpoint)]
            source = p.source_for("incremental")
            expected = sum(source.count(r) for r in merge_ranges(loaded))
            all_equal &= expected == rows
            table.add_row(f"{p.namespace}.{p.table}", p.destination.kind, str(rows),
                          f"{low}..{high}" if low is not None else "-", str(checkpoint),
                          f"{expected} ({'equal' if expected == rows else 'DIFFERENT'})")  # fmt: skip
        console.print(table)
        elapsed = time.monotonic() - self.started
        console.print(f"{self.runs} Dagster runs in {elapsed:.0f} s; every table equals amp's result: "
                      f"{'yes' if all_equal else 'NO'}")  # fmt: skip
        home = os.environ["DAGSTER_HOME"]
        console.print(f"The runs, materializations and checks stay in the Dagster instance {home}: "
                      f"DAGSTER_HOME={home} dagster dev -w workspace.yaml shows them.")  # fmt: skip
        console.print("The same code location live, with a dev server and the sensors: make dev")
        if not all_equal:
            raise SystemExit("a table differs from amp's result")

    def step(self, title: str) -> None:
        self.steps += 1
        console.print(f"\n[bold]{self.steps}. {title}[/bold]  [dim]({time.monotonic() - self.started:.0f} s)[/dim]")


def _check(evaluation) -> str:
    if evaluation.passed:
        return f"{evaluation.check_name} ok"
    if evaluation.severity == evaluation.severity.WARN:
        return f"{evaluation.check_name} warns: {evaluation.description}"
    return f"{evaluation.check_name} FAILED: {evaluation.description}"


if __name__ == "__main__":
    sys.exit(main())
