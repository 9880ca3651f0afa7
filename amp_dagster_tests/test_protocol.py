"""Pure protocol functions: metadata parsing, watermark JSON, the Flight SQL command, and the reorg table (§4)."""

from __future__ import annotations

import json

import pytest
from google.protobuf import any_pb2

from amp_dagster.errors import TerminalError
from amp_dagster.flight.protocol import (
    STATEMENT_QUERY_TYPE_URL,
    ZERO_HASH,
    BatchMetadata,
    BlockRange,
    ProtocolError,
    RangeTracker,
    Reorg,
    Watermark,
    decode_command,
    decode_statement_query,
    encode_statement_query,
    normalize_hash,
    parse_metadata,
)


def h(n: int) -> str:
    return "0x" + f"{n:064x}"


def r(start: int, end: int, prev: int | None = None, net: str = "mainnet") -> BlockRange:
    """A range whose hash is h(end) and whose prev_hash is h(prev) (default start - 1; zero at genesis)."""
    prev_hash = ZERO_HASH if start == 0 else h(start - 1 if prev is None else prev)
    return BlockRange(net, start, end, h(end), prev_hash)


# -- metadata -------------------------------------------------------------------------------------------------


def test_parse_metadata_as_amp_sends_it():
    raw = (
        b'{"ranges":[{"numbers":{"start":100,"end":102},"network":"mainnet","hash":"0x' + b"ab" * 32 + b'",'
        b'"prev_hash":"0x' + b"cd" * 32 + b'","timestamp":1718000000}],"ranges_complete":false}'
    )
    meta = parse_metadata(raw)
    assert meta == BatchMetadata(
        (BlockRange("mainnet", 100, 102, "0x" + "ab" * 32, "0x" + "cd" * 32, 1718000000),), False
    )
    assert parse_metadata(meta.encode()) == meta


def test_parse_metadata_tolerates_omitted_and_unknown_fields():
    raw = json.dumps(
        {
            "ranges": [{"numbers": {"start": 0, "end": 0}, "network": "anvil", "hash": "AB" * 32, "extra": 1}],
            "future_field": True,
        }
    ).encode()
    meta = parse_metadata(raw)
    assert meta.ranges_complete is False  # absent means false, as amp-python reads it
    (only,) = meta.ranges
    assert only.timestamp is None and only.prev_hash == ZERO_HASH and only.hash == "0x" + "ab" * 32


def test_parse_metadata_absent_and_malformed():
    assert parse_metadata(None) is None and parse_metadata(b"") is None
    with pytest.raises(ProtocolError, match="not JSON"):
        parse_metadata(b"{nope")
    with pytest.raises(ProtocolError, match="malformed block range"):
        parse_metadata(b'{"ranges":[{"network":"mainnet"}],"ranges_complete":true}')
    with pytest.raises(ProtocolError, match="not a JSON object"):
        parse_metadata(b"[1, 2]")


def test_empty_ranges_marker():
    assert parse_metadata(b'{"ranges":[],"ranges_complete":true}') == BatchMetadata((), True)


# -- watermarks ----------------------------------------------------------------------------------------------


def test_watermark_json_round_trip_matches_amp_resume_format():
    w = Watermark.from_ranges([r(0, 9), r(5, 7, net="anvil")])
    text = w.to_json()
    assert json.loads(text) == {"anvil": {"number": 7, "hash": h(7)}, "mainnet": {"number": 9, "hash": h(9)}}
    assert Watermark.from_json(text) == w
    assert w.next_block("mainnet") == 10 and w.next_block("base") is None


def test_watermark_accepts_unprefixed_hashes_and_rejects_garbage():
    w = Watermark.from_json('{"mainnet": {"number": 5, "hash": "ABCD"}}')
    assert w.blocks["mainnet"].hash == "0xabcd"
    for bad in ("not json", '{"mainnet": {"number": "x", "hash": "0x1"}}', '{"mainnet": 5}', "[1]"):
        with pytest.raises(TerminalError, match="not a watermark"):
            Watermark.from_json(bad)


def test_watermark_advances_per_network():
    w = Watermark.from_ranges([r(0, 9)])
    w2 = Watermark.from_ranges([r(10, 19)], previous=w)
    assert w2.blocks["mainnet"].number == 19 and w.blocks["mainnet"].number == 9


def test_normalize_hash():
    assert normalize_hash(b"\x01\xff") == "0x01ff"
    assert normalize_hash("0xABCD") == "0xabcd" == normalize_hash("abcd")


# -- the command -------------------------------------------------------------------------------------------


