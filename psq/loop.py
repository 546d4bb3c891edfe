"""``WorkerLoop``: moves a trainer's batch statistics to the cluster and its history back.

It owns a :class:`~psq.client.StatsClient` and runs it either on a background thread (for a
synchronous training script)::

    loop = WorkerLoop("tcp://host:5555", job="resnet", worker=f"rank{rank}").start()
    ...train...
    loop.stop()

or inside the trainer's own asyncio loop (``async with WorkerLoop(...) as loop:``).

Layers (see :mod:`psq.torch`) ``submit`` their batch statistics to the current step without
waiting, and ``submit_gradient`` the statistics of their backward pass; a step closes when
``step()`` is called, or by itself when a layer submits a second time, and is pushed in the
background: one message per shard, all layers and their gradients in it.  Layers read the
latest history of their layer (moments and gradient means) with ``history(name)``.  When the broker or an aggregator is
away the loop logs once, the layers train on batch statistics and the last history they have,
and it recovers by itself.  No wait anywhere is unbounded.

``mode="sync"`` (against an aggregator started with ``--mode sync --sync-workers N``) instead has
each layer ``exchange`` its statistics and block until the pooled statistics of that step
arrive: SyncBatchNorm's forward, for verification.

This module does not import torch: what layers submit is numpy, or a :class:`Submission`
whose ``ready`` callable says when a device-to-host copy has landed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from psq.client import PushResult, Rejected, StatsClient, Unavailable
from psq.config import DEFAULT_FRONTEND
from psq.logs import Throttled
from psq.security import ClientKeys
from psq.stats import GradientMeans, Moments, pool_gradients

log = logging.getLogger("psq.loop")

POLL_S = 0.0005  # how often a step waits for device copies to land
LANDING_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Submission:
    """One layer's batch statistics for one step: count, mean, biased variance (1-d numpy), and
    the images (batch items) they came from (None: each element is one).

    ``ready`` (if given) returns True once the arrays hold their values — a CUDA event for a
    device-to-host copy that was started without blocking.
    """

    count: float
    mean: np.ndarray
    var: np.ndarray
    ready: Callable[[], bool] | None = None
    images: float | None = None


@dataclass(frozen=True)
class GradientSubmission:
    """One layer's backward statistics for one step: the means of ``∂L/∂y`` and ``∂L/∂y·x̂``
    (:class:`psq.stats.GradientMeans`) over ``count`` elements; ``ready`` as for :class:`Submission`."""

    count: float
    dy: np.ndarray
    dy_xhat: np.ndarray
    ready: Callable[[], bool] | None = None


@dataclass(frozen=True)
class LayerHistory:
    """The cluster's history of one layer, as the latest reply carried it."""

    moments: Moments  # biased variance
    version: int  # updates the aggregator has applied to this layer
    step: int  # the step whose push brought it back
    gradient: GradientMeans | None = None  # the gradient history, once a push carried gradients
    seen: float = 0.0  # images that ever arrived for this layer, from every worker


class ForkedLoop(RuntimeError):
    """A WorkerLoop used in a process forked from the one that started it."""


