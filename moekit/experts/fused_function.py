"""The ``fused`` experts backend: one autograd Function for gather → GEMM → activation → GEMM → weighted combine.

Small experts (and, where the C kernels are built for AVX2, all but the largest in backward) run together in the C
kernels' grouped tiles (:func:`moekit.kernels.cpu.small_experts_up` and its siblings: gather, both projections,
activation and weighted combine in two calls per chunk of experts). The others go expert by expert: each gathers its
rows, runs its two projections with the fastest CPU GEMM of the machine (:mod:`moekit.kernels.cpu_gemm`), applies
the activation and adds its weighted output to the tokens, while its intermediates are still in cache.

Why a custom Function: autograd on the composed ops saves every intermediate (gathered rows, both halves of the
gate/up projection, the activation output, the weighted rows, the unweighted outputs) and its backward of a grouped
GEMM fills zeros expert by expert. Here forward saves only the pre-activations (plus indices). Backward re-gathers
the input rows, recomputes the activation, and gets the router-weight gradient without the expert outputs:
``dL/dw_s = g_t · y_s = (g_t @ W_out) · a_s (+ g_t · b_out)``, and ``g_t @ W_out`` is needed for ``dA`` anyway.
Weight gradients are written once, only idle experts are zeroed. Without autograd (inference) the Function is
skipped altogether.

Compute dtype: the autocast dtype if autocast is on, else the weights' dtype, except that on CPUs whose bf16 GEMM
is slower than fp32 (neither AMX nor AVX512-BF16: measured once per process), bf16 layers whose experts average at
least ``BF16_UPCAST_MIN_ROWS`` rows run their GEMMs in fp32 (more accurate, and faster there), unless the CPU kernels
compute all of the call in bf16 (their packed tiles widen bf16 as they pack it: no slow bf16 GEMM runs); outputs keep
the input dtype. Expert weights are cast to the compute dtype one expert at a time, so no full-size cast copy is ever made.

Notation: ``T`` tokens, ``S`` valid slots in expert order, ``D`` model dim, ``W`` input-projection width
(``2F`` gated, ``F`` plain), ``F`` expert hidden dim, ``E`` experts, ``m`` rows of one expert.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..utils import acc_dtype, grads_by_reference
from .activations import Activation
from ..kernels import cpu as kcpu
from ..kernels import cpu_gemm
from ..kernels.cpu_gemm import INTO_CHUNK_BYTES, linear, linear_into, matmul_cast

if TYPE_CHECKING:
    from ..dispatch.local import DispatchPlan
    from .fused import Experts

#: bf16 layers whose active experts get at least this many rows on average compute in fp32 on slow-bf16 CPUs.
BF16_UPCAST_MIN_ROWS = 64
#: Experts with at most this many rows, or rows x d_model x d_ff at most SMALL_FWD_WORK, run their forward in the
#: small-M kernels rather than one library GEMM each (measured crossover on 2 Xeon cores, fp32: ~128 rows of a
#: 512 x 1408 expert, ~400-500 rows of a 512 x 256 one, whose library GEMMs are too small to amortise their calls).
SMALL_M = 96
SMALL_FWD_WORK = 48_000_000
#: Their backward runs in the kernels where the rows are at most SMALL_M, or rows x d_model x d_ff at most this: the
#: forward kernels' dot-product tiles win over the library to more rows than the backward's (measured on 2 Xeon
#: cores, fp32, against the library: fine-grained experts of 256 rows, forward 99.6 -> 85.3 ms at T = 2048, 512 rows
#: even; forward+backward at 256 rows 304 ms with the library backward against 343 ms all in the kernels).
SMALL_BWD_MIN_WORK = 24_000_000
#: ...and their backward too while rows x d_model x d_ff stays at most this (None: always). The per-expert library
#: backward has a fixed cost of ~10 calls, which small experts cannot amortise; measured on Zen 5 with the kernels of
#: this release, every expert small enough for the forward kernels is also faster in the backward ones (Mixtral-like
#: forward+backward, 80 rows per expert: fp32 38.6 -> 31.2 ms, bf16 17.7 -> 16.9 ms; 32 rows: fp32 17.9 -> 15.1 ms).
SMALL_BWD_WORK: int | None = None
#: In bf16, small-backward experts with at least this many rows take their weight gradients from the library GEMM
#: (measured on Zen 5: fine-grained experts of 16 +- 4 rows run their forward+backward 19% faster with the small
#: outer-product kernel, 32 +- 6 rows 9% faster; Mixtral-like experts of 32 +- 8 rows the same either way; 128 rows
#: 8% faster with the library).
OUTER_LIB_MIN_ROWS = 32
#: ...except on AMX CPUs, where the kernel computes them on the tiles (both operands packed per expert, as many
#: bytes as its rows of both: at most 27 MB for Mixtral-like experts) for experts of up to this many rows; larger
#: ones go to the library. Measured on 2 Sapphire Rapids cores, forward+backward against the library for every
#: expert: Mixtral-like T = 128 26.1 -> 19.2 ms, T = 1024 76.3 -> 66.5, T = 8192 521 -> 499; fine-grained T = 128
#: 38.6 -> 21.9, T = 1024 117 -> 73.9, T = 8192 442 -> 396 (the kernel alone, 8 experts of 256 rows, dW_in:
#: 581 against 423 GFLOP/s).
#: Experts whose forward is too large for the tiles (AMX_MAX_WORK), and so runs its backward in the library GEMMs,
#: take their weight gradients from this kernel too (the library computes these transposed-operand products at
#: about half its forward rate): Mixtral-like T = 8192 (2048 rows per expert) forward+backward 191 -> 185 ms
#: (median of 21 round-robin steps; per-round ratio 0.97) on 2 Emerald Rapids cores.
AMX_OUTER_MAX_ROWS = 4096
#: Where the kernels have packed tiles (AVX2 builds, :data:`moekit.kernels.cpu.PACKED_MIN_ROWS`; float32 on AVX-512
#: builds up to PACKED_AVX512_MAX_WORK), experts of up to this many rows run their forward in the small-M kernels
#: too, whatever their size (their backward stays with the library unless they are small by the rules above).
#: Measured on Zen 3 (2 threads), forward against the library GEMMs: Mixtral-like fp32 with 256 rows per expert
#: 117 -> 70 ms, 2048 rows 638 -> 539 ms; fine-grained with 1024 rows 489 against 500 ms (within this machine's
#: noise): no size where the library wins clearly, so no limit.
#: Likewise bf16 experts on AMX CPUs (:func:`moekit.kernels.cpu.amx`), whose projections run on the tiles.
PACKED_MAX_ROWS = 1 << 62
#: ...bf16 on AMX tiles up to rows x d_model x d_ff of this: the library's bf16 GEMM (oneDNN, on the same tiles) packs
#: its operands for reuse across many rows and overtakes the kernels' tiles at a few thousand rows of a large expert.
#: Measured on 2 Sapphire Rapids cores (whose tile unit runs at one of two speeds, changing within seconds; same
#: process, round-robin), Mixtral-like forward against the library: 512 rows per expert 16 / 22 ms, 1024 rows 30 / 37
#: (slow phases 57 / 60), 2048 rows 63-84 / 52-62 (slow phases 112-119 / 105-117); forward+backward at 2048 rows
#: 195-220 / 195-220 ms. Fine-grained experts of 1024 rows (134 M) stay far faster on the kernels (58.7 / 92.4 ms).
AMX_MAX_WORK = 1_100_000_000
#: ...but in inference SwiGLU experts whose d_model is at most this run on the tiles at any size, with the
#: activation handed from one projection to the other in the output projection's packed layout
#: (:func:`moekit.kernels.cpu.amx_up_packed`): the tiles' SwiGLU overlaps their multiplies, where the library path
#: runs it as a pass of its own, and the output projection packs nothing. Each run of 256 KiB of packed token rows
#: reads the expert's weights again, so larger d_model loses. Measured on 2 Emerald Rapids cores, one expert of 2048
#: rows (F = 1408), input projection and SwiGLU against oneDNN's GEMM + SwiGLU: d_model 512 0.89x, 1024 0.94x, 2048
#: 1.05x; Mixtral-like forward at T = 8192 (2048 rows per expert) against the library 0.85x (41.8 against 49.3 ms).
#: Training keeps the limit above: the tiles' forward also transposes and stores the pre-activations there (the
#: same forward+backward 0.97x with the library's forward).
AMX_FWD_MAX_D = 1024
#: ...and float32 experts on AVX-512 builds' packed tiles (12 x 32) up to rows x d_model x d_ff of this: MKL's fp32
#: GEMM, a little faster per FLOP than the tiles (~250-300 against 220-250 GFLOP/s on 2 Emerald Rapids cores), wins
#: once its per-expert calls, gather and scatter are amortised. Measured there, forward against the library
#: (paired round-robin medians): Mixtral-like 256 rows per expert (184 M) 0.905x, 512 rows (369 M) 0.96-0.99x,
#: 1024 rows (738 M) 0.99-1.03x, 2048 rows (1.48 G) 1.09-1.13x; fine-grained 128 rows (17 M, where the
#: dot-product tiles ran before) 0.90-0.92x, 1024 rows (134 M) 0.91-0.94x.
PACKED_AVX512_MAX_WORK = 400_000_000
#: ...and experts of up to this many rows their backward too (its data gradients in the packed tiles, its weight
#: gradients in the outer-product kernel). Measured on Zen 3 (2 threads), forward+backward against the library
#: backward: Mixtral-like with 256 rows per expert fp32 250 -> 211 ms, bf16 277 -> 221 ms (instead of computing in
#: fp32); 512 rows 439 against 428 ms, fine-grained 664 -> 794 ms (worse); 2048 rows 2.1 -> 4.8 s.
PACKED_BWD_MAX_ROWS = 320
#: bf16 experts on AMX CPUs run their backward in the kernels at any size: the data gradients on the tiles, the
#: weight gradients too up to AMX_OUTER_MAX_ROWS rows (beyond, in the library GEMM, also on the tiles there).
#: Measured on 2 Sapphire Rapids cores, forward+backward against the library backward above SMALL_M rows:
#: fine-grained T = 1024 (128 rows per expert) 90.6 -> 72.3 ms, T = 8192 406 -> 397 ms; Mixtral-like T = 1024
#: 68.4 / 68.5 ms, T = 8192 230 / 229 ms.
AMX_BWD_MAX_ROWS = 1 << 62
#: ...and float32 experts on AVX-512 builds' packed tiles none beyond the small ones (SMALL_M, SMALL_BWD_MIN_WORK):
#: Mixtral-like forward+backward at 256 rows per expert 0.96x with the library backward, 1.03x with the kernels'
#: (the data gradients' dot-product tiles and the outer-product kernel; 2 Emerald Rapids cores, against the
#: library for both passes).
PACKED_AVX512_BWD_MAX_ROWS = 0
#: Consecutive small experts run together in chunks of at most CHUNK_ROWS rows and CHUNK_BYTES per [rows, d_ff]
#: buffer: each chunk is two kernel calls forward and five backward, and each call costs ~0.3 ms of fixed time on a
#: 2-core VM (outside the kernel's own loop, whose time and thread start, within ~20 us, were the same for one call as
#: for eight; the rest is not pinned down), while a chunk's temporaries (its activations; in backward, their
#: gradients) stay far below the weight gradients, the peak of a training step, which holds every chunk's
#: pre-activations anyway (backward frees each chunk's before the next one's temporaries, so the peak does not
#: depend on the chunk size). Measured on Zen 3, 8 MiB against 1 MiB chunks: fine-grained fp32 forward T = 1024
#: 65.3 -> 57.0 and 51.1 -> 47.1 ms (two runs), T = 8192 438 -> 409 ms; forward+backward T = 8192 1407 -> 1349 ms,
#: Mixtral-like fp32 T = 1024 217 -> 206 ms, T = 8192 1723 -> 1558 ms, bf16 T = 1024 253 -> 241 ms. On 2 Emerald
#: Rapids cores, 32 MiB against 8 (a Mixtral-like bf16 chunk then holds four experts of 2048 rows, not one):
#: bf16 T = 8192 forward 0.971x Mixtral-like, 0.978x fine-grained, forward+backward 0.980x; fp32 and T = 1024
#: within 1% either way; the same peak memory of forward+backward at T = 1024 and 8192.
CHUNK_ROWS = 8192
CHUNK_BYTES = 32 << 20
#: SwiGLU chunks hand the activation from one kernel to the other in the packed tiles' layout where those pack it
#: (float32 experts of GK_APACK_MIN_ROWS rows or more on AVX2 builds; see :func:`moekit.kernels.cpu.small_experts_up`).
#: Same bits. Measured on Zen 3 (2 threads), forward against the activation as rows (paired round-robin medians):
#: fine-grained fp32 T = 8192 (1024 rows per expert) 0.980-0.988x, Mixtral-like T = 8192 0.980x, T = 1024 0.997x.
HAND_OVER = True
#: Experts on library GEMMs run with their rows padded by zero rows to a multiple of this: oneDNN's GEMMs lose
#: 5-20% on row counts that are not (bf16 256 x 512 x 2816: 631 -> 752 GFLOP/s with 1-40 extra rows of 256 padded
#: to 8, measured on Zen 5); the padded rows cost at most 7 rows of work and their results are dropped.
PAD_ROWS = 8


def _padded(m: int) -> int:
    return -(-m // PAD_ROWS) * PAD_ROWS


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


@dataclass
class _Chunk:
    """A run of consecutive small experts (in sorted order) handled by one call of each small-M kernel; its
    buffers cover only its own rows, so temporaries stay bounded whatever the batch size."""

    r0: int  # first sorted row
    r1: int  # one past the last
    segs: list[int]  # indices into _Plan.segments
    start_E: torch.Tensor  # [E] rows of each expert relative to r0 (empty for experts outside the chunk)
    end_E: torch.Tensor
    end_bwd_E: torch.Tensor  # end_E for the experts whose backward also runs in the small-M kernels
    h: torch.Tensor | None = None  # [r1 - r0, W] pre-activations, kept for backward


@dataclass
class _Plan:
    """Which experts run in the small-M kernels and which one at a time, plus what forward keeps for backward."""

    segments: list[tuple[int, int, int]]  # (expert, first sorted row, end) of every active expert
    small: list[bool]  # per segment: forward in the small-M kernels
    small_bwd: list[bool]  # per segment: backward in the small-M kernels too
    chunks: list[_Chunk] = field(default_factory=list)
    pre: dict[int, torch.Tensor] = field(default_factory=dict)  # segment -> pre-activation, library backward
    # bf16 SwiGLU on AMX tiles in inference: chunks hand the activation over in the output projection's packed
    # layout (kept pre-activations need the row-major transposes anyway, and training steps measured slower with
    # it: Mixtral-like bf16 T = 1024 forward+backward 1.06x, fine-grained 1.02x)
    handover: bool = False

    @classmethod
    def make(cls, counts, x_c, w_in, w_out, b_in, b_out, dtype, swiglu: bool = False,
             training: bool = True) -> "_Plan":
        """The plan of one call (``swiglu``: the experts' activation; ``training``: a backward follows)."""
        segments = list(_segments(counts))
        expert_size = w_out.shape[1] * w_out.shape[2]  # D x F
        # forward tiles that win at larger sizes (any_rows), up to max_work rows x D x F (None: no limit), and the
        # rows up to which their backward stays in the kernels too (bwd_max): AVX2's packed tiles, AVX-512's (fp32),
        # the AMX tiles (bf16), or none
        width = kcpu.packed_width(dtype)
        handover = not training and swiglu and kcpu.amx_packed_usable(x_c, w_in, w_out, b_in, b_out)
        if width == 16:
            any_rows, max_work, bwd_max = True, None, PACKED_BWD_MAX_ROWS
        elif width == 32:
            any_rows, max_work, bwd_max = True, PACKED_AVX512_MAX_WORK, PACKED_AVX512_BWD_MAX_ROWS
        elif dtype == torch.bfloat16 and kcpu.amx():
            any_rows, max_work, bwd_max = True, AMX_MAX_WORK, AMX_BWD_MAX_ROWS
            if handover and w_in.shape[2] <= AMX_FWD_MAX_D:
                max_work = None
        else:
            any_rows, max_work, bwd_max = False, None, 0
        small = [t - s <= SMALL_M or (t - s) * expert_size <= SMALL_FWD_WORK or (
                 any_rows and t - s <= PACKED_MAX_ROWS and (max_work is None or (t - s) * expert_size <= max_work))
                 for _, s, t in segments]
        if not (any(small) and w_in.dtype == dtype and kcpu.small_gemm_usable(x_c, w_in, w_out, b_in, b_out)):
            return cls(segments, [False] * len(segments), [False] * len(segments))
        small_bwd = [sm and _small_bwd(t - s, expert_size, bwd_max) for (_, s, t), sm in zip(segments, small)]
        plan = cls(segments, small, small_bwd, handover=handover)
        max_rows = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (w_out.shape[2] * w_in.element_size())))
        run: list[int] = []
        for i, (_, s, t) in enumerate(segments + [(0, 0, 0)]):  # sentinel closes the last run
            if run and (i == len(segments) or not small[i] or t - segments[run[0]][1] > max_rows):
                plan.chunks.append(plan._chunk(run, w_in.shape[0]))
                run = []
            if i < len(segments) and small[i]:
                run.append(i)
        return plan

    def _chunk(self, segs: list[int], E: int) -> _Chunk:
        r0, r1 = self.segments[segs[0]][1], self.segments[segs[-1]][2]
        rows = [[0] * E for _ in range(3)]  # start, end, end for the backward kernels; 0 outside the chunk
        for i in segs:
            e, s, t = self.segments[i]
            rows[0][e], rows[1][e], rows[2][e] = s - r0, t - r0, t - r0 if self.small_bwd[i] else s - r0
        start_E, end_E, end_bwd_E = torch.tensor(rows, dtype=torch.int64)  # one tensor: rows are contiguous views
        return _Chunk(r0, r1, segs, start_E, end_E, end_bwd_E)


