"""`make bench`: run the benchmark modules (all, or those named) and print their tables.

python -m amp_dagster_tests.benchmarks [names ...] [--rows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from .harness import load_average


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).parent
    available = sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", choices=[*available, []], help=f"benchmarks to run (default: all of {available})"
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per case (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = parser.parse_args(argv)
    if load_average() > 1.5:
        print(f"warning: load average is {load_average():.2f}; figures from a busy machine are unreliable")
    for name in args.names or available:
        importlib.import_module(f"{__package__}.bench_{name}").main(rows=args.rows, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