def test_statement_query_is_a_real_protobuf_any():
    sql = "SELECT * FROM \"_/eth_rpc@0.0.0\".logs WHERE topic0 = x'ab' -- ünïcode"
    encoded = encode_statement_query(sql)
    parsed = any_pb2.Any()
    parsed.ParseFromString(encoded)  # the protobuf runtime agrees with our encoding
    assert parsed.type_url == STATEMENT_QUERY_TYPE_URL
    type_url, message = decode_command(parsed.SerializeToString())
    assert type_url == STATEMENT_QUERY_TYPE_URL
    assert decode_statement_query(message) == sql


def test_long_queries_use_multi_byte_lengths():
    sql = "SELECT " + ", ".join(f"c{i}" for i in range(5000))
    assert decode_statement_query(decode_command(encode_statement_query(sql))[1]) == sql


def test_decode_command_rejects_non_any():
    with pytest.raises(ValueError):
        decode_command(b"SELECT 1")  # raw SQL bytes, as amp's docs wrongly show


# -- reorg detection (the table of §4) --------------------------------------------------------------------


def test_same_microbatch_and_progress():
    t = RangeTracker()
    assert t.observe([r(0, 3)]) == []
    assert t.observe([r(0, 3)]) == []  # data batches and the marker of one microbatch repeat the range
    assert t.observe([r(4, 9)]) == []  # progress with prev_hash == previous hash


def test_progress_with_the_wrong_parent_is_a_protocol_error():
    t = RangeTracker()
    t.observe([r(0, 3)])
    with pytest.raises(ProtocolError, match="prev_hash"):
        t.observe([BlockRange("mainnet", 4, 9, h(9), h(999))])


def test_range_starting_inside_the_previous_is_a_reorg():
    t = RangeTracker()
    t.observe([r(0, 3)])
    t.observe([r(4, 9)])
    # restart at 7 with a new parent: blocks 7..=9 (and the new range's end) are invalid
    assert t.observe([BlockRange("mainnet", 7, 12, h(5012), h(5006))]) == [Reorg("mainnet", 7, 12, h(5006))]


def test_reorg_deeper_than_the_new_range_reports_the_old_end():
    t = RangeTracker()
    t.observe([r(0, 20)])
    assert t.observe([BlockRange("mainnet", 10, 15, h(7015), h(7009))]) == [Reorg("mainnet", 10, 20, h(7009))]


def test_restart_with_the_same_parent_is_a_protocol_error():
    t = RangeTracker()
    t.observe([r(0, 9)])
    with pytest.raises(ProtocolError, match="neither progress nor a reorg"):
        t.observe([BlockRange("mainnet", 5, 12, h(12), h(9))])


def test_gap_is_a_protocol_error():
    t = RangeTracker()
    t.observe([r(0, 9)])
    with pytest.raises(ProtocolError, match=r"gap in mainnet: blocks 10..=11 were skipped"):
        t.observe([r(12, 20, prev=11)])


def test_zero_prev_hash_exactly_at_genesis():
    with pytest.raises(ProtocolError, match="zero exactly when"):
        RangeTracker().observe([BlockRange("mainnet", 0, 3, h(3), h(1))])
    with pytest.raises(ProtocolError, match="zero exactly when"):
        RangeTracker().observe([BlockRange("mainnet", 5, 9, h(9), ZERO_HASH)])


def test_duplicate_and_changing_networks_are_protocol_errors():
    with pytest.raises(ProtocolError, match="twice"):
        RangeTracker().observe([r(0, 3), r(0, 3)])
    t = RangeTracker()
    t.observe([r(0, 3)])
    with pytest.raises(ProtocolError, match="networks changed"):
        t.observe([r(0, 3, net="base")])


def test_networks_are_tracked_independently():
    t = RangeTracker()
    t.observe([r(0, 9), r(0, 4, net="base")])
    reorgs = t.observe([r(10, 19), BlockRange("base", 3, 8, h(9008), h(9002))])
    assert reorgs == [Reorg("base", 3, 8, h(9002))]


def test_seeded_watermark_detects_a_reorg_that_happened_while_away():
    seed = Watermark.at("mainnet", 29, h(29))
    t = RangeTracker(seed)
    assert t.observe([r(30, 39)]) == []  # canonical: continues at the next block
    t2 = RangeTracker(seed)
    # the server walked back to block 25 because 29's hash is no longer canonical
    assert t2.observe([BlockRange("mainnet", 25, 39, h(8039), h(24))]) == [Reorg("mainnet", 25, 39, h(24))]
    t3 = RangeTracker(seed)
    # a hash unknown to the server entirely: it restarts at the cursor block itself
    assert t3.observe([BlockRange("mainnet", 29, 35, h(8035), h(28))]) == [Reorg("mainnet", 29, 35, h(28))]


def test_reset_forgets_the_partial_microbatch():
    seed = Watermark.at("mainnet", 9, h(9))
    t = RangeTracker(seed)
    t.observe([r(10, 19)])  # half delivered, then the connection broke
    t.reset(seed)
    assert t.observe([r(10, 24)]) == []  # the resent microbatch (now longer) is progress from the checkpoint
