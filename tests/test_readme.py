"""The README's and docs' code blocks, run as written: every Python block is an example a test
runs, and the multi-host recipe runs with loopback addresses in place of the hosts'."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_tcp_port, wait_until
from test_metrics import scrape, value

from psq.security import ClientKeys
from psq.status import StatusError, query

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = str(Path(sys.executable).parent)
# every marked block, and where it runs: here unless named otherwise
EXAMPLES = {
    "client": "test_procfile.py",
    "sync-training": "test_procfile.py",
    "statistics": "here",
    "asyncio": "here",
    "accelerate": "here",
    "lightning": "here",
}
RECIPES = ("service-host", "training-host")
_BLOCK = re.compile(r"(?:<!-- (example|recipe): ([\w-]+) -->\s*)?```(python|sh)\n(.*?)```", re.S)


def _blocks() -> list[tuple[Path, str | None, str | None, str, str]]:
    return [(doc, *m.groups()) for doc in DOCS for m in _BLOCK.finditer(doc.read_text())]


def example(marker: str, kind: str = "example") -> str:
    """The code of the block marked ``<!-- kind: marker -->`` in the README or docs/."""
    found = [code for _, k, name, _, code in _blocks() if k == kind and name == marker]
    assert len(found) == 1, f"{len(found)} blocks marked {kind}: {marker}"
    return found[0]


def service_env(frontend: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSQ_")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PSQ_FRONTEND": frontend}


def run_example(marker: str, tmp_path: Path, frontend: str, *launcher: str) -> str:
    script = tmp_path / f"example_{marker.replace('-', '_')}.py"  # not a module name it imports
    script.write_text(example(marker))
    out = subprocess.run(
        [*launcher, str(script)] if launcher else [sys.executable, str(script)],
        cwd=tmp_path,
        env=service_env(frontend),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_every_python_block_is_an_example_that_a_test_runs():
    marked = {}
    for doc, kind, name, language, _ in _blocks():
        if language == "python":
            assert kind == "example", f"{doc.name}: a Python block without an example marker"
            marked[name] = doc.name
        else:
            assert kind is None or (kind == "recipe" and name in RECIPES), f"{doc.name}: {kind}: {name}"
    assert marked.keys() == EXAMPLES.keys()


def test_the_statistics_example_runs():
    out = subprocess.run([sys.executable, "-c", example("statistics")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_asyncio_and_accelerate_examples_train_against_a_live_service(cluster, tmp_path):
    frontend = cluster(1).endpoints.frontend
    answered = re.fullmatch(r"asyncio: (\d+) answers\n", run_example("asyncio", tmp_path, frontend))
    assert answered and int(answered[1]) >= 1
    out = run_example("accelerate", tmp_path, frontend, f"{BIN}/torchrun", "--standalone", "--nproc-per-node", "2")
    ranks = re.findall(r"rank (\d) of 2: (\d+) answers", out)
    assert sorted(r for r, _ in ranks) == ["0", "1"] and all(int(n) >= 1 for _, n in ranks), out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_lightning_example_trains_on_two_processes_and_ends_with_plain_batchnorm(cluster, tmp_path):
    out = run_example("lightning", tmp_path, cluster(1).endpoints.frontend)
    ranks = re.findall(r"rank (\d): BatchNorm1d, (\d+) answers", out)
    assert sorted(r for r, _ in ranks) == ["0", "1"] and all(int(n) >= 1 for _, n in ranks), out


def _live_shards(frontend: str, keys: ClientKeys) -> set[int]:
    try:
        return {a["shard"] for a in query(frontend, 0.5, keys)["aggregators"] if a["alive"]}
    except StatusError:
        return set()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_multi_host_recipe_runs_as_written(tmp_path):
    """The service host's block on 127.0.0.2, two training hosts as two torchrun nodes meeting on
    127.0.0.4, free ports for the recipe's: with keys, one .env, two shards, both metrics ports."""
    ports = {p: str(free_tcp_port()) for p in ("5555", "5556", "9100", "29500")}
    ports["9110"] = str(_free_pair())
    frontend = f"tcp://127.0.0.2:{ports['5555']}"

    def place(code: str) -> str:
        code = code.replace("10.0.0.5", "127.0.0.2").replace("10.0.0.6", "127.0.0.4")
        return re.sub(r"\b(5555|5556|9100|9110|29500)\b", lambda m: ports[m[0]], code)

    service_dir = tmp_path / "service"
    service_dir.mkdir()
    service = subprocess.Popen(
        ["bash", "-euc", place(example("service-host", "recipe")) + "\nwait"],
        cwd=service_dir,
        env=service_env("unused"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        keys = service_dir / "keys"
        wait_until(lambda: (service_dir / ".env").exists(), what="the recipe's keys, then its .env")
        admin = ClientKeys.load(keys / "workers" / "host0.key_secret", keys / "broker" / "broker.key")
        wait_until(lambda: _live_shards(frontend, admin) == {0, 1}, timeout_s=30, what="two shards over CurveZMQ")
        nodes = [_training_host(place(example("training-host", "recipe")), node, keys, tmp_path) for node in (0, 1)]
        outputs = [p.communicate(timeout=240)[0] for p in nodes]
        assert [p.returncode for p in nodes] == [0, 0], outputs
        report = query(frontend, 2, admin)
        assert {w["worker"] for w in report["workers"]} == {"rank0", "rank1"}
        assert all(report["shard_reports"][str(i)]["jobs"]["hosts"] for i in (0, 1))
        assert value(scrape(int(ports["9100"])), "psq_aggregators_live") == 2
        for shard in (0, 1):
            assert value(scrape(int(ports["9110"]) + shard), "psq_messages_total", role="aggregator", command="PUSH")
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        output = service.communicate(timeout=15)[0]
    # the shell itself dies of the signal; what matters is that each service stopped cleanly
    assert output.count(": stopped") == 3 and "broker: stopped" in output, output[-3000:]
    assert sorted(p.name for p in (service_dir / "snapshots").iterdir()) == ["aggregator-0.snap", "aggregator-1.snap"]


def _training_host(code: str, node: int, keys: Path, tmp_path: Path) -> subprocess.Popen[str]:
    """Training host ``node``: its folder holds broker.key and its own secret key, as the recipe says."""
    host = tmp_path / f"host{node}"
    host.mkdir()
    shutil.copy(keys / "broker" / "broker.key", host)
    shutil.copy(keys / "workers" / f"host{node}.key_secret", host)
    code = code.replace("--node-rank 0", f"--node-rank {node}").replace("host0", f"host{node}")
    env = service_env("unused")
    del env["PSQ_FRONTEND"]  # the recipe sets it
    env.update(PSQ_EPOCHS="1", PSQ_MAX_STEPS_PER_EPOCH="50", PSQ_RUN_DIR=str(tmp_path / "run"), PSQ_JOB="hosts")
    env["PYTHONPATH"] = str(ROOT)  # -m workers.train from the host's own folder
    return subprocess.Popen(
        ["bash", "-euc", code], cwd=host, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _free_pair() -> int:
    """A free port whose successor is free too: the two shards' metrics."""
    for _ in range(50):
        port = free_tcp_port()
        if port < 65535 and _free(port + 1):
            return port
    raise AssertionError("no two free ports in a row")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
