"""The ``fused`` experts backend: one autograd Function for gather → GEMM → activation → GEMM → weighted combine.

Why a custom Function: autograd on the composed ops saves every intermediate (gathered rows, both halves of the
gate/up projection, the activation output, the weighted rows, the permuted copy) and its backward of a grouped GEMM
fills zeros expert by expert. Here forward saves only the pre-activation ``h_SW`` and the unweighted expert output
``y_SD`` (plus indices); backward re-gathers the input rows, recomputes the activation, and computes weight
gradients only for experts that received tokens. Weights are cast to the compute dtype one active expert at a time,
so no full-size cast copy is ever made. Without autograd (inference) the Function is skipped altogether.

Compute dtype: the autocast dtype if autocast is on, else the weights' dtype, except that on CPUs whose bf16 GEMM
is slower than fp32 (no AMX: measured once per process), bf16 layers whose experts average at least
``BF16_UPCAST_MIN_ROWS`` rows run their GEMMs in fp32 (more accurate, and faster there); outputs keep the input dtype.

Notation: ``T`` tokens, ``S`` valid slots in expert order, ``D`` model dim, ``W`` input-projection width
(``2F`` gated, ``F`` plain), ``F`` expert hidden dim, ``E`` experts.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from .activations import Activation

if TYPE_CHECKING:
    from ..dispatch.local import DispatchPlan
    from .fused import Experts

#: bf16 layers whose active experts get at least this many rows on average compute in fp32 on slow-bf16 CPUs.
BF16_UPCAST_MIN_ROWS = 64


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _linear_segments(a_SI, w_EOI, b_EO, counts, out_SO, dtype):
    """``out[seg_e] = a[seg_e] @ w[e].T (+ b[e])`` for every non-empty expert segment, weights cast per expert."""
    for e, s, t in _segments(counts):
        w = w_EOI[e].to(dtype)
        if b_EO is not None:
            torch.addmm(b_EO[e].to(dtype), a_SI[s:t], w.T, out=out_SO[s:t])
        else:
            torch.mm(a_SI[s:t], w.T, out=out_SO[s:t])
    return out_SO


def fused_forward(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S, counts, activation, dtype):
    """The forward math; returns ``(y_TD fp32, (h_SW, y_SD, w_S))``."""
    S = token_S.shape[0]
    x_SD = x_TD.index_select(0, token_S).to(dtype)
    h_SW = _linear_segments(x_SD, w_in, b_in, counts, x_SD.new_empty(S, w_in.shape[1]), dtype)
    a_SF = activation(h_SW)
    y_SD = _linear_segments(a_SF, w_out, b_out, counts, x_SD.new_empty(S, w_out.shape[1]), dtype)
    w_S = weights_TK.reshape(-1).index_select(0, slot_S).float()
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    out_TD.index_add_(0, token_S, y_SD.float() * w_S[:, None])
    return out_TD, (h_SW, y_SD, w_S)


class FusedExpertsFunction(torch.autograd.Function):
    """``y_TD = sum_k w_TK * expert_{id_TK}(x_TD)`` in fp32, with a hand-written, memory-lean backward."""

    @staticmethod
    def forward(ctx, x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S, counts, activation, dtype):
        with torch.autocast(x_TD.device.type, enabled=False):
            out_TD, (h_SW, y_SD, w_S) = fused_forward(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S,
                                                      slot_S, counts, activation, dtype)
        # With bf16 inputs computed in fp32, keep the saved activations in bf16: half the memory, and no less
        # precise than a bf16 computation would have been.
        io = x_TD.dtype
        ctx.save_for_backward(x_TD, w_in, w_out, h_SW.to(io), y_SD.to(io), w_S, token_S, slot_S)
        ctx.counts, ctx.activation, ctx.dtype = counts, activation, dtype
        ctx.weights_shape, ctx.weights_dtype = weights_TK.shape, weights_TK.dtype
        ctx.bias_dtypes = (None if b_in is None else b_in.dtype, None if b_out is None else b_out.dtype)
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        x_TD, w_in, w_out, h_SW, y_SD, w_S, token_S, slot_S = ctx.saved_tensors
        counts, act, dtype = ctx.counts, ctx.activation, ctx.dtype
        need_x, need_win, need_wout, need_bin, need_bout, need_w = ctx.needs_input_grad[:6]
        dev = g_TD.device
        with torch.autocast(dev.type, enabled=False):
            g_SD = g_TD.index_select(0, token_S)
            d_weights = None
            if need_w:
                dw_S = (g_SD.float() * y_SD.float()).sum(dim=-1)
                d_weights = torch.zeros(ctx.weights_shape.numel(), dtype=torch.float32, device=dev)
                d_weights = d_weights.index_copy_(0, slot_S, dw_S).view(ctx.weights_shape).to(ctx.weights_dtype)
            del y_SD
            gy_SD = (g_SD.float() * w_S[:, None]).to(dtype)
            del g_SD
            h_SW = h_SW.to(dtype)

            # recompute the activation (cheaper than saving it), then back through the down projection
            a_SF, act_backward = _activation_with_backward(act, h_SW)
            da_SF = torch.empty_like(a_SF)
            d_wout = _expert_grad_buffer(w_out, counts) if need_wout else None
            d_bout = torch.zeros(w_out.shape[:2], dtype=ctx.bias_dtypes[1], device=dev) if need_bout else None
            for e, s, t in _segments(counts):
                torch.mm(gy_SD[s:t], w_out[e].to(dtype), out=da_SF[s:t])
                if need_wout:
                    _mm_into(d_wout[e], gy_SD[s:t].T, a_SF[s:t])
                if need_bout:
                    d_bout[e] = gy_SD[s:t].sum(0)
            del a_SF, gy_SD
            dh_SW = act_backward(da_SF)
            del da_SF, h_SW

            x_SD = x_TD.index_select(0, token_S).to(dtype)
            d_win = _expert_grad_buffer(w_in, counts) if need_win else None
            d_bin = torch.zeros(w_in.shape[:2], dtype=ctx.bias_dtypes[0], device=dev) if need_bin else None
            dx_SD = torch.empty_like(x_SD) if need_x else None
            for e, s, t in _segments(counts):
                if need_win:
                    _mm_into(d_win[e], dh_SW[s:t].T, x_SD[s:t])
                if need_x:
                    torch.mm(dh_SW[s:t], w_in[e].to(dtype), out=dx_SD[s:t])
                if need_bin:
                    d_bin[e] = dh_SW[s:t].sum(0)
            del dh_SW, x_SD
            d_x = None
            if need_x:
                d_x = torch.zeros(x_TD.shape, dtype=torch.float32, device=dev)
                d_x = d_x.index_add_(0, token_S, dx_SD.float()).to(x_TD.dtype)
        return d_x, d_win, d_wout, d_bin, d_bout, d_weights, None, None, None, None, None


def _activation_with_backward(act: Activation, h_SW: torch.Tensor):
    """``(act(h), backward)`` where ``backward(da) = d act / d h * da``. SwiGLU is written out by hand (no autograd
    graph to keep); every other activation gets its backward from autograd."""
    if act.name == "swiglu":
        gate, up = h_SW.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        a = silu * up

        def backward(da: torch.Tensor) -> torch.Tensor:
            d_up = da * silu
            d_gate = da * up * (sig * (1 + gate * (1 - sig)))  # silu'(g) = s (1 + g (1 - s))
            return torch.cat([d_gate, d_up], dim=-1)

        return a, backward
    with torch.enable_grad():
        h = h_SW.detach().requires_grad_(True)
        a = act(h)

    def backward(da: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(a, h, da)[0]

    return a.detach(), backward


def _expert_grad_buffer(w_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Gradient buffer for stacked expert weights: uninitialised, with only the idle experts zeroed (the active
    ones are overwritten by their GEMM), so memory is written once."""
    buf = torch.empty_like(w_EOI)
    for e, n in enumerate(counts):
        if not n:
            buf[e].zero_()
    return buf


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


