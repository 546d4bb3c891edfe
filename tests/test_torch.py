"""psq.torch: PSBatchNorm against nn.BatchNorm, SyncBatchNorm's semantics, DDP, conversions."""

from __future__ import annotations

import copy
import signal
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp
from dist_workers import ddp_train, small_cnn, sync_forward
from equivalence import assert_same_step
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from broker import snapshot
from psq import native
from psq.loop import WorkerLoop
from psq.stats import Moments, blend, unbiased_var
from psq.torch import PSBatchNorm, convert_batchnorm, revert_batchnorm

torch.set_num_threads(1)


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_history_weight_zero_is_exactly_batchnorm_and_buffers_hold_the_cluster_history(cluster, tmp_path):
    snap = tmp_path / "shard.snap"
    c = cluster(1, "--half-life", "500", "--snapshot", str(snap), "--snapshot-interval-s", "3600")
    torch.manual_seed(0)
    reference = small_cnn().double()
    with WorkerLoop(c.endpoints.frontend, job="eq", worker="w0", dtype="<f8") as loop:
        model = convert_batchnorm(copy.deepcopy(reference), loop, history_weight=0.0)
        opt_m = torch.optim.SGD(model.parameters(), lr=0.1)
        opt_r = torch.optim.SGD(reference.parameters(), lr=0.1)
        for step in range(6):
            x = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            assert_same_step(model, reference, x)
            opt_m.step(), opt_r.step(), opt_m.zero_grad(), opt_r.zero_grad()
        assert loop.flush(10)
        # the cluster's gradient history was there all along, and did not leak into the backward
        assert all(loop.history(name).gradient is not None for name in bn_layers(model))
        model.eval()
    c.aggregators[0].terminate()
    store = snapshot.load(snap, 0, 1, 500.0)
    for name, layer in bn_layers(model).items():
        job = store.jobs["eq"]
        i = job.index[name]
        sl = slice(job.starts[i], job.starts[i] + job.channels[i])
        history = Moments(job.counts[i], job.mean[sl], job.var[sl])
        np.testing.assert_allclose(layer.running_mean.numpy(), history.mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(layer.running_var.numpy(), unbiased_var(history), rtol=1e-12, atol=1e-14)


class RecordingLoop(WorkerLoop):
    """A real WorkerLoop that also keeps a copy of what its layers hand it, step by step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[dict[str, dict]] = [{}]

    def submit(self, name, stats) -> None:
        self.steps[-1].setdefault(name, {}).update(images=stats.images, submission=stats)
        super().submit(name, stats)

    def flush(self, timeout_s: float = 10.0) -> bool:
        for sent in self.steps[-1].values():  # what the backward wrote into the step's record
            g = sent["submission"].gradient.written()
            sent["gradient"] = (g.count, g.dy.copy(), g.dy_xhat.copy())
        done = super().flush(timeout_s)
        self.steps.append({})
        return done


@pytest.mark.parametrize("kernels", ["psq", "torch"])
def test_gradient_statistics_reach_the_aggregator_and_its_history_is_what_the_workers_sent(cluster, tmp_path, kernels):
    """Two workers train through a real broker and aggregator, one push at a time in a known
    order; the aggregator's gradient history (its snapshot) equals a brute-force weighting of
    what the layers handed over: each batch's means weigh its count, halved every 20 images the
    job sent after it.  On psq's kernels the backward writes the step's record itself; on
    torch's (a GPU's path) the layer copies into it."""
    was = native.set_enabled(kernels == "psq")
    try:
        _gradients_reach_the_aggregator(cluster, tmp_path)
    finally:
        native.set_enabled(was)


def _gradients_reach_the_aggregator(cluster, tmp_path):
    snap = tmp_path / "shard.snap"
    c = cluster(1, "--half-life", "20", "--snapshot", str(snap), "--snapshot-interval-s", "3600")
    torch.manual_seed(0)
    loops = [RecordingLoop(c.endpoints.frontend, job="grads", worker=f"w{i}", dtype="<f8").start() for i in range(2)]
    models = [convert_batchnorm(small_cnn().double(), loop) for loop in loops]
    gen = torch.Generator().manual_seed(5)
    order = []
    try:
        for _ in range(4):
            for model, loop in zip(models, loops):
                x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=gen)
                model(x).pow(2).mean().backward()
                assert loop.flush(10)
                order.append(loop.steps[-2])
    finally:
        for loop in loops:
            loop.stop()
    assert all(loop.history("1").gradient is not None for loop in loops)
    assert c.aggregators[0].terminate()[0] == 0
    job = snapshot.load(snap, 0, 1, 20.0).jobs["grads"]
    for name in ("1", "4", "8"):
        sent = [step[name] for step in order]
        images = np.array([s["images"] for s in sent])
        assert set(images) == {3.0}  # a layer counts the batch's images, whatever its H x W
        later = images[::-1].cumsum()[::-1] - images
        weights = np.array([s["gradient"][0] for s in sent]) * 2.0 ** (-later / 20.0)
        i = job.index[name]
        sl = slice(job.starts[i], job.starts[i] + job.channels[i])
        np.testing.assert_allclose(job.grad_counts[i], weights.sum(), rtol=1e-12)
        for k, field in ((1, job.grad_dy), (2, job.grad_dy_xhat)):
            want = sum(w * s["gradient"][k] for w, s in zip(weights, sent)) / weights.sum()
            np.testing.assert_allclose(field[sl], want, rtol=1e-9, atol=1e-15)


def trained_layer(frontend: str, weight: float = 0.6, gradient: str = "exact") -> tuple[PSBatchNorm, WorkerLoop]:
    """A float64 layer whose loop has received history, then stopped: its history is fixed."""
    loop = WorkerLoop(frontend, job="grad", worker="w0", dtype="<f8").start()
    layer = PSBatchNorm(3, history_weight=weight, gradient=gradient, name="bn", loop=loop, warmup_images=0).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        layer(torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=gen) * 2 + 1)
    assert loop.flush(10)
    loop.stop()
    return layer, loop


def test_the_blended_forward_is_the_blend_of_history_and_batch(cluster):
    c = cluster(1)
    layer, loop = trained_layer(c.endpoints.frontend)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    h = loop.history("bn").moments
    batch = Moments.of(x.numpy(), (0, 2, 3))
    want = blend(h, batch, 0.6)
    assert float(want.count) < float(h.count) + batch.count  # the cap is in effect
    y = layer(x).detach().numpy()
    shape = (1, 3, 1, 1)
    expected = (x.numpy() - want.mean.reshape(shape)) / np.sqrt(want.var.reshape(shape) + layer.eps)
    expected = expected * layer.weight.detach().numpy().reshape(shape) + layer.bias.detach().numpy().reshape(shape)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


def test_the_history_weight_ramps_up_over_the_jobs_first_images(cluster):
    """After 24 of 96 warm-up images the history may weigh a quarter of its weight."""
    c = cluster(1)
    layer, loop = trained_layer(c.endpoints.frontend)  # 4 batches of 6 images: 24 seen
    assert loop.history("bn").seen == 24.0
    layer.warmup_images = 96.0
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = blend(loop.history("bn").moments, Moments.of(x.numpy(), (0, 2, 3)), 0.6 * 24 / 96)
    shape = (1, 3, 1, 1)
    expected = (x.numpy() - want.mean.reshape(shape)) / np.sqrt(want.var.reshape(shape) + layer.eps)
    expected = expected * layer.weight.detach().numpy().reshape(shape) + layer.bias.detach().numpy().reshape(shape)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_of_the_blended_layer(cluster):
    c = cluster(1)
    layer, _ = trained_layer(c.endpoints.frontend)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-6, atol=1e-6)
    # the same parameter tensors the layer uses: gradcheck perturbs them in place
    assert torch.autograd.gradcheck(lambda w, b: layer(x), (layer.weight, layer.bias), eps=1e-6, atol=1e-6)


def cluster_reference(x, weight, bias, blend, eps, g):
    """The cluster gradient by plain autograd on a surrogate, written independently of psq.torch:
    the statistics pass gradients only with weight 1 − gradient share (straight through), and a
    term linear in x carries the history's gradient means.  Its value is the layer's output."""
    dims, shape = (0, 2, 3), (1, -1, 1, 1)
    share, gshare = blend.share, blend.gradient_share
    m_b, v_b = x.mean(dims), x.var(dims, unbiased=False)
    mu = (1 - share) * m_b + share * blend.mean
    var = (1 - share) * v_b + share * blend.var + share * (1 - share) * (m_b - blend.mean) ** 2
    mu_c, var_c = mu.detach(), var.detach()
    mu_s = mu_c + (1 - gshare) * (m_b - m_b.detach())
    centred = ((x - mu_c.view(shape)) ** 2).mean(dims)
    var_s = var_c + (1 - gshare) * (centred - centred.detach())
    y = weight.view(shape) * (x - mu_s.view(shape)) / (var_s.view(shape) + eps).sqrt() + bias.view(shape)
    r = (var_c + eps).rsqrt()
    k = (weight * r).detach()
    history = -(gshare * k * blend.dy).view(shape) * x
    history = history - 0.5 * (gshare * k * r * blend.dy_xhat).view(shape) * (x - mu_c.view(shape)) ** 2
    return y, torch.autograd.grad((g * y).sum() + history.sum(), (x, weight, bias))


def blend_of(share: float, gradient_share: float, channels: int = 3, seed: int = 0, zero_gradients: bool = False):
    from psq.kernels import Blend

    gen = torch.Generator().manual_seed(seed)

    def t(scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return torch.rand(channels, dtype=torch.float64, generator=gen) * scale + offset

    dy, dy_xhat = (torch.zeros(channels, dtype=torch.float64),) * 2 if zero_gradients else (t(0.2, -0.1), t(0.2, -0.1))
    return Blend(share, t(2, -1), t(1, 0.5), gradient_share, dy, dy_xhat)


@pytest.mark.parametrize(("share", "gradient_share"), [(0.0, 0.0), (0.6, 0.0), (0.0, 0.7), (0.6, 0.9), (0.3, 0.3)])
def test_the_cluster_gradient_equals_an_independent_autograd_surrogate(share, gradient_share):
    from psq.kernels import BlendedNorm

    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=gen) * 2 + 1).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_()
    g = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=gen)
    blend = blend_of(share, gradient_share)
    sent = []
    y, _, _ = BlendedNorm.apply(x, w, b, blend, 1e-5, "cluster", lambda n, dy, dyx: sent.append((n, dy, dyx)))
    got = torch.autograd.grad(y, (x, w, b), g)
    want_y, want = cluster_reference(x, w, b, blend, 1e-5, g)
    torch.testing.assert_close(y, want_y, rtol=0, atol=1e-10)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
    # what the backward hands on: this batch's means of ∂L/∂y and ∂L/∂y·x̂, γ-free
    ((n, dy, dy_xhat),) = sent
    xhat = (y.detach() - b.detach().view(1, -1, 1, 1)) / w.detach().view(1, -1, 1, 1)
    assert n == 3 * 4 * 4
    torch.testing.assert_close(dy, g.mean((0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(dy_xhat, (g * xhat).mean((0, 2, 3)), rtol=0, atol=1e-12)


def test_gradcheck_of_the_cluster_gradient_where_it_is_a_derivative():
    """With no gradient history (means 0) and the gradient share equal to the forward's, the
    cluster gradient is the exact derivative of the blended forward.  Otherwise it is not any
    function's derivative: the history's gradient means add a term independent of ∂L/∂y, as the
    other workers' terms do in synchronized batch norm (checked against the surrogate above)."""
    from psq.kernels import BlendedNorm

    blend = blend_of(0.4, 0.4, zero_gradients=True)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return BlendedNorm.apply(x, w, b, blend, 1e-5, "cluster", None)[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)
    lopsided = blend_of(0.4, 0.8, zero_gradients=True)  # a different gradient share: not the derivative
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(
            lambda x: BlendedNorm.apply(x, w, b, lopsided, 1e-5, "cluster", None)[0], (x,), eps=1e-6, atol=1e-6
        )


