"""Aggregator snapshots: the store written atomically, and read back with every check.

File format: ``b"PSQSNAP"`` + format version (1 byte) + CRC-32 of the payload (4 bytes,
little-endian) + the payload, one msgpack map with the arrays as raw little-endian bytes.
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
from psq.protocol import ProtocolError, check_stats

log = logging.getLogger("psq.aggregator")

MAGIC = b"PSQSNAP"
FORMAT = 1
_HEAD = struct.Struct("<7sBI")
_KEYS = {"shard", "shards", "half_life", "jobs", "applied"}
_JOB_KEYS = {"names", "channels", "counts", "means", "vars", "versions", "layouts"}


class SnapshotError(Exception):
    """A snapshot that cannot be resumed from; the text says why and which file."""


def dumps(store: Store) -> bytes:
    jobs = {}
    for name, job in store.jobs.items():
        n = job.total
        jobs[name] = {
            "names": job.names,
            "channels": job.channels,
            "counts": job.counts[: len(job.names)].astype("<f8").tobytes(),
            "means": job.mean[:n].astype("<f8").tobytes(),
            "vars": job.var[:n].astype("<f8").tobytes(),
            "versions": job.versions[: len(job.names)].astype("<u8").tobytes(),
            "layouts": [[list(p.layout.names), list(p.layout.channels)] for p in job.placements.values()],
        }
    applied = [[j, w, s, q] for (j, w, s), q in store.applied.items()]
    payload = msgpack.packb(
        {"shard": store.shard, "shards": store.shards, "half_life": store.half_life, "jobs": jobs, "applied": applied},
        use_bin_type=True,
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


def load(path: Path, shard: int, shards: int, half_life: float) -> Store | None:
    """The store saved at ``path``; None when there is no file yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:  # a folder, no permission: say so, keep the file
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from None
    try:
        return loads(data, shard, shards, half_life)
    except SnapshotError as exc:
        raise SnapshotError(f"cannot resume from snapshot {path}: {exc} (the file is left as it is)") from None


def loads(data: bytes, shard: int, shards: int, half_life: float) -> Store:
    payload = _payload(data)
    if (payload["shard"], payload["shards"]) != (shard, shards):
        raise SnapshotError(
            f"it holds shard {payload['shard']}/{payload['shards']}, this aggregator is {shard}/{shards}"
        )
    if payload["half_life"] != half_life:
        log.warning(
            "aggregator: snapshot was written with half-life %s, continuing with %s", payload["half_life"], half_life
        )
    store = Store(shard, shards, half_life)
    for name, fields in payload["jobs"].items():
        store.jobs[name] = _job(name, fields)
        store.layouts.update((p.layout.id, p.layout) for p in store.jobs[name].placements.values())
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


def _payload(data: bytes) -> dict[str, Any]:
    if len(data) < _HEAD.size:
        raise SnapshotError(f"it has {len(data)} bytes, fewer than a snapshot's {_HEAD.size}-byte header")
    magic, fmt, crc = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"it is not a psq snapshot (starts {bytes(magic)!r}, expected {MAGIC!r})")
    if fmt != FORMAT:
        raise SnapshotError(f"snapshot format {fmt} is not supported (this aggregator reads {FORMAT})")
    body = memoryview(data)[_HEAD.size :]
    if zlib.crc32(body) != crc:
        raise SnapshotError("its checksum does not match: the file is corrupt or truncated")
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True)
    # Any failure to parse is a damaged file, whatever msgpack raises.
    except Exception as exc:
        raise SnapshotError(f"its payload is not valid msgpack: {exc}") from None
    if not isinstance(payload, dict) or set(payload) != _KEYS:
        raise SnapshotError(f"its payload must be a map with keys {sorted(_KEYS)}")
    if not isinstance(payload["jobs"], dict) or not isinstance(payload["applied"], list):
        raise SnapshotError("'jobs' must be a map and 'applied' a list")
    return payload


def _job(name: str, fields: Any) -> JobState:
    if not isinstance(name, str) or not isinstance(fields, dict) or set(fields) != _JOB_KEYS:
        raise SnapshotError(f"job {name!r:.40} must be a map with keys {sorted(_JOB_KEYS)}")
    try:
        layout = Layout(tuple(fields["names"]), tuple(fields["channels"]))
    except (LayoutError, TypeError) as exc:
        raise SnapshotError(f"job {name!r}: invalid layers: {exc}") from None
    counts = _array(fields["counts"], "<f8", layout.layers, name, "counts")
    means = _array(fields["means"], "<f8", layout.total, name, "means")
    var = _array(fields["vars"], "<f8", layout.total, name, "vars")
    versions = _array(fields["versions"], "<u8", layout.layers, name, "versions")
    try:
        check_stats(counts, means, var)
    except ProtocolError as exc:
        raise SnapshotError(f"job {name!r}: {exc.message}") from None
    job = JobState()
    job.place(layout)
    for placed in _layouts(fields["layouts"], job, name):
        job.place(placed)
    n = layout.total
    job.counts[: layout.layers], job.mean[:n], job.var[:n] = counts, means, var
    job.versions[: layout.layers] = versions
    return job


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
