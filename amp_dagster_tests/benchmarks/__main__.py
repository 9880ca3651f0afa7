"""`make bench`: run the benchmark modules (all, or those named) and print their tables beside the goals.

python -m amp_dagster_tests.benchmarks [names ...] [--rows N] [--rounds R]

Figures come from the defaults (1,000,000 rows, 3 rounds) on a quiet machine; a smaller --rows and --rounds 1 make a
smoke run that only shows every benchmark still works.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from .harness import MIN_ROUNDS, QUIET_LOAD, load_average


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).parent
    available = sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )
    parser = argparse.ArgumentParser(
        prog="make bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names", nargs="*", choices=[*available, []], help=f"benchmarks to run (default: all of {available})"
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
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rounds < 1:
        parser.error(f"--rows and --rounds must be at least 1, got --rows {args.rows} --rounds {args.rounds}")
    if load_average() > QUIET_LOAD:
        print(f"warning: load average is {load_average():.2f}; figures from a busy machine are unreliable")
    for name in args.names or available:
        importlib.import_module(f"{__package__}.bench_{name}").main(rows=args.rows, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
