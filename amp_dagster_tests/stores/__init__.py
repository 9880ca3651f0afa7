"""Per-destination harnesses for the loader contract suite: how to get an isolated loader and read data back."""

from __future__ import annotations

import importlib
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

import pyarrow as pa

from amp_dagster.loaders.base import Loader, TableRef

# destination name → "module:Class"; one module per destination, imported lazily so that one broken driver
# only fails its own tests
HARNESSES = {
    "postgres": "amp_dagster_tests.stores.postgres:PostgresHarness",
    "redis": "amp_dagster_tests.stores.redis:RedisHarness",
    "clickhouse": "amp_dagster_tests.stores.clickhouse:ClickHouseHarness",
    "delta": "amp_dagster_tests.stores.delta:DeltaHarness",
    "iceberg": "amp_dagster_tests.stores.iceberg:IcebergHarness",
    "lmdb": "amp_dagster_tests.stores.lmdb:LmdbHarness",
    "memory": "amp_dagster_tests.stores.memory:MemoryHarness",  # the engine tests' double, same contract
}


class Harness(ABC):
    """Gives each test its own corner of a real store, and reads rows back from it.

    Subclasses set the class attributes and implement ``loader`` and ``unreachable_loader``; they clean up
    what the test wrote in ``cleanup``.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.namespace = f"amp_t_{uuid.uuid4().hex[:10]}"
        self._loaders: list[Loader] = []

    def table(self, name: str = "events", **kw) -> TableRef:
        return TableRef(name, namespace=kw.pop("namespace", self.namespace), **kw)

    def loader(self, **options) -> Loader:
        loader = self.make_loader(**options)
        self._loaders.append(loader)
        return loader

    @abstractmethod
    def make_loader(self, **options) -> Loader:
        """A loader on the real service, writing somewhere only this test uses."""

    @abstractmethod
    def unreachable_loader(self, port: int) -> Loader | None:
        """A loader for a service that does not answer (127.0.0.1 and the given closed port), with a password set
        to ``"s3cret-pw"`` where the store takes one, and fast retries. None if the store has no service."""

    def read_back(self, loader: Loader, table: TableRef) -> pa.Table:
        """Every row of the table as one Arrow table. Overridden where an independent reader exists."""
        return loader.read(table).read_all()

    def cleanup(self) -> None:
        for loader in self._loaders:
            loader.close()


def load(name: str) -> type[Harness]:
    module, _, cls = HARNESSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
