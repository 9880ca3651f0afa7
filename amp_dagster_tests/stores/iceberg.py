"""Iceberg harness: each test gets a sqlite SQL catalog and a warehouse under its own tmp_path."""

from __future__ import annotations

from amp_dagster.loaders.iceberg import IcebergLoader
from amp_dagster.retry import RetryPolicy

from . import Harness


class IcebergHarness(Harness):
    def make_loader(self, **options) -> IcebergLoader:
        return IcebergLoader(self.tmp_path / "warehouse", **options)

    def unreachable_loader(self, port: int) -> IcebergLoader:
        # the PostgreSQL-backed catalog is the Iceberg setup with a service that can be down
        return IcebergLoader(
            self.tmp_path / "unreachable",
            uri=f"postgresql+psycopg://amp:s3cret-pw@127.0.0.1:{port}/test",
            retry=RetryPolicy(attempts=2, initial_delay=0.01),
        )
