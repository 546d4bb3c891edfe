"""psq's CPU kernels (psq/native.cpp) against the same step composed of torch's kernels."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from psq import native
from psq.kernels import Blend, backward_mode, fused_step, gradients, normalize

LAYOUTS = [
    ((4, 6, 5, 3), torch.contiguous_format),
    ((4, 6, 5, 3), torch.channels_last),
    ((300, 5), torch.contiguous_format),  # one value per channel and sample
    ((3, 4, 2, 3, 2), torch.channels_last_3d),
    ((2, 3, 7), torch.contiguous_format),
    ((2, 3, 1, 1), torch.contiguous_format),
    ((16, 70, 40, 40), torch.contiguous_format),  # big enough for every thread
    ((16, 70, 40, 40), torch.channels_last),
]
BACKWARDS = [("cluster", 0.6), ("cluster", 0.0), ("exact", 0.0), ("renorm", 0.0)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


class Handed(list):
    """A gradient sink that keeps what the backward hands it."""

    def __call__(self, count: float, dy: torch.Tensor, dy_xhat: torch.Tensor) -> None:
        self.append((count, dy, dy_xhat))


@pytest.fixture
def composed():
    """Run the step on torch's kernels for the duration of a block."""

    class Switch:
        def __enter__(self):
            self.was = native.set_enabled(False)

        def __exit__(self, *exc):
            native.set_enabled(self.was)

    return Switch()


def test_the_kernels_are_built() -> None:
    assert native.ops() is not None, f"psq's CPU kernels did not build: {native.error()}"


def _case(shape, fmt, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]

    def rand(*size, scale=1.0, shift=0.0):
        return torch.randn(*size, generator=gen, dtype=dtype) * scale + shift

    x = rand(*shape, scale=3.0, shift=2.0).contiguous(memory_format=fmt)
    g = rand(*shape).contiguous(memory_format=fmt)
    weight, bias = rand(c).abs_() + 0.5, rand(c)
    history = Blend(0.7, rand(c), rand(c).abs_() + 0.5, 0.6, rand(c), rand(c))
    return x, g, weight, bias, history


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,fmt", LAYOUTS)
@pytest.mark.parametrize("gradient,gradient_share", BACKWARDS)
def test_native_step_equals_torch_kernels(shape, fmt, dtype, gradient, gradient_share, composed) -> None:
    x, g, weight, bias, h = _case(shape, fmt, dtype)
    for blend in (Blend(), Blend(h.share, h.mean, h.var, gradient_share, h.dy, h.dy_xhat)):
        handed_want, handed = Handed(), Handed()
        with composed:
            want_y, want = normalize(x, weight, bias, blend, 1e-5)
            want_grads = gradients(g, want, weight, blend, 1e-5, gradient, handed_want)
        got_y, got = normalize(x, weight, bias, blend, 1e-5)
        got_grads = gradients(g, got, weight, blend, 1e-5, gradient, handed)
        tol = TOL[dtype]
        assert got_y.stride() == x.stride()  # the input's layout, as torch's kernels keep it
        torch.testing.assert_close(got_y, want_y, rtol=tol, atol=tol)
        for a, b in zip(got[1:], want[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * x.numel() ** 0.5)
        assert len(handed) == len(handed_want)  # the same hand-over of the gradient means
        for (n, dy, dyx), (m, want_dy, want_dyx) in zip(handed, handed_want, strict=True):
            assert n == m
            torch.testing.assert_close(dy, want_dy, rtol=tol, atol=tol)
            torch.testing.assert_close(dyx, want_dyx, rtol=tol, atol=tol)


def test_a_strided_input_and_gradient_in_another_layout() -> None:
    """A view with gaps is normalized as its copy would be; a gradient in another memory
    format than the input is read in the input's."""
    x, g, weight, bias, h = _case((6, 4, 8, 8), torch.contiguous_format, torch.float64)
    view = x[:, :, ::2, 1::2]
    y, saved = normalize(view, weight, bias, h, 1e-5)
    y_copy, saved_copy = normalize(view.contiguous(), weight, bias, h, 1e-5)
    torch.testing.assert_close(y, y_copy, rtol=0, atol=1e-12)
    g_view = g[:, :, ::2, 1::2]
    grads = gradients(g_view.contiguous(memory_format=torch.channels_last), saved, weight, h, 1e-5, "cluster", None)
    want = gradients(g_view.contiguous(), saved_copy, weight, h, 1e-5, "cluster", None)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_the_variance_does_not_cancel_far_from_zero() -> None:
    """Values around 1e4 with a spread of 1e-2: a one-pass variance without its shift would
    lose every digit in float32."""
    x = (torch.randn(8, 3, 16, 16, dtype=torch.float64) * 1e-2 + 1e4).float()
    _, saved = normalize(x, None, None, Blend(), 1e-5)
    want = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(saved.var_b.double(), want, rtol=1e-3, atol=0)


def test_the_step_falls_back_to_torch_kernels_when_turned_off(composed) -> None:
    x, _, weight, bias, _ = _case((4, 6, 5, 3), torch.contiguous_format, torch.float64)
    with composed:
        assert native.ops() is None
        _, saved = normalize(x, weight, bias, Blend(), 1e-5)
        assert saved.mean is saved.mean_b  # the composition's own: no blend, the batch's tensors
    _, saved = normalize(x, weight, bias, Blend(), 1e-5)
    assert saved.mean is not saved.mean_b


@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda x: x.to(torch.float16), "float32 or float64"),
        (lambda x: x[0, 0, 0], "2 to 5 dimensions"),
        (lambda x: x[:0], "non-empty"),
    ],
)
def test_the_operators_refuse_what_they_cannot_normalize(bad, message) -> None:
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match=message):
        native.ops().forward(bad(x), None, None, None, None, 0.0, 1e-5)


