"""``psq bench load``: many simulated workers through one broker and 1, 2 and 4 shards.

Each simulated worker is a :class:`~psq.client.StatsClient` pushing ResNet-50-sized statistics
(53 layers, 26,560 channels, float32) once per simulated training step; the workers run as
asyncio tasks in a few client processes.  For each shard count the number of workers doubles
from 8 up to 512 until the p99 round trip passes 100 ms.  Reported per setup: pushes per
second, MB/s pushed, p50/p99 round trip, errors, and the broker's and aggregators' memory.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from typing import Any

import numpy as np

from psq.bench.services import services
from psq.bench.shapes import client_step, resnet50_layout
from psq.bench.timing import emit
from psq.client import StatsClient, Unavailable

P99_LIMIT_S = 0.1
PROCESSES = 2


async def _workers(frontend: str, names: list[str], step_s: float, seconds: float) -> dict[str, Any]:
    step_stats = client_step(resnet50_layout(), gradients=True)  # a training step: moments and gradient means
    rtts: list[float] = []
    errors = 0

    async def worker(name: str) -> None:
        nonlocal errors
        async with StatsClient(frontend, job="load", worker=name, timeout_s=5.0, retries=1) as client:
            await asyncio.sleep(random.uniform(0, step_s))  # workers do not step in lockstep
            start = time.perf_counter()
            step, next_at = 0, start
            while time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                try:
                    await client.push(step, **step_stats)
                    rtts.append(time.perf_counter() - t0)
                except Unavailable:
                    errors += 1
                step += 1
                next_at += step_s
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    await asyncio.gather(*(worker(n) for n in names))
    return {"rtts": rtts, "errors": errors}


def _client_process(frontend: str, names: list[str], step_s: float, seconds: float, out: Any) -> None:
    out.put(asyncio.run(_workers(frontend, names, step_s, seconds)))


def measure(frontend: str, workers: int, step_s: float, seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    names = [f"w{i}" for i in range(workers)]
    procs = [
        ctx.Process(target=_client_process, args=(frontend, names[i::PROCESSES], step_s, seconds, results))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    parts = [results.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    rtts = np.concatenate([np.asarray(p["rtts"]) for p in parts]) if parts else np.zeros(0)
    return {"pushes": len(rtts), "errors": sum(p["errors"] for p in parts), "rtts": rtts}


def run(
    shard_counts: tuple[int, ...] = (1, 2, 4),
    step_s: float = 0.25,
    seconds: float = 5.0,
    max_workers: int = 512,
    as_json: bool = False,
) -> list[list[Any]]:
    layout = resnet50_layout()
    message_mb = (2 * layout.layers * 8 + 2 * layout.total * 8) / 1e6  # float32 moments and gradient means
    rows, largest = [], {}
    for shards in shard_counts:
        with services(shards) as svc:
            workers = 8
            while workers <= max_workers:
                m = measure(svc.frontend, workers, step_s, seconds)
                rss = svc.rss_mib()
                p50, p99 = (float(np.percentile(m["rtts"], q)) * 1e3 for q in (50, 99)) if m["pushes"] else (0, 0)
                rows.append(
                    [
                        shards,
                        workers,
                        m["pushes"] / seconds,
                        m["pushes"] * message_mb / seconds,
                        p50,
                        p99,
                        m["errors"],
                        round(rss[0], 1),
                        round(max(rss[1:]), 1),
                    ]
                )
                if m["pushes"] and p99 <= P99_LIMIT_S * 1e3 and not m["errors"]:
                    largest[shards] = workers
                else:
                    break
                workers *= 2
    emit(
        f"psq bench load: simulated workers pushing ResNet-50 statistics and gradient means every "
        f"{step_s * 1e3:.0f} ms, {seconds:g} s each, clients in {PROCESSES} processes, tcp loopback",
        ["shards", "workers", "pushes/s", "MB/s", "p50 ms", "p99 ms", "errors", "broker MiB", "aggregator MiB"],
        rows,
        as_json,
        largest_workers_with_p99_under_100ms={str(k): v for k, v in largest.items()},
    )
    return rows
