"""The range vocabulary shared by sources, the engine and the loaders: bounds, type checks, merging."""

from __future__ import annotations

import pyarrow as pa
import pytest

from amp_dagster.errors import TerminalError
from amp_dagster.ranges import UINT64_MAX, RowRange, contiguous_end, integer_bounds, merge_ranges


@pytest.mark.parametrize("bad", [2**64, 2**70, -1, 1.5, True, "3"])
def test_bounds_beyond_uint64_or_not_integers_are_refused(bad):
    with pytest.raises(TerminalError, match=r"RowRange\.start"):
        RowRange(bad)
    with pytest.raises(TerminalError, match=r"RowRange\.end"):
        RowRange(0, bad)


def test_edges_of_uint64_are_accepted_and_contained():
    r = RowRange(2**63 - 1, UINT64_MAX)
    assert r.contains(2**63) and r.contains(UINT64_MAX) and not r.contains(2**63 - 2)
    assert RowRange(0, 0).size == 1 and RowRange(5).size is None


@pytest.mark.parametrize(
    ("t", "low", "high"),
    [(pa.uint64(), 0, UINT64_MAX), (pa.int64(), -(2**63), 2**63 - 1), (pa.uint32(), 0, 2**32 - 1)],
)
def test_check_against_the_column_type(t, low, high):
    assert integer_bounds(t) == (low, high)
    RowRange(0, high).check("_block_num", t, "store table t")
    if high < UINT64_MAX:
        with pytest.raises(TerminalError, match=rf"'_block_num' \({t}\).*end {high + 1} lies outside"):
            RowRange(0, high + 1).check("_block_num", t, "store table t")
    with pytest.raises(TerminalError, match="must be an integer column"):
        integer_bounds(pa.string())


def test_merge_and_contiguous_end():
    ranges = [RowRange(20, 29), RowRange(0, 9), RowRange(10, 15), RowRange(12, 19), RowRange(40, 49)]
    assert merge_ranges(ranges) == [RowRange(0, 29), RowRange(40, 49)]
    assert merge_ranges([RowRange(0, 9), RowRange(5)]) == [RowRange(0)]
    assert contiguous_end(0, ranges) == 29
    assert contiguous_end(30, ranges) == 29  # nothing new: the checkpoint stays where it was
    assert contiguous_end(1, [RowRange(3, 5)]) == 0
    assert RowRange(0, 9).overlaps(RowRange(9, 12)) and not RowRange(0, 9).overlaps(RowRange(10))
