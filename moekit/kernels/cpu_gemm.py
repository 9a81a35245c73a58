"""CPU GEMMs for the experts: the fastest library GEMM this machine offers, per dtype.

PyTorch ships two CPU GEMM libraries. ``torch.mm`` runs fp32 in MKL's sgemm, which on AMD Zen CPUs takes a code path
that measures ~2.2x slower than oneDNN's AVX-512 kernels (also shipped with PyTorch, reachable as the operator
``torch.ops.mkldnn._linear_pointwise`` that Inductor uses); bf16 runs in oneDNN either way. Which provider is faster
is measured once per process and dtype (a 512 x 512 x 1024 GEMM; ``MOEKIT_CPU_GEMM=onednn`` or ``torch`` forces one),
so the same code is fast on Intel and AMD CPUs alike. Both compute in the operands' dtype with fp32 accumulation:
no reduced-precision mode is ever switched on.

Operands may be strided views (``w[e].T``, ``a.T``); every function returns a new tensor in the operands' dtype.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F

from ..utils import grads_by_reference
from . import cpu as kcpu

_LP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_PROVIDER: dict[torch.dtype, str] = {}
_WGRAD_PROVIDER: dict[torch.dtype, str] = {}


def _onednn_works(dtype: torch.dtype) -> bool:
    if _LP is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        a, w = torch.randn(5, 16).to(dtype), torch.randn(24, 16).to(dtype)
        ok = torch.allclose(_LP(a, w, None, "none", [], "").float(), (a.float() @ w.float().T), atol=0.1, rtol=0.02)
        ok &= torch.allclose(_LP(a, w.T.contiguous().T, None, "none", [], "").float(), a.float() @ w.float().T,
                             atol=0.1, rtol=0.02)
        return bool(ok)
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


#: Rounds of the provider probe: each times both calls, in alternating order.
PROBE_ROUNDS = 9
#: Rows of the provider probe's GEMM (PROBE_M x 512 x 1024): the library path's experts have a few hundred rows and
#: more. On 2 Zen 3 vCPUs, oneDNN's rate over MKL's (median of 15 alternating rounds): 256 rows 1.04 (single rounds
#: 0.67-1.44, so the 1.1 threshold fell either way), 512 rows 0.90 (0.78-1.01), 1024 rows 0.94-0.99.
PROBE_M = 512


def _faster(onednn, mm, rounds: int = PROBE_ROUNDS) -> str:
    """``"onednn"`` where the oneDNN call runs over 1.1x the rate of the ``torch.mm`` one, else ``"torch"``: the
    median over rounds that time both calls one after the other, in alternating order, of the ratio of their rates.
    (Each library timed apart, best of 5 runs, let a drift of a VM's speed between the two timings decide: on 2 Zen 3
    vCPUs, where the two run the probe's GEMM within ~3% of each other and MKL is the faster on large ones, a layer's
    process picked oneDNN in 3 of 7 tries, and its training steps then ran 1.04x slower.)"""
    onednn()
    mm()
    ratios = []
    for r in range(rounds):
        times = []
        for fn in (onednn, mm) if r % 2 == 0 else (mm, onednn):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        t_onednn, t_mm = times if r % 2 == 0 else times[::-1]
        ratios.append(t_mm / t_onednn)
    return "onednn" if statistics.median(ratios) > 1.1 else "torch"


def provider(dtype: torch.dtype) -> str:
    """``"onednn"`` or ``"torch"``: the faster CPU GEMM for ``dtype`` here (measured once per process; never
    inside ``torch.compile``'s tracing, which would record the probe's GEMMs as part of the model, nor under a
    Python dispatch mode, e.g. a FlopCounterMode that would count them: there the choice already measured, else
    ``"torch"``)."""
    if dtype not in _PROVIDER:
        if kcpu.bypassed():
            return "torch"
        forced = os.environ.get("MOEKIT_CPU_GEMM", "auto")
        if forced not in ("auto", "onednn", "torch"):
            raise ValueError(f"MOEKIT_CPU_GEMM must be auto, onednn or torch, got {forced!r}")
        if dtype not in (torch.float32, torch.bfloat16) or forced == "torch" or not _onednn_works(dtype):
            _PROVIDER[dtype] = "torch"
        elif forced == "onednn":
            _PROVIDER[dtype] = "onednn"
        else:
            a, w = torch.randn(PROBE_M, 512).to(dtype), torch.randn(1024, 512).to(dtype)
            _PROVIDER[dtype] = _faster(lambda: _LP(a, w, None, "none", [], ""), lambda: torch.mm(a, w.T))
    return _PROVIDER[dtype]


def wgrad_provider(dtype: torch.dtype) -> str:
    """``"onednn"`` or ``"torch"``: the faster CPU GEMM here for ``dtype``'s weight-gradient products ``a.T @ b``
    (the left operand a transposed view, K = the rows), measured once per process apart from :func:`provider`,
    since the libraries' rates differ there: on 2 Emerald Rapids cores, fp32, oneDNN (the forward's provider)
    153-204 GFLOP/s against MKL's 247-298 (experts of 256-2048 rows, into the gradient buffer in place)."""
    if dtype not in _WGRAD_PROVIDER:
        if provider(dtype) != "onednn" or os.environ.get("MOEKIT_CPU_GEMM", "auto") != "auto":
            _WGRAD_PROVIDER[dtype] = provider(dtype)
        else:
            a, b = torch.randn(512, 512).to(dtype), torch.randn(512, 1024).to(dtype)
            out = torch.empty(512, 1024, dtype=dtype)
            _WGRAD_PROVIDER[dtype] = _faster(lambda: out.copy_(_LP(a.T, b.T, None, "none", [], "")),
                                             lambda: torch.mm(a.T, b, out=out))
    return _WGRAD_PROVIDER[dtype]


