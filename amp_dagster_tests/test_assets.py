"""amp assets in Dagster: partitions replaced exactly (never touching others), single-run backfills, every
destination, metadata, sqlite and PostgreSQL-backed instances, and the errors a user can make."""

from __future__ import annotations

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from amp_dagster.assets import block_ranges, build_amp_asset_specs, build_amp_assets
from amp_dagster.partitions import block_key
from amp_dagster.pipelines import parse_pipelines
from amp_dagster.ranges import RowRange

from .chaincheck import canonical, exact
from .destinations import STORES, destination, require
from .instances import postgres_instance, sqlite_instance
from .stores import load

LOGS = "SELECT * FROM eth_rpc.logs"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def pipeline_spec(server, harness, name: str, **extra) -> dict:
    return {
        "name": "eth.logs",
        "source": {"sql": LOGS, "url": server.url},
        "destination": destination(name, harness),
        "namespace": harness.namespace,
        "table": "logs",
        "partitions": {"kind": "block_ranges", "size": 50},
        **extra,
    }


def keys(*indexes: int) -> list[str]:
    return [block_key(50 * i, 50 * i + 49) for i in indexes]


def materialize(assets, instance, **kw):
    return dg.materialize(assets, instance=instance, raise_on_error=True, **kw)


def by_partition(rows: pa.Table, index: int) -> pa.Table:
    low, high = 50 * index, 50 * index + 49
    blocks = rows["_block_num"]
    return rows.filter(pc.and_(pc.greater_equal(blocks, low), pc.less_equal(blocks, high)))


@pytest.mark.parametrize("name", STORES)
def test_partitions_are_replaced_exactly_and_a_range_run_equals_single_runs(name, devserver, tmp_path):
    require(name)
    server = devserver(blocks=260)
    harness = load(name)(tmp_path)
    try:
        pipeline = parse_pipelines({"pipelines": [pipeline_spec(server, harness, name)]}).pipelines[0]
        assets = build_amp_assets([pipeline])
        with sqlite_instance(tmp_path / "home") as instance:
            ranges = block_ranges(pipeline)
            ranges.add_keys(instance, ranges.keys_through(249))
            for key in keys(0, 1, 2):
                materialize(assets, instance, partition_key=key)
            loader = pipeline.destination.build()
            table = pipeline.table_ref()
            first = loader.read(table).read_all()
            materialize(assets, instance, partition_key=keys(1)[0])  # the same partition again
            again = loader.read(table).read_all()
            assert exact(again, canonical(server, end=149))["ok"], "twice = once"
            assert exact(again, first)["ok"]
            # one run over partitions 1..3 (a single-run backfill) next to untouched partitions 0 and 4
            materialize(assets, instance, partition_key=keys(4)[0])
            before = loader.read(table).read_all()
            result = materialize(assets, instance, tags={RANGE_START: keys(1)[0], RANGE_END: keys(3)[0]})
            after = loader.read(table).read_all()
            loader.close()
            assert exact(after, canonical(server, end=249))["ok"]
            for untouched in (0, 4):
                assert exact(by_partition(after, untouched), by_partition(before, untouched))["ok"]
            events = result.asset_materializations_for_node(assets[0].node_def.name)
            counts = {e.partition: e.metadata["dagster/partition_row_count"].value for e in events}
            assert counts == {k: by_partition(after, i).num_rows for k, i in zip(keys(1, 2, 3), (1, 2, 3),
                                                                                  strict=True)}  # fmt: skip
            assert {e.metadata["amp/ranges"].value for e in events} == {"50..=199"}, "one query, one replace"
            own = {
                e.partition: (e.metadata["amp/first_block"].value, e.metadata["amp/last_block"].value) for e in events
            }
            assert own == {k: (50 * i, 50 * i + 49) for k, i in zip(keys(1, 2, 3), (1, 2, 3), strict=True)}
    finally:
        harness.cleanup()


