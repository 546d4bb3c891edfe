"""``psq bench emulate``: psq's method in one process, to screen an idea before the real benchmark.

Each step's batch is the union of what the ``W`` workers of a setting would see (as
:func:`workers.train.train_single`); every batch-norm layer splits it into the workers' chunks and
normalizes each with psq's own training step (:class:`psq.kernels.BlendedNorm`) against one
shared history, which receives every chunk's moments and gradient means a few steps later
(``staleness_steps``), aged and merged with the aggregator's formulas (:mod:`psq.stats`).  No network, no timing:
a run is deterministic for its seed, so variants differ by the method alone, not by when the
background pushes happened to land (the real benchmark's run-to-run noise).  It reports test
accuracy, test loss and training loss, which tell an optimization gap from a generalization gap.

Methods: ``sync`` (batch norm on the union batch: synchronized BN's forward and backward),
``psq`` (the defaults) and ``psq:key=value,...`` with the keys of ``psq bench accuracy``'s
variants and six probes of the emulation's own:

* ``staleness_steps``: how many steps old the history is, as the loop reports it (1: the freshest);
* ``sync_layers``: layers, by index in the forward's order, normalized as ``sync`` instead
  (``10-14``; several ranges joined by ``;``: ``0;3-4``);
* ``partner=1``: blend half and half with the *other* worker's batch of the same step, held
  constant: synchronized BN's forward without its backward through the partner's batch (with
  ``gradient=exact``, the exact derivative of that forward; with the default ``cluster``, the
  history's gradient means as for psq's own blend);
* ``local_layers``: layers normalized with the worker's own batch alone, as per-worker BN (its
  exact gradient), their statistics still pushed to the history the others blend with;
* ``ghost_noise``: a regularizer of the worker's own, synchronized BN's noise without its
  exchange: the history's mean and variance perturbed each step by a random draw of that share
  of the deviation synchronized BN's batch of the step (every worker's, ``W`` of them) would have
  from them, estimated from this worker's own batches (a running mean of ``(mB − mH)²`` and of
  ``log(vB/vH)²``, over ``W``); the draw is a constant to the backward;
* ``previous_weight``: blend that share of the worker's own previous batch into the history (a
  stale partner, which a worker could do alone).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from psq.bench.timing import emit
from psq.config import (
    DEFAULT_HALF_LIFE_IMAGES,
    SettingsError,
    non_negative_float,
    non_negative_int,
    positive_int,
    unit_interval,
)
from psq.kernels import Blend, BlendedNorm, batch_stats
from psq.stats import (
    LayerGradients,
    LayerMoments,
    Moments,
    Scratch,
    accumulate_into,
    accumulate_means_into,
    decay,
    mix,
    unbiased_var,
)
from psq.torch import DEFAULT_HISTORY_WEIGHT, DEFAULT_WARMUP_IMAGES, PSQ_OPTIONS, check_options, history_blend
from workers.accuracy_bench import LOOP_KEYS, SETTINGS, VARIANT_KEYS, parse_pairs
from workers.data import Digits, digits
from workers.models import MODELS
from workers.settings import TrainSettings
from workers.train import Schedule


@dataclasses.dataclass(frozen=True)
class Variant:
    """One emulated method: ``sync``, or psq's options (checked as ``convert_batchnorm`` checks
    them) and the emulation's probes."""

    name: str
    sync: bool = False
    history_weight: float = DEFAULT_HISTORY_WEIGHT
    gradient_history_weight: float = DEFAULT_HISTORY_WEIGHT
    warmup_images: float = DEFAULT_WARMUP_IMAGES
    gradient: str = "cluster"
    half_life: float = DEFAULT_HALF_LIFE_IMAGES
    staleness_steps: int = 3  # about what the real (e) runs report (mean staleness 3.1-3.6 steps)
    sync_layers: frozenset[int] = frozenset()
    local_layers: frozenset[int] = frozenset()
    ghost_noise: float = 0.0
    partner: bool = False
    previous_weight: float = 0.0


def _layers(text: str) -> frozenset[int]:
    """``3``, ``10-14`` or ``0;2;5-7``: layer indices."""
    out: set[int] = set()
    for part in text.split(";"):
        first, _, last = part.partition("-")
        lo = non_negative_int(first)
        hi = non_negative_int(last) if last else lo
        if hi < lo:
            raise SettingsError(f"expected a layer range low-high, got {part!r}")
        out.update(range(lo, hi + 1))
    return frozenset(out)


