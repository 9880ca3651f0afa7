"""P6: the ClickHouse loader against plain clickhouse-connect inserts: same table, insert size, format and settings.

Like for like: the reference table is a copy of the loader's (``CREATE TABLE ... AS``: same engine, ORDER BY and
types), in the same chdb engine. The loader sends one ``INSERT ... FORMAT ArrowStream`` per ``insert_rows`` rows
(read from ClickHouseLoader's signature) with ``async_insert = 0``; the reference sends the same: an Arrow IPC stream
per ``insert_rows`` rows, written by pyarrow, through ``raw_insert(..., fmt="ArrowStream")`` with the same settings.
Both start from the same Arrow table. Each check asserts the rows (count, sums, distinct hashes) and that both sides
made the same number of inserts.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.clickhouse import ClickHouseLoader

from .harness import BENCH_DIR, GOALS, Case, batches, compare, default, logs_table

DATABASE = "amp_bench"
INSERT_SETTINGS = {"async_insert": 0}  # the loader's: an insert returns once its rows are committed


def main(rows: int, rounds: int) -> None:
    import clickhouse_connect

    table = logs_table(rows)
    insert_rows = default(ClickHouseLoader, "insert_rows")
    dsn = f"chdb://{(BENCH_DIR / 'chdb').resolve()}"
    client = clickhouse_connect.get_client(dsn=dsn)  # opens the engine: the loader shares it (one path per process)
    loader = ClickHouseLoader(dsn, insert_rows=insert_rows)
    ours = TableRef("logs_loader", namespace=DATABASE)
    client.command(f"DROP DATABASE IF EXISTS {DATABASE} SYNC")
    loader.ensure_table(ours, table.schema)
    client.command(f"CREATE TABLE {DATABASE}.logs_plain AS {DATABASE}.logs_loader")
    want = (
        rows,
        pc.sum(table["log_index"].cast(pa.int64())).as_py(),
        pc.sum(table["tx_index"]).as_py(),
        pc.count_distinct(table["tx_hash"]).as_py(),
    )
    inserts = -(-rows // insert_rows)
    made: dict[str, int] = {}

    def raw_inserts() -> None:
        for start in range(0, rows, insert_rows):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table.slice(start, insert_rows))
            client.raw_insert(f"{DATABASE}.logs_plain", None, sink.getvalue(), INSERT_SETTINGS, "ArrowStream")
        made["logs_plain"] = inserts

    def loader_write() -> None:
        made["logs_loader"] = loader.write(ours, batches(table)).commits

    def truncate(name: str):
        return lambda: client.command(f"TRUNCATE TABLE {DATABASE}.{name} SYNC")

    def holds_all_rows(name: str):
        def check():
            got = client.query(
                f"SELECT count(), sum(log_index), sum(tx_index), uniqExact(tx_hash) FROM {DATABASE}.{name}"
            )
            assert tuple(got.result_rows[0]) == want, f"{name}: {got.result_rows[0]} != {want}"
            assert made.pop(name) == inserts, f"{name}: not {inserts} inserts of {insert_rows:,} rows"

        return check

    reference = f"raw_insert ArrowStream, {insert_rows:,} rows each (reference)"
    mine = "ClickHouseLoader.write"
    result = compare(
        f"P6 ClickHouse (chdb): loader vs raw ArrowStream inserts, {inserts} insert(s) of {insert_rows:,} rows each",
        rows,
        [
            Case(reference, raw_inserts, truncate("logs_plain"), holds_all_rows("logs_plain")),
            Case(mine, loader_write, truncate("logs_loader"), holds_all_rows("logs_loader")),
        ],
        rounds,
    )
    result.goal(GOALS["P6"], mine, reference)
    client.command(f"DROP DATABASE IF EXISTS {DATABASE} SYNC")
    loader.close()
    client.close()
