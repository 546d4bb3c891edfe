"""``psq bench accuracy``: what psq is for — accuracy with small per-worker batches.

On digits, the same model, schedule and seeds for every method, side by side in one run:

* ``local``: per-worker batch norm under DDP, evaluated with rank 0's buffers (DDP broadcasts them);
* ``syncbn``: synchronized batch norm (fairscale's, on CPU) — the accurate, blocking reference;
* ``psq``: PSBatchNorm with every default, against a broker and an aggregator with theirs;
* ``psq-renorm``: the same with the backward psq had before its gradient history (Batch
  Renormalization's, through the batch statistics alone);
* variants for an ablation, ``psq:history_weight=0.8,gradient_history_weight=0.5,half_life=64``
  (any of those keys, ``warmup_images=...``, ``gradient=...`` and ``push_interval_s=...``, ``push_cpu_share=...`` too).

Settings: (a) 2 workers x batch 1, iid; (b) 4 x 2, label-skewed shards; (c) 2 x 2, fully
class-split shards; (d) 4 x 1, iid; (e) 2 x 1, iid, and (f) 2 x 2, class-split, a small ResNet
on the digits upsampled to 32x32.  The learning rate follows the linear scaling rule (the trainer's default).  For each:
test accuracy mean ± std over the seeds and its difference to synchronized BN, the accuracy
after recomputing BN statistics on the whole train set (training-side vs evaluation-side
effects), the training time per run and over per-worker BN's, and a PNG of accuracy per epoch.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from psq.bench.services import cluster
from psq.bench.timing import emit
from psq.config import SettingsError, choice, non_negative_float, positive_float, share_of_core, unit_interval
from psq.stats import GRADIENTS
from workers import train
from workers.settings import TrainSettings


@dataclasses.dataclass(frozen=True)
class Setting:
    workers: int
    batch: int
    sharding: str
    model: str = "cnn"

    def describe(self) -> str:
        model = "" if self.model == "cnn" else f", {self.model}"
        return f"{self.workers}x{self.batch} {self.sharding}{model}"


SETTINGS = {
    "a": Setting(2, 1, "iid"),
    "b": Setting(4, 2, "skewed"),
    "c": Setting(2, 2, "split"),
    "d": Setting(4, 1, "iid"),
    "e": Setting(2, 1, "iid", "resnet"),
    "f": Setting(2, 2, "split", "resnet"),
}
DEFAULT_METHODS = ("local", "syncbn", "psq", "psq-renorm")


@dataclasses.dataclass(frozen=True)
class Method:
    """How one run normalizes: a trainer ``norm``, PSBatchNorm options, the aggregator's half-life."""

    name: str
    norm: str
    options: tuple[tuple[str, Any], ...] = ()
    half_life: float | None = None


VARIANT_KEYS = {
    "history_weight": unit_interval,
    "gradient_history_weight": unit_interval,
    "warmup_images": non_negative_float,
    "half_life": positive_float,
    "push_interval_s": non_negative_float,
    "push_cpu_share": share_of_core,
    "gradient": choice(*GRADIENTS),
}
LOOP_KEYS = ("push_interval_s", "push_cpu_share")  # the variant keys that go to the WorkerLoop


def parse_pairs(text: str, keys: Mapping[str, Callable[[str], Any]], what: str) -> dict[str, Any]:
    """``key=value,...``, each value parsed by its key's parser; ``what`` names the caller in the
    error for a key it does not take."""
    options: dict[str, Any] = {}
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        if key not in keys:
            raise SettingsError(f"{what} takes key=value pairs of {', '.join(keys)}; got {pair!r}")
        options[key] = keys[key](value)
    return options


def method(text: str) -> Method:
    """``local``, ``syncbn``, ``psq``, ``psq-renorm``, or ``psq:key=value,...`` (a variant)."""
    if text in ("local", "syncbn", "psq"):
        return Method(text, text)
    if text == "psq-renorm":
        return Method(text, "psq", (("gradient", "renorm"),))
    if not text.startswith("psq:"):
        raise SettingsError(f"expected local, syncbn, psq, psq-renorm or psq:key=value,..., got {text!r}")
    options = parse_pairs(text[4:], VARIANT_KEYS, "a psq variant")
    half_life = options.pop("half_life", None)
    return Method(text, "psq", tuple(sorted(options.items())), half_life)


