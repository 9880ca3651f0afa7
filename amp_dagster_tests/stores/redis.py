"""Redis harness: each test writes under its own key prefix on the local server, removed by SCAN + UNLINK."""

from __future__ import annotations

import redis

from amp_dagster.loaders.redis import RedisLoader
from amp_dagster.retry import RetryPolicy

from ..services import REDIS_URL
from . import Harness


class RedisHarness(Harness):
    def make_loader(self, **options) -> RedisLoader:
        return RedisLoader(REDIS_URL, prefix=self.namespace, **options)

    def unreachable_loader(self, port: int) -> RedisLoader:
        return RedisLoader(
            f"redis://:s3cret-pw@127.0.0.1:{port}/0",
            prefix=self.namespace,
            connect_timeout=2,
            retry=RetryPolicy(attempts=2, initial_delay=0.01),
        )

    def keys(self) -> list[bytes]:
        """Every key this test wrote (the prefix is unique to the test and has no glob characters)."""
        with redis.Redis.from_url(REDIS_URL) as client:
            return list(client.scan_iter(match=f"{self.namespace}:*", count=1000))

    def cleanup(self) -> None:
        super().cleanup()
        keys = self.keys()
        with redis.Redis.from_url(REDIS_URL) as client:
            for start in range(0, len(keys), 1000):
                client.unlink(*keys[start : start + 1000])
