"""``LoopThread``: an asyncio event loop on a daemon thread, for a synchronous caller.

It opens what runs on it inside the running loop (sockets belong to the loop that made them),
serves until told to stop and closes it on the way out; :func:`run_threadsafe` runs a coroutine
on a loop for another thread, with a timeout.  Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("psq.loop")

T = TypeVar("T")


class LoopThread:
    """Start, serve, stop: one event loop on one thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._failed: BaseException | None = None  # why opening failed, raised on the caller's thread

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(
        self, open: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]], timeout_s: float
    ) -> None:
        """Run ``open()`` on a new thread's loop; return once it is done (raising its error),
        then serve until :meth:`stop`, and ``close()`` there before the thread ends."""
        if self._thread is not None:
            raise RuntimeError("this WorkerLoop is already started")
        ready = threading.Event()
        self._failed = None
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(open, close, ready)), name=self.name, daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"the WorkerLoop thread did not start within {timeout_s} s")
        if self._failed is not None:
            self._thread = None
            raise self._failed

    async def _serve(
        self, open: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]], ready: threading.Event
    ) -> None:
        self.loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        try:
            await open()
        except Exception as exc:  # handed to start(), which raises it on the caller's thread
            self._failed = exc
            ready.set()
            return
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            await close()

    def stop(self, timeout_s: float) -> None:
        """Ask the loop to close what it runs and end; wait up to ``timeout_s`` for the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self.loop is not None and self._stopping is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stopping.set)
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("psq: the WorkerLoop thread did not end within %.1f s", timeout_s)

    def forget(self) -> None:
        """After a fork: the child has copies of the parent's thread state; never touch them."""
        self.loop, self._thread, self._stopping = None, None, None


def run_threadsafe(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """Run ``coroutine`` on ``loop`` (running on another thread) and wait for its result, up to
    ``timeout_s``: ``concurrent.futures.TimeoutError`` then, the coroutine cancelled."""
    future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    try:
        return future.result(timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise
