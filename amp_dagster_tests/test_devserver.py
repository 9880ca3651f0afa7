"""The dev server speaks amp's wire protocol: checked with a raw pyarrow Flight client and with ADBC's driver."""

from __future__ import annotations

import itertools
import json

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from amp_dagster.devserver.chain import Chain
from amp_dagster.flight.protocol import (
    ZERO_HASH,
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
