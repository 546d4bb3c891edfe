"""Model shapes and plausible statistics the benchmarks use, without importing torch."""

from __future__ import annotations

from typing import Any

import numpy as np

from psq import protocol
from psq.layout import Layout
from psq.stats import GradientMeans, LayerGradients


def resnet50_layout() -> Layout:
    """ResNet-50's 53 batch-norm layers (26,560 channels), named as torchvision names them."""
    names, channels = ["bn1"], [64]
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            names += [f"{prefix}.bn1", f"{prefix}.bn2", f"{prefix}.bn3"]
            channels += [width, width, 4 * width]
            if block == 0:
                names.append(f"{prefix}.downsample.1")
                channels.append(4 * width)
    return Layout(tuple(names), tuple(channels))


def random_stats(
    layout: Layout, dtype: type = np.float32, seed: int = 0, count: float = 256.0, images: float = 4.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plausible flat statistics: (counts per layer, means, biased variances, images per layer)."""
    rng = np.random.default_rng(seed)
    counts = np.full(layout.layers, count)
    means = rng.normal(size=layout.total).astype(dtype)
    var = rng.gamma(2.0, 0.5, size=layout.total).astype(dtype)
    return counts, means, var, np.full(layout.layers, images)


def random_gradients(layout: Layout, dtype: type = np.float32, seed: int = 1, count: float = 256.0) -> LayerGradients:
    """Plausible flat gradient means of a backward pass (signed, small)."""
    rng = np.random.default_rng(seed)
    return LayerGradients(
        np.full(layout.layers, count),
        (rng.normal(size=layout.total) * 1e-3).astype(dtype),
        (rng.normal(size=layout.total) * 1e-3).astype(dtype),
    )


def step_push(layout: Layout, gradients: bool, seq: int = 1) -> protocol.Push:
    """One worker's step for ``layout`` as the wire carries it (float32), with or without the
    backward's statistics."""
    counts, means, var, images = random_stats(layout)
    grads = random_gradients(layout) if gradients else None
    return protocol.Push("bench", "w", 1, seq, seq, layout, counts, means, var, images, "<f4", grads)


def client_step(layout: Layout, gradients: bool) -> dict[str, Any]:
    """The same step as keyword arguments of :meth:`psq.client.StatsClient.push` after the step number."""
    counts, means, var, images = random_stats(layout)
    out: dict[str, Any] = {
        "stats": layout.split(counts, means, var),
        "images": dict(zip(layout.names, images.tolist())),
    }
    if gradients:
        g = random_gradients(layout)
        out["gradients"] = {
            n: GradientMeans(float(g.counts[i]), g.dy[layout.slice(n)], g.dy_xhat[layout.slice(n)])
            for i, n in enumerate(layout.names)
        }
    return out
