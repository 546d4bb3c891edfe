"""PSBatchNorm's training step as two custom operators, so ``torch.compile`` keeps it in one graph.

A layer's step talks to its :class:`~psq.loop.WorkerLoop` (the step's bookkeeping, the latest
history, the hand-over of the batch's statistics): traced, each of those would break the graph,
and every new history would recompile it.  Under compilation the layer instead calls
``psq::train_forward``, and autograd ``psq::train_backward``: operators opaque to the compiler
that find their layer by number and run the eager code (:mod:`psq.kernels`), the history read
from the layer's tensors at run time.  Outside compilation the layer does not come here.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Any

import torch

from psq.kernels import FLOAT_STATS, Blend, Saved, gradients, normalize

if TYPE_CHECKING:
    from psq.records import StepRecord
    from psq.torch import PSBatchNorm

_LAYERS: weakref.WeakValueDictionary[int, PSBatchNorm] = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()


def register(layer: PSBatchNorm) -> torch.Tensor:
    """The number the operators find ``layer`` by (held weakly: the layer owns its lifetime), as
    a host tensor: an input to the compiled graph, where an int would be a constant guarded per
    layer (one recompile for each)."""
    number = next(_NUMBERS)
    _LAYERS[number] = layer
    return torch.tensor(number)


def _layer(number: torch.Tensor) -> PSBatchNorm:
    layer = _LAYERS.get(int(number))
    if layer is None:
        raise RuntimeError(f"psq layer {int(number)} no longer exists")
    return layer


@torch.library.custom_op("psq::train_forward", mutates_args=())
def train_forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, layer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's training forward: ``y``, the blended and the batch's mean and biased
    variance, and ``(share, gradient_share, ticket)``: the shares the step blended with and the
    ticket of its record (:meth:`PSBatchNorm.ticket`), float64 on the host."""
    module = _layer(layer)
    used: list[tuple[Saved, Blend]] = []

    def apply(x: torch.Tensor, blend: Blend, record: StepRecord) -> torch.Tensor:
        y, saved = normalize(x, weight, bias, blend, module.eps)
        record.write_moments(saved.mean_b, saved.var_b)
        used.append((saved, blend))
        return y

    module.count_batch()  # here, so that momentum=None reads this step's count
    y = module.train_step(x, apply)
    saved, blend = used[-1]
    # An operator's outputs may not alias each other: with no history the blend is the batch's.
    mean, var = (saved.mean.clone(), saved.var.clone()) if saved.mean is saved.mean_b else (saved.mean, saved.var)
    shares = torch.tensor([blend.share, blend.gradient_share, module.ticket()], dtype=torch.float64)
    return y, mean, var, saved.mean_b, saved.var_b, shares


@train_forward.register_fake
def _(x: torch.Tensor, *_: Any) -> tuple[torch.Tensor, ...]:
    dtype = x.dtype if x.dtype in FLOAT_STATS else torch.float32
    stats = [x.new_empty(x.size(1), dtype=dtype) for _ in range(4)]
    return _like(x), *stats, torch.empty(3, dtype=torch.float64)


@torch.library.custom_op("psq::train_backward", mutates_args=())
def train_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    mean_b: torch.Tensor,
    var_b: torch.Tensor,
    shares: torch.Tensor,
    layer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of input, γ and β (γ's and β's in the statistics' dtype)."""
    module = _layer(layer)
    share, gradient_share, ticket = shares.tolist()
    h = module.device_history
    blend = Blend(share, gradient_share=gradient_share, dy=h.dy, dy_xhat=h.dy_xhat) if h else Blend(share)
    xs = x if x.dtype in FLOAT_STATS else x.float()
    saved = Saved(xs, mean, var, mean_b, var_b)
    sink = module.gradient_sink(int(ticket))
    grad_x, grad_w, grad_b = gradients(g, saved, weight, blend, module.eps, module.gradient, sink)
    return grad_x.to(x.dtype), grad_w, grad_b


@train_backward.register_fake
def _(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    return _like(x), torch.empty_like(mean), torch.empty_like(mean)


def _like(x: torch.Tensor) -> torch.Tensor:
    """An output of the native kernels' layout: channels-last if the input is, else contiguous."""
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    layout = last if last is not None and x.is_contiguous(memory_format=last) and not x.is_contiguous() else None
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout or torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, layer = inputs
    _, mean, var, mean_b, var_b, shares = output
    ctx.save_for_backward(x, weight, mean, var, mean_b, var_b, shares)
    ctx.layer, ctx.has_bias = layer, bias is not None  # torch 2.13's bias=False: a weight, no bias
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx: Any, g: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
    x, weight, mean, var, mean_b, var_b, shares = ctx.saved_tensors
    grad_x, grad_w, grad_b = train_backward(g, x, weight, mean, var, mean_b, var_b, shares, ctx.layer)
    if weight is None:
        return grad_x, None, None, None
    return grad_x, grad_w.to(weight.dtype), grad_b.to(weight.dtype) if ctx.has_bias else None, None


train_forward.register_autograd(_backward, setup_context=_setup_context)
