"""The aggregator's store: the one object that owns the statistics of a shard.

Per job, every layer's history lives in flat float64 arrays (a count per layer; means and
variances of all channels end to end; and the same for the gradient means of the backward), so
one push updates all its layers with a handful of numpy calls into preallocated buffers.  A
layout's layers usually sit contiguously (the first push of a layout appends them in its
order), and then the update works on views, in place.

Every push is validated before it touches anything (:mod:`psq.protocol` checks the frames;
:meth:`Store.admit` checks that its layers belong here and fit), and an update from a
``(job, worker, session)`` is applied at most once per sequence number.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from psq.layout import Layout, shard_of
from psq.protocol import MAX_COUNT, ErrorCode, HistoryReply, ProtocolError, Push
from psq.stats import (
    HALF_LIFE_UNITS,
    LayerGradients,
    LayerMoments,
    Scratch,
    accumulate_into,
    accumulate_means_into,
    decay,
)

MAX_JOBS = 1024
MAX_CHANNELS = 1 << 26  # per aggregator: 64 M channels, 1.5 GiB of float64 state
MAX_SESSIONS = 100_000  # remembered (job, worker, session) sequence numbers, oldest dropped first


@dataclass
class Placement:
    """Where one layout's layers live in its job's arrays, with that layout's work buffers."""

    layout: Layout
    channels: slice | np.ndarray  # positions of the layout's channels in the job's arrays
    layers: slice | np.ndarray  # positions of its layers (counts and versions)
    scratch: Scratch
    replies: dict[str, tuple[np.ndarray, ...]] = field(default_factory=dict)  # cast buffers per dtype

    @property
    def contiguous(self) -> bool:
        return isinstance(self.channels, slice)


class JobState:
    """One job's layers: names, channel ranges, and the flat history arrays."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        self.channels: list[int] = []
        self.starts: list[int] = []
        self.total = 0
        self.counts = np.zeros(0)  # per layer
        self.mean = np.zeros(0)
        self.var = np.zeros(0)
        self.versions = np.zeros(0, np.uint64)
        self.updated = np.zeros(0)  # time.monotonic() of each layer's last update, 0 before any
        self.seen = np.zeros(0)  # per layer: every image that ever arrived, undecayed (the job's clock)
        self.grad_counts = np.zeros(0)  # per layer: the backward's statistics
        self.grad_dy = np.zeros(0)
        self.grad_dy_xhat = np.zeros(0)
        self.placements: dict[bytes, Placement] = {}

    def conflicts(self, layout: Layout) -> str | None:
        """Why ``layout`` cannot be placed here (a known layer with another width), if it can't."""
        for name, c in zip(layout.names, layout.channels):
            i = self.index.get(name)
            if i is not None and self.channels[i] != c:
                return f"layer {name!r} has {self.channels[i]} channels here, the push says {c}"
        return None

    def new_channels(self, layout: Layout) -> int:
        return sum(c for n, c in zip(layout.names, layout.channels) if n not in self.index)

    def place(self, layout: Layout) -> Placement:
        placement = self.placements.get(layout.id)
        if placement is None:
            for name, c in zip(layout.names, layout.channels):
                if name not in self.index:
                    self._append(name, c)
            placement = self._placement(layout)
            self.placements[layout.id] = placement
        return placement

    def _append(self, name: str, channels: int) -> None:
        self.index[name] = len(self.names)
        self.names.append(name)
        self.channels.append(channels)
        self.starts.append(self.total)
        self.total += channels
        if self.total > self.mean.size:
            capacity = max(self.total, 2 * self.mean.size)
            for name in _PER_CHANNEL:
                setattr(self, name, _grown(getattr(self, name), capacity))
        if len(self.names) > self.versions.size:
            capacity = max(16, 2 * self.versions.size)
            for name in _PER_LAYER:
                setattr(self, name, _grown(getattr(self, name), capacity))

    def _placement(self, layout: Layout) -> Placement:
        layer_pos = np.array([self.index[n] for n in layout.names], dtype=np.intp)
        channel_pos = np.concatenate([np.arange(self.starts[i], self.starts[i] + self.channels[i]) for i in layer_pos])
        return Placement(layout, _as_slice(channel_pos), _as_slice(layer_pos), Scratch(layout.total))

    def history(self, p: Placement) -> LayerMoments:
        """The layout's history: views when contiguous, else a gathered copy (see :meth:`put`)."""
        return LayerMoments(self.counts[p.layers], self.mean[p.channels], self.var[p.channels])

    def gradients(self, p: Placement) -> LayerGradients:
        """The layout's gradient history, as :meth:`history`."""
        return LayerGradients(self.grad_counts[p.layers], self.grad_dy[p.channels], self.grad_dy_xhat[p.channels])

    def put(self, p: Placement, h: LayerMoments, g: LayerGradients | None = None) -> None:
        """Write back what :meth:`history` and :meth:`gradients` gathered (views need nothing)."""
        if not isinstance(p.layers, slice):
            self.counts[p.layers] = h.counts
            if g is not None:
                self.grad_counts[p.layers] = g.counts
        if not p.contiguous:
            self.mean[p.channels], self.var[p.channels] = h.mean, h.var
            if g is not None:
                self.grad_dy[p.channels], self.grad_dy_xhat[p.channels] = g.dy, g.dy_xhat


