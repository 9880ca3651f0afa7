"""The pipeline config: one pydantic model for a source, a destination, a table and a mode, read from YAML.

The same model serves the three front doors: ``amp-dagster sync FILE``, the Python API (:meth:`Pipeline.run`) and
the Dagster layer (assets, the YAML Component). Secrets are given as environment variable *names*
(``password_env: PGPASSWORD``), never as values, and are read when a loader or client is built.

A file holds ``pipelines: [...]`` (or a Dagster component's ``attributes: {pipelines: [...]}``); validation
errors name the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .ranges import BLOCK_NUM, RowRange
from .retry import RetryPolicy

_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"


def _env(name: str | None, what: str) -> str | None:
    """The value of the environment variable ``name`` (None when no name is configured)."""
    if name is None:
        return None
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"{what} is read from the environment variable {name}, which is not set. Set it, or remove "
                          f"the setting.")  # fmt: skip
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- sources ------------------------------------------------------------------------------------------------------


class AmpSourceConfig(_Model):
    """A SQL query over amp (or any amp-compatible server)."""

    kind: Literal["amp"] = "amp"
    sql: str = Field(description="The query. Select _block_num to load by block range (amp's raw tables have it).")
    url: str = Field("grpc://127.0.0.1:1602", description="amp's Flight address: grpc://host:port or grpc+tls://.")
    token_env: str | None = Field(
        "AMP_AUTH_TOKEN", description="Environment variable holding the bearer token (unset variable: no token)."
    )

    @field_validator("sql")
    @classmethod
    def _sql(cls, sql: str) -> str:
        if not sql.strip():
            raise ValueError("the query is empty")
        return sql

    def identity(self) -> dict:
        return {"kind": self.kind, "sql": " ".join(self.sql.split())}

    def build(self, mode: str):
        from .flight.client import AmpClient
        from .sources import AmpQuerySource

        token = os.environ.get(self.token_env) if self.token_env else None
        return AmpQuerySource(AmpClient(self.url, token=token or None), self.sql, stream=mode == "stream")


class FlightSqlSourceConfig(_Model):
    """A query against any Flight SQL server; incremental with an increasing integer ``range_column``."""

    kind: Literal["flight_sql"]
    sql: str
    url: str
    token_env: str | None = None
    range_column: str | None = Field(None, description="An increasing integer column: load only new rows.")

    def identity(self) -> dict:
        return {"kind": self.kind, "sql": " ".join(self.sql.split()), "range_column": self.range_column}

    def build(self, mode: str):
        from .flight.client import AmpClient
        from .sources import FlightSqlSource

        client = AmpClient(self.url, token=_env(self.token_env, "the Flight SQL token"))
        return FlightSqlSource(client, self.sql, range_column=self.range_column)


class PythonSourceConfig(_Model):
    """A source built by a Python function: ``factory: "package.module:function"``, called with ``args``."""

    kind: Literal["python"]
    factory: str = Field(description='"package.module:function" returning a Source (e.g. a CursorSource).')
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _factory(cls, factory: str) -> str:
        if factory.count(":") != 1 or not all(factory.split(":")):
            raise ValueError(f'{factory!r} must look like "package.module:function"')
        return factory

    def identity(self) -> dict:
        return {"kind": self.kind, "factory": self.factory, "args": self.args}

    def build(self, mode: str):
        module, _, name = self.factory.partition(":")
        try:
            function = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"python source factory {self.factory!r} cannot be imported: {exc}") from None
        source = function(**self.args)
        if not hasattr(source, "read"):
            raise ConfigError(f"python source factory {self.factory!r} returned {type(source).__name__}, not a Source")
        return source


def _source_kind(value: Any) -> str:
    return value.get("kind", "amp") if isinstance(value, Mapping) else getattr(value, "kind", "amp")


SourceConfig = Annotated[
    Annotated[AmpSourceConfig, Tag("amp")]
    | Annotated[FlightSqlSourceConfig, Tag("flight_sql")]
    | Annotated[PythonSourceConfig, Tag("python")],
    Discriminator(_source_kind),
]


# -- destinations ---------------------------------------------------------------------------------------------


class _Destination(_Model):
    #: the field naming the environment variable of the destination's one secret (None: it has none)
    secret_env: ClassVar[str | None] = None


class PostgresDestination(_Destination):
    secret_env: ClassVar[str] = "password_env"

    kind: Literal["postgres"]
    dsn: str = Field(description="libpq URL or key=value string, without the password.")
    password_env: str | None = Field(None, description="Environment variable holding the password (or PGPASSWORD).")
    uint64: Literal["numeric", "bigint"] = Field("numeric", description="How uint64 columns are stored.")
    pool_size: int = Field(4, ge=1, description="Most connections open at once.")

    def location(self) -> str:
        import psycopg.conninfo

        info = psycopg.conninfo.conninfo_to_dict(self.dsn)
        info.pop("password", None)
        return f"postgres://{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def build(self, secret: str | None = None):
        """The loader; ``secret`` is the password itself, and wins over ``password_env``."""
        from .loaders.postgres import PostgresLoader

        password = secret if secret is not None else _env(self.password_env, "the PostgreSQL password")
        extra = {"password": password} if password else {}
        return PostgresLoader(self.dsn, uint64=self.uint64, pool_size=self.pool_size, **extra)


class RedisDestination(_Destination):
    secret_env: ClassVar[str] = "password_env"

    kind: Literal["redis"]
    url: str = Field("redis://127.0.0.1:6379/0", description="redis://host:port/db, without the password.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    prefix: str = Field("amp", description="First part of every key the tables are stored under.")
    form: Literal["hash", "stream"] = Field(
        "hash", description="hash: one hash per row (keyed by the key columns); stream: rows appended to a stream."
    )
    ttl: int | None = Field(None, gt=0, description="Seconds before rows expire.")

    def location(self) -> str:
        return f"{self.url.split('@')[-1]}#{self.prefix}"

    def build(self, secret: str | None = None):
        """The loader; ``secret`` is the password itself, and wins over ``password_env``."""
        from .loaders.redis import RedisLoader

        url = self.url
        password = secret if secret is not None else _env(self.password_env, "the Redis password")
        if password:
            from urllib.parse import quote

            url = url.replace("redis://", f"redis://:{quote(password, safe='')}@", 1)
        return RedisLoader(url, prefix=self.prefix, form=self.form, ttl=self.ttl)


class ClickHouseDestination(_Destination):
    secret_env: ClassVar[str] = "password_env"

    kind: Literal["clickhouse"]
    dsn: str = Field(description="http://host:8123/db for a server, or chdb:///path for the in-process engine.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    insert_rows: int = Field(131_072, ge=1, description="Rows per INSERT.")

    def location(self) -> str:
        from urllib.parse import urlparse

        parsed = urlparse(self.dsn)
        return f"{parsed.scheme}://{parsed.hostname or ''}{':' + str(parsed.port) if parsed.port else ''}{parsed.path}"

    def build(self, secret: str | None = None):
        """The loader; ``secret`` is the password itself, and wins over ``password_env``."""
        from .loaders.clickhouse import ClickHouseLoader

        password = secret if secret is not None else _env(self.password_env, "the ClickHouse password")
        return ClickHouseLoader(self.dsn, password=password, insert_rows=self.insert_rows)


class DeltaDestination(_Destination):
    kind: Literal["delta"]
    path: str = Field(description="Local directory the Delta tables live under (one sub-directory per table).")
    vacuum_every: int = Field(1, ge=0, description="Delete replaced files after this many commits (0: never).")
    retention_hours: int = Field(0, ge=0, description="Keep replaced files this long for readers of old versions.")
    compact_files: int = Field(32, ge=0, description="Compact a table once it has this many small files (0: never).")

    def location(self) -> str:
        return f"delta://{Path(self.path).expanduser().absolute()}"

    def build(self):
        from .loaders.delta import DeltaLoader

        return DeltaLoader(Path(self.path).expanduser(), vacuum_every=self.vacuum_every,
                           retention_hours=self.retention_hours, compact_files=self.compact_files)  # fmt: skip


class IcebergDestination(_Destination):
    secret_env: ClassVar[str] = "catalog_uri_env"

    kind: Literal["iceberg"]
    warehouse: str = Field(description="Local warehouse directory.")
    catalog_uri_env: str | None = Field(
        None, description="Environment variable holding the SQL catalog URI (default: sqlite in the warehouse)."
    )
    catalog: str = Field("amp", description="Catalog name.")

    def location(self) -> str:
        return f"iceberg://{Path(self.warehouse).expanduser().absolute()}#{self.catalog}"

    def build(self, secret: str | None = None):
        """The loader; ``secret`` is the catalog URI itself (it may hold a password), and wins over
        ``catalog_uri_env``."""
        from .loaders.iceberg import IcebergLoader

        uri = secret if secret is not None else _env(self.catalog_uri_env, "the Iceberg catalog URI")
        return IcebergLoader(Path(self.warehouse).expanduser(), uri=uri, name=self.catalog)


class LmdbDestination(_Destination):
    kind: Literal["lmdb"]
    path: str = Field(description="Directory of the LMDB environment.")
    map_size: int = Field(2**34, ge=2**20, description="Largest size the environment may grow to, in bytes.")

    def location(self) -> str:
        return f"lmdb://{Path(self.path).expanduser().absolute()}"

    def build(self):
        from .loaders.lmdb import LmdbLoader

        return LmdbLoader(Path(self.path).expanduser(), map_size=self.map_size)


DestinationConfig = Annotated[
    PostgresDestination | RedisDestination | ClickHouseDestination | DeltaDestination | IcebergDestination
    | LmdbDestination,
    Field(discriminator="kind"),
]  # fmt: skip
DESTINATION_KINDS = ("postgres", "redis", "clickhouse", "delta", "iceberg", "lmdb")


# -- partitions (used by the Dagster layer) ---------------------------------------------------------------------


class BlockRangePartitions(_Model):
    """Fixed-size block ranges as dynamic partitions with zero-padded, sortable keys."""

    kind: Literal["block_ranges"]
    size: int = Field(10_000, ge=1, description="Blocks per partition.")
    start: int = Field(0, ge=0, description="First block of the first partition.")
    name: str | None = Field(
        None, pattern=_NAME, description="Name of the dynamic partitions (default: amp_blocks_<size>_<start>)."
    )


class TimePartitions(_Model):
    """Daily or hourly partitions, mapped to block ranges through amp's ``blocks`` table."""

    kind: Literal["daily", "hourly"]
    start: str = Field(description="First partition, e.g. 2026-01-01 (or 2026-01-01-00:00 for hourly).")
    timezone: str = "UTC"
    blocks_table: str = Field("eth_rpc.blocks", description="amp's blocks table that maps times to block numbers.")


