"""PyTorch Lightning with psq: ``PsqLayerSync`` where ``sync_batchnorm=True`` would go.

Run a broker and an aggregator (``honcho start broker aggregator``), then
``python -m workers.examples.lightning_digits`` (``PSQ_FRONTEND`` names the broker): two CPU
processes under Lightning's DDP train the digits CNN at 4 images per rank, their batch norm
sharing statistics through psq.  ``--out DIR`` writes each rank's result as JSON.

One line differs from a plain Lightning script: the plugin in ``Trainer(plugins=[...])``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from psq.lightning import PsqLayerSync
from workers.data import digits
from workers.models import digits_cnn


class DigitsModule(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = digits_cnn(), lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(frontend: str, max_steps: int, out: Path | None) -> float:
    pl.seed_everything(0, verbose=False)
    data = digits()
    model = DigitsModule()
    sync = PsqLayerSync(frontend, job="example-lightning")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[sync],  # instead of sync_batchnorm=True
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=4, shuffle=True))
    model.eval()  # the batch norm is nn.BatchNorm2d again, its buffers the cluster's statistics
    with torch.no_grad():
        accuracy = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    rank = trainer.global_rank
    print(f"lightning example, rank {rank}: {sync.loop.summary()['answered']} steps answered, accuracy {accuracy:.3f}")
    if out is not None:
        bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        result = {
            "accuracy": accuracy,
            "summary": {k: v for k, v in sync.loop.summary().items() if k != "client"},
            "classes": sorted({type(m).__name__ for m in bns.values()}),
            "running_mean": {n: m.running_mean.tolist() for n, m in bns.items()},
            "history_mean": {n: sync.loop.history(n).moments.mean.tolist() for n in bns if sync.loop.history(n)},
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--out", type=Path, default=None, help="folder for each rank's JSON result")
    args = parser.parse_args()
    if args.max_steps <= 0:
        parser.error(f"--max-steps: expected a positive integer, got {args.max_steps}")
    main(os.environ.get("PSQ_FRONTEND", "tcp://127.0.0.1:5555"), args.max_steps, args.out)
