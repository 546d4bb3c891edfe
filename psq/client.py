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

This module is the plan: layouts per shard, coalescing, results and what each refusal means.
The socket, the requests in flight and their retries are :class:`psq.transport.Transport`'s.
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

from psq import protocol
from psq.layout import Layout, LayoutError, shard_of
from psq.protocol import BROKER_KEY, Command, ErrorCode, HistoryReply, ProtocolError
from psq.security import ClientKeys
from psq.stats import (
    GradientMeans,
    LayerGradients,
    LayerMoments,
    Moments,
    Scratch,
    accumulate_into,
    accumulate_means_into,
)
from psq.transport import Request, Transport

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

    def to_push(self, job: str, worker: str, session: int, seq: int) -> protocol.Push:
        """The PUSH carrying this update, in its wire dtype."""
        m, g, dtype = self.stats, self.gradients, self.dtype
        grads = (
            None
            if g is None
            else LayerGradients(g.counts, g.dy.astype(dtype, copy=False), g.dy_xhat.astype(dtype, copy=False))
        )
        mean, var = m.mean.astype(dtype, copy=False), m.var.astype(dtype, copy=False)
        return protocol.Push(
            job, worker, session, seq, self.step, self.layout, m.counts, mean, var, self.images, dtype, grads
        )


def _gradients_f64(g: LayerGradients) -> LayerGradients:
    return LayerGradients(g.counts.copy(), g.dy.astype(np.float64), g.dy_xhat.astype(np.float64))


