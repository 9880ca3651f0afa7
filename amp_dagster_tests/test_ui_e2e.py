"""End to end through Dagster's own processes: the demo code location under ``dagster-webserver`` and
``dagster-daemon`` on loopback, a dev server as amp. The incremental sensor of eth/logs is switched on and a
single-run backfill of eth/transfers is launched through GraphQL, as the UI does; the daemon runs them; the rows in
Delta Lake and ClickHouse (chdb) equal a batch query of the same blocks; headless Chromium shows the partitions page
and a materialization's metadata.

``AMP_DAGSTER_SCREENSHOTS=docs`` also copies the screenshots to ``docs/`` (the README's pictures).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
START = 15_000_000
RANGES = ["000015000000-000015000099", "000015000100-000015000199"]  # closed behind a finality of 10 at 250 blocks
TRANSFER = "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--hide-scrollbars",
    "--window-size=1400,900",
]


def test_sensor_and_backfill_launched_through_graphql_load_the_stores(devserver, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install -y chromium)")
    server = devserver(start_block=START, blocks=250, seed=3, microbatch_blocks=50)
    home, stores = tmp_path / "dagster_home", tmp_path / "stores"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")  # pools, retries, monitoring: as `make dev` runs
    env = {**os.environ, "DAGSTER_HOME": str(home), "AMP_URL": server.url, "AMP_DEMO_DIR": str(stores),
           "AMP_DEMO_START_BLOCK": str(START)}  # fmt: skip
    env.pop("AMP_DEMO_DESTINATION", None)
    env.pop("AMP_DEMO_CLICKHOUSE_DSN", None)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    workspace = str(ROOT / "workspace.yaml")
    processes: list[tuple[subprocess.Popen, Path]] = []
    try:
        processes.append(_start([BIN / "dagster-webserver", "-h", "127.0.0.1", "-p", str(port), "-w", workspace],
                                tmp_path / "webserver.log", env))  # fmt: skip
        processes.append(_start([BIN / "dagster-daemon", "run", "-w", workspace], tmp_path / "daemon.log", env))
        _wait("the webserver to load the demo code location", lambda: _asset_loaded(base), processes, 240)
        _graphql(base, "mutation { setNuxSeen }")

        started = _graphql(base, START_SENSOR, s={"repositoryLocationName": "amp_demo",
                                                  "repositoryName": "__repository__",
                                                  "sensorName": "amp_eth_logs_incremental"})["startSensor"]  # fmt: skip
        assert started.get("sensorState", {}).get("status") == "RUNNING", started

        import dagster as dg

        with dg.DagsterInstance.from_config(str(home)) as instance:  # the instance the daemon runs on
            registered = lambda: set(RANGES) <= set(instance.get_dynamic_partitions("eth_block_ranges"))  # noqa: E731
            _wait("the sensor to register the closed ranges", registered, processes, 120)
            selection = [{"path": ["eth", "transfers"]}]
            params = {"partitionNames": RANGES, "assetSelection": selection, "fromFailure": False}
            backfill = _graphql(base, LAUNCH_BACKFILL, p=params)["launchPartitionBackfill"]
            assert backfill["__typename"] == "LaunchBackfillSuccess", backfill
            runs = _wait_for_runs(instance, backfill["backfillId"], processes)

            sensor_runs = [r for r in runs if r.tags.get("amp/pipeline") == "eth.logs"]
            assert sorted(r.tags["dagster/partition"] for r in sensor_runs) == RANGES
            (backfill_run,) = [r for r in runs if r.tags.get("dagster/backfill") == backfill["backfillId"]]
            assert (backfill_run.tags["dagster/asset_partition_range_start"],
                    backfill_run.tags["dagster/asset_partition_range_end"]) == (RANGES[0], RANGES[-1])  # fmt: skip
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [(r.run_id, r.status) for r in runs]
            logs_materialized = instance.get_materialized_partitions(dg.AssetKey(["eth", "logs"]))
            assert logs_materialized == set(RANGES)

        first, last = START, START + 199
        from amp_dagster.flight.client import AmpClient
        from amp_dagster.loaders.base import TableRef
        from amp_dagster.loaders.delta import DeltaLoader
        from amp_dagster.ranges import RowRange

        amp = AmpClient(server.url)
        where = f"_block_num BETWEEN {first} AND {last}"
        want_logs = _count(amp, f"SELECT count(*) AS n FROM eth_rpc.logs WHERE {where}")
        want_transfers = _count(amp, f"SELECT count(*) AS n FROM eth_rpc.logs WHERE {where} "
                                     f"AND topic0 = X'{TRANSFER}' AND topic3 IS NULL")  # fmt: skip
        logs = DeltaLoader(stores / "delta")
        assert logs.count(TableRef("logs", namespace="eth")) == want_logs > 0
        assert logs.count(TableRef("logs", namespace="eth"), RowRange(first, last)) == want_logs
        assert _chdb_count(f"chdb://{stores / 'chdb'}", "eth", "transfers") == want_transfers > 0

        shots = tmp_path / "shots"
        shots.mkdir()
        page = f"/assets/eth/logs?view=partitions&partition={RANGES[1]}"  # one partition selected: its metadata
        partitions = _page(base, page, shots / "partitions.png", tmp_path)
        for text in (*RANGES, "Materialized (2)", "dagster/partition_row_count"):
            assert text in partitions, f"{text!r} not on the partitions page"
        events = _page(base, "/assets/eth/transfers?view=events", shots / "materialization.png", tmp_path)
        for text in ("dagster/partition_row_count", "amp/ranges", "dagster/table_name", "eth.transfers", RANGES[0]):
            assert text in events, f"{text!r} not on the materialization page"
        if os.environ.get("AMP_DAGSTER_SCREENSHOTS") == "docs":
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copy(shots / "partitions.png", ROOT / "docs" / "dagster_partitions.png")
            shutil.copy(shots / "materialization.png", ROOT / "docs" / "dagster_materialization.png")
    finally:
        for process, _ in processes:
            _stop(process)


START_SENSOR = """mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) {
  __typename ... on Sensor { sensorState { status } } ... on PythonError { message }
  ... on SensorNotFoundError { message } ... on UnauthorizedError { message } } }"""
LAUNCH_BACKFILL = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack }
  ... on UnauthorizedError { message } ... on PartitionSetNotFoundError { message } } }"""


