"""Exactly once under SIGKILL: `amp-dagster sync` streams from a growing, forking chain and is killed with
SIGKILL at random moments (half of them between a commit and its checkpoint) and restarted; at the end the chain
stops, a last sync catches up, and the destination must equal the canonical result of the same query:
0 missing, 0 duplicated, 0 orphaned rows."""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from . import services
from .chaincheck import canonical, exact
from .stores import load

pytestmark = pytest.mark.slow

DENSE = "SELECT * FROM eth_rpc.logs"
SPARSE = "SELECT * FROM eth_rpc.logs WHERE log_index = 0 AND topic3 IS NOT NULL"


def _sparse(rows):
    import pyarrow.compute as pc

    return pc.and_(pc.equal(rows["log_index"], 0), rows["topic3"].is_valid())


class Chain(threading.Thread):
    """A block every 0.1 s and random reorgs up to depth 8, until stopped."""

    def __init__(self, server, seed: int) -> None:
        super().__init__(daemon=True)
        self.server, self.rng, self.halt, self.reorgs = server, random.Random(seed), threading.Event(), 0

    def run(self) -> None:
        while not self.halt.wait(0.1):
            self.server.advance(1)
            if self.rng.random() < 0.15:
                self.server.reorg(self.rng.randint(1, 8))
                self.reorgs += 1


def _destination(name: str, harness) -> str:
    if name == "postgres":
        return f'{{kind: postgres, dsn: "{services.POSTGRES_DSN}"}}'
    if name == "redis":
        return f'{{kind: redis, url: "{services.REDIS_URL}", prefix: {harness.namespace}}}'
    if name == "clickhouse":
        return f'{{kind: clickhouse, dsn: "chdb://{harness.tmp_path / "chdb"}"}}'
    if name == "delta":
        return f'{{kind: delta, path: "{harness.tmp_path / "delta"}"}}'
    if name == "iceberg":
        return f'{{kind: iceberg, warehouse: "{harness.tmp_path / "iceberg"}"}}'
    return f'{{kind: lmdb, path: "{harness.tmp_path / "lmdb"}"}}'


class Target:
    """One pipeline (a store and a query) synced by `amp-dagster sync` processes that keep being killed."""

    def __init__(self, name: str, query: str, tmp_path: Path, server) -> None:
        self.name, self.query = name, query
        root = tmp_path / f"{name}-{'dense' if query == DENSE else 'sparse'}"
        root.mkdir()
        self.harness = load(name)(root)
        home = root / "home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        spec = root / "pipelines.yaml"
        spec.write_text(
            "pipelines:\n"
            "  - name: chain\n"
            f'    source: {{sql: "{query}", url: "{server.url}"}}\n'
            f"    destination: {_destination(name, self.harness)}\n"
            f"    namespace: {self.harness.namespace}\n"
            "    table: logs\n"
            "    mode: stream\n"
            "    flush: {seconds: 0.2}\n"
        )
        self.env = {**os.environ, "DAGSTER_HOME": str(home)}
        self.command = [sys.executable, "-m", "amp_dagster.cli", "sync", str(spec), "chain"]
        self.between = 0

    def kill_once(self, between: bool, pause: float) -> None:
        """Start a sync and SIGKILL it: between a commit and its checkpoint, or ``pause`` s into syncing."""
        env = {**self.env, "AMP_DAGSTER_TEST_COMMIT_PAUSE": "0.3"} if between else self.env
        process = subprocess.Popen(self.command, env=env, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in process.stderr] + [lines.put(None)], daemon=True).start()
        seen: list[str] = []
        try:
            marker = "checkpoint amp_dagster" if between else "sync chain:"
            while True:
                try:
                    line = lines.get(timeout=120)
                except queue.Empty:
                    raise AssertionError(f"{self.name}: no {marker!r} within 120 s: {''.join(seen)[-2000:]}") from None
                assert line is not None, f"{self.name}: the sync exited before {marker!r}: {''.join(seen)[-2000:]}"
                seen.append(line)
                if marker in line:
                    break
            if between:
                self.between += 1
            else:
                time.sleep(pause)
        finally:
            process.kill()
            process.wait(30)

    def finish(self, head: int) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command, "--until-block", str(head)], env=self.env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    def verdict(self, server, head: int) -> dict:
        """The destination's rows, read in a fresh process (chdb opens one engine path per process), against the
        canonical chain."""
        import pyarrow as pa

        out = self.harness.tmp_path / "rows.arrow"
        script = (
            "import sys, yaml, pyarrow as pa\n"
            "from amp_dagster.pipelines import load_pipelines\n"
            f"p = load_pipelines({str(self.command[4])!r}).get('chain')\n"
            "loader = p.destination.build()\n"
            "rows = loader.read(p.table_ref()).read_all()\n"
            f"with pa.OSFile({str(out)!r}, 'wb') as f, pa.ipc.new_file(f, rows.schema) as w:\n"
            "    w.write_table(rows)\n"
            "loader.close()\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        try:
            got = pa.ipc.open_file(pa.memory_map(str(out))).read_all()
        except (OSError, pa.ArrowInvalid):
            raise AssertionError(f"{self.name}: reading the destination failed: {done.stderr[-3000:]}") from None
        finally:
            self.harness.cleanup()
        return exact(got, canonical(server, end=head, where=None if self.query == DENSE else _sparse))


def _in_parallel(calls) -> list:
    results, errors = [None] * len(calls), []

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _kill_and_restart(targets: list[tuple[str, str]], kills: int, tmp_path: Path, devserver, seed: int) -> None:
    """Every target's sync is killed ``kills`` times (all targets at once, each round), then caught up."""
    server = devserver(blocks=40, microbatch_blocks=16)
    running = [Target(name, query, tmp_path, server) for name, query in targets]
    chain, rng = Chain(server, seed), random.Random(seed)
    chain.start()
    try:
        for i in range(kills):
            between = i % 2 == 0  # every other kill lands between a commit and its checkpoint
            _in_parallel([lambda t=t, b=between: t.kill_once(b, rng.uniform(0, 1.0)) for t in running])
    finally:
        chain.halt.set()
        chain.join()
    head = server.chain.head
    for done in _in_parallel([lambda t=t: t.finish(head) for t in running]):
        assert done.returncode in (0, -6, 134), done.stderr[-3000:]  # deltalake may abort at exit (STACK_NOTES)
    for target in running:
        assert target.between >= kills // 2
        verdict = target.verdict(server, head)
        assert verdict["ok"], f"{target.name} {target.query!r}: {kills} kills, {chain.reorgs} reorgs: {verdict}"


def test_twenty_kills_dense_and_sparse_into_postgresql_and_delta_lake(tmp_path, devserver):
    services.require_postgres()
    targets = [(name, query) for name in ("postgres", "delta") for query in (DENSE, SPARSE)]
    _kill_and_restart(targets, 20, tmp_path, devserver, seed=20)


def test_five_kills_into_every_other_store(tmp_path, devserver):
    services.require_redis()
    targets = [(name, DENSE) for name in ("redis", "clickhouse", "iceberg", "lmdb")]
    _kill_and_restart(targets, 5, tmp_path, devserver, seed=5)
