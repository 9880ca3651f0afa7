"""The dev server speaks amp's wire protocol: checked with a raw pyarrow Flight client and with ADBC's driver."""

from __future__ import annotations

import itertools
import json
import random
import time

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from amp_dagster.devserver.admin import AdminServer
from amp_dagster.devserver.chain import Chain
from amp_dagster.devserver.server import DevServer, Fault, PortInUseError, random_reorg
from amp_dagster.flight.protocol import (
    ZERO_HASH,
    BlockRange,
    RangeTracker,
    Reorg,
    Watermark,
    encode_statement_query,
    normalize_hash,
    parse_metadata,
)


def call(server, sql: str, headers: dict[str, str] | None = None, markers: int | None = None):
    """GetFlightInfo + DoGet with a plain pyarrow client; returns the FlightInfo and (rows, metadata) pairs.

    A stream never ends by itself: ``markers`` stops reading after that many completed microbatches.
    """
    client = flight.connect(f"grpc://127.0.0.1:{server.port}")
    options = flight.FlightCallOptions(headers=[(k.encode(), v.encode()) for k, v in (headers or {}).items()])
    info = client.get_flight_info(flight.FlightDescriptor.for_command(encode_statement_query(sql)), options)
    reader = client.do_get(info.endpoints[0].ticket, options)
    messages, complete = [], 0
    while markers is None or complete < markers:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        messages.append((chunk.data, parse_metadata(chunk.app_metadata)))
        complete += messages[-1][1].ranges_complete
    if markers is not None:
        reader.cancel()
    client.close()
    return info, messages


def microbatches(messages):
    """Group a stream's messages per microbatch: [(range, [batches], marker_seen)]."""
    groups = []
    for batch, meta in messages:
        (block_range,) = meta.ranges
        if not groups or groups[-1][2]:
            groups.append([block_range, [], False])
        assert groups[-1][0] == block_range, "every batch of a microbatch carries the identical range"
        groups[-1][1].append(batch)
        if meta.ranges_complete:
            assert batch.num_rows == 0, "the completion marker is an empty batch"
            groups[-1][2] = True
    return groups


def test_flight_info_is_schema_plus_one_endpoint_redeemed_here(devserver):
    server = devserver(blocks=5)
    info, _ = call(server, 'SELECT block_num, hash FROM "_/eth_rpc@0.0.0".blocks')
    assert info.schema.names == ["block_num", "hash"]
    assert info.schema.field("hash").type == pa.binary(32)
    (endpoint,) = info.endpoints
    assert list(endpoint.locations) == []
    assert info.total_records == -1 and info.total_bytes == -1


def test_batch_query_wire_sequence(devserver):
    server = devserver(blocks=500, start_block=100)
    _, messages = call(server, "SELECT * FROM eth_rpc.logs")
    *data, (marker, final) = messages
    assert marker.num_rows == 0 and final.ranges_complete
    assert all(not meta.ranges_complete and meta.ranges == final.ranges for _, meta in data)
    assert all(b.nbytes <= 2.2 * 2**20 for b, _ in data), "FlightData is sliced near 2 MiB"
    (synced,) = final.ranges
    view = server.chain.view()
    assert (synced.start, synced.end, synced.hash) == (100, 599, normalize_hash(view.block_hash(599)))
    assert synced.prev_hash == normalize_hash(view.block_hash(99)) and synced.timestamp == view.timestamp(599)
    assert sum(b.num_rows for b, _ in data) == view.tables(100, 599, ["logs"])["logs"].num_rows


def test_batch_query_without_rows_sends_one_empty_batch_then_the_marker(devserver):
    server = devserver(blocks=5)
    _, messages = call(server, "SELECT * FROM eth_rpc.logs WHERE false")
    assert [(b.num_rows, m.ranges_complete) for b, m in messages] == [(0, False), (0, True)]
    _, messages = call(server, "SELECT 1 AS one")  # no table: no synced range at all
    assert messages[-1][1].ranges == ()


