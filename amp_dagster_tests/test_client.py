"""The Flight SQL client against the running dev server: queries, streams, reorgs, resume, failures, auth, TLS."""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from datafusion import SessionContext

from amp_dagster.devserver.server import Fault
from amp_dagster.errors import AuthenticationError, QueryError, ServiceUnavailableError
from amp_dagster.flight.client import AmpClient
from amp_dagster.flight.protocol import (
    Checkpoint,
    Data,
    ProtocolError,
    Reorg,
    Rewind,
    Rollback,
    Watermark,
    normalize_hash,
)
from amp_dagster.retry import RetryPolicy

from .services import closed_port

FAST = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)
COLUMNS = ["_block_num", "block_num", "log_index", "tx_hash", "data"]
STREAM_LOGS = f"SELECT {', '.join(COLUMNS)} FROM eth_rpc.logs SETTINGS stream = true"
ORDER = [("_block_num", "ascending"), ("log_index", "ascending")]


class Mirror:
    """A destination keyed by ``_block_num`` that applies stream events the way the sync engine does:
    buffer data, commit at checkpoints, delete on rollbacks."""

    def __init__(self, committed: pa.Table | None = None) -> None:
        self.committed = [committed] if committed is not None else []
        self.pending: list[pa.RecordBatch] = []
        self.events: list = []
        self.watermark: Watermark | None = None

    def apply(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Data):
            self.pending.append(event.batch)
        elif isinstance(event, Checkpoint):
            self.committed.extend(pa.Table.from_batches([b]) for b in self.pending)
            self.pending = []
            self.watermark = event.position
        elif isinstance(event, Rollback):
            self.committed = [_below(t, event.first_block) for t in self.committed]
            self.pending = [
                b for p in self.pending for b in _below(pa.Table.from_batches([p]), event.first_block).to_batches()
            ]

    def table(self) -> pa.Table:
        return pa.concat_tables(self.committed).sort_by(ORDER) if self.committed else None

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def _below(table: pa.Table, block: int) -> pa.Table:
    return table.filter(pa.compute.less(table["_block_num"], block))


def follow(stream, mirror: Mirror, until_block: int, on_checkpoint=None) -> Mirror:
    """Apply events until a checkpoint reaches ``until_block``; ``on_checkpoint`` may act between events."""
    for event in stream:
        mirror.apply(event)
        if isinstance(event, Checkpoint):
            if on_checkpoint is not None:
                on_checkpoint(event)
            if event.position.blocks["mainnet"].number >= until_block:
                stream.close()
                break
    return mirror


def canonical(server, start: int, end: int) -> pa.Table:
    """The rows the chain holds now for blocks start..=end: what a correct mirror must equal."""
    return server.chain.view().tables(start, end, ["logs"])["logs"].select(COLUMNS).sort_by(ORDER)


def assert_mirrors(mirror: Mirror, server, start: int, end: int) -> None:
    got, want = mirror.table(), canonical(server, start, end)
    assert got.num_rows == want.num_rows, "a gap or a duplicate"
    assert got.equals(want)


# -- batch queries -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        'SELECT * FROM "_/eth_rpc@0.0.0".logs WHERE _block_num BETWEEN 15000010 AND 15000060',
        "SELECT block_num, count(*) AS n, sum(gas_used) AS gas FROM eth_rpc.transactions GROUP BY block_num",
        "SELECT b.block_num, b.hash, count(l.log_index) AS logs FROM eth_rpc.blocks b "
        "JOIN eth_rpc.logs l ON l.block_hash = b.hash GROUP BY b.block_num, b.hash",
        "SELECT address, count(*) AS transfers FROM eth_rpc.logs WHERE topic0 = "
        "X'ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef' GROUP BY address",
    ],
)
def test_query_equals_datafusion_over_the_same_data(devserver, sql):
    server = devserver(blocks=120, start_block=15_000_000)
    result = AmpClient(server.url).query(sql)
    got = pa.Table.from_batches(list(result.reader), result.schema)
    ctx = SessionContext()
    view = server.chain.view()
    for name, table in view.tables(view.start_block, view.head).items():
        ctx.register_record_batches(name, [table.to_batches()])
    local = sql.replace('"_/eth_rpc@0.0.0".', "").replace("eth_rpc.", "")
    want = ctx.sql(local).to_arrow_table()
    assert got.num_rows == want.num_rows > 0
    keys = [(c, "ascending") for c in want.column_names if not pa.types.is_nested(want.schema.field(c).type)]
    assert got.sort_by(keys).equals(want.sort_by(keys).cast(got.schema))
    (synced,) = result.ranges
    assert (synced.network, synced.start, synced.end) == ("mainnet", 15_000_000, 15_000_119)
    assert synced.hash == normalize_hash(view.block_hash(15_000_119))
    assert synced.prev_hash == normalize_hash(view.block_hash(14_999_999))


