"""The Dagster resources: destination resources mirror the pipeline config's models, secrets come through EnvVar and
stay out of repr, an explicit secret wins over an env var name, AmpResource configures the client (token, timeout,
retries) against a dev server, and the docstring examples run."""

import inspect
import re
import socket
import textwrap
import time

import dagster as dg
import pyarrow as pa
import pytest

from amp_dagster import io_managers, resources
from amp_dagster.errors import AuthenticationError, ConfigError, ServiceUnavailableError
from amp_dagster.loaders.base import TableRef
from amp_dagster.pipelines import (
    ClickHouseDestination,
    DeltaDestination,
    IcebergDestination,
    LmdbDestination,
    PostgresDestination,
    RedisDestination,
)
from amp_dagster.resources import (
    AmpResource,
    ClickHouseResource,
    DeltaResource,
    DestinationResource,
    IcebergResource,
    LmdbResource,
    PostgresResource,
    RedisResource,
)

from .services import closed_port

MODELS = {
    PostgresResource: PostgresDestination(kind="postgres", dsn="postgresql://amp@db:5432/chain", password_env="PGPW"),
    RedisResource: RedisDestination(kind="redis", url="redis://cache:6379/1", password_env="RPW", prefix="eth", ttl=60),
    ClickHouseResource: ClickHouseDestination(kind="clickhouse", dsn="http://ch:8123/eth", insert_rows=1000),
    DeltaResource: DeltaDestination(kind="delta", path="/data/lake"),
    IcebergResource: IcebergDestination(kind="iceberg", warehouse="/data/wh", catalog_uri_env="CATALOG", catalog="c"),
    LmdbResource: LmdbDestination(kind="lmdb", path="/data/kv", map_size=2**30),
}


@pytest.mark.parametrize("resource", list(MODELS), ids=lambda r: r.__name__)
def test_each_destination_resource_mirrors_its_model(resource):
    model = resource.model
    secret = model.secret_env
    want = [n for n in model.model_fields if n != "kind"]
    have = [f"{n}_env" if secret and f"{n}_env" == secret else n for n in resource.model_fields]
    assert have == want, "the same fields, in the same order; the secret without _env"
    for name, field in resource.model_fields.items():
        assert field.description, f"{resource.__name__}.{name} has a description"
        if name in model.model_fields:
            assert field.description == model.model_fields[name].description
            assert field.default == model.model_fields[name].default


@pytest.mark.parametrize("resource", list(MODELS), ids=lambda r: r.__name__)
def test_from_destination_builds_the_resource_with_the_secret_as_an_env_var(resource):
    model = MODELS[resource]
    built = DestinationResource.from_destination(model)
    assert type(built) is resource and resource.from_destination(model) == built
    assert built.destination() == model.model_copy(update={model.secret_env: None} if model.secret_env else {})
    assert built.location() == model.location()
    if model.secret_env:
        secret, env = getattr(built, model.secret_env.removesuffix("_env")), getattr(model, model.secret_env)
        assert (secret.env_var_name if isinstance(secret, dg.EnvVar) else secret) == env


def test_from_destination_refuses_another_kind_of_destination():
    with pytest.raises(ConfigError, match=r"PostgresResource.from_destination needs PostgresDestination, got Delta"):
        PostgresResource.from_destination(MODELS[DeltaResource])
    with pytest.raises(ConfigError, match="needs a destination model, got str"):
        DestinationResource.from_destination("postgres")  # type: ignore[arg-type]


def test_secrets_stay_out_of_repr():
    shown = " ".join(
        repr(r)
        for r in (
            PostgresResource(dsn="postgresql://db/x", password="pg-s3cret"),
            RedisResource(password="redis-s3cret"),
            ClickHouseResource(dsn="http://ch:8123", password="ch-s3cret"),
            IcebergResource(warehouse="w", catalog_uri="postgresql://u:ice-s3cret@db/c"),
            AmpResource(token="amp-s3cret"),
            io_managers.AmpIOManager(destination=PostgresResource(dsn="x", password="io-s3cret")),
        )
    )
    assert "s3cret" not in shown and "dsn='postgresql://db/x'" in shown


def test_an_explicit_secret_wins_over_the_env_var_name(tmp_path, monkeypatch):
    monkeypatch.delenv("AMP_TEST_CATALOG", raising=False)
    model = IcebergDestination(kind="iceberg", warehouse=str(tmp_path / "wh"), catalog_uri_env="AMP_TEST_CATALOG")
    with pytest.raises(ConfigError, match="environment variable AMP_TEST_CATALOG, which is not set"):
        model.build()
    uri = f"sqlite:///{tmp_path / 'explicit.db'}"
    with model.build(secret=uri) as loader:
        loader.ensure_table(TableRef("t", namespace="n"), pa.schema([("_block_num", pa.uint64())]))
    assert (tmp_path / "explicit.db").exists(), "the catalog is the one given, not the variable's"