def test_the_renorm_gradient_is_batchnorms_scaled_by_the_blends_correction(cluster):
    """Batch Renormalization: y = γ·(x̂_B·σB/σ + (mB − μ)/σ) + β with σB/σ and (mB − μ)/σ held
    constant, so dL/dx is nn.BatchNorm's gradient for the weight γ·σB/σ."""
    c = cluster(1)
    layer, loop = trained_layer(c.endpoints.frontend, gradient="renorm")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad(layer(x), x, g)
    h, batch = loop.history("bn").moments, Moments.of(x.detach().numpy(), (0, 2, 3))
    used = blend(h, batch, 0.6)
    correction = torch.tensor(np.sqrt((batch.var + layer.eps) / (used.var + layer.eps)))
    x2 = x.detach().clone().requires_grad_()
    plain = nn.functional.batch_norm(x2, None, None, layer.weight.detach() * correction, None, True, 0.0, layer.eps)
    (want,) = torch.autograd.grad(plain, x2, g)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [2, 3, 4, 5])
def test_inputs_of_2_to_5_dimensions_in_float32_and_float64(cluster, dtype, dims):
    c = cluster(1)
    shape = [4, 3, 5, 4, 3][:dims]
    with WorkerLoop(c.endpoints.frontend, job=f"dims{dims}", worker="w0") as loop:
        layer = PSBatchNorm(3, history_weight=0.0, name="bn", loop=loop).to(dtype)
        plain = (
            nn.BatchNorm1d(3).to(dtype) if dims <= 3 else (nn.BatchNorm2d if dims == 4 else nn.BatchNorm3d)(3).to(dtype)
        )
        x = torch.randn(*shape, dtype=dtype)
        torch.testing.assert_close(layer(x), plain(x))
        assert loop.flush(10) and loop.history("bn").moments.count == x.numel() // 3


