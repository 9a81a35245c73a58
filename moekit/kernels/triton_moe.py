"""Triton kernels for the ``triton`` experts backend: grouped GEMMs over expert-sorted slots, with the row gather,
the SwiGLU epilogue and the scatter to slot order fused into the GEMMs (the ScatterMoE / vLLM ``fused_moe`` design).

Notation: ``T`` tokens, ``K`` slots per token, ``S = T*K`` slots (sorted by expert: the plan's ``order_S``),
``D`` model dim, ``F`` expert hidden dim, ``W`` input-projection width (``2F`` gated, ``F`` plain), ``E`` experts.

Kernels (all accumulate in fp32, with ``tl.dot`` or, for GEMMs over few rows per expert, :data:`FMA_MAX_ROWS`, with
FMAs on the CUDA cores; operands not in the compute dtype are cast inside the kernel, so weights and inputs are never
copied to permute them, nor to cast them where few rows read each weight tile: from
``triton_backend.PRECAST_MIN_ROWS`` rows per expert the caller casts them once instead):

- :func:`_grouped_gemm_kernel` ``out[s] = scale_s * (A[gather_s] @ B[e_s]^T) (+ bias[e_s])`` for the sorted rows
  of every expert segment (the row scale in the epilogue, on the fp32 sums: an operand that needs no arithmetic goes
  from memory to the tensor cores' shared-memory tiles asynchronously, where a scaled one would pass through
  registers inside the K loop). The tile schedule (``tile_expert``, ``tile_row``) is built once per call on the device
  from ``counts_E`` (:func:`tile_schedule`): every tile holds rows of a single expert, tiles past the last used one
  exit at once, so there is no host sync. Epilogues: none, SwiGLU forward (gate and up columns in one program, one
  ``tl.dot`` over both tiles side by side on the tensor cores; writes ``silu(gate) * up`` and optionally the
  pre-activation), SwiGLU backward (``dH`` from ``dA`` and the saved pre-activation, plus the recomputed activation
  for the weight gradient, times the row scale where there is one, so the weight gradient needs none). Rows can be
  written in sorted order or scattered to their slot position ``order_S[s]`` (the ``[T*K, D]`` slot-major layout).
  Tiles of 1-8 rows (``FMA``: :func:`_mac`) where the rows per expert are few, else 16-128-row ``tl.dot`` tiles.
- :func:`_grouped_xty_kernel` ``out[e] = L[seg_e]^T @ R[seg_e]`` (the weight gradients: one program per
  output tile of one expert, looping over that expert's rows, in steps of 1-8 rows on the CUDA cores where the
  GEMMs take few-row tiles; optional gathers of either operand and the bias gradient ``sum(scale * L[seg_e])``).
  Idle experts get zeros, written by the same kernel.
- :func:`_combine_kernel` ``y[t] = sum_k w[t, k] * Y[t*K + k]`` in fp32 in a fixed order (deterministic, no atomics);
  empty slots (``ids_TK == -1``) are skipped, so unwritten rows are never read.
- :func:`_weights_grad_kernel` ``dw[t, k] = <g[t], Y[t*K + k]>`` (the router-weight gradient).
- :func:`_topk_softmax_kernel` (and its backward) softmax top-k routing; :func:`_align_kernel` (or three kernels for
  many slots) the plan-free index: the slots sorted by expert, their segments and the tile schedule;
  :func:`_route_align_kernel` both in one program for few tokens (:func:`route_and_align`).

The interpreter (``TRITON_INTERPRET=1`` set before this module is imported) runs the same kernels on CPU tensors.
Two of its bf16 shortcomings (Triton 3.9) are worked around there only, so it computes what a GPU computes:
``tl.dot`` multiplies bf16 operands as raw ``uint16``, so they are widened to fp32 first (``UPCAST``: the same
products, bf16 x bf16 is exact in fp32, with fp32 accumulation); and fp32 -> bf16 casts truncate, so they round to
nearest even by hand (``RTNE``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

try:
    INTERPRET: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton < 3.4 has no knobs
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

#: kernel launches since import (tests use it to prove the kernels, not a fallback, produced the result)
LAUNCHES = {"count": 0}

EPI_NONE, EPI_SWIGLU, EPI_SWIGLU_BWD = 0, 1, 2

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)


# A grouped GEMM's accumulator: ``tl.dot``'s [BLOCK_M, BLOCK_N] tile, or with ``FMA`` (tiles of fewer than 16 rows,
# see FMA_MAX_ROWS) a [BLOCK_M, BLOCK_K, BLOCK_N] one that collects the products on the CUDA cores and is summed over K once at
# the end: a tile of one row multiplies one row (``tl.dot`` needs 16, and runs exact fp32 on the CUDA cores too), and
# the loop is loads and FMAs alone (no reduction across threads per step), as a memory-bound GEMV wants.
@triton.jit
def _acc_zeros(FMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    if FMA:  # (else: a constexpr if's taken branch is the only one compiled, but a return after it would be too)
        return tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit
def _mac(a, b, acc, FMA: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` into an accumulator of :func:`_acc_zeros`."""
    if FMA:
        return acc + a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]
    else:
        return _dot(a, b, acc, PRECISION, UPCAST)


