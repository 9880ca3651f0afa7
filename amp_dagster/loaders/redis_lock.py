"""A Redis table's writer lock: a short lease kept alive by a heartbeat, so that a dead writer's lock passes on fast.

One writer at a time holds ``P:lock`` (``SET NX PX``, holding a random token); a heartbeat thread renews it every
``BEAT`` seconds, so the lock of a writer that died (kill -9, a lost host) expires within ``LEASE_MS`` and the next
writer takes it over. A live writer can lose its lock the same way, when its heartbeat stalls for a whole lease (a
paused process, a swapped-out host, a server blocked by a long script), so safety never rests on the lease:

- every script that changes the table under the lock is fenced: it checks the token first (redis_scripts.py);
- the only changes not made by scripts, the rows the writer pipelines on its raw socket, are fenced by closing
  that socket: ``P:owner`` holds its client id while the lock is held, and a writer that takes the lock over
  from a holder that never released it closes that holder's socket (CLIENT KILL) before it changes anything.

So whatever a writer does after it lost its lock changes nothing, and what it did before comes before everything
the next writer does. The loader's user therefore needs the CLIENT ID and CLIENT KILL commands.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .redis_scripts import ACQUIRE, LEASE

LEASE_MS = 1_500  # how long a lock outlives its writer's last heartbeat: the longest wait for a dead writer
BEAT = 0.25  # seconds between heartbeats: six a lease, so a few slow or failed ones cost nothing


@dataclass(frozen=True)
class Held:
    """A held lock: the token the fenced scripts check, and the client id of the raw socket that may write."""

    token: bytes
    owner: int


@contextlib.contextmanager
def holding(
    client: Any,
    lock: bytes,
    owner: bytes,
    me: int,
    wait: float,
    call: Callable[[Callable[[], Any]], Any],
    busy: Callable[[], Exception],
) -> Iterator[Held]:
    """Hold ``lock`` for the writer whose raw socket has client id ``me``, waiting up to ``wait`` seconds for
    another holder (then raising ``busy()``). ``call`` runs one command with the loader's retries and errors.

    Leaving never fails: a lock that cannot be released expires within the lease, and a lock lost meanwhile needs
    no report, since the fencing kept everything after the loss out of the table.
    """
    token = uuid.uuid4().hex.encode()
    deadline, pause = time.monotonic() + wait, 0.005
    while True:
        got, value = call(lambda: client.eval(ACQUIRE, 2, lock, owner, token, LEASE_MS, me))
        if got:
            break
        if time.monotonic() > deadline:
            raise busy()
        # poll fast (an early release is not announced), but never sleep past the expiry of the holder's lease
        time.sleep(pause if value < 0 else min(pause, value / 1000 + 0.001))
        pause = min(pause * 2, 0.1)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT):
            try:
                if not client.eval(LEASE, 2, lock, owner, token, LEASE_MS):
                    return  # lost: the fenced scripts refuse from now on
            except Exception:  # a blip: the lease outlasts several missed beats
                pass

    heart = threading.Thread(target=beat, name="amp-redis-lock", daemon=True)
    heart.start()
    try:
        if value and int(value) != me:
            # the last holder never released the lock: dead, or alive and stalled past its lease, when rows it
            # pipelined may still wait in its socket, where no script can fence them
            call(lambda: client.client_kill_filter(_id=int(value)))
        yield Held(token, me)
    finally:
        stop.set()
        heart.join()
        with contextlib.suppress(Exception):
            client.eval(LEASE, 2, lock, owner, token, 0)
