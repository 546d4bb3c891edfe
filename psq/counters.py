"""Message and error counters with per-second rates over a recent window.

A service bumps counters on its hot path (a dict increment) and samples totals on its clock
tick; rates come from the samples, so reading them costs the hot path nothing.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any


class Counters:
    def __init__(self, window_s: float = 10.0) -> None:
        self.messages: Counter[str] = Counter()  # by command
        self.errors: Counter[str] = Counter()  # by error code
        self.bytes: Counter[str] = Counter()  # received, by command
        self._window_s = window_s
        self._samples: deque[tuple[float, int, int]] = deque()

    def sample(self, now: float) -> None:
        self._samples.append((now, sum(self.messages.values()), sum(self.errors.values())))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window_s:
            self._samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(messages per second, errors per second) over the window."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, m0, e0), (t1, m1, e1) = self._samples[0], self._samples[-1]
        dt = max(t1 - t0, 1e-9)
        return (m1 - m0) / dt, (e1 - e0) / dt

    def report(self) -> dict[str, object]:
        per_s, errors_per_s = self.rates()
        return {
            "messages": dict(self.messages),
            "errors": dict(self.errors),
            "bytes": dict(self.bytes),
            "messages_per_s": round(per_s, 2),
            "errors_per_s": round(errors_per_s, 2),
        }


class Histogram:
    """Fixed buckets, cumulative at read time: one bisect per observation on the hot path."""

    def __init__(self, edges: tuple[float, ...]) -> None:
        self.edges = edges
        self.counts = [0] * (len(edges) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.edges, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        """Prometheus style: (upper bound, observations at or below it), ending with +Inf."""
        out, running = [], 0
        for edge, count in zip((*map(str, self.edges), "+Inf"), self.counts):
            running += count
            out.append((edge, running))
        return out


@dataclass
class LoopCounters:
    """A worker loop's counts: its steps pushed and what became of them (steps, not messages:
    steps that wait out the push interval share one), the gradient statistics it left out (one
    per layer's backward in a step), and how stale the histories its layers used were."""

    pushes: int = 0
    answered: int = 0
    unavailable: int = 0
    rejected: int = 0
    nonfinite_gradients: int = 0
    staleness_waits: int = 0
    staleness_timeouts: int = 0
    staleness_sum: int = 0
    staleness_n: int = 0

    def note_staleness(self, steps: int) -> None:
        self.staleness_sum += steps
        self.staleness_n += 1

    def summary(self, steps: int) -> dict[str, Any]:
        """The counts after ``steps`` closed steps, with the mean staleness (None before any)."""
        counts = asdict(self)
        total, n = counts.pop("staleness_sum"), counts.pop("staleness_n")
        return {"steps": steps, **counts, "mean_staleness_steps": total / n if n else None}
