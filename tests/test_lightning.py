"""psq.lightning: PsqLayerSync under real Lightning DDP (2 CPU processes), and on its own."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from psq.lightning import PsqLayerSync
from psq.torch import PSBatchNorm


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_ddp_trains_with_psq_and_ends_with_plain_batchnorm_holding_the_cluster_history(cluster, tmp_path):
    c = cluster(1)
    env = {**os.environ, "PSQ_FRONTEND": c.endpoints.frontend, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "workers.examples.lightning_digits", "--max-steps", "12", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        summary = result["summary"]
        assert summary["answered"] >= 12 and summary["rejected"] == summary["unavailable"] == 0
        assert result["classes"] == ["BatchNorm2d"]  # reverted at teardown
        assert result["history_mean"].keys() == result["running_mean"].keys() == {"net.1", "net.4", "net.8"}
        for name, mean in result["history_mean"].items():
            np.testing.assert_allclose(result["running_mean"][name], mean, rtol=1e-6, atol=1e-7)


def test_apply_and_revert_without_a_trainer(cluster):
    c = cluster(1)
    sync = PsqLayerSync(c.endpoints.frontend, job="plugin", history_weight=0.5, prefix="student.")
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model = sync.apply(model)
    assert isinstance(model[1], PSBatchNorm) and model[1].name == "student.1" and model[1].history_weight == 0.5
    with pytest.raises(RuntimeError, match="already runs a WorkerLoop"):
        sync.apply(nn.Sequential())
    assert pickle.loads(pickle.dumps(sync)).loop is None  # to a spawned rank: settings only
    for _ in range(3):
        model(torch.randn(4, 1, 5, 5)).sum().backward()
    model = sync.revert(model)
    assert type(model[1]) is nn.BatchNorm2d
    h = sync.loop.history("student.1").moments
    np.testing.assert_allclose(model[1].running_mean.numpy(), h.mean, rtol=1e-6)
    assert sync.loop.summary()["answered"] >= 2
    first = sync.loop
    second = sync.apply(nn.Sequential(nn.BatchNorm1d(2)))[0].loop  # a second fit: a fresh loop
    assert second is sync.loop and second is not first and second.summary()["steps"] == 0
    sync.revert(nn.Sequential())


def test_a_bad_option_is_refused_when_the_plugin_is_made():
    with pytest.raises(ValueError, match=r"history_weight must be in \[0, 1\)"):
        PsqLayerSync(job="j", history_weight=2.0)
    with pytest.raises(TypeError, match=r"takes psq's options .* not histroy_weight"):
        PsqLayerSync(job="j", histroy_weight=0.5)
    with pytest.raises(TypeError, match="not momentum: the other batch-norm options come from each converted layer"):
        PsqLayerSync(job="j", momentum=0.2)
    with pytest.raises(ValueError, match="expected a ZeroMQ endpoint"):
        PsqLayerSync("localhost:5555", job="j")
    with pytest.raises(ValueError, match="wait_for_service_s must be a positive number"):
        PsqLayerSync(job="j", wait_for_service_s=0)
    with pytest.raises(ValueError, match="push_interval_s must be a non-negative number of seconds"):
        PsqLayerSync(job="j", push_interval_s=-1)
    with pytest.raises(ValueError, match=r"push_cpu_share must be in \(0, 1\]"):
        PsqLayerSync(job="j", push_cpu_share=0)
