"""The broker process: routing by envelope, refusals, the shard table, liveness."""

from __future__ import annotations

import signal
import struct

import msgpack
import numpy as np
import pytest
import zmq
from conftest import live_shards, recv, wait_for_owner, wait_until

from psq import protocol
from psq.layout import Layout
from psq.protocol import BROKER_KEY, Command, ErrorCode
from psq.status import query


def error_of(frames: list[bytes]) -> protocol.Error:
    msg = protocol.decode(frames)
    assert msg.command is Command.ERROR, msg
    return protocol.parse_error(msg)


def valid_push(key: int = 0, seq: int = 1, with_layout: bool = True) -> list[bytes]:
    layout = Layout(("bn",), (4,))
    push = protocol.Push(
        "job", "raw", 5, seq, 0, layout, np.array([8.0]), np.zeros(4, "<f4"), np.ones(4, "<f4"), np.array([2.0]), "<f8"
    )
    return [bytes(memoryview(f)) for f in protocol.encode_push(push, key, with_layout)]


MALFORMED = [
    pytest.param([b"PQ\x01"], ErrorCode.FRAMES, id="one-short-frame"),
    pytest.param([b"HTTP/1", b"{}"], ErrorCode.VERSION, id="not-psq"),
    pytest.param(
        [struct.pack("<2sBBH", b"PQ", protocol.VERSION - 1, 1, 0), b"\x80"], ErrorCode.VERSION, id="older-version"
    ),
    pytest.param(
        [struct.pack("<2sBBH", b"PQ", protocol.VERSION + 1, 1, 0), b"\x80"], ErrorCode.VERSION, id="newer-version"
    ),
    pytest.param(
        [struct.pack("<2sBBH", b"PQ", protocol.VERSION, 99, 0), b"\x80"], ErrorCode.COMMAND, id="unknown-command"
    ),
    pytest.param([protocol.envelope(Command.HELLO, BROKER_KEY), b"\xc1"], ErrorCode.HEADER, id="hello-bad-msgpack"),
    pytest.param(
        [protocol.envelope(Command.HELLO, BROKER_KEY), msgpack.packb({"job": "j"})],
        ErrorCode.HEADER,
        id="hello-missing-key",
    ),
    pytest.param([protocol.envelope(Command.HISTORY, BROKER_KEY), b"\x80"], ErrorCode.COMMAND, id="history-to-broker"),
    pytest.param([protocol.envelope(Command.HEARTBEAT, 0), b"\x80"], ErrorCode.COMMAND, id="heartbeat-to-shard"),
    pytest.param([protocol.envelope(Command.PUSH, 0), b"\x80", b"x" * 3000], ErrorCode.OVERSIZED, id="oversized"),
]


@pytest.mark.parametrize(("frames", "code"), MALFORMED)
def test_malformed_frames_get_an_error_reply(spawn, endpoints, zsocket, frames, code):
    spawn("broker", "--frontend", endpoints.frontend, "--backend", endpoints.backend, "--max-message-bytes", "2048")
    sock = zsocket(zmq.DEALER)
    sock.connect(endpoints.frontend)
    sock.send_multipart(frames)
    err = error_of(recv(sock, 10))
    assert err.code is code and err.message


def test_a_frame_far_beyond_the_limit_drops_only_its_sender(spawn, endpoints, zsocket):
    spawn("broker", "--frontend", endpoints.frontend, "--backend", endpoints.backend, "--max-message-bytes", "2048")
    rogue = zsocket(zmq.DEALER)
    rogue.connect(endpoints.frontend)
    rogue.send_multipart([protocol.envelope(Command.PUSH, 0), b"\x80", b"x" * 100_000])
    assert not rogue.poll(1000, zmq.POLLIN)  # no answer: libzmq cut the connection
    sock = zsocket(zmq.DEALER)
    sock.connect(endpoints.frontend)
    sock.send_multipart(protocol.encode_status())
    assert protocol.decode(recv(sock)).command is Command.REPORT


