"""PSBatchNorm under torch.compile: one graph, the eager results, no recompile per history."""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch
from dist_workers import small_cnn
from torch._dynamo.utils import counters

from psq.loop import WorkerLoop
from psq.torch import PSBatchNorm, convert_batchnorm

torch.set_num_threads(1)


def layer_with_history(loop: WorkerLoop, **options) -> PSBatchNorm:
    """A float64 layer whose loop holds a history of its moments and gradient means."""
    layer = PSBatchNorm(3, name="bn", loop=loop, warmup_images=0, **options).double()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=gen) * 2 + 1
        layer(x.requires_grad_()).pow(2).mean().backward()
        loop.step()
        assert loop.flush(10)
    assert loop.history("bn").gradient is not None
    return layer


def test_the_training_forward_is_one_graph_that_matches_eager_and_survives_new_histories(cluster):
    c = cluster(1)
    torch._dynamo.reset()
    # steps close only when told: the eager and the compiled call of a round see one history
    with WorkerLoop(c.endpoints.frontend, job="compile", worker="w0", dtype="<f8", auto_step=False) as loop:
        layer = layer_with_history(loop)
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert torch._dynamo.explain(layer)(x).graph_break_count == 0
        compiled = torch.compile(layer, fullgraph=True)  # inductor, the default backend
        graphs = counters["stats"]["unique_graphs"]
        g = torch.randn_like(x)
        versions = set()
        for _ in range(3):
            xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            eager = layer(xe)
            want = torch.autograd.grad(eager, (xe, layer.weight, layer.bias), g)
            got_y = compiled(xc)
            got = torch.autograd.grad(got_y, (xc, layer.weight, layer.bias), g)
            versions.add(layer.device_history.version)
            torch.testing.assert_close(got_y, eager, rtol=0, atol=1e-12)
            for a, e in zip(got, want):
                torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
            loop.step()
            assert loop.flush(10)  # the next round blends a newer history
    assert len(versions) == 3
    assert counters["stats"]["unique_graphs"] == graphs + 1  # a new history did not recompile


@pytest.mark.slow
def test_a_converted_model_under_compile_trains_like_eager(cluster):
    """Two copies of one model train on the same data, each on its own job, one eager and one
    compiled whole (fullgraph); each step waits for its reply, so both see the same histories."""
    c = cluster(1)
    torch.manual_seed(0)
    base = small_cnn().double()
    models, loops = [], []
    for name in ("eager", "compiled"):
        loop = WorkerLoop(c.endpoints.frontend, job=name, worker="w0", dtype="<f8").start()
        loops.append(loop)
        models.append(convert_batchnorm(copy.deepcopy(base), loop, warmup_images=0))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    runners = [models[0], torch.compile(models[1], backend="aot_eager", fullgraph=True)]
    gen = torch.Generator().manual_seed(3)
    try:
        for _ in range(5):
            x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=gen)
            target = torch.randint(0, 7, (4,), generator=gen)
            for run, opt, loop in zip(runners, optimizers, loops):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(run(x), target).backward()
                opt.step()
                assert loop.flush(10)
    finally:
        for loop in loops:
            loop.stop()
    assert models[1][1].device_history is not None and models[1][1].device_history.gradient_count > 0
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-9, msg=name)


@pytest.mark.parametrize("options", [dict(bias=False), dict(affine=False, track_running_stats=False, momentum=None)])
def test_every_batchnorm_option_compiles_to_one_graph_that_matches_eager(cluster, options):
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="options", worker="w0", dtype="<f8", auto_step=False) as loop:
        layer = layer_with_history(loop, **options)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager, got = layer(xe), compiled(xc)
        torch.testing.assert_close(got, eager, rtol=0, atol=1e-12)
        g = torch.randn_like(x)
        for a, e in zip(torch.autograd.grad(got, [xc, *params], g), torch.autograd.grad(eager, [xe, *params], g)):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


class SubmissionsLoop(WorkerLoop):
    """A real WorkerLoop that also keeps every submission its layers hand it, in order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.submitted: list = []

    def submit(self, name, stats) -> None:
        self.submitted.append(stats)
        super().submit(name, stats)


def test_each_compiled_backward_writes_the_record_of_its_own_forward(cluster):
    """A layer run twice before either backward (a shared layer, checkpointing), eagerly then
    compiled, in one step so that all four blend one history: the backwards run last forward
    first, and each writes its gradient means into its own forward's record, the compiled ones
    (found by ticket) exactly where the eager ones are."""
    c = cluster(1)
    with SubmissionsLoop(c.endpoints.frontend, job="tickets", worker="w0", dtype="<f8", auto_step=False) as loop:
        layer = layer_with_history(loop)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        gen = torch.Generator().manual_seed(4)
        xs = [torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=gen) * (i + 1) for i in range(2)]
        gs = [torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=gen) for _ in range(2)]
        loop.submitted.clear()
        for run in (layer, compiled):
            ys = [run(x.clone().requires_grad_()) for x in xs]
            for y, g in reversed(list(zip(ys, gs))):
                y.backward(g)
        written = [s.gradient.written() for s in loop.submitted]
    assert len(written) == 4 and all(w is not None for w in written)
    eager_first, eager_second, compiled_first, compiled_second = written
    assert not np.allclose(eager_first.dy, eager_second.dy)  # a swap would show
    for got, want in ((compiled_first, eager_first), (compiled_second, eager_second)):
        assert got.count == want.count
        np.testing.assert_allclose(got.dy, want.dy, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.dy_xhat, want.dy_xhat, rtol=0, atol=1e-12)


def test_layers_compiled_one_by_one_share_one_graph(cluster):
    """The operators find their layer through a tensor input, not a constant: compiling many
    layers of one shape, each on its own, compiles once (an int would recompile per layer, and
    past dynamo's recompile limit run eagerly)."""
    c = cluster(1)
    # no step closes: no history arrives between a layer's compiled and eager call
    with WorkerLoop(c.endpoints.frontend, job="many", worker="w0", dtype="<f8", auto_step=False) as loop:
        layers = [PSBatchNorm(3, name=f"bn{i}", loop=loop).double() for i in range(10)]
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        graphs = counters["stats"]["unique_graphs"]
        for layer in layers:
            torch.testing.assert_close(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_a_copy_of_a_layer_is_a_layer_of_its_own_to_the_operators():
    layer = PSBatchNorm(4)
    twin = copy.deepcopy(layer)
    gone = layer._op
    assert int(twin._op) != int(gone)
    del layer
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.psq.train_forward(torch.randn(2, 4), None, None, gone)
