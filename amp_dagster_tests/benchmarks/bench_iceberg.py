"""P5: the Iceberg loader against plain pyiceberg ``append``, one snapshot of the same rows each, same warehouse."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.iceberg import IcebergLoader

from .harness import BENCH_DIR, Case, batches, compare, logs_table

NAMESPACE = "amp_bench"


def main(rows: int, rounds: int) -> None:
    table = logs_table(rows)
    root = BENCH_DIR / "iceberg"
    shutil.rmtree(root, ignore_errors=True)
    loader = IcebergLoader(root)
    catalog = loader.catalog  # the same SQL catalog and warehouse for both cases
    ours, plain = TableRef("logs_loader", namespace=NAMESPACE), TableRef("logs_append", namespace=NAMESPACE)
    loader.ensure_table(ours, table.schema)
    loader.ensure_table(plain, table.schema)
    # plain pyiceberg takes neither uint64 nor nanoseconds: give it the table's own types, converted untimed
    target = catalog.load_table((NAMESPACE, plain.name)).schema().as_arrow()
    prepared = pa.table([table.column(f.name).cast(f.type) for f in target], schema=target)
    want = (rows, pc.sum(table["log_index"].cast(pa.int64())).as_py())

    def empty(ref: TableRef):
        def run():
            # an empty table with no history, so that no case pays for the snapshots of earlier rounds
            catalog.purge_table((NAMESPACE, ref.name))
            loader.ensure_table(ref, table.schema)

        return run

    def check(ref: TableRef):
        def run():
            tbl = catalog.load_table((NAMESPACE, ref.name))
            got = tbl.scan(selected_fields=("log_index",)).to_arrow()
            assert (got.num_rows, pc.sum(got["log_index"]).as_py()) == want, f"{ref}: {got.num_rows} rows"
            assert len(tbl.snapshots()) == 1, f"{ref}: {len(tbl.snapshots())} snapshots, want one"

        return run

    def append():
        catalog.load_table((NAMESPACE, plain.name)).append(prepared)

    reference, mine = "pyiceberg append(pa.Table) (reference)", "IcebergLoader.write (65,536-row batches)"
    result = compare(
        "P5 Iceberg: loader vs pyiceberg append, one snapshot each",
        rows,
        [
            Case(reference, append, empty(plain), check(plain)),
            Case(mine, lambda: loader.write(ours, batches(table)), empty(ours), check(ours)),
        ],
        rounds,
    )
    print(f"P5 ratio (goal >= 0.8): {result.ratio(mine, reference):.2f}")
    loader.close()
