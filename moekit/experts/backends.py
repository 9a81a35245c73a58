"""Experts backends: how the per-expert GEMMs run. All take ``(experts, x_TD, plan)`` and return fp32 ``y_TD``.

- ``loop``: the obviously-correct reference. For each expert, find its slots with ``torch.where``, run the
  expert, add ``weight * output`` to the token. Ignores the plan's sort entirely.
- ``dense``: every expert on every token, weighted by the routing (zero where not chosen): ``E / K`` times the
  FLOPs, but no shape depends on the routing, which ``torch.func.vmap`` needs (the layer takes it there itself).
- ``segment``: expert-sorted rows, one ``torch.mm`` per non-empty expert segment (needs the counts on the host).
- ``grouped_mm``: expert-sorted rows, one PyTorch grouped GEMM per projection (``torch.nn.functional.grouped_mm``,
  or ``torch._grouped_mm`` on older releases), no host sync. Falls back to ``segment`` where the running torch
  or device has no grouped GEMM for the dtype.
- ``fused``: one custom autograd Function (gather, per-expert GEMMs, activation, weighted combine) that saves only
  what backward needs; see :mod:`moekit.experts.fused_function`.
- ``triton``: Triton kernels (gather fused into grouped GEMMs, SwiGLU epilogue, hand-written backward) for CUDA;
  see :mod:`moekit.experts.triton_backend`. On CPU it runs only under ``TRITON_INTERPRET=1``, else falls back.
- ``auto``: ``fused`` on CPU (in compiled code traced whole, as custom operators: :mod:`.fused_op`), else ``triton`` where Triton imports (not under ``torch.compile``) except
  for fp32 with many rows per expert (where cuBLAS's exact fp32 GEMMs beat Triton's, see
  :func:`auto_prefers_triton`), else ``grouped_mm`` where available, else ``segment``.

Notation: ``T`` tokens, ``S`` sorted slots, ``D`` model dim, ``F`` expert hidden dim, ``E`` experts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from ..kernels import cpu as kcpu
from ..utils import acc_dtype, autocast_enabled, grads_by_reference
from .op_flops import count_in_flop_counters

if TYPE_CHECKING:
    from ..dispatch.local import DispatchPlan
    from .fused import Experts

log = logging.getLogger(__name__)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: the autocast dtype if autocast is on, else the weights' dtype."""
    dev = x.device.type
    if autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


# ------------------------------------------------------------------------------------------------ loop
def loop_backend(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
    return expert_rows_sum(x_TD, experts.w_in, experts.w_out, experts.b_in, experts.b_out, experts.activation,
                           compute_dtype(x_TD, experts.w_in), slot_rows(plan.ids_TK, plan.weights_TK,
                                                                        experts.num_experts))


def slot_rows(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int):
    """:func:`expert_rows_sum`'s rows of a routing: per expert, its tokens (``torch.where``) and their weights;
    idle experts too (their empty products give the zero gradients every other backend gives)."""
    for e in range(num_experts):
        tok_N, slot_N = torch.where(ids_TK == e)
        yield e, tok_N, weights_TK[tok_N, slot_N]


def segment_rows(weights_TK: torch.Tensor, token_S: torch.Tensor, slot_S: torch.Tensor, bounds):
    """:func:`expert_rows_sum`'s rows of expert-sorted slots: expert ``e`` owns sorted slots ``bounds[e] = (s, t)``,
    their tokens ``token_S[s:t]`` and slot positions ``slot_S[s:t]`` (into the flattened ``weights_TK``)."""
    w_S = weights_TK.reshape(-1)
    for e, (s, t) in enumerate(bounds):
        yield e, token_S[s:t].long(), w_S[slot_S[s:t].long()]


def expert_rows_sum(x_TD: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, b_in: torch.Tensor | None,
                    b_out: torch.Tensor | None, act, dtype: torch.dtype, rows) -> torch.Tensor:
    """``y_TD = sum w_N * expert_e(x_TD[tok_N])`` (summed in fp32, float64 for float64) over ``rows``
    (``(e, tok_N, w_N)``: an expert, its tokens and their routing weights), each expert computed in ``dtype`` with
    PyTorch's operations: the loop reference's sums,
    differentiable (twice) in every input."""
    x_TD = x_TD.to(dtype)
    acc = acc_dtype(dtype)
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=acc)
    for e, tok_N, w_N in rows:
        h = F.linear(x_TD[tok_N], w_in[e].to(dtype), _cast(_row(b_in, e), dtype))
        out = F.linear(act(h), w_out[e].to(dtype), _cast(_row(b_out, e), dtype))
        y_TD = y_TD.index_add(0, tok_N, out.to(acc) * w_N[:, None].to(acc))
    return y_TD


