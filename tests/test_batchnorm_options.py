"""Every option of nn.BatchNorm1d/2d/3d through PSBatchNorm, convert and revert; edge batches;
several models on one loop."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from equivalence import assert_same_step
from torch import nn

from psq.loop import WorkerLoop
from psq.stats import unbiased_var
from psq.torch import PSBatchNorm, convert_batchnorm, revert_batchnorm

torch.set_num_threads(1)

SHAPES = {nn.BatchNorm1d: (6, 3, 4), nn.BatchNorm2d: (5, 3, 4, 3), nn.BatchNorm3d: (4, 3, 2, 3, 2)}
# bias only means something with affine=True
AFFINE = [(True, True), (True, False), (False, True)]
CASES = [
    pytest.param(
        cls, affine, bias, tracked, momentum, id=f"{cls.__name__[-2:]}-a{affine:d}b{bias:d}t{tracked:d}-m{momentum}"
    )
    for cls, (affine, bias), tracked, momentum in itertools.product(SHAPES, AFFINE, (True, False), (0.1, None))
]


def reference(cls, affine, bias, tracked, momentum) -> nn.Module:
    """A float64 torch batch norm with non-trivial parameters and buffers."""
    torch.manual_seed(0)
    bn = cls(3, eps=1e-3, momentum=momentum, affine=affine, track_running_stats=tracked, bias=bias)
    bn = bn.double()
    with torch.no_grad():
        for p in bn.parameters():
            p.uniform_(0.5, 1.5)
        if tracked:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(3)
    return bn


def batches(cls, n: int = 3):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*SHAPES[cls], dtype=torch.float64, generator=gen) * 2 + 1 for _ in range(n)]


def assert_same_steps(ours: nn.Module, theirs: nn.Module, xs: list[torch.Tensor], buffers: bool = True) -> None:
    """Training steps: outputs and every gradient equal; with ``buffers`` every buffer too, and
    evaluation (with a loop the buffers hold the cluster's history instead)."""
    for x in xs:
        assert_same_step(ours, theirs, x)
        for (name, u), (_, v) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
            assert not buffers or torch.allclose(u, v, rtol=0, atol=1e-10), name
    if not buffers:
        return
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(xs[0]), theirs(xs[0]), rtol=0, atol=1e-10)
    ours.train(), theirs.train()


@pytest.mark.parametrize(("cls", "affine", "bias", "tracked", "momentum"), CASES)
def test_every_option_converts_trains_evaluates_and_reverts_like_torch(cls, affine, bias, tracked, momentum):
    bn = reference(cls, affine, bias, tracked, momentum)
    converted = convert_batchnorm(copy.deepcopy(bn), None)
    assert isinstance(converted, PSBatchNorm) and converted.extra_repr().startswith(bn.extra_repr())
    assert converted.state_dict().keys() == bn.state_dict().keys()
    assert_same_steps(converted, bn, batches(cls))
    # state dicts both ways, then back to the torch class with every option
    fresh = reference(cls, affine, bias, tracked, momentum)
    fresh.load_state_dict(converted.state_dict())
    converted.load_state_dict(bn.state_dict())
    reverted = revert_batchnorm(converted)
    assert type(reverted) is cls and reverted.extra_repr() == bn.extra_repr()
    for key, value in bn.state_dict().items():
        assert torch.equal(reverted.state_dict()[key], value) and torch.equal(fresh.state_dict()[key], value), key
    # and constructed by hand, as nn.BatchNorm*d is
    by_hand = PSBatchNorm(3, 1e-3, momentum, affine, tracked, None, torch.float64, bias=bias)
    assert by_hand.extra_repr().startswith(bn.extra_repr())


