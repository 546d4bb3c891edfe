"""The transport floor: raw frames through one C-level ``zmq.proxy`` hop.

Run as ``python -m psq.bench.floor proxy FRONT BACK``, ``... echo BACK`` (answers every message
with the same frames) or ``... sink BACK`` (drops them), each until SIGTERM.
"""

from __future__ import annotations

import signal
import sys

import zmq


def proxy(front: str, back: str) -> None:
    ctx = zmq.Context()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    frontend.bind(front)
    backend.bind(back)
    zmq.proxy(frontend, backend)


def echo(back: str, everything: bool) -> None:
    """Answer with the same frames: every message, or (a sink) only ``[b"mark"]`` markers."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(back)
    while True:
        frames = sock.recv_multipart(copy=False)
        if everything or (len(frames) == 2 and frames[1].bytes == b"mark"):
            sock.send_multipart(frames, copy=False)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    role, *addresses = sys.argv[1:]
    if role == "proxy":
        proxy(*addresses)
    else:
        echo(addresses[0], everything=role == "echo")
