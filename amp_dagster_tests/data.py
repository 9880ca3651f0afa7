"""Deterministic Arrow test data: amp-shaped chain tables and one table holding every type at its edges."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pyarrow as pa

from amp_dagster.devserver import schemas
from amp_dagster.devserver.chain import Chain

UINT64_MAX = 2**64 - 1
DEC_MAX = Decimal(10**38 - 1)
DEC_MIN = Decimal(-(10**38 - 1))  # not -DEC_MAX: unary minus rounds to the context's 28 digits


def chain_tables(start: int, end: int, seed: int = 1, names=("blocks", "transactions", "logs")) -> dict:
    """amp's tables for blocks ``start..=end`` of a synthetic chain (same seed → same bytes)."""
    chain = Chain(seed=seed, start_block=0, blocks=end + 1)
    return chain.view().tables(start, end, names)


def logs(start: int, end: int, seed: int = 1) -> pa.Table:
    return chain_tables(start, end, seed, ("logs",))["logs"]


def in_batches(table: pa.Table, rows: int) -> pa.RecordBatchReader:
    """A reader yielding the table in batches of ``rows`` rows (the last one shorter)."""
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=rows))


ACCESS_LIST = schemas.TRANSACTIONS.field("access_list").type
HASH_LIST = schemas.TRANSACTIONS.field("blob_versioned_hashes").type

EVERY_TYPE = pa.schema(
    [
        pa.field("_block_num", pa.uint64(), nullable=False),
        pa.field("u64", pa.uint64()),
        pa.field("u32", pa.uint32()),
        pa.field("i32", pa.int32()),
        pa.field("i64", pa.int64()),
        pa.field("f64", pa.float64()),
        pa.field("flag", pa.bool_()),
        pa.field("hash", schemas.B32),
        pa.field("address", schemas.B20),
        pa.field("blob", pa.binary()),
        pa.field("text", pa.string()),
        pa.field("ts", schemas.TS),
        pa.field("amount", schemas.DEC),
        pa.field("hashes", HASH_LIST),
        pa.field("access_list", ACCESS_LIST),
        pa.field("i8", pa.int8()),
        pa.field("i16", pa.int16()),
        pa.field("u8", pa.uint8()),
        pa.field("u16", pa.uint16()),
        pa.field("f32", pa.float32()),
        pa.field("day", pa.date32()),
        pa.field("big_text", pa.large_string()),
        pa.field("tag", pa.dictionary(pa.int32(), pa.string())),
    ]
)


def every_type() -> pa.Table:
    """Four rows covering nulls, uint64 max, 32-byte hashes, empty binary, decimal extremes and timestamps."""
    utc = dt.UTC
    h = [bytes([i]) * 32 for i in range(4)]
    rows = {
        "_block_num": [0, 1, 2, 3],
        "u64": [0, UINT64_MAX, None, 2**63],
        "u32": [0, 2**32 - 1, None, 7],
        "i32": [-(2**31), 2**31 - 1, None, 0],
        "i64": [-(2**63), 2**63 - 1, None, 42],
        "f64": [0.5, -1.5e300, None, 3.0],
        "flag": [True, False, None, True],
        "hash": [bytes(32), b"\xff" * 32, None, bytes(range(32))],
        "address": [bytes(20), b"\xab" * 20, None, bytes(range(20))],
        "blob": [b"", b"\x00\xff\x00", None, bytes(range(256))],
        "text": ["", "ünïcödé ✓ 🚀", None, "quote ' \" ; -- \\ end"],
        "ts": [
            dt.datetime(1970, 1, 1, tzinfo=utc),
            dt.datetime(2106, 2, 7, 6, 28, 15, tzinfo=utc),
            None,
            dt.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=utc),
        ],
        "amount": [DEC_MAX, DEC_MIN, None, Decimal(0)],
        "hashes": [[h[0], h[1]], [], None, [h[3]]],
        "access_list": [
            [{"address": b"\x01" * 20, "storage_keys": [h[1], h[2]]}],
            [],
            None,
            [{"address": b"\x02" * 20, "storage_keys": []}, {"address": b"\x03" * 20, "storage_keys": [h[3]]}],
        ],
        "i8": [-128, 127, None, 0],
        "i16": [-32768, 32767, None, 1],
        "u8": [0, 255, None, 1],
        "u16": [0, 65535, None, 2],
        "f32": [1.5, float("-inf"), None, float("inf")],
        "day": [dt.date(1970, 1, 1), dt.date(9999, 12, 31), None, dt.date(2015, 7, 30)],
        "big_text": ["", "large ✓", None, "x" * 300],
        "tag": ["transfer", "swap", None, "transfer"],
    }
    return pa.table(rows, schema=EVERY_TYPE)


def cursor_rows(start: int, count: int) -> pa.Table:
    """Rows of a non-block source: an integer cursor column instead of ``_block_num``."""
    ids = list(range(start, start + count))
    return pa.table(
        {
            "cursor": pa.array(ids, pa.int64()),
            "name": pa.array([f"item-{i}" for i in ids]),
            "score": pa.array([i * 0.5 for i in ids], pa.float64()),
        }
    )