def test_an_env_var_secret_is_read_when_the_loader_is_built_outside_a_run(tmp_path, monkeypatch):
    resource = IcebergResource(warehouse=str(tmp_path / "wh"), catalog_uri=dg.EnvVar("AMP_TEST_CATALOG"))
    monkeypatch.delenv("AMP_TEST_CATALOG", raising=False)
    with pytest.raises(ConfigError, match=r"IcebergResource.catalog_uri is read from the environment variable AMP_TE"):
        resource.loader()
    monkeypatch.setenv("AMP_TEST_CATALOG", f"sqlite:///{tmp_path / 'from_env.db'}")
    with resource.loader() as loader:
        loader.ensure_table(TableRef("t", namespace="n"), pa.schema([("_block_num", pa.uint64())]))
    assert (tmp_path / "from_env.db").exists()


def test_an_invalid_value_names_the_resource_and_the_field():
    with pytest.raises(Exception, match="dsn"):
        PostgresResource()  # the one required field is missing
    with pytest.raises(Exception, match=r"ttl\n  Input should be greater than 0"):
        RedisResource(ttl=0)


# -- amp ---------------------------------------------------------------------------------------------------------


def test_amp_resource_configures_the_client():
    amp = AmpResource(url="grpc://amp:1602", token="t", timeout=2.5, retry_attempts=2, stream_retry_attempts=3)
    with amp.client() as client:
        settings = client.url, client.timeout, client.query_retry.attempts, client.stream_retry.attempts
        assert settings == ("grpc://amp:1602", 2.5, 2, 3)
        assert client.query_retry.max_delay == amp.retry_max_delay
        assert repr(client) == "AmpClient(url='grpc://amp:1602', token=***)"


def test_amp_resource_in_a_run_reads_its_token_from_the_environment(devserver, monkeypatch):
    server = devserver(blocks=20, token="tok-123")
    got = {}

    @dg.asset
    def recent(amp: AmpResource) -> None:
        with amp.client() as client:
            got["rows"] = client.query("SELECT _block_num FROM eth_rpc.blocks").reader.read_all().num_rows

    monkeypatch.setenv("AMP_TEST_TOKEN", "tok-123")
    amp = AmpResource(url=server.url, token=dg.EnvVar("AMP_TEST_TOKEN"))
    assert dg.materialize([recent], resources={"amp": amp}).success and got["rows"] == 20
    monkeypatch.setenv("AMP_TEST_TOKEN", "wrong")
    with pytest.raises(AuthenticationError, match="rejected the credentials") as error:
        dg.materialize([recent], resources={"amp": amp})
    assert "wrong" not in str(error.value)


def test_an_unreachable_amp_fails_with_a_typed_error_naming_the_host():
    port = closed_port()
    amp = AmpResource(url=f"grpc://127.0.0.1:{port}", retry_attempts=2, retry_initial_delay=0.01)
    with pytest.raises(ServiceUnavailableError, match=f"amp at grpc://127.0.0.1:{port} is unavailable"):
        amp.client().query("SELECT 1")


def test_a_silent_amp_times_out_instead_of_hanging():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"grpc://127.0.0.1:{silent.getsockname()[1]}"
        amp = AmpResource(url=url, timeout=0.5, retry_attempts=2, retry_initial_delay=0.01)
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match=f"amp at {url} is unavailable: Deadline Exceeded"):
            amp.client().query("SELECT 1")
    assert time.monotonic() - started < 5


# -- the docstring examples run ------------------------------------------------------------------------------------


def _examples(cls) -> str:
    (code,) = re.findall(r"\.\. code-block:: python\n\n(.*?)(?:\n\s*\n(?=\S)|\Z)", inspect.getdoc(cls), re.S)
    return textwrap.dedent(code)


@pytest.mark.parametrize(
    "cls",
    [DestinationResource, DeltaResource, IcebergResource, LmdbResource, io_managers.AmpIOManager],
    ids=lambda c: c.__name__,
)
def test_docstring_examples_run(cls, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_examples(cls), f"<{cls.__name__} docstring>", "exec"), {})
    assert any(tmp_path.iterdir()), "the example wrote its store under the working directory"


def test_every_public_class_has_an_example():
    for cls in (AmpResource, *MODELS, DestinationResource, io_managers.AmpIOManager):
        assert ".. code-block:: python" in inspect.getdoc(cls), cls.__name__
    assert resources.__doc__ and io_managers.__doc__