def one_run(
    setting: str, m: Method, seed: int, epochs: int, folder: Path, max_steps_per_epoch: int = 0
) -> dict[str, Any]:
    s = SETTINGS[setting]
    run_dir = folder / f"{setting}-{m.name.replace(':', '_')}-{seed}"
    settings = TrainSettings(
        norm=m.norm,
        workers=s.workers,
        batch=s.batch,
        sharding=s.sharding,
        model=s.model,
        seed=seed,
        epochs=epochs,
        max_steps_per_epoch=max_steps_per_epoch,
        run_dir=run_dir,
        **dict(m.options),
    )
    if m.norm == "psq":
        half_life = () if m.half_life is None else ("--half-life", str(m.half_life))
        with cluster(1, *half_life) as frontend:
            code = train.launch(dataclasses.replace(settings, frontend=frontend))
    else:
        code = train.launch(settings)
    if code != 0:
        raise RuntimeError(f"run {run_dir.name} failed with exit code {code}")
    return json.loads((run_dir / "summary.json").read_text())


def run(
    settings: tuple[str, ...] = tuple(SETTINGS),
    seeds: tuple[int, ...] = (0, 1, 2),
    epochs: int = 5,
    methods: tuple[Method, ...] = tuple(method(m) for m in DEFAULT_METHODS),
    out: Path = Path("runs/accuracy"),
    as_json: bool = False,
    max_steps_per_epoch: int = 0,
) -> list[list[Any]]:
    """Every setting x seed x method, methods interleaved within each seed; the table, JSON and PNG."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            for seed in seeds:
                for m in methods:
                    r = one_run(setting, m, seed, epochs, Path(tmp), max_steps_per_epoch)
                    results.setdefault((setting, m.name), []).append(r)
    rows = [_row(setting, name, runs, results) for (setting, name), runs in results.items()]
    (out / "accuracy.json").write_text(json.dumps({f"{s}/{m}": v for (s, m), v in results.items()}, indent=1))
    plot = _plot(results, [m.name for m in methods], out / "accuracy.png")
    emit(
        f"psq bench accuracy: digits, {epochs} epochs, seeds {list(seeds)}, learning rate 0.1 x global batch / 64",
        ["setting", "method", "test acc %", "vs syncbn", "recomputed BN %", "train s/run", "x local time"],
        rows,
        as_json,
        plot=str(plot),
        results=str(out / "accuracy.json"),
    )
    return rows


def _row(setting: str, name: str, runs: list[dict[str, Any]], results: dict[tuple[str, str], Any]) -> list[Any]:
    acc = np.array([r["accuracy"] for r in runs]) * 100
    rec = np.array([r["accuracy_recomputed"] for r in runs]) * 100
    wall = float(np.mean([r["wall_s"] for r in runs]))
    sync, local = results.get((setting, "syncbn")), results.get((setting, "local"))
    # without its reference in the run a column has no value (None, printed as "-"), not NaN
    versus = f"{acc.mean() - np.mean([r['accuracy'] for r in sync]) * 100:+.2f}" if sync else None
    over_local = float(wall / np.mean([r["wall_s"] for r in local])) if local else None
    return [
        f"({setting}) {SETTINGS[setting].describe()}",
        name,
        f"{acc.mean():.2f} ± {acc.std():.2f}",
        versus,
        f"{rec.mean():.2f} ± {rec.std():.2f}",
        wall,
        over_local,
    ]


def _plot(results: dict[tuple[str, str], list[dict[str, Any]]], methods: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({s for s, _ in results})
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for name in methods:
            runs = results.get((setting, name))
            if not runs:
                continue
            curves = np.array([r["accuracy_per_epoch"] for r in runs]) * 100
            epochs = np.arange(1, curves.shape[1] + 1)
            ax.errorbar(epochs, curves.mean(0), yerr=curves.std(0), label=name, marker="o", capsize=3)
        ax.set(title=f"({setting}) {SETTINGS[setting].describe()}", xlabel="epoch", ylabel="test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
