"""``psq bench accuracy``: what psq is for — accuracy with small per-worker batches.

On digits, the same model, schedule and seeds for every method:

* ``local``: per-worker batch norm under DDP, evaluated with rank 0's buffers (DDP broadcasts them);
* ``syncbn``: synchronized batch norm (fairscale's, on CPU) — the accurate, blocking reference;
* ``psq``: PSBatchNorm against a broker and an aggregator started for the run;
* ``single``: one process on the union of the workers' batches (plain batch norm).

Settings: (a) 2 workers x batch 1, iid; (b) 4 workers x batch 2, label-skewed shards; (c) 2
workers x batch 2, fully class-split shards.  For each, test accuracy mean ± std over the seeds,
the accuracy after recomputing BN statistics on the whole train set (training-side vs
evaluation-side effects), wall time per run, and a PNG of test accuracy per epoch.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from psq.bench.services import cluster
from psq.bench.timing import emit
from psq.config import TrainSettings
from workers import train

SETTINGS = {"a": (2, 1, "iid"), "b": (4, 2, "skewed"), "c": (2, 2, "split")}
METHODS = ("local", "syncbn", "psq", "single")


def one_run(
    setting: str,
    method: str,
    seed: int,
    epochs: int,
    history_weight: float,
    half_life: float,
    folder: Path,
    max_steps_per_epoch: int = 0,
) -> dict[str, Any]:
    workers, batch, sharding = SETTINGS[setting]
    run_dir = folder / f"{setting}-{method}-{seed}"
    settings = TrainSettings(
        norm="local" if method == "single" else method,
        workers=workers,
        batch=batch,
        sharding=sharding,
        seed=seed,
        epochs=epochs,
        history_weight=history_weight,
        max_steps_per_epoch=max_steps_per_epoch,
        run_dir=run_dir,
    )
    if method == "single":
        return dataclasses.asdict(train.train_single(settings, workers))
    if method == "psq":
        with cluster(1, "--half-life", str(half_life)) as frontend:
            code = train.launch(dataclasses.replace(settings, frontend=frontend))
    else:
        code = train.launch(settings)
    if code != 0:
        raise RuntimeError(f"run {run_dir.name} failed with exit code {code}")
    return json.loads((run_dir / "summary.json").read_text())


def run(
    settings: tuple[str, ...] = ("a", "b", "c"),
    seeds: tuple[int, ...] = (0, 1, 2),
    epochs: int = 5,
    history_weight: float = 0.75,
    half_life: float = 4096.0,
    out: Path = Path("runs/accuracy"),
    as_json: bool = False,
    max_steps_per_epoch: int = 0,
) -> list[list[Any]]:
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            for seed in seeds:
                for method in METHODS:
                    r = one_run(
                        setting, method, seed, epochs, history_weight, half_life, Path(tmp), max_steps_per_epoch
                    )
                    results.setdefault((setting, method), []).append(r)
    rows = [_row(setting, method, runs) for (setting, method), runs in results.items()]
    (out / "accuracy.json").write_text(json.dumps({f"{s}/{m}": v for (s, m), v in results.items()}, indent=1))
    plot = _plot(results, out / "accuracy.png")
    emit(
        f"psq bench accuracy: digits, {epochs} epochs, seeds {list(seeds)}, psq history weight {history_weight}, "
        f"half-life {half_life:g} samples",
        ["setting", "method", "test acc %", "recomputed BN %", "wall s/run"],
        rows,
        as_json,
        plot=str(plot),
        results=str(out / "accuracy.json"),
    )
    return rows


def _row(setting: str, method: str, runs: list[dict[str, Any]]) -> list[Any]:
    workers, batch, sharding = SETTINGS[setting]
    acc = np.array([r["accuracy"] for r in runs]) * 100
    rec = np.array([r["accuracy_recomputed"] for r in runs]) * 100
    wall = np.array([r["wall_s"] for r in runs])
    return [
        f"({setting}) {workers}x{batch} {sharding}",
        method,
        f"{acc.mean():.2f} ± {acc.std():.2f}",
        f"{rec.mean():.2f} ± {rec.std():.2f}",
        float(wall.mean()),
    ]


def _plot(results: dict[tuple[str, str], list[dict[str, Any]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({s for s, _ in results})
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        workers, batch, sharding = SETTINGS[setting]
        for method in METHODS:
            runs = results.get((setting, method))
            if not runs:
                continue
            curves = np.array([r["accuracy_per_epoch"] for r in runs]) * 100
            epochs = np.arange(1, curves.shape[1] + 1)
            ax.errorbar(epochs, curves.mean(0), yerr=curves.std(0), label=method, marker="o", capsize=3)
        ax.set(
            title=f"({setting}) {workers} workers x batch {batch}, {sharding}", xlabel="epoch", ylabel="test accuracy %"
        )
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