def test_stream_microbatches(devserver):
    server = devserver(blocks=35, microbatch_blocks=10)
    _, messages = call(server, "SELECT block_num, log_index FROM eth_rpc.logs SETTINGS stream = true", markers=4)
    groups = microbatches(messages)
    complete = [g for g in groups if g[2]]
    assert [(r.start, r.end) for r, _, _ in complete] == [(0, 9), (10, 19), (20, 29), (30, 34)]
    first = complete[0][0]
    assert first.prev_hash == ZERO_HASH  # genesis
    for (prev, _, _), (nxt, _, _) in itertools.pairwise(complete):
        assert nxt.prev_hash == prev.hash
    for block_range, batches, _ in complete:
        assert batches[0].num_rows == 0, "a microbatch opens with amp's keep-alive"
        rows = pa.Table.from_batches([b for b in batches if b.num_rows])
        numbers = rows.column("block_num").to_pylist()
        assert numbers == sorted(numbers) and set(numbers) <= set(range(block_range.start, block_range.end + 1))


def test_streaming_switches(devserver):
    server = devserver(blocks=5)
    sql = "SELECT block_num FROM eth_rpc.blocks"

    # a batch query ends with its marker; a stream of 5 blocks sends keep-alive, data, marker, then waits
    _, batch = call(server, sql)
    assert batch[-1][1].ranges_complete and len(batch) == 2
    _, streamed = call(server, sql + " SETTINGS stream = true", markers=1)
    assert [m.ranges_complete for _, m in streamed] == [False, False, True]
    _, not_streamed = call(server, sql + " SETTINGS stream = 1")  # not a boolean literal: stays a batch query
    assert len(not_streamed) == 2
    _, overridden = call(server, sql + " SETTINGS stream = true", {"amp-stream": "false"})
    assert len(overridden) == 2
    _, by_header = call(server, sql, {"amp-stream": "TRUE"}, markers=1)
    assert by_header[-1][1].ranges[0].end == 4 and by_header[-1][1].ranges_complete


def test_resume_header(devserver):
    server = devserver(blocks=30, microbatch_blocks=10)
    sql = "SELECT block_num FROM eth_rpc.blocks SETTINGS stream = true"
    view = server.chain.view()
    cursor = Watermark.at("mainnet", 14, view.block_hash(14)).to_json()
    _, messages = call(server, sql, {"amp-resume": cursor}, markers=1)
    assert messages[0][1].ranges[0].start == 15
    # the trick to start a stream at block N: a cursor at N-1 (hash without 0x is accepted)
    cursor = json.dumps({"mainnet": {"number": 19, "hash": view.block_hash(19).hex()}})
    _, messages = call(server, sql, {"amp-resume": cursor}, markers=1)
    assert messages[0][1].ranges[0].start == 20
    _, messages = call(server, sql, {"amp-resume": "{not json"}, markers=1)
    assert messages[0][1].ranges[0].start == 0  # a malformed cursor is silently ignored, as amp does
    with pytest.raises(flight.FlightInternalError, match="no entry for network 'mainnet'"):
        call(server, sql, {"amp-resume": '{"base": {"number": 1, "hash": "0x01"}}'})


