"""Fixtures: real psq processes, real sockets, and their cleanup.

Every process a test starts is stopped at teardown with SIGTERM, and the teardown fails the
test if it takes more than 5 s to exit: every test also checks clean shutdown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from psq.status import StatusError, query

EXIT_TIMEOUT_S = 5.0
# torch.compile's cache in a folder of the test session's own: its key does not cover a custom
# operator's fake kernel, so a graph compiled against an older psq would be reused
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="psq-inductor-"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow system tests first: under ``pytest -n 2`` a long test started last keeps one
    worker busy after the other has run out of tests.  A stable sort, the same on every worker
    (xdist requires one order)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@dataclass(frozen=True)
class Endpoints:
    frontend: str
    backend: str


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    # ipc:// paths must stay under ~100 characters: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="psq-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def endpoints(ipc_dir: Path) -> Endpoints:
    return Endpoints(f"ipc://{ipc_dir}/frontend", f"ipc://{ipc_dir}/backend")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_endpoints() -> Endpoints:
    return Endpoints(f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}")


class Proc:
    """A psq process with its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.args, self.log_path = args, log
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "psq", *args], stdout=fd, stderr=subprocess.STDOUT, env=env
            )
        finally:
            os.close(fd)  # the child holds its own copy

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.kill(self.pid, sig)
        if sig == signal.SIGKILL:
            self.popen.wait(timeout=10)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took).  Kills it if it outlives the limit."""
        t0 = time.monotonic()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            code = -9
        return code, time.monotonic() - t0

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``psq <args>``; every process still running at teardown must exit on SIGTERM
    within 5 s."""
    procs: list[Proc] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        full_env = {**os.environ, "PSQ_LOG_LEVEL": "DEBUG", **(env or {})}
        log = tmp_path / f"{args[0]}-{len(procs)}.log"
        proc = Proc(list(args), log, full_env)
        procs.append(proc)
        return proc

    yield start
    slow = []
    for proc in procs:
        was_alive = proc.alive()
        code, took_s = proc.terminate()
        if was_alive and (took_s > EXIT_TIMEOUT_S or code != 0):
            slow.append(f"psq {' '.join(proc.args)}: exit code {code} after {took_s:.1f} s\n{proc.output()[-2000:]}")
    assert not slow, "processes did not exit cleanly on SIGTERM:\n" + "\n".join(slow)


def wait_until(predicate: Callable[[], object], timeout_s: float = 15.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def live_shards(frontend: str) -> set[int]:
    try:
        report = query(frontend, timeout_s=0.3)
    except StatusError:
        return set()
    return {a["shard"] for a in report["aggregators"] if a["alive"]}


def owners(frontend: str) -> dict[int, int]:
    """Live shards and the pid of the aggregator owning each (names are host:pid:nonce)."""
    try:
        report = query(frontend, timeout_s=0.3)
    except StatusError:
        return {}
    return {a["shard"]: int(a["name"].split(":")[1]) for a in report["aggregators"] if a["alive"]}


def wait_for_owner(frontend: str, shard: int, proc: Proc, timeout_s: float = 20.0) -> None:
    wait_until(lambda: owners(frontend).get(shard) == proc.pid, timeout_s, f"pid {proc.pid} to own shard {shard}")


@pytest.fixture
def cluster(spawn: Callable[..., Proc], endpoints: Endpoints, tmp_path: Path) -> Callable[..., Cluster]:
    """Start a broker and ``shards`` aggregators, and wait until the broker routes to all."""

    def start(shards: int = 1, *aggregator_args: str, ends: Endpoints = endpoints) -> Cluster:
        broker = spawn("broker", "--frontend", ends.frontend, "--backend", ends.backend)
        aggs = [
            spawn("aggregator", "--shard", f"{i}/{shards}", "--backend", ends.backend, *aggregator_args)
            for i in range(shards)
        ]
        wait_until(lambda: live_shards(ends.frontend) == set(range(shards)), what=f"{shards} live shards")
        return Cluster(ends, broker, aggs)

    return start


@dataclass
class Cluster:
    endpoints: Endpoints
    broker: Proc
    aggregators: list[Proc]


@pytest.fixture
def zsocket() -> Iterator[Callable[[int], zmq.Socket]]:
    """Raw ZeroMQ sockets, closed with linger 0 at teardown."""
    ctx = zmq.Context.instance()
    socks: list[zmq.Socket] = []

    def make(kind: int) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        socks.append(sock)
        return sock

    yield make
    for sock in socks:
        sock.close(linger=0)


def recv(sock: zmq.Socket, timeout_s: float = 5.0) -> list[bytes]:
    """One multipart message, or fail: a test never waits forever."""
    if not sock.poll(timeout_s * 1000, zmq.POLLIN):
        raise AssertionError(f"no message within {timeout_s} s")
    return sock.recv_multipart()