@pytest.mark.parametrize("instance_kind", ["sqlite", "postgres"])
def test_unpartitioned_incremental_and_full_refresh_on_each_instance_kind(instance_kind, devserver, tmp_path):
    require("postgres")
    server = devserver(blocks=120)
    harness = load("delta")(tmp_path)
    make = sqlite_instance if instance_kind == "sqlite" else postgres_instance
    spec = parse_pipelines({"pipelines": [
        {**pipeline_spec(server, harness, "delta"), "partitions": None, "blocks_per_query": 40, "finality": 5},
        {**pipeline_spec(server, harness, "delta"), "name": "eth.first_blocks", "table": "first", "partitions": None,
         "mode": "full_refresh", "source": {"sql": "SELECT * FROM eth_rpc.blocks WHERE _block_num < 10",
                                             "url": server.url}},
    ]})  # fmt: skip
    assets = build_amp_assets(spec.pipelines)
    with make(tmp_path / "home") as instance:
        result = materialize(assets, instance)
        incremental = spec.get("eth.logs")
        loader = incremental.destination.build()
        assert exact(loader.read(incremental.table_ref()).read_all(), canonical(server, end=114))["ok"]
        server.advance(30)
        materialize(assets, instance, selection=["eth/logs"])
        assert exact(loader.read(incremental.table_ref()).read_all(), canonical(server, end=144))["ok"]
        full = spec.get("eth.first_blocks")
        assert loader.read(full.table_ref()).read_all().num_rows == 10
        events = {e.asset_key.to_user_string(): e for n in ("amp_eth_logs", "amp_eth_first_blocks")
                  for e in result.asset_materializations_for_node(n)}  # fmt: skip
        md = events["eth/logs"].metadata
        assert md["dagster/row_count"].value == canonical(server, end=114).num_rows
        assert md["amp/checkpoint_block"].value == 114 and md["amp/last_block"].value == 114
        assert md["dagster/table_name"].value == f"{harness.namespace}.logs"
        assert "amp/watermark_hash" not in md, "5 blocks behind the head, the hash of block 114 is not known"
        assert md["dagster/column_schema"].value.columns[0].name == "_block_num"
        checkpoint = md["amp/checkpoint"].value["checkpoint"]
        assert checkpoint["high"] == 114 and checkpoint["pipeline"] == "eth.logs"
        assert events["eth/first_blocks"].metadata["dagster/row_count"].value == 10
        loader.close()
    harness.cleanup()


def test_specs_carry_kinds_groups_and_the_pipeline(devserver, tmp_path):
    server = devserver(blocks=10)
    harness = load("delta")(tmp_path)
    spec = parse_pipelines({"pipelines": [{**pipeline_spec(server, harness, "delta"), "group": "chain"}]})
    (asset_spec,) = build_amp_asset_specs(spec.pipelines)
    assert asset_spec.key == dg.AssetKey(["eth", "logs"])
    assert asset_spec.kinds == {"amp", "delta"} and asset_spec.group_name == "chain"
    assert asset_spec.metadata["amp/pipeline"].value["name"] == "eth.logs"
    (assets,) = build_amp_assets(spec.pipelines)
    assert (
        isinstance(assets.backfill_policy, dg.BackfillPolicy) and assets.backfill_policy.max_partitions_per_run is None
    )
    dg.Definitions(assets=[assets]).resolve_all_job_defs()


def test_metadata_enrichment_never_fails_a_materialization(devserver, tmp_path, monkeypatch):
    import amp_dagster.assets as assets_module

    server = devserver(blocks=60)
    harness = load("delta")(tmp_path)
    spec = parse_pipelines({"pipelines": [{**pipeline_spec(server, harness, "delta"), "partitions": None}]})

    def broken(*args):
        raise RuntimeError("the schema lookup broke")

    monkeypatch.setattr(assets_module, "_schema_metadata", broken)
    with sqlite_instance(tmp_path / "home") as instance:
        result = materialize(build_amp_assets(spec.pipelines), instance)
    (event,) = result.asset_materializations_for_node("amp_eth_logs")
    assert event.metadata["dagster/row_count"].value == canonical(server, end=59).num_rows
    assert "dagster/column_schema" not in event.metadata


