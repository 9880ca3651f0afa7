"""Asset checks: block continuity passes on a faithful destination and fails, saying why, on missing, duplicated
or forked rows; freshness reports the lag behind amp's head."""

from __future__ import annotations

import dagster as dg

from amp_dagster.assets import block_ranges, build_amp_assets
from amp_dagster.checkpoints import DagsterCheckpoints
from amp_dagster.checks import build_amp_checks, continuity, freshness
from amp_dagster.partitions import block_key
from amp_dagster.pipelines import parse_pipelines
from amp_dagster.ranges import RowRange
from amp_dagster.sensors import build_amp_automation

from .chaincheck import canonical
from .destinations import destination
from .instances import sqlite_instance
from .stores import load


def _pipeline(server, harness, **extra):
    spec = {"name": "eth.logs", "source": {"sql": "SELECT * FROM eth_rpc.logs", "url": server.url}, "table": "logs",
            "destination": destination("delta", harness), "partitions": {"kind": "block_ranges", "size": 50},
            "key": ["block_num", "log_index"], **extra}  # fmt: skip
    return parse_pipelines({"pipelines": [spec]}).pipelines[0]


def test_block_continuity_passes_then_fails_on_missing_duplicated_and_forked_rows(devserver, tmp_path):
    server = devserver(blocks=120)
    pipeline = _pipeline(server, load("delta")(tmp_path))
    assets = build_amp_assets([pipeline])
    with sqlite_instance(tmp_path / "home") as instance:
        block_ranges(pipeline).add_keys(instance, [block_key(0, 49)])
        dg.materialize(assets, instance=instance, partition_key=block_key(0, 49))
    span = [RowRange(0, 49)]
    assert continuity(pipeline, span).passed
    loader, table = pipeline.destination.build(), pipeline.table_ref()
    loader.delete(table, RowRange(10, 10))  # a block goes missing
    missing = continuity(pipeline, span)
    assert not missing.passed and "rows are missing" in missing.description
    rows = loader.read(table, RowRange(20, 20)).read_all()
    loader.write(table, rows)  # a block written twice
    doubled = continuity(pipeline, [RowRange(20, 20)])
    assert not doubled.passed and "duplicated or left over from a fork" in doubled.description
    assert doubled.metadata["amp/duplicate_keys"].value == rows.num_rows
    server.reorg(server.chain.head - 29, length=server.chain.head - 29)  # blocks 30.. fork, same height
    forked = continuity(pipeline, [RowRange(30, 49)])
    assert not forked.passed and forked.metadata["amp/orphaned_blocks"].value >= 15, "blocks of the old fork found"
    loader.close()


def test_freshness_reports_the_lag_behind_the_head(devserver, tmp_path):
    server = devserver(blocks=300)
    pipeline = _pipeline(server, load("delta")(tmp_path), partitions=None)
    with sqlite_instance(tmp_path / "home") as instance:
        dg.materialize(build_amp_assets([pipeline]), instance=instance)
        store = DagsterCheckpoints(instance)
        fresh = freshness(pipeline, store)
        assert fresh.passed and fresh.metadata["amp/lag_blocks"].value == 0
        server.advance(150)
        stale = freshness(pipeline, store)
        assert not stale.passed and stale.metadata["amp/lag_blocks"].value == 150
        assert stale.severity == dg.AssetCheckSeverity.WARN and "150 blocks behind" in stale.description


def test_checks_run_through_dagster_partitioned_like_their_asset(devserver, tmp_path):
    server = devserver(blocks=120)
    pipeline = _pipeline(server, load("delta")(tmp_path))
    assets, checks = build_amp_assets([pipeline]), build_amp_checks([pipeline])
    with sqlite_instance(tmp_path / "home") as instance:
        block_ranges(pipeline).add_keys(instance, [block_key(0, 49)])
        result = dg.materialize([*assets, *checks], instance=instance, partition_key=block_key(0, 49))
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["block_continuity"].passed
    assert evaluations["block_continuity"].metadata["amp/rows_found"].value == canonical(server, end=49).num_rows


def test_a_full_refresh_pipeline_gets_its_schedule(devserver, tmp_path):
    server = devserver(blocks=10)
    pipeline = _pipeline(server, load("delta")(tmp_path), partitions=None, mode="full_refresh", schedule="0 3 * * *")
    sensors, schedules = build_amp_automation([pipeline])
    (schedule,) = schedules
    assert not sensors and schedule.cron_schedule == "0 3 * * *" and schedule.name == "amp_eth_logs_refresh"