@triton.jit
def _acc_result(acc, FMA: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] product held by an accumulator of :func:`_acc_zeros`."""
    if FMA:
        return tl.sum(acc, axis=1)
    else:
        return acc


@triton.jit
def _cast(x, dtype: tl.constexpr, RTNE: tl.constexpr):
    """``x.to(dtype)``; with ``RTNE`` (interpreter only) fp32 -> bf16 rounds to nearest even by hand, as a GPU does
    (the interpreter truncates)."""
    if RTNE:
        if dtype == tl.bfloat16:
            u = x.to(tl.float32).to(tl.uint32, bitcast=True)
            u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
            x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, stride_am, stride_ak,
    b_ptr, stride_be, stride_bn, stride_bk,
    bias_ptr, stride_bias_e,
    out_ptr, stride_om, stride_on,
    h_ptr, stride_hm, stride_hn,
    act_ptr, stride_actm, stride_actn,
    gather_ptr, scatter_ptr, scale_ptr,
    tile_expert_ptr, tile_row_ptr, seg_end_ptr,
    N, K, HALF, num_tiles_m,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr, SAVE_H: tl.constexpr,
    DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, RTNE: tl.constexpr, FMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # program -> (row tile, column tile), grouped along rows so neighbouring programs share weight tiles in L2
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:  # a tile past the last used one
        return
    e = e.to(tl.int64)
    row0 = tl.load(tile_row_ptr + pid_m)
    end = tl.load(seg_end_ptr + e)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    rows64 = rows.to(tl.int64)
    if GATHER:
        a_rows = tl.load(gather_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rows64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    # The SwiGLU forward's gate and up columns (`cols`, and `cols + HALF` of a [gate; up] weight) as one product over
    # both column tiles side by side (PAIR) where the tensor cores multiply (16-bit operands, or fp32 as tf32): one
    # tl.dot of twice the width, whose instructions read each A tile from shared memory once instead of twice (sm_90:
    # 8-14 fewer instructions a K step). On the CUDA cores (FMA tiles, exact fp32) the two accumulators are kept: an
    # exact fp32 product twice as wide spills registers at 64-row tiles.
    PAIR: tl.constexpr = EPILOGUE == 1 and not FMA and (DTYPE != tl.float32 or PRECISION != "ieee")
    jj = tl.arange(0, BLOCK_N * (1 + PAIR))
    b_cols = pid_n * BLOCK_N + jj % BLOCK_N  # the output column each of the tile's weight rows feeds
    b_rows = b_cols + (jj // BLOCK_N) * HALF
    b_ok = b_cols < N
    b_ptrs = b_ptr + e * stride_be + b_rows[None, :].to(tl.int64) * stride_bn + ks[:, None] * stride_bk
    b_up_off = HALF * stride_bn  # the up half of a [gate; up] weight (SwiGLU epilogue, two accumulators)
    acc = _acc_zeros(FMA, BLOCK_M, BLOCK_N * (1 + PAIR), BLOCK_K)
    acc_up = _acc_zeros(FMA, BLOCK_M, BLOCK_N, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = _cast(tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0), DTYPE, RTNE)
        b_mask = k_ok[:, None] & b_ok[None, :]
        b = _cast(tl.load(b_ptrs, mask=b_mask, other=0.0), DTYPE, RTNE)
        acc = _mac(a, b, acc, FMA, PRECISION, UPCAST)
        if EPILOGUE == 1 and not PAIR:
            b_up = _cast(tl.load(b_ptrs + b_up_off, mask=b_mask, other=0.0), DTYPE, RTNE)
            acc_up = _mac(a, b_up, acc_up, FMA, PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = _acc_result(acc, FMA)
    acc_up = _acc_result(acc_up, FMA)
    if PAIR:  # [gate | up] -> gate, up
        acc, acc_up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    if SCALE:  # rows scaled as scaling A's rows would, on the fp32 sums
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        acc = acc * scale
        if EPILOGUE == 1:
            acc_up = acc_up * scale

    if SCATTER:
        out_rows = tl.load(scatter_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        out_rows = rows64
    mask = row_ok[:, None] & col_ok[None, :]
    o_ptrs = out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on
    if EPILOGUE == 0:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e * stride_bias_e + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptrs, _cast(acc, out_ptr.dtype.element_ty, RTNE), mask=mask)
    elif EPILOGUE == 1:
        # SwiGLU forward: this program holds gate columns `cols` and up columns `cols + HALF` of the same rows
        if HAS_BIAS:
            bias_e = bias_ptr + e * stride_bias_e
            acc += tl.load(bias_e + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(bias_e + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        gate = _cast(acc, DTYPE, RTNE)  # round to the compute dtype as a GEMM in that dtype would
        up = _cast(acc_up, DTYPE, RTNE)
        if SAVE_H:
            h_ptrs = h_ptr + out_rows[:, None] * stride_hm + cols[None, :] * stride_hn
            tl.store(h_ptrs, gate, mask=mask)
            tl.store(h_ptrs + HALF * stride_hn, up, mask=mask)
        g32 = gate.to(tl.float32)
        # (g / (1 + e^-g), as PyTorch's silu; written g * sigmoid(g), ptxas serialised the K loop's tensor-core
        # products of the inference kernels (C7514: "non wgmma instructions reading accumulator registers"))
        silu = _cast(g32 / (1.0 + tl.exp(-g32)), DTYPE, RTNE).to(tl.float32)
        tl.store(o_ptrs, _cast(silu * up.to(tl.float32), out_ptr.dtype.element_ty, RTNE), mask=mask)
    else:
        # SwiGLU backward: acc = dA for hidden columns `cols`; h holds [gate | up] of the same (sorted) rows. With
        # SCALE, dA = scale * dY @ W^T and the activation is stored times the scale too: the down projection's
        # weight gradient sum_s dY_s^T (scale_s a_s) takes it from there
        da = _cast(acc, DTYPE, RTNE).to(tl.float32)
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :] * stride_hn
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + HALF * stride_hn, mask=mask, other=0.0).to(tl.float32)
        den = 1.0 + tl.exp(-gate)
        sig = 1.0 / den
        silu = gate / den  # (as the forward computes it)
        d_up = da * silu
        d_gate = da * up * (sig * (1.0 + gate * (1.0 - sig)))  # silu'(g) = s (1 + g (1 - s))
        tl.store(o_ptrs, _cast(d_gate, out_ptr.dtype.element_ty, RTNE), mask=mask)
        tl.store(o_ptrs + HALF * stride_on, _cast(d_up, out_ptr.dtype.element_ty, RTNE), mask=mask)
        act_ptrs = act_ptr + rows64[:, None] * stride_actm + cols[None, :] * stride_actn
        a = _cast(silu, DTYPE, RTNE).to(tl.float32) * up
        if SCALE:
            a = a * scale
        tl.store(act_ptrs, _cast(a, act_ptr.dtype.element_ty, RTNE), mask=mask)


@triton.jit
def _grouped_xty_kernel(
    l_ptr, stride_lm, stride_lk,
    r_ptr, stride_rm, stride_rn,
    out_ptr, stride_oe, stride_om, stride_on,
    dbias_ptr, stride_dbias_e,
    gather_l_ptr, gather_r_ptr, scale_ptr, seg_start_ptr, seg_end_ptr,
    M, N,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, SCALE_DBIAS: tl.constexpr, DBIAS: tl.constexpr,
    DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, RTNE: tl.constexpr, FMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[e] (M x N) = sum over the rows s of expert e of  L[s, :]^T  R[s, :];  dbias[e] = sum_s (scale_s) L[s, :]
    # (operands straight from memory: no arithmetic on them inside the loop, see _grouped_gemm_kernel)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    e = pid // (tiles_m * tiles_n)
    rem = pid % (tiles_m * tiles_n)
    pid_m = rem // tiles_n
    pid_n = rem % tiles_n
    start = tl.load(seg_start_ptr + e)
    end = tl.load(seg_end_ptr + e)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    ss = tl.arange(0, BLOCK_K)
    acc = _acc_zeros(FMA, BLOCK_M, BLOCK_N, BLOCK_K)
    dbias = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_K):
        rows = s0 + ss
        ok = rows < end
        if GATHER_L:
            l_rows = tl.load(gather_l_ptr + rows, mask=ok, other=0).to(tl.int64)
        else:
            l_rows = rows.to(tl.int64)
        if GATHER_R:
            r_rows = tl.load(gather_r_ptr + rows, mask=ok, other=0).to(tl.int64)
        else:
            r_rows = rows.to(tl.int64)
        lt = tl.load(l_ptr + l_rows[None, :] * stride_lm + ms[:, None] * stride_lk,
                     mask=m_ok[:, None] & ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K] = L^T tile
        lt = _cast(lt, DTYPE, RTNE)
        r = _cast(tl.load(r_ptr + r_rows[:, None] * stride_rm + ns[None, :] * stride_rn,
                          mask=ok[:, None] & n_ok[None, :], other=0.0), DTYPE, RTNE)
        acc = _mac(lt, r, acc, FMA, PRECISION, UPCAST)
        if DBIAS:
            if SCALE_DBIAS:
                dbias += tl.sum(lt.to(tl.float32) * tl.load(scale_ptr + rows, mask=ok, other=0.0)[None, :], axis=1)
            else:
                dbias += tl.sum(lt.to(tl.float32), axis=1)
    acc = _acc_result(acc, FMA)
    e64 = e.to(tl.int64)
    o_ptrs = out_ptr + e64 * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(o_ptrs, _cast(acc, out_ptr.dtype.element_ty, RTNE), mask=m_ok[:, None] & n_ok[None, :])
    if DBIAS:
        if pid_n == 0:
            tl.store(dbias_ptr + e64 * stride_dbias_e + ms, _cast(dbias, dbias_ptr.dtype.element_ty, RTNE), mask=m_ok)


@triton.jit
def _combine_kernel(
    y_ptr, stride_ys, stride_yd, w_ptr, ids_ptr, out_ptr, stride_ot, stride_od, T, D, K,
    HAS_W: tl.constexpr, RTNE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[t] = sum_k w[t, k] * Y[t*K + k], in fp32, k in order; empty slots (ids < 0) are skipped
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = ts < T
    d_ok = ds < D
    ts64 = ts.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(0, K):
        s = ts64 * K + k
        valid = t_ok & (tl.load(ids_ptr + s, mask=t_ok, other=-1) >= 0)
        y = tl.load(y_ptr + s[:, None] * stride_ys + ds[None, :] * stride_yd,
                    mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + s, mask=valid, other=0.0).to(tl.float32)
            y = tl.where(valid[:, None], y * w[:, None], 0.0)
        acc += y
    tl.store(out_ptr + ts64[:, None] * stride_ot + ds[None, :] * stride_od, _cast(acc, out_ptr.dtype.element_ty, RTNE),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _weights_grad_kernel(
    g_ptr, stride_gt, stride_gd, y_ptr, stride_ys, stride_yd, ids_ptr, out_ptr, S, D, K,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dw[s] = <g[s // K], Y[s]> for valid slots, 0 for empty ones
    ss = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = ss < S
    valid = s_ok & (tl.load(ids_ptr + ss, mask=s_ok, other=-1) >= 0)
    ss64 = ss.to(tl.int64)
    ts64 = ss64 // K
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = valid[:, None] & (ds < D)[None, :]
        g = tl.load(g_ptr + ts64[:, None] * stride_gt + ds[None, :] * stride_gd, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + ss64[:, None] * stride_ys + ds[None, :] * stride_yd, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(g * y, axis=1)
    tl.store(out_ptr + ss, acc.to(out_ptr.dtype.element_ty), mask=s_ok)


@triton.jit
def _segments_and_tiles(counts, es, E, counts_ptr, start_ptr, end_ptr, tile_expert_ptr, tile_row_ptr, num_tiles,
                        CHUNK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    """Store the slots per expert (``counts``, int32 ``[BLOCK_E]``, 0 past ``E``), their segments and the tile
    schedule; returns the segment starts."""
    e_ok = es < E
    end = tl.cumsum(counts, 0)
    start = end - counts
    tl.store(counts_ptr + es, counts.to(tl.int64), mask=es <= E)  # (and a 0 after them: the dropped slots)
    tl.store(start_ptr + es, start, mask=e_ok)
    tl.store(end_ptr + es, end, mask=e_ok)
    # tile t belongs to the expert whose tiles span it: #experts whose tiles end at or before t
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    first_row = start - (tile_end - tiles) * BLOCK_M  # row of tile t = first_row[e] + t * BLOCK_M
    for t0 in range(0, num_tiles, CHUNK_T):
        t = t0 + tl.arange(0, CHUNK_T)
        e_t = tl.sum((tile_end[None, :] <= t[:, None]).to(tl.int32), axis=1)
        row_t = tl.sum(tl.where(e_t[:, None] == es[None, :], first_row[None, :], 0), axis=1) + t * BLOCK_M
        used = e_t < E
        tl.store(tile_expert_ptr + t, tl.where(used, e_t, -1), mask=t < num_tiles)
        tl.store(tile_row_ptr + t, tl.where(used, row_t, 0), mask=t < num_tiles)
    return start


@triton.jit
def _align_kernel(
    ids_ptr, order_ptr, token_ptr, counts_ptr, start_ptr, end_ptr, tile_expert_ptr, tile_row_ptr,
    S, E, K, num_tiles,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    _align_one(ids_ptr, order_ptr, token_ptr, counts_ptr, start_ptr, end_ptr, tile_expert_ptr, tile_row_ptr,
               S, E, K, num_tiles, BLOCK_S, BLOCK_E, CHUNK_T, BLOCK_M)


@triton.jit
def _align_one(ids_ptr, order_ptr, token_ptr, counts_ptr, start_ptr, end_ptr, tile_expert_ptr, tile_row_ptr,
               S, E, K, num_tiles,
               BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    # One program: the slots sorted by expert (stable), tokens per expert, segments and the tile schedule
    s = tl.arange(0, BLOCK_S)
    e_s = tl.load(ids_ptr + s, mask=s < S, other=E).to(tl.int32)  # padding lanes sort last, into bin E
    key = tl.sort(e_s * BLOCK_S + s)  # expert-major, slot-minor: a stable sort by expert
    slot = key % BLOCK_S
    tl.store(order_ptr + s, slot, mask=s < S)
    tl.store(token_ptr + s, slot // K, mask=s < S)
    es = tl.arange(0, BLOCK_E)
    counts = tl.where(es < E, tl.histogram(e_s, BLOCK_E), 0)
    _segments_and_tiles(counts, es, E, counts_ptr, start_ptr, end_ptr, tile_expert_ptr, tile_row_ptr, num_tiles,
                        CHUNK_T, BLOCK_M)


# Many slots: three launches. Each block of BLOCK_S slots counts its experts; one program turns the counts into
# segments, the tile schedule and each (block, expert)'s first sorted position; each block then sorts its own slots
# and writes them there. The result is the same stable sort by expert.
@triton.jit
def _align_count_kernel(ids_ptr, hist_ptr, S, E, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    s = b * BLOCK_S + tl.arange(0, BLOCK_S)
    e_s = tl.load(ids_ptr + s, mask=s < S, other=E).to(tl.int32)
    tl.store(hist_ptr + b * BLOCK_E + tl.arange(0, BLOCK_E), tl.histogram(e_s, BLOCK_E))


@triton.jit
def _align_scan_kernel(
    hist_ptr, base_ptr, counts_ptr, start_ptr, end_ptr, tile_expert_ptr, tile_row_ptr, E, num_blocks, num_tiles,
    CHUNK_B: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # the blocks' histograms in chunks of CHUNK_B blocks (a [CHUNK_B, BLOCK_E] tile a step, see _ALIGN_TILE): first
    # the totals, then each block's offsets with a running sum over the blocks before its chunk
    cb = tl.arange(0, CHUNK_B)
    es = tl.arange(0, BLOCK_E)
    e_ok = es < E
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, num_blocks, CHUNK_B):
        bs = b0 + cb
        counts += tl.sum(tl.load(hist_ptr + bs[:, None] * BLOCK_E + es[None, :],
                                 mask=(bs < num_blocks)[:, None] & e_ok[None, :], other=0), axis=0)
    # before[e]: where expert e's slots of the current chunk's first block start (its segment start + earlier blocks')
    before = _segments_and_tiles(counts, es, E, counts_ptr, start_ptr, end_ptr, tile_expert_ptr, tile_row_ptr,
                                 num_tiles, CHUNK_T, BLOCK_M)
    for b0 in range(0, num_blocks, CHUNK_B):
        bs = b0 + cb
        b_ok = bs < num_blocks
        h = tl.load(hist_ptr + bs[:, None] * BLOCK_E + es[None, :], mask=b_ok[:, None] & e_ok[None, :], other=0)
        in_earlier_blocks = tl.cumsum(h, 0) - h  # slots of expert e in the chunk's blocks before b
        lower_in_block = tl.cumsum(h, 1) - h  # slots of block b with a lower expert: where e starts in its sorted block
        # sorted lane i of block b (expert e) goes to before[e] + in_earlier_blocks[b, e] + (i - lower_in_block[b, e])
        tl.store(base_ptr + bs[:, None] * BLOCK_E + es[None, :],
                 before[None, :] + in_earlier_blocks - lower_in_block, mask=b_ok[:, None])
        before += tl.sum(h, axis=0)


@triton.jit
def _align_place_kernel(ids_ptr, base_ptr, order_ptr, token_ptr, S, E, K,
                        BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK_S)
    e_s = tl.load(ids_ptr + b * BLOCK_S + i, mask=b * BLOCK_S + i < S, other=E).to(tl.int32)
    key = tl.sort(e_s * BLOCK_S + i)
    e = key // BLOCK_S
    slot = b * BLOCK_S + key % BLOCK_S
    ok = e < E  # (padding lanes sort last)
    pos = tl.load(base_ptr + b * BLOCK_E + e, mask=ok, other=0) + i
    tl.store(order_ptr + pos, slot, mask=ok)
    tl.store(token_ptr + pos, slot // K, mask=ok)


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, stride_lt, bias_ptr, ids_ptr, w_ptr, p_ptr, T, E, renorm_min, scale,
    K: tl.constexpr, RENORM: tl.constexpr, SAVE_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    _topk_softmax_rows(tl.program_id(0) * BLOCK_T, logits_ptr, stride_lt, bias_ptr, ids_ptr, w_ptr, p_ptr, T, E,
                       renorm_min, scale, K, RENORM, SAVE_P, BLOCK_T, BLOCK_E)


@triton.jit
def _route_align_kernel(
    logits_ptr, stride_lt, bias_ptr, ids_ptr, w_ptr, p_ptr,
    order_ptr, token_ptr, counts_ptr, start_ptr, end_ptr, tile_expert_ptr, tile_row_ptr,
    T, E, renorm_min, scale, num_tiles,
    K: tl.constexpr, RENORM: tl.constexpr, SAVE_P: tl.constexpr, BLOCK_T: tl.constexpr, ROUTE_E: tl.constexpr,
    BLOCK_S: tl.constexpr, ALIGN_E: tl.constexpr, CHUNK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # One program, few tokens: the routing of all T tokens (_topk_softmax_kernel's), then their index
    # (_align_kernel's) from the ids it has just written: one launch instead of two
    _topk_softmax_rows(0, logits_ptr, stride_lt, bias_ptr, ids_ptr, w_ptr, p_ptr, T, E, renorm_min, scale, K, RENORM,
                       SAVE_P, BLOCK_T, ROUTE_E)
    tl.debug_barrier()  # (the ids, stored by every thread of the program, visible to all of them)
    _align_one(ids_ptr, order_ptr, token_ptr, counts_ptr, start_ptr, end_ptr, tile_expert_ptr, tile_row_ptr,
               T * K, E, K, num_tiles, BLOCK_S, ALIGN_E, CHUNK_T, BLOCK_M)


@triton.jit
def _topk_softmax_rows(t0, logits_ptr, stride_lt, bias_ptr, ids_ptr, w_ptr, p_ptr, T, E, renorm_min, scale,
                       K: tl.constexpr, RENORM: tl.constexpr, SAVE_P: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_E: tl.constexpr):
    # p = softmax(logits); ids = the K largest p + bias (ties: lowest expert first); w = p[ids] (/ max(sum, min)) * scale
    # for tokens t0 .. t0 + BLOCK_T
    ts = t0 + tl.arange(0, BLOCK_T)
    es = tl.arange(0, BLOCK_E)
    t_ok = ts < T
    e_ok = es < E
    logit = tl.load(logits_ptr + ts[:, None].to(tl.int64) * stride_lt + es[None, :], mask=t_ok[:, None] & e_ok[None, :],
                    other=0.0).to(tl.float32)
    logit = tl.where(e_ok[None, :], logit, -float("inf"))  # (rows past T stay finite: no NaN from -inf - -inf)
    m = tl.max(logit, axis=1)
    p = tl.exp(logit - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    if SAVE_P:
        tl.store(p_ptr + ts[:, None].to(tl.int64) * E + es[None, :], p, mask=t_ok[:, None] & e_ok[None, :])
    choice = tl.where(e_ok[None, :], p + tl.load(bias_ptr + es, mask=e_ok, other=0.0).to(tl.float32)[None, :],
                      -float("inf"))
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    left = choice
    for _ in tl.static_range(K):  # the sum of the chosen p (the renormaliser), in choice order
        pick = es[None, :] == tl.argmax(left, axis=1)[:, None]
        total += tl.sum(tl.where(pick, p, 0.0), axis=1)
        left = tl.where(pick, -float("inf"), left)
    if RENORM:
        denom = tl.where(t_ok, tl.maximum(total, renorm_min), 1.0)  # (rows past T: no 0 / 0)
    else:
        denom = tl.full((BLOCK_T,), 1.0, tl.float32)
    left = choice
    for k in tl.static_range(K):
        idx = tl.argmax(left, axis=1)
        pick = es[None, :] == idx[:, None]
        w = tl.sum(tl.where(pick, p, 0.0), axis=1)
        if RENORM:
            w = w / denom
        tl.store(ids_ptr + ts * K + k, idx.to(tl.int64), mask=t_ok)
        tl.store(w_ptr + ts * K + k, w * scale, mask=t_ok)
        left = tl.where(pick, -float("inf"), left)


@triton.jit
def _topk_softmax_bwd_kernel(
    p_ptr, ids_ptr, dw_ptr, dp_ptr, out_ptr, T, E, renorm_min, scale,
    K: tl.constexpr, RENORM: tl.constexpr, HAS_DP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # d logits of w = scale * p[ids] / max(sum_k p[ids], min) (and of p itself, if it was used): through the
    # renormaliser (unless clamped), then the softmax: d_logit = p * (dp - sum(p * dp))
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    es = tl.arange(0, BLOCK_E)
    t_ok = ts < T
    mask = t_ok[:, None] & (es < E)[None, :]
    offs = ts[:, None].to(tl.int64) * E + es[None, :]
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    direct = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    chosen = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    w_dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in tl.static_range(K):
        idx = tl.load(ids_ptr + ts * K + k, mask=t_ok, other=-1)
        dw = tl.load(dw_ptr + ts * K + k, mask=t_ok, other=0.0).to(tl.float32)
        pick = es[None, :] == idx[:, None]
        p_k = tl.sum(tl.where(pick, p, 0.0), axis=1)
        total += p_k
        w_dot += dw * p_k
        direct = tl.where(pick, dw[:, None], direct)
        chosen = tl.where(pick, 1.0, chosen)
    if RENORM:
        denom = tl.where(t_ok, tl.maximum(total, renorm_min), 1.0)
        through = tl.where(total >= renorm_min, w_dot * scale / (denom * denom), 0.0)
        dp = direct * (scale / denom)[:, None] - chosen * through[:, None]
    else:
        dp = direct * scale
    if HAS_DP:
        dp += tl.load(dp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, p * (dp - tl.sum(p * dp, axis=1)[:, None]), mask=mask)


# ---------------------------------------------------------------------------------------------------- configs
# (plain Python on the host: Triton's own ``cdiv`` and ``next_power_of_2`` are constexpr functions whose calls cost
# ~4 us each on the host since Triton 3.5, 13-25% of an inference step's host time at ~16 calls)
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, lo: int, hi: int) -> int:
    """The power of two at or above ``n``, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


