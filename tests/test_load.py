"""Bounded memory when an aggregator is slower than the traffic, and the load benchmark."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import numpy as np
import zmq
from conftest import recv, wait_until
from test_cli import run_psq

from psq import protocol
from psq.bench.shapes import random_stats, resnet50_layout
from psq.client import StatsClient, Unavailable

LAYOUT = resnet50_layout()


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def test_broker_memory_stays_bounded_while_the_aggregator_stalls(cluster, zsocket):
    c = cluster(1)
    flood = zsocket(zmq.DEALER)
    flood.setsockopt(zmq.SNDHWM, 0)  # this sender queues all it wants; the broker must not
    flood.connect(c.endpoints.frontend)
    counts, means, var, images = random_stats(LAYOUT)
    frames = protocol.encode_push(
        protocol.Push("flood", "w", 1, 1, 1, LAYOUT, counts, means, var, images, "<f4"), 0, True
    )
    flood.send_multipart(protocol.encode_status())  # connected and answered before the flood
    recv(flood)
    before = rss_mib(c.broker.pid)
    c.aggregators[0].kill(signal.SIGSTOP)  # an aggregator infinitely slower than the traffic
    try:
        for seq in range(1500):  # 1,500 x 212 KB = 320 MB, never waiting for an answer
            frames[1] = protocol.encode_push(
                protocol.Push("flood", "w", 1, seq, seq, LAYOUT, counts, means, var, images, "<f4"), 0, seq == 0
            )[1]
            flood.send_multipart(frames, copy=False)
        deadline = time.monotonic() + 5
        peak = before
        while time.monotonic() < deadline:
            peak = max(peak, rss_mib(c.broker.pid))
            time.sleep(0.1)
        assert peak - before < 100, f"broker grew from {before:.0f} to {peak:.0f} MiB"
        probe = zsocket(zmq.DEALER)
        probe.connect(c.endpoints.frontend)
        probe.send_multipart(protocol.encode_status())
        assert protocol.decode(recv(probe, 10)).command is protocol.Command.REPORT  # still answering
    finally:
        c.aggregators[0].kill(signal.SIGCONT)


def test_a_client_merges_what_a_stalled_aggregator_cannot_take(cluster):
    c = cluster(1)
    stats = LAYOUT.split(*random_stats(LAYOUT)[:3])

    async def burst() -> tuple[list[object], dict[str, int]]:
        async with StatsClient(c.endpoints.frontend, job="burst", worker="w", timeout_s=0.5, retries=1) as client:
            await client.push(0, stats)  # registered and answered once
            c.aggregators[0].kill(signal.SIGSTOP)
            try:
                outcomes = await asyncio.gather(*(client.push(i, stats) for i in range(1, 201)), return_exceptions=True)
            finally:
                c.aggregators[0].kill(signal.SIGCONT)
            return outcomes, dict(client.stats)

    outcomes, stats_ = asyncio.run(burst())
    assert all(isinstance(o, Unavailable) for o in outcomes)  # reported, not waited out
    assert stats_["coalesced"] >= 190 and stats_["messages"] <= 8  # memory: one in flight, one merged
    wait_until(lambda: c.aggregators[0].alive(), what="the aggregator to run again")


def test_bench_load_prints_its_table():
    out = run_psq("bench", "load", "--shards", "1", "--max-workers", "8", "--seconds", "1", "--json", timeout_s=240)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    row = result["rows"][0]
    assert row[:2] == [1, 8] and row[2] > 0 and row[6] == 0
    assert row[7] > 0 and row[8] > 0  # memory of broker and aggregator reported
    assert np.isfinite(row[5])
