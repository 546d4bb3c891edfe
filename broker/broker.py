"""The broker: routes statistics between workers and the aggregators that own their shards.

Frontend ROUTER (workers, DEALER) and backend ROUTER (aggregators, DEALER).  It reads only the
small envelope frame of each message and forwards the rest untouched, as the very frames it
received (libzmq shares their buffers; nothing is copied or decoded).  It holds no statistics:
restarted, it learns the shard table again from the aggregators' next heartbeats.

Wire, as the sockets see it::

    worker  -> frontend:  [worker_id, envelope, header, arrays...]
    backend -> shard i:   [aggregator_id, worker_id, envelope, header, arrays...]
    shard   -> backend:   [aggregator_id, worker_id, envelope, ...]   (a reply, forwarded)
                          [aggregator_id, b"", envelope, header]       (to the broker: HEARTBEAT)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from broker.shards import Refused, ShardTable
from psq import protocol
from psq.config import BrokerSettings
from psq.counters import Counters, Histogram
from psq.logs import Throttled
from psq.protocol import BROKER_KEY, Command, ErrorCode, ProtocolError
from psq.security import AGGREGATORS_DOMAIN, HANDSHAKE_EVENTS, WORKERS_DOMAIN, BrokerAuth, check_bind, handshake_failure
from psq.sockets import drain, tune

log = logging.getLogger("psq.broker")

TICK_S = 0.1  # clock resolution for liveness; also bounds how long a stop request waits
DRAIN_LIMIT = 256  # messages taken from one socket before looking at the other
WORKER_SEEN_S = 60.0  # a worker counts as "seen recently" this long after its last message
MAX_TRACKED_WORKERS = 100_000
_ROUTED = (Command.PUSH, Command.STATUS)
RTT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # what a worker may send to a shard


@dataclass
class _Worker:
    """A worker the broker has seen: its job and name (from its HELLO), and when it last spoke."""

    job: str
    name: str
    last_seen: float


class Broker:
    """Construct, then :meth:`run` (sockets are created inside ``run``, on its thread)."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.table = ShardTable(settings.heartbeat_s, settings.liveness)
        self.counters = Counters()
        self._workers: dict[bytes, _Worker] = {}  # by socket identity
        self._envelopes: dict[bytes, tuple[Command, int]] = {}  # a job uses a handful of them
        self._started = time.monotonic()
        self._frontend: zmq.Socket | None = None
        self._backend: zmq.Socket | None = None
        self._monitors: dict[zmq.Socket, str] = {}  # handshake monitors -> the side they watch
        self._refusals = Throttled(log)
        self.round_trips = Histogram(RTT_BUCKETS_S)
        self._forwarded: dict[bytes, float] = {}  # worker identity + shard -> when its request left

    def run(self, should_stop: Callable[[], bool], ready: Callable[[], None] | None = None) -> None:
        """Serve until ``should_stop()`` turns true (checked at least every tick).

        Raises :class:`~psq.config.SettingsError` for a non-loopback bind without keys.
        """
        s = self.settings
        auth = BrokerAuth(s.secret_key, s.worker_keys, s.aggregator_keys, self._refusals) if s.secret_key else None
        for address in (s.frontend, s.backend):
            check_bind(address, auth is not None, s.insecure)
        ctx = zmq.Context()
        try:
            if auth is not None:
                auth.start(ctx)
            self._frontend = self._bind(ctx, s.frontend, auth, WORKERS_DOMAIN)
            self._backend = self._bind(ctx, s.backend, auth, AGGREGATORS_DOMAIN)
            log.info(
                "broker: workers on %s, aggregators on %s, %s",
                s.frontend,
                s.backend,
                "CurveZMQ with allow-lists" if auth else "no encryption (loopback or --insecure)",
            )
            if ready:
                ready()
            self._serve(should_stop)
        finally:
            for sock in (*self._monitors, self._frontend, self._backend):
                if sock is not None:
                    sock.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.term()
            log.info("broker: stopped")

    def _bind(self, ctx: zmq.Context, address: str, auth: BrokerAuth | None, side: str) -> zmq.Socket:
        sock = tune(ctx.socket(zmq.ROUTER), self.settings.hwm, self.settings.max_message_bytes)
        if auth is not None:
            auth.serve(sock, side)
        self._monitors[sock.get_monitor_socket(HANDSHAKE_EVENTS)] = side
        sock.bind(address)
        return sock

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            self.counters.errors["handshake"] += 1
            side, why = self._monitors[monitor], handshake_failure(event)
            self._refusals.warning(
                ("handshake", side, why),
                "broker: refused a connection on the %s side (%s): %s",
                side,
                event["endpoint"].decode(errors="replace"),
                why,
            )

    def _serve(self, should_stop: Callable[[], bool]) -> None:
        assert self._frontend is not None and self._backend is not None
        poller = zmq.Poller()
        poller.register(self._frontend, zmq.POLLIN)
        poller.register(self._backend, zmq.POLLIN)
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        next_tick = time.monotonic()
        while not should_stop():
            ready = dict(poller.poll(TICK_S * 1000))
            now = time.monotonic()
            if self._backend in ready:
                for frames in drain(self._backend, DRAIN_LIMIT):
                    self._on_backend(frames, now)
            if self._frontend in ready:
                for frames in drain(self._frontend, DRAIN_LIMIT):
                    self._on_frontend(frames, now)
            for monitor in self._monitors:
                if monitor in ready:
                    self._on_monitor(monitor)
            if now >= next_tick:
                self._tick(now)
                next_tick = now + TICK_S

    # -- workers -----------------------------------------------------------------------------

    def _on_frontend(self, frames: list[zmq.Frame], now: float) -> None:
        identity = frames[0].bytes
        seen = self._workers.get(identity)  # workers are listed from their HELLO on
        if seen is not None:
            seen.last_seen = now
        try:
            command, key = self._check(frames)
        except ProtocolError as exc:
            self._reply_error(identity, exc.code, exc.message, BROKER_KEY)
            return
        self.counters.messages[command.name] += 1
        if key == BROKER_KEY:
            self._answer(identity, command, frames, now)
            return
        if command not in _ROUTED:
            self._reply_error(identity, ErrorCode.COMMAND, f"{command.name} cannot be sent to a shard", key)
            return
        owner = self.table.route(key, now)
        if owner is None:
            self._reply_error(identity, ErrorCode.NO_SHARD, f"no live aggregator owns shard {key}", key)
            return
        self._backend.send_multipart([owner, frames[0], *frames[1:]], copy=False)
        if len(self._forwarded) < MAX_TRACKED_WORKERS:
            self._forwarded[identity + protocol.key_bytes(frames[1].bytes)] = now

    def _check(self, frames: list[zmq.Frame]) -> tuple[Command, int]:
        """The command and shard of a worker's message (its identity frame first), by the
        protocol's frame rules and envelope alone."""
        size = protocol.check_frames(frames[1:], self.settings.max_message_bytes) + len(frames[0])
        raw = frames[1].bytes
        parsed = self._envelopes.get(raw)
        if parsed is None:
            parsed = protocol.parse_envelope(raw)  # raises for a bad one, which is not cached
            if len(self._envelopes) < 4 * protocol.MAX_SHARDS:
                self._envelopes[raw] = parsed
        self.counters.bytes[parsed[0].name] += size
        return parsed

    def _answer(self, identity: bytes, command: Command, frames: list[zmq.Frame], now: float) -> None:
        """A request addressed to the broker itself (HELLO, STATUS)."""
        try:
            msg = protocol.decode(frames[1:], self.settings.max_message_bytes)
            if command is Command.HELLO:
                job, worker = protocol.parse_hello(msg)
                if len(self._workers) < MAX_TRACKED_WORKERS:
                    self._workers[identity] = _Worker(job, worker, now)
                shards = self.table.shard_count(now)
                if shards is None:
                    raise ProtocolError(ErrorCode.NO_SHARD, "no aggregator is registered yet")
                self._frontend.send_multipart([identity, *protocol.encode_welcome(shards)])
            elif command is Command.STATUS:
                protocol.parse_status(msg)
                self._frontend.send_multipart([identity, *protocol.encode_report(self.report(now))])
            else:
                raise ProtocolError(ErrorCode.COMMAND, f"the broker answers HELLO and STATUS, not {command.name}")
        except ProtocolError as exc:
            self._reply_error(identity, exc.code, exc.message, BROKER_KEY)

    def _reply_error(self, identity: bytes, code: ErrorCode, message: str, key: int) -> None:
        self.counters.errors[code.value] += 1
        log.debug("broker: error %s to worker %s: %s", code.value, identity.hex(), message)
        self._frontend.send_multipart([identity, *protocol.encode_error(code, message, key)])

    # -- aggregators ------------------------------------------------------------------------

    def _on_backend(self, frames: list[zmq.Frame], now: float) -> None:
        aggregator = frames[0].bytes
        if len(frames) < 3:
            self.counters.errors[ErrorCode.FRAMES.value] += 1
            return
        if len(frames[1]) == 0:
            self._on_control(aggregator, frames[2:], now)
        elif self.table.is_aggregator(aggregator):
            self.counters.messages["REPLY"] += 1
            self._frontend.send_multipart(frames[1:], copy=False)
            self._time_reply(frames, now)
        else:
            # Replies only come from aggregators that announced themselves.
            self.counters.errors["unannounced"] += 1

    def _time_reply(self, frames: list[zmq.Frame], now: float) -> None:
        """The round trip through the aggregator: from forwarding the request to its reply.  The
        reply's envelope names the shard (bytes 4-5) without decoding anything else."""
        envelope = frames[2].bytes if len(frames) > 2 else b""
        sent = self._forwarded.pop(frames[1].bytes + protocol.key_bytes(envelope), None)
        if sent is not None:
            self.round_trips.observe(now - sent)

    def workers_seen(self) -> int:
        return len(self._workers)

    def _on_control(self, aggregator: bytes, frames: list[zmq.Frame], now: float) -> None:
        try:
            msg = protocol.decode(frames, self.settings.max_message_bytes)
            if msg.command is Command.ERROR:
                err = protocol.parse_error(msg)
                self._refusals.warning(
                    ("reported", aggregator, err.code), "broker: aggregator reports %s: %s", err.code.value, err.message
                )
                return
            beat = protocol.parse_heartbeat(msg)
        except ProtocolError as exc:
            self.counters.errors[exc.code.value] += 1
            self._backend.send_multipart([aggregator, b"", *protocol.encode_error(exc.code, exc.message, BROKER_KEY)])
            return
        self.counters.messages[Command.HEARTBEAT.name] += 1
        try:
            new = self.table.heartbeat(aggregator, beat.shard, beat.shards, beat.name, now)
        except Refused as exc:
            self.counters.errors[ErrorCode.SHARD_TAKEN.value] += 1
            self._refusals.warning(("refused", aggregator), "broker: refused aggregator %r: %s", beat.name, exc)
            self._backend.send_multipart(
                [aggregator, b"", *protocol.encode_error(ErrorCode.SHARD_TAKEN, str(exc), BROKER_KEY)]
            )
            return
        if new:
            log.info("broker: aggregator %r owns shard %d/%d", beat.name, beat.shard, beat.shards)
            self._backend.send_multipart([aggregator, b"", *protocol.encode_welcome(beat.shards)])

    # -- clock and status -------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        self.counters.sample(now)
        self._refusals.flush()
        for owner in self.table.expire(now, forget_after_s=10 * self.table.timeout_s):
            log.warning("broker: forgot aggregator %r, silent for %.0f s", owner.name, now - owner.last_seen)
        stale = [k for k, w in self._workers.items() if now - w.last_seen > WORKER_SEEN_S]
        for k in stale:
            del self._workers[k]
        lost = [k for k, t in self._forwarded.items() if now - t > WORKER_SEEN_S]  # never answered
        for k in lost:
            del self._forwarded[k]

    def report(self, now: float) -> dict[str, Any]:
        workers = [
            {"job": w.job, "worker": w.name, "last_seen_s": round(now - w.last_seen, 3)} for w in self._workers.values()
        ]
        return {
            "broker": {
                "frontend": self.settings.frontend,
                "backend": self.settings.backend,
                "uptime_s": round(now - self._started, 3),
                **self.counters.report(),
            },
            "shards": self.table.shard_count(now),
            "aggregators": self.table.report(now),
            "workers": workers,
        }
