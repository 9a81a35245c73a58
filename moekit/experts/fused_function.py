"""The ``fused`` experts backend: one autograd Function for gather → GEMM → activation → GEMM → weighted combine.

Work is done expert by expert: each expert gathers its rows, runs its two projections with the fastest CPU GEMM of
the machine (:mod:`moekit.experts.cpu_gemm`), applies the activation and adds its weighted output to the tokens,
while its intermediates are still in cache.

Why a custom Function: autograd on the composed ops saves every intermediate (gathered rows, both halves of the
gate/up projection, the activation output, the weighted rows, the unweighted outputs) and its backward of a grouped
GEMM fills zeros expert by expert. Here forward saves only the pre-activations (plus indices). Backward re-gathers
the input rows, recomputes the activation, and gets the router-weight gradient without the expert outputs:
``dL/dw_s = g_t · y_s = (g_t @ W_out) · a_s (+ g_t · b_out)``, and ``g_t @ W_out`` is needed for ``dA`` anyway.
Weight gradients are written once, only idle experts are zeroed. Without autograd (inference) the Function is
skipped altogether.

Compute dtype: the autocast dtype if autocast is on, else the weights' dtype, except that on CPUs whose bf16 GEMM
is slower than fp32 (neither AMX nor AVX512-BF16: measured once per process), bf16 layers whose experts average at
least ``BF16_UPCAST_MIN_ROWS`` rows run their GEMMs in fp32 (more accurate, and faster there); outputs keep the input
dtype. Expert weights are cast to the compute dtype one expert at a time, so no full-size cast copy is ever made.

Notation: ``T`` tokens, ``S`` valid slots in expert order, ``D`` model dim, ``W`` input-projection width
(``2F`` gated, ``F`` plain), ``F`` expert hidden dim, ``E`` experts, ``m`` rows of one expert.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .activations import Activation
from ..kernels import cpu as kcpu
from .cpu_gemm import linear, linear_into

if TYPE_CHECKING:
    from ..dispatch.local import DispatchPlan
    from .fused import Experts

#: bf16 layers whose active experts get at least this many rows on average compute in fp32 on slow-bf16 CPUs.
BF16_UPCAST_MIN_ROWS = 64
#: Experts with at most this many rows run in the small-M kernels rather than one library GEMM each (measured
#: crossover on AVX-512 CPUs: the small kernels win up to ~16-24 rows; benchmarks/results/small_m.json).
SMALL_M = 24


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _row(b: torch.Tensor | None, e: int, dtype: torch.dtype, sl: slice = slice(None)) -> torch.Tensor | None:
    return None if b is None else b[e, sl].to(dtype)


def _activate(act: Activation, h: torch.Tensor) -> torch.Tensor:
    return kcpu.swiglu(h) if act.name == "swiglu" else act(h)


def fused_forward(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S, counts, activation, dtype,
                  save: bool = False):
    """The forward math; returns ``(y_TD fp32, [pre-activation h of each active expert] or None)``.

    Experts with at most ``SMALL_M`` rows run together in the small-M kernels (two calls for the whole layer; see
    :func:`moekit.kernels.cpu.small_experts_up`). Each other expert: gather its rows, ``h = x @ W_in^T`` (gate and
    up in one GEMM), the activation on ``h`` while it is in cache, ``y = a @ W_out^T``, then ``out[token] += w * y``
    (one thread per row: the rows of one expert belong to distinct tokens)."""
    x_c = x_TD if x_TD.dtype == dtype else x_TD.to(dtype)
    w_S = weights_TK.reshape(-1).index_select(0, slot_S).float()
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    segments = list(_segments(counts))
    small = [n <= SMALL_M for _, s, t in segments for n in (t - s,)]
    pre: dict[int, torch.Tensor] = {}
    if any(small) and kcpu.small_gemm_usable(x_c, w_in, w_out, b_in, b_out) and w_in.dtype == dtype:
        start = torch.tensor([s for _, s, _ in segments], dtype=torch.int64)
        end = torch.tensor([t if sm else s for (_, s, t), sm in zip(segments, small)], dtype=torch.int64)
        ids = torch.tensor([e for e, _, _ in segments], dtype=torch.int64)
        E = w_in.shape[0]
        start_E = torch.zeros(E, dtype=torch.int64).index_copy_(0, ids, start)
        end_E = torch.zeros(E, dtype=torch.int64).index_copy_(0, ids, end)
        swiglu = activation.name == "swiglu"
        h, a = kcpu.small_experts_up(x_c, token_S, start_E, end_E, w_in, b_in, swiglu, save, check_index=False)
        if not swiglu:
            a = activation(h)
        kcpu.small_experts_down(a, token_S, w_S, start_E, end_E, w_out, b_out, out_TD, check_index=False)
        if save:
            pre = {i: h[s:t] for i, ((_, s, t), sm) in enumerate(zip(segments, small)) if sm}
    else:
        small = [False] * len(segments)
    for i, (e, s, t) in enumerate(segments):
        if small[i]:
            continue
        tok = token_S[s:t]
        h = linear(x_c.index_select(0, tok), w_in[e].to(dtype), _row(b_in, e, dtype))
        y = linear(_activate(activation, h), w_out[e].to(dtype), _row(b_out, e, dtype))
        kcpu.scatter_add_rows(out_TD, tok, y, w_S[s:t], check_index=False)
        if save:
            pre[i] = h
    return out_TD, [pre[i] for i in range(len(segments))] if save else None


class FusedExpertsFunction(torch.autograd.Function):
    """``y_TD = sum_k w_TK * expert_{id_TK}(x_TD)`` in fp32, with a hand-written, memory-lean backward."""

    @staticmethod
    def forward(ctx, x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S, counts, activation, dtype):
        with torch.autocast(x_TD.device.type, enabled=False):
            out_TD, saved = fused_forward(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S, counts,
                                          activation, dtype, save=True)
        # Pre-activations of bf16 layers computed in fp32 are kept in bf16: half the memory, and no less precise
        # than a bf16 computation would have been.
        keep = x_TD.dtype if x_TD.dtype.itemsize < dtype.itemsize else dtype
        ctx.pre = [h.to(keep) for h in saved]
        ctx.save_for_backward(x_TD, w_in, w_out, b_out, weights_TK, token_S, slot_S)
        ctx.counts, ctx.activation, ctx.dtype = counts, activation, dtype
        ctx.bias_dtypes = (None if b_in is None else b_in.dtype, None if b_out is None else b_out.dtype)
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        x_TD, w_in, w_out, b_out, weights_TK, token_S, slot_S = ctx.saved_tensors
        counts, act, dtype, pre = ctx.counts, ctx.activation, ctx.dtype, ctx.pre
        ctx.pre = None
        need_x, need_win, need_wout, need_bin, need_bout, need_w = ctx.needs_input_grad[:6]
        dev = g_TD.device
        with torch.autocast(dev.type, enabled=False):
            x_c = x_TD if x_TD.dtype == dtype else x_TD.to(dtype)
            g_TD = g_TD.float().contiguous()
            w_S = weights_TK.reshape(-1).index_select(0, slot_S).float()
            dw_S = torch.empty(w_S.shape, dtype=torch.float32, device=dev) if need_w else None
            d_x = torch.zeros(x_TD.shape, dtype=torch.float32, device=dev) if need_x else None
            d_win = _expert_grad_buffer(w_in, counts) if need_win else None
            d_wout = _expert_grad_buffer(w_out, counts) if need_wout else None
            d_bin = torch.zeros(w_in.shape[:2], dtype=ctx.bias_dtypes[0], device=dev) if need_bin else None
            d_bout = torch.zeros(w_out.shape[:2], dtype=ctx.bias_dtypes[1], device=dev) if need_bout else None
            for i, (e, s, t) in enumerate(_segments(counts)):
                tok, w_m = token_S[s:t], w_S[s:t]
                h, pre[i] = pre[i].to(dtype), None
                g_m = kcpu.gather_rows(g_TD, tok, dtype, check_index=False)  # upstream gradient of the rows
                # ga = g @ W_out (unweighted) gives dA = w * ga and the router-weight gradient ga . a
                ga = linear(g_m, w_out[e].to(dtype).T)
                dh, aw, dw = _activation_backward(act, h, ga, w_m, need_w, need_wout)
                del ga
                if need_w:
                    if b_out is not None:  # y = a W_out^T + b_out, so dL/dw also has g . b_out
                        dw += g_TD.index_select(0, tok) @ b_out[e].float()
                    dw_S[s:t] = dw
                if need_wout:
                    linear_into(d_wout[e], g_m.T, aw.T)  # dW_out = g^T @ (w a)
                if need_bout:
                    d_bout[e] = w_m @ g_TD.index_select(0, tok)
                del aw, g_m
                x_m = x_c.index_select(0, tok)
                if need_win:
                    linear_into(d_win[e], dh.T, x_m.T)  # dW_in = dH^T @ x
                if need_bin:
                    d_bin[e] = dh.sum(0, dtype=torch.float32)
                if need_x:
                    kcpu.scatter_add_rows(d_x, tok, linear(dh, w_in[e].to(dtype).T), check_index=False)  # dH @ W_in
            d_weights = None
            if need_w:
                d_weights = torch.zeros(weights_TK.numel(), dtype=torch.float32, device=dev)
                d_weights = d_weights.index_copy_(0, slot_S, dw_S).view(weights_TK.shape).to(weights_TK.dtype)
            if need_x:
                d_x = d_x.to(x_TD.dtype)
        return d_x, d_win, d_wout, d_bin, d_bout, d_weights, None, None, None, None, None


def _activation_backward(act: Activation, h: torch.Tensor, ga: torch.Tensor, w_m: torch.Tensor, need_dw: bool,
                         need_aw: bool):
    """``(dH, w * a, dw)`` of one expert from its pre-activation ``h``, the unweighted gradient ``ga`` of its
    activation output and its rows' router weights ``w_m``: ``dH = act'(h) * (w ga)``, ``dw = rowsum(ga * a)``.
    SwiGLU runs in one fused pass (:func:`moekit.kernels.cpu.swiglu_backward`); every other activation is
    recomputed and differentiated by autograd."""
    if act.name == "swiglu":
        return kcpu.swiglu_backward(h, ga, w_m, need_dw, need_aw)
    a, act_backward = _activation_with_backward(act, h)
    w_col = w_m[:, None]
    dw = (ga.float() * a.float()).sum(-1) if need_dw else None
    aw = (a * w_col).to(a.dtype) if need_aw else None
    return act_backward((ga * w_col).to(ga.dtype)), aw, dw


def _activation_with_backward(act: Activation, h: torch.Tensor):
    """``(act(h), backward)`` where ``backward(da) = d act / d h * da``, from autograd (the activations without a
    hand-written backward; SwiGLU has :func:`moekit.kernels.cpu.swiglu_backward`)."""
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
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
        a, b = torch.randn(256, 512), torch.randn(1024, 512)
        rates = {}
        for dt in (torch.float32, torch.bfloat16):
            x, y = a.to(dt), b.to(dt)
            linear(x, y)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                linear(x, y)
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
