"""Socket options every psq socket gets: the edges' shared configuration."""

from __future__ import annotations

import zmq


def tune(sock: zmq.Socket, hwm: int, max_message_bytes: int) -> zmq.Socket:
    """Bounded queues, no lingering on close, and a hard cap on any frame's size.

    The codec refuses a message over ``max_message_bytes`` with a readable error.  Far beyond
    that (twice the limit, in one frame) libzmq drops the sender's connection before buffering
    the frame, so no peer can make a process hold unbounded memory.
    """
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
    return sock


def drain(sock: zmq.Socket, limit: int) -> list[list[zmq.Frame]]:
    """Up to ``limit`` messages that are ready now, without blocking."""
    out = []
    for _ in range(limit):
        try:
            out.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.Again:
            break
    return out
