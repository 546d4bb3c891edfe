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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from psq.client import PushResult, Rejected, StatsClient, Unavailable
from psq.config import DEFAULT_FRONTEND
from psq.counters import LoopCounters
from psq.logs import Throttled
from psq.loop_thread import LoopThread, run_threadsafe
from psq.security import ClientKeys
from psq.stats import GradientMeans, Moments, pool_gradients
from psq.steps import ClosedStep, ExchangeSteps, StepBook

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
        self.timeout_s, self.retries, self.dtype = timeout_s, retries, dtype
        self.sync_timeout_s, self.staleness_timeout_s = sync_timeout_s, staleness_timeout_s
        self.push_interval_s = push_interval_s
        self.keys = keys
        self._lock = threading.Condition()  # guards the steps, the histories and _outstanding
        self._steps: StepBook[Submission, GradientSubmission] = StepBook(auto_step)
        self._exchanges = ExchangeSteps()
        self._outstanding = 0  # steps handed to the event loop and not yet answered or given up
        self._histories: dict[str, LayerHistory] = {}
        self._counters = LoopCounters()
        self._away = False
        self._refusals = Throttled(log)  # a refusal repeats every step it stays true
        self._loop: asyncio.AbstractEventLoop | None = None  # where the client runs
        self._client: StatsClient | None = None
        self._host = LoopThread(f"psq-{worker}")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pid = os.getpid()
        _LOOPS.add(self)

    @property
    def auto_step(self) -> bool:
        return self._steps.auto_step

    # -- running on a background thread --------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> WorkerLoop:
        """Start the background thread; returns once its client is open."""
        self._host.start(self._open, self._close, timeout_s)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the client and end the thread (pending pushes are given up)."""
        self._host.stop(timeout_s)

    def __enter__(self) -> WorkerLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- running inside the trainer's asyncio loop ----------------------------------------------

    async def __aenter__(self) -> WorkerLoop:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
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
        return self._exchanges.number if self.mode == "sync" else self._steps.number

    def enter(self, name: str) -> None:
        """A layer begins its forward: if it already reported in the current step, that step is
        over (closed and pushed), so the layer measures staleness against the new step."""
        self._check_process()
        with self._lock:
            self._hand_over(self._steps.enter(name))

    def submit(self, name: str, stats: Submission) -> None:
        """Add one layer's statistics to the current step (closing it first, as :meth:`enter`,
        if the layer already reported in it); never waits."""
        self._check_process()
        with self._lock:
            self._hand_over(self._steps.submit(name, stats))

    def submit_gradient(self, name: str, stats: GradientSubmission) -> None:
        """Add one layer's backward statistics to the current step; never waits.  A layer's
        backward runs after its forward and before the step closes at its next forward; a
        forward in between (activation checkpointing recomputes one) moves the gradients of the
        step into the next one, which costs nothing but their step label."""
        self._check_process()
        with self._lock:
            self._steps.submit_gradient(name, stats)

    def step(self) -> int:
        """Close the current step and push it in the background; returns its number."""
        self._check_process()
        with self._lock:
            closed = self._steps.close()
            self._hand_over(closed)
            return closed.number

    def _hand_over(self, closed: ClosedStep[Submission, GradientSubmission] | None) -> None:
        """Push a closed step on the event loop (called with the lock held)."""
        if closed is None or not closed.entries:
            return
        if self._loop is not None and self._client is not None:
            self._outstanding += 1
            self._loop.call_soon_threadsafe(self._spawn, self._push(closed))

    def history(self, name: str) -> LayerHistory | None:
        """The latest history of a layer (None before the first answer)."""
        return self._histories.get(name)

    def note_staleness(self, steps: int) -> None:
        """Record how old (in steps) the history a layer normalized with was."""
        self._counters.note_staleness(steps)

    def wait_fresh(self, name: str, min_step: int) -> None:
        """Wait (up to ``staleness_timeout_s``) for history of ``name`` from ``min_step`` or later,
        as long as a push that could bring it is still on its way.  Goes on regardless."""
        self._forbid_loop_thread("wait for fresher history")

        def fresh_or_hopeless() -> bool:
            h = self._histories.get(name)
            return self._outstanding == 0 or (h is not None and h.step >= min_step)

        with self._lock:
            self._counters.staleness_waits += 1
            if not self._lock.wait_for(fresh_or_hopeless, self.staleness_timeout_s):
                self._counters.staleness_timeouts += 1

    def exchange(self, name: str, stats: Submission) -> tuple[Moments, bool] | None:
        """Sync mode: push one layer's statistics for the current step and wait for the pooled
        statistics of every worker's step; ``(pooled, complete)``, or None when unreachable."""
        self._check_process()
        self._forbid_loop_thread("wait for the pooled statistics of the step")
        loop = self._running()
        with self._lock:
            number = self._exchanges.begin(name)
        try:
            return run_threadsafe(
                loop, self._exchange(name, number, stats), self.sync_timeout_s + 2 * self.timeout_s + 5.0
            )
        except concurrent.futures.TimeoutError:
            self._went_away("no pooled statistics in time")
            return None

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the broker names a live shard table (True), or ``timeout_s`` passes."""
        self._forbid_loop_thread("wait for the statistics service")
        loop = self._running()
        assert self._client is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                # shard_count is itself bounded by the client's retries; this only guards against a stall
                run_threadsafe(loop, self._client.shard_count(), self.timeout_s * (self.retries + 2) + 5.0)
                return True
            except (Unavailable, Rejected, concurrent.futures.TimeoutError):
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
        return False

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every pushed step is answered (or given up); False on timeout."""
        self._forbid_loop_thread("flush")
        with self._lock:
            self._push_open_step()
            return self._lock.wait_for(lambda: self._outstanding == 0, timeout_s)

    async def aflush(self, timeout_s: float = 10.0) -> bool:
        """:meth:`flush` for code running in the loop's own thread."""
        with self._lock:
            self._push_open_step()
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(0)  # the pushes just handed over become tasks
        while self._outstanding > 0 and self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self._tasks), timeout=left)
            await asyncio.sleep(0)
        return self._outstanding == 0

    def _push_open_step(self) -> None:
        if self._steps.is_open:
            self._hand_over(self._steps.close())

    def summary(self) -> dict[str, Any]:
        summary = self._counters.summary(self._steps.number + self._exchanges.number)
        if self._client is not None:
            summary["client"] = dict(self._client.stats)
        return summary

    # -- on the loop ------------------------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push(self, closed: ClosedStep[Submission, GradientSubmission]) -> None:
        try:
            number, entries, gradients = closed.number, closed.entries, closed.gradients
            if not await self._landed([*entries.values(), *(g for gs in gradients.values() for g in gs)], number):
                return
            stats = {name: Moments(s.count, s.mean, s.var) for name, s in entries.items()}
            images = {name: s.images for name, s in entries.items() if s.images is not None}
            grads = self._finite(number, gradients) if gradients else None
            await self._send(number, stats, images, grads, f"step {number}'s statistics")
        finally:
            with self._lock:
                self._outstanding = max(0, self._outstanding - 1)
                self._lock.notify_all()

    async def _exchange(self, name: str, number: int, stats: Submission) -> tuple[Moments, bool] | None:
        if not await self._landed([stats], number):
            return None
        images = {name: stats.images} if stats.images is not None else {}
        moments = {name: Moments(stats.count, stats.mean, stats.var)}
        result = await self._send(number, moments, images, None, f"layer {name}'s statistics of step {number}")
        return None if result is None else (result[name], result.complete)

    async def _send(
        self,
        number: int,
        stats: Mapping[str, Moments],
        images: Mapping[str, float],
        gradients: Mapping[str, GradientMeans] | None,
        what: str,
    ) -> PushResult | None:
        """Push and keep the history that comes back; None, counted and logged, when the
        service is away or refuses."""
        assert self._client is not None
        self._counters.pushes += 1
        try:
            result = await self._client.push(number, stats, self.dtype, images=images, gradients=gradients)
        except Unavailable as exc:
            self._counters.unavailable += 1
            if exc.partial is not None:
                self._record(number, exc.partial, back=False)
            self._went_away(str(exc))
            return None
        except Rejected as exc:
            self._counters.rejected += 1
            self._refusals.error((exc.code, what), "psq: the aggregator refused %s: %s", what, exc)
            return None
        self._record(number, result)
        return result

    def _finite(self, number: int, gradients: Mapping[str, list[GradientSubmission]]) -> dict[str, GradientMeans]:
        """Each layer's backward statistics of the step, pooled; those with NaN or infinity left
        out (a mixed-precision step whose loss scale overflowed: its moments still go)."""
        out = {}
        for name, parts in gradients.items():
            pooled = pool_gradients([GradientMeans(p.count, p.dy, p.dy_xhat) for p in parts])
            if np.isfinite(pooled.dy).all() and np.isfinite(pooled.dy_xhat).all():
                out[name] = pooled
            else:
                self._counters.nonfinite_gradients += 1
                log.debug("psq: step %d's gradient statistics of %s are not finite; not sent", number, name)
        return out

    async def _landed(self, entries: list[Submission | GradientSubmission], number: int) -> bool:
        """Wait for device copies, polling (a CUDA event cannot be awaited) so the event loop
        stays free; False (the step is dropped, not pushed half-copied) if they have not landed
        after ``LANDING_TIMEOUT_S``."""
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
            self._counters.answered += 1
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

    def _running(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._client is None:
            raise RuntimeError("the WorkerLoop is not running: start() it, or enter it with 'async with'")
        return self._loop

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
        self._loop = self._client = None
        self._host.forget()
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
