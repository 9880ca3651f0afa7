"""AmpIOManager on the real stores: a partition run replaces exactly its blocks and never another partition's (single
keys, single-run backfills, non-contiguous key sets, time windows through a dev server), every output and input
type, errors that say what to fix, metadata that never fails a run, and sqlite and PostgreSQL Dagster instances.

Annotations are evaluated (no ``from __future__ import annotations``): Dagster reads them to type inputs.
"""

import datetime as dt
from collections.abc import Sequence

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from amp_dagster import io_managers
from amp_dagster.errors import ConfigError, ServiceUnavailableError, TerminalError
from amp_dagster.io_managers import AmpIOManager
from amp_dagster.partitions import BlockRanges, block_key, keys_to_ranges
from amp_dagster.ranges import RowRange
from amp_dagster.resources import (
    AmpResource,
    ClickHouseResource,
    DeltaResource,
    DestinationResource,
    IcebergResource,
    LmdbResource,
    PostgresResource,
    RedisResource,
)

from . import services
from .instances import postgres_instance, sqlite_instance
from .services import POSTGRES_DSN, REDIS_URL, closed_port
from .stores import Harness, load

RANGES = BlockRanges("amp_io_blocks", size=10)
KEYS = [block_key(i * 10, i * 10 + 9) for i in range(5)]  # p0..p4: blocks 0-9, 10-19, ..., 40-49
KEY = ("_block_num", "log_index")
RANGE_TAGS = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
DESTINATIONS = ["postgres", "redis", "clickhouse", "delta", "iceberg", "lmdb"]


def destination(name: str, store: Harness) -> DestinationResource:
    """The resource writing where the store's harness reads (and cleans up)."""
    tmp = store.tmp_path
    if name == "postgres":
        return PostgresResource(dsn=POSTGRES_DSN)
    if name == "redis":
        return RedisResource(url=REDIS_URL, prefix=store.namespace)
    if name == "clickhouse":
        from .stores.clickhouse import CHDB_DSN

        return ClickHouseResource(dsn=CHDB_DSN)
    if name == "delta":
        return DeltaResource(path=str(tmp / "delta"))
    if name == "iceberg":
        return IcebergResource(warehouse=str(tmp / "warehouse"))
    return LmdbResource(path=str(tmp / "lmdb"))


@pytest.fixture
def make_store(tmp_path):
    harnesses: list[Harness] = []

    def make(name: str) -> Harness:
        if name == "postgres":
            services.require_postgres()
        if name == "redis":
            services.require_redis()
        harness = load(name)(tmp_path / f"{name}{len(harnesses)}")
        harness.tmp_path.mkdir(parents=True)
        harness.loader()  # opens what the store needs first (chdb's engine)
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        harness.cleanup()


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    # one instance for the module (creating one costs seconds); every test writes to its own tables
    with sqlite_instance(tmp_path_factory.mktemp("dagster_home")) as instance:
        RANGES.add_keys(instance, KEYS)
        yield instance


def events(spans: Sequence[RowRange], run: str) -> pa.Table:
    """Two rows per block of ``spans``; ``run`` tells which run wrote a row."""
    blocks = np.concatenate([np.arange(s.start, s.end + 1, dtype=np.uint64) for s in spans]) if spans else []
    blocks = np.repeat(np.asarray(blocks, dtype=np.uint64), 2)
    index = np.tile(np.array([0, 1], dtype=np.uint32), len(blocks) // 2)
    return pa.table(
        {
            "_block_num": pa.array(blocks, pa.uint64()),
            "log_index": pa.array(index, pa.uint32()),
            "value": pa.array([f"{b}:{i}" for b, i in zip(blocks.tolist(), index.tolist(), strict=True)], pa.string()),
            "amount": pa.array(blocks * 1.5 + index, pa.float64()),
            "run": pa.array([run] * len(blocks), pa.string()),
        }
    )


def as_output(table: pa.Table, kind: str):
    if kind == "reader":
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=7))
    if kind == "polars":
        return pl.from_arrow(table)
    if kind == "lazy":
        return pl.from_arrow(table).lazy().filter(pl.col("log_index") >= 0)
    return table