def dot_precision(dtype: torch.dtype) -> tuple[str, bool]:
    """``(input_precision, upcast)`` for ``tl.dot`` on ``dtype`` operands. fp32 follows torch's own switch
    (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``): exact ``ieee`` unless
    TF32 is allowed. Under the interpreter bf16 operands are widened to fp32 (see the module docstring)."""
    upcast = INTERPRET and dtype == torch.bfloat16
    if dtype == torch.float32 or upcast:
        tf32 = not INTERPRET and torch.backends.cuda.matmul.allow_tf32
        return ("tf32" if tf32 else "ieee"), upcast
    return "tf32", False  # the default; Triton ignores it for 16-bit operands


#: GEMMs over at most this many rows per expert (on average; by compute dtype) take tiles of 1-8 rows multiplied on
#: the CUDA cores (:func:`_mac`) instead of ``tl.dot``'s 16-row tiles. fp32 up to 8: exact ``tl.dot`` runs on the CUDA
#: cores too, so 16-row tiles multiply up to 16x the rows there are. 16-bit dtypes are absent (never): ``tl.dot`` runs
#: them on the tensor cores, where a one-token layer measured 1.67x transformers' on an H200; the few-row tiles (4x the
#: programs, 1/4 the steps in a row) are the benchmark's A/B there (``benchmarks/bench_gpu.py``), not yet measured.
FMA_MAX_ROWS = {torch.float32: 8}


