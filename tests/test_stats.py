"""psq.stats against brute force: merge, history, blend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from psq.stats import (
    GradientMeans,
    History,
    Moments,
    Scratch,
    blend,
    blend_weight,
    merge,
    merge_into,
    pool,
    pool_gradients,
    unbiased_var,
)

settings.register_profile("psq", deadline=None, max_examples=60)
settings.load_profile("psq")

CHANNELS = st.integers(1, 6)
VALUES = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


def batches(channels: int, min_rows: int = 1):
    return hnp.arrays(np.float64, st.tuples(st.integers(min_rows, 12), st.just(channels)), elements=VALUES)


def close(got: np.ndarray, want: np.ndarray, scale: float, rel: float = 1e-9) -> None:
    """Relative error against the data's magnitude: a variance of ~0 has no relative error
    of its own, so compare at the scale the data lives on."""
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * max(scale, 1e-300))


@st.composite
def data_pairs(draw):
    c = draw(CHANNELS)
    return draw(batches(c)), draw(batches(c))


@given(data_pairs())
def test_merge_equals_moments_of_concatenation(pair):
    x, y = pair
    got = merge(Moments.of(x, 0), Moments.of(y, 0))
    want = Moments.of(np.concatenate([x, y]), 0)
    scale = float(np.max(np.abs(np.concatenate([x, y])))) + 1.0
    assert np.all(got.count == want.count)
    close(got.mean, want.mean, scale)
    close(got.var, want.var, scale**2)


@given(st.integers(1, 5).flatmap(lambda c: st.tuples(batches(c), batches(c), batches(c))))
def test_merge_is_associative_and_commutative(triple):
    a, b, c = (Moments.of(x, 0) for x in triple)
    scale = float(max(np.max(np.abs(x)) for x in triple)) + 1.0
    left, right = merge(merge(a, b), c), merge(a, merge(b, c))
    swapped = merge(b, a)
    ab = merge(a, b)
    close(left.mean, right.mean, scale, 1e-12)
    close(left.var, right.var, scale**2, 1e-12)
    close(swapped.mean, ab.mean, scale, 1e-12)
    close(swapped.var, ab.var, scale**2, 1e-12)


@given(st.integers(1, 5).flatmap(lambda c: st.lists(batches(c), min_size=1, max_size=5)))
def test_pool_equals_moments_of_concatenation(sets):
    got = pool([Moments(float(len(x)), *_moments(x)) for x in sets])
    want = Moments.of(np.concatenate(sets), 0)
    scale = float(max(np.max(np.abs(x)) for x in sets)) + 1.0
    assert got.count == want.count
    close(got.mean, want.mean, scale)
    close(got.var, want.var, scale**2)


@given(st.integers(1, 5).flatmap(lambda c: st.lists(batches(c), min_size=1, max_size=5)))
def test_pooled_gradient_means_are_the_means_of_all_the_elements(sets):
    pairs = [(g, np.sin(g)) for g in sets]  # ∂L/∂y and ∂L/∂y·x̂ of each set's elements
    got = pool_gradients([GradientMeans(float(len(g)), g.mean(0), gx.mean(0)) for g, gx in pairs])
    scale = float(max(np.max(np.abs(g)) for g in sets)) + 1.0
    assert got.count == sum(len(g) for g in sets)
    close(got.dy, np.concatenate([g for g, _ in pairs]).mean(0), scale)
    close(got.dy_xhat, np.concatenate([gx for _, gx in pairs]).mean(0), scale)


def test_pool_leaves_out_a_set_with_count_zero():
    a = Moments(4.0, np.array([1.0, 2.0]), np.array([0.5, 3.0]))
    got = pool([Moments(0.0, np.full(2, 9.0), np.full(2, 9.0)), a])
    assert got.count == 4.0
    np.testing.assert_allclose(got.mean, a.mean, rtol=1e-15)
    np.testing.assert_allclose(got.var, a.var, rtol=1e-15)


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), x.var(axis=0)


def test_merge_with_empty_set_is_identity():
    a = Moments.of(np.arange(12.0).reshape(4, 3), 0)
    empty = Moments(0.0, np.full(3, 7.0), np.full(3, 5.0))
    for got in (merge(a, empty), merge(empty, a)):
        assert np.array_equal(got.mean, a.mean)
        assert np.array_equal(got.var, a.var)
        assert np.all(got.count == a.count)


def test_moments_of_reduces_several_axes_with_biased_variance():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5))
    m = Moments.of(x, (0, 2, 3))
    assert m.count == 40
    np.testing.assert_allclose(m.var, x.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=0), rtol=1e-12)


def test_merge_into_allocates_nothing_and_matches_merge():
    rng = np.random.default_rng(1)
    a = Moments.of(rng.normal(size=(5, 8)), 0).owned()
    b = Moments(np.full(8, 3.0), rng.normal(size=8).astype(np.float32), rng.random(8).astype(np.float32))
    want = merge(a, b)
    ids = tuple(id(x) for x in (a.count, a.mean, a.var))
    merge_into(a, b, Scratch(8))
    assert ids == tuple(id(x) for x in (a.count, a.mean, a.var))
    np.testing.assert_allclose(a.mean, want.mean, rtol=1e-14)
    np.testing.assert_allclose(a.var, want.var, rtol=1e-14)


def brute_force_history(batches_: list[np.ndarray], half_life: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Each sample of batch i weighs 2^(-S/h), S = samples in the batches after it."""
    rows, weights = [], []
    for i, x in enumerate(batches_):
        later = sum(len(y) for y in batches_[i + 1 :])
        rows.append(x)
        weights.append(np.full(len(x), 2.0 ** (-later / half_life)))
    x, w = np.concatenate(rows), np.concatenate(weights)
    mean = (w[:, None] * x).sum(0) / w.sum()
    var = (w[:, None] * (x - mean) ** 2).sum(0) / w.sum()
    return float(w.sum()), mean, var


