"""Prometheus metrics of the broker and the aggregator, scraped over HTTP."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import zmq
from conftest import free_tcp_port, live_shards, recv, wait_until
from test_client import LAYERS, step_stats

from psq import protocol
from psq.client import StatsClient
from psq.stats import GradientMeans


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and ",".join(sorted((m[1] or "").split(","))).strip(",") == want:
            return float(m[2])
    raise AssertionError(f"no {name}{{{want}}} in the metrics")


def test_broker_and_aggregator_serve_their_metrics(spawn, endpoints, zsocket):
    broker_port, aggregator_port = free_tcp_port(), free_tcp_port()
    spawn(
        "broker", "--frontend", endpoints.frontend, "--backend", endpoints.backend, "--metrics-port", str(broker_port)
    )
    spawn("aggregator", "--backend", endpoints.backend, "--metrics-port", str(aggregator_port))
    wait_until(lambda: live_shards(endpoints.frontend) == {0}, what="the aggregator")

    async def pushes() -> None:
        async with StatsClient(endpoints.frontend, job="job", worker="w0") as client:
            for step in range(4):
                stats = step_stats(step)
                gradients = {n: GradientMeans(m.count, m.mean, m.var) for n, m in stats.items()}
                await client.push(step, stats, gradients=gradients if step else None)

    asyncio.run(pushes())
    sock = zsocket(zmq.DEALER)
    sock.connect(endpoints.frontend)
    sock.send_multipart([protocol.envelope(protocol.Command.PUSH, 0), b"\xc1"])  # refused by the aggregator
    recv(sock)

    b = scrape(broker_port)
    assert value(b, "psq_messages_total", role="broker", command="PUSH") == 5
    assert value(b, "psq_bytes_total", role="broker", command="PUSH") > 4 * sum(LAYERS.values()) * 8
    timed = value(b, "psq_round_trip_seconds_count", role="broker")  # the pushes, and status queries to the shard
    assert timed >= 5 and value(b, "psq_round_trip_seconds_bucket", role="broker", le="+Inf") == timed
    assert 0 < value(b, "psq_round_trip_seconds_sum", role="broker") < timed
    assert value(b, "psq_aggregators_live") == 1 and value(b, "psq_workers_live") == 1

    a = scrape(aggregator_port)
    assert value(a, "psq_errors_total", role="aggregator", code="header") == 1
    for layer in LAYERS:
        assert value(a, "psq_layer_version", shard="0", job="job", layer=layer) == 4
        assert value(a, "psq_layer_count", shard="0", job="job", layer=layer) > 0
        assert 0 <= value(a, "psq_layer_staleness_seconds", shard="0", job="job", layer=layer) < 60
        grads = value(a, "psq_layer_gradient_count", shard="0", job="job", layer=layer)
        assert 0 < grads < value(a, "psq_layer_count", shard="0", job="job", layer=layer)  # 3 of 4 steps had them


def test_a_metrics_port_in_use_is_a_clear_error(spawn, endpoints):
    port = free_tcp_port()
    spawn("broker", "--frontend", endpoints.frontend, "--backend", endpoints.backend, "--metrics-port", str(port))
    wait_until(lambda: _serving(port), what="the first broker's metrics")
    second = spawn("aggregator", "--backend", endpoints.backend, "--metrics-port", str(port))
    assert second.wait(timeout_s=20) == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in second.output()


def _serving(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True
