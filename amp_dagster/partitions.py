"""Partitions of chain data: fixed-size block ranges (dynamic partitions with sortable keys) and time windows mapped
to block ranges through amp's ``blocks`` table; and how a run's partitions become the row ranges it loads.

Dagster accepts only its own partition kinds (a custom ``PartitionsDefinition`` is refused), so block ranges are a
``DynamicPartitionsDefinition`` whose keys are ``000015000000-000015009999``: zero-padded to 12 digits, so that
they sort as numbers do, and read back into a :class:`~amp_dagster.ranges.RowRange` by :func:`key_range`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import ConfigError
from .ranges import RowRange, merge_ranges

WIDTH = 12
_KEY = re.compile(rf"^(\d{{{WIDTH},}})-(\d{{{WIDTH},}})$")
MAX_KEYS_PER_CALL = 10_000  # PostgreSQL storage takes at most 65,535 parameters per statement (2 per key)


def block_key(start: int, end: int) -> str:
    """The partition key of blocks ``start..=end``.

    >>> block_key(15_000_000, 15_009_999)
    '000015000000-000015009999'
    """
    return f"{start:0{WIDTH}d}-{end:0{WIDTH}d}"


def key_range(key: str) -> RowRange:
    """The block range of a partition key made by :func:`block_key`; a clear error for anything else."""
    match = _KEY.match(key)
    if match is None:
        raise ConfigError(
            f"partition key {key!r} is not a block range: amp_dagster's block-range partitions are keyed "
            f"'{block_key(15_000_000, 15_009_999)}' (first and last block, zero-padded)"
        )
    return RowRange(int(match.group(1)), int(match.group(2)))


def keys_to_ranges(keys: Iterable[str]) -> list[RowRange]:
    """The contiguous block spans a set of partition keys covers, merged (one query and one replace each)."""
    return merge_ranges(key_range(k) for k in keys)


@dataclass(frozen=True)
class BlockRanges:
    """Fixed-size block ranges of one chain, as a Dagster dynamic partitions definition.

    ``size`` blocks per partition, the first one starting at ``start``. Keys are added by a sensor (or
    :meth:`keys_through`) as the chain grows; only closed ranges (whose last block is final) get a key.

    >>> ranges = BlockRanges("amp_eth_blocks", size=10_000)
    >>> ranges.keys_through(25_000)
    ['000000000000-000000009999', '000000010000-000000019999']
    """

    name: str
    size: int = 10_000
    start: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or self.start < 0:
            raise ConfigError(f"block ranges need size >= 1 and start >= 0, got size={self.size}, start={self.start}")

    @property
    def definition(self):
        import dagster as dg

        return dg.DynamicPartitionsDefinition(name=self.name)

    def key_of(self, block: int) -> str:
        """The key of the partition holding ``block``."""
        first = self.start + (block - self.start) // self.size * self.size
        return block_key(first, first + self.size - 1)

    def keys_through(self, last_final_block: int, after: int | None = None) -> list[str]:
        """Keys of the ranges that end at or before ``last_final_block``, starting after block ``after``."""
        first = self.start if after is None else max(self.start, after + 1)
        first = self.start + -(-(first - self.start) // self.size) * self.size  # round up to a range boundary
        keys = []
        while first + self.size - 1 <= last_final_block:
            keys.append(block_key(first, first + self.size - 1))
            first += self.size
        return keys

    def add_keys(self, instance: Any, keys: Sequence[str]) -> None:
        """Register keys with the instance, in calls small enough for a PostgreSQL-backed one."""
        for i in range(0, len(keys), MAX_KEYS_PER_CALL):
            instance.add_dynamic_partitions(self.name, list(keys[i : i + MAX_KEYS_PER_CALL]))


# -- time windows ----------------------------------------------------------------------------------------------


def window_blocks(client: Any, blocks_table: str, start: datetime, end: datetime) -> RowRange | None:
    """The blocks whose timestamp lies in ``[start, end)``, from amp's ``blocks`` table (None: no such block)."""
    if not re.fullmatch(r'[A-Za-z0-9_."/@-]+', blocks_table):
        raise ConfigError(f"blocks_table {blocks_table!r} is not a table reference like eth_rpc.blocks")
    low, high = (int(t.astimezone(UTC).timestamp()) for t in (start, end))
    # the bounds are integers formatted here; the table reference was checked above
    sql = (
        f"SELECT min(_block_num) AS first, max(_block_num) AS last FROM {blocks_table} "
        f"WHERE timestamp >= to_timestamp({low}) AND timestamp < to_timestamp({high})"
    )
    table = client.query(sql).reader.read_all()
    first, last = table.column("first")[0].as_py(), table.column("last")[0].as_py()
    return None if first is None else RowRange(int(first), int(last))


# -- what a run loads ---------------------------------------------------------------------------------------------


def run_ranges(context: Any, time_window_to_blocks=None, keys: Sequence[str] | None = None) -> list[RowRange] | None:
    """The block ranges a (possibly range-) partitioned run covers, merged; None for an unpartitioned run.

    Works for one key, a key range (single-run backfill) and a time window; never reads ``partition_key``,
    which Dagster refuses in range runs. ``time_window_to_blocks(start, end)`` maps a time window; ``keys`` are
    the run's partition keys when the caller has read them already (each read is a lookup in the instance).
    """
    if not context.has_partition_key_range and not context.has_partition_key:
        return None
    try:
        window = context.partition_time_window
    except Exception:  # not time-partitioned
        window = None
    if window is not None:
        if time_window_to_blocks is None:
            raise ConfigError("a time-partitioned amp asset needs an amp client to map its window to blocks")
        rows = time_window_to_blocks(window.start, window.end)
        return [] if rows is None else [rows]
    return keys_to_ranges(context.partition_keys if keys is None else keys)