def test_refusals_use_amps_status_codes(devserver):
    server = devserver(blocks=5)
    client = flight.connect(f"grpc://127.0.0.1:{server.port}")
    with pytest.raises(pa.ArrowInvalid, match="unsupported flight descriptor type"):
        client.get_flight_info(flight.FlightDescriptor.for_path("eth_rpc", "logs"))
    with pytest.raises(pa.ArrowInvalid, match=r"ProtocolBuffers decoding error|unsupported flight descriptor"):
        client.get_flight_info(flight.FlightDescriptor.for_command(b"SELECT 1"))  # raw SQL, not an Any
    other = b"\n" + bytes([len(u := b"type.googleapis.com/arrow.flight.protocol.sql.CommandGetCatalogs")]) + u
    with pytest.raises(pa.ArrowInvalid, match=r"unsupported flight descriptor command: .*CommandGetCatalogs"):
        client.get_flight_info(flight.FlightDescriptor.for_command(other))
    query = flight.FlightDescriptor.for_command(encode_statement_query("SELECT 1"))
    for rpc in (
        lambda: list(client.list_flights()),
        lambda: list(client.list_actions()),
        lambda: list(client.do_action(flight.Action("x", b""))),
        lambda: client.get_schema(query),
    ):
        with pytest.raises(pa.ArrowNotImplementedError):
            rpc()
    with pytest.raises(pa.ArrowInvalid, match="non-incremental operation: Sort"):
        call(server, "SELECT * FROM eth_rpc.logs ORDER BY log_index SETTINGS stream = true")
    with pytest.raises(pa.ArrowInvalid, match="non-incremental operation: Limit"):
        call(server, "SELECT * FROM eth_rpc.logs LIMIT 5 SETTINGS stream = true")
    with pytest.raises(pa.ArrowInvalid, match="block_num\\(\\) is only allowed in streaming queries"):
        call(server, "SELECT block_num() FROM eth_rpc.logs")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT block_num(), count(*) AS n FROM eth_rpc.logs GROUP BY block_num()",
        "SELECT l.log_index, t.gas_used FROM eth_rpc.logs l JOIN eth_rpc.transactions t ON l.tx_hash = t.tx_hash",
        "SELECT block_num FROM eth_rpc.blocks UNION ALL SELECT block_num FROM eth_rpc.logs",
        "SELECT log_index, tx_hash FROM eth_rpc.logs "
        "WHERE tx_hash IN (SELECT tx_hash FROM eth_rpc.transactions WHERE status)",
    ],
    ids=["per-block-aggregate", "inner-join", "union-all", "semi-join"],
)
def test_incremental_queries_stream(devserver, sql):
    server = devserver(blocks=20, microbatch_blocks=10)
    _, messages = call(server, sql + " SETTINGS stream = true", markers=2)
    complete = [g for g in microbatches(messages) if g[2]]
    assert [(r.start, r.end) for r, _, _ in complete][:2] == [(0, 9), (10, 19)]
    assert sum(b.num_rows for _, batches, _ in complete for b in batches) > 0


@pytest.mark.parametrize(
    ("sql", "operation"),
    [
        ("SELECT address, count(*) FROM eth_rpc.logs GROUP BY address", "Aggregate"),
        ("SELECT DISTINCT address FROM eth_rpc.logs", "Aggregate"),
        ("SELECT block_num FROM eth_rpc.blocks UNION SELECT block_num FROM eth_rpc.logs", "Aggregate"),
        ("SELECT * FROM eth_rpc.logs l LEFT JOIN eth_rpc.transactions t ON l.tx_hash = t.tx_hash", "Left Join"),
        ("SELECT log_index, row_number() OVER (ORDER BY log_index) FROM eth_rpc.logs", "Window"),
    ],
)
def test_non_incremental_queries_are_refused_at_do_get(devserver, sql, operation):
    server = devserver(blocks=5)
    client = flight.connect(f"grpc://127.0.0.1:{server.port}")
    descriptor = flight.FlightDescriptor.for_command(encode_statement_query(sql + " SETTINGS stream = true"))
    info = client.get_flight_info(descriptor)  # planning succeeds: the check runs at DoGet, as in amp
    with pytest.raises(pa.ArrowInvalid, match=f"non-incremental operation: {operation}"):
        client.do_get(info.endpoints[0].ticket).read_all()


def test_a_stream_at_head_waits_for_new_blocks(devserver):
    server = devserver(blocks=10, microbatch_blocks=10, block_time=0.05)
    _, messages = call(server, "SELECT block_num FROM eth_rpc.blocks SETTINGS stream = true", markers=2)
    complete = [g[0] for g in microbatches(messages) if g[2]]
    assert complete[0].end == 9 and complete[1].start == 10  # the next microbatch came from new blocks


def test_nothing_synced_sends_one_empty_marker_and_closes(devserver):
    server = devserver(blocks=0, start_block=100)
    _, messages = call(server, "SELECT * FROM eth_rpc.blocks SETTINGS stream = true")
    assert [(b.num_rows, m.ranges, m.ranges_complete) for b, m in messages] == [(0, (), True)]


