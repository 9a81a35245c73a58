"""Shared test utilities."""

import contextlib

import torch


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("_orig_mod."): p.grad.detach().clone()
            for n, p in module.named_parameters() if p.grad is not None}


def run_fwd_bwd(layer, x, seed: int = 0):
    """Forward + backward with a fixed random upstream gradient; returns (y, dx, param grads)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    y.backward(g)
    return y.detach(), x.grad.detach(), grads(layer)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def assert_fwd_bwd_close(got, want, tol: float, grad_tol: float | None = None, err=max_err) -> None:
    """``got`` and ``want`` (both from :func:`run_fwd_bwd`) agree: output and input gradient within ``tol``, every
    parameter's gradient within ``grad_tol`` (default ``tol``), measured by ``err``."""
    assert err(got[0], want[0]) < tol and err(got[1], want[1]) < tol
    for name in want[2]:
        assert err(got[2][name], want[2][name]) < (tol if grad_tol is None else grad_tol), name


@contextlib.contextmanager
def num_threads(n: int):
    """PyTorch's thread count (which the CPU kernels use) set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
