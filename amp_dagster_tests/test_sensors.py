"""Sensors through build_sensor_context: a growing chain gives the right partitions and run keys, a repeated tick
requests nothing new, the stream sensor never has two runs, the gap sensor launches one backfill; and a streaming
run terminated from outside leaves destination and checkpoint consistent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest

from amp_dagster.assets import STREAM_TAG, block_ranges, build_amp_assets
from amp_dagster.partitions import block_key
from amp_dagster.pipelines import parse_pipelines
from amp_dagster.sensors import PIPELINE_TAG, find_gaps, gap_sensor, incremental_sensor, stream_sensor

from .chaincheck import canonical, exact
from .destinations import destination
from .instances import sqlite_instance
from .stores import load

LOGS = "SELECT * FROM eth_rpc.logs"


def _spec(server, harness, **extra):
    base = {
        "name": "eth.logs",
        "source": {"sql": LOGS, "url": server.url},
        "table": "logs",
        "destination": destination("delta", harness),
        "partitions": {"kind": "block_ranges", "size": 50},
    }
    return parse_pipelines({"pipelines": [{**base, **extra}]}).pipelines[0]


def _tick(sensor, instance, defs, cursor=None):
    return sensor(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs))


def test_the_incremental_sensor_follows_the_chain_behind_its_finality(devserver, tmp_path):
    server = devserver(blocks=130)
    pipeline = _spec(server, load("delta")(tmp_path), finality=10)
    sensor = incremental_sensor(pipeline)
    defs = dg.Definitions(assets=build_amp_assets([pipeline]), sensors=[sensor])
    with sqlite_instance(tmp_path / "home") as instance:
        result = _tick(sensor, instance, defs)
        # head 129, final 119: ranges 0..49 and 50..99 are closed, 100..149 is not
        assert [r.partition_key for r in result.run_requests] == [block_key(0, 49), block_key(50, 99)]
        assert [r.run_key for r in result.run_requests] == [f"eth.logs:{block_key(0, 49)}",
                                                            f"eth.logs:{block_key(50, 99)}"]  # fmt: skip
        assert all(r.tags[PIPELINE_TAG] == "eth.logs" for r in result.run_requests)
        (added,) = result.dynamic_partitions_requests
        assert list(added.partition_keys) == [block_key(0, 49), block_key(50, 99)]
        instance.add_dynamic_partitions(block_ranges(pipeline).name, list(added.partition_keys))
        again = _tick(sensor, instance, defs, cursor=result.cursor)
        assert isinstance(again, dg.SkipReason) and "next range 000000000100-000000000149 closes at block 149" in (
            again.skip_message)  # fmt: skip
        server.advance(100)  # head 229, final 219: 100..149 and 150..199 close
        grown = _tick(sensor, instance, defs, cursor=result.cursor)
        assert [r.partition_key for r in grown.run_requests] == [block_key(100, 149), block_key(150, 199)]


def test_the_unpartitioned_incremental_sensor_requests_one_run_per_head_step(devserver, tmp_path):
    server = devserver(blocks=60)
    pipeline = _spec(server, load("delta")(tmp_path), partitions=None)
    sensor = incremental_sensor(pipeline)
    defs = dg.Definitions(assets=build_amp_assets([pipeline]), sensors=[sensor])
    with sqlite_instance(tmp_path / "home") as instance:
        first = _tick(sensor, instance, defs)
        (request,) = first.run_requests
        assert request.run_key == "eth.logs:59"
        dg.materialize(build_amp_assets([pipeline]), instance=instance)
        quiet = _tick(sensor, instance, defs, cursor=first.cursor)
        assert isinstance(quiet, dg.SkipReason) and "loaded through 59" in quiet.skip_message


def test_the_stream_sensor_keeps_exactly_one_run_and_backs_off_after_failures(devserver, tmp_path):
    from dagster._core.test_utils import create_run_for_test

    server = devserver(blocks=10)
    pipeline = _spec(server, load("delta")(tmp_path), name="eth.stream", mode="stream", partitions=None)
    sensor = stream_sensor(pipeline)
    defs = dg.Definitions(assets=build_amp_assets([pipeline]), sensors=[sensor])
    with sqlite_instance(tmp_path / "home") as instance:
        first = _tick(sensor, instance, defs)
        (request,) = first.run_requests
        assert request.tags[STREAM_TAG] == "eth.stream" and request.run_key == "eth.stream:stream:1"
        live = create_run_for_test(instance, job_name="j", tags=request.tags, status=dg.DagsterRunStatus.STARTED)
        busy = _tick(sensor, instance, defs, cursor=first.cursor)
        assert isinstance(busy, dg.SkipReason) and live.run_id in busy.skip_message, "never a second run"
        instance.report_run_failed(live)
        waiting = _tick(sensor, instance, defs, cursor=first.cursor)
        assert isinstance(waiting, dg.SkipReason) and "1 time(s) in a row" in waiting.skip_message
        assert "relaunching in" in waiting.skip_message


def test_the_gap_sensor_launches_one_backfill_over_the_missing_ranges(devserver, tmp_path):
    server = devserver(blocks=260)
    pipeline = _spec(server, load("delta")(tmp_path))
    assets = build_amp_assets([pipeline])
    sensor = gap_sensor([pipeline])
    defs = dg.Definitions(assets=assets, sensors=[sensor])
    with sqlite_instance(tmp_path / "home") as instance:
        ranges = block_ranges(pipeline)
        ranges.add_keys(instance, ranges.keys_through(249))
        for index in (0, 2, 4):
            dg.materialize(assets, instance=instance, partition_key=block_key(50 * index, 50 * index + 49))
        assert find_gaps(instance, pipeline) == [block_key(50, 99), block_key(150, 199)]
        result = _tick(sensor, instance, defs)
        (request,) = result.run_requests
        subset = request.asset_graph_subset
        assert sorted(subset.get_partitions_subset(dg.AssetKey(["eth", "logs"])).get_partition_keys()) == [
            block_key(50, 99), block_key(150, 199)]  # fmt: skip
        again = _tick(sensor, instance, defs, cursor=result.cursor)
        assert isinstance(again, dg.SkipReason) and "launched already" in again.skip_message


@pytest.mark.slow
def test_terminating_a_streaming_run_leaves_destination_and_checkpoint_consistent(devserver, tmp_path):
    server = devserver(blocks=80, microbatch_blocks=10, block_time=0.05)
    harness = load("delta")(tmp_path)
    pipeline = _spec(server, harness, name="eth.stream", mode="stream", partitions=None,
                     flush={"seconds": 0.2})  # fmt: skip
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    spec = tmp_path / "pipelines.yaml"
    import yaml

    spec.write_text(yaml.safe_dump({"pipelines": [pipeline.model_dump(mode="json", exclude_none=True)]}))
    script = (
        "import dagster as dg\n"
        "from amp_dagster.assets import build_amp_assets\n"
        "from amp_dagster.pipelines import load_pipelines\n"
        f"assets = build_amp_assets(load_pipelines({str(spec)!r}).pipelines)\n"
        "print('materializing', flush=True)\n"
        "dg.materialize(assets, instance=dg.DagsterInstance.get(), raise_on_error=False)\n"
        "print('ended', flush=True)\n"
    )
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        from amp_dagster.checkpoints import DagsterCheckpoints
        from amp_dagster.state import load_state

        deadline = time.monotonic() + 90
        with dg.DagsterInstance.from_config(str(home)) as instance:
            store = DagsterCheckpoints(instance)
            while (state := load_state(store, "eth.stream")) is None or state.high < 120:
                assert process.poll() is None and time.monotonic() < deadline, "the stream never got going"
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)  # what terminating the run from the UI does to its process
            process.wait(60)
            state = load_state(store, "eth.stream")
        assert "ended" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    loader = pipeline.destination.build()
    rows = loader.read(pipeline.table_ref()).read_all()
    loader.close()
    verdict = exact(rows, canonical(server, end=state.high))
    assert verdict["ok"], verdict  # exactly the checkpoint's rows: none missing, none past it
    harness.cleanup()
