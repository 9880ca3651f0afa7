"""P5: the Iceberg loader against plain pyiceberg ``append``: one snapshot, same files and parallelism, same warehouse.

Like for like: both tables are made by the loader (same schema and properties). The loader cuts its input into
``chunk_rows``-row Parquet files and writes ``in_flight`` of them at once on pyiceberg's thread pool (both read from
IcebergLoader's signature). The reference ``append`` gets the same file size: its table's
``write.target-file-size-bytes`` is set (before timing) to ``chunk_rows`` rows of its input, which pyiceberg measures
in in-memory Arrow bytes; and the same parallelism: pyiceberg's pool, which both sides share, gets ``in_flight``
workers (``PYICEBERG_MAX_WORKERS``). The reference gets its rows already cast to the table's types (pyiceberg takes
neither uint64 nor nanoseconds), before the timed span; the loader casts inside its span. Each check asserts the rows
(count and sums), one snapshot, and the number of data files both sides must have written.
"""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.iceberg import IcebergLoader

from .harness import BENCH_DIR, GOALS, Case, batches, compare, default, logs_table

NAMESPACE = "amp_bench"
TARGET_FILE_SIZE = "write.target-file-size-bytes"


def main(rows: int, rounds: int) -> None:
    chunk_rows, in_flight = default(IcebergLoader, "chunk_rows"), default(IcebergLoader, "in_flight")
    _pool_size(in_flight)
    table = logs_table(rows)
    root = BENCH_DIR / "iceberg"
    shutil.rmtree(root, ignore_errors=True)
    loader = IcebergLoader(root, chunk_rows=chunk_rows, in_flight=in_flight)
    catalog = loader.catalog  # the same SQL catalog and warehouse for both cases
    ours, plain = TableRef("logs_loader", namespace=NAMESPACE), TableRef("logs_append", namespace=NAMESPACE)
    loader.ensure_table(ours, table.schema)
    loader.ensure_table(plain, table.schema)
    target = catalog.load_table((NAMESPACE, plain.name)).schema().as_arrow()
    # one chunk: pyiceberg slices it into files of exactly target_rows rows (a chunked table would be packed by
    # weight, chunk by chunk, and could make one file more)
    prepared = pa.table([table.column(f.name).cast(f.type) for f in target], schema=target).combine_chunks()
    # pyiceberg's rows per file: int(target size / (nbytes / rows)); half a row of slack keeps float error out
    file_size = int(prepared.nbytes / rows * (chunk_rows + 0.5))
    want = (rows, pc.sum(table["log_index"].cast(pa.int64())).as_py(), pc.sum(table["tx_index"]).as_py())
    want_files = -(-rows // chunk_rows)

    def empty(ref: TableRef, properties: dict[str, str]):
        def run():
            # an empty table with no history, so that no case pays for the snapshots of earlier rounds
            catalog.purge_table((NAMESPACE, ref.name))
            loader.ensure_table(ref, table.schema)
            if properties:
                tbl = catalog.load_table((NAMESPACE, ref.name))
                with tbl.transaction() as txn:
                    txn.set_properties(properties)

        return run

    def check(ref: TableRef):
        def run():
            tbl = catalog.load_table((NAMESPACE, ref.name))
            got = tbl.scan(selected_fields=("log_index", "tx_index")).to_arrow()
            sums = (got.num_rows, pc.sum(got["log_index"]).as_py(), pc.sum(got["tx_index"]).as_py())
            assert sums == want, f"{ref}: {sums} != {want} (rows, sum of log_index, tx_index)"
            assert len(tbl.snapshots()) == 1, f"{ref}: {len(tbl.snapshots())} snapshots, want one"
            files = int(tbl.current_snapshot().summary["added-data-files"])
            assert files == want_files, f"{ref}: {files} data files, want {want_files} of {chunk_rows:,} rows"

        return run

    def append():
        catalog.load_table((NAMESPACE, plain.name)).append(prepared)

    reference = f"pyiceberg append(pa.Table), {in_flight} workers (reference)"
    mine = f"IcebergLoader.write, {in_flight} files in flight"
    result = compare(
        f"P5 Iceberg: loader vs pyiceberg append, one snapshot and {want_files} file(s) of {chunk_rows:,} rows each",
        rows,
        [
            Case(reference, append, empty(plain, {TARGET_FILE_SIZE: str(file_size)}), check(plain)),
            Case(mine, lambda: loader.write(ours, batches(table)), empty(ours, {}), check(ours)),
        ],
        rounds,
    )
    result.goal(GOALS["P5"], mine, reference)
    print(f"    both wrote {want_files} data file(s) ({TARGET_FILE_SIZE}={file_size:,} for the reference)")
    loader.close()
    shutil.rmtree(root, ignore_errors=True)


def _pool_size(workers: int) -> None:
    """Give pyiceberg's shared thread pool ``workers`` threads; it is made once per process, on first use."""
    from pyiceberg.utils.concurrent import ExecutorFactory

    os.environ["PYICEBERG_MAX_WORKERS"] = str(workers)
    pool = ExecutorFactory.get_or_create()
    if getattr(pool, "_max_workers", workers) != workers:
        raise RuntimeError(
            f"pyiceberg's thread pool was made before this benchmark with {pool._max_workers} workers, not {workers}: "
            "run the Iceberg benchmark in a fresh process (python -m amp_dagster_tests.benchmarks iceberg)"
        )
