"""Sources yield Arrow batches with positions and checkpoints: amp queries (batch, stream), Flight SQL, cursors."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from amp_dagster.errors import ConfigError, TerminalError
from amp_dagster.flight.client import AmpClient
from amp_dagster.flight.protocol import Checkpoint, Cursor, Data, Watermark
from amp_dagster.ranges import RowRange
from amp_dagster.sources import AmpQuerySource, CursorSource, FlightSqlSource, Page, Source

from .test_client import PlainFlightSql


def _rows(events) -> pa.Table:
    return pa.Table.from_batches([e.batch for e in events if isinstance(e, Data)])


def test_every_source_is_a_source():
    assert all(
        isinstance(s, Source)
        for s in (AmpQuerySource(None, "x"), FlightSqlSource(None, "x"), CursorSource(lambda c: iter(())))
    )


def test_amp_batch_query_by_block_range(devserver):
    server = devserver(blocks=300)
    source = AmpQuerySource(AmpClient(server.url), "SELECT * FROM eth_rpc.logs;\n", blocks=RowRange(100, 149))
    events = list(source.read())
    rows = _rows(events)
    assert pc.min(rows["_block_num"]).as_py() == 100 and pc.max(rows["_block_num"]).as_py() == 149
    assert rows.num_rows == server.chain.view().tables(100, 149, ["logs"])["logs"].num_rows
    final = events[-1]
    assert isinstance(final, Checkpoint) and final.position.blocks["mainnet"].number == 299


def test_amp_batch_query_resumes_after_a_watermark(devserver):
    server = devserver(blocks=100)
    view = server.chain.view()
    source = AmpQuerySource(AmpClient(server.url), "SELECT _block_num, log_index FROM eth_rpc.logs")
    rows = _rows(source.read(Watermark.at("mainnet", 89, view.block_hash(89))))
    assert sorted(set(rows["_block_num"].to_pylist())) == list(range(90, 100))


def test_amp_batch_query_needs_block_num_to_be_restricted(devserver):
    server = devserver(blocks=10)
    source = AmpQuerySource(AmpClient(server.url), "SELECT log_index FROM eth_rpc.logs", blocks=RowRange(0, 5))
    with pytest.raises(TerminalError, match="_block_num"):
        list(source.read())
    with pytest.raises(ConfigError, match="no block range"):
        AmpQuerySource(AmpClient(server.url), "SELECT 1", stream=True, blocks=RowRange(0))


def test_amp_stream_source_yields_the_clients_events(devserver):
    server = devserver(blocks=25, microbatch_blocks=10)
    source = AmpQuerySource(AmpClient(server.url), "SELECT _block_num FROM eth_rpc.blocks", stream=True)
    seen = []
    events = source.read()
    for event in events:
        seen.append(event)
        if isinstance(event, Checkpoint) and event.position.blocks["mainnet"].number == 24:
            events.close()
            break
    assert [(c.ranges[0].start, c.ranges[0].end) for c in seen if isinstance(c, Checkpoint)] == [
        (0, 9),
        (10, 19),
        (20, 24),
    ]
    assert _rows(seen)["_block_num"].to_pylist() == list(range(25))


def test_flight_sql_source_reads_whole():
    server = PlainFlightSql()
    try:
        events = list(FlightSqlSource(AmpClient(f"grpc://127.0.0.1:{server.port}"), "SELECT n FROM t").read())
        assert _rows(events)["n"].to_pylist() == [1, 2, 3, 4, 5]
        assert events[-1] == Checkpoint(None)
        with pytest.raises(TerminalError, match="no position"):
            list(FlightSqlSource(AmpClient(f"grpc://127.0.0.1:{server.port}"), "x").read(Cursor(1)))
    finally:
        server.shutdown()


def _api(total: int, page: int = 3):
    """A paginated API: items with increasing ids, returned ``page`` at a time after a cursor."""

    def fetch(after):
        start = 0 if after is None else after + 1
        while start < total:
            ids = range(start, min(start + page, total))
            yield [{"id": i, "name": f"item-{i}"} for i in ids], ids[-1]
            start = ids[-1] + 1

    return fetch


def test_cursor_source_checkpoints_after_every_page_and_resumes():
    schema = pa.schema([("id", pa.int64()), ("name", pa.string())])
    source = CursorSource(_api(8), schema=schema, range_column="id")
    events = list(source.read())
    checkpoints = [e for e in events if isinstance(e, Checkpoint)]
    assert [c.position for c in checkpoints] == [Cursor(2), Cursor(5), Cursor(7)]
    assert _rows(events)["id"].to_pylist() == list(range(8))
    resumed = list(source.read(Cursor.from_json(checkpoints[0].position.to_json())))
    assert _rows(resumed)["id"].to_pylist() == list(range(3, 8))
    assert all(e.cursor is not None for e in resumed if isinstance(e, Data))


def test_cursor_source_takes_arrow_polars_dicts_and_pages():
    def fetch(cursor):
        yield Page(pa.table({"id": [1]}), "a")
        yield pl.DataFrame({"id": [2, 3]}), "b"
        yield {"id": 4}, "c"
        yield [], "d"  # an empty page still moves the cursor

    source = CursorSource(fetch, schema=pa.schema([("id", pa.int64())]))
    events = list(source.read())
    assert _rows(events)["id"].to_pylist() == [1, 2, 3, 4]
    assert events[-1] == Checkpoint(Cursor("d"))


def test_cursor_source_errors_are_clear():
    with pytest.raises(TerminalError, match="JSON-serialisable"):
        list(CursorSource(lambda c: iter([([{"id": 1}], object())])).read())
    with pytest.raises(TerminalError, match="got str"):
        list(CursorSource(lambda c: iter([("not rows", 1)])).read())
    with pytest.raises(TerminalError, match="declared schema"):
        list(CursorSource(lambda c: iter([([{"id": "x"}], 1)]), schema=pa.schema([("id", pa.int64())])).read())
    with pytest.raises(TerminalError, match="resumes from a Cursor"):
        list(CursorSource(_api(3)).read(Watermark.at("mainnet", 1, "0x01")))
