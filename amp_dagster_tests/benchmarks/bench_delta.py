"""P4: the Delta Lake loader against plain write_deltalake: same table, writer settings, commit size and file count;
P12: storage after 100 range replaces with the loader's default upkeep, and the time of one range replace in a
table ten times larger (the goal: about the same, a replace costs its range, not the table).

Like for like: the reference table is created with the loader's table schema (its portable types: uint64 as
``decimal(20,0)``, µs timestamps, ``binary``), partition columns and configuration, and written with the loader's
``target_file_size`` and ``max_row_group_size`` (read from DeltaLoader's signature, so the reference follows the
loader's defaults). The reference gets the rows already cast to those types, before the timed span; the loader casts
inside its span. After each run the check asserts the rows (count and sums) and that both sides made the same number
of commits and data files.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.delta import DeltaLoader
from amp_dagster.ranges import RowRange

from .harness import BENCH_DIR, GOALS, Case, Goal, batches, compare, default, logs_table


def main(rows: int, rounds: int) -> None:
    from deltalake import DeltaTable, WriterProperties, write_deltalake

    table = logs_table(rows)
    want = (rows, pc.sum(table["log_index"].cast(pa.int64())).as_py(), pc.sum(table["tx_index"]).as_py())
    flush = DeltaLoader.capabilities.flush_rows  # what the sync engine commits at in stream mode
    root = BENCH_DIR / "delta"
    shutil.rmtree(root, ignore_errors=True)
    target_file_size = default(DeltaLoader, "target_file_size")
    max_row_group_size = default(DeltaLoader, "max_row_group_size")
    loader = DeltaLoader(root / "loader", target_file_size=target_file_size, max_row_group_size=max_row_group_size)
    ours = TableRef("logs")
    loader.ensure_table(ours, table.schema)
    made = DeltaTable(str(loader.path(ours)))
    schema, layout = made.schema(), made.metadata()
    partition_by = list(layout.partition_columns) or None
    settings = {
        "target_file_size": target_file_size,
        "writer_properties": WriterProperties(max_row_group_size=max_row_group_size),
        "partition_by": partition_by,
    }
    storage = pa.schema([f.remove_metadata() for f in pa.schema(schema.to_arrow())])
    prepared = table.cast(storage)  # in the same 65,536-row chunks as the loader's input
    plain = str(root / "plain")

    def fresh_plain():
        shutil.rmtree(plain, ignore_errors=True)
        DeltaTable.create(plain, schema, partition_by=partition_by, configuration=dict(layout.configuration))

    def fresh_ours():
        shutil.rmtree(root / "loader", ignore_errors=True)
        loader.ensure_table(ours, table.schema)

    files: dict[str, int] = {}

    def holds_all(path: str, commits: int, layout_of: str, reference: bool):
        def check():
            dt = DeltaTable(path)
            got = dt.to_pyarrow_dataset().to_table(columns=["log_index", "tx_index"])
            sums = (got.num_rows, pc.sum(got["log_index"]).as_py(), pc.sum(got["tx_index"]).as_py())
            assert sums == want, f"{path}: {sums} != {want} (rows, sum of log_index, tx_index)"
            assert dt.version() == commits, f"{path}: {dt.version()} commits, expected {commits}"
            count = len(dt.file_uris())
            if reference:
                files[layout_of] = count
            else:
                assert count == files[layout_of], f"{path}: {count} data files, the reference wrote {files[layout_of]}"

        return check

    chunks = -(-rows // flush)
    one = ("write_deltalake, 1 commit (reference)", "DeltaLoader.write, 1 commit")
    many = (f"write_deltalake, {chunks} commits of {flush:,} (reference)", f"DeltaLoader.write, {chunks} commits")
    cases = [
        Case(
            one[0],
            lambda: write_deltalake(plain, batches(prepared), mode="append", **settings),
            fresh_plain,
            holds_all(plain, 1, "one", reference=True),
        ),
        Case(
            one[1],
            lambda: loader.write(ours, batches(table)),
            fresh_ours,
            holds_all(str(loader.path(ours)), 1, "one", reference=False),
        ),
    ]
    if chunks > 1:  # the commit size the sync engine uses when it streams
        cases += [
            Case(
                many[0],
                lambda: [write_deltalake(plain, b, mode="append", **settings) for b in prepared.to_batches(flush)],
                fresh_plain,
                holds_all(plain, chunks, "many", reference=True),
            ),
            Case(
                many[1],
                lambda: [loader.write(ours, b) for b in table.to_batches(flush)],
                fresh_ours,
                holds_all(str(loader.path(ours)), chunks, "many", reference=False),
            ),
        ]
    title = (
        f"P4 Delta Lake: loader vs write_deltalake, same table, writer settings ({target_file_size:,}-byte files, "
        f"{max_row_group_size:,}-row groups) and commits"
    )
    result = compare(title, rows, cases, rounds)
    result.goal(GOALS["P4"], one[1], one[0], " (one commit)")
    print(f"    both wrote {files['one']} data file(s) in one commit")
    if chunks > 1:
        result.goal(GOALS["P4"], many[1], many[0], f" ({chunks} commits)")
        print(f"    both wrote {files['many']} data file(s) in {chunks} commits")
    shutil.rmtree(root, ignore_errors=True)
    replaces(rows, rounds)


REPLACED = 100  # P12: range replaces in a row
SPAN = 1_000  # blocks per timed replace
P12 = Goal("P12", 2.0, at_most=True)
REPLACE_TIME = Goal("replace time, 10x the table", 1.5, at_most=True)  # issue 9: proportional to the range


def replaces(rows: int, rounds: int) -> None:
    """P12 with the loader's default upkeep, and replace time against table size (the goal: about the same)."""
    root = BENCH_DIR / "delta_replace"
    shutil.rmtree(root, ignore_errors=True)
    small, large = logs_table(rows // 10), logs_table(rows)
    loader, table = DeltaLoader(root), TableRef("logs")

    # P12: replace 100 ranges of 100 blocks (each with its own rows again, so the live size stays put)
    loader.ensure_table(table, small.schema)
    loader.write(table, batches(small))
    blocks = small["_block_num"]
    low, high = pc.min(blocks).as_py(), pc.max(blocks).as_py()
    worst = 0.0
    for i in range(REPLACED):
        start = low + (i * 7_919) % max(1, high - low - 99)  # scattered over the table
        span = RowRange(start, start + 99)
        loader.write(table, _rows_in(small, span), replace=span)
        worst = max(worst, _on_disk(loader.path(table)) / _live(loader, table))
    loader.close()
    disk, live = _on_disk(loader.path(table)), _live(loader, table)
    print(f"\n## P12 Delta Lake storage after {REPLACED} range replaces of 100 blocks, default upkeep")
    print(P12.line(disk / live, None, f"{disk / 2**20:,.1f} MB on disk / {live / 2**20:,.1f} MB of live files"))
    print(f"    at worst {worst:.2f}x right after a replace, before its vacuum ({small.num_rows:,}-row table)")

    # replace time: the same blocks (SPAN, fewer in a quick run) in the middle of a table of rows/10 and of rows
    width = min(SPAN, (high - low + 1) // 4)
    cases = []
    for name, data in (("small", small), ("large", large)):
        ref = TableRef(f"logs_{name}")
        loader.ensure_table(ref, data.schema)
        loader.write(ref, batches(data))
        start = pc.min(data["_block_num"]).as_py() + (high - low - width) // 2  # a span the small table also has
        span = RowRange(start, start + width - 1)
        part = _rows_in(data, span)
        cases.append(
            Case(
                f"replace {width:,} blocks in {data.num_rows:,} rows",
                lambda ref=ref, part=part, span=span: loader.write(ref, batches(part), replace=span),
                loader.close,  # the previous replace's upkeep is not timed
                _holds(loader, ref, data.num_rows),
            )
        )
    title = f"Delta Lake range replace time against table size ({width:,} blocks, {part.num_rows:,} rows)"
    result = compare(title, part.num_rows, cases, rounds)
    slower, best = (1 / result.ratio(cases[1].name, cases[0].name, best=b) for b in (False, True))
    ratio = f"seconds of a replace in {large.num_rows:,} rows / seconds of one in {small.num_rows:,} rows"
    print(REPLACE_TIME.line(slower, best, ratio))
    loader.close()
    shutil.rmtree(root, ignore_errors=True)


def _rows_in(table: pa.Table, span: RowRange) -> pa.Table:
    block = table["_block_num"]
    return table.filter(pc.and_(pc.greater_equal(block, span.start), pc.less_equal(block, span.end)))


def _on_disk(path: Path) -> int:
    total = 0
    for file in path.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # vacuumed meanwhile
            total += file.stat().st_size if file.is_file() else 0
    return total


def _live(loader: DeltaLoader, table: TableRef) -> int:
    from deltalake import DeltaTable

    return sum(Path(uri).stat().st_size for uri in DeltaTable(str(loader.path(table))).file_uris())


def _holds(loader: DeltaLoader, table: TableRef, rows: int):
    def check() -> None:
        got = loader.read(table).read_all().num_rows
        assert got == rows, f"{table}: {got} rows after the replace, expected {rows}"

    return check
