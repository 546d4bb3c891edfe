"""The aggregator process: validation before state, at-most-once updates, snapshots, sync mode."""

from __future__ import annotations

import asyncio
import signal

import msgpack
import numpy as np
import pytest
import zmq
from conftest import recv, wait_for_owner, wait_until
from test_broker import error_of

from broker import snapshot
from psq import protocol
from psq.client import StatsClient
from psq.layout import Layout
from psq.protocol import Command, ErrorCode
from psq.stats import History, LayerGradients, Moments, merge
from psq.status import query

LAYOUT = Layout(("bn1", "bn2"), (3, 2))
HALF_LIFE = 40.0


def push(seq: int, seed: int, session: int = 11, count: float = 8.0, layout: Layout = LAYOUT) -> protocol.Push:
    rng = np.random.default_rng(seed)
    return protocol.Push(
        "job",
        "raw",
        session,
        seq,
        seq,
        layout,
        np.full(layout.layers, count),
        rng.normal(size=layout.total),
        rng.random(layout.total),
        np.full(layout.layers, count),  # images: one per element
        "<f8",
        LayerGradients(np.full(layout.layers, count), rng.normal(size=layout.total), rng.normal(size=layout.total)),
    )


def frames_of(p: protocol.Push, with_layout: bool = True) -> list[bytes]:
    return [bytes(memoryview(f)) for f in protocol.encode_push(p, 0, with_layout)]


def send_each(zsocket, frontend: str, pushes: list[protocol.Push]) -> zmq.Socket:
    """Send each push from a new DEALER, waiting for its answer before the next; the DEALER."""
    sock = zsocket(zmq.DEALER)
    sock.connect(frontend)
    for p in pushes:
        sock.send_multipart(frames_of(p))
        recv(sock)
    return sock


def history_reply(frames: list[bytes]) -> protocol.HistoryReply:
    return protocol.parse_history(protocol.decode(frames), LAYOUT)


def local(pushes: list[protocol.Push]) -> History:
    h = History(HALF_LIFE, channels=LAYOUT.total)
    for p in pushes:
        h.update(Moments(LAYOUT.expand(p.counts), p.means, p.var))
    h.pushes = pushes  # for the gradient history, computed by brute force in assert_history
    return h


def local_gradients(pushes: list[protocol.Push]) -> tuple[float, np.ndarray, np.ndarray]:
    """Each push's gradient means weighted by its count, halved every HALF_LIFE images after it."""
    later = np.cumsum([p.images[0] for p in pushes][::-1])[::-1] - [p.images[0] for p in pushes]
    weights = [p.gradients.counts[0] * 2.0 ** (-s / HALF_LIFE) for p, s in zip(pushes, later)]
    total = sum(weights)
    dy = sum(w * p.gradients.dy for w, p in zip(weights, pushes)) / total
    dy_xhat = sum(w * p.gradients.dy_xhat for w, p in zip(weights, pushes)) / total
    return total, dy, dy_xhat