def block_asset(kind: str = "table", name: str = "events", **asset_args):
    """A block-range partitioned asset returning the rows of its run's blocks as ``kind``."""

    @dg.asset(
        name=name,
        partitions_def=RANGES.definition,
        backfill_policy=dg.BackfillPolicy.single_run(),
        metadata={"key": list(KEY)},
        **asset_args,
    )
    def _asset(context: dg.AssetExecutionContext):
        return as_output(events(keys_to_ranges(context.partition_keys), context.run.run_id), kind)

    return _asset


def run(assets, io_manager, instance, keys: Sequence[str] | str, **kw) -> dg.ExecuteInProcessResult:
    """One run over one partition key, or a single-run backfill over ``keys[0]..keys[-1]``."""
    keys = [keys] if isinstance(keys, str) else keys
    tags = {} if len(keys) == 1 else dict(zip(RANGE_TAGS, (keys[0], keys[-1]), strict=True))
    partition = keys[0] if len(keys) == 1 else None
    resources = {"io_manager": io_manager, **kw.pop("resources", {})}
    return dg.materialize(assets, instance=instance, partition_key=partition, tags=tags, resources=resources, **kw)


def stored(store: Harness, name: str = "events", key=KEY) -> pa.Table:
    table = store.table(name, key=key)
    return store.read_back(store.loader(), table).sort_by([("_block_num", "ascending"), ("log_index", "ascending")])


def partition_rows(rows: pa.Table, key: str) -> pa.Table:
    (span,) = keys_to_ranges([key])
    column = rows.column("_block_num")
    return rows.filter(pc.and_(pc.greater_equal(column, span.start), pc.less_equal(column, span.end)))


def counts(rows: pa.Table) -> dict[str, int]:
    return {key: partition_rows(rows, key).num_rows for key in KEYS}


def without_run(rows: pa.Table) -> list[dict]:
    return rows.drop_columns(["run"]).to_pylist()


def run_ids(rows: pa.Table) -> set[str]:
    return set(rows.column("run").to_pylist())


# -- partitions replace exactly their rows, on every store -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", DESTINATIONS)
def test_partition_runs_replace_exactly_their_blocks(name, make_store, instance):
    store = make_store(name)
    io_manager = AmpIOManager(destination=destination(name, store), schema=store.namespace)
    asset = block_asset()

    for key in KEYS[:3]:  # p0, p1, p2: one run each
        assert run([asset], io_manager, instance, key).success
    assert counts(stored(store)) == {KEYS[0]: 20, KEYS[1]: 20, KEYS[2]: 20, KEYS[3]: 0, KEYS[4]: 0}

    before = stored(store)
    again = run([asset], io_manager, instance, KEYS[1])  # the same partition twice: the same rows, not twice
    after = stored(store)
    assert without_run(after) == without_run(before)
    assert run_ids(partition_rows(after, KEYS[1])) == {again.run_id}, "p1 was rewritten by the second run"
    assert partition_rows(after, KEYS[0]).to_pylist() == partition_rows(before, KEYS[0]).to_pylist()

    for key in KEYS[3:]:  # p3, p4: now every partition has rows
        assert run([asset], io_manager, instance, key).success
    singles = stored(store)

    backfill = run([asset], io_manager, instance, KEYS[1:4])  # one run over p1..p3
    assert len(backfill.asset_materializations_for_node("events")) == 3
    final = stored(store)
    assert counts(final) == dict.fromkeys(KEYS, 20)
    assert without_run(final) == without_run(singles), "the single-run backfill equals three single runs"
    for key in (KEYS[0], KEYS[4]):  # untouched: the very rows of their own runs
        assert partition_rows(final, key).to_pylist() == partition_rows(singles, key).to_pylist()
    for key in KEYS[1:4]:
        assert run_ids(partition_rows(final, key)) == {backfill.run_id}


