"""Pipeline destination configs pointing at each test harness's isolated corner of a real store."""

from __future__ import annotations

from . import services

STORES = ("clickhouse", "delta", "iceberg", "lmdb", "postgres", "redis")


def destination(name: str, harness, *, own_process: bool = False) -> dict:
    """The ``destination:`` of a pipeline writing where ``harness`` cleans up. chdb opens one engine path per
    process: in this process ClickHouse uses the harnesses' shared path; ``own_process`` gives a path of its own
    for syncs run in another process."""
    from .stores.clickhouse import CHDB_DSN

    root = harness.tmp_path
    return {
        "postgres": {"kind": "postgres", "dsn": services.POSTGRES_DSN},
        "redis": {"kind": "redis", "url": services.REDIS_URL, "prefix": harness.namespace},
        "clickhouse": {"kind": "clickhouse", "dsn": f"chdb://{root / 'chdb'}" if own_process else CHDB_DSN},
        "delta": {"kind": "delta", "path": str(root / "delta")},
        "iceberg": {"kind": "iceberg", "warehouse": str(root / "iceberg")},
        "lmdb": {"kind": "lmdb", "path": str(root / "lmdb")},
    }[name]


def require(name: str) -> None:
    if name == "postgres":
        services.require_postgres()
    if name == "redis":
        services.require_redis()