def _flag01(text: str) -> bool:
    if text not in ("0", "1"):
        raise SettingsError(f"expected 0 or 1, got {text!r}")
    return text == "1"


_KEYS: dict[str, Callable[[str], Any]] = {
    **{k: parse for k, parse in VARIANT_KEYS.items() if k not in LOOP_KEYS},  # no loop here
    "staleness_steps": positive_int,
    "sync_layers": _layers,
    "local_layers": _layers,
    "ghost_noise": non_negative_float,
    "partner": _flag01,
    "previous_weight": unit_interval,
}


def variant(text: str) -> Variant:
    """``sync``, ``psq``, or ``psq:key=value,...`` (layer lists in ``sync_layers`` joined by ``;``)."""
    if text == "sync":
        return Variant(text, sync=True)
    if text == "psq":
        return Variant(text)
    if not text.startswith("psq:"):
        raise SettingsError(f"expected sync, psq or psq:key=value,..., got {text!r}")
    options = parse_pairs(text[4:], _KEYS, "an emulated variant")
    if options.get("partner") and options.get("previous_weight"):
        raise SettingsError("partner=1 and previous_weight are two partners: choose one")
    both = sorted(options.get("sync_layers", frozenset()) & options.get("local_layers", frozenset()))
    if both:
        raise SettingsError(f"layers {both} are in both sync_layers and local_layers: choose one")
    layer = {k: options[k] for k in PSQ_OPTIONS if k in options}
    try:
        check_options(layer)
    except ValueError as exc:
        raise SettingsError(f"{text}: {exc}") from None
    options.setdefault("gradient_history_weight", options.get("history_weight", DEFAULT_HISTORY_WEIGHT))
    return Variant(text, **options)


class SharedHistory:
    """The aggregator's history of one layer, updated as ``Store.update`` updates it: each push
    ages the moments and the gradient means by its images, then merges into both."""

    def __init__(self, channels: int, half_life: float) -> None:
        self.half_life = half_life
        self.moments = LayerMoments(np.zeros(1), np.zeros(channels), np.zeros(channels))
        self.gradients = LayerGradients(np.zeros(1), np.zeros(channels), np.zeros(channels))
        self.widths = np.array([channels])
        self.seen = 0.0
        self._scratch = Scratch(channels)

    def update(self, images: float, moments: Moments, gradients: tuple[float, Any, Any] | None) -> None:
        kept = decay(np.array([images]), self.half_life)
        batch = LayerMoments(np.array([moments.count]), moments.mean, moments.var)
        accumulate_into(self.moments, batch, self.widths, self._scratch, kept)
        if gradients is None:  # a forward without a backward: its images age the gradient history all the same
            self.gradients.counts[:] *= kept
        else:
            count, dy, dy_xhat = gradients
            arriving = LayerGradients(np.array([count]), dy, dy_xhat)
            accumulate_means_into(self.gradients, arriving, self.widths, self._scratch, kept)
        self.seen += images


class Push:
    """One worker's statistics of one layer and step, as its message would carry them: the
    forward's moments, then the backward's gradient means."""

    def __init__(self, images: float, moments: Moments | None = None) -> None:
        self.images, self.moments = images, moments  # the moments once the forward has them
        self.gradients: tuple[float, Any, Any] | None = None

    def sink(self, count: float, dy: torch.Tensor, dy_xhat: torch.Tensor) -> None:
        self.gradients = (count, dy.double().numpy().copy(), dy_xhat.double().numpy().copy())


class Clock:
    """Steps, and the pushes each step made: step ``k`` normalizes with a history that holds steps
    up to ``k − staleness`` (the staleness as the loop reports it: 1 is the freshest a real push
    can bring back)."""

    def __init__(self, staleness: int) -> None:
        if staleness < 1:
            raise ValueError(f"staleness must be at least 1 step, got {staleness!r}")
        self.staleness = staleness
        self._queued: list[list[tuple[SharedHistory, Push]]] = []
        self.current: list[tuple[SharedHistory, Push]] = []

    def next_step(self) -> None:
        self._queued.append(self.current)
        self.current = []
        while len(self._queued) >= self.staleness:
            self._apply(self._queued.pop(0))

    def flush(self) -> None:
        """Every push answered, as the trainer's ``loop.flush`` before it evaluates."""
        self._queued.append(self.current)
        self.current = []
        while self._queued:
            self._apply(self._queued.pop(0))

    @staticmethod
    def _apply(pushes: list[tuple[SharedHistory, Push]]) -> None:
        for history, push in pushes:
            assert push.moments is not None  # every queued push ran its forward
            history.update(push.images, push.moments, push.gradients)