PartitionsConfig = Annotated[BlockRangePartitions | TimePartitions, Field(discriminator="kind")]


# -- the pipeline ---------------------------------------------------------------------------------------------


class FlushConfig(_Model):
    rows: int | None = Field(None, ge=1, description="Rows buffered before a write (default: the store's choice).")
    bytes: int = Field(64 * 2**20, ge=1, description="Bytes buffered before a write.")
    seconds: float = Field(5.0, gt=0, description="Longest a completed microbatch waits while catching up.")


class RetryConfig(_Model):
    attempts: int = Field(10, ge=1, description="Tries of a sync after a transient failure, the first included.")
    initial_delay: float = Field(0.5, ge=0, description="Seconds before the first retry (then doubling).")
    max_delay: float = Field(10.0, ge=0, description="Longest pause between two tries, in seconds.")


class Pipeline(_Model):
    """One source into one destination table, in one mode."""

    name: str = Field(pattern=_NAME, description="Unique name: the Dagster asset and the CLI use it.")
    id: str | None = Field(
        None, pattern=_NAME, description="Stable checkpoint id (default: the name); keep it to rename the pipeline."
    )
    description: str | None = None
    source: SourceConfig
    destination: DestinationConfig
    table: str = Field(description="Destination table name.")
    namespace: str | None = Field(None, description="Schema, database, Iceberg namespace, directory or key prefix.")
    key: tuple[str, ...] = Field((), description="Columns that identify a row (upserts, key-value stores).")
    range_column: str = Field(BLOCK_NUM, description="Integer column rows are keyed by.")
    mode: Literal["full_refresh", "incremental", "stream"] = "incremental"
    finality: int = Field(0, ge=0, description="incremental: blocks behind the head not loaded yet (may reorg).")
    blocks_per_query: int = Field(100_000, ge=1, description="incremental: blocks per query and per write.")
    flush: FlushConfig = FlushConfig()
    retry: RetryConfig = RetryConfig()
    partitions: PartitionsConfig | None = None
    pool: str | None = Field(None, description="Dagster concurrency pool of the pipeline's runs.")
    group: str | None = Field(None, description="Dagster asset group.")
    schedule: str | None = Field(None, description="full_refresh: cron schedule of the refresh.")
    sensor_seconds: int = Field(30, ge=5, description="incremental/stream: seconds between sensor evaluations.")

    @model_validator(mode="after")
    def _consistent(self) -> Pipeline:
        if self.mode == "stream" and self.partitions is not None:
            raise ValueError("a stream has no partitions: remove `partitions` or use mode: incremental")
        if self.schedule is not None and self.mode != "full_refresh":
            raise ValueError("`schedule` is for full_refresh pipelines; incremental and stream ones use sensors")
        if isinstance(self.source, PythonSourceConfig) and self.partitions is not None:
            raise ValueError("a python source reads pages after a cursor: it cannot be partitioned")
        return self

    @property
    def checkpoint_id(self) -> str:
        return self.id or self.name

    def table_ref(self):
        from .loaders.base import TableRef

        return TableRef(self.table, namespace=self.namespace, range_column=self.range_column, key=self.key)

    def fingerprint(self) -> str:
        """Identifies what the loaded rows depend on: the query and the destination table (not URLs of amp, nor
        secrets). A checkpoint with another fingerprint is refused."""
        identity = {
            "source": self.source.identity(),
            "destination": {"kind": self.destination.kind, "location": self.destination.location()},
            "table": [self.namespace, self.table, self.range_column, list(self.key)],
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def options(self, **overrides: Any):
        from .sync import SyncOptions

        settings = {
            "finality": self.finality,
            "blocks_per_query": self.blocks_per_query,
            "flush_rows": self.flush.rows,
            "flush_bytes": self.flush.bytes,
            "flush_seconds": self.flush.seconds,
            "retry": RetryPolicy(self.retry.attempts, self.retry.initial_delay, self.retry.max_delay),
        }
        return SyncOptions(**{**settings, **overrides})

    def source_for(self, mode: str | None = None):
        return self.source.build(mode or self.mode)

    def run(
        self,
        checkpoints,
        *,
        mode: str | None = None,
        ranges: Sequence[RowRange] = (),
        run_id: str | None = None,
        source: Any = None,
        **options: Any,
    ):
        """Sync this pipeline once (see :func:`amp_dagster.sync.sync`); ``options`` override SyncOptions fields,
        ``source`` replaces the configured one (a wrapper of it, for instance)."""
        from .sync import sync

        mode = mode or self.mode
        loader = self.destination.build()
        try:
            return sync(source or self.source_for(mode), loader, self.table_ref(), checkpoints, mode,
                        self.options(ranges=tuple(ranges), **options), pipeline=self.checkpoint_id,
                        fingerprint=self.fingerprint(), run_id=run_id)  # fmt: skip
        finally:
            loader.close()


class PipelineFile(_Model):
    pipelines: list[Pipeline] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> PipelineFile:
        for attr in ("name", "checkpoint_id"):
            seen: set[str] = set()
            for p in self.pipelines:
                value = getattr(p, attr)
                if value in seen:
                    raise ValueError(f"two pipelines share the {attr.replace('_', ' ')} {value!r}")
                seen.add(value)
        return self

    def get(self, name: str) -> Pipeline:
        for p in self.pipelines:
            if p.name == name:
                return p
        names = ", ".join(p.name for p in self.pipelines)
        raise ConfigError(f"no pipeline named {name!r}; the file defines: {names}")


# -- YAML with line numbers ---------------------------------------------------------------------------------------


def load_pipelines(path: str | Path) -> PipelineFile:
    """Read and validate a pipeline file; errors name the file, the line and the field."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the pipeline file {path}: {exc.strerror or exc}") from None
    try:
        documents = list(yaml.compose_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    for node in documents:
        lines: dict[tuple, int] = {}
        data = _construct(node, (), lines)
        if isinstance(data, Mapping) and "attributes" in data and "type" in data:  # a Dagster component file
            data, prefix = _render(data["attributes"], data.get("template_vars_module"), path), ("attributes",)
        else:
            prefix = ()
        if isinstance(data, Mapping) and "pipelines" in data:
            return parse_pipelines(data, source=str(path), lines={k[len(prefix):]: v for k, v in lines.items()
                                                                   if k[: len(prefix)] == prefix})  # fmt: skip
    raise ConfigError(f"{path}: no `pipelines:` list found (a pipeline file holds `pipelines: [...]`)")


def _render(attributes: Any, template_vars_module: str | None, path: Path) -> Any:
    """A component file's attributes rendered as Dagster renders them (``{{ env.X }}``, ``{{ env('X', 'd') }}``,
    the template vars of ``template_vars_module``), so that `amp-dagster sync` reads what the code location does."""
    from dagster.components.resolved.context import ResolutionContext

    context = ResolutionContext.default()
    if template_vars_module:
        from dagster.components.component.template_vars import find_inline_template_vars_in_module

        if template_vars_module.startswith("."):
            raise ConfigError(
                f"{path}: template_vars_module {template_vars_module!r} is relative to a defs module, which a file "
                "read outside a Dagster project does not have: give its absolute module name"
            )
        try:
            module = importlib.import_module(template_vars_module)
            scope = {name: fn() for name, fn in find_inline_template_vars_in_module(module).items()}
        except (ImportError, TypeError) as exc:
            raise ConfigError(f"{path}: template vars of {template_vars_module!r} cannot be read: {exc}") from None
        context = context.with_scope(**scope)
    try:
        return context.resolve_value(attributes)
    except Exception as exc:  # a template that does not render names itself in the message
        raise ConfigError(f"{path}: a template does not render: {exc}") from None


def parse_pipelines(data: Any, source: str = "<config>", lines: Mapping[tuple, int] | None = None) -> PipelineFile:
    try:
        return PipelineFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = _line(lines or {}, loc)
            parts = [p for p in loc if not (isinstance(p, str) and p in _TAGS)]
            field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "(top level)"
            problems.append(f"{source}{':' + str(line) if line else ''}: {field}: {error['msg']}")
        raise ConfigError("invalid pipeline config:\n  " + "\n  ".join(problems)) from None


def _line(lines: Mapping[tuple, int], loc: tuple) -> int | None:
    """The line of the nearest configured field to ``loc`` (pydantic adds union tags to the path)."""
    for end in range(len(loc), -1, -1):
        candidate = tuple(p for p in loc[:end] if not (isinstance(p, str) and p in _TAGS))
        if candidate in lines:
            return lines[candidate]
    return None


_TAGS = {*DESTINATION_KINDS, "amp", "flight_sql", "python", "block_ranges", "daily", "hourly"}


def _construct(node: Any, path: tuple, lines: dict[tuple, int]) -> Any:
    import yaml

    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = _construct(key_node, path, {})
            out[key] = _construct(value_node, (*path, key), lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(child, (*path, i), lines) for i, child in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: Any) -> Any:
    import yaml

    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()
