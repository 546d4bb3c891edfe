"""psq bench emulate: its variants' parsing, its history against an independent computation, its
clock, and its sync method against the trainer's one-process reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from psq.config import SettingsError
from psq.stats import Moments
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
        ("psq:history_weight=0.5,gradient_history_weight=0.8", "gradient_history_weight", 0.8),
        ("psq:history_weight=0.5", "gradient_history_weight", 0.5),
        ("psq:gradient=exact", "gradient", "exact"),
        ("psq:local_layers=2;5", "local_layers", frozenset({2, 5})),
        ("psq:ghost_noise=0.5", "ghost_noise", 0.5),
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
        ("psq:ghost_noise=-1", "a non-negative number"),
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
    sizes = (1, 2, 1, 3)
    batches = [(float(n), rng.normal(k, 1 + k, (n * 16, channels))) for k, n in enumerate(sizes)]
    h = emulation.SharedHistory(channels, half_life)
    for images, x in batches:
        h.update(images, Moments(float(len(x)), x.mean(0), x.var(0)), None)
    # independent: every element weighs 2^(-images sent after its batch / half-life)
    after = np.cumsum(sizes[::-1])[::-1] - np.array(sizes)
    w = np.concatenate([np.full(len(x), 2.0 ** (-a / half_life)) for a, (_, x) in zip(after, batches)])
    data = np.concatenate([x for _, x in batches])
    mean = (w[:, None] * data).sum(0) / w.sum()
    var = (w[:, None] * (data - mean) ** 2).sum(0) / w.sum()
    np.testing.assert_allclose(h.moments.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(h.moments.var, var, rtol=1e-12)
    assert h.moments.counts[0] == pytest.approx(w.sum(), rel=1e-12)
    assert h.seen == 7.0


def test_gradient_means_age_with_every_pushs_images():
    h, nothing = emulation.SharedHistory(2, 1.0), Moments(10.0, np.zeros(2), np.ones(2))
    h.update(1.0, nothing, (10.0, np.array([1.0, 2.0]), np.zeros(2)))
    h.update(1.0, nothing, None)  # a forward without a backward: the gradients' count halves all the same
    h.update(0.0, nothing, (5.0, np.array([3.0, 4.0]), np.ones(2)))
    np.testing.assert_allclose(h.gradients.dy, [2.0, 3.0])  # (5*1 + 5*3)/10, (5*2 + 5*4)/10
    np.testing.assert_allclose(h.gradients.dy_xhat, [0.5, 0.5])
    assert h.gradients.counts[0] == pytest.approx(10.0)


class _Recording:
    def __init__(self) -> None:
        self.steps: list[float] = []

    def update(self, images: float, moments: Moments, gradients: object) -> None:
        self.steps.append(images)


@pytest.mark.parametrize("staleness", [1, 3])
def test_a_step_normalizes_with_the_steps_up_to_staleness_before_it(staleness):
    clock, history = emulation.Clock(staleness), _Recording()
    for step in range(6):
        clock.next_step()  # a step's first layer: what the history holds now is what it blends with
        assert history.steps == list(range(step - staleness + 1))
        clock.current.append((history, emulation.Push(float(step), Moments(1.0, 0.0, 0.0))))
    clock.flush()  # before evaluating: every push answered
    assert history.steps == list(range(6))


def test_a_clock_needs_a_staleness_of_a_step_at_least():
    with pytest.raises(ValueError, match="at least 1 step, got 0"):
        emulation.Clock(0)


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


@pytest.mark.parametrize("weight", [0.0, 0.9])
def test_with_a_history_only_history_weight_zero_is_per_worker_batch_norm(weight):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double()
    layer = emulation.EmulatedNorm(bn, 1, emulation.variant(f"psq:history_weight={weight}"), 2, emulation.Clock(1))
    layer.history.update(4096.0, Moments(1e6, np.full(3, 5.0), np.full(3, 9.0)), None)  # far from the batch's
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y = layer(x)
    expected = torch.cat([torch.nn.functional.batch_norm(c, None, None, bn.weight, bn.bias, True) for c in x.chunk(2)])
    if weight == 0:
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    else:  # the history is blended in: far from each chunk's own
        assert (y - expected).abs().max() > 0.5


def test_a_local_layer_is_per_worker_batch_norm_beside_a_history():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double()
    layer = emulation.EmulatedNorm(bn, 1, emulation.variant("psq:local_layers=1"), 2, emulation.Clock(1))
    layer.history.update(4096.0, Moments(1e6, np.full(3, 5.0), np.full(3, 9.0)), None)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    expected = torch.cat([torch.nn.functional.batch_norm(c, None, None, bn.weight, bn.bias, True) for c in x.chunk(2)])
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_ghost_noise_draws_about_its_share_of_the_workers_own_deviation():
    """With every batch 2 from the history's mean (and its variance), the draws on the mean have
    a variance of about ghost_noise x 4 / workers, and none on the variance."""
    torch.manual_seed(0)
    v = emulation.variant("psq:warmup_images=0,ghost_noise=0.5")
    layer = emulation.EmulatedNorm(torch.nn.BatchNorm2d(1000), 0, v, 2, emulation.Clock(1))
    layer.history.update(1.0, Moments(900.0, np.zeros(1000), np.ones(1000)), None)
    x = torch.randn(8, 1000, 4, 4)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), unbiased=False, keepdim=True) + 2.0
    blend = layer._blend(0, x, 128.0, None)
    assert blend.mean is not None and blend.var is not None
    assert blend.mean.var().item() == pytest.approx(0.5 * 4.0 / 2, rel=0.15)
    torch.testing.assert_close(blend.var, torch.ones(1000), rtol=1e-4, atol=1e-4)


def test_an_emulated_layer_blends_as_psbatchnorm_does():
    """The shares come from PSBatchNorm's own policy (psq.torch.history_blend)."""
    v = emulation.variant("psq:warmup_images=0")
    layer = emulation.EmulatedNorm(torch.nn.BatchNorm2d(3), 0, v, 1, emulation.Clock(1))
    layer.history.update(1.0, Moments(900.0, np.zeros(3), np.ones(3)), (900.0, np.ones(3), np.zeros(3)))
    blend = layer._blend(0, torch.zeros(1, 3, 10, 10), 100.0, None)
    assert blend.share == pytest.approx(0.9) and blend.gradient_share == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("psq:history_weight=0,gradient_history_weight=0.5", "a gradient history needs history_weight > 0"),
        ("psq:partner=1,previous_weight=0.5", "two partners"),
        ("psq:sync_layers=1-3,local_layers=3", r"layers \[3\] are in both sync_layers and local_layers"),
    ],
)
def test_variants_psq_or_the_emulation_cannot_run_are_refused(text, says):
    with pytest.raises(SettingsError, match=says):
        emulation.variant(text)


def test_sync_layers_beyond_the_model_are_refused():
    with pytest.raises(SettingsError, match=r"layers \[3, 4\] are beyond the model's 3 batch-norm layers"):
        emulation.one_run("a", emulation.variant("psq:sync_layers=2-4"), 0, 1, max_steps_per_epoch=1)


def test_a_run_reports_accuracy_and_both_losses_per_epoch():
    out = emulation.one_run("a", emulation.variant("psq"), 0, 2, max_steps_per_epoch=5)
    assert {k: len(out[k]) for k in ("accuracy", "test_loss", "train_loss")} == {
        "accuracy": 2,
        "test_loss": 2,
        "train_loss": 2,
    }
    assert all(np.isfinite(out["test_loss"])) and all(0 <= a <= 1 for a in out["accuracy"])