def test_channels_last_uneven_batches_and_autocast(cluster):
    c = cluster(1, "--half-life", "1e12")  # the history counts every sample
    with WorkerLoop(c.endpoints.frontend, job="formats", worker="w0") as loop:
        layer = PSBatchNorm(4, history_weight=0.5, name="bn", loop=loop)
        first = torch.randn(1, 4, 6, 6).to(memory_format=torch.channels_last)
        # the first forward has no history yet: exactly batch norm, channels_last or not
        torch.testing.assert_close(layer(first), nn.BatchNorm2d(4)(first.contiguous()))
        for n in (7, 3, 5):  # uneven batch sizes: the counts carry the difference
            x = torch.randn(n, 4, 6, 6).to(memory_format=torch.channels_last)
            y = layer(x)
            assert y.shape == x.shape and torch.isfinite(y).all()
        assert loop.flush(10)
        assert loop.history("bn").moments.count == pytest.approx(36 * (1 + 7 + 3 + 5), rel=1e-3)
    with WorkerLoop(c.endpoints.frontend, job="autocast", worker="w0", dtype="<f8") as loop:
        layer = PSBatchNorm(4, name="bn", loop=loop)
        x = (torch.randn(8, 4, 6, 6) * 3 + 1).to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
        assert loop.flush(10)
        # the first history is this batch's moments: computed in float32, not in bfloat16
        want = Moments.of(x.float().numpy(), (0, 2, 3))
        got = loop.history("bn").moments
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.var, want.var, rtol=1e-5)
        low = x.mean((0, 2, 3)).float().numpy()  # what a bfloat16 reduction gives
        assert not np.allclose(low, want.mean, rtol=1e-5, atol=1e-6)


