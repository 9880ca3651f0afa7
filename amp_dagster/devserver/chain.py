"""A synthetic, deterministic EVM chain with amp's table shapes, a growing head and injectable reorgs.

Every value of every row is a pure function of ``(seed, block number, fork epoch, row position)``, computed with
a counter-based hash over whole numpy arrays. Generating blocks 0..99 in one call or in ten calls gives the same
bytes, and a reorg changes exactly the blocks from the fork point on (their epoch changes), so "the canonical
chain" is always recomputable and nothing has to be stored per block.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from . import schemas

U64 = np.uint64
_GOLDEN = U64(0x9E3779B97F4A7C15)

# tags keep the random streams of different columns independent
(
    T_HASH,
    T_NTX,
    T_TXHASH,
    T_FROM,
    T_TO,
    T_NONCE,
    T_GAS,
    T_VALUE,
    T_INPUT,
    T_SIG,
    T_TYPE,
    T_FEE,
    T_ACCESS,
    T_BLOB,
    T_AUTH,
    T_NLOGS,
    T_ADDR,
    T_TOPIC,
    T_DATA,
    T_BLOCK,
    T_BLOOM,
    T_EXTRA,
) = range(1, 23)

TRANSFER_TOPIC = bytes.fromhex("ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef")
EMPTY_OMMERS = bytes.fromhex("1dcc4de8dec75d7aab85b567b6ccd41ad312451b948a7413f0a142fd40d49347")
ZERO_HASH = bytes(32)
GENESIS_TIME = 1_438_269_973  # Unix seconds; the synthetic chain makes one block every 12 s from here
BLOCK_SECONDS = 12


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-spread hash of each uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> U64(30))) * U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> U64(27))) * U64(0x94D049BB133111EB)
        return x ^ (x >> U64(31))


def _draw(seed: int, tag: int, *keys: np.ndarray | int) -> np.ndarray:
    """One uint64 per row, determined only by the seed, the tag and the row's keys."""
    with np.errstate(over="ignore"):
        h = _mix(np.asarray([seed * 0x100 + tag], dtype=U64))
        for k in keys:
            h = _mix(h ^ (np.asarray(k, dtype=U64) * _GOLDEN))
    return h


def _fixed_binary(words: Sequence[np.ndarray], width: int) -> pa.FixedSizeBinaryArray:
    """Pack uint64 word columns into fixed-size binary values of ``width`` bytes (truncating the last word)."""
    n = len(words[0])
    raw = np.stack(words, axis=1).view(np.uint8).reshape(n, 8 * len(words))[:, :width]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(raw.tobytes())])


