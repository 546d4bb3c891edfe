"""When a WorkerLoop's next message may go: its push interval after the last, or later when its
messages cost the loop's thread more CPU than its share.

A message costs the loop's thread CPU (pooling the steps, encoding, sending, reading the reply:
about 2 ms for a 15-layer model on a small CPU), which a trainer beside it on the same cores (and
under the same GIL) pays.  A fixed interval bounds the message rate, not that cost: a model with
more layers, or a slower machine, would pay more.  :class:`PushPacer` measures the thread's CPU
between two messages and spaces them so that the measured cost stays within ``cpu_share`` of the
time between them: ``gap = max(interval_s, min(cost / cpu_share, MAX_GAP_S))``.  Nothing here
reads a clock: the caller passes the loop's time and its thread's CPU time.
"""

from __future__ import annotations

import math

from psq.config import is_core_share

# How quickly the estimate of a message's cost follows a change (the share of the newest one):
# smoothed from the first, so one cold message (the first layouts and histories) moves it little.
COST_WEIGHT = 0.2
# The longest gap the CPU share may ask for: a message's cost grows with the steps it pools, so
# a gap that pools more steps could lengthen itself; past this the trainer pays, not the history.
MAX_GAP_S = 1.0


class PushPacer:
    """The gap before the next message, from the CPU time the last ones cost (see the module)."""

    def __init__(self, interval_s: float, cpu_share: float) -> None:
        if not (interval_s >= 0 and math.isfinite(interval_s)):
            raise ValueError(f"push_interval_s must be a non-negative number of seconds, got {interval_s!r}")
        if not is_core_share(cpu_share):
            raise ValueError(f"push_cpu_share must be in (0, 1], got {cpu_share!r}")
        self.interval_s, self.cpu_share = interval_s, cpu_share
        self.cost_s = 0.0  # the CPU a message costs, a running estimate
        self._last_sent_s = -math.inf
        self._last_cpu_s: float | None = None

    @property
    def gap_s(self) -> float:
        """The least time between two messages now: the interval, or the cost over the share up
        to :data:`MAX_GAP_S` (never below the interval)."""
        return max(self.interval_s, min(self.cost_s / self.cpu_share, MAX_GAP_S))

    def wait_s(self, now_s: float) -> float:
        """How long the next message waits from ``now_s`` (0: it may go)."""
        return max(0.0, self._last_sent_s + self.gap_s - now_s)

    def sent(self, now_s: float, cpu_s: float | None) -> None:
        """A message went at ``now_s``; ``cpu_s`` is the thread's CPU time then (None where the
        thread is not the loop's own, as inside a trainer's asyncio loop: the interval alone)."""
        if cpu_s is not None and self._last_cpu_s is not None:
            cost = max(0.0, cpu_s - self._last_cpu_s)  # everything the thread did since the last one
            self.cost_s += COST_WEIGHT * (cost - self.cost_s)
        self._last_sent_s, self._last_cpu_s = now_s, cpu_s

    def restart(self) -> None:
        """The loop opens again (on a new thread, or in a trainer's loop): nothing measured yet."""
        self.cost_s, self._last_cpu_s = 0.0, None
