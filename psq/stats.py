"""Batch-normalization statistics: moments, their exact merge, a decaying history, the blend.

Everything here is pure numpy and vectorized over channels.  A whole step's statistics for
many layers is the same thing as one layer's: a :class:`Moments` whose arrays are the layers'
channels laid end to end, with each layer's count repeated over its channels (see
:class:`psq.layout.Layout`).  So the aggregator and the client update every layer of a step in
a handful of numpy calls, never in a Python loop over layers.

Variances are **biased** throughout (divided by the count), as batch normalization normalizes
with them; torch's running buffers use the unbiased convention, see :func:`unbiased_var`.
Accumulation is float64 whatever the input dtype.

The backward pass has batch statistics of its own: per channel, the means of ``∂L/∂y`` and of
``∂L/∂y·x̂`` (:class:`GradientMeans`).  They merge and decay like the moments' means.

The pure functions (:func:`merge`, :func:`blend`) allocate their result.  The in-place kernels
(:func:`merge_into`, :func:`decay_into`, :func:`accumulate_into`, :func:`accumulate_means_into`)
are what the hot paths call with preallocated :class:`Scratch` so that a message costs no
allocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

F64 = NDArray[np.float64]
HALF_LIFE_UNITS = ("images", "elements")  # what ages a history: batch items, or per-channel values
GRADIENTS = ("cluster", "renorm", "exact")  # how a layer's backward treats the statistics (psq.torch)
# Floor for a divisor that is a count: 0/_TINY == 0, so empty sets contribute nothing
# without a masked divide (which would allocate a mask per call).
_TINY = np.finfo(np.float64).tiny


@dataclass(frozen=True)
class Moments:
    """Per-channel count, mean and **biased** variance.

    ``count`` is the number of elements each channel's moments summarize (``N*H*W`` for a
    2-d batch-norm layer): a scalar or an array broadcastable to ``mean``.  Counts may be
    fractional, since a history's samples lose weight as they age.  The arrays are not
    copied; the in-place kernels of this module write into them.
    """

    count: Any
    mean: Any
    var: Any

    @classmethod
    def of(cls, x: ArrayLike, axis: int | tuple[int, ...]) -> Moments:
        """Moments of ``x`` reduced over ``axis`` (an axis or axes), in float64."""
        x = np.asarray(x)
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        count = float(np.prod([x.shape[a] for a in axes]))
        return cls(count, x.mean(axis=axes, dtype=np.float64), x.var(axis=axes, dtype=np.float64))

    @classmethod
    def zeros(cls, channels: int) -> Moments:
        """``channels`` channels with count 0: an empty history, owning its float64 arrays."""
        return cls(np.zeros(channels), np.zeros(channels), np.zeros(channels))

    def owned(self) -> Moments:
        """A float64 copy with a per-channel count array, safe to update in place."""
        mean = np.array(self.mean, dtype=np.float64)
        count = np.array(np.broadcast_to(np.asarray(self.count, np.float64), mean.shape))
        return Moments(count, mean, np.array(self.var, dtype=np.float64))


@dataclass(frozen=True)
class LayerMoments:
    """A whole step's statistics for many layers, as flat arrays.

    ``counts`` has one value per layer; ``mean`` and ``var`` (biased) hold every layer's
    channels end to end, in the order of a :class:`psq.layout.Layout`, whose ``widths`` give
    each layer's channel count.  Counts, decay and merge ratios are computed per layer; only
    the final mixing touches every channel.
    """

    counts: Any
    mean: Any
    var: Any


@dataclass(frozen=True)
class GradientMeans:
    """One layer's backward statistics: per channel, the means of ``∂L/∂y`` and of ``∂L/∂y·x̂``.

    Batch norm's input gradient is ``∂L/∂x = γ·(∂L/∂y − mean(∂L/∂y) − x̂·mean(∂L/∂y·x̂))/σ``:
    these two means are the batch statistics of the backward.  ``γ`` factors out of them, so they
    are kept without it and a history of them stays valid while ``γ`` trains.  ``count`` is the
    number of elements each mean summarizes, as for :class:`Moments`.
    """

    count: Any
    dy: Any
    dy_xhat: Any


def pool_gradients(parts: list[GradientMeans]) -> GradientMeans:
    """The exact pooled means of several sets of gradient means (weighted by their counts)."""
    if len(parts) == 1:
        return parts[0]
    weights, total = _pool_weights(parts)
    dy = pool_means(weights, np.array([p.dy for p in parts], dtype=np.float64))
    dy_xhat = pool_means(weights, np.array([p.dy_xhat for p in parts], dtype=np.float64))
    return GradientMeans(total, dy, dy_xhat)


def pool(parts: list[Moments]) -> Moments:
    """The exact pooled moments of several sets with scalar counts (as :func:`merge` of them all),
    in one pass over the stacked sets: a worker's steps sent as one message."""
    if len(parts) == 1:
        return parts[0]
    weights, total = _pool_weights(parts)
    means = np.array([p.mean for p in parts], dtype=np.float64)
    return Moments(total, *pool_moments(weights, means, np.array([p.var for p in parts], dtype=np.float64)))


