"""broker.store: the aggregator's state, updated in place and only by valid pushes."""

from __future__ import annotations

import numpy as np
import pytest

from broker.store import Store
from broker.sync import Finished, SyncSteps
from psq.layout import Layout, shard_of
from psq.protocol import ErrorCode, ProtocolError, Push
from psq.stats import History, LayerGradients, Moments, merge

HALF_LIFE = 50.0


def push(
    layout: Layout,
    seed: int,
    worker: str = "w0",
    seq: int = 1,
    session: int = 1,
    step: int = 0,
    count: float = 16.0,
    dtype: str = "<f8",
    job: str = "job",
    images: float | None = None,
    gradients: bool = False,
) -> Push:
    rng = np.random.default_rng(seed)
    g = LayerGradients(
        np.full(layout.layers, count),
        rng.normal(size=layout.total).astype(dtype),
        rng.normal(size=layout.total).astype(dtype),
    )
    return Push(
        job,
        worker,
        session,
        seq,
        step,
        layout,
        np.full(layout.layers, count),
        rng.normal(size=layout.total).astype(dtype),
        rng.random(layout.total).astype(dtype),
        np.full(layout.layers, count if images is None else images),  # by default one image per element
        dtype,
        g if gradients else None,
    )


def local_histories(pushes: list[Push]) -> dict[str, History]:
    """Per-layer reference: one History per layer, fed the same updates."""
    out: dict[str, History] = {}
    for p in pushes:
        for name, m in p.layout.split(p.counts, p.means, p.var).items():
            out.setdefault(name, History(HALF_LIFE)).update(m)
    return out


def assert_reply_matches(reply, layout: Layout, reference: dict[str, History]) -> None:
    got = layout.split(reply.counts, reply.means, reply.var)
    for name in layout.names:
        want = reference[name].moments
        np.testing.assert_allclose(got[name].count, want.count[0], rtol=1e-12)
        np.testing.assert_allclose(got[name].mean, want.mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got[name].var, want.var, rtol=1e-12, atol=1e-15)
        assert reply.versions[layout.index(name)] == reference[name].version