def test_metadata_of_single_and_range_runs(make_store, instance):
    store = make_store("postgres")
    io_manager = AmpIOManager(destination=destination("postgres", store), schema=store.namespace)
    asset = block_asset()

    (single,) = run([asset], io_manager, instance, KEYS[2]).asset_materializations_for_node("events")
    md = {k: v.value for k, v in single.metadata.items()}
    assert single.partition == KEYS[2]
    assert md["dagster/partition_row_count"] == 20
    assert md["dagster/table_name"] == f"{store.namespace}.events"
    assert md["dagster/uri"] == "postgres://127.0.0.1:5432/test"
    columns = md["dagster/column_schema"].columns
    assert [(c.name, c.type) for c in columns][:2] == [("_block_num", "uint64"), ("log_index", "uint32")]
    assert [c.name for c in columns][2:] == ["value", "amount", "run"]
    assert (md["amp/start_block"], md["amp/end_block"], md["amp/block_ranges"]) == (20, 29, "20..=29")
    assert md["amp/bytes"] > 0 and md["amp/seconds"] >= 0 and md["amp/rows_per_second"] >= 0

    ranged = run([asset], io_manager, instance, KEYS[0:3]).asset_materializations_for_node("events")
    by_key = {m.partition: {k: v.value for k, v in m.metadata.items()} for m in ranged}
    assert sorted(by_key) == KEYS[0:3]
    for i, key in enumerate(KEYS[0:3]):  # each partition its own rows and blocks
        assert by_key[key]["dagster/partition_row_count"] == 20
        assert (by_key[key]["amp/start_block"], by_key[key]["amp/end_block"]) == (i * 10, i * 10 + 9)
        assert by_key[key]["amp/block_ranges"] == "0..=29"


def test_unpartitioned_asset_is_a_full_refresh(make_store, instance):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)
    size = {"blocks": 30}

    @dg.asset(name="events", metadata={"key": list(KEY)})
    def snapshot(context: dg.AssetExecutionContext) -> pa.Table:
        return events([RowRange(0, size["blocks"] - 1)], context.run.run_id)

    first = dg.materialize([snapshot], instance=instance, resources={"io_manager": io_manager})
    assert stored(store).num_rows == 60
    size["blocks"] = 5
    second = dg.materialize([snapshot], instance=instance, resources={"io_manager": io_manager})
    rows = stored(store)
    assert rows.num_rows == 10 and run_ids(rows) == {second.run_id}, "the old rows are gone"
    (event,) = second.asset_materializations_for_node("events")
    assert event.metadata["dagster/row_count"].value == 10
    assert first.success


def test_keys_whose_blocks_are_not_contiguous_replace_each_span_and_nothing_between(make_store, tmp_path):
    store = make_store("postgres")
    io_manager = AmpIOManager(destination=destination("postgres", store), schema=store.namespace)
    asset = block_asset()
    # key order is insertion order: a range from 0-9 to 20-29 holds those two and not 10-19, added last
    keys = [KEYS[0], KEYS[2], KEYS[1]]
    with sqlite_instance(tmp_path / "home") as instance:
        RANGES.add_keys(instance, keys)
        for key in keys:
            run([asset], io_manager, instance, key)
        before = stored(store)
        result = run([asset], io_manager, instance, [KEYS[0], KEYS[2]])
    after = stored(store)
    assert len(result.asset_materializations_for_node("events")) == 2
    assert counts(after) == {KEYS[0]: 20, KEYS[1]: 20, KEYS[2]: 20, KEYS[3]: 0, KEYS[4]: 0}
    assert partition_rows(after, KEYS[1]).to_pylist() == partition_rows(before, KEYS[1]).to_pylist()
    for key in (KEYS[0], KEYS[2]):
        assert run_ids(partition_rows(after, key)) == {result.run_id}
    metadata = result.asset_materializations_for_node("events")[0].metadata
    assert metadata["amp/block_ranges"].value == "0..=9, 20..=29"


