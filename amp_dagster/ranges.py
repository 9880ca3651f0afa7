"""Row ranges: the one vocabulary sources, the sync engine and loaders share for "rows whose block lies in a..b".

Rows of chain data carry ``_block_num``; a cursor source names another integer column. Every loader deletes and
replaces rows by a :class:`RowRange` over that column, which serves reorg rollback, partition replacement and crash
trimming alike. Bounds are checked here, once, so that no loader ever builds a predicate from a value its column
cannot hold (a ``2**70`` bound that a driver wraps modulo 2**64 would select the wrong rows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from .errors import TerminalError

BLOCK_NUM = "_block_num"
UINT64_MAX = 2**64 - 1


def integer_bounds(t: pa.DataType) -> tuple[int, int]:
    """The smallest and largest value of an Arrow integer type.

    >>> integer_bounds(pa.uint64())
    (0, 18446744073709551615)
    """
    if not pa.types.is_integer(t):
        raise TerminalError(f"a range column must be an integer column, not {t}")
    if pa.types.is_unsigned_integer(t):
        return 0, 2**t.bit_width - 1
    return -(2 ** (t.bit_width - 1)), 2 ** (t.bit_width - 1) - 1


@dataclass(frozen=True)
class RowRange:
    """Rows whose range column lies in ``start..=end``; ``end=None`` means "and everything after".

    Bounds are integers from 0 to 2**64-1 (a uint64 block number); :meth:`check` narrows that to a column's own
    type before a loader turns the range into a predicate.

    >>> RowRange(100, 199).contains(150), RowRange(100).contains(10**12)
    (True, True)
    >>> RowRange(2**70)
    Traceback (most recent call last):
    ...
    amp_dagster.errors.TerminalError: RowRange.start is 1180591620717411303424, beyond the largest block number 2**64-1
    """

    start: int
    end: int | None = None

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is None and name == "end":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TerminalError(f"RowRange.{name} must be an integer, got {value!r}")
            if value < 0:
                raise TerminalError(f"RowRange.{name} must not be negative, got {value}")
            if value > UINT64_MAX:
                raise TerminalError(f"RowRange.{name} is {value}, beyond the largest block number 2**64-1")
        if self.end is not None and self.end < self.start:
            raise TerminalError(f"RowRange end {self.end} is before its start {self.start}")

    def contains(self, value: int) -> bool:
        return self.start <= value and (self.end is None or value <= self.end)

    def check(self, column: str, t: pa.DataType, where: str) -> RowRange:
        """This range, after checking that its bounds fit the column's integer type ``t``; a terminal error naming
        the column, its type and the bound otherwise. ``where`` names the store and table for the message."""
        low, high = integer_bounds(t)
        for name, value in (("start", self.start), ("end", self.end)):
            if value is not None and not low <= value <= high:
                raise TerminalError(
                    f"{where}: range {self} cannot select rows of column {column!r} ({t}): its {name} {value} lies "
                    f"outside {low}..={high}. Use bounds the column can hold."
                )
        return self

    def overlaps(self, other: RowRange) -> bool:
        return (other.end is None or self.start <= other.end) and (self.end is None or other.start <= self.end)

    @property
    def size(self) -> int | None:
        """How many values the range spans (None when it is open-ended)."""
        return None if self.end is None else self.end - self.start + 1

    def __str__(self) -> str:
        return f"{self.start}..={'' if self.end is None else self.end}"


def merge_ranges(ranges: Iterable[RowRange]) -> list[RowRange]:
    """Ranges merged where they overlap or touch, in order: the contiguous spans they cover.

    >>> [str(r) for r in merge_ranges([RowRange(10, 19), RowRange(0, 9), RowRange(30, 39)])]
    ['0..=19', '30..=39']
    """
    merged: list[RowRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        last = merged[-1] if merged else None
        if last is not None and (last.end is None or r.start <= last.end + 1):
            end = None if last.end is None or r.end is None else max(last.end, r.end)
            merged[-1] = RowRange(last.start, end)
        else:
            merged.append(r)
    return merged


def contiguous_end(start: int, ranges: Iterable[RowRange]) -> int:
    """The highest value ``v`` such that ``start..=v`` is covered by ``ranges`` without a gap; ``start - 1`` if
    ``start`` itself is not covered. This is how far a live checkpoint may move after ranges were loaded.

    >>> contiguous_end(0, [RowRange(0, 9), RowRange(10, 19), RowRange(30, 39)])
    19
    """
    reached = start - 1
    for r in merge_ranges(ranges):
        if r.start > reached + 1:
            break
        if r.end is None:
            raise TerminalError("contiguous_end needs closed ranges")
        reached = max(reached, r.end)
    return reached