def test_a_request_for_a_shard_without_owner_is_answered_at_once(spawn, endpoints, zsocket):
    spawn("broker", "--frontend", endpoints.frontend, "--backend", endpoints.backend)
    sock = zsocket(zmq.DEALER)
    sock.connect(endpoints.frontend)
    sock.send_multipart(valid_push(key=3))
    err = error_of(recv(sock, 10))
    assert err.code is ErrorCode.NO_SHARD and "shard 3" in err.message
    sock.send_multipart(protocol.encode_hello("job", "w"))
    assert error_of(recv(sock)).code is ErrorCode.NO_SHARD


def test_a_second_aggregator_claiming_a_live_shard_is_refused(cluster, spawn):
    c = cluster(1)
    second = spawn("aggregator", "--shard", "0/1", "--backend", c.endpoints.backend, "--heartbeat-s", "0.2")
    assert second.wait(timeout_s=20) == 1
    assert "stays owned by another aggregator" in second.output()
    assert "owned by live aggregator" in second.output()
    assert "refused aggregator" in c.broker.output()
    assert live_shards(c.endpoints.frontend) == {0}


def test_an_aggregator_with_another_shard_count_is_refused(cluster, spawn):
    c = cluster(2)
    wrong = spawn("aggregator", "--shard", "2/3", "--backend", c.endpoints.backend, "--heartbeat-s", "0.2")
    assert wrong.wait(timeout_s=20) == 1
    assert "split the statistics into 2 shards" in wrong.output()


def test_a_dead_aggregator_is_dropped_and_its_shard_answered_with_an_error(cluster, zsocket):
    c = cluster(1)
    c.aggregators[0].kill(signal.SIGKILL)
    wait_until(lambda: not live_shards(c.endpoints.frontend), what="the dead aggregator to be dropped")
    report = query(c.endpoints.frontend, timeout_s=2)
    assert [a["alive"] for a in report["aggregators"]] == [False]
    sock = zsocket(zmq.DEALER)
    sock.connect(c.endpoints.frontend)
    sock.send_multipart(valid_push())
    assert error_of(recv(sock)).code is ErrorCode.NO_SHARD


def test_a_restarted_aggregator_takes_over_a_shard_whose_owner_died(cluster, spawn):
    c = cluster(1)
    c.aggregators[0].kill(signal.SIGKILL)
    restarted = spawn("aggregator", "--shard", "0/1", "--backend", c.endpoints.backend)
    wait_for_owner(c.endpoints.frontend, 0, restarted)
    assert "owns shard 0/1" in restarted.output() or "routes shard 0/1 here" in restarted.output()


def test_pushes_are_routed_to_the_owner_and_answered(cluster, zsocket):
    c = cluster(1)
    sock = zsocket(zmq.DEALER)
    sock.connect(c.endpoints.frontend)
    sock.send_multipart(valid_push())
    reply = protocol.parse_history(protocol.decode(recv(sock)), Layout(("bn",), (4,)))
    assert reply.seq == 1 and reply.counts[0] == 8.0 and reply.versions[0] == 1


def test_unknown_environment_variables_are_refused(spawn, endpoints):
    proc = spawn("broker", env={"PSQ_FRONTED": endpoints.frontend})
    assert proc.wait(timeout_s=20) == 2
    assert "unknown environment variable(s) PSQ_FRONTED" in proc.output()


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--frontend", "http://x"], "expected a ZeroMQ endpoint"),
        (["--heartbeat-s", "-1"], "expected a positive number"),
        (["--liveness", "0"], "expected a positive integer"),
    ],
)
def test_bad_flags_are_refused_with_what_was_expected(spawn, args, text):
    proc = spawn("broker", *args)
    assert proc.wait(timeout_s=20) == 2
    assert text in proc.output()


def test_the_environment_configures_the_broker(spawn, endpoints):
    spawn("broker", env={"PSQ_FRONTEND": endpoints.frontend, "PSQ_BACKEND": endpoints.backend})
    report = wait_until(lambda: _status_or_none(endpoints.frontend), what="the broker to answer")
    assert report["broker"]["frontend"] == endpoints.frontend


def _status_or_none(frontend: str):
    from psq.status import StatusError

    try:
        return query(frontend, 0.3)
    except StatusError:
        return None