def test_query_is_read_lazily_batch_by_batch(devserver):
    server = devserver(blocks=2000)
    result = AmpClient(server.url).query("SELECT * FROM eth_rpc.logs")
    with pytest.raises(RuntimeError, match="after the reader has been read"):
        _ = result.ranges
    first = result.reader.read_next_batch()
    assert 0 < first.num_rows < 20_000  # one ~2 MiB slice, not the whole result
    rest = sum(b.num_rows for b in result.reader)
    assert first.num_rows + rest == server.chain.view().tables(0, 1999, ["logs"])["logs"].num_rows
    assert result.ranges[0].end == 1999


def test_query_result_is_an_arrow_stream(devserver):
    server = devserver(blocks=50)
    result = AmpClient(server.url).query("SELECT block_num, hash FROM eth_rpc.blocks")
    table = pa.RecordBatchReader.from_stream(result).read_all()
    assert table.column("block_num").to_pylist() == list(range(50))


def test_empty_result_still_reports_the_synced_range(devserver):
    server = devserver(blocks=10)
    result = AmpClient(server.url).query("SELECT * FROM eth_rpc.logs WHERE false")
    assert list(result.reader) == []
    assert result.ranges[0].end == 9


# -- streams ---------------------------------------------------------------------------------------------------


def test_stream_ranges_are_contiguous_with_one_marker_per_microbatch(devserver):
    server = devserver(blocks=95, microbatch_blocks=10)
    mirror = follow(AmpClient(server.url).stream(STREAM_LOGS), Mirror(), until_block=94)
    checkpoints = mirror.of(Checkpoint)
    assert [(c.ranges[0].start, c.ranges[0].end) for c in checkpoints] == [
        (s, min(s + 9, 94)) for s in range(0, 95, 10)
    ]
    for data in mirror.of(Data):  # every data batch belongs to a microbatch that was then completed
        assert data.ranges in [c.ranges for c in checkpoints]
        blocks = data.batch.column("_block_num").to_numpy()
        assert (blocks[:-1] <= blocks[1:]).all(), "rows of a microbatch are sorted by _block_num"
    assert mirror.of(Reorg) == [] and mirror.of(Rewind) == []
    assert_mirrors(mirror, server, 0, 94)


@pytest.mark.parametrize("depth", [1, 5, 25], ids=["depth1", "depth5", "deeper-than-a-microbatch"])
def test_reorg_is_reported_at_the_first_replaced_block(devserver, depth):
    server = devserver(blocks=60, microbatch_blocks=10)
    before = canonical(server, 0, 59)

    def fork_at_head(checkpoint):
        if checkpoint.position.blocks["mainnet"].number == 59 and not server.chain.view().history.get(1):
            server.reorg(depth)
            server.advance(3)

    mirror = follow(AmpClient(server.url).stream(STREAM_LOGS), Mirror(), until_block=62, on_checkpoint=fork_at_head)
    (reorg,) = mirror.of(Reorg)
    assert reorg.first_block == 60 - depth
    after = mirror.events[mirror.events.index(reorg) + 1 :]
    first_data = next(e for e in after if isinstance(e, Data))
    assert first_data.ranges[0].start == 60 - depth  # the next data is the new chain from the fork on
    assert_mirrors(mirror, server, 0, 62)
    changed = canonical(server, 60 - depth, 59)
    assert not changed.equals(before.filter(pa.compute.greater_equal(before["_block_num"], 60 - depth)))


def test_resume_continues_at_the_next_block(devserver):
    server = devserver(blocks=50, microbatch_blocks=10)
    client = AmpClient(server.url)
    first = follow(client.stream(STREAM_LOGS), Mirror(), until_block=29)
    assert first.watermark.blocks["mainnet"].number == 29
    resumed = follow(client.stream(STREAM_LOGS, resume=first.watermark.to_json()), Mirror(first.table()), 49)
    data = resumed.of(Data)
    assert data[0].ranges[0].start == 30
    assert resumed.of(Reorg) == []
    assert_mirrors(resumed, server, 0, 49)