def dense_weights(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``w_TE`` in ``dtype`` (each token's routing weight per expert, summed over its slots; 0 where none) and bool
    ``chosen_TE`` (whether any of its slots holds that expert; empty slots, ``-1``, hold none)."""
    valid_TK = ids_TK >= 0
    key_TK = ids_TK.clamp_min(0)
    zeros_TE = weights_TK.new_zeros(ids_TK.shape[0], num_experts, dtype=dtype)
    w_TE = zeros_TE.scatter_add(1, key_TK, torch.where(valid_TK, weights_TK.to(dtype), 0.0))
    return w_TE, zeros_TE.scatter_add(1, key_TK, valid_TK.to(dtype)) > 0


def dense_backend(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
    """Every expert on every token, each output weighted by the token's routing weight for that expert (none where
    it did not choose it): the ``loop`` reference's sums with shapes that do not depend on the routing, so it runs
    under ``torch.func.vmap`` (per-sample gradients), at ``E / K`` times the FLOPs of the others."""
    dtype = compute_dtype(x_TD, experts.w_in)
    x_TD = x_TD.to(dtype)
    acc = acc_dtype(dtype)
    w_TE, chosen_TE = dense_weights(plan.ids_TK, plan.weights_TK, experts.num_experts, acc)
    h_ETW = torch.einsum("td,ewd->etw", x_TD, experts.w_in.to(dtype))
    if experts.b_in is not None:
        h_ETW = h_ETW + experts.b_in.to(dtype)[:, None]
    y_ETD = torch.einsum("etf,edf->etd", experts.activation(h_ETW), experts.w_out.to(dtype))
    if experts.b_out is not None:
        y_ETD = y_ETD + experts.b_out.to(dtype)[:, None]
    # (an expert a token did not choose adds nothing, not 0 * its output, which may be inf)
    y_ETD = torch.where(chosen_TE.T[..., None], y_ETD.to(acc), 0.0)
    return torch.einsum("te,etd->td", w_TE, y_ETD)


def _row(b: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if b is None else b[e]


# --------------------------------------------------------------------------------------------- segment
# One torch.mm per expert over its contiguous rows. Registered as custom ops so torch.compile treats the
# data-dependent loop as one opaque call (no graph break, works with fullgraph=True).
@torch.library.custom_op("moekit::segment_linear", mutates_args=())
def _segment_linear(x_SI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    out = x_SI.new_zeros(x_SI.shape[0], w_EOI.shape[1])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):  # one host sync for all experts
        if end > start:
            torch.mm(x_SI[start:end], w_EOI[e].T, out=out[start:end])
        start = end
    return out


@_segment_linear.register_fake
def _(x_SI, w_EOI, offsets_E):
    return x_SI.new_empty(x_SI.shape[0], w_EOI.shape[1])


@torch.library.custom_op("moekit::segment_linear_backward", mutates_args=())
def _segment_linear_backward(grad_SO: torch.Tensor, x_SI: torch.Tensor, w_EOI: torch.Tensor,
                             offsets_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = torch.zeros_like(x_SI)
    grad_w = torch.zeros_like(w_EOI)
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(grad_SO[start:end], w_EOI[e], out=grad_x[start:end])
            torch.mm(grad_SO[start:end].T, x_SI[start:end], out=grad_w[e])
        start = end
    return grad_x, grad_w


@_segment_linear_backward.register_fake
def _(grad_SO, x_SI, w_EOI, offsets_E):
    return torch.empty_like(x_SI), torch.empty_like(w_EOI)


def _segment_setup(ctx, inputs, output):
    x_SI, w_EOI, offsets_E = inputs
    ctx.save_for_backward(x_SI, w_EOI, offsets_E)


def _segment_backward(ctx, grad_SO):
    x_SI, w_EOI, offsets_E = ctx.saved_tensors
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # (double backward: PyTorch's products)
        def reference(x, w):
            ends = offsets_E.tolist()  # (rows past the last segment, empty slots, stay zero)
            return torch.cat([*(x[s:t] @ w[e].T for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends))),
                              x.new_zeros(x.shape[0] - ends[-1], w.shape[1])])

        return *grads_by_reference(reference, (x_SI, w_EOI), ctx.needs_input_grad[:2], (grad_SO,)), None
    grad_x, grad_w = _segment_linear_backward(grad_SO.contiguous(), x_SI, w_EOI, offsets_E)
    return grad_x, grad_w, None


_segment_linear.register_autograd(_segment_backward, setup_context=_segment_setup)


def segment_linear(x_SI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``x_e @ w_e.T`` for each expert's row segment (``offsets_E`` inclusive ends); later rows come out as zeros."""
    count_in_flop_counters()
    return _segment_linear(x_SI, w_EOI, offsets_E)


def segment_backend(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
    offsets_E = plan.offsets_E
    return _sorted_backend(experts, x_TD, plan, lambda x, w: segment_linear(x, w, offsets_E))


# ------------------------------------------------------------------------------------------ grouped_mm
_GROUPED_MM: Callable | None = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (CPU grouped_mm's backward rejects expanded grads)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


def grouped_linear(x_SI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``x_e @ w_e.T`` for each expert's row segment in one grouped GEMM. Rows past ``offsets_E[-1]`` are undefined."""
    count_in_flop_counters()
    return _ContiguousGrad.apply(_GROUPED_MM(x_SI, w_EOI.transpose(-2, -1), offs=offsets_E))


_SUPPORT_CACHE: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Feature test: does this torch have a grouped GEMM that runs (and is right) on this device and dtype?"""
    key = (device_type, dtype)
    if key not in _SUPPORT_CACHE:
        _SUPPORT_CACHE[key] = _probe_grouped_mm(device_type, dtype)
    return _SUPPORT_CACHE[key]


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if _GROUPED_MM is None:
        return False
    from torch.utils._python_dispatch import _disable_current_modes

    try:  # (on real tensors, unseen by any dispatch mode: a FlopCounterMode would count it, fake tensors fail it)
        with _disable_current_modes():
            return _grouped_mm_right(device_type, dtype)
    except Exception:  # noqa: BLE001 - any failure means "not supported here"
        return False


def _grouped_mm_right(device_type: str, dtype: torch.dtype) -> bool:
    dev = torch.device(device_type)
    x = torch.randn(8, 16, device=dev).to(dtype)
    w = torch.randn(2, 8, 16, device=dev).to(dtype)
    offs = torch.tensor([3, 8], dtype=torch.int32, device=dev)
    y = _GROUPED_MM(x, w.transpose(-2, -1), offs=offs)
    ref = torch.cat([x[:3] @ w[0].T, x[3:] @ w[1].T])
    return bool(torch.allclose(y.float(), ref.float(), atol=1e-1, rtol=1e-2))


def _use_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if kcpu.bypassed():
        # Inductor lowers grouped_mm for bf16 only, and fake tensors run it in bf16 only (its meta function); the
        # feature test is decided outside a trace.
        return dtype == torch.bfloat16 and _SUPPORT_CACHE.get((device_type, dtype), _GROUPED_MM is not None)
    return grouped_mm_supported(device_type, dtype)


def _aligned(experts: "Experts", dtype: torch.dtype) -> bool:
    """grouped_mm needs 16-byte aligned rows: every GEMM dimension a multiple of 16 bytes, aligned weights."""
    size = torch.empty((), dtype=dtype).element_size()
    dims = (experts.d_model, experts.d_ff, experts.w_in.shape[1])
    return all(d * size % 16 == 0 for d in dims) and all(  # (fake or subclass weights: no address to check)
        w.dtype != dtype or not kcpu.plain(w) or w.data_ptr() % 16 == 0 for w in (experts.w_in, experts.w_out))


def grouped_mm_backend(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
    dtype = compute_dtype(x_TD, experts.w_in)
    if not (_use_grouped_mm(x_TD.device.type, dtype) and _aligned(experts, dtype)):
        _warn_fallback(x_TD.device.type, dtype)
        return segment_backend(experts, x_TD, plan)
    offsets_E = plan.offsets_E
    return _sorted_backend(experts, x_TD, plan, lambda x, w: grouped_linear(x, w, offsets_E))


_WARNED: set[tuple[str, torch.dtype]] = set()


def _warn_fallback(device_type: str, dtype: torch.dtype) -> None:
    if kcpu.bypassed() or (device_type, dtype) in _WARNED:  # (not for a trace or a dispatch mode's while)
        return
    _WARNED.add((device_type, dtype))
    log.warning("grouped_mm cannot run %s/%s here (torch %s, or dimensions not multiples of 16 bytes); "
                "using the 'segment' backend", device_type, dtype, torch.__version__)


def _sorted_backend(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan",
                    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Gather rows in expert order, two grouped projections around the activation, weighted combine."""
    dtype = compute_dtype(x_TD, experts.w_in)
    x_SD = plan.permute(x_TD.to(dtype))
    if plan.may_have_empty:  # zero empty rows so no garbage gradient reaches x through the gather
        x_SD = torch.where(plan.valid_S()[:, None], x_SD, 0)
    expert_S = plan.expert_S.clamp(max=plan.num_experts - 1)
    h_SF = linear(x_SD, experts.w_in.to(dtype))
    if experts.b_in is not None:
        h_SF = h_SF + experts.b_in.to(dtype)[expert_S]
    if plan.may_have_empty:  # (a grouped GEMM leaves the rows past the last group unwritten: their garbage, through
        h_SF = torch.where(plan.valid_S()[:, None], h_SF, 0)  # the activation's second derivative, reached a
        # double backward's bias gradients)
    h_SF = experts.activation(h_SF)
    y_SD = linear(h_SF, experts.w_out.to(dtype))
    if experts.b_out is not None:
        y_SD = y_SD + experts.b_out.to(dtype)[expert_S]
    return plan.combine(y_SD)


def auto_backend(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan",
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if x_TD.device.type == "cpu":
        return fused_backend(experts, x_TD, plan, out_dtype)  # host-side counts are free on CPU
    y_TD = _auto_device(experts, x_TD, plan)
    return y_TD if out_dtype is None else y_TD.to(out_dtype)


#: fp32 rows per expert from which ``auto`` leaves Triton for the library GEMMs on a GPU. Triton's exact fp32
#: ``tl.dot`` (no TF32, as torch's default) runs on the FMA units at a fraction of cuBLAS's fp32 rate; on an H200
#: (benchmarks/results/layer_cuda.json, Mixtral-like shape) Triton took 1.50 ms against grouped_mm's 1.56 at 256 rows
#: per expert, and 6.91 ms against 2.61 at 2048.
AUTO_FP32_TRITON_MAX_ROWS = 1024


def auto_prefers_triton(dtype: torch.dtype, rows_per_expert: float) -> bool:
    """Whether ``auto`` runs the Triton backend (where usable) for this compute dtype and load."""
    return dtype != torch.float32 or rows_per_expert < AUTO_FP32_TRITON_MAX_ROWS


def _auto_device(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
    dtype = compute_dtype(x_TD, experts.w_in)
    if x_TD.device.type == "cuda" and triton_usable(x_TD.device, dtype) is None \
            and auto_prefers_triton(dtype, plan.ids_TK.numel() / max(1, experts.num_experts)):
        return triton_backend(experts, x_TD, plan)
    if _use_grouped_mm(x_TD.device.type, dtype) and _aligned(experts, dtype):
        return grouped_mm_backend(experts, x_TD, plan)
    return segment_backend(experts, x_TD, plan)


from .fused_function import fused_backend  # noqa: E402 - needs compute_dtype above
from .triton_backend import triton_backend, triton_usable  # noqa: E402 - imports Triton only when first used

BACKENDS: dict[str, Callable[["Experts", torch.Tensor, "DispatchPlan"], torch.Tensor]] = {
    "auto": auto_backend,
    "fused": fused_backend,
    "loop": loop_backend,
    "dense": dense_backend,
    "segment": segment_backend,
    "grouped_mm": grouped_mm_backend,
    "triton": triton_backend,
}
