"""Aggregator snapshots: the store written atomically, and read back with every check.

File format: ``b"PSQSNAP"`` + format version (1 byte) + CRC-32 of the payload (4 bytes,
little-endian) + the payload, one msgpack map with the arrays as raw little-endian bytes.
Format 2 adds each job's gradient history, the images each layer has seen and the half-life's
unit; a format-1 snapshot still loads (no gradient history, no images seen yet; its half-life
counted elements).
Writing goes to a temporary file in the same folder, fsynced, then renamed over the old
snapshot (and the folder fsynced), so a crash leaves either the old or the new snapshot whole.
Reading refuses a corrupt or incompatible file with a :class:`SnapshotError` and never
modifies or removes it.  Nothing is ever unpickled.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from broker.store import JobState, Store
from psq.layout import Layout, LayoutError
from psq.protocol import ProtocolError, check_counts, check_gradients, check_stats
from psq.stats import HALF_LIFE_UNITS, LayerGradients

log = logging.getLogger("psq.aggregator")

MAGIC = b"PSQSNAP"
FORMAT = 2
_HEAD = struct.Struct("<7sBI")
_KEYS = {1: {"shard", "shards", "half_life", "jobs", "applied"}}
_KEYS[2] = _KEYS[1] | {"half_life_unit"}
_JOB_KEYS = {1: {"names", "channels", "counts", "means", "vars", "versions", "layouts"}}
_JOB_KEYS[2] = _JOB_KEYS[1] | {"seen", "grad_counts", "grad_dy", "grad_dy_xhat"}


class SnapshotError(Exception):
    """A snapshot that cannot be resumed from; the text says why and which file."""


def dumps(store: Store) -> bytes:
    jobs = {}
    for name, job in store.jobs.items():
        n, layers = job.total, len(job.names)
        jobs[name] = {
            "names": job.names,
            "channels": job.channels,
            "counts": job.counts[:layers].astype("<f8").tobytes(),
            "means": job.mean[:n].astype("<f8").tobytes(),
            "vars": job.var[:n].astype("<f8").tobytes(),
            "versions": job.versions[:layers].astype("<u8").tobytes(),
            "layouts": [[list(p.layout.names), list(p.layout.channels)] for p in job.placements.values()],
            "seen": job.seen[:layers].astype("<f8").tobytes(),
            "grad_counts": job.grad_counts[:layers].astype("<f8").tobytes(),
            "grad_dy": job.grad_dy[:n].astype("<f8").tobytes(),
            "grad_dy_xhat": job.grad_dy_xhat[:n].astype("<f8").tobytes(),
        }
    applied = [[j, w, s, q] for (j, w, s), q in store.applied.items()]
    header = {"shard": store.shard, "shards": store.shards, "half_life": store.half_life}
    payload = msgpack.packb(
        {**header, "half_life_unit": store.unit, "jobs": jobs, "applied": applied}, use_bin_type=True
    )
    return _HEAD.pack(MAGIC, FORMAT, zlib.crc32(payload)) + payload


def save(store: Store, path: Path) -> int:
    data = dumps(store)
    write_atomic(path, data)
    store.dirty = False
    return len(data)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself must survive a crash
    finally:
        os.close(folder)


def load(path: Path, shard: int, shards: int, half_life: float, unit: str = "images") -> Store | None:
    """The store saved at ``path``; None when there is no file yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:  # a folder, no permission: say so, keep the file
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from None
    try:
        return loads(data, shard, shards, half_life, unit)
    except SnapshotError as exc:
        raise SnapshotError(f"cannot resume from snapshot {path}: {exc} (the file is left as it is)") from None


def loads(data: bytes, shard: int, shards: int, half_life: float, unit: str = "images") -> Store:
    fmt, payload = _payload(data)
    if (payload["shard"], payload["shards"]) != (shard, shards):
        raise SnapshotError(
            f"it holds shard {payload['shard']}/{payload['shards']}, this aggregator is {shard}/{shards}"
        )
    written = (payload["half_life"], payload.get("half_life_unit", "elements"))
    if written != (half_life, unit):
        log.warning(
            "aggregator: snapshot was written with half-life %s %s, continuing with %s %s", *written, half_life, unit
        )
    store = Store(shard, shards, half_life, unit)
    for name, fields in payload["jobs"].items():
        store.add_job(name, _job(name, fields, fmt))
    for entry in payload["applied"]:
        if not (
            isinstance(entry, list)
            and len(entry) == 4
            and all(isinstance(x, str) for x in entry[:2])
            and all(type(x) is int and x >= 0 for x in entry[2:])
        ):
            raise SnapshotError(f"an 'applied' entry must be [job, worker, session, seq], got {entry!r:.80}")
        store.applied[(entry[0], entry[1], entry[2])] = entry[3]
    return store


