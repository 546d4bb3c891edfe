"""Broker and aggregators as processes, for the benchmarks (on fresh loopback ports)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from psq.status import StatusError, query


@dataclass(frozen=True)
class Services:
    frontend: str
    backend: str
    processes: list[subprocess.Popen[bytes]]  # the broker first, then the aggregators

    def rss_mib(self) -> list[float]:
        """Resident memory of each process, in MiB."""
        out = []
        for p in self.processes:
            status = Path(f"/proc/{p.pid}/status").read_text()
            out.append(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024)
        return out


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def processes(*commands: list[str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``python -m`` each command; SIGTERM (then SIGKILL) them all on the way out."""
    procs = [
        subprocess.Popen([sys.executable, "-m", *c], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for c in commands
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


@contextlib.contextmanager
def services(shards: int, *aggregator_args: str, broker_args: tuple[str, ...] = ()) -> Iterator[Services]:
    """A broker and ``shards`` aggregators, once every shard is routed."""
    front, back = free_address(), free_address()
    commands = [["psq", "broker", "--frontend", front, "--backend", back, *broker_args]]
    commands += [
        ["psq", "aggregator", "--shard", f"{i}/{shards}", "--backend", back, *aggregator_args] for i in range(shards)
    ]
    with processes(*commands) as procs:
        deadline = time.monotonic() + 30
        while len(_live(front)) < shards:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{shards} aggregators did not register within 30 s")
            time.sleep(0.05)
        yield Services(front, back, procs)


@contextlib.contextmanager
def cluster(shards: int, *aggregator_args: str) -> Iterator[str]:
    """:func:`services`, yielding the frontend address alone."""
    with services(shards, *aggregator_args) as s:
        yield s.frontend


def _live(front: str) -> list[int]:
    try:
        return [a["shard"] for a in query(front, 0.5)["aggregators"] if a["alive"]]
    except StatusError:
        return []
