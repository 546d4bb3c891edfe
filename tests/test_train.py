"""The main job: the digits trainer, the Procfile under honcho, the examples, more hosts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_until
from test_cli import run_psq
from test_procfile import ROOT

from psq.status import query
from workers.data import digits, shards
from workers.examples import custom_async, custom_sync
from workers.models import digits_cnn

BIN = str(Path(sys.executable).parent)


def env_for(**values: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PSQ_LOG_LEVEL": "WARNING", **values}


def test_digits_come_from_the_package_with_a_fixed_split():
    d = digits()
    assert len(d.train_y) + len(d.test_y) == 1797 and len(d.test_y) == 359
    assert d.train_x.shape[1:] == (1, 8, 8) and float(d.train_x.min()) >= 0.0 and float(d.train_x.max()) <= 1.0
    assert torch.equal(digits().test_y, d.test_y)


@pytest.mark.parametrize(("sharding", "workers", "own"), [("skewed", 4, 0.9), ("split", 2, 1.0)])
def test_label_skewed_and_class_split_shards(sharding, workers, own):
    labels = np.repeat(np.arange(10), 100)
    parts = shards(labels, workers, sharding, seed=1)
    groups = 4 if sharding == "skewed" else workers
    for i, part in enumerate(parts):
        assert len(part) == len(labels) // workers
        in_group = np.minimum(labels[part] * groups // 10, groups - 1) == i % groups
        assert in_group.mean() == pytest.approx(own, abs=0.01)


def test_iid_shards_are_disjoint_and_equal():
    parts = shards(np.arange(1000) % 10, 2, "iid", seed=3)
    assert len(parts[0]) == len(parts[1]) == 500 and not set(parts[0]) & set(parts[1])


def run_dir_files(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    model = digits_cnn()
    model.load_state_dict(torch.load(run / "model.pt"))  # a plain PyTorch state dict
    return summary


@pytest.mark.slow
def test_honcho_start_runs_the_whole_job_and_ends_by_itself(ipc_dir, tmp_path):
    run = tmp_path / "run"
    env = env_for(
        PSQ_FRONTEND=f"ipc://{ipc_dir}/f",
        PSQ_BACKEND=f"ipc://{ipc_dir}/b",
        PSQ_RUN_DIR=str(run),
        PSQ_EPOCHS="2",
        PSQ_MAX_STEPS_PER_EPOCH="300",
    )
    (tmp_path / "Procfile").write_text((ROOT / "Procfile").read_text())
    out = subprocess.run(
        [sys.executable, "-m", "honcho", "start"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert re.search(r"test accuracy \(cluster statistics\): \d+\.\d+%", out.stdout)
    pushed = re.search(r"statistics: (\d+) steps pushed in (\d+) messages, \d+ answered, 0 unavailable", out.stdout)
    assert pushed and 0 < int(pushed[2]) <= int(pushed[1]), "steps share messages, never the other way round"
    summary = run_dir_files(run)
    assert summary["accuracy"] > 0.3 and summary["world"] == 2  # learning: chance is 10%
    assert (run / "aggregator-0.snap").exists()


def test_the_custom_trainer_examples_run(cluster):
    c = cluster(1)
    assert custom_sync.main(c.endpoints.frontend) > 0.6  # better than chance on the toy task
    assert asyncio.run(custom_async.main(c.endpoints.frontend)) > 0.6


def _live(frontend: str) -> bool:
    from psq.status import StatusError

    try:
        return any(a["alive"] for a in query(frontend, 0.3)["aggregators"])
    except StatusError:
        return False


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


@pytest.mark.slow
def test_sigterm_stops_every_rank_of_the_launcher(cluster, tmp_path):
    c = cluster(1)
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "psq",
            "worker",
            "--frontend",
            c.endpoints.frontend,
            "--epochs",
            "50",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        env=env_for(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: _updates(c.endpoints.frontend) > 20, timeout_s=120, what="training to be under way")
    family = descendants(launcher.pid)
    assert len(family) >= 2
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=30)[0]
    assert launcher.returncode != 0 and "stopped" in output
    wait_until(lambda: not alive(family), timeout_s=10, what="every rank to be gone")


@pytest.mark.slow
def test_sigterm_to_honcho_mid_training_leaves_no_process_behind(ipc_dir, tmp_path):
    env = env_for(
        PSQ_FRONTEND=f"ipc://{ipc_dir}/f",
        PSQ_BACKEND=f"ipc://{ipc_dir}/b",
        PSQ_RUN_DIR=str(tmp_path / "run"),
        PSQ_EPOCHS="50",
    )
    (tmp_path / "Procfile").write_text((ROOT / "Procfile").read_text())
    honcho = subprocess.Popen(
        [sys.executable, "-m", "honcho", "start"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_until(lambda: _updates(f"ipc://{ipc_dir}/f") > 20, timeout_s=120, what="training to be under way")
    family = descendants(honcho.pid)
    honcho.send_signal(signal.SIGTERM)
    output = honcho.communicate(timeout=60)[0]
    assert "workers.1 stopped" in output and "broker.1 stopped (rc=0)" in output, output[-2000:]
    wait_until(lambda: not alive(family), timeout_s=10, what="every process of the job to be gone")


def _updates(frontend: str) -> int:
    from psq.status import StatusError

    try:
        shard_reports = query(frontend, 0.5)["shard_reports"]
    except StatusError:
        return 0
    return sum(r.get("updates", 0) for r in shard_reports.values())


def test_bad_trainer_settings_are_refused():
    out = run_psq("worker", "--norm", "batch")
    assert out.returncode == 2 and "expected one of psq, local, syncbn, got 'batch'" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "psq", "worker"],
        env=env_for(PSQ_EPOCHS="-3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "PSQ_EPOCHS: expected a positive integer" in out.stderr
    out = run_psq("worker", "--push-cpu-share", "1.5")
    assert out.returncode == 2 and "expected a number in (0, 1], got '1.5'" in out.stderr, out.stderr


@pytest.mark.slow
def test_bench_accuracy_writes_its_table_and_plot(tmp_path):
    quick = ["--settings", "a", "--seeds", "1", "--first-seed", "4", "--epochs", "1", "--max-steps-per-epoch", "30"]
    methods = ["--methods", "local", "syncbn", "psq"]  # psq-renorm is psq with one option: one run less
    out = run_psq("bench", "accuracy", *quick, *methods, "--out", str(tmp_path), "--json", timeout_s=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [row[1] for row in result["rows"]] == ["local", "syncbn", "psq"] and "seeds [4]" in result["title"]
    assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", row[2]) for row in result["rows"])
    assert result["rows"][1][3] == "+0.00" and result["rows"][0][6] == 1.0  # against syncbn, against local
    png = tmp_path / "accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(runs) == {"a/local", "a/syncbn", "a/psq"}
    assert runs["a/psq"][0]["settings"]["gradient"] == "cluster" and runs["a/psq"][0]["settings"]["norm"] == "psq"


def test_accuracy_bench_rows_without_their_references_say_so():
    from psq.bench.timing import table
    from workers.accuracy_bench import _row

    run = {"accuracy": 0.99, "accuracy_recomputed": 0.98, "wall_s": 10.0}
    results = {("a", "psq"): [run], ("a", "local"): [{**run, "wall_s": 5.0}]}
    row = _row("a", "psq", [run], results)
    assert row[3] is None and row[6] == 2.0  # no syncbn in the run; local, at half psq's time
    printed = table(["s", "m", "acc", "vs", "rec", "wall", "x"], [row]).splitlines()[-1]
    assert re.split(r"\s{2,}", printed)[3] == "-", printed


def test_accuracy_bench_methods_and_variants_are_parsed_and_checked():
    from workers.accuracy_bench import Method, method

    assert method("psq-renorm") == Method("psq-renorm", "psq", (("gradient", "renorm"),))
    variant = method("psq:history_weight=0.8,half_life=64,gradient=exact")
    assert variant.options == (("gradient", "exact"), ("history_weight", 0.8)) and variant.half_life == 64.0
    assert method("psq:push_interval_s=0").options == (("push_interval_s", 0.0),)  # a loop option, same path
    for bad, text in (
        ("psq:history_weight=1.5", "expected a number in [0, 1)"),
        ("psq:push_interval_s=-1", "expected a non-negative number"),
        ("psq:push_cpu_share=0", "expected a number in (0, 1]"),
        ("psq:momentum=0.1", "key=value pairs of history_weight"),
        ("batchnorm", "expected local, syncbn, psq"),
    ):
        out = run_psq("bench", "accuracy", "--methods", bad)
        assert out.returncode == 2 and text in out.stderr, out.stderr
    out = run_psq("bench", "accuracy", "--first-seed", "-1")
    assert out.returncode == 2 and "--first-seed" in out.stderr, out.stderr


def test_python_m_workers_train_runs_the_module_once_and_refuses_bad_settings_with_exit_code_2():
    """The trainer's own entry point parses through psq.command, not psq.cli (which imported
    workers.train a second time, beside __main__)."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['workers.train']\n"
        "try:\n"
        "    runpy.run_module('workers.train', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, 'psq.cli' in sys.modules, 'workers.train' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env_for(PSQ_EPOCHS="0"), capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr
    assert "python -m workers.train: PSQ_EPOCHS: expected a positive integer, got '0'" in out.stderr