@contextlib.contextmanager
def fma_rows(limits: dict | None):
    """:data:`FMA_MAX_ROWS` set to ``limits`` inside (None: as it stands): the tiles of the GEMMs configured there,
    those of a CUDA graph captured there included."""
    global FMA_MAX_ROWS
    saved = FMA_MAX_ROWS
    FMA_MAX_ROWS = saved if limits is None else limits
    try:
        yield
    finally:
        FMA_MAX_ROWS = saved


def other_tiles(rows_per_expert: float, dtype: torch.dtype) -> tuple[str, dict] | None:
    """The other choice of tiles at these rows, ``(name, FMA_MAX_ROWS for it)``: 16-row ``tl.dot`` tiles where the
    GEMMs take few-row ones, few-row ones for 16-bit dtypes at one row per expert or fewer; None elsewhere. What the
    benchmarks compare (``bench_gpu.py`` timed on a GPU, ``sass_triton.py`` compiled)."""
    if block_m_for(rows_per_expert, dtype) < 16:
        return "tl.dot", {k: v for k, v in FMA_MAX_ROWS.items() if k != dtype}
    if dtype != torch.float32 and rows_per_expert <= 1:
        return "few-row", {**FMA_MAX_ROWS, dtype: 1}
    return None


def block_m_for(rows_per_expert: float, dtype: torch.dtype) -> int:
    """``BLOCK_M`` of :func:`gemm_config` for GEMMs in ``dtype`` (it fixes the tile schedule)."""
    return _block_m(rows_per_expert, INTERPRET, FMA_MAX_ROWS.get(dtype, 0))


