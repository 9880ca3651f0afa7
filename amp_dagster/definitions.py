"""The demo code location that workspace.yaml loads: the latest blocks' logs from amp into a local Delta table.

Set ``AMP_URL`` (default ``grpc://127.0.0.1:1602``, where ``amp-dagster devserver`` listens) and optionally
``AMP_DEMO_DELTA`` (default ``.demo/delta``). Re-materializing replaces the same block range: never duplicates.
"""

import os

import dagster as dg
import pyarrow as pa
from pydantic import Field

from .flight.client import DEFAULT_URL, AmpClient
from .flight.protocol import Data
from .loaders.base import TableRef
from .loaders.delta import DeltaLoader
from .ranges import RowRange
from .sources import AmpQuerySource

LOGS = "SELECT * FROM eth_rpc.logs"


class RecentLogs(dg.Config):
    blocks: int = Field(1000, description="How many of the newest synced blocks to copy.")


@dg.asset(group_name="amp", kinds={"deltalake"})
def recent_logs(context: dg.AssetExecutionContext, config: RecentLogs) -> dg.MaterializeResult:
    """The logs of the newest ``blocks`` blocks of amp's ``eth_rpc`` dataset, in the Delta table eth_rpc/logs."""
    client = AmpClient(os.environ.get("AMP_URL", DEFAULT_URL))
    if config.blocks < 1:
        raise dg.Failure(f"RecentLogs.blocks must be at least 1, got {config.blocks}")
    probe = client.query("SELECT block_num FROM eth_rpc.blocks WHERE false")
    list(probe.reader)
    (synced,) = probe.ranges  # amp reports how far the dataset is synced at the end of any batch query
    rows = RowRange(max(synced.start, synced.end - config.blocks + 1), synced.end)
    events = AmpQuerySource(client, LOGS, blocks=rows).read()
    schema = client.schema(LOGS)
    reader = pa.RecordBatchReader.from_batches(schema, (e.batch for e in events if isinstance(e, Data)))
    loader = DeltaLoader(os.environ.get("AMP_DEMO_DELTA", ".demo/delta"))
    table = TableRef("logs", namespace="eth_rpc")
    loader.ensure_table(table, schema)
    result = loader.write(table, reader, replace=rows)
    context.log.info(f"blocks {rows} of {synced.network}: {result.rows} rows into {loader.path(table)}")
    return dg.MaterializeResult(
        metadata={
            "rows": result.rows,
            "blocks": f"{rows.start}..={rows.end}",
            "network": synced.network,
            "head_hash": synced.hash,
            "path": str(loader.path(table)),
        }
    )


defs = dg.Definitions(assets=[recent_logs])
