"""The embedded default data: scikit-learn's digits, split and sharded across workers.

The 1,797 8x8 images ship inside scikit-learn (nothing is downloaded).  The train/test split is
fixed (seed 0, 20% test); how the training images are dealt to the workers is the experiment:

* ``iid``: shuffled, every worker a random slice;
* ``skewed``: classes in 4 contiguous groups; worker ``i`` draws 90% of its shard from group
  ``i mod 4`` and 10% from the others;
* ``split``: classes in as many contiguous groups as workers, each worker only its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from workers.settings import SHARDINGS

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Digits:
    train_x: torch.Tensor  # (N, 1, 8, 8) float32, scaled to [0, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@cache
def digits() -> Digits:
    from sklearn.datasets import load_digits  # reads the copy inside the scikit-learn package

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = round(TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def shards(labels: np.ndarray, workers: int, sharding: str, seed: int) -> list[np.ndarray]:
    """Each worker's training indices (equal sizes), fixed for the run."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    rng = np.random.default_rng(seed)
    size = len(labels) // workers
    if sharding == "iid":
        order = rng.permutation(len(labels))
        return [order[i * size : (i + 1) * size] for i in range(workers)]
    groups = 4 if sharding == "skewed" else workers
    own_fraction = 0.9 if sharding == "skewed" else 1.0
    group_of = np.minimum(labels * groups // 10, groups - 1)  # contiguous classes per group
    out = []
    for i in range(workers):
        mine = np.flatnonzero(group_of == i % groups)
        others = np.flatnonzero(group_of != i % groups)
        n_own = round(own_fraction * size)
        own = rng.choice(mine, n_own, replace=n_own > len(mine))
        rest = rng.choice(others, size - n_own, replace=False) if size > n_own else np.empty(0, np.int64)
        out.append(rng.permutation(np.concatenate([own, rest])))
    return out


def epoch_batches(shard: np.ndarray, batch: int, epoch: int, seed: int) -> np.ndarray:
    """This epoch's batches of a shard, as a (steps, batch) index array (the tail dropped)."""
    order = np.random.default_rng([seed, epoch]).permutation(shard)
    steps = len(order) // batch
    return order[: steps * batch].reshape(steps, batch)
