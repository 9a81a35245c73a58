"""The ``triton`` experts backend: fused gather + grouped GEMM kernels (ScatterMoE / vLLM ``fused_moe`` style) with a
hand-written backward, for CUDA (and ROCm) devices. Kernels: :mod:`moekit.kernels.triton_moe`.

Forward, in three kernels plus the combine:
    h_SW / a_SF = x[token_S] @ w_in[e]^T (+ b_in)    gather inside the GEMM; SwiGLU fused in the epilogue
    y_(T*K)D    = a_SF @ w_out[e]^T (+ b_out)        rows written straight to their slot position order_S[s]
    y_TD        = sum_k w_TK * y_TKD                 fp32, fixed order (deterministic, no atomics)
Backward (a custom autograd Function; saves ``x``, the pre-activation ``h_SW`` and, when the router weights need a
gradient, the unweighted slot outputs):
    dw_TK  = <g_T, y_TK>                                                   router-weight gradient
    dA/dH  = w_S * (g[token_S] @ w_out[e])  (+ SwiGLU backward epilogue, which also recomputes w_S * a_SF)
    dW_out[e] = g[token]_e^T @ (w * a)_e,   dW_in[e] = dH_e^T @ x[token]_e   (+ bias gradients, one kernel each)
    dX     = sum_k (dH @ w_in[e])  scattered to slot order, summed like the forward combine
(the router weights applied in epilogues, never to a GEMM operand inside its K loop).
No permuted copy of ``x`` or of the gradient is ever made, and no host sync (the tile schedule is built on the
device from ``counts_E``). Other activations than SwiGLU run through torch between the two GEMMs.

Where it runs: CUDA tensors when Triton imports; CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``
set before the first use, which is how the tests run it: slow, for correctness only). Anywhere else (CPU without
the interpreter, no Triton, float64, or inside ``torch.compile``) the backend warns once and computes the same result
with ``fused`` (CPU) or ``grouped_mm`` (other devices). fp32 GEMMs follow torch's TF32 switch
(``torch.backends.cuda.matmul.allow_tf32``): exact (``ieee``) by default.

Notation: ``T`` tokens, ``K`` slots per token, ``S = T*K`` slots, ``D`` model dim, ``F`` expert hidden dim, ``W``
input-projection width, ``E`` experts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..kernels import cpu as kcpu
from ..utils import no_autocast
from .activations import Activation

if TYPE_CHECKING:
    from ..dispatch.local import DispatchPlan
    from .fused import Experts

log = logging.getLogger(__name__)

_AVAILABLE: bool | None = None


def triton_available() -> bool:
    """True if Triton imports here (checked once)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        if importlib.util.find_spec("triton") is None:
            _AVAILABLE = False
        else:
            try:
                import triton  # noqa: F401
                _AVAILABLE = True
            except Exception:  # noqa: BLE001 - a broken install counts as absent
                _AVAILABLE = False
    return _AVAILABLE


_KERNELS = None


def _kernels():
    """:mod:`moekit.kernels.triton_moe`, imported on first use (it imports Triton)."""
    global _KERNELS
    if _KERNELS is None:
        from ..kernels import triton_moe

        _KERNELS = triton_moe
    return _KERNELS


