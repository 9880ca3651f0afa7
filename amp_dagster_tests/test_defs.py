"""The demo code location (amp_dagster/definitions.py over the dg defs folder amp_dagster/demo/defs): it loads without
contacting anything, follows its environment variables, materializes a partition of every asset into the embedded
stores with the rows amp gives, and ``make demo`` runs it through Dagster from end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg
import pytest

from amp_dagster.errors import ConfigError

from .services import closed_port

ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = ROOT / "amp_dagster" / "definitions.py"
START = 15_000_000
PARTITIONED = ("eth.blocks", "eth.transactions", "eth.logs", "eth.transfers")
TRANSFER = "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


def load(monkeypatch, **environ: str) -> dg.Definitions:
    """The demo's Definitions loaded afresh under ``environ`` (its settings are read at load)."""
    for name in [n for n in os.environ if n.startswith("AMP_DEMO_")]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return dg.load_from_defs_folder(path_within_project=DEFINITIONS.parent)


def pipelines(defs: dg.Definitions) -> dict:
    from amp_dagster.assets import pipeline_of

    return {pipeline_of(spec).name: pipeline_of(spec) for a in defs.assets for spec in a.specs}


def test_the_demo_definitions_load():
    from amp_dagster.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "eth/blocks", "eth/transactions", "eth/logs", "eth/transfers", "eth/transfers_live"}  # fmt: skip
    assert {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys} == {
        (f"eth/{t}", check) for t in ("blocks", "transactions", "logs", "transfers", "transfers_live")
        for check in ("block_continuity", "freshness")}  # fmt: skip
    assert {s.name for s in defs.sensors} == {
        "amp_eth_blocks_incremental", "amp_eth_transactions_incremental", "amp_eth_logs_incremental",
        "amp_eth_transfers_incremental", "amp_eth_transfers_live_stream", "amp_gaps"}  # fmt: skip
    by_name = pipelines(defs)
    assert by_name["eth.transfers_live"].mode == "stream" and by_name["eth.transfers_live"].partitions is None
    for name in PARTITIONED:
        definition = graph.get(dg.AssetKey(name.split("."))).partitions_def
        assert isinstance(definition, dg.DynamicPartitionsDefinition) and definition.name == "eth_block_ranges"
    # a pool per pipeline: one writer per checkpoint (and per chdb directory) at a time; the continuity checks of
    # batch pipelines read the destination under it too (a stream's run holds its slot while it runs)
    assert {a.op.pool for a in defs.assets} == {"amp_" + n.replace(".", "_") for n in by_name}
    check_pools = {next(iter(c.check_keys)).name + " " + next(iter(c.check_keys)).asset_key.to_user_string():
                   c.node_def.pool for c in defs.asset_checks}  # fmt: skip
    assert check_pools == {
        **{f"block_continuity eth/{t}": f"amp_eth_{t}" for t in ("blocks", "transactions", "logs", "transfers")},
        "block_continuity eth/transfers_live": None,
        **{f"freshness eth/{t}": None for t in ("blocks", "transactions", "logs", "transfers", "transfers_live")},
    }
    kinds = {p.name: p.destination.kind for p in by_name.values()}
    assert kinds == {"eth.blocks": "delta", "eth.transactions": "iceberg", "eth.logs": "delta",
                     "eth.transfers": "clickhouse", "eth.transfers_live": "delta"}  # fmt: skip


