"""LMDB harness: each test gets its own environment directory under pytest's tmp_path."""

from __future__ import annotations

from amp_dagster.loaders.lmdb import LmdbLoader

from . import Harness


class LmdbHarness(Harness):
    def make_loader(self, **options) -> LmdbLoader:
        return LmdbLoader(self.tmp_path / "lmdb", **options)

    def unreachable_loader(self, port: int) -> None:
        return None  # embedded: there is no service to be down (unusable paths are tested in test_lmdb.py)
