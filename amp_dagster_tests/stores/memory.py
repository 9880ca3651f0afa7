"""In-memory harness: the test double of amp_dagster_tests.fakes, held to the same contract as the real stores."""

from __future__ import annotations

from ..fakes import MemoryLoader
from . import Harness


class MemoryHarness(Harness):
    def make_loader(self, **options) -> MemoryLoader:
        return MemoryLoader(**options)

    def unreachable_loader(self, port: int) -> None:
        return None  # nothing to be down
