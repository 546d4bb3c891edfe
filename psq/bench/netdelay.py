"""A userspace delay link between network namespaces, for the network-delay benchmark.

This kernel has no netem, so delay is added in userspace: each namespace gets a tun device
(``psq0``, address ``10.77.0.<i>/24``) and one forwarder process reads every IP packet from every
tun device, holds it for ``delay_ms`` and writes it into the tun device of the namespace that
owns the destination address.  Every pair of namespaces is thus ``delay_ms`` apart, one way.

Linux only, as root (``ip netns``, ``/dev/net/tun``, ``setns``).  Everything is created by
:func:`link` and removed when it exits.  The forwarder costs CPU itself: compare against the same
link at 0 ms.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
MTU = 65000  # large packets: few of them, so the forwarder's per-packet cost stays small
DEVICE = "psq0"
PREFIX = "10.77.0"


@dataclass(frozen=True)
class Link:
    namespaces: list[str]  # namespace i has address 10.77.0.<i + 1>
    delay_ms: float

    def address(self, i: int) -> str:
        return f"{PREFIX}.{i + 1}"

    def command(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``i``."""
        return ["ip", "netns", "exec", self.namespaces[i], *argv]


def available() -> str | None:
    """None when this machine can build the link, else why not."""
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (network namespaces and tun devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "needs iproute2's ip netns"
    return None


@contextlib.contextmanager
def link(hosts: int, delay_ms: float) -> Iterator[Link]:
    """``hosts`` namespaces joined by the delay forwarder; all removed on exit."""
    why = available()
    if why:
        raise RuntimeError(f"the delay link {why}")
    names = [f"psq{os.getpid()}h{i}" for i in range(hosts)]
    forwarder = None
    try:
        for name in names:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        forwarder = subprocess.Popen(
            [sys.executable, "-m", "psq.bench.netdelay", str(delay_ms), *names], stdout=subprocess.PIPE
        )
        if forwarder.stdout is None or forwarder.stdout.readline().strip() != b"ready":
            raise RuntimeError("the delay forwarder did not start")
        for i, name in enumerate(names):
            _ip("-n", name, "addr", "add", f"{PREFIX}.{i + 1}/24", "dev", DEVICE)
            _ip("-n", name, "link", "set", DEVICE, "mtu", str(MTU), "up")
        yield Link(names, delay_ms)
    finally:
        if forwarder is not None:
            forwarder.terminate()
            forwarder.wait(10)
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def _open_tun(namespace: str) -> int:
    """A tun device created inside ``namespace``; the descriptor works from anywhere."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
        return fd
    finally:
        libc.setns(home, CLONE_NEWNET)
        os.close(home)
        os.close(target)


def forward(delay_ms: float, namespaces: list[str]) -> None:
    """Move packets between the namespaces' tun devices, each held ``delay_ms``, until SIGTERM."""
    fds = [_open_tun(ns) for ns in namespaces]
    by_address = {bytes([10, 77, 0, i + 1]): fd for i, fd in enumerate(fds)}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print("ready", flush=True)
    held: list[tuple[float, int, int, bytes]] = []  # (due, order, destination fd, packet)
    order, delay_s = 0, delay_ms / 1000
    while not stop:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.5
        # select() waits to the microsecond; epoll rounds timeouts up to whole milliseconds
        for fd in select.select(fds, [], [], timeout)[0]:
            while True:
                try:
                    packet = os.read(fd, MTU + 100)
                except BlockingIOError:
                    break
                destination = by_address.get(packet[16:20]) if len(packet) >= 20 and packet[0] >> 4 == 4 else None
                if destination is not None:
                    heapq.heappush(held, (time.monotonic() + delay_s, order, destination, packet))
                    order += 1
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, destination, packet = heapq.heappop(held)
            with contextlib.suppress(BlockingIOError):
                os.write(destination, packet)


if __name__ == "__main__":
    forward(float(sys.argv[1]), sys.argv[2:])