def test_bearer_token_is_checked_when_configured(devserver):
    server = devserver(blocks=5, token="s3cret")
    with pytest.raises(flight.FlightUnauthenticatedError):
        call(server, "SELECT 1")
    _, messages = call(server, "SELECT 1 AS one", {"authorization": "Bearer s3cret"})
    assert messages[0][0].column(0).to_pylist() == [1]


def test_adbc_flight_sql_driver_reads_the_dev_server(devserver):
    import adbc_driver_flightsql.dbapi as adbc

    server = devserver(blocks=50, start_block=15_000_000)
    with adbc.connect(f"grpc://127.0.0.1:{server.port}", autocommit=True) as conn, conn.cursor() as cur:
        cur.execute('SELECT block_num, hash, gas_used FROM "_/eth_rpc@0.0.0".blocks ORDER BY block_num')
        got = cur.fetch_arrow_table()
        cur.execute("SELECT count(*) AS n FROM eth_rpc.logs")
        (count,) = cur.fetchone()
    want = Chain(seed=0, start_block=15_000_000, blocks=50).view().tables(15_000_000, 15_000_049)
    assert got.column("block_num").to_pylist() == list(range(15_000_000, 15_000_050))
    assert got.column("hash").to_pylist() == want["blocks"].column("hash").to_pylist()
    assert got.column("gas_used").to_pylist() == want["blocks"].column("gas_used").to_pylist()
    assert count == want["logs"].num_rows


# -- reorg shapes, pause, faults, ordering -----------------------------------------------------------------


class Stream:
    """A streaming DoGet read microbatch by microbatch, so a test can change the chain between reads."""

    def __init__(self, server, sql: str, headers: dict[str, str] | None = None) -> None:
        self.client = flight.connect(f"grpc://127.0.0.1:{server.port}")
        options = flight.FlightCallOptions(headers=[(k.encode(), v.encode()) for k, v in (headers or {}).items()])
        descriptor = flight.FlightDescriptor.for_command(encode_statement_query(sql + " SETTINGS stream = true"))
        info = self.client.get_flight_info(descriptor, options)
        self.reader = self.client.do_get(info.endpoints[0].ticket, options)
        self.tracker = RangeTracker()
        self.reorgs: list[Reorg] = []

    def microbatches(self, count: int) -> list[tuple[BlockRange, pa.Table]]:
        """The next ``count`` completed microbatches: their range and rows; reorgs seen go to ``self.reorgs``."""
        out, batches = [], []
        while len(out) < count:
            chunk = self.reader.read_chunk()
            meta = parse_metadata(chunk.app_metadata)
            self.reorgs.extend(self.tracker.observe(meta.ranges))  # amp's client rules (§4) reject bad ranges
            if chunk.data.num_rows:
                batches.append(chunk.data)
            if meta.ranges_complete:
                out.append((meta.ranges[0], pa.Table.from_batches(batches, self.reader.schema)))
                batches = []
        return out

    def close(self) -> None:
        self.reader.cancel()
        self.client.close()


def logs(server, start: int, end: int) -> pa.Table:
    return server.chain.view().tables(start, end, ["logs"])["logs"].select(["_block_num", "log_index", "tx_hash"])


def test_reorg_to_a_shorter_chain_restarts_at_the_fork_and_waits_for_the_chain_to_grow(devserver):
    server = devserver(blocks=30, microbatch_blocks=10)
    stream = Stream(server, "SELECT _block_num, log_index, tx_hash FROM eth_rpc.logs")
    *_, (last, _) = stream.microbatches(3)
    assert (last.start, last.end) == (20, 29)
    old_head_hash = last.hash

    assert server.reorg(depth=5, length=2) == 25  # 25..29 become two new blocks: the head drops to 26
    assert server.chain.head == 26
    ((shorter, rows),) = stream.microbatches(1)
    view = server.chain.view()
    assert (shorter.start, shorter.end) == (25, 26)
    assert shorter.prev_hash == normalize_hash(view.block_hash(24)) != old_head_hash
    assert shorter.hash == normalize_hash(view.block_hash(26))
    assert stream.reorgs == [Reorg("mainnet", 25, 29, shorter.prev_hash)]  # orphans reach the old head
    assert rows.equals(logs(server, 25, 26))

    assert server.reorg(depth=3, length=0) == 24  # the tip is dropped: the stream restarts at 24 once it exists
    server.advance(4)
    ((grown, rows),) = stream.microbatches(1)
    assert (grown.start, grown.end) == (24, 27) and grown.prev_hash == normalize_hash(view.block_hash(23))
    assert stream.reorgs[1:] == [Reorg("mainnet", 24, 27, grown.prev_hash)]
    assert rows.equals(logs(server, 24, 27))
    stream.close()


