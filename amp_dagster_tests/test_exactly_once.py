"""Exactly once under SIGKILL: `amp-dagster sync` streams from a growing, forking chain and is killed with
SIGKILL at random moments (half of them between a commit and its checkpoint) and restarted; at the end the chain
stops, a last sync catches up, and the destination must equal the canonical result of the same query:
0 missing, 0 duplicated, 0 orphaned rows."""

from __future__ import annotations

import os
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


def _loader(name: str, harness):
    from amp_dagster.pipelines import parse_pipelines

    spec = parse_pipelines(
        {
            "pipelines": [
                {
                    "name": "x",
                    "source": {"sql": "SELECT 1"},
                    "table": "t",
                    "destination": _yaml_to_dict(_destination(name, harness)),
                }
            ]
        }
    )
    return spec.pipelines[0].destination.build()


def _yaml_to_dict(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def _kill_and_restart(name: str, query: str, kills: int, tmp_path: Path, devserver, seed: int) -> None:
    harness = load(name)(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    server = devserver(blocks=40, microbatch_blocks=16)
    spec = tmp_path / "pipelines.yaml"
    spec.write_text(
        "pipelines:\n"
        "  - name: chain\n"
        f'    source: {{sql: "{query}", url: "{server.url}"}}\n'
        f"    destination: {_destination(name, harness)}\n"
        f"    namespace: {harness.namespace}\n"
        "    table: logs\n"
        "    mode: stream\n"
        "    flush: {seconds: 0.2}\n"
    )
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    command = [sys.executable, "-m", "amp_dagster.cli", "sync", str(spec), "chain"]
    chain = Chain(server, seed)
    chain.start()
    rng, pending_kills = random.Random(seed), 0
    try:
        for i in range(kills):
            between = i % 2 == 0  # every other kill lands between a commit and its checkpoint
            run_env = {**env, "AMP_DAGSTER_TEST_COMMIT_PAUSE": "0.3"} if between else env
            process = subprocess.Popen(command, env=run_env, stderr=subprocess.PIPE, text=True)
            try:
                deadline, marker = time.monotonic() + 60, "checkpoint amp_dagster" if between else "sync chain:"
                while marker not in (line := process.stderr.readline()):
                    assert line, f"the sync exited before {marker!r} (kill {i}): {process.stderr.read()[-2000:]}"
                    assert time.monotonic() < deadline
                if between:
                    pending_kills += 1
                else:
                    time.sleep(rng.uniform(0, 1.0))
            finally:
                process.kill()
                process.wait(30)
        assert pending_kills >= kills // 2
    finally:
        chain.halt.set()
        chain.join()
    head = server.chain.head
    final = subprocess.run([*command, "--until-block", str(head)], env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert final.returncode in (0, -6, 134), final.stderr[-3000:]  # deltalake may abort at exit (STACK_NOTES)
    loader = _loader(name, harness)
    try:
        from amp_dagster.loaders.base import TableRef

        got = loader.read(TableRef("logs", harness.namespace)).read_all()
    finally:
        loader.close()
        harness.cleanup()
    want = canonical(server, end=head, where=None if query == DENSE else _sparse)
    verdict = exact(got, want)
    assert verdict["ok"], f"{name} {kills} kills, {chain.reorgs} reorgs: {verdict}"


@pytest.mark.parametrize("query", [DENSE, SPARSE], ids=["dense", "sparse"])
@pytest.mark.parametrize("name", ["postgres", "delta"])
def test_twenty_kills(name, query, tmp_path, devserver):
    if name == "postgres":
        services.require_postgres()
    _kill_and_restart(name, query, 20, tmp_path, devserver, seed=len(name) * 10 + len(query))


@pytest.mark.parametrize("name", ["redis", "clickhouse", "iceberg", "lmdb"])
def test_five_kills(name, tmp_path, devserver):
    if name == "redis":
        services.require_redis()
    _kill_and_restart(name, DENSE, 5, tmp_path, devserver, seed=7)
