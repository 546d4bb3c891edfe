"""``StatsClient``: the asyncio client that pushes a step's statistics and gets history back.

::

    async with StatsClient("tcp://127.0.0.1:5555", job="resnet", worker="rank0") as client:
        history = await client.push(step, {"layer1.bn": Moments(count, mean, var), ...}, images={...})
        history["layer1.bn"].mean, history.versions["layer1.bn"]

``gradients={layer: GradientMeans(...)}`` sends the backward's statistics too; the reply then
carries the gradient history (``history.gradient("layer1.bn")``).

Each push becomes one message per shard, carrying all of that shard's layers.  At most one
request per shard is in flight; pushes made meanwhile are merged exactly (:func:`psq.stats.merge`)
into one pending update, so no sample is lost and memory stays bounded however fast the caller
pushes.  Every wait has a timeout.  A request without a reply is sent again, with the same
sequence number, over a fresh socket after a backoff (the Lazy Pirate pattern); the aggregator
applies a sequence number at most once.

Failures are reported, never waited out: :class:`Unavailable` when a shard (or the broker) cannot
be reached — ``partial`` holds what the other shards answered — and :class:`Rejected` when an
aggregator refused the statistics themselves.

The socket is a plain ZeroMQ DEALER watched with ``loop.add_reader`` and drained without
blocking: one reader for the socket, no pending ``recv`` to cancel, and none of
``zmq.asyncio``'s per-message overhead.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import zmq

from psq import protocol
from psq.layout import Layout, LayoutError, shard_of
from psq.protocol import BROKER_KEY, Command, ErrorCode, HistoryReply, ProtocolError
from psq.security import ClientKeys
from psq.sockets import tune
from psq.stats import (
    GradientMeans,
    LayerGradients,
    LayerMoments,
    Moments,
    Scratch,
    accumulate_into,
    accumulate_means_into,
)

log = logging.getLogger("psq.client")


class Unavailable(Exception):
    """Some shards, or the broker, could not be reached in time.

    ``reasons`` maps each failed shard (or ``"broker"``) to why; ``partial`` is the
    :class:`PushResult` of the shards that did answer (possibly empty).
    """

    def __init__(self, reasons: Mapping[Any, str], partial: PushResult | None = None) -> None:
        super().__init__(
            "; ".join(f"shard {k}: {v}" if isinstance(k, int) else f"{k}: {v}" for k, v in reasons.items())
        )
        self.reasons = dict(reasons)
        self.partial = partial


class Rejected(Exception):
    """An aggregator refused the statistics (``code`` says which rule they broke)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code


@dataclass(frozen=True)
class PushResult(Mapping[str, Moments]):
    """The history of the pushed layers, ``{layer: Moments}`` (biased variances), as views over
    the received frames.  ``versions[layer]`` counts the updates that layer's history has had."""

    step: int
    parts: tuple[tuple[Layout, HistoryReply], ...]

    @cached_property
    def _where(self) -> dict[str, tuple[int, int]]:
        return {name: (p, i) for p, (layout, _) in enumerate(self.parts) for i, name in enumerate(layout.names)}

    def __getitem__(self, name: str) -> Moments:
        p, i = self._where[name]
        layout, reply = self.parts[p]
        sl = layout.slice(name)
        return Moments(float(reply.counts[i]), reply.means[sl], reply.var[sl])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    @cached_property
    def versions(self) -> dict[str, int]:
        return {name: int(self.parts[p][1].versions[i]) for name, (p, i) in self._where.items()}

    def seen(self, name: str) -> float:
        """The images that ever arrived for a layer, from every worker: the job's clock."""
        p, i = self._where[name]
        return float(self.parts[p][1].seen[i])

    def gradient(self, name: str) -> GradientMeans | None:
        """The gradient history of a layer, when its push carried gradients (else None)."""
        p, i = self._where[name]
        layout, reply = self.parts[p]
        g = reply.gradients
        if g is None:
            return None
        sl = layout.slice(name)
        return GradientMeans(float(g.counts[i]), g.dy[sl], g.dy_xhat[sl])

    @property
    def complete(self) -> bool:
        """False in sync mode when a step timed out before every worker's statistics arrived."""
        return all(reply.complete for _, reply in self.parts)


