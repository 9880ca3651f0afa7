"""The sync engine against the in-memory loader and scripted sources: every rule of exactly-once, in milliseconds."""

from __future__ import annotations

import threading
import time

import pytest

from amp_dagster.errors import ConfigError, ServiceUnavailableError, TerminalError
from amp_dagster.flight.protocol import Watermark
from amp_dagster.loaders.base import TableRef
from amp_dagster.ranges import RowRange
from amp_dagster.retry import RetryPolicy
from amp_dagster.state import MemoryCheckpoints, SyncState, live_key, load_state, range_key
from amp_dagster.sync import SyncOptions, sync

from .fakes import NETWORK, BatchChain, MemoryLoader, PagedSource, ReplayingSource, ScriptedSource

TABLE = TableRef("events", namespace="t")
FAST = RetryPolicy(attempts=4, initial_delay=0.01, max_delay=0.02)


def run(source, loader=None, store=None, mode="stream", **options):
    loader = loader or MemoryLoader()
    store = store or MemoryCheckpoints()
    options.setdefault("retry", FAST)
    result = sync(source, loader, TABLE, store, mode, SyncOptions(**options), pipeline="p")
    return result, loader, store


def canonical(source: ScriptedSource, start: int, end: int) -> list[tuple]:
    """The rows the current chain holds for blocks start..=end: (block, i, fork)."""
    batch = source.chain.rows(start, end, source.per_block)
    return sorted(zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True))


def stored(loader: MemoryLoader) -> list[tuple]:
    rows = loader.rows(TABLE)
    return sorted(zip(*(rows.column(n).to_pylist() for n in ("_block_num", "i", "fork")), strict=True))


def test_a_stream_is_loaded_and_checkpointed_at_its_last_microbatch():
    source = ScriptedSource(("batch", 0, 9), ("batch", 10, 19), ("batch", 20, 29))
    result, loader, store = run(source)
    assert stored(loader) == canonical(source, 0, 29)
    state = load_state(store, "p")
    assert state.high == 29 and state.position == Watermark.at(NETWORK, 29, source.chain.hash(29))
    assert (result.rows, result.first_block, result.last_block, result.stopped) == (60, 0, 29, "done")
    assert state.rows == 60 and state.run_id and state.time


def test_a_second_run_resumes_from_the_watermark_and_loads_each_row_once():
    store, loader = MemoryCheckpoints(), MemoryLoader()
    first = ScriptedSource(("batch", 0, 9), ("batch", 10, 19))
    run(first, loader, store)
    second = ScriptedSource(("batch", 20, 29))
    second.chain = first.chain
    run(second, loader, store)
    assert second.reads == [Watermark.at(NETWORK, 19, first.chain.hash(19))]
    assert stored(loader) == canonical(first, 0, 29)


