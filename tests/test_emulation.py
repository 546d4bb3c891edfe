"""psq bench emulate: its variants' parsing, its history against an independent computation, its
clock, and its sync method against the trainer's one-process reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from psq.config import SettingsError
from workers import emulation, train
from workers.settings import TrainSettings


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("sync", "sync", True),
        ("psq", "history_weight", 0.9),
        ("psq:staleness_steps=1", "staleness_steps", 1),
        ("psq:sync_layers=10-14", "sync_layers", frozenset(range(10, 15))),
        ("psq:sync_layers=0;3-4", "sync_layers", frozenset({0, 3, 4})),
        ("psq:partner=1", "partner", True),
        ("psq:history_weight=0.5,gradient_history_weight=0.8", "gradient_weight", 0.8),
        ("psq:history_weight=0.5", "gradient_weight", 0.5),
        ("psq:gradient=exact", "gradient", "exact"),
    ],
)
def test_variants_parse(text, field, value):
    assert getattr(emulation.variant(text), field) == value


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("local", "expected sync, psq or psq:key=value"),
        ("psq:foo=1", "key=value pairs of"),
        ("psq:history_weight=1", "a number in [0, 1)"),
        ("psq:sync_layers=5-2", "a layer range low-high"),
        ("psq:sync_layers=x", "a non-negative integer"),
        ("psq:partner=yes", "expected 0 or 1"),
        ("psq:gradient=fast", "one of cluster, renorm, exact"),
        ("psq:staleness_steps=0", "a positive integer"),
    ],
)
def test_bad_variants_say_what_was_expected(text, says):
    with pytest.raises(SettingsError, match=says.replace("[", r"\[").replace(")", r"\)")):
        emulation.variant(text)


def test_partner_needs_two_workers():
    with pytest.raises(SettingsError, match="needs 2 workers, \\(d\\) has 4"):
        emulation.one_run("d", emulation.variant("psq:partner=1"), 0, 1, max_steps_per_epoch=1)


def test_the_shared_history_is_the_images_decayed_pooled_moments_of_every_batch():
    rng = np.random.default_rng(0)
    half_life, channels = 3.0, 4
    batches = [
        (float(images), rng.normal(k, 1 + k, (int(images) * 16, channels))) for k, images in enumerate((1, 2, 1, 3))
    ]
    h = emulation.SharedHistory(channels, half_life)
    for images, x in batches:
        h.add_moments(images, float(len(x)), x.mean(0), x.var(0))
    # independent: every element weighs 2^(-images sent after its batch / half-life)
    after = np.cumsum([i for i, _ in batches][::-1])[::-1] - [i for i, _ in batches]
    w = np.concatenate([np.full(len(x), 2.0 ** (-a / half_life)) for a, (_, x) in zip(after, batches)])
    data = np.concatenate([x for _, x in batches])
    mean = (w[:, None] * data).sum(0) / w.sum()
    var = (w[:, None] * (data - mean) ** 2).sum(0) / w.sum()
    np.testing.assert_allclose(h.moments.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(h.moments.var, var, rtol=1e-12)
    assert h.moments.counts[0] == pytest.approx(w.sum(), rel=1e-12)
    assert h.seen == 7.0


def test_gradient_means_age_with_the_moments_images():
    h = emulation.SharedHistory(2, 1.0)
    h.add_gradients(10.0, np.array([1.0, 2.0]), np.array([0.0, 0.0]))
    h.add_moments(1.0, 10.0, np.zeros(2), np.ones(2))  # one image: the gradients' count halves
    h.add_gradients(5.0, np.array([3.0, 4.0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(h.gradients.dy, [2.0, 3.0])  # (5*1 + 5*3)/10, (5*2 + 5*4)/10
    np.testing.assert_allclose(h.gradients.dy_xhat, [0.5, 0.5])


@pytest.mark.parametrize("staleness", [1, 3])
def test_a_step_normalizes_with_the_steps_up_to_staleness_before_it(staleness):
    clock, applied = emulation.Clock(staleness), []
    for step in range(6):
        clock.next_step()  # a step's first layer: what the history holds now is what it blends with
        assert applied == list(range(step - staleness + 1))
        clock.current.append(lambda step=step: applied.append(step))


def test_sync_trains_exactly_as_the_trainers_one_process_reference(tmp_path: Path):
    emulated = emulation.one_run("a", emulation.variant("sync"), 1, 1, max_steps_per_epoch=40)
    settings = TrainSettings(
        norm="local", workers=2, batch=1, seed=1, epochs=1, max_steps_per_epoch=40, run_dir=tmp_path
    )
    reference = train.train_single(settings, world=2)
    assert emulated["accuracy"][0] == reference.accuracy_per_epoch[0]
    weights = torch.load(reference.weights)
    assert emulated["parameters"].keys() <= weights.keys()
    for name, p in emulated["parameters"].items():
        assert torch.equal(p, weights[name]), name


def test_psq_at_history_weight_zero_is_per_worker_batch_norm():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double()
    v = emulation.variant("psq:history_weight=0")
    layer = emulation.EmulatedNorm(bn, 1, v, 2, emulation.Clock(0))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    expected = torch.cat([torch.nn.functional.batch_norm(c, None, None, bn.weight, bn.bias, True) for c in x.chunk(2)])
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_a_run_reports_accuracy_and_both_losses_per_epoch():
    out = emulation.one_run("a", emulation.variant("psq"), 0, 2, max_steps_per_epoch=5)
    assert {k: len(out[k]) for k in ("accuracy", "test_loss", "train_loss")} == {
        "accuracy": 2,
        "test_loss": 2,
        "train_loss": 2,
    }
    assert all(np.isfinite(out["test_loss"])) and all(0 <= a <= 1 for a in out["accuracy"])
