"""Dagster instances for tests: SQLite under a temporary DAGSTER_HOME, or PostgreSQL (dagster-postgres) in a
database of its own on the local server, dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from .services import POSTGRES_DSN, require_postgres


@contextlib.contextmanager
def sqlite_instance(home: Path) -> Iterator:
    import dagster as dg

    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        yield instance


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local server; its URL (psycopg 3 dialect for SQLAlchemy)."""
    require_postgres()
    name = f"amp_dagster_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(POSTGRES_DSN)
    host, port = info.get("host", "127.0.0.1"), info.get("port", 5432)
    user = info.get("user") or os.environ.get("PGUSER", "postgres")
    try:
        # dagster-postgres speaks psycopg2 (with psycopg 3, SQLAlchemy 2.1 breaks its NOTIFY): DAGSTER_NOTES §1
        yield f"postgresql+psycopg2://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def postgres_yaml(url: str) -> str:
    """dagster.yaml storage for a PostgreSQL-backed instance at ``url``."""
    return f'storage:\n  postgres:\n    postgres_url: "{url}"\ntelemetry:\n  enabled: false\n'


@contextlib.contextmanager
def postgres_instance(home: Path) -> Iterator:
    import dagster as dg

    with postgres_database() as url:
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text(postgres_yaml(url))
        with dg.instance_for_test(temp_dir=str(home), overrides={"storage": {"postgres": {"postgres_url": url}}}) as i:
            yield i
