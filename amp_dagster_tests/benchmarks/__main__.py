"""`make bench`: run the benchmark modules (all, or those named) and print their tables beside the goals.

python -m amp_dagster_tests.benchmarks [names or goals ...] [--rows N] [--rounds R] [--seconds S] [--partitions P]

A benchmark is named by its module (postgres, endtoend, ...) or by the goal of PERFORMANCE.md it measures (p2, p7,
...). Figures come from the defaults (1,000,000 rows, 3 rounds, 60 s of stream, 1,000 partitions) on a quiet
machine; a smaller --rows, --rounds 1, a few --seconds and --partitions make a smoke run that only shows every
benchmark still works.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

from .harness import BACKFILL_PARTITIONS, MIN_ROUNDS, MIN_SECONDS, QUIET_LOAD, load_average

# the goal each benchmark module measures (PERFORMANCE.md), so that `make bench` runs one by either name
GOALS = {"p1": "flight", "p2": "postgres", "p3": "redis", "p4": "delta", "p5": "iceberg", "p6": "clickhouse",
         "p7": "endtoend", "p8": "freshness", "p9": "memory", "p10": "dagster", "p11": "backfill"}  # fmt: skip


def _takes(function, parameter: str) -> bool:
    return parameter in inspect.signature(function).parameters


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).parent
    available = sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )
    parser = argparse.ArgumentParser(
        prog="make bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names",
        nargs="*",
        choices=[*available, *GOALS, []],
        help=f"benchmarks to run, by name or goal (default: all of {available})",
    )
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="rows per case (default 1,000,000; memory also runs 5x this)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=MIN_ROUNDS,
        help=f"interleaved rounds; for memory, fresh processes per size (default {MIN_ROUNDS})",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=MIN_SECONDS,
        help=f"freshness (P8): seconds of new blocks to time (default {MIN_SECONDS})",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=BACKFILL_PARTITIONS,
        help=f"backfill (P11): partitions of the single-run backfill (default {BACKFILL_PARTITIONS:,})",
    )
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rounds < 1 or args.seconds <= 0 or args.partitions < 2:
        parser.error(
            f"--rows and --rounds must be at least 1, --seconds above 0 and --partitions at least 2, got --rows "
            f"{args.rows} --rounds {args.rounds} --seconds {args.seconds:g} --partitions {args.partitions}"
        )
    if load_average() > QUIET_LOAD:
        print(f"warning: load average is {load_average():.2f}; figures from a busy machine are unreliable")
    names = dict.fromkeys(GOALS.get(name, name) for name in args.names or available)
    for name in names:
        bench = importlib.import_module(f"{__package__}.bench_{name}").main
        extra = {option: getattr(args, option) for option in ("seconds", "partitions") if _takes(bench, option)}
        bench(rows=args.rows, rounds=args.rounds, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