class FailingStore(MemoryCheckpoints):
    """Fails the nth checkpoint write terminally: a crash between a commit and its checkpoint."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.puts, self.fail_at = 0, fail_at

    def put(self, key: str, value: str) -> None:
        self.puts += 1
        if self.puts == self.fail_at:
            raise TerminalError("the process died here")
        super().put(key, value)


def test_a_failure_after_a_commit_leaves_nothing_past_the_checkpoint():
    store, loader = FailingStore(fail_at=2), MemoryLoader()
    first = ScriptedSource(("batch", 0, 9), ("sleep", 0.05), ("batch", 10, 19))
    with pytest.raises(TerminalError, match="died"):
        run(first, loader, store)
    assert load_state(store, "p").high == 9, "the checkpoint of 10..19 was not written"
    assert stored(loader) == canonical(first, 0, 9), "so its committed rows were taken back out"


def test_rows_committed_but_not_checkpointed_are_trimmed_before_resuming():
    store, loader = MemoryCheckpoints(), MemoryLoader()
    first = ScriptedSource(("batch", 0, 9))
    run(first, loader, store)
    # a run that was killed between its commit of 10..19 and its checkpoint left these rows behind
    loader.write(TABLE, first.chain.rows(10, 19, first.per_block))
    again = ScriptedSource(("batch", 10, 19), ("batch", 20, 29))
    again.chain = first.chain
    run(again, loader, store)
    assert ("delete", RowRange(10), 20) in loader.writes, "the leftovers past the checkpoint were deleted first"
    assert stored(loader) == canonical(first, 0, 29)


def test_a_reorg_deletes_from_the_fork_and_the_new_chain_follows():
    source = ScriptedSource(("batch", 0, 9), ("batch", 10, 19), ("reorg", 15, 24), ("batch", 25, 29))
    result, loader, store = run(source)
    assert stored(loader) == canonical(source, 0, 29)
    assert {r[2] for r in stored(loader) if 15 <= r[0] <= 24} == {1}, "the fork's rows replaced the old ones"
    assert result.reorgs == 1 and load_state(store, "p").high == 29


def test_a_reorg_below_the_checkpoint_moves_the_checkpoint_back_to_the_forks_parent():
    checkpoints = []

    class Watching(MemoryCheckpoints):
        def put(self, key, value):
            checkpoints.append(SyncState.from_json(value))
            super().put(key, value)

    source = ScriptedSource(("batch", 0, 9), ("batch", 10, 19), ("sleep", 0.05), ("reorg", 12, 19), ("wait",))
    options = {"seconds": 0.5}
    _, loader, _ = run(source, store=Watching(), **options)
    highs = [c.high for c in checkpoints]
    assert 19 in highs and 11 in highs and highs.index(11) > highs.index(19)
    back = checkpoints[highs.index(11)]
    assert back.position == Watermark.at(NETWORK, 11, source.chain.hash(11))
    assert stored(loader) == canonical(source, 0, 19)


def test_a_rewind_drops_the_rows_of_the_cut_microbatch():
    source = ScriptedSource(("batch", 0, 9), ("partial", 10, 19, 7), ("rewind", 10), ("batch", 10, 19))
    _, loader, _ = run(source)
    assert stored(loader) == canonical(source, 0, 19)


def test_a_rewind_after_a_spill_deletes_the_spilled_rows():
    source = ScriptedSource(("batch", 0, 9), ("partial", 10, 19, 15), ("rewind", 10), ("batch", 10, 19), per_block=2)
    _, loader, _ = run(source, flush_bytes=100)  # every batch spills
    assert stored(loader) == canonical(source, 0, 19)


def test_a_stop_mid_microbatch_leaves_nothing_past_the_checkpoint():
    stop = threading.Event()
    source = ScriptedSource(("batch", 0, 9), ("partial", 10, 19, 11), ("wait",))
    threading.Timer(0.3, stop.set).start()
    result, loader, store = run(source, flush_bytes=100, stop=stop)
    assert result.stopped == "stopped"
    assert load_state(store, "p").high == 9
    assert stored(loader) == canonical(source, 0, 9), "the spilled rows of the open microbatch are gone"


def test_until_block_and_seconds_stop_at_a_checkpoint():
    source = ScriptedSource(("batch", 0, 9), ("batch", 10, 19), ("batch", 20, 29))
    result, loader, store = run(source, until_block=15)
    assert result.stopped == "until" and load_state(store, "p").high == 19
    assert stored(loader) == canonical(source, 0, 19)
    source = ScriptedSource(("batch", 0, 9), ("wait",))
    started = time.monotonic()
    result, _, _ = run(source, seconds=0.3)
    assert result.stopped == "seconds" and time.monotonic() - started < 2


def test_transient_write_failures_restart_from_the_checkpoint():
    loader = MemoryLoader()
    source = ReplayingSource(end=49, size=10)
    loader.fail_writes = 2
    _, loader, _ = run(source, loader=loader, flush_rows=20)
    assert stored(loader) == canonical(source, 0, 49)
    assert len(source.reads) == 3, "two failures, two restarts"
    assert all(r is None or r.blocks[NETWORK].number < 49 for r in source.reads)


def test_terminal_errors_fail_at_once():
    source = ScriptedSource(("batch", 0, 9), ("error", TerminalError("bad SQL")), ("batch", 10, 19))
    with pytest.raises(TerminalError, match="bad SQL"):
        run(source)
    assert len(source.reads) == 1


def test_transient_source_errors_are_retried_then_surface():
    source = ScriptedSource(*[("error", ServiceUnavailableError("amp is down"))] * 10)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="amp is down"):
        run(source)
    assert len(source.reads) == FAST.attempts and time.monotonic() - started < 2


def test_the_queue_is_bounded_in_bytes():
    from amp_dagster.pipe import Pipe

    pipe = Pipe(limit=100)
    assert pipe.put("a", 60)
    blocked = threading.Event()

    def producer():
        pipe.put("b", 60)  # waits: 120 > 100
        blocked.set()

    threading.Thread(target=producer, daemon=True).start()
    time.sleep(0.1)
    assert not blocked.is_set(), "the producer waits while the queue is full"
    assert pipe.get(1) == "a"
    assert blocked.wait(1), "and goes on once the consumer took an item"


def test_a_cursor_source_loads_each_page_once_across_runs():
    store, loader = MemoryCheckpoints(), MemoryLoader()
    table = TableRef("pages", range_column="id")
    for _ in range(2):
        sync(PagedSource(pages=3), loader, table, store, "incremental", SyncOptions(retry=FAST), pipeline="c")
    ids = sorted(loader.rows(table)["id"].to_pylist())
    assert ids == list(range(1, 19))
    assert load_state(store, "c").position.value == 18


def test_a_cursor_source_whose_range_column_goes_back_is_refused():
    store, loader = MemoryCheckpoints(), MemoryLoader()
    table = TableRef("pages", range_column="id")
    sync(PagedSource(pages=2), loader, table, store, "incremental", pipeline="c")
    state = load_state(store, "c")
    store.put(live_key("c"), state.to_json().replace('"cursor":6', '"cursor":0'))  # as if the API went back
    with pytest.raises(TerminalError, match="at or below the last committed value 6"):
        sync(PagedSource(pages=1), loader, table, store, "incremental", pipeline="c")


def test_a_changed_pipeline_is_refused_against_its_old_checkpoint():
    store = MemoryCheckpoints()
    sync(ScriptedSource(("batch", 0, 9)), MemoryLoader(), TABLE, store, "stream", pipeline="p", fingerprint="v1")
    with pytest.raises(ConfigError, match=r"changed .* `amp-dagster checkpoints reset p`"):
        sync(ScriptedSource(("batch", 10, 19)), MemoryLoader(), TABLE, store, "stream", pipeline="p", fingerprint="v2")


def test_two_syncs_of_one_pipeline_never_write_at_once():
    store, loader = MemoryCheckpoints(), MemoryLoader()
    first = ScriptedSource(("batch", 0, 9), ("wait",))
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(first, loader, store), kwargs={"stop": stop}, daemon=True)
    thread.start()
    time.sleep(0.2)
    with pytest.raises(TerminalError, match="'p' is already being synced"):
        run(ScriptedSource(("batch", 0, 9)), loader, store, lock_wait=0.2)
    stop.set()
    thread.join(5)
    assert stored(loader) == canonical(first, 0, 9)


def test_a_full_refresh_that_fails_leaves_the_previous_table():
    loader, store = MemoryLoader(), MemoryCheckpoints()
    sync(PagedSource(pages=2), loader, TableRef("pages", range_column="id"), store, "full_refresh", pipeline="f")
    loader.fail_writes = 100
    with pytest.raises(Exception, match="injected"):
        sync(PagedSource(pages=5), loader, TableRef("pages", range_column="id"), store, "full_refresh",
             SyncOptions(retry=FAST), pipeline="f")  # fmt: skip
    assert loader.rows(TableRef("pages", range_column="id")).num_rows == 6


def test_explicit_ranges_are_recorded_apart_and_never_move_the_live_checkpoint():
    from amp_dagster.state import effective_high, range_records

    store = MemoryCheckpoints()
    store.put(live_key("p"), SyncState("p", "incremental", high=99).to_json())
    state = load_state(store, "p")
    assert effective_high(state, range_records(store, "p")) == 99
    store.put(range_key("p", RowRange(200, 399)), SyncState("p", "incremental", ranges=(RowRange(200, 399),)).to_json())
    assert effective_high(state, range_records(store, "p")) == 99, "a range past a gap leaves it alone"
    store.put(range_key("p", RowRange(100, 199)), SyncState("p", "incremental", ranges=(RowRange(100, 199),)).to_json())
    assert effective_high(state, range_records(store, "p")) == 399, "filling the gap moves it to the contiguous end"


def test_progress_is_reported_at_every_flush():
    seen = []
    source = ScriptedSource(("batch", 0, 9), ("sleep", 0.1), ("batch", 10, 19))
    run(source, progress=seen.append)
    assert [p.checkpoint.high for p in seen] == [9, 19], "at the head, each microbatch is written as it completes"
    assert seen[-1].rows == 40 and seen[-1].blocks == 20 and seen[-1].rows_per_s > 0


def test_while_catching_up_microbatches_are_written_together():
    source = ReplayingSource(end=999, size=10)
    _, loader, store = run(source, flush_rows=400)
    writes = [w for w in loader.writes if w[0] == "write"]
    assert stored(loader) == canonical(source, 0, 999)
    assert len(writes) <= 8, f"100 microbatches of 20 rows, written in {len(writes)} writes"
    assert load_state(store, "p").high == 999


def test_incremental_chunks_checkpoint_each_and_a_retried_chunk_counts_once():
    loader, store = MemoryLoader(), MemoryCheckpoints()
    loader.fail_writes = 1  # the first chunk's write fails once at commit: retried from the checkpoint
    source = BatchChain(end=99)
    result = sync(source, loader, TABLE, store, "incremental", SyncOptions(blocks_per_query=40, retry=FAST),
                  pipeline="p")  # fmt: skip
    assert stored(loader) == canonical(source, 0, 99)
    assert result.rows == 200 and load_state(store, "p").rows == 200, "the failed attempt's rows are not counted"
    assert load_state(store, "p").high == 99 and result.flushes == 3


def test_a_stop_in_the_middle_of_an_incremental_chunk_ends_cleanly():
    loader, store, stop = MemoryLoader(), MemoryCheckpoints(), threading.Event()
    source = BatchChain(end=99, per_batch=5, delay=0.05)
    threading.Timer(0.6, stop.set).start()
    result = sync(source, loader, TABLE, store, "incremental", SyncOptions(blocks_per_query=40, stop=stop),
                  pipeline="p")  # fmt: skip
    high = load_state(store, "p").high
    assert result.stopped == "stopped" and high in (39, 79)
    assert stored(loader) == canonical(source, 0, high), "the chunk being written when stopped left nothing"
