"""``PSBatchNorm``: batch norm that normalizes with a blend of the cluster's history and the batch.

Imported only by those who use torch (``import psq`` does not import it).

In training, a layer computes its batch moments, hands them to the :class:`~psq.loop.WorkerLoop`
without waiting, and normalizes with the blend of the batch moments and the latest history the
loop received for this layer (the formula of :func:`psq.stats.mix`, fused into an autograd
Function; tests check it against :func:`psq.stats.blend`), the history weighing at most
``history_weight`` (:func:`psq.stats.blend_weight`).  The backward has batch statistics of its
own, the per-channel means of ``∂L/∂y`` and ``∂L/∂y·x̂`` (:class:`psq.stats.GradientMeans`):
by default (``gradient="cluster"``) they too are blended with the cluster's history of them,
weighing at most ``gradient_history_weight``, and the backward writes the batch's into the
step's record the loop reads (:mod:`psq.records`), without waiting.  Both histories are
constants for autograd.  With no history yet, or ``history_weight=0``, the layer is exactly
``nn.BatchNorm``, forward and backward.

In evaluation, it normalizes with ``running_mean`` / ``running_var``, which hold the cluster's
history (variance in torch's unbiased convention), not a per-worker average: a checkpoint
loads into a plain ``nn.BatchNorm*d``.

``convert_batchnorm`` / ``revert_batchnorm`` swap a model's batch-norm layers in and out, like
``nn.SyncBatchNorm.convert_sync_batchnorm``.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from psq import ops
from psq.kernels import FLOAT_STATS, Blend, BlendedNorm, GradientSink, batch_stats, fused_step
from psq.loop import WorkerLoop
from psq.pushes import LayerHistory
from psq.records import StepRecord, StepRecords
from psq.stats import GRADIENTS, Moments, blend_weight, remove, unbiased_var, warmed_up

# Defaults chosen on digits settings (a) and (b), then checked on (c), (d) and a ResNet: docs/accuracy.md.
DEFAULT_HISTORY_WEIGHT = 0.9
DEFAULT_WARMUP_IMAGES = 1024.0
TICKETS_KEPT = 64  # compiled steps' records a backward can still find (PSBatchNorm.ticket)
# A training step's normalization: writes the batch's moments into the record, returns y
Apply = Callable[[torch.Tensor, "Blend", StepRecord], torch.Tensor]
_BY_DIMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_TORCH_HAS_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters  # torch >= 2.13
# Each loop's layers by name: a name is one layer's statistics on the wire, so two live layers
# on one loop must not share it (two models converted against one loop both have a layer "1").
_NAMES: weakref.WeakKeyDictionary[WorkerLoop, weakref.WeakValueDictionary[str, PSBatchNorm]] = (
    weakref.WeakKeyDictionary()
)


class PSBatchNorm(_BatchNorm):
    """Batch norm over ``(N, C, ...)`` inputs (2-D to 5-D) sharing statistics through psq.

    The arguments of ``nn.BatchNorm*d`` (``num_features, eps, momentum, affine,
    track_running_stats, device, dtype, bias``, every value of each), and psq's, by keyword:

    * ``history_weight`` in [0, 1): the largest share of the cluster's history in the
      statistics a training step normalizes with (0: plain batch norm, forward and backward);
    * ``gradient_history_weight`` in [0, 1): the same for the backward's statistics (default:
      ``history_weight``);
    * ``gradient``: how the input gradient treats the statistics.  ``"cluster"`` (default):
      batch norm's gradient ``γ·(∂L/∂y − ḡ − x̂·ψ̄)/σ`` with the blended ``μ, σ`` of the forward
      and the means ``ḡ`` of ``∂L/∂y`` and ``ψ̄`` of ``∂L/∂y·x̂`` blended with the cluster's
      history of them (γ factors out of batch norm's two means: psq keeps them without it).
      For comparison: ``"renorm"`` backpropagates through the batch statistics alone, scaled
      by the blend's correction (Batch Renormalization), and ``"exact"`` gives the exact
      derivative with the history constant;
    * ``warmup_images``: both weights ramp up from 0 over the job's first this many images
      (counted by the aggregator, every worker's), while the weights move fastest (0: none);
    * ``max_staleness``: if set, a step whose history is older than that many steps waits
      (up to the loop's ``staleness_timeout_s``) for fresher history, then goes on;
    * ``name``: the layer's name on the wire, unique among the loop's layers
      (``convert_batchnorm`` uses the module path, after its ``prefix``);
    * ``loop``: the :class:`~psq.loop.WorkerLoop`; without one the layer is ``nn.BatchNorm``.

    ``momentum`` only matters before the first history arrives (and in sync mode): then the
    running buffers are updated from the batch as ``nn.BatchNorm`` does.  In training with a
    loop, an empty batch returns the empty output and sends nothing; a batch of one value per
    channel (whose variance does not exist) normalizes with the history alone, and raises, as
    ``nn.BatchNorm`` does, while there is none.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        history_weight: float = DEFAULT_HISTORY_WEIGHT,
        gradient_history_weight: float | None = None,
        warmup_images: float = DEFAULT_WARMUP_IMAGES,
        gradient: str = "cluster",
        max_staleness: int | None = None,
        name: str | None = None,
        loop: WorkerLoop | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **_bias_option(bias)
        )
        if affine and not bias and not _TORCH_HAS_BIAS:
            self.register_parameter("bias", None)
        if gradient_history_weight is None:
            gradient_history_weight = history_weight
        for what, w in (("history_weight", history_weight), ("gradient_history_weight", gradient_history_weight)):
            if not 0.0 <= w < 1.0:
                raise ValueError(f"{what} must be in [0, 1), got {w!r}")
        if history_weight == 0 and gradient_history_weight:
            raise ValueError("history_weight=0 is plain batch norm: a gradient history needs history_weight > 0")
        if not 0 <= warmup_images < float("inf"):
            raise ValueError(f"warmup_images must be a non-negative number, got {warmup_images!r}")
        if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 0):
            raise ValueError(f"max_staleness must be None or a non-negative integer, got {max_staleness!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        self.history_weight = history_weight
        self.gradient_history_weight = gradient_history_weight
        self.warmup_images = warmup_images
        self.max_staleness = max_staleness
        self.gradient = gradient
        self.name = name or f"bn{id(self):x}"
        self.loop = loop
        if loop is not None:
            _claim(loop, self)
        self.origin: type[nn.Module] | None = None  # the class convert_batchnorm replaced
        self._input_dims: int | None = None
        self._history: _DeviceHistory | None = None
        # Training forwards not yet in num_batches_tracked: a tensor add per layer call costs as
        # much as the small shapes' whole arithmetic, so the count joins the buffer when it is
        # read through the layer (the attribute, state dicts, train()/eval(), .to()); iterating
        # buffers() directly, or DDP's buffer broadcast (psq models pass ddp_buffer_sync(False)),
        # sees it as of the last such read.
        self._untracked_batches = 0
        self._record: StepRecord | None = None  # the last training step's
        self._records: StepRecords | None = None
        self._tickets: dict[int, StepRecord | None] = {}  # the compiled steps' records (ticket())
        self._next_ticket = 0
        self._op = ops.register(self)  # how torch.compile's operators find this layer

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input of 2 to 5 dimensions, got {input.dim()}-D")

    def extra_repr(self) -> str:
        psq = (
            f"history_weight={self.history_weight}, gradient_history_weight={self.gradient_history_weight}, "
            f"warmup_images={self.warmup_images:g}, gradient={self.gradient}, name={self.name!r}"
        )
        return f"{super().extra_repr()}, {psq}"

    def __getattr__(self, name: str) -> Any:
        # buffers are looked up here (nn.Module keeps them out of __dict__)
        if name == "num_batches_tracked" and self.__dict__.get("_untracked_batches"):
            self._track_batches()
        return super().__getattr__(name)

    def count_batch(self) -> None:
        """One more training forward for num_batches_tracked (added to the buffer when it is read)."""
        if self.track_running_stats:
            self.__dict__["_untracked_batches"] += 1

    def _track_batches(self) -> None:
        untracked, self.__dict__["_untracked_batches"] = self.__dict__.get("_untracked_batches", 0), 0
        tracked = self._buffers.get("num_batches_tracked")
        if untracked and tracked is not None:
            with torch.no_grad():
                tracked.add_(untracked)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "num_batches_tracked":  # a count set anew: the forwards before it are in it
            self.__dict__["_untracked_batches"] = 0
        super().__setattr__(name, value)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> PSBatchNorm:
        self._track_batches()  # before the buffer is replaced by its converted copy
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._track_batches()  # the loaded count replaces the buffer, pending forwards included
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self) -> dict[str, Any]:
        # A copy of the model (deepcopy, pickle) carries no threads or sockets.
        state = super().__getstate__()
        return {**state, "loop": None, "_history": None, "_record": None, "_records": None, "_tickets": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, default in (
            ("_untracked_batches", 0),
            ("_record", None),
            ("_records", None),
            ("_tickets", {}),
            ("_next_ticket", 0),
        ):
            self.__dict__.setdefault(key, default)  # a layer pickled before these existed
        self._op = ops.register(self)  # a copy is another layer to the operators

    def train(self, mode: bool = True) -> PSBatchNorm:
        self._track_batches()
        if not mode:  # evaluation uses the freshest cluster statistics, whatever DDP broadcast
            self._fill_buffers()
        return super().train(mode)

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        dims = x.dim()
        if dims != self._input_dims:
            self._input_dims = dims
        if not self.training or self.loop is None:  # nn.BatchNorm's own, with every option
            return super().forward(x)
        if x.numel() == 0:  # nothing to measure: no statistics sent, the history left alone
            return self._empty(x)
        if torch.compiler.is_compiling():  # the loop's work runs in one operator
            return ops.train_forward(x, self.weight, self.bias, self._op)[0]
        self.count_batch()
        return self.train_step(x, self._eager)

    def train_step(self, x: torch.Tensor, apply: Apply) -> torch.Tensor:
        """A training forward with the loop: find what to blend with, normalize with ``apply``,
        hand the batch's statistics to the loop (the backward's into the step's record)."""
        assert self.loop is not None
        count = float(x.numel() // x.size(1))
        if self.loop.mode == "sync":
            return _sync_forward(self, x, count, apply)
        self.loop.enter(self.name)
        h = self._fresh_history(x)
        if count == 1 and (h is None or not self.history_weight):
            raise _one_value_error(x)
        blend = Blend() if h is None else history_blend(self, h, count)
        # nn.Module's __setattr__ costs a layer call several µs: these are plain attributes
        record = self.__dict__["_record"] = self._new_record(x)
        y = apply(x, blend, record)
        self.loop.submit(self.name, record.submission(count, float(x.size(0)), self.keeps_gradient()))
        if h is None:  # no cluster statistics: keep running ones as nn.BatchNorm does
            self._momentum_update(*record.moments, count)
        return y

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        """The empty output of an empty batch, still connected to γ and β for autograd."""
        if self.loop is not None and self.loop.mode == "sync":
            # every worker's step must arrive for the others' to complete: skipping one would
            # shift this worker's step numbers from theirs for the rest of the job
            raise ValueError(
                "an empty batch in sync mode: every worker must send each step; use async mode, which skips the batch"
            )
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def _new_record(self, x: torch.Tensor) -> StepRecord:
        """A fresh record for this step's statistics (in the dtype of the step's statistics)."""
        dtype, device = x.dtype, x.device
        dtype = dtype if dtype in FLOAT_STATS else torch.float32
        records = self._records
        if records is None or records.dtype != dtype or records.device != device:
            records = self.__dict__["_records"] = StepRecords(self.num_features, dtype, device)
        return records.take()

    def _eager(self, x: torch.Tensor, blend: Blend, record: StepRecord) -> torch.Tensor:
        keep, held = self.keeps_gradient(), self._history
        rows = held.rows if held is not None and blend.mean is held.mean else None  # sync's blend: not the history
        params = self._parameters  # not through nn.Module's __getattr__: a layer call reads them twice
        weight, bias = params.get("weight"), params.get("bias")
        y = fused_step(x, weight, bias, rows, blend, self.eps, self.gradient, record.block, record.index, keep)
        if y is not None:
            return y
        sink = record.write_gradient if keep else None
        y, mean_b, var_b = BlendedNorm.apply(x, weight, bias, blend, self.eps, self.gradient, sink)
        record.write_moments(mean_b, var_b)
        return y

    @property
    def device_history(self) -> _DeviceHistory | None:
        """The history the layer last blended with, on its device."""
        return self._history

    def keeps_gradient(self) -> bool:
        """Whether the loop keeps this layer's gradient means: for the cluster gradient."""
        return self.gradient == "cluster" and self.loop is not None and self.loop.mode == "async"

    def ticket(self) -> int:
        """A number for the last training step's record, by which a compiled backward finds it
        (:mod:`psq.ops`: its operators see tensors, not the record).  The last
        :data:`TICKETS_KEPT` are kept: forwards run ahead of their backwards by fewer."""
        number = self.__dict__["_next_ticket"] = self._next_ticket + 1
        self._tickets[number] = self._record
        if len(self._tickets) > TICKETS_KEPT:
            del self._tickets[next(iter(self._tickets))]
        return number

    def gradient_sink(self, ticket: int) -> GradientSink | None:
        """Where the backward of the step ``ticket`` names writes its gradient means, if they are kept."""
        record = self._tickets.get(ticket)
        return record.write_gradient if record is not None and self.keeps_gradient() else None

    def _fresh_history(self, x: torch.Tensor) -> _DeviceHistory | None:
        loop = self.loop
        assert loop is not None
        h = loop.history(self.name)
        step = loop.current_step
        if self.max_staleness is not None and (h is None or step - h.step > self.max_staleness):
            loop.wait_fresh(self.name, step - self.max_staleness)
            h = loop.history(self.name)
        if h is None or h.moments.mean.size != self.num_features:  # none yet, or another layer's
            return None
        loop.note_staleness(step - h.step)
        return self._load(h, x.device, x.dtype if x.dtype in FLOAT_STATS else torch.float32)

    def _load(self, h: LayerHistory, device: torch.device, dtype: torch.dtype) -> _DeviceHistory:
        """The layer's device copy of ``h`` in the dtype of the step's statistics (the input's,
        float32 for a half-precision one), refreshed in place when its version is new."""
        held = self._history
        if held is None or held.device != device or held.dtype != dtype:
            held = self._history = _DeviceHistory(self.num_features, dtype, device)
        if held.version != h.version:
            held.load(h)
        return held

    def _fill_buffers(self) -> None:
        """Write the latest cluster history into the running buffers (variance unbiased).

        Done when they are read, not every step: on ``eval()`` and when saving a state dict.  In
        sync mode the buffers are running averages of the pooled steps, as SyncBatchNorm keeps.
        """
        if self.loop is None or self.loop.mode == "sync":
            return
        h = self.loop.history(self.name)
        if h is None or not self.track_running_stats or self.running_mean is None:
            return
        if h.moments.mean.size != self.num_features:  # another layer's: never applied
            return
        dtype = self.running_mean.dtype
        with torch.no_grad():
            self.running_mean.copy_(torch.tensor(np.asarray(h.moments.mean), dtype=dtype))
            self.running_var.copy_(torch.tensor(np.asarray(unbiased_var(h.moments)), dtype=dtype))

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self._fill_buffers()
        self._track_batches()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _momentum_update(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """nn.BatchNorm's running-average update, for when no cluster history is available."""
        if not self.track_running_stats or self.running_mean is None:
            return
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / (count - 1.0)) if count > 1 else var
        with torch.no_grad():
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def _sync_forward(layer: PSBatchNorm, x: torch.Tensor, count: float, apply: Apply) -> torch.Tensor:
    """Normalize with the step's pooled statistics: every worker's batch, SyncBatchNorm's forward.

    The others' moments (the pooled set without this batch) are a constant; gradients flow
    through this worker's batch with its share of the pooled count.
    """
    assert layer.loop is not None
    with torch.no_grad():
        mean_b, var_b = batch_stats(x if x.dtype in FLOAT_STATS else x.float())
    record = layer._new_record(x)
    record.write_moments(mean_b, var_b)
    answer = layer.loop.exchange(layer.name, record.submission(count, float(x.size(0)), gradient=False))
    own = Moments(count, mean_b.cpu().double().numpy(), var_b.cpu().double().numpy())
    # An incomplete answer (the step timed out, or this push came late) may not contain this
    # batch: removing it would extrapolate; another layer's statistics are never applied.
    # Batch statistics are the safe answer then.
    if (
        answer is None
        or not answer[1]
        or float(answer[0].count) <= count
        or np.asarray(answer[0].mean).size != layer.num_features
    ):
        if count == 1:
            raise _one_value_error(x)
        y = apply(x, Blend(), record)
        layer._momentum_update(*record.moments, count)
        return y
    pooled = Moments(
        float(answer[0].count), np.asarray(answer[0].mean, np.float64), np.asarray(answer[0].var, np.float64)
    )
    others = remove(pooled, own)
    share = float(others.count) / float(pooled.count)
    to = dict(dtype=mean_b.dtype, device=mean_b.device)
    y = apply(x, Blend(share, torch.tensor(others.mean, **to), torch.tensor(others.var, **to)), record)
    layer._momentum_update(torch.tensor(pooled.mean, **to), torch.tensor(pooled.var, **to), float(pooled.count))
    return y


class BlendPolicy(Protocol):
    """A layer's settings for how much history to blend (PSBatchNorm's)."""

    history_weight: float
    gradient_history_weight: float
    warmup_images: float
    gradient: str


class HistoryView(Protocol):
    """A layer's history as a step blends with it: its tensors, counts and the job's clock."""

    mean: torch.Tensor
    var: torch.Tensor  # biased
    dy: torch.Tensor
    dy_xhat: torch.Tensor
    count: float
    gradient_count: float
    seen: float


def history_blend(policy: BlendPolicy, h: HistoryView, count: float) -> Blend:
    """What a step of ``count`` elements per channel blends with: the shares of ``h``, capped by
    the (warmed-up) history weights."""
    weight = warmed_up(policy.history_weight, h.seen, policy.warmup_images)
    # one value per channel has no variance of its own: the history alone normalizes it
    share = float(blend_weight(h.count, count, weight)) if count > 1 else 1.0
    if not (h.gradient_count > 0 and policy.gradient == "cluster"):
        return Blend(share, h.mean, h.var)
    gradient_weight = warmed_up(policy.gradient_history_weight, h.seen, policy.warmup_images)
    gradient_share = float(blend_weight(h.gradient_count, count, gradient_weight))
    return Blend(share, h.mean, h.var, gradient_share, h.dy, h.dy_xhat)


class _DeviceHistory:
    """A layer's history on its device, in tensors allocated once and overwritten in place by
    each new version (once per version, not per step): moments, then gradient means once the
    aggregator has them.  On a GPU the host side is a pinned buffer copied without waiting."""

    def __init__(self, channels: int, dtype: torch.dtype, device: torch.device) -> None:
        self.device, self.dtype = device, dtype  # as given: a tensor's own getters cost a step more
        self.rows = torch.zeros((4, channels), dtype=dtype, device=device)
        self.mean, self.var, self.dy, self.dy_xhat = self.rows.unbind(0)  # var biased
        self._host = self.rows if device.type == "cpu" else torch.empty_like(self.rows, device="cpu").pin_memory()
        self._copied: torch.cuda.Event | None = None
        self.version, self.seen, self.count, self.gradient_count = -1, 0.0, 0.0, 0.0

    def load(self, h: LayerHistory) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # the last copy out of the pinned buffer is done: reuse it
        host = self._host.numpy()
        np.copyto(host[0], h.moments.mean, casting="same_kind")
        np.copyto(host[1], h.moments.var, casting="same_kind")
        g = h.gradient
        if g is not None:
            np.copyto(host[2], g.dy, casting="same_kind")
            np.copyto(host[3], g.dy_xhat, casting="same_kind")
        if self._host is not self.rows:
            self.rows.copy_(self._host, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.version, self.seen, self.count = h.version, h.seen, float(h.moments.count)
        self.gradient_count = float(g.count) if g is not None else 0.0


def _one_value_error(x: torch.Tensor) -> ValueError:
    return ValueError(
        f"Expected more than 1 value per channel when training, got input size {x.size()} "
        "(psq normalizes such a batch with the cluster's history once the layer has one)"
    )


def ddp_buffer_sync(enabled: bool) -> dict[str, bool]:
    """DistributedDataParallel's keyword for broadcasting rank 0's buffers every forward:
    ``forward_sync_buffers`` since torch 2.13, ``broadcast_buffers`` before.  PSBatchNorm's
    buffers already hold the cluster's statistics, so psq models pass ``False``."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": enabled}


# -- names and conversion -------------------------------------------------------------------------


def _claim(loop: WorkerLoop, layer: PSBatchNorm) -> None:
    """Register ``layer``'s name on ``loop``, refusing a name another live layer holds there."""
    names = _NAMES.setdefault(loop, weakref.WeakValueDictionary())
    holder = names.get(layer.name)
    if holder is not None and holder is not layer:
        raise ValueError(
            f"layer name {layer.name!r} is already used on this WorkerLoop by another live layer; give each "
            "model its own prefix, e.g. convert_batchnorm(model, loop, prefix='discriminator.')"
        )
    names[layer.name] = layer


def _release(layer: PSBatchNorm) -> None:
    names = _NAMES.get(layer.loop) if layer.loop is not None else None
    if names is not None and names.get(layer.name) is layer:
        del names[layer.name]


def _bias_option(bias: bool) -> dict[str, bool]:
    """``bias=`` for torch's batch-norm classes, which take it since torch 2.13."""
    return {"bias": bias} if _TORCH_HAS_BIAS else {}


def convert_batchnorm(module: nn.Module, loop: WorkerLoop | None, prefix: str = "", **options: Any) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` (recursively,
    the root included) with a :class:`PSBatchNorm` named ``prefix`` + its module path, copying
    every option, weight, bias, buffers, ``requires_grad`` and training mode.  Several models on
    one loop (a GAN's two, a teacher and a student) each take their own ``prefix``: a name
    another live layer holds on ``loop`` is refused before anything is replaced.  ``options``
    go to PSBatchNorm (``history_weight``, ``max_staleness``, ...).  Returns the converted module."""
    check_options(options)
    found = dict(_batchnorms(module, prefix))
    taken = _NAMES.get(loop, {}) if loop is not None else {}
    clashes = sorted(name for name in found if name in taken)
    if clashes:
        raise ValueError(
            f"layer name(s) {', '.join(map(repr, clashes))} already used on this WorkerLoop by another model's "
            f"layers; convert this model with its own prefix, e.g. convert_batchnorm(model, loop, prefix='student.')"
        )
    for name, bn in found.items():
        if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
            raise ValueError(f"{name}: a lazy batch norm has no channels yet; run one forward pass, then convert")
    return _convert(module, loop, prefix, "", options)


PSQ_OPTIONS = ("history_weight", "gradient_history_weight", "warmup_images", "gradient", "max_staleness")


def check_options(options: dict[str, Any]) -> None:
    """Refuse what ``convert_batchnorm`` cannot pass on: its layers take every batch-norm option
    from the layer they replace, and psq's own from ``options``, each checked as PSBatchNorm does."""
    unknown = sorted(set(options) - set(PSQ_OPTIONS))
    if unknown:
        raise TypeError(
            f"convert_batchnorm takes psq's options ({', '.join(PSQ_OPTIONS)}), not {', '.join(unknown)}: "
            "the other batch-norm options come from each converted layer"
        )
    PSBatchNorm(1, **options)


def _batchnorms(module: nn.Module, prefix: str) -> Iterator[tuple[str, _BatchNorm]]:
    """The batch norms ``convert_batchnorm`` replaces, by the names it gives them."""
    for path, m in module.named_modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, PSBatchNorm):
            yield prefix + (path or "root"), m


def _convert(module: nn.Module, loop: WorkerLoop | None, prefix: str, path: str, options: dict[str, Any]) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, PSBatchNorm):
        out = PSBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            bias=module.bias is not None or not module.affine,
            name=prefix + (path or "root"),
            loop=loop,
            **options,
            **_placement(module),
        )
        out.origin = type(module)
        _copy_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, loop, prefix, f"{path}.{name}" if path else name, options))
    return out


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`PSBatchNorm` with the plain ``nn.BatchNorm*d`` for the inputs it saw
    (else the class it was converted from, else ``BatchNorm2d``), keeping its options and state
    (the running buffers hold the cluster's history) and freeing its name on the loop."""
    out = module
    if isinstance(module, PSBatchNorm):
        cls = _BY_DIMS.get(module._input_dims or 0)
        if cls is None:
            cls = module.origin if module.origin in _BY_DIMS.values() else nn.BatchNorm2d
        out = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            **_bias_option(module.bias is not None or not module.affine),
            **_placement(module),
        )
        if module.affine and module.bias is None and not _TORCH_HAS_BIAS:
            out.register_parameter("bias", None)
        module._fill_buffers()  # the cluster's latest history, not what the buffers held last
        _copy_state(module, out)
        _release(module)
    for name, child in module.named_children():
        out.add_module(name, revert_batchnorm(child))
    return out


def _placement(module: nn.Module) -> dict[str, Any]:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return (
        {}
        if tensor is None
        else {"device": tensor.device, "dtype": tensor.dtype if tensor.is_floating_point() else None}
    )


def _copy_state(src: _BatchNorm, dst: _BatchNorm) -> None:
    with torch.no_grad():
        for param in ("weight", "bias"):
            theirs, ours = getattr(src, param), getattr(dst, param)
            if theirs is not None and ours is not None:
                ours.copy_(theirs)
                ours.requires_grad_(theirs.requires_grad)
        if src.track_running_stats:
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    dst.train(src.training)
