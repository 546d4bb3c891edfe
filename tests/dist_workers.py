"""Bodies of the multi-process tests: each runs in its own process with a gloo process group."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from psq.loop import WorkerLoop
from psq.torch import PSBatchNorm, convert_batchnorm, ddp_buffer_sync


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 6 * 6, 7),
        nn.BatchNorm1d(7),
    )


def _init(rank: int, world: int, rendezvous: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)


def sync_forward(rank: int, world: int, rendezvous: str, frontend: str, folder: str) -> None:
    """Forward this rank's slice of the global batch with sync-mode PSBatchNorm; save every BN output."""
    _init(rank, world, rendezvous)
    data = torch.load(Path(folder) / "inputs.pt")
    model = small_cnn().double()
    model.load_state_dict(data["state"])
    with WorkerLoop(frontend, job="sync", worker=f"rank{rank}", mode="sync", dtype="<f8") as loop:
        model = convert_batchnorm(model, loop)
        outputs: dict[str, torch.Tensor] = {}
        for name, m in model.named_modules():
            if isinstance(m, PSBatchNorm):
                m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out.detach()))
        chunk = data["x"].chunk(world)[rank]
        model(chunk)
    torch.save(outputs, Path(folder) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def ddp_train(rank: int, world: int, rendezvous: str, frontend: str, folder: str, broadcast_buffers: bool) -> None:
    """Train a converted model under DistributedDataParallel; save parameters, buffers and history."""
    _init(rank, world, rendezvous)
    torch.manual_seed(0)
    model = small_cnn()
    gen = torch.Generator().manual_seed(100 + rank)
    with WorkerLoop(frontend, job=f"ddp-{broadcast_buffers}", worker=f"rank{rank}") as loop:
        model = convert_batchnorm(model, loop, history_weight=0.5)
        ddp = nn.parallel.DistributedDataParallel(model, **ddp_buffer_sync(broadcast_buffers))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        losses = []
        for _ in range(12):
            x = torch.randn(4, 3, 8, 8, generator=gen)
            y = torch.randint(0, 7, (4,), generator=gen)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        loop.flush(10)
        dist.barrier()
        model.eval()
        history = {n: loop.history(m.name) for n, m in model.named_modules() if isinstance(m, PSBatchNorm)}
        torch.save(
            {
                "losses": losses,
                "state": model.state_dict(),
                "history": {
                    n: (h.moments.mean.copy(), h.moments.var.copy(), float(h.moments.count)) for n, h in history.items()
                },
            },
            Path(folder) / f"rank{rank}.pt",
        )
    dist.barrier()
    dist.destroy_process_group()