def test_every_option_trains_with_a_loop(cluster):
    """Through psq's own kernels: with history weight 0 exactly torch's layer; with the default,
    the buffers hold the cluster's history and the parameters torch has get gradients."""
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="options", worker="w0", dtype="<f8") as loop:
        for i, param in enumerate(CASES):
            cls, affine, bias, tracked, momentum = param.values
            bn = reference(cls, affine, bias, tracked, momentum)
            plain = convert_batchnorm(copy.deepcopy(bn), loop, prefix=f"w0-{i}.", history_weight=0.0)
            assert_same_steps(plain, bn, batches(cls), buffers=False)
            blended = convert_batchnorm(copy.deepcopy(bn), loop, prefix=f"w9-{i}.", warmup_images=0)
            for x in batches(cls, 4):
                blended(x.requires_grad_()).sum().backward()
                assert loop.flush(10)
            assert loop.history(blended.name) is not None
            assert [n for n, p in blended.named_parameters() if p.grad is not None] == [
                n for n, _ in bn.named_parameters()
            ]
            blended.eval()
            if tracked:
                h = loop.history(blended.name).moments
                torch.testing.assert_close(blended.running_mean, torch.from_numpy(h.mean))
                torch.testing.assert_close(blended.running_var, torch.from_numpy(unbiased_var(h)))
            else:
                assert blended.running_mean is None and blended.state_dict().keys() == bn.state_dict().keys()


def test_an_empty_batch_returns_the_empty_output_and_sends_nothing(cluster):
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="empty", worker="w0", auto_step=False) as loop:
        layer = PSBatchNorm(3, name="bn", loop=loop)
        layer(torch.randn(4, 3, 5))
        loop.step()
        assert loop.flush(10)
        before = loop.history("bn")
        for shape in ((0, 3, 5), (4, 3, 0)):
            x = torch.randn(*shape, requires_grad=True)
            y = layer(x)
            assert y.shape == x.shape
            y.sum().backward()
            assert x.grad.shape == x.shape and torch.equal(layer.weight.grad, torch.zeros(3))
            assert loop.step() is not None and loop.flush(10)
        assert loop.history("bn") is before and loop.summary()["pushes"] == 1


def test_an_empty_batch_in_sync_mode_is_refused_rather_than_shifting_the_steps(cluster):
    c = cluster(1, "--mode", "sync", "--sync-workers", "1")
    with WorkerLoop(c.endpoints.frontend, job="empty-sync", worker="w0", mode="sync") as loop:
        layer = PSBatchNorm(3, name="bn", loop=loop)
        with pytest.raises(ValueError, match="an empty batch in sync mode: every worker must send each step"):
            layer(torch.randn(0, 3, 5))
        assert layer(torch.randn(4, 3, 5)).shape == (4, 3, 5)


def test_one_value_per_channel_normalizes_with_the_history_and_raises_without_one(cluster):
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="single", worker="w0", dtype="<f8") as loop:
        layer = PSBatchNorm(3, name="fc", loop=loop).double()
        one = torch.randn(1, 3, dtype=torch.float64)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            nn.BatchNorm1d(3).double()(one)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            layer(one)  # no history yet: as nn.BatchNorm1d
        layer(torch.randn(8, 3, dtype=torch.float64))
        assert loop.flush(10)
        h = loop.history("fc").moments
        y = layer(one)
        want = (one - torch.from_numpy(h.mean)) / torch.sqrt(torch.from_numpy(h.var) + layer.eps)
        torch.testing.assert_close(y, want * layer.weight + layer.bias)
        plain = PSBatchNorm(3, name="plain", loop=loop, history_weight=0.0).double()
        plain(torch.randn(8, 3, dtype=torch.float64))
        assert loop.flush(10) and loop.history("plain") is not None
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            plain(one)  # history weight 0 is nn.BatchNorm1d, history or not


def discriminator() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8))


def generator() -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.ConvTranspose2d(8, 3, 3))


def test_two_models_on_one_loop_need_their_own_prefix(cluster):
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="gan", worker="w0") as loop:
        d = convert_batchnorm(discriminator(), loop)
        g = generator()
        with pytest.raises(ValueError, match=r"'1' already used on this WorkerLoop.*prefix"):
            convert_batchnorm(g, loop)
        assert isinstance(g[1], nn.BatchNorm2d)  # nothing was replaced
        with pytest.raises(ValueError, match="'4' is already used on this WorkerLoop"):
            PSBatchNorm(8, name="4", loop=loop)
        g = convert_batchnorm(g, loop, prefix="generator.")
        assert g[1].name == "generator.1"
        for _ in range(4):  # a GAN step: the discriminator sees a real batch and a fake one
            fake = g(torch.randn(2, 4, 4, 4))
            (d(torch.randn(2, 3, 6, 6)).mean() + d(fake).mean()).backward()
        assert loop.flush(10) and loop.summary()["rejected"] == 0
        assert {name: loop.history(name).moments.mean.size for name in ("1", "4", "generator.1")} == {
            "1": 6,
            "4": 8,
            "generator.1": 8,
        }
        # a reverted model frees its names
        revert_batchnorm(d)
        assert convert_batchnorm(discriminator(), loop)[1].name == "1"


