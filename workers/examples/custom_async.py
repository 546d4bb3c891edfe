"""An asyncio trainer with psq: the loop shares the trainer's own event loop.

Run a broker and an aggregator (``honcho start broker aggregator``), then
``python -m workers.examples.custom_async`` (``PSQ_FRONTEND`` names the broker).

The WorkerLoop sends and receives only while the trainer awaits something, so a trainer that
computes without awaiting should yield once per step (``await asyncio.sleep(0)``).  Waits that
block a forward pass (``mode="sync"``, ``max_staleness``) need the forward off the event loop:
``await asyncio.to_thread(model, x)``.
"""

from __future__ import annotations

import asyncio
import os

import torch
from torch import nn

from psq import WorkerLoop
from psq.torch import convert_batchnorm
from workers.examples.custom_sync import make_model


async def batches(steps: int):  # an asynchronous data source, as a trainer might have
    for _ in range(steps):
        await asyncio.sleep(0)
        x = torch.randn(8, 1, 6, 6)
        yield x, (x.mean((1, 2, 3)) > 0).long()


async def main(frontend: str, steps: int = 80) -> float:
    torch.manual_seed(0)
    async with WorkerLoop(frontend, job="example-async", worker="w0") as loop:
        model = convert_batchnorm(make_model(), loop)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        async for x, y in batches(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        await loop.aflush()
        model.eval()
        with torch.no_grad():
            x = torch.randn(256, 1, 6, 6)
            accuracy = (model(x).argmax(1) == (x.mean((1, 2, 3)) > 0).long()).float().mean().item()
        print(f"async example: {loop.summary()['answered']} steps answered, accuracy {accuracy:.2f}")
    return accuracy


if __name__ == "__main__":
    asyncio.run(main(os.environ.get("PSQ_FRONTEND", "tcp://127.0.0.1:5555")))