def test_the_operators_refuse_statistics_of_another_size() -> None:
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="must have 3 values, got 4"):
        native.ops().forward(x, torch.ones(4), None, None, None, 0.0, 1e-5)
    with pytest.raises(RuntimeError, match="needs the history"):
        native.ops().forward(x, None, None, None, None, 0.5, 1e-5)
    stats = torch.zeros(3)
    with pytest.raises(RuntimeError, match="unknown backward mode"):
        native.ops().backward(x, x, None, stats, stats, stats, stats, 7, 0.0, 0.0, None, None, 1e-5, True)


def test_backward_mode_names_each_backward() -> None:
    h = Blend(0.5, None, None, 0.4)
    assert [backward_mode(g, h) for g in ("cluster", "exact", "renorm")] == ["cluster", "exact", "renorm"]
    assert [backward_mode(g, Blend()) for g in ("cluster", "exact", "renorm")] == ["batch"] * 3
    assert backward_mode("cluster", Blend(0.5)) == "batch"  # no gradient history yet


def test_a_failed_build_falls_back_and_says_why(tmp_path) -> None:
    """A source that does not compile (as on a machine without a compiler): the step runs on
    torch's kernels, the log says why once, training goes on.  In a fresh process, so this
    one keeps its kernels."""
    broken = tmp_path / "native.cpp"
    broken.write_text("this is not C++\n")
    script = textwrap.dedent(
        f"""
        import logging, torch
        from psq import native
        from psq.kernels import Blend, normalize
        logging.basicConfig(level=logging.WARNING)
        native.SOURCE = __import__("pathlib").Path({str(broken)!r})
        y, saved = normalize(torch.randn(4, 3, 5, 5), None, None, Blend(), 1e-5)
        y, saved = normalize(torch.randn(4, 3, 5, 5), None, None, Blend(), 1e-5)
        assert native.ops() is None and native.error() is not None
        assert saved.mean is saved.mean_b  # torch's kernels did it
        print("fell back")
        """
    )
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "fell back" in done.stdout
    assert done.stderr.count("psq's CPU kernels are not available") == 1


