"""``psq status``: the broker's table and each shard's layers, as text and as JSON."""

from __future__ import annotations

import asyncio
import json

from test_cli import run_psq
from test_client import LAYERS, step_stats

from psq.client import StatsClient


async def push_some(frontend: str) -> None:
    async with StatsClient(frontend, job="job", worker="w7") as client:
        for step in range(3):
            await client.push(step, step_stats(step))


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
        name: (count, version)
        for rep in report["shard_reports"].values()
        for name, count, version in rep["jobs"]["job"]
    }
    assert set(layers) == set(LAYERS)
    assert all(version == 3 and count > 0 for count, version in layers.values())


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