def test_resume_from_a_stale_watermark_rewinds_to_the_fork(devserver):
    server = devserver(blocks=50, microbatch_blocks=10)
    client = AmpClient(server.url)
    first = follow(client.stream(STREAM_LOGS), Mirror(), until_block=29)
    server.reorg(25)  # head 49: blocks 25..49 replaced, so the stored block 29 is orphaned
    resumed = follow(client.stream(STREAM_LOGS, resume=first.watermark), Mirror(first.table()), 49)
    assert resumed.events[0] == Reorg("mainnet", 25, 34, "0x" + server.chain.view().block_hash(24).hex())
    assert_mirrors(resumed, server, 0, 49)


def test_resume_from_an_unknown_hash_restarts_at_that_block(devserver):
    server = devserver(blocks=40, microbatch_blocks=10)
    stranger = Watermark.at("mainnet", 20, "0x" + "ee" * 32)
    mirror = follow(AmpClient(server.url).stream(STREAM_LOGS, resume=stranger), Mirror(), until_block=39)
    assert mirror.events[0] == Reorg("mainnet", 20, 29, "0x" + server.chain.view().block_hash(19).hex())
    assert mirror.of(Data)[0].ranges[0].start == 20


def test_dropped_stream_mid_microbatch_leaves_no_gap_and_no_duplicate(devserver):
    server = devserver(blocks=3000, microbatch_blocks=1000)
    server.inject(Fault("drop", after_batches=6))  # inside the second microbatch (several batches each)
    client = AmpClient(server.url, stream_retry=FAST)
    stream = client.stream(STREAM_LOGS)
    mirror = follow(stream, Mirror(), until_block=2999)
    assert stream.reconnects == 1
    (rewind,) = mirror.of(Rewind)
    assert rewind.first_block == 1000 and "dropped" in rewind.reason
    resent = mirror.events[mirror.events.index(rewind) + 1 :]
    assert next(e for e in resent if isinstance(e, Data)).ranges[0].start == 1000
    assert_mirrors(mirror, server, 0, 2999)


def test_stream_survives_a_server_restart(devserver):
    server = devserver(blocks=30, microbatch_blocks=10)
    port, chain = server.port, server.chain
    client = AmpClient(server.url, stream_retry=RetryPolicy(attempts=20, initial_delay=0.05, max_delay=0.2))

    def restart(checkpoint):
        nonlocal server
        if checkpoint.position.blocks["mainnet"].number == 29:
            server.shutdown()
            chain.advance(10)
            server = devserver(location=f"grpc://127.0.0.1:{port}", chain=chain, microbatch_blocks=10)

    stream = client.stream(STREAM_LOGS)
    mirror = follow(stream, Mirror(), until_block=39, on_checkpoint=restart)
    assert stream.reconnects >= 1
    assert_mirrors(mirror, server, 0, 39)


def batch_rows(server, last_block: int) -> pa.Table:
    """The canonical chain's result of the streamed query, computed independently: a batch query."""
    sql = f"SELECT {', '.join(COLUMNS)} FROM eth_rpc.logs WHERE _block_num <= {last_block}"
    return AmpClient(server.url).query(sql).reader.read_all().sort_by(ORDER)


def test_random_reorgs_of_every_shape_while_the_chain_grows(devserver):
    server = devserver(
        blocks=20, microbatch_blocks=5, block_time=0.02, reorg_probability=0.2, max_reorg_depth=8, seed=7
    )
    stream = AmpClient(server.url).stream(STREAM_LOGS)
    events, mirror = iter(stream), Mirror()
    for event in events:
        mirror.apply(event)
        if isinstance(event, Checkpoint) and len(mirror.of(Reorg)) >= 4:
            break
    server.pause()  # the chain stands: catch up with its head, then it must equal a batch query over it
    head = server.chain.head
    head_hash = normalize_hash(server.chain.view().block_hash(head))
    while (mirror.watermark.blocks["mainnet"].number, mirror.watermark.blocks["mainnet"].hash) != (head, head_hash):
        mirror.apply(next(events))
    stream.close()
    assert mirror.table().equals(batch_rows(server, head))


