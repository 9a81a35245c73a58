/* moekit CPU kernels: an MoE layer's experts (grouped GEMMs with their epilogues fused), routing and the memory-bound
 * steps between them.
 *
 * Compiled on first use by moekit/kernels/cpu.py with the system C compiler (-O3 -march=native -fopenmp) and called
 * through ctypes, so there is no dependency on PyTorch's headers. OpenMP resolves to the libgomp that PyTorch has
 * already loaded, so these kernels share PyTorch's thread pool.
 *
 * Every kernel reads and writes row-major matrices with an explicit row stride (in elements), float32 or bfloat16
 * (DT_F32 / DT_BF16), accumulates in float32 and rounds bfloat16 results to nearest-even. NaN and infinities
 * propagate as in PyTorch. Each function returns 0, or a negative code for an argument it does not support (the
 * Python side checks arguments before calling, so a negative code is a bug, reported as such).
 *
 * Notation: m rows, n columns, T tokens, E experts, K slots per token, F expert hidden width.
 */

/* One translation unit in parts, included below in the order they build on each other (each part uses what the
 * ones before it define and includes no other part; common.h and amx.h include the system headers they need):
 *   common.h        headers, scratch accounting, dtypes, threads, gather, scatter-add, scalar SwiGLU; V8 (AVX2)
 *   vec.h           vector loads and stores (float32, bfloat16), exp, sigmoid, SwiGLU in 8 and 16 lanes
 *   tiles_dot.h     dot-product tiles: the projections of a few rows per expert (decode, small batches)
 *   decode.h        the sort-free decode step (moe_small_decode)
 *   tiles_packed.h  packed tiles: projections and data gradients of tens to hundreds of rows per expert
 *   tiles_swapped.h swapped tiles: the AVX2 float32 input projection of a few dozen rows per expert
 *   amx.h           AMX tiles: bfloat16 projections on Sapphire Rapids and later
 *   projections.h   moe_small_up / moe_small_down (the experts split among the tiles), SwiGLU kernels
 *   grad_nn.h       data gradients, dY @ W (moe_small_nn)
 *   grad_outer.h    weight gradients, A^T @ B per expert (moe_small_outer)
 *   memory.h        streaming zero fills, cache eviction, the benchmarks' timed reads
 *   route.h         routing: top-k, router logits, softmax top-k, counting sort, routing + decode in one call
 *   route_train.h   the few-token training step in two calls (forward, backward)
 */
#include "common.h"
#include "vec.h"
#include "tiles_dot.h"
#include "decode.h"
#include "tiles_packed.h"
#include "tiles_swapped.h"
#include "amx.h"
#include "projections.h"
#include "grad_nn.h"
#include "grad_outer.h"
#include "memory.h"
#include "route.h"
#include "route_train.h"