def test_a_training_script_keeps_stepping_while_the_broker_restarts(cluster, spawn):
    c = cluster(1)
    torch.manual_seed(0)
    with WorkerLoop(c.endpoints.frontend, job="outage", worker="w0", timeout_s=0.2, retries=1) as loop:
        model = convert_batchnorm(small_cnn(), loop)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def train(steps: int) -> None:
            for _ in range(steps):
                loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

        train(5)
        assert loop.flush(10)
        before = loop.history("1").version
        c.broker.kill(signal.SIGKILL)
        train(20)  # nothing waits on the absent broker
        assert loop.flush(20)
        assert loop.summary()["unavailable"] >= 1  # these steps trained on without answers
        spawn("broker", "--frontend", c.endpoints.frontend, "--backend", c.endpoints.backend)
        deadline = time.monotonic() + 30
        while loop.history("1").version <= before and time.monotonic() < deadline:
            train(1)
            time.sleep(0.05)
        assert loop.history("1").version > before


def test_convert_and_revert_round_trip_with_state_dicts():
    torch.manual_seed(0)
    original = nn.Sequential(
        nn.Conv1d(2, 3, 1),
        nn.BatchNorm1d(3),
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.BatchNorm3d(4), nn.SyncBatchNorm(4)),
    )
    original.eval()
    for bn in bn_layers(original).values():
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
        bn.num_batches_tracked.fill_(7)
    original[1].weight.requires_grad_(False)
    converted = convert_batchnorm(copy.deepcopy(original), None, history_weight=0.25)
    layers = bn_layers(converted)
    assert all(isinstance(m, PSBatchNorm) for m in layers.values())
    assert [m.name for m in layers.values()] == ["1", "3", "4.0", "4.1"]
    assert not converted[1].weight.requires_grad and not converted.training
    assert converted.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(converted.state_dict())
    converted.load_state_dict(original.state_dict())
    reverted = revert_batchnorm(converted)
    assert [type(m) for m in bn_layers(reverted).values()] == [
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.BatchNorm2d,
    ]
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(reverted[3](x), original[3](x))
    assert converted.state_dict().keys() == reverted.state_dict().keys()


