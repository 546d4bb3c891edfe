"""``psq bench transport``: round trips and sustained pushes through broker and aggregators.

Side by side in one run, for a ResNet-50-sized push (53 layers, 26,560 channels, float32) with
the forward's moments alone and with a training step's gradient means too, and a small one (1
layer, 64 channels):

* the floor — the same frames echoed by a raw pyzmq peer through one C-level ``zmq.proxy`` hop
  (round trip), and sent one way through the proxy as fast as it takes them (rate);
* psq with 1 and with 2 aggregator shards — ``StatsClient.push`` round trips through the broker
  and the aggregators, and the sustained rate of several clients pushing back to back.

All over tcp on loopback, every process on this machine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import zmq

from psq import protocol
from psq.bench.services import cluster, free_address, processes
from psq.bench.shapes import client_step, resnet50_layout, step_push
from psq.bench.timing import emit
from psq.client import StatsClient
from psq.layout import Layout

CLIENTS = 4  # concurrent clients for the sustained rate


@dataclass(frozen=True)
class Case:
    name: str
    layout: Layout
    gradients: bool = False


def cases() -> list[Case]:
    return [
        Case("resnet50 (53 layers, 26,560 ch)", resnet50_layout()),
        Case("resnet50 + gradient means", resnet50_layout(), gradients=True),
        Case("small (1 layer, 64 ch)", Layout(("bn",), (64,))),
    ]


def _frames(case: Case) -> list[bytes]:
    return [bytes(memoryview(f)) for f in protocol.encode_push(step_push(case.layout, case.gradients), 0, False)]


# -- the floor ------------------------------------------------------------------------------------


def floor(case: Case, round_trips: int, seconds: float) -> tuple[np.ndarray, float]:
    """(round-trip seconds, one-way messages per second) of the same frames through zmq.proxy."""
    frames = _frames(case)
    front, back = free_address(), free_address()
    ctx = zmq.Context.instance()
    with processes(["psq.bench.floor", "proxy", front, back], ["psq.bench.floor", "echo", back]):
        sock = ctx.socket(zmq.DEALER)
        sock.connect(front)
        try:
            _echo(sock, frames, 20)  # connect and warm up
            rtt = _echo(sock, frames, round_trips)
        finally:
            sock.close(linger=0)
    with processes(["psq.bench.floor", "proxy", front, back], ["psq.bench.floor", "sink", back]):
        rate = _one_way_rate(ctx, front, frames, seconds)
    return rtt, rate


def _echo(sock: zmq.Socket, frames: list[bytes], n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        sock.send_multipart(frames)
        if not sock.poll(10_000):
            raise RuntimeError("the floor's echo did not answer in 10 s")
        sock.recv_multipart(copy=False)
        out[i] = time.perf_counter() - t0
    return out


def _one_way_rate(ctx: zmq.Context, front: str, frames: list[bytes], seconds: float) -> float:
    """Messages per second delivered one way; a final echoed marker proves they all arrived."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 100)
    sock.connect(front)
    try:
        _marker(sock)
        sent, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(50):
                sock.send_multipart(frames)
            sent += 50
        _marker(sock)
        return sent / (time.perf_counter() - t0)
    finally:
        sock.close(linger=0)


def _marker(sock: zmq.Socket) -> None:
    sock.send_multipart([b"mark"])
    if not sock.poll(30_000):
        raise RuntimeError("the floor's sink did not answer in 30 s")
    sock.recv_multipart()


# -- psq ------------------------------------------------------------------------------------------


async def psq_round_trips(front: str, case: Case, n: int) -> np.ndarray:
    step = client_step(case.layout, case.gradients)
    out = np.empty(n)
    async with StatsClient(front, job="bench", worker="rtt", timeout_s=5) as client:
        for i in range(20):
            await client.push(i, **step)
        for i in range(n):
            t0 = time.perf_counter()
            await client.push(i, **step)
            out[i] = time.perf_counter() - t0
    return out


async def psq_rate(front: str, case: Case, seconds: float) -> float:
    """Pushes per second of CLIENTS clients each pushing back to back (nothing coalesced)."""
    step = client_step(case.layout, case.gradients)
    clients = [StatsClient(front, job="bench", worker=f"rate{i}", timeout_s=5) for i in range(CLIENTS)]
    for c in clients:
        await c.open()
        await c.push(0, **step)
    done = 0
    stop = time.perf_counter() + seconds

    async def pusher(client: StatsClient) -> None:
        nonlocal done
        number = 1
        while time.perf_counter() < stop:
            await client.push(number, **step)
            number += 1
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(pusher(c) for c in clients))
    elapsed = time.perf_counter() - t0
    for c in clients:
        await c.close()
    return done / elapsed


def run(round_trips: int = 300, seconds: float = 3.0, as_json: bool = False) -> list[list[object]]:
    rows: list[list[object]] = []
    for case in cases():
        rtt, one_way = floor(case, round_trips, seconds)
        p50 = float(np.median(rtt))
        rows.append([case.name, "floor: zmq.proxy + echo", p50 * 1e3, np.percentile(rtt, 99) * 1e3, 1.0, one_way, 1.0])
        for shards in (1, 2):
            with cluster(shards) as front:
                samples = asyncio.run(psq_round_trips(front, case, round_trips))
                rate = asyncio.run(psq_rate(front, case, seconds))
            rows.append(
                [
                    case.name,
                    f"psq, {shards} shard{'s' if shards > 1 else ''}",
                    float(np.median(samples)) * 1e3,
                    float(np.percentile(samples, 99)) * 1e3,
                    float(np.median(samples)) / p50,
                    rate,
                    rate / one_way,
                ]
            )
    emit(
        "psq bench transport: round trip and sustained pushes, tcp loopback",
        ["message", "path", "p50 ms", "p99 ms", "p50 x floor", "pushes/s", "x floor one-way"],
        rows,
        as_json,
        round_trips=round_trips,
        rate_seconds=seconds,
        rate_clients=CLIENTS,
    )
    return rows
