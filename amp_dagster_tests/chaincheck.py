"""Exactly-once verdicts: a destination's rows against the canonical chain's result, computed independently of any
stream (straight from the dev server's chain), as counts of missing, duplicated and orphaned rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pyarrow as pa

LOG_KEY = ("_block_num", "log_index")


def canonical(server, table: str = "logs", start: int | None = None, end: int | None = None,
              where: Callable[[pa.Table], pa.Array] | None = None) -> pa.Table:  # fmt: skip
    """The rows of ``table`` for blocks ``start..=end`` on the chain as it is now (the stream's query result)."""
    view = server.chain.view()
    start = view.start_block if start is None else start
    end = view.head if end is None else end
    rows = view.tables(start, end, [table])[table]
    return rows if where is None else rows.filter(where(rows))


def verdict(got: pa.Table, want: pa.Table, key=LOG_KEY, version: str = "block_hash") -> dict[str, int]:
    """``missing``: canonical rows the destination lacks; ``duplicated``: extra copies of a row; ``orphaned``: rows
    of blocks that are no longer canonical (their ``version`` column, the block hash, differs)."""
    columns = [*key, version]
    have = Counter(zip(*(got.column(c).to_pylist() for c in columns), strict=True))
    expected = Counter(zip(*(want.column(c).to_pylist() for c in columns), strict=True))
    return {
        "missing": sum((expected - have).values()),
        "duplicated": sum(n - 1 for row, n in have.items() if row in expected and n > 1),
        "orphaned": sum(n for row, n in have.items() if row not in expected),
        "rows": got.num_rows,
    }


def exact(got: pa.Table, want: pa.Table, **kw) -> dict[str, int]:
    v = verdict(got, want, **kw)
    return {**v, "ok": v["missing"] == v["duplicated"] == v["orphaned"] == 0 and want.num_rows > 0}
