"""PSBatchNorm on a CUDA device: the CPU's results, and no host synchronization in a step.

Skipped without a GPU; written to run on one.
"""

from __future__ import annotations

import copy

import pytest
import torch

from psq.loop import WorkerLoop
from psq.torch import PSBatchNorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fixed_history_layer(frontend: str, gradient: str) -> PSBatchNorm:
    """A float64 CPU layer whose loop received a history (moments and gradient means), then stopped."""
    loop = WorkerLoop(frontend, job=f"cuda-{gradient}", worker="w0", dtype="<f8").start()
    layer = PSBatchNorm(3, name="bn", loop=loop, gradient=gradient, warmup_images=0).double()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        layer(torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=gen) * 2 + 1).pow(2).mean().backward()
        assert loop.flush(10)
    loop.stop()
    return layer


def step(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = layer(x)
    return (y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), g))


@pytest.mark.parametrize("gradient", ["cluster", "renorm", "exact"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_cuda_layer_gives_the_cpus_results_without_waiting_for_the_device(cluster, gradient, memory_format):
    c = cluster(1)
    cpu = fixed_history_layer(c.endpoints.frontend, gradient)
    gpu = copy.deepcopy(cpu).cuda()
    gpu.loop = cpu.loop  # the same (stopped) loop: the same history
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=gen) * 2 + 1).to(memory_format=memory_format)
    g = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=gen).to(memory_format=memory_format)
    want = step(cpu, x, g)
    x_gpu, g_gpu = x.cuda(), g.cuda()  # copies from pageable memory synchronize: before the check
    step(gpu, x_gpu, g_gpu)  # the first step copies the history to the device
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call from here on raises
    try:
        got = step(gpu, x_gpu, g_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, e in zip(got, want):
        torch.testing.assert_close(a.cpu(), e, rtol=0, atol=1e-9)
    assert gpu.device_history.rows.is_cuda


def test_a_compiled_cuda_layer_matches_eager(cluster):
    c = cluster(1)
    gpu = fixed_history_layer(c.endpoints.frontend, "cluster").cuda()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device="cuda")
    g = torch.randn_like(x)
    want = step(gpu, x, g)
    got = step(torch.compile(gpu, fullgraph=True), x, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
