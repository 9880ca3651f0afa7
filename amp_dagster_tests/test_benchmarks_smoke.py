"""Every benchmark of `make bench` runs end to end at a tiny size, checks pass and its goal line prints: none can rot.

Each runs as `make bench` runs it, in a fresh process (chdb and pyiceberg's thread pool are per process), with its
files in a temporary directory. These are smoke runs, not figures: the timings are not looked at.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from amp_dagster_tests.benchmarks.__main__ import GOALS

BENCHMARKS = Path(__file__).parent / "benchmarks"
NAMES = sorted(p.stem.removeprefix("bench_") for p in BENCHMARKS.glob("bench_*.py"))
# rows per bench: tiny, except where a case only exists above a size (Delta's per-65,536-row commits)
ROWS = {"delta": 70_000}
# the size options of the benches that take one: a few seconds of stream, a few partitions
OPTIONS = {"freshness": ["--seconds", "5"], "backfill": ["--partitions", "20"]}
GOAL_LINES = {
    "flight": ["P1:"],
    "postgres": ["P2:", "P2 at uint64=bigint:"],
    "redis": ["P3:"],
    "delta": ["P4 (one commit):", "P4 (2 commits):"],
    "iceberg": ["P5:"],
    "clickhouse": ["P6:"],
    "lmdb": ["no goal:"],
    "memory": ["P9 postgres:", "P9 lmdb:", "P9 engine:", "P9 engine-incr:"],
    "endtoend": ["P7:"],
    "freshness": ["P8:"],
    "checkpoints": ["no goal:"],
    "dagster": ["P10:"],
    "backfill": ["P11:"],
}


def test_every_benchmark_is_smoke_tested():
    assert sorted(GOAL_LINES) == NAMES


def test_every_goal_names_its_benchmark():
    assert sorted(GOALS, key=lambda g: int(g[1:])) == [f"p{i}" for i in range(1, 12)]
    assert set(GOALS.values()) <= set(NAMES)
    for goal, name in GOALS.items():  # the bench a goal names prints that goal's verdict
        assert any(line.split()[0].rstrip(":") == goal.upper() for line in GOAL_LINES[name]), (goal, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_benchmark_runs_at_a_tiny_size(name: str, tmp_path: Path):
    rows = ROWS.get(name, 3_000)
    sizes = ["--rows", str(rows), "--rounds", "1", *OPTIONS.get(name, [])]
    out = subprocess.run(
        [sys.executable, "-m", "amp_dagster_tests.benchmarks", name, *sizes],
        capture_output=True,
        text=True,
        env={**os.environ, "AMP_BENCH_DIR": str(tmp_path)},
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    for line in GOAL_LINES[name]:
        assert line in out.stdout, f"{name} printed no {line!r} line:\n{out.stdout}"
    assert "smoke run" in out.stdout  # one round is labelled as what it is
