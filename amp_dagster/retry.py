"""Bounded exponential backoff with full jitter, the one retry loop used by the client and the loaders."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    ``attempts`` counts every try, the first included, so ``attempts=1`` never retries. Delays grow from
    ``initial_delay`` by ``multiplier`` up to ``max_delay``; each sleep is drawn uniformly below that ceiling
    ("full jitter"), so clients that failed together do not come back together.

    >>> [round(d, 2) for d in RetryPolicy(attempts=4, initial_delay=1, jitter=False).delays()]
    [1.0, 2.0, 4.0]
    """

    attempts: int = 5
    initial_delay: float = 0.25
    max_delay: float = 10.0
    multiplier: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")

    def delays(self) -> Iterator[float]:
        """The sleeps between tries: one fewer than ``attempts``."""
        ceiling = self.initial_delay
        for _ in range(self.attempts - 1):
            capped = min(ceiling, self.max_delay)
            yield random.uniform(0, capped) if self.jitter else capped
            ceiling *= self.multiplier


NO_RETRY = RetryPolicy(attempts=1)
DEFAULT_RETRY = RetryPolicy()


class Backoff:
    """The one backoff loop, for callers that cannot hand their work over as a function (generators that must
    keep their place, streams that reconnect). ``pause`` after each failure says whether to try again.

    >>> backoff = Backoff(RetryPolicy(attempts=2, initial_delay=0), "a call")
    >>> backoff.pause(TimeoutError(), transient=True), backoff.pause(TimeoutError(), transient=True)
    (True, False)
    """

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy, self.what = policy, what
        self._delays = policy.delays()

    def pause(self, error: BaseException, transient: bool | None = None) -> bool:
        """After a failure: sleep and return True when another try may succeed (a transient error, attempts
        left), else return False and the caller raises. ``transient`` defaults to the error's own flag."""
        if transient is None:
            transient = bool(getattr(error, "transient", False))
        delay = next(self._delays, None) if transient else None
        if delay is None:
            return False
        log.warning("%s failed (%s); retrying in %.2fs", self.what, type(error).__name__, delay)
        time.sleep(delay)
        return True

    def reset(self) -> None:
        """Progress was made: the failure budget starts over."""
        self._delays = self.policy.delays()


def retry_call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    what: str,
) -> T:
    """Call ``fn`` until it succeeds, a non-transient error occurs, or the policy's attempts run out.

    The last transient error is re-raised unchanged, so the caller's own error translation still applies.
    """
    backoff = Backoff(policy, what)
    while True:
        try:
            return fn()
        except Exception as exc:
            if not backoff.pause(exc, is_transient(exc)):
                raise
