"""``psq bench step``: per-step time with plain, synchronized and psq batch norm, side by side.

Two DistributedDataParallel workers over gloo (CPU, one thread each) train the same small
ResNet (3x32x32 inputs, per-worker batch 8) three ways in the same processes, taking turns
round after round so that drift on this noisy machine falls on all three alike:

* ``plain``: ``nn.BatchNorm2d`` (per-worker statistics);
* ``syncbn``: fairscale's ``SyncBatchNorm`` (torch's refuses CPU tensors), a blocking
  collective in every BN layer — the synchronized reference;
* ``psq``: :class:`psq.torch.PSBatchNorm` with a background :class:`psq.WorkerLoop`, against a
  broker and an aggregator started here.

All three use ``broadcast_buffers=False``, so no method pays for a buffer broadcast.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn.functional as F
from torch import nn

from psq.bench.timing import emit
from psq.bench.transport import cluster
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


def run(steps: int = 20, rounds: int = 5, batch: int = 8, as_json: bool = False) -> dict[str, float]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as folder, cluster(1) as frontend:
        out = Path(folder) / "times.pt"
        tmp.start_processes(
            _worker,
            args=(f"file://{folder}/rendezvous", frontend, str(out), steps, rounds, batch),
            nprocs=WORKERS,
            join=True,
            start_method="spawn",
        )
        result = torch.load(out, weights_only=False)
    medians = {k: float(np.median(v)) for k, v in result["times"].items()}
    rows = [
        [k, medians[k] * 1e3, float(np.percentile(result["times"][k], 90)) * 1e3, medians[k] / medians["plain"]]
        for k in METHODS
    ]
    loop = result["loop"]
    emit(
        f"psq bench step: small ResNet, 3x32x32, batch {batch} per worker, {WORKERS} DDP workers (gloo, CPU, "
        "1 thread each)",
        ["batch norm", "ms/step p50", "ms/step p90", "x plain"],
        rows,
        as_json,
        steps_timed=rounds * steps,
        syncbn_over_psq=round(medians["syncbn"] / medians["psq"], 3),
        psq_mean_staleness_steps=loop["mean_staleness_steps"],
        psq_unavailable=loop["unavailable"],
    )
    return medians