def _records(c: int, dtype: torch.dtype, rows: int = 3) -> torch.Tensor:
    return torch.full((rows, 4 * c + 1), float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,fmt", LAYOUTS)
@pytest.mark.parametrize("gradient,gradient_share", BACKWARDS)
def test_the_one_operator_step_equals_the_composed_step_and_fills_its_record(
    shape, fmt, dtype, gradient, gradient_share, composed
) -> None:
    """psq_native::train, forward and backward through autograd, against the step on torch's
    kernels: the same output and gradients, the batch's moments and (for the backwards whose
    means the cluster keeps) gradient means in its row of the records, the others untouched."""
    x, g, weight, bias, h = _case(shape, fmt, dtype)
    c = shape[1]
    rows = torch.stack([h.mean, h.var, h.dy, h.dy_xhat])
    blend = Blend(h.share, rows[0], rows[1], gradient_share, rows[2], rows[3])
    handed = Handed()
    with composed:
        want_y, want = normalize(x, weight, bias, blend, 1e-5)
        want_grads = gradients(g, want, weight, blend, 1e-5, gradient, handed)
    records = _records(c, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = fused_step(*leaves, rows, blend, 1e-5, gradient, records, 1, keep_gradient=True)
    got_grads = torch.autograd.grad(y, leaves, g)
    tol = TOL[dtype]
    torch.testing.assert_close(y, want_y, rtol=tol, atol=tol)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * x.numel() ** 0.5)
    row = records[1]
    torch.testing.assert_close(row[:c], want.mean_b, rtol=tol, atol=tol)
    torch.testing.assert_close(row[c : 2 * c], want.var_b, rtol=tol, atol=tol)
    if handed:  # the cluster keeps these means: the backward wrote them, and the elements behind them
        (n, dy, dy_xhat) = handed[0]
        torch.testing.assert_close(row[2 * c : 3 * c], dy, rtol=tol, atol=tol)
        torch.testing.assert_close(row[3 * c : 4 * c], dy_xhat, rtol=tol, atol=tol)
        assert float(row[-1]) == n
    else:
        assert float(row[-1]) == 0 and row[2 * c : 4 * c].isnan().all()
    assert records[0].isnan().all() and records[2].isnan().all()


def test_a_record_takes_its_first_backward_and_none_once_sealed() -> None:
    x, g, weight, bias, _ = _case((4, 3, 5, 5), torch.contiguous_format, torch.float64)
    records = _records(3, torch.float64)

    def backward_twice(index: int, seal: bool) -> None:
        leaf = x.clone().requires_grad_()
        y = fused_step(leaf, weight, bias, None, Blend(), 1e-5, "cluster", records, index, keep_gradient=True)
        if seal:
            records[index, -1] = -1  # what the loop's seal does to a record still empty
        torch.autograd.grad(y, leaf, g, retain_graph=True)
        torch.autograd.grad(y, leaf, 2 * g)

    backward_twice(0, seal=False)
    want = g.mean(dim=(0, 2, 3))
    torch.testing.assert_close(records[0, 6:9], want)  # the first backward's, not the second's 2g
    assert float(records[0, -1]) == 4 * 5 * 5
    backward_twice(1, seal=True)
    assert float(records[1, -1]) == -1 and records[1, 6:12].isnan().all()


def test_no_gradient_from_downstream_gives_none_and_writes_no_record() -> None:
    """A branch whose gradient is None (here a Function that returns none for its input): batch
    norm's input gets no gradient, and no gradient means of zeros reach the cluster."""

    class Cut(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.sum().detach().requires_grad_()

        @staticmethod
        def backward(ctx, g):
            return None

    x, _, weight, bias, h = _case((4, 3, 5, 5), torch.contiguous_format, torch.float64)
    rows = torch.stack([h.mean, h.var, h.dy, h.dy_xhat])
    records = _records(3, torch.float64)
    leaf = x.clone().requires_grad_()
    y = fused_step(leaf, weight, bias, rows, h, 1e-5, "cluster", records, 0, keep_gradient=True)
    (Cut.apply(y) + leaf.sum()).backward()
    torch.testing.assert_close(leaf.grad, torch.ones_like(x))  # only the direct path's
    assert float(records[0, -1]) == 0 and records[0, 6:12].isnan().all()


def test_a_double_backward_is_refused_with_what_to_do() -> None:
    x, _, weight, bias, _ = _case((4, 3, 5, 5), torch.contiguous_format, torch.float64)
    leaf = x.clone().requires_grad_()
    y = fused_step(leaf, weight, bias, None, Blend(), 1e-5, "cluster", _records(3, torch.float64), 0, False)
    with pytest.raises(RuntimeError, match=r"differentiable once.*set_enabled\(False\)"):
        torch.autograd.grad(y.pow(2).sum(), leaf, create_graph=True)


def test_gradcheck_of_the_one_operator_step_with_the_history_constant() -> None:
    x, _, weight, bias, h = _case((3, 2, 3, 2), torch.contiguous_format, torch.float64)
    rows = torch.stack([h.mean, h.var, h.dy, h.dy_xhat])
    for gradient, blend in (("exact", Blend(0.6, rows[0], rows[1])), ("batch", Blend())):
        records = _records(2, torch.float64)

        def step(x, weight, bias, blend=blend, gradient=gradient, records=records):
            return fused_step(x, weight, bias, rows, blend, 1e-5, gradient, records, 0, keep_gradient=False)

        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        assert torch.autograd.gradcheck(step, leaves)


@pytest.mark.parametrize(
    "records,index,message",
    [
        (torch.zeros(2, 12), 0, r"rows of 4·C \+ 1 = 13"),
        (torch.zeros(2, 13, dtype=torch.float64), 0, "in x's dtype"),
        (torch.zeros(2, 13), 2, "record 2 of 2"),
    ],
)
def test_the_one_operator_step_refuses_records_it_cannot_write(records, index, message) -> None:
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match=message):
        native.ops().train(x, None, None, None, records, index, 0.0, 0.0, 1e-5, 0, False)
    with pytest.raises(RuntimeError, match="needs the history"):
        native.ops().train(x, None, None, None, torch.zeros(2, 13), 0, 0.5, 0.0, 1e-5, 0, False)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(weight=None, bias=torch.zeros(3)), "a bias needs a weight"),
        (dict(share=1.5), r"shares must be in \[0, 1\]"),
        (dict(eps=-1.0), "eps must be a non-negative number"),
        (dict(mode=2, keep=True), "only the batch and cluster backwards keep"),
    ],
)
def test_the_one_operator_step_refuses_arguments_it_cannot_honour(change, message) -> None:
    x, rows = torch.randn(4, 3, 5, 5), torch.ones(4, 3)
    args = dict(weight=torch.ones(3), bias=torch.zeros(3), share=0.5, eps=1e-5, mode=0, keep=False) | change
    with pytest.raises(RuntimeError, match=message):
        native.ops().train(
            x, args["weight"], args["bias"], rows, torch.zeros(2, 13), 0, args["share"], 0.0, args["eps"],
            args["mode"], args["keep"],
        )  # fmt: skip
