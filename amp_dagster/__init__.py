"""amp_dagster: blockchain data from amp (Flight SQL) into PostgreSQL, Redis, ClickHouse, Delta Lake, Iceberg and
LMDB, inside Dagster.

The public API is listed here. Names are imported on first use, so that ``import amp_dagster`` (and the CLI) stays
fast and a driver you do not use is never imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    # the query side
    "AmpClient": "flight.client",
    "AmpStream": "flight.client",
    "QueryResult": "flight.client",
    "BlockRange": "flight.protocol",
    "Watermark": "flight.protocol",
    "Cursor": "flight.protocol",
    "Data": "flight.protocol",
    "Checkpoint": "flight.protocol",
    "Rollback": "flight.protocol",
    "Reorg": "flight.protocol",
    "Rewind": "flight.protocol",
    "ProtocolError": "flight.protocol",
    "DevServer": "devserver.server",
    "Fault": "devserver.server",
    "Chain": "devserver.chain",
    # sources
    "Source": "sources",
    "AmpQuerySource": "sources",
    "FlightSqlSource": "sources",
    "CursorSource": "sources",
    "Page": "sources",
    # the write side
    "Loader": "loaders.base",
    "TableRef": "loaders.base",
    "RowRange": "ranges",
    "Capabilities": "loaders.base",
    "WriteResult": "loaders.base",
    "PostgresLoader": "loaders.postgres",
    "RedisLoader": "loaders.redis",
    "ClickHouseLoader": "loaders.clickhouse",
    "DeltaLoader": "loaders.delta",
    "IcebergLoader": "loaders.iceberg",
    "LmdbLoader": "loaders.lmdb",
    # the sync engine (the function itself: `from amp_dagster.sync import sync`) and its configuration
    "SyncOptions": "sync",
    "SyncResult": "sync",
    "SyncState": "state",
    "Progress": "sync",
    "CheckpointStore": "state",
    "MemoryCheckpoints": "state",
    "DagsterCheckpoints": "checkpoints",
    "Pipeline": "pipelines",
    "load_pipelines": "pipelines",
    # the Dagster layer
    "AmpTranslator": "assets",
    "AmpSyncResource": "assets",
    "amp_assets": "assets",
    "build_amp_asset_specs": "assets",
    "build_amp_assets": "assets",
    "build_amp_checks": "checks",
    "build_amp_automation": "sensors",
    "incremental_sensor": "sensors",
    "stream_sensor": "sensors",
    "gap_sensor": "sensors",
    "refresh_schedule": "sensors",
    "AmpPipelinesComponent": "component",
    "build_amp_definitions": "component",
    "BlockRanges": "partitions",
    "AmpResource": "resources",
    "DestinationResource": "resources",
    "PostgresResource": "resources",
    "RedisResource": "resources",
    "ClickHouseResource": "resources",
    "DeltaResource": "resources",
    "IcebergResource": "resources",
    "LmdbResource": "resources",
    "AmpIOManager": "io_managers",
    # errors and retries
    "AmpDagsterError": "errors",
    "TransientError": "errors",
    "TerminalError": "errors",
    "ServiceUnavailableError": "errors",
    "QueryError": "errors",
    "AuthenticationError": "errors",
    "SchemaMismatchError": "errors",
    "NotSupportedError": "errors",
    "ConfigError": "errors",
    "MissingDriverError": "errors",
    "RetryPolicy": "retry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'amp_dagster' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]


if TYPE_CHECKING:
    from .assets import AmpSyncResource as AmpSyncResource
    from .assets import AmpTranslator as AmpTranslator
    from .assets import amp_assets as amp_assets
    from .assets import build_amp_asset_specs as build_amp_asset_specs
    from .assets import build_amp_assets as build_amp_assets
    from .checkpoints import DagsterCheckpoints as DagsterCheckpoints
    from .checks import build_amp_checks as build_amp_checks
    from .component import AmpPipelinesComponent as AmpPipelinesComponent
    from .component import build_amp_definitions as build_amp_definitions
    from .devserver.chain import Chain as Chain
    from .devserver.server import DevServer as DevServer
    from .devserver.server import Fault as Fault
    from .errors import AmpDagsterError as AmpDagsterError
    from .errors import AuthenticationError as AuthenticationError
    from .errors import ConfigError as ConfigError
    from .errors import MissingDriverError as MissingDriverError
    from .errors import NotSupportedError as NotSupportedError
    from .errors import QueryError as QueryError
    from .errors import SchemaMismatchError as SchemaMismatchError
    from .errors import ServiceUnavailableError as ServiceUnavailableError
    from .errors import TerminalError as TerminalError
    from .errors import TransientError as TransientError
    from .flight.client import AmpClient as AmpClient
    from .flight.client import AmpStream as AmpStream
    from .flight.client import QueryResult as QueryResult
    from .flight.protocol import BlockRange as BlockRange
    from .flight.protocol import Checkpoint as Checkpoint
    from .flight.protocol import Cursor as Cursor
    from .flight.protocol import Data as Data
    from .flight.protocol import ProtocolError as ProtocolError
    from .flight.protocol import Reorg as Reorg
    from .flight.protocol import Rewind as Rewind
    from .flight.protocol import Rollback as Rollback
    from .flight.protocol import Watermark as Watermark
    from .io_managers import AmpIOManager as AmpIOManager
    from .loaders.base import Capabilities as Capabilities
    from .loaders.base import Loader as Loader
    from .loaders.base import TableRef as TableRef
    from .loaders.base import WriteResult as WriteResult
    from .loaders.clickhouse import ClickHouseLoader as ClickHouseLoader
    from .loaders.delta import DeltaLoader as DeltaLoader
    from .loaders.iceberg import IcebergLoader as IcebergLoader
    from .loaders.lmdb import LmdbLoader as LmdbLoader
    from .loaders.postgres import PostgresLoader as PostgresLoader
    from .loaders.redis import RedisLoader as RedisLoader
    from .partitions import BlockRanges as BlockRanges
    from .pipelines import Pipeline as Pipeline
    from .pipelines import load_pipelines as load_pipelines
    from .ranges import RowRange as RowRange
    from .resources import AmpResource as AmpResource
    from .resources import ClickHouseResource as ClickHouseResource
    from .resources import DeltaResource as DeltaResource
    from .resources import DestinationResource as DestinationResource
    from .resources import IcebergResource as IcebergResource
    from .resources import LmdbResource as LmdbResource
    from .resources import PostgresResource as PostgresResource
    from .resources import RedisResource as RedisResource
    from .retry import RetryPolicy as RetryPolicy
    from .sensors import build_amp_automation as build_amp_automation
    from .sensors import gap_sensor as gap_sensor
    from .sensors import incremental_sensor as incremental_sensor
    from .sensors import refresh_schedule as refresh_schedule
    from .sensors import stream_sensor as stream_sensor
    from .sources import AmpQuerySource as AmpQuerySource
    from .sources import CursorSource as CursorSource
    from .sources import FlightSqlSource as FlightSqlSource
    from .sources import Page as Page
    from .sources import Source as Source
    from .state import CheckpointStore as CheckpointStore
    from .state import MemoryCheckpoints as MemoryCheckpoints
    from .state import SyncState as SyncState
    from .sync import Progress as Progress
    from .sync import SyncOptions as SyncOptions
    from .sync import SyncResult as SyncResult
