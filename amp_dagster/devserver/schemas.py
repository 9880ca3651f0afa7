"""The Arrow schemas of amp's raw EVM tables (blocks, transactions, logs), as the real server defines them."""

from __future__ import annotations

import pyarrow as pa

B32 = pa.binary(32)
B20 = pa.binary(20)
TS = pa.timestamp("ns", tz="+00:00")
DEC = pa.decimal128(38, 0)

BLOCK_NUM = "_block_num"


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


def _list_of(item: pa.DataType) -> pa.DataType:
    # amp names list items "item" and marks them non-null
    return pa.list_(pa.field("item", item, nullable=False))


BLOCKS = pa.schema(
    [
        _f(BLOCK_NUM, pa.uint64()),
        _f("block_num", pa.uint64()),
        _f("timestamp", TS),
        _f("hash", B32),
        _f("parent_hash", B32),
        _f("ommers_hash", B32),
        _f("miner", B20),
        _f("state_root", B32),
        _f("transactions_root", B32),
        _f("receipt_root", B32),
        _f("logs_bloom", pa.binary()),
        _f("difficulty", DEC),
        _f("total_difficulty", DEC, True),
        _f("gas_limit", pa.uint64()),
        _f("gas_used", pa.uint64()),
        _f("extra_data", pa.binary()),
        _f("mix_hash", B32),
        _f("nonce", pa.uint64()),
        _f("base_fee_per_gas", DEC, True),
        _f("withdrawals_root", B32, True),
        _f("blob_gas_used", pa.uint64(), True),
        _f("excess_blob_gas", pa.uint64(), True),
        _f("parent_beacon_root", B32, True),
        _f("requests_hash", B32, True),
    ]
)

LOGS = pa.schema(
    [
        _f(BLOCK_NUM, pa.uint64()),
        _f("block_hash", B32),
        _f("block_num", pa.uint64()),
        _f("timestamp", TS),
        _f("tx_hash", B32),
        _f("tx_index", pa.uint32()),
        _f("log_index", pa.uint32()),
        _f("address", B20),
        _f("topic0", B32, True),
        _f("topic1", B32, True),
        _f("topic2", B32, True),
        _f("topic3", B32, True),
        _f("data", pa.binary()),
    ]
)

ACCESS_LIST_ITEM = pa.struct([_f("address", B20), _f("storage_keys", _list_of(B32))])
AUTHORIZATION_ITEM = pa.struct(
    [
        _f("chain_id", pa.uint64()),
        _f("address", B20),
        _f("nonce", pa.uint64()),
        _f("y_parity", pa.bool_()),
        _f("r", B32),
        _f("s", B32),
    ]
)

TRANSACTIONS = pa.schema(
    [
        _f(BLOCK_NUM, pa.uint64()),
        _f("block_hash", B32),
        _f("block_num", pa.uint64()),
        _f("timestamp", TS),
        _f("tx_index", pa.uint32()),
        _f("tx_hash", B32),
        _f("to", B20, True),
        _f("nonce", pa.uint64()),
        _f("gas_price", DEC, True),
        _f("gas_limit", pa.uint64()),
        _f("value", pa.string()),
        _f("input", pa.binary()),
        _f("r", B32),
        _f("s", B32),
        _f("v_parity", pa.bool_()),
        _f("chain_id", pa.uint64(), True),
        _f("gas_used", pa.uint64()),
        _f("type", pa.int32()),
        _f("max_fee_per_gas", DEC, True),
        _f("max_priority_fee_per_gas", DEC, True),
        _f("max_fee_per_blob_gas", DEC, True),
        _f("from", B20),
        _f("status", pa.bool_()),
        _f("state_root", B32, True),
        _f("access_list", _list_of(ACCESS_LIST_ITEM), True),
        _f("blob_versioned_hashes", _list_of(B32), True),
        _f("authorization_list", _list_of(AUTHORIZATION_ITEM), True),
    ]
)

TABLES: dict[str, pa.Schema] = {"blocks": BLOCKS, "transactions": TRANSACTIONS, "logs": LOGS}
