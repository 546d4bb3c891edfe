"""StatsClient against real broker and aggregator processes."""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import pytest
import zmq
import zmq.asyncio
from conftest import wait_for_owner

from psq.client import PushResult, Rejected, StatsClient, Unavailable
from psq.layout import shard_of
from psq.protocol import ErrorCode
from psq.stats import GradientMeans, History, Moments

HALF_LIFE = 64.0
LAYERS = {f"block{i}.bn": 2 + i % 3 for i in range(8)}
NO_HANG_S = 60.0  # a liveness bound, not a speed target: only a hang gets near it

pytestmark = pytest.mark.asyncio


def step_stats(seed: int, count: float = 8.0, dtype: type = np.float64) -> dict[str, Moments]:
    rng = np.random.default_rng(seed)
    return {
        name: Moments(count, rng.normal(size=c).astype(dtype), rng.random(c).astype(dtype))
        for name, c in LAYERS.items()
    }


def assert_equals_local(result: PushResult, reference: dict[str, History]) -> None:
    assert set(result) == set(reference)
    for name, h in reference.items():
        want = h.moments
        np.testing.assert_allclose(result[name].count, want.count[0], rtol=1e-12)
        np.testing.assert_allclose(result[name].mean, want.mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(result[name].var, want.var, rtol=1e-12, atol=1e-14)
        assert result.versions[name] == h.version


async def test_several_clients_and_two_shards_match_a_local_history(cluster):
    c = cluster(2, "--half-life", str(HALF_LIFE))
    assert {shard_of(n, 2) for n in LAYERS} == {0, 1}  # the model really spans both shards
    reference = {name: History(HALF_LIFE) for name in LAYERS}
    clients = [StatsClient(c.endpoints.frontend, job="job", worker=f"w{i}") for i in range(3)]
    for client in clients:
        await client.open()
    try:
        for step in range(4):
            for i, client in enumerate(clients):  # a known order, so the local history can follow it
                stats = step_stats(seed=10 * step + i)
                for name, m in stats.items():
                    reference[name].update(m)
                result = await client.push(step, stats)
                assert_equals_local(result, reference)
        assert all(client.stats["messages"] == 4 * 2 + 1 for client in clients)  # per step one per shard, + HELLO
    finally:
        for client in clients:
            await client.close()


async def test_pushes_faster_than_replies_are_merged_without_losing_a_sample(cluster):
    c = cluster(1, "--half-life", "1e300")  # no decay: the history is the plain pooled data
    rng = np.random.default_rng(3)
    data = [rng.normal(size=(int(rng.integers(1, 20)), 4)) for _ in range(40)]
    async with StatsClient(c.endpoints.frontend, job="job", worker="w0") as client:
        results = await asyncio.gather(*(client.push(i, {"bn": Moments.of(x, 0)}) for i, x in enumerate(data)))
        assert client.stats["coalesced"] > 0 and client.stats["messages"] < len(data) + 1
        final = await client.push(len(data), {"bn": Moments(0.0, np.zeros(4), np.zeros(4))})
    assert all(isinstance(r, PushResult) for r in results)
    want = Moments.of(np.concatenate(data), 0)
    assert final["bn"].count == want.count
    np.testing.assert_allclose(final["bn"].mean, want.mean, rtol=1e-10)
    np.testing.assert_allclose(final["bn"].var, want.var, rtol=1e-10)


async def test_gradient_means_pushed_faster_than_replies_are_merged_exactly(cluster):
    """Coalesced pushes pool their gradient means by count, as the moments; a push without
    gradients between them adds none and its reply carries no gradient history."""
    c = cluster(1, "--half-life", "1e300")
    rng = np.random.default_rng(4)
    counts = rng.integers(1, 20, 30).astype(float)
    grads = [GradientMeans(n, rng.normal(size=4), rng.normal(size=4)) for n in counts]
    moments = {"bn": Moments(8.0, np.zeros(4), np.ones(4))}
    async with StatsClient(c.endpoints.frontend, job="job", worker="w0") as client:
        results = await asyncio.gather(
            *(client.push(i, moments, gradients={"bn": g}) for i, g in enumerate(grads)),
            client.push(30, moments),
        )
        assert client.stats["coalesced"] > 0
        final = await client.push(31, moments, gradients={"bn": GradientMeans(0.0, np.zeros(4), np.zeros(4))})
    assert all(r.gradient("bn") is not None for r in results[:-1])
    got = final.gradient("bn")
    assert got.count == counts.sum()
    np.testing.assert_allclose(got.dy, sum(g.count * g.dy for g in grads) / counts.sum(), rtol=1e-10)
    np.testing.assert_allclose(got.dy_xhat, sum(g.count * g.dy_xhat for g in grads) / counts.sum(), rtol=1e-10)


async def test_a_push_without_gradients_gets_no_gradient_history(cluster):
    c = cluster(1)
    async with StatsClient(c.endpoints.frontend, job="job", worker="w0") as client:
        result = await client.push(0, step_stats(0))
    assert all(result.gradient(name) is None for name in LAYERS)


async def test_gradients_of_the_wrong_width_are_refused_before_sending(cluster):
    c = cluster(1)
    async with StatsClient(c.endpoints.frontend, job="job", worker="w0") as client:
        with pytest.raises(Rejected, match=r"gradients of layer 'block0\.bn' have 5 channels"):
            await client.push(0, step_stats(0), gradients={"block0.bn": GradientMeans(8.0, np.zeros(5), np.zeros(5))})
        assert client.stats["messages"] == 1  # the HELLO only


async def test_clients_carry_on_after_the_broker_is_killed_and_restarted(cluster, spawn):
    c = cluster(1)
    outcomes: list[str] = []
    async with StatsClient(c.endpoints.frontend, job="job", worker="w0", timeout_s=0.3, retries=1) as client:

        async def push(step: int) -> None:
            try:
                await asyncio.wait_for(client.push(step, step_stats(step)), NO_HANG_S)
                outcomes.append("ok")
            except Unavailable:
                outcomes.append("unavailable")

        for step in range(5):
            await push(step)
        c.broker.kill(signal.SIGKILL)
        for step in range(5, 8):
            await push(step)
        spawn("broker", "--frontend", c.endpoints.frontend, "--backend", c.endpoints.backend)
        step, deadline = 8, asyncio.get_running_loop().time() + NO_HANG_S
        while outcomes[-3:] != ["ok"] * 3 and asyncio.get_running_loop().time() < deadline:
            await push(step)
            await asyncio.sleep(0.01)  # a training step's worth of time between pushes
            step += 1
        last = await client.push(step, step_stats(step))
    assert outcomes[:5] == ["ok"] * 5 and outcomes[5:8] == ["unavailable"] * 3
    assert outcomes[-3:] == ["ok"] * 3
    assert min(last.versions.values()) > 5  # the aggregator kept its history across the broker restart


async def test_a_hundred_concurrent_clients_complete_without_error(cluster):
    c = cluster(2, "--half-life", str(HALF_LIFE))

    async def worker(i: int) -> int:
        async with StatsClient(c.endpoints.frontend, job="job", worker=f"w{i}", timeout_s=10) as client:
            for step in range(3):
                await client.push(step, step_stats(1000 * i + step))
            return client.stats["errors"]

    errors = await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(100))), NO_HANG_S)
    assert errors == [0] * 100
    async with StatsClient(c.endpoints.frontend, job="job", worker="check") as client:
        result = await client.push(3, step_stats(7))
    assert set(result.versions.values()) == {301}


