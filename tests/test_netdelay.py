"""The userspace delay link between network namespaces (root only: skipped otherwise)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import pytest
from test_cli import run_psq

from psq.bench import netdelay

pytestmark = pytest.mark.skipif(netdelay.available() is not None, reason=f"the delay link {netdelay.available()}")

ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(30)
while True:
    data, peer = s.recvfrom(100)
    s.sendto(data, peer)
"""
PING = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for _ in range(25):
    t = time.perf_counter()
    s.sendto(b"x", (sys.argv[1], 9999))
    s.recvfrom(100)
    print((time.perf_counter() - t) * 1e3)
"""


def round_trips_ms(link: netdelay.Link, a: int, b: int) -> list[float]:
    echo = subprocess.Popen(link.command(b, [sys.executable, "-c", ECHO]))
    try:
        time.sleep(0.3)
        out = subprocess.run(
            link.command(a, [sys.executable, "-c", PING, link.address(b)]), capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return [float(x) for x in out.stdout.split()]
    finally:
        echo.kill()
        echo.wait()


def test_every_pair_of_namespaces_is_held_apart_by_the_delay():
    with netdelay.link(3, 2.0) as link:
        names = list(link.namespaces)
        for a, b in ((0, 1), (0, 2), (1, 2)):
            rtts = round_trips_ms(link, a, b)
            # a packet waits 2 ms each way: no round trip can be shorter than 4 ms
            assert min(rtts) >= 4.0, (a, b, rtts)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)  # the link removed what it made


def test_without_delay_the_link_still_carries_packets():
    with netdelay.link(2, 0.0) as link:
        rtts = round_trips_ms(link, 0, 1)
    assert len(rtts) == 25 and statistics.median(rtts) > 0


@pytest.mark.slow
def test_bench_step_runs_across_the_link():
    out = run_psq("bench", "step", "--delays-ms", "0", "--steps", "2", "--rounds", "1", "--json", timeout_s=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert [(r[0], r[1]) for r in rows] == [("0 ms", m) for m in ("plain", "syncbn", "psq")]
    assert all(r[2] > 0 for r in rows)