def _saturate(counts: np.ndarray) -> None:
    """Hold counts at the wire's limit: the history stays answerable (weights are ratios, so
    nothing else changes) whatever the pushes added up to."""
    np.minimum(counts, MAX_COUNT, out=counts)


_PER_CHANNEL = ("mean", "var", "grad_dy", "grad_dy_xhat")
_PER_LAYER = ("counts", "versions", "updated", "seen", "grad_counts")


def _as_slice(positions: np.ndarray) -> slice | np.ndarray:
    """A slice when the positions are consecutive, so that indexing gives views."""
    start = int(positions[0])
    if np.array_equal(positions, np.arange(start, start + positions.size)):
        return slice(start, start + positions.size)
    return positions


def _grown(a: np.ndarray, capacity: int) -> np.ndarray:
    out = np.zeros(capacity, a.dtype)
    out[: a.size] = a
    return out


class Store:
    """All jobs' statistics of one shard, with the policy of how updates apply."""

    def __init__(self, shard: int, shards: int, half_life: float, unit: str = "images") -> None:
        if unit not in HALF_LIFE_UNITS:
            raise ValueError(f"the half-life counts one of {HALF_LIFE_UNITS}, got {unit!r}")
        self.shard, self.shards, self.half_life, self.unit = shard, shards, half_life, unit
        self.jobs: dict[str, JobState] = {}
        self.layouts: dict[bytes, Layout] = {}  # every layout placed in some job, by id
        self.applied: OrderedDict[tuple[str, str, int], int] = OrderedDict()
        self.updates = 0
        self.duplicates = 0
        self.dirty = False  # changed since the last snapshot

    # -- admission: nothing is touched before a push passes ---------------------------------

    def admit(self, push: Push) -> Placement:
        """The placement of ``push``'s layout, creating it only once every check passed."""
        job = self.jobs.get(push.job)
        if job is not None and push.layout.id in job.placements:
            return job.placements[push.layout.id]
        self._check_shard(push.layout)
        if job is None and len(self.jobs) >= MAX_JOBS:
            raise ProtocolError(ErrorCode.LAYOUT, f"this aggregator holds at most {MAX_JOBS} jobs")
        state = job or JobState()
        conflict = state.conflicts(push.layout)
        if conflict:
            raise ProtocolError(ErrorCode.LAYOUT, conflict)
        held = sum(j.total for j in self.jobs.values())
        if held + state.new_channels(push.layout) > MAX_CHANNELS:
            raise ProtocolError(ErrorCode.LAYOUT, f"this aggregator holds at most {MAX_CHANNELS} channels")
        placement = state.place(push.layout)
        self.add_job(push.job, state)
        return placement

    def _check_shard(self, layout: Layout) -> None:
        foreign = [n for n in layout.names if shard_of(n, self.shards) != self.shard]
        if foreign:
            raise ProtocolError(
                ErrorCode.WRONG_SHARD,
                f"layers {foreign[:3]} belong to other shards than "
                f"{self.shard}/{self.shards}; ask the broker how many shards there are",
            )

    # -- updates ----------------------------------------------------------------------------

    def is_duplicate(self, push: Push) -> bool:
        last = self.applied.get((push.job, push.worker, push.session))
        return last is not None and push.seq <= last

    def apply(self, push: Push) -> HistoryReply:
        """Update the history with ``push`` (unless it was applied before) and reply."""
        placement = self.admit(push)
        if self.is_duplicate(push):
            self.duplicates += 1
        else:
            self.update(
                push.job, placement, LayerMoments(push.counts, push.means, push.var), push.images, push.gradients
            )
            self.remember(push)
        return self.reply(
            push.job, placement, push.seq, push.step, push.reply_dtype, gradients=push.gradients is not None
        )

    def update(
        self,
        job_name: str,
        placement: Placement,
        batch: LayerMoments,
        images: np.ndarray,
        gradients: LayerGradients | None = None,
    ) -> None:
        """``H ← merge(scale(H, 2^(−S/h)), B)`` for all the placement's layers at once, ``S`` the
        arriving images (or elements).  The gradient history ages by the same factor: it is the
        same stream of images, seen by the backward."""
        job, widths, scratch = self.jobs[job_name], placement.layout.widths, placement.scratch
        kept = decay(images if self.unit == "images" else batch.counts, self.half_life)
        h = job.history(placement)
        accumulate_into(h, batch, widths, scratch, kept)
        _saturate(h.counts)
        g = None
        if gradients is not None:
            g = job.gradients(placement)
            accumulate_means_into(g, gradients, widths, scratch, kept)
            _saturate(g.counts)
        else:  # a forward without a backward: its images age the gradient history all the same
            job.grad_counts[placement.layers] *= kept
        job.put(placement, h, g)
        layers = placement.layers
        job.versions[layers] += np.uint64(1)
        job.seen[layers] = np.minimum(job.seen[layers] + images, MAX_COUNT)
        job.updated[layers] = time.monotonic()
        self.updates += 1
        self.dirty = True

    def remember(self, push: Push) -> None:
        key = (push.job, push.worker, push.session)
        self.applied[key] = push.seq
        self.applied.move_to_end(key)
        if len(self.applied) > MAX_SESSIONS:
            self.applied.popitem(last=False)

    def add_job(self, name: str, state: JobState) -> None:
        """Hold ``state`` as job ``name``, its layouts known to the decoder (the one place both
        are written: a push's admission and a snapshot's load)."""
        self.jobs[name] = state
        self.layouts.update((lid, p.layout) for lid, p in state.placements.items())

    def clocks(self, job: str, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the placement's layers' versions and images seen: what a reply carries."""
        state = self.jobs[job]
        return state.versions[placement.layers].copy(), state.seen[placement.layers].copy()

    def reply(
        self,
        job_name: str,
        placement: Placement,
        seq: int,
        step: int,
        dtype: str,
        complete: bool = True,
        gradients: bool = False,
    ) -> HistoryReply:
        """The placement's history (with its gradient history if asked).  Its arrays may be views
        into the store, valid until the next update: encode and send it at once (the socket
        copies it out)."""
        job, ch = self.jobs[job_name], placement.channels
        means, var = cast_reply(placement, dtype, "moments", job.mean[ch], job.var[ch])
        g = None
        if gradients:
            dy, dy_xhat = cast_reply(placement, dtype, "gradients", job.grad_dy[ch], job.grad_dy_xhat[ch])
            g = LayerGradients(job.grad_counts[placement.layers], dy, dy_xhat)
        layers = placement.layers
        return HistoryReply(
            seq, step, placement.layout.id, job.counts[layers], means, var, job.versions[layers], job.seen[layers],
            complete, g,
        )  # fmt: skip

    # -- status -----------------------------------------------------------------------------

    def report(self) -> dict[str, object]:
        jobs = {}
        for name, job in self.jobs.items():
            jobs[name] = [
                [n, float(job.counts[i]), int(job.versions[i]), float(job.grad_counts[i])]
                for i, n in enumerate(job.names)
            ]
        return {
            "shard": self.shard,
            "shards": self.shards,
            "half_life": self.half_life,
            "half_life_unit": self.unit,
            "updates": self.updates,
            "duplicates": self.duplicates,
            "jobs": jobs,
        }


def cast_reply(placement: Placement, dtype: str, what: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays`` in the reply dtype: float64 views as they are, else cast into this layout's
    reply buffers (no allocation per message)."""
    if dtype == "<f8":
        return arrays
    key = f"{what}{dtype}"
    if key not in placement.replies:
        placement.replies[key] = tuple(np.empty(a.size, dtype) for a in arrays)
    out = placement.replies[key]
    for o, a in zip(out, arrays):
        np.copyto(o, a, casting="same_kind")
    return out
