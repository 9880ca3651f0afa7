"""Dagster resources: amp (a configured :class:`~amp_dagster.flight.client.AmpClient`) and one per destination,
each mirroring its destination model of the pipeline config and giving a :class:`~amp_dagster.loaders.base.Loader`.

Secrets are plain ``str`` fields meant to be set with ``dg.EnvVar("NAME")``: Dagster then reads the variable when
the run starts, and shows only its name in the UI. They are left out of ``repr()``.
"""

from __future__ import annotations

import copy
import typing
from typing import Any, ClassVar, Literal

import dagster as dg
from pydantic import BaseModel, Field, ValidationError

from .errors import ConfigError
from .flight.client import QUERY_RETRY, STREAM_RETRY, AmpClient
from .loaders.base import Loader
from .pipelines import (
    AmpSourceConfig,
    ClickHouseDestination,
    DeltaDestination,
    IcebergDestination,
    LmdbDestination,
    PostgresDestination,
    RedisDestination,
)
from .retry import RetryPolicy


def _mirror(model: type[BaseModel], name: str) -> Any:
    """A resource field with the default, the constraints and the description of the pipeline config's field
    ``name``, so that the two front doors never drift apart."""
    return copy.copy(model.model_fields[name])


def _secret_value(value: str | None, owner: str, field: str) -> str | None:
    """A secret field's value. Inside a run Dagster has already read ``EnvVar`` fields; a resource used outside
    a run (a script, a test) still holds the ``EnvVar``, which is read here."""
    if not isinstance(value, dg.EnvVar):
        return value
    resolved = value.get_value()
    if resolved is None:
        raise ConfigError(
            f"{owner}.{field} is read from the environment variable {value.env_var_name}, which is not set. Set it, "
            f"or leave {field} unset."
        )
    return resolved


class AmpResource(dg.ConfigurableResource):
    """An amp server (or any Flight SQL server): ``client()`` gives a configured
    :class:`~amp_dagster.flight.client.AmpClient`. Set ``token`` with ``dg.EnvVar``.

    .. code-block:: python

        import dagster as dg
        from amp_dagster import AmpResource

        @dg.asset
        def recent_blocks(amp: AmpResource) -> None:
            with amp.client() as client:
                print(client.query("SELECT _block_num, hash FROM eth_rpc.blocks LIMIT 10").reader.read_all())

        dg.materialize(
            [recent_blocks],
            resources={"amp": AmpResource(url="grpc://127.0.0.1:1602")},  # token=dg.EnvVar("AMP_AUTH_TOKEN")
        )
    """

    url: str = _mirror(AmpSourceConfig, "url")
    token: str | None = Field(
        None,
        repr=False,
        description='Bearer token; set it with dg.EnvVar("AMP_AUTH_TOKEN"). Unset: the AMP_AUTH_TOKEN environment '
        "variable if it exists, else no token.",
    )
    timeout: float | None = Field(
        30.0,
        gt=0,
        description="Seconds each attempt to plan a query may take before it counts as failed (and is retried); "
        "reading rows has no deadline. None: wait forever.",
    )
    retry_attempts: int = Field(QUERY_RETRY.attempts, ge=1, description="Tries of a query, the first included.")
    retry_initial_delay: float = Field(
        QUERY_RETRY.initial_delay, ge=0, description="Seconds before the first retry of a query; doubles each time."
    )
    retry_max_delay: float = Field(QUERY_RETRY.max_delay, ge=0, description="Longest wait between retries of a query.")
    stream_retry_attempts: int = Field(
        STREAM_RETRY.attempts, ge=1, description="Reconnects of a stream in a row without progress before it fails."
    )
    stream_retry_max_delay: float = Field(
        STREAM_RETRY.max_delay, ge=0, description="Longest wait between reconnects of a stream."
    )

    def client(self) -> AmpClient:
        """A new client for this server (a context manager; close it when done)."""
        query_retry = RetryPolicy(self.retry_attempts, self.retry_initial_delay, self.retry_max_delay)
        stream_retry = RetryPolicy(self.stream_retry_attempts, STREAM_RETRY.initial_delay, self.stream_retry_max_delay)
        token = _secret_value(self.token, "AmpResource", "token")
        return AmpClient(
            self.url, token=token, timeout=self.timeout, query_retry=query_retry, stream_retry=stream_retry
        )


# -- destinations ---------------------------------------------------------------------------------------------


def _kind(model: type[BaseModel]) -> str:
    return typing.get_args(model.model_fields["kind"].annotation)[0]