# --------------------------------------------------------------------------------------- compute dtype
_CPU_BF16_SLOW: bool | None = None


def cpu_bf16_gemm_is_slow() -> bool:
    """True if this CPU's bf16 GEMM is clearly slower than its fp32 GEMM (measured once; env override
    ``MOEKIT_CPU_BF16_UPCAST=0/1``)."""
    global _CPU_BF16_SLOW
    env = os.environ.get("MOEKIT_CPU_BF16_UPCAST")
    if env in ("0", "1"):
        return env == "1"
    if _CPU_BF16_SLOW is None:
        a, b = torch.randn(256, 512), torch.randn(512, 1024)
        rates = {}
        for dt in (torch.float32, torch.bfloat16):
            x, y = a.to(dt), b.to(dt)
            x @ y
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                x @ y
                best = min(best, time.perf_counter() - t0)
            rates[dt] = 1.0 / best
        _CPU_BF16_SLOW = rates[torch.float32] > 1.3 * rates[torch.bfloat16]
    return _CPU_BF16_SLOW


def fused_compute_dtype(x_TD: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.dtype:
    from .backends import compute_dtype

    dtype = compute_dtype(x_TD, weight)
    if dtype == torch.bfloat16 and x_TD.device.type == "cpu" and not torch.compiler.is_compiling():
        active = sum(1 for n in counts if n)
        if active and sum(counts) >= BF16_UPCAST_MIN_ROWS * active and cpu_bf16_gemm_is_slow():
            return torch.float32
    return dtype


def fused_backend(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
    counts = plan.counts_E.tolist()
    S = sum(counts)  # valid slots come first in expert order; empty/dropped slots sit at the end
    slot_S, token_S = plan.order_S[:S], plan.token_S[:S]
    act: Activation = experts.activation
    dtype = fused_compute_dtype(x_TD, experts.w_in, counts)
    args = (x_TD, experts.w_in, experts.w_out, experts.b_in, experts.b_out, plan.weights_TK, token_S, slot_S,
            counts, act, dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6]):
        return FusedExpertsFunction.apply(*args)
    with torch.autocast(x_TD.device.type, enabled=False):
        return fused_forward(*args)[0]