class _Held(NamedTuple):
    """A history as a step blends with it (:class:`psq.torch.HistoryView`), as tensors."""

    mean: torch.Tensor
    var: torch.Tensor
    dy: torch.Tensor
    dy_xhat: torch.Tensor
    count: float
    gradient_count: float
    seen: float


class EmulatedNorm(nn.Module):
    """A batch-norm layer of ``workers`` workers sharing one history (see the module's doc)."""

    def __init__(self, bn: nn.BatchNorm2d, index: int, v: Variant, workers: int, clock: Clock) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self.momentum = bn.weight, bn.bias, bn.eps, bn.momentum
        self.index, self.v, self.workers, self.clock = index, v, workers, clock
        self.sync = v.sync or index in v.sync_layers
        self.history = SharedHistory(bn.num_features, v.half_life)
        self.previous: list[tuple[np.ndarray, np.ndarray] | None] = [None] * workers
        self.deviations: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * workers  # ghost_noise's
        self.register_buffer("running_mean", torch.zeros(bn.num_features))
        self.register_buffer("running_var", torch.ones(bn.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.index == 0:
            self.clock.next_step()
        if self.sync:  # batch norm on the union batch
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
            )
        h = self.history.moments
        if not self.training:  # the cluster's history, as PSBatchNorm's buffers hold it
            if h.counts[0] == 0:  # none yet: the buffers the steps before it kept, as PSBatchNorm
                return F.batch_norm(
                    x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
                )
            var = unbiased_var(Moments(float(h.counts[0]), h.mean, h.var))
            return F.batch_norm(x, _t(h.mean, x), _t(var, x), self.weight, self.bias, False, 0.0, self.eps)
        chunks = x.chunk(self.workers)
        current = [batch_stats(c.detach()) for c in chunks] if self.v.partner else None
        return torch.cat([self._worker(i, c, current) for i, c in enumerate(chunks)])

    def _worker(self, i: int, x: torch.Tensor, current: list[Any] | None) -> torch.Tensor:
        count = float(x.numel() // x.size(1))
        blend = self._blend(i, x, count, current)
        push = Push(float(x.size(0)))
        sink = push.sink if self.v.gradient == "cluster" else None
        y, mean_b, var_b = BlendedNorm.apply(x, self.weight, self.bias, blend, self.eps, self.v.gradient, sink)
        push.moments = Moments(count, mean_b.double().numpy(), var_b.double().numpy())
        self.previous[i] = (push.moments.mean, push.moments.var)
        self.clock.current.append((self.history, push))
        if self.history.moments.counts[0] == 0:  # no cluster statistics: running ones, as nn.BatchNorm
            n = count / max(count - 1.0, 1.0)
            self.running_mean.lerp_(mean_b.detach(), self.momentum)
            self.running_var.lerp_(var_b.detach() * n, self.momentum)
        return y

    def _blend(self, i: int, x: torch.Tensor, count: float, current: list[Any] | None) -> Blend:
        h, g = self.history.moments, self.history.gradients
        if h.counts[0] == 0 or self.index in self.v.local_layers:  # plain batch norm, as PSBatchNorm without one
            return Blend()
        held = _Held(
            _t(h.mean, x), _t(h.var, x), _t(g.dy, x), _t(g.dy_xhat, x),
            float(h.counts[0]), float(g.counts[0]), self.history.seen,
        )  # fmt: skip
        blend = history_blend(self.v, held, count)
        if current is not None:  # the other worker's batch of this very step, half and half
            mean, var = current[1 - i]
            return blend._replace(share=0.5, mean=mean, var=var)
        if self.v.ghost_noise:
            return self._ghost(i, x, blend)
        if self.v.previous_weight and self.previous[i] is not None:
            mean, var = mix(1.0 - self.v.previous_weight, h.mean, h.var, *self.previous[i])
            return blend._replace(mean=_t(mean, x), var=_t(var, x))
        return blend

    def _ghost(self, i: int, x: torch.Tensor, blend: Blend) -> Blend:
        """``blend`` with its history perturbed as the ``ghost_noise`` probe says."""
        assert blend.mean is not None and blend.var is not None
        mean_b, var_b = batch_stats(x.detach())
        dm, dl = (mean_b - blend.mean) ** 2, torch.log((var_b + 1e-5) / (blend.var + 1e-5)) ** 2
        held = self.deviations[i]
        held = (dm, dl) if held is None else (torch.lerp(held[0], dm, 0.01), torch.lerp(held[1], dl, 0.01))
        self.deviations[i] = held
        scale = self.v.ghost_noise / self.workers
        noise_m = torch.randn_like(dm) * (held[0] * scale).sqrt()
        noise_l = torch.randn_like(dl) * (held[1] * scale).sqrt()
        # the history's share a weighs the draw too: none while there is no history to trust
        return blend._replace(mean=blend.mean + noise_m, var=blend.var * torch.exp(noise_l))


def _t(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.dtype)


def convert(model: nn.Module, v: Variant, workers: int) -> tuple[nn.Module, Clock]:
    """Every BatchNorm2d of ``model`` as an :class:`EmulatedNorm`, numbered in the forward's order."""
    clock, index = Clock(v.staleness_steps), [0]

    def walk(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, EmulatedNorm(child, index[0], v, workers, clock))
                index[0] += 1
            else:
                walk(child)

    walk(model)
    beyond = sorted(i for i in v.sync_layers | v.local_layers if i >= index[0])
    if beyond:
        raise SettingsError(f"layers {beyond} are beyond the model's {index[0]} batch-norm layers (0-{index[0] - 1})")
    return model, clock


def one_run(setting: str, v: Variant, seed: int, epochs: int, max_steps_per_epoch: int = 0) -> dict[str, Any]:
    """Train one emulated run as the trainer's one-process reference does (:class:`workers.train.Schedule`)."""
    s = SETTINGS[setting]
    if v.partner and s.workers != 2:
        raise SettingsError(
            f"partner=1 blends with the other worker's batch: it needs 2 workers, ({setting}) has {s.workers}"
        )
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model, clock = convert(MODELS[s.model](), v, s.workers)
    data = digits()
    settings = TrainSettings(
        workers=s.workers, batch=s.batch, sharding=s.sharding, model=s.model, seed=seed, epochs=epochs,
        max_steps_per_epoch=max_steps_per_epoch,
    )  # fmt: skip
    plan = Schedule(settings, list(range(s.workers)), s.workers, data)
    opt, schedule = plan.optimizer(model)
    out: dict[str, Any] = {"accuracy": [], "test_loss": [], "train_loss": []}
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        losses = []
        for idx in plan.batches(epoch):
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
        clock.flush()
        accuracy, test_loss = _evaluate(model, data)
        out["accuracy"].append(accuracy)
        out["test_loss"].append(test_loss)
        out["train_loss"].append(float(np.mean(losses)))
    out["seconds"] = time.perf_counter() - started
    out["parameters"] = {k: p.detach() for k, p in model.named_parameters()}
    return out


@torch.no_grad()
def _evaluate(model: nn.Module, data: Digits) -> tuple[float, float]:
    model.eval()
    logits = model(data.test_x)
    correct = (logits.argmax(1) == data.test_y).sum().item()
    return correct / len(data.test_y), F.cross_entropy(logits, data.test_y).item()


def run(
    settings: tuple[str, ...], seeds: tuple[int, ...], epochs: int, variants: tuple[Variant, ...], as_json: bool,
    max_steps_per_epoch: int = 0,
) -> list[list[Any]]:  # fmt: skip
    """Every setting x seed x variant; test accuracy, test loss, training loss (mean ± std)."""
    rows = []
    for setting in settings:
        for v in variants:
            runs = [one_run(setting, v, seed, epochs, max_steps_per_epoch) for seed in seeds]
            rows.append([f"({setting}) {SETTINGS[setting].describe()}", v.name, *_summary(runs)])
    emit(
        f"psq bench emulate: digits, one process, {epochs} epochs, seeds {list(seeds)}",
        ["setting", "method", "test acc %", "per seed", "test loss", "train loss", "s/run"],
        rows,
        as_json,
    )
    return rows


def _summary(runs: list[dict[str, Any]]) -> list[Any]:
    acc = np.array([r["accuracy"][-1] for r in runs]) * 100
    test_loss = np.array([r["test_loss"][-1] for r in runs])
    train_loss = np.array([r["train_loss"][-1] for r in runs])
    return [
        f"{acc.mean():.2f} ± {acc.std():.2f}",
        " ".join(f"{a:.2f}" for a in acc),
        f"{test_loss.mean():.4f} ± {test_loss.std():.4f}",
        f"{train_loss.mean():.4f} ± {train_loss.std():.4f}",
        float(np.mean([r["seconds"] for r in runs])),
    ]
