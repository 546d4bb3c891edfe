"""PSBatchNorm's training step: on the CPU psq's own kernels, elsewhere torch's fused ones.

On the CPU the whole step is one autograd operator of :mod:`psq.native` (:func:`fused_step`;
C++, forward and backward each a per-channel reduction then one pass over the elements, the
formulas below fused), or, where that does not apply, :class:`BlendedNorm` calling its forward
and backward operators.  Elsewhere,
or where those cannot be built, the step is composed of torch's native batch-norm kernels.
There the forward is three kernels: ``torch.batch_norm_update_stats`` for the batch's mean and
**biased** variance (one pass, no output), four per-channel operations for the blend with the
history (:func:`blended_moments`, the formula of :func:`psq.stats.mix`), and ``torch.batch_norm``
in inference mode with the blended statistics (one fused pass for the output).  The backward is
torch's native batch-norm backward, with the blend's per-channel factors folded into its
arguments where they fit (see :class:`BlendedNorm`).  Nothing here knows about the loop: the
module (:mod:`psq.torch`) decides what to blend with, and where the batch's statistics go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from psq import native

FLOAT_STATS = (torch.float32, torch.float64)
_native_backward = torch.ops.aten.native_batch_norm_backward


class Blend(NamedTuple):
    """What a step blends with: the history's share of the moments (``share``, with the
    history's ``mean``/``var``, biased) and of the backward's gradient means
    (``gradient_share``, with ``dy``/``dy_xhat``).  The default is no history: plain batch norm.
    (A named tuple: one is made per layer and step, at a quarter of a frozen dataclass's cost.)"""

    share: float = 0.0
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None
    gradient_share: float = 0.0
    dy: torch.Tensor | None = None
    dy_xhat: torch.Tensor | None = None


GradientSink = Callable[[float, torch.Tensor, torch.Tensor], None]


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an ``(N, C, ...)`` tensor, in one native pass."""
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def blended_moments(mean_b: torch.Tensor, var_b: torch.Tensor, blend: Blend) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and biased variance of the merge of history and batch, the history weighing
    ``blend.share`` (:func:`psq.stats.mix`): with ``δ = mB − mH``, ``μ = lerp(mB, mH, a)`` and
    ``σ² = lerp(vB, vH, a) + a(1−a)·δ²``.  With no share, the batch's own tensors."""
    a = blend.share
    if not a:
        return mean_b, var_b
    delta = mean_b - blend.mean
    var = torch.lerp(var_b, blend.var, a).addcmul_(delta, delta, value=a * (1.0 - a))
    return torch.lerp(mean_b, blend.mean, a), var


class BlendedNorm(torch.autograd.Function):
    """Batch norm with the statistics ``blended_moments(batch, history)``; the history is a constant.

    With ``x̂ = r·(x − μ)``, ``r = (σ² + eps)^−½``, ``k = γ·r``, ``n`` elements per channel and the
    batch's gradient means ``gB = Σg/n``, ``ψB = Σg·x̂/n`` (γ-free), three backwards, all batch
    norm's gradient when both shares are 0:

    * cluster: ``dL/dx = k·(g − ḡ − x̂·ψ̄)`` with ``ḡ = lerp(gB, gH, gshare)`` and likewise ``ψ̄``;
      the batch's ``gB, ψB`` go to ``sink``;
    * exact (the derivative with the history constant): the same with ``ḡ = (1 − share)·gB``
      and ``ψ̄ = (1 − share)·ψB``;
    * renorm (Batch Renormalization): batch norm's gradient through the batch statistics with
      the blend's correction ``σB/σ`` a constant.

    Each is one native backward call where it fits (no gradient history: batch norm's own
    backward about ``μ, σ``; renorm: the backward about the batch's statistics with weight
    ``γ·r/rB``), else a native reduction for ``Σg, Σg·x̂`` and one fused pass for
    ``−k·ψ̄·x̂ − k·ḡ`` (``torch.batch_norm`` in inference mode) plus ``k·g``.

    Also returns the batch's mean and biased variance (not differentiable).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        blend: Blend,
        eps: float,
        gradient: str,
        sink: GradientSink | None,
    ) -> tuple[torch.Tensor, ...]:
        y, saved = normalize(x, weight, bias, blend, eps)
        ctx.save_for_backward(weight, *saved)
        # The history's gradient means are read in the backward, after this step's forward: a
        # layer run twice before one backward blends the second's (a constant either way).
        ctx.blend, ctx.eps, ctx.gradient, ctx.sink, ctx.x_dtype = blend, eps, gradient, sink, x.dtype
        ctx.mark_non_differentiable(saved.mean_b, saved.var_b)
        ctx.set_materialize_grads(False)  # the statistics' gradients: None, not zeros allocated per step
        return y, saved.mean_b, saved.var_b

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        if g is None:  # a gradient for the statistics alone (gradcheck asks for one): no gradient
            return None, None, None, None, None, None, None
        weight, *tensors = ctx.saved_tensors
        grad_x, grad_w, grad_b = gradients(g, Saved(*tensors), weight, ctx.blend, ctx.eps, ctx.gradient, ctx.sink)
        wants = ctx.needs_input_grad
        grad_w = _as(grad_w, weight.dtype) if wants[1] else None
        grad_b = _as(grad_b, weight.dtype) if wants[2] else None
        return _as(grad_x, ctx.x_dtype), grad_w, grad_b, None, None, None, None


class Saved(NamedTuple):
    """What a backward needs of its forward: the input (in float32 or float64), the blended
    statistics and the batch's, the variances biased."""

    x: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    mean_b: torch.Tensor
    var_b: torch.Tensor


def normalize(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, blend: Blend, eps: float
) -> tuple[torch.Tensor, Saved]:
    """The forward: the output (in the input's dtype), and what the backward needs."""
    low = x.dtype not in FLOAT_STATS
    with torch.autocast(x.device.type, enabled=False) if low else contextlib.nullcontext():
        xs = x.float() if low else x
        weight, bias = _as(weight, xs.dtype), _as(bias, xs.dtype)
        fused = _native(xs)
        if fused is not None:
            y, mean, var, mean_b, var_b = fused.forward(xs, weight, bias, blend.mean, blend.var, blend.share, eps)
        else:
            mean_b, var_b = batch_stats(xs)
            mean, var = blended_moments(mean_b, var_b, blend)
            y = torch.batch_norm(xs, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    return (y.to(x.dtype) if low else y), Saved(xs, mean, var, mean_b, var_b)


def gradients(
    g: torch.Tensor,
    saved: Saved,
    weight: torch.Tensor | None,
    blend: Blend,
    eps: float,
    gradient: str,
    sink: GradientSink | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward: the gradients of input, γ and β (in the statistics' dtype)."""
    x, mean, var = saved.x, saved.mean, saved.var
    g, weight = _as(g, x.dtype), _as(weight, x.dtype)
    mode = backward_mode(gradient, blend)
    fused = _native(x)
    if fused is not None:
        grad_x, grad_w, grad_b, dy, dy_xhat = fused.backward(
            g, x, weight, mean, var, saved.mean_b, saved.var_b, _MODES.index(mode), blend.share,
            blend.gradient_share, blend.dy, blend.dy_xhat, eps, True,
        )  # fmt: skip
        if sink is not None and mode in KEPT_MODES:
            sink(float(_elements(x)), dy, dy_xhat)
        return grad_x, grad_w, grad_b
    if mode == "renorm":
        return _renorm_backward(g, saved, weight, eps)
    if mode == "batch":
        grad_x, sum_g_xhat, sum_g = _batchnorm_backward(g, x, weight, mean, var, eps)
        _hand_over(sink, x, sum_g, sum_g_xhat)
        return grad_x, sum_g_xhat, sum_g
    return _blended_backward(g, x, weight, mean, var, blend, eps, gradient, sink)


# psq.native's numbering of the backwards
_MODES = ("batch", "cluster", "exact", "renorm")
KEPT_MODES = ("batch", "cluster")  # the backwards whose gradient means the cluster keeps


def fused_step(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    history: torch.Tensor | None,
    blend: Blend,
    eps: float,
    gradient: str,
    records: torch.Tensor,
    index: int,
    keep_gradient: bool,
) -> torch.Tensor | None:
    """The whole training step, forward and backward, as one autograd operator of psq's CPU
    kernels (``psq_native::train``: no Python in the backward), or None where it does not
    apply (another device, half precision, γ or β in another dtype, no kernels, a share of
    history without ``history``).  ``history`` is the layer's ``[mean | var | dy | dy_xhat]``
    rows, which the operator reads in place of the blend's tensors: the caller passes it only
    when the blend was taken from it (a sync-mode blend is not), else None.  It writes the
    batch's moments into row ``index`` of ``records`` (:class:`psq.records.StepRecord`), and,
    if ``keep_gradient``, the backward its gradient means."""
    dtype = x.dtype
    if not x.is_cpu or dtype not in FLOAT_STATS or (blend.share and history is None):
        return None
    if (weight is not None and weight.dtype != dtype) or (bias is not None and bias.dtype != dtype):
        return None
    fused = native.ops()
    if fused is None:
        return None
    name = backward_mode(gradient, blend)
    mode, keep = _MODES.index(name), keep_gradient and name in KEPT_MODES
    share, gradient_share = blend.share, blend.gradient_share
    return fused.train(x, weight, bias, history, records, index, share, gradient_share, eps, mode, keep)


def backward_mode(gradient: str, blend: Blend) -> str:
    """Which backward a step takes: ``"batch"`` (batch norm's own about the forward's ``μ, σ``:
    nothing to blend into its gradient means), ``"cluster"``, ``"exact"`` or ``"renorm"``."""
    if gradient == "renorm":
        return "renorm" if blend.share else "batch"
    if gradient == "cluster":
        return "cluster" if blend.gradient_share else "batch"
    return "exact" if blend.share else "batch"


def _native(x: torch.Tensor) -> Any | None:
    """psq's fused kernels for a CPU tensor (float32 or float64), if they are built."""
    return native.ops() if x.device.type == "cpu" else None


def _as(param: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor in ``dtype``, converted only if it is not (``to`` costs a dispatch even then):
    a bfloat16 layer normalizes in float32."""
    return param if param is None or param.dtype == dtype else param.to(dtype)


def _elements(x: torch.Tensor) -> int:
    return x.numel() // x.size(1)


def _hand_over(sink: GradientSink | None, x: torch.Tensor, sum_g: torch.Tensor, sum_g_xhat: torch.Tensor) -> None:
    """This batch's γ-free gradient means, ``Σg/n`` and ``Σg·x̂/n``, to the layer's sink."""
    if sink is not None:
        n = _elements(x)
        sink(float(n), sum_g / n, sum_g_xhat / n)


def _batchnorm_backward(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm's own backward about ``mean, var``: ``k·(g − gB − x̂·ψB)``, ``Σg·x̂``, ``Σg``."""
    invstd = (var + eps).rsqrt_()
    return _native_backward(g, x, weight, None, None, mean, invstd, True, eps, [True, True, True])


def _renorm_backward(
    g: torch.Tensor, saved: Saved, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm's backward about the batch's statistics with weight ``γ·r/rB`` (the blend's
    correction a constant); γ's gradient ``Σg·x̂ = (r/rB)·Σg·x̂B + r·(mB − μ)·Σg``."""
    r, r_b = (saved.var + eps).rsqrt_(), (saved.var_b + eps).rsqrt_()
    ratio = r / r_b
    scaled = ratio * weight if weight is not None else ratio
    grad_x, sum_g_xhat_b, sum_g = _native_backward(
        g, saved.x, scaled, None, None, saved.mean_b, r_b, True, eps, [True, True, True]
    )
    grad_w = torch.addcmul(ratio * sum_g_xhat_b, r * (saved.mean_b - saved.mean), sum_g)
    return grad_x, grad_w, sum_g


def _blended_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    blend: Blend,
    eps: float,
    gradient: str,
    sink: GradientSink | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k·(g − ḡ − x̂·ψ̄)`` for the cluster's or the exact gradient means."""
    # the reduction alone, about μ and σ (CUDA's kernel wants them as the saved statistics)
    invstd = (var + eps).rsqrt_()
    _, sum_g_xhat, sum_g = _native_backward(g, x, None, None, None, mean, invstd, True, eps, [False, True, True])
    n = _elements(x)
    dy, dy_xhat = sum_g / n, sum_g_xhat / n
    if gradient == "cluster":
        if sink is not None:
            sink(float(n), dy, dy_xhat)
        dy = torch.lerp(dy, blend.dy, blend.gradient_share)
        dy_xhat = torch.lerp(dy_xhat, blend.dy_xhat, blend.gradient_share)
    else:
        dy, dy_xhat = dy.mul_(1.0 - blend.share), dy_xhat.mul_(1.0 - blend.share)
    k = invstd * weight if weight is not None else invstd
    neg_k = -k
    # −k·ψ̄·x̂ − k·ḡ per element, x̂ computed about μ inside the kernel (well conditioned)
    grad_x = torch.batch_norm(x, neg_k * dy_xhat, neg_k * dy, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return grad_x.addcmul_(g, k.view(shape)), sum_g_xhat, sum_g