@given(st.integers(1, 4).flatmap(lambda c: st.lists(batches(c), min_size=1, max_size=8)), st.floats(0.5, 200.0))
def test_history_equals_brute_force(sequence, half_life):
    history = History(half_life)
    for x in sequence:
        history.update(Moments.of(x, 0))
    count, mean, var = brute_force_history(sequence, half_life)
    got = history.moments
    scale = float(max(np.max(np.abs(x)) for x in sequence)) + 1.0
    np.testing.assert_allclose(got.count, count, rtol=1e-9)
    close(got.mean, mean, scale)
    close(got.var, var, scale**2)
    assert history.version == len(sequence)


@pytest.mark.parametrize("split", [[8], [4, 4], [1, 2, 5], [1] * 8])
def test_history_decay_counts_samples_not_messages(split):
    """An old batch weighs 2^(-S/h) however the S later samples were split into messages."""
    rng = np.random.default_rng(2)
    later = [Moments.of(rng.normal(size=(k, 3)), 0) for k in split]
    with_old, without_old = History(10.0), History(10.0)
    with_old.update(Moments.of(rng.normal(size=(16, 3)), 0))
    for m in later:
        with_old.update(m)
        without_old.update(m)
    old_weight = with_old.moments.count - without_old.moments.count
    np.testing.assert_allclose(old_weight, 16 * 2.0 ** (-8 / 10.0), rtol=1e-12)