class WorkerLoop:
    """Background statistics exchange for one worker of a job."""

    def __init__(
        self,
        frontend: str = DEFAULT_FRONTEND,
        *,
        job: str,
        worker: str,
        mode: str = "async",
        timeout_s: float = 1.0,
        retries: int = 2,
        sync_timeout_s: float = 60.0,
        staleness_timeout_s: float = 1.0,
        dtype: str = "<f4",
        auto_step: bool = True,
        push_interval_s: float = 0.0,
        keys: ClientKeys | None = None,
    ) -> None:
        if mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', got {mode!r}")
        if dtype not in ("<f4", "<f8"):
            raise ValueError(f"dtype must be '<f4' or '<f8', got {dtype!r}")
        self.frontend, self.job, self.worker, self.mode = frontend, job, worker, mode
        self.timeout_s, self.retries, self.dtype, self.auto_step = timeout_s, retries, dtype, auto_step
        self.sync_timeout_s, self.staleness_timeout_s = sync_timeout_s, staleness_timeout_s
        self.push_interval_s = push_interval_s
        self.keys = keys
        self._lock = threading.Condition()
        self._current: dict[str, Submission] = {}
        self._gradients: dict[str, list[GradientSubmission]] = {}  # the current step's backward
        self._exchanged: set[str] = set()  # sync mode: layers that exchanged in this step
        self._step = 0
        self._outstanding = 0
        self._histories: dict[str, LayerHistory] = {}
        self._away = False
        self._refusals = Throttled(log)  # a refusal repeats every step it stays true
        self._counters = {
            "steps": 0,
            "pushes": 0,
            "answered": 0,
            "unavailable": 0,
            "rejected": 0,
            "nonfinite_gradients": 0,
            "staleness_waits": 0,
            "staleness_timeouts": 0,
            "staleness_sum": 0,
            "staleness_n": 0,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: StatsClient | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pid = os.getpid()
        self._failed: BaseException | None = None  # why the background thread could not start
        _LOOPS.add(self)

    # -- running on a background thread --------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> WorkerLoop:
        """Start the background thread; returns once its client is open."""
        if self._thread is not None:
            raise RuntimeError("this WorkerLoop is already started")
        ready = threading.Event()
        self._failed = None
        self._thread = threading.Thread(target=self._run_thread, args=(ready,), name=f"psq-{self.worker}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"the WorkerLoop thread did not start within {timeout_s} s")
        if self._failed is not None:  # the thread's own error, not a generic timeout
            self._thread = None
            raise self._failed
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the client and end the thread (pending pushes are given up)."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("psq: the WorkerLoop thread did not end within %.1f s", timeout_s)
        self._thread = None

    def __enter__(self) -> WorkerLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_thread(self, ready: threading.Event) -> None:
        asyncio.run(self._serve(ready))

    async def _serve(self, ready: threading.Event) -> None:
        try:
            await self._open()
        except Exception as exc:  # handed to start(), which raises it on the caller's thread
            self._failed = exc
            ready.set()
            return
        assert self._stopping is not None
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._close()

    # -- running inside the trainer's asyncio loop ----------------------------------------------

    async def __aenter__(self) -> WorkerLoop:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        timeout_s = max(self.timeout_s, self.sync_timeout_s + 1.0) if self.mode == "sync" else self.timeout_s
        # In async mode a minimum interval between pushes bounds the message rate of a fast trainer:
        # the steps in between are merged, not dropped.  Sync mode must send every exchange at once.
        self._client = StatsClient(
            self.frontend,
            job=self.job,
            worker=self.worker,
            timeout_s=timeout_s,
            retries=self.retries,
            min_interval_s=self.push_interval_s if self.mode == "async" else 0,
            keys=self.keys,
        )
        await self._client.open()

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        # Final bookkeeping must finish even if the closing task is itself cancelled.
        await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))
        if self._client is not None:
            await self._client.close()
        self._client = None
        with self._lock:
            self._outstanding = 0
            self._lock.notify_all()

    # -- what layers call -------------------------------------------------------------------------

    @property
    def current_step(self) -> int:
        return self._step

    def enter(self, name: str) -> None:
        """A layer begins its forward: if it already reported in the current step, that step is
        over (closed and pushed), so the layer measures staleness against the new step."""
        self._check_process()
        with self._lock:
            if name in self._current and self.auto_step:
                self._close_step()

    def submit(self, name: str, stats: Submission) -> None:
        """Add one layer's statistics to the current step (closing it first, as :meth:`enter`,
        if the layer already reported in it); never waits."""
        self._check_process()
        with self._lock:
            if name in self._current and self.auto_step:
                self._close_step()
            self._current[name] = stats

    def submit_gradient(self, name: str, stats: GradientSubmission) -> None:
        """Add one layer's backward statistics to the current step; never waits.  A layer's
        backward runs after its forward and before the step closes at its next forward; a
        forward in between (activation checkpointing recomputes one) moves the gradients of the
        step into the next one, which costs nothing but their step label."""
        self._check_process()
        with self._lock:
            self._gradients.setdefault(name, []).append(stats)

    def step(self) -> int:
        """Close the current step and push it in the background; returns its number."""
        self._check_process()
        with self._lock:
            return self._close_step()

    def _close_step(self) -> int:
        entries, number = self._current, self._step
        self._current = {}
        self._exchanged = set()
        self._step += 1
        self._counters["steps"] += 1
        if not entries:  # gradients without a forward (step() between them): they join the next step
            return number
        gradients, self._gradients = self._gradients, {}
        if self._loop is not None and self._client is not None:
            self._outstanding += 1
            self._loop.call_soon_threadsafe(self._spawn, self._push(number, entries, gradients))
        return number

    def _push_open_step(self) -> None:
        with self._lock:
            if self._current:
                self._close_step()

    def history(self, name: str) -> LayerHistory | None:
        """The latest history of a layer (None before the first answer)."""
        return self._histories.get(name)

    def note_staleness(self, steps: int) -> None:
        """Record how old (in steps) the history a layer normalized with was."""
        self._counters["staleness_sum"] += steps
        self._counters["staleness_n"] += 1

    def wait_fresh(self, name: str, min_step: int) -> None:
        """Wait (up to ``staleness_timeout_s``) for history of ``name`` from ``min_step`` or later,
        as long as a push that could bring it is still on its way.  Goes on regardless."""
        self._forbid_loop_thread("wait for fresher history")
        deadline = time.monotonic() + self.staleness_timeout_s
        with self._lock:
            self._counters["staleness_waits"] += 1
            while self._outstanding > 0:
                h = self._histories.get(name)
                if h is not None and h.step >= min_step:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    self._counters["staleness_timeouts"] += 1
                    return
                self._lock.wait(left)

    def exchange(self, name: str, stats: Submission) -> tuple[Moments, bool] | None:
        """Sync mode: push one layer's statistics for the current step and wait for the pooled
        statistics of every worker's step; ``(pooled, complete)``, or None when unreachable."""
        self._check_process()
        self._forbid_loop_thread("wait for the pooled statistics of the step")
        if self._loop is None or self._client is None:
            raise RuntimeError("the WorkerLoop is not running: start() it, or enter it with 'async with'")
        with self._lock:
            if name in self._exchanged:  # this layer's second forward: a new step began
                self._step += 1
                self._counters["steps"] += 1
                self._exchanged.clear()
            self._exchanged.add(name)
            number = self._step
        future = asyncio.run_coroutine_threadsafe(self._exchange(name, number, stats), self._loop)
        try:
            return future.result(self.sync_timeout_s + 2 * self.timeout_s + 5.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self._went_away("no pooled statistics in time")
            return None

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the broker names a live shard table (True), or ``timeout_s`` passes."""
        self._forbid_loop_thread("wait for the statistics service")
        if self._loop is None or self._client is None:
            raise RuntimeError("the WorkerLoop is not running: start() it first")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            future = asyncio.run_coroutine_threadsafe(self._client.shard_count(), self._loop)
            try:
                # shard_count is itself bounded by the client's retries; this only guards against a stall
                future.result(self.timeout_s * (self.retries + 2) + 5.0)
                return True
            except (Unavailable, Rejected, concurrent.futures.TimeoutError):
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
        return False

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every pushed step is answered (or given up); False on timeout."""
        self._forbid_loop_thread("flush")
        self._push_open_step()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._outstanding > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    async def aflush(self, timeout_s: float = 10.0) -> bool:
        """:meth:`flush` for code running in the loop's own thread."""
        self._push_open_step()
        deadline = time.monotonic() + timeout_s
        while self._outstanding > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return self._outstanding == 0

    def summary(self) -> dict[str, Any]:
        c = dict(self._counters)
        n = c.pop("staleness_n")
        c["mean_staleness_steps"] = c.pop("staleness_sum") / n if n else None
        if self._client is not None:
            c["client"] = dict(self._client.stats)
        return c

    # -- on the loop ------------------------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push(
        self, number: int, entries: dict[str, Submission], gradients: dict[str, list[GradientSubmission]]
    ) -> None:
        try:
            if not await self._landed([*entries.values(), *(g for gs in gradients.values() for g in gs)], number):
                return
            stats = {name: Moments(s.count, s.mean, s.var) for name, s in entries.items()}
            images = {name: s.images for name, s in entries.items() if s.images is not None}
            grads = self._finite(number, gradients) if gradients else None
            self._counters["pushes"] += 1
            assert self._client is not None
            try:
                result = await self._client.push(number, stats, self.dtype, images=images, gradients=grads)
                self._record(number, result)
            except Unavailable as exc:
                self._counters["unavailable"] += 1
                if exc.partial is not None:
                    self._record(number, exc.partial, back=False)
                self._went_away(str(exc))
            except Rejected as exc:
                self._counters["rejected"] += 1
                self._refusals.error(exc.code, "psq: the aggregator refused step %d's statistics: %s", number, exc)
        finally:
            with self._lock:
                self._outstanding = max(0, self._outstanding - 1)
                self._lock.notify_all()

    def _finite(self, number: int, gradients: dict[str, list[GradientSubmission]]) -> dict[str, GradientMeans]:
        """Each layer's backward statistics of the step, pooled; those with NaN or infinity left
        out (a mixed-precision step whose loss scale overflowed: its moments still go)."""
        out = {}
        for name, parts in gradients.items():
            pooled = pool_gradients([GradientMeans(p.count, p.dy, p.dy_xhat) for p in parts])
            if np.isfinite(pooled.dy).all() and np.isfinite(pooled.dy_xhat).all():
                out[name] = pooled
            else:
                self._counters["nonfinite_gradients"] += 1
                log.debug("psq: step %d's gradient statistics of %s are not finite; not sent", number, name)
        return out

    async def _exchange(self, name: str, number: int, stats: Submission) -> tuple[Moments, bool] | None:
        if not await self._landed([stats], number):
            return None
        assert self._client is not None
        self._counters["pushes"] += 1
        images = {name: stats.images} if stats.images is not None else None
        moments = {name: Moments(stats.count, stats.mean, stats.var)}
        try:
            result = await self._client.push(number, moments, self.dtype, images=images)
        except Unavailable as exc:
            self._counters["unavailable"] += 1
            self._went_away(str(exc))
            return None
        except Rejected as exc:
            self._counters["rejected"] += 1
            self._refusals.error(
                (exc.code, name), "psq: the aggregator refused layer %s's statistics of step %d: %s", name, number, exc
            )
            return None
        self._record(number, result)
        return result[name], result.complete

    async def _landed(self, entries: list[Submission | GradientSubmission], number: int) -> bool:
        """Wait for device copies, polling so the event loop stays free; False (the step is
        dropped, not pushed half-copied) if they have not landed after ``LANDING_TIMEOUT_S``."""
        deadline = time.monotonic() + LANDING_TIMEOUT_S
        for s in entries:
            while s.ready is not None and not s.ready():
                if time.monotonic() > deadline:
                    log.error(
                        "psq: step %d's device copies did not land in %.0f s; the step is not pushed",
                        number,
                        LANDING_TIMEOUT_S,
                    )
                    return False
                await asyncio.sleep(POLL_S)
        return True

    def _record(self, number: int, result: PushResult, back: bool = True) -> None:
        """Keep the history a reply carried (``back``: a complete answer, not a partial one)."""
        if back:
            self._counters["answered"] += 1
        versions = result.versions
        with self._lock:
            # Replies of a shard arrive in order (one request in flight per shard), so the latest
            # wins, even with a lower version: a restarted aggregator counts from its snapshot.
            # Merged pushes share one reply: it keeps the newest step's label.
            for name in result:
                old = self._histories.get(name)
                if old is None or old.version != versions[name] or old.step < number:
                    # a reply to a push without gradients carries no gradient history: keep the last
                    gradient = result.gradient(name) or (old.gradient if old is not None else None)
                    self._histories[name] = LayerHistory(
                        result[name], versions[name], number, gradient, result.seen(name)
                    )
            self._lock.notify_all()
        if back and self._away:
            self._away = False
            log.warning("psq: the statistics service answers again")

    def _went_away(self, why: str) -> None:
        if not self._away:
            self._away = True
            log.warning(
                "psq: statistics service unreachable (%s); training goes on with batch statistics "
                "and the last history received",
                why,
            )

    # -- guards -----------------------------------------------------------------------------------

    def _forbid_loop_thread(self, what: str) -> None:
        if self._loop is not None and self._loop.is_running() and _running_loop() is self._loop:
            raise RuntimeError(
                f"cannot {what} on the WorkerLoop's own event loop (it would wait for itself); "
                "run the forward pass off the loop, e.g. await asyncio.to_thread(model, x)"
            )

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise ForkedLoop(
                "this WorkerLoop belongs to the process that created it; a forked process "
                "(a DataLoader worker, say) must not use it"
            )

    def _forget_after_fork(self) -> None:
        # The child inherits copies of the parent's sockets and thread state: never touch them.
        self._loop = self._client = self._thread = None
        self._tasks = set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_LOOPS: weakref.WeakSet[WorkerLoop] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for loop in list(_LOOPS):
        loop._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
