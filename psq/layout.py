"""The per-layer layout of a step's statistics: ordered layer names and channel counts.

A :class:`Layout` maps ``{layer: Moments}`` to one flat :class:`~psq.stats.Moments` (all layers'
channels end to end, counts repeated per channel) and back.  Its ``id`` is a digest of its
content, so every worker of a job derives the same id for the same model without agreeing on
anything; a layout is sent in full once per peer and then named by id.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import msgpack
import numpy as np

from psq.stats import GradientMeans, LayerGradients, Moments

ID_BYTES = 8
MAX_LAYERS = 65_536
MAX_CHANNELS = 1 << 24  # per layout: 16 M channels of float64 is 128 MiB per array
MAX_NAME_CHARS = 512


class LayoutError(ValueError):
    """A layout that cannot describe statistics (empty, duplicate or oversized)."""


@dataclass(frozen=True)
class Layout:
    """Ordered layer names with their channel counts."""

    names: tuple[str, ...]
    channels: tuple[int, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(self.names)
        channels = tuple(int(c) if isinstance(c, np.integer) else c for c in self.channels)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "channels", channels)
        _check(names, channels)
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names)})

    @classmethod
    def of(cls, stats: Mapping[str, Moments]) -> Layout:
        """The layout of ``{layer: Moments}``, in the mapping's order."""
        return cls(tuple(stats), tuple(int(np.size(m.mean)) for m in stats.values()))

    @cached_property
    def id(self) -> bytes:
        packed = msgpack.packb([list(self.names), list(self.channels)])
        return hashlib.blake2b(packed, digest_size=ID_BYTES).digest()

    @property
    def layers(self) -> int:
        return len(self.names)

    @cached_property
    def total(self) -> int:
        """Total channels over all layers: the length of a flat mean or variance."""
        return int(sum(self.channels))

    @cached_property
    def offsets(self) -> np.ndarray:
        """Start of each layer in the flat arrays, with the total appended."""
        return np.concatenate(([0], np.cumsum(self.channels, dtype=np.int64)))

    @cached_property
    def widths(self) -> np.ndarray:
        """Channel counts as an array, to expand per-layer values with ``np.repeat``."""
        return np.array(self.channels, dtype=np.intp)

    def index(self, name: str) -> int:
        return self._index[name]

    def slice(self, name: str) -> slice:
        i = self._index[name]
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def expand(self, per_layer: np.ndarray) -> np.ndarray:
        """Repeat one value per layer over that layer's channels."""
        return np.repeat(per_layer, self.widths)

    def flatten(
        self, stats: Mapping[str, Moments], dtype: type = np.float64
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This layout's layers of ``stats`` (others are ignored) → (counts per layer, means,
        variances), flat, in this layout's order."""
        try:
            parts = [stats[n] for n in self.names]
        except KeyError as exc:
            raise LayoutError(f"statistics lack layer {exc.args[0]!r} of the layout") from None
        counts = np.array([_count(m) for m in parts])
        means = np.concatenate([m.mean for m in parts], axis=None, dtype=dtype)
        var = np.concatenate([m.var for m in parts], axis=None, dtype=dtype)
        if means.size != self.total or var.size != self.total:
            raise LayoutError(f"statistics have {means.size} channels, the layout {self.total}")
        return counts, means, var

    def per_layer(self, values: Mapping[str, float], default: np.ndarray) -> np.ndarray:
        """One float64 per layer of this layout, from ``values`` where given, else ``default``'s."""
        return np.array([values.get(n, d) for n, d in zip(self.names, default.tolist())], dtype=np.float64)

    def flatten_gradients(self, grads: Mapping[str, GradientMeans], dtype: type = np.float64) -> LayerGradients:
        """This layout's layers of ``grads`` as flat arrays; a layer without any has count 0."""
        counts = np.zeros(self.layers)
        dy, dy_xhat = np.zeros(self.total, dtype), np.zeros(self.total, dtype)
        for name, g in grads.items():
            i = self._index.get(name)
            if i is None:
                continue
            sl = self.slice(name)
            if np.size(g.dy) != self.channels[i] or np.size(g.dy_xhat) != self.channels[i]:
                raise LayoutError(
                    f"gradients of layer {name!r} have {np.size(g.dy)} channels, the layout {self.channels[i]}"
                )
            counts[i], dy[sl], dy_xhat[sl] = float(g.count), g.dy, g.dy_xhat
        return LayerGradients(counts, dy, dy_xhat)

    def split(self, counts: np.ndarray, means: np.ndarray, var: np.ndarray) -> dict[str, Moments]:
        """Flat arrays → ``{layer: Moments}`` of views (no copy)."""
        o = self.offsets
        return {
            n: Moments(float(counts[i]), means[o[i] : o[i + 1]], var[o[i] : o[i + 1]]) for i, n in enumerate(self.names)
        }

    def subset(self, names: Iterable[str]) -> Layout:
        """The layout of some of this layout's layers, in this layout's order."""
        keep = set(names)
        pairs = [(n, c) for n, c in zip(self.names, self.channels) if n in keep]
        return Layout(tuple(n for n, _ in pairs), tuple(c for _, c in pairs))


def _count(m: Moments) -> float:
    c = m.count
    return float(c) if isinstance(c, (int, float)) else float(np.max(c))  # np.max is slow on scalars


def shard_of(name: str, shards: int) -> int:
    """The shard that owns a layer: a stable hash of its name (the same in every process)."""
    return zlib.crc32(name.encode()) % shards


def _check(names: tuple[str, ...], channels: tuple[int, ...]) -> None:
    if not names:
        raise LayoutError("a layout needs at least one layer")
    if len(names) != len(channels):
        raise LayoutError(f"{len(names)} layer names but {len(channels)} channel counts")
    if len(names) > MAX_LAYERS:
        raise LayoutError(f"at most {MAX_LAYERS} layers, got {len(names)}")
    for n in names:
        if not isinstance(n, str) or not 0 < len(n) <= MAX_NAME_CHARS:
            raise LayoutError(f"a layer name must be a string of 1..{MAX_NAME_CHARS} characters, got {n!r:.80}")
    if len(set(names)) != len(names):
        raise LayoutError("layer names must be unique")
    for c in channels:
        if type(c) is not int or c <= 0:
            raise LayoutError(f"channel counts must be positive integers, got {c!r:.80}")
    if sum(channels) > MAX_CHANNELS:
        raise LayoutError(f"at most {MAX_CHANNELS} channels in all, got {sum(channels)}")
