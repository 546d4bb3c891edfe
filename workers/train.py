"""The digits trainer: ``python -m workers.train`` (or ``psq worker``).

Trains a small CNN with batch norm on scikit-learn's digits with a small per-worker batch (1 by
default: the regime where per-worker statistics fail).  Gradients are averaged by
DistributedDataParallel over gloo; batch-norm statistics go through psq (``--norm psq``), stay per
worker (``local``), or are synchronized in every layer (``syncbn``: fairscale's on CPU).

Started the standard way: under ``torchrun`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) it is one rank; started on its own it launches
``--workers`` ranks itself.  Rank 0 evaluates on the fixed test set with the cluster's
statistics, saves the weights as a plain state dict and prints the run's summary.  SIGTERM or
Ctrl-C stops every rank at its next step.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn.functional as F
from torch import nn

from psq.loop import WorkerLoop
from psq.security import ClientKeys
from psq.torch import convert_batchnorm, ddp_buffer_sync
from workers.data import Digits, digits, epoch_batches, shards
from workers.models import MODELS
from workers.settings import TrainSettings

log = logging.getLogger("psq.train")
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)  # a dead peer fails the run instead of hanging it


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: the ranks stop at the next step."""


@dataclass
class RankStats:
    steps: int = 0
    seconds: float = 0.0
    max_step_s: float = 0.0  # the longest step: what an outage or a stalled peer cost
    loop: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    settings: dict[str, Any]
    world: int
    accuracy_per_epoch: list[float]
    accuracy: float
    accuracy_recomputed: float
    wall_s: float
    steps: int
    steps_per_s: float
    ranks: list[dict[str, Any]]
    weights: str


def run_rank(settings: TrainSettings, rank: int, world: int, rendezvous: str | None = None) -> RunResult | None:
    """Train as one rank; rank 0 returns (and writes) the run's result."""
    torch.set_num_threads(1)
    stop = _stop_on_signals()
    dist.init_process_group(
        "gloo", init_method=rendezvous or "env://", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    loop: WorkerLoop | None = None
    try:
        job = settings.job or _shared_run_id(rank)
        model, loop = _model(settings, job, rank)
        ddp = nn.parallel.DistributedDataParallel(model, **ddp_buffer_sync(settings.norm == "local"))
        data = digits()
        result = _train(settings, [rank], world, model, ddp, loop, data, stop)
        stats = [None] * world
        dist.all_gather_object(stats, asdict(result[1]))
        out = _finish(settings, world, model, data, result[0], stats) if rank == 0 else None
        # Every rank leaves together: a rank tearing the process group down while another still
        # uses it made gloo abort ("terminate called without an active exception").
        dist.barrier()
        del ddp
        return out
    finally:
        if loop is not None:
            loop.stop()
        dist.destroy_process_group()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def _shared_run_id(rank: int) -> str:
    name = [f"digits-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return str(name[0])


def _model(settings: TrainSettings, job: str, rank: int) -> tuple[nn.Module, WorkerLoop | None]:
    torch.manual_seed(settings.seed)
    model = MODELS[settings.model]()
    if settings.norm == "syncbn":
        from fairscale.experimental.nn import SyncBatchNorm  # torch's refuses CPU tensors

        return SyncBatchNorm.convert_sync_batchnorm(model), None
    if settings.norm == "local":
        return model, None
    keys = ClientKeys.load(settings.secret_key, settings.server_key)
    loop = WorkerLoop(
        settings.frontend,
        job=job,
        worker=f"rank{rank}",
        push_interval_s=settings.push_interval_s,
        push_cpu_share=settings.push_cpu_share,
        keys=keys,
    ).start()
    if not loop.wait_ready(settings.wait_for_service_s):
        log.warning(
            "psq: no statistics service at %s after %.0f s; training starts on batch statistics",
            settings.frontend,
            settings.wait_for_service_s,
        )
    return convert_batchnorm(model, loop, **psq_options(settings)), loop


def psq_options(settings: TrainSettings) -> dict[str, Any]:
    """PSBatchNorm's options the settings name; the rest keep the layer's defaults."""
    given = {
        "history_weight": settings.history_weight,
        "gradient_history_weight": settings.gradient_history_weight,
        "warmup_images": settings.warmup_images,
    }
    return {"gradient": settings.gradient, **{k: v for k, v in given.items() if v is not None}}


def learning_rate(settings: TrainSettings, world: int) -> float:
    """The peak learning rate: as given, else the linear scaling rule, 0.1 per 64 images a step."""
    return settings.lr if settings.lr is not None else 0.1 * world * settings.batch / 64


class Schedule:
    """What every run of a setting shares: each rank's shard, its batches epoch by epoch, and the
    optimizer with its learning rate and cosine schedule (the one-process emulation trains with
    the same, :mod:`workers.emulation`)."""

    def __init__(self, settings: TrainSettings, ranks: list[int], world: int, data: Digits) -> None:
        self.settings, self.ranks, self.world = settings, ranks, world
        self.mine = [shards(data.train_y.numpy(), world, settings.sharding, settings.seed)[r] for r in ranks]
        per_epoch = len(self.mine[0]) // settings.batch
        if settings.max_steps_per_epoch:
            per_epoch = min(per_epoch, settings.max_steps_per_epoch)
        self.per_epoch, self.total = per_epoch, per_epoch * settings.epochs
        if self.total == 0:
            raise ValueError(
                f"a batch of {settings.batch} is larger than a worker's {len(self.mine[0])} training images"
            )

    def batches(self, epoch: int) -> np.ndarray:
        """The epoch's steps, each the ranks' batches joined: a (steps, ranks x batch) index array."""
        s, steps = self.settings, self.per_epoch
        per_rank = [epoch_batches(m, s.batch, epoch, s.seed + r)[:steps] for r, m in zip(self.ranks, self.mine)]
        return np.concatenate(per_rank, axis=1)

    def optimizer(self, net: nn.Module) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
        """SGD with Nesterov momentum 0.9 and weight decay 5e-4, the learning rate of
        :func:`learning_rate`, on a cosine schedule over the run's steps."""
        lr, total = learning_rate(self.settings, self.world), self.total
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        cosine = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k / total, 1.0))))
        return opt, cosine


