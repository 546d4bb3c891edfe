"""Sync mode: a step's reply waits until every worker's statistics for that step arrived.

For verification against SyncBatchNorm: the reply carries the pooled moments of the step's
global batch, so every worker normalizes with the same statistics.  Pure bookkeeping; the
aggregator owns the sockets and the store.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psq.protocol import Push
from psq.stats import LayerMoments, Scratch, accumulate_into

StepKey = tuple[str, bytes, int]  # (job, layout id, step)
MAX_PENDING = 4096
COMPLETED_KEPT = 256  # finished steps remembered to answer retried pushes


@dataclass
class Step:
    started: float
    arrivals: dict[tuple[str, int], tuple[Any, Push]] = field(
        default_factory=dict
    )  # (worker, session) -> (route, push)

    def pooled(self) -> tuple[LayerMoments, np.ndarray]:
        """Exact moments of the union of every arrival's batch, and its images per layer."""
        layout = next(iter(self.arrivals.values()))[1].layout
        acc = LayerMoments(np.zeros(layout.layers), np.zeros(layout.total), np.zeros(layout.total))
        images = np.zeros(layout.layers)
        scratch = Scratch(layout.total)
        for _, push in self.arrivals.values():
            accumulate_into(acc, LayerMoments(push.counts, push.means, push.var), layout.widths, scratch)
            images += push.images
        return acc, images


@dataclass(frozen=True)
class Finished:
    """A step's pooled moments, per layer counts, and the versions and images seen after its update."""

    counts: np.ndarray
    means: np.ndarray
    var: np.ndarray
    versions: np.ndarray
    seen: np.ndarray
    complete: bool


class SyncSteps:
    def __init__(self, workers: int, timeout_s: float) -> None:
        self.workers, self.timeout_s = workers, timeout_s
        self.pending: OrderedDict[StepKey, Step] = OrderedDict()
        self.completed: OrderedDict[StepKey, Finished] = OrderedDict()

    @staticmethod
    def key_of(push: Push) -> StepKey:
        """The step a push belongs to: every worker's push of it has the same key."""
        return (push.job, push.layout.id, push.step)

    def answered(self, push: Push) -> Finished | None:
        """The finished step of a retried push, to answer again (None if not finished)."""
        return self.completed.get(self.key_of(push))

    def waiting(self, push: Push) -> bool:
        """Whether the step of ``push`` still waits for some worker."""
        return self.key_of(push) in self.pending

    def add(self, push: Push, route: Any, now: float) -> tuple[StepKey, Step | None]:
        """Record an arrival; the step is returned once all workers are in.

        A retried push (same worker and session) replaces the earlier route, since a retry
        comes over a fresh socket, and is not counted twice.
        """
        key = self.key_of(push)
        step = self.pending.get(key)
        if step is None:
            step = self.pending[key] = Step(now)
        step.arrivals[(push.worker, push.session)] = (route, push)
        if len(step.arrivals) >= self.workers:
            return key, self.pending.pop(key)
        return key, None

    def expired(self, now: float) -> list[tuple[StepKey, Step]]:
        """Steps past their timeout (answered with what arrived), and the oldest beyond the cap."""
        out = []
        while self.pending:
            key, step = next(iter(self.pending.items()))
            if now - step.started < self.timeout_s and len(self.pending) <= MAX_PENDING:
                break
            out.append((key, self.pending.pop(key)))
        return out

    def finish(self, key: StepKey, result: Finished) -> None:
        self.completed[key] = result
        if len(self.completed) > COMPLETED_KEPT:
            self.completed.popitem(last=False)