def _block_m(rows_per_expert: float, interpret: bool, fma_max_rows: float) -> int:
    if rows_per_expert <= fma_max_rows:
        return _pow2(math.ceil(rows_per_expert), 1, 8)
    if interpret:
        return 16
    return 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64 if rows_per_expert <= 512 else 128


def gemm_config(rows_per_expert: float, N: int, K: int, dtype: torch.dtype, swiglu: bool = False) -> dict:
    """Tile sizes for :func:`_grouped_gemm_kernel` (a heuristic in the spirit of vLLM's default ``fused_moe``
    configs; ``BLOCK_M`` also fixes the tile schedule). ``swiglu``: a SwiGLU epilogue, forward (two accumulators) or
    backward (the pre-activation's gate and up tiles beside the accumulator), takes 64-column tiles from 64 rows: at
    128 columns they spill registers (sm_90, ``benchmarks/sass_triton.py``).
    A fresh dict, from a memo (a training step asks for four, ~4 us each on the host)."""
    return dict(_gemm_config(rows_per_expert, N, K, dtype, swiglu, INTERPRET, FMA_MAX_ROWS.get(dtype, 0)))


@functools.lru_cache(maxsize=1024)
def _gemm_config(rows_per_expert: float, N: int, K: int, dtype: torch.dtype, swiglu: bool, interpret: bool,
                 fma_max_rows: float) -> dict:
    block_m = _block_m(rows_per_expert, interpret, fma_max_rows)
    if interpret:  # few large programs are fastest for numpy
        return dict(BLOCK_M=block_m, BLOCK_N=_pow2(N, 16, 64), BLOCK_K=_pow2(K, 16, 64), GROUP_M=1,
                    num_warps=4, num_stages=1, FMA=block_m < 16)
    if block_m < 16:  # accumulators of [BLOCK_M, BLOCK_K, BLOCK_N] = 4096 (32 registers a thread of 4 warps, each);
        # narrow column tiles, as a memory-bound GEMV wants many programs (one-token Mixtral-like down projection: 64,
        # against 16 of 64 columns), long K steps (16 KiB of weights a step: few steps in a row, each a memory latency)
        return dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=min(256 // block_m, _pow2(K, 16, 256)), GROUP_M=8,
                    num_warps=4, num_stages=2, FMA=True)
    wide = dtype != torch.float32
    bk = 64 if wide else 32
    if rows_per_expert <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, num_warps=4, num_stages=4)
    elif rows_per_expert <= 64:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=bk, num_warps=4, num_stages=4)
    elif rows_per_expert <= 512:
        cfg = dict(BLOCK_M=64, BLOCK_N=64 if swiglu else 128, BLOCK_K=bk, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=64 if swiglu else 128, BLOCK_K=bk, num_warps=8, num_stages=3)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _pow2(N, 16, 256))
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], _pow2(K, 16, 256))
    cfg["GROUP_M"] = 8
    cfg["FMA"] = False
    assert cfg["BLOCK_M"] == block_m
    return cfg