def _random_fixed(seed: int, tag: int, width: int, *keys: np.ndarray | int) -> pa.FixedSizeBinaryArray:
    words = [_draw(seed, tag, *keys, k) for k in range((width + 7) // 8)]
    return _fixed_binary(words, width)


def _random_binary(seed: int, tag: int, lengths: np.ndarray, *keys: np.ndarray) -> pa.BinaryArray:
    """Variable-length random bytes; ``lengths`` must be multiples of 8."""
    words = lengths // 8
    row_seed = _draw(seed, tag, *keys)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    word_row = np.repeat(np.arange(len(lengths)), words)
    word_pos = np.arange(len(word_row)) - np.repeat(offsets[:-1] // 8, words)
    with np.errstate(over="ignore"):
        data = _mix(row_seed[word_row] + word_pos.astype(U64))
    return pa.BinaryArray.from_buffers(
        pa.binary(), len(lengths), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )


def _within(counts: np.ndarray) -> np.ndarray:
    """For groups of the given sizes laid end to end, each element's position inside its group."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)


def _masked(array: pa.Array, valid: np.ndarray) -> pa.Array:
    return pa.compute.if_else(pa.array(valid), array, pa.nulls(len(array), array.type))


def _list(offsets: np.ndarray, values: pa.Array, type_: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    mask = None if valid is None else pa.array(~valid)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=type_, mask=mask)


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _address(seed: int, tag: int, ids: np.ndarray) -> pa.FixedSizeBinaryArray:
    return _random_fixed(seed, tag, 20, ids)


@dataclass(frozen=True)
class Segment:
    """Blocks from ``start`` on belong to fork ``epoch`` (until the next segment starts)."""

    start: int
    epoch: int


@dataclass(frozen=True)
class ChainView:
    """An immutable snapshot of the chain: what a query sees from start to finish."""

    seed: int
    network: str
    start_block: int
    head: int
    segments: tuple[Segment, ...]
    history: dict[int, tuple[Segment, ...]] = field(repr=False)
    txs_per_block: int = 20
    version: int = 0

    # -- the canonical chain -------------------------------------------------------------------------------

    def epochs(self, numbers: np.ndarray, segments: tuple[Segment, ...] | None = None) -> np.ndarray:
        segs = self.segments if segments is None else segments
        starts = np.array([s.start for s in segs], dtype=np.int64)
        idx = np.searchsorted(starts, numbers, side="right") - 1
        return np.array([s.epoch for s in segs], dtype=np.int64)[idx]

    def hashes(self, numbers: np.ndarray, epochs: np.ndarray | None = None) -> pa.FixedSizeBinaryArray:
        numbers = np.asarray(numbers, dtype=np.int64)
        eps = self.epochs(numbers) if epochs is None else epochs
        return _random_fixed(self.seed, T_HASH, 32, numbers, eps)

    def parent_hashes(self, numbers: np.ndarray) -> pa.Array:
        numbers = np.asarray(numbers, dtype=np.int64)
        parents = self.hashes(np.maximum(numbers - 1, 0))
        return _masked_zero(parents, numbers == 0)

    def block_hash(self, number: int) -> bytes:
        return self.hashes(np.array([number]))[0].as_py()

    def parent_hash(self, number: int) -> bytes:
        return ZERO_HASH if number == 0 else self.block_hash(number - 1)

    def timestamp(self, number: int) -> int:
        """Unix seconds of the block."""
        return GENESIS_TIME + BLOCK_SECONDS * number

    def locate(self, number: int, hash_: bytes) -> int | None:
        """Where a stream that last saw block ``(number, hash_)`` must restart.

        ``number + 1`` when the block is canonical; the first orphaned block of its fork when it was reorged
        away; ``None`` when no fork of this chain ever had that hash.
        """
        for epoch, segs in self.history.items():
            if _random_fixed(self.seed, T_HASH, 32, np.array([number]), np.array([epoch]))[0].as_py() != hash_:
                continue
            diverge = _first_difference(segs, self.segments)
            return number + 1 if diverge is None or diverge > number else diverge
        return None

    # -- table data ----------------------------------------------------------------------------------------

    def tables(self, start: int, end: int, names: Sequence[str] = ("blocks", "transactions", "logs")) -> dict:
        """The rows of blocks ``start..=end`` (clamped to the synced range) for each named table."""
        start, end = max(start, self.start_block), min(end, self.head)
        nums = np.arange(start, end + 1, dtype=np.int64) if start <= end else np.zeros(0, dtype=np.int64)
        eps = self.epochs(nums)
        gen = _Generator(self, nums, eps)
        return {name: getattr(gen, name)() for name in names}


def _masked_zero(hashes: pa.FixedSizeBinaryArray, zero: np.ndarray) -> pa.Array:
    if not zero.any():
        return hashes
    zeros = pa.array([ZERO_HASH] * len(hashes), pa.binary(32))
    return pa.compute.if_else(pa.array(zero), zeros, hashes)


def _first_difference(a: tuple[Segment, ...], b: tuple[Segment, ...]) -> int | None:
    """The first block number at which two fork histories give different epochs, or None if they never do."""
    i = 0
    while i < len(a) and i < len(b) and a[i] == b[i]:
        i += 1
    candidates = [s[i].start for s in (a, b) if i < len(s)]
    return min(candidates) if candidates else None


class _Generator:
    """Builds the three tables for one array of block numbers; columns are derived lazily and shared."""

    def __init__(self, view: ChainView, nums: np.ndarray, eps: np.ndarray) -> None:
        self.v, self.seed, self.nums, self.eps = view, view.seed, nums, eps
        self.block_hashes = view.hashes(nums, eps)
        self.ts = pa.array((GENESIS_TIME + BLOCK_SECONDS * nums) * 1_000_000_000, schemas.TS)
        avg = view.txs_per_block
        self.ntx = (_draw(self.seed, T_NTX, nums, eps) % U64(2 * avg + 1)).astype(np.int64)
        # transaction-level keys
        self.tx_block = np.repeat(np.arange(len(nums)), self.ntx)
        self.tx_index = _within(self.ntx)
        self.tx_keys = (nums[self.tx_block], eps[self.tx_block], self.tx_index)
        roll = _draw(self.seed, T_TYPE, *self.tx_keys) % U64(1000)
        # 0 legacy, 2 EIP-1559, 3 blob, 4 set-code
        self.tx_type = np.select([roll < 250, roll < 985, roll < 995], [0, 2, 3], 4).astype(np.int32)
        gas_limit = U64(21_000) + _draw(self.seed, T_GAS, *self.tx_keys) % U64(480_000)
        self.tx_gas_limit = gas_limit
        self.tx_gas_used = U64(21_000) + (gas_limit - U64(21_000)) * (
            _draw(self.seed, T_GAS, *self.tx_keys, 1) % U64(100)
        ) // U64(100)

    def _per_block(self, array: pa.Array, counts: np.ndarray) -> pa.Array:
        return array.take(pa.array(np.repeat(np.arange(len(self.nums)), counts)))

    def _per_tx(self, values: np.ndarray | pa.Array, counts: np.ndarray) -> np.ndarray | pa.Array:
        idx = np.repeat(np.arange(len(counts)), counts)
        return values.take(pa.array(idx)) if isinstance(values, pa.Array) else values[idx]

    # -- blocks ----------------------------------------------------------------------------------------------

    def blocks(self) -> pa.Table:
        s, nums, eps, n = self.seed, self.nums, self.eps, len(self.nums)
        u = nums.astype(U64)
        gas_used = np.zeros(n, dtype=U64)
        if n:
            np.add.at(gas_used, self.tx_block, self.tx_gas_used)
        bloom = _random_binary(s, T_BLOOM, np.full(n, 256, dtype=np.int64), nums, eps)
        extra_len = (_draw(s, T_EXTRA, nums, eps) % U64(5)).astype(np.int64) * 8
        base_fee = (U64(5_000_000_000) + _draw(s, T_FEE, nums, eps) % U64(45_000_000_000)).astype(U64)
        cols = {
            "_block_num": pa.array(u),
            "block_num": pa.array(u),
            "timestamp": self.ts,
            "hash": self.block_hashes,
            "parent_hash": self.v.parent_hashes(nums),
            "ommers_hash": pa.array([EMPTY_OMMERS] * n, schemas.B32),
            "miner": _address(s, T_BLOCK, _draw(s, T_BLOCK, nums, eps) % U64(24)),
            "state_root": _random_fixed(s, T_BLOCK, 32, nums, eps, 1),
            "transactions_root": _random_fixed(s, T_BLOCK, 32, nums, eps, 2),
            "receipt_root": _random_fixed(s, T_BLOCK, 32, nums, eps, 3),
            "logs_bloom": bloom,
            "difficulty": pa.array(np.zeros(n, dtype=U64)).cast(schemas.DEC),
            "total_difficulty": pa.array([58750003716598352816469] * n, schemas.DEC),
            "gas_limit": pa.array(np.maximum(U64(30_000_000), gas_used)),
            "gas_used": pa.array(gas_used),
            "extra_data": _random_binary(s, T_EXTRA, extra_len, nums, eps),
            "mix_hash": _random_fixed(s, T_BLOCK, 32, nums, eps, 4),
            "nonce": pa.array(np.zeros(n, dtype=U64)),
            "base_fee_per_gas": pa.array(base_fee).cast(schemas.DEC),
            "withdrawals_root": _random_fixed(s, T_BLOCK, 32, nums, eps, 5),
            "blob_gas_used": pa.array((_draw(s, T_BLOB, nums, eps) % U64(7)) * U64(131_072)),
            "excess_blob_gas": pa.array(_draw(s, T_BLOB, nums, eps, 1) % U64(10_000_000)),
            "parent_beacon_root": _random_fixed(s, T_BLOCK, 32, nums, eps, 6),
            "requests_hash": pa.nulls(n, schemas.B32),
        }
        return pa.table(cols, schema=schemas.BLOCKS)

    # -- transactions ----------------------------------------------------------------------------------------

    def transactions(self) -> pa.Table:
        s, keys, n = self.seed, self.tx_keys, len(self.tx_index)
        tx_num = keys[0].astype(U64)
        ttype = self.tx_type
        legacy = ttype == 0
        creates = _draw(s, T_TO, *keys, 1) % U64(50) == 0
        kind = _draw(s, T_INPUT, *keys) % U64(10)
        input_len = np.where(kind < 3, 0, 4 + 32 * (kind.astype(np.int64) % 7)).astype(np.int64)
        input_len = (input_len + 7) // 8 * 8  # whole words keep generation vectorised; 4-byte selectors round up
        value = np.where(kind < 3, _draw(s, T_VALUE, *keys) % U64(10**18), U64(0))
        base_fee = U64(5_000_000_000) + _draw(s, T_FEE, *keys) % U64(45_000_000_000)
        tip = _draw(s, T_FEE, *keys, 1) % U64(3_000_000_000)
        dec = schemas.DEC
        fee_cap = pa.array(base_fee + tip).cast(dec)
        cols = {
            "_block_num": pa.array(tx_num),
            "block_hash": self._per_block(self.block_hashes, self.ntx),
            "block_num": pa.array(tx_num),
            "timestamp": self._per_block(self.ts, self.ntx),
            "tx_index": pa.array(self.tx_index.astype(np.uint32)),
            "tx_hash": _random_fixed(s, T_TXHASH, 32, *keys),
            "to": _masked(_address(s, T_TO, _draw(s, T_TO, *keys) % U64(5000)), ~creates),
            "nonce": pa.array(_draw(s, T_NONCE, *keys) % U64(100_000)),
            "gas_price": pa.array(base_fee + tip // U64(2)).cast(dec),
            "gas_limit": pa.array(self.tx_gas_limit),
            "value": pa.array(value).cast(pa.string()),
            "input": _random_binary(s, T_INPUT, input_len, *keys),
            "r": _random_fixed(s, T_SIG, 32, *keys, 1),
            "s": _random_fixed(s, T_SIG, 32, *keys, 2),
            "v_parity": pa.array(_draw(s, T_SIG, *keys, 3) % U64(2) == 1),
            "chain_id": _masked(pa.array(np.ones(n, dtype=U64)), _draw(s, T_SIG, *keys, 4) % U64(20) != 0),
            "gas_used": pa.array(self.tx_gas_used),
            "type": pa.array(ttype),
            "max_fee_per_gas": _masked(fee_cap, ~legacy),
            "max_priority_fee_per_gas": _masked(pa.array(tip).cast(dec), ~legacy),
            "max_fee_per_blob_gas": _masked(pa.array(np.full(n, 1_000_000_000, dtype=U64)).cast(dec), ttype == 3),
            "from": _address(s, T_FROM, _draw(s, T_FROM, *keys) % U64(5000)),
            "status": pa.array(_draw(s, T_SIG, *keys, 5) % U64(40) != 0),
            "state_root": pa.nulls(n, schemas.B32),
            "access_list": self._access_lists(~legacy),
            "blob_versioned_hashes": self._blob_hashes(ttype == 3),
            "authorization_list": self._authorizations(ttype == 4),
        }
        return pa.table(cols, schema=schemas.TRANSACTIONS)

    def _access_lists(self, present: np.ndarray) -> pa.Array:
        s, keys = self.seed, self.tx_keys
        filled = present & (_draw(s, T_ACCESS, *keys) % U64(10) == 0)
        items = np.where(filled, 1 + _draw(s, T_ACCESS, *keys, 1) % U64(3), 0).astype(np.int64)
        item_tx = np.repeat(np.arange(len(items)), items)
        item_pos = _within(items)
        item_keys = (keys[0][item_tx], keys[1][item_tx], keys[2][item_tx], item_pos)
        nkeys = (_draw(s, T_ACCESS, *item_keys, 2) % U64(5)).astype(np.int64)
        key_item = np.repeat(np.arange(len(nkeys)), nkeys)
        storage = _random_fixed(s, T_ACCESS, 32, *(k[key_item] for k in item_keys), _within(nkeys))
        item_type = schemas.ACCESS_LIST_ITEM
        storage_lists = _list(_offsets(nkeys), storage, item_type.field("storage_keys").type)
        structs = pa.StructArray.from_arrays(
            [_address(s, T_ACCESS, _draw(s, T_ACCESS, *item_keys, 3) % U64(500)), storage_lists],
            fields=list(item_type),
        )
        return _list(_offsets(items), structs, schemas.TRANSACTIONS.field("access_list").type, present)

    def _blob_hashes(self, present: np.ndarray) -> pa.Array:
        s, keys = self.seed, self.tx_keys
        count = np.where(present, 1 + _draw(s, T_BLOB, *keys) % U64(3), 0).astype(np.int64)
        owner = np.repeat(np.arange(len(count)), count)
        hashes = _random_fixed(s, T_BLOB, 32, *(k[owner] for k in keys), _within(count))
        return _list(_offsets(count), hashes, schemas.TRANSACTIONS.field("blob_versioned_hashes").type, present)

    def _authorizations(self, present: np.ndarray) -> pa.Array:
        s, keys = self.seed, self.tx_keys
        count = present.astype(np.int64)
        owner = np.repeat(np.arange(len(count)), count)
        k = tuple(key[owner] for key in keys)
        m = len(owner)
        item_type = schemas.AUTHORIZATION_ITEM
        structs = pa.StructArray.from_arrays(
            [
                pa.array(np.ones(m, dtype=U64)),
                _address(s, T_AUTH, _draw(s, T_AUTH, *k) % U64(5000)),
                pa.array(_draw(s, T_AUTH, *k, 1) % U64(1000)),
                pa.array(_draw(s, T_AUTH, *k, 2) % U64(2) == 1),
                _random_fixed(s, T_AUTH, 32, *k, 3),
                _random_fixed(s, T_AUTH, 32, *k, 4),
            ],
            fields=list(item_type),
        )
        return _list(_offsets(count), structs, schemas.TRANSACTIONS.field("authorization_list").type, present)

    # -- logs ------------------------------------------------------------------------------------------------

    def logs(self) -> pa.Table:
        s = self.seed
        roll = (_draw(s, T_NLOGS, *self.tx_keys) % U64(100)).astype(np.int64)
        nlogs = np.select([roll < 35, roll < 70, roll < 85, roll < 93], [0, 1, 2, 3], 4 + roll % 5)
        owner = np.repeat(np.arange(len(nlogs)), nlogs)  # the transaction of each log
        block_of_log = self.tx_block[owner]
        logs_per_block = np.bincount(block_of_log, minlength=len(self.nums)) if len(owner) else self.ntx * 0
        log_index = _within(logs_per_block)
        keys = (self.nums[block_of_log], self.eps[block_of_log], log_index)
        n = len(owner)
        transfer = _draw(s, T_TOPIC, *keys) % U64(10) < 4
        # token contracts: a few are very busy, most are quiet
        contract = (_draw(s, T_ADDR, *keys) % U64(1000)) ** U64(2) // U64(1000)
        ntopics = np.where(transfer, 3, _draw(s, T_TOPIC, *keys, 1) % U64(5)).astype(np.int64)
        other_sig = _random_fixed(s, T_TOPIC, 32, _draw(s, T_TOPIC, *keys, 2) % U64(50))
        transfer_sig = pa.array([TRANSFER_TOPIC] * n, schemas.B32)
        topic0 = pa.compute.if_else(pa.array(transfer), transfer_sig, other_sig)
        topics = [_masked(topic0, ntopics >= 1)]
        for i in (1, 2, 3):
            rand = _random_fixed(s, T_TOPIC, 32, *keys, 10 + i)
            # Transfer topics 1 and 2 are the sender and receiver, left-padded to 32 bytes
            padded = _pad_address(_address(s, T_FROM, _draw(s, T_FROM, *keys, i) % U64(5000)))
            value = pa.compute.if_else(pa.array(transfer), padded, rand) if i < 3 else rand
            topics.append(_masked(value, ntopics > i))
        data_len = np.where(transfer, 32, 64 + 32 * (_draw(s, T_DATA, *keys) % U64(7)).astype(np.int64))
        cols = {
            "_block_num": pa.array(keys[0].astype(U64)),
            "block_hash": self.block_hashes.take(pa.array(block_of_log)),
            "block_num": pa.array(keys[0].astype(U64)),
            "timestamp": self.ts.take(pa.array(block_of_log)),
            "tx_hash": _random_fixed(s, T_TXHASH, 32, *(k[owner] for k in self.tx_keys)),
            "tx_index": pa.array(self.tx_index[owner].astype(np.uint32)),
            "log_index": pa.array(log_index.astype(np.uint32)),
            "address": _address(s, T_ADDR, contract),
            "topic0": topics[0],
            "topic1": topics[1],
            "topic2": topics[2],
            "topic3": topics[3],
            "data": _random_binary(s, T_DATA, data_len.astype(np.int64), *keys),
        }
        return pa.table(cols, schema=schemas.LOGS)


def _pad_address(addresses: pa.FixedSizeBinaryArray) -> pa.FixedSizeBinaryArray:
    n = len(addresses)
    raw = np.zeros((n, 32), dtype=np.uint8)
    if n:
        raw[:, 12:] = np.frombuffer(addresses.buffers()[1], dtype=np.uint8, count=20 * n).reshape(n, 20)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(raw.tobytes())])


class Chain:
    """The live chain: a head that grows and forks that replace its tip. Thread-safe.

    >>> chain = Chain(seed=1, start_block=100, blocks=10)
    >>> chain.head
    109
    >>> chain.reorg(depth=3)             # blocks 107..109 are replaced by a new fork of the same height
    107
    >>> chain.reorg(depth=5, length=2)   # 105..109 become two new blocks: the head drops to 106
    105
    >>> chain.head
    106
    """

    def __init__(
        self,
        seed: int = 0,
        network: str = "mainnet",
        start_block: int = 0,
        blocks: int = 100,
        txs_per_block: int = 20,
    ) -> None:
        if start_block < 0 or blocks < 0:
            raise ValueError("start_block and blocks must not be negative")
        self.seed, self.network, self.start_block, self.txs_per_block = seed, network, start_block, txs_per_block
        self._head = start_block + blocks - 1
        self._segments: tuple[Segment, ...] = (Segment(0, 0),)
        self._history: dict[int, tuple[Segment, ...]] = {0: self._segments}
        self._changed = threading.Condition()
        self._version = 0

    @property
    def head(self) -> int:
        return self._head

    def view(self) -> ChainView:
        with self._changed:
            return ChainView(
                seed=self.seed,
                network=self.network,
                start_block=self.start_block,
                head=self._head,
                segments=self._segments,
                history=dict(self._history),
                txs_per_block=self.txs_per_block,
                version=self._version,
            )

    def advance(self, blocks: int = 1) -> int:
        """Append ``blocks`` new blocks; returns the new head."""
        with self._changed:
            self._head += blocks
            self._version += 1
            self._changed.notify_all()
            return self._head

    def reorg(self, depth: int, length: int | None = None) -> int:
        """Replace the last ``depth`` blocks with ``length`` blocks of a new fork; returns the first replaced block.

        ``length`` defaults to ``depth`` (same height); fewer makes the chain shorter (the new head is lower than
        the old one), more makes it longer, and 0 drops the tip until the chain grows again. The chain always
        keeps at least one block.
        """
        with self._changed:
            synced = self._head - self.start_block + 1
            if not 1 <= depth <= synced:
                raise ValueError(f"reorg depth must be between 1 and {synced} (the synced blocks), got {depth}")
            length = depth if length is None else length
            if length < 0 or (length == 0 and depth == synced):
                low = 1 if depth == synced else 0
                raise ValueError(
                    f"reorg length must be at least {low} (the chain keeps at least one block), got {length}"
                )
            first = self._head - depth + 1
            epoch = max(self._history) + 1
            # a new segment even when length is 0: blocks produced later at `first` are the new fork's
            self._segments = (*(s for s in self._segments if s.start < first), Segment(first, epoch))
            self._history[epoch] = self._segments
            self._head = first + length - 1
            self._version += 1
            self._changed.notify_all()
            return first

    def wait(self, version: int, timeout: float) -> bool:
        """Block until the chain has changed since ``version`` (a view's) or the timeout passes."""
        with self._changed:
            return self._changed.wait_for(lambda: self._version != version, timeout)
