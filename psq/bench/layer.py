"""``psq bench layer``: forward + backward of one PSBatchNorm against ``nn.BatchNorm2d``.

Side by side in one run, per shape (from a tiny 1x16x8x8 to ResNet-50's layers at batch 8 and
32) and memory format (contiguous, ``channels_last``), float32:

* ``bn``: ``nn.BatchNorm2d`` in training mode, the reference;
* ``psq``: a converted layer with a history (the default weights, no warm-up left): the blend,
  the cluster gradient, the hand-over of both statistics to the loop and the loop's
  bookkeeping, against a live broker and aggregator.  The loop closes a step every 53 calls,
  as for a ResNet-50's 53 layers, and pushes with its default interval: the push's cost
  belongs to ``psq bench step``, a layer's share of it is here;
* ``psq w=0``: the same path with ``history_weight=0`` (batch norm's statistics, psq's
  bookkeeping): what psq costs before any blending;
* ``psq torch``: ``psq`` with its step composed of torch's kernels (what runs where psq's own,
  :mod:`psq.native`, cannot be built), for the gain of the fused kernels in the same run;
* ``floor``: torch's own batch-norm kernels, forward and backward, called from the cheapest
  Python ``autograd.Function`` (no blend, no loop): what any layer whose step is written in
  Python costs, psq's included, before it does anything of its own;
* with ``--compile``, ``bn`` and ``psq`` under ``torch.compile`` (inductor) too, each against
  its eager self.

Each call is ``torch.autograd.grad`` of the output for the input, weight and bias: nothing
accumulates between calls.  Times are medians of interleaved rounds, in µs per call.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from psq import native
from psq.bench.services import cluster
from psq.bench.timing import emit, interleaved
from psq.loop import WorkerLoop
from psq.torch import PSBatchNorm

SMALL = ((1, 16, 8, 8), (8, 16, 32, 32), (8, 64, 8, 8), (32, 64, 16, 16))
RESNET50 = tuple((n, c, s, s) for n in (8, 32) for c, s in ((64, 56), (256, 56), (512, 28), (1024, 14), (2048, 7)))
SHAPES = {"small": SMALL, "resnet50": RESNET50, "all": SMALL + RESNET50}
LAYERS_PER_STEP = 53  # ResNet-50's batch-norm layers: one push per this many layer calls
_native_backward = torch.ops.aten.native_batch_norm_backward
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int, int]
    memory_format: str

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        fmt = FORMATS[self.memory_format]
        x = (torch.randn(self.shape, generator=gen) * 2 + 1).to(memory_format=fmt).requires_grad_()
        return x, torch.randn(self.shape, generator=gen).to(memory_format=fmt)


class _InPython(torch.autograd.Function):
    """``nn.BatchNorm2d``'s training kernels through a Python Function: the floor of the bench."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        return *_native_backward(g, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True]), None


class Floor(nn.BatchNorm2d):
    """A batch norm whose training step is :class:`_InPython`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _InPython.apply(x, self.weight, self.bias, self.eps)


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, loop: WorkerLoop | None) -> Callable[[], object]:
    params = (x, layer.weight, layer.bias)
    calls = itertools.count(1)

    def call() -> object:
        out = torch.autograd.grad(layer(x), params, g)
        if loop is not None and next(calls) % LAYERS_PER_STEP == 0:
            loop.step()
        return out

    return call


def _on_torch_kernels(call: Callable[[], object]) -> Callable[[], object]:
    def composed() -> object:
        was = native.set_enabled(False)
        try:
            return call()
        finally:
            native.set_enabled(was)

    return composed


def _with_history(layer: nn.Module, call: Callable[[], object], loop: WorkerLoop, timeout_s: float = 30.0) -> None:
    """Step until the layer's history holds gradient means too (two round trips)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        call()
        loop.step()
        h = loop.history(layer.name)
        if h is not None and h.gradient is not None:
            return
        time.sleep(0.01)
    raise RuntimeError(f"no history for {layer.name} within {timeout_s:g} s: is the aggregator up?")


def measure(case: Case, loop: WorkerLoop, rounds: int, min_round_s: float, with_compile: bool) -> dict[str, float]:
    """Median µs per forward + backward of each variant for one case."""
    x, g = case.inputs()
    c = case.shape[1]
    name = f"{'x'.join(map(str, case.shape))}-{case.memory_format}"
    layers: dict[str, nn.Module] = {
        "bn": nn.BatchNorm2d(c),
        "psq": PSBatchNorm(c, name=f"{name}-psq", loop=loop, warmup_images=0),
        "psq w=0": PSBatchNorm(c, name=f"{name}-w0", loop=loop, history_weight=0.0),
        "psq torch": PSBatchNorm(c, name=f"{name}-torch", loop=loop, warmup_images=0),
        "floor": Floor(c),
    }
    if with_compile:
        torch._dynamo.reset()  # each case's layers are new modules: no recompile limit across cases
        layers["bn compiled"] = torch.compile(nn.BatchNorm2d(c))
        layers["psq compiled"] = torch.compile(PSBatchNorm(c, name=f"{name}-c", loop=loop, warmup_images=0))
    calls = {k: _step(m, x, g, loop if k.startswith("psq") else None) for k, m in layers.items()}
    calls["psq torch"] = _on_torch_kernels(calls["psq torch"])
    for key, layer in layers.items():
        if key.startswith("psq"):
            _with_history(layer, calls[key], loop)
    per_round = _calls_per_round(calls["bn"], min_round_s)
    samples = interleaved(calls, rounds, per_round)
    return {k: float(np.median(s)) * 1e6 for k, s in samples.items()}


def _calls_per_round(call: Callable[[], object], min_round_s: float) -> int:
    t0 = time.perf_counter()
    call()
    return max(1, int(min_round_s / max(time.perf_counter() - t0, 1e-6)))


def run(shapes: str, rounds: int, min_round_s: float, with_compile: bool, as_json: bool) -> None:
    cases = [Case(s, f) for s in SHAPES[shapes] for f in FORMATS]
    headers = ["shape", "format", "bn µs", "psq µs", "psq / bn", "w=0 / bn", "psq torch / bn", "floor / bn"]
    if with_compile:
        headers += ["compiled bn µs", "compiled psq µs", "compiled psq / bn", "compiled psq / eager bn"]
    rows = []
    # auto_step off: a layer called again closes no step; the bench closes one every 53 calls
    with cluster(1) as frontend, WorkerLoop(frontend, job="bench-layer", worker="w0", auto_step=False) as loop:
        loop.wait_ready(30.0)
        for case in cases:
            us = measure(case, loop, rounds, min_round_s, with_compile)
            row = ["x".join(map(str, case.shape)), case.memory_format, us["bn"], us["psq"], us["psq"] / us["bn"]]
            row += [us["psq w=0"] / us["bn"], us["psq torch"] / us["bn"], us["floor"] / us["bn"]]
            if with_compile:
                row += [us["bn compiled"], us["psq compiled"], us["psq compiled"] / us["bn compiled"]]
                row += [us["psq compiled"] / us["bn"]]
            rows.append(row)
    emit(
        f"psq bench layer: forward + backward of one layer, float32, {torch.get_num_threads()} threads, "
        f"median of {rounds} interleaved rounds",
        headers,
        rows,
        as_json,
    )