@dataclass(eq=False)
class _Request:
    key: int  # shard, or BROKER_KEY for HELLO
    seq: int
    frames: list[Any]
    waiters: list[asyncio.Future[Any]]
    layout: Layout | None = None
    push: protocol.Push | None = None  # kept to re-encode with the layout in full if asked
    attempts: int = 0
    deadline: float | None = None  # None: waiting to be (re)sent
    sent_at: float = 0.0


@dataclass(eq=False)
class _Pending:
    """Updates for one shard and layout, merged while a request is in flight.

    Kept in the wire dtype as the caller gave them; turned into float64 only when a second
    update has to be merged in, so the common case costs one copy.
    """

    layout: Layout
    stats: LayerMoments
    images: np.ndarray
    gradients: LayerGradients | None
    step: int
    dtype: str
    waiters: list[asyncio.Future[Any]] = field(default_factory=list)
    merged: bool = False

    def merge(self, other: _Pending, scratch: Scratch) -> None:
        """Pool ``other`` into this update exactly: moments, images and gradient means."""
        if not self.merged:
            s, g = self.stats, self.gradients
            self.stats = LayerMoments(s.counts.copy(), s.mean.astype(np.float64), s.var.astype(np.float64))
            self.images = self.images.copy()
            self.gradients = None if g is None else _gradients_f64(g)
            self.merged = True
        widths = self.layout.widths
        accumulate_into(self.stats, other.stats, widths, scratch)
        self.images += other.images
        if other.gradients is not None:
            if self.gradients is None:
                self.gradients = _gradients_f64(other.gradients)
            else:
                accumulate_means_into(self.gradients, other.gradients, widths, scratch)
        self.step = max(self.step, other.step)


def _gradients_f64(g: LayerGradients) -> LayerGradients:
    return LayerGradients(g.counts.copy(), g.dy.astype(np.float64), g.dy_xhat.astype(np.float64))


@dataclass(eq=False)
class _Channel:
    inflight: _Request | None = None
    pending: OrderedDict[bytes, _Pending] = field(default_factory=OrderedDict)
    known_layouts: set[bytes] = field(default_factory=set)  # sent in full to this shard already
    last_sent: float = float("-inf")
    held: asyncio.TimerHandle | None = None  # a send waiting for min_interval_s to pass