@pytest.mark.parametrize(("depth", "length"), [(10, 3), (4, 12)], ids=["shorter", "longer"])
def test_reorg_to_a_shorter_or_longer_chain(devserver, depth, length):
    server = devserver(blocks=60, microbatch_blocks=10)
    head = 60 - depth + length - 1
    stream, mirror, forked = AmpClient(server.url).stream(STREAM_LOGS), Mirror(), False
    for event in stream:
        mirror.apply(event)
        if isinstance(event, Checkpoint) and event.position.blocks["mainnet"].number == 59 and not forked:
            forked = server.reorg(depth, length) == 60 - depth
        elif isinstance(event, Checkpoint) and forked and event.position.blocks["mainnet"].number == head:
            stream.close()
    (reorg,) = mirror.of(Reorg)
    assert (reorg.first_block, reorg.last_block) == (60 - depth, max(59, min(head, 60 - depth + 9)))  # one microbatch
    assert mirror.watermark.blocks["mainnet"].number == head
    # a shorter chain: rows of the orphaned blocks above the new head are gone, not kept
    assert mirror.table().column("_block_num").to_numpy().max() <= head
    assert mirror.table().equals(batch_rows(server, head))


@pytest.mark.parametrize("after", [1, 3])
def test_a_drop_inside_a_microbatch_rewinds_it(devserver, after):
    server = devserver(blocks=3000, microbatch_blocks=1000)
    server.inject(Fault("drop", microbatch=1, after_batches=after))
    stream = AmpClient(server.url, stream_retry=FAST).stream(STREAM_LOGS)
    mirror = follow(stream, Mirror(), until_block=2999)
    assert stream.reconnects == 1
    (rewind,) = mirror.of(Rewind)
    assert rewind.first_block == 1000
    before = mirror.events[: mirror.events.index(rewind)]
    assert [type(e).__name__ for e in before[-after:]] == ["Data"] * after  # data of an unfinished microbatch
    assert before[-after - 1].ranges[0].end == 999  # ...that followed the first microbatch's checkpoint
    assert mirror.table().equals(batch_rows(server, 2999))


def test_a_new_server_with_the_same_seed_on_the_same_port_continues_the_stream(devserver):
    first = devserver(blocks=30, microbatch_blocks=10, seed=11)
    port = first.port
    first.inject(Fault("slow", delay=0.15))  # room to stop the server between a microbatch's data and its marker
    stream = AmpClient(first.url, stream_retry=RetryPolicy(attempts=40, initial_delay=0.05, max_delay=0.2))
    stream = stream.stream(STREAM_LOGS)
    servers: list = []

    def restart() -> None:
        first.shutdown()  # the stream is cut inside microbatch 10..19
        servers.append(devserver(location=f"grpc://127.0.0.1:{port}", blocks=45, microbatch_blocks=10, seed=11))

    mirror, restarter = Mirror(), threading.Thread(target=restart)
    for event in stream:
        mirror.apply(event)
        if isinstance(event, Data) and event.ranges[0].start == 10 and not restarter.is_alive() and not servers:
            restarter.start()
        if isinstance(event, Checkpoint) and event.position.blocks["mainnet"].number == 44:
            stream.close()
    restarter.join()
    assert stream.reconnects >= 1
    (rewind,) = mirror.of(Rewind)
    assert rewind.first_block == 10 and mirror.of(Reorg) == []  # the same canonical chain: no reorg, no gap
    ends = [(c.ranges[0].start, c.ranges[0].end) for c in mirror.of(Checkpoint)]
    assert ends == [(0, 9), (10, 19), (20, 29), (30, 39), (40, 44)]
    assert mirror.table().equals(batch_rows(servers[0], 44))


# -- errors ----------------------------------------------------------------------------------------------------


def test_non_incremental_streaming_sql_is_refused_clearly(devserver):
    server = devserver(blocks=10)
    stream = AmpClient(server.url).stream("SELECT count(*) FROM eth_rpc.logs SETTINGS stream = true")
    with pytest.raises(QueryError) as caught:
        next(iter(stream))
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "non-incremental operation: Aggregate" in str(caught.value)
    assert "SELECT count(*) FROM eth_rpc.logs" in str(caught.value)


