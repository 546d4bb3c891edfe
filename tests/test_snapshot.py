"""broker.snapshot: atomic writes, faithful reads, and refusals that keep the file."""

from __future__ import annotations

import struct
import zlib

import msgpack
import numpy as np
import pytest
from test_store import push

from broker import snapshot
from broker.snapshot import SnapshotError
from broker.store import Store
from psq.layout import Layout


def filled_store() -> Store:
    store = Store(0, 1, 50.0)
    for i in range(3):
        store.apply(push(Layout(("a", "b"), (2, 3)), i, worker=f"w{i}", seq=i + 1, gradients=i > 0))
    store.apply(push(Layout(("c",), (4,)), 9, job="other"))
    return store


FIELDS = ("counts", "mean", "var", "versions", "seen", "grad_counts", "grad_dy", "grad_dy_xhat")


def test_a_snapshot_round_trips_the_whole_store(tmp_path):
    store = filled_store()
    path = tmp_path / "agg.snap"
    snapshot.save(store, path)
    back = snapshot.load(path, 0, 1, 50.0)
    assert back is not None and set(back.jobs) == {"job", "other"}
    for name, job in store.jobs.items():
        other = back.jobs[name]
        n = job.total
        assert other.names == job.names and other.channels == job.channels
        for field in FIELDS:
            size = n if field in ("mean", "var", "grad_dy", "grad_dy_xhat") else len(job.names)
            assert np.array_equal(getattr(job, field)[:size], getattr(other, field)[:size]), field
    assert back.jobs["job"].grad_counts[0] > 0  # the gradient history is in it
    assert back.applied == store.applied
    assert set(back.layouts) == set(store.layouts)
    assert not store.dirty


def test_the_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "agg.snap"
    path.write_bytes(b"previous")
    snapshot.save(filled_store(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agg.snap"]
    assert path.read_bytes().startswith(b"PSQSNAP")


def test_no_file_means_a_fresh_start(tmp_path):
    assert snapshot.load(tmp_path / "missing.snap", 0, 1, 50.0) is None


def sealed(body: bytes, fmt: int = snapshot.FORMAT) -> bytes:
    """A body with a valid header and checksum, so the content checks are what refuses it."""
    return struct.pack("<7sBI", b"PSQSNAP", fmt, zlib.crc32(body)) + body


def test_a_format_1_snapshot_still_loads_without_gradient_history(tmp_path, caplog):
    """What psq wrote before gradient statistics: no gradient fields, a half-life in elements."""
    p = payload_of(filled_store())
    del p["half_life_unit"]
    for job in p["jobs"].values():
        for key in ("seen", "grad_counts", "grad_dy", "grad_dy_xhat"):
            del job[key]
    path = tmp_path / "old.snap"
    path.write_bytes(sealed(msgpack.packb(p, use_bin_type=True), fmt=1))
    back = snapshot.load(path, 0, 1, 50.0)
    store = filled_store()
    assert np.array_equal(back.jobs["job"].mean[:5], store.jobs["job"].mean[:5])
    assert not back.jobs["job"].grad_counts.any() and back.unit == "images"
    assert "half-life 50.0 elements, continuing with 50.0 images" in caplog.text


def resealed(payload: dict) -> bytes:
    return sealed(msgpack.packb(payload, use_bin_type=True))


def payload_of(store: Store) -> dict:
    return msgpack.unpackb(snapshot.dumps(store)[12:], raw=False)


def corrupt_cases() -> list[tuple[str, object]]:
    good = snapshot.dumps(filled_store())
    flipped = bytearray(good)
    flipped[40] ^= 0xFF
    p = payload_of(filled_store())
    nan_means = {**p, "jobs": {**p["jobs"], "job": {**p["jobs"]["job"], "means": np.full(5, np.nan).tobytes()}}}
    short = {**p, "jobs": {**p["jobs"], "job": {**p["jobs"]["job"], "vars": b"\0" * 8}}}
    negative = {**p, "jobs": {**p["jobs"], "job": {**p["jobs"]["job"], "counts": np.array([-1.0, 2.0]).tobytes()}}}
    dup = {**p, "jobs": {**p["jobs"], "job": {**p["jobs"]["job"], "names": ["a", "a"]}}}

    def job_with(**fields: object) -> dict:
        return {**p, "jobs": {**p["jobs"], "job": {**p["jobs"]["job"], **fields}}}

    no_gradients = {**p, "jobs": {**p["jobs"], "job": {k: v for k, v in p["jobs"]["job"].items() if k != "grad_dy"}}}
    return [
        ("checksum", bytes(flipped)),
        ("checksum", good[:-10]),
        ("not a psq snapshot", b"GARBAGE!" * 4),
        ("fewer than", b"PSQ"),
        ("format 9", b"PSQSNAP\x09" + good[8:]),
        ("holds shard 1/2", resealed({**p, "shard": 1, "shards": 2})),
        ("NaN or infinity", resealed(nan_means)),
        ("must be 5 x <f8", resealed(short)),
        (">= 0", resealed(negative)),
        ("unique", resealed(dup)),
        ("keys", resealed({**p, "extra": 1})),
        ("applied", resealed({**p, "applied": [["j", "w", -1, 2]]})),
        ("not valid msgpack", sealed(b"\xc1")),
        ("gradient means contain NaN", resealed(job_with(grad_dy=np.array([1.0, np.nan, 0, 0, 0]).tobytes()))),
        ("gradient counts must be >= 0", resealed(job_with(grad_counts=np.array([-1.0, 2.0]).tobytes()))),
        ("grad_dy_xhat must be 5 x <f8", resealed(job_with(grad_dy_xhat=b"\0" * 16))),
        ("keys", resealed(no_gradients)),
        ("images seen contain NaN", resealed(job_with(seen=np.array([np.nan, 1.0]).tobytes()))),
        ("half_life_unit", resealed({**p, "half_life_unit": "fortnights"})),
        (
            "a layout names layers",
            resealed({**p, "jobs": {**p["jobs"], "job": {**p["jobs"]["job"], "layouts": [[["zz"], [1]]]}}}),
        ),
    ]


@pytest.mark.parametrize(("message", "content"), corrupt_cases(), ids=[c[0] for c in corrupt_cases()])
def test_a_corrupt_or_incompatible_snapshot_is_refused_and_kept(tmp_path, message, content):
    path = tmp_path / "agg.snap"
    path.write_bytes(content)
    with pytest.raises(SnapshotError, match=message) as info:
        snapshot.load(path, 0, 1, 50.0)
    assert str(path) in str(info.value) and "left as it is" in str(info.value)
    assert path.read_bytes() == content