def test_a_partitioned_query_without_a_block_column_fails_clearly(devserver, tmp_path):
    server = devserver(blocks=60)
    harness = load("delta")(tmp_path)
    source = {"sql": "SELECT log_index FROM eth_rpc.logs", "url": server.url}
    spec = parse_pipelines({"pipelines": [{**pipeline_spec(server, harness, "delta"), "source": source}]})
    assets = build_amp_assets(spec.pipelines)
    with sqlite_instance(tmp_path / "home") as instance:
        block_ranges(spec.pipelines[0]).add_keys(instance, keys(0))
        with pytest.raises(Exception, match="_block_num"):
            materialize(assets, instance, partition_key=keys(0)[0])


def test_an_unreachable_amp_fails_with_its_address(tmp_path):
    from .services import closed_port

    harness = load("delta")(tmp_path)
    spec = parse_pipelines({"pipelines": [{
        "name": "eth.logs", "source": {"sql": LOGS, "url": f"grpc://127.0.0.1:{closed_port()}"}, "table": "logs",
        "destination": destination("delta", harness), "retry": {"attempts": 1}}]})  # fmt: skip
    with sqlite_instance(tmp_path / "home") as instance, pytest.raises(Exception, match=r"amp at grpc://127\.0\.0\.1"):
        materialize(build_amp_assets(spec.pipelines), instance)


def test_a_pool_the_instance_does_not_limit_is_refused(devserver, tmp_path):
    server = devserver(blocks=20)
    harness = load("delta")(tmp_path)
    spec = parse_pipelines({"pipelines": [{**pipeline_spec(server, harness, "delta"), "partitions": None,
                                          "pool": "amp_nowhere"}]})  # fmt: skip
    with sqlite_instance(tmp_path / "home") as instance:
        with pytest.raises(Exception, match=r"pool 'amp_nowhere' has no limit"):
            materialize(build_amp_assets(spec.pipelines), instance)
        instance.event_log_storage.set_concurrency_slots("amp_nowhere", 1)
        materialize(build_amp_assets(spec.pipelines), instance)


def test_a_wrong_destination_config_names_the_field():
    from amp_dagster.errors import ConfigError

    with pytest.raises(ConfigError, match=r"pipelines\[0\]\.destination\.dsn: Field required"):
        parse_pipelines({"pipelines": [{"name": "x", "source": {"sql": "SELECT 1"}, "table": "t",
                                        "destination": {"kind": "postgres"}}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"destination: Input tag 'mysql' found using 'kind' does not match"):
        parse_pipelines({"pipelines": [{"name": "x", "source": {"sql": "SELECT 1"}, "table": "t",
                                        "destination": {"kind": "mysql"}}]})  # fmt: skip


def test_rows_outside_a_partition_never_land(devserver, tmp_path):
    """A query that ignores the block predicate cannot write rows of other partitions: they are refused."""
    server = devserver(blocks=120)
    harness = load("delta")(tmp_path)
    spec = parse_pipelines({"pipelines": [pipeline_spec(server, harness, "delta")]})
    assets = build_amp_assets(spec.pipelines)
    with sqlite_instance(tmp_path / "home") as instance:
        block_ranges(spec.pipelines[0]).add_keys(instance, keys(0, 1))
        materialize(assets, instance, partition_key=keys(0)[0])
        loader = spec.pipelines[0].destination.build()
        rows = loader.read(spec.pipelines[0].table_ref(), RowRange(50, 99)).read_all()
        assert rows.num_rows == 0, "partition 1 was never touched"
        loader.close()