def test_a_layer_never_applies_a_history_of_another_shape(cluster):
    """Another worker of the job holds the name with 6 channels: this layer's pushes are refused
    and it trains on its batch statistics (exactly batch norm), without an error."""
    c = cluster(1)
    with (
        WorkerLoop(c.endpoints.frontend, job="shapes", worker="a") as a,
        WorkerLoop(c.endpoints.frontend, job="shapes", worker="b") as b,
    ):
        PSBatchNorm(6, name="bn", loop=a)(torch.randn(4, 6, 3))
        assert a.flush(10)
        layer, plain = PSBatchNorm(4, name="bn", loop=b), nn.BatchNorm1d(4)
        for _ in range(3):
            x = torch.randn(4, 4, 3)
            torch.testing.assert_close(layer(x), plain(x))
            assert b.flush(10)
        assert b.summary()["rejected"] >= 1 and b.history("bn") is None


def test_a_history_of_another_shape_left_on_the_loop_is_never_applied(cluster):
    """A reverted model frees its names, but the loop keeps their last history: a new layer of
    another shape under an old name trains and evaluates on its own statistics."""
    c = cluster(1, "--half-life", "1e12")
    with WorkerLoop(c.endpoints.frontend, job="reuse", worker="w0", dtype="<f8") as loop:
        old = convert_batchnorm(nn.Sequential(nn.BatchNorm1d(6)), loop)
        old(torch.randn(8, 6, dtype=torch.float32))
        assert loop.flush(10) and loop.history("0").moments.mean.size == 6
        revert_batchnorm(old)
        new, plain = convert_batchnorm(nn.Sequential(nn.BatchNorm1d(4)), loop), nn.BatchNorm1d(4)
        for _ in range(3):
            x = torch.randn(8, 4)
            torch.testing.assert_close(new(x), plain(x))
            loop.flush(10)
        assert loop.history("0").moments.mean.size == 6  # the aggregator refused the new layout
        new.eval(), plain.eval()
        torch.testing.assert_close(new[0].running_mean, plain.running_mean)  # not the old history


def test_convert_refuses_options_the_converted_layers_take_from_the_model():
    with pytest.raises(TypeError, match=r"takes psq's options .* not eps, momentum"):
        convert_batchnorm(nn.BatchNorm2d(3), None, momentum=0.2, eps=1e-3)
    with pytest.raises(ValueError, match=r"history_weight must be in \[0, 1\)"):
        convert_batchnorm(nn.BatchNorm2d(3), None, history_weight=1.5)


def test_an_uninitialized_lazy_batch_norm_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="lazy batch norm has no channels yet; run one forward pass"):
        convert_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()), None)
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    lazy(torch.randn(2, 5, 3, 3))
    assert convert_batchnorm(lazy, None)[0].num_features == 5


def test_num_batches_tracked_counts_every_training_forward_as_torchs_does():
    """psq counts training forwards in Python and adds them to the buffer when it is read: the
    attribute, a state dict, a copy, a loaded state dict and momentum=None all see torch's count.
    (A loop that never started: no history, so the running buffers are torch's averages.)"""
    loop = WorkerLoop("tcp://127.0.0.1:9", job="count", worker="w0")
    bn = nn.BatchNorm2d(3, momentum=None)
    ps = convert_batchnorm(copy.deepcopy(bn), loop)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(4, 3, 5, 5, generator=gen)
        bn(x), ps(x)
    assert int(ps.num_batches_tracked) == int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(ps.running_mean, bn.running_mean)  # the cumulative average: the count read right
    torch.testing.assert_close(ps.running_var, bn.running_var)
    for _ in range(2):
        ps(torch.randn(4, 3, 5, 5, generator=gen))
    assert int(copy.deepcopy(ps).state_dict()["num_batches_tracked"]) == 6
    state = {**ps.state_dict(), "num_batches_tracked": torch.tensor(100)}
    ps(torch.randn(4, 3, 5, 5, generator=gen))  # counted, then replaced by the loaded count
    ps.load_state_dict(state)
    ps(torch.randn(4, 3, 5, 5, generator=gen))
    assert int(ps.state_dict()["num_batches_tracked"]) == 101
