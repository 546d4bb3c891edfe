"""Model shapes the benchmarks use, without importing torch."""

from __future__ import annotations

import numpy as np

from psq.layout import Layout


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
    layout: Layout, dtype: type = np.float32, seed: int = 0, count: float = 256.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plausible flat statistics: (counts per layer, means, biased variances)."""
    rng = np.random.default_rng(seed)
    counts = np.full(layout.layers, count)
    means = rng.normal(size=layout.total).astype(dtype)
    var = rng.gamma(2.0, 0.5, size=layout.total).astype(dtype)
    return counts, means, var