def test_loading_the_demo_contacts_neither_amp_nor_a_store(tmp_path):
    stores = tmp_path / "stores"
    script = ("import sys, amp_dagster.definitions; "
              "print(sorted(m for m in ('chdb', 'clickhouse_connect', 'deltalake', 'pyiceberg', 'psycopg', 'redis') "
              "if m in sys.modules))")  # fmt: skip
    env = {**os.environ, "AMP_URL": f"grpc://127.0.0.1:{closed_port()}", "AMP_DEMO_DIR": str(stores)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "[]"  # no store driver imported
    assert not stores.exists()  # nothing created: chdb would make its directory


def test_the_demo_destinations_follow_the_environment(monkeypatch, tmp_path):
    embedded = pipelines(load(monkeypatch, AMP_DEMO_DIR=str(tmp_path), AMP_URL="grpc://amp.example:1602"))
    assert embedded["eth.logs"].destination.path == str(tmp_path / "delta")
    assert embedded["eth.transactions"].destination.warehouse == str(tmp_path / "iceberg")
    assert embedded["eth.transfers"].destination.dsn == f"chdb://{tmp_path / 'chdb'}"
    assert {p.source.url for p in embedded.values()} == {"grpc://amp.example:1602"}

    postgres = pipelines(load(monkeypatch, AMP_DEMO_DESTINATION="postgres", AMP_DEMO_NAMESPACE="mine",
                              AMP_DEMO_POSTGRES_DSN="postgresql://db.example:5433/chain"))  # fmt: skip
    assert {(p.destination.kind, p.destination.dsn, p.namespace) for p in postgres.values()} == {
        ("postgres", "postgresql://db.example:5433/chain", "mine")}  # fmt: skip

    redis = pipelines(load(monkeypatch, AMP_DEMO_DESTINATION="Redis", AMP_DEMO_REDIS_URL="redis://cache:6380/2"))
    assert {(p.destination.kind, p.destination.url) for p in redis.values()} == {("redis", "redis://cache:6380/2")}

    with pytest.raises(Exception, match=r"defs\.yaml") as caught:  # dg names the file; the cause says what is wrong
        load(monkeypatch, AMP_DEMO_DESTINATION="mongo")
    causes, error = [], caught.value
    while error is not None:
        causes.append(error)
        error = error.__cause__ or error.__context__
    (cause,) = [e for e in causes if isinstance(e, ConfigError)]
    wanted = "AMP_DEMO_DESTINATION='mongo' is not a demo destination: use embedded, postgres, redis (or unset it"
    assert str(cause) == wanted + " for embedded)"


@pytest.mark.slow
def test_a_partition_of_every_demo_asset_and_a_bounded_stream_into_the_embedded_stores(
    devserver, monkeypatch, tmp_path
):
    from amp_dagster.flight.client import AmpClient
    from amp_dagster.partitions import BlockRanges

    from .stores.clickhouse import CHDB_DSN, admin

    server = devserver(start_block=START, blocks=250, seed=5, microbatch_blocks=50)
    namespace = f"demo_{uuid.uuid4().hex[:8]}"
    admin()  # the test process's one chdb engine (the suite's ClickHouse harness): a database of its own here
    defs = load(monkeypatch, AMP_URL=server.url, AMP_DEMO_DIR=str(tmp_path), AMP_DEMO_CLICKHOUSE_DSN=CHDB_DSN,
                AMP_DEMO_NAMESPACE=namespace)  # fmt: skip
    by_name = pipelines(defs)
    key = BlockRanges("eth_block_ranges", 100, START).key_of(START + 100)
    job = defs.resolve_implicit_global_asset_job_def()
    try:
        home = tmp_path / "home"
        home.mkdir()
        shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")  # its pools have limits: the assets require them
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions("eth_block_ranges", [key])
            partitioned = [dg.AssetKey(n.split(".")) for n in PARTITIONED]
            result = job.execute_in_process(instance=instance, asset_selection=partitioned, partition_key=key)
            assert result.success
            checks = {(e.asset_key.to_user_string(), e.check_name): e.passed
                      for e in result.get_asset_check_evaluations()}  # fmt: skip
            assert all(checks[(k.to_user_string(), "block_continuity")] for k in partitioned), checks

            live = dg.AssetKey(["eth", "transfers_live"])
            stream = job.execute_in_process(instance=instance, asset_selection=[live],
                                            tags={"amp/until_block": str(START + 249)})  # fmt: skip
            assert stream.success
            (last,) = stream.get_asset_materialization_events()[-1:]
            assert last.materialization.metadata["amp/stopped"].value == "until"

        amp = AmpClient(server.url)
        where = f"_block_num BETWEEN {START + 100} AND {START + 199}"
        transfers = f"topic0 = X'{TRANSFER}' AND topic3 IS NULL"
        want = {
            "eth.blocks": f"SELECT count(*) AS n FROM eth_rpc.blocks WHERE {where}",
            "eth.transactions": f"SELECT count(*) AS n FROM eth_rpc.transactions WHERE {where}",
            "eth.logs": f"SELECT count(*) AS n FROM eth_rpc.logs WHERE {where}",
            "eth.transfers": f"SELECT count(*) AS n FROM eth_rpc.logs WHERE {where} AND {transfers}",
            "eth.transfers_live": f"SELECT count(*) AS n FROM eth_rpc.logs WHERE {transfers}",
        }
        for name, sql in want.items():
            expected = int(amp.query(sql).reader.read_all().column("n")[0].as_py())
            pipeline = by_name[name]
            loader = pipeline.destination.build()
            try:
                assert loader.count(pipeline.table_ref()) == expected > 0, name
            finally:
                loader.close()
    finally:
        admin().command(f"DROP DATABASE IF EXISTS `{namespace}`")


def test_a_bounding_tag_that_is_not_a_number_fails_the_run_naming_it(monkeypatch, tmp_path):
    defs = load(monkeypatch, AMP_URL=f"grpc://127.0.0.1:{closed_port()}", AMP_DEMO_DIR=str(tmp_path))
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(["eth", "transfers_live"])],
            tags={"amp/until_block": "soon"}, raise_on_error=False)  # fmt: skip
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_failure_data.user_failure_data.description == (
        "run tag amp/until_block='soon' is not a block number: fix the tag or remove it")  # fmt: skip


@pytest.mark.slow
def test_make_demo_runs_through_dagster_and_every_table_equals_amp(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMP_DEMO_", "AMP_URL", "DAGSTER_HOME"))}
    done = subprocess.run([sys.executable, "-m", "amp_dagster.demo", "--dir", str(tmp_path / "demo")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "every table equals amp's result: yes" in done.stdout
    assert "1 reorg undone" in done.stdout
    assert "the ranges were replaced, not appended" in done.stdout