def test_reorg_to_a_longer_chain_resends_from_the_fork_to_the_new_head(devserver):
    server = devserver(blocks=30, microbatch_blocks=10)
    stream = Stream(server, "SELECT _block_num, log_index, tx_hash FROM eth_rpc.logs")
    stream.microbatches(3)
    before = logs(server, 27, 29)
    assert server.reorg(depth=3, length=8) == 27
    assert server.chain.head == 34
    ((longer, rows),) = stream.microbatches(1)
    assert (longer.start, longer.end) == (27, 34)
    assert stream.reorgs == [Reorg("mainnet", 27, 34, normalize_hash(server.chain.view().block_hash(26)))]
    assert rows.equals(logs(server, 27, 34))
    assert not rows.slice(0, before.num_rows).equals(before)  # new blocks, not the old ones resent
    stream.close()


def test_reorg_lengths_are_checked():
    chain = Chain(blocks=10)
    with pytest.raises(ValueError, match="reorg length must be at least 0"):
        chain.reorg(depth=3, length=-1)
    with pytest.raises(ValueError, match=r"reorg length must be at least 1 \(the chain keeps at least one block"):
        chain.reorg(depth=10, length=0)
    assert chain.head == 9 and chain.reorg(depth=10, length=1) == 0 and chain.head == 0


def test_the_chain_is_a_function_of_the_seed_and_the_operations():
    def build(seed: int) -> Chain:
        chain = Chain(seed=seed, blocks=50)
        chain.reorg(depth=5, length=2)
        chain.advance(10)
        chain.reorg(depth=8, length=12)
        return chain

    one, two = build(3).view(), build(3).view()
    assert one.head == two.head == 50 - 5 + 2 + 10 - 8 + 12 - 1
    assert one.tables(0, one.head)["logs"].equals(two.tables(0, two.head)["logs"])
    other = build(4).view()
    assert other.block_hash(10) != one.block_hash(10)


