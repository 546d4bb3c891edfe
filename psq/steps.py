"""A worker's step bookkeeping: which layers reported in the current step, and when it closes.

No sockets, threads or clocks here: the :class:`~psq.loop.WorkerLoop` calls these under its lock
and pushes what :meth:`StepBook.close` hands it.

* :class:`StepBook` (async mode): layers ``submit`` their batch statistics and ``submit_gradient``
  their backward's; a step closes when ``close`` is called, or by itself (``auto_step``) when a
  layer reports a second time: a layer runs once per step, so its second forward is the next.
* :class:`ExchangeSteps` (sync mode): each layer exchanges once per step; its second exchange
  begins the next step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

S = TypeVar("S")  # a layer's statistics for one step
G = TypeVar("G")  # a layer's backward statistics for one step


@dataclass(frozen=True)
class ClosedStep(Generic[S, G]):
    """A step to push: its number, each layer's statistics, each layer's backward statistics
    (a layer run twice before its step closed, by activation checkpointing, has several), and
    the statistics a layer's second forward in the step replaced (``earlier``)."""

    number: int
    entries: Mapping[str, S]
    gradients: Mapping[str, list[G]] = field(default_factory=dict)
    earlier: Mapping[str, list[S]] = field(default_factory=dict)


class StepBook(Generic[S, G]):
    """The open step of async mode."""

    def __init__(self, auto_step: bool = True) -> None:
        self.auto_step = auto_step
        self.number = 0  # the open step; also how many steps have closed
        self._entries: dict[str, S] = {}
        self._gradients: dict[str, list[G]] = {}
        self._earlier: dict[str, list[S]] = {}

    def enter(self, name: str) -> ClosedStep[S, G] | None:
        """A layer begins its forward: if it already reported in the open step, that step is
        over, and is returned to be pushed."""
        if name in self._entries and self.auto_step:
            return self.close()
        return None

    def submit(self, name: str, stats: S) -> ClosedStep[S, G] | None:
        """Add a layer's statistics to the open step, first closing it (returned) if the layer
        already reported in it."""
        closed = self.enter(name)
        replaced = self._entries.get(name)
        if replaced is not None:  # without auto_step: the last forward's statistics count
            self._earlier.setdefault(name, []).append(replaced)
        self._entries[name] = stats
        return closed

    def submit_gradient(self, name: str, stats: G) -> None:
        """A layer's backward statistics join the open step: its backward runs after its forward
        and before the step closes at its next forward."""
        self._gradients.setdefault(name, []).append(stats)

    def close(self) -> ClosedStep[S, G]:
        """Close the open step.  Gradients that came without any forward in it (``close`` called
        between a forward and its backward) stay for the next step."""
        entries, self._entries = self._entries, {}
        earlier, self._earlier = self._earlier, {}
        number, self.number = self.number, self.number + 1
        if not entries:
            return ClosedStep(number, {})
        gradients, self._gradients = self._gradients, {}
        return ClosedStep(number, entries, gradients, earlier)

    @property
    def is_open(self) -> bool:
        """Whether the open step holds statistics (a flush closes it first)."""
        return bool(self._entries)


class ExchangeSteps:
    """The steps of sync mode, where each layer's forward is one exchange."""

    def __init__(self) -> None:
        self.number = 0
        self._exchanged: set[str] = set()

    def begin(self, name: str) -> int:
        """The step of this layer's exchange: a new one if the layer exchanged in this one."""
        if name in self._exchanged:
            self.close()
        self._exchanged.add(name)
        return self.number

    def close(self) -> int:
        """End the current step (``WorkerLoop.step``); returns its number."""
        number, self.number = self.number, self.number + 1
        self._exchanged.clear()
        return number
