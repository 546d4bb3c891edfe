"""``WorkerLoop``: moves a trainer's batch statistics to the cluster and its history back.

It owns a :class:`~psq.client.StatsClient` and runs it either on a background thread (for a
synchronous training script)::

    loop = WorkerLoop("tcp://host:5555", job="resnet", worker=f"rank{rank}").start()
    ...train...
    loop.stop()

or inside the trainer's own asyncio loop (``async with WorkerLoop(...) as loop:``).

Layers (see :mod:`psq.torch`) ``submit`` their batch statistics to the current step without
waiting, and the statistics of their backward pass either with ``submit_gradient`` or, as
psq's layers do, by writing them later where their submission says
(:class:`~psq.pushes.PendingGradient`: the closing step collects them); a step closes when
``step()`` is called, or by itself when a layer submits a second time, and is pushed in the
background: one message per shard, all layers and their gradients in it.  Steps that close
within ``push_interval_s`` (default 50 ms) of the last message wait in an outbox (a list, under
the loop's lock: a step costs the event loop nothing) and go pooled, exactly, in the next one,
so a fast trainer sends at most 20 messages a second; 0 sends as soon as the last message is
answered.  Messages are spaced further where the loop thread's CPU on each (measured) would take
more than ``push_cpu_share`` (5%) of a core (:mod:`psq.pacing`).  Layers read the
latest history of their layer (moments and gradient means) with ``history(name)``.  When the broker or an aggregator is
away the loop logs once, the layers train on batch statistics and the last history they have,
and it recovers by itself.  No wait anywhere is unbounded.

``mode="sync"`` (against an aggregator started with ``--mode sync --sync-workers N``) instead has
each layer ``exchange`` its statistics and block until the pooled statistics of that step
arrive: SyncBatchNorm's forward, for verification.

This module does not import torch: what layers submit is numpy, or a
:class:`~psq.pushes.Submission` whose ``ready`` callable says when a device-to-host copy has
landed.  The loop's parts: :mod:`psq.loop_thread` (its thread), :mod:`psq.steps` (the step
bookkeeping), :mod:`psq.pushes` (pushes and histories), :mod:`psq.pacing` (when the next
message goes), :mod:`psq.inflight` (the pushes on their way), ``LoopCounters`` (its counts).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import weakref
from typing import Any

from psq.client import Rejected, StatsClient, Unavailable
from psq.config import DEFAULT_FRONTEND
from psq.counters import LoopCounters
from psq.inflight import InFlight
from psq.logs import Throttled
from psq.loop_thread import LoopThread, run_threadsafe
from psq.pacing import PushPacer
from psq.pushes import GradientSubmission, LayerHistory, Pushes, RecordedGradients, Submission
from psq.security import ClientKeys
from psq.stats import Moments
from psq.steps import ClosedStep, ExchangeSteps, StepBook

# A push costs the worker's loop, the broker and the aggregator about a millisecond of CPU each,
# which a fast trainer's step may not.  Steps closer together than this are merged (exactly) into
# one message: at most 20 messages a second per worker, a few steps of staleness more for a fast
# trainer, none for one whose steps take longer (chosen in docs/performance.md, "The push interval").
DEFAULT_PUSH_INTERVAL_S = 0.05
# The most of one core the loop's thread may spend on messages: beyond it the interval lengthens
# (psq.pacing), whatever the model's size or the machine's speed.  5%: what a step's target of
# 1.05x plain leaves; 2.5% cost accuracy (docs/performance.md, "The loop's CPU share").
DEFAULT_PUSH_CPU_SHARE = 0.05


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
        push_interval_s: float = DEFAULT_PUSH_INTERVAL_S,
        push_cpu_share: float = DEFAULT_PUSH_CPU_SHARE,
        keys: ClientKeys | None = None,
    ) -> None:
        if mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', got {mode!r}")
        if dtype not in ("<f4", "<f8"):
            raise ValueError(f"dtype must be '<f4' or '<f8', got {dtype!r}")
        self.frontend, self.job, self.worker, self.mode = frontend, job, worker, mode
        self.timeout_s, self.retries, self.dtype = timeout_s, retries, dtype
        self.sync_timeout_s, self.staleness_timeout_s = sync_timeout_s, staleness_timeout_s
        self._pacer = PushPacer(push_interval_s, push_cpu_share)
        self.keys = keys
        self._lock = threading.Condition()  # guards the steps, the histories and the pushes in flight
        self._steps: StepBook[Submission, GradientSubmission] = StepBook(auto_step)
        self._recorded = RecordedGradients()  # the gradient means backwards wrote into step records
        self._exchanges = ExchangeSteps()
        self._in_flight = InFlight(self._lock)
        self._counters = LoopCounters()
        self._pushes = Pushes(dtype, self._lock, self._counters)
        self._loop: asyncio.AbstractEventLoop | None = None  # where the client runs
        # Closed steps wait here, under the lock, for the next message: one drain task at a time
        # sends them, at most one message per push interval, so a step costs the event loop nothing.
        self._outbox: list[ClosedStep[Submission, GradientSubmission]] = []
        self._accepting = False  # between open and close: a step closed otherwise is dropped
        self._draining = False
        self._sending = 0  # steps in the messages on their way
        self._failures = Throttled(log)  # a push that raised (a bug): once a minute, not every message
        self._hurry: asyncio.Event | None = None  # a flush: send what waits without the interval
        self._host = LoopThread(f"psq-{worker}")
        self._forked = False  # set in a forked child (os.register_at_fork): no getpid per layer call
        _LOOPS.add(self)

    @property
    def push_interval_s(self) -> float:
        """The least time between two messages (steps in between are pooled into the next)."""
        return self._pacer.interval_s

    @property
    def push_gap_s(self) -> float:
        """The time between two messages now: the interval, or longer where their CPU needs it."""
        return self._pacer.gap_s

    @property
    def auto_step(self) -> bool:
        return self._steps.auto_step

    @property
    def client(self) -> StatsClient | None:
        """The client while the loop runs (its ``stats``, its connection), else None."""
        return self._pushes.client

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
        self._hurry = asyncio.Event()
        self._pacer.restart()
        with self._lock:  # a loop started again starts with nothing queued
            self._outbox, self._draining, self._sending, self._accepting = [], False, 0, True
        timeout_s = max(self.timeout_s, self.sync_timeout_s + 1.0) if self.mode == "sync" else self.timeout_s
        # The loop paces its own messages (see _drain): the client sends each push at once.
        self._pushes.client = StatsClient(
            self.frontend, job=self.job, worker=self.worker, timeout_s=timeout_s, retries=self.retries, keys=self.keys
        )
        await self._pushes.client.open()

    async def _close(self) -> None:
        with self._lock:  # first, so no step starts a drain while the ones running are cancelled
            self._accepting = False
        await self._in_flight.cancel()
        with self._lock:  # steps not yet sent are given up, as a push in flight is
            self._outbox, self._draining, self._sending = [], False, 0
            self._recorded.clear()
        if self._pushes.client is not None:
            await self._pushes.client.close()
        self._pushes.client = None

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
            if self.mode == "sync":  # the next exchange of every layer begins the next step
                return self._exchanges.close()
            closed = self._steps.close()
            self._hand_over(closed)
            return closed.number

    def _hand_over(self, closed: ClosedStep[Submission, GradientSubmission] | None) -> None:
        """Queue a closed step for the next message (called with the lock held); wake the event
        loop only when no drain is under way."""
        if closed is None or not closed.entries:
            return
        if not self._accepting or self._loop is None or self._pushes.client is None:
            return
        self._outbox.append(self._recorded.collect(closed))
        if not self._draining:
            self._draining = True
            self._in_flight.hand_over(self._loop, self._drain())

    async def _drain(self) -> None:
        """On the event loop: hand the queued steps, pooled into one message, to a push of their
        own, at most one message per push interval (a flush sends at once); end when nothing is
        queued.  Not waiting for the push's reply keeps each shard's messages independent: the
        client merges what reaches a shard whose last request is still unanswered."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._lock:
                    if not self._outbox:  # nothing waits: the next closed step starts a drain
                        self._draining = False
                        if self._hurry is not None:  # a flush's, answered
                            self._hurry.clear()
                        return
                await self._pace(loop)
                with self._lock:
                    steps, self._outbox = self._outbox, []
                    self._sending += len(steps)
                    self._in_flight.hand_over(loop, self._push(steps))
                # the thread's CPU only where the thread is the loop's own, not a trainer's
                self._pacer.sent(loop.time(), time.thread_time() if self._host.running else None)
        except BaseException:  # cancelled (closing): the next step must start a drain
            with self._lock:
                self._draining = False
            raise

    async def _push(self, steps: list[ClosedStep[Submission, GradientSubmission]]) -> None:
        try:
            await self._pushes.push(steps)
        except Exception as exc:  # a bug, or statistics the wire cannot carry: these steps are lost
            self._failures.error(type(exc), "psq: %d steps could not be pushed: %r", len(steps), exc)
        finally:
            with self._lock:
                self._sending = max(0, self._sending - len(steps))

    async def _pace(self, loop: asyncio.AbstractEventLoop) -> None:
        wait_s = self._pacer.wait_s(loop.time())
        hurry = self._hurry
        if hurry is None:
            return
        if wait_s > 0 and not hurry.is_set():
            # asyncio.TimeoutError: the built-in TimeoutError only from Python 3.11
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hurry.wait(), wait_s)
        hurry.clear()

    def _send_now(self) -> None:
        """Have a drain waiting out the push interval send at once (any thread, lock held)."""
        if self._loop is not None and self._draining:
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        # on the event loop: a drain that ended meanwhile must not leave the next one hurried
        if self._hurry is not None and self._draining:
            self._hurry.set()

    def history(self, name: str) -> LayerHistory | None:
        """The latest history of a layer (None before the first answer)."""
        return self._pushes.histories.get(name)

    def note_staleness(self, steps: int) -> None:
        """Record how old (in steps) the history a layer normalized with was."""
        self._counters.note_staleness(steps)

    def wait_fresh(self, name: str, min_step: int) -> None:
        """Wait (up to ``staleness_timeout_s``) for history of ``name`` from ``min_step`` or later,
        as long as a push that could bring it is still on its way.  Goes on regardless."""
        self._forbid_loop_thread("wait for fresher history")

        def fresh_or_hopeless() -> bool:
            h = self._pushes.histories.get(name)
            return self._in_flight.count == 0 or (h is not None and h.step >= min_step)

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
                loop, self._pushes.exchange(name, number, stats), self.sync_timeout_s + 2 * self.timeout_s + 5.0
            )
        except concurrent.futures.TimeoutError:
            self._pushes.went_away("no pooled statistics in time")
            return None

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the broker names a live shard table (True), or ``timeout_s`` passes."""
        self._forbid_loop_thread("wait for the statistics service")
        loop = self._running()
        client = self._pushes.client
        assert client is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                # shard_count is itself bounded by the client's retries; this only guards against a stall
                run_threadsafe(loop, client.shard_count(), self.timeout_s * (self.retries + 2) + 5.0)
                return True
            except (Unavailable, Rejected, concurrent.futures.TimeoutError):
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
        return False

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every pushed step is answered (or given up); False on timeout."""
        self._forbid_loop_thread("flush")
        with self._lock:
            self._push_open_step()
            self._send_now()
            return self._in_flight.wait(timeout_s)

    async def aflush(self, timeout_s: float = 10.0) -> bool:
        """:meth:`flush` for code running in the loop's own thread."""
        with self._lock:
            self._push_open_step()
            self._send_now()
        return await self._in_flight.drained(timeout_s)

    def _push_open_step(self) -> None:
        if self._steps.is_open:
            self._hand_over(self._steps.close())

    def summary(self) -> dict[str, Any]:
        """The loop's counts (:class:`~psq.counters.LoopCounters`: steps, pushes answered,
        unavailable or rejected, staleness), ``in_flight`` (steps closed and not yet answered or given up) and, while
        it runs, the client's ``stats``."""
        summary = self._counters.summary(self.current_step)
        with self._lock:
            summary["in_flight"] = len(self._outbox) + self._sending
        if self._pushes.client is not None:
            summary["client"] = dict(self._pushes.client.stats)
        return summary

    # -- guards -----------------------------------------------------------------------------------

    def _running(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._pushes.client is None:
            raise RuntimeError("the WorkerLoop is not running: start() it, or enter it with 'async with'")
        return self._loop

    def _forbid_loop_thread(self, what: str) -> None:
        if self._loop is not None and self._loop.is_running() and _running_loop() is self._loop:
            raise RuntimeError(
                f"cannot {what} on the WorkerLoop's own event loop (it would wait for itself); "
                "run the forward pass off the loop, e.g. await asyncio.to_thread(model, x)"
            )

    def _check_process(self) -> None:
        if self._forked:
            raise ForkedLoop(
                "this WorkerLoop belongs to the process that created it; a forked process "
                "(a DataLoader worker, say) must not use it"
            )

    def _forget_after_fork(self) -> None:
        # The child inherits copies of the parent's sockets and thread state: never touch them.
        self._forked = True
        self._loop = self._pushes.client = self._hurry = None
        self._outbox, self._draining, self._sending, self._accepting = [], False, 0, False
        self._host.forget()
        self._in_flight.forget()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


log = logging.getLogger("psq.loop")
_LOOPS: weakref.WeakSet[WorkerLoop] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for loop in list(_LOOPS):
        loop._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
