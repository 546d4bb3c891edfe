"""What a worker sends and what comes back: its layers' statistics, and the cluster's history.

:class:`Pushes` sends closed steps, pooled exactly into one message (or, in sync mode, one
layer's exchange), through the :class:`~psq.client.StatsClient` on the event loop, counts what
became of them, and keeps the latest history of every layer it brought back.  When the service is away it logs once, and
once when it answers again; a refusal that repeats every step is logged once a minute.

This module does not import torch: what layers submit is numpy, or a :class:`Submission`
whose ``ready`` callable says when a device-to-host copy has landed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from psq.client import PushResult, Rejected, StatsClient, Unavailable
from psq.counters import LoopCounters
from psq.logs import Throttled
from psq.stats import GradientMeans, Moments, layer_weights, pool_gradients, pool_means, pool_moments
from psq.steps import ClosedStep

log = logging.getLogger("psq.loop")

POLL_S = 0.0005  # how often a step waits for device copies to land
LANDING_TIMEOUT_S = 10.0


class Submission(NamedTuple):
    """One layer's batch statistics for one step: count, mean, biased variance (1-d numpy), and
    the images (batch items) they came from (None: each element is one).

    ``ready`` (if given) returns True once the arrays hold their values — a CUDA event for a
    device-to-host copy that was started without blocking.  (Named tuples, as each layer makes
    them every step: a quarter of a frozen dataclass's cost.)
    """

    count: float
    mean: np.ndarray
    var: np.ndarray
    ready: Callable[[], bool] | None = None
    images: float | None = None
    gradient: PendingGradient | None = None  # where this step's backward writes its statistics


class PendingGradient(NamedTuple):
    """Where a layer's backward writes the gradient means of a step after its forward submitted
    (numpy views of the layer's step record, :class:`psq.records.StepRecord`): ``dy``, ``dy_xhat``
    and ``state``, one value: 0 until the backward wrote them, then the elements per channel they
    average; −1 once sealed (a backward that comes later writes nothing).  ``ready`` as for
    :class:`Submission`."""

    dy: np.ndarray
    dy_xhat: np.ndarray
    state: np.ndarray
    ready: Callable[[], bool] | None = None

    def written(self) -> GradientSubmission | None:
        """The means, once the backward wrote them."""
        count = float(self.state[0])
        return GradientSubmission(count, self.dy, self.dy_xhat, self.ready) if count > 0 else None

    def seal(self) -> None:
        """Let no backward write here any more (the step it belonged to is gone)."""
        if self.state[0] == 0:
            self.state[0] = -1


class GradientSubmission(NamedTuple):
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


# Closes an empty record may wait for its backward: a layer run several times before one
# backward (a shared block, an unrolled loop) closes a step at each run (auto_step).
RECORD_WAIT_STEPS = 16


class RecordedGradients:
    """Collects, as each step closes, the gradient means its layers' backwards wrote into their
    step records.  A record still empty then (its backward has not run: the step was closed
    between a forward and its backward, or the layer ran again first) waits, and joins the
    first step with a forward that closes after its backward; still empty after
    :data:`RECORD_WAIT_STEPS` closes (a forward without a backward), it is sealed.

    Called under the loop's lock by whatever closes a step.  A step is closed by a layer's
    forward, ``step()`` or a flush: on the thread that runs the backwards (on the CPU autograd
    runs them on the caller's thread), or after them; psq's kernels write a record's state after
    its means, so a record read as written is complete.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[str, PendingGradient, int]] = []

    def collect(self, step: ClosedStep[Submission, GradientSubmission]) -> ClosedStep[Submission, GradientSubmission]:
        """``step`` with the gradient means written into its records (and into earlier steps'
        records since the last close)."""
        gradients = {name: list(gs) for name, gs in step.gradients.items()}
        waiting = []
        ours = [(name, s.gradient, 0) for name, s in _submissions(step) if s.gradient is not None]
        for name, pending, waited in [*self._waiting, *ours]:
            written = pending.written()
            if written is not None:
                gradients.setdefault(name, []).append(written)
            elif waited >= RECORD_WAIT_STEPS:
                pending.seal()
            else:
                waiting.append((name, pending, waited + 1))
        self._waiting = waiting
        return ClosedStep(step.number, step.entries, gradients)

    def clear(self) -> None:
        """Seal and forget every record waiting (the loop closes)."""
        for _, pending, _ in self._waiting:
            pending.seal()
        self._waiting = []


def _submissions(step: ClosedStep[Submission, GradientSubmission]) -> list[tuple[str, Submission]]:
    """Every forward's submission in a step, those a second forward of the layer replaced too."""
    return [*((n, s) for n, ss in step.earlier.items() for s in ss), *step.entries.items()]


class Pushes:
    """A worker's pushes through its client (set while it is open), and the histories they brought."""

    def __init__(self, dtype: str, lock: threading.Condition, counters: LoopCounters) -> None:
        self.dtype, self.counters = dtype, counters
        self.client: StatsClient | None = None
        self.histories: dict[str, LayerHistory] = {}  # written under ``lock``, which is notified
        self._lock = lock
        self._away = False
        self._refusals = Throttled(log)  # a refusal repeats every step it stays true

    async def push(self, steps: Sequence[ClosedStep[Submission, GradientSubmission]]) -> None:
        """Push closed steps as one message per shard, those whose device copies landed in time:
        each layer's statistics pooled exactly over them, and its gradients that are finite."""
        deadline = time.monotonic() + LANDING_TIMEOUT_S
        steps = [c for c in steps if await landed(_parts(c), c.number, deadline)]
        if not steps:
            return
        number = steps[-1].number
        stats, images = pooled_moments(steps)
        gradients: dict[str, list[GradientSubmission]] = {}
        for c in steps:
            for name, gs in c.gradients.items():
                gradients.setdefault(name, []).extend(gs)
        grads, dropped = finite_gradients(number, gradients)
        self.counters.nonfinite_gradients += dropped
        # a step whose gradients were all left out still asks for the cluster's gradient history
        what = f"step {number}'s statistics"
        await self.send(number, stats, images, grads if gradients else None, what, refusal=None, steps=len(steps))

    async def exchange(self, name: str, number: int, stats: Submission) -> tuple[Moments, bool] | None:
        if not await landed([stats], number, time.monotonic() + LANDING_TIMEOUT_S):
            return None
        images = {name: stats.images} if stats.images is not None else {}
        moments = {name: Moments(stats.count, stats.mean, stats.var)}
        what = f"layer {name}'s statistics of step {number}"
        result = await self.send(number, moments, images, None, what, refusal=name)
        return None if result is None else (result[name], result.complete)

    async def send(
        self,
        number: int,
        stats: Mapping[str, Moments],
        images: Mapping[str, float],
        gradients: Mapping[str, GradientMeans] | None,
        what: str,
        refusal: str | None,
        steps: int = 1,
    ) -> PushResult | None:
        """Push and keep the history that comes back; None, counted and logged, when the
        service is away or refuses (``what`` was refused; ``refusal`` keys its throttled log).
        ``steps``: how many of the worker's steps the statistics pool (each one is counted)."""
        assert self.client is not None
        self.counters.pushes += steps
        try:
            result = await self.client.push(number, stats, self.dtype, images=images, gradients=gradients)
        except Unavailable as exc:
            self.counters.unavailable += steps
            if exc.partial is not None:
                self.record(number, exc.partial, back=False)
            self.went_away(str(exc))
            return None
        except Rejected as exc:
            self.counters.rejected += steps
            # one line per refusal and layer a minute: the step number changes every step
            self._refusals.error((exc.code, refusal), "psq: the aggregator refused %s: %s", what, exc)
            return None
        self.record(number, result, answered=steps)
        return result

    def record(self, number: int, result: PushResult, answered: int = 1, back: bool = True) -> None:
        """Keep the history a reply carried (``back``: a complete answer, not a partial one, to
        ``answered`` steps)."""
        if back:
            self.counters.answered += answered
        versions = result.versions
        with self._lock:
            # Replies of a shard arrive in order (one request in flight per shard), so the latest
            # wins, even with a lower version: a restarted aggregator counts from its snapshot.
            # Merged pushes share one reply: it keeps the newest step's label.
            for name in result:
                old = self.histories.get(name)
                if old is None or old.version != versions[name] or old.step < number:
                    # a reply to a push without gradients carries no gradient history: keep the last
                    gradient = result.gradient(name) or (old.gradient if old is not None else None)
                    self.histories[name] = LayerHistory(
                        result[name], versions[name], number, gradient, result.seen(name)
                    )
            self._lock.notify_all()
        if back and self._away:
            self._away = False
            log.warning("psq: the statistics service answers again")

    def went_away(self, why: str) -> None:
        if not self._away:
            self._away = True
            log.warning(
                "psq: statistics service unreachable (%s); training goes on with batch statistics "
                "and the last history received",
                why,
            )


async def landed(entries: list[Submission | GradientSubmission], number: int, deadline: float) -> bool:
    """Wait for a step's device copies, polling (a CUDA event cannot be awaited) so the event
    loop stays free; False (the step is dropped, not pushed half-copied) if they have not landed
    by ``deadline`` (``time.monotonic()``)."""
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


def _parts(step: ClosedStep[Submission, GradientSubmission]) -> list[Submission | GradientSubmission]:
    return [*step.entries.values(), *(g for gs in step.gradients.values() for g in gs)]


def pooled_moments(
    steps: Sequence[ClosedStep[Submission, GradientSubmission]],
) -> tuple[dict[str, Moments], dict[str, float]]:
    """Each layer's moments pooled over the steps, and the images behind them (for the layers
    whose submissions name them; a part that does not counts each element as an image)."""
    parts: dict[str, list[Submission]] = {}
    for c in steps:
        for name, s in c.entries.items():
            parts.setdefault(name, []).append(s)
    stats: dict[str, Moments] = {}
    for names in _by_parts(parts):
        stats.update(_pooled_moments(names, [parts[n] for n in names]))
    images = {
        name: sum(s.count if s.images is None else s.images for s in ss)
        for name, ss in parts.items()
        if any(s.images is not None for s in ss)
    }
    return stats, images


def finite_gradients(
    number: int, gradients: Mapping[str, list[GradientSubmission]]
) -> tuple[dict[str, GradientMeans], int]:
    """Each layer's backward statistics, pooled, and how many of them were left out for NaN or
    infinity (a mixed-precision step whose loss scale overflowed: its moments still go).  A layer
    none of whose parts is finite is not sent."""
    every = [a for parts in gradients.values() for p in parts for a in (p.dy, p.dy_xhat)]
    if every and np.isfinite(np.concatenate(every)).all():  # the usual case: one check for all
        out: dict[str, GradientMeans] = {}
        for names in _by_parts(gradients):
            out.update(_pooled_gradients(names, [gradients[n] for n in names]))
        return out, 0
    out, dropped = {}, 0
    for name, parts in gradients.items():
        means = [GradientMeans(p.count, p.dy, p.dy_xhat) for p in parts]
        pooled = pool_gradients(means)
        if not _finite(pooled):  # keep the parts that are finite
            kept = [m for m in means if _finite(m)]
            dropped += len(means) - len(kept)
            log.debug("psq: gradient statistics of %s in steps up to %d are not finite; not sent", name, number)
            if not kept:
                continue
            pooled = pool_gradients(kept)
        out[name] = pooled
    return out, dropped


_Part = Submission | GradientSubmission  # what a layer's step handed the loop, forward or backward


def _by_parts(parts: Mapping[str, Sequence[object]]) -> list[list[str]]:
    """The layers grouped by how many parts they pool (all of them alike, as a rule): each group
    pools in a few numpy calls for all its layers, not a few per layer."""
    groups: dict[int, list[str]] = {}
    for name, ss in parts.items():
        groups.setdefault(len(ss), []).append(name)
    return list(groups.values())


def _pooled_moments(names: list[str], parts: list[list[Submission]]) -> dict[str, Moments]:
    """Layers of as many parts each, pooled together (their channels end to end)."""
    if len(parts[0]) == 1:
        return {n: Moments(ss[0].count, ss[0].mean, ss[0].var) for n, ss in zip(names, parts)}
    weights, totals, split = _layer_weights(parts, "mean")
    mean, var = pool_moments(weights, _stacked(parts, "mean"), _stacked(parts, "var"))
    means, variances = np.split(mean, split), np.split(var, split)
    return {n: Moments(float(t), m, v) for n, t, m, v in zip(names, totals, means, variances)}


def _pooled_gradients(names: list[str], parts: list[list[GradientSubmission]]) -> dict[str, GradientMeans]:
    """The gradient means of layers of as many parts each, pooled together."""
    if len(parts[0]) == 1:
        return {n: GradientMeans(ss[0].count, ss[0].dy, ss[0].dy_xhat) for n, ss in zip(names, parts)}
    weights, totals, split = _layer_weights(parts, "dy")
    dy = np.split(pool_means(weights, _stacked(parts, "dy")), split)
    dy_xhat = np.split(pool_means(weights, _stacked(parts, "dy_xhat")), split)
    return {n: GradientMeans(float(t), a, b) for n, t, a, b in zip(names, totals, dy, dy_xhat)}


def _layer_weights(parts: Sequence[Sequence[_Part]], field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel each part's share of its layer's count, each layer's pooled count, and where
    the layers' channels (the widths of ``field``) split."""
    widths = np.array([np.size(getattr(ss[0], field)) for ss in parts])
    counts = np.array([[float(s.count) for s in ss] for ss in parts]).T  # (parts, layers)
    weights, totals = layer_weights(counts, widths)
    return weights, totals, np.cumsum(widths)[:-1]


def _stacked(parts: Sequence[Sequence[_Part]], field: str) -> np.ndarray:
    """``field`` of every layer end to end, one row per part: ``(parts, channels)``, float64."""
    return np.array([np.concatenate([getattr(s, field) for s in row]) for row in zip(*parts)], dtype=np.float64)


def _finite(g: GradientMeans) -> bool:
    return bool(np.isfinite(g.dy).all() and np.isfinite(g.dy_xhat).all())