# -- output and input types -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["table", "reader", "polars", "lazy"])
def test_every_output_type(kind, make_store, instance):
    store = make_store("lmdb")
    io_manager = AmpIOManager(destination=destination("lmdb", store), schema=store.namespace)
    asset = block_asset(kind)
    run([asset], io_manager, instance, KEYS[1])
    result = run([asset], io_manager, instance, KEYS[1:3])
    rows = stored(store)
    expected = events(keys_to_ranges(KEYS[1:3]), result.run_id)
    assert rows.select(expected.schema.names).cast(expected.schema).to_pylist() == expected.to_pylist()
    events_ = result.asset_materializations_for_node("events")
    assert [m.metadata["dagster/partition_row_count"].value for m in events_] == [20, 20]


def test_a_lazy_frame_is_streamed_in_batches(make_store, instance, monkeypatch):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)
    collected: list[int] = []
    real = pl.LazyFrame.collect_batches

    def spy(self, *args, **kwargs):
        for frame in real(self, *args, **kwargs):
            collected.append(frame.height)
            yield frame

    monkeypatch.setattr(pl.LazyFrame, "collect_batches", spy)
    monkeypatch.setattr(pl.LazyFrame, "collect", lambda *a, **k: pytest.fail("the LazyFrame was collected whole"))
    run([block_asset("lazy")], io_manager, instance, KEYS[0:4])
    assert stored(store).num_rows == 80 and sum(collected) == 80


ANNOTATIONS = [pa.Table, pa.RecordBatchReader, pl.DataFrame, pl.LazyFrame]


def test_inputs_load_as_annotated_for_a_partition_a_range_and_the_whole_table(make_store, instance):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)
    upstream = block_asset()
    seen: dict[str, list] = {"partition": [], "whole": []}

    def as_table(value) -> pa.Table:
        if isinstance(value, pl.LazyFrame):
            value = value.collect()
        if isinstance(value, pl.DataFrame):
            return value.to_arrow()
        return value.read_all() if isinstance(value, pa.RecordBatchReader) else value

    def downstream(annotation, name: str, upstream_name: str, partitioned: bool):
        """An asset whose one input, annotated ``annotation``, is recorded in ``seen[name]``; it returns None."""
        options = {"name": f"{name}_{annotation.__name__}", "ins": {"rows": dg.AssetIn(upstream_name)}}
        if partitioned:
            options |= {"partitions_def": RANGES.definition, "backfill_policy": dg.BackfillPolicy.single_run()}

        @dg.asset(**options)
        def _asset(rows: annotation) -> None:  # type: ignore[valid-type]
            seen[name].append((annotation, type(rows), as_table(rows)))

        return _asset

    per_partition = [downstream(t, "partition", "events", partitioned=True) for t in ANNOTATIONS]
    whole = [downstream(t, "whole", "full", partitioned=False) for t in ANNOTATIONS]

    @dg.asset(name="full", metadata={"key": list(KEY)})
    def full(context: dg.AssetExecutionContext) -> pa.Table:
        return events([RowRange(100, 104)], context.run.run_id)

    run([upstream], io_manager, instance, KEYS[0:4])
    run([upstream, *per_partition], io_manager, instance, KEYS[2], selection=per_partition)
    run([upstream, *per_partition], io_manager, instance, KEYS[1:3], selection=per_partition)
    dg.materialize([full, *whole], instance=instance, resources={"io_manager": io_manager})

    def blocks(rows: pa.Table) -> list[int]:
        return sorted(set(rows.column("_block_num").to_pylist()))

    assert [(want, got) for want, got, _ in seen["partition"] + seen["whole"] if got is not want] == []
    one, ranged = seen["partition"][:4], seen["partition"][4:]
    assert [(blocks(rows), rows.num_rows) for *_, rows in one] == [([*range(20, 30)], 20)] * 4, "one partition"
    assert [(blocks(rows), rows.num_rows) for *_, rows in ranged] == [([*range(10, 30)], 40)] * 4, "a range"
    assert [(blocks(rows), rows.num_rows) for *_, rows in seen["whole"]] == [([*range(100, 105)], 10)] * 4
    with pytest.raises(TerminalError, match="does not exist"):  # a None output writes nothing
        store.loader().read(store.table("partition_Table")).read_all()