def xty_config(rows_per_expert: float, M: int, N: int, dtype: torch.dtype) -> dict:
    """Tile sizes for :func:`_grouped_xty_kernel` (``BLOCK_K`` runs over an expert's rows); a fresh dict, from a
    memo."""
    return dict(_xty_config(rows_per_expert, M, N, dtype, INTERPRET, FMA_MAX_ROWS.get(dtype, 0)))


@functools.lru_cache(maxsize=1024)
def _xty_config(rows_per_expert: float, M: int, N: int, dtype: torch.dtype, interpret: bool,
                fma_max_rows: float) -> dict:
    rows_k = _block_m(rows_per_expert, interpret, fma_max_rows)  # (the GEMMs' choice: steps of 1-8 rows, or tl.dot)
    fma = rows_k < 16
    if interpret:
        return dict(BLOCK_M=_pow2(M, 16, 64), BLOCK_N=_pow2(N, 16, 64), BLOCK_K=rows_k, num_warps=4, num_stages=1,
                    FMA=fma)
    if fma:  # accumulators of [BLOCK_M, rows, BLOCK_N] <= 8192 (64 registers a thread of 4 warps)
        side = 64 if rows_k <= 2 else 32
        return dict(BLOCK_M=min(side, _pow2(M, 16, 256)), BLOCK_N=min(side, _pow2(N, 16, 256)), BLOCK_K=rows_k,
                    num_warps=4, num_stages=2, FMA=True)
    wide = dtype != torch.float32
    big = rows_per_expert > 1024
    cfg = dict(BLOCK_M=128 if big else 64, BLOCK_N=128 if big else 64, BLOCK_K=64 if wide else 32,
               num_warps=8 if big else 4, num_stages=3)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], _pow2(M, 16, 256))
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _pow2(N, 16, 256))
    cfg["FMA"] = False
    return cfg


