"""The aggregator service: owns one shard's statistics behind the broker.

A DEALER connected to the broker's backend.  It announces its shard with a heartbeat every
interval, applies each validated push to its :class:`~broker.store.Store` and answers with the
history of the pushed layers (async mode), or holds the answer until every worker's statistics
for the step arrived (sync mode).  It snapshots the store every few seconds and on stop, and
resumes from the snapshot on start.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from broker import snapshot
from broker.store import Store, cast_reply
from broker.sync import Finished, Step, StepKey, SyncSteps
from psq import protocol
from psq.config import AggregatorSettings
from psq.counters import Counters
from psq.logs import Throttled
from psq.protocol import Command, ErrorCode, HistoryReply, ProtocolError, Push
from psq.security import ClientKeys
from psq.sockets import drain, tune

log = logging.getLogger("psq.aggregator")

TICK_S = 0.05
DRAIN_LIMIT = 64
HWM = 100  # replies queued for the broker at most: 21 MB of ResNet-50-sized answers


class ShardTaken(Exception):
    """The broker keeps refusing this aggregator's claim: another one owns the shard."""


class Aggregator:
    """Construct, then :meth:`run` (the socket is created inside ``run``, on its thread)."""

    def __init__(self, settings: AggregatorSettings) -> None:
        self.settings = settings
        self.shard, self.shards = settings.shard
        self.name = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.counters = Counters()
        self._refusals = Throttled(log)
        self.store = Store(self.shard, self.shards, settings.half_life, settings.half_life_unit)
        self.sync = SyncSteps(settings.sync_workers or 1, settings.sync_timeout_s) if settings.mode == "sync" else None
        self.keys = ClientKeys.load(settings.secret_key, settings.server_key)
        self.registered = False
        self._refused_since: float | None = None
        self._sock: zmq.Socket | None = None
        self._last_snapshot = 0.0

    def run(self, should_stop: Callable[[], bool], ready: Callable[[], None] | None = None) -> None:
        """Serve until ``should_stop()``; a final snapshot is written on the way out."""
        self._resume()
        ctx = zmq.Context()
        self._sock = tune(ctx.socket(zmq.DEALER), HWM, self.settings.max_message_bytes)
        if self.keys is not None:
            self.keys.apply(self._sock)
        self._sock.connect(self.settings.backend)
        log.info(
            "aggregator %s: shard %d/%d, %s mode, broker at %s",
            self.name,
            self.shard,
            self.shards,
            self.settings.mode,
            self.settings.backend,
        )
        try:
            if ready:
                ready()
            self._serve(should_stop)
        finally:
            self._sock.close(linger=0)
            ctx.term()
            self._snapshot(final=True)
            log.info("aggregator %s: stopped", self.name)

    def _resume(self) -> None:
        path = self.settings.snapshot_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        store = snapshot.load(path, self.shard, self.shards, self.settings.half_life, self.settings.half_life_unit)
        if store is not None:
            self.store = store
            log.info(
                "aggregator: resumed from %s (%d jobs, %d updates remembered)",
                path,
                len(store.jobs),
                len(store.applied),
            )

    def _serve(self, should_stop: Callable[[], bool]) -> None:
        assert self._sock is not None
        next_beat = 0.0
        while not should_stop():
            if self._sock.poll(TICK_S * 1000, zmq.POLLIN):
                for frames in drain(self._sock, DRAIN_LIMIT):
                    self._on_message(frames, time.monotonic())
            now = time.monotonic()
            if now >= next_beat:
                self._send(b"", protocol.encode_heartbeat(protocol.Heartbeat(self.shard, self.shards, self.name)))
                next_beat = now + self.settings.heartbeat_s
                self.counters.sample(now)
                self._refusals.flush()
            self._expire_sync_steps(now)
            if now - self._last_snapshot >= self.settings.snapshot_interval_s:
                self._snapshot()

    # -- messages ---------------------------------------------------------------------------

    def _on_message(self, frames: list[zmq.Frame], now: float) -> None:
        route = frames[0]
        if len(route) == 0:
            self._on_broker(frames[1:], now)
            return
        try:
            msg = protocol.decode(frames[1:], self.settings.max_message_bytes)
            self.counters.messages[msg.command.name] += 1
            self.counters.bytes[msg.command.name] += sum(len(f) for f in frames)
            if msg.command is Command.STATUS:
                protocol.parse_status(msg)
                self._send(route, protocol.encode_report(self.report(), self.shard))
                return
            push = protocol.parse_push(msg, self.store.layouts)
            if self.sync is None:
                self._send(route, protocol.encode_history(self.store.apply(push), self.shard))
            else:
                self._on_sync_push(route, push, now)
        except ProtocolError as exc:
            self._refuse(route, exc, frames)

    def _refuse(self, route: Any, exc: ProtocolError, frames: list[zmq.Frame]) -> None:
        self.counters.errors[exc.code.value] += 1
        log.debug("aggregator: refused a message: %s", exc)
        seq = _seq_of(frames)
        self._send(route, protocol.encode_error(exc.code, exc.message, self.shard, seq))

    def _send(self, route: Any, frames: list[Any]) -> None:
        """Send without ever blocking: with no broker connected (or a refused handshake) a DEALER
        would wait forever.  What cannot leave now is dropped; the peers retry."""
        assert self._sock is not None
        try:
            self._sock.send_multipart([route, *frames], zmq.NOBLOCK)
        except zmq.Again:
            self.counters.errors["send_dropped"] += 1

    def _on_broker(self, frames: list[zmq.Frame], now: float) -> None:
        try:
            msg = protocol.decode(frames, self.settings.max_message_bytes)
            if msg.command is Command.WELCOME:
                protocol.parse_welcome(msg)
                self.registered, self._refused_since = True, None
                log.info("aggregator %s: the broker routes shard %d/%d here", self.name, self.shard, self.shards)
            elif msg.command is Command.ERROR:
                self._on_refusal(protocol.parse_error(msg), now)
        except ProtocolError as exc:
            self._refusals.warning(("unreadable", exc.code), "aggregator: unreadable message from the broker: %s", exc)

    def _on_refusal(self, err: protocol.Error, now: float) -> None:
        self._refusals.error(
            ("refused", err.code), "aggregator %s: the broker refused: %s: %s", self.name, err.code.value, err.message
        )
        if err.code is not ErrorCode.SHARD_TAKEN:
            return
        self.registered = False
        if self._refused_since is None:
            self._refused_since = now
        # A restarted aggregator may be refused until the broker notices its predecessor died
        # (a few heartbeats); past that, another live aggregator really owns the shard.
        grace_s = self.settings.heartbeat_s * 4 + 1.0
        if now - self._refused_since > grace_s:
            raise ShardTaken(f"shard {self.shard}/{self.shards} stays owned by another aggregator: {err.message}")

    # -- sync mode --------------------------------------------------------------------------

    def _on_sync_push(self, route: Any, push: Push, now: float) -> None:
        assert self.sync is not None
        placement = self.store.admit(push)
        done = self.sync.answered(push)
        if done is not None:  # a retry of a step that already finished: answer it again
            self._send_finished(route, push, done)
            return
        if self.store.is_duplicate(push) and not self.sync.waiting(push):
            self._send(
                route,
                protocol.encode_history(
                    self.store.reply(push.job, placement, push.seq, push.step, push.reply_dtype, complete=False),
                    self.shard,
                ),
            )
            return
        key, step = self.sync.add(push, route, now)
        if step is not None:
            self._finish_step(key, step, complete=True)

    def _expire_sync_steps(self, now: float) -> None:
        if self.sync is None:
            return
        for key, step in self.sync.expired(now):
            log.warning(
                "aggregator: step %d of job %r timed out with %d of %d workers",
                key[2],
                key[0],
                len(step.arrivals),
                self.sync.workers,
            )
            self._finish_step(key, step, complete=False)

    def _finish_step(self, key: StepKey, step: Step, complete: bool) -> None:
        assert self.sync is not None
        job, _, _ = key
        pushes = [p for _, p in step.arrivals.values()]
        placement = self.store.admit(pushes[0])
        pooled, images = step.pooled()
        self.store.update(job, placement, pooled, images)
        for push in pushes:
            self.store.remember(push)
        versions, seen = self.store.clocks(job, placement)
        done = Finished(pooled.counts, pooled.mean, pooled.var, versions, seen, complete)
        self.sync.finish(key, done)
        for route, push in step.arrivals.values():
            self._send_finished(route, push, done)

    def _send_finished(self, route: Any, push: Push, done: Finished) -> None:
        placement = self.store.admit(push)
        means, var = cast_reply(placement, push.reply_dtype, "pooled", done.means, done.var)
        reply = HistoryReply(
            push.seq, push.step, push.layout.id, done.counts, means, var, done.versions, done.seen, done.complete
        )
        self._send(route, protocol.encode_history(reply, self.shard))

    # -- snapshots and status -----------------------------------------------------------------

    def _snapshot(self, final: bool = False) -> None:
        self._last_snapshot = time.monotonic()
        path = self.settings.snapshot_path
        if path is None or not (self.store.dirty or (final and not path.exists())):
            return
        try:
            size = snapshot.save(self.store, path)
        except OSError as exc:  # a full disk must not stop the statistics; say so and go on
            log.error("aggregator: could not write snapshot %s: %s", path, exc)
            return
        log.log(logging.INFO if final else logging.DEBUG, "aggregator: snapshot %s (%d bytes)", path, size)

    def report(self) -> dict[str, Any]:
        return {
            **self.store.report(),
            "name": self.name,
            "mode": self.settings.mode,
            "registered": self.registered,
            "snapshot": str(self.settings.snapshot_path) if self.settings.snapshot_path else None,
            **self.counters.report(),
        }


def _seq_of(frames: list[zmq.Frame]) -> int | None:
    """The sequence number of a refused request, when its header is readable, so the client
    can match the error to its request."""
    try:
        header = protocol.read_header(frames[2]) if len(frames) > 2 else {}
    except ProtocolError:
        return None
    seq = header.get("seq")
    return seq if type(seq) is int and 0 <= seq < 1 << 64 else None
