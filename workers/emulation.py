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
variants and four probes of the emulation's own:

* ``staleness_steps``: how many steps old the history is, as the loop reports it (1: the freshest);
* ``sync_layers``: layers, by index in the forward's order, normalized as ``sync`` instead
  (``10-14``; several ranges joined by ``;``);
* ``partner=1``: blend half and half with the *other* worker's batch of the same step, held
  constant: synchronized BN's forward without its backward;
* ``previous_weight``: blend that share of the worker's own previous batch into the history (a
  stale partner, which a worker could do alone).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from psq.bench.timing import emit
from psq.config import (
    DEFAULT_HALF_LIFE_IMAGES,
    SettingsError,
    choice,
    non_negative_int,
    positive_int,
    unit_interval,
)
from psq.kernels import Blend, BlendedNorm, batch_stats
from psq.stats import (
    GRADIENTS,
    LayerGradients,
    LayerMoments,
    Moments,
    Scratch,
    accumulate_into,
    accumulate_means_into,
    blend_weight,
    decay,
    unbiased_var,
    warmed_up,
)
from psq.torch import DEFAULT_HISTORY_WEIGHT, DEFAULT_WARMUP_IMAGES
from workers.accuracy_bench import SETTINGS, VARIANT_KEYS
from workers.data import digits, epoch_batches, shards
from workers.models import MODELS


@dataclasses.dataclass(frozen=True)
class Variant:
    """One emulated method: ``sync``, or psq's options and the emulation's probes."""

    name: str
    sync: bool = False
    history_weight: float = DEFAULT_HISTORY_WEIGHT
    gradient_history_weight: float | None = None  # None: the history weight
    warmup_images: float = DEFAULT_WARMUP_IMAGES
    half_life: float = DEFAULT_HALF_LIFE_IMAGES
    gradient: str = "cluster"
    staleness_steps: int = 3  # about what the real (e) runs report (mean staleness 3.1-3.6 steps)
    sync_layers: frozenset[int] = frozenset()
    partner: bool = False
    previous_weight: float = 0.0

    @property
    def gradient_weight(self) -> float:
        return self.history_weight if self.gradient_history_weight is None else self.gradient_history_weight


def _layers(text: str) -> frozenset[int]:
    """``3``, ``10-14`` or ``0,2,5-7``: layer indices."""
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
    **{k: parse for k, parse in VARIANT_KEYS.items() if k != "push_interval_s"},  # no loop here
    "gradient": choice(*GRADIENTS),
    "staleness_steps": positive_int,
    "sync_layers": _layers,
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
    options = {}
    for pair in text[4:].split(","):
        key, _, value = pair.partition("=")
        if key not in _KEYS:
            raise SettingsError(f"an emulated variant takes key=value pairs of {', '.join(_KEYS)}; got {pair!r}")
        options[key] = _KEYS[key](value)
    return Variant(text, **options)


class SharedHistory:
    """The aggregator's history of one layer, updated with its formulas."""

    def __init__(self, channels: int, half_life: float) -> None:
        self.half_life = half_life
        self.moments = LayerMoments(np.zeros(1), np.zeros(channels), np.zeros(channels))
        self.gradients = LayerGradients(np.zeros(1), np.zeros(channels), np.zeros(channels))
        self.widths = np.array([channels])
        self.seen = 0.0
        self._scratch = Scratch(channels)

    def add_moments(self, images: float, count: float, mean: np.ndarray, var: np.ndarray) -> None:
        kept = decay(np.array([images]), self.half_life)
        self.gradients.counts[:] *= kept  # the same stream of images ages the gradient history
        accumulate_into(self.moments, LayerMoments(np.array([count]), mean, var), self.widths, self._scratch, kept)
        self.seen += images

    def add_gradients(self, count: float, dy: np.ndarray, dy_xhat: np.ndarray) -> None:
        arriving = LayerGradients(np.array([count]), dy, dy_xhat)
        accumulate_means_into(self.gradients, arriving, self.widths, self._scratch)


class Clock:
    """Steps, and the history updates each step queued: step ``k`` normalizes with a history
    that holds steps up to ``k − staleness`` (the staleness as the loop reports it: 1 is the
    freshest a real push can bring back)."""

    def __init__(self, staleness: int) -> None:
        self.staleness = staleness
        self._queued: list[list[Callable[[], None]]] = []
        self.current: list[Callable[[], None]] = []

    def next_step(self) -> None:
        self._queued.append(self.current)
        self.current = []
        while len(self._queued) >= self.staleness:
            for update in self._queued.pop(0):
                update()


