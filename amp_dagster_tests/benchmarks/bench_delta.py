"""P4: the Delta Lake loader against plain write_deltalake at the same commit size, plus its streaming peak RSS."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.delta import DeltaLoader

from .harness import BENCH_DIR, Case, batches, compare, logs_table

FLUSH = 65_536  # DeltaLoader.capabilities.flush_rows: what the sync engine commits at in stream mode


def main(rows: int, rounds: int) -> None:
    from deltalake import DeltaTable, write_deltalake

    table = logs_table(rows)
    want = (rows, pc.sum(table["log_index"].cast(pa.int64())).as_py())
    root = BENCH_DIR / "delta"
    loader = DeltaLoader(root / "loader")
    ours = TableRef("logs")
    plain = str(root / "plain")

    def fresh_plain():
        shutil.rmtree(plain, ignore_errors=True)
        write_deltalake(plain, table.slice(0, 0))  # an existing empty table, as the loader gets from ensure_table

    def fresh_ours():
        shutil.rmtree(root / "loader", ignore_errors=True)
        loader.ensure_table(ours, table.schema)

    def holds_all(path: str, commits: int):
        def check():
            dt = DeltaTable(path)
            got = dt.to_pyarrow_dataset().to_table(columns=["log_index"])["log_index"]
            assert (len(got), pc.sum(got).as_py()) == want, f"{path}: {(len(got), pc.sum(got).as_py())} != {want}"
            assert dt.version() == commits, f"{path}: {dt.version()} commits, expected {commits}"

        return check

    chunks = -(-rows // FLUSH)
    compare(
        "P4 Delta Lake: loader vs write_deltalake, same commit size",
        rows,
        [
            Case(
                "write_deltalake, 1 commit (reference)",
                lambda: write_deltalake(plain, batches(table), mode="append"),
                fresh_plain,
                holds_all(plain, 1),
            ),
            Case(
                "DeltaLoader.write, 1 commit",
                lambda: loader.write(ours, batches(table)),
                fresh_ours,
                holds_all(str(loader.path(ours)), 1),
            ),
            Case(
                f"write_deltalake, {chunks} commits of {FLUSH:,}",
                lambda: [write_deltalake(plain, b, mode="append") for b in table.to_batches(max_chunksize=FLUSH)],
                fresh_plain,
                holds_all(plain, chunks),
            ),
            Case(
                f"DeltaLoader.write, {chunks} commits of {FLUSH:,}",
                lambda: [loader.write(ours, b) for b in table.to_batches(max_chunksize=FLUSH)],
                fresh_ours,
                holds_all(str(loader.path(ours)), chunks),
            ),
        ],
        rounds,
    )
    print("\nstreaming peak RSS, DeltaLoader.write of one reader (one commit), fresh process each:")
    for n in (rows, 4 * rows):
        out = subprocess.run(
            [sys.executable, "-m", __name__, str(rows), str(n), str(root / "rss")],
            capture_output=True,
            text=True,
            check=True,
        )
        print(f"  {n:>12,} rows: {out.stdout.strip()}")
    shutil.rmtree(root, ignore_errors=True)


def _peak_rss(cached: int, rows: int, where: str) -> None:
    """Stream ``rows`` logs rows (one 65,536-row batch repeated) into one commit; print the process's peak RSS."""
    # the first batch of the cached table, memory-mapped: the source itself costs next to nothing
    batch = pa.ipc.open_file(pa.memory_map(str(BENCH_DIR / f"logs_{cached}.arrow"))).get_batch(0)
    before = _high_water_mb()
    source = pa.RecordBatchReader.from_batches(batch.schema, (batch.slice(0, rows - i) for i in range(0, rows, FLUSH)))
    shutil.rmtree(where, ignore_errors=True)
    loader, table = DeltaLoader(where), TableRef("logs")
    loader.ensure_table(table, batch.schema)
    result = loader.write(table, source)
    assert result.rows == rows and result.commits == 1
    print(f"peak {_high_water_mb():,.0f} MB (before the write {before:,.0f} MB)")
    shutil.rmtree(where, ignore_errors=True)


def _high_water_mb() -> float:
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


if __name__ == "__main__":
    _peak_rss(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
