"""The digits trainer's settings: ``python -m workers.train --help``, ``psq worker --help``.

Flags and ``PSQ_*`` variables come from these fields through :mod:`psq.config`, which this
module registers them with, so that one ``.env`` check and one collision check cover the
trainer too.  Imports no torch: ``psq broker`` reads these names to check its environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psq import config
from psq.bench.settings import Bench, letters
from psq.config import (
    DEFAULT_FRONTEND,
    SettingsError,
    choice,
    endpoint,
    name,
    non_negative_float,
    non_negative_int,
    optional_path,
    positive_float,
    positive_int,
    setting,
    share_of_core,
    unit_interval,
)
from psq.loop import DEFAULT_PUSH_CPU_SHARE, DEFAULT_PUSH_INTERVAL_S
from psq.stats import GRADIENTS

SHARDINGS = ("iid", "skewed", "split")  # how workers.data deals the training images
MODEL_NAMES = ("cnn", "resnet")  # workers.models.MODELS


@dataclass(frozen=True)
class TrainSettings:
    """The digits trainer (``python -m workers.train``, ``psq worker``)."""

    frontend: str = setting(DEFAULT_FRONTEND, "the broker's frontend address", endpoint, shared=True)
    norm: str = setting(
        "psq",
        "batch norm: psq (shared history), local (per worker), syncbn (synchronized)",
        choice("psq", "local", "syncbn"),
    )
    workers: int = setting(2, "worker processes, when not started by torchrun", positive_int)
    epochs: int = setting(5, "passes over the training set", positive_int)
    batch: int = setting(1, "per-worker batch size", positive_int)
    model: str = setting(
        "cnn",
        "cnn: a 3-conv CNN on the 8x8 digits; resnet: a small ResNet on them upsampled to 32x32",
        choice(*MODEL_NAMES),
    )
    lr: float | None = setting(
        None,
        "peak learning rate, SGD with momentum 0.9 and a cosine schedule (none: 0.1 x global batch / 64)",
        positive_float,
    )
    seed: int = setting(0, "seed of the model, the shards and the batch order", non_negative_int)
    history_weight: float | None = setting(
        None, "psq: the history's largest share of the statistics (none: PSBatchNorm's default)", unit_interval
    )
    gradient_history_weight: float | None = setting(
        None, "psq: the same for the backward's statistics (none: the history weight)", unit_interval
    )
    warmup_images: float | None = setting(
        None, "psq: images over which both history weights ramp up (none: PSBatchNorm's default)", non_negative_float
    )
    gradient: str = setting(
        "cluster",
        "psq: the backward, cluster (with the cluster's gradient history), renorm or exact (for comparison)",
        choice(*GRADIENTS),
    )
    sharding: str = setting(
        "iid", f"how training images are dealt to workers: {', '.join(SHARDINGS)}", choice(*SHARDINGS)
    )
    run_dir: Path = setting(Path("runs/latest"), "folder for the weights and the summary", Path)
    max_steps_per_epoch: int = setting(
        0, "stop each epoch after this many steps (0: the whole shard; for quick sanity runs)", non_negative_int
    )
    job: str | None = setting(None, "job name on the statistics service (default: digits-<run id>)", name)
    wait_for_service_s: float = setting(30.0, "psq: how long to wait for the service before training", positive_float)
    push_interval_s: float = setting(
        DEFAULT_PUSH_INTERVAL_S,
        "psq: least time between two pushes (steps in between are merged; 0: every step)",
        non_negative_float,
    )
    push_cpu_share: float = setting(
        DEFAULT_PUSH_CPU_SHARE,
        "psq: most of one core the loop's thread spends on pushes (beyond it they are spaced out, up to 1 s)",
        share_of_core,
    )
    secret_key: Path | None = setting(
        None, "this worker's CurveZMQ secret key file", optional_path, "PSQ_WORKER_SECRET_KEY", shared=True
    )
    server_key: Path | None = setting(None, "the broker's CurveZMQ public key file", optional_path, shared=True)


config.register(TrainSettings)


def parse_delays_ms(text: str) -> tuple[float, ...]:
    """Comma-separated one-way delays in milliseconds, each in [0, 1000]."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SettingsError(f"expected comma-separated milliseconds like 0,0.5,2, got {text!r}") from None
    if not values or any(not 0 <= v <= 1000 for v in values):
        raise SettingsError(f"delays must be between 0 and 1000 ms, got {text!r}")
    return values


def accuracy_method(text: str) -> Any:
    """A method of the accuracy benchmark (workers.accuracy_bench.method, imported when used)."""
    from workers.accuracy_bench import method

    return method(text)


def emulated_variant(text: str) -> Any:
    """A method of the emulation (workers.emulation.variant, imported when used)."""
    from workers.emulation import variant

    return variant(text)


@dataclass(frozen=True)
class StepBench(Bench):
    """per-step time: plain BN, synchronized BN, psq (2 DDP workers)"""

    steps: int = setting(20, "steps per method per round", positive_int)
    rounds: int = setting(5, "timed rounds", positive_int)
    batch: int = setting(8, "per-worker batch", positive_int)
    delays_ms: tuple[float, ...] | None = setting(
        None, "one-way delays to run across, e.g. 0,0.5,2 (needs root: network namespaces)", parse_delays_ms
    )


@dataclass(frozen=True)
class AccuracyBench(Bench):
    """test accuracy on digits: per-worker, synchronized and psq batch norm"""

    settings: str = setting("abcdef", "which of settings a-f", letters("abcdef"))
    seeds: int = setting(3, "seeds per setting and method", positive_int)
    first_seed: int = setting(0, "the first seed: a later run adds seeds instead of repeating them", non_negative_int)
    epochs: int = setting(5, "epochs per run", positive_int)
    methods: tuple[Any, ...] | None = setting(
        None,
        "local, syncbn, psq, psq-renorm, or variants like psq:history_weight=0.8,half_life=64 "
        "(none: local syncbn psq psq-renorm)",
        accuracy_method,
        many=True,
    )
    max_steps_per_epoch: int = setting(
        0, "cut every epoch short, for a quick sanity run (0: whole epochs)", non_negative_int
    )
    out: Path = setting(Path("runs/accuracy"), "folder for the table, JSON and PNG", Path)


@dataclass(frozen=True)
class EmulateBench(Bench):
    """psq's method in one process (no network, deterministic): test accuracy and loss, train loss"""

    settings: str = setting("e", "which of settings a-f", letters("abcdef"))
    seeds: int = setting(3, "seeds per setting and method", positive_int)
    first_seed: int = setting(0, "the first seed", non_negative_int)
    epochs: int = setting(5, "epochs per run", positive_int)
    methods: tuple[Any, ...] | None = setting(
        None,
        "sync, psq, or variants like psq:staleness_steps=1 psq:sync_layers=10-14 psq:partner=1 (none: sync psq)",
        emulated_variant,
        many=True,
    )
    max_steps_per_epoch: int = setting(0, "cut every epoch short (0: whole epochs)", non_negative_int)
