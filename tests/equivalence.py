"""One training step of two models side by side: the same output and every gradient the same."""

from __future__ import annotations

import torch
from torch import nn


def assert_same_step(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, atol: float = 1e-10) -> None:
    """Forward ``x`` through both, backward a random weighting of the output, compare all."""
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(a), theirs(b)
    torch.testing.assert_close(ya, yb, rtol=0, atol=atol)
    w = torch.randn_like(yb)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=atol)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=atol, msg=name)
