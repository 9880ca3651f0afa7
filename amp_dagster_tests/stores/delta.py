"""Delta Lake harness: each test gets its own base directory under pytest's tmp_path."""

from __future__ import annotations

from amp_dagster.loaders.delta import DeltaLoader

from . import Harness


class DeltaHarness(Harness):
    def make_loader(self, **options) -> DeltaLoader:
        return DeltaLoader(self.tmp_path / "delta", **options)

    def unreachable_loader(self, port: int) -> None:
        return None  # a local directory has no service to be down; unwritable locations are tested in test_delta