@pytest.mark.parametrize(
    ("sql", "code", "message"),
    [
        (
            "SELECT * FROM eth_rpc.nope",
            "NOT_FOUND",
            "table 'eth_rpc.nope' not found: dataset '_/eth_rpc@0.0.0' has no table 'nope' "
            "(its tables: blocks, logs, transactions)",
        ),
        (
            'SELECT * FROM "_/eth_rpc@0.0.0".blocks b JOIN "_/eth_rpc@0.0.0".nope n ON true',
            "NOT_FOUND",
            "table '\"_/eth_rpc@0.0.0\".nope' not found",
        ),
        ("SELECT * FROM base_rpc.logs", "NOT_FOUND", "table 'base_rpc.logs' not found: no dataset 'base_rpc'"),
        (
            "SELECT * FROM amp.eth_rpc.blocks",
            "INVALID_ARGUMENT",
            "catalog-qualified table references are not supported: amp.eth_rpc.blocks",
        ),
        (
            "SELECT * FROM datafusion.eth_rpc.blocks SETTINGS stream = true",
            "INVALID_ARGUMENT",
            "catalog-qualified table references are not supported: datafusion.eth_rpc.blocks",
        ),
        ("SELECT * FROM logs", "INVALID_ARGUMENT", "unqualified table 'logs': every table must be qualified"),
    ],
    ids=["unknown-table", "unknown-table-quoted", "unknown-dataset", "three-part", "three-part-default", "bare"],
)
def test_unknown_and_malformed_table_references_are_named(devserver, sql, code, message):
    server = devserver(blocks=5)
    with pytest.raises(QueryError) as caught:
        AmpClient(server.url, query_retry=FAST).query(sql)
    assert caught.value.code == code and not caught.value.transient
    assert caught.value.server_message.startswith(message) or message in caught.value.server_message


def test_bad_table_and_bad_sql_are_clear_terminal_errors(devserver):
    server = devserver(blocks=10)
    client = AmpClient(server.url)
    with pytest.raises(QueryError, match=r"'eth_rpc\.nope' not found") as caught:
        client.query("SELECT * FROM eth_rpc.nope")
    assert not caught.value.transient and "Python exception" not in str(caught.value)
    with pytest.raises(QueryError, match="SQL parse error") as caught:
        client.query("SELEC * FROM eth_rpc.logs")
    assert caught.value.code == "INVALID_ARGUMENT"
    with pytest.raises(QueryError, match="no entry for network 'mainnet'"):
        next(iter(client.stream(STREAM_LOGS, resume=Watermark.at("base", 5, "0x01"))))


def test_transient_unavailability_is_retried_then_surfaces(devserver):
    server = devserver(blocks=10)
    client = AmpClient(server.url, query_retry=FAST)
    server.inject(Fault("unavailable", times=2))
    assert client.query("SELECT block_num FROM eth_rpc.blocks").reader.read_all().num_rows == 10
    server.inject(Fault("unavailable", times=5))
    with pytest.raises(ServiceUnavailableError, match="injected fault: unavailable"):
        client.query("SELECT block_num FROM eth_rpc.blocks")


def test_a_down_server_is_a_transient_error_naming_the_address():
    port = closed_port()
    client = AmpClient(f"grpc://127.0.0.1:{port}", token="s3cret-token", query_retry=FAST)
    with pytest.raises(ServiceUnavailableError) as caught:
        client.query("SELECT 1")
    assert f"127.0.0.1:{port}" in str(caught.value) and caught.value.transient
    assert "s3cret-token" not in str(caught.value)


def test_bearer_token_from_config_or_environment_and_never_shown(devserver, monkeypatch, caplog):
    server = devserver(blocks=5, token="s3cret-token")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthenticationError, match="AMP_AUTH_TOKEN"):
        AmpClient(server.url, query_retry=FAST).query("SELECT 1")
    with pytest.raises(AuthenticationError):
        AmpClient(server.url, token="wrong", query_retry=FAST).query("SELECT 1")
    client = AmpClient(server.url, token="s3cret-token")
    assert client.query("SELECT block_num FROM eth_rpc.blocks").reader.read_all().num_rows == 5
    monkeypatch.setenv("AMP_AUTH_TOKEN", "s3cret-token")
    from_env = AmpClient(server.url)
    assert from_env.query("SELECT 1 AS one").reader.read_all().column("one").to_pylist() == [1]
    assert "s3cret-token" not in repr(client) + repr(from_env) + caplog.text


