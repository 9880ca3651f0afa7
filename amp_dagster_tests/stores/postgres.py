"""PostgreSQL harness: each test gets its own schema in the local server's ``test`` database."""

from __future__ import annotations

import psycopg
from psycopg import sql

from amp_dagster.loaders.postgres import PostgresLoader
from amp_dagster.retry import RetryPolicy

from ..services import POSTGRES_DSN
from . import Harness


class PostgresHarness(Harness):
    def make_loader(self, **options) -> PostgresLoader:
        return PostgresLoader(POSTGRES_DSN, **options)

    def unreachable_loader(self, port: int) -> PostgresLoader:
        return PostgresLoader(
            f"postgresql://amp:s3cret-pw@127.0.0.1:{port}/test",
            connect_timeout=2,
            retry=RetryPolicy(attempts=2, initial_delay=0.01),
        )

    def cleanup(self) -> None:
        super().cleanup()
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.namespace)))
