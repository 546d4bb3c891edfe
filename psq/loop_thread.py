"""``LoopThread``: an asyncio event loop on a daemon thread, for a synchronous caller.

It opens what runs on it inside the running loop (sockets belong to the loop that made them),
serves until told to stop and closes it on the way out; :func:`run_threadsafe` runs a coroutine
on a loop for another thread, with a timeout.  Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import selectors
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("psq.loop")

T = TypeVar("T")
MAX_SKIPPED_POLLS = 8  # zero-timeout polls answered without the system call, in a row


class FewReleasesSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's selector, polling less often when asyncio only asks "anything new?".

    asyncio polls with a zero timeout whenever callbacks are ready, a dozen times for one
    message, and every poll releases the GIL.  Beside a trainer that holds it, each release is a
    hand-off: this thread waits for its turn (up to the switch interval), then forces the
    trainer to yield.  Most of those polls find nothing, so up to :data:`MAX_SKIPPED_POLLS` in a
    row are answered "nothing" without the call.  No event is lost: the kernel keeps it pending
    for the next real poll, which comes after the skipped ones, or at once when the loop has
    nothing ready (a poll that may wait is never skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self._skipped = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0 and self._skipped < MAX_SKIPPED_POLLS:
            self._skipped += 1
            return []
        self._skipped = 0
        return super().select(timeout)


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
            target=lambda: _run(self._serve(open, close, ready)), name=self.name, daemon=True
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


def _run(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(main)`` on a loop with a :class:`FewReleasesSelector` (``asyncio.run``
    takes no loop before Python 3.12), shutting down as it does: what is left cancelled and
    awaited, their errors reported, async generators and the default executor closed."""
    loop = asyncio.SelectorEventLoop(FewReleasesSelector())
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    finally:
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """As ``asyncio.run`` ends: cancel every task left, wait for them, report their errors."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "an exception while the WorkerLoop thread closed",
                    "exception": task.exception(),
                    "task": task,
                }
            )