async def test_an_unreachable_broker_is_reported_not_waited_for(ipc_dir):
    async with StatsClient(f"ipc://{ipc_dir}/nobody", job="job", worker="w0", timeout_s=0.2, retries=1) as client:
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(client.push(0, step_stats(0)), NO_HANG_S)
    assert "broker" in info.value.reasons and len(info.value.partial) == 0


async def test_a_shard_without_aggregator_is_reported_with_the_others_answers(cluster):
    c = cluster(2)
    async with StatsClient(c.endpoints.frontend, job="job", worker="w0", timeout_s=0.3, retries=1) as client:
        await client.push(0, step_stats(0))
        c.aggregators[1].kill(signal.SIGKILL)
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(client.push(1, step_stats(1)), NO_HANG_S)
    assert set(info.value.reasons) == {1}
    assert set(info.value.partial) == {n for n in LAYERS if shard_of(n, 2) == 0}


async def test_statistics_the_aggregator_refuses_raise_rejected(cluster):
    c = cluster(1)
    bad = step_stats(0)
    bad["block0.bn"] = Moments(8.0, np.array([np.nan, 0.0]), np.ones(2))
    async with StatsClient(c.endpoints.frontend, job="job", worker="w0") as client:
        with pytest.raises(Rejected) as info:
            await client.push(0, bad)
        assert info.value.code is ErrorCode.NONFINITE
        assert await client.push(1, step_stats(1))  # the client goes on


