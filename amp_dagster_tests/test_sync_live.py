"""The sync engine against the dev server and real stores: streams through reorgs, resumes, incremental chunks,
explicit ranges, full refreshes that fail, an unreachable destination, a restarted server; every result compared
with the canonical chain computed independently (0 missing, 0 duplicated, 0 orphaned rows)."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from amp_dagster.checkpoints import DagsterCheckpoints
from amp_dagster.errors import TerminalError
from amp_dagster.flight.client import AmpClient
from amp_dagster.loaders.base import TableRef
from amp_dagster.pipelines import parse_pipelines
from amp_dagster.ranges import RowRange
from amp_dagster.retry import RetryPolicy
from amp_dagster.sources import AmpQuerySource, Page
from amp_dagster.state import MemoryCheckpoints, effective_high, load_state, range_records
from amp_dagster.sync import SyncOptions, sync

from . import services
from .chaincheck import canonical, exact
from .instances import postgres_instance, sqlite_instance
from .stores import HARNESSES, load

LOGS = "SELECT * FROM eth_rpc.logs"
FAST = RetryPolicy(attempts=6, initial_delay=0.05, max_delay=0.5)


@pytest.fixture(params=["postgres", "delta"])
def store(request, tmp_path):
    if request.param == "postgres":
        services.require_postgres()
    harness = load(request.param)(tmp_path)
    yield harness
    harness.cleanup()


def _stream(server, loader, table, checkpoints, **options):
    source = AmpQuerySource(AmpClient(server.url), LOGS, stream=True)
    options.setdefault("retry", FAST)
    return sync(source, loader, table, checkpoints, "stream", SyncOptions(**options), pipeline="logs")


def _high(checkpoints, pipeline: str = "logs") -> int:
    state = load_state(checkpoints, pipeline)
    return -1 if state is None or state.high is None else state.high


def _grow(server, steps: list, pause: float = 0.03, checkpoints=None) -> threading.Thread:
    """Play ("advance", n) and ("reorg", depth) steps on the chain in the background. With ``checkpoints``, each
    reorg waits until the sync has committed the chain's head, so that the fork replaces rows it loaded."""

    def play():
        for kind, n in steps:
            time.sleep(pause)
            if kind == "advance":
                server.advance(n)
                continue
            deadline = time.monotonic() + 30
            while checkpoints is not None and _high(checkpoints) < server.chain.head and time.monotonic() < deadline:
                time.sleep(0.01)
            server.reorg(n)

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return thread


def test_a_stream_through_reorgs_of_depth_1_10_and_64_equals_the_canonical_chain(devserver, store):
    server = devserver(blocks=100, microbatch_blocks=16)
    loader, table = store.loader(), store.table("logs")
    steps = [("advance", 8), ("reorg", 1), ("advance", 8), ("reorg", 10), ("advance", 30), ("reorg", 64),
             ("advance", 20), ("reorg", 3)] + [("advance", 4)] * 5  # fmt: skip
    head = 100 + 8 + 8 + 30 + 20 + 20 - 1
    checkpoints = MemoryCheckpoints()
    mover = _grow(server, steps, checkpoints=checkpoints)
    result = _stream(server, loader, table, checkpoints, until_block=head)
    mover.join()
    high = result.checkpoint.high
    assert high >= head and result.reorgs == 4
    verdict = exact(loader.read(table).read_all(), canonical(server, end=high))
    assert verdict["ok"], verdict


