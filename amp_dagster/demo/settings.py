"""The demo's settings, read from environment variables, and the template vars its ``defs.yaml`` renders.

- ``AMP_URL``: amp (or ``amp-dagster devserver``) to read from; default ``grpc://127.0.0.1:1602``;
- ``AMP_DEMO_DESTINATION``: ``embedded`` (the default: Delta Lake, Iceberg, and ClickHouse on chdb), ``postgres``
  or ``redis`` (every table there);
- ``AMP_DEMO_DIR``: directory of the embedded stores; default ``.demo``;
- ``AMP_DEMO_CLICKHOUSE_DSN``: where ``eth.transfers`` goes when embedded; default ``chdb://$AMP_DEMO_DIR/chdb``
  (``http://host:8123/db`` for a server);
- ``AMP_DEMO_POSTGRES_DSN``: PostgreSQL for ``postgres``; default ``postgresql://127.0.0.1:5432/postgres`` (a
  password comes from ``PGPASSWORD``, which libpq reads);
- ``AMP_DEMO_REDIS_URL``: Redis for ``redis``; default ``redis://127.0.0.1:6379/0`` (keys under ``amp_demo:``);
- ``AMP_DEMO_NAMESPACE``: the schema, database, Iceberg namespace or key prefix of the tables; default ``eth``;
- ``AMP_DEMO_START_BLOCK``: first block of the first block-range partition; default ``15000000``, where
  ``amp-dagster devserver --start-block 15000000`` starts.

Values are read when the code location loads (a relative ``AMP_DEMO_DIR`` against the current directory), never
contacting amp or a store.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from ..errors import ConfigError
from ..flight.client import DEFAULT_URL

DESTINATIONS = ("embedded", "postgres", "redis")
EMBEDDED_KINDS = ("delta", "iceberg", "clickhouse")


@dataclass(frozen=True)
class DemoSettings:
    amp_url: str
    destination: str
    directory: Path
    clickhouse_dsn: str | None
    postgres_dsn: str
    redis_url: str
    namespace: str
    start_block: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DemoSettings:
        destination = environ.get("AMP_DEMO_DESTINATION", "embedded").strip().lower() or "embedded"
        if destination not in DESTINATIONS:
            raise ConfigError(f"AMP_DEMO_DESTINATION={environ['AMP_DEMO_DESTINATION']!r} is not a demo destination: "
                              f"use {', '.join(DESTINATIONS)} (or unset it for embedded)")  # fmt: skip
        start = environ.get("AMP_DEMO_START_BLOCK") or "15000000"
        if not start.isdigit():
            raise ConfigError(f"AMP_DEMO_START_BLOCK={start!r} must be a block number such as 15000000")
        return cls(
            amp_url=environ.get("AMP_URL") or DEFAULT_URL,
            destination=destination,
            directory=Path(environ.get("AMP_DEMO_DIR") or ".demo").expanduser().absolute(),
            clickhouse_dsn=environ.get("AMP_DEMO_CLICKHOUSE_DSN") or None,
            postgres_dsn=environ.get("AMP_DEMO_POSTGRES_DSN") or "postgresql://127.0.0.1:5432/postgres",
            redis_url=environ.get("AMP_DEMO_REDIS_URL") or "redis://127.0.0.1:6379/0",
            namespace=environ.get("AMP_DEMO_NAMESPACE") or "eth",
            start_block=int(start),
        )

    def destination_for(self, embedded: str) -> dict[str, Any]:
        """The destination config of a pipeline that goes to the ``embedded`` store by default."""
        if embedded not in EMBEDDED_KINDS:
            raise ConfigError(f"destination({embedded!r}) in the demo's defs.yaml: use {', '.join(EMBEDDED_KINDS)}")
        if self.destination == "postgres":
            return {"kind": "postgres", "dsn": self.postgres_dsn}
        if self.destination == "redis":
            return {"kind": "redis", "url": self.redis_url, "prefix": "amp_demo"}
        if embedded == "delta":
            return {"kind": "delta", "path": str(self.directory / "delta")}
        if embedded == "iceberg":
            return {"kind": "iceberg", "warehouse": str(self.directory / "iceberg")}
        return {"kind": "clickhouse", "dsn": self.clickhouse_dsn or f"chdb://{self.directory / 'chdb'}"}


@dg.template_var
def amp_url() -> str:
    return DemoSettings.from_env().amp_url


@dg.template_var
def namespace() -> str:
    return DemoSettings.from_env().namespace


@dg.template_var
def start_block() -> int:
    return DemoSettings.from_env().start_block


@dg.template_var
def destination() -> Callable[[str], dict[str, Any]]:
    """``{{ destination('delta') }}``: that embedded store, or PostgreSQL / Redis when AMP_DEMO_DESTINATION says so."""
    return DemoSettings.from_env().destination_for
