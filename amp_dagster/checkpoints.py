"""Checkpoints in Dagster's run storage: the sync engine's CheckpointStore over the instance's key/value table.

This is the one module that touches Dagster internals (``instance.run_storage`` and its ``kvs`` table are not
public). What it designs around (DAGSTER_NOTES §1):

- no compare-and-set, no transaction, no delete in the public API: every key has exactly one writer, held by
  :meth:`DagsterCheckpoints.lock` for the whole sync (a PostgreSQL advisory lock on a PostgreSQL-backed instance,
  a file lock beside a SQLite one; both die with the process, so a killed sync never blocks the next);
- on SQLite a ``set_cursor_values`` call that mixes an existing and a new key silently drops the new key: values
  are written one key per call;
- listing keys by prefix (explicit range records) and deleting them (``checkpoints reset``) go through the same
  SQL table the public methods use.

The checkpoints are the same values ``amp-dagster checkpoints show`` prints and the Dagster UI shows in
materialization metadata.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError
from .state import KEY_PREFIX, SyncState, already_syncing, live_key

if TYPE_CHECKING:
    from dagster import DagsterInstance

_process_locks: dict[str, threading.Lock] = {}
_process_guard = threading.Lock()


class DagsterCheckpoints:
    """A :class:`~amp_dagster.sync.CheckpointStore` over a Dagster instance's run storage.

    >>> from dagster import DagsterInstance                                           # doctest: +SKIP
    >>> store = DagsterCheckpoints(DagsterInstance.get())                             # doctest: +SKIP
    >>> sync(source, loader, table, store, "stream")                                  # doctest: +SKIP
    """

    def __init__(self, instance: DagsterInstance) -> None:
        self.instance = instance
        self._storage = instance.run_storage

    @classmethod
    def from_environment(cls) -> DagsterCheckpoints:
        """The instance under ``DAGSTER_HOME``: the one ``dagster dev`` and the daemon use."""
        from dagster import DagsterInstance

        if not os.environ.get("DAGSTER_HOME"):
            raise ConfigError(
                "DAGSTER_HOME is not set: checkpoints live in a Dagster instance's run storage. Set DAGSTER_HOME to "
                "the instance directory your Dagster webserver and daemon use (or pass --dagster-home)."
            )
        return cls(DagsterInstance.get())

    # -- the CheckpointStore protocol --------------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        return self._storage.get_cursor_values({key}).get(key)

    def put(self, key: str, value: str) -> None:
        self._storage.set_cursor_values({key: value})  # one key per call: see the module docstring

    def scan(self, prefix: str) -> dict[str, str]:
        from dagster._core.storage.runs.schema import KeyValueStoreTable

        table = KeyValueStoreTable
        query = table.select().with_only_columns(table.c.key, table.c.value)
        with self._storage.connect() as conn:
            rows = conn.execute(query.where(table.c.key.startswith(prefix, autoescape=True))).fetchall()
        return {key: value for key, value in rows}

    @contextmanager
    def lock(self, key: str, wait: float) -> Iterator[None]:
        """Hold ``key``'s single-writer lock; a second holder waits up to ``wait`` seconds, then fails clearly."""
        dialect = self._dialect()
        if dialect == "postgresql":
            with self._pg_lock(key, wait):
                yield
        elif dialect == "sqlite" and self._sqlite_dir() is not None:
            with self._file_lock(key, wait):
                yield
        else:  # an in-memory instance lives in this process only
            with _process_lock(key, wait):
                yield

    # -- what the CLI and the UI show ---------------------------------------------------------------------------

    def pipelines(self) -> dict[str, SyncState]:
        """The live checkpoint of every pipeline in this instance, by pipeline id."""
        found = {}
        for key, value in sorted(self.scan(KEY_PREFIX).items()):
            pipeline = key.removeprefix(KEY_PREFIX)
            if "/range/" not in pipeline:
                found[pipeline] = SyncState.from_json(value)
        return found

    def reset(self, pipeline: str) -> int:
        """Forget a pipeline's checkpoint and range records; the next sync starts from the beginning (and
        replaces what it loads). Returns how many keys were removed. Refused while a sync holds the lock."""
        from dagster._core.storage.runs.schema import KeyValueStoreTable

        table, key = KeyValueStoreTable, live_key(pipeline)
        with self.lock(key, wait=0):
            condition = (table.c.key == key) | table.c.key.startswith(key + "/", autoescape=True)
            with self._storage.connect() as conn:
                return conn.execute(table.delete().where(condition)).rowcount

    # -- locks --------------------------------------------------------------------------------------------------

    def _dialect(self) -> str:
        with self._storage.connect() as conn:
            return conn.dialect.name

    def _sqlite_dir(self) -> Path | None:
        conn_string = getattr(self._storage, "_conn_string", "") or ""
        path = conn_string.removeprefix("sqlite:///")
        return Path(path).parent if path and path != conn_string and ":memory:" not in path else None

    @contextmanager
    def _file_lock(self, key: str, wait: float) -> Iterator[None]:
        directory = self._sqlite_dir() / "amp_dagster_locks"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
        with open(path, "a+") as handle:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        handle.seek(0)
                        raise already_syncing(key, wait, handle.read().strip()) from None
                    time.sleep(0.1)
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _pg_lock(self, key: str, wait: float) -> Iterator[None]:
        import sqlalchemy as db

        ident = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        # a session lock on a connection held for the whole sync: it dies with the process, so a killed sync
        # never blocks the next one
        with self._storage.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")  # no transaction held open for hours
            deadline = time.monotonic() + wait
            while not conn.execute(db.text("SELECT pg_try_advisory_lock(:k)"), {"k": ident}).scalar():
                if time.monotonic() >= deadline:
                    raise already_syncing(key, wait, "another process (a PostgreSQL advisory lock is held)")
                time.sleep(0.1)
            try:
                yield
            finally:
                conn.execute(db.text("SELECT pg_advisory_unlock(:k)"), {"k": ident})


@contextmanager
def _process_lock(key: str, wait: float) -> Iterator[None]:
    with _process_guard:
        lock = _process_locks.setdefault(key, threading.Lock())
    if not lock.acquire(timeout=max(wait, 0.001)):
        raise already_syncing(key, wait, "another thread of this process")
    try:
        yield
    finally:
        lock.release()