def test_revert_uses_the_input_dimensions_seen():
    layer = PSBatchNorm(3)
    layer(torch.randn(4, 3, 2, 2, 2))
    assert type(revert_batchnorm(layer)) is nn.BatchNorm3d


def test_a_bad_history_weight_is_refused():
    with pytest.raises(ValueError, match=r"history_weight must be in \[0, 1\)"):
        PSBatchNorm(3, history_weight=1.0)
    with pytest.raises(ValueError, match=r"gradient_history_weight must be in \[0, 1\)"):
        PSBatchNorm(3, gradient_history_weight=-0.1)
    with pytest.raises(ValueError, match="a gradient history needs history_weight > 0"):
        PSBatchNorm(3, history_weight=0.0, gradient_history_weight=0.5)
    with pytest.raises(ValueError, match="gradient must be one of cluster, renorm, exact"):
        PSBatchNorm(3, gradient="approximate")
    with pytest.raises(ValueError, match="warmup_images must be a non-negative number"):
        PSBatchNorm(3, warmup_images=-1)
    layer = PSBatchNorm(3, history_weight=0.7)
    assert (layer.gradient, layer.gradient_history_weight) == ("cluster", 0.7)  # the defaults follow the weight
    with pytest.raises(ValueError, match="max_staleness"):
        PSBatchNorm(3, max_staleness=-1)


def test_dataloader_worker_processes_are_safe(cluster):
    c = cluster(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8))
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=2, multiprocessing_context="fork")
    with WorkerLoop(c.endpoints.frontend, job="loader", worker="w0") as loop:
        model = convert_batchnorm(small_cnn(), loop)
        for _epoch in range(2):
            for (x,) in loader:
                model(x).sum().backward()
        assert loop.flush(10) and loop.summary()["unavailable"] == 0
        assert loop.history("1").moments.count > 0


def _spawn(fn, *args) -> None:
    tmp.start_processes(fn, args=args, nprocs=2, join=True, start_method="spawn")


def test_sync_mode_falls_back_to_batch_statistics_when_the_step_is_incomplete(cluster):
    c = cluster(1, "--mode", "sync", "--sync-workers", "2", "--sync-timeout-s", "0.3")
    with WorkerLoop(c.endpoints.frontend, job="alone", worker="w0", mode="sync", dtype="<f8") as loop:
        layer = PSBatchNorm(3, name="bn", loop=loop).double()
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        y = layer(x)  # the other worker never comes: the step times out incomplete
        assert loop.history("bn").seen == 4.0  # sync mode counts images too: the 4 of this batch
    torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True))