def _train(
    settings: TrainSettings,
    ranks: list[int],
    world: int,
    model: nn.Module,
    net: nn.Module,
    loop: WorkerLoop | None,
    data: Digits,
    stop: threading.Event,
) -> tuple[list[float], RankStats]:
    """Train ``net`` on the batches of ``ranks`` (one rank under DDP; all of them, joined into one
    batch per step, for the single-process reference); evaluate ``model`` after each epoch."""
    plan = Schedule(settings, ranks, world, data)
    opt, schedule = plan.optimizer(net)
    bar = _progress(plan.total, ranks[0])
    accuracies, stats, t0 = [], RankStats(), time.perf_counter()
    for epoch in range(settings.epochs):
        net.train()
        for idx in plan.batches(epoch):
            if stop.is_set():
                raise Stopped(f"rank {ranks[0]} stopped at step {stats.steps}")
            started = time.perf_counter()
            loss = F.cross_entropy(net(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            stats.steps += 1
            stats.max_step_s = max(stats.max_step_s, time.perf_counter() - started)
            bar.update(1)
        if loop is not None:
            loop.flush(10.0)
        accuracies.append(evaluate(model, data))
        bar.set_postfix(test=f"{accuracies[-1]:.2%}")
    stats.seconds = time.perf_counter() - t0
    stats.loop = loop.summary() if loop is not None else {}
    bar.close()
    return accuracies, stats


def train_single(settings: TrainSettings, world: int) -> RunResult:
    """The reference: one process, plain batch norm, each step on the union of the batches the
    ``world`` workers would see."""
    torch.set_num_threads(1)
    torch.manual_seed(settings.seed)
    model = MODELS[settings.model]()
    data = digits()
    accuracies, stats = _train(settings, list(range(world)), world, model, model, None, data, threading.Event())
    return _finish(settings, world, model, data, accuracies, [asdict(stats)])


def _progress(total: int, rank: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"rank {rank}", position=rank, leave=False, disable=not sys.stderr.isatty())


@torch.no_grad()
def evaluate(model: nn.Module, data: Digits) -> float:
    """Test accuracy with the model's running statistics (for psq: the cluster's history)."""
    was_training = model.training
    model.eval()
    correct = (model(data.test_x).argmax(1) == data.test_y).sum().item()
    model.train(was_training)
    return correct / len(data.test_y)


@torch.no_grad()
def accuracy_with_recomputed_statistics(
    state: dict[str, torch.Tensor], data: Digits, model: str, batch: int = 64
) -> float:
    """Test accuracy of the trained weights after recomputing every BN layer's statistics on the
    whole training set, in a plain model: tells training-side from evaluation-side effects."""
    plain = MODELS[model]()
    plain.load_state_dict(state)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over all batches
    plain.train()
    for start in range(0, len(data.train_y), batch):
        plain(data.train_x[start : start + batch])
    return evaluate(plain, data)


def _finish(
    settings: TrainSettings, world: int, model: nn.Module, data: Digits, accuracies: list[float], ranks: list[Any]
) -> RunResult:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    weights = settings.run_dir / "model.pt"
    model.eval()  # the BN buffers take the cluster's statistics
    state = model.state_dict()
    torch.save(state, weights)
    wall = max(r["seconds"] for r in ranks)
    steps = ranks[0]["steps"]
    result = RunResult(
        {k: str(v) for k, v in asdict(settings).items()},
        world,
        accuracies,
        accuracies[-1],
        accuracy_with_recomputed_statistics(state, data, settings.model),
        wall,
        steps,
        steps / wall,
        ranks,
        str(weights),
    )
    (settings.run_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2))
    print(summary(result, settings), flush=True)
    return result


def summary(result: RunResult, settings: TrainSettings) -> str:
    loops = [r["loop"] for r in result.ranks if r["loop"]]
    lines = [
        f"psq digits run: norm={settings.norm}, {result.world} workers x batch {settings.batch}, "
        f"{settings.epochs} epochs, {settings.sharding} shards, seed {settings.seed}",
        f"  test accuracy ({'cluster statistics' if settings.norm == 'psq' else 'running statistics'}): "
        f"{result.accuracy:.2%}",
        f"  test accuracy with BN statistics recomputed on the train set: {result.accuracy_recomputed:.2%}",
        f"  steps per second: {result.steps_per_s:.1f} ({result.steps} steps per worker in {result.wall_s:.1f} s)",
    ]
    if loops:
        staleness = [r["mean_staleness_steps"] for r in loops if r["mean_staleness_steps"] is not None]
        msgs = {k: sum(r[k] for r in loops) for k in ("pushes", "answered", "unavailable", "rejected")}
        client = {k: sum(r.get("client", {}).get(k, 0) for r in loops) for k in ("messages", "errors")}
        lines += [
            f"  mean staleness of the history used: {np.mean(staleness):.2f} steps"
            if staleness
            else "  mean staleness: no history was used",
            f"  statistics: {msgs['pushes']} steps pushed in {client['messages']} messages, {msgs['answered']} "
            f"answered, {msgs['unavailable']} unavailable, {msgs['rejected']} rejected, {client['errors']} errors",
        ]
    lines.append(f"  weights (plain state dict): {result.weights}")
    return "\n".join(lines)


def _spawned(rank: int, settings: TrainSettings, world: int, rendezvous: str) -> None:
    _die_with_parent()
    try:
        run_rank(settings, rank, world, rendezvous)
    except Stopped:
        sys.exit(128 + signal.SIGTERM)


def _die_with_parent() -> None:
    """Linux: a rank gets SIGTERM if its launcher dies, even by SIGKILL: no orphans."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def launch(settings: TrainSettings) -> int:
    """Run ``settings.workers`` ranks as child processes (what torchrun would do), forwarding
    SIGTERM and Ctrl-C to them."""
    stop = _stop_on_signals()
    with tempfile.TemporaryDirectory() as folder:
        context = tmp.start_processes(
            _spawned,
            args=(settings, settings.workers, f"file://{folder}/rendezvous"),
            nprocs=settings.workers,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join(timeout=0.2):
                if stop.is_set():
                    for p in context.processes:
                        if p.is_alive():
                            os.kill(p.pid, signal.SIGTERM)
                    stop.clear()
        except tmp.ProcessExitedException as exc:
            print(f"psq worker: a rank stopped (exit code {exc.exit_code})", file=sys.stderr)
            return exc.exit_code or 1
        except tmp.ProcessRaisedException as exc:
            print(f"psq worker: a rank failed:\n{exc}", file=sys.stderr)
            return 1
    return 0


def main(settings: TrainSettings) -> int:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return launch(settings)
    try:
        run_rank(settings, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    except Stopped as exc:
        print(f"psq worker: {exc}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    from psq.command import settings_main

    sys.exit(settings_main(TrainSettings, "python -m workers.train", __doc__.splitlines()[0], main)())
