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
    """A block every 0.1 s and random reorgs up to depth 8 (to shorter and longer chains), until stopped."""

    def __init__(self, server, seed: int) -> None:
        super().__init__(daemon=True)
        self.server, self.rng, self.halt, self.reorgs = server, random.Random(seed), threading.Event(), 0

    def run(self) -> None:
        while not self.halt.wait(0.1):
            self.server.advance(1)
            if self.rng.random() < 0.15:  # a fork up to 8 deep, to a shorter, equal or longer chain
                depth = self.rng.randint(1, 8)
                self.server.reorg(depth, length=self.rng.randint(0, 2 * depth))
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


class Syncer:
    """One `amp-dagster sync` process streaming several pipelines (stores and queries) side by side, killed and
    restarted again and again."""

    def __init__(self, targets: list[tuple[str, str]], tmp_path: Path, server) -> None:
        self.targets = targets
        self.harnesses = {}
        lines = ["pipelines:"]
        for name, query in targets:
            pipeline = f"{name}_{'dense' if query == DENSE else 'sparse'}"
            root = tmp_path / pipeline
            root.mkdir()
            harness = self.harnesses[pipeline] = load(name)(root)
            lines += [
                f"  - name: {pipeline}",
                f'    source: {{sql: "{query}", url: "{server.url}"}}',
                f"    destination: {_destination(name, harness)}",
                f"    namespace: {harness.namespace}",
                "    table: logs",
                "    mode: stream",
                "    flush: {seconds: 0.2}",
            ]
        home = tmp_path / "home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        self.spec = tmp_path / "pipelines.yaml"
        self.spec.write_text("\n".join(lines) + "\n")
        self.env = {**os.environ, "DAGSTER_HOME": str(home)}
        self.command = [sys.executable, "-m", "amp_dagster.cli", "sync", str(self.spec)]
        self.between = 0

    def kill_once(self, between: bool, pause: float) -> None:
        """Start the syncs and SIGKILL them: between a commit and its checkpoint, or ``pause`` s into syncing."""
        env = {**self.env, "AMP_DAGSTER_TEST_COMMIT_PAUSE": "0.3"} if between else self.env
        process = subprocess.Popen(self.command, env=env, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in process.stderr] + [lines.put(None)], daemon=True).start()
        seen: list[str] = []
        try:
            marker = "checkpoint amp_dagster" if between else "checkpoint="
            while True:
                try:
                    line = lines.get(timeout=120)
                except queue.Empty:
                    raise AssertionError(f"no {marker!r} within 120 s: {''.join(seen)[-2000:]}") from None
                assert line is not None, f"the sync exited before {marker!r}: {''.join(seen)[-2000:]}"
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

    def finish(self, head: int) -> None:
        done = subprocess.run([*self.command, "--until-block", str(head)], env=self.env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode in (0, -6, 134), done.stderr[-3000:]  # deltalake may abort at exit (STACK_NOTES)

    def verdicts(self, server, head: int) -> dict[str, dict]:
        """Each destination's rows, read in a fresh process (chdb opens one engine path per process), against
        the canonical chain."""
        import pyarrow as pa

        out = self.spec.parent / "rows"
        out.mkdir(exist_ok=True)
        script = (
            "import sys, pyarrow as pa\n"
            "from amp_dagster.pipelines import load_pipelines\n"
            f"for p in load_pipelines({str(self.spec)!r}).pipelines:\n"
            "    loader = p.destination.build()\n"
            "    rows = loader.read(p.table_ref()).read_all()\n"
            f"    with pa.OSFile(f'{out}/{{p.name}}.arrow', 'wb') as f, pa.ipc.new_file(f, rows.schema) as w:\n"
            "        w.write_table(rows)\n"
            "    loader.close()\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        found = {}
        for (name, query), (pipeline, harness) in zip(self.targets, self.harnesses.items(), strict=True):
            try:
                got = pa.ipc.open_file(pa.memory_map(str(out / f"{pipeline}.arrow"))).read_all()
            except (OSError, pa.ArrowInvalid):
                raise AssertionError(f"{name}: reading the destination failed: {done.stderr[-3000:]}") from None
            finally:
                harness.cleanup()
            found[pipeline] = exact(got, canonical(server, end=head, where=None if query == DENSE else _sparse))
        return found


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


def _kill_and_restart(groups: list[list[tuple[str, str]]], kills: int, tmp_path: Path, devserver, seed: int):
    """Each group of (store, query) pipelines is one sync process, killed ``kills`` times (every process at
    once, each round), then caught up; every destination must then equal the canonical result."""
    server = devserver(blocks=40, microbatch_blocks=16)
    syncers = []
    for i, group in enumerate(groups):
        (tmp_path / str(i)).mkdir()
        syncers.append(Syncer(group, tmp_path / str(i), server))
    chain, rng = Chain(server, seed), random.Random(seed)
    chain.start()
    try:
        for i in range(kills):
            between = i % 2 == 0  # every other kill lands between a commit and its checkpoint
            started = time.monotonic()
            _in_parallel([lambda s=s, b=between: s.kill_once(b, rng.uniform(0, 1.0)) for s in syncers])
            print(f"kill {i}: {time.monotonic() - started:.1f} s, chain head {server.chain.head}", flush=True)
    finally:
        chain.halt.set()
        chain.join()
    head = server.chain.head
    _in_parallel([lambda s=s: s.finish(head) for s in syncers])
    for syncer in syncers:
        assert syncer.between >= kills // 2
        for pipeline, verdict in syncer.verdicts(server, head).items():
            assert verdict["ok"], f"{pipeline}: {kills} kills, {chain.reorgs} reorgs: {verdict}"


@pytest.mark.timeout(1200)
def test_twenty_kills_dense_and_sparse_into_postgresql_and_delta_lake(tmp_path, devserver):
    services.require_postgres()
    groups = [[(name, DENSE), (name, SPARSE)] for name in ("postgres", "delta")]
    _kill_and_restart(groups, 20, tmp_path, devserver, seed=20)


@pytest.mark.timeout(600)
def test_five_kills_into_every_other_store(tmp_path, devserver):
    services.require_redis()
    _kill_and_restart([[(name, DENSE) for name in ("redis", "clickhouse", "iceberg", "lmdb")]], 5, tmp_path, devserver,
                      seed=5)  # fmt: skip
