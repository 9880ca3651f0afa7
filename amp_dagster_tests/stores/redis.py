"""Redis harness: each test writes under its own key prefix on the local server, removed by SCAN + UNLINK.

It also runs writers in child processes, so that fault tests can kill or pause a real writer while it holds a
table's lock (``python -m amp_dagster_tests.stores.redis`` is the helper that forks them).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis

from amp_dagster.errors import TransientError
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.redis import RedisLoader
from amp_dagster.ranges import RowRange
from amp_dagster.retry import RetryPolicy

from ..services import REDIS_URL
from . import Harness

# rows that say who wrote them: every block of a written range gets ``per`` rows of one (writer, version)
VERSIONED = pa.schema(
    [
        ("_block_num", pa.uint64()),
        ("k", pa.uint32()),
        ("writer", pa.int32()),
        ("version", pa.int64()),
        ("pad", pa.binary()),
    ]
)
VERSIONED_KEY = ("_block_num", "k")


class RedisHarness(Harness):
    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path)
        self._writers: list[Writers] = []

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

    def writers(self, name: str) -> Writers:
        """Writers of the versioned table ``name`` in child processes; see :func:`run_writer`."""
        writers = Writers(url=REDIS_URL, prefix=self.namespace, name=name)
        self._writers.append(writers)
        return writers

    def cleanup(self) -> None:
        super().cleanup()
        for writers in self._writers:
            writers.close()
        keys = self.keys()
        with redis.Redis.from_url(REDIS_URL) as client:
            for start in range(0, len(keys), 1000):
                client.unlink(*keys[start : start + 1000])


def versioned(low: int, high: int, per: int, writer: int, version: int) -> pa.Table:
    """``per`` rows for each block of ``low..=high``, all written by ``writer`` as ``version``."""
    blocks = np.repeat(np.arange(low, high + 1, dtype=np.uint64), per)
    n = len(blocks)
    return pa.table(
        [
            blocks,
            np.tile(np.arange(per, dtype=np.uint32), high - low + 1),
            np.full(n, writer, np.int32),
            np.full(n, version, np.int64),
            pa.repeat(pa.scalar(b"p" * 64, pa.binary()), n),
        ],
        schema=VERSIONED,
    )


def writers_by_block(rows: pa.Table) -> pa.Table:
    """Per block: its row count and how many (writer, version) pairs its rows come from."""
    tagged = rows.append_column("tag", pc.add(pc.multiply(rows["writer"].cast(pa.int64()), 10**12), rows["version"]))
    by = tagged.group_by("_block_num").aggregate([("k", "count"), ("tag", "count_distinct"), ("tag", "min")])
    return by.sort_by("_block_num")


class Writers:
    """Writers in child processes, forked from one helper process that has imported everything once (a writer
    then starts in milliseconds, not in the seconds that importing pyarrow and pandas take). Events are the JSON
    lines the writers print, each tagged with the writer's ``pid``."""

    def __init__(self, **config) -> None:
        self._config = config
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "amp_dagster_tests.stores.redis"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict] = []
        self._unclaimed: list[dict] = []
        self._queue: queue.Queue = queue.Queue()
        self._running: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._helper.stdout:
            self._queue.put(json.loads(line))
        self._queue.put({"event": "helper exited", "pid": None})

    def start(self, **config) -> int:
        """Fork a writer running :func:`run_writer` with the harness's config and ``config``; its pid."""
        self._send({"op": "start", "config": {**self._config, **config}})
        pid = self.wait_for("started", None)["child"]
        self._running.add(pid)
        return pid

    def wait_for(self, event: str, pid: int | None, timeout: float = 30.0) -> dict:
        """The first event of that kind from that writer (or from the helper with ``pid=None``) not waited for yet."""
        for at, got in enumerate(self._unclaimed):
            if got["event"] == event and got["pid"] == pid:
                return self._unclaimed.pop(at)
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self._queue.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"writer {pid} reported no {event!r} within {timeout}s: {self.events}") from None
            self.events.append(got)
            if got["event"] == event and got["pid"] == pid:
                return got
            if (got["event"] == "exited" and got["child"] == pid) or got["event"] == "helper exited":
                raise AssertionError(f"writer {pid} exited before {event!r}: {self.events}")
            self._unclaimed.append(got)

    def of(self, pid: int) -> list[dict]:
        """Every event that writer reported so far."""
        while not self._queue.empty():
            got = self._queue.get_nowait()
            self.events.append(got)
            self._unclaimed.append(got)
        return [e for e in self.events if e["pid"] == pid]

    def signal(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    def kill(self, pid: int) -> None:
        """SIGKILL the writer and wait until it is gone."""
        os.kill(pid, signal.SIGKILL)
        assert self.reap(pid) == -signal.SIGKILL

    def reap(self, pid: int, timeout: float = 60.0) -> int:
        """Wait for the writer to exit; its exit code (minus the signal that killed it)."""
        self._send({"op": "reap", "child": pid})
        self._running.discard(pid)
        return self.wait_for("exited", None, timeout)["code"]

    def _send(self, message: dict) -> None:
        self._helper.stdin.write(json.dumps(message) + "\n")
        self._helper.stdin.flush()

    def close(self) -> None:
        """Kill the writers still running (a failed test may leave one looping or paused), then the helper."""
        for pid in list(self._running):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.reap(pid)
        self._helper.stdin.close()
        self._helper.wait(10)
        self._reader.join(10)
        self._helper.stdout.close()


def _say(event: dict) -> None:
    """One JSON line in one write: the writers and the helper share the pipe (print writes the newline apart)."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _helper() -> None:
    """The helper process: fork a writer per ``start`` line on stdin, reap one per ``reap`` line."""
    for line in sys.stdin:
        message = json.loads(line)
        if message["op"] == "start":
            child = os.fork()
            if child == 0:
                code = 0
                try:
                    run_writer(message["config"])
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            _say({"event": "started", "pid": None, "child": child})
        else:
            code = os.waitstatus_to_exitcode(os.waitpid(message["child"], 0)[1])
            _say({"event": "exited", "pid": None, "child": message["child"], "code": code})


def run_writer(config: dict) -> None:
    """Write versions ``version``, ``version + 1``, ... of ranges of the versioned table, reporting each as JSON.

    ``range`` ([low, high]) is written every time, or else a random range of ``span`` ([low, high]) of at least
    ``min_blocks`` blocks; ``per`` rows a block. Each write yields ``batches`` batches with ``pause`` seconds before
    each batch but the first, reporting ``holding`` when the first batch is taken (the table's lock is held by
    then), then ``done`` or ``lost`` (a transient error). ``replace`` false appends instead. It stops after
    ``writes`` writes or ``seconds`` seconds.
    """
    loader = RedisLoader(config["url"], prefix=config["prefix"], lock_wait=config.get("lock_wait", 60))
    table = TableRef(config["name"], namespace=config["prefix"], key=VERSIONED_KEY)
    writer, version, per = config.get("writer", 1), config.get("version", 1), config.get("per", 10)
    batches, pause = config.get("batches", 1), config.get("pause", 0.0)
    rng, deadline = random.Random(config.get("seed", 0)), time.monotonic() + config.get("seconds", 1e9)

    def emit(event: str, **fields) -> None:
        _say({"event": event, "pid": os.getpid(), **fields})

    def slow(rows: pa.Table, **fields) -> pa.RecordBatchReader:
        def gen():
            for n, batch in enumerate(rows.to_batches(max_chunksize=-(-rows.num_rows // batches))):
                if n:
                    time.sleep(pause)
                else:
                    emit("holding", **fields)
                yield batch

        return pa.RecordBatchReader.from_batches(rows.schema, gen())

    emit("ready")
    for i in range(config.get("writes", 10**9)):
        if time.monotonic() > deadline:
            break
        if "range" in config:
            low, high = config["range"]
        else:
            first, last = config["span"]
            low = rng.randint(first, last - config["min_blocks"] + 1)
            high = rng.randint(low + config["min_blocks"] - 1, last)
        fields = {"version": version + i, "low": low, "high": high}
        rows = slow(versioned(low, high, per, writer, version + i), **fields)
        try:
            loader.write(table, rows, replace=RowRange(low, high) if config.get("replace", True) else None)
        except TransientError as exc:
            emit("lost", error=str(exc), **fields)
        else:
            emit("done", **fields)
    loader.close()


if __name__ == "__main__":
    _helper()