def fused_forward(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S, counts, activation, dtype,
                  save: bool = False, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, _Plan]:
    """The forward math; returns ``(y_TD fp32, plan)``, the plan holding the pre-activations if ``save``; where
    ``out_dtype`` is bf16 and every expert hands its activation over on the AMX tiles (inference), ``y_TD`` comes
    in bf16, each token's sum rounded by the output projection itself as its last expert adds to it, and its first
    expert storing rather than adding (no zero-fill of the fp32 sums and no cast pass; same values: Mixtral-like
    T = 1024 and 8192 forward 0.98x, fine-grained 0.98x, 2 Emerald Rapids cores, same process).

    Small experts (``SMALL_M``, ``SMALL_FWD_WORK``) run in the small-M kernels, consecutive ones together (one call of each
    kernel per chunk of up to ``CHUNK_ROWS`` rows / ``CHUNK_BYTES``; see
    :func:`moekit.kernels.cpu.small_experts_up`); their backward
    too if also under ``SMALL_BWD_WORK``. Each other expert: gather its rows, ``h = x @ W_in^T`` (gate and up in one
    GEMM), the activation on ``h`` while it is in cache, ``y = a @ W_out^T``, then ``out[token] += w * y`` (one
    thread per row: the rows of one expert belong to distinct tokens)."""
    x_c = x_TD if x_TD.dtype == dtype else x_TD.to(dtype)
    w_S = weights_TK.reshape(-1).index_select(0, slot_S).float()
    swiglu = activation.name == "swiglu"
    plan = _Plan.make(counts, x_c, w_in, w_out, b_in, b_out, dtype, swiglu, training=save)

    def packed(c: _Chunk) -> bool:  # bf16 on AMX tiles: the activation handed over in the packed layout
        return plan.handover and min(plan.segments[i][2] - plan.segments[i][1] for i in c.segs) >= kcpu.AMX_MIN_ROWS

    flags = out16 = None
    if out_dtype == torch.bfloat16 and not save and all(plan.small) and all(packed(c) for c in plan.chunks):
        flags = kcpu.row_flags(token_S, x_TD.shape[0])  # (None where a token has no expert: its sum stays zero)
    if flags is not None:
        out_TD = torch.empty(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        out16 = torch.empty(x_TD.shape, dtype=torch.bfloat16, device=x_TD.device)
    else:
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for c in plan.chunks:
        tok = token_S[c.r0:c.r1]
        if packed(c):
            h, a = kcpu.amx_up_packed(x_c, tok, c.start_E, c.end_E, w_in, b_in, save, check_index=False)
            kcpu.amx_down_packed(a, tok, w_S[c.r0:c.r1], c.start_E, c.end_E, w_out, b_out, out_TD,
                                 check_index=False, flags=None if flags is None else flags[c.r0:c.r1], out16=out16)
        else:
            hand_over = swiglu and HAND_OVER
            h, a = kcpu.small_experts_up(x_c, tok, c.start_E, c.end_E, w_in, b_in, swiglu, save, check_index=False,
                                         hand_over=hand_over)
            if not swiglu:
                a = activation(h)
            kcpu.small_experts_down(a, tok, w_S[c.r0:c.r1], c.start_E, c.end_E, w_out, b_out, out_TD,
                                    check_index=False, handed_over=hand_over)
        if save:
            c.h = h
            for i in c.segs:
                if not plan.small_bwd[i]:
                    plan.pre[i] = h[plan.segments[i][1] - c.r0:plan.segments[i][2] - c.r0]
    for i, (e, s, t) in enumerate(plan.segments):
        if plan.small[i]:
            continue
        tok = token_S[s:t]
        x_m = kcpu.gather_rows(x_c, tok, dtype, check_index=False, rows=_padded(t - s))
        h = linear(x_m, w_in[e].to(dtype), _row(b_in, e, dtype))
        y = linear(_activate(activation, h), w_out[e].to(dtype), _row(b_out, e, dtype))
        kcpu.scatter_add_rows(out_TD, tok, y[:t - s], w_S[s:t], check_index=False)
        if save:
            plan.pre[i] = h  # with its padding rows
    return out_TD if out16 is None else out16, plan


@dataclass
class _Grads:
    """Gradient buffers of one backward call (None where not needed). The input-projection weight gradient, the
    largest, is allocated on first use (``w_in_buffer``), after the output-projection work has freed its temporaries,
    which lowers the peak memory of backward."""

    x: torch.Tensor | None
    w_in_needed: bool
    w_out: torch.Tensor | None
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None
    w_S: torch.Tensor | None  # router-weight gradient per sorted slot
    w_in_factory: Callable[[], torch.Tensor] | None = None
    w_in: torch.Tensor | None = None

    def w_in_buffer(self) -> torch.Tensor:
        if self.w_in is None:
            self.w_in = self.w_in_factory()
        return self.w_in


def _keep_pre(plan: _Plan, x_TD: torch.Tensor, dtype: torch.dtype) -> None:
    """Pre-activations of bf16 layers computed in fp32 are kept in bf16: half the memory, and no less precise than a
    bf16 computation would have been."""
    keep = x_TD.dtype if x_TD.dtype.itemsize < dtype.itemsize else dtype
    plan.pre = {i: h.to(keep) for i, h in plan.pre.items()}


class FusedExpertsFunction(torch.autograd.Function):
    """``y_TD = sum_k w_TK * expert_{id_TK}(x_TD)`` in fp32, with a hand-written, memory-lean backward."""

    @staticmethod
    def forward(ctx, x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S, counts, activation, dtype,
                out_dtype=torch.float32):
        with torch.autocast(x_TD.device.type, enabled=False):
            out_TD, plan = fused_forward(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S, counts,
                                         activation, dtype, save=True)
        _keep_pre(plan, x_TD, dtype)
        ctx.plan = plan
        ctx.save_for_backward(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S)
        ctx.counts, ctx.activation, ctx.dtype, ctx.out_dtype = counts, activation, dtype, out_dtype
        ctx.bias_dtypes = (None if b_in is None else b_in.dtype, None if b_out is None else b_out.dtype)
        return out_TD.to(out_dtype)  # summed in fp32; a bf16 output also makes its gradient arrive in bf16

    @staticmethod
    def backward(ctx, g_TD):
        x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S = ctx.saved_tensors
        if torch.is_grad_enabled() or ctx.plan is None:  # (double backward, or a second pass through this graph,
            # retain_graph=True, after the kernels' backward freed what it kept: the loop reference's sums, which
            # autograd differentiates; a second pass reaching this node after a double backward's runs the kernels)
            counts, act, dtype, out_dtype = ctx.counts, ctx.activation, ctx.dtype, ctx.out_dtype

            def reference(x, wi, wo, bi, bo, w):
                from .backends import expert_rows_sum, segment_rows

                bounds = ((t - n, t) for n, t in zip(counts, itertools.accumulate(counts)))
                with torch.autocast(x.device.type, enabled=False):
                    return expert_rows_sum(x, wi, wo, bi, bo, act, dtype,
                                           segment_rows(w, token_S, slot_S, bounds)).to(out_dtype)

            grads = grads_by_reference(reference, (x_TD, w_in, w_out, b_in, b_out, weights_TK),
                                       ctx.needs_input_grad[:6], (g_TD,))
            return *grads, None, None, None, None, None, None
        plan, ctx.plan = ctx.plan, None
        grads = fused_backward(plan, g_TD, x_TD, w_in, w_out, b_out, weights_TK, token_S, slot_S, ctx.counts,
                               ctx.activation, ctx.dtype, ctx.bias_dtypes, ctx.needs_input_grad[:6])
        return *grads, None, None, None, None, None, None


def fused_backward(plan: _Plan, g_TD, x_TD, w_in, w_out, b_out, weights_TK, token_S, slot_S, counts: list[int],
                   act: Activation, dtype: torch.dtype, bias_dtypes: tuple, needs: tuple) -> tuple:
    """The backward of :func:`fused_forward` (run with ``save=True``, its pre-activations through
    :func:`_keep_pre`) for upstream gradient ``g_TD``: ``(d_x, d_w_in, d_w_out, d_b_in, d_b_out, d_weights)``, None
    where ``needs`` (the six flags, in that order) says not needed."""
    need_x, need_win, need_wout, need_bin, need_bout, need_w = needs
    dev = g_TD.device
    with torch.autocast(dev.type, enabled=False):
        # (the library path gathers and converts each expert's rows itself: no converted copy of all of x)
        x_c = x_TD if x_TD.dtype == dtype or not any(plan.small_bwd) else x_TD.to(dtype)
        g_TD = g_TD.contiguous()  # fp32 or the output's dtype: the kernels read either
        w_S = weights_TK.reshape(-1).index_select(0, slot_S).float()
        grads = _Grads(
            torch.zeros(x_TD.shape, dtype=torch.float32, device=dev) if need_x else None,
            need_win,
            _expert_grad_buffer(w_out, counts) if need_wout else None,
            torch.zeros(w_in.shape[:2], dtype=bias_dtypes[0], device=dev) if need_bin else None,
            torch.zeros(w_out.shape[:2], dtype=bias_dtypes[1], device=dev) if need_bout else None,
            torch.empty(w_S.shape, dtype=torch.float32, device=dev) if need_w else None,
            lambda: _expert_grad_buffer(w_in, counts))
        if any(plan.small_bwd):
            _small_backward(plan, act, g_TD, x_c, w_in, w_out, b_out, token_S, w_S, dtype, grads)
        # The library-path experts' input-projection weight gradients come last, from their dH kept in the
        # dtype their pre-activations were kept in (for a bf16 layer computed in fp32: bf16, as a bf16
        # computation would have them): the largest gradient buffer is then not allocated until every other
        # temporary of those experts is freed.
        keep = x_TD.dtype if x_TD.dtype.itemsize < dtype.itemsize else dtype
        deferred = []
        for i, (e, s, t) in enumerate(plan.segments):
            if not plan.small_bwd[i]:
                h, plan.pre[i] = plan.pre[i].to(dtype), None
                dh = _expert_backward(e, token_S[s:t], w_S[s:t], h, act, g_TD, w_in, w_out, b_out, dtype, grads,
                                      None if grads.w_S is None else grads.w_S[s:t])
                del h
                if grads.w_in_needed:
                    deferred.append((e, token_S[s:t], dh.to(keep)))
                del dh
        # the input's and router weights' gradients are complete: cast to their dtypes before dW_in (a bf16 dx
        # holds half the memory of its fp32 sums while the largest buffer is filled)
        d_x = grads.x.to(x_TD.dtype) if need_x else None
        grads.x = None
        d_weights = None
        if need_w:
            d_weights = torch.zeros(weights_TK.numel(), dtype=torch.float32, device=dev)
            d_weights = d_weights.index_copy_(0, slot_S, grads.w_S).view(weights_TK.shape).to(weights_TK.dtype)
        while deferred:
            e, tok, dh = deferred.pop(0)
            _w_in_grad(grads.w_in_buffer()[e], dh, x_c, tok, dtype)
            del dh
    d_win = grads.w_in_buffer() if need_win else None  # (all experts idle: zeros)
    return d_x, d_win, grads.w_out, grads.b_in, grads.b_out, d_weights


def _expert_backward(e, tok, w_m, h, act, g_TD, w_in, w_out, b_out, dtype, grads: _Grads, dw_m) -> torch.Tensor:
    """Backward of one expert with library GEMMs (its rows ``tok``, router weights ``w_m``, pre-activation ``h``,
    which may have extra padding rows: those get zero upstream gradient and router weight, hence zero ``dH`` and
    ``w a``, and contribute nothing to the weight gradients), all but the input projection's weight gradient, whose
    ``dH`` it returns (see :func:`_w_in_grad`)."""
    m, rows = tok.shape[0], h.shape[0]
    g_m = kcpu.gather_rows(g_TD, tok, dtype, check_index=False, rows=rows)  # upstream gradient of the rows
    # ga = g @ W_out (unweighted) gives dA = w * ga and the router-weight gradient ga . a
    ga = matmul_cast(g_m, w_out[e], dtype)
    w_p = w_m if rows == m else torch.cat([w_m, w_m.new_zeros(rows - m)])
    dh, aw, dw = _activation_backward(act, h, ga, w_p, dw_m is not None, grads.w_out is not None, in_place=True)
    del ga
    if dw_m is not None:
        dw = dw[:m]
        if b_out is not None:  # y = a W_out^T + b_out, so dL/dw also has g . b_out
            dw += g_TD.index_select(0, tok).float() @ b_out[e].float()
        dw_m.copy_(dw)
    if grads.w_out is not None:  # dW_out = g^T @ (w a)
        if _amx_outer(aw, m):
            kcpu.small_experts_outer(g_m[:m], None, aw[:m], None, None, None, grads.w_out[e].unsqueeze(0))
        else:
            linear_into(grads.w_out[e], g_m.T, aw.T)
    if grads.b_out is not None:
        grads.b_out[e] = w_m @ g_TD.index_select(0, tok).float()
    del aw, g_m
    if grads.b_in is not None:
        grads.b_in[e] = dh.sum(0, dtype=torch.float32)
    if grads.x is not None:  # dx = dH @ W_in
        kcpu.scatter_add_rows(grads.x, tok, matmul_cast(dh, w_in[e], dtype)[:m], check_index=False)
    return dh


def _w_in_grad(out: torch.Tensor, dh: torch.Tensor, x: torch.Tensor, tok: torch.Tensor, dtype: torch.dtype) -> None:
    """``out = dH^T @ x[tok]`` in ``dtype`` (one expert's input-projection weight gradient; ``dh`` may have padding
    rows, whose zero gradient adds nothing). bf16 on AMX tiles up to AMX_OUTER_MAX_ROWS rows: the outer-product
    kernel, reading the rows of ``x`` in place (see :func:`_amx_outer`); else the library GEMM, where a ``dh`` kept
    in a narrower dtype is converted a block of its columns at a time, the block and its rows of ``out`` in ``dtype``
    together at most ``CAST_CHUNK_BYTES`` (1 MiB: a Mixtral-like expert of 280 rows then takes 331 columns at a
    time, within 3% of one conversion of all of dH, where blocks of 128 columns were 35% slower)."""
    if dh.dtype == dtype == x.dtype and _amx_outer(dh, tok.shape[0]):  # (reads the rows of x in place)
        kcpu.small_experts_outer(dh[:tok.shape[0]], None, x, tok, None, None, out.unsqueeze(0))
        return
    x_m = kcpu.gather_rows(x, tok, dtype, check_index=False, rows=dh.shape[0])
    if dh.dtype == dtype:  # (oneDNN writes fp32 weight gradients faster in 1 MiB chunks than in 256 KiB ones)
        linear_into(out, dh.T, x_m.T, chunk_bytes=4 * INTO_CHUNK_BYTES)
        return
    cols = max(1, cpu_gemm.CAST_CHUNK_BYTES // ((dh.shape[0] + out.shape[1]) * dtype.itemsize))
    for c in range(0, dh.shape[1], cols):
        linear_into(out[c:c + cols], dh[:, c:c + cols].to(dtype).T, x_m.T,
                    chunk_bytes=cols * out.shape[1] * dtype.itemsize)


def _amx_outer(a: torch.Tensor, rows: int) -> bool:
    """Whether an expert of ``rows`` rows whose backward runs in the library GEMMs takes its weight gradients (``a``
    their left operand) from the outer-product kernel instead: bf16 on AMX tiles, up to AMX_OUTER_MAX_ROWS rows."""
    return a.dtype == torch.bfloat16 and rows <= AMX_OUTER_MAX_ROWS and kcpu.amx()


def _small_backward(plan: _Plan, act, g_TD, x_c, w_in, w_out, b_out, token_S, w_S, dtype, grads: _Grads):
    """Backward of the small-backward experts with the small-M kernels, chunk by chunk (same math as
    :func:`_expert_backward`)."""
    for c in plan.chunks:
        segs = [i for i in c.segs if plan.small_bwd[i]]
        if not segs:
            continue
        h, c.h = c.h, None
        n, W = h.shape  # rows of experts with a library backward stay untouched: plan.pre holds views of them
        tok, w_c = token_S[c.r0:c.r1], w_S[c.r0:c.r1]
        dw_c = None if grads.w_S is None else grads.w_S[c.r0:c.r1]
        rows = [(plan.segments[i][1] - c.r0, plan.segments[i][2] - c.r0) for i in segs]
        if len(segs) == len(c.segs):
            rows = [(0, n)]  # the whole chunk: one call
        ga = torch.empty(n, w_out.shape[2], dtype=dtype)
        kcpu.small_experts_nn(g_TD, tok, w_out, c.start_E, c.end_bwd_E, ga)  # ga = g @ W_out
        dh = h  # dH overwrites H row by row (each element is read before it is written), saving n x W
        aw = None
        if act.name == "swiglu":
            aw = ga if grads.w_out is not None else None  # w a overwrites ga the same way
            for s, t in rows:
                kcpu.swiglu_backward(h[s:t], ga[s:t], w_c[s:t], out=(
                    dh[s:t], None if aw is None else aw[s:t], None if dw_c is None else dw_c[s:t]))
        else:
            if grads.w_out is not None:
                aw = torch.empty(n, W // 2 if act.gated else W, dtype=dtype)
            for s, t in rows:
                dh_m, aw_m, dw_m = _activation_backward(act, h[s:t], ga[s:t], w_c[s:t], dw_c is not None,
                                                        aw is not None)
                dh[s:t] = dh_m
                if aw is not None:
                    aw[s:t] = aw_m
                if dw_c is not None:
                    dw_c[s:t] = dw_m
        del ga, h
        for i in segs:  # bias terms (GPT-OSS-style experts only)
            e, s, t = plan.segments[i]
            if dw_c is not None and b_out is not None:
                grads.w_S[s:t] += g_TD.index_select(0, token_S[s:t]).float() @ b_out[e].float()
            if grads.b_out is not None:
                grads.b_out[e] = w_S[s:t] @ g_TD.index_select(0, token_S[s:t]).float()
            if grads.b_in is not None:
                grads.b_in[e] = dh[s - c.r0:t - c.r0].sum(0, dtype=torch.float32)
        if grads.w_out is not None:
            _outer(plan, c, segs, g_TD, tok, aw, None, grads.w_out)  # dW_out = g^T @ (w a)
        del aw
        if grads.x is not None:  # (before dW_in: the first chunk's scratch then comes before the largest buffer)
            kcpu.small_experts_nn(dh, None, w_in, c.start_E, c.end_bwd_E, grads.x, tok)  # dx += dH @ W_in
        if grads.w_in_needed:
            _outer(plan, c, segs, dh, None, x_c, tok, grads.w_in_buffer())  # dW_in = dH^T @ x
        del dh  # before the next chunk's temporaries


def _outer(plan: _Plan, c: _Chunk, segs: list[int], a, a_idx, b, b_idx, grad: torch.Tensor) -> None:
    """``grad[e] = a[rows of e]^T @ b[rows of e]`` for the chunk's small-backward experts ``segs`` (rows relative to
    the chunk; ``a_idx``/``b_idx`` map them to rows of ``a``/``b``): the small-M outer-product kernel, except for
    bf16 experts with at least ``OUTER_LIB_MIN_ROWS`` rows, whose weight gradients the library's bf16 GEMM computes
    ~2x faster (it packs its operands into the pair layout of the bf16 dot product) where the CPU has one."""
    lib = []
    if a.dtype == b.dtype == torch.bfloat16 and not cpu_bf16_gemm_is_slow():
        lo = AMX_OUTER_MAX_ROWS + 1 if kcpu.amx() else OUTER_LIB_MIN_ROWS
        lib = [i for i in segs if plan.segments[i][2] - plan.segments[i][1] >= lo]
    end = c.end_bwd_E
    if lib:
        end = end.clone()
        for i in lib:
            e, s, t = plan.segments[i]
            end[e] = c.start_E[e]
            s, t = s - c.r0, t - c.r0
            a_m = a[s:t] if a_idx is None else kcpu.gather_rows(a, a_idx[s:t], a.dtype, check_index=False)
            b_m = b[s:t] if b_idx is None else kcpu.gather_rows(b, b_idx[s:t], b.dtype, check_index=False)
            linear_into(grad[e], a_m.T, b_m.T)
    if len(lib) < len(segs):
        kcpu.small_experts_outer(a, a_idx, b, b_idx, c.start_E, end, grad)


def _activation_backward(act: Activation, h: torch.Tensor, ga: torch.Tensor, w_m: torch.Tensor, need_dw: bool,
                         need_aw: bool, in_place: bool = False):
    """``(dH, w * a, dw)`` of one expert from its pre-activation ``h``, the unweighted gradient ``ga`` of its
    activation output and its rows' router weights ``w_m``: ``dH = act'(h) * (w ga)``, ``dw = rowsum(ga * a)``.
    SwiGLU runs in one fused pass (:func:`moekit.kernels.cpu.swiglu_backward`); every other activation is
    recomputed and differentiated by autograd. With ``in_place`` (SwiGLU), ``dH`` overwrites ``h`` and ``w * a``
    overwrites ``ga`` (each element is read before it is written): no new memory to fault in and write-allocate,
    which at ~1000-row experts made this pass 2-3x slower than the same pass on cached buffers."""
    if act.name == "swiglu":
        if in_place:
            dw = torch.empty(h.shape[0], dtype=torch.float32) if need_dw else None
            return kcpu.swiglu_backward(h, ga, w_m, out=(h, ga if need_aw else None, dw))
        return kcpu.swiglu_backward(h, ga, w_m, need_dw, need_aw)
    a, act_backward = _activation_with_backward(act, h)
    w_col = w_m[:, None]
    dw = (ga.float() * a.float()).sum(-1) if need_dw else None
    aw = (a * w_col).to(a.dtype) if need_aw else None
    return act_backward((ga * w_col).to(ga.dtype)), aw, dw


def _activation_with_backward(act: Activation, h: torch.Tensor):
    """``(act(h), backward)`` where ``backward(da) = d act / d h * da``, from autograd (the activations without a
    hand-written backward; SwiGLU has :func:`moekit.kernels.cpu.swiglu_backward`), or from ``torch.func.vjp`` inside
    a custom operator (:mod:`moekit.experts.fused_op`), where autograd records nothing (there the activation is
    computed twice; vjp everywhere measured 1.09x slower in one paired run of an eager GELU layer's training step,
    2048 tokens, 8 experts)."""
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        a = act(h)
    if a.grad_fn is None:  # (below autograd: inside an operator)
        a, vjp = torch.func.vjp(act, h.detach())
        return a, lambda da: vjp(da)[0]

    def backward(da: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(a, h, da)[0]

    return a.detach(), backward


def _expert_grad_buffer(w_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Gradient buffer for stacked expert weights: uninitialised, with only the idle experts zeroed (the active
    ones are overwritten by their GEMM), so memory is written once."""
    buf = torch.empty_like(w_EOI)
    runs, e = [], 0
    for idle, run in itertools.groupby(counts, key=lambda n: n == 0):
        n = len(list(run))
        if idle:  # a run of consecutive idle experts is one contiguous block
            runs.append((e, n))
        e += n
    return kcpu.zero_rows(buf, runs)  # every run in one streaming zero-fill


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


def _small_bwd(rows: int, expert_size: int, max_rows: int) -> bool:
    """Whether an expert of ``rows`` rows (``expert_size``: ``d_model * d_ff``) runs its backward in the small-M
    kernels: if small by ``SMALL_M``/``SMALL_BWD_MIN_WORK`` (and ``SMALL_FWD_WORK``), or of at most ``max_rows`` rows (where the kernels have
    packed tiles, ``PACKED_BWD_MAX_ROWS``; bf16 on AMX tiles, ``AMX_BWD_MAX_ROWS``; else 0); and within
    ``SMALL_BWD_WORK``."""
    return (rows <= SMALL_M or rows * expert_size <= min(SMALL_FWD_WORK, SMALL_BWD_MIN_WORK) or rows <= max_rows) and (
        SMALL_BWD_WORK is None or rows * expert_size <= SMALL_BWD_WORK)


def _kernels_run_bf16(weight: torch.Tensor, counts: list[int], expert_size: int, training: bool) -> bool:
    """Whether the CPU kernels compute every expert of this call in bf16 (widening as they load), so that no bf16
    library GEMM runs: the packed tiles take any forward; a backward stays in the kernels if every expert is small
    enough for their backward. ``MOEKIT_CPU_BF16_UPCAST=1`` says no."""
    if os.environ.get("MOEKIT_CPU_BF16_UPCAST") == "1" or not weight.is_contiguous():
        return False
    if not kcpu.packed_tiles(torch.bfloat16):
        return False
    return not training or all(_small_bwd(n, expert_size, PACKED_BWD_MAX_ROWS) for n in counts if n)


def fused_compute_dtype(x_TD: torch.Tensor, weight: torch.Tensor, counts: list[int], expert_size: int = 0,
                        training: bool = True, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype the fused backend computes in (see the module's docstring): a bf16 layer on a CPU whose bf16 GEMM
    is slow computes in fp32 where its experts average at least ``BF16_UPCAST_MIN_ROWS`` rows, unless the CPU
    kernels run all of it in bf16 (:func:`_kernels_run_bf16`; ``expert_size`` ``d_model * d_ff``, ``training``
    whether a backward follows). ``dtype``: the autocast or weights' dtype where already known."""
    from .backends import compute_dtype

    dtype = dtype or compute_dtype(x_TD, weight)
    if dtype == torch.bfloat16 and x_TD.device.type == "cpu" and not kcpu.bypassed():
        active = sum(1 for n in counts if n)
        if active and sum(counts) >= BF16_UPCAST_MIN_ROWS * active and cpu_bf16_gemm_is_slow() and \
                not _kernels_run_bf16(weight, counts, expert_size, training):
            return torch.float32
    return dtype


def valid_slots(order_S: torch.Tensor, token_S: torch.Tensor, counts_E: torch.Tensor
                ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """``(counts per expert on the host, slot_S, token_S)`` of a dispatch plan's valid slots, which come first in
    expert order (empty and dropped slots sit at the end)."""
    counts = counts_E.tolist()
    S = sum(counts)
    return counts, order_S[:S], token_S[:S]


def needs_backward(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan") -> bool:
    """Whether autograd records this call: grad mode on and an input or weight requiring grad."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_TD, experts.w_in, experts.w_out, experts.b_in, experts.b_out,
                                                    plan.weights_TK))


def fused_backend(experts: "Experts", x_TD: torch.Tensor, plan: "DispatchPlan",
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out_dtype = out_dtype or acc_dtype(x_TD.dtype, experts.w_in.dtype)  # (fp32 sums; float64 for float64)
    training = needs_backward(experts, x_TD, plan)
    if kcpu.bypassed() or x_TD.is_meta:  # (traced, under a dispatch mode, or meta tensors: the counts stay on the
        # device, in one operator)
        from .fused_op import fused_op_backend

        return fused_op_backend(experts, x_TD, plan, out_dtype, training)
    if experts.w_in.dtype == torch.float64:  # (no kernel sums in float64: one product per expert, float64 sums)
        from .backends import segment_backend

        return segment_backend(experts, x_TD, plan).to(out_dtype)
    counts, slot_S, token_S = valid_slots(plan.order_S, plan.token_S, plan.counts_E)
    act: Activation = experts.activation
    dtype = fused_compute_dtype(x_TD, experts.w_in, counts, experts.w_out.shape[1] * experts.w_out.shape[2],
                                training)
    args = (x_TD, experts.w_in, experts.w_out, experts.b_in, experts.b_out, plan.weights_TK, token_S, slot_S,
            counts, act, dtype)
    if training:
        return FusedExpertsFunction.apply(*args, out_dtype)
    with torch.autocast(x_TD.device.type, enabled=False):
        return fused_forward(*args, out_dtype=out_dtype)[0].to(out_dtype)
