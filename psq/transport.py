"""``Transport``: requests to the broker over one DEALER socket, retried the Lazy Pirate way.

At most one request per key (a shard, or the broker's own) is in flight.  A request without a
reply within ``timeout_s`` is sent again, with the same frames (and so the same sequence number),
after a backoff; when nothing at all came back since it left, over a fresh socket.  After
``retries`` resends it is given up.  What a reply or a refusal means is not decided here: each
decoded reply goes to ``on_reply`` with the request it answers, each given-up request to
``on_gave_up``, and the owner settles them (:meth:`Transport.settle`).

The socket is watched with ``loop.add_reader`` and drained without blocking: one reader for the
socket, no pending ``recv`` to cancel, and none of ``zmq.asyncio``'s per-message overhead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from psq import protocol
from psq.protocol import Message, ProtocolError
from psq.security import ClientKeys
from psq.sockets import tune

log = logging.getLogger("psq.client")


@dataclass(eq=False)
class Request:
    """One request in flight: its frames, who waits for its outcome, and ``context``, what the
    owner needs to read its reply (a push's layout)."""

    key: int  # a shard, or BROKER_KEY
    seq: int
    frames: list[Any]
    waiters: list[asyncio.Future[Any]] = field(default_factory=list)
    context: Any = None
    attempts: int = 0
    deadline: float | None = None  # None: waiting to be (re)sent
    sent_at: float = 0.0


class Transport:
    """The socket, the requests in flight, their timers; create it inside a running loop."""

    def __init__(
        self,
        frontend: str,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        max_message_bytes: int,
        keys: ClientKeys | None,
        stats: dict[str, int],
        on_reply: Callable[[Request, Message], None],
        on_gave_up: Callable[[Request], None],
    ) -> None:
        self.frontend, self.timeout_s, self.retries, self.backoff_s = frontend, timeout_s, retries, backoff_s
        self.max_message_bytes, self.keys, self.stats = max_message_bytes, keys, stats
        self.on_reply, self.on_gave_up = on_reply, on_gave_up
        self.loop = asyncio.get_running_loop()
        self._inflight: dict[int, Request] = {}
        self._last_reply_at = float("-inf")
        self._sock: zmq.Socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._resend: asyncio.TimerHandle | None = None
        self._connect()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def inflight(self, key: int) -> Request | None:
        return self._inflight.get(key)

    def send(self, request: Request) -> None:
        """Send ``request``, the only one in flight for its key until it is settled."""
        assert request.key not in self._inflight, f"a request for {request.key} is already in flight"
        self._inflight[request.key] = request
        self._transmit(request)

    def resend(self, request: Request, frames: list[Any]) -> None:
        """Send an in-flight request again now, as ``frames`` (the same sequence number)."""
        request.frames = frames
        self._transmit(request)

    def settle(self, request: Request, outcome: Any) -> None:
        """End ``request``: its waiters get ``outcome`` (raised if an exception)."""
        if self._inflight.get(request.key) is request:
            del self._inflight[request.key]
        for waiter in request.waiters:
            if waiter.done():
                continue
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

    def request_budget_s(self) -> float:
        """The longest one request can take: every attempt and backoff."""
        return (self.retries + 1) * self.timeout_s + sum(self._backoff(a) for a in range(1, self.retries + 1))

    def waiters(self) -> Iterator[asyncio.Future[Any]]:
        for request in self._inflight.values():
            yield from request.waiters

    def close(self) -> None:
        for handle in (self._timer, self._resend):
            if handle is not None:
                handle.cancel()
        for waiter in list(self.waiters()):
            waiter.cancel()
        self._inflight.clear()
        self._disconnect()

    # -- the socket ---------------------------------------------------------------------------

    def _connect(self) -> None:
        sock = tune(zmq.Context.instance().socket(zmq.DEALER), 100, self.max_message_bytes)
        if self.keys is not None:
            self.keys.apply(sock)
        sock.connect(self.frontend)
        self._sock = sock
        self.loop.add_reader(sock.getsockopt(zmq.FD), self._drain)

    def _disconnect(self) -> None:
        if self._sock is not None:
            if not self.loop.is_closed():
                self.loop.remove_reader(self._sock.getsockopt(zmq.FD))
            self._sock.close(linger=0)
            self._sock = None

    def _transmit(self, request: Request) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart(request.frames, zmq.NOBLOCK, copy=False)
            self.stats["messages"] += 1
        except zmq.Again:
            pass  # queue full or no peer yet: the deadline retries it
        request.sent_at = self.loop.time()
        request.deadline = request.sent_at + self.timeout_s
        self._arm()
        # ZMQ_FD is edge-triggered and a send may consume the edge of a waiting reply.
        self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        sock = self._sock
        while sock is not None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                self._on_frames(frames)
            # A defect in handling one reply must not strand the others behind it: the socket's
            # descriptor is edge-triggered, and unread messages would wait for the next event.
            except Exception:
                self.stats["errors"] += 1
                log.exception("client: could not handle a reply")
            sock = self._sock

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        self._last_reply_at = self.loop.time()
        try:
            msg = protocol.decode(frames, self.max_message_bytes)
        except ProtocolError as exc:
            self.stats["errors"] += 1
            log.warning("client: unreadable reply: %s", exc)
            return
        request = self._inflight.get(msg.key)
        if request is not None:  # else a late answer to a request already settled
            self.on_reply(request, msg)

    # -- timeouts: the Lazy Pirate ---------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** (attempt - 1), 2.0)

    def _arm(self) -> None:
        deadlines = [r.deadline for r in self._inflight.values() if r.deadline is not None]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadlines:
            self._timer = self.loop.call_at(min(deadlines), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        expired = [r for r in self._inflight.values() if r.deadline is not None and r.deadline <= now]
        if not expired:
            self._arm()
            return
        # When nothing at all came back since these requests left, the connection is suspect:
        # start over with a fresh socket, and resend everything that went out over the old one.
        # When other answers did arrive, the socket is fine: resend only the late ones.
        if self._last_reply_at < min(r.sent_at for r in expired):
            self._disconnect()
            self._connect()
            resend = list(self._inflight.values())
        else:
            resend = expired
        for request in resend:
            request.deadline = None
        attempts = 0
        for request in expired:
            request.attempts += 1
            attempts = max(attempts, request.attempts)
            if request.attempts > self.retries:
                self.on_gave_up(request)
        self.stats["retries"] += len(expired)
        if self._resend is not None:
            self._resend.cancel()
        self._resend = self.loop.call_later(self._backoff(max(attempts, 1)), self._retransmit)

    def _retransmit(self) -> None:
        self._resend = None
        for request in list(self._inflight.values()):
            if request.deadline is None:
                self._transmit(request)