@dataclass(eq=False)
class _Channel:
    """One shard's updates waiting for its request in flight (the transport's) to be answered."""

    pending: OrderedDict[bytes, _Pending] = field(default_factory=OrderedDict)
    known_layouts: set[bytes] = field(default_factory=set)  # sent in full to this shard already

    def add(self, update: _Pending, waiter: asyncio.Future[Any], scratch: dict[bytes, Scratch]) -> bool:
        """Queue ``update``; True when it was merged into one already waiting with its layout."""
        layout = update.layout
        pending = self.pending.get(layout.id)
        if pending is None:
            self.pending[layout.id] = pending = update
        else:
            pending.merge(update, scratch.setdefault(layout.id, Scratch(layout.total)))
        pending.waiters.append(waiter)
        return pending is not update

    def take(self) -> tuple[_Pending, bool]:
        """The oldest update, to send now, and whether its layout must go in full."""
        _, pending = self.pending.popitem(last=False)
        in_full = pending.layout.id not in self.known_layouts
        self.known_layouts.add(pending.layout.id)
        return pending, in_full

    def close(self) -> None:
        for pending in self.pending.values():
            for waiter in pending.waiters:
                waiter.cancel()  # a push still waiting reports Unavailable("closed")


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
        max_message_bytes: int = protocol.DEFAULT_MAX_BYTES,
        keys: ClientKeys | None = None,
    ) -> None:
        self.frontend, self.job, self.worker = frontend, job, worker
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
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
        self._transport: Transport | None = None
        self._closed = False

    async def __aenter__(self) -> StatsClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = Transport(
            self.frontend,
            timeout_s=self.timeout_s,
            retries=self.retries,
            backoff_s=self.backoff_s,
            max_message_bytes=self.max_message_bytes,
            keys=self.keys,
            stats=self.stats,
            on_reply=self._on_reply,
            on_gave_up=self._on_gave_up,
        )

    async def close(self) -> None:
        self._closed = True
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        if self._transport is not None:
            self._transport.close()  # cancels what waits for a request in flight

    @property
    def connected(self) -> bool:
        """Whether the client holds a socket (between open and close)."""
        return self._transport is not None and self._transport.connected

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
            shard: self._enqueue(shard, _flatten(layout, step, stats, wire, images, gradients))
            for shard, layout in plan
        }
        self.stats["pushes"] += 1
        return await _collect(step, futures, self._give_up_s())

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

    def _enqueue(self, shard: int, update: _Pending) -> asyncio.Future[Any]:
        channel = self._channels.setdefault(shard, _Channel())
        future: asyncio.Future[Any] = self._running_loop().create_future()
        if channel.add(update, future, self._scratch):  # a request is in flight: merged exactly
            self.stats["coalesced"] += 1
        if self._wire().inflight(shard) is None:
            self._send_next(shard, channel)
        return future

    def _send_next(self, shard: int, channel: _Channel) -> None:
        if not channel.pending or self._wire().inflight(shard) is not None:
            return
        pending, in_full = channel.take()
        self._seq += 1
        push = pending.to_push(self.job, self.worker, self.session, self._seq)
        frames = protocol.encode_push(push, shard, in_full)
        self._wire().send(Request(shard, self._seq, frames, pending.waiters, context=push))

    def _give_up_s(self) -> float:
        """Longest a push can take: its own request and the one ahead of it, every retry."""
        return 2 * self._wire().request_budget_s() + 1.0

    async def _request_once(self, key: int, frames: list[Any]) -> Any:
        """A control request (HELLO) with the same retries as a push."""
        future = self._running_loop().create_future()
        asked = self._wire().inflight(key)
        if asked is not None:  # someone asked already: wait for the same answer
            asked.waiters.append(future)
        else:
            self._seq += 1
            self._wire().send(Request(key, self._seq, frames, [future]))
        done, _ = await asyncio.wait([future], timeout=self._give_up_s())
        if not done:
            future.cancel()
            raise Unavailable({"broker": "no answer in time"})
        if future.cancelled():  # close() ended the wait
            raise Unavailable({"broker": "the client was closed"})
        return future.result()

    # -- replies: what each means -------------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("StatsClient is not open: use 'async with StatsClient(...)' or await open()")
        return self._loop

    def _wire(self) -> Transport:
        self._running_loop()
        assert self._transport is not None
        return self._transport

    def _on_reply(self, request: Request, msg: protocol.Message) -> None:
        try:
            if msg.command is Command.ERROR:
                self._on_error(request, protocol.parse_error(msg))
            elif msg.command is Command.WELCOME and request.key == BROKER_KEY:
                self._settle(request, protocol.parse_welcome(msg))
            elif msg.command is Command.HISTORY and request.context is not None:
                layout = request.context.layout
                reply = protocol.parse_history(msg, layout)
                if reply.seq == request.seq:
                    self.stats["replies"] += 1
                    self._settle(request, (layout, reply))
        except ProtocolError as exc:
            self.stats["errors"] += 1
            log.warning("client: invalid reply from shard %s: %s", msg.key, exc)

    def _on_error(self, request: Request, err: protocol.Error) -> None:
        if err.seq is not None and err.seq != request.seq:
            return
        self.stats["errors"] += 1
        if err.code is ErrorCode.UNKNOWN_LAYOUT and request.context is not None:
            # The aggregator lost its layouts (restarted without a snapshot): send it in full.
            self._wire().resend(request, protocol.encode_push(request.context, request.key, with_layout=True))
        elif err.code in (ErrorCode.NO_SHARD, ErrorCode.WRONG_SHARD, ErrorCode.TIMEOUT):
            self._shards = None  # the shard table may have changed: ask again next time
            self._settle(request, Unavailable({request.key: f"{err.code.value}: {err.message}"}))
        else:
            self._settle(request, Rejected(err.code, err.message))

    def _on_gave_up(self, request: Request) -> None:
        self._shards = None
        who = request.key if request.key != BROKER_KEY else "broker"
        self._settle(request, Unavailable({who: f"no reply after {request.attempts} attempts"}))

    def _settle(self, request: Request, outcome: Any) -> None:
        self._wire().settle(request, outcome)
        channel = self._channels.get(request.key)
        if channel is not None:
            self._send_next(request.key, channel)


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


async def _collect(step: int, futures: Mapping[int, asyncio.Future[Any]], timeout_s: float) -> PushResult:
    """One push's result from its shards' futures: what answered, or why not."""
    await asyncio.wait(futures.values(), timeout=timeout_s)
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
