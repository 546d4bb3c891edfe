"""The Procfile under honcho, with the docs' client and training examples against it; one .env for all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_tcp_port, live_shards, wait_until
from test_cli import run_psq
from test_metrics import scrape, value
from test_readme import example

from psq.config import DEFAULT_HALF_LIFE_IMAGES

ROOT = Path(__file__).resolve().parent.parent


def start_service(folder: Path, env: dict[str, str], frontend: str) -> subprocess.Popen[bytes]:
    """The Procfile's broker and aggregator under honcho in ``folder``, once the shard is live."""
    (folder / "Procfile").write_text((ROOT / "Procfile").read_text())
    honcho = subprocess.Popen(
        [sys.executable, "-m", "honcho", "start", "broker", "aggregator"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: live_shards(frontend) == {0}, what="honcho's aggregator to register")
    except AssertionError:
        os.killpg(honcho.pid, signal.SIGKILL)  # leave no service behind a failed start
        honcho.wait(10)
        raise
    return honcho


@pytest.mark.slow
def test_honcho_runs_broker_and_aggregator_and_the_readme_examples_talk_to_them(endpoints, tmp_path):
    env = {
        **os.environ,
        "PSQ_FRONTEND": endpoints.frontend,
        "PSQ_BACKEND": endpoints.backend,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    run = tmp_path / "run"
    run.mkdir()
    honcho = start_service(run, env, endpoints.frontend)
    try:
        script = tmp_path / "example.py"
        script.write_text(example("client"))
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        # ten batches of 32 (one image per sample) under the aggregator's default half-life
        count = sum(32 * 2 ** (-32 * k / DEFAULT_HALF_LIFE_IMAGES) for k in range(10))
        assert f"bn1: {count:.2f} samples, version 10" in out.stdout
        status = run_psq("status", "--json", "--frontend", endpoints.frontend)
        layers = json.loads(status.stdout)["shard_reports"]["0"]["jobs"]["demo"]
        assert [(layer[0], layer[2]) for layer in layers] == [("bn1", 10), ("bn2", 10)]
        training = tmp_path / "train.py"
        training.write_text(example("sync-training"))
        out = subprocess.run(
            [sys.executable, str(training)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert "eval output (2, 10)" in out.stdout and (tmp_path / "model.pt").exists()
        answered = int(out.stdout.split()[-2])
        assert answered >= 1
        layers = json.loads(run_psq("status", "--json", "--frontend", endpoints.frontend).stdout)
        assert {layer[0] for layer in layers["shard_reports"]["0"]["jobs"]["readme"]} == {"1", "4"}
    finally:
        honcho.send_signal(signal.SIGTERM)
        output = honcho.communicate(timeout=10)[0].decode()
    # honcho answers its own SIGTERM with 128 + 15; what matters is that each process exited cleanly
    assert honcho.returncode == 143, output
    assert "broker.1 stopped (rc=0)" in output and "aggregator.1 stopped (rc=0)" in output, output
    assert (run / "runs" / "latest" / "aggregator-0.snap").exists()  # written on SIGTERM


def test_one_env_file_configures_broker_and_aggregator_metrics_ports_included(endpoints, tmp_path):
    """honcho reads .env for every process: each role takes its own variables from it."""
    broker_port, aggregator_port = free_tcp_port(), free_tcp_port()
    (tmp_path / ".env").write_text(
        f"PSQ_FRONTEND={endpoints.frontend}\nPSQ_BACKEND={endpoints.backend}\n"
        f"PSQ_BROKER_METRICS_PORT={broker_port}\nPSQ_AGGREGATOR_METRICS_PORT={aggregator_port}\n"
        "PSQ_HALF_LIFE=64\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSQ_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    honcho = start_service(tmp_path, env, endpoints.frontend)
    try:
        status = json.loads(run_psq("status", "--json", "--frontend", endpoints.frontend).stdout)
        assert status["shard_reports"]["0"]["half_life"] == 64
        assert value(scrape(broker_port), "psq_aggregators_live") == 1
        assert value(scrape(aggregator_port), "psq_messages_total", role="aggregator", command="STATUS") >= 1
    finally:
        honcho.send_signal(signal.SIGTERM)
        output = honcho.communicate(timeout=10)[0].decode()
    assert "broker.1 stopped (rc=0)" in output and "aggregator.1 stopped (rc=0)" in output, output
