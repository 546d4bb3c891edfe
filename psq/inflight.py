"""``InFlight``: the pushes a :class:`~psq.loop.WorkerLoop` handed to its event loop, not yet settled.

Any thread hands a push over (with the loop's lock held) and goes on; it runs as a task on the
event loop.  A push counts from the moment it is handed over, before it is a task, so a flush
never misses one.  :meth:`InFlight.wait` (another thread, on the lock's condition) and
:meth:`InFlight.drained` (the event loop's own thread, on a future) end when every push has been
answered or given up: no polling, and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any


class InFlight:
    """Count, run and wait out the pushes on one event loop."""

    def __init__(self, lock: threading.Condition) -> None:
        self._lock = lock  # the WorkerLoop's: waiters on it also wait for fresher history
        self.count = 0  # handed over and not yet settled (guarded by the lock)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._drained: list[asyncio.Future[None]] = []  # drained() waiters, resolved at count 0

    def hand_over(self, loop: asyncio.AbstractEventLoop, push: Coroutine[Any, Any, Any]) -> None:
        """Run ``push`` on ``loop``; call with the lock held, from any thread."""
        self.count += 1
        loop.call_soon_threadsafe(self._spawn, push)

    def wait(self, timeout_s: float) -> bool:
        """Off the event loop, with the lock held: until nothing is in flight; False on timeout."""
        return self._lock.wait_for(lambda: self.count == 0, timeout_s)

    async def drained(self, timeout_s: float) -> bool:
        """On the event loop's thread: until nothing is in flight; False on timeout."""
        with self._lock:
            if self.count == 0:
                return True
            future = asyncio.get_running_loop().create_future()
            self._drained.append(future)
        await asyncio.wait([future], timeout=timeout_s)
        with self._lock:
            if future in self._drained:
                self._drained.remove(future)
            return self.count == 0

    async def cancel(self) -> None:
        """Cancel every push that runs, wait for their bookkeeping, and count nothing in flight."""
        for task in list(self._tasks):
            task.cancel()
        # Their final bookkeeping must finish even if the closing task is itself cancelled.
        await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))
        self._settle(None)  # pushes cancelled before they began never settled themselves

    def forget(self) -> None:
        """After a fork: the tasks and waiters belong to the parent's loop."""
        self._tasks, self._drained, self.count = set(), [], 0

    def _spawn(self, push: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(push))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: push.close())  # a push cancelled before it began

    async def _run(self, push: Coroutine[Any, Any, Any]) -> None:
        try:
            await push
        finally:
            self._settle(1)

    def _settle(self, pushes: int | None) -> None:
        """``pushes`` have settled; None: all of them (read under the lock, as a thread may hand one over)."""
        with self._lock:
            self.count = 0 if pushes is None else max(0, self.count - pushes)
            self._lock.notify_all()
            done, self._drained = (self._drained, []) if self.count == 0 else ([], self._drained)
        for future in done:  # a drained() waiter may sit on another loop: resolve it on its own
            future.get_loop().call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
