"""``psq bench step``: per-step time with plain, synchronized and psq batch norm, side by side.

Two DistributedDataParallel workers over gloo (CPU, one thread each) train the same small
ResNet (3x32x32 inputs, per-worker batch 8) three ways in the same processes, taking turns
round after round so that drift on this noisy machine falls on all three alike:

* ``plain``: ``nn.BatchNorm2d`` (per-worker statistics);
* ``syncbn``: fairscale's ``SyncBatchNorm`` (torch's refuses CPU tensors), a blocking
  collective in every BN layer — the synchronized reference;
* ``psq``: :class:`psq.torch.PSBatchNorm` with a background :class:`psq.WorkerLoop`, against a
  broker and an aggregator started here.

All three turn DDP's buffer sync off (``ddp_buffer_sync(False)``), so no method pays for a broadcast.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn.functional as F
from torch import nn

from psq.bench.services import cluster
from psq.bench.timing import emit
from psq.command import settings_main
from psq.config import DEFAULT_FRONTEND, SettingsError, endpoint, non_negative_int, positive_int, setting
from psq.loop import WorkerLoop
from psq.torch import convert_batchnorm, ddp_buffer_sync
from workers.models import small_resnet

METHODS = ("plain", "syncbn", "psq")
WORKERS = 2


def _models(frontend: str, rank: int) -> tuple[dict[str, nn.Module], WorkerLoop]:
    from fairscale.experimental.nn import SyncBatchNorm  # benchmark-only dependency

    torch.manual_seed(0)
    base = small_resnet()
    loop = WorkerLoop(frontend, job="bench-step", worker=f"rank{rank}").start()
    loop.wait_ready(30.0)
    models = {
        "plain": copy.deepcopy(base),
        "syncbn": SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)),
        "psq": convert_batchnorm(copy.deepcopy(base), loop),
    }
    return {k: nn.parallel.DistributedDataParallel(m, **ddp_buffer_sync(False)) for k, m in models.items()}, loop


def _worker(rank: int, rendezvous: str, frontend: str, out: str, steps: int, rounds: int, batch: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORKERS)
    models, loop = _models(frontend, rank)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    gen = torch.Generator().manual_seed(rank)
    data = [
        (torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
        for _ in range(steps)
    ]
    times: dict[str, list[float]] = {k: [] for k in METHODS}
    try:
        for r in range(rounds + 1):  # round 0 warms up every method
            for method in METHODS:
                for x, y in data:
                    dist.barrier()  # each step starts together on both workers
                    t0 = time.perf_counter()
                    loss = F.cross_entropy(models[method](x), y)
                    optimizers[method].zero_grad()
                    loss.backward()
                    optimizers[method].step()
                    if r:
                        times[method].append(time.perf_counter() - t0)
        summary = loop.summary()
    finally:
        loop.stop()
    if rank == 0:
        torch.save({"times": times, "loop": summary}, out)
    dist.barrier()
    dist.destroy_process_group()


def _measure_local(steps: int, rounds: int, batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder, cluster(1) as frontend:
        out = Path(folder) / "times.pt"
        tmp.start_processes(
            _worker,
            args=(f"file://{folder}/rendezvous", frontend, str(out), steps, rounds, batch),
            nprocs=WORKERS,
            join=True,
            start_method="spawn",
        )
        return torch.load(out, weights_only=False)


def _measure_delayed(delay_ms: float, steps: int, rounds: int, batch: int) -> dict[str, Any]:
    """Each worker in its own network namespace, broker and aggregator in a third, every pair
    ``delay_ms`` apart one way (:mod:`psq.bench.netdelay`)."""
    from psq.bench.netdelay import link

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "psq0", "OMP_NUM_THREADS": "1", "PSQ_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory() as folder, link(3, delay_ms) as net:
        out = Path(folder) / "times.pt"
        frontend = f"tcp://{net.address(2)}:5555"
        service = [
            subprocess.Popen(net.command(2, [sys.executable, "-m", "psq", *args]), env=env)
            for args in (
                ["broker", "--frontend", frontend, "--backend", "tcp://127.0.0.1:5556", "--insecure"],
                ["aggregator", "--backend", "tcp://127.0.0.1:5556"],
            )
        ]
        try:
            flags = {"rendezvous": f"tcp://{net.address(0)}:29500", "frontend": frontend, "out": out}
            flags |= {"steps": steps, "rounds": rounds, "batch": batch}
            ranks = [subprocess.Popen(net.command(r, _rank_command(r, flags)), env=env) for r in range(WORKERS)]
            codes = [p.wait(timeout=1800) for p in ranks]
            if codes != [0] * WORKERS:
                raise RuntimeError(f"the delayed step benchmark's ranks exited with {codes}")
            return torch.load(out, weights_only=False)
        finally:
            for p in service:
                p.terminate()
                p.wait(10)


def _rank_command(rank: int, flags: dict[str, Any]) -> list[str]:
    """``python -m workers.step_bench`` for one rank of the delayed benchmark."""
    args = [f"--{name}={value}" for name, value in {"rank": rank, **flags}.items()]
    return [sys.executable, "-m", "workers.step_bench", *args]


def run(
    steps: int = 20, rounds: int = 5, batch: int = 8, as_json: bool = False, delays_ms: tuple[float, ...] | None = None
) -> dict[str, Any]:
    """Plain, synchronized and psq batch norm, on loopback, or across the delay link for each of
    ``delays_ms`` (one-way, between the workers and between workers and the broker)."""
    if delays_ms is not None:
        from psq.bench.netdelay import available

        why = available()
        if why:
            print(f"psq bench step: the delay link {why}; skipped (run as root on Linux)")
            return {}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cases = (
        {"loopback": _measure_local(steps, rounds, batch)}
        if delays_ms is None
        else {f"{d:g} ms": _measure_delayed(d, steps, rounds, batch) for d in delays_ms}
    )
    rows, medians = [], {}
    for case, result in cases.items():
        m = medians[case] = {k: float(np.median(v)) for k, v in result["times"].items()}
        rows += [
            [case, k, m[k] * 1e3, float(np.percentile(result["times"][k], 90)) * 1e3, m[k] / m["plain"]]
            for k in METHODS
        ]
    loops = {case: r["loop"] for case, r in cases.items()}
    emit(
        f"psq bench step: small ResNet, 3x32x32, batch {batch} per worker, {WORKERS} DDP workers (gloo, CPU, "
        "1 thread each)",
        ["link", "batch norm", "ms/step p50", "ms/step p90", "x plain"],
        rows,
        as_json,
        steps_timed=rounds * steps,
        syncbn_over_psq={case: round(m["syncbn"] / m["psq"], 3) for case, m in medians.items()},
        psq_mean_staleness_steps={c: loop["mean_staleness_steps"] for c, loop in loops.items()},
        psq_unavailable={c: loop["unavailable"] for c, loop in loops.items()},
    )
    return medians


@dataclass(frozen=True)
class StepRank:
    """One rank of the delayed step benchmark, started inside its network namespace."""

    environment: ClassVar[bool] = False  # flags only: the namespace's environment is the parent's
    rank: int = setting(-1, "this rank (required)", non_negative_int)
    rendezvous: str = setting("", "the process group's rendezvous, tcp://host:port", str)
    frontend: str = setting(DEFAULT_FRONTEND, "the broker's frontend address", endpoint)
    out: Path = setting(Path("step.pt"), "where rank 0 writes the timings", Path)
    steps: int = setting(20, "steps per method per round", positive_int)
    rounds: int = setting(5, "timed rounds", positive_int)
    batch: int = setting(8, "per-worker batch", positive_int)

    def __post_init__(self) -> None:
        if self.rank < 0:  # two processes both rank 0 would wait for each other forever
            raise SettingsError("--rank is required")
        if not self.rendezvous.startswith("tcp://"):
            raise SettingsError(f"--rendezvous: expected tcp://host:port, got {self.rendezvous!r}")


def _rank(s: StepRank) -> int:
    _worker(s.rank, s.rendezvous, s.frontend, str(s.out), s.steps, s.rounds, s.batch)
    return 0


main = settings_main(StepRank, "python -m workers.step_bench", "one rank of the delayed step benchmark", _rank)


if __name__ == "__main__":
    sys.exit(main())
