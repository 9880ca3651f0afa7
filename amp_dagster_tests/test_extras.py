"""Each destination's driver is an optional extra: without it, building the loader names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "postgres": ("psycopg", "PostgresLoader('postgresql://127.0.0.1/test')"),
    "redis": ("redis", "RedisLoader()"),
    "clickhouse": ("clickhouse_connect", "ClickHouseLoader(host='127.0.0.1')"),
    "chdb": ("chdb", "ClickHouseLoader('chdb:///tmp/amp_no_chdb')"),
    "delta": ("deltalake", "DeltaLoader('/tmp/amp_no_delta')"),
    "iceberg": ("pyiceberg", "IcebergLoader('/tmp/amp_no_iceberg')"),
    "lmdb": ("lmdb", "LmdbLoader('/tmp/amp_no_lmdb')"),
}


@pytest.mark.parametrize("extra", sorted(CASES))
def test_a_missing_driver_names_its_extra(extra):
    module, build = CASES[extra]
    script = (
        f"import sys; sys.modules[{module!r}] = None  # as if it were not installed\n"
        "import amp_dagster\n"
        "from amp_dagster.errors import MissingDriverError\n"
        "try:\n"
        f"    getattr(amp_dagster, {build.split('(')[0]!r}); amp_dagster.{build}\n"
        "except MissingDriverError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"pip install 'amp-dagster[{extra}]'" in out.stdout
    assert repr(module) in out.stdout