def _wait_for_runs(instance, backfill_id: str, processes) -> list:
    """Two sensor runs of eth/logs and the backfill's run, once all have finished (with their logs on failure)."""
    import dagster as dg
    from dagster._core.storage.dagster_run import FINISHED_STATUSES

    found: list = []

    def done() -> bool:
        runs = instance.get_runs(dg.RunsFilter(tags={"amp/pipeline": "eth.logs"}))
        runs += instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        found[:] = runs
        failed = [r for r in runs if r.status == dg.DagsterRunStatus.FAILURE]
        if failed:
            raise AssertionError(f"run {failed[0].run_id} failed:\n{_run_errors(instance, failed[0].run_id)}")
        return len(runs) >= 3 and all(r.status in FINISHED_STATUSES for r in runs)

    _wait("the sensor's and the backfill's runs", done, processes, 240)
    return found


def _run_errors(instance, run_id: str) -> str:
    records = instance.all_logs(run_id)
    return "\n".join(str(r.dagster_event.event_specific_data)[:3000] for r in records
                     if r.dagster_event and r.dagster_event.is_failure)  # fmt: skip


def _count(amp, sql: str) -> int:
    return int(amp.query(sql).reader.read_all().column("n")[0].as_py())


def _chdb_count(dsn: str, namespace: str, table: str) -> int:
    # chdb opens one engine path per process and the suite's ClickHouse tests hold another: count from a child
    script = ("import sys; from amp_dagster.loaders.clickhouse import ClickHouseLoader; "
              "from amp_dagster.loaders.base import TableRef; loader = ClickHouseLoader(sys.argv[1]); "
              "print(loader.count(TableRef(sys.argv[3], namespace=sys.argv[2])))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, dsn, namespace, table], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def _page(base: str, path: str, png: Path, tmp_path: Path) -> str:
    """A screenshot of the page and its text (the DOM after the app rendered it)."""
    profile = ["--user-data-dir=" + str(tmp_path / f"chromium-{png.stem}"), "--virtual-time-budget=20000"]
    shot = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *profile, f"--screenshot={png}", base + path],
                          capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert shot.returncode == 0 and png.exists(), f"chromium failed ({shot.returncode}): {shot.stderr[-3000:]}"
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *profile, "--dump-dom", base + path],
                         capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert dom.returncode == 0, f"chromium --dump-dom failed ({dom.returncode}): {dom.stderr[-3000:]}"
    return dom.stdout


def _asset_loaded(base: str) -> bool:
    answer = _graphql(base, '{ assetNodeOrError(assetKey: {path: ["eth", "logs"]}) { __typename } }')
    return answer["assetNodeOrError"]["__typename"] == "AssetNode"


def _graphql(base: str, query: str, **variables) -> dict:
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(f"{base}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    if answer.get("errors"):
        raise AssertionError(f"GraphQL errors: {answer['errors']}")
    return answer["data"]


def _start(args: list, log: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    # a session of its own: the process and the children it spawns (code servers, run workers) stop as a group
    with log.open("w") as out:
        process = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)  # fmt: skip
    return process, log


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever the group still holds (a run worker, a code server)
    process.wait(timeout=10)


def _wait(what: str, check, processes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process, log in processes:
            if process.poll() is not None:
                raise AssertionError(f"{what}: {process.args[0]} exited with {process.returncode}:\n"
                                     f"{log.read_text()[-4000:]}")  # fmt: skip
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, KeyError):
            pass
        time.sleep(1)
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in processes)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