def test_sync_mode_forward_equals_batchnorm_on_the_global_batch(cluster, tmp_path):
    c = cluster(1, "--mode", "sync", "--sync-workers", "2")
    torch.manual_seed(3)
    reference = small_cnn().double()
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64) * 3 + 1
    torch.save({"state": reference.state_dict(), "x": x}, tmp_path / "inputs.pt")
    _spawn(sync_forward, 2, f"file://{tmp_path}/rendezvous", c.endpoints.frontend, str(tmp_path))
    outputs = {}
    for name, m in bn_layers(reference).items():
        m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out.detach()))
    reference(x)  # train mode: every BN normalizes with the whole global batch
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert set(ranks[0]) == set(outputs) == {"1", "4", "8"}
    for name, full in outputs.items():
        got = torch.cat([ranks[0][name], ranks[1][name]])
        torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_distributed_data_parallel_trains_and_buffers_hold_each_ranks_cluster_history(
    cluster, tmp_path, broadcast_buffers
):
    c = cluster(1)
    _spawn(ddp_train, 2, f"file://{tmp_path}/rendezvous", c.endpoints.frontend, str(tmp_path), broadcast_buffers)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert all(np.isfinite(r["losses"]))
    params = [k for k in ranks[0]["state"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for key in params:  # DDP keeps the replicas identical
        torch.testing.assert_close(ranks[0]["state"][key], ranks[1]["state"][key])
    for r in ranks:  # whatever DDP broadcast, eval() reloaded this rank's latest cluster history
        for name, (mean, var, count) in r["history"].items():
            np.testing.assert_allclose(r["state"][f"{name}.running_mean"].numpy(), mean, rtol=1e-6)
            np.testing.assert_allclose(
                r["state"][f"{name}.running_var"].numpy(), unbiased_var(Moments(count, mean, var)), rtol=1e-5
            )


def test_max_staleness_bounds_the_age_of_the_history_used(cluster):
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="stale", worker="w0", staleness_timeout_s=2.0) as loop:
        layer = PSBatchNorm(4, max_staleness=1, name="bn", loop=loop)
        for _ in range(40):  # far faster than a round trip: without the bound history would lag
            layer(torch.randn(2, 4, 3, 3))
        summary = loop.summary()
    assert summary["staleness_waits"] > 0 and summary["staleness_timeouts"] == 0  # waited, and it came
    assert summary["mean_staleness_steps"] <= 1.0  # every step used history at most one step old


def test_max_staleness_waits_only_up_to_its_timeout_when_the_service_stalls(cluster):
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="stall", worker="w0", staleness_timeout_s=0.2, timeout_s=5) as loop:
        layer = PSBatchNorm(4, max_staleness=1, name="bn", loop=loop)
        for _ in range(3):
            layer(torch.randn(2, 4, 3, 3))
        before = loop.summary()["staleness_timeouts"]
        c.aggregators[0].kill(signal.SIGSTOP)
        try:
            for _ in range(5):
                y = layer(torch.randn(2, 4, 3, 3))  # each waits at most 0.2 s, then goes on
        finally:
            c.aggregators[0].kill(signal.SIGCONT)
        stalled = loop.summary()["staleness_timeouts"] - before
    assert torch.isfinite(y).all()
    assert stalled >= 4  # the steps gave up waiting at their timeout and trained on


def test_a_layer_keeps_working_when_its_dtype_changes_after_a_history(cluster):
    """A float64 layer with a history, made float32 and then bfloat16 (normalizing in float32):
    each step reloads the history in the new dtype and matches the float64 layer's output."""
    c = cluster(1)
    layer, _ = trained_layer(c.endpoints.frontend, gradient="cluster")
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 2 + 1
    want = layer(x).detach()
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        layer.to(dtype)
        xs = x.to(dtype).requires_grad_()
        y = layer(xs)
        y.float().pow(2).mean().backward()
        assert y.dtype == dtype and xs.grad.dtype == dtype and layer.weight.grad.dtype == dtype
        torch.testing.assert_close(y.double(), want, rtol=0, atol=atol)
        layer.weight.grad = layer.bias.grad = None