def test_a_reorg_during_a_flush(devserver, store):
    server = devserver(blocks=64, microbatch_blocks=8)
    loader, table = store.loader(), store.table("logs")
    write, calls = loader.write, []

    def write_and_fork(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the chain forks from block 10 while this flush is being written
            server.reorg(server.chain.head - 9)
        return write(*args, **kwargs)

    loader.write = write_and_fork
    mover = _grow(server, [("advance", 4)] * 20, pause=0.05)
    result = _stream(server, loader, table, MemoryCheckpoints(), until_block=64 + 80 - 1)
    mover.join()
    verdict = exact(loader.read(table).read_all(), canonical(server, end=result.checkpoint.high))
    assert verdict["ok"] and result.reorgs == 1, verdict


def test_a_reorg_while_the_sync_is_down_is_found_on_resume(devserver, store):
    server = devserver(blocks=150, microbatch_blocks=25)
    loader, table, checkpoints = store.loader(), store.table("logs"), MemoryCheckpoints()
    first = _stream(server, loader, table, checkpoints, until_block=149)
    assert first.checkpoint.high == 149
    server.reorg(30)  # blocks 120..149 replaced while nobody listens: the stored watermark is orphaned
    server.advance(50)
    again = _stream(server, loader, table, checkpoints, until_block=199)
    assert again.reorgs == 1
    verdict = exact(loader.read(table).read_all(), canonical(server, end=199))
    assert verdict["ok"], verdict


def test_a_sparse_stream_keeps_its_checkpoint_moving(devserver, store):
    server = devserver(blocks=300, microbatch_blocks=50)
    loader, table = store.loader(), store.table("transfers")
    sql = f"{LOGS} WHERE topic3 IS NOT NULL AND log_index = 0"  # most blocks have no such row
    source = AmpQuerySource(AmpClient(server.url), sql, stream=True)
    server.reorg(40)
    result = sync(source, loader, table, MemoryCheckpoints(), "stream", SyncOptions(until_block=299, retry=FAST),
                  pipeline="t")  # fmt: skip
    want = canonical(server, end=299, where=lambda t: pa.compute.and_(t["topic3"].is_valid(),
                                                                      pa.compute.equal(t["log_index"], 0)))  # fmt: skip
    assert 0 < want.num_rows < 300
    verdict = exact(loader.read(table).read_all(), want)
    assert verdict["ok"] and result.checkpoint.high == 299, verdict


def test_incremental_loads_in_chunks_behind_the_finality_depth(devserver, store):
    server = devserver(blocks=500)
    loader, table, checkpoints = store.loader(), store.table("logs"), MemoryCheckpoints()
    source = AmpQuerySource(AmpClient(server.url), LOGS)
    options = SyncOptions(blocks_per_query=128, finality=10, retry=FAST)
    first = sync(source, loader, table, checkpoints, "incremental", options, pipeline="logs")
    assert first.checkpoint.high == 489 and first.flushes == 4
    server.advance(100)
    second = sync(source, loader, table, checkpoints, "incremental", options, pipeline="logs")
    assert second.checkpoint.high == 589 and second.first_block == 490
    verdict = exact(loader.read(table).read_all(), canonical(server, end=589))
    assert verdict["ok"], verdict


def test_concurrent_explicit_ranges_on_a_postgres_instance_lose_no_progress(devserver, tmp_path):
    services.require_postgres()
    server = devserver(blocks=600)
    harness = load("postgres")(tmp_path)
    spec = parse_pipelines({"pipelines": [{
        "name": "logs", "source": {"sql": LOGS, "url": server.url}, "table": "logs", "namespace": harness.namespace,
        "destination": {"kind": "postgres", "dsn": services.POSTGRES_DSN}, "blocks_per_query": 1000,
    }]}).get("logs")  # fmt: skip
    try:
        with postgres_instance(tmp_path / "home") as instance:
            store = DagsterCheckpoints(instance)
            live = spec.run(store, until_block=99)
            assert live.checkpoint.high == 99
            ranges = [RowRange(100 + 50 * i, 149 + 50 * i) for i in range(8)]
            errors: list = []

            def load_range(r: RowRange) -> None:
                try:
                    spec.run(store, ranges=[r], lock_wait=60)
                except Exception as exc:  # surfaced below
                    errors.append(exc)

            threads = [threading.Thread(target=load_range, args=(r,)) for r in ranges]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not errors, errors
            records = range_records(store, "logs")
            assert sorted((r.ranges[0] for r in records), key=lambda r: r.start) == ranges, "every range recorded"
            assert load_state(store, "logs").high == 99, "explicit ranges never move the live checkpoint"
            assert effective_high(load_state(store, "logs"), records) == 499, "but they fill it in: contiguous"
            loader = spec.destination.build()
            verdict = exact(loader.read(spec.table_ref()).read_all(), canonical(server, end=499))
            loader.close()
            assert verdict["ok"], verdict
            again = spec.run(store)  # the live sync skips what the ranges loaded and goes on to the head
            assert again.checkpoint.high == server.chain.head and again.first_block == 500
    finally:
        harness.cleanup()


@pytest.mark.parametrize("name", sorted(set(HARNESSES) - {"memory"}))
def test_a_full_refresh_that_fails_mid_write_leaves_the_previous_table(name, tmp_path):
    if name == "postgres":
        services.require_postgres()
    if name == "redis":
        services.require_redis()
    harness = load(name)(tmp_path)
    try:
        loader, table = harness.loader(), harness.table("pages", range_column="id")
        schema = pa.schema([("id", pa.int64(), False), ("v", pa.string())])

        def pages(count: int, fail_after: int | None = None):
            def fetch(cursor):
                for page in range(count):
                    if page == fail_after:
                        raise TerminalError("the source broke mid-refresh")
                    ids = list(range(page * 100, page * 100 + 100))
                    yield Page(pa.table({"id": ids, "v": [f"v{i}" for i in ids]}, schema=schema), page)

            from amp_dagster.sources import CursorSource

            return CursorSource(fetch, schema=schema, range_column="id")

        checkpoints = MemoryCheckpoints()
        sync(pages(3), loader, table, checkpoints, "full_refresh", pipeline="pages")
        before = load_state(checkpoints, "pages")
        with pytest.raises(TerminalError, match="broke mid-refresh"):
            sync(pages(5, fail_after=3), loader, table, checkpoints, "full_refresh", pipeline="pages")
        ids = sorted(harness.read_back(loader, table)["id"].to_pylist())
        assert ids == list(range(300)), "the previous table is intact"
        assert load_state(checkpoints, "pages") == before
    finally:
        harness.cleanup()


@pytest.mark.slow
def test_a_destination_unreachable_for_10_seconds_mid_stream(devserver, tmp_path, caplog):
    from .netproxy import Proxy

    caplog.set_level("WARNING")
    services.require_postgres()
    server = devserver(blocks=50, microbatch_blocks=10)
    harness = load("postgres")(tmp_path)
    proxy = Proxy(("127.0.0.1", 5432))
    try:
        from amp_dagster.loaders.postgres import PostgresLoader

        dsn = services.POSTGRES_DSN.replace(":5432/", f":{proxy.port}/")
        loader = PostgresLoader(dsn, connect_timeout=2, retry=RetryPolicy(attempts=2, initial_delay=0.1))
        direct, table = harness.loader(), harness.table("logs")
        checkpoints, verdicts = MemoryCheckpoints(), []
        put = checkpoints.put

        def checked_put(key, value):
            # at the moment a checkpoint is written, the destination must already hold every row it covers
            from amp_dagster.state import SyncState

            high = SyncState.from_json(value).high
            got = direct.read(table, RowRange(0, high)).read_all()
            verdicts.append(exact(got, canonical(server, end=high)))
            put(key, value)

        checkpoints.put = checked_put
        mover = _grow(server, [("advance", 2)] * 150, pause=0.1)

        def partition():
            time.sleep(3)
            proxy.down()
            time.sleep(10)
            proxy.up()

        cut = threading.Thread(target=partition, daemon=True)
        cut.start()
        retry = RetryPolicy(attempts=20, initial_delay=0.5, max_delay=2.0)
        result = sync(AmpQuerySource(AmpClient(server.url), LOGS, stream=True), loader, table, checkpoints, "stream",
                      SyncOptions(until_block=50 + 280, retry=retry), pipeline="logs")  # fmt: skip
        cut.join()
        mover.join()
        assert "restarts from its checkpoint" in caplog.text, "the partition hit the sync's writes"
        assert verdicts and all(v["ok"] for v in verdicts), [v for v in verdicts if not v["ok"]][:3]
        final = exact(direct.read(table).read_all(), canonical(server, end=result.checkpoint.high))
        assert final["ok"], final
        loader.close()
    finally:
        proxy.close()
        harness.cleanup()


def test_a_dev_server_restarted_on_the_same_port_mid_stream(devserver, store):
    from amp_dagster.devserver.server import DevServer

    first = devserver(blocks=100, microbatch_blocks=10, seed=7)
    port = first.port
    loader, table, checkpoints = store.loader(), store.table("logs"), MemoryCheckpoints()
    source = AmpQuerySource(AmpClient(first.url, stream_retry=RetryPolicy(attempts=30, initial_delay=0.1)), LOGS,
                            stream=True)  # fmt: skip
    done: dict = {}
    runner = threading.Thread(
        target=lambda: done.setdefault(
            "result",
            sync(
                source, loader, table, checkpoints, "stream", SyncOptions(until_block=199, retry=FAST), pipeline="logs"
            ),
        )
    )
    first.advance(10)
    runner.start()
    deadline = time.monotonic() + 30
    while (load_state(checkpoints, "logs") or type("s", (), {"high": -1})).high < 109:
        assert time.monotonic() < deadline, "the stream never reached block 109"
        time.sleep(0.05)
    first.shutdown()
    second = devserver(location=f"grpc://127.0.0.1:{port}", blocks=200, microbatch_blocks=10, seed=7)
    runner.join(60)
    assert done["result"].checkpoint.high >= 199
    verdict = exact(loader.read(table).read_all(), canonical(second, end=done["result"].checkpoint.high))
    assert verdict["ok"], verdict
    assert isinstance(second, DevServer)


def test_checkpoints_in_a_sqlite_instance_resume_a_stream(devserver, store, tmp_path):
    server = devserver(blocks=120, microbatch_blocks=20)
    loader, table = store.loader(), store.table("logs")
    with sqlite_instance(tmp_path / "home") as instance:
        checkpoints = DagsterCheckpoints(instance)
        _stream(server, loader, table, checkpoints, until_block=59)
        assert load_state(checkpoints, "logs").high == 59
        _stream(server, loader, table, checkpoints, until_block=119)
        state = DagsterCheckpoints(instance).pipelines()["logs"]
        assert state.high == 119 and state.position.blocks["mainnet"].number == 119
    verdict = exact(loader.read(table).read_all(), canonical(server, end=119))
    assert verdict["ok"], verdict


def test_sync_tables_are_created_before_data_arrives(devserver, store):
    server = devserver(blocks=10)
    loader, table = store.loader(), store.table("empty")
    source = AmpQuerySource(AmpClient(server.url), f"{LOGS} WHERE false", stream=False)
    sync(source, loader, table, MemoryCheckpoints(), "incremental", SyncOptions(retry=FAST), pipeline="e")
    got = loader.read(table).read_all()
    assert got.num_rows == 0 and got.schema.names == source.schema().names


def test_sync_refuses_a_table_ref_without_the_range_column(devserver):
    server = devserver(blocks=10)
    from .fakes import MemoryLoader

    source = AmpQuerySource(AmpClient(server.url), "SELECT block_num FROM eth_rpc.blocks", stream=True)
    with pytest.raises(TerminalError, match="_block_num"):
        sync(source, MemoryLoader(), TableRef("b"), MemoryCheckpoints(), "stream", SyncOptions(until_block=5))


def test_streams_cut_inside_microbatches_lose_and_double_nothing(devserver, store, caplog):
    from amp_dagster.devserver.server import Fault

    caplog.set_level("WARNING")
    server = devserver(blocks=200, microbatch_blocks=40)
    loader, table = store.loader(), store.table("logs")
    # every DoGet is cut inside its second microbatch, after one data batch: a spill has written part of it
    server.inject(Fault("drop", after_batches=1, microbatch=1, times=3))
    result = _stream(server, loader, table, MemoryCheckpoints(), until_block=199, flush_bytes=1)
    assert caplog.text.count("amp stream resumes from") == 3, "three cuts, three reconnects with a rewind"
    verdict = exact(loader.read(table).read_all(), canonical(server, end=199))
    assert verdict["ok"] and result.checkpoint.high == 199, verdict


def test_an_explicit_range_past_the_final_head_is_refused(devserver):
    from .fakes import MemoryLoader

    server = devserver(blocks=100)
    source = AmpQuerySource(AmpClient(server.url), LOGS)
    options = SyncOptions(ranges=(RowRange(50, 99), RowRange(100, 149)), finality=5, retry=FAST)
    with pytest.raises(TerminalError, match=r"blocks 95\.\.=149 are not final yet \(amp's head is 99, finality 5\)"):
        sync(source, MemoryLoader(), TableRef("logs"), MemoryCheckpoints(), "incremental", options, pipeline="p")
