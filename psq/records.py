"""A layer's statistics of one step, in one host row its forward and backward write and the loop reads.

``[mean_b | var_b | dy | dy_xhat | state]``, ``C`` values each (the variance biased, the
gradient means γ-free) and one, in the dtype of the step's statistics.  The forward writes the
batch's moments; the backward, later, its gradient means and ``state`` (the elements per channel
they average), unless the loop sealed the record first (:class:`psq.pushes.PendingGradient`).
On the CPU psq's kernels write the row themselves (``psq_native::train``); elsewhere
:class:`StepRecord` copies into it, on a GPU from the device without waiting (pinned memory,
and CUDA events the push waits for).

A layer takes a fresh row every step and the loop holds it until the step is answered, so
nothing is copied at the hand-over.  Rows come :data:`ROWS_PER_BLOCK` at a time, their numpy
views made together (:class:`StepRecords`): allocating a tensor and slicing five views costs a
layer call more than its whole per-channel arithmetic at small shapes.  A block is never
reused; the last of its submissions frees it.
"""

from __future__ import annotations

import numpy as np
import torch

from psq.pushes import PendingGradient, Submission

ROWS_PER_BLOCK = 32


class StepRecord:
    """One layer's record of one step: row ``index`` of ``block`` (see the module)."""

    __slots__ = ("_landed", "_moments", "_pending", "_views", "block", "channels", "index")

    def __init__(self, block: torch.Tensor, index: int, views: tuple, on_host: bool) -> None:
        self.block, self.index, self.channels = block, index, (block.size(1) - 1) // 4
        self._views = views
        # on the host, made once; with a device (a ready check of its own) per step, so that
        # a record holds no bound method of itself (a cycle only the garbage collector frees)
        self._pending = PendingGradient(*views[2:]) if on_host else None
        self._landed: list[torch.cuda.Event] = []  # copies from the device not known to have landed
        self._moments: tuple[torch.Tensor, torch.Tensor] | None = None  # on the device, if copied from it

    def submission(self, count: float, images: float, gradient: bool) -> Submission:
        """The record as the loop takes it: the moments, and where the gradient means will be
        (if ``gradient``: the loop keeps this layer's)."""
        views, pending = self._views, self._pending
        if pending is not None:  # on the host
            return Submission(count, views[0], views[1], None, images, pending if gradient else None)
        ready = self._ready
        pending = PendingGradient(*views[2:], ready) if gradient else None
        return Submission(count, views[0], views[1], ready, images, pending)

    @property
    def values(self) -> torch.Tensor:
        return self.block[self.index]

    @property
    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's mean and biased variance as tensors on the step's device."""
        if self._moments is not None:
            return self._moments
        c, values = self.channels, self.values
        return values[:c], values[c : 2 * c]

    def write_moments(self, mean_b: torch.Tensor, var_b: torch.Tensor) -> None:
        """The batch's moments, from a step composed of torch's kernels."""
        self._copy(0, mean_b)
        self._copy(1, var_b)
        self._views[4][0] = 0  # open for the backward's gradient means
        self._moments = (mean_b, var_b)

    def write_gradient(self, count: float, dy: torch.Tensor, dy_xhat: torch.Tensor) -> None:
        """The batch's gradient means (a :data:`psq.kernels.GradientSink`), unless written or sealed."""
        state = self._views[4]
        if state[0] != 0:
            return
        self._copy(2, dy)
        self._copy(3, dy_xhat)
        state[0] = count  # on a GPU before the copies land: the push waits for them

    def _copy(self, field: int, values: torch.Tensor) -> None:
        """``values`` into the row's ``field`` (0 to 3: mean_b, var_b, dy, dy_xhat)."""
        on_host = values.device.type == "cpu"
        if on_host and values.dtype == self.block.dtype:  # the numpy view: cheaper than indexing and copy_
            np.copyto(self._views[field], values.detach().numpy())
            return
        at = field * self.channels
        target = self.values[at : at + self.channels]
        target.copy_(values.detach(), non_blocking=not on_host)
        if on_host:
            return
        landed = torch.cuda.Event()
        landed.record(torch.cuda.current_stream(values.device))  # the stream the copy went on
        self._landed.append(landed)

    def _ready(self) -> bool:
        """Whether every copy from the device has landed."""
        while self._landed and self._landed[0].query():
            self._landed.pop(0)
        return not self._landed


class StepRecords:
    """Where a layer takes a fresh :class:`StepRecord` each step, for statistics of one dtype and device."""

    __slots__ = ("_free", "channels", "device", "dtype")

    def __init__(self, channels: int, dtype: torch.dtype, device: torch.device) -> None:
        self.channels, self.dtype, self.device = channels, dtype, device
        self._free: list[StepRecord] = []

    def take(self) -> StepRecord:
        if not self._free:
            self._free = self._block()
        return self._free.pop()

    def _block(self) -> list[StepRecord]:
        c, on_host = self.channels, self.device.type == "cpu"
        # rows are written by their step's forward before anyone reads them
        block = torch.empty((ROWS_PER_BLOCK, 4 * c + 1), dtype=self.dtype, pin_memory=not on_host)
        rows = block.numpy()
        records = []
        for i in reversed(range(ROWS_PER_BLOCK)):  # taken from the end: in order
            r = rows[i]
            views = (r[:c], r[c : 2 * c], r[2 * c : 3 * c], r[3 * c : 4 * c], r[4 * c :])
            records.append(StepRecord(block, i, views, on_host))
        return records