def test_a_protocol_violation_is_a_terminal_error(devserver):
    class NoMetadata(flight.FlightServerBase):
        def get_flight_info(self, context, descriptor):
            return flight.FlightInfo(
                pa.schema([("x", pa.int64())]), descriptor, [flight.FlightEndpoint(b"t", [])], -1, -1
            )

        def do_get(self, context, ticket):
            return flight.RecordBatchStream(pa.table({"x": [1, 2]}))

    server = NoMetadata("grpc://127.0.0.1:0")
    try:
        with pytest.raises(ProtocolError, match="without app_metadata"):
            next(iter(AmpClient(f"grpc://127.0.0.1:{server.port}").stream("SELECT 1")))
    finally:
        server.shutdown()


# -- any Flight SQL server ---------------------------------------------------------------------------------


class PlainFlightSql(flight.FlightServerBase):
    """A Flight SQL server that is not amp: no app_metadata, and the result split over two endpoints, the second
    one redeemed at another server's location."""

    def __init__(self, other: str | None = None) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.other = other
        self.parts = {b"part-1": pa.table({"n": [1, 2, 3]}), b"part-2": pa.table({"n": [4, 5]})}

    def get_flight_info(self, context, descriptor):
        endpoints = [flight.FlightEndpoint(b"part-1", [])]
        endpoints.append(flight.FlightEndpoint(b"part-2", [self.other] if self.other else []))
        return flight.FlightInfo(pa.schema([("n", pa.int64())]), descriptor, endpoints, 5, -1)

    def do_get(self, context, ticket):
        return flight.RecordBatchStream(self.parts[ticket.ticket])


def test_batch_queries_work_against_any_flight_sql_server():
    second = PlainFlightSql()
    first = PlainFlightSql(other=f"grpc://127.0.0.1:{second.port}")
    try:
        result = AmpClient(f"grpc://127.0.0.1:{first.port}").query("SELECT n FROM t")
        assert result.reader.read_all().column("n").to_pylist() == [1, 2, 3, 4, 5]
        assert result.ranges == ()
    finally:
        first.shutdown()
        second.shutdown()


# -- TLS -------------------------------------------------------------------------------------------------------


def _self_signed() -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def test_tls(devserver):
    cert, key = _self_signed()
    server = devserver(location="grpc+tls://localhost:0", blocks=5, tls_certificates=[flight.CertKeyPair(cert, key)])
    url = f"grpc+tls://localhost:{server.port}"
    client = AmpClient(url, tls_root_certs=cert)
    assert client.query("SELECT block_num FROM eth_rpc.blocks").reader.read_all().num_rows == 5
    with pytest.raises(ServiceUnavailableError):
        AmpClient(url, query_retry=FAST).query("SELECT 1")  # the certificate is not trusted
    with pytest.raises(ServiceUnavailableError):
        AmpClient(f"grpc://localhost:{server.port}", query_retry=FAST).query("SELECT 1")  # plaintext to a TLS port


def test_closing_a_stream_from_another_thread_ends_it(devserver):
    server = devserver(blocks=10, microbatch_blocks=10)
    stream = AmpClient(server.url).stream(STREAM_LOGS)
    threading.Timer(0.5, stream.close).start()
    events = list(stream)  # blocks at the head until closed
    assert isinstance(events[-1], Checkpoint) and events[-1].position.blocks["mainnet"].number == 9


def test_a_slow_server_delivers_the_same_data(devserver):
    server = devserver(blocks=30, microbatch_blocks=10)
    server.inject(Fault("slow", delay=0.02))
    mirror = follow(AmpClient(server.url).stream(STREAM_LOGS), Mirror(), until_block=29)
    assert_mirrors(mirror, server, 0, 29)


def test_an_internal_server_error_is_terminal_and_not_retried(devserver):
    server = devserver(blocks=5)
    server.inject(Fault("internal", times=1))
    client = AmpClient(server.url, query_retry=FAST)
    with pytest.raises(QueryError, match="injected fault: internal") as caught:
        client.query("SELECT 1")
    assert caught.value.code == "INTERNAL" and not caught.value.transient
    assert client.query("SELECT 1 AS one").reader.read_all().num_rows == 1  # the fault was used up, not retried