def test_updates_from_several_workers_equal_per_layer_histories():
    layout = Layout(("a", "b", "c"), (3, 1, 4))
    store = Store(0, 1, HALF_LIFE)
    pushes = [push(layout, seed=i, worker=f"w{i % 3}", seq=i // 3 + 1) for i in range(9)]
    for p in pushes:
        reply = store.apply(p)
    assert_reply_matches(reply, layout, local_histories(pushes))


def test_layouts_that_interleave_layers_update_through_gathered_copies():
    """Layout (a, c) is not contiguous once (a, b) was placed first: gather, update, scatter."""
    ab, ac, bc = Layout(("a", "b"), (2, 3)), Layout(("a", "c"), (2, 4)), Layout(("b", "c"), (3, 4))
    store = Store(0, 1, HALF_LIFE)
    pushes = [push(ab, 1, seq=1), push(ac, 2, seq=2), push(bc, 3, seq=3), push(ac, 4, seq=4)]
    replies = [store.apply(p) for p in pushes]
    assert not store.jobs["job"].placements[ac.id].contiguous
    reference = local_histories(pushes)
    assert_reply_matches(replies[-1], ac, reference)
    assert_reply_matches(store.apply(push(bc, 3, seq=3)), bc, reference)  # a duplicate: no update


def test_a_retried_sequence_number_is_applied_once():
    layout = Layout(("a",), (4,))
    store = Store(0, 1, HALF_LIFE)
    first = store.apply(push(layout, 1, seq=7))
    counts, versions = first.counts.copy(), first.versions.copy()
    again = store.apply(push(layout, 1, seq=7))
    older = store.apply(push(layout, 1, seq=3))
    assert np.array_equal(again.counts, counts) and np.array_equal(older.versions, versions)
    assert store.duplicates == 2
    restarted = store.apply(push(layout, 1, seq=1, session=2))  # a restarted worker: new session
    assert restarted.versions[0] == versions[0] + 1


def snapshot_of(store: Store) -> list[np.ndarray]:
    fields = ("counts", "mean", "var", "versions", "seen", "grad_counts", "grad_dy", "grad_dy_xhat")
    return [getattr(job, f).copy() for job in store.jobs.values() for f in fields]


@pytest.mark.parametrize(
    ("bad_layout", "code"),
    [
        (Layout(("a",), (5,)), ErrorCode.LAYOUT),  # known layer, other width
    ],
)
def test_a_push_that_conflicts_with_stored_layers_changes_nothing(bad_layout, code):
    store = Store(0, 1, HALF_LIFE)
    store.apply(push(Layout(("a",), (4,)), 1))
    before = snapshot_of(store)
    with pytest.raises(ProtocolError) as info:
        store.apply(push(bad_layout, 2, seq=2))
    assert info.value.code is code
    assert all(np.array_equal(x, y) for x, y in zip(before, snapshot_of(store)))
    assert bad_layout.id not in store.layouts


def test_layers_of_another_shard_are_refused_before_anything_is_stored():
    names = [f"layer{i}" for i in range(20)]
    foreign = next(n for n in names if shard_of(n, 2) == 1)
    store = Store(0, 2, HALF_LIFE)
    with pytest.raises(ProtocolError) as info:
        store.apply(push(Layout((foreign,), (3,)), 1))
    assert info.value.code is ErrorCode.WRONG_SHARD
    assert store.jobs == {} and store.layouts == {}


def test_float32_replies_are_cast_from_the_float64_history():
    layout = Layout(("a",), (6,))
    store = Store(0, 1, HALF_LIFE)
    reply = store.apply(push(layout, 1, dtype="<f4"))
    assert reply.means.dtype == np.float32
    np.testing.assert_allclose(reply.means, store.jobs["job"].mean[:6], rtol=1e-6)


def test_report_lists_each_layer_with_count_version_and_gradient_count():
    store = Store(0, 1, HALF_LIFE)
    store.apply(push(Layout(("a", "b"), (1, 2)), 1, count=4.0))
    assert store.report()["jobs"] == {"job": [["a", 4.0, 1, 0.0], ["b", 4.0, 1, 0.0]]}
    store.apply(push(Layout(("a", "b"), (1, 2)), 2, seq=2, count=4.0, gradients=True))
    assert [layer[3] for layer in store.report()["jobs"]["job"]] == [4.0, 4.0]


def test_the_half_life_counts_images_so_layers_of_any_resolution_keep_the_same_history():
    """Two layers, one at 16 elements per image and one at 1: in images they age alike; in
    elements the first would forget 16 times faster."""
    store = Store(0, 1, half_life=8.0)
    fine, coarse = Layout(("fine",), (2,)), Layout(("coarse",), (2,))
    for seq in range(1, 5):
        store.apply(push(fine, seq, seq=seq, count=4 * 16.0, images=4, job="j"))
        store.apply(push(coarse, seq, seq=seq, worker="w1", count=4.0, images=4, job="j"))
    job = store.jobs["j"]
    per_image = job.counts[:2] / np.array([16.0, 1.0])
    np.testing.assert_allclose(per_image[0], per_image[1], rtol=1e-12)
    want = 4 * sum(2.0 ** (-4 * k / 8.0) for k in range(4))  # images kept: 4 per push, aged by those after
    np.testing.assert_allclose(per_image, want, rtol=1e-12)
    by_elements = Store(0, 1, half_life=8.0, unit="elements")
    by_elements.apply(push(fine, 1, count=64.0, images=4))
    by_elements.apply(push(fine, 2, seq=2, count=64.0, images=4))
    np.testing.assert_allclose(by_elements.jobs["job"].counts[0], 64 + 64 * 2.0 ** (-64 / 8.0), rtol=1e-12)


def test_gradient_history_ages_with_the_moments_and_is_replied_only_to_pushes_with_gradients():
    layout = Layout(("a", "b"), (2, 3))
    store = Store(0, 1, half_life=6.0)
    sent = [push(layout, i, seq=i + 1, count=8.0, images=2.0, gradients=i != 2) for i in range(5)]
    replies = [store.apply(p) for p in sent]
    assert replies[2].gradients is None and all(r.gradients is not None for i, r in enumerate(replies) if i != 2)
    # brute force: a push's gradient means weigh its count, halved every 6 images pushed after it
    images_after = [2.0 * (len(sent) - 1 - i) for i in range(len(sent))]
    weights = [0.0 if p.gradients is None else 8.0 * 2.0 ** (-s / 6.0) for p, s in zip(sent, images_after)]
    got = replies[-1].gradients
    np.testing.assert_allclose(got.counts, sum(weights), rtol=1e-12)
    for field in ("dy", "dy_xhat"):
        want = sum(w * getattr(p.gradients, field) for w, p in zip(weights, sent) if p.gradients is not None)
        np.testing.assert_allclose(getattr(got, field), want / sum(weights), rtol=1e-10, atol=1e-12)


def test_every_layer_counts_the_images_it_has_seen_undecayed():
    layout = Layout(("a", "b"), (2, 3))
    store = Store(0, 1, half_life=4.0)
    for i in range(5):
        reply = store.apply(push(layout, i, seq=i + 1, count=24.0, images=3.0))
    assert list(reply.seen) == [15.0, 15.0] and list(store.jobs["job"].seen[:2]) == [15.0, 15.0]
    assert reply.counts[0] < 24.0 * 5  # the history's own count decays; the clock does not


def test_counts_saturate_at_the_wire_limit_so_the_history_stays_answerable(tmp_path):
    """Pushes that add up past what a reply may carry (a peer at the limits, or a long job)
    leave every count at the limit: replies still parse, the snapshot still loads."""
    from broker import snapshot
    from psq import protocol

    layout = Layout(("a",), (2,))
    store = Store(0, 1, half_life=1e12)
    for seq in range(1, 4):
        reply = store.apply(push(layout, seq, seq=seq, count=protocol.MAX_COUNT, images=1.0, gradients=True))
    assert reply.counts[0] == protocol.MAX_COUNT and reply.gradients.counts[0] == protocol.MAX_COUNT
    for seq in range(4, 7):  # the clock too
        store.apply(push(layout, seq, seq=seq, count=protocol.MAX_COUNT, images=protocol.MAX_COUNT))
    frames = [
        bytes(memoryview(f))
        for f in protocol.encode_history(
            store.reply("job", store.jobs["job"].placements[layout.id], 1, 1, "<f8", gradients=True), 0
        )
    ]
    back = protocol.parse_history(protocol.decode(frames), layout)
    assert back.seen[0] == protocol.MAX_COUNT
    path = tmp_path / "s.snap"
    snapshot.save(store, path)
    assert snapshot.load(path, 0, 1, 1e12).jobs["job"].counts[0] == protocol.MAX_COUNT


def test_a_duplicate_push_with_gradients_changes_no_gradient_history():
    layout = Layout(("a",), (3,))
    store = Store(0, 1, HALF_LIFE)
    store.apply(push(layout, 1, seq=4, gradients=True))
    before = snapshot_of(store)
    store.apply(push(layout, 9, seq=4, gradients=True))  # the same sequence number again
    assert all(np.array_equal(x, y) for x, y in zip(before, snapshot_of(store)))


def test_gradient_history_of_interleaved_layouts_is_gathered_and_scattered():
    ab, ac = Layout(("a", "b"), (2, 3)), Layout(("a", "c"), (2, 4))
    store = Store(0, 1, HALF_LIFE)
    first, second = push(ab, 1, seq=1, gradients=True), push(ac, 2, seq=2, gradients=True)
    store.apply(first)
    reply = store.apply(second)
    assert not store.jobs["job"].placements[ac.id].contiguous
    kept = 16.0 * 2.0 ** (-16.0 / HALF_LIFE)  # layer a's first count, aged by the second push's 16 images
    want_a = (kept * first.gradients.dy[:2] + 16.0 * second.gradients.dy[:2]) / (kept + 16.0)
    np.testing.assert_allclose(reply.gradients.dy[:2], want_a, rtol=1e-12)
    np.testing.assert_allclose(reply.gradients.dy[2:], second.gradients.dy[2:], rtol=1e-12)  # layer c: one push
    job = store.jobs["job"]
    b = slice(job.starts[job.index["b"]], job.starts[job.index["b"]] + 3)
    np.testing.assert_array_equal(job.grad_dy[b], first.gradients.dy[2:])  # layer b: untouched by (a, c)


def test_sync_steps_pool_every_workers_batch_once():
    layout = Layout(("a",), (3,))
    steps = SyncSteps(workers=2, timeout_s=10.0)
    p0, p0_retry, p1 = push(layout, 1, "w0"), push(layout, 1, "w0"), push(layout, 2, "w1", count=5.0)
    assert steps.add(p0, b"r0", now=0.0)[1] is None
    assert steps.add(p0_retry, b"r0-new-socket", now=0.1)[1] is None  # replaces, not a second worker
    _, step = steps.add(p1, b"r1", now=0.2)
    assert step is not None and sorted(r for r, _ in step.arrivals.values()) == [b"r0-new-socket", b"r1"]
    pooled, images = step.pooled()
    assert np.all(images == 21.0)
    want = merge(Moments(16.0, p0.means, p0.var), Moments(5.0, p1.means, p1.var))
    np.testing.assert_allclose(pooled.mean, want.mean, rtol=1e-12)
    np.testing.assert_allclose(pooled.var, want.var, rtol=1e-12)
    assert np.all(pooled.counts == 21.0)
    # the step's retries are answered from the finished step; another step's push is not
    assert not steps.waiting(p0) and steps.answered(p0) is None
    done = Finished(pooled.counts, pooled.mean, pooled.var, np.ones(1), np.ones(1), True)
    steps.finish(SyncSteps.key_of(p0), done)
    assert steps.answered(p0_retry) is done and steps.answered(push(layout, 3, "w0", step=8)) is None


def test_sync_steps_expire_after_their_timeout():
    steps = SyncSteps(workers=2, timeout_s=1.0)
    steps.add(push(Layout(("a",), (3,)), 1), b"r0", now=0.0)
    assert steps.expired(now=0.5) == []
    assert len(steps.expired(now=1.5)) == 1 and not steps.pending