def test_history_before_any_update_has_count_zero():
    h = History(100.0)
    assert h.moments.count == 0 and h.version == 0
    assert np.all(History(100.0, channels=4).moments.count == 0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_history_refuses_a_half_life_that_is_not_positive(bad):
    with pytest.raises(ValueError, match="half_life"):
        History(bad)


@given(
    st.integers(1, 5).flatmap(lambda c: st.tuples(batches(c), batches(c))), st.floats(0.0, 0.99), st.floats(0.0, 50.0)
)
def test_blend_equals_its_formula(pair, weight, history_scale):
    h_data, b_data = pair
    hist = Moments.of(h_data, 0)
    hist = Moments(hist.count * history_scale, hist.mean, hist.var)
    batch = Moments.of(b_data, 0)
    got = blend(hist, batch, weight)
    n_h, n_b = float(hist.count), float(batch.count)
    c = min(n_h, n_b * weight / (1 - weight))
    a = c / (c + n_b)
    mean = a * hist.mean + (1 - a) * batch.mean
    var = a * hist.var + (1 - a) * batch.var + a * (1 - a) * (batch.mean - hist.mean) ** 2
    scale = float(np.max(np.abs(np.concatenate([h_data, b_data])))) + 1.0
    close(got.mean, mean, scale, 1e-12)
    close(got.var, var, scale**2, 1e-12)
    assert a <= weight + 1e-12  # the history never makes up more than its weight
    np.testing.assert_allclose(got.count, c + n_b)


@given(st.floats(0.0, 1e6), st.floats(1.0, 1e4), st.floats(0.0, 0.99))
def test_blend_weight_of_a_layers_floats_equals_the_array_form(n_history, n_batch, weight):
    scalar = blend_weight(n_history, n_batch, weight)
    assert isinstance(scalar, float)
    assert scalar == float(blend_weight(np.array([n_history]), np.array([n_batch]), weight)[0])


def test_blend_equals_merge_of_capped_history_and_batch():
    rng = np.random.default_rng(3)
    hist, batch = Moments.of(rng.normal(size=(50, 4)), 0), Moments.of(rng.normal(1, 2, size=(6, 4)), 0)
    got = blend(hist, batch, 0.75)
    capped = Moments(min(hist.count, batch.count * 3.0), hist.mean, hist.var)
    want = merge(capped, batch)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
    np.testing.assert_allclose(got.var, want.var, rtol=1e-12)


def test_blend_with_weight_zero_is_the_batch_exactly():
    rng = np.random.default_rng(4)
    hist, batch = Moments.of(rng.normal(size=(9, 5)), 0), Moments.of(rng.normal(size=(3, 5)), 0)
    got = blend(hist, batch, 0.0)
    assert np.array_equal(got.mean, batch.mean) and np.array_equal(got.var, batch.var)


def test_blend_with_empty_history_is_the_batch_exactly():
    batch = Moments.of(np.random.default_rng(5).normal(size=(3, 5)), 0)
    got = blend(Moments(0.0, np.full(5, 100.0), np.full(5, 9.0)), batch, 0.9)
    assert np.array_equal(got.mean, batch.mean) and np.array_equal(got.var, batch.var)


@pytest.mark.parametrize("weight", [-0.1, 1.0, 1.5])
def test_blend_refuses_weight_outside_unit_interval(weight):
    m = Moments(1.0, np.zeros(1), np.ones(1))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        blend(m, m, weight)
    with pytest.raises(ValueError):
        blend_weight(1.0, 1.0, weight)


def test_unbiased_var_follows_torch_convention():
    x = np.random.default_rng(6).normal(size=(7, 3))
    m = Moments.of(x, 0)
    np.testing.assert_allclose(unbiased_var(m), x.var(axis=0, ddof=1), rtol=1e-12)
    single = Moments(1.0, np.zeros(2), np.full(2, 0.5))
    assert np.array_equal(unbiased_var(single), single.var)


def test_flat_multi_layer_history_updates_every_layer_in_one_call():
    """All layers' channels end to end, counts repeated per channel: one History, one update,
    each layer decaying by its own count."""
    from psq.layout import Layout

    layout = Layout(("a", "b"), (2, 3))
    rng = np.random.default_rng(7)
    per_layer = {"a": [rng.normal(size=(4, 2)) for _ in range(3)], "b": [rng.normal(size=(9, 3)) for _ in range(3)]}
    flat = History(20.0, channels=layout.total)
    separate = {name: History(20.0) for name in layout.names}
    for step in range(3):
        stats = {name: Moments.of(per_layer[name][step], 0) for name in layout.names}
        counts, means, var = layout.flatten(stats)
        flat.update(Moments(layout.expand(counts), means, var))
        for name, m in stats.items():
            separate[name].update(m)
    got = layout.split(flat.moments.count[layout.offsets[:-1]], flat.moments.mean, flat.moments.var)
    for name, h in separate.items():
        np.testing.assert_allclose(got[name].count, float(h.moments.count[0]), rtol=1e-12)
        np.testing.assert_allclose(got[name].mean, h.moments.mean, rtol=1e-12)
        np.testing.assert_allclose(got[name].var, h.moments.var, rtol=1e-12)


@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(1, 6), st.floats(1.0, 100.0))
def test_accumulate_into_updates_many_layers_like_one_history_each(widths, steps, half_life):
    """The aggregator's kernel: counts per layer, all channels mixed at once."""
    from psq.layout import Layout
    from psq.stats import LayerMoments, accumulate_into, decay

    layout = Layout(tuple(f"l{i}" for i in range(len(widths))), tuple(widths))
    rng = np.random.default_rng(len(widths) * 100 + steps)
    acc = LayerMoments(np.zeros(layout.layers), np.zeros(layout.total), np.zeros(layout.total))
    pooled = LayerMoments(np.zeros(layout.layers), np.zeros(layout.total), np.zeros(layout.total))
    separate = {name: History(half_life) for name in layout.names}
    data: dict[str, list[np.ndarray]] = {name: [] for name in layout.names}
    for _ in range(steps):
        raw = {n: rng.normal(size=(int(rng.integers(1, 9)), c)) for n, c in zip(layout.names, layout.channels)}
        stats = {n: Moments.of(raw[n], 0) for n, c in zip(layout.names, layout.channels)}
        batch = LayerMoments(*layout.flatten(stats, np.float32))
        accumulate_into(acc, batch, layout.widths, Scratch(layout.total), decay(batch.counts, half_life))
        accumulate_into(pooled, batch, layout.widths, Scratch(layout.total))  # no half-life: plain pooling
        for name, m in layout.split(*layout.flatten(stats, np.float32)).items():
            separate[name].update(Moments(m.count, m.mean.astype(np.float64), m.var.astype(np.float64)))
            data[name].append(raw[name])
    for name, h in separate.items():
        sl = layout.slice(name)
        np.testing.assert_allclose(acc.counts[layout.index(name)], h.moments.count[0], rtol=1e-12)
        np.testing.assert_allclose(acc.mean[sl], h.moments.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(acc.var[sl], h.moments.var, rtol=1e-9, atol=1e-12)
        whole = Moments.of(np.concatenate(data[name]), 0)  # the statistics travelled as float32
        assert pooled.counts[layout.index(name)] == whole.count
        np.testing.assert_allclose(pooled.mean[sl], whole.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pooled.var[sl], whole.var, rtol=1e-5, atol=1e-6)


@given(st.integers(1, 5).flatmap(lambda c: st.tuples(batches(c), batches(c))))
def test_remove_undoes_merge(pair):
    from psq.stats import remove

    a, b = (Moments.of(x, 0) for x in pair)
    rest = remove(merge(a, b), b)
    scale = float(max(np.max(np.abs(x)) for x in pair)) + 1.0
    assert np.all(rest.count == a.count)
    close(rest.mean, a.mean, scale, 1e-7)
    close(rest.var, a.var, scale**2, 1e-7)


def test_removing_everything_leaves_nothing():
    from psq.stats import remove

    a = Moments.of(np.arange(6.0).reshape(3, 2), 0)
    rest = remove(a, a)
    assert np.all(rest.count == 0)


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 8), st.floats(0.5, 4.0)), min_size=1, max_size=6),
    st.floats(1.0, 50.0),
)
def test_gradient_means_age_and_merge_like_a_brute_force_weighting(widths, arrivals, half_life):
    """The gradient history: each batch's mean weighs its count times 2^(−S/h), S the images that
    arrived after it (the same decay as the moments'), whoever sent them."""
    from psq.layout import Layout
    from psq.stats import LayerGradients, accumulate_means_into, decay

    layout = Layout(tuple(f"l{i}" for i in range(len(widths))), tuple(widths))
    rng = np.random.default_rng(sum(widths) * 10 + len(arrivals))
    acc = LayerGradients(np.zeros(layout.layers), np.zeros(layout.total), np.zeros(layout.total))
    sent = []
    for count, images in arrivals:  # count 0: a forward-only push, whose images still age the history
        counts = np.full(layout.layers, float(count))
        g = LayerGradients(counts, rng.normal(size=layout.total), rng.normal(size=layout.total))
        accumulate_means_into(
            acc, g, layout.widths, Scratch(layout.total), decay(np.full(layout.layers, images), half_life)
        )
        sent.append((count, images, g))
    later = np.cumsum([images for _, images, _ in sent][::-1])[::-1] - [images for _, images, _ in sent]
    weights = np.array([count * 2.0 ** (-s / half_life) for (count, _, _), s in zip(sent, later)])
    np.testing.assert_allclose(acc.counts, weights.sum(), rtol=1e-9)
    if weights.sum() > 0:
        for field in ("dy", "dy_xhat"):
            want = sum(w * getattr(g, field) for w, (_, _, g) in zip(weights, sent)) / weights.sum()
            np.testing.assert_allclose(getattr(acc, field), want, rtol=1e-9, atol=1e-12)
    else:
        assert not acc.dy.any() and not acc.dy_xhat.any()  # nothing arrived: nothing stored


def test_decay_halves_a_count_every_half_life():
    from psq.stats import decay

    np.testing.assert_allclose(decay(np.array([0.0, 64.0, 128.0]), 64.0), [1.0, 0.5, 0.25])


def test_the_warm_up_ramps_the_weight_linearly_then_holds_it():
    from psq.stats import warmed_up

    assert [warmed_up(0.8, s, 100.0) for s in (0.0, 25.0, 100.0, 1e6)] == [0.0, 0.2, 0.8, 0.8]
    assert warmed_up(0.8, 0.0, 0.0) == 0.8  # no warm-up