#: An fp32 GEMM of at most this many multiply-adds goes to ``torch.mm``, whatever the provider: oneDNN's call costs
#: ~10 us before any arithmetic (a router's 1 x 512 x 64 logits: 12 us in oneDNN, 3 us in MKL), which only pays
#: off from ~2M multiply-adds (measured on AMD Zen 5; bf16 runs in oneDNN either way).
SMALL_GEMM_MACS = 1 << 20


def _use_onednn(a: torch.Tensor, w: torch.Tensor) -> bool:
    return a.device.type == "cpu" and a.numel() > 0 and w.numel() > 0 and provider(a.dtype) == "onednn" and not (
        a.dtype == torch.float32 and a.shape[0] * w.shape[0] * a.shape[1] <= SMALL_GEMM_MACS)


def linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ w.T (+ bias)`` for 2-D ``a [M, K]`` and ``w [N, K]``."""
    if _use_onednn(a, w):
        return _LP(a, w, bias, "none", [], "")
    return F.linear(a, w, bias)


#: The largest converted copy of a weight that :func:`matmul_cast` holds at once.
CAST_CHUNK_BYTES = 1 << 20


def matmul_cast(a: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, chunk_bytes: int | None = None) -> torch.Tensor:
    """``a @ w`` for ``a [M, K]`` in ``dtype`` and a contiguous ``w [K, N]``, computed in ``dtype``. A ``w`` of
    another dtype (a bf16 expert computed in fp32) is converted a block of its K rows at a time, at most
    ``chunk_bytes`` (default ``CAST_CHUNK_BYTES``) each, the blocks' products summed into the result in place: no
    converted copy of the whole weight (5.5 MiB for one fp32 Mixtral-like input projection) adds to the peak memory
    of backward."""
    rows = max(1, (chunk_bytes or CAST_CHUNK_BYTES) // max(1, w.shape[1] * dtype.itemsize))
    if w.dtype == dtype or rows >= w.shape[0]:
        return linear(a, w.to(dtype).T)
    out = torch.mm(a[:, :rows], w[:rows].to(dtype))
    for k in range(rows, w.shape[0], rows):
        out.addmm_(a[:, k:k + rows], w[k:k + rows].to(dtype))
    return out


#: oneDNN's linear has no ``out=``: ``linear_into`` computes this many bytes of output at a time and copies them in,
#: so its temporary stays small (a weight gradient is as large as the weight).
INTO_CHUNK_BYTES = 1 << 18


@functools.cache
def _mm_bf16_in_onednn() -> bool:
    """Whether ``torch.mm`` runs bf16 in oneDNN here (then with ``out=`` it writes straight into the output)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def linear_into(out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, chunk_bytes: int = INTO_CHUNK_BYTES) -> None:
    """``out = a @ w.T`` for a preallocated (possibly strided) ``out``, in ``out``'s dtype, without an
    output-sized temporary: ``torch.mm(out=)`` where it writes in place, else oneDNN (or a dtype conversion) in
    chunks of at most ``chunk_bytes`` of output. A weight-gradient product (``a`` a transposed view) goes to
    :func:`wgrad_provider`'s choice."""
    onednn = _use_onednn(a, w)
    if onednn and not a.is_contiguous() and a.T.is_contiguous():
        onednn = wgrad_provider(a.dtype) == "onednn"
    if out.dtype == a.dtype and (not onednn or (a.dtype == torch.bfloat16 and _mm_bf16_in_onednn())):
        torch.mm(a, w.T, out=out)  # (bf16: the same oneDNN kernels as the provider's, and no copy)
        return
    rows = max(1, chunk_bytes // max(1, w.shape[0] * a.element_size()))
    for r in range(0, a.shape[0], rows):
        out[r:r + rows].copy_(_LP(a[r:r + rows], w, None, "none", [], "") if onednn else a[r:r + rows] @ w.T)


#: Off the CPU, an input of at least this many elements cast for its GEMM (a bf16 router computed in fp32) goes
#: through :class:`_Linear`, which keeps no cast copy for backward (256 KiB of fp32 and more).
DEVICE_CAST_MIN_ELEMENTS = 1 << 16


def on_cpu(t: torch.Tensor) -> bool:
    """Whether ``t``'s GEMMs here are the CPU's (its kernels and library providers) rather than PyTorch's on a
    device (``benchmarks/bench_triton_host.py`` runs CPU tensors as a GPU's through this)."""
    return t.device.type == "cpu"


class _Linear(torch.autograd.Function):
    """``x @ w.T + b`` computed in ``dtype`` with the fast CPU GEMM in forward and backward (oneDNN has no autograd
    formula of its own); on other devices, with PyTorch's GEMMs where a cast is involved. The inputs are saved as
    given and cast again in backward, so computing a bf16 layer's router in fp32 keeps no fp32 copy of its input
    alive (autograd on ``F.linear(x.float(), w.float())`` keeps ``T x D`` fp32 values per layer until backward)."""

    @staticmethod
    def forward(ctx, x, w, b, dtype):
        ctx.save_for_backward(x, w, b)
        ctx.has_bias, ctx.dtype = b is not None, dtype
        if not on_cpu(x):
            return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
        return _linear_cast(x, w, b, dtype)

    @staticmethod
    def backward(ctx, g):
        x, w, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # (double backward: PyTorch's linear, which autograd differentiates again)
            dtype = ctx.dtype
            return *grads_by_reference(
                lambda x_, w_, b_: F.linear(x_.to(dtype), w_.to(dtype), None if b_ is None else b_.to(dtype)),
                (x, w, b), ctx.needs_input_grad[:3], (g,)), None
        g = g.contiguous().to(ctx.dtype)
        need_dx, need_dw = ctx.needs_input_grad[:2]
        if not on_cpu(x):  # (the operands cast again, transient; the router's weight gradient is small)
            dx = (g @ w.to(ctx.dtype)).to(x.dtype) if need_dx else None
            dw = (g.T @ x.to(ctx.dtype)).to(w.dtype) if need_dw else None
        elif _few_rows_cast(g, w, x, ctx.dtype):
            dx, dw = _few_rows_backward(g, w, x, need_dx, need_dw)
        elif (w.dtype != ctx.dtype or x.dtype != ctx.dtype) and x.dim() == 2 and x.device.type == "cpu":
            dx, dw = _cast_backward(g, w, x, need_dx, need_dw)
        else:
            dx = linear(g, w.to(ctx.dtype).T).to(x.dtype) if need_dx else None  # g @ w
            dw = None
            if need_dw:  # g^T @ x, straight into the weight's dtype without a full-size temporary
                dw = torch.empty_like(w, memory_format=torch.contiguous_format)
                linear_into(dw, g.T, x.to(ctx.dtype).T,
                            chunk_bytes=INTO_CHUNK_BYTES // 4 if w.dtype != ctx.dtype else INTO_CHUNK_BYTES)
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def _few_rows_cast(g: torch.Tensor, w: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether _Linear's backward runs the C kernels (_few_rows_backward): a cast (a bf16 router computed in fp32)
    and fewer rows of ``g`` than of ``w`` (a decode-size batch), where the library GEMMs' fp32 copies of ``w`` or of
    the product would be the largest temporaries of the step, more than a bf16 model's own backward holds."""
    return (w.dtype != dtype and g.shape[0] < w.shape[0] and g.dtype == torch.float32 and x.dim() == 2
            and x.dtype in (torch.float32, torch.bfloat16) and w.dtype in (torch.float32, torch.bfloat16)
            and w.device.type == x.device.type == "cpu" and kcpu.library() is not None)


def _few_rows_backward(g: torch.Tensor, w: torch.Tensor, x: torch.Tensor, need_dx: bool, need_dw: bool
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dx = g @ w`` in ``x``'s dtype and ``dw = g^T @ x`` in ``w``'s, each a single-"expert" call of the small-M
    kernels, which read bf16 operands as they are: no fp32 copy of ``w``, of ``x`` or of either product."""
    T = g.shape[0]
    dx = dw = None
    if need_dx:  # (one "expert" owning all T rows: no start/end tensors)
        dx = torch.empty(T, w.shape[1], dtype=x.dtype)
        kcpu.small_experts_nn(g, None, w.contiguous().unsqueeze(0), None, None, dx)
    if need_dw:
        dw = torch.empty_like(w, memory_format=torch.contiguous_format)
        kcpu.small_experts_outer(g, None, x.contiguous(), None, None, None, dw.unsqueeze(0))
    return dx, dw


#: Rows of x (converted) per block of :func:`_cast_backward`, in bytes of the converted block.
CAST_BLOCK_BYTES = 1 << 20
#: Up to this many outputs (experts) :func:`_cast_backward` computes ``dx`` in the small-M kernel.
CAST_NN_MAX_OUT = 16


def _cast_backward(g: torch.Tensor, w: torch.Tensor, x: torch.Tensor, need_dx: bool, need_dw: bool
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """_Linear's backward where a cast is involved (a bf16 router computed in fp32) and rows are many: ``dw = g^T @
    x`` summed in ``g``'s dtype over blocks of ``x``'s rows converted one at a time (a block of ``CAST_BLOCK_BYTES``
    stays in cache; the converted copy of all of ``x`` and the GEMM reading it back from memory took 2.7 ms of a
    Mixtral-like bf16 step at T = 8192), ``dx = g @ w`` in ``x``'s dtype straight from the small-M kernel up to
    ``CAST_NN_MAX_OUT`` outputs (no fp32 product to cast after), else by blocks of rows as ``dw``. Caches flushed,
    2 Emerald Rapids cores, 8192 tokens: 8 experts dw 1.35 -> 1.06 ms, dx 1.07 -> 0.64 ms; 64 experts dw 3.0 -> 2.2
    ms, dx 2.15 -> 1.8 ms."""
    T, (E, D) = g.shape[0], w.shape
    rows = max(1, CAST_BLOCK_BYTES // max(1, D * g.element_size()))
    dx = dw = None
    if need_dx:
        dx = torch.empty(T, D, dtype=x.dtype)
        if E <= CAST_NN_MAX_OUT and kcpu.library() is not None and g.dtype in (torch.float32, torch.bfloat16) \
                and x.dtype in (torch.float32, torch.bfloat16) and w.dtype in (torch.float32, torch.bfloat16):
            kcpu.small_experts_nn(g, None, w.contiguous().unsqueeze(0), None, None, dx)
        else:
            w_g = w.to(g.dtype)
            for r in range(0, T, rows):
                dx[r:r + rows] = g[r:r + rows] @ w_g
    if need_dw:
        acc = torch.zeros(E, D, dtype=g.dtype)
        for r in range(0, T, rows):
            acc.addmm_(g[r:r + rows].T, x[r:r + rows].to(g.dtype))
        dw = acc.to(w.dtype)
    return dx, dw


def _linear_cast(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``linear(x.to(dtype), w.to(dtype), b)``; a bf16 ``x`` computed in fp32 (a bf16 layer's router) in the C
    kernel where it applies (:func:`moekit.kernels.cpu.router_logits`: no fp32 copy of ``x``)."""
    if dtype == torch.float32 and x.dtype == torch.bfloat16:
        out = kcpu.router_logits(x, w, None if b is None else b.float())
        if out is not None:
            return out
    return linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))


def linear_autograd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.linear(x.to(dtype), w.to(dtype), b)`` for 2-D ``x``, differentiable, with the faster CPU GEMM where it
    differs from PyTorch's (``dtype`` defaults to ``x``'s)."""
    dtype = dtype or x.dtype
    # _Linear also wherever a cast is involved, on any device: autograd on F.linear(x.to(dtype), w.to(dtype)) would
    # keep the cast copies alive until backward (a bf16 router computed in fp32: fp32 copies of its input and weight
    # per layer)
    cast = x.dtype != dtype or w.dtype != dtype
    if on_cpu(x):
        use = cast or provider(dtype) == "onednn"
    else:  # (PyTorch's own nodes where the copy is small: a Python Function costs ~70 us of host time a step)
        use = cast and x.numel() >= DEVICE_CAST_MIN_ELEMENTS
    if use and x.dim() == 2 and not kcpu.bypassed():
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
            return _Linear.apply(x, w, b, dtype)
        if on_cpu(x):
            return _linear_cast(x, w, b, dtype)  # no graph to record
    return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
