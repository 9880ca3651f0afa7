"""P4: the Delta Lake loader against plain write_deltalake: same table, writer settings, commit size and file count.

Like for like: the reference table is created with the loader's table schema (its portable types: uint64 as
``decimal(20,0)``, µs timestamps, ``binary``), partition columns and configuration, and written with the loader's
``target_file_size`` and ``max_row_group_size`` (read from DeltaLoader's signature, so the reference follows the
loader's defaults). The reference gets the rows already cast to those types, before the timed span; the loader casts
inside its span. After each run the check asserts the rows (count and sums) and that both sides made the same number
of commits and data files.
"""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.delta import DeltaLoader

from .harness import BENCH_DIR, GOALS, Case, batches, compare, default, logs_table


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
