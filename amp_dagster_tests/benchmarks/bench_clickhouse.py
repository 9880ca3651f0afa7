"""P6: the ClickHouse loader against plain clickhouse-connect ``insert_arrow``, same rows, same chdb engine."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.clickhouse import ClickHouseLoader

from .harness import BENCH_DIR, Case, batches, compare, logs_table

DATABASE = "amp_bench"


def main(rows: int, rounds: int) -> None:
    import clickhouse_connect

    table = logs_table(rows)
    dsn = f"chdb://{(BENCH_DIR / 'chdb').resolve()}"
    client = clickhouse_connect.get_client(dsn=dsn)  # opens the engine: the loader shares it (one path per process)
    loader = ClickHouseLoader(dsn)
    ours = TableRef("logs_loader", namespace=DATABASE)
    client.command(f"DROP DATABASE IF EXISTS {DATABASE} SYNC")
    loader.ensure_table(ours, table.schema)
    # the reference gets the very table the loader made (same engine, ORDER BY, types), without the loader
    client.command(f"CREATE TABLE {DATABASE}.logs_plain AS {DATABASE}.logs_loader")
    want = (rows, pc.sum(table["log_index"].cast(pa.int64())).as_py(), pc.count_distinct(table["tx_hash"]).as_py())

    def truncate(name: str):
        return lambda: client.command(f"TRUNCATE TABLE {DATABASE}.{name} SYNC")

    def holds_all_rows(name: str):
        def check():
            got = client.query(f"SELECT count(), sum(log_index), uniqExact(tx_hash) FROM {DATABASE}.{name}")
            assert tuple(got.result_rows[0]) == want, f"{name}: {got.result_rows[0]} != {want}"

        return check

    compare(
        "P6 ClickHouse (chdb): loader vs insert_arrow",
        rows,
        [
            Case(
                "client.insert_arrow (reference)",
                lambda: client.insert_arrow(f"{DATABASE}.logs_plain", table),
                truncate("logs_plain"),
                holds_all_rows("logs_plain"),
            ),
            Case(
                "ClickHouseLoader.write (ArrowStream)",
                lambda: loader.write(ours, batches(table)),
                truncate("logs_loader"),
                holds_all_rows("logs_loader"),
            ),
        ],
        rounds,
    )
    client.command(f"DROP DATABASE IF EXISTS {DATABASE} SYNC")
    loader.close()
    client.close()