def pool_moments(weights: F64, means: F64, var: F64) -> tuple[F64, F64]:
    """The pooled mean and biased variance of ``k`` sets stacked as rows (``(k, C)``), each
    row weighing its share of the pooled count (``weights``, ``(k, 1)`` or per channel ``(k, C)``):
    ``μ = Σ wᵢ·μᵢ``, ``σ² = Σ wᵢ·(σᵢ² + (μᵢ − μ)²)``."""
    mean = (weights * means).sum(axis=0)
    return mean, (weights * (var + (means - mean) ** 2)).sum(axis=0)


def pool_means(weights: F64, rows: F64) -> F64:
    """The pooled mean of ``k`` sets of means stacked as rows, weighted as for :func:`pool_moments`."""
    return (weights * rows).sum(axis=0)


def layer_weights(counts: F64, widths: Any) -> tuple[F64, F64]:
    """For ``k`` sets of several layers laid end to end (``counts``: ``(k, L)``, a count per set
    and layer; ``widths``: each layer's channels), each set's share of its layer's pooled count
    per channel (``(k, C)``), and each layer's pooled count."""
    totals = counts.sum(axis=0)
    return np.repeat(counts / np.maximum(totals, _TINY), widths, axis=1), totals


def _pool_weights(parts: list[Any]) -> tuple[F64, float]:
    """Each set's share of the pooled count (a column, to scale its rows), and that count: one
    layer of :func:`layer_weights`."""
    weights, totals = layer_weights(np.array([[float(p.count)] for p in parts]), [1])
    return weights, float(totals[0])


@dataclass(frozen=True)
class LayerGradients:
    """:class:`GradientMeans` of many layers as flat arrays, like :class:`LayerMoments`."""

    counts: Any
    dy: Any
    dy_xhat: Any