# ------------------------------------------------------------------------------------------------- schedule
def tile_schedule(counts_E: torch.Tensor, offsets_E: torch.Tensor, num_slots: int, block_m: int):
    """Per row tile: its expert (``-1`` past the last used tile) and first sorted row, on the device, no host sync.

    Expert ``e`` owns rows ``[offsets_E[e] - counts_E[e], offsets_E[e])`` and ``ceil(counts_E[e] / BLOCK_M)``
    tiles; the number of tiles is bounded on the host by ``min(S, ceil(S / BLOCK_M) + E)``."""
    E = counts_E.shape[0]
    num_tiles = min(num_slots, -(-num_slots // block_m) + E)
    counts = counts_E.to(torch.int64)
    tiles_E = (counts + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, 0)
    t = torch.arange(num_tiles, device=counts.device)
    e_t = torch.searchsorted(tile_end_E, t, right=True)
    e_c = e_t.clamp(max=E - 1)
    seg_start_E = offsets_E.to(torch.int64) - counts
    row_t = seg_start_E[e_c] + (t - (tile_end_E - tiles_E)[e_c]) * block_m
    tile_expert = torch.where(e_t < E, e_c, -1).to(torch.int32)
    return tile_expert, row_t.to(torch.int32), num_tiles


#: the most slots :func:`align` sorts in one program; beyond, blocks of ALIGN_BLOCK_SLOTS sort themselves
ALIGN_MAX_SLOTS = 4096
ALIGN_BLOCK_SLOTS = 1024
#: the most experts the align kernels take (their histograms hold E + 1 bins, a power of two)
ALIGN_MAX_EXPERTS = 1023
#: the largest [tiles or blocks, experts] tile a step of the align kernels holds: 64 values a thread of 4 warps. The
#: tile schedule's [CHUNK_T, BLOCK_E] comparison and the scan's [CHUNK_B, BLOCK_E] histograms loop over chunks of
#: this size; compiled for sm_90, the whole tables of a fine-grained batch of 8192 tokens at once (64 blocks and 512
#: tiles by 128 expert bins) made the scan, a single program every GEMM waits for, spill (1854 spill stores)
_ALIGN_TILE = 2**13


def align_usable(num_slots: int, num_experts: int) -> bool:
    """Whether :func:`align` handles this many slots and experts (any number of slots; up to ALIGN_MAX_EXPERTS)."""
    return num_slots > 0 and num_experts <= ALIGN_MAX_EXPERTS


def align(ids_TK: torch.Tensor, num_experts: int, block_m: int, block_slots: int | None = None):
    """Everything the grouped GEMMs need to know about a dropless routing ``ids_TK`` (int64 ``[T, K]``, every slot
    in ``[0, E)``): ``(order_S, token_S, counts_E, seg_start_E, seg_end_E, (tile_expert, tile_row, num_tiles))``,
    int32 except ``counts_E`` (int64, ``E + 1`` long: the last is 0, a dropped-slot count that needs no launch of its
    own); the same values as a stable sort of the slots by expert
    (:meth:`moekit.LocalDispatcher.plan`) followed by :func:`tile_schedule`. Up to ``ALIGN_MAX_SLOTS`` slots in one
    launch of :func:`_align_kernel`, more in three (``block_slots`` forces the three-launch path, for tests)."""
    T, K = ids_TK.shape
    S, E = T * K, num_experts
    out, block_e, chunk_t = _align_outputs(S, E, block_m, ids_TK.device)
    order, token, counts, start, end, (tile_expert, tile_row, num_tiles) = out
    if block_slots is None and S <= ALIGN_MAX_SLOTS:
        block_s = _pow2(S, 16, ALIGN_MAX_SLOTS)
        _launch(_align_kernel, (1,), ids_TK, order, token, counts, start, end, tile_expert, tile_row, S, E, K,
                num_tiles, BLOCK_S=block_s, BLOCK_E=block_e, CHUNK_T=chunk_t, BLOCK_M=block_m,
                num_warps=4 if block_s <= 1024 else 8)
        return out
    block_s = block_slots or ALIGN_BLOCK_SLOTS
    blocks = _cdiv(S, block_s)
    hist, base = torch.empty(2, blocks, block_e, dtype=torch.int32, device=ids_TK.device)
    _launch(_align_count_kernel, (blocks,), ids_TK, hist, S, E, BLOCK_S=block_s, BLOCK_E=block_e, num_warps=4)
    _launch(_align_scan_kernel, (1,), hist, base, counts, start, end, tile_expert, tile_row, E, blocks, num_tiles,
            CHUNK_B=max(2, min(_pow2(blocks, 1, 2**30), _ALIGN_TILE // block_e)), BLOCK_E=block_e, CHUNK_T=chunk_t,
            BLOCK_M=block_m, num_warps=8)
    _launch(_align_place_kernel, (blocks,), ids_TK, base, order, token, S, E, K, BLOCK_S=block_s, BLOCK_E=block_e,
            num_warps=4)
    return out


def _align_outputs(S: int, E: int, block_m: int, dev):
    """:func:`align`'s outputs, empty, and its kernels' expert block and tile chunk."""
    num_tiles = min(S, -(-S // block_m) + E)
    block_e = _pow2(E + 1, 16, 2**30)
    chunk_t = max(8, min(_pow2(num_tiles, 8, 2**30), _ALIGN_TILE // block_e))
    # (split_with_sizes, not split: the latter's Python wrapper costs ~5 us of a small forward's host time)
    order, token, start, end, tile_expert, tile_row = torch.empty(
        2 * S + 2 * E + 2 * num_tiles, dtype=torch.int32, device=dev).split_with_sizes(
        [S, S, E, E, num_tiles, num_tiles])
    counts = torch.empty(E + 1, dtype=torch.int64, device=dev)  # (the kernel writes a 0 at [E]: nothing dropped)
    return (order, token, counts, start, end, (tile_expert, tile_row, num_tiles)), block_e, chunk_t


def route_and_align(logits_TE: torch.Tensor, bias_E: torch.Tensor, k: int, renormalize: bool, renorm_min: float,
                    scale: float, block_m: int, save_p: bool = False):
    """``(ids_TK, weights_TK[, probs_TE], index)``: :func:`topk_softmax` of ``logits_TE`` and :func:`align` of its
    ids (the same values, bit for bit: the same tiles and warps), in one launch (:func:`_route_align_kernel`) where one
    program routes every token (up to 64 tokens, fewer with over 64 experts) and sorts up to 1024 slots, else the two
    functions' launches."""
    T, E = logits_TE.shape
    S = T * k
    block_t, route_e, warps = _route_blocks(E)
    if T > block_t or S > 1024:
        routed = topk_softmax(logits_TE, bias_E, k, renormalize, renorm_min, scale, save_p)
        return *routed, align(routed[0], E, block_m)
    ids, weights, p = _routing_outputs(logits_TE, k, save_p)
    out, align_e, chunk_t = _align_outputs(S, E, block_m, logits_TE.device)
    order, token, counts, start, end, (tile_expert, tile_row, num_tiles) = out
    block_s = _pow2(S, 16, ALIGN_MAX_SLOTS)
    _launch(_route_align_kernel, (1,), logits_TE, logits_TE.stride(0), bias_E, ids, weights, p,
            order, token, counts, start, end, tile_expert, tile_row, T, E, float(renorm_min), float(scale), num_tiles,
            K=k, RENORM=bool(renormalize), SAVE_P=save_p, BLOCK_T=block_t, ROUTE_E=route_e, BLOCK_S=block_s,
            ALIGN_E=align_e, CHUNK_T=chunk_t, BLOCK_M=block_m, num_warps=warps)
    return (ids, weights, p, out) if save_p else (ids, weights, out)


def _routing_outputs(logits_TE: torch.Tensor, k: int, save_p: bool):
    """The routing kernels' outputs, empty: int64 ids and fp32 weights ``[T, k]``, fp32 probabilities ``[T, E]``
    (``save_p``; else the weights stand in, unwritten)."""
    T, E = logits_TE.shape
    ids = torch.empty(T, k, dtype=torch.int64, device=logits_TE.device)
    weights = torch.empty(T, k, dtype=torch.float32, device=logits_TE.device)
    return ids, weights, torch.empty(T, E, dtype=torch.float32, device=logits_TE.device) if save_p else weights


def _route_blocks(E: int) -> tuple[int, int, int]:
    """The routing kernels' ``(BLOCK_T tokens, BLOCK_E experts, warps)`` a program: 8 warps for a full tile of 4096
    scores (fine-grained, 64 experts: with 4, sm_90 code of 255 registers spilled), else 4; the same for the routing
    alone and routed with its index, which therefore reduce in the same order."""
    block_e = _pow2(E, 16, 2**16)
    block_t = max(1, min(16 if INTERPRET else 64, 4096 // block_e))
    return block_t, block_e, 8 if block_t * block_e >= 4096 else 4


def topk_softmax(logits_TE: torch.Tensor, bias_E: torch.Tensor, k: int, renormalize: bool, renorm_min: float,
                 scale: float, save_p: bool = False):
    """Softmax top-k routing of fp32 ``logits_TE`` in one launch (:func:`_topk_softmax_kernel`): int64 ``ids_TK``
    (the ``k`` largest ``softmax + bias_E``, in descending order) and fp32 ``weights_TK`` (their probabilities,
    divided by ``max(sum, renorm_min)`` if ``renormalize``, times ``scale``): what
    :class:`moekit.routing.SoftmaxTopK` computes, up to rounding of the softmax (so near-ties within an ulp may
    choose differently) and ties broken towards the lower expert index. ``save_p``: also return the probabilities
    (fp32 ``[T, E]``), which :func:`topk_softmax_backward` needs."""
    T, E = logits_TE.shape
    ids, weights, p = _routing_outputs(logits_TE, k, save_p)
    block_t, block_e, warps = _route_blocks(E)
    _launch(_topk_softmax_kernel, (_cdiv(T, block_t),), logits_TE, logits_TE.stride(0), bias_E, ids, weights, p,
            T, E, float(renorm_min), float(scale), K=k, RENORM=bool(renormalize), SAVE_P=save_p, BLOCK_T=block_t,
            BLOCK_E=block_e, num_warps=warps)
    return (ids, weights, p) if save_p else (ids, weights)


def topk_softmax_backward(p_TE: torch.Tensor, ids_TK: torch.Tensor, d_weights_TK: torch.Tensor,
                          d_probs_TE: torch.Tensor | None, renormalize: bool, renorm_min: float,
                          scale: float) -> torch.Tensor:
    """fp32 gradient of the logits of :func:`topk_softmax` from those of its weights (and probabilities, if used)."""
    T, E = p_TE.shape
    K = ids_TK.shape[1]
    out = torch.empty_like(p_TE)
    block_t, block_e, warps = _route_blocks(E)
    _launch(_topk_softmax_bwd_kernel, (_cdiv(T, block_t),), p_TE, ids_TK, d_weights_TK.contiguous(),
            d_probs_TE.contiguous() if d_probs_TE is not None else p_TE, out, T, E, float(renorm_min), float(scale),
            K=K, RENORM=bool(renormalize), HAS_DP=d_probs_TE is not None, BLOCK_T=block_t, BLOCK_E=block_e,
            num_warps=warps)
    return out


# ------------------------------------------------------------------------------------------------- launchers
def _launch(kernel, grid, *args, **kwargs) -> None:
    if grid[0] == 0 or (len(grid) > 1 and grid[1] == 0):
        return
    LAUNCHES["count"] += 1
    name = getattr(kernel, "__name__", "kernel")
    LAUNCHES[name] = LAUNCHES.get(name, 0) + 1
    dev = args[0].device  # (every kernel's first argument is a tensor)
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):  # Triton launches on the current device, not the tensors'
            kernel[grid](*args, **kwargs)
        return
    kernel[grid](*args, **kwargs)


def grouped_gemm(a, b, out, *, sched, seg_end, N: int, K: int, stride_bn: int, stride_bk: int, dtype,
                 rows_per_expert: float, gather=None, scatter=None, scale=None, bias=None,
                 epilogue: int = EPI_NONE, half: int = 0, h=None, act=None, cfg: dict | None = None) -> None:
    """Launch :func:`_grouped_gemm_kernel` (see there). ``b`` is ``[E, ...]`` read as ``B[e][n, k]`` through
    ``stride_bn`` / ``stride_bk``; ``sched = (tile_expert, tile_row, num_tiles)`` from :func:`tile_schedule` with
    the same ``BLOCK_M`` as ``cfg``."""
    cfg = cfg or gemm_config(rows_per_expert, N, K, dtype, swiglu=epilogue != EPI_NONE)
    tile_expert, tile_row, num_tiles = sched
    prec, upcast = dot_precision(dtype)
    dummy = out
    h_ = h if h is not None else dummy
    act_ = act if act is not None else dummy
    grid = (num_tiles * _cdiv(N, cfg["BLOCK_N"]),)
    _launch(_grouped_gemm_kernel, grid,
            a, a.stride(0), a.stride(1),
            b, b.stride(0), stride_bn, stride_bk,
            bias if bias is not None else dummy, bias.stride(0) if bias is not None else 0,
            out, out.stride(0), out.stride(1),
            h_, h_.stride(0), h_.stride(1),
            act_, act_.stride(0), act_.stride(1),
            gather if gather is not None else tile_row, scatter if scatter is not None else tile_row,
            scale if scale is not None else dummy,
            tile_expert, tile_row, seg_end,
            N, K, half, num_tiles,
            GATHER=gather is not None, SCATTER=scatter is not None, SCALE=scale is not None,
            HAS_BIAS=bias is not None, EPILOGUE=epilogue, SAVE_H=h is not None,
            DTYPE=_TL_DTYPES[dtype], UPCAST=upcast, PRECISION=prec, RTNE=INTERPRET, **cfg)


def grouped_xty(l_, r, out, *, seg_start, seg_end, dtype, rows_per_expert: float, gather_l=None, gather_r=None,
                dbias=None, dbias_scale=None, cfg: dict | None = None) -> None:
    """Launch :func:`_grouped_xty_kernel`: ``out[e] = L[seg_e]^T @ R[seg_e]`` (``out`` is ``[E, M, N]``) and, with
    ``dbias``, ``dbias[e] = sum_s (dbias_scale_s) L[s]`` over the rows ``s`` of expert ``e``."""
    E, M, N = out.shape
    cfg = cfg or xty_config(rows_per_expert, M, N, dtype)
    prec, upcast = dot_precision(dtype)
    grid = (E * _cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
    _launch(_grouped_xty_kernel, grid,
            l_, l_.stride(0), l_.stride(1),
            r, r.stride(0), r.stride(1),
            out, out.stride(0), out.stride(1), out.stride(2),
            dbias if dbias is not None else out, dbias.stride(0) if dbias is not None else 0,
            gather_l if gather_l is not None else seg_start, gather_r if gather_r is not None else seg_start,
            dbias_scale if dbias_scale is not None else out, seg_start, seg_end,
            M, N,
            GATHER_L=gather_l is not None, GATHER_R=gather_r is not None, SCALE_DBIAS=dbias_scale is not None,
            DBIAS=dbias is not None, DTYPE=_TL_DTYPES[dtype], UPCAST=upcast, PRECISION=prec, RTNE=INTERPRET, **cfg)


def combine(y_SD: torch.Tensor, ids_TK: torch.Tensor, out_TD: torch.Tensor, w_TK: torch.Tensor | None = None):
    """``out[t] = sum_k w[t, k] * y[t*K + k]`` over the valid slots (``y_SD`` in slot-major order), in fp32."""
    T, K = ids_TK.shape
    D = out_TD.shape[1]
    block_d = 32 if INTERPRET else _pow2(D, 16, 128)
    block_t = 16 if INTERPRET else 32
    grid = (_cdiv(T, block_t), _cdiv(D, block_d))
    _launch(_combine_kernel, grid, y_SD, y_SD.stride(0), y_SD.stride(1),
            w_TK if w_TK is not None else out_TD, ids_TK, out_TD, out_TD.stride(0), out_TD.stride(1), T, D, K,
            HAS_W=w_TK is not None, RTNE=INTERPRET, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out_TD


def weights_grad(g_TD: torch.Tensor, y_SD: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """fp32 ``dw[t, k] = <g[t], y[t*K + k]>`` (0 for empty slots)."""
    T, K = ids_TK.shape
    S, D = T * K, g_TD.shape[1]
    out = torch.empty(S, dtype=torch.float32, device=g_TD.device)
    block_s = 16 if INTERPRET else 64
    block_d = 32 if INTERPRET else _pow2(D, 16, 128)
    _launch(_weights_grad_kernel, (_cdiv(S, block_s),), g_TD, g_TD.stride(0), g_TD.stride(1),
            y_SD, y_SD.stride(0), y_SD.stride(1), ids_TK, out, S, D, K,
            BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)
    return out.view(T, K)
