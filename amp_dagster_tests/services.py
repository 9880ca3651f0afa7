"""Where the tests find the local services, and loud failures when one does not answer."""

from __future__ import annotations

import os
import socket

POSTGRES_DSN = os.environ.get("AMP_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AMP_TEST_REDIS", "redis://127.0.0.1:6379/0")


def closed_port() -> int:
    """A loopback TCP port with nothing listening on it (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_postgres() -> None:
    import psycopg

    try:
        with psycopg.connect(POSTGRES_DSN, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"PostgreSQL does not answer at {POSTGRES_DSN} ({exc}). Start it with `make services` "
            "(infra/services.sh) or set AMP_TEST_POSTGRES."
        ) from None


def require_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        raise RuntimeError(
            f"Redis does not answer at {REDIS_URL} ({exc}). Start it with `make services` "
            "(infra/services.sh) or set AMP_TEST_REDIS."
        ) from None
