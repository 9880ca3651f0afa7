"""ClickHouse harness: one chdb engine directory per test process, one database per test.

chdb runs one engine path per process (a second path fails while the first has open clients), so every loader
of the test process shares ``CHDB_DSN``; tests are isolated by database instead. A module-level admin client keeps
the engine open between tests (reopening it costs ~0.2 s) and drops each test's databases afterwards.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import cache

from clickhouse_connect.driver.binding import escape_str

from amp_dagster.loaders.clickhouse import ClickHouseLoader
from amp_dagster.retry import RetryPolicy

from . import Harness

_DIR = os.environ.get("AMP_TEST_CHDB_DIR") or tempfile.mkdtemp(prefix="amp_chdb_")
if "AMP_TEST_CHDB_DIR" not in os.environ:
    atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
CHDB_DSN = f"chdb://{os.path.realpath(_DIR)}"


@cache
def admin():
    """A plain clickhouse-connect client on the test engine, independent of the loader under test."""
    import clickhouse_connect

    return clickhouse_connect.get_client(dsn=CHDB_DSN)


class ClickHouseHarness(Harness):
    def make_loader(self, **options) -> ClickHouseLoader:
        admin()  # open the engine before any loader, and keep it open
        return ClickHouseLoader(CHDB_DSN, **options)

    def unreachable_loader(self, port: int) -> ClickHouseLoader:
        # the HTTP client of clickhouse-connect, as for a real server: the code path chdb does not take
        return ClickHouseLoader(
            host="127.0.0.1",
            port=port,
            username="amp",
            password="s3cret-pw",
            connect_timeout=2,
            retry=RetryPolicy(attempts=2, initial_delay=0.01),
        )

    def cleanup(self) -> None:
        super().cleanup()
        client = admin()
        names = client.query(
            "SELECT name FROM system.databases WHERE startsWith(name, {ns:String})", parameters={"ns": self.namespace}
        ).result_rows
        for (name,) in names:
            client.command(f"DROP DATABASE IF EXISTS `{escape_str(name)}` SYNC")
