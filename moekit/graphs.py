"""CUDA graphs for an MoE layer (or any module) run at a fixed input shape.

At decode and small-batch sizes a layer's GPU work takes microseconds while launching its ~50 kernels one by one from
Python takes about a millisecond: the GPU waits on the host. A CUDA graph records the launches once and replays them
with one call. moekit's layer is capturable because nothing in its routing, dispatch or Triton experts synchronises
with the host, forward or backward (tests/test_triton.py::TestCUDA::test_no_host_sync checks it).

    graphed = moekit.cuda_graphed(layer.eval(), x)          # inference: y = graphed(x_new), same shape as x
    moekit.cuda_graphed(layer.train(), x, backward=True)    # training: layer(x_new).backward(...) replays two graphs

A graph replays exactly what was recorded: the same shapes, the same code path, the same tensors. So

- inputs of another shape, dtype or device are refused (capture one graph per shape, e.g. per batch-size bucket);
- the inference output is a buffer the next call overwrites (``.clone()`` it to keep it);
- a change that would make Python choose another path (switching ``train()``/``eval()``, swapping the backend,
  replacing a parameter tensor rather than updating it in place) is not seen by the graph: capture again.

Training graphs are :func:`torch.cuda.make_graphed_callables`, which checks its own requirements (parameters updated in
place by the optimizer are seen by the graph).
"""

from __future__ import annotations

import torch


def _require_cuda(sample: torch.Tensor) -> None:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"cuda_graphed needs a sample input tensor, got {type(sample).__name__}")
    if sample.device.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA tensors, but the sample input is on {sample.device}: move the module "
                         "and the input to a GPU (.cuda()), or on CPU call the module directly (nothing to capture)")


class CUDAGraphed(torch.nn.Module):
    """Inference replay of ``module`` captured on a sample input (see the module docstring). Returns what
    ``module`` returned, as buffers overwritten by the next call."""

    def __init__(self, module: torch.nn.Module, sample: torch.Tensor, warmup: int = 3):
        super().__init__()
        _require_cuda(sample)
        self.module = module
        self.static_in = sample.detach().clone()
        stream = torch.cuda.Stream(sample.device)
        stream.wait_stream(torch.cuda.current_stream(sample.device))
        # warm-up on a side stream: compiles kernels and fills the allocator before anything is recorded
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(max(1, warmup)):
                module(self.static_in)
        torch.cuda.current_stream(sample.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_out = module(self.static_in)

    def forward(self, x: torch.Tensor):
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype or x.device != self.static_in.device:
            raise ValueError(f"this CUDA graph was captured for input {tuple(self.static_in.shape)} "
                             f"{self.static_in.dtype} on {self.static_in.device}, got {tuple(x.shape)} {x.dtype} on "
                             f"{x.device}: capture one graph per input shape (moekit.cuda_graphed(module, x))")
        if x.data_ptr() != self.static_in.data_ptr():
            self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def cuda_graphed(module: torch.nn.Module, sample: torch.Tensor, *, backward: bool = False, warmup: int = 3):
    """Capture ``module`` run on ``sample`` (a CUDA tensor) as a CUDA graph.

    ``backward=False``: returns a :class:`CUDAGraphed` callable for inference (no autograd). ``backward=True``:
    ``module`` itself is graphed for training with :func:`torch.cuda.make_graphed_callables` (forward and backward
    graphs, used while ``module.training`` is what it was at capture) and returned; ``sample.requires_grad`` says
    whether the input's gradient is computed."""
    _require_cuda(sample)
    if not backward:
        return CUDAGraphed(module, sample, warmup)
    if not any(p.requires_grad for p in module.parameters()) and not sample.requires_grad:
        raise ValueError("backward=True captures a backward graph, but neither the module's parameters nor the sample "
                         "require gradients: use backward=False for inference")
    return torch.cuda.make_graphed_callables(module, (sample,), num_warmup_iters=max(1, warmup))