def _payload(data: bytes) -> tuple[int, dict[str, Any]]:
    if len(data) < _HEAD.size:
        raise SnapshotError(f"it has {len(data)} bytes, fewer than a snapshot's {_HEAD.size}-byte header")
    magic, fmt, crc = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"it is not a psq snapshot (starts {bytes(magic)!r}, expected {MAGIC!r})")
    if fmt not in _KEYS:
        raise SnapshotError(f"snapshot format {fmt} is not supported (this aggregator reads {sorted(_KEYS)})")
    body = memoryview(data)[_HEAD.size :]
    if zlib.crc32(body) != crc:
        raise SnapshotError("its checksum does not match: the file is corrupt or truncated")
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True)
    # Any failure to parse is a damaged file, whatever msgpack raises.
    except Exception as exc:
        raise SnapshotError(f"its payload is not valid msgpack: {exc}") from None
    if not isinstance(payload, dict) or set(payload) != _KEYS[fmt]:
        raise SnapshotError(f"its payload must be a map with keys {sorted(_KEYS[fmt])}")
    if not isinstance(payload["jobs"], dict) or not isinstance(payload["applied"], list):
        raise SnapshotError("'jobs' must be a map and 'applied' a list")
    if payload.get("half_life_unit", "elements") not in HALF_LIFE_UNITS:
        raise SnapshotError(f"'half_life_unit' must be one of {HALF_LIFE_UNITS}")
    return fmt, payload


def _job(name: str, fields: Any, fmt: int) -> JobState:
    if not isinstance(name, str) or not isinstance(fields, dict) or set(fields) != _JOB_KEYS[fmt]:
        raise SnapshotError(f"job {name!r:.40} must be a map with keys {sorted(_JOB_KEYS[fmt])}")
    try:
        layout = Layout(tuple(fields["names"]), tuple(fields["channels"]))
    except (LayoutError, TypeError) as exc:
        raise SnapshotError(f"job {name!r}: invalid layers: {exc}") from None
    counts = _array(fields["counts"], "<f8", layout.layers, name, "counts")
    means = _array(fields["means"], "<f8", layout.total, name, "means")
    var = _array(fields["vars"], "<f8", layout.total, name, "vars")
    versions = _array(fields["versions"], "<u8", layout.layers, name, "versions")
    gradients = _gradients(fields, layout, name) if fmt >= 2 else None
    seen = _array(fields["seen"], "<f8", layout.layers, name, "seen") if fmt >= 2 else np.zeros(layout.layers)
    try:
        check_stats(counts, means, var)
        check_counts("images seen", seen)
        if gradients is not None:
            check_gradients(gradients)
    except ProtocolError as exc:
        raise SnapshotError(f"job {name!r}: {exc.message}") from None
    job = JobState()
    job.place(layout)
    for placed in _layouts(fields["layouts"], job, name):
        job.place(placed)
    n, layers = layout.total, layout.layers
    job.counts[:layers], job.mean[:n], job.var[:n] = counts, means, var
    job.versions[:layers], job.seen[:layers] = versions, seen
    if gradients is not None:
        job.grad_counts[:layers], job.grad_dy[:n], job.grad_dy_xhat[:n] = (
            gradients.counts,
            gradients.dy,
            gradients.dy_xhat,
        )
    return job


def _gradients(fields: dict[str, Any], layout: Layout, name: str) -> LayerGradients:
    return LayerGradients(
        _array(fields["grad_counts"], "<f8", layout.layers, name, "grad_counts"),
        _array(fields["grad_dy"], "<f8", layout.total, name, "grad_dy"),
        _array(fields["grad_dy_xhat"], "<f8", layout.total, name, "grad_dy_xhat"),
    )


def _layouts(raw: Any, job: JobState, name: str) -> list[Layout]:
    """The layouts the job had placed; each must use the job's layers with their widths."""
    if not isinstance(raw, list):
        raise SnapshotError(f"job {name!r}: 'layouts' must be a list")
    out = []
    for entry in raw:
        try:
            layout = Layout(tuple(entry[0]), tuple(entry[1]))
        except (LayoutError, TypeError, IndexError, KeyError) as exc:
            raise SnapshotError(f"job {name!r}: invalid layout {entry!r:.60}: {exc}") from None
        if any(n not in job.index for n in layout.names) or job.conflicts(layout):
            raise SnapshotError(f"job {name!r}: a layout names layers the job does not hold as such")
        out.append(layout)
    return out


def _array(raw: Any, dtype: str, length: int, job: str, what: str) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) != length * np.dtype(dtype).itemsize:
        size = len(raw) if isinstance(raw, bytes) else type(raw).__name__
        raise SnapshotError(
            f"job {job!r}: {what} must be {length} x {dtype} ({length * np.dtype(dtype).itemsize} bytes), got {size}"
        )
    return np.frombuffer(raw, dtype)