class StatsClient:
    """Push statistics, get history.  Create sockets only inside a running loop (``open``)."""

    def __init__(
        self,
        frontend: str,
        *,
        job: str,
        worker: str,
        timeout_s: float = 1.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        min_interval_s: float = 0.0,
        max_message_bytes: int = protocol.DEFAULT_MAX_BYTES,
        keys: ClientKeys | None = None,
    ) -> None:
        self.frontend, self.job, self.worker = frontend, job, worker
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.min_interval_s = min_interval_s  # per shard, between sends: pushes meanwhile are merged
        self.max_message_bytes = max_message_bytes
        self.keys = keys  # CurveZMQ: this worker's key pair and the broker's public key
        self.session = int.from_bytes(os.urandom(8), "little")  # a restarted worker starts a new sequence
        self.stats = {"pushes": 0, "messages": 0, "replies": 0, "errors": 0, "retries": 0, "coalesced": 0}
        self._seq = 0
        self._shards: int | None = None
        self._channels: dict[int, _Channel] = {}
        self._plans: dict[tuple[Any, ...], list[tuple[int, Layout]]] = {}
        self._scratch: dict[bytes, Scratch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._last_reply_at = float("-inf")
        self._sock: zmq.Socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._resend: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> StatsClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._connect()

    async def close(self) -> None:
        self._closed = True
        for handle in (self._timer, self._resend):
            if handle is not None:
                handle.cancel()
        for channel in self._channels.values():
            if channel.held is not None:
                channel.held.cancel()
            for waiter in _waiters(channel):
                waiter.cancel()  # a push still waiting reports Unavailable("closed")
        self._channels.clear()
        self._disconnect()

    # -- public API -------------------------------------------------------------------------

    async def shard_count(self) -> int:
        """How many shards the broker's live aggregators split the statistics into."""
        if self._shards is None:
            self._shards = await self._request_once(BROKER_KEY, protocol.encode_hello(self.job, self.worker))
        return self._shards

    async def push(
        self,
        step: int,
        stats: Mapping[str, Moments],
        dtype: str | None = None,
        *,
        images: Mapping[str, float] | None = None,
        gradients: Mapping[str, GradientMeans] | None = None,
    ) -> PushResult:
        """Send one step's statistics ``{layer: Moments}`` and return the history of those layers.

        ``images`` (per layer) are the batch items behind each layer's count, the unit of the
        aggregator's half-life; a layer not named there counts each element as an image.
        ``gradients`` (per layer, any subset) are the backward's statistics; the history then
        carries the gradient history too.  ``dtype`` of the wire (``"<f4"`` or ``"<f8"``)
        defaults to float64 when the means are float64, else float32; the history comes back
        in the same dtype.  Raises :class:`Unavailable` or :class:`Rejected`; never waits longer
        than the retries allow.
        """
        if not stats:
            raise ValueError("push needs the statistics of at least one layer")
        if dtype not in (None, "<f4", "<f8"):
            raise ValueError(f"dtype must be '<f4' or '<f8', got {dtype!r}")
        if self._closed:
            raise RuntimeError("this StatsClient is closed")
        try:
            shards = await self.shard_count()
        except Unavailable as exc:
            raise Unavailable({"broker": str(exc)}, PushResult(step, ())) from None
        plan = self._plan(stats, shards)
        wire = dtype or ("<f8" if np.asarray(next(iter(stats.values())).mean).dtype == np.float64 else "<f4")
        futures = {
            shard: self._enqueue(shard, self._flatten(layout, step, stats, wire, images, gradients))
            for shard, layout in plan
        }
        self.stats["pushes"] += 1
        return await self._collect(step, futures)

    # -- planning and coalescing ------------------------------------------------------------

    def _plan(self, stats: Mapping[str, Moments], shards: int) -> list[tuple[int, Layout]]:
        """Which layers go to which shard, as one layout per shard (cached per model shape)."""
        # Keyed by names alone (cheap on every push); flatten checks the channel total.
        key = (shards, tuple(stats))
        plan = self._plans.get(key)
        if plan is None:
            layout = Layout.of(stats)
            by_shard: dict[int, list[str]] = {}
            for name in layout.names:
                by_shard.setdefault(shard_of(name, shards), []).append(name)
            plan = [(s, layout.subset(names)) for s, names in sorted(by_shard.items())]
            self._plans[key] = plan
        return plan

    @staticmethod
    def _flatten(
        layout: Layout,
        step: int,
        stats: Mapping[str, Moments],
        dtype: str,
        images: Mapping[str, float] | None,
        gradients: Mapping[str, GradientMeans] | None,
    ) -> _Pending:
        """One shard's part of a push, as flat arrays in the wire dtype."""
        kind = np.dtype(dtype).type
        try:
            flat = LayerMoments(*layout.flatten(stats, kind))
            grads = None if gradients is None else layout.flatten_gradients(gradients, kind)
        except LayoutError as exc:
            raise Rejected(ErrorCode.LAYOUT, str(exc)) from None
        return _Pending(layout, flat, layout.per_layer(images or {}, flat.counts), grads, step, dtype)

    def _enqueue(self, shard: int, update: _Pending) -> asyncio.Future[Any]:
        channel = self._channels.setdefault(shard, _Channel())
        future: asyncio.Future[Any] = self._running_loop().create_future()
        layout = update.layout
        pending = channel.pending.get(layout.id)
        if pending is None:
            update.waiters.append(future)
            channel.pending[layout.id] = update
        else:  # a request is in flight: merge exactly into what waits for it
            pending.merge(update, self._scratch.setdefault(layout.id, Scratch(layout.total)))
            pending.waiters.append(future)
            self.stats["coalesced"] += 1
        if channel.inflight is None:
            self._send_next(shard, channel)
        return future

    def _send_next(self, shard: int, channel: _Channel) -> None:
        if not channel.pending or channel.inflight is not None or channel.held is not None:
            return
        wait_s = channel.last_sent + self.min_interval_s - self._running_loop().time()
        if wait_s > 0:
            channel.held = self._running_loop().call_later(wait_s, self._release, shard, channel)
            return
        channel.last_sent = self._running_loop().time()
        _, pending = channel.pending.popitem(last=False)
        self._seq += 1
        layout, m, g, dtype = pending.layout, pending.stats, pending.gradients, pending.dtype
        push = protocol.Push(
            self.job,
            self.worker,
            self.session,
            self._seq,
            pending.step,
            layout,
            m.counts,
            m.mean.astype(dtype, copy=False),
            m.var.astype(dtype, copy=False),
            pending.images,
            dtype,
            None
            if g is None
            else LayerGradients(g.counts, g.dy.astype(dtype, copy=False), g.dy_xhat.astype(dtype, copy=False)),
        )
        with_layout = layout.id not in channel.known_layouts
        frames = protocol.encode_push(push, shard, with_layout)
        request = _Request(shard, self._seq, frames, pending.waiters, layout, push)
        channel.known_layouts.add(layout.id)
        channel.inflight = request
        self._transmit(request)

    def _release(self, shard: int, channel: _Channel) -> None:
        channel.held = None
        self._send_next(shard, channel)

    async def _collect(self, step: int, futures: Mapping[int, asyncio.Future[Any]]) -> PushResult:
        await asyncio.wait(futures.values(), timeout=self._give_up_s())
        parts, reasons, rejected = [], {}, None
        for shard, future in futures.items():
            if not future.done():
                future.cancel()
                reasons[shard] = "no answer in time"
            elif future.cancelled():
                reasons[shard] = "the client was closed"
            elif isinstance(future.exception(), Unavailable):
                reasons[shard] = str(future.exception())
            elif future.exception() is not None:
                rejected = future.exception()
            else:
                parts.append(future.result())
        result = PushResult(step, tuple(parts))
        if rejected is not None:
            raise rejected
        if reasons:
            raise Unavailable(reasons, result)
        return result

    def _give_up_s(self) -> float:
        """Longest a push can take: its own request and the one ahead of it, every retry."""
        per_request = (self.retries + 1) * self.timeout_s + sum(self._backoff(a) for a in range(1, self.retries + 1))
        per_request += self.min_interval_s
        return 2 * per_request + 1.0

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** (attempt - 1), 2.0)

    async def _request_once(self, key: int, frames: list[Any]) -> Any:
        """A control request (HELLO) on its own channel, with the same retries as a push."""
        channel = self._channels.setdefault(key, _Channel())
        if channel.inflight is not None:  # someone asked already: wait for the same answer
            future = self._running_loop().create_future()
            channel.inflight.waiters.append(future)
        else:
            future = self._running_loop().create_future()
            self._seq += 1
            channel.inflight = _Request(key, self._seq, frames, [future])
            self._transmit(channel.inflight)
        done, _ = await asyncio.wait([future], timeout=self._give_up_s())
        if not done:
            future.cancel()
            raise Unavailable({"broker": "no answer in time"})
        if future.cancelled():  # close() ended the wait
            raise Unavailable({"broker": "the client was closed"})
        return future.result()

    # -- the socket ---------------------------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("StatsClient is not open: use 'async with StatsClient(...)' or await open()")
        return self._loop

    def _connect(self) -> None:
        sock = tune(zmq.Context.instance().socket(zmq.DEALER), 100, self.max_message_bytes)
        if self.keys is not None:
            self.keys.apply(sock)
        sock.connect(self.frontend)
        self._sock = sock
        self._running_loop().add_reader(sock.getsockopt(zmq.FD), self._drain)

    def _disconnect(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
            self._sock.close(linger=0)
            self._sock = None

    def _transmit(self, request: _Request) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart(request.frames, zmq.NOBLOCK, copy=False)
            self.stats["messages"] += 1
        except zmq.Again:
            pass  # queue full or no peer yet: the deadline retries it
        request.sent_at = self._running_loop().time()
        request.deadline = request.sent_at + self.timeout_s
        self._arm()
        # ZMQ_FD is edge-triggered and a send may consume the edge of a waiting reply.
        self._running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        sock = self._sock
        while sock is not None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                self._on_reply(frames)
            # A defect in handling one reply must not strand the others behind it: the socket's
            # descriptor is edge-triggered, and unread messages would wait for the next event.
            except Exception:
                self.stats["errors"] += 1
                log.exception("client: could not handle a reply")
            sock = self._sock

    def _on_reply(self, frames: list[zmq.Frame]) -> None:
        self._last_reply_at = self._running_loop().time()
        try:
            msg = protocol.decode(frames, self.max_message_bytes)
        except ProtocolError as exc:
            self.stats["errors"] += 1
            log.warning("client: unreadable reply: %s", exc)
            return
        channel = self._channels.get(msg.key)
        request = channel.inflight if channel is not None else None
        if request is None:
            return  # a late answer to a request already settled
        try:
            if msg.command is Command.ERROR:
                self._on_error(request, protocol.parse_error(msg))
            elif msg.command is Command.WELCOME and request.key == BROKER_KEY:
                self._settle(request, protocol.parse_welcome(msg))
            elif msg.command is Command.HISTORY and request.layout is not None:
                reply = protocol.parse_history(msg, request.layout)
                if reply.seq == request.seq:
                    self.stats["replies"] += 1
                    self._settle(request, (request.layout, reply))
        except ProtocolError as exc:
            self.stats["errors"] += 1
            log.warning("client: invalid reply from shard %s: %s", msg.key, exc)

    def _on_error(self, request: _Request, err: protocol.Error) -> None:
        if err.seq is not None and err.seq != request.seq:
            return
        self.stats["errors"] += 1
        if err.code is ErrorCode.UNKNOWN_LAYOUT and request.push is not None:
            # The aggregator lost its layouts (restarted without a snapshot): send it in full.
            request.frames = protocol.encode_push(request.push, request.key, with_layout=True)
            self._transmit(request)
        elif err.code in (ErrorCode.NO_SHARD, ErrorCode.WRONG_SHARD, ErrorCode.TIMEOUT):
            self._shards = None  # the shard table may have changed: ask again next time
            self._settle(request, Unavailable({request.key: f"{err.code.value}: {err.message}"}))
        else:
            self._settle(request, Rejected(err.code, err.message))

    def _settle(self, request: _Request, outcome: Any) -> None:
        channel = self._channels[request.key]
        channel.inflight = None
        for waiter in request.waiters:
            if waiter.done():
                continue
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)
        self._send_next(request.key, channel)

    # -- timeouts: the Lazy Pirate ---------------------------------------------------------------

    def _inflight(self) -> list[_Request]:
        return [c.inflight for c in self._channels.values() if c.inflight is not None]

    def _arm(self) -> None:
        deadlines = [r.deadline for r in self._inflight() if r.deadline is not None]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadlines:
            self._timer = self._running_loop().call_at(min(deadlines), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._running_loop().time()
        expired = [r for r in self._inflight() if r.deadline is not None and r.deadline <= now]
        if not expired:
            self._arm()
            return
        # Lazy Pirate: when nothing at all came back since these requests left, the connection is
        # suspect: start over with a fresh socket, and resend everything that went out over the
        # old one.  When other answers did arrive, the socket is fine: resend only the late ones.
        sent_at = min(r.sent_at for r in expired)
        if self._last_reply_at < sent_at:
            self._disconnect()
            self._connect()
            resend = self._inflight()
        else:
            resend = expired
        for request in resend:
            request.deadline = None
        attempts = 0
        for request in expired:
            request.attempts += 1
            attempts = max(attempts, request.attempts)
            if request.attempts > self.retries:
                self._shards = None
                who = request.key if request.key != BROKER_KEY else "broker"
                self._settle(request, Unavailable({who: f"no reply after {request.attempts} attempts"}))
        self.stats["retries"] += len(expired)
        if self._resend is not None:
            self._resend.cancel()
        self._resend = self._running_loop().call_later(self._backoff(max(attempts, 1)), self._retransmit)

    def _retransmit(self) -> None:
        self._resend = None
        for request in self._inflight():
            if request.deadline is None:
                self._transmit(request)


def _waiters(channel: _Channel) -> Iterator[asyncio.Future[Any]]:
    if channel.inflight is not None:
        yield from channel.inflight.waiters
    for pending in channel.pending.values():
        yield from pending.waiters