def test_random_reorgs_vary_the_new_length_reproducibly():
    draws = [random_reorg(random.Random(7), 100, 8) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(7)
    shapes = [random_reorg(rng, 100, 8) for _ in range(200)]
    assert all(1 <= depth <= 8 and 1 <= length <= 2 * depth for depth, length in shapes)
    assert any(length < depth for depth, length in shapes) and any(length > depth for depth, length in shapes)
    assert random_reorg(random.Random(1), 3, 8)[0] <= 3  # never deeper than the chain


def test_pause_stops_new_blocks_and_random_reorgs(devserver):
    server = devserver(blocks=20, block_time=0.01, reorg_probability=0.3, max_reorg_depth=4, seed=5)
    deadline = time.monotonic() + 10
    while server.status()["forks"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.pause()
    frozen = server.status()
    assert frozen["paused"] and frozen["forks"] >= 2
    time.sleep(0.1)
    assert server.status() == frozen
    # on the paused chain a batch query is the canonical chain's result
    _, messages = call(server, "SELECT _block_num, log_index, tx_hash FROM eth_rpc.logs")
    order = [("_block_num", "ascending"), ("log_index", "ascending")]
    got = pa.Table.from_batches([b for b, _ in messages if b.num_rows]).sort_by(order)
    assert got.equals(logs(server, 0, frozen["head"]))
    assert messages[-1][1].ranges[0].hash == frozen["head_hash"]
    server.resume()
    while server.status()["head"] == frozen["head"] and server.status()["forks"] == frozen["forks"]:
        assert time.monotonic() < deadline, "the miner did not resume"
        time.sleep(0.02)


def read_until_error(server, sql: str):
    """A stream's (rows, metadata) pairs up to the error that ends it, and that error."""
    client = flight.connect(f"grpc://127.0.0.1:{server.port}")
    info = client.get_flight_info(flight.FlightDescriptor.for_command(encode_statement_query(sql)))
    reader = client.do_get(info.endpoints[0].ticket)
    messages = []
    try:
        while True:
            chunk = reader.read_chunk()
            messages.append((chunk.data, parse_metadata(chunk.app_metadata)))
    except flight.FlightError as exc:
        return messages, exc
    finally:
        client.close()


@pytest.mark.parametrize("after", [2, 1000], ids=["after-2-batches", "before-the-marker"])
def test_a_drop_inside_a_chosen_microbatch(devserver, after):
    server = devserver(blocks=3000, microbatch_blocks=1000)
    server.inject(Fault("drop", microbatch=1, after_batches=after))
    messages, error = read_until_error(server, "SELECT * FROM eth_rpc.logs SETTINGS stream = true")
    assert isinstance(error, flight.FlightUnavailableError) and "dropped" in str(error)
    first, *rest = microbatches(messages)
    assert first[2] and (first[0].start, first[0].end) == (0, 999)
    ((cut_range, cut_batches, completed),) = rest
    assert (cut_range.start, cut_range.end, completed) == (1000, 1999, False)  # no marker for microbatch 1
    data = [b for b in cut_batches if b.num_rows]
    if after == 2:
        assert len(data) == 2
    else:  # fewer data batches than asked: all of them, then the cut instead of the marker
        assert len(data) > 2 and sum(b.num_rows for b in data) == logs(server, 1000, 1999).num_rows
    _, again = call(server, "SELECT * FROM eth_rpc.logs SETTINGS stream = true", markers=2)  # used up
    assert [g[0].end for g in microbatches(again) if g[2]] == [999, 1999]


def test_fault_options_are_checked():
    with pytest.raises(ValueError, match="microbatch=1 applies to drop faults only"):
        Fault("slow", microbatch=1)
    with pytest.raises(ValueError, match="times must be at least 1"):
        Fault("drop", times=0)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT block_num, log_index AS i FROM eth_rpc.logs UNION ALL SELECT block_num, tx_index AS i "
        "FROM eth_rpc.transactions",
        "SELECT l.block_num, l.log_index AS i FROM eth_rpc.logs l JOIN eth_rpc.transactions t "
        "ON l.tx_hash = t.tx_hash WHERE t.status",
        "SELECT block_num, log_index AS i FROM eth_rpc.logs WHERE log_index % 3 = 0",
    ],
    ids=["union-all", "join", "filter"],
)
def test_streamed_rows_are_in_block_order_without_selecting_block_num(devserver, sql):
    server = devserver(blocks=40, microbatch_blocks=20)
    stream = Stream(server, sql)
    streamed = stream.microbatches(2)
    stream.close()
    for block_range, rows in streamed:
        numbers = rows.column("block_num").to_numpy()
        assert len(numbers) and (numbers[:-1] <= numbers[1:]).all(), "rows of a microbatch are ordered by block"
        assert numbers[0] >= block_range.start and numbers[-1] <= block_range.end
    _, batch = call(server, sql)  # the same rows as a batch query over the same blocks
    order = [("block_num", "ascending"), ("i", "ascending")]
    want = pa.Table.from_batches([b for b, _ in batch if b.num_rows]).sort_by(order)
    assert pa.concat_tables(rows for _, rows in streamed).sort_by(order).equals(want)


def test_a_taken_port_is_named(devserver):
    taken = devserver(blocks=5)
    with pytest.raises(PortInUseError, match=f"the Flight port {taken.port} on 127.0.0.1 is already in use"):
        DevServer(f"grpc://127.0.0.1:{taken.port}", blocks=5)
    admin = AdminServer(taken, port=0)
    try:
        port = int(admin.url.rsplit(":", 1)[1])
        with pytest.raises(PortInUseError, match=f"the control API port {port} on 127.0.0.1 is already in use"):
            AdminServer(taken, port=port)
    finally:
        admin.shutdown()
