"""psq.transport.Transport on its own, against a real ROUTER socket playing the broker; and the
client's push plan on its own (coalescing), without any socket."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq

from psq import protocol
from psq.client import _Channel, _Pending
from psq.layout import Layout
from psq.protocol import BROKER_KEY, Command
from psq.stats import LayerMoments, Moments, Scratch, merge
from psq.transport import Request, Transport


class Peer:
    """The broker's side: a ROUTER that answers HELLO with WELCOME when told to."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(address)

    async def recv(self, timeout_s: float = 5.0) -> list[bytes]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.sock.poll(0):
            assert asyncio.get_running_loop().time() < deadline, "no request arrived"
            await asyncio.sleep(0.005)
        return self.sock.recv_multipart()


def transport(frontend: str, replies: list, gave_up: list, retries: int = 2) -> Transport:
    return Transport(
        frontend,
        timeout_s=0.2,
        retries=retries,
        backoff_s=0.01,
        max_message_bytes=protocol.DEFAULT_MAX_BYTES,
        keys=None,
        stats={"messages": 0, "retries": 0, "errors": 0},
        on_reply=lambda request, msg: replies.append((request, msg)),
        on_gave_up=gave_up.append,
    )


@pytest.mark.asyncio
async def test_an_unanswered_request_is_resent_with_the_same_frames_and_the_reply_reaches_its_request(ipc_dir):
    peer, replies, gave_up = Peer(f"ipc://{ipc_dir}/t"), [], []
    wire = transport(f"ipc://{ipc_dir}/t", replies, gave_up)
    hello = protocol.encode_hello("job", "w0")
    request = Request(BROKER_KEY, 1, hello)
    wire.send(request)
    first = await peer.recv()  # dropped: no answer
    second = await peer.recv()  # the Lazy Pirate's resend, over a fresh socket
    assert first[1:] == second[1:] == [bytes(f) for f in hello]
    assert wire.stats["retries"] >= 1 and wire.inflight(BROKER_KEY) is request
    peer.sock.send_multipart([second[0], *protocol.encode_welcome(3)])
    for _ in range(200):
        if replies:
            break
        await asyncio.sleep(0.005)
    ((answered, msg),) = replies
    assert answered is request and msg.command is Command.WELCOME and protocol.parse_welcome(msg) == 3
    future = asyncio.get_running_loop().create_future()
    request.waiters.append(future)
    wire.settle(request, 3)
    assert await future == 3 and wire.inflight(BROKER_KEY) is None and not gave_up
    wire.close()
    assert not wire.connected
    peer.sock.close()


@pytest.mark.asyncio
async def test_a_request_nobody_answers_is_given_up_after_its_retries(ipc_dir):
    replies, gave_up = [], []
    wire = transport(f"ipc://{ipc_dir}/nobody", replies, gave_up, retries=1)
    wire.on_gave_up = lambda r: (gave_up.append(r), wire.settle(r, "gone"))  # the owner settles it
    request = Request(BROKER_KEY, 1, protocol.encode_hello("job", "w0"))
    wire.send(request)
    await asyncio.sleep(wire.request_budget_s() + 0.3)
    assert gave_up == [request] and request.attempts == 2 and not replies and wire.inflight(BROKER_KEY) is None
    wire.close()


def pending(counts: float, seed: int, layout: Layout, step: int) -> _Pending:
    rng = np.random.default_rng(seed)
    stats = LayerMoments(
        np.full(layout.layers, counts), rng.normal(size=layout.total).astype(np.float32), rng.random(layout.total)
    )
    return _Pending(layout, stats, np.full(layout.layers, counts / 4), None, step, "<f4")


def test_updates_waiting_for_a_request_in_flight_merge_exactly():
    layout = Layout(("a", "b"), (2, 3))
    first, second = pending(8.0, 0, layout, step=4), pending(24.0, 1, layout, step=5)
    m1, m2 = first.stats, second.stats
    want = merge(Moments(8.0, m1.mean.astype(np.float64), m1.var), Moments(24.0, m2.mean.astype(np.float64), m2.var))
    first.merge(second, Scratch(layout.total))
    np.testing.assert_allclose(first.stats.mean, want.mean, rtol=1e-6)
    np.testing.assert_allclose(first.stats.var, want.var, rtol=1e-6)
    assert np.all(first.stats.counts == 32.0) and np.all(first.images == 8.0) and first.step == 5
    assert first.stats.mean.dtype == np.float64  # pooled in float64, cast to the wire's on sending


def test_a_shard_channel_merges_per_layout_and_sends_each_layout_in_full_once():
    ab, c = Layout(("a", "b"), (2, 3)), Layout(("c",), (4,))
    channel, scratch = _Channel(), {}

    async def queue_and_take() -> list[tuple[tuple[str, ...], int, bool]]:
        waiter = asyncio.get_running_loop().create_future
        merged = [
            channel.add(pending(8.0, i, layout, step=i), waiter(), scratch) for i, layout in enumerate([ab, c, ab])
        ]
        assert merged == [False, False, True] and len(channel.pending[ab.id].waiters) == 2
        taken = [channel.take(), channel.take()]
        channel.add(pending(8.0, 3, ab, step=7), waiter(), scratch)
        taken.append(channel.take())
        assert not channel.pending
        return [(p.layout.names, p.step, in_full) for p, in_full in taken]

    assert asyncio.run(queue_and_take()) == [(("a", "b"), 2, True), (("c",), 1, True), (("a", "b"), 7, False)]


def test_an_update_merged_in_float64_goes_out_in_its_wire_dtype():
    layout = Layout(("a", "b"), (2, 3))
    first = pending(8.0, 0, layout, step=4)
    first.merge(pending(8.0, 1, layout, step=5), Scratch(layout.total))
    push = first.to_push("job", "w0", session=9, seq=3)
    assert (push.job, push.worker, push.session, push.seq, push.step, push.reply_dtype) == ("job", "w0", 9, 3, 5, "<f4")
    assert push.means.dtype == push.var.dtype == np.float32 and push.gradients is None
    np.testing.assert_allclose(push.means, first.stats.mean.astype(np.float32))


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_the_plan_sends_each_layer_to_its_shard_once(shards):
    from psq.client import StatsClient
    from psq.layout import shard_of

    client = StatsClient("ipc:///unused", job="j", worker="w")
    stats = {f"l{i}": Moments(1.0, np.zeros(2), np.ones(2)) for i in range(12)}
    plan = client._plan(stats, shards)
    assert client._plan(stats, shards) is plan  # cached per model shape
    assert sorted(n for _, layout in plan for n in layout.names) == sorted(stats)
    assert all(shard_of(n, shards) == s for s, layout in plan for n in layout.names)