class DestinationResource(dg.ConfigurableResource):
    """Base of the destination resources: each mirrors one destination model of the pipeline config (same field
    names, defaults and descriptions; its secret as a value, set with ``dg.EnvVar``, instead of a variable name).

    ``loader()`` gives a :class:`~amp_dagster.loaders.base.Loader` (a context manager), ``location()`` where the
    data goes. ``DestinationResource.from_destination(model)`` builds the matching resource from a pipeline
    config's destination, so that a YAML-declared pipeline and a Python-declared resource load the same way:

    .. code-block:: python

        import pyarrow as pa
        from amp_dagster import DestinationResource, TableRef
        from amp_dagster.pipelines import DeltaDestination

        lake = DestinationResource.from_destination(DeltaDestination(kind="delta", path="lake"))
        with lake.loader() as loader:
            loader.replace_table(TableRef("blocks"), pa.table({"_block_num": pa.array([1, 2], pa.uint64())}))
            print(lake.location(), loader.read(TableRef("blocks")).read_all().num_rows)  # delta:///.../lake 2
    """

    #: the pipeline config's model this resource mirrors
    model: ClassVar[type[BaseModel]]

    @classmethod
    def _secret(cls) -> str | None:
        """The resource's secret field: the model's ``..._env`` field without ``_env``."""
        env = cls.model.secret_env
        return env.removesuffix("_env") if env else None

    @classmethod
    def from_destination(cls, destination: BaseModel) -> DestinationResource:
        """The resource for a pipeline config's destination model; its secret's environment variable name becomes
        ``dg.EnvVar(name)``, read when a run starts."""
        resource = _RESOURCES.get(type(destination))
        if resource is None or not issubclass(resource, cls):
            want = "a destination model" if cls is DestinationResource else cls.model.__name__
            raise ConfigError(f"{cls.__name__}.from_destination needs {want}, got {type(destination).__name__}")
        values = {name: getattr(destination, name) for name in resource._shared()}
        secret = resource._secret()
        env = getattr(destination, destination.secret_env) if secret else None
        if env:
            values[secret] = dg.EnvVar(env)
        return resource(**values)

    @classmethod
    def _shared(cls) -> list[str]:
        """The fields the resource and its model have in common (every field but ``kind`` and the secret)."""
        return [name for name in cls.model.model_fields if name in cls.model_fields]

    def destination(self) -> BaseModel:
        """This resource as the pipeline config's destination model (the secret left out)."""
        values = {name: getattr(self, name) for name in self._shared()}
        try:
            return self.model(kind=_kind(self.model), **values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{type(self).__name__} is misconfigured: {problems}") from None

    def loader(self) -> Loader:
        """A new loader on this destination (a context manager; close it when done)."""
        secret = self._secret()
        model = self.destination()
        if secret is None:
            return model.build()
        return model.build(_secret_value(getattr(self, secret), type(self).__name__, secret))

    def location(self) -> str:
        """Where the data goes (host, port and database, or a directory), without secrets."""
        return self.destination().location()


class PostgresResource(DestinationResource):
    """PostgreSQL: binary COPY, one transaction per replace; ``password`` set with ``dg.EnvVar``.

    .. code-block:: python

        import dagster as dg
        import pyarrow as pa
        from amp_dagster import AmpIOManager, PostgresResource

        @dg.asset(metadata={"schema": "eth"})
        def blocks() -> pa.Table:
            return pa.table({"_block_num": pa.array([1, 2], pa.uint64()), "hash": ["0xa1", "0xb2"]})

        postgres = PostgresResource(dsn="postgresql://amp@127.0.0.1:5432/test")  # password=dg.EnvVar("PGPASSWORD")
        dg.materialize([blocks], resources={"io_manager": AmpIOManager(destination=postgres)})  # table eth.blocks
    """

    model: ClassVar[type[BaseModel]] = PostgresDestination

    dsn: str = _mirror(PostgresDestination, "dsn")
    password: str | None = Field(
        None, repr=False, description='The password; set it with dg.EnvVar("PGPASSWORD"). Unset: libpq\'s own.'
    )
    uint64: Literal["numeric", "bigint"] = _mirror(PostgresDestination, "uint64")
    pool_size: int = _mirror(PostgresDestination, "pool_size")


class RedisResource(DestinationResource):
    """Redis: rows as hashes (one per row, keyed by the key columns) or stream entries, under ``prefix``.

    .. code-block:: python

        import dagster as dg
        import pyarrow as pa
        from amp_dagster import AmpIOManager, RedisResource

        @dg.asset(metadata={"key": ["_block_num"]})
        def blocks() -> pa.Table:
            return pa.table({"_block_num": pa.array([1, 2], pa.uint64()), "hash": ["0xa1", "0xb2"]})

        redis = RedisResource(url="redis://127.0.0.1:6379/0", prefix="eth")  # password=dg.EnvVar("REDIS_PASSWORD")
        dg.materialize([blocks], resources={"io_manager": AmpIOManager(destination=redis)})
    """

    model: ClassVar[type[BaseModel]] = RedisDestination

    url: str = _mirror(RedisDestination, "url")
    password: str | None = Field(
        None, repr=False, description='The password; set it with dg.EnvVar("REDIS_PASSWORD"). Unset: none.'
    )
    prefix: str = _mirror(RedisDestination, "prefix")
    form: Literal["hash", "stream"] = _mirror(RedisDestination, "form")
    ttl: int | None = _mirror(RedisDestination, "ttl")


class ClickHouseResource(DestinationResource):
    """ClickHouse, on a server over HTTP (``http://host:8123/db``) or in-process through chdb (``chdb:///path``).

    .. code-block:: python

        import dagster as dg
        import pyarrow as pa
        from amp_dagster import AmpIOManager, ClickHouseResource

        @dg.asset
        def blocks() -> pa.Table:
            return pa.table({"_block_num": pa.array([1, 2], pa.uint64()), "hash": ["0xa1", "0xb2"]})

        clickhouse = ClickHouseResource(dsn="chdb:///tmp/amp_chdb")  # password=dg.EnvVar("CLICKHOUSE_PASSWORD")
        dg.materialize([blocks], resources={"io_manager": AmpIOManager(destination=clickhouse)})
    """

    model: ClassVar[type[BaseModel]] = ClickHouseDestination

    dsn: str = _mirror(ClickHouseDestination, "dsn")
    password: str | None = Field(
        None,
        repr=False,
        description='The password; set it with dg.EnvVar("CLICKHOUSE_PASSWORD"). Unset: the CLICKHOUSE_PASSWORD '
        "environment variable if it exists.",
    )
    insert_rows: int = _mirror(ClickHouseDestination, "insert_rows")


class DeltaResource(DestinationResource):
    """Delta Lake: one table per directory under ``path``.

    .. code-block:: python

        import dagster as dg
        import pyarrow as pa
        from amp_dagster import AmpIOManager, DeltaResource

        @dg.asset(key=["eth", "blocks"])
        def blocks() -> pa.Table:
            return pa.table({"_block_num": pa.array([1, 2], pa.uint64()), "hash": ["0xa1", "0xb2"]})

        lake = DeltaResource(path="lake")
        dg.materialize([blocks], resources={"io_manager": AmpIOManager(destination=lake)})  # lake/eth/blocks
    """

    model: ClassVar[type[BaseModel]] = DeltaDestination

    path: str = _mirror(DeltaDestination, "path")
    vacuum_every: int = _mirror(DeltaDestination, "vacuum_every")
    retention_hours: int = _mirror(DeltaDestination, "retention_hours")
    compact_files: int = _mirror(DeltaDestination, "compact_files")


class IcebergResource(DestinationResource):
    """Iceberg: tables in a local warehouse, with a SQL catalog (sqlite in the warehouse unless ``catalog_uri``
    names another one, e.g. PostgreSQL).

    .. code-block:: python

        import dagster as dg
        import pyarrow as pa
        from amp_dagster import AmpIOManager, IcebergResource

        @dg.asset(key=["eth", "blocks"])
        def blocks() -> pa.Table:
            return pa.table({"_block_num": pa.array([1, 2], pa.uint64()), "hash": ["0xa1", "0xb2"]})

        warehouse = IcebergResource(warehouse="warehouse")  # catalog_uri=dg.EnvVar("ICEBERG_CATALOG_URI")
        dg.materialize([blocks], resources={"io_manager": AmpIOManager(destination=warehouse)})  # eth.blocks
    """

    model: ClassVar[type[BaseModel]] = IcebergDestination

    warehouse: str = _mirror(IcebergDestination, "warehouse")
    catalog_uri: str | None = Field(
        None,
        repr=False,
        description='SQL catalog URI, which may hold a password; set it with dg.EnvVar("ICEBERG_CATALOG_URI"). '
        "Unset: sqlite in the warehouse.",
    )
    catalog: str = _mirror(IcebergDestination, "catalog")


class LmdbResource(DestinationResource):
    """LMDB: an environment in the directory ``path``, rows ordered by their key.

    .. code-block:: python

        import dagster as dg
        import pyarrow as pa
        from amp_dagster import AmpIOManager, LmdbResource

        @dg.asset(metadata={"key": ["_block_num"]})
        def blocks() -> pa.Table:
            return pa.table({"_block_num": pa.array([1, 2], pa.uint64()), "hash": ["0xa1", "0xb2"]})

        dg.materialize([blocks], resources={"io_manager": AmpIOManager(destination=LmdbResource(path="kv"))})
    """

    model: ClassVar[type[BaseModel]] = LmdbDestination

    path: str = _mirror(LmdbDestination, "path")
    map_size: int = _mirror(LmdbDestination, "map_size")


_RESOURCES: dict[type[BaseModel], type[DestinationResource]] = {
    r.model: r
    for r in (PostgresResource, RedisResource, ClickHouseResource, DeltaResource, IcebergResource, LmdbResource)
}