def interpreting() -> bool:
    """True if the Triton kernels run under the interpreter (decided when they are first imported)."""
    if not triton_available():
        return False
    import sys

    mod = sys.modules.get("moekit.kernels.triton_moe")
    if mod is not None:
        return mod.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_usable(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` if the Triton backend can run on this device and compute dtype, else the reason it cannot."""
    if kcpu.bypassed():
        return "inside torch.compile or a Python dispatch mode"
    if not triton_available():
        return "Triton is not installed"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"compute dtype {dtype} (supported: float32, bfloat16, float16)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"{device.type} tensors need a GPU (or TRITON_INTERPRET=1 for the slow interpreter)"


_WARNED: set[tuple] = set()


def _fallback(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan", why: str) -> torch.Tensor:
    from .backends import grouped_mm_backend
    from .fused_function import fused_backend

    name = "fused" if x_TD.device.type == "cpu" else "grouped_mm"
    key = (x_TD.device.type, why)
    if key not in _WARNED and not kcpu.bypassed():
        _WARNED.add(key)
        log.warning("the 'triton' experts backend cannot run here (%s); using %r", why, name)
    return (fused_backend if name == "fused" else grouped_mm_backend)(experts, x_TD, plan)


# ------------------------------------------------------------------------------------------------- indices
@dataclass
class _Index:
    """The plan's indices in the form the kernels read them (contiguous, per-expert segment bounds)."""

    ids_TK: torch.Tensor  # int64 [T, K], -1 = empty slot
    order_S: torch.Tensor  # sorted slot -> slot position t*K + k
    token_S: torch.Tensor  # sorted slot -> token
    seg_start_E: torch.Tensor  # int32 first sorted row of each expert
    seg_end_E: torch.Tensor  # int32 one past its last row
    num_experts: int
    schedules: dict = field(default_factory=dict)  # BLOCK_M -> tile schedule (forward and backward share it)

    @classmethod
    def from_plan(cls, plan: "DispatchPlan") -> "_Index":
        end = plan.offsets_E.to(torch.int32).contiguous()
        start = (end - plan.counts_E.to(torch.int32)).contiguous()
        return cls(plan.ids_TK.contiguous(), plan.order_S.contiguous(), plan.token_S.contiguous(), start, end,
                   plan.num_experts)

    @classmethod
    def from_ids(cls, ids_TK: torch.Tensor, num_experts: int, block_m: int) -> tuple["_Index", torch.Tensor]:
        """The index of a dropless routing built by :func:`moekit.kernels.triton_moe.align`, with its tile schedule
        for ``block_m``, and the slots per expert (int64 ``[E + 1]``, the last 0)."""
        return cls._aligned(ids_TK, num_experts, block_m, _kernels().align(ids_TK, num_experts, block_m))

    @classmethod
    def routed(cls, logits_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int, spec: tuple, num_experts: int,
               block_m: int) -> tuple["_Index", torch.Tensor, torch.Tensor]:
        """:meth:`from_ids` of the softmax top-k routing of fp32 ``logits_TE`` (``spec``: renormalise, its minimum,
        scale), routed and indexed in one launch for few tokens (:func:`moekit.kernels.triton_moe.route_and_align`);
        also returns the routing weights. No gradient: inference."""
        ids_TK, weights_TK, aligned = _kernels().route_and_align(logits_TE, bias_E, top_k, *spec, block_m)
        return *cls._aligned(ids_TK, num_experts, block_m, aligned), weights_TK

    @classmethod
    def _aligned(cls, ids_TK, num_experts: int, block_m: int, aligned) -> tuple["_Index", torch.Tensor]:
        order, token, counts, start, end, sched = aligned
        return cls(ids_TK, order, token, start, end, num_experts, {block_m: sched}), counts

    @property
    def num_slots(self) -> int:
        return self.ids_TK.numel()

    @property
    def rows_per_expert(self) -> float:
        return self.num_slots / max(1, self.num_experts)

    def schedule(self, block_m: int):
        if block_m not in self.schedules:
            counts = self.seg_end_E - self.seg_start_E
            self.schedules[block_m] = _kernels().tile_schedule(counts, self.seg_end_E, self.num_slots, block_m)
        return self.schedules[block_m]


def _pair_configs(K_, rows_per_expert: float, n1: int, k1: int, n2: int, k2: int, dtype, swiglu: bool):
    """Configs of two grouped GEMMs over the same rows: they share ``BLOCK_M``, hence one tile schedule; ``swiglu``:
    the first has a SwiGLU epilogue."""
    c1 = K_.gemm_config(rows_per_expert, n1, k1, dtype, swiglu=swiglu)
    c2 = K_.gemm_config(rows_per_expert, n2, k2, dtype)
    c2["BLOCK_M"] = c1["BLOCK_M"]
    return c1, c2


def _gemm_pair_configs(K_, ix: _Index, n1: int, k1: int, n2: int, k2: int, dtype, swiglu: bool):
    """:func:`_pair_configs` for the rows of ``ix``, and their tile schedule."""
    c1, c2 = _pair_configs(K_, ix.rows_per_expert, n1, k1, n2, k2, dtype, swiglu)
    return c1, c2, ix.schedule(c1["BLOCK_M"])


#: rows per expert from which inputs and weights not in the compute dtype (autocast: fp32 parameters, bf16 GEMMs)
#: are cast once before the GEMMs rather than inside them: each weight tile is read by rows / BLOCK_M row tiles, which
#: then read it in half the bytes, and an operand converted in the K loop passes through registers instead of going
#: to shared memory asynchronously (compiled for sm_90: 1.6-1.9x the loop's instructions); from 4 row tiles of 64 rows
#: a cast pass (read fp32, write bf16) costs fewer bytes than the repeated fp32 reads. Below, the kernels convert.
PRECAST_MIN_ROWS = 256


def _cast_operands(x_TD, w_in, w_out, dtype, rows_per_expert: float) -> tuple:
    """``(x_TD, w_in, w_out)`` in ``dtype`` where they are not and the rows per expert reach
    :data:`PRECAST_MIN_ROWS` (the same values the kernels' own casts give: round to nearest even), else as given."""
    if rows_per_expert < PRECAST_MIN_ROWS:
        return x_TD, w_in, w_out
    return tuple(t if t.dtype == dtype else t.detach().to(dtype) for t in (x_TD, w_in, w_out))


# ------------------------------------------------------------------------------------------------- forward
def _forward(x_TD, w_in, w_out, b_in, b_out, weights_TK, ix: _Index, act: Activation, dtype, save_h: bool,
             out_dtype: torch.dtype = torch.float32, cfgs: tuple[dict, dict] | None = None):
    """Returns ``(y_TD, h_SW or None, y_SD slot-major unweighted outputs)``; ``y_TD`` summed in fp32, stored in
    ``out_dtype``. ``cfgs``: the two GEMMs' configs (:func:`_pair_configs`), where the caller has them."""
    K_ = _kernels()
    T, D = x_TD.shape
    S, W, F = ix.num_slots, w_in.shape[1], w_out.shape[2]
    out_TD = torch.empty(T, D, dtype=out_dtype, device=x_TD.device)
    swiglu = act.name == "swiglu"
    if S == 0:
        return out_TD.zero_(), (x_TD.new_empty(0, W, dtype=dtype) if save_h or not swiglu else None), \
            x_TD.new_empty(0, D, dtype=dtype)
    if cfgs is None:
        c1, c2, sched = _gemm_pair_configs(K_, ix, F if swiglu else W, D, D, F, dtype, swiglu=swiglu)
    else:
        (c1, c2), sched = cfgs, ix.schedule(cfgs[0]["BLOCK_M"])
    common = dict(sched=sched, seg_end=ix.seg_end_E, dtype=dtype, rows_per_expert=ix.rows_per_expert)
    if swiglu:
        a_SF = x_TD.new_empty(S, F, dtype=dtype)
        h_SW = x_TD.new_empty(S, W, dtype=dtype) if save_h else None
        K_.grouped_gemm(x_TD, w_in, a_SF, N=F, K=D, stride_bn=w_in.stride(1), stride_bk=w_in.stride(2),
                        gather=ix.token_S, bias=b_in, epilogue=K_.EPI_SWIGLU, half=F, h=h_SW, cfg=c1, **common)
    else:
        h_SW = x_TD.new_empty(S, W, dtype=dtype)
        K_.grouped_gemm(x_TD, w_in, h_SW, N=W, K=D, stride_bn=w_in.stride(1), stride_bk=w_in.stride(2),
                        gather=ix.token_S, bias=b_in, cfg=c1, **common)
        a_SF = act(h_SW)  # rows past the valid ones hold garbage; no kernel reads them
        if not save_h:
            h_SW = None
    y_SD = x_TD.new_empty(S, D, dtype=dtype)  # slot-major: row t*K + k
    K_.grouped_gemm(a_SF, w_out, y_SD, N=D, K=F, stride_bn=w_out.stride(1), stride_bk=w_out.stride(2),
                    scatter=ix.order_S, bias=b_out, cfg=c2, **common)
    K_.combine(y_SD, ix.ids_TK, out_TD, weights_TK.contiguous())
    return out_TD, h_SW, y_SD


class TritonExpertsFunction(torch.autograd.Function):
    """``y_TD = sum_k w_TK * expert_{id_TK}(x_TD)`` (summed in fp32, returned in ``out_dtype``) with Triton kernels
    forward and backward."""

    @staticmethod
    def forward(ctx, x_TD, w_in, w_out, b_in, b_out, weights_TK, ix: _Index, act: Activation, dtype,
                out_dtype=torch.float32, cfgs=None):
        cast = _cast_operands(x_TD, w_in, w_out, dtype, ix.rows_per_expert)
        out_TD, h_SW, y_SD = _forward(*cast, b_in, b_out, weights_TK, ix, act, dtype, save_h=True,
                                      out_dtype=out_dtype, cfgs=cfgs)
        ctx.save_for_backward(x_TD, w_in, w_out, b_in, b_out, weights_TK)
        # the cast operands, for the backward's GEMMs (dropped there once used), where any was cast
        ctx.cast = None if all(c is t for c, t in zip(cast, (x_TD, w_in, w_out))) else list(cast)
        ctx.out_dtype = out_dtype
        # intermediates ride on ctx, not in save_for_backward, so that backward can drop each once it is used: saved
        # tensors live until backward returns (h_SW is the largest buffer, S x 2F)
        ctx.h_SW, ctx.y_SD = h_SW, y_SD if ctx.needs_input_grad[5] else None
        ctx.ix, ctx.act, ctx.dtype = ix, act, dtype
        ctx.bias_dtypes = (None if b_in is None else b_in.dtype, None if b_out is None else b_out.dtype)
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        x_TD, w_in, w_out, b_in, b_out, weights_TK = ctx.saved_tensors
        if torch.is_grad_enabled() or ctx.h_SW is None:  # (double backward, or a second pass through this graph,
            # retain_graph=True, after the kernels' backward dropped what it kept: the loop reference's sums, which
            # autograd differentiates; a second pass reaching this node after a double backward's runs the kernels)
            return (*_reference_backward(ctx, g_TD, x_TD, w_in, w_out, b_in, b_out, weights_TK),
                    None, None, None, None, None)
        h_SW, y_SD = ctx.h_SW, ctx.y_SD
        ctx.h_SW = ctx.y_SD = None
        x_c, w_in_c, w_out_c = ctx.cast or (x_TD, w_in, w_out)  # (the GEMMs' operands; gradients take the originals')
        ctx.cast = None
        ix, act, dtype = ctx.ix, ctx.act, ctx.dtype
        need_x, need_win, need_wout, need_bin, need_bout, need_w = ctx.needs_input_grad[:6]
        K_ = _kernels()
        T, D = x_TD.shape
        S, W, F, E = ix.num_slots, w_in.shape[1], w_out.shape[2], ix.num_experts
        dev = g_TD.device
        d_x = d_win = d_wout = d_bin = d_bout = d_weights = None
        if S == 0:
            z = torch.zeros_like
            return (z(x_TD) if need_x else None, z(w_in) if need_win else None, z(w_out) if need_wout else None,
                    torch.zeros(E, W, dtype=ctx.bias_dtypes[0], device=dev) if need_bin else None,
                    torch.zeros(E, D, dtype=ctx.bias_dtypes[1], device=dev) if need_bout else None,
                    z(weights_TK) if need_w else None, None, None, None, None, None)
        if need_w:
            d_weights = K_.weights_grad(g_TD, y_SD, ix.ids_TK).to(weights_TK.dtype)
        del y_SD
        if not (need_x or need_win or need_wout or need_bin or need_bout):
            return d_x, d_win, d_wout, d_bin, d_bout, d_weights, None, None, None, None, None

        if g_TD.dtype != dtype:  # (an output summed in fp32, as beside shared experts: cast once, rounded as the kernels
            # round, so the two GEMMs that read it once per slot take it straight from memory, not converting in their
            # K loops: compiled for sm_90, 1.6-1.8x the loop's instructions)
            g_TD = g_TD.to(dtype)
        w_S = weights_TK.reshape(-1).index_select(0, ix.order_S).float()  # sorted router weights
        swiglu = act.name == "swiglu"
        c_da, c_dx, sched = _gemm_pair_configs(K_, ix, F, D, D, W, dtype, swiglu=swiglu)
        common = dict(sched=sched, seg_end=ix.seg_end_E, dtype=dtype, rows_per_expert=ix.rows_per_expert)
        # dA = w * (g[token_S] @ w_out[e]):  B[e][n=f, k=d] = w_out[e, d, f]; a_SF = w * act, for d_wout
        if swiglu:
            dh_SW = x_TD.new_empty(S, W, dtype=dtype)
            a_SF = x_TD.new_empty(S, F, dtype=dtype)
            K_.grouped_gemm(g_TD, w_out_c, dh_SW, N=F, K=D, stride_bn=w_out_c.stride(2), stride_bk=w_out_c.stride(1),
                            gather=ix.token_S, scale=w_S, epilogue=K_.EPI_SWIGLU_BWD, half=F, h=h_SW, act=a_SF,
                            cfg=c_da, **common)
        else:
            from .fused_function import _activation_with_backward

            da_SF = x_TD.new_empty(S, F, dtype=dtype)
            K_.grouped_gemm(g_TD, w_out_c, da_SF, N=F, K=D, stride_bn=w_out_c.stride(2), stride_bk=w_out_c.stride(1),
                            gather=ix.token_S, scale=w_S, cfg=c_da, **common)
            a_SF, act_backward = _activation_with_backward(act, h_SW)
            dh_SW = act_backward(da_SF)
            del da_SF
            a_SF.mul_(w_S[:, None])  # (as the SwiGLU epilogue does: the router weights on it, for d_wout; fp32 product)
        del h_SW, w_out_c
        seg = dict(seg_start=ix.seg_start_E, seg_end=ix.seg_end_E, dtype=dtype, rows_per_expert=ix.rows_per_expert)
        if need_wout or need_bout:
            d_wout = torch.empty_like(w_out)
            d_bout = torch.empty(E, D, dtype=ctx.bias_dtypes[1], device=dev) if need_bout else None
            K_.grouped_xty(g_TD, a_SF, d_wout, gather_l=ix.token_S, dbias=d_bout, dbias_scale=w_S, **seg)
            d_wout = d_wout if need_wout else None
        del a_SF
        if need_x:  # (before the input projection's weight gradient: its slot rows are gone by then)
            # dX rows: dH @ w_in[e]  (B[e][n=d, k=w] = w_in[e, w, d]), scattered to slot order, then summed over k
            dx_SD = x_TD.new_empty(S, D, dtype=dtype)
            K_.grouped_gemm(dh_SW, w_in_c, dx_SD, N=D, K=W, stride_bn=w_in_c.stride(2), stride_bk=w_in_c.stride(1),
                            scatter=ix.order_S, cfg=c_dx, **common)
            d_x = K_.combine(dx_SD, ix.ids_TK, torch.empty(T, D, dtype=x_TD.dtype, device=dev))
            del dx_SD
        del w_in_c
        if need_win or need_bin:
            d_win = torch.empty_like(w_in)
            d_bin = torch.empty(E, W, dtype=ctx.bias_dtypes[0], device=dev) if need_bin else None
            K_.grouped_xty(dh_SW, x_c, d_win, gather_r=ix.token_S, dbias=d_bin, **seg)
            d_win = d_win if need_win else None
        return d_x, d_win, d_wout, d_bin, d_bout, d_weights, None, None, None, None, None


def _reference_backward(ctx, g_TD, *inputs) -> tuple:
    """:class:`TritonExpertsFunction`'s gradients (for a double backward, or a second pass through one graph) from
    its output recomputed by the loop reference's sums over the index's expert segments
    (:func:`moekit.utils.grads_by_reference`)."""
    from ..utils import grads_by_reference
    from .backends import expert_rows_sum, segment_rows

    ix, act, dtype, out_dtype = ctx.ix, ctx.act, ctx.dtype, ctx.out_dtype
    bounds = list(zip(ix.seg_start_E.tolist(), ix.seg_end_E.tolist()))

    def reference(x, wi, wo, bi, bo, w):
        rows = segment_rows(w, ix.token_S, ix.order_S, bounds)
        return expert_rows_sum(x, wi, wo, bi, bo, act, dtype, rows).to(out_dtype)

    return grads_by_reference(reference, inputs, ctx.needs_input_grad[:6], (g_TD,))


def triton_backend(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
    from .backends import compute_dtype

    dtype = compute_dtype(x_TD, experts.w_in)
    why = triton_usable(x_TD.device, dtype)
    if why is not None:
        return _fallback(experts, x_TD, plan, why)
    return _run(experts, x_TD, plan.weights_TK, _Index.from_plan(plan), dtype, torch.float32)


def _run(experts: "Experts", x_TD, weights_TK, ix: _Index, dtype, out_dtype) -> torch.Tensor:
    """The experts over index ``ix``: through :class:`TritonExpertsFunction` where a gradient is wanted, else the
    forward alone (no pre-activations kept)."""
    args = (x_TD, experts.w_in, experts.w_out, experts.b_in, experts.b_out, weights_TK)
    with no_autocast(x_TD.device.type):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            return TritonExpertsFunction.apply(*args, ix, experts.activation, dtype, out_dtype)
        return _forward(*_cast_operands(*args[:3], dtype, ix.rows_per_expert), *args[3:], ix, experts.activation,
                        dtype, save_h=False, out_dtype=out_dtype)[0]


def routed_usable(experts: "Experts", x_TD: torch.Tensor, num_slots: int) -> bool:
    """Whether :func:`routed_forward` runs these rows: the ``triton`` backend (or ``auto`` on a GPU) usable here, and
    few enough experts for the index (:func:`moekit.kernels.triton_moe.align_usable`)."""
    from .backends import compute_dtype

    dtype = compute_dtype(x_TD, experts.w_in)
    return selects_triton(experts.backend, x_TD.device, dtype) and \
        _plan_free_block_m(num_slots, experts.num_experts, dtype, experts.backend == "auto") is not None


def selects_triton(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether experts of ``backend`` run Triton's kernels on ``device`` in ``dtype``: the ``triton`` backend, or
    ``auto`` on a GPU, with Triton usable there (:func:`triton_usable`)."""
    return (backend == "triton" or (backend == "auto" and device.type == "cuda")) and \
        triton_usable(device, dtype) is None


def _plan_free_block_m(num_slots: int, num_experts: int, dtype: torch.dtype, auto: bool) -> int | None:
    """The tiles' ``BLOCK_M`` for ``num_slots`` dropless slots on the plan-free path, or None where it does not take
    them: ``auto`` preferring the library GEMMs there (:func:`moekit.experts.backends.auto_prefers_triton`), or too
    many experts for the index (:func:`moekit.kernels.triton_moe.align_usable`)."""
    from .backends import auto_prefers_triton

    K_, rows = _kernels(), num_slots / num_experts
    if auto and not auto_prefers_triton(dtype, rows):
        return None
    block_m = K_.block_m_for(rows, dtype)
    return block_m if K_.align_usable(num_slots, num_experts) else None


def routed_forward(experts: "Experts", x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts on a dropless top-k routing without a dispatch plan: the index (sorted slots, segments, tile
    schedule) comes from one kernel instead of the dispatcher's sort, counts and cumsum and the schedule's ~20 small
    ops, which is most of a small batch's launches. Returns ``(y_TD in out_dtype, slots per expert int64 [E],
    dropped slots: a 0-dim 0)``;
    forward and backward are :class:`TritonExpertsFunction`'s. Check :func:`routed_usable` first."""
    from .backends import compute_dtype

    E, dtype = experts.num_experts, compute_dtype(x_TD, experts.w_in)
    ix, counts = _Index.from_ids(ids_TK.contiguous(), E, _kernels().block_m_for(ids_TK.numel() / E, dtype))
    return _run(experts, x_TD, weights_TK, ix, dtype, out_dtype), *_split_counts(counts, E)


def routed_inference(experts: "Experts", x_TD: torch.Tensor, logits_TE: torch.Tensor, bias_E: torch.Tensor,
                     top_k: int, spec: tuple, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`routed_forward` of the softmax top-k routing of ``logits_TE`` (``spec``: renormalise, its minimum,
    scale), routed and indexed together (:meth:`_Index.routed`: one launch for few tokens). Inference: no gradient
    of the routing. Check :func:`routed_usable` first."""
    from .backends import compute_dtype

    E, dtype = experts.num_experts, compute_dtype(x_TD, experts.w_in)
    ix, counts, weights_TK = _Index.routed(logits_TE, bias_E, top_k, spec, E,
                                           _kernels().block_m_for(logits_TE.shape[0] * top_k / E, dtype))
    return _run(experts, x_TD, weights_TK, ix, dtype, out_dtype), *_split_counts(counts, E)


def _split_counts(counts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~moekit.kernels.triton_moe.align`'s ``[E + 1]`` counts as ``(slots per expert, dropped slots)``
    (``narrow``/``select``, not ``counts[:E], counts[E]``: ~10 us less host time)."""
    return counts.narrow(0, 0, num_experts), counts.select(0, num_experts)


class PreparedRouted:
    """A layer's forward on the Triton path with a plain softmax top-k router, decided once per module state
    (:meth:`moekit.MoE._triton_prepared` caches it as the CPU decode's call is): the router's logits, the routing
    kernel (:func:`moekit.kernels.triton_moe.topk_softmax`), the index (:func:`~moekit.kernels.triton_moe.align`)
    and the experts' kernels, as the layer's plan-free paths run them, with their checks and the kernels' tile
    configurations decided once per token count instead of in every call: :meth:`__call__` in inference (as
    :meth:`moekit.MoE._planless_inference`), :meth:`train_step` with autograd (as the router module, the routing's
    :class:`~moekit.routing.softmax_topk.TopKSoftmaxFunction` and :meth:`Experts.planless`, the routing and the index
    in one launch for few tokens: :class:`~moekit.routing.softmax_topk.TopKSoftmaxAlignFunction`). A one-token forward's
    host time was ~2/3 those checks and the Python between the calls (``benchmarks/bench_triton_host.py``).

    Holds the parameters themselves (updated in place, they stay valid); built only where the layer's own checks
    pass (dropless local dispatch, no disabled expert, no input jitter in training, the ``triton`` backend or
    ``auto`` on a GPU, Triton usable for the weights' device and dtype). Both return None wherever the regular path
    must run instead."""

    def __init__(self, router, experts: "Experts", top_k: int, spec: tuple, out_dtype: torch.dtype):
        from ..utils import acc_dtype

        self.w_r, self.b_r, self.expert_bias = router.weight, router.bias, router.expert_bias
        self.w_in, self.w_out, self.b_in, self.b_out = experts.w_in, experts.w_out, experts.b_in, experts.b_out
        self.act, self.top_k, self.spec, self.out_dtype = experts.activation, top_k, spec, out_dtype
        self.auto = experts.backend == "auto"
        self.dtype, self.device = experts.w_in.dtype, experts.w_in.device
        self.E, self.D = experts.num_experts, experts.w_in.shape[2]
        self.acc = acc_dtype(self.dtype, self.w_r.dtype)
        self._plans: dict = {}

    def _plan(self, T: int):
        """``(BLOCK_M, the two GEMMs' configs)`` for ``T`` tokens, or None where the plan-free path does not take
        them (:func:`_plan_free_block_m`)."""
        K_ = _kernels()
        S, F = T * self.top_k, self.w_out.shape[2]
        block_m = _plan_free_block_m(S, self.E, self.dtype, self.auto)
        plan = None
        if block_m is not None:
            swiglu = self.act.name == "swiglu"
            plan = block_m, _pair_configs(K_, S / self.E, F if swiglu else self.w_in.shape[1], self.D, self.D, F,
                                          self.dtype, swiglu)
        if len(self._plans) >= 256:  # (a bounded memo: token counts vary in serving)
            self._plans.clear()
        self._plans[T, K_.INTERPRET] = plan
        return plan

    def __call__(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(y_TD in out_dtype, slots per expert int64 [E], dropped slots: a 0-dim 0)`` for 2-D ``x_TD`` of the
        weights' dtype, as :func:`routed_forward` returns them, or None."""
        plan = self._plan_for(x_TD)
        if plan is None:
            return None
        block_m, cfgs = plan
        ix, counts, weights_TK = _Index.routed(self._logits(x_TD).contiguous(), self.expert_bias, self.top_k,
                                               self.spec, self.E, block_m)
        y_TD = _forward(x_TD, self.w_in, self.w_out, self.b_in, self.b_out, weights_TK, ix, self.act, self.dtype,
                        save_h=False, out_dtype=self.out_dtype, cfgs=cfgs)[0]
        return y_TD, *_split_counts(counts, self.E)

    def train_step(self, x_TD: torch.Tensor) -> tuple | None:
        """With autograd: ``(y_TD, slots per expert, dropped slots)`` as :meth:`__call__` returns them and the routing
        as the router returns it, for 2-D ``x_TD`` of the weights' dtype, differentiable in ``x_TD`` and every
        parameter, or None."""
        from ..routing.base import RouterOutput
        from ..routing.softmax_topk import TopKSoftmaxAlignFunction

        plan = self._plan_for(x_TD)
        if plan is None:
            return None
        logits_TE = self._logits(x_TD)
        block_m, cfgs = plan
        ids_TK, weights_TK, probs_TE, *index = TopKSoftmaxAlignFunction.apply(
            logits_TE.contiguous(), self.expert_bias, self.top_k, *self.spec, block_m)
        order, token, counts, start, end, tile_expert, tile_row, num_tiles = index
        ix, counts = _Index._aligned(ids_TK, self.E, block_m,
                                     (order, token, counts, start, end, (tile_expert, tile_row, num_tiles)))
        y_TD = TritonExpertsFunction.apply(x_TD, self.w_in, self.w_out, self.b_in, self.b_out, weights_TK, ix,
                                           self.act, self.dtype, self.out_dtype, cfgs)
        return y_TD, *_split_counts(counts, self.E), RouterOutput(logits_TE, probs_TE, ids_TK, weights_TK)

    def _plan_for(self, x_TD: torch.Tensor):
        plan = self._plans.get((x_TD.shape[0], _kernels().INTERPRET), False)
        if plan is False:
            plan = self._plan(x_TD.shape[0])
        return None if plan is None or x_TD.device != self.device else plan

    def _logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The router's logits as :meth:`moekit.routing.Router.logits` computes them (no expert disabled, no
        autocast: checked by the caller)."""
        from ..routing import base as rb

        b_r = self.b_r
        return rb.linear_autograd(x_TD, self.w_r, None if b_r is None else b_r.to(self.acc), self.acc)