def test_a_lazy_input_applies_projection_filter_and_limit_at_each_collect(make_store, instance):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)
    seen: list = []

    @dg.asset(partitions_def=RANGES.definition, backfill_policy=dg.BackfillPolicy.single_run())
    def top(events: pl.LazyFrame) -> None:
        query = events.filter(pl.col("log_index") == 1).select("_block_num", "value").head(3)
        seen.append((query.collect(), query.collect()))  # collected twice: read twice, afresh

    run([block_asset()], io_manager, instance, KEYS[0:2])
    run([block_asset(), top], io_manager, instance, KEYS[0:2], selection=[top])
    first, second = seen[0]
    assert first.columns == ["_block_num", "value"] and first.equals(second)
    assert first["value"].to_list() == ["0:1", "1:1", "2:1"]


# -- time windows mapped to blocks through amp -------------------------------------------------------------------


DAYS = dg.DailyPartitionsDefinition(start_date="2015-07-30", end_date="2015-08-03")


@pytest.mark.slow
def test_daily_partitions_replace_exactly_their_window_of_blocks(devserver, make_store, instance):
    server = devserver(blocks=20_000, block_time=0)
    store = make_store("postgres")
    amp = AmpResource(url=server.url)
    io_manager = AmpIOManager(destination=destination("postgres", store), schema=store.namespace, amp=amp)

    @dg.asset(partitions_def=DAYS, backfill_policy=dg.BackfillPolicy.single_run())
    def blocks(context: dg.AssetExecutionContext, amp: AmpResource):
        window = context.partition_time_window
        low, high = int(window.start.timestamp()), int(window.end.timestamp())
        sql = (
            f"SELECT _block_num, hash, '{context.run.run_id}' AS run FROM eth_rpc.blocks "
            f"WHERE timestamp >= to_timestamp({low}) AND timestamp < to_timestamp({high})"
        )
        # a QueryResult (an Arrow stream): read from amp while the IO manager writes it, so the client stays open
        return amp.client().query(sql)

    def window_of(day: str) -> RowRange:
        start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()
        view = server.chain.view()
        inside = [n for n in range(view.head + 1) if start <= view.timestamp(n) < start + 86_400]
        return RowRange(inside[0], inside[-1])

    def rows_by_run() -> dict[str, int]:
        rows = store.read_back(store.loader(), store.table("blocks")).sort_by("_block_num")
        assert rows.column("_block_num").to_pylist() == list(range(july.start, august.end + 1))
        return {v["values"]: v["counts"] for v in pc.value_counts(rows.column("run")).to_pylist()}

    july, august = window_of("2015-07-31"), window_of("2015-08-01")
    assert august.start == july.end + 1 and july.size == august.size == 7200
    resources = {"amp": amp, "io_manager": io_manager}
    tags = dict(zip(RANGE_TAGS, ("2015-07-31", "2015-08-01"), strict=True))
    backfill = dg.materialize([blocks], instance=instance, tags=tags, resources=resources)
    assert rows_by_run() == {backfill.run_id: july.size + august.size}
    by_day = {m.partition: m.metadata for m in backfill.asset_materializations_for_node("blocks")}
    counts = {day: md["dagster/partition_row_count"].value for day, md in by_day.items()}
    assert counts == {"2015-07-31": 7200, "2015-08-01": 7200}
    second_day = by_day["2015-08-01"]["amp/start_block"].value, by_day["2015-08-01"]["amp/end_block"].value
    assert second_day == (august.start, august.end)

    again = dg.materialize([blocks], instance=instance, partition_key="2015-07-31", resources=resources)
    assert rows_by_run() == {again.run_id: july.size, backfill.run_id: august.size}, "August is untouched"
    (event,) = again.asset_materializations_for_node("blocks")
    assert event.metadata["amp/block_ranges"].value == str(july)


