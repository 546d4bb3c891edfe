"""A synchronous training script with psq: the loop runs on a background thread.

Run a broker and an aggregator (``honcho start broker aggregator``), then
``python -m workers.examples.custom_sync`` (``PSQ_FRONTEND`` names the broker).

Three lines differ from a plain script: start a WorkerLoop, convert the model's batch norm,
and ``loop.flush()`` before evaluating, so the evaluation uses the cluster's latest statistics.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from psq import WorkerLoop
from psq.torch import convert_batchnorm


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def main(frontend: str, steps: int = 80) -> float:
    torch.manual_seed(0)
    with WorkerLoop(frontend, job="example-sync", worker="w0") as loop:  # 1. a background thread
        model = convert_batchnorm(make_model(), loop)  # 2. PSBatchNorm layers
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(steps):
            x = torch.randn(8, 1, 6, 6)
            y = (x.mean((1, 2, 3)) > 0).long()  # a learnable toy task
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        loop.flush()  # 3. the last step's history is in
        model.eval()  # BN buffers now hold the cluster's statistics
        with torch.no_grad():
            x = torch.randn(256, 1, 6, 6)
            accuracy = (model(x).argmax(1) == (x.mean((1, 2, 3)) > 0).long()).float().mean().item()
        print(f"sync example: {loop.summary()['answered']} steps answered, accuracy {accuracy:.2f}")
    return accuracy


if __name__ == "__main__":
    main(os.environ.get("PSQ_FRONTEND", "tcp://127.0.0.1:5555"))