def assert_history(reply: protocol.HistoryReply, want: History) -> None:
    count, dy, dy_xhat = local_gradients(want.pushes)
    np.testing.assert_allclose(reply.gradients.counts, count, rtol=1e-12)
    np.testing.assert_allclose(reply.gradients.dy, dy, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(reply.gradients.dy_xhat, dy_xhat, rtol=1e-10, atol=1e-13)
    m = want.moments
    np.testing.assert_allclose(reply.counts, m.count[LAYOUT.offsets[:-1]], rtol=1e-12)
    np.testing.assert_allclose(reply.means, m.mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(reply.var, m.var, rtol=1e-12, atol=1e-14)
    assert list(reply.versions) == [want.version] * LAYOUT.layers


def mutate(frames: list[bytes], index: int, value: bytes) -> list[bytes]:
    out = list(frames)
    out[index] = value
    return out


def with_header(frames: list[bytes], **changes) -> list[bytes]:
    header = {**msgpack.unpackb(frames[1]), **changes}
    return mutate(frames, 1, msgpack.packb(header))


def malformed(seq: int) -> list[tuple[ErrorCode, list[bytes]]]:
    good = frames_of(push(seq, 99))
    spec = msgpack.unpackb(good[1])["arrays"]
    nan = np.zeros(5)
    nan[2] = np.nan
    return [
        (ErrorCode.HEADER, with_header(good, seq="7")),
        (ErrorCode.HEADER, with_header(good, surprise=True)),
        (ErrorCode.HEADER, mutate(good, 1, b"\xc1")),
        (ErrorCode.NONFINITE, mutate(good, 3, nan.tobytes())),
        (ErrorCode.NEGATIVE, mutate(good, 4, np.full(5, -1.0).tobytes())),
        (ErrorCode.RANGE, mutate(good, 3, np.full(5, 1e200).tobytes())),  # finite, but would overflow
        (ErrorCode.NEGATIVE, mutate(good, 2, np.array([8.0, -8.0]).tobytes())),
        (ErrorCode.LENGTH, mutate(good, 3, np.zeros(4).tobytes())),
        (ErrorCode.DTYPE, with_header(good, arrays=[["<f8", 2], ["<i8", 5], ["<f8", 5], ["<f8", 2], *spec[4:]])),
        (ErrorCode.FRAMES, good[:-1]),
        (ErrorCode.RANGE, mutate(good, 5, np.full(2, 9.0).tobytes())),  # more images than elements
        (ErrorCode.NONFINITE, mutate(good, 7, nan.tobytes())),  # a gradient mean
        (ErrorCode.RANGE, mutate(good, 8, np.full(5, -1e31).tobytes())),  # a gradient-x̂ mean
        (ErrorCode.NEGATIVE, mutate(good, 6, np.array([8.0, -1.0]).tobytes())),  # a gradient count
        (
            ErrorCode.LAYOUT,
            with_header(mutate(good, 7, np.zeros(4).tobytes()), arrays=[*spec[:5], ["<f8", 4], spec[6]]),
        ),
        (ErrorCode.DTYPE, with_header(mutate(good, 8, np.zeros(5, "<f4").tobytes()), arrays=[*spec[:6], ["<f4", 5]])),
        (ErrorCode.LAYOUT, with_header(good, channels=[3, 3])),
        (ErrorCode.UNKNOWN_LAYOUT, frames_of(push(seq, 99, layout=Layout(("bn1",), (3,))), with_layout=False)),
    ]


def shard_report(frontend: str) -> dict:
    return query(frontend, 2.0)["shard_reports"]["0"]


def test_malformed_pushes_get_errors_and_leave_the_history_untouched(cluster, zsocket):
    c = cluster(1, "--half-life", str(HALF_LIFE))
    sock = zsocket(zmq.DEALER)
    sock.connect(c.endpoints.frontend)
    first = push(1, 1)
    sock.send_multipart(frames_of(first))
    assert_history(history_reply(recv(sock)), local([first]))
    before = shard_report(c.endpoints.frontend)["jobs"]
    for code, frames in malformed(seq=2):
        sock.send_multipart(frames)
        err = error_of(recv(sock))
        assert err.code is code, (code, err)
    report = shard_report(c.endpoints.frontend)
    assert report["jobs"] == before
    assert sum(report["errors"].values()) == len(malformed(2))
    second = push(3, 2)
    sock.send_multipart(frames_of(second))
    assert_history(history_reply(recv(sock)), local([first, second]))


def test_malformed_frames_sent_straight_to_the_aggregator(spawn, endpoints, zsocket):
    """The aggregator behind a raw ROUTER playing the broker: it validates on its own."""
    fake_broker = zsocket(zmq.ROUTER)
    fake_broker.bind(endpoints.backend)
    spawn("aggregator", "--shard", "0/1", "--backend", endpoints.backend, "--half-life", str(HALF_LIFE))
    aggregator, route, envelope, _ = recv(fake_broker, 15)
    assert route == b"" and protocol.parse_envelope(envelope) == (Command.HEARTBEAT, protocol.BROKER_KEY)
    for code, frames in [*malformed(seq=1), (ErrorCode.FRAMES, [b"PQ"])]:
        fake_broker.send_multipart([aggregator, b"worker-7", *frames])
        while True:
            reply = recv(fake_broker)
            if reply[1] != b"":  # skip heartbeats
                break
        assert reply[1] == b"worker-7"
        assert error_of(reply[2:]).code is code
    good = push(1, 1)
    fake_broker.send_multipart([aggregator, b"worker-7", *frames_of(good)])
    reply = recv(fake_broker)
    while reply[1] == b"":
        reply = recv(fake_broker)
    assert_history(history_reply(reply[2:]), local([good]))


def test_a_retried_update_is_applied_once(cluster, zsocket):
    c = cluster(1, "--half-life", str(HALF_LIFE))
    sock = zsocket(zmq.DEALER)
    sock.connect(c.endpoints.frontend)
    p = push(1, 1)
    for _ in range(3):
        sock.send_multipart(frames_of(p))
        assert_history(history_reply(recv(sock)), local([p]))
    assert shard_report(c.endpoints.frontend)["duplicates"] == 2


def test_sigterm_writes_the_snapshot(cluster, zsocket, tmp_path):
    path = tmp_path / "shard0.snap"
    c = cluster(1, "--half-life", str(HALF_LIFE), "--snapshot", str(path), "--snapshot-interval-s", "3600")
    pushes = [push(i, i) for i in range(1, 4)]
    send_each(zsocket, c.endpoints.frontend, pushes)
    code, took_s = c.aggregators[0].terminate()
    assert code == 0 and took_s < 5
    store = snapshot.load(path, 0, 1, HALF_LIFE)
    want = local(pushes).moments
    np.testing.assert_allclose(store.jobs["job"].mean[: LAYOUT.total], want.mean, rtol=1e-12)
    _, dy, dy_xhat = local_gradients(pushes)
    np.testing.assert_allclose(store.jobs["job"].grad_dy[: LAYOUT.total], dy, rtol=1e-10)
    np.testing.assert_allclose(store.jobs["job"].grad_dy_xhat[: LAYOUT.total], dy_xhat, rtol=1e-10)
    assert store.applied[("job", "raw", 11)] == 3


def test_a_killed_aggregator_resumes_from_its_snapshot(cluster, spawn, zsocket, tmp_path):
    path = tmp_path / "shard0.snap"
    args = ("--half-life", str(HALF_LIFE), "--snapshot", str(path), "--snapshot-interval-s", "0.2")
    c = cluster(1, *args)
    pushes = [push(i, i) for i in range(1, 6)]
    sock = send_each(zsocket, c.endpoints.frontend, pushes)
    wait_until(
        lambda: path.exists() and snapshot.load(path, 0, 1, HALF_LIFE).applied.get(("job", "raw", 11)) == 5,
        what="a snapshot with all five updates",
    )
    c.aggregators[0].kill(signal.SIGKILL)
    restarted = spawn("aggregator", "--shard", "0/1", "--backend", c.endpoints.backend, *args)
    wait_for_owner(c.endpoints.frontend, 0, restarted)
    report = shard_report(c.endpoints.frontend)
    assert [layer[2] for layer in report["jobs"]["job"]] == [5, 5]  # [name, count, version, gradient count]
    sock.send_multipart(frames_of(pushes[-1]))  # a retry of the last update: still applied once
    assert_history(history_reply(recv(sock)), local(pushes))
    sixth = push(6, 6)
    sock.send_multipart(frames_of(sixth, with_layout=False))  # the layout survived in the snapshot
    assert_history(history_reply(recv(sock)), local([*pushes, sixth]))


def test_a_corrupt_snapshot_is_refused_and_kept(spawn, endpoints, tmp_path):
    path = tmp_path / "shard0.snap"
    path.write_bytes(b"PSQSNAP\x01" + b"\0" * 40)
    proc = spawn("aggregator", "--shard", "0/1", "--backend", endpoints.backend, "--snapshot", str(path))
    assert proc.wait(timeout_s=20) == 1
    assert f"cannot resume from snapshot {path}: its checksum does not match" in proc.output()
    assert path.read_bytes() == b"PSQSNAP\x01" + b"\0" * 40


def test_sync_mode_answers_every_worker_with_the_pooled_step(cluster):
    c = cluster(1, "--mode", "sync", "--sync-workers", "2", "--half-life", str(HALF_LIFE))
    rng = np.random.default_rng(5)
    batches = [
        {"bn1": Moments(8.0, rng.normal(size=3), rng.random(3))},
        {"bn1": Moments(3.0, rng.normal(size=3), rng.random(3))},
    ]

    async def worker(i: int):
        async with StatsClient(c.endpoints.frontend, job="job", worker=f"w{i}", timeout_s=5) as client:
            return await client.push(0, batches[i])

    results = asyncio.run(_gather(worker(0), worker(1)))
    want = merge(batches[0]["bn1"], batches[1]["bn1"])
    for r in results:
        assert r.complete and r["bn1"].count == 11.0
        np.testing.assert_allclose(r["bn1"].mean, want.mean, rtol=1e-12)
        np.testing.assert_allclose(r["bn1"].var, want.var, rtol=1e-12)


def test_sync_mode_answers_an_incomplete_step_after_its_timeout(cluster):
    c = cluster(1, "--mode", "sync", "--sync-workers", "2", "--sync-timeout-s", "0.3")
    alone = {"bn1": Moments(4.0, np.arange(3.0), np.ones(3))}

    async def lone_worker():
        async with StatsClient(c.endpoints.frontend, job="job", worker="w0", timeout_s=5) as client:
            return await client.push(0, alone)

    result = asyncio.run(lone_worker())
    assert not result.complete
    assert np.array_equal(result["bn1"].mean, alone["bn1"].mean)
    assert "timed out with 1 of 2 workers" in c.aggregators[0].output()


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--mode", "sync"], "--mode sync needs --sync-workers N"),
        (["--shard", "2/2"], "expected a shard as i/n"),
        (["--half-life", "0"], "expected a positive number"),
    ],
)
def test_bad_aggregator_settings_are_refused(spawn, args, text):
    proc = spawn("aggregator", *args)
    assert proc.wait(timeout_s=20) == 2
    assert text in proc.output()


async def _gather(*coroutines):
    return await asyncio.gather(*coroutines)