async def test_a_restarted_aggregator_without_snapshot_gets_the_layout_again(cluster, spawn):
    c = cluster(1)
    async with StatsClient(c.endpoints.frontend, job="job", worker="w0") as client:
        await client.push(0, step_stats(0))
        c.aggregators[0].kill(signal.SIGKILL)
        fresh = spawn("aggregator", "--shard", "0/1", "--backend", c.endpoints.backend)
        await asyncio.to_thread(wait_for_owner, c.endpoints.frontend, 0, fresh)
        result = await client.push(1, step_stats(1))
    assert set(result.versions.values()) == {1}
    assert client.stats["errors"] >= 1  # the unknown_layout answer that made it resend


async def test_float32_statistics_travel_as_float32(cluster):
    c = cluster(1)
    async with StatsClient(c.endpoints.frontend, job="job", worker="w0") as client:
        result = await client.push(0, step_stats(0, dtype=np.float32))
    assert result["block0.bn"].mean.dtype == np.float32


async def test_push_before_open_is_a_clear_error():
    client = StatsClient("ipc:///nonexistent", job="job", worker="w0")
    with pytest.raises(RuntimeError, match="not open"):
        await client.push(0, step_stats(0))


async def test_malformed_replies_are_dropped_and_reported_not_trusted(ipc_dir):
    """A raw ROUTER posing as the broker welcomes the client, then answers its pushes with
    corrupt histories: the client refuses them, counts the errors and reports Unavailable."""
    from psq import protocol

    endpoint = f"ipc://{ipc_dir}/fake"
    ctx = zmq.asyncio.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.bind(endpoint)

    done = asyncio.Event()

    async def serve() -> None:
        while not done.is_set():
            if not await fake.poll(100, zmq.POLLIN):  # no recv is ever cancelled: stop by flag
                continue
            identity, envelope, *_ = await fake.recv_multipart()
            command, key = protocol.parse_envelope(envelope)
            if command is protocol.Command.HELLO:
                await fake.send_multipart([identity, *protocol.encode_welcome(1)])
            else:  # a HISTORY whose variances are negative and whose header lies about the seq
                bad = protocol.HistoryReply(
                    1, 0, b"\0" * 8, np.ones(1), np.zeros(2), -np.ones(2), np.ones(1, "<u8"), np.ones(1)
                )
                await fake.send_multipart([identity, *protocol.encode_history(bad, key)])

    server = asyncio.get_running_loop().create_task(serve())
    try:
        async with StatsClient(endpoint, job="job", worker="w0", timeout_s=0.3, retries=1) as client:
            with pytest.raises(Unavailable):
                await client.push(0, {"bn": Moments(4.0, np.zeros(2), np.ones(2))})
            assert client.stats["errors"] >= 1 and client.stats["replies"] == 0
    finally:
        done.set()
        await server
        fake.close(linger=0)
