"""psq.layout: flat arrays of a step's statistics and the content-derived layout id."""

from __future__ import annotations

import numpy as np
import pytest

from psq.layout import Layout, LayoutError
from psq.stats import Moments


def test_id_depends_on_content_only():
    a = Layout(("x", "y"), (3, 4))
    assert a.id == Layout(["x", "y"], [3, 4]).id
    assert a.id != Layout(("y", "x"), (4, 3)).id
    assert a.id != Layout(("x", "y"), (3, 5)).id
    assert len(a.id) == 8


def test_flatten_then_split_round_trips_and_split_makes_views():
    layout = Layout(("a", "b", "c"), (2, 1, 3))
    rng = np.random.default_rng(0)
    stats = {
        n: Moments(float(i + 1), rng.normal(size=c), rng.random(c))
        for i, (n, c) in enumerate(zip(layout.names, layout.channels))
    }
    counts, means, var = layout.flatten(stats)
    assert counts.tolist() == [1.0, 2.0, 3.0] and means.size == layout.total == 6
    back = layout.split(counts, means, var)
    for name, m in stats.items():
        assert back[name].count == m.count
        assert np.array_equal(back[name].mean, m.mean) and np.array_equal(back[name].var, m.var)
    assert np.shares_memory(back["c"].mean, means)


def test_expand_repeats_each_layer_count_over_its_channels():
    layout = Layout(("a", "b"), (2, 3))
    assert layout.expand(np.array([5.0, 7.0])).tolist() == [5, 5, 7, 7, 7]
    assert layout.slice("b") == slice(2, 5)


def test_subset_keeps_order():
    layout = Layout(("a", "b", "c"), (1, 2, 3))
    assert layout.subset(["c", "a"]) == Layout(("a", "c"), (1, 3))


def test_flatten_refuses_statistics_of_other_layers():
    layout = Layout(("a",), (2,))
    with pytest.raises(LayoutError, match="lack layer 'a'"):
        layout.flatten({"b": Moments(1.0, np.zeros(2), np.zeros(2))})
    with pytest.raises(LayoutError, match="channels"):
        layout.flatten({"a": Moments(1.0, np.zeros(3), np.zeros(3))})


@pytest.mark.parametrize(
    ("names", "channels", "message"),
    [
        ((), (), "at least one"),
        (("a", "a"), (1, 1), "unique"),
        (("a",), (0,), "positive"),
        (("a",), (1.5,), "positive"),
        (("a",), (True,), "positive"),
        (("",), (1,), "string"),
        ((3,), (1,), "string"),
        (("a", "b"), (1,), "2 layer names"),
        (("a",), (1 << 25,), "at most"),
    ],
)
def test_invalid_layouts_are_refused(names, channels, message):
    with pytest.raises(LayoutError, match=message):
        Layout(names, channels)


def test_numpy_integer_channels_are_accepted():
    assert Layout(("a",), (np.int64(4),)).channels == (4,)
