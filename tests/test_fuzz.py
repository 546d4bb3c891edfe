"""A fuzzing campaign against a live broker and aggregator.

Random and mutated-valid multipart messages go to the broker's frontend (mutations that keep
a valid envelope are routed on and reach the aggregator's decoder) and to its backend, posing
as an aggregator, while valid pushes of another job are interleaved.  Afterwards both services
answer valid requests, and the valid job's history equals what its valid traffic alone gives.

CI runs a short campaign; a longer one: ``FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os

import numpy as np
import zmq
from conftest import recv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psq import protocol
from psq.layout import Layout
from psq.stats import History, Moments

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
LAYOUT = Layout(("a", "b"), (3, 2))
HALF_LIFE = 64.0
FUZZ_SEQ = 1 << 20  # fuzz pushes' sequence numbers start here, above any real one


def push_frames(job: str, seq: int, rng: np.random.Generator, with_layout: bool = True) -> list[bytes]:
    push = protocol.Push(
        job, "w", 1, seq, seq, LAYOUT, np.full(2, 4.0), rng.normal(size=5), rng.random(5), np.full(2, 4.0), "<f8"
    )
    return [bytes(memoryview(f)) for f in protocol.encode_push(push, 0, with_layout)]


def mutate(data: st.DataObject, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(1 if data.draw(st.booleans()) else 0, len(frames) - 1))
        frame = bytearray(frames[i])
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "drop", "duplicate"]))
        pos = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame[pos : pos + data.draw(st.integers(1, 16))]
        elif op == "insert":
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "drop" and len(frames) > 1:
            del frames[i]
            continue
        elif op == "duplicate":
            frames.insert(i, bytes(frame))
        frames[i] = bytes(frame)
    return frames


def drain(sock: zmq.Socket) -> int:
    n = 0
    while sock.poll(0):
        sock.recv_multipart()
        n += 1
    return n


def test_fuzzing_leaves_the_services_answering_and_the_history_intact(cluster, zsocket):
    c = cluster(1, "--half-life", str(HALF_LIFE))
    front, back = zsocket(zmq.DEALER), zsocket(zmq.DEALER)
    front.connect(c.endpoints.frontend)
    back.connect(c.endpoints.backend)
    rng = np.random.default_rng(0)
    valid: list[protocol.Push] = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def campaign(data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(["random", "mutated", "mutated", "backend", "valid"]))
        if kind == "random":
            front.send_multipart(data.draw(st.lists(st.binary(max_size=48), min_size=1, max_size=8)))
        elif kind == "backend":
            back.send_multipart(data.draw(st.lists(st.binary(max_size=48), min_size=1, max_size=6)))
        elif kind == "mutated":  # built from drawn values only, so hypothesis can replay it
            seed = data.draw(st.integers(0, 2**32 - 1))
            seq = data.draw(st.integers(FUZZ_SEQ, 2 * FUZZ_SEQ))
            frames = push_frames("fuzz", seq, np.random.default_rng(seed))
            front.send_multipart(mutate(data, frames))
        else:
            frames = push_frames("real", len(valid) + 1, rng)
            front.send_multipart(frames)
            valid.append(protocol.parse_push(protocol.decode(frames), {}))
            recv(front)  # the real job waits for each answer, so the order of updates is known
        drain(front)
        drain(back)

    campaign()
    assert valid, "the campaign sent no valid push"
    # both services still answer, and correctly
    front.send_multipart(protocol.encode_status())
    report = protocol.parse_report(_answer(front, protocol.Command.REPORT))
    assert [a["alive"] for a in report["aggregators"]] == [True]
    final = push_frames("real", len(valid) + 1, rng, with_layout=False)
    front.send_multipart(final)
    valid.append(protocol.parse_push(protocol.decode(final), {LAYOUT.id: LAYOUT}))
    reply = _history(front, len(valid))
    want = History(HALF_LIFE, channels=LAYOUT.total)
    for p in valid:
        want.update(Moments(LAYOUT.expand(p.counts), p.means, p.var))
    np.testing.assert_allclose(reply.means, want.moments.mean, rtol=1e-12)
    np.testing.assert_allclose(reply.var, want.moments.var, rtol=1e-12)
    assert list(reply.versions) == [len(valid)] * 2
    # the fuzzed job's own history is still valid statistics: its reply passes validation
    front.send_multipart(push_frames("fuzz", 3 * FUZZ_SEQ, rng))
    fuzzed = _history(front, 3 * FUZZ_SEQ)
    assert np.isfinite(fuzzed.means).all() and (fuzzed.var >= 0).all()
    assert c.broker.alive() and c.aggregators[0].alive()


def _answer(sock: zmq.Socket, command: protocol.Command) -> protocol.Message:
    """The next message of ``command``: late answers to earlier fuzz may come first."""
    while True:
        msg = protocol.decode(recv(sock))
        if msg.command is command:
            return msg


def _history(sock: zmq.Socket, seq: int) -> protocol.HistoryReply:
    """The answer to the real job's push ``seq`` (fuzz pushes use higher sequence numbers)."""
    while True:
        msg = _answer(sock, protocol.Command.HISTORY)
        if msg.header.get("seq") == seq:
            return protocol.parse_history(msg, LAYOUT)