class Scratch:
    """Preallocated float64 work arrays for the in-place kernels."""

    __slots__ = ("a", "b", "w")

    def __init__(self, shape: int | tuple[int, ...]) -> None:
        self.a = np.empty(shape)
        self.b = np.empty(shape)
        self.w = np.empty(shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.a.shape


def merge(a: Moments, b: Moments) -> Moments:
    """Exact pooled moments of two sets (Chan et al.), as a new :class:`Moments`.

    Equals :meth:`Moments.of` of the concatenated data; associative and commutative.  A set
    with count 0 contributes nothing.
    """
    shape = np.broadcast_shapes(np.shape(a.mean), np.shape(b.mean))
    acc = Moments(
        np.array(np.broadcast_to(np.asarray(a.count, np.float64), shape)),
        np.array(np.broadcast_to(np.asarray(a.mean, np.float64), shape)),
        np.array(np.broadcast_to(np.asarray(a.var, np.float64), shape)),
    )
    merge_into(acc, b, Scratch(shape))
    return acc


def mix_into(mean: F64, var: F64, mean_b: Any, var_b: Any, w: Any, scratch: Scratch) -> None:
    """``(mean, var) ← mix(1 − w, (mean, var), (mean_b, var_b))`` in place, allocating nothing.

    ``w`` is the batch's share.  With ``d = mB − m``: ``m += w·d`` and
    ``v += w·(vB − v) + w(1−w)·d²`` — the merge of two sets when ``w = nB/(nA + nB)``.
    """
    d, t = scratch.a, scratch.b
    np.subtract(mean_b, mean, out=d)
    np.subtract(var_b, var, out=t)
    t *= w
    var += t
    np.multiply(d, w, out=t)
    mean += t
    t *= d  # w·d²
    np.subtract(1.0, w, out=d)
    t *= d
    var += t


def merge_into(acc: Moments, b: Moments, scratch: Scratch) -> None:
    """Merge ``b`` into ``acc`` in place: ``acc`` holds float64 arrays of one shape (a count per
    channel); ``b``'s fields broadcast to it."""
    w = scratch.w
    np.add(acc.count, b.count, out=acc.count)
    np.maximum(acc.count, _TINY, out=w)
    np.divide(b.count, w, out=w)  # 0 where both sets are empty: they contribute nothing
    mix_into(acc.mean, acc.var, b.mean, b.var, w, scratch)


def decay_into(history: Moments, arriving: Any, half_life: float, scratch: Scratch) -> None:
    """Age ``history`` in place by the arrival of ``arriving`` samples: counts × 2^(−S/h)."""
    np.multiply(history.count, decay(arriving, half_life, out=scratch.a), out=history.count)


def decay(arriving: Any, half_life: float, out: np.ndarray | None = None) -> Any:
    """``2^(−S/h)``: how much a history's count keeps when ``S`` more samples arrive."""
    t = np.multiply(arriving, -1.0 / half_life, out=out)
    return np.exp2(t, out=t if out is not None else None)


def accumulate_into(acc: LayerMoments, b: LayerMoments, widths: np.ndarray, scratch: Scratch, kept: Any = None) -> None:
    """Merge a step of many layers into ``acc`` in place; with ``kept`` (per layer, from
    :func:`decay`), age ``acc``'s counts by it first.

    The history update ``H ← merge(scale(H, 2^(−S/h)), B)`` for every layer at once (or, with
    nothing kept, the exact pooled merge).  ``acc`` holds float64 arrays; nothing is allocated
    per channel.
    """
    mix_into(acc.mean, acc.var, b.mean, b.var, _arrival_shares(acc.counts, b.counts, widths, kept), scratch)


def accumulate_means_into(
    acc: LayerGradients, b: LayerGradients, widths: np.ndarray, scratch: Scratch, kept: Any = None
) -> None:
    """:func:`accumulate_into` for gradient means: ``m ← m + (nB/n)·(mB − m)`` per channel, after
    ageing ``acc``'s counts by ``kept``."""
    share = _arrival_shares(acc.counts, b.counts, widths, kept)
    for mean, arriving in ((acc.dy, b.dy), (acc.dy_xhat, b.dy_xhat)):
        t = scratch.a
        np.subtract(arriving, mean, out=t)
        t *= share
        mean += t


def _arrival_shares(counts: np.ndarray, arriving: Any, widths: np.ndarray, kept: Any) -> np.ndarray:
    """Age and add to ``counts`` in place; the arrivals' share of each layer, per channel."""
    if kept is not None:
        counts *= kept
    counts += arriving
    share = np.divide(arriving, np.maximum(counts, _TINY))
    # np.repeat expands the per-layer shares 5x faster than np.take into a preallocated array.
    return np.repeat(share, widths)


class History:
    """Exponentially weighted history of moments, the half-life counted in samples.

    On each update with batch moments ``B``: ``H ← merge(scale(H, 2^(−nB/h)), B)``, where
    ``scale`` multiplies only the count.  A batch's samples thus weigh ``2^(−S/h)`` where ``S``
    is the number of samples that arrived after it, whoever sent them: the decay counts
    samples, not messages, steps or workers.  Samples are the moments' count unit (``N*H*W``
    per channel for a 2-d layer).  ``version`` grows by one with every update.
    """

    def __init__(self, half_life: float, channels: int | None = None) -> None:
        if not half_life > 0 or not np.isfinite(half_life):
            raise ValueError(f"half_life must be a positive finite number of samples, got {half_life!r}")
        self.half_life = float(half_life)
        self.version = 0
        self._state = Moments.zeros(channels) if channels is not None else None
        self._scratch = Scratch(channels) if channels is not None else None

    @property
    def moments(self) -> Moments:
        """The current history (a copy); count 0 before any update."""
        if self._state is None:
            return Moments(0.0, 0.0, 0.0)
        return self._state.owned()

    def update(self, batch: Moments) -> None:
        if self._state is None:
            self._state = Moments.zeros(np.shape(batch.mean))
            self._scratch = Scratch(np.shape(batch.mean))
        assert self._scratch is not None
        decay_into(self._state, batch.count, self.half_life, self._scratch)
        merge_into(self._state, batch, self._scratch)
        self.version += 1


def blend_weight(n_history: Any, n_batch: Any, weight: float) -> Any:
    """The history's share ``a`` of the statistics a worker normalizes with.

    The history's count is capped at ``c = min(nH, nB·w/(1−w))`` so that it makes up at most
    a fraction ``w`` of the result; ``a = c/(c + nB)``, and 0 when there is no history.
    """
    c = history_cap(n_history, n_batch, weight)
    if isinstance(c, float) and isinstance(n_batch, float):  # a layer's step: no numpy per call
        return c / max(c + n_batch, _TINY)
    return c / np.maximum(c + n_batch, _TINY)


def warmed_up(weight: float, seen: float, warmup: float) -> float:
    """The history weight while the job warms up: ``w·min(1, S/W)`` after ``S`` of the ``W``
    warm-up images.  Early in training the weights move fastest and a history goes stale
    soonest; the ramp keeps it from dominating then."""
    return weight * min(1.0, seen / warmup) if warmup > 0 else weight


def history_cap(n_history: Any, n_batch: Any, weight: float) -> Any:
    """``c = min(nH, nB·w/(1−w))``: the part of the history's count a blend uses."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"history weight must be in [0, 1), got {weight!r}")
    if isinstance(n_history, float) and isinstance(n_batch, float):
        return min(n_history, n_batch * (weight / (1.0 - weight)))
    return np.minimum(n_history, np.multiply(n_batch, weight / (1.0 - weight)))


def mix(a: Any, mean_h: Any, var_h: Any, mean_b: Any, var_b: Any) -> tuple[Any, Any]:
    """Mean and biased variance of the merge of history and batch, the history weighing ``a``.

    Only arithmetic operators, so the same formula serves numpy arrays here and torch tensors
    in :mod:`psq.torch` (where the history is a constant for autograd).  With ``a = 0`` the
    result is the batch's moments exactly.
    """
    d = mean_b - mean_h
    mean = a * mean_h + (1.0 - a) * mean_b
    var = a * var_h + (1.0 - a) * var_b + (a * (1.0 - a)) * (d * d)
    return mean, var


def blend(history: Moments, batch: Moments, weight: float) -> Moments:
    """The statistics a worker normalizes with: the capped history merged with the batch.

    With ``a`` from :func:`blend_weight`: ``mean = a·mH + (1−a)·mB`` and
    ``var = a·vH + (1−a)·vB + a(1−a)(mB−mH)²``; ``weight = 0`` returns the batch exactly.
    """
    a = blend_weight(history.count, batch.count, weight)
    mean, var = mix(
        a,
        np.asarray(history.mean, np.float64),
        np.asarray(history.var, np.float64),
        np.asarray(batch.mean, np.float64),
        np.asarray(batch.var, np.float64),
    )
    return Moments(history_cap(history.count, batch.count, weight) + np.asarray(batch.count, np.float64), mean, var)


def remove(whole: Moments, part: Moments) -> Moments:
    """The moments of ``whole`` without ``part`` (which it contains): the inverse of :func:`merge`.

    With ``r = nP/nW``: ``mR = (mW − r·mP)/(1 − r)`` and
    ``vR = (vW − r·vP − r(1−r)(mP − mR)²)/(1 − r)``, clipped at 0 against rounding.  Nothing
    remains (count 0, the part's moments) when the part is the whole.
    """
    n_rest = np.maximum(np.asarray(whole.count, np.float64) - part.count, 0.0)
    r = np.divide(part.count, np.maximum(np.asarray(whole.count, np.float64), _TINY))
    keep = np.maximum(1.0 - r, _TINY)
    mean = np.where(n_rest > 0, (whole.mean - r * part.mean) / keep, part.mean)
    d = part.mean - mean
    var = np.where(n_rest > 0, (whole.var - r * part.var - r * (1.0 - r) * d * d) / keep, part.var)
    return Moments(n_rest, mean, np.maximum(var, 0.0))


def unbiased_var(moments: Moments) -> Any:
    """The variance in torch's running-buffer convention: ``var·n/(n−1)``, biased when n ≤ 1."""
    n = np.asarray(moments.count, np.float64)
    return np.where(n > 1.0, moments.var * (n / np.maximum(n - 1.0, _TINY)), moments.var)
