"""``psq status``: the broker's table and each shard's layers, as text and as JSON."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import zmq
from test_cli import run_psq
from test_client import LAYERS, step_stats

from psq import protocol
from psq.client import StatsClient
from psq.stats import GradientMeans


async def push_some(frontend: str) -> None:
    async with StatsClient(frontend, job="job", worker="w7") as client:
        for step in range(3):
            stats = step_stats(step)
            gradients = {n: GradientMeans(m.count, m.mean, -m.mean) for n, m in stats.items()} if step else None
            await client.push(step, stats, gradients=gradients)


def test_status_json_shows_aggregators_workers_and_layers(cluster):
    c = cluster(2)
    asyncio.run(push_some(c.endpoints.frontend))
    out = run_psq("status", "--json", "--frontend", c.endpoints.frontend)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["shards"] == 2
    assert sorted((a["shard"], a["alive"]) for a in report["aggregators"]) == [(0, True), (1, True)]
    assert [(w["job"], w["worker"]) for w in report["workers"]] == [("job", "w7")]
    layers = {
        name: (count, version, gradient_count)
        for rep in report["shard_reports"].values()
        for name, count, version, gradient_count in rep["jobs"]["job"]
    }
    assert set(layers) == set(LAYERS)
    assert all(version == 3 and count > 0 and 0 < grads < count for count, version, grads in layers.values())


def test_status_text_lists_the_same(cluster):
    c = cluster(1)
    asyncio.run(push_some(c.endpoints.frontend))
    out = run_psq("status", "--frontend", c.endpoints.frontend)
    assert out.returncode == 0, out.stderr
    assert "shard 0/1  alive" in out.stdout and "job/w7" in out.stdout
    assert all(name in out.stdout for name in LAYERS)


def test_status_without_a_broker_fails_clearly(ipc_dir):
    out = run_psq("status", "--frontend", f"ipc://{ipc_dir}/none", "--timeout-s", "0.2")
    assert out.returncode == 1 and "did not answer within 0.2 s" in out.stderr


def fake_broker(endpoint: str, answer) -> threading.Thread:
    """A raw ROUTER posing as the broker: it answers one request with ``answer(frames)``."""

    def serve() -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        try:
            if sock.poll(20_000):
                identity, *frames = sock.recv_multipart()
                sock.send_multipart([identity, *answer(frames)])
                time.sleep(0.5)
        finally:
            sock.close(linger=0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "report",
    [
        {"broker": {}, "shards": 1, "aggregators": [{"shard": "zero"}], "workers": []},  # mistyped
        {
            "broker": {},
            "shards": 1,
            "aggregators": [{"shard": 5, "shards": 2, "name": "a", "alive": True, "last_seen_s": 0.1}],
            "workers": [],
        },  # impossible
        {"hello": "world"},  # not a broker report at all
    ],
)
def test_a_malformed_broker_report_is_a_clear_error(ipc_dir, report):
    endpoint = f"ipc://{ipc_dir}/fake"
    thread = fake_broker(endpoint, lambda frames: protocol.encode_report(report))
    out = run_psq("status", "--frontend", endpoint, "--timeout-s", "5")
    thread.join(10)
    assert out.returncode == 1 and "psq status: the broker at" in out.stderr