# -- errors ----------------------------------------------------------------------------------------------------


def test_a_partitioned_output_without_its_block_column_is_refused(make_store, instance):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)

    @dg.asset(partitions_def=RANGES.definition)
    def events() -> pa.Table:
        return pa.table({"number": pa.array([1, 2], pa.uint64())})

    with pytest.raises(ConfigError, match=r"the output has no column '_block_num'.*columns number.*partition_expr"):
        run([events], io_manager, instance, KEYS[0])

    @dg.asset(name="renamed", partitions_def=RANGES.definition, metadata={"partition_expr": "number"})
    def renamed() -> pa.Table:
        return pa.table({"number": pa.array([1, 2], pa.uint64())})

    assert run([renamed], io_manager, instance, KEYS[0]).success  # ...and named through partition_expr it works
    assert store.loader().read(store.table("renamed", range_column="number")).read_all().num_rows == 2


def test_rows_outside_the_run_blocks_are_refused_and_nothing_changes(make_store, instance):
    store = make_store("postgres")
    io_manager = AmpIOManager(destination=destination("postgres", store), schema=store.namespace)
    run([block_asset()], io_manager, instance, KEYS[1])
    before = stored(store)

    @dg.asset(name="events", partitions_def=RANGES.definition, metadata={"key": list(KEY)})
    def too_wide(context: dg.AssetExecutionContext) -> pa.Table:
        return events([RowRange(10, 20)], context.run.run_id)  # block 20 belongs to the next partition

    with pytest.raises(TerminalError, match=r"partition 000000000010-000000000019: .*_block_num=20, outside the run"):
        run([too_wide], io_manager, instance, KEYS[1])
    assert stored(store).to_pylist() == before.to_pylist()


def test_a_partition_key_that_is_not_a_block_range_is_refused(make_store, instance):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["mainnet", "base"]))
    def chains() -> pa.Table:
        return pa.table({"_block_num": pa.array([1], pa.uint64())})

    with pytest.raises(ConfigError, match=r"asset chains: partition key 'base' is not a block range.*BlockRanges"):
        dg.materialize([chains], instance=instance, partition_key="base", resources={"io_manager": io_manager})


def test_a_time_partitioned_asset_needs_an_amp_resource(make_store, instance):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)

    @dg.asset(partitions_def=DAYS)
    def daily() -> pa.Table:
        return pa.table({"_block_num": pa.array([1], pa.uint64())})

    with pytest.raises(ConfigError, match=r"asset daily is partitioned by time windows.*amp=AmpResource\(url=...\)"):
        dg.materialize([daily], instance=instance, partition_key="2015-07-31", resources={"io_manager": io_manager})


def test_an_unreachable_destination_fails_with_a_typed_error_naming_the_host(instance):
    port = closed_port()
    postgres = PostgresResource(dsn=f"postgresql://amp@127.0.0.1:{port}/test", password="s3cret-pw")
    io_manager = AmpIOManager(destination=postgres)

    @dg.asset
    def events() -> pa.Table:
        return pa.table({"_block_num": pa.array([1], pa.uint64())})

    with pytest.raises(ServiceUnavailableError, match=f"127.0.0.1:{port}") as error:
        dg.materialize([events], instance=instance, resources={"io_manager": io_manager})
    assert "s3cret-pw" not in str(error.value)


