"""How `amp-dagster sync` shows progress: a live table on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import threading
import time

from .sync import Progress, SyncResult


def _number(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}{unit}"
    return f"{value:.0f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def describe(progress: Progress) -> dict[str, str]:
    """The figures of a progress report, as text, in display order."""
    checkpoint = progress.checkpoint
    lag = [] if progress.lag_blocks is None else [f"{progress.lag_blocks} blocks"]
    if progress.lag_seconds is not None:
        lag.append(f"{progress.lag_seconds:.1f} s")
    return {
        "rows": _number(progress.rows),
        "rows/s": _number(progress.rows_per_s),
        "blocks/s": _number(progress.blocks_per_s),
        "checkpoint": "-" if checkpoint is None or checkpoint.high is None else str(checkpoint.high),
        "head": _number(progress.head) if progress.head is None else str(progress.head),
        "lag": ", ".join(lag) or "-",
        "data": _number(progress.bytes, "B"),
        "elapsed": f"{progress.elapsed:.1f} s",
    }


class SyncDisplay:
    """Progress of one or more pipelines synced at once: ``update(name, progress)`` after each flush,
    ``done(name, result)`` at the end; a context manager around the syncs."""

    def __init__(self, names: list[str], live: bool) -> None:
        self.names, self.live = names, live
        self._live = None
        self._lock = threading.Lock()
        self._last_line: dict[str, float] = {}
        self._latest: dict[str, Progress] = {}

    def __enter__(self) -> SyncDisplay:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, name: str, progress: Progress) -> None:
        with self._lock:
            self._latest[name] = progress
            if self._live is not None:
                self._live.update(self._render())
            elif time.monotonic() - self._last_line.get(name, 0.0) >= 1.0:  # a log line a second at most
                self._last_line[name] = time.monotonic()
                fields = " ".join(f"{k}={v}" for k, v in describe(progress).items())
                print(f"sync {name}: {fields}", file=sys.stderr, flush=True)

    def done(self, name: str, result: SyncResult) -> None:
        state = result.checkpoint
        where = "-" if state is None else state.describe()
        line = (
            f"sync {name}: {result.stopped}; {result.rows:,} rows in {result.duration:.1f} s "
            f"({_number(result.rows_per_s)} rows/s), {result.flushes} flushes, {result.reorgs} reorgs; "
            f"checkpoint {where}"
        )
        with self._lock:
            if self._live is not None:
                self._live.update(self._render())
                self._live.console.print(line)
            else:
                print(line, file=sys.stderr, flush=True)

    def _render(self):
        from rich.table import Table

        table = Table(title="amp-dagster sync", title_justify="left")
        table.add_column("pipeline")
        for column in ("rows", "rows/s", "blocks/s", "checkpoint", "head", "lag", "data", "elapsed"):
            table.add_column(column, justify="right")
        for name in self.names:
            progress = self._latest.get(name)
            table.add_row(name, *(describe(progress).values() if progress else ["…"] * 8))
        return table