class EmulatedNorm(nn.Module):
    """A batch-norm layer of ``workers`` workers sharing one history (see the module's doc)."""

    def __init__(self, bn: nn.BatchNorm2d, index: int, v: Variant, workers: int, clock: Clock) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.index, self.v, self.workers, self.clock = index, v, workers, clock
        self.sync = v.sync or index in v.sync_layers
        self.history = SharedHistory(bn.num_features, v.half_life)
        self.previous: list[tuple[np.ndarray, np.ndarray] | None] = [None] * workers
        self.register_buffer("running_mean", torch.zeros(bn.num_features))
        self.register_buffer("running_var", torch.ones(bn.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.index == 0:
            self.clock.next_step()
        if self.sync:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
            )
        h = self.history.moments
        if not self.training:  # the cluster's history, as PSBatchNorm's buffers hold it
            n = float(h.counts[0])
            if n == 0:
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            var = unbiased_var(Moments(n, h.mean, h.var))
            return F.batch_norm(x, _t(h.mean, x), _t(var, x), self.weight, self.bias, False, 0.0, self.eps)
        chunks = x.chunk(self.workers)
        current = [batch_stats(c.detach()) for c in chunks] if self.v.partner else None
        out = [self._worker(i, c, current) for i, c in enumerate(chunks)]
        return torch.cat(out)

    def _worker(self, i: int, x: torch.Tensor, current: list[Any] | None) -> torch.Tensor:
        count, images = float(x.numel() // x.size(1)), float(x.size(0))
        blend = self._blend(i, x, count, current)
        sink = self._sink()
        y, mean_b, var_b = BlendedNorm.apply(x, self.weight, self.bias, blend, self.eps, self.v.gradient, sink)
        mean, var = mean_b.double().numpy(), var_b.double().numpy()
        self.previous[i] = (mean, var)
        self.clock.current.append(lambda: self.history.add_moments(images, count, mean, var))
        return y

    def _blend(self, i: int, x: torch.Tensor, count: float, current: list[Any] | None) -> Blend:
        h, g = self.history.moments, self.history.gradients
        n_h = float(h.counts[0])
        if n_h == 0 or self.v.history_weight == 0:
            return Blend()
        share = float(
            blend_weight(n_h, count, warmed_up(self.v.history_weight, self.history.seen, self.v.warmup_images))
        )
        mean, var = h.mean, h.var
        if current is not None:  # the other worker's batch of this very step, half and half
            mean, var, share = current[1 - i][0].double().numpy(), current[1 - i][1].double().numpy(), 0.5
        elif self.v.previous_weight and self.previous[i] is not None:
            mean, var = _mixed(mean, var, *self.previous[i], self.v.previous_weight)
        n_g = float(g.counts[0])
        gshare = 0.0
        if n_g > 0 and self.v.gradient == "cluster":
            gw = warmed_up(self.v.gradient_weight, self.history.seen, self.v.warmup_images)
            gshare = float(blend_weight(n_g, count, gw))
        return Blend(share, _t(mean, x), _t(var, x), gshare, _t(g.dy, x), _t(g.dy_xhat, x))

    def _sink(self) -> Callable[[float, torch.Tensor, torch.Tensor], None] | None:
        if self.v.gradient != "cluster":
            return None

        def sink(count: float, dy: torch.Tensor, dy_xhat: torch.Tensor) -> None:
            a, b = dy.double().numpy().copy(), dy_xhat.double().numpy().copy()
            self.clock.current.append(lambda: self.history.add_gradients(count, a, b))

        return sink


def _t(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.dtype)


def _mixed(mean: np.ndarray, var: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray, w: float) -> Any:
    d = mean_b - mean
    return mean + w * d, var + w * (var_b - var) + w * (1 - w) * d * d


def convert(model: nn.Module, v: Variant, workers: int) -> nn.Module:
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
    return model


def one_run(setting: str, v: Variant, seed: int, epochs: int, max_steps_per_epoch: int = 0) -> dict[str, Any]:
    """Train one emulated run as the trainer does (the same shards, order, schedule, optimizer)."""
    s = SETTINGS[setting]
    if v.partner and s.workers != 2:
        raise SettingsError(
            f"partner=1 blends with the other worker's batch: it needs 2 workers, ({setting}) has {s.workers}"
        )
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = convert(MODELS[s.model](), v, s.workers)
    data = digits()
    mine = [shards(data.train_y.numpy(), s.workers, s.sharding, seed)[r] for r in range(s.workers)]
    per_epoch = len(mine[0]) // s.batch
    if max_steps_per_epoch:
        per_epoch = min(per_epoch, max_steps_per_epoch)
    total = per_epoch * epochs
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * s.workers * s.batch / 64, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k / total, 1.0))))
    out: dict[str, Any] = {"accuracy": [], "test_loss": [], "train_loss": []}
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        batches = [epoch_batches(m, s.batch, epoch, seed + r)[:per_epoch] for r, m in enumerate(mine)]
        losses = []
        for idx in np.concatenate(batches, axis=1):
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            logits = model(data.test_x)
        out["accuracy"].append((logits.argmax(1) == data.test_y).sum().item() / len(data.test_y))
        out["test_loss"].append(F.cross_entropy(logits, data.test_y).item())
        out["train_loss"].append(float(np.mean(losses)))
    out["seconds"] = time.perf_counter() - started
    out["parameters"] = {k: p.detach() for k, p in model.named_parameters()}
    return out


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