def test_a_misconfigured_destination_names_the_field(instance, monkeypatch):
    @dg.asset
    def events() -> pa.Table:
        return pa.table({"_block_num": pa.array([1], pa.uint64())})

    with pytest.raises(Exception, match="dsn"):
        PostgresResource()  # the one required field is missing
    with pytest.raises(Exception, match=r"pool_size\n  Input should be greater than or equal to 1"):
        PostgresResource(dsn=POSTGRES_DSN, pool_size=0)
    monkeypatch.delenv("AMP_TEST_UNSET_CATALOG", raising=False)
    iceberg = IcebergResource(warehouse="w", catalog_uri=dg.EnvVar("AMP_TEST_UNSET_CATALOG"))
    with pytest.raises(dg.DagsterInvalidConfigError, match="AMP_TEST_UNSET_CATALOG"):
        dg.materialize([events], instance=instance, resources={"io_manager": AmpIOManager(destination=iceberg)})


def test_unsupported_output_and_input_types_are_named(make_store, instance):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)

    @dg.asset
    def rows() -> dict:
        return {"_block_num": [1]}

    with pytest.raises(
        TerminalError, match=r"cannot store the builtins.dict returned by asset rows: return a pyarrow Table"
    ):
        dg.materialize([rows], instance=instance, resources={"io_manager": io_manager})

    @dg.asset(name="rows")
    def good_rows() -> pa.Table:
        return pa.table({"_block_num": pa.array([1], pa.uint64())})

    @dg.asset
    def listed(rows: list) -> None:
        pass

    seen = []

    @dg.asset
    def untyped(rows) -> None:
        seen.append(rows)

    dg.materialize([good_rows, untyped], instance=instance, resources={"io_manager": io_manager})
    assert isinstance(seen[0], pa.Table) and seen[0].num_rows == 1, "an unannotated input is a pyarrow Table"
    with pytest.raises(ConfigError, match=r"input 'rows' is annotated typing.List\[typing.Any\]. Annotate it"):
        dg.materialize([good_rows, listed], selection=[listed], instance=instance, resources={"io_manager": io_manager})


def test_none_writes_nothing(make_store, instance):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)

    @dg.asset(partitions_def=RANGES.definition)
    def nothing() -> None:
        return None

    assert run([nothing], io_manager, instance, KEYS[0]).success
    with pytest.raises(TerminalError, match="does not exist"):
        store.loader().read(store.table("nothing")).read_all()


def test_failing_metadata_never_fails_the_materialization(make_store, instance, monkeypatch):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)

    def broken(schema):
        raise RuntimeError("enrichment broke")

    monkeypatch.setattr(io_managers, "column_schema", broken)
    result = run([block_asset()], io_manager, instance, KEYS[0:2])
    assert result.success
    assert counts(stored(store))[KEYS[1]] == 20
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("metadata failed: RuntimeError('enrichment broke')" in message for message in logs)


# -- Dagster instances ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("make_instance", [sqlite_instance, postgres_instance], ids=["sqlite", "postgres"])
def test_the_same_materialization_on_sqlite_and_postgres_instances(make_instance, make_store, tmp_path):
    store = make_store("delta")
    io_manager = AmpIOManager(destination=destination("delta", store), schema=store.namespace)
    asset = block_asset()
    with make_instance(tmp_path / "home") as instance:
        RANGES.add_keys(instance, KEYS)
        run([asset], io_manager, instance, KEYS[0])
        backfill = run([asset], io_manager, instance, KEYS[1:4])
        recorded = instance.fetch_materializations(dg.AssetKey("events"), limit=10).records
    by_backfill = sorted((r.partition_key, r.run_id == backfill.run_id) for r in recorded)
    assert by_backfill == [(KEYS[0], False), (KEYS[1], True), (KEYS[2], True), (KEYS[3], True)]
    assert counts(stored(store)) == {**dict.fromkeys(KEYS[0:4], 20), KEYS[4]: 0}
