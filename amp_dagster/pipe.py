"""The reader thread and the queue bounded in bytes between it and the writer: the engine's backpressure."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from .flight.protocol import Data

END = object()  # the reader thread is done
READ_END = object()  # one read of several is done


class Pipe:
    """A queue bounded in bytes between the reader thread and the writer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._ended = False  # the producer is done (self._error says how)
        self._cancelled = False  # the consumer went away
        self._error: BaseException | None = None

    def put(self, item: Any, size: int) -> bool:
        """Queue ``item``, waiting while the queue is full; False once the consumer has gone."""
        with self._cond:
            while self._items and self._bytes + size > self.limit and not self._cancelled:
                self._cond.wait(0.5)
            if self._cancelled:
                return False
            self._items.append((item, size))
            self._bytes += size
            self._cond.notify_all()
            return True

    def end(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._ended, self._error = True, error
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._items.clear()
            self._cond.notify_all()

    def get(self, timeout: float | None) -> Any:
        """The next item; None after ``timeout`` seconds without one; ``END`` when the producer is done. The
        producer's error is raised here."""
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._items and not self._ended:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left if left is not None else 0.5)
            if self._items:
                item, size = self._items.popleft()
                self._bytes -= size
                self._cond.notify_all()
                return item
            if self._error is not None:
                raise self._error
            return END

    @property
    def empty(self) -> bool:
        with self._cond:
            return not self._items


class Reader:
    """Runs ``produce(put)`` on a daemon thread; ``stop()`` cancels the queue and closes a blocked source read."""

    def __init__(self, produce: Callable[[Callable[[Any, int], bool], Reader], None], limit: int) -> None:
        self.pipe = Pipe(limit)
        self.current: Any = None  # the source iterator being read, closed by stop()
        self._produce = produce
        self._thread = threading.Thread(target=self._run, name="amp-sync-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._produce(self.pipe.put, self)
            self.pipe.end()
        except BaseException as exc:
            self.pipe.end(exc)

    def stop(self) -> None:
        self.pipe.cancel()
        current = self.current
        # a generator cannot be closed from another thread while it runs; our stream iterators can
        if current is not None and hasattr(current, "close") and not hasattr(current, "gi_frame"):
            with suppress(Exception):
                current.close()
        self._thread.join(timeout=10)


def event_size(event: Any) -> int:
    return event.batch.nbytes if isinstance(event, Data) else 0
