/* moekit CPU kernels: the memory-bound steps of an MoE layer around the library GEMMs.
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
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

/* Scratch accounting. Every buffer these kernels allocate comes from sc_alloc and goes back through sc_free, which
 * keep a count of the bytes held now and two high-water marks: the most held at once since the last reset of each
 * (moe_scratch_reset_peak: 1 the first, 2 the second, 3 both); the memory a caller's allocator (PyTorch's) never
 * sees, which the benchmark adds to PyTorch's own peak. Each buffer carries its size and its header's in the 16 bytes
 * in front of it (a header of 16 bytes, or 64 where it must be 64-byte aligned); the counts, headers included, are
 * updated with atomics (a few per kernel call, against microseconds of work). */
static int64_t sc_now, sc_peak[2];

static void sc_raise(int64_t *peak, int64_t now) {
    int64_t seen = __atomic_load_n(peak, __ATOMIC_RELAXED);
    while (now > seen && !__atomic_compare_exchange_n(peak, &seen, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

static void *sc_alloc(size_t n, size_t align, int zero) {
    const size_t head = align > 16 ? 64 : 16, total = head == 64 ? (n + 64 + 63) & ~(size_t)63 : n + 16;
    char *p = head == 64 ? aligned_alloc(64, total) : malloc(total);
    if (!p) return NULL;
    if (zero) memset(p + head, 0, n);
    size_t *q = (size_t *)(p + head);
    q[-2] = total;
    q[-1] = head;
    const int64_t now = __atomic_add_fetch(&sc_now, (int64_t)total, __ATOMIC_RELAXED);
    sc_raise(&sc_peak[0], now);
    sc_raise(&sc_peak[1], now);
    return q;
}

static void sc_free(void *ptr) {
    if (!ptr) return;
    const size_t *q = ptr;
    __atomic_sub_fetch(&sc_now, (int64_t)q[-2], __ATOMIC_RELAXED);
    free((char *)ptr - q[-1]);
}

/* Bytes of scratch held now and the two high-water marks (out[0], out[1], out[2]). */
void moe_scratch_stats(int64_t *out) {
    out[0] = __atomic_load_n(&sc_now, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&sc_peak[0], __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&sc_peak[1], __ATOMIC_RELAXED);
}

/* Restart the marks in the mask (1: the first, 2: the second) from what is held now. */
void moe_scratch_reset_peak(int which) {
    const int64_t now = __atomic_load_n(&sc_now, __ATOMIC_RELAXED);
    for (int i = 0; i < 2; i++)
        if (which >> i & 1) __atomic_store_n(&sc_peak[i], now, __ATOMIC_RELAXED);
}

/* Every allocation below goes through the accounting. */
#define malloc(n) sc_alloc((n), 16, 0)
#define calloc(n, s) sc_alloc((size_t)(n) * (size_t)(s), 16, 1)
#define aligned_alloc(a, n) sc_alloc((n), (a), 0)
#define free(p) sc_free(p)

/* An array of n elements of scratch: on the stack where n <= cap (the bookkeeping of a few-token call: no
 * allocation at all), else allocated; SCRATCH_FREE releases it either way. */
#define SCRATCH_ARRAY(type, name, n, cap)                                                                              \
    type name##_st[cap];                                                                                               \
    type *name = (size_t)(n) <= (size_t)(cap) ? name##_st : malloc((size_t)(n) * sizeof(type))
#define SCRATCH_FREE(name)                                                                                             \
    do {                                                                                                               \
        if (name != name##_st) free(name);                                                                             \
    } while (0)

#define DT_F32 0
#define DT_BF16 1

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline bf16 f32_to_bf16(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (bf16)((c.u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    c.u += 0x7fffu + ((c.u >> 16) & 1u);                                     /* round to nearest even */
    return (bf16)(c.u >> 16);
}

/* Element j of a float32 or bfloat16 row, as float32; store the other way. Kernels call these with a constant dt
 * inside a specialised inline body, so the dtype test folds away and the loops vectorise. */
static inline float ld(const void *p, int dt, int64_t j) {
    return dt == DT_F32 ? ((const float *)p)[j] : bf16_to_f32(((const bf16 *)p)[j]);
}

static inline void st(void *p, int dt, int64_t j, float v) {
    if (dt == DT_F32)
        ((float *)p)[j] = v;
    else
        ((bf16 *)p)[j] = f32_to_bf16(v);
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static inline size_t esize(int dt) { return dt == DT_F32 ? 4 : 2; }

/* Address of element (i, j) of a row-major matrix with row stride ld. */
static inline char *at(const void *base, int dt, int64_t ld, int64_t i, int64_t j) {
    return (char *)base + ((size_t)i * (size_t)ld + (size_t)j) * esize(dt);
}

/* e^x for float32, vectorisable (Cephes-style: 2^round(x/ln2) times a degree-6 polynomial, ~1 ulp). The clamps use
 * comparisons, so NaN passes through unchanged. round(x/ln2) is taken by adding 1.5 * 2^23 (EXP_MAGIC: the sum's
 * low mantissa bits are then the integer, rounded to nearest even), which also gives 2^n from the sum's bits with
 * one integer add and shift (no rounding or conversion instructions, which the vector units run on one port only).
 * The constants serve the vector versions (exp16, exp8) too, which repeat these operations one for one. */
#define EXP_HI 88.3762626647949f
#define EXP_LO (-87.3365447504019f)
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI (-0.693359375f) /* -ln 2 in two parts */
#define EXP_LN2_LO 2.12194440e-4f
#define EXP_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define EXP_BIAS ((int32_t)(127 - 0x4B400000)) /* 127 - the bits of EXP_MAGIC: bits(x + EXP_MAGIC) + this = n + 127 */
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f
static inline float exp_f32(float x) {
    x = x > EXP_HI ? EXP_HI : x;
    x = x < EXP_LO ? EXP_LO : x;
    union { float f; uint32_t u; } t = {fmaf(x, EXP_LOG2E, EXP_MAGIC)};
    float n = t.f - EXP_MAGIC;
    float r = fmaf(n, EXP_LN2_HI, x);
    r = fmaf(n, EXP_LN2_LO, r);
    float p = EXP_P0;
    p = fmaf(p, r, EXP_P1);
    p = fmaf(p, r, EXP_P2);
    p = fmaf(p, r, EXP_P3);
    p = fmaf(p, r, EXP_P4);
    p = fmaf(p, r, EXP_P5);
    p = fmaf(p, r * r, r) + 1.0f;
    union { uint32_t u; float f; } s;
    s.u = (t.u + (uint32_t)EXP_BIAS) << 23;
    return p * s.f;
}

/* 1 / (1 + e^-x); like PyTorch's, it is 0 at x = -inf (so silu(-inf) = -inf * 0 = NaN, as in PyTorch). */
static inline float sigmoid_f32(float x) {
    float e = exp_f32(-x);
    e = -x > EXP_HI ? __builtin_inff() : e;
    return 1.0f / (1.0f + e);
}

/* Work of a grouped GEMM over `rows` rows and `experts` weight matrices of n x k, in threads_for's units: the
 * multiply-adds (/16), or the weight elements streamed from memory, whichever is larger (a decode step with one row
 * per expert is all streaming, and needs every thread's memory bandwidth). */
/* The rows of all experts; *na: the experts with rows, *mmax: the most rows of one. (Unused in the plain-C build.) */
static __attribute__((unused)) int64_t expert_rows(const int64_t *start, const int64_t *end, int64_t E, int64_t *na,
                                                   int64_t *mmax) {
    int64_t rows = 0;
    *na = *mmax = 0;
    for (int64_t e = 0; e < E; e++)
        if (end[e] > start[e]) {
            rows += end[e] - start[e], ++*na;
            if (end[e] - start[e] > *mmax) *mmax = end[e] - start[e];
        }
    return rows;
}

static inline int64_t gemm_work(int64_t rows, int64_t experts, int64_t n, int64_t k) {
    int64_t flops = rows * n * k / 16, bytes = experts * n * k;
    return flops > bytes ? flops : bytes;
}

/* Threads for a job of `work` elements: one thread below ~64k elements (a fork/join costs more than it saves). */
static inline int threads_for(int64_t work, int nthreads) {
    int64_t t = work / 65536;
    if (t < 1) t = 1;
    return t < nthreads ? (int)t : nthreads;
}

/* The last i in [lo, hi] with cum[i] <= x (cum nondecreasing, cum[lo] <= x): the segment of a prefix-summed
 * list that holds item x, its empty segments (cum[i] == cum[i + 1]) never chosen. */
static inline int64_t seg_find(const int64_t *cum, int64_t lo, int64_t hi, int64_t x) {
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (cum[mid] <= x) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Threads for a grouped GEMM over the expert segments [start[e], end[e]) with weight matrices of n x k. */
static inline int gemm_threads(const int64_t *start, const int64_t *end, int64_t E, int64_t n, int64_t k,
                               int nthreads) {
    int64_t rows = 0, na = 0;
    for (int64_t e = 0; e < E; e++) {
        rows += end[e] - start[e];
        na += end[e] > start[e];
    }
    return threads_for(gemm_work(rows, na, n, k), nthreads);
}

/* Width of a work item that splits n output columns among nt threads: `per` items per thread (two for balance), as
 * wide as that allows so each item reads its inputs few times, rounded up to a multiple of unit, within [unit, max]. */
static inline int64_t item_width(int64_t n, int nt, int per, int64_t unit, int64_t max) {
    int64_t w = (n + per * nt - 1) / (per * nt);
    w = (w + unit - 1) / unit * unit;
    return w < unit ? unit : w > max ? max : w;
}

/* Rows ahead that the activation kernels prefetch: their inputs (pre-activations saved in forward, hundreds of MB
 * in a big batch) come from memory, which the hardware prefetcher alone streams at a fraction of the bandwidth. */
#define ACT_PF 4
static inline void prefetch_row(const void *p, int64_t nbytes) {
    for (int64_t o = 0; o < nbytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* An activation element (an exp, a division, a few FMAs) costs about as much as this many copied elements. */
#define ACT_COST 8

/* Dispatch a body specialised for the (constant) dtypes of its operands. */
#define DISPATCH1(dt, call) ((dt) == DT_F32 ? call(DT_F32) : call(DT_BF16))

/* dst[i, :] = scale[i] * src[idx[i], :]   (scale may be NULL: 1). Gather + scale + dtype cast in one pass. */
static inline void gather_row(const void *src, int sd, const void *dst, int dd, int64_t n, float s) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) st((void *)dst, dd, j, s * ld(src, sd, j));
}

int moe_gather_rows(const void *src, int src_dt, int64_t ld_src, const int64_t *idx, const float *scale, int64_t m,
                    int64_t n, void *dst, int dst_dt, int64_t ld_dst, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(m * n, nthreads))
    for (int64_t i = 0; i < m; i++) {
        const void *r = at(src, src_dt, ld_src, idx[i], 0);
        void *o = at(dst, dst_dt, ld_dst, i, 0);
        if (i + ACT_PF < m) prefetch_row(at(src, src_dt, ld_src, idx[i + ACT_PF], 0), n * esize(src_dt));
        float s = scale ? scale[i] : 1.0f;
        if (!scale && src_dt == dst_dt) memcpy(o, r, (size_t)n * esize(src_dt));
        else if (src_dt == DT_F32 && dst_dt == DT_F32) gather_row(r, DT_F32, o, DT_F32, n, s);
        else if (src_dt == DT_F32) gather_row(r, DT_F32, o, DT_BF16, n, s);
        else if (dst_dt == DT_F32) gather_row(r, DT_BF16, o, DT_F32, n, s);
        else gather_row(r, DT_BF16, o, DT_BF16, n, s);
    }
    return 0;
}

/* out[idx[i], :] += w[i] * y[i, :]   (w may be NULL: 1), out float32. The indices must be distinct (the rows of one
 * expert belong to distinct tokens), so rows are independent and the result does not depend on the thread count. */
static inline void scatter_row(float *o, const void *y, int dt, int64_t n, float s) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) o[j] = fmaf(s, ld(y, dt, j), o[j]);
}

int moe_scatter_add_rows(float *out, int64_t ld_out, const void *y, int y_dt, int64_t ld_y, const int64_t *idx,
                         const float *w, int64_t m, int64_t n, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(m * n, nthreads))
    for (int64_t i = 0; i < m; i++) {
        float *o = out + (size_t)idx[i] * (size_t)ld_out;
        const void *r = at(y, y_dt, ld_y, i, 0);
        if (i + ACT_PF < m) { /* rows at random addresses: the hardware prefetcher cannot know the next one */
            prefetch_row(out + (size_t)idx[i + ACT_PF] * (size_t)ld_out, n * 4);
            prefetch_row(at(y, y_dt, ld_y, i + ACT_PF, 0), n * esize(y_dt));
        }
        float s = w ? w[i] : 1.0f;
#define SCATTER(dt) scatter_row(o, r, dt, n, s)
        DISPATCH1(y_dt, SCATTER);
#undef SCATTER
    }
    return 0;
}

/* SwiGLU forward: a[i, j] = silu(h[i, j]) * h[i, F + j] for the [gate | up] rows of h. */
static inline void swiglu_row(const void *h, void *a, int dt, int64_t F) {
#pragma omp simd
    for (int64_t j = 0; j < F; j++) {
        float g = ld(h, dt, j);
        st(a, dt, j, g * sigmoid_f32(g) * ld(h, dt, F + j));
    }
}

/* SwiGLU backward for one expert's rows, given h = [gate | up] and ga = g_out @ W_down (the unweighted gradient of
 * the activation output) and the router weight w[i] of each row:
 *     a      = silu(gate) * up                      (recomputed)
 *     dw[i]  = sum_j ga[i, j] * a[i, j]              (router-weight gradient)
 *     aw     = w[i] * a                              (for dW_down = g^T @ aw; aw may be NULL)
 *     dgate  = w ga * up * silu'(gate),  dup = w ga * silu(gate)     written to dh = [dgate | dup]
 * with silu'(x) = s (1 + x (1 - s)) = s + silu(x) (1 - s), s = sigmoid(x). */
static inline float swiglu_bwd_row(const void *h, const void *ga, float w, void *dh, void *aw, int dt, int64_t F) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < F; j++) {
        float x = ld(h, dt, j), up = ld(h, dt, F + j), g = ld(ga, dt, j);
        float s = sigmoid_f32(x), silu = x * s, av = silu * up, d = g * w;
        acc += g * av;
        if (aw) st(aw, dt, j, av * w);
        st(dh, dt, j, d * up * (s + silu * (1.0f - s)));
        st(dh, dt, F + j, d * silu);
    }
    return acc;
}

/* ================================================================================================================
 * Small-M grouped expert GEMMs: all experts of a layer in one call, for the few rows per expert of decoding and
 * small batches, where a library GEMM per expert costs more in call overhead and poor small-M blocking than the
 * math. Every weight row is streamed from memory once and reused from L1 for all rows of its expert.
 *
 * The weights keep their Hugging Face layout ([E, N, K], K contiguous), so the inner product of a token row with a
 * weight row is a dot product along K: a tile of up to 4 token rows x 4 weight rows keeps 16 vector accumulators,
 * reduced horizontally once per tile. bfloat16 tiles use the AVX512-BF16 pair dot product (vdpbf16ps) where the
 * CPU has it, else convert to float32; other CPUs run the plain loop.
 * ================================================================================================================ */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
/* CPUs with AVX2 and FMA but not AVX-512 (AMD Zen 2/3, Intel before Skylake-SP) run 8-wide versions of the hot
 * loops (V8 below); others the plain loops, vectorised by the compiler. */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define V8 1
#endif

#ifndef TR
#define TR 6 /* token rows per tile (at most 6; 6 x 4 tiles measured fastest on Zen 5: 24 accumulators) */
#endif
#ifndef TN
#define TN 4 /* weight rows per tile */
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif
#ifndef PF_TILES
#define PF_TILES 2 /* prefetch distance, in tiles, while streaming weights from memory, at most... */
#endif
#ifndef PF_BYTES
#define PF_BYTES (8 << 10) /* ...and in bytes of the tile's rows, at least one tile */
#endif
/* How far ahead (bytes) a tile prefetches its weight rows, each of rowb bytes. The prefetches land in L1, which the
 * rows of a few tiles ahead overflow where the input projection runs its two streams (gate and up rows): on Zen 3
 * (AVX2), fp32 rows of 512 (8 KiB a tile) 1 tile ahead instead of 2 took the one-token decode with the weights in
 * L3 from 0.52 to 0.38 ms (Mixtral-like) and 0.36 to 0.24 ms (fine-grained); from memory, and in bf16, no change.
 * (AVX-512 builds, measured with 2 tiles on a CPU with a larger L1, keep them.) */
static inline size_t pf_ahead(size_t rowb) {
#if defined(V8)
    size_t t = PF_BYTES / (TN * rowb);
    return (size_t)TN * (t < 1 ? 1 : t > PF_TILES ? PF_TILES : t) * rowb;
#else
    return (size_t)(PF_TILES * TN) * rowb;
#endif
}

/* Token rows of tile i when m rows are cut into the fewest tiles of at most TR rows, as equal as whole rows allow
 * (32 rows: 6, 6, 5, 5, 5, 5 rather than 6, 6, 6, 6, 6, 2; the dot-product tiles read every weight row once per
 * tile, and a tile of one or two rows is bound by those reads rather than by its arithmetic: fp32 input and
 * output projections of Mixtral-like experts of 16 rows 0.95x, of 32 rows 0.97-0.99x, fine-grained experts of 16
 * rows 0.97x; the layer's fp32 forward at T = 128 0.976x (Mixtral-like) and 0.973x (fine-grained); 2 Emerald
 * Rapids cores, same process. The data-gradient kernel's tiles, cut the same way, measured no change). Tile i
 * starts at row i * base + min(i, extra). */
static inline int tile_rows(int64_t m, int64_t i) {
    const int64_t n = (m + TR - 1) / TR, base = m / n, extra = m % n;
    return (int)(base + (i < extra));
}

/* Elements of k per chunk of the dot-product tiles' rows (K long, dtype dt): the fewest equal chunks (whole 64-byte
 * steps) whose TR token rows and TN weight rows fit NT_L1_BYTES, so that the token rows stay in L1 while the tiles
 * of every weight row group run over them, one chunk at a time (fp32 Mixtral-like output projection, d_ff 1408:
 * 6 + 4 rows of 5.5 KiB overflowed L1, and the tiles read their rows from L2; in two chunks, 32 rows per expert
 * 0.92x, 16 rows 0.93x, 1-4 rows 0.90-0.94x, weights from memory 0.94-0.96x; the layer's fp32 forward at T = 128
 * 0.92x; 2 Emerald Rapids cores, same process). A chunked sum rounds in another order, as any GEMM's blocking. */
#if defined(V8)
#define NT_L1_BYTES (1 << 30) /* (AVX2: not measured, one chunk) */
#else
#define NT_L1_BYTES (32 << 10)
#endif
static inline int64_t nt_chunk(int64_t K, int dt) {
    const int64_t kv = 64 / (int64_t)esize(dt), bytes = K * (int64_t)esize(dt) * (TR + TN);
    const int64_t n = (bytes + NT_L1_BYTES - 1) / NT_L1_BYTES;
    return n <= 1 ? (K > 0 ? K : 1) : ((K + n - 1) / n + kv - 1) / kv * kv;
}

#if defined(__AVX512F__)
/* masks of the first min(left, 16) (32) lanes */
static inline __attribute__((always_inline)) __mmask16 tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

static inline __attribute__((always_inline)) __mmask32 tail32(int64_t left) {
    return left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
}

/* [sum(a), sum(b), sum(c), sum(d)]: four horizontal sums in 12 instructions instead of four reduction chains. */
static inline __attribute__((always_inline)) __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); /* per lane a02 b02 a13 b13 */
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2))); /* per lane a b c d */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

#if defined(V8)
/* 8 float32, or 8 bfloat16 widened to float32 (bf16 is the top half of a float). */
static inline __attribute__((always_inline)) __m256 ld8(const void *p, int dt) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 16 bfloat16 as two float32 vectors: the even elements (shifted into the high half of each lane) and the odd ones
 * (masked): one integer operation per 8 values. A dot product or an elementwise op does not care about the order. */
static inline __attribute__((always_inline)) void ld16_bf16(const bf16 *p, __m256 *even, __m256 *odd) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* [sum(a), sum(b), sum(c), sum(d)] */
static inline __attribute__((always_inline)) __m128 reduce4_8(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d)); /* per 128-bit half: a b c d */
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* Make the compiler hold v in a register: otherwise it may fold a load into every FMA that uses it (one load per
 * row of a tile instead of one, which makes the tile bound by loads rather than FMAs). */
#ifndef NO_KEEP
#define KEEP_IN_REG(v) __asm__("" : "+x"(v))
#else
#define KEEP_IN_REG(v) (void)0
#endif

#ifndef RG8
#define RG8 2 /* token rows per pass of the 8-wide tile: 2 x TN accumulators, 2 row vectors and 1 weight vector (3 rows
                     * would need all 16 ymm registers and spill: 62 against 80 GFLOP/s on one Zen 3 core in L1) */
#endif

/* The first n <= 8 elements of a row (the rest zero): row tails. */
static inline __m256 ld8_part(const void *p, int dt, int64_t n) {
    float t[8] __attribute__((aligned(32))) = {0.0f};
    for (int64_t j = 0; j < n; j++) t[j] = ld(p, dt, j);
    return _mm256_load_ps(t);
}

/* f32_to_bf16 in vector form, the bfloat16 left in the high half of each lane (low half garbage). */
static inline __attribute__((always_inline)) __m256i round_bf16_hi8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
}

/* 8 float32 -> bfloat16, round to nearest even, NaN kept quiet (f32_to_bf16, vectorised). */
static inline __attribute__((always_inline)) __m128i cvt8_bf16(__m256 v) {
    __m256i r = _mm256_srli_epi32(round_bf16_hi8(v), 16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8));
}

/* Store the first n <= 8 elements of v; whole aligned vectors of output written once (weight gradients) with a
 * non-temporal store if stream (callers then end with _mm_sfence). */
static inline __attribute__((always_inline)) void st8(void *p, int dt, __m256 v, int64_t n, int stream) {
    if (n >= 8) {
        if (dt == DT_F32) {
            if (stream && ((uintptr_t)p & 31) == 0) _mm256_stream_ps((float *)p, v);
            else _mm256_storeu_ps((float *)p, v);
        } else {
            __m128i b = cvt8_bf16(v);
            if (stream && ((uintptr_t)p & 15) == 0) _mm_stream_si128((__m128i *)p, b);
            else _mm_storeu_si128((__m128i *)p, b);
        }
        return;
    }
    float t[8] __attribute__((aligned(32)));
    _mm256_store_ps(t, v);
    for (int64_t j = 0; j < n; j++) st(p, dt, j, t[j]);
}

/* Store the first n <= 16 elements of lo (8) then hi (8), as st8 does; whole bfloat16 pairs as one 32-byte store of
 * both vectors (cvt8x2_bf16, rounded as cvt8_bf16 rounds), plain even where stream is set: 32 bytes streamed are
 * half a line, and a half-written line costs the write-combining buffers a partial write (whole lines: bf16_line).
 * Measured on Zen 3 (2 threads), Mixtral-like experts' weight gradients in bf16 against two 16-byte streaming
 * stores: dW_in of 1-16 rows per expert 0.67-0.76x, dW_out 0.75-0.89x. */
static inline __attribute__((always_inline)) __m256i cvt8x2_bf16(__m256 lo, __m256 hi) {
    const __m256i r = _mm256_packus_epi32(_mm256_srli_epi32(round_bf16_hi8(lo), 16),
                                          _mm256_srli_epi32(round_bf16_hi8(hi), 16));
    return _mm256_permute4x64_epi64(r, 0xd8);
}
static inline __attribute__((always_inline)) void st8x2(void *p, int dt, __m256 lo, __m256 hi, int64_t n,
                                                       int stream) {
    if (dt == DT_BF16 && n >= 16) {
        _mm256_storeu_si256((__m256i *)p, cvt8x2_bf16(lo, hi));
        return;
    }
    st8(p, dt, lo, min64(8, n), stream);
    if (n > 8) st8((char *)p + 8 * esize(dt), dt, hi, n - 8, stream);
}
#endif

#define UNROLL _Pragma("GCC unroll 8")
#ifndef RS_MIN_ROWS
#define RS_MIN_ROWS 3
#endif
#ifndef RS_MAX_ROWS
#define RS_MAX_ROWS 8
#endif
#ifndef RS_TWO
#define RS_TWO 4
#endif
#ifndef RS_PF
#define RS_PF 1024
#endif
#ifndef RS_PF_HINT
#define RS_PF_HINT _MM_HINT_T0
#endif
#if defined(V8)
/* Row-stream dot products for the few token rows of a decode step (AVX2, float32 input projection): c[r ldc + n] =
 * a[r] . b_n for the nb weight rows b_n (b + n ldb bytes, K floats, K a multiple of 16) and R token rows
 * (RS_MIN_ROWS <= R <= RS_MAX_ROWS, all of an expert's rows in a row block), the weight rows read one after another,
 * start to end, with a software prefetch RS_PF bytes ahead: one sequential stream against the token rows held in L1
 * (each 16 floats of a weight row meet every token row; two sets of sums where R <= RS_TWO, so that enough FMAs are
 * in flight), where the tiles read 4 weight rows at once and, for more than 2 token rows, each of them twice. Measured
 * on Zen 3 (2 threads), the kernel alone on Mixtral-like experts with the weights from memory, against the tiles
 * (paired, same process): 3 rows 0.89-0.90x, 4 rows 0.82-0.92x, 5 rows 0.88x, 6 rows 0.92-0.97x, 8 rows 0.75-0.88x,
 * fine-grained 4 rows 0.88x; 10 rows 1.20x (hence 8); prefetch 512 B ahead 1.06-1.12x against 1 KiB, 2-4 KiB
 * 0.95-1.09x, none 1.09x. One or two rows: 0.93x alone, but the one-token forward with the weights in L3 1.06-1.08x
 * (the tiles' one-tile prefetch was tuned for it), hence 3. The layer's fp32 forward at T = 16: Mixtral-like 0.90-0.92x
 * (weights in cache or evicted), fine-grained 0.94x and 0.97x; fine-grained T = 128 0.98x. The output projection
 * took it at 0.97-1.12x (its token rows of d_ff 1408 overflow L1 beside the weight stream, and each weight row reads
 * all of them again) and keeps the tiles. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __attribute__((always_inline)) void rs_rows_r(const float *const *a, const int R, const char *b,
                                                            size_t ldb, int64_t nb, int64_t K, float *c, int64_t ldc) {
    for (int64_t n = 0; n < nb; n++) {
        const float *bn = (const float *)(b + (size_t)n * ldb);
        __m256 acc[2][RS_MAX_ROWS];
        UNROLL for (int r = 0; r < R; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            if (RS_PF) _mm_prefetch((const char *)(bn + k) + RS_PF, RS_PF_HINT);
            const __m256 b0 = _mm256_loadu_ps(bn + k), b1 = _mm256_loadu_ps(bn + k + 8);
            UNROLL for (int r = 0; r < R; r++) {
                acc[0][r] = _mm256_fmadd_ps(_mm256_loadu_ps(a[r] + k), b0, acc[0][r]);
                acc[R <= RS_TWO][r] = _mm256_fmadd_ps(_mm256_loadu_ps(a[r] + k + 8), b1, acc[R <= RS_TWO][r]);
            }
        }
        UNROLL for (int r = 0; r < R; r++) c[r * ldc + n] = hsum8(_mm256_add_ps(acc[0][r], acc[1][r]));
    }
}

static void rs_rows(const float *const *a, int R, const char *b, size_t ldb, int64_t nb, int64_t K, float *c,
                    int64_t ldc) {
    switch (R) {
#define RS_CASE(r)                                                                                                 \
    case r: rs_rows_r(a, r, b, ldb, nb, K, c, ldc); break;
        RS_CASE(1) RS_CASE(2) RS_CASE(3) RS_CASE(4) RS_CASE(5) RS_CASE(6) RS_CASE(7) RS_CASE(8)
#undef RS_CASE
    }
}

#endif

/* c[r * ldc + n] = sum_k a[r][k] * b[n][k] for r < R, n < TN, rows of dtype dt. R and dt are compile-time constants
 * at every call (see nt_tile), so the loops unroll and the R x TN accumulators stay in registers. */
static inline __attribute__((always_inline)) void nt_tile_k(const void *const *a, const int R, const void *const *b,
                                                            const void *const *pf, const char *pn, int64_t K,
                                                            const int dt, float *c, const int64_t ldc, const int PF) {
#if defined(__AVX512F__)
    /* Whole vectors of k with plain loads, then one masked step for the tail: a mask computed at every step (and
     * masked loads, which do not fold into the multiply-adds) cost a quarter of the tile's rate (fp32, 6 x 4
     * tile, K = 512 in L1: 72-85 -> 103-118 GFLOP/s on one Xeon core) */
    __m512 acc[TR][TN];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int n = 0; n < TN; n++) acc[r][n] = _mm512_setzero_ps();
    /* one step of k: the tile's weight vectors, then each token row's against them; ET the element type */
#define NT_STEP(VT, ET, LOAD, MAC)                                                                                 \
    do {                                                                                                           \
        VT bv[TN];                                                                                                 \
        if (pn) _mm_prefetch(pn + (size_t)k * sizeof(ET), _MM_HINT_T1);                                            \
        if (PF) UNROLL for (int n = 0; n < TN; n++) _mm_prefetch((const char *)((const ET *)pf[n] + k), PF_HINT);  \
        UNROLL for (int n = 0; n < TN; n++) bv[n] = LOAD((const ET *)b[n] + k);                                     \
        UNROLL for (int r = 0; r < R; r++) {                                                                       \
            const VT av = LOAD((const ET *)a[r] + k);                                                              \
            UNROLL for (int n = 0; n < TN; n++) acc[r][n] = MAC(acc[r][n], av, bv[n]);                             \
        }                                                                                                          \
    } while (0)
#define NT_MAC_F32(c, x, y) _mm512_fmadd_ps(x, y, c)
    if (dt == DT_F32) {
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) NT_STEP(__m512, float, _mm512_loadu_ps, NT_MAC_F32);
        if (k < K) {
            const __mmask16 mk = tail16(K - k);
#define NT_LD_TAIL(p) _mm512_maskz_loadu_ps(mk, p)
            NT_STEP(__m512, float, NT_LD_TAIL, NT_MAC_F32);
#undef NT_LD_TAIL
        }
    } else {
#if defined(__AVX512BF16__)
#define NT_MAC_BF16(c, x, y) _mm512_dpbf16_ps(c, (__m512bh)(x), (__m512bh)(y))
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) NT_STEP(__m512i, bf16, _mm512_loadu_si512, NT_MAC_BF16);
        if (k < K) {
            const __mmask32 mk = tail32(K - k);
#define NT_LD_TAIL(p) _mm512_maskz_loadu_epi16(mk, p)
            NT_STEP(__m512i, bf16, NT_LD_TAIL, NT_MAC_BF16);
#undef NT_LD_TAIL
        }
#undef NT_MAC_BF16
#else
        /* no bf16 dot product: widen each half of the 32 values to float32 (bf16 is the top half of a float) */
        for (int64_t k = 0; k < K; k += 32) {
            const __mmask32 mk = tail32(K - k);
            if (PF) UNROLL for (int n = 0; n < TN; n++) _mm_prefetch((const char *)((const bf16 *)pf[n] + k), PF_HINT);
            UNROLL for (int half = 0; half < 2; half++) {
                __mmask16 mh = (__mmask16)(mk >> (16 * half));
                __m512 bv[TN];
                UNROLL for (int n = 0; n < TN; n++) bv[n] = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mh, (const bf16 *)b[n] + k + 16 * half)), 16));
                UNROLL for (int r = 0; r < R; r++) {
                    __m512 av = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mh, (const bf16 *)a[r] + k + 16 * half)), 16));
                    UNROLL for (int n = 0; n < TN; n++) acc[r][n] = _mm512_fmadd_ps(av, bv[n], acc[r][n]);
                }
            }
        }
#endif
    }
#undef NT_MAC_F32
#undef NT_STEP
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int n = 0; n < TN; n += 4)
        _mm_storeu_ps(c + r * ldc + n, reduce4(acc[r][n], acc[r][n + 1], acc[r][n + 2], acc[r][n + 3]));
#elif defined(V8)
    /* rows in passes of RG8 (the later passes read the weight rows from L1); k in steps of one cache line (16
     * float32 or 32 bfloat16), then of 8, then one by one */
    const size_t eb = esize(dt);
    const int64_t L = 64 / (int64_t)eb, KL = K / L * L, K8 = K / 8 * 8;
    const char *bp[TN], *pp[TN]; /* row pointers in locals, so they stay in registers */
    UNROLL for (int n = 0; n < TN; n++) bp[n] = (const char *)b[n], pp[n] = (const char *)pf[n];
    /* the prefetches of the rows of a later tile, shared among the passes: memory then streams them during every
     * pass rather than in bursts that stall the first (with 2-6 rows per expert, the decode case, this streams
     * the weights 5-15% faster) */
    const int NPF = (R + RG8 - 1) / RG8 < TN ? (R + RG8 - 1) / RG8 : TN;
    if (R <= 2 && K % 32 == 0) {
        /* One or two token rows (decode: a memory-bound dot product per weight row): the tile's weight rows one
         * after another, each read start to end, so the tile is one sequential stream instead of TN interleaved
         * ones (Zen 3, one-token decode from memory: 1.07-1.38x faster, within 1.0-1.25x of a plain read of the
         * same bytes). */
        __m256 row[2][TN]; /* each weight row's sums, reduced four at a time at the end */
        UNROLL for (int n = 0; n < TN; n++) {
            __m256 s[2][4];
            UNROLL for (int r = 0; r < R; r++) UNROLL for (int q = 0; q < 4; q++) s[r][q] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 32) {
                if (PF) UNROLL for (int64_t o = 0; o < 32 * (int64_t)eb; o += 64) _mm_prefetch(pp[n] + k * eb + o, PF_HINT);
                if (dt == DT_F32) {
                    UNROLL for (int q = 0; q < 4; q++) {
                        const __m256 bv = ld8(bp[n] + (size_t)(k + 8 * q) * eb, dt);
                        UNROLL for (int r = 0; r < R; r++)
                            s[r][q] = _mm256_fmadd_ps(ld8((const char *)a[r] + (size_t)(k + 8 * q) * eb, dt), bv, s[r][q]);
                    }
                } else { /* bf16: the even and odd elements of 16 as two float32 vectors each (a dot product does not
                          * care about the order), one shift or mask per 8 values instead of a widening shuffle */
                    UNROLL for (int h = 0; h < 2; h++) {
                        __m256 be, bo;
                        ld16_bf16((const bf16 *)bp[n] + k + 16 * h, &be, &bo);
                        UNROLL for (int r = 0; r < R; r++) {
                            __m256 ae, ao;
                            ld16_bf16((const bf16 *)a[r] + k + 16 * h, &ae, &ao);
                            s[r][2 * h] = _mm256_fmadd_ps(ae, be, s[r][2 * h]);
                            s[r][2 * h + 1] = _mm256_fmadd_ps(ao, bo, s[r][2 * h + 1]);
                        }
                    }
                }
            }
            UNROLL for (int r = 0; r < R; r++)
                row[r][n] = _mm256_add_ps(_mm256_add_ps(s[r][0], s[r][1]), _mm256_add_ps(s[r][2], s[r][3]));
        }
        UNROLL for (int r = 0; r < R; r++)
            _mm_storeu_ps(c + r * ldc, reduce4_8(row[r][0], row[r][1], row[r][2], row[r][3]));
        return;
    }
    UNROLL for (int r0 = 0; r0 < R; r0 += RG8) {
        const int G = R - r0 < RG8 ? R - r0 : RG8;
        const char *ap[RG8];
        UNROLL for (int r = 0; r < G; r++) ap[r] = (const char *)a[r0 + r];
        __m256 acc[RG8][TN];
        UNROLL for (int r = 0; r < G; r++) UNROLL for (int n = 0; n < TN; n++) acc[r][n] = _mm256_setzero_ps();
        int64_t k = 0;
#define NT8_STEP(kk)                                                                                               \
    do {                                                                                                           \
        __m256 av[RG8];                                                                                            \
        UNROLL for (int r = 0; r < G; r++) {                                                                       \
            av[r] = ld8(ap[r] + (size_t)(kk) * eb, dt);                                                            \
            KEEP_IN_REG(av[r]);                                                                                    \
        }                                                                                                          \
        UNROLL for (int n = 0; n < TN; n++) {                                                                      \
            __m256 bv = ld8(bp[n] + (size_t)(kk) * eb, dt);                                                        \
            KEEP_IN_REG(bv);                                                                                       \
            UNROLL for (int r = 0; r < G; r++) acc[r][n] = _mm256_fmadd_ps(av[r], bv, acc[r][n]);                  \
        }                                                                                                          \
    } while (0)
        if (dt == DT_BF16) {
            /* bf16: 16 values at a time as their even and odd elements (ld16_bf16: one shift or mask per 8 values
             * instead of a widening shuffle and a shift), for the token rows and the weights */
            for (; k < KL; k += L) {
                if (PF) UNROLL for (int n = 0; n < TN; n++)
                    if (n % NPF == r0 / RG8 % NPF) _mm_prefetch(pp[n] + (size_t)k * eb, PF_HINT);
                UNROLL for (int64_t v = 0; v < L; v += 16) {
                    __m256 ae[RG8], ao[RG8];
                    UNROLL for (int r = 0; r < G; r++) {
                        ld16_bf16((const bf16 *)ap[r] + k + v, &ae[r], &ao[r]);
                        KEEP_IN_REG(ae[r]);
                        KEEP_IN_REG(ao[r]);
                    }
                    UNROLL for (int n = 0; n < TN; n++) {
                        __m256 be, bo;
                        ld16_bf16((const bf16 *)bp[n] + k + v, &be, &bo);
                        UNROLL for (int r = 0; r < G; r++) {
                            acc[r][n] = _mm256_fmadd_ps(ae[r], be, acc[r][n]);
                            acc[r][n] = _mm256_fmadd_ps(ao[r], bo, acc[r][n]);
                        }
                    }
                }
            }
        } else
        for (; k < KL; k += L) {
            if (PF) UNROLL for (int n = 0; n < TN; n++)
                if (n % NPF == r0 / RG8 % NPF) _mm_prefetch(pp[n] + (size_t)k * eb, PF_HINT);
            UNROLL for (int64_t v = 0; v < L; v += 8) NT8_STEP(k + v);
        }
        for (; k < K8; k += 8) NT8_STEP(k);
#undef NT8_STEP
        UNROLL for (int r = 0; r < G; r++) {
            __m128 sum = reduce4_8(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
            if (k < K) {
                float t[TN] = {0.0f};
                for (int n = 0; n < TN; n++)
                    for (int64_t j = k; j < K; j++) t[n] += ld(a[r0 + r], dt, j) * ld(b[n], dt, j);
                sum = _mm_add_ps(sum, _mm_loadu_ps(t));
            }
            _mm_storeu_ps(c + (r0 + r) * ldc, sum);
        }
    }
#else
    for (int r = 0; r < R; r++)
        for (int n = 0; n < TN; n++) {
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < K; k++) s += ld(a[r], dt, k) * ld(b[n], dt, k);
            c[r * ldc + n] = s;
        }
#endif
}

/* The tile for 1 <= R <= TR token rows and TN weight rows (callers pad b with a repeated valid row). pf: the weight
 * rows of the caller's next tile, prefetched line by line as this tile streams its own from memory; NULL when b is
 * already in cache. pn (NULL: none): K elements of dtype dt (one weight row) that the caller needs later, prefetched
 * into L2 one line per step of k (AVX-512 builds: fp32 rows, and bf16 ones where the CPU has the bf16 dot product). */
static void nt_tile(const void *const *a, int R, const void *const *b, const void *const *pf, const char *pn,
                    int64_t K, int dt, float *c, int64_t ldc) {
#define NT_CASE(r)                                                                                                 \
    case r:                                                                                                        \
        if (pf)                                                                                                    \
            dt == DT_F32 ? nt_tile_k(a, r, b, pf, pn, K, DT_F32, c, ldc, 1)                                        \
                         : nt_tile_k(a, r, b, pf, pn, K, DT_BF16, c, ldc, 1);                                      \
        else                                                                                                       \
            dt == DT_F32 ? nt_tile_k(a, r, b, b, pn, K, DT_F32, c, ldc, 0)                                         \
                         : nt_tile_k(a, r, b, b, pn, K, DT_BF16, c, ldc, 0);                                       \
        break;
    switch (R) {
        NT_CASE(1)
        NT_CASE(2)
        NT_CASE(3)
        NT_CASE(4)
#if TR > 4
        NT_CASE(5)
        NT_CASE(6)
#endif
    }
#undef NT_CASE
}

/* nt_tile over elements k0 .. k0 + kn of the token rows a (the weight rows b, pf and pn already at k0): a row's first
 * chunk (k0 = 0) writes c, a later one adds to it (the chunks of nt_chunk). */
static inline __attribute__((always_inline)) void nt_tile_chunk(const void *const *a, int R, const void *const *b,
                                                                const void *const *pf, const char *pn, int64_t k0,
                                                                int64_t kn, int dt, float *c, int64_t ldc) {
    const void *ak[TR];
    for (int r = 0; r < R; r++) ak[r] = (const char *)a[r] + (size_t)k0 * esize(dt);
    if (k0 == 0) {
        nt_tile(ak, R, b, pf, pn, kn, dt, c, ldc);
        return;
    }
    float part[TR][TN];
    nt_tile(ak, R, b, pf, pn, kn, dt, &part[0][0], TN);
    for (int r = 0; r < R; r++)
        for (int q = 0; q < TN; q++) c[r * ldc + q] += part[r][q];
}

/* Input projection of every expert's rows, plus SwiGLU:
 *     h[s, n] = x[tok[s], :] . w_in[e, n, :] + b_in[e, n]     for the rows s of expert e: start[e] <= s < end[e]
 *     act == 0: h is the output (h_out, [S, W]);   act == 1 (SwiGLU, W = 2F): a[s, j] = silu(h[s, j]) * h[s, F + j]
 *     into a_out ([S, F]), and h also into h_out if it is not NULL (kept for backward).
 * Work items are (expert, block of 64 output columns; gate and up columns together for SwiGLU), so each thread
 * streams its own part of every expert's weights. */
#define UP_RB 256 /* token rows per work item of the input projection (256 KiB of bf16 rows of 512) */
#define UP_MEM_ROWS_F32 12 /* token rows whose arithmetic takes about as long as reading the weight rows they use */
#define UP_MEM_ROWS_BF16 4 /* (bf16: half the bytes, and widening them costs arithmetic) */
/* The cost of a row block of the input projection (rows left from its first row, of which it takes up to UP_RB):
 * its nj items, each max(its rows, mem_rows). */
static inline int64_t up_block_cost(int64_t rows_left, int64_t nj, int64_t mem_rows) {
    const int64_t rb = min64(UP_RB, rows_left);
    return nj * (rb > mem_rows ? rb : mem_rows);
}
/* Whether a row block of the input projection runs on the row-stream dot products (rs_rows) rather than the
 * tiles. */
static inline int rs_serves(int dt, int64_t rows, int64_t K) {
#if defined(V8)
    return dt == DT_F32 && rows >= RS_MIN_ROWS && rows <= RS_MAX_ROWS && K % 16 == 0;
#else
    (void)dt, (void)rows, (void)K;
    return 0;
#endif
}
#if defined(V8) && RS_MAX_ROWS > TR
#define UP_HB_ROWS RS_MAX_ROWS
#else
#define UP_HB_ROWS TR
#endif
static int small_up(const void *x, int64_t ld_x, const int64_t *tok, const int64_t *start, const int64_t *end, int64_t E,
                 const void *w_in, const void *b_in, int64_t W, int64_t D, int dt, int act, void *h_out, void *a_out,
                 int nthreads) {
    if (act != 0 && act != 1) return -1;
    if (act == 1 && (W % 2 || a_out == NULL)) return -2;
    if (act == 0 && h_out == NULL) return -3;
    const int64_t F = act == 1 ? W / 2 : W; /* columns of the activation output */
    /* activation columns per work item: 64, so that a row block's token rows are read once per 128 weight rows
     * (16: Mixtral-like fp32 experts of 16-32 rows 1.10x, fine-grained of 16 rows 1.08x the time; 32: 1.03x;
     * decode sizes the same; 2 Emerald Rapids cores, same process) */
    enum { JB = 64 };
    const int64_t nj = (F + JB - 1) / JB;
    const size_t rowb = (size_t)D * esize(dt);
    /* Work items: (expert, block of up to UP_RB rows, JB activation columns), over experts with rows only so the
     * threads share the work evenly, column blocks innermost: a thread's consecutive items reuse one row block of
     * token rows from L2 (an expert's rows all at once would not fit: each column block would stream them again
     * from L3), and each item's weight rows stay in L1 for all of its row tiles. */
    int64_t rows = 0, na = 0;
    const int64_t E1 = E ? E : 1;
    int64_t *active = malloc((size_t)(2 * E1 + nthreads + 1) * sizeof(int64_t)), *first = active + E1;
    if (!active) return -5;
    /* Each thread takes a contiguous run of items of about equal cost (so it streams its weights in order), an item
     * costing max(its rows, UP_MEM_ROWS): the arithmetic where that dominates, else the read of its weight rows. An
     * equal count of items would give one thread far more rows where experts have few and uneven rows (16
     * Mixtral-like tokens: 11 against 21 rows for the two threads). */
    const int64_t mem_rows = dt == DT_F32 ? UP_MEM_ROWS_F32 : UP_MEM_ROWS_BF16;
    const int64_t kc = nt_chunk(D, dt); /* k per chunk of the tiles (see nt_chunk) */
    int64_t *bound = first + E1, nitems = 0, total = 0;
    for (int64_t e = 0; e < E; e++)
        if (end[e] > start[e]) {
            rows += end[e] - start[e];
            first[na] = nitems;
            nitems += (end[e] - start[e] + UP_RB - 1) / UP_RB * nj;
            active[na++] = e;
            for (int64_t r0 = start[e]; r0 < end[e]; r0 += UP_RB) total += up_block_cost(end[e] - r0, nj, mem_rows);
        }
    const int nt = threads_for(gemm_work(rows, na, W, D), nthreads);
    bound[0] = 0;
    for (int64_t i = 0, item = 0, cost = 0, t = 1; i < na; i++)
        for (int64_t r0 = start[active[i]]; r0 < end[active[i]]; r0 += UP_RB, item += nj) {
            const int64_t c = up_block_cost(end[active[i]] - r0, nj, mem_rows); /* its nj items: c / nj each */
            for (cost += c; t < nt && cost * nt >= total * t; t++) /* the thread boundaries in this row block */
                bound[t] = item + (nj * (total * t - (cost - c) * nt) + c * nt - 1) / (c * nt);
        }
    bound[nt] = nitems;
#pragma omp parallel num_threads(nt)
    for (int t = omp_get_thread_num(); t < nt; t += omp_get_num_threads()) /* (fewer threads than asked: all runs) */
    for (int64_t item = bound[t]; item < bound[t + 1]; item++) {
        const int64_t lo = seg_find(first, 0, na - 1, item); /* the expert of this item */
        const int64_t e = active[lo], local = item - first[lo];
        const int64_t j0 = (local % nj) * JB, jw = min64(JB, F - j0);
        const int64_t s0 = start[e] + (local / nj) * UP_RB, s1 = min64(s0 + UP_RB, end[e]);
        const char *we = (const char *)w_in + (size_t)e * (size_t)W * rowb;
        /* the thread's next item's weight rows (gate, then up), one prefetched into L2 by each tile of this item: the
         * weights then stream from memory during every pass over the item's rows, not only during its first, whose
         * tiles would otherwise wait on memory while the later passes leave it idle (AVX-512 builds) */
        const char *nx[2] = {NULL, NULL};
        int64_t nx_rows = 0, nx_q = 0;
        if (item + 1 < bound[t + 1]) {
            const int64_t lo2 = seg_find(first, 0, na - 1, item + 1), local2 = item + 1 - first[lo2];
            const int64_t j2 = (local2 % nj) * JB;
            if (active[lo2] != e || j2 != j0) {
                const char *w2 = (const char *)w_in + (size_t)active[lo2] * (size_t)W * rowb;
                nx[0] = w2 + (size_t)j2 * rowb, nx[1] = w2 + (size_t)(F + j2) * rowb;
                nx_rows = min64(JB, F - j2);
            }
        }
        const int rs = rs_serves(dt, s1 - s0, D); /* all the block's rows at once, weight row after weight row */
        for (int64_t s = s0, ti = 0; s < s1; s += rs ? s1 - s0 : tile_rows(s1 - s0, ti++)) {
            const void *a[UP_HB_ROWS];
            const int R = rs ? (int)(s1 - s0) : tile_rows(s1 - s0, ti);
            for (int r = 0; r < R; r++) a[r] = at(x, dt, ld_x, tok[s + r], 0);
            if (j0 == 0) /* a row block's first item reads its token rows from memory, at random: the next tile's */
                for (int64_t q = s + R; q < min64(s + R + TR, s1); q++) prefetch_row(at(x, dt, ld_x, tok[q], 0), (int64_t)rowb);
            /* pre-activations of the item's columns for these rows: gate (and up) halves, JB each, written by the
             * tiles straight into place (padding rows repeat the item's first row; their results land past jw) */
            float hb[UP_HB_ROWS][2 * JB] __attribute__((aligned(64)));
            const char *pns[2 * JB / TN]; /* each tile's row of the next item to prefetch, or NULL */
#if defined(V8)
            if (rs) {
                rs_rows((const float *const *)a, R, we + (size_t)j0 * rowb, rowb, jw, D, &hb[0][0], 2 * JB);
                if (act == 1) rs_rows((const float *const *)a, R, we + (size_t)(F + j0) * rowb, rowb, jw, D, &hb[0][JB], 2 * JB);
            }
#endif
            for (int64_t k0 = 0; k0 < D && !rs; k0 += kc) { /* the tiles' rows a chunk of k at a time, as in small_down */
                const int64_t kn = min64(kc, D - k0);
                for (int64_t jj = 0; jj < jw; jj += TN)
                    for (int half = 0; half < (act == 1 ? 2 : 1); half++) {
                        const void *b[TN], *pf[TN];
                        for (int q = 0; q < TN; q++) {
                            int64_t row = j0 + (jj + q < jw ? jj + q : 0) + (half ? F : 0);
                            b[q] = we + (size_t)row * rowb + (size_t)k0 * esize(dt);
                            /* the first row block streams the weights from memory: prefetch the rows of a later tile */
                            pf[q] = (const char *)b[q] + pf_ahead(rowb); /* a hint: may run past the end */
                        }
                        const int64_t i = 2 * (jj / TN) + half;
                        if (k0 == 0) {
                            pns[i] = NULL;
                            if (nx_q < (act == 1 ? 2 : 1) * nx_rows) {
                                pns[i] = nx[nx_q / nx_rows] + (size_t)(nx_q % nx_rows) * rowb;
                                nx_q++;
                            }
                        }
                        const char *pn = pns[i] ? pns[i] + (size_t)k0 * esize(dt) : NULL;
                        nt_tile_chunk(a, R, b, s == s0 ? pf : NULL, pn, k0, kn, dt, &hb[0][JB * half + jj], 2 * JB);
                    }
            }
            /* vectorised epilogue over the item's columns: bias, keep h, activation */
            for (int r = 0; r < R; r++) {
                float *g = hb[r], *u = hb[r] + JB;
                if (b_in) {
                    const void *bg = at(b_in, dt, W, e, j0), *bu = at(b_in, dt, W, e, F + j0);
#pragma omp simd
                    for (int64_t j = 0; j < jw; j++) {
                        g[j] += ld(bg, dt, j);
                        u[j] += act == 1 ? ld(bu, dt, j) : 0.0f;
                    }
                }
                if (h_out) {
                    void *hg = at(h_out, dt, W, s + r, j0);
                    for (int64_t j = 0; j < jw; j++) st(hg, dt, j, g[j]);
                    if (act == 1) {
                        void *hu = at(h_out, dt, W, s + r, F + j0);
                        for (int64_t j = 0; j < jw; j++) st(hu, dt, j, u[j]);
                    }
                }
                if (act == 1) {
                    void *ar = at(a_out, dt, F, s + r, j0);
                    if (dt == DT_F32) {
#pragma omp simd
                        for (int64_t j = 0; j < jw; j++) ((float *)ar)[j] = g[j] * sigmoid_f32(g[j]) * u[j];
                    } else {
#pragma omp simd
                        for (int64_t j = 0; j < jw; j++) ((bf16 *)ar)[j] = f32_to_bf16(g[j] * sigmoid_f32(g[j]) * u[j]);
                    }
                }
            }
        }
    }
    free(active);
    return 0;
}

/* Output projection and weighted combine:
 *     out[tok[s], d] += w[s] * (a[s, :] . w_out[e, d, :] + b_out[e, d])       for the rows s of expert e,
 * out float32 [T, D]. Each thread owns a block of the D output columns for all experts, so a token that went to
 * several experts is never written by two threads, and each token's sum runs in expert order (deterministic). */
#define DOWN_DB_MAX 128
#if defined(V8)
/* AVX2: an item's weight rows in groups of at most this many bytes, each group run over all of the expert's rows
 * before the next: 128 rows of a Mixtral-like w_out (720 KiB in fp32) overflow a 512 KiB L2, and every row block
 * streamed them again from L3 (Zen 3, fp32, Mixtral-like experts of 32 rows: 3.79 -> 3.06 ms, 97 -> 120 GFLOP/s;
 * 16 rows 2.73 -> 2.19 ms; fine-grained experts, whose items fit, unchanged) */
#define DOWN_GROUP_BYTES (96 << 10)
#else
#define DOWN_GROUP_BYTES (1 << 30) /* (an item's weight rows fit the larger L2 of AVX-512 CPUs) */
#endif

static int small_down(const void *a, int64_t ld_a, const int64_t *tok, const float *w, const int64_t *start,
                      const int64_t *end, int64_t E,
                   const void *w_out, const void *b_out, int64_t D, int64_t F, int dt, float *out, int64_t ld_out,
                   int nthreads) {
    /* Columns per work item: as many as leaves two items per thread, up to DOWN_DB_MAX. Each item reads every row
     * of a once, so wide items read a a few times instead of D / 16 times, and write each token's output in long
     * runs (with a short d_ff, as in fine-grained experts, those passes cost as much as the arithmetic). */
    const int nt = gemm_threads(start, end, E, D, F, nthreads);
    const int64_t DB = item_width(D, nt, 2, 16, DOWN_DB_MAX);
    const int64_t nd = (D + DB - 1) / DB;
    int64_t DG = DOWN_GROUP_BYTES / (F * (int64_t)esize(dt)) / TN * TN;
    DG = DG < TN ? TN : DG > DB ? DB : DG;
    const int64_t kc = nt_chunk(F, dt); /* k per chunk of the tiles (see nt_chunk) */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t item = 0; item < nd; item++) {
        const int64_t d0 = item * DB, d1 = d0 + DB < D ? d0 + DB : D;
        for (int64_t e = 0; e < E; e++) {
            const int64_t s0 = start[e], s1 = end[e];
            if (s1 <= s0) continue;
            const char *we = (const char *)w_out + (size_t)e * (size_t)D * (size_t)F * esize(dt);
            /* the next expert's rows d0 .. d1, one prefetched into L2 by each tile (as in small_up) */
            int64_t e2 = e + 1, nx_q = d0;
            while (e2 < E && end[e2] <= start[e2]) e2++;
            const char *nx = e2 < E ? (const char *)w_out + (size_t)e2 * (size_t)D * (size_t)F * esize(dt) : NULL;
            for (int64_t g0 = d0; g0 < d1; g0 += DG) { /* a group of weight rows that stays in L2 */
                const int64_t g1 = min64(g0 + DG, d1);
                for (int64_t s = s0, ti = 0; s < s1; s += tile_rows(s1 - s0, ti++)) {
                    const void *ar[TR];
                    const int R = tile_rows(s1 - s0, ti);
                    for (int r = 0; r < R; r++) ar[r] = at(a, dt, ld_a, s + r, 0);
                    for (int64_t q = s + R; q < min64(s + R + TR, s1); q++) /* the next block's output rows (random) */
                        prefetch_row(out + (size_t)tok[q] * (size_t)ld_out + g0, (g1 - g0) * 4);
                    float cb[TR][DOWN_DB_MAX] __attribute__((aligned(64))); /* the block's outputs for these rows */
                    const char *pns[DOWN_DB_MAX / TN]; /* each tile's row of the next expert to prefetch, or NULL */
                    for (int64_t k0 = 0; k0 < F; k0 += kc) { /* the tiles' rows, a chunk of k at a time (nt_chunk) */
                        const int64_t kn = min64(kc, F - k0);
                        for (int64_t d = g0; d < g1; d += TN) {
                            const void *b[TN], *pf[TN];
                            for (int q = 0; q < TN; q++) { /* padding rows repeat row g0; their results land past g1 */
                                b[q] = we + ((size_t)(d + q < g1 ? d + q : g0) * (size_t)F + (size_t)k0) * esize(dt);
                                pf[q] = (const char *)b[q] + pf_ahead((size_t)F * esize(dt));
                            }
                            const int64_t i = (d - g0) / TN;
                            if (k0 == 0) pns[i] = nx && nx_q < d1 ? nx + (size_t)(nx_q++) * (size_t)F * esize(dt) : NULL;
                            const char *pn = pns[i] ? pns[i] + (size_t)k0 * esize(dt) : NULL;
                            nt_tile_chunk(ar, R, b, s == s0 ? pf : NULL, pn, k0, kn, dt, &cb[0][d - g0], DOWN_DB_MAX);
                        }
                    }
                    const int64_t dw = g1 - g0;
                    for (int r = 0; r < R; r++) {
                        float *o = out + (size_t)tok[s + r] * (size_t)ld_out + g0, ws = w[s + r], *c = cb[r];
                        if (b_out) {
                            const void *bo = at(b_out, dt, D, e, g0);
                            for (int64_t j = 0; j < dw; j++) c[j] += ld(bo, dt, j);
                        }
#pragma omp simd
                        for (int64_t j = 0; j < dw; j++) o[j] = fmaf(ws, c[j], o[j]);
                    }
                }
            }
        }
    }
    return 0;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define MOE_AMX 1
#endif
/* The projections of every expert's rows (small_up and small_down's contracts), experts of at least packed_min rows
 * on the AMX or packed tiles. a_pk (SwiGLU): the activation handed over between the two calls (same tok, start,
 * end, dt and packed_min) in the packed tiles' layout where they use one (gk_handover; a then holds the same values,
 * [S, F], but not as rows), else as rows. */
int moe_small_up(const void *x, int64_t ld_x, const int64_t *tok, const int64_t *start, const int64_t *end, int64_t E,
                 const void *w_in, const void *b_in, int64_t W, int64_t D, int dt, int act, void *h_out, void *a_out,
                 int a_pk, int64_t packed_min, int64_t swapped_max, int nthreads);
int moe_small_down(const void *a, int64_t ld_a, int a_pk, const int64_t *tok, const float *w, const int64_t *start,
                   const int64_t *end, int64_t E, const void *w_out, const void *b_out, int64_t D, int64_t F, int dt,
                   float *out, int64_t ld_out, int64_t packed_min, int nthreads);
/* The input projection's float32 experts of SW_MIN_ROWS to swapped_max rows take the swapped tiles (AVX2 builds,
 * see sw_run); the callers in C pass SW_MAX_ROWS. */
#ifndef SW_MIN_ROWS
#define SW_MIN_ROWS 24
#endif
#ifndef SW_MAX_ROWS
#define SW_MAX_ROWS 96
#endif

/* The S = T*K slots of ids [T, K] (ids < 0: empty) grouped by expert, a stable counting sort: expert e's slots are
 * start[e] <= s < end[e], each from token tok[s] = slot[s] / K with weight ws[s] = w[slot[s]]; counts[e] (may be
 * NULL) their number. start, end, tok, slot and ws are written (tok, slot and ws for the valid slots only, which
 * come first). Returns the valid slots, or -1 (nothing grouped) if an id is >= E. */
static int64_t group_slots(const int64_t *ids, const float *w, int64_t S, int64_t K, int64_t E, int64_t *start,
                           int64_t *end, int64_t *tok, int64_t *slot, float *ws, int64_t *counts) {
    for (int64_t e = 0; e < E; e++) end[e] = 0;
    for (int64_t i = 0; i < S; i++) {
        if (ids[i] >= E) return -1;
        if (ids[i] >= 0) end[ids[i]]++; /* counts first */
    }
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) {
        if (counts) counts[e] = end[e];
        start[e] = n;
        n += end[e];
        end[e] = start[e];
    }
    for (int64_t i = 0; i < S; i++) { /* stable: slots of an expert stay in token order */
        const int64_t e = ids[i];
        if (e < 0) continue;
        const int64_t s = end[e]++;
        tok[s] = i / K;
        slot[s] = i;
        ws[s] = w[i];
    }
    return n;
}

/* The activations of the decode kernels besides SwiGLU (whose epilogue every input-projection path fuses): gated,
 * a[s, j] = act(gate = h[s, j], up = h[s, F + j]), or plain (ACT_GELU on), a[s, j] = act(h[s, j]), for s < S,
 * j < F, in float32 from h as stored (rounded to bf16 in a bf16 layer, as its PyTorch path has it), with NaN kept
 * (a clamp of NaN is NaN, as torch.clamp's; relu(NaN) is NaN). p0, p1: GPT-OSS's alpha and limit; the clamped and
 * clipped SwiGLUs' limit in p0. */
enum { ACT_SWIGLU = 1, ACT_GEGLU, ACT_GEGLU_TANH, ACT_REGLU, ACT_GPT_OSS, ACT_SWIGLU_CLAMPED, ACT_SWIGLU_CLIPPED,
       ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_RELU2, ACT_SILU };
static inline float clamp_nan(float v, float lo, float hi) { return v > hi ? hi : v < lo ? lo : v; }
static inline float relu_nan(float v) { return v < 0.0f ? 0.0f : v; }
static inline float gelu_erf(float g) { return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)); }
static inline float gelu_tanh(float g) {
    return 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));
}
static void act_rows(const void *h, void *a, int dt, int64_t S, int64_t F, int act, float p0, float p1,
                     int nthreads) {
    const int gated = act < ACT_GELU;
#pragma omp parallel for schedule(static) num_threads(threads_for(S * F * 16, nthreads))
    for (int64_t s = 0; s < S; s++) {
        const void *hs = at(h, dt, gated ? 2 * F : F, s, 0);
        void *as = at(a, dt, F, s, 0);
        for (int64_t j = 0; j < F; j++) {
            const float g = ld(hs, dt, j), u = gated ? ld(hs, dt, F + j) : 1.0f;
            float v;
            switch (act) {
            case ACT_GEGLU: v = gelu_erf(g) * u; break;
            case ACT_GEGLU_TANH: v = gelu_tanh(g) * u; break;
            case ACT_REGLU: v = relu_nan(g) * u; break;
            case ACT_GPT_OSS: {
                const float gc = clamp_nan(g, -__builtin_inff(), p1);
                v = (clamp_nan(u, -p1, p1) + 1.0f) * (gc * sigmoid_f32(gc * p0));
                break;
            }
            case ACT_SWIGLU_CLAMPED: {
                const float gc = clamp_nan(g, -__builtin_inff(), p0);
                v = gc * sigmoid_f32(gc) * clamp_nan(u, -p0, p0);
                break;
            }
            case ACT_SWIGLU_CLIPPED: v = clamp_nan(g * sigmoid_f32(g), -__builtin_inff(), p0) * clamp_nan(u, -p0, p0); break;
            case ACT_GELU: v = gelu_erf(g); break;
            case ACT_GELU_TANH: v = gelu_tanh(g); break;
            case ACT_RELU: v = relu_nan(g); break;
            case ACT_RELU2: v = relu_nan(g) * relu_nan(g); break;
            case ACT_SILU: v = g * sigmoid_f32(g); break;
            default: v = g * sigmoid_f32(g) * u;
            }
            st(as, dt, j, v);
        }
    }
}

/* Inference for a few tokens straight from the router's choices, with no sort on the host: the S = T*K slots are
 * grouped by expert here (a counting sort; token order kept within an expert), then the gated experts run through
 * moe_small_up and moe_small_down:  out[t] += sum_k w[t, k] * expert_{ids[t, k]}(x[t])   (ids < 0: empty slot).
 * act: the activation (ACT_SWIGLU fused into the input projection; the others of act_rows, with act_p0, act_p1,
 * between the projections); F the width of its output (the input projection's rows: 2F for the gated ones, F for
 * the plain ones).
 * out is float32 [T, D] and must be zeroed by the caller; counts (int64 [E], may be NULL) receives the slots per
 * expert; packed_min: the rows from which an expert leaves the dot-product tiles (as moe_small_up's; the caller
 * passes its build's threshold for the dtype). Returns -4 if an id is >= E, -5 if out of memory. */
int moe_small_decode(const void *x, int64_t ld_x, const int64_t *ids, const float *w, int64_t T, int64_t K, int64_t E,
                     const void *w_in, const void *b_in, const void *w_out, const void *b_out, int64_t D, int64_t F,
                     int dt, float *out, int64_t ld_out, int64_t *counts, int64_t packed_min, int act, float act_p0,
                     float act_p1, int nthreads) {
    if (act < ACT_SWIGLU || act > ACT_SILU) return -1;
    const int64_t S = T * K, W = act < ACT_GELU ? 2 * F : F;
    int64_t *start = calloc((size_t)(2 * E + 2 * S + 1), sizeof(int64_t));
    float *ws = malloc((size_t)(S ? S : 1) * sizeof(float));
    void *a = malloc((size_t)(S ? S : 1) * (size_t)F * esize(dt));
    /* (SwiGLU: the input projection's epilogue; the others: its pre-activations, then act_rows) */
    void *h = act == ACT_SWIGLU ? NULL : malloc((size_t)(S ? S : 1) * (size_t)W * esize(dt));
    int rc = 0;
    if (!start || !ws || !a || (act != ACT_SWIGLU && !h)) {
        rc = -5;
        goto done;
    }
    int64_t *end = start + E, *tok = end + E, *slot = tok + S;
    const int64_t n = group_slots(ids, w, S, K, E, start, end, tok, slot, ws, counts);
    if (n < 0) {
        rc = -4;
        goto done;
    }
    const int pk = act == ACT_SWIGLU; /* (the packed hand-over comes from the fused epilogue only) */
    rc = moe_small_up(x, ld_x, tok, start, end, E, w_in, b_in, W, D, dt, pk, h, pk ? a : NULL, pk, packed_min,
                      SW_MAX_ROWS, nthreads);
    if (rc == 0 && !pk) act_rows(h, a, dt, n, F, act, act_p0, act_p1, nthreads);
    if (rc == 0)
        rc = moe_small_down(a, F, pk, tok, ws, start, end, E, w_out, b_out, D, F, dt, out, ld_out, packed_min,
                            nthreads);
done:
    free(start);
    free(ws);
    free(a);
    free(h);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Small-M backward: the same grouping, for the two other GEMM shapes of backpropagation.
 *   moe_small_nn:    C[s, :] = A[s, :] @ B_e       (dA = dY @ W: B_e = W[e] is [Kd, N], N contiguous)
 *   moe_small_outer: G_e     = A_e^T @ B_e         (dW = dY^T @ X over the rows of expert e)
 * Both vectorise along the contiguous output dimension and accumulate in float32; bfloat16 operands are widened
 * on load (these shapes have no pair structure for vdpbf16ps to use).
 * --------------------------------------------------------------------------------------------------------------- */
#define NC 4 /* 16-wide column vectors per tile */

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) __m512 ld16(const void *p, int dt, __mmask16 m) {
    if (dt == DT_F32) return _mm512_maskz_loadu_ps(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* f32_to_bf16 in vector form, the bfloat16 left in the high half of each lane (low half garbage). */
static inline __attribute__((always_inline)) __m512i round_bf16_hi(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
}

/* 16 float32 -> bfloat16, round to nearest even, NaN kept quiet. With AVX512-BF16, the hardware conversion, which
 * rounds and quiets NaN as f32_to_bf16 does but flushes denormals to zero, serves vectors without a denormal lane
 * (one fpclass test), the integer rounding the others: the bits are f32_to_bf16's either way (every float32
 * compared once; SwiGLU's bf16 rows 5% faster, its backward 13%, on 2 Sapphire Rapids cores). st32_bf16 too. */
static inline __attribute__((always_inline)) __m256i cvt16_bf16(__m512 v) {
#if defined(__AVX512BF16__)
    if (__builtin_expect(!_mm512_fpclass_ps_mask(v, 0x20), 1)) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16_hi(v), 16));
}

static inline __attribute__((always_inline)) void st16(void *p, int dt, __mmask16 m, __m512 v) {
    if (dt == DT_F32)
        _mm512_mask_storeu_ps(p, m, v);
    else
        _mm256_mask_storeu_epi16(p, m, cvt16_bf16(v));
}

/* Store for output written once and not read soon (weight gradients): a non-temporal store where the vector is
 * whole and aligned (no read-for-ownership of the line), else a plain masked store. Callers end with _mm_sfence. */
static inline __attribute__((always_inline)) void st16_stream(void *p, int dt, __mmask16 m, __m512 v) {
    if (dt == DT_F32) {
        if (m == 0xffff && ((uintptr_t)p & 63) == 0)
            _mm512_stream_ps(p, v);
        else
            _mm512_mask_storeu_ps(p, m, v);
    } else {
        __m256i b = cvt16_bf16(v);
        if (m == 0xffff && ((uintptr_t)p & 31) == 0)
            _mm256_stream_si256(p, b);
        else
            _mm256_mask_storeu_epi16(p, m, b);
    }
}
#endif

#if defined(__AVX512F__)
/* exp_f32, sigmoid_f32 and the SwiGLU rows in explicit AVX-512, operation for operation the scalar code (so the
 * results are the same bits); bfloat16 rows are widened on load and rounded to nearest even on store. */
static inline __attribute__((always_inline)) __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), x); /* min/max return x where x is NaN: NaN passes */
    x = _mm512_max_ps(_mm512_set1_ps(EXP_LO), x);
    const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(EXP_LOG2E), _mm512_set1_ps(EXP_MAGIC));
    __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(EXP_MAGIC));
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(EXP_BIAS)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

static inline __attribute__((always_inline)) __m512 sigmoid16(__m512 x) {
    __m512 nx = _mm512_sub_ps(_mm512_setzero_ps(), x);
    __m512 e = exp16(nx);
    e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(nx, _mm512_set1_ps(EXP_HI), _CMP_GT_OQ),
                           _mm512_set1_ps(__builtin_inff()));
    return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* 32 bfloat16 as two float32 vectors without any lane shuffle: the even elements (shifted up into the high half of
 * each 32-bit lane) and the odd ones (already there, low half cleared). Elementwise code runs on both and
 * st32_bf16 puts them back in order; widening with shuffles instead costs ~1.6x the time of a SwiGLU row. */
static inline __attribute__((always_inline)) void ld32_bf16(const void *p, __mmask32 m, __m512 *even, __m512 *odd) {
    __m512i v = _mm512_maskz_loadu_epi16(m, p);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline __attribute__((always_inline)) void st32_bf16(void *p, __mmask32 m, __m512 even, __m512 odd) {
#if defined(__AVX512BF16__)
    if (__builtin_expect(!(_mm512_fpclass_ps_mask(even, 0x20) | _mm512_fpclass_ps_mask(odd, 0x20)), 1)) {
        const __m512i ix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                            23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        _mm512_mask_storeu_epi16(p, m, _mm512_permutexvar_epi16(ix, (__m512i)_mm512_cvtne2ps_pbh(odd, even)));
        return;
    }
#endif
    __m512i r = _mm512_or_si512(_mm512_srli_epi32(round_bf16_hi(even), 16),
                                _mm512_and_si512(round_bf16_hi(odd), _mm512_set1_epi32((int)0xffff0000u)));
    _mm512_mask_storeu_epi16(p, m, r);
}

static inline __attribute__((always_inline)) __m512 swiglu16(__m512 g, __m512 u) {
    return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u);
}

static inline __attribute__((always_inline)) void swiglu_row16(const void *h, void *a, int dt, int64_t F) {
    if (dt == DT_BF16) {
        const bf16 *hb = (const bf16 *)h;
        for (int64_t j = 0; j < F; j += 32) {
            __mmask32 m = tail32(F - j);
            __m512 g0, g1, u0, u1;
            ld32_bf16(hb + j, m, &g0, &g1);
            ld32_bf16(hb + F + j, m, &u0, &u1);
            st32_bf16((bf16 *)a + j, m, swiglu16(g0, u0), swiglu16(g1, u1));
        }
        return;
    }
    const float *hf = (const float *)h;
    for (int64_t j = 0; j < F; j += 16) {
        __mmask16 m = tail16(F - j);
        st16((float *)a + j, DT_F32, m, swiglu16(ld16(hf + j, DT_F32, m), ld16(hf + F + j, DT_F32, m)));
    }
}

/* One vector of swiglu_bwd_row: returns ga * a for the router-weight gradient, sets w a, dgate and dup. */
static inline __attribute__((always_inline)) __m512 swiglu_bwd16(__m512 x, __m512 up, __m512 g, __m512 wv,
                                                                 __m512 *aw, __m512 *dgate, __m512 *dup) {
    __m512 s = sigmoid16(x), silu = _mm512_mul_ps(x, s), av = _mm512_mul_ps(silu, up), d = _mm512_mul_ps(g, wv);
    *aw = _mm512_mul_ps(av, wv);
    *dgate = _mm512_mul_ps(_mm512_mul_ps(d, up), _mm512_fmadd_ps(silu, _mm512_sub_ps(_mm512_set1_ps(1.0f), s), s));
    *dup = _mm512_mul_ps(d, silu);
    return _mm512_mul_ps(g, av);
}

static inline __attribute__((always_inline)) float swiglu_bwd_row16(const void *h, const void *ga, float w, void *dh,
                                                                    void *aw, int dt, int64_t F) {
    const __m512 wv = _mm512_set1_ps(w);
    __m512 acc = _mm512_setzero_ps(), a0, a1, dg0, dg1, du0, du1;
    if (dt == DT_BF16) {
        const bf16 *hb = (const bf16 *)h, *gb = (const bf16 *)ga;
        bf16 *db = (bf16 *)dh;
        for (int64_t j = 0; j < F; j += 32) {
            __mmask32 m = tail32(F - j);
            __m512 x0, x1, u0, u1, g0, g1;
            ld32_bf16(hb + j, m, &x0, &x1);
            ld32_bf16(hb + F + j, m, &u0, &u1);
            ld32_bf16(gb + j, m, &g0, &g1);
            acc = _mm512_add_ps(acc, swiglu_bwd16(x0, u0, g0, wv, &a0, &dg0, &du0));
            acc = _mm512_add_ps(acc, swiglu_bwd16(x1, u1, g1, wv, &a1, &dg1, &du1));
            if (aw) st32_bf16((bf16 *)aw + j, m, a0, a1);
            st32_bf16(db + j, m, dg0, dg1);
            st32_bf16(db + F + j, m, du0, du1);
        }
    } else {
        const float *hf = (const float *)h, *gf = (const float *)ga;
        float *df = (float *)dh;
        for (int64_t j = 0; j < F; j += 16) {
            __mmask16 m = tail16(F - j);
            acc = _mm512_add_ps(acc, swiglu_bwd16(ld16(hf + j, DT_F32, m), ld16(hf + F + j, DT_F32, m),
                                                  ld16(gf + j, DT_F32, m), wv, &a0, &dg0, &du0));
            if (aw) st16((float *)aw + j, DT_F32, m, a0);
            st16(df + j, DT_F32, m, dg0);
            st16(df + F + j, DT_F32, m, du0);
        }
    }
    return _mm512_reduce_add_ps(acc);
}
#define SWIGLU_ROW swiglu_row16
#define SWIGLU_BWD_ROW swiglu_bwd_row16
#elif defined(V8)
/* The same in 8-wide AVX2: exp_f32 and sigmoid_f32 operation for operation; a vector of 16 bfloat16 is split into
 * its even and odd elements (no lane shuffle), row tails run the scalar code. */
static inline __attribute__((always_inline)) __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), x); /* min/max return x where x is NaN: NaN passes */
    x = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x);
    const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), _mm256_set1_ps(EXP_MAGIC));
    __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(EXP_MAGIC));
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(EXP_BIAS)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __attribute__((always_inline)) __m256 sigmoid8(__m256 x) {
    __m256 nx = _mm256_sub_ps(_mm256_setzero_ps(), x);
    __m256 e = _mm256_blendv_ps(exp8(nx), _mm256_set1_ps(__builtin_inff()),
                                _mm256_cmp_ps(nx, _mm256_set1_ps(EXP_HI), _CMP_GT_OQ));
    return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

static inline __attribute__((always_inline)) void st16_bf16(bf16 *p, __m256 even, __m256 odd) {
    __m256i r = _mm256_or_si256(_mm256_srli_epi32(round_bf16_hi8(even), 16),
                                _mm256_and_si256(round_bf16_hi8(odd), _mm256_set1_epi32((int)0xffff0000u)));
    _mm256_storeu_si256((__m256i *)p, r);
}

static inline __attribute__((always_inline)) __m256 swiglu8(__m256 g, __m256 u) {
    return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), u);
}

static inline __attribute__((always_inline)) void swiglu_row8(const void *h, void *a, int dt, int64_t F) {
    int64_t j = 0;
    if (dt == DT_BF16) {
        const bf16 *hb = (const bf16 *)h;
        for (; j + 16 <= F; j += 16) {
            __m256 g0, g1, u0, u1;
            ld16_bf16(hb + j, &g0, &g1);
            ld16_bf16(hb + F + j, &u0, &u1);
            st16_bf16((bf16 *)a + j, swiglu8(g0, u0), swiglu8(g1, u1));
        }
    } else {
        const float *hf = (const float *)h;
        for (; j + 8 <= F; j += 8)
            _mm256_storeu_ps((float *)a + j, swiglu8(_mm256_loadu_ps(hf + j), _mm256_loadu_ps(hf + F + j)));
    }
    for (; j < F; j++) {
        float g = ld(h, dt, j);
        st(a, dt, j, g * sigmoid_f32(g) * ld(h, dt, F + j));
    }
}

static inline __attribute__((always_inline)) __m256 swiglu_bwd8(__m256 x, __m256 up, __m256 g, __m256 wv,
                                                                __m256 *aw, __m256 *dgate, __m256 *dup) {
    __m256 s = sigmoid8(x), silu = _mm256_mul_ps(x, s), av = _mm256_mul_ps(silu, up), d = _mm256_mul_ps(g, wv);
    *aw = _mm256_mul_ps(av, wv);
    *dgate = _mm256_mul_ps(_mm256_mul_ps(d, up), _mm256_fmadd_ps(silu, _mm256_sub_ps(_mm256_set1_ps(1.0f), s), s));
    *dup = _mm256_mul_ps(d, silu);
    return _mm256_mul_ps(g, av);
}

static inline __attribute__((always_inline)) float swiglu_bwd_row8(const void *h, const void *ga, float w, void *dh,
                                                                   void *aw, int dt, int64_t F) {
    const __m256 wv = _mm256_set1_ps(w);
    __m256 acc = _mm256_setzero_ps(), a0, a1, dg0, dg1, du0, du1;
    int64_t j = 0;
    if (dt == DT_BF16) {
        const bf16 *hb = (const bf16 *)h, *gb = (const bf16 *)ga;
        bf16 *db = (bf16 *)dh;
        for (; j + 16 <= F; j += 16) {
            __m256 x0, x1, u0, u1, g0, g1;
            ld16_bf16(hb + j, &x0, &x1);
            ld16_bf16(hb + F + j, &u0, &u1);
            ld16_bf16(gb + j, &g0, &g1);
            acc = _mm256_add_ps(acc, swiglu_bwd8(x0, u0, g0, wv, &a0, &dg0, &du0));
            acc = _mm256_add_ps(acc, swiglu_bwd8(x1, u1, g1, wv, &a1, &dg1, &du1));
            if (aw) st16_bf16((bf16 *)aw + j, a0, a1);
            st16_bf16(db + j, dg0, dg1);
            st16_bf16(db + F + j, du0, du1);
        }
    } else {
        const float *hf = (const float *)h, *gf = (const float *)ga;
        float *df = (float *)dh;
        for (; j + 8 <= F; j += 8) {
            acc = _mm256_add_ps(acc, swiglu_bwd8(_mm256_loadu_ps(hf + j), _mm256_loadu_ps(hf + F + j),
                                                 _mm256_loadu_ps(gf + j), wv, &a0, &dg0, &du0));
            if (aw) _mm256_storeu_ps((float *)aw + j, a0);
            _mm256_storeu_ps(df + j, dg0);
            _mm256_storeu_ps(df + F + j, du0);
        }
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    float sum = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
    for (; j < F; j++) { /* the row's tail: swiglu_bwd_row's loop body */
        float x = ld(h, dt, j), up = ld(h, dt, F + j), g = ld(ga, dt, j);
        float s = sigmoid_f32(x), silu = x * s, av = silu * up, d = g * w;
        sum += g * av;
        if (aw) st(aw, dt, j, av * w);
        st(dh, dt, j, d * up * (s + silu * (1.0f - s)));
        st(dh, dt, F + j, d * silu);
    }
    return sum;
}
#define SWIGLU_ROW swiglu_row8
#define SWIGLU_BWD_ROW swiglu_bwd_row8
#else
#define SWIGLU_ROW swiglu_row
#define SWIGLU_BWD_ROW swiglu_bwd_row
#endif

/* ================================================================================================================
 * Packed tiles: the two projections and the data gradients of experts with tens to hundreds of rows (AVX2 builds:
 * float32 and bfloat16; AVX-512 builds: float32, whose bfloat16 runs on AMX or the vdpbf16ps tiles).
 *
 * The dot-product tiles above reduce along K: each group of weight rows reads the expert's token rows again (from
 * L2), and the sums need a reduction across lanes at the end. An expert with many rows is better served by the GEMM
 * libraries' scheme, which this reproduces for the MoE layout: GK_NR weight rows (one panel: 16 on AVX2, 32 on
 * AVX-512) are transposed into a packed block [GK_KC][GK_NR] (float32; bf16 weights widened once there), and each
 * tile of GK_MR token rows (6; 12) accumulates GK_MR x GK_NR outputs in 2 GK_MR registers by broadcasting one token
 * value against the block's two vectors per k: 2 GK_MR FMAs per 2 loads and GK_MR broadcasts (AVX2: 93% of one
 * Zen 3 core's FMA peak in cache, 95 of 102 GFLOP/s). Token rows are read in place through their row pointers (the
 * gather costs nothing) where they are float32, or widened a block of rows at a time. On AVX2 builds, the float32
 * rows of experts of at least GK_APACK_MIN_ROWS rows are packed first, each tile's rows 8 k at a time (gk_apack: a
 * tile then broadcasts from one sequential stream instead of GK_MR rows scattered over the input, which every panel
 * reads again), up to GK_APACK_BYTES of packed rows at a time, the threads packing a share each; SwiGLU's
 * activation can come from the input projection in that layout already (gk_handover). The epilogues run on each
 * tile's results as its last block of k completes them, while they are in L1: bias, SwiGLU, keeping h; the
 * weighted scatter-add of the output projection. Threads split the output columns (panels), so each reads its own
 * part of every expert's weights and no two threads write the same output element.
 * ================================================================================================================ */
#if defined(V8) || defined(__AVX512F__)
#define MOE_GK 1
#if defined(V8)
#define GK_VL 8 /* lanes per vector */
#define GK_MR 6 /* token rows per tile: 12 accumulators of 16 ymm registers */
typedef __m256 gk_v;
#define GK_LOAD _mm256_load_ps
#define GK_LOADU _mm256_loadu_ps
#define GK_STORE _mm256_store_ps
#define GK_STOREU _mm256_storeu_ps
#define GK_SET1 _mm256_set1_ps
#define GK_FMA _mm256_fmadd_ps
#define GK_ADD _mm256_add_ps
#define GK_MUL _mm256_mul_ps
#define GK_ZERO _mm256_setzero_ps
#define GK_SIGMOID sigmoid8
#define GK_KEEP(v) KEEP_IN_REG(v) /* (else the compiler may fold a panel load into each of the tile's FMAs) */
#else
#define GK_VL 16
#define GK_MR 12 /* 24 accumulators of 32 zmm registers (6-8, 10 and 14 rows measured 2-6% slower) */
typedef __m512 gk_v;
#define GK_LOAD _mm512_load_ps
#define GK_LOADU _mm512_loadu_ps
#define GK_STORE _mm512_store_ps
#define GK_STOREU _mm512_storeu_ps
#define GK_SET1 _mm512_set1_ps
#define GK_FMA _mm512_fmadd_ps
#define GK_ADD _mm512_add_ps
#define GK_MUL _mm512_mul_ps
#define GK_ZERO _mm512_setzero_ps
#define GK_SIGMOID sigmoid16
#define GK_KEEP(v) (void)0
#endif
#define GK_NR (2 * GK_VL) /* columns per panel: two vectors */
#ifndef GK_OUT_PF
#if defined(V8)
/* rows ahead whose output rows the epilogues that add into scattered token rows prefetch: the output projection's
 * (AVX2, Zen 3: 24 against 8, the down kernel alone on 1024-row fine-grained experts scattering into 8192 tokens
 * 0.94x; 64: 0.97x) and the data gradient's (24 against none, paired: the dH @ W_in kernel on fine-grained
 * experts of 1024 rows 0.91-0.92x, 128 rows 0.95x; Mixtral-like 2048 rows 0.92x, 256 rows 0.99x) */
#define GK_OUT_PF 24
#else
#define GK_OUT_PF 8
#endif
#endif
/* fetch into L1 the GK_NR float32 columns at o of a scattered output row that an epilogue will add into */
static inline void gk_prefetch_out(const float *o) {
    _mm_prefetch((const char *)o, _MM_HINT_T0);
    _mm_prefetch((const char *)o + 4 * GK_NR - 1, _MM_HINT_T0);
}
#ifndef GK_APACK
#if defined(V8)
#define GK_APACK 1
#else
#define GK_APACK 0
#endif
#endif
#ifndef GK_KC
#define GK_KC 256 /* k per packed block: 16 KiB (AVX2), 32 KiB (AVX-512: 128 and 512 within 4%) of float32 */
#endif

#if defined(V8)
static inline __attribute__((always_inline)) void tr8x8(__m256 *r) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#define GK_TRANSPOSE tr8x8

/* the first n elements of a row as float32 (the rest zero; n <= 0: zeros) */
static inline __attribute__((always_inline)) gk_v gk_ld(const void *p, int dt, int64_t n) {
    return n >= 8 ? ld8(p, dt) : n > 0 ? ld8_part(p, dt, n) : _mm256_setzero_ps();
}

/* store the first n <= GK_VL elements of v */
static inline __attribute__((always_inline)) void gk_st(void *p, int dt, gk_v v, int64_t n) { st8(p, dt, v, n, 0); }
#else
/* 16 x 16 transpose: pairs, then quads within 128-bit lanes, then the lanes (r[i][j] becomes r[j][i]) */
static inline __attribute__((always_inline)) void tr16x16_ps(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2)
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++)
            t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88),
                  t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    for (int j = 0; j < 8; j++)
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88), r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
}
#define GK_TRANSPOSE tr16x16_ps

static inline __attribute__((always_inline)) gk_v gk_ld(const void *p, int dt, int64_t n) {
    return ld16(p, dt, tail16(n > 0 ? n : 0));
}

static inline __attribute__((always_inline)) void gk_st(void *p, int dt, gk_v v, int64_t n) {
    st16(p, dt, tail16(n > 0 ? n : 0), v);
}
#endif

static inline int64_t gk_k8(int64_t K) { return (K + 7) / 8 * 8; } /* a packed tile's row stride (gk_apack) */

/* bp[k][j] = rows[j][k0 + k] as float32, k < kc, j < GK_NR (rows[j] NULL: zeros) */
static void gk_pack(const void *const *rows, int dt, int64_t k0, int64_t kc, float *bp) {
    const size_t eb = esize(dt);
    int64_t k = 0;
#if defined(V8)
    int full = dt == DT_F32;
    for (int j = 0; j < GK_NR; j++) full = full && rows[j];
    if (full) /* float32, no zero column: each 8 x 8 transpose from 128-bit halves (rows j and j + 4 in one load
               * pair), so that it needs no lane-crossing shuffles */
        for (; k + 8 <= kc; k += 8)
            for (int h = 0; h < 2; h++) {
                const float *const *rw = (const float *const *)rows + 8 * h;
                for (int half = 0; half < 2; half++) {
                    const int64_t o = k0 + k + 4 * half;
                    __m256 a[4];
                    for (int j = 0; j < 4; j++)
                        a[j] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(rw[j] + o)),
                                                    _mm_loadu_ps(rw[j + 4] + o), 1);
                    const __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
                    const __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
                    float *q = bp + (k + 4 * half) * GK_NR + 8 * h;
                    _mm256_store_ps(q, _mm256_shuffle_ps(t0, t2, 0x44));
                    _mm256_store_ps(q + GK_NR, _mm256_shuffle_ps(t0, t2, 0xEE));
                    _mm256_store_ps(q + 2 * GK_NR, _mm256_shuffle_ps(t1, t3, 0x44));
                    _mm256_store_ps(q + 3 * GK_NR, _mm256_shuffle_ps(t1, t3, 0xEE));
                }
            }
#endif
    for (; k + GK_VL <= kc; k += GK_VL)
        for (int h = 0; h < 2; h++) {
            gk_v r[GK_VL];
            for (int j = 0; j < GK_VL; j++)
                r[j] = rows[GK_VL * h + j] ? gk_ld((const char *)rows[GK_VL * h + j] + (size_t)(k0 + k) * eb, dt, GK_VL)
                                           : GK_ZERO();
            GK_TRANSPOSE(r);
            for (int i = 0; i < GK_VL; i++) GK_STORE(bp + (k + i) * GK_NR + GK_VL * h, r[i]);
        }
    for (; k < kc; k++)
        for (int j = 0; j < GK_NR; j++) bp[k * GK_NR + j] = rows[j] ? ld(rows[j], dt, k0 + k) : 0.0f;
}

/* The GK_NR columns of a panel, as rows over k: NT (nt): GK_NR weight rows, k along each (row[j] NULL: a zero
 * column); else columns n0 .. n0 + nw of the row-major rows of `base` (stride ld). */
typedef struct {
    int nt;
    const void *row[GK_NR];
    const char *base;
    int64_t ld, n0, nw;
} gk_src;

/* Rows ahead that the packing of a row-major panel (a line from each of its rows, far apart) fetches into L1: the
 * next panel's prefetch into L2, spread over the tiles, leaves these loads waiting where an expert has few tiles.
 * Measured on Zen 3 (2 threads, paired), forward+backward against none: fine-grained fp32 T = 128 0.96x, T = 1024
 * 0.96x, Mixtral-like fp32 T = 128 0.98-1.00x, bf16 0.99x (8 and 32 rows ahead: the same within 1%). */
#ifndef GK_SRC_PF
#define GK_SRC_PF 16
#endif

/* bp[k][j] = column j of src at k0 + k, as float32 (zero past nw) */
static void gk_pack_src(const gk_src *src, int dt, int64_t k0, int64_t kc, float *bp) {
    if (src->nt) {
        gk_pack(src->row, dt, k0, kc, bp);
        return;
    }
    const size_t eb = esize(dt);
    for (int64_t k = 0; k < kc; k++) {
        const char *p = src->base + ((size_t)(k0 + k) * (size_t)src->ld + (size_t)src->n0) * eb;
        if (k + GK_SRC_PF < kc) _mm_prefetch(p + (size_t)GK_SRC_PF * (size_t)src->ld * eb, _MM_HINT_T0);
        float *o = bp + k * GK_NR;
        GK_STORE(o, gk_ld(p, dt, src->nw));
        GK_STORE(o + GK_VL, gk_ld(p + GK_VL * eb, dt, src->nw - GK_VL));
    }
}

/* c[r][0..GK_NR] (+)= sum_k a[r][k] * bp[k][0..GK_NR] for r < R (a compile-time constant at every call), the token
 * values a[r][k] read through the row pointers a, or (pa not NULL, a constant at every call too) from the tile's rows
 * packed by 8 k at a time, pa[(k / 8) 8 R + 8 r + k % 8] (gk_apack) */
static inline __attribute__((always_inline)) void gk_tile_k(const int R, const float *const *a, const float *pa,
                                                            const float *bp, int64_t kc, float *c, const int add) {
    gk_v c0[GK_MR], c1[GK_MR];
    const float *ap[GK_MR];
    for (int r = 0; r < R; r++) {
        if (!pa) ap[r] = a[r];
        c0[r] = add ? GK_LOAD(c + GK_NR * r) : GK_ZERO();
        c1[r] = add ? GK_LOAD(c + GK_NR * r + GK_VL) : GK_ZERO();
    }
#define GK_STEP(k, A)                                                                                              \
    do {                                                                                                           \
        gk_v b0 = GK_LOAD(bp + GK_NR * (k)), b1 = GK_LOAD(bp + GK_NR * (k) + GK_VL);                               \
        GK_KEEP(b0);                                                                                               \
        GK_KEEP(b1);                                                                                               \
        for (int r = 0; r < R; r++) {                                                                              \
            const gk_v av = GK_SET1(A);                                                                            \
            c0[r] = GK_FMA(av, b0, c0[r]);                                                                         \
            c1[r] = GK_FMA(av, b1, c1[r]);                                                                         \
        }                                                                                                          \
    } while (0)
    if (pa) { /* 8 k at a time: each broadcast at a constant offset from the group's start */
        int64_t k = 0;
        for (; k + 8 <= kc; k += 8) {
            const float *pg = pa + k * R;
#if defined(V8)
#pragma GCC unroll 4
#else
#pragma GCC unroll 2
#endif
            for (int q = 0; q < 8; q++) GK_STEP(k + q, pg[8 * r + q]);
        }
        for (const float *pg = pa + k * R; k < kc; k++) GK_STEP(k, pg[8 * r + (k & 7)]);
    } else {
#if defined(V8)
#pragma GCC unroll 4
#else
#pragma GCC unroll 2
#endif
        for (int64_t k = 0; k < kc; k++) GK_STEP(k, ap[r][k]);
    }
#undef GK_STEP
    for (int r = 0; r < R; r++) {
        GK_STORE(c + GK_NR * r, c0[r]);
        GK_STORE(c + GK_NR * r + GK_VL, c1[r]);
    }
}

/* gk_tile_k for a run-time R: its rows through a, or packed at pa (not NULL) */
static void gk_tile(int R, const float *const *a, const float *pa, const float *bp, int64_t kc, float *c, int add) {
#define GK_CASE(r)                                                                                                 \
    case r:                                                                                                        \
        if (pa) add ? gk_tile_k(r, NULL, pa, bp, kc, c, 1) : gk_tile_k(r, NULL, pa, bp, kc, c, 0);                 \
        else add ? gk_tile_k(r, a, NULL, bp, kc, c, 1) : gk_tile_k(r, a, NULL, bp, kc, c, 0);                      \
        break;
    switch (R) {
        GK_CASE(1)
        GK_CASE(2)
        GK_CASE(3)
        GK_CASE(4)
        GK_CASE(5)
        GK_CASE(6)
#if GK_MR > 6
        GK_CASE(7)
        GK_CASE(8)
        GK_CASE(9)
        GK_CASE(10)
        GK_CASE(11)
        GK_CASE(12)
#endif
    }
#undef GK_CASE
}

struct gk_job;
typedef void (*gk_epilogue)(const struct gk_job *j, int64_t e, int64_t p, int64_t s, int64_t R, int64_t s_end,
                            int pk, const float *c, const float *prev, int next);

/* c[i][0..GK_NR] = sum_k a[i][k] * src[k][0..GK_NR] for the m float32 rows a[i] of length K, K in blocks of GK_KC
 * packed into bp, then epi(j, e, p, ...) on each tile's rows as the last block completes them, while their sums
 * are in L1 (c, [m][GK_NR], would not fit there whole). next: the caller's next panel (NULL: none), whose first
 * block (or this panel's next) is prefetched into L2 a share per tile while this block computes: the weights
 * stream from memory under the arithmetic. */
static void gk_panel(const float *const *a, const float *pa, int64_t m, const gk_src *src, const gk_src *next,
                     int dt, int64_t K, float *bp, float *c, const float *prev, gk_epilogue epi,
                     const struct gk_job *j, int64_t e, int64_t p, int64_t s0, int pk) {
    const size_t eb = esize(dt);
    const int64_t ntiles = (m + GK_MR - 1) / GK_MR;
    for (int64_t k0 = 0; k0 < K; k0 += GK_KC) {
        const int64_t kc = min64(GK_KC, K - k0);
        gk_pack_src(src, dt, k0, kc, bp); /* (float32 columns read in place at their row stride: 10-20% slower) */
        const gk_src *ps = k0 + GK_KC < K ? src : next;
        const int64_t pk0 = k0 + GK_KC < K ? k0 + GK_KC : 0, pkc = min64(GK_KC, K - pk0);
        /* lines to prefetch: NT, each of the GK_NR rows' run over the block; else the block's rows' GK_NR columns */
        const int64_t lpr = ((int64_t)(pkc * eb) + 63) / 64;
        const int64_t lines = !ps ? 0 : ps->nt ? GK_NR * lpr : pkc, per = (lines + ntiles - 1) / ntiles;
        int64_t pq = 0, pl = 0; /* prefetch cursor: NT, row of the panel and line of the row; else row over k */
        const float *ak[GK_MR];
        /* the ntiles tiles as equal as whole rows allow (the first m % ntiles of them one row more): a short last
         * tile of 1-3 rows has too few accumulators to hide the FMA latency and would take as long as a full one */
        const int64_t tb = m / ntiles, tx = m % ntiles;
        for (int64_t i = 0, ti = 0, R; i < m; i += R, ti++) {
            R = tb + (ti < tx);
            if (ps && ps->nt)
                for (int64_t n = 0; n < per && pq < GK_NR; n++) {
                    if (ps->row[pq]) _mm_prefetch((const char *)ps->row[pq] + (size_t)pk0 * eb + 64 * pl, _MM_HINT_T1);
                    if (++pl == lpr) pl = 0, pq++;
                }
            else if (ps)
                for (int64_t n = 0; n < per && pq < pkc; n++, pq++)
                    _mm_prefetch(ps->base + ((size_t)(pk0 + pq) * (size_t)ps->ld + (size_t)ps->n0) * eb, _MM_HINT_T1);
            if (!pa)
                for (int r = 0; r < R; r++) ak[r] = a[i + r] + k0;
            gk_tile((int)R, ak, pa ? pa + i * gk_k8(K) + k0 * R : NULL, bp, kc, c + GK_NR * i, k0 > 0);
            if (k0 + GK_KC >= K)
                epi(j, e, p, s0 + i, R, s0 + m, pk, c + GK_NR * i, prev ? prev + GK_NR * i : NULL, next != NULL);
        }
    }
}

/* Token rows per block of an expert's rows: ~1 MiB of float32, so that every panel reads them from L2. bf16 rows
 * are widened into such a block; float32 rows, read in place, are blocked alike on AVX-512 (Mixtral-like
 * experts of 2048 rows, forward: 0.88x the time of one block of all the rows; 256 KiB and 512 KiB blocks the
 * same within noise) and not on AVX2 (not measured there: its fp32 thresholds were set without blocks). */
#ifndef GK_ROWS_BYTES
#define GK_ROWS_BYTES (1 << 20)
#endif
/* AVX2 (GK_APACK): experts from this many rows run on packed token rows, in blocks of at most this many bytes of
 * them. Measured on Zen 3 (2 threads), against the rows read in place (same process, paired round-robin ratios;
 * this VM's speed drifts): forward fp32 at T = 8192 (fine-grained 1024 rows per expert 0.95-0.97x, Mixtral-like
 * 2048 rows 0.88-0.90x; the kernels alone at 1024 rows of Mixtral-like experts up 0.87x, down 0.92x); at 128-256
 * rows the same within noise, at 16-32 rows (packing and a barrier per expert) up to 1.1x slower, hence the
 * threshold. Blocks of 256 KiB (in L2) packed and re-read the weights too often: fine-grained 1.04x against 4 MiB,
 * Mixtral-like 2 MiB 1.02x. */
#ifndef GK_APACK_MIN_ROWS
#define GK_APACK_MIN_ROWS 256
#endif
#ifndef GK_APACK_BYTES
#define GK_APACK_BYTES (4 << 20)
#endif
static inline int64_t gk_rows_block(int64_t K, int dt) {
#if defined(V8) && !GK_APACK
    if (dt == DT_F32) return INT64_MAX / 2;
#endif
    const int64_t bytes = GK_APACK && dt == DT_F32 ? GK_APACK_BYTES : GK_ROWS_BYTES;
    int64_t rb = bytes / (4 * (K > 0 ? K : 1)) / GK_MR * GK_MR;
    return rb < 48 ? 48 : rb;
}

/* The activation handed over from the input projection's epilogue to the output projection (SwiGLU, float32, AVX2
 * builds, d_ff a multiple of 8): where a block of an expert's rows runs packed, the input projection writes its
 * activation already packed as the output projection's gk_apack would pack it (in the tile's own rows of a: each
 * panel's 8 columns of the tile's rows are one run of whole lines, rather than 8 columns of each of the tile's rows),
 * so the output projection packs nothing. Both projections then cut the experts' rows into the same blocks, the
 * smaller of their own. Measured on Zen 3 (2 threads), the kernels alone on fine-grained experts of 1024 rows:
 * output projection 0.91-0.95x, input projection 0.99-1.01x; the layer: see fused_function.HAND_OVER. */
static inline int gk_handover(int dt, int64_t F) { return GK_APACK && dt == DT_F32 && F % 8 == 0; }
static inline int64_t gk_handover_rows(int64_t D, int64_t F) {
    return min64(gk_rows_block(D, DT_F32), gk_rows_block(F, DT_F32));
}

/* The float32 rows s0 .. s0 + mb of src (row idx[s] where idx is given): pointers into src where it is float32,
 * else widened into buf. */
static void gk_rows(const void *src, int dt, int64_t ld_src, const int64_t *idx, int64_t s0, int64_t mb, int64_t K,
                    float *buf, const float **a) {
    for (int64_t i = 0; i < mb; i++) {
        const int64_t row = idx ? idx[s0 + i] : s0 + i;
        if (dt == DT_F32) {
            a[i] = (const float *)src + row * ld_src;
            continue;
        }
        const bf16 *p = (const bf16 *)src + row * ld_src;
        float *q = buf + i * K;
        int64_t k = 0;
        for (; k + GK_VL <= K; k += GK_VL) GK_STOREU(q + k, gk_ld(p + k, DT_BF16, GK_VL));
        for (; k < K; k++) q[k] = bf16_to_f32(p[k]);
        a[i] = q;
    }
}

#if GK_APACK
/* The tiles t0 .. t1 of the mb float32 rows a[i] (K long; tiles as gk_panel cuts them) packed 8 k at a time: each
 * tile of R rows starting at row i at pa + i gk_k8(K), pa[i gk_k8(K) + (k / 8) 8 R + 8 r + k % 8] = a[i + r][k] (a
 * tile's broadcasts then read one sequential stream instead of R rows scattered over the input, which every panel
 * reads again; the last 8 k padded with zeros). */
static void gk_apack(const float *const *a, int64_t mb, int64_t K, int64_t t0, int64_t t1, float *pa) {
    const int64_t ntiles = (mb + GK_MR - 1) / GK_MR, tb = mb / ntiles, tx = mb % ntiles, K8 = gk_k8(K);
    for (int64_t ti = t0; ti < t1; ti++) {
        const int64_t i = ti * tb + (ti < tx ? ti : tx);
        const int R = (int)(tb + (ti < tx));
        float *o = pa + i * K8;
        for (int64_t k = 0; k < K; k += 8, o += 8 * R)
            for (int r = 0; r < R; r++) _mm256_store_ps(o + 8 * r, gk_ld(a[i + r] + k, DT_F32, K - k));
    }
}
#endif

/* One packed-tile GEMM over every expert's rows: for each expert e, each block of its rows (a[i]: row a_idx[s] of A,
 * or row s, K long) and each of the thread's panels p (threads split the panels, as output columns: no two write
 * the same output element, and each token's sums run in expert order), c = rows x panel, then the kernel's
 * epilogue on c while it is in L1. */
typedef struct gk_job {
    const void *A;
    int adt;
    int64_t lda;
    const int64_t *a_idx;
    int bdt;                  /* the panels' dtype */
    int64_t K, width, np;     /* reduction length, output columns (for the thread count), panels */
    int64_t rb;               /* rows per block (0: gk_rows_block's) */
    int a_pk;                 /* float32 A already packed by tiles where a block is packed (gk_handover) */
    void (*source)(const struct gk_job *j, int64_t e, int64_t p, gk_src *src);                  /* panel p of e */
    gk_epilogue epilogue;     /* on rows s .. s + R of a block ending at s_end, their sums c ([R][GK_NR]); pk:
                               * the block's rows ran packed */
    const void *args;         /* the kernel's own arguments, for source and epilogue */
    int pair;                 /* the epilogue of panel p + 1 also sees panel p's sums (prev), where the thread ran
                               * panel p on the same block just before it (two buffers of sums, alternating) */
} gk_job;

static int gk_run(const gk_job *j, const int64_t *start, const int64_t *end, int64_t E, int nthreads) {
    const int64_t RB = j->rb ? j->rb : gk_rows_block(j->K, j->adt);
    int64_t na, mmax;
    const int64_t rows = expert_rows(start, end, E, &na, &mmax);
    if (j->np == 0 || rows == 0) return 0;
    const int64_t mb_max = mmax < RB ? mmax : RB + GK_MR; /* (blocks of equal size, rounded up to whole tiles) */
    int nt = threads_for(gemm_work(rows, na, j->width, j->K), nthreads);
    if (nt > j->np) nt = (int)j->np;
    int err = 0;
    /* float32 token rows packed by tiles (gk_apack), a block of rows at a time, every thread packing a share
     * of the block's tiles for all: two buffers, so one barrier per block keeps packing clear of reading (none
     * where they come packed: a_pk) */
    const int apack = GK_APACK && j->adt == DT_F32 && mmax >= GK_APACK_MIN_ROWS, pack_here = apack && !j->a_pk;
    const size_t pa_stride = ((size_t)(mb_max + GK_MR) * (size_t)gk_k8(j->K) + 16) / 16 * 16;
    float *pa_buf = pack_here ? aligned_alloc(64, 2 * pa_stride * sizeof(float)) : NULL;
    if (pack_here && !pa_buf) return -5;
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t p0 = j->np * t / n, p1 = j->np * (t + 1) / n;
        int64_t blk = 0;
        /* the packed block, the panel's results for a block of rows, widened token rows, row pointers */
        float *bp = aligned_alloc(64, (size_t)GK_KC * GK_NR * sizeof(float));
        const size_t cn = (size_t)(mb_max + GK_MR) * GK_NR; /* floats of sums per panel */
        float *c = aligned_alloc(64, (j->pair ? 2 : 1) * cn * sizeof(float));
        float *buf = j->adt == DT_F32 ? NULL : malloc((size_t)mb_max * (size_t)j->K * sizeof(float) + 64);
        const float **a = malloc((size_t)(mb_max + 1) * sizeof(float *));
        if (!bp || !c || !a || (j->adt != DT_F32 && !buf)) {
#pragma omp atomic write
            err = -5;
        }
        if (pack_here) { /* (every thread then sees any failure: none may be left waiting at a packing barrier) */
#pragma omp barrier
        }
        int failed;
#pragma omp atomic read
        failed = err;
        if (!failed)
            for (int64_t e = 0; e < E && p0 < p1; e++) {
                /* the expert's rows in blocks of at most RB, as equal as whole tiles allow (a short last block
                 * would pack every panel again for a few rows) */
                const int64_t m = end[e] - start[e], nb = (m + RB - 1) / RB;
                const int64_t rb = m <= RB ? m : ((m + nb - 1) / nb + GK_MR - 1) / GK_MR * GK_MR;
                for (int64_t s0 = start[e]; s0 < end[e]; s0 += rb) {
                    const int64_t mb = min64(rb, end[e] - s0);
                    gk_rows(j->A, j->adt, j->lda, j->a_idx, s0, mb, j->K, buf, a);
                    const int pk = apack && mb >= GK_APACK_MIN_ROWS;
                    float *pa = !pk ? NULL : j->a_pk ? (float *)j->A + s0 * j->K
                                                     : pa_buf + (size_t)(blk++ & 1) * pa_stride;
#if GK_APACK
                    if (pk && !j->a_pk) {
                        const int64_t ntl = (mb + GK_MR - 1) / GK_MR;
                        gk_apack(a, mb, j->K, ntl * t / n, ntl * (t + 1) / n, pa);
#pragma omp barrier
                    }
#endif
                    gk_src src[2];
                    j->source(j, e, p0, &src[p0 & 1]);
                    for (int64_t p = p0; p < p1; p++) {
                        if (p + 1 < p1) j->source(j, e, p + 1, &src[(p + 1) & 1]);
                        const size_t cur = j->pair ? (size_t)(p & 1) * cn : 0, before = cn - cur;
                        gk_panel(a, pa, mb, &src[p & 1], p + 1 < p1 ? &src[(p + 1) & 1] : NULL, j->bdt, j->K, bp,
                                 c + cur, j->pair && p > p0 ? c + before : NULL, j->epilogue, j, e, p, s0,
                                 pa != NULL);
                    }
                }
            }
#if defined(V8)
        if (j->pair) _mm_sfence(); /* order this thread's streaming stores (up_epilogue) before the join */
#endif
        free(bp), free(c), free(buf), free(a);
    }
    free(pa_buf);
    return err;
}

/* The input projection (moe_small_up's contract): panel p is activation columns j0 = GK_VL p .. GK_VL (p + 1) for
 * SwiGLU (its GK_VL gate rows of w_in[e], then their GK_VL up rows), else output columns GK_NR p .. GK_NR (p + 1). */
typedef struct {
    const void *w_in, *b_in;
    int64_t W, F, PW;
    int act;
    void *h_out, *a_out;
    int a_pk; /* a handed over packed (gk_handover) */
} gk_up_args;

static void up_source(const gk_job *j, int64_t e, int64_t p, gk_src *src) {
    const gk_up_args *u = j->args;
    const size_t rowb = (size_t)j->K * esize(j->bdt);
    const char *we = (const char *)u->w_in + (size_t)e * (size_t)u->W * rowb;
    const int64_t j0 = p * u->PW, jw = min64(u->PW, u->F - j0);
    src->nt = 1;
    for (int q = 0; q < GK_NR; q++) {
        const int64_t i = q < u->PW ? q : q - u->PW;
        src->row[q] = i < jw ? we + (size_t)(j0 + i + (q < u->PW ? 0 : u->F)) * rowb : NULL;
    }
}

#ifndef UP_PAIR
#define UP_PAIR 1
#endif
/* bias, keep h, SwiGLU: a as rows, or (handed over, the block packed) as gk_apack packs it. Where the panels pair
 * (gk_job.pair: SwiGLU, float32, d_ff a multiple of 16), an even panel whose odd partner this thread runs next
 * writes nothing, and the partner writes both panels' rows: 16 columns of h's gate half and 16 of its up half, each
 * one whole 64-byte line with streaming stores (no read for ownership of lines that backward reads much later), and
 * 16 columns of a as one line too (plain stores: the output projection reads a next). One panel alone writes half
 * lines, each read from memory first and completed only when the next panel's tiles come round. */
static inline __attribute__((always_inline)) void up_bias(const gk_up_args *u, int dt, int64_t e, int64_t j0,
                                                         int64_t jw, float *bias) {
    for (int64_t i = 0; i < GK_NR; i++) bias[i] = 0.0f;
    if (u->b_in)
        for (int64_t i = 0; i < jw; i++) {
            bias[i] = ld(u->b_in, dt, e * u->W + j0 + i);
            if (u->act == 1) bias[u->PW + i] = ld(u->b_in, dt, e * u->W + u->F + j0 + i);
        }
}

static void up_epilogue(const gk_job *j, int64_t e, int64_t p, int64_t s0, int64_t mb, int64_t s_end, int pk,
                        const float *c, const float *prev, int next) {
    const gk_up_args *u = j->args;
    (void)s_end;
    const int to_pk = GK_APACK && pk && u->a_pk; /* (then jw = GK_VL = 8: gk_handover) */
    const int dt = j->bdt;
    const int64_t W = u->W, F = u->F, PW = u->PW, j0 = p * PW, jw = min64(PW, F - j0);
    float bias[GK_NR] __attribute__((aligned(64)));
    up_bias(u, dt, e, j0, jw, bias);
    const gk_v b0 = GK_LOAD(bias), b1 = GK_LOAD(bias + GK_VL);
#if defined(V8)
    if (j->pair && !(p & 1) && next) return; /* written with panel p + 1's */
    if (j->pair && (p & 1) && prev) {
        float pbias[GK_NR] __attribute__((aligned(64)));
        const int64_t jp = j0 - PW; /* the even panel's columns: jp .. jp + 16 are one line of each row */
        up_bias(u, dt, e, jp, PW, pbias);
        const gk_v pb0 = GK_LOAD(pbias), pb1 = GK_LOAD(pbias + GK_VL);
        for (int64_t i = 0; i < mb; i++) {
            const float *r0 = prev + GK_NR * i, *r1 = c + GK_NR * i;
            const gk_v g0 = GK_ADD(GK_LOAD(r0), pb0), u0 = GK_ADD(GK_LOAD(r0 + GK_VL), pb1);
            const gk_v g1 = GK_ADD(GK_LOAD(r1), b0), u1 = GK_ADD(GK_LOAD(r1 + GK_VL), b1);
            if (u->h_out) {
                float *hg = (float *)u->h_out + (s0 + i) * W + jp;
                _mm256_stream_ps(hg, g0), _mm256_stream_ps(hg + GK_VL, g1);
                _mm256_stream_ps(hg + F, u0), _mm256_stream_ps(hg + F + GK_VL, u1);
            }
            const gk_v a0 = swiglu8(g0, u0), a1 = swiglu8(g1, u1);
            if (to_pk) { /* each panel's 8 columns where gk_apack puts them */
                GK_STOREU((float *)u->a_out + s0 * F + jp * mb + 8 * i, a0);
                GK_STOREU((float *)u->a_out + s0 * F + j0 * mb + 8 * i, a1);
            } else {
                float *ar = (float *)u->a_out + (s0 + i) * F + jp;
                GK_STOREU(ar, a0), GK_STOREU(ar + GK_VL, a1);
            }
        }
        return;
    }
#else
    (void)prev, (void)next;
#endif
    for (int64_t i = 0; i < mb; i++) {
        const float *r = c + GK_NR * i;
        const gk_v g = GK_ADD(GK_LOAD(r), b0), g2 = GK_ADD(GK_LOAD(r + GK_VL), b1); /* g2: up (SwiGLU) */
        if (u->h_out) {
            gk_st(at(u->h_out, dt, W, s0 + i, j0), dt, g, jw);
            if (u->act == 1) gk_st(at(u->h_out, dt, W, s0 + i, F + j0), dt, g2, jw);
            else if (jw > GK_VL) gk_st(at(u->h_out, dt, W, s0 + i, j0 + GK_VL), dt, g2, jw - GK_VL);
        }
        if (u->act != 1) continue;
        const gk_v av = GK_MUL(GK_MUL(g, GK_SIGMOID(g)), g2);
        if (to_pk) /* the tile's row i, columns j0 .. j0 + 8, where gk_apack puts them */
            GK_STOREU((float *)u->a_out + s0 * F + j0 * mb + 8 * i, av);
        else
            gk_st(at(u->a_out, dt, F, s0 + i, j0), dt, av, jw);
    }
}

static int packed_up(const void *x, int64_t ld_x, const int64_t *tok, const int64_t *start, const int64_t *end,
                     int64_t E, const void *w_in, const void *b_in, int64_t W, int64_t D, int dt, int act, void *h_out,
                     void *a_out, int a_pk, int nthreads) {
    const int64_t F = act == 1 ? W / 2 : W, PW = act == 1 ? GK_VL : GK_NR; /* output (activation) columns per panel */
    a_pk = a_pk && gk_handover(dt, F);
#if defined(V8)
    const int pair = UP_PAIR && dt == DT_F32 && act == 1 && F % 16 == 0 && ((uintptr_t)h_out & 63) == 0;
#else
    const int pair = 0;
#endif
    const gk_up_args u = {w_in, b_in, W, F, PW, act, h_out, a_out, a_pk};
    const gk_job j = {x, dt, ld_x, tok, dt, D, W, (F + PW - 1) / PW, a_pk ? gk_handover_rows(D, F) : 0, 0,
                      up_source, up_epilogue, &u, pair};
    return gk_run(&j, start, end, E, nthreads);
}

/* The output projection and weighted combine (moe_small_down's contract): panel p is output columns GK_NR p ..
 * GK_NR (p + 1) (GK_NR rows of w_out[e]), added with the slot's weight into out at the slot's token. */
typedef struct {
    const void *w_out, *b_out;
    int64_t D;
    const int64_t *tok;
    const float *w;
    float *out;
    int64_t ld_out;
} gk_down_args;

static void down_source(const gk_job *j, int64_t e, int64_t p, gk_src *src) {
    const gk_down_args *d = j->args;
    const size_t rowb = (size_t)j->K * esize(j->bdt);
    const char *we = (const char *)d->w_out + (size_t)e * (size_t)d->D * rowb;
    const int64_t d0 = p * GK_NR, n = min64(GK_NR, d->D - d0);
    src->nt = 1;
    for (int q = 0; q < GK_NR; q++) src->row[q] = q < n ? we + (size_t)(d0 + q) * rowb : NULL;
}

static void down_epilogue(const gk_job *j, int64_t e, int64_t p, int64_t s0, int64_t mb, int64_t s_end, int pk,
                          const float *c, const float *prev, int next) {
    const gk_down_args *d = j->args;
    (void)pk, (void)prev, (void)next;
    const int64_t d0 = p * GK_NR, dw = min64(GK_NR, d->D - d0);
    float bias[GK_NR] __attribute__((aligned(64))) = {0.0f};
    if (d->b_out)
        for (int64_t q = 0; q < dw; q++) bias[q] = ld(d->b_out, j->bdt, e * d->D + d0 + q);
    const gk_v b0 = GK_LOAD(bias), b1 = GK_LOAD(bias + GK_VL);
    for (int64_t i = 0; i < mb; i++) {
        const int64_t s = s0 + i;
        float *o = d->out + d->tok[s] * d->ld_out + d0;
        const float *r = c + GK_NR * i;
        if (GK_OUT_PF && s + GK_OUT_PF < s_end) /* the output rows are scattered: fetch them a few rows ahead */
            gk_prefetch_out(d->out + d->tok[s + GK_OUT_PF] * d->ld_out + d0);
        const gk_v ws = GK_SET1(d->w[s]);
        if (dw == GK_NR) {
            GK_STOREU(o, GK_FMA(ws, GK_ADD(GK_LOAD(r), b0), GK_LOADU(o)));
            GK_STOREU(o + GK_VL, GK_FMA(ws, GK_ADD(GK_LOAD(r + GK_VL), b1), GK_LOADU(o + GK_VL)));
        } else
            for (int64_t q = 0; q < dw; q++) o[q] += d->w[s] * (r[q] + bias[q]);
    }
}

static int packed_down(const void *a_in, int64_t ld_a, int a_pk, const int64_t *tok, const float *w,
                       const int64_t *start, const int64_t *end, int64_t E, const void *w_out, const void *b_out,
                       int64_t D, int64_t F, int dt, float *out, int64_t ld_out, int nthreads) {
    const gk_down_args d = {w_out, b_out, D, tok, w, out, ld_out};
    a_pk = a_pk && gk_handover(dt, F);
    const gk_job j = {a_in, dt, ld_a, NULL, dt, F, D, (D + GK_NR - 1) / GK_NR, a_pk ? gk_handover_rows(D, F) : 0,
                      a_pk, down_source, down_epilogue, &d};
    return gk_run(&j, start, end, E, nthreads);
}

/* The data gradients (moe_small_nn's contract): panel p is columns GK_NR p .. GK_NR (p + 1) of w[e] ([Kd, N],
 * copied a block of rows at a time), written to C[s] or accumulated into float32 C[c_idx[s]]. */
typedef struct {
    const void *B;
    int64_t N;
    void *C;
    int cdt;
    int64_t ldc;
    const int64_t *c_idx;
} gk_nn_args;

static void nn_source(const gk_job *j, int64_t e, int64_t p, gk_src *src) {
    const gk_nn_args *m = j->args;
    src->nt = 0;
    src->base = (const char *)m->B + (size_t)e * (size_t)j->K * (size_t)m->N * esize(j->bdt);
    src->ld = m->N, src->n0 = p * GK_NR, src->nw = min64(GK_NR, m->N - src->n0);
}

static void nn_epilogue(const gk_job *j, int64_t e, int64_t p, int64_t s0, int64_t mb, int64_t s_end, int pk,
                        const float *c, const float *prev, int next) {
    const gk_nn_args *m = j->args;
    const int64_t n0 = p * GK_NR, nw = min64(GK_NR, m->N - n0);
    (void)e, (void)pk, (void)prev, (void)next;
    for (int64_t i = 0; i < mb; i++) {
        const float *r = c + GK_NR * i;
        if (m->c_idx) {
            float *o = (float *)m->C + m->c_idx[s0 + i] * m->ldc + n0;
            if (GK_OUT_PF && s0 + i + GK_OUT_PF < s_end) /* scattered rows, as the output projection's */
                gk_prefetch_out((float *)m->C + m->c_idx[s0 + i + GK_OUT_PF] * m->ldc + n0);
            if (nw == GK_NR) {
                GK_STOREU(o, GK_ADD(GK_LOADU(o), GK_LOAD(r)));
                GK_STOREU(o + GK_VL, GK_ADD(GK_LOADU(o + GK_VL), GK_LOAD(r + GK_VL)));
            } else
                for (int64_t q = 0; q < nw; q++) o[q] += r[q];
        } else {
            gk_st(at(m->C, m->cdt, m->ldc, s0 + i, n0), m->cdt, GK_LOAD(r), nw);
            if (nw > GK_VL) gk_st(at(m->C, m->cdt, m->ldc, s0 + i, n0 + GK_VL), m->cdt, GK_LOAD(r + GK_VL), nw - GK_VL);
        }
    }
}

static int packed_nn(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *Bw, int bdt, int64_t Kd,
                     int64_t N, const int64_t *start, const int64_t *end, int64_t E, void *C, int cdt, int64_t ldc,
                     const int64_t *c_idx, int nthreads) {
    const gk_nn_args m = {Bw, N, C, cdt, ldc, c_idx};
    const gk_job j = {A, adt, lda, a_idx, bdt, Kd, N, (N + GK_NR - 1) / GK_NR, 0, 0, nn_source, nn_epilogue, &m};
    return gk_run(&j, start, end, E, nthreads);
}

#if defined(V8)
/* ---------------------------------------------------------------------------------------------------------------
 * Swapped tiles (AVX2, float32): the input projection of experts of SW_MIN_ROWS to SW_MAX_ROWS rows, with the
 * roles of the packed tiles swapped, so that the weights need no packing. A tile is SW_MR (6) weight rows, each
 * value broadcast from the row as it lies in memory (six sequential streams, which the hardware prefetcher follows),
 * times a group of 16 token rows (two vectors), transposed once per expert into [k][16] (sw_pack), k over the whole
 * reduction: 12 accumulators, as the packed tiles'. With ~32 rows per expert the packed tiles transposed every
 * 16 x 256 block of weights for 5-6 tiles of rows (11% of the input projection's time where the weights are in
 * cache, 17% from memory); these read them once per group of 16 rows, in place. Each output element's sum runs over
 * k in order in one accumulator, as in the packed tiles, and the epilogue is theirs: the same bits. Threads split
 * the tiles; each expert's transposed rows are packed by all threads, a share of k each, into one of two buffers
 * (one barrier per expert). Measured on Zen 3 (2 threads, paired round-robin), against the packed tiles: Mixtral-
 * like experts (d_model 512, 2 x 1408 rows) of 32 rows, the kernel alone 0.74x with the weights in cache (145
 * against 105 GFLOP/s), 0.77x from memory; with a router's rows per expert, 28-38 rows 0.95x (the layer's fp32
 * T = 128 forward 0.95x, forward+backward 0.96x), 57-77 rows 0.97x, 114-142 rows 0.99x (hence SW_MAX_ROWS);
 * fine-grained experts (512 x 2 x 256) of 9-31 and 21-47 rows 1.00x. Not kept: the output projection on them
 * (its tile of 6 output columns adds into 16 tokens' rows one value at a time, and each expert's activation rows
 * must be transposed: fine-grained, where d_ff is 256, 1.08-1.13x; Mixtral-like 0.99x), and experts of 8-23 rows
 * (fine-grained, against the dot-product tiles, 1.03-1.07x: a barrier and a transposition per expert of ~50 us).
 * --------------------------------------------------------------------------------------------------------------- */
#define SW_MR 6

/* acc[i][v] = sum_k wr[i][k] * xt[k][8 v .. 8 v + 8] for i < MR, v < NV (compile-time constants at each call): a
 * tile's MR weight rows times NV vectors of token rows (xt, [k][8 NV]). nwr (not NULL):
 * the nmr weight rows of the thread's next tile, fetched into L1 a line of each every 16 k, so that they arrive
 * over this tile's arithmetic (the hardware prefetcher, following the rows as they are read, left the tiles waiting
 * on memory: Zen 3, 2 threads, paired runs, Mixtral-like experts of 24-96 rows 0.90x, 0.89-0.95x at 32, 0.98x at
 * 64, 0.99x at 96, fine-grained at 32 0.93x; the layer's fp32 forward at T = 128 0.95x, forward+backward 0.97x;
 * into L2 instead 0.94-0.98x; the next expert's first tile too, the same). */
static inline __attribute__((always_inline)) void sw_tile_k(const int MR, const int NV, const float *const *wr,
                                                            const float *__restrict xt, int64_t K,
                                                            __m256 acc[SW_MR][2], const float *const *nwr, int nmr) {
    /* (named accumulators: as arrays, GCC kept them in memory across the loop) */
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
    const float *__restrict w0 = wr[0], *__restrict w1 = wr[1 % MR], *__restrict w2 = wr[2 % MR],
                            *__restrict w3 = wr[3 % MR], *__restrict w4 = wr[4 % MR], *__restrict w5 = wr[5 % MR];
#define SW_STEP(k)                                                                                                 \
    {                                                                                                              \
        __m256 x0 = _mm256_load_ps(xt + (k) * 8 * NV), x1 = NV > 1 ? _mm256_load_ps(xt + (k) * 8 * NV + 8) : x0;  \
        KEEP_IN_REG(x0);                                                                                           \
        if (NV > 1) KEEP_IN_REG(x1);                                                                               \
        SW_ROW(0, k) SW_ROW(1, k) SW_ROW(2, k) SW_ROW(3, k) SW_ROW(4, k) SW_ROW(5, k)                              \
    }
#define SW_ROW(i, k)                                                                                               \
    if (MR > i) {                                                                                                  \
        const __m256 wv = _mm256_broadcast_ss(w##i + (k));                                                         \
        a##i = _mm256_fmadd_ps(wv, x0, a##i);                                                                      \
        if (NV > 1) b##i = _mm256_fmadd_ps(wv, x1, b##i);                                                          \
    }
    int64_t k = 0;
    if (nwr)
        for (; k + 16 <= K; k += 16) {
            for (int i = 0; i < nmr; i++) _mm_prefetch((const char *)(nwr[i] + k), _MM_HINT_T0);
#pragma GCC unroll 4
            for (int64_t kk = k; kk < k + 16; kk++) SW_STEP(kk)
        }
#pragma GCC unroll 4
    for (; k < K; k++) SW_STEP(k)
#undef SW_ROW
#undef SW_STEP
    acc[0][0] = a0, acc[1][0] = a1, acc[2][0] = a2, acc[3][0] = a3, acc[4][0] = a4, acc[5][0] = a5;
    acc[0][1] = b0, acc[1][1] = b1, acc[2][1] = b2, acc[3][1] = b3, acc[4][1] = b4, acc[5][1] = b5;
}

static void sw_tile(int MR, int NV, const float *const *wr, const float *xt, int64_t K, __m256 acc[SW_MR][2],
                    const float *const *nwr, int nmr) {
#define SW_CASE(r)                                                                                                 \
    case r:                                                                                                        \
        NV == 2 ? sw_tile_k(r, 2, wr, xt, K, acc, nwr, nmr) : sw_tile_k(r, 1, wr, xt, K, acc, nwr, nmr);           \
        break;
    switch (MR) {
        SW_CASE(1)
        SW_CASE(2)
        SW_CASE(3)
        SW_CASE(4)
        SW_CASE(5)
        SW_CASE(6)
    }
#undef SW_CASE
}

/* The m token rows of an expert (row s0 + i: A[idx[s0 + i]], or A[s0 + i] without idx), k in [k0, k1), into
 * groups of 16 rows: group g at xt + 16 g K as [k][16] (the last group, of 8 or fewer rows, [k][8]; zeros past m) */
static void sw_pack(const float *A, int64_t lda, const int64_t *idx, int64_t s0, int64_t m, int64_t K, int64_t k0,
                    int64_t k1, float *xt) {
    for (int64_t g0 = 0; g0 < m; g0 += 16) {
        const int w = m - g0 > 8 ? 16 : 8;
        const float *r[16];
        for (int t = 0; t < w; t++) r[t] = g0 + t < m ? A + (idx ? idx[s0 + g0 + t] : s0 + g0 + t) * lda : NULL;
        float *o = xt + g0 * K;
        int64_t k = k0;
        if (w == 16 && g0 + 16 <= m) /* 8 x 8 transposes */
            for (; k + 8 <= k1; k += 8)
                for (int h = 0; h < 2; h++) {
                    __m256 v[8];
                    for (int t = 0; t < 8; t++) v[t] = _mm256_loadu_ps(r[8 * h + t] + k);
                    tr8x8(v);
                    for (int q = 0; q < 8; q++) _mm256_store_ps(o + (k + q) * 16 + 8 * h, v[q]);
                }
        for (; k < k1; k++)
            for (int t = 0; t < w; t++) o[k * w + t] = r[t] ? r[t][k] : 0.0f;
    }
}

struct sw_job;
/* tile q of expert e: its weight rows (wr[i], i < *mr) */
typedef void (*sw_rows_fn)(const struct sw_job *j, int64_t e, int64_t q, const float **wr, int *mr);
/* the sums of tile q of expert e (acc[i][v], lane l: row i, token row s + 8 v + l) for token rows s .. s + n */
typedef void (*sw_epi_fn)(const struct sw_job *j, int64_t e, int64_t q, int mr, int64_t s, int64_t n,
                          __m256 acc[SW_MR][2]);
typedef struct sw_job {
    const float *A;
    int64_t lda;
    const int64_t *a_idx;
    int64_t K, width, nq; /* reduction, output columns (for the thread count), tiles per expert */
    sw_rows_fn rows;
    sw_epi_fn epilogue;
    const void *args;
} sw_job;

static int sw_run(const sw_job *j, const int64_t *start, const int64_t *end, int64_t E, int nthreads) {
    int64_t na, mmax;
    const int64_t rows = expert_rows(start, end, E, &na, &mmax);
    if (rows == 0 || j->nq == 0) return 0;
    int nt = threads_for(gemm_work(rows, na, j->width, j->K), nthreads);
    if (nt > j->nq) nt = (int)j->nq;
    const size_t stride = (size_t)((mmax + 15) / 16 * 16) * (size_t)j->K;
    float *buf = aligned_alloc(64, (2 * stride + 16) * sizeof(float));
    if (!buf) return -5;
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t q0 = j->nq * t / n, q1 = j->nq * (t + 1) / n, k0 = j->K * t / n, k1 = j->K * (t + 1) / n;
        int64_t blk = 0;
        for (int64_t e = 0; e < E; e++) {
            const int64_t m = end[e] - start[e], s0 = start[e];
            if (m <= 0) continue;
            float *xt = buf + (size_t)(blk++ & 1) * stride;
            sw_pack(j->A, j->lda, j->a_idx, s0, m, j->K, k0, k1, xt);
#pragma omp barrier
            /* the weight rows of tile q in wr[q & 1], those of the next (fetched over tile q's first group of token
             * rows) in the other */
            const float *wr[2][SW_MR];
            int mr[2] = {0, 0};
            if (q0 < q1) j->rows(j, e, q0, wr[q0 & 1], &mr[q0 & 1]);
            for (int64_t q = q0; q < q1; q++) {
                const int cur = (int)(q & 1), nxt = cur ^ 1;
                mr[nxt] = 0;
                if (q + 1 < q1) j->rows(j, e, q + 1, wr[nxt], &mr[nxt]);
                for (int64_t g0 = 0; g0 < m; g0 += 16) {
                    const int64_t ng = min64(16, m - g0);
                    __m256 acc[SW_MR][2];
                    sw_tile(mr[cur], m - g0 > 8 ? 2 : 1, wr[cur], xt + g0 * j->K, j->K, acc,
                            g0 == 0 && mr[nxt] ? wr[nxt] : NULL, mr[nxt]);
                    j->epilogue(j, e, q, mr[cur], s0 + g0, ng, acc);
                }
            }
        }
    }
    free(buf);
    return 0;
}

/* The input projection (moe_small_up's contract, float32): SwiGLU, tile q is activation columns 3 q .. 3 q + 3
 * (their gate rows, then their up rows); else output columns 6 q .. 6 q + 6. */
static void sw_up_rows(const sw_job *j, int64_t e, int64_t q, const float **wr, int *mr) {
    const gk_up_args *u = j->args;
    const float *we = (const float *)u->w_in + e * u->W * j->K;
    if (u->act == 1) {
        const int64_t f0 = 3 * q, nf = min64(3, u->F - f0);
        for (int64_t i = 0; i < nf; i++) wr[i] = we + (f0 + i) * j->K, wr[nf + i] = we + (u->F + f0 + i) * j->K;
        *mr = (int)(2 * nf);
    } else {
        const int64_t c0 = SW_MR * q, nc = min64(SW_MR, u->W - c0);
        for (int64_t i = 0; i < nc; i++) wr[i] = we + (c0 + i) * j->K;
        *mr = (int)nc;
    }
}

static void sw_up_epilogue(const sw_job *j, int64_t e, int64_t q, int mr, int64_t s, int64_t n,
                           __m256 acc[SW_MR][2]) {
    const gk_up_args *u = j->args;
    const float *b = u->b_in ? (const float *)u->b_in + e * u->W : NULL;
    float *h = u->h_out, *a = u->a_out;
    float hv[SW_MR][16] __attribute__((aligned(32))), av[3][16] __attribute__((aligned(32)));
    const int nv = n > 8 ? 2 : 1;
    if (u->act == 1) {
        const int nf = mr / 2;
        const int64_t f0 = 3 * q;
        for (int i = 0; i < nf; i++)
            for (int v = 0; v < nv; v++) { /* (as up_epilogue: bias, then silu(gate) * up) */
                const __m256 g = _mm256_add_ps(acc[i][v], _mm256_set1_ps(b ? b[f0 + i] : 0.0f));
                const __m256 g2 = _mm256_add_ps(acc[nf + i][v], _mm256_set1_ps(b ? b[u->F + f0 + i] : 0.0f));
                _mm256_store_ps(hv[i] + 8 * v, g);
                _mm256_store_ps(hv[nf + i] + 8 * v, g2);
                _mm256_store_ps(av[i] + 8 * v, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), g2));
            }
        for (int64_t r = 0; r < n; r++) {
            float *ar = a + (s + r) * u->F + f0;
            for (int i = 0; i < nf; i++) ar[i] = av[i][r];
            if (h)
                for (int i = 0; i < nf; i++) h[(s + r) * u->W + f0 + i] = hv[i][r], h[(s + r) * u->W + u->F + f0 + i] = hv[nf + i][r];
        }
    } else {
        const int64_t c0 = SW_MR * q;
        for (int i = 0; i < mr; i++)
            for (int v = 0; v < nv; v++)
                _mm256_store_ps(hv[i] + 8 * v, _mm256_add_ps(acc[i][v], _mm256_set1_ps(b ? b[c0 + i] : 0.0f)));
        for (int64_t r = 0; r < n; r++)
            for (int i = 0; i < mr; i++) h[(s + r) * u->W + c0 + i] = hv[i][r];
    }
}

static int sw_up(const float *x, int64_t ld_x, const int64_t *tok, const int64_t *start, const int64_t *end,
                 int64_t E, const float *w_in, const float *b_in, int64_t W, int64_t D, int act, float *h_out,
                 float *a_out, int nthreads) {
    const int64_t F = act == 1 ? W / 2 : W;
    const gk_up_args u = {w_in, b_in, W, F, 0, act, h_out, a_out, 0};
    const sw_job j = {x, ld_x, tok, D, W, act == 1 ? (F + 2) / 3 : (W + SW_MR - 1) / SW_MR, sw_up_rows,
                      sw_up_epilogue, &u};
    return sw_run(&j, start, end, E, nthreads);
}

#endif

/* Whether the packed tiles serve operands of this dtype: AVX2 builds both; AVX-512 builds float32 (bf16 has the
 * pair dot product, vdpbf16ps, in the dot-product tiles, or AMX). */
static inline int gk_serves(int dt) {
#if defined(V8)
    (void)dt;
    return 1;
#else
    return dt == DT_F32;
#endif
}
#endif

/* ================================================================================================================
 * AMX (Intel Advanced Matrix Extensions, Sapphire Rapids and later): bfloat16 input and output projections.
 *
 * One TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 fp32 sums: 16 times the work of a
 * vdpbf16ps for about 16 cycles, several times the arithmetic rate of the AVX-512 tiles above. The second operand
 * must be in "VNNI" order (rows of k-pairs: [k/2][n][2]), which the weights' [N, K] layout is not, so the roles are
 * swapped: the weights are the first operand, loaded as they lie (16 weight rows x 32 elements of K, no copy), and
 * the token rows the second, packed once per call into [16 k-pairs][16 rows][2] blocks (a 16 x 16 transpose of
 * 32-bit pairs, with zero rows padding each expert to a multiple of 16). Each tile of sums is then [weight row,
 * token row]; the epilogue transposes it in registers and runs as the AVX-512 kernels' does (bias, SwiGLU, keep h;
 * or the weighted scatter-add, each thread owning columns of the output), so results match theirs to the order of
 * the fp32 sums. Needs K and the activation width to be multiples of 32 (the weights are read 32 columns at a time,
 * no masking) and Linux's permission to use the tile registers (asked once per process); else the AVX-512 kernels.
 * ================================================================================================================ */
#if defined(MOE_AMX)
#include <sys/syscall.h>
long syscall(long number, ...); /* (unistd.h declares it only with _DEFAULT_SOURCE) */

static int amx_state; /* 0: not asked yet, 1: granted, -1: refused */
static int amx_on = 1;  /* moe_amx(0) turns the tiles off */
static int amx_ready(void) {
    if (amx_state == 0) /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: the whole process may then use the tiles */
        amx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return amx_on && amx_state > 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_cfg;

/* Every tile 16 rows x 64 bytes: tmm0-3 sums, tmm4-5 weight rows, tmm6-7 packed token rows. Per thread. */
static inline void amx_config(void) {
    amx_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
}

/* In-register transpose of a 16 x 16 matrix of 32-bit elements (r[i] = row i). */
static inline __attribute__((always_inline)) void tr16x16(__m512i *r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* Pack up to 16 rows (row i at src + idx[s0 + i] * ld, or s0 + i without idx) of K bf16 into K / 32 VNNI blocks of
 * 1 KiB at dst: block kb, row p, pair i = row i's elements (32 kb + 2 p, 32 kb + 2 p + 1). Missing rows are zero. */
static void amx_pack16(const bf16 *src, int64_t ld, const int64_t *idx, int64_t s0, int64_t n, int64_t K, bf16 *dst) {
    const bf16 *row[16];
    for (int i = 0; i < 16; i++) row[i] = i < n ? src + (size_t)(idx ? idx[s0 + i] : s0 + i) * (size_t)ld : NULL;
    for (int64_t kb = 0; kb < K / 32; kb++) {
        __m512i r[16];
        for (int i = 0; i < 16; i++) r[i] = row[i] ? _mm512_loadu_si512(row[i] + 32 * kb) : _mm512_setzero_si512();
        tr16x16(r);
        for (int p = 0; p < 16; p++) _mm512_store_si512(dst + (size_t)kb * 512 + (size_t)p * 32, r[p]);
    }
}

/* Pack row blocks r0 .. r1 of an expert whose sorted rows are start_e .. end_e (row s at src + idx[s] * ld, or s
 * without idx) into dst, block b - r0 at dst + (b - r0) * K * 16: one run of the projections' packed token rows. */
static void amx_pack_run(const bf16 *src, int64_t ld, const int64_t *idx, int64_t start_e, int64_t end_e,
                         int64_t r0, int64_t r1, int64_t K, bf16 *dst) {
    for (int64_t b = r0; b < r1; b++) {
        const int64_t s0 = start_e + 16 * b;
        amx_pack16(src, ld, idx, s0, min64(16, end_e - s0), K, dst + (size_t)(b - r0) * (size_t)K * 16);
    }
}

/* The first 16-row block of each expert's packed rows, [E + 1] (blk[E]: all blocks); NULL if out of memory. */
static int64_t *amx_blocks(const int64_t *start, const int64_t *end, int64_t E) {
    int64_t *blk = malloc((size_t)(E + 1) * sizeof(int64_t));
    if (!blk) return NULL;
    int64_t nb = 0;
    for (int64_t e = 0; e < E; e++) {
        blk[e] = nb;
        nb += end[e] > start[e] ? (end[e] - start[e] + 15) / 16 : 0;
    }
    blk[E] = nb;
    return blk;
}

/* c (16 weight rows x 16 token rows, fp32) plus a per-weight-row bias -> t[token row] = 16 weight rows' values. */
static inline __attribute__((always_inline)) void amx_rows(const float *c, const bf16 *bias, __m512 *t) {
    __m512i r[16];
    for (int i = 0; i < 16; i++) {
        __m512 v = _mm512_load_ps(c + 16 * i);
        if (bias) v = _mm512_add_ps(v, _mm512_set1_ps(bf16_to_f32(bias[i])));
        r[i] = _mm512_castps_si512(v);
    }
    tr16x16(r);
    for (int i = 0; i < 16; i++) t[i] = _mm512_castsi512_ps(r[i]);
}

/* The epilogue of one pair of 16-row blocks of amx_up or amx_down, cut into units that the tile loop of the next
 * pair runs between its K steps, so the core's vector work (transposes, SwiGLU, rounding, the weighted combine)
 * overlaps the tile unit's multiplies instead of following them: run after its own tiles, the epilogue took ~40%
 * of amx_up's time, and issued after the next pair's tiles (one window of the out-of-order core) it hid little of
 * that. Units of block q: transpose its first tile (weight rows 0-15), its second (the up rows, or output columns
 * 16-31) where there is one, then one unit per token row. */
typedef struct {
    const float (*c)[256]; /* the pair's sums: c[q] (and c[2 + q]) for block q */
    const bf16 *bias[2];   /* of the first and second tile's 16 weight rows, or NULL */
    int two;               /* a second tile per block */
    int n0, nu;            /* units of block 0, of both */
    int64_t s;             /* sorted row of block 0's first token row */
    /* amx_up: h (or NULL) and a rows, their columns j0 (up rows at F + j0 of h), act as in amx_up; with stage
     * (full-line mode), the half lines of an even j0 / 16 wait there (three [stage_rows][16] blocks, a, h gate and
     * h up, at row - run0) for the odd one's, and both go out as whole lines */
    bf16 *h, *a, *stage;
    int64_t W, F, j0, run0, stage_rows;
    /* ...or with apk, a goes out packed as amx_down's operand (its block of the pair's first 16 rows; see
     * amx_up): no transposes for it, 8 whole lines per block, after the h units if any */
    bf16 *apk;
    int act;
    /* amx_down: out[tok[row]] columns d0..d0 + 31 += w[row] * y; with fl (moe_row_flags' per sorted row), a
     * token's first row stores instead (out need not be zeroed) and its last writes the token's finished sum,
     * rounded, to out16 (ld_out16) instead of out */
    float *out;
    int64_t ld_out, d0;
    const int64_t *tok;
    const float *w;
    const uint8_t *fl;
    bf16 *out16;
    int64_t ld_out16;
    /* amx_outer: rows gn0.. of G's [N, Kd] block at ge (nu of them: 16 or 32), columns k0.. (16 nq of them: up to 4
     * with 16 rows, up to 2 with 32) */
    char *ge;
    int gdt, nq;
    int64_t gn0, k0, Kd;
    float t[4][256] __attribute__((aligned(64))); /* transposed: t[2 l + q] + 16 r = token row r's 16 values */
} amx_epi;

/* Set st up for the pair of amx_up or amx_down whose sums are c: its first token row is sorted row s, its
 * expert's rows end before `end`, and a second block follows where `two_blocks`. */
static inline void amx_epi_set(amx_epi *st, const float (*c)[256], int64_t s, int64_t end, int two_blocks) {
    const int64_t R0 = min64(16, end - s), R1 = two_blocks ? min64(16, end - s - 16) : 0;
    st->c = c;
    st->s = s;
    if (st->apk) { /* (amx_up, SwiGLU: two tiles per block) h's transposes and rows, then a's 8 lines */
        st->n0 = R0 ? (int)(st->h ? 2 + R0 : 0) + 8 : 0;
        st->nu = st->n0 + (R1 ? (int)(st->h ? 2 + R1 : 0) + 8 : 0);
        return;
    }
    st->n0 = R0 ? (int)(1 + st->two + R0) : 0;
    st->nu = st->n0 + (R1 ? (int)(1 + st->two + R1) : 0);
}

enum { AMX_EPI_UP, AMX_EPI_DOWN, AMX_EPI_OUTER }; /* the kernel whose epilogue a unit belongs to */

/* AMX_EPI_OUTER: one unit per row of the gradient block (its sums are rows already) */
static inline __attribute__((always_inline)) void amx_epi_unit(amx_epi *st, int u, int kind) {
    if (kind == AMX_EPI_OUTER) { /* all column tiles of row u together: a bf16 row's 64 columns are two whole lines
                      * for the non-temporal stores (half lines, written apart, cost a read of the line each) */
        const float *c = st->c[2 * (u / 16)] + 16 * (u % 16); /* row u's column tiles: c, c + 256, ... */
        char *o = st->ge + ((size_t)(st->gn0 + u) * (size_t)st->Kd + (size_t)st->k0) * esize(st->gdt);
        int q = 0;
        if (st->gdt == DT_BF16 && ((uintptr_t)o & 63) == 0)
            for (; q + 1 < st->nq; q += 2)
                _mm512_stream_si512((void *)(o + 32 * q), _mm512_inserti64x4(
                    _mm512_castsi256_si512(cvt16_bf16(_mm512_load_ps(c + 256 * q))),
                    cvt16_bf16(_mm512_load_ps(c + 256 * (q + 1))), 1));
        for (; q < st->nq; q++) st16_stream(o + 16 * q * esize(st->gdt), st->gdt, 0xffff, _mm512_load_ps(c + 256 * q));
        return;
    }
    const int q = u >= st->n0, l = u - (q ? st->n0 : 0);
    if (st->apk) {
        const int nh = (q ? st->nu - st->n0 : st->n0) - 8; /* the block's h units */
        if (l >= nh) { /* line p of the block's 8: activation columns j0 + 2p and j0 + 2p + 1 of its 16 rows */
            const int p = l - nh;
            const float *cg = st->c[q] + 32 * p, *cu = st->c[2 + q] + 32 * p; /* [weight row][token row] */
            const bf16 *bg = st->bias[0], *bu = st->bias[1];
            const __m512 a0 = swiglu16(_mm512_add_ps(_mm512_load_ps(cg), _mm512_set1_ps(bg ? bf16_to_f32(bg[2 * p]) : 0.0f)),
                                       _mm512_add_ps(_mm512_load_ps(cu), _mm512_set1_ps(bu ? bf16_to_f32(bu[2 * p]) : 0.0f)));
            const __m512 a1 = swiglu16(
                _mm512_add_ps(_mm512_load_ps(cg + 16), _mm512_set1_ps(bg ? bf16_to_f32(bg[2 * p + 1]) : 0.0f)),
                _mm512_add_ps(_mm512_load_ps(cu + 16), _mm512_set1_ps(bu ? bf16_to_f32(bu[2 * p + 1]) : 0.0f)));
            const __m512i ix = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
            bf16 *o = st->apk + (size_t)q * (size_t)st->F * 16 + (size_t)(st->j0 / 32) * 512 +
                      (size_t)((st->j0 % 32) / 2 + p) * 32;
            /* cached stores: the output projection reads these lines next, from L3 rather than memory (streamed,
             * the layer's forward took 1.02-1.03x at T = 1024, 1.01-1.02x at T = 8192; same at T = 128) */
            _mm512_store_si512((void *)o, _mm512_permutex2var_epi16(_mm512_castsi256_si512(cvt16_bf16(a0)), ix,
                                                                    _mm512_castsi256_si512(cvt16_bf16(a1))));
            return;
        }
    }
    if (l <= st->two) {
        __m512 t[16];
        amx_rows(st->c[2 * l + q], st->bias[l], t);
        for (int i = 0; i < 16; i++) _mm512_store_ps(st->t[2 * l + q] + 16 * i, t[i]);
        return;
    }
    const int r = l - 1 - st->two;
    const int64_t row = st->s + 16 * q + r;
    const __m512 g = _mm512_load_ps(st->t[q] + 16 * r);
    if (kind == AMX_EPI_DOWN) {
        float *o = st->out + (size_t)st->tok[row] * (size_t)st->ld_out + st->d0;
        const __m512 ws = _mm512_set1_ps(st->w[row]), g1 = _mm512_load_ps(st->t[2 + q] + 16 * r);
        const int f = st->fl ? st->fl[row] : 0;
        const __m512 y0 = f & 1 ? _mm512_mul_ps(ws, g) : _mm512_fmadd_ps(ws, g, _mm512_loadu_ps(o)),
                     y1 = f & 1 ? _mm512_mul_ps(ws, g1) : _mm512_fmadd_ps(ws, g1, _mm512_loadu_ps(o + 16));
        if (f & 2) { /* the token's sum is complete: one whole line of bf16 (d0 a multiple of 32, out16 aligned;
                      * cached stores: streamed, the layer's forward at 8192 tokens gained nothing, ~2% this way) */
            _mm512_storeu_si512((void *)(st->out16 + (size_t)st->tok[row] * (size_t)st->ld_out16 + st->d0),
                                _mm512_inserti64x4(_mm512_castsi256_si512(cvt16_bf16(y0)), cvt16_bf16(y1), 1));
            return;
        }
        _mm512_storeu_ps(o, y0);
        _mm512_storeu_ps(o + 16, y1);
        return;
    }
    const __m512 up = st->act == 1 ? _mm512_load_ps(st->t[2 + q] + 16 * r) : g;
    const int need_a = st->act == 1 && !st->apk;
    if (st->stage) { /* whole lines, written by the odd half only: no read-for-ownership of a or h */
        bf16 *sa = st->stage + (size_t)(row - st->run0) * 16, *sg = sa + st->stage_rows * 16, *su = sg + st->stage_rows * 16;
        const __m256i av = need_a ? cvt16_bf16(swiglu16(g, up)) : _mm256_setzero_si256();
        if (!(st->j0 & 16)) {
            if (need_a) _mm256_store_si256((__m256i *)sa, av);
            if (st->h) {
                _mm256_store_si256((__m256i *)sg, cvt16_bf16(g));
                if (st->act == 1) _mm256_store_si256((__m256i *)su, cvt16_bf16(up));
            }
            return;
        }
        const int64_t j = st->j0 - 16;
        if (need_a) /* cached: the output projection packs these rows next, from L3 rather than memory (streamed, the
                     * layer's bf16 forward+backward took 1.01-1.02x); h, read in backward only, is streamed */
            _mm512_store_si512((void *)(st->a + (size_t)row * (size_t)st->F + (size_t)j),
                               _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256((__m256i *)sa)), av, 1));
        if (st->h) {
            bf16 *h = st->h + (size_t)row * (size_t)st->W + (size_t)j;
            _mm512_stream_si512((void *)h, _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_load_si256((__m256i *)sg)), cvt16_bf16(g), 1));
            if (st->act == 1)
                _mm512_stream_si512((void *)(h + st->F), _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_load_si256((__m256i *)su)), cvt16_bf16(up), 1));
        }
        return;
    }
    if (st->h) {
        bf16 *h = st->h + (size_t)row * (size_t)st->W + (size_t)st->j0;
        _mm256_storeu_si256((__m256i *)h, cvt16_bf16(g));
        if (st->act == 1) _mm256_storeu_si256((__m256i *)(h + st->F), cvt16_bf16(up));
    }
    if (need_a)
        _mm256_storeu_si256((__m256i *)(st->a + (size_t)row * (size_t)st->F + (size_t)st->j0), cvt16_bf16(swiglu16(g, up)));
}

/* The units of st's epilogue not yet run (a thread's last pair or item), all at once. */
static inline __attribute__((always_inline)) void amx_epi_drain(amx_epi *st, int kind) {
    for (int u = 0; u < st->nu; u++) amx_epi_unit(st, u, kind);
    st->nu = 0;
}

/* Zero the four sum tiles (0-3) the tile loops accumulate into. */
static inline __attribute__((always_inline)) void amx_zero_sums(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

/* sums of 16 weight rows (w, row stride ldw bf16) against one or two packed blocks (p0, p1 or NULL) over K:
 * c[0] (and c[1]) = [weight row][token row], and with a second 16 weight rows (w2 or NULL) c[2] (and c[3]). With
 * st, the units of st's epilogue run spread over the K steps (all of them by the last); with pf0 (and pf1), so do
 * prefetches (T1) of the pfn bytes there. */
static inline __attribute__((always_inline)) void amx_tiles_epi(const bf16 *w, const bf16 *w2, int64_t ldw, int64_t wstep,
                                                                const bf16 *p0, const bf16 *p1, int64_t K,
                                                                float c[4][256], amx_epi *st, int kind,
                                                                const char *pf0, const char *pf1, size_t pfn) {
    amx_zero_sums();
    const size_t ldb = (size_t)ldw * sizeof(bf16);
    const int64_t nk = K / 32;
    const int nu = st ? st->nu : 0;
    int u = 0;
    for (int64_t kb = 0; kb < nk; kb++) {
        _tile_loadd(4, w + wstep * kb, ldb);
        _tile_loadd(6, p0 + (size_t)kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (p1) {
            _tile_loadd(7, p1 + (size_t)kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (w2) {
            _tile_loadd(5, w2 + wstep * kb, ldb);
            _tile_dpbf16ps(2, 5, 6);
            if (p1) _tile_dpbf16ps(3, 5, 7);
        }
        for (const int ue = (int)((kb + 1) * nu / nk); u < ue; u++) amx_epi_unit(st, u, kind);
        if (pf0)
            for (size_t o = (pfn * kb / nk) & ~(size_t)63, oe = pfn * (kb + 1) / nk; o < oe; o += 64) {
                _mm_prefetch(pf0 + o, _MM_HINT_T1);
                if (pf1) _mm_prefetch(pf1 + o, _MM_HINT_T1);
            }
    }
    _tile_stored(0, c[0], 64);
    if (p1) _tile_stored(1, c[1], 64);
    if (w2) {
        _tile_stored(2, c[2], 64);
        if (p1) _tile_stored(3, c[3], 64);
    }
}

static inline __attribute__((always_inline)) void amx_tiles(const bf16 *w, const bf16 *w2, int64_t ldw,
                                                            const bf16 *p0, const bf16 *p1, int64_t K,
                                                            float c[4][256]) {
    amx_tiles_epi(w, w2, ldw, 32, p0, p1, K, c, NULL, AMX_EPI_UP, NULL, NULL, 0);
}

/* The outer-product kernel's tiles: sums of 16 rows of A^T (w, row stride ldw bf16) against nq (1-4) packed
 * column blocks p[q] over K, c[q] = [row][column], the units of st's epilogue spread over the K steps. One row
 * block by up to four column blocks (not two by two): each row of G then gets 64 columns (bf16: two whole lines)
 * per visit, and the non-temporal stores of 32 rows x one line each (a 32 x 32 block) reached ~22 GB/s where
 * 16 rows x two lines reached ~37 (23 MiB of bf16 on 2 Xeon cores). */
static inline __attribute__((always_inline)) void amx_tiles_outer(const bf16 *w, const bf16 *const p[4],
                                                                  int nq, int64_t K, float c[4][256], amx_epi *st) {
    amx_zero_sums();
    const int64_t nk = K / 32;
    const int nu = st->nu;
    int u = 0;
    for (int64_t kb = 0; kb < nk; kb++) {
        const size_t o = (size_t)kb * 512;
        _tile_loadd(4, w + o, 64);
        _tile_loadd(5, p[0] + o, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (nq > 1) {
            _tile_loadd(6, p[1] + o, 64);
            _tile_dpbf16ps(1, 4, 6);
        }
        if (nq > 2) {
            _tile_loadd(7, p[2] + o, 64);
            _tile_dpbf16ps(2, 4, 7);
        }
        if (nq > 3) {
            _tile_loadd(5, p[3] + o, 64);
            _tile_dpbf16ps(3, 4, 5);
        }
        for (const int ue = (int)((kb + 1) * nu / nk); u < ue; u++) amx_epi_unit(st, u, AMX_EPI_OUTER);
    }
    _tile_stored(0, c[0], 64);
    if (nq > 1) _tile_stored(1, c[1], 64);
    if (nq > 2) _tile_stored(2, c[2], 64);
    if (nq > 3) _tile_stored(3, c[3], 64);
}

/* 16-row blocks per run of packed token rows (K elements each) that stays in L2 while every column block of an
 * expert reads it: about `bytes` (AMX_RUN_BYTES for the output projection, AMX_UP_RUN_BYTES for the input one,
 * whose weights an expert's every run reads again: twice the run, half those reads; Mixtral-like bf16 forward at
 * T = 1024 0.965x twice, T = 8192 0.99-1.00x, fine-grained 0.99-1.00x, same process), an even count (the tiles take
 * two blocks at a time). */
#define AMX_RUN_BYTES (256 << 10)
#define AMX_UP_RUN_BYTES (512 << 10)
static inline int64_t amx_row_blocks(int64_t K, int64_t bytes) {
    const int64_t r = bytes / (16 * K * (int64_t)sizeof(bf16)) / 2 * 2;
    return r < 2 ? 2 : r;
}

/* The input projection (and SwiGLU) of moe_small_up on the tiles, bf16, K = D and F multiples of 32 (act 1) or
 * W a multiple of 16 (act 0). An item runs its 16 gate and 16 up weight rows (32 x D, in L1/L2) over a run of the
 * expert's packed row blocks (in L2). */
static int amx_up(const bf16 *x, int64_t ld_x, const int64_t *tok, const int64_t *start, const int64_t *end, int64_t E,
                  const bf16 *w_in, const bf16 *b_in, int64_t W, int64_t D, int act, bf16 *h_out, bf16 *a_out,
                  bf16 *a_pk, int nthreads) {
    const int64_t F = act == 1 ? W / 2 : W;
    /* full-line mode: each item runs two 16-column halves, the first one's results of a row (and of h) waiting in
     * a per-thread buffer for the second's, then written as whole 64-byte lines with non-temporal stores. Half
     * lines written apart made the core fetch each line before writing it (read-for-ownership), which stalled the
     * tile loads: Mixtral-like experts of 2048 rows, input projection 36 -> 25 ms on 2 Xeon cores. */
    const int full = F % 32 == 0 && ((uintptr_t)a_out & 63) == 0 && ((uintptr_t)h_out & 63) == 0;
    const int64_t cw = full ? 32 : 16, nj = F / cw;
    const int nt = gemm_threads(start, end, E, W, D, nthreads);
    const int64_t rbb = amx_row_blocks(D, AMX_UP_RUN_BYTES);
    /* each thread packs the runs of token rows it runs into a buffer of its own, which stays in its L2 (packed by
     * all threads into one buffer before any tile ran, every run came back from L3 or memory: on 2 Emerald Rapids
     * cores, fine-grained experts, T = 1024 0.81-0.84x, T = 8192 0.73-0.80x, T = 128 0.95x; Mixtral-like T = 1024
     * and 8192 0.94-0.97x, paired; a thread whose items start within a run packs it too) */
    int64_t *blk = amx_blocks(start, end, E);
    bf16 *xp = blk ? aligned_alloc(64, (size_t)nt * (size_t)rbb * 16 * (size_t)D * sizeof(bf16)) : NULL;
    bf16 *stage_all = full ? aligned_alloc(64, (size_t)nt * (size_t)rbb * 16 * 48 * sizeof(bf16)) : NULL;
    if (!xp || (full && !stage_all)) {
        free(xp);
        free(blk);
        free(stage_all);
        return -5;
    }
#pragma omp parallel num_threads(nt)
    {
        amx_config();
        /* Items: (expert, run of rbb 16-row blocks, 16 activation columns), columns innermost, so consecutive items
         * reuse one run of packed rows from L2 (an expert's rows all at once overflow it: Mixtral-like experts of
         * 2048 rows streamed 2 MiB of them from L3 per item); each thread takes a contiguous run of items of about
         * equal cost (their row blocks, plus one). */
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t total = 0;
        for (int64_t e = 0; e < E; e++) {
            const int64_t nb = blk[e + 1] - blk[e];
            total += (nb + (nb + rbb - 1) / rbb) * nj;
        }
        int64_t cost = 0, lo_cost = total * t / n, hi_cost = total * (t + 1) / n;
        float cb[2][4][256] __attribute__((aligned(64)));
        amx_epi epi = {.two = act == 1, .h = h_out, .a = a_out, .W = W, .F = F, .act = act,
                       .stage = full ? stage_all + (size_t)t * (size_t)rbb * 16 * 48 : NULL, .stage_rows = rbb * 16},
                *st = &epi;
        int cur = 0;
        bf16 *own = xp + (size_t)t * (size_t)rbb * 16 * (size_t)D; /* the packed run (own_e, own_r0) */
        int64_t own_e = -1, own_r0 = -1;
        for (int64_t e = 0; e < E; e++)
        for (int64_t r0 = 0; r0 < blk[e + 1] - blk[e]; r0 += rbb)
        for (int64_t jc = 0; jc < F; jc += cw) {
            const int64_t r1 = min64(r0 + rbb, blk[e + 1] - blk[e]);
            const int64_t mid = cost + (r1 - r0 + 1) / 2; /* an item belongs to the thread whose range holds its middle */
            cost += r1 - r0 + 1;
            if (mid < lo_cost || mid >= hi_cost) continue;
            if (own_e != e || own_r0 != r0) {
                amx_pack_run(x, ld_x, tok, start[e], end[e], r0, r1, D, own);
                own_e = e, own_r0 = r0;
            }
            for (int64_t j0 = jc; j0 < jc + cw; j0 += 16) {
            const bf16 *wg = w_in + ((size_t)e * (size_t)W + (size_t)j0) * (size_t)D;
            const bf16 *wu = act == 1 ? wg + (size_t)F * (size_t)D : NULL;
            for (int64_t b = r0; b < r1; b += 2) {
                const bf16 *p0 = own + (size_t)(b - r0) * (size_t)D * 16;
                const bf16 *p1 = b + 1 < r1 ? p0 + (size_t)D * 16 : NULL;
                /* the next column block's weight rows (the next item's, usually: it would find them in L3 or
                 * memory, where a strided tile load stalls), a share with each pair, spread over its K steps (all
                 * at once before the pair's tiles, they stalled the core on the line-fill buffers: Mixtral-like
                 * experts of 256 rows 3.88 -> 3.62 ms); the same for amx_down's weights lost 10% (they stay in L2
                 * anyway) */
                const int64_t np = (r1 - r0 + 1) / 2, q = (b - r0) / 2;
                const size_t panel = (size_t)16 * (size_t)D * sizeof(bf16), lo = (panel * q / np) & ~(size_t)63,
                             hi = panel * (q + 1) / np;
                const int pf = j0 + 16 < F;
                /* software-pipelined: this pair's tiles run the epilogue of the pair before (of this item or the
                 * thread's previous one) between their K steps */
                amx_tiles_epi(wg, wu, D, 32, p0, p1, D, cb[cur], st, AMX_EPI_UP,
                              pf ? (const char *)(wg + (size_t)16 * (size_t)D) + lo : NULL,
                              pf && wu ? (const char *)(wu + (size_t)16 * (size_t)D) + lo : NULL, hi - lo);
                const int64_t s = start[e] + b * 16;
                st->bias[0] = b_in ? b_in + (size_t)e * (size_t)W + (size_t)j0 : NULL;
                st->bias[1] = b_in && act == 1 ? b_in + (size_t)e * (size_t)W + (size_t)(F + j0) : NULL;
                st->j0 = j0;
                st->run0 = start[e] + r0 * 16;
                st->apk = a_pk ? a_pk + (size_t)(blk[e] + b) * (size_t)F * 16 : NULL;
                amx_epi_set(st, (const float (*)[256])cb[cur], s, end[e], p1 != NULL);
                cur ^= 1;
            }
            }
        }
        amx_epi_drain(st, AMX_EPI_UP);
        _mm_sfence(); /* this thread's non-temporal stores before the barrier */
        _tile_release();
    }
    free(stage_all);
    free(xp);
    free(blk);
    return 0;
}

/* The output projection and weighted combine of moe_small_down on the tiles, bf16 a and w_out, D and F multiples
 * of 32: each thread owns blocks of 32 output columns for all experts (race-free, each token's sum in expert
 * order), a block's 32 weight rows of an expert running over a run of its packed 16-row blocks. */
static int amx_down(const bf16 *a, int64_t ld_a, const int64_t *tok, const float *w, const int64_t *start,
                    const int64_t *end, int64_t E, const bf16 *w_out, const bf16 *b_out, int64_t D, int64_t F,
                    float *out, int64_t ld_out, const bf16 *a_pk, const uint8_t *fl, bf16 *out16, int64_t ld_out16,
                    int nthreads) {
    const int nt = gemm_threads(start, end, E, D, F, nthreads);
    const int64_t rbb = amx_row_blocks(F, AMX_RUN_BYTES);
    /* without a_pk, each thread packs every run into a buffer of its own, as amx_up does (the same runs on both
     * threads, each for its own columns; packed once into one buffer before any tile ran, they came back from L3 or
     * memory: fine-grained experts T = 1024 0.92x, T = 8192 0.84x, Mixtral-like 0.88-0.91x and 0.84x) */
    int64_t *blk = amx_blocks(start, end, E);
    bf16 *own_all = !a_pk && blk ? aligned_alloc(64, (size_t)nt * (size_t)rbb * 16 * (size_t)F * sizeof(bf16)) : NULL;
    if (!blk || (!a_pk && !own_all)) {
        free(blk);
        free(own_all);
        return -5;
    }
#pragma omp parallel num_threads(nt)
    {
        amx_config(); /* (the tile configuration is per thread) */
        /* each thread owns a contiguous range of 32-column blocks; for each expert it runs every one of them over a
         * run of packed row blocks (in L2) before the next run */
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t dlo = 32 * (D / 32 * t / n), dhi = 32 * (D / 32 * (t + 1) / n);
        float cb[2][4][256] __attribute__((aligned(64)));
        amx_epi epi = {.two = 1, .out = out, .ld_out = ld_out, .tok = tok, .w = w, .fl = fl, .out16 = out16,
                       .ld_out16 = ld_out16}, *st = &epi;
        int cur = 0;
        bf16 *own = a_pk ? NULL : own_all + (size_t)t * (size_t)rbb * 16 * (size_t)F;
        for (int64_t e = 0; e < E; e++)
        for (int64_t r0 = 0; r0 < blk[e + 1] - blk[e]; r0 += rbb)
        for (int64_t d0 = dlo; d0 < dhi; d0 += 32) {
            const int64_t r1 = min64(r0 + rbb, blk[e + 1] - blk[e]);
            const bf16 *we = w_out + ((size_t)e * (size_t)D + (size_t)d0) * (size_t)F;
            if (own && d0 == dlo) /* (the run's first column block: pack it) */
                amx_pack_run(a, ld_a, NULL, start[e], end[e], r0, r1, F, own);
            for (int64_t b = r0; b < r1; b += 2) { /* pipelined as in amx_up */
                const bf16 *p0 = own ? own + (size_t)(b - r0) * (size_t)F * 16 : a_pk + (size_t)(blk[e] + b) * (size_t)F * 16;
                const bf16 *p1 = b + 1 < r1 ? p0 + (size_t)F * 16 : NULL;
                /* the lines of out this pair's epilogue will update (during the next pair's tiles): rows of
                 * scattered tokens, which no hardware prefetcher foresees (Mixtral-like experts of 2048 rows 45.9
                 * -> 36.2 ms, 256 rows 5.1 -> 4.5; fine-grained 4-6%) */
                const int64_t s = start[e] + b * 16, R = min64(p1 ? 32 : 16, end[e] - s);
                for (int64_t r = 0; r < R; r++) {
                    const char *o = (const char *)(out + (size_t)tok[s + r] * (size_t)ld_out + d0);
                    _mm_prefetch(o, _MM_HINT_T0);
                    _mm_prefetch(o + 64, _MM_HINT_T0);
                }
                amx_tiles_epi(we, we + (size_t)16 * (size_t)F, F, 32, p0, p1, F, cb[cur], st, AMX_EPI_DOWN, NULL, NULL, 0);
                st->bias[0] = b_out ? b_out + (size_t)e * (size_t)D + (size_t)d0 : NULL;
                st->bias[1] = b_out ? b_out + (size_t)e * (size_t)D + (size_t)(d0 + 16) : NULL;
                st->d0 = d0;
                amx_epi_set(st, (const float (*)[256])cb[cur], s, end[e], p1 != NULL);
                cur ^= 1;
            }
        }
        amx_epi_drain(st, AMX_EPI_DOWN);
        _tile_release();
    }
    free(own_all);
    free(blk);
    return 0;
}
#endif

/* 1 where the bf16 projections run on AMX tiles (built for them, and the OS lets this process use them). allow = 0
 * turns them off (every kernel then takes its AVX-512 path) until a call with allow = 1. */
int moe_amx(int allow) {
#if defined(MOE_AMX)
    amx_on = allow != 0;
    return amx_ready();
#else
    (void)allow;
    return 0;
#endif
}

/* Which experts take the swapped tiles (AVX2 builds, float32, see sw_run) */
#if defined(MOE_GK) && defined(V8)
#define SW_LO SW_MIN_ROWS
static inline int sw_serves(int dt, int fast) { return fast == 2 && dt == DT_F32; }
#else
#define SW_LO 1
static inline int sw_serves(int dt, int fast) {
    (void)dt, (void)fast;
    return 0;
}
#endif

/* The experts split three ways: those with rows in [sw_lo, sw_hi] (none where sw_hi < sw_lo), the swapped tiles';
 * of the others, those of at least packed_min rows (none where packed_min <= 0), the packed (or AMX) tiles'; the
 * rest the dot-product tiles'. Returns each expert's bounds in each class ([6][E]: dot-product start, end, packed
 * start, end, swapped start, end; start == end: not in that class), or NULL where all are dot-product tiles'
 * (*n: the experts of the two other classes; -1 where out of memory). */
static int64_t *split_experts(const int64_t *start, const int64_t *end, int64_t E, int64_t packed_min,
                              int64_t sw_lo, int64_t sw_hi, int64_t *n) {
    *n = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t m = end[e] - start[e];
        *n += (m >= sw_lo && m <= sw_hi) || (packed_min > 0 && m >= packed_min);
    }
    if (*n == 0) return NULL;
    int64_t *seg = malloc((size_t)E * 6 * sizeof(int64_t));
    if (!seg) {
        *n = -1;
        return NULL;
    }
    for (int64_t e = 0; e < E; e++) {
        const int64_t m = end[e] - start[e];
        for (int c = 0; c < 6; c++) seg[c * E + e] = start[e];
        seg[(m >= sw_lo && m <= sw_hi ? 5 : packed_min > 0 && m >= packed_min ? 3 : 1) * E + e] = end[e];
    }
    return seg;
}

/* The fewest (which 0) or most (which 1) rows of an expert whose input projection takes the swapped tiles in this
 * build for operands of dtype dt; 0 where it has none. */
int moe_swapped_rows(int dt, int which) {
    return sw_serves(dt, 2) ? (which ? SW_MAX_ROWS : SW_MIN_ROWS) : 0;
}

/* The packed tiles' panel width (16: AVX2, 32: AVX-512) where they serve operands of dtype dt (-1: of every
 * dtype), else 0. */
int moe_packed_tiles(int dt) {
#if defined(MOE_GK)
    return gk_serves(dt) ? GK_NR : 0;
#else
    (void)dt;
    return 0;
#endif
}

int moe_small_up(const void *x, int64_t ld_x, const int64_t *tok, const int64_t *start, const int64_t *end, int64_t E,
                 const void *w_in, const void *b_in, int64_t W, int64_t D, int dt, int act, void *h_out, void *a_out,
                 int a_pk, int64_t packed_min, int64_t swapped_max, int nthreads) {
    if (act != 0 && act != 1) return -1;
    if (act == 1 && (W % 2 || a_out == NULL)) return -2;
    if (act == 0 && h_out == NULL) return -3;
    /* experts of at least packed_min rows on the AMX tiles (bf16, whole 32-element steps) or the packed tiles
     * (AVX2 builds; float32 on AVX-512), the others on the dot-product tiles */
    int fast = 0; /* 1: AMX tiles, 2: packed tiles */
#if defined(MOE_AMX)
    fast = dt == DT_BF16 && D % 32 == 0 && W % (act == 1 ? 32 : 16) == 0 && amx_ready();
#endif
#if defined(MOE_GK)
    if (!fast && gk_serves(dt)) fast = 2;
#endif
    const int64_t sw_hi = sw_serves(dt, fast) ? swapped_max : 0; /* (rows of the swapped tiles' experts) */
    int64_t n = 0;
    int64_t *seg = fast ? split_experts(start, end, E, packed_min, SW_LO, sw_hi, &n) : NULL;
    if (n < 0) return -5;
    if (!seg) return small_up(x, ld_x, tok, start, end, E, w_in, b_in, W, D, dt, act, h_out, a_out, nthreads);
    int rc = -1;
#if defined(MOE_AMX)
    if (fast == 1)
        rc = amx_up(x, ld_x, tok, seg + 2 * E, seg + 3 * E, E, w_in, b_in, W, D, act, h_out, a_out, NULL, nthreads);
#endif
#if defined(MOE_GK)
    if (fast == 2)
        rc = packed_up(x, ld_x, tok, seg + 2 * E, seg + 3 * E, E, w_in, b_in, W, D, dt, act, h_out, a_out,
                       act == 1 && a_pk, nthreads);
#if defined(V8)
    if (rc == 0 && sw_hi) /* (sw_serves: fast == 2) */
        rc = sw_up(x, ld_x, tok, seg + 4 * E, seg + 5 * E, E, w_in, b_in, W, D, act, h_out, a_out, nthreads);
#endif
#endif
    if (rc == 0 && n < E) rc = small_up(x, ld_x, tok, seg, seg + E, E, w_in, b_in, W, D, dt, act, h_out, a_out, nthreads);
    free(seg);
    return rc;
}

int moe_small_down(const void *a, int64_t ld_a, int a_pk, const int64_t *tok, const float *w, const int64_t *start,
                   const int64_t *end, int64_t E, const void *w_out, const void *b_out, int64_t D, int64_t F, int dt,
                   float *out, int64_t ld_out, int64_t packed_min, int nthreads) {
    if (a_pk && ld_a != F) return -2; /* (handed over: the rows of a, whole) */
    /* experts of at least packed_min rows on the AMX tiles (bf16, whole 32-element steps) or the packed tiles
     * (AVX2 builds; float32 on AVX-512), the others on the dot-product tiles */
    int fast = 0; /* 1: AMX tiles, 2: packed tiles */
#if defined(MOE_AMX)
    fast = dt == DT_BF16 && D % 32 == 0 && F % 32 == 0 && amx_ready();
#endif
#if defined(MOE_GK)
    if (!fast && gk_serves(dt)) fast = 2;
#endif
    int64_t n = 0;
    int64_t *seg = fast ? split_experts(start, end, E, packed_min, 1, 0, &n) : NULL;
    if (n < 0) return -5;
    if (!seg) return small_down(a, ld_a, tok, w, start, end, E, w_out, b_out, D, F, dt, out, ld_out, nthreads);
    int rc = -1;
#if defined(MOE_AMX)
    if (fast == 1)
        rc = amx_down(a, ld_a, tok, w, seg + 2 * E, seg + 3 * E, E, w_out, b_out, D, F, out, ld_out, NULL, NULL,
                      NULL, 0, nthreads);
#endif
#if defined(MOE_GK)
    if (fast == 2)
        rc = packed_down(a, ld_a, a_pk, tok, w, seg + 2 * E, seg + 3 * E, E, w_out, b_out, D, F, dt, out, ld_out,
                         nthreads);
#endif
    if (rc == 0 && n < E) rc = small_down(a, ld_a, tok, w, seg, seg + E, E, w_out, b_out, D, F, dt, out, ld_out, nthreads);
    free(seg);
    return rc;
}

/* bf16 SwiGLU experts on the AMX tiles with the activation handed from one projection to the other in the output
 * projection's packed layout: moe_amx_up_packed is moe_small_up (act 1, h_out optional) writing a_pk instead of a,
 * 16 x F bf16 per 16-row block of each expert with rows (the blocks amx_pack16 makes: pair-interleaved [F / 32][16]
 * [16 rows][2], padding rows of a last block unspecified), and moe_amx_down_packed is moe_small_down reading them.
 * Every expert with rows runs on the tiles (no packed_min). Saves amx_down's pack pass and amx_up's transposes
 * for a (its sums are [activation column][token row] already: two columns of 16 rows make one line of a_pk).
 * Returns -6 where the tiles cannot take them (no AMX, or D or F not a multiple of 32). */
int moe_amx_up_packed(const void *x, int64_t ld_x, const int64_t *tok, const int64_t *start, const int64_t *end,
                      int64_t E, const void *w_in, const void *b_in, int64_t D, int64_t F, void *h_out, void *a_pk,
                      int nthreads) {
#if defined(MOE_AMX)
    if (D % 32 == 0 && F % 32 == 0 && amx_ready())
        return amx_up(x, ld_x, tok, start, end, E, w_in, b_in, 2 * F, D, 1, h_out, NULL, a_pk, nthreads);
#endif
    (void)x, (void)ld_x, (void)tok, (void)start, (void)end, (void)E, (void)w_in, (void)b_in, (void)D, (void)F;
    (void)h_out, (void)a_pk, (void)nthreads;
    return -6;
}

int moe_amx_down_packed(const void *a_pk, const int64_t *tok, const float *w, const int64_t *start,
                        const int64_t *end, int64_t E, const void *w_out, const void *b_out, int64_t D, int64_t F,
                        float *out, int64_t ld_out, const uint8_t *fl, void *out16, int64_t ld_out16, int nthreads) {
#if defined(MOE_AMX)
    if ((fl != NULL) != (out16 != NULL) || (out16 && (((uintptr_t)out16 & 63) || ld_out16 % 32))) return -1;
    if (D % 32 == 0 && F % 32 == 0 && amx_ready())
        return amx_down(NULL, F, tok, w, start, end, E, w_out, b_out, D, F, out, ld_out, a_pk, fl, out16, ld_out16,
                        nthreads);
#endif
    (void)a_pk, (void)tok, (void)w, (void)start, (void)end, (void)E, (void)w_out, (void)b_out, (void)D, (void)F;
    (void)out, (void)ld_out, (void)fl, (void)out16, (void)ld_out16, (void)nthreads;
    return -6;
}

/* Per sorted row s of S (token tok[s]): bit 0 of fl[s] where s is its token's first row, bit 1 where its last (a
 * token's rows in sorted order are its choices in expert order: the output projection's sums reach the token in
 * that order). Returns the number of the T tokens with no row. */
int64_t moe_row_flags(const int64_t *tok, int64_t S, int64_t T, uint8_t *fl) {
    int64_t *last = malloc((size_t)(T ? T : 1) * sizeof(int64_t));
    if (!last) return -5;
    for (int64_t t = 0; t < T; t++) last[t] = -1;
    for (int64_t s = 0; s < S; s++) {
        fl[s] = last[tok[s]] < 0;
        last[tok[s]] = s;
    }
    int64_t none = 0;
    for (int64_t t = 0; t < T; t++) {
        if (last[t] < 0) none++;
        else fl[last[t]] |= 2;
    }
    free(last);
    return none;
}

int moe_swiglu_fwd(const void *h, int64_t ld_h, void *a, int64_t ld_a, int64_t m, int64_t F, int dt, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(m * F * ACT_COST, nthreads))
    for (int64_t i = 0; i < m; i++) {
        const void *hr = at(h, dt, ld_h, i, 0);
        void *ar = at(a, dt, ld_a, i, 0);
        if (i + ACT_PF < m) prefetch_row(at(h, dt, ld_h, i + ACT_PF, 0), 2 * F * esize(dt));
#define SWIGLU(d) SWIGLU_ROW(hr, ar, d, F)
        DISPATCH1(dt, SWIGLU);
#undef SWIGLU
    }
    return 0;
}

int moe_swiglu_bwd(const void *h, int64_t ld_h, const void *ga, int64_t ld_ga, const float *w, int64_t m, int64_t F,
                   int dt, void *dh, int64_t ld_dh, void *aw, int64_t ld_aw, float *dw, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(m * F * ACT_COST, nthreads))
    for (int64_t i = 0; i < m; i++) {
        const void *hr = at(h, dt, ld_h, i, 0), *gr = at(ga, dt, ld_ga, i, 0);
        void *dr = at(dh, dt, ld_dh, i, 0), *ar = aw ? at(aw, dt, ld_aw, i, 0) : NULL;
        float acc;
        if (i + ACT_PF < m) {
            prefetch_row(at(h, dt, ld_h, i + ACT_PF, 0), 2 * F * esize(dt));
            prefetch_row(at(ga, dt, ld_ga, i + ACT_PF, 0), F * esize(dt));
        }
#define SWIGLU_BWD(d) (ar ? SWIGLU_BWD_ROW(hr, gr, w[i], dr, ar, d, F) : SWIGLU_BWD_ROW(hr, gr, w[i], dr, NULL, d, F))
        acc = DISPATCH1(dt, SWIGLU_BWD);
#undef SWIGLU_BWD
        if (dw) dw[i] = acc;
    }
    return 0;
}

#if defined(V8)
#ifndef NR
#define NR 6 /* token rows per tile of the NN kernel: 6 rows x 2 vectors = 12 of AVX2's 16 registers accumulate */
#endif
#ifndef NNC
#define NNC 2 /* 16-wide column vectors per tile of the NN kernel */
#endif
#else
/* AVX-512: 6 rows x 4 vectors (64 columns), 24 accumulators: 10 loads (4 of B, 6 broadcasts) per 24 FMAs, where 8 x
 * 2 took 10 per 16. Measured on 2 Xeon cores, dY @ W_out and dH @ W_in together: fp32 fine-grained experts of 128
 * rows 46.7 -> 42.4 ms in the machine's slow phase, 32-34 ms either way in its fast one; bf16 on the pair dot
 * product (AMX off) 16 rows 8.4 -> 7.8 ms, 128 rows the same */
#ifndef NR
#define NR 6 /* token rows per tile of the NN kernel */
#endif
#ifndef NNC
#define NNC 4 /* 16-wide column vectors per tile of the NN kernel */
#endif
#endif


/* acc[r][c] = sum_k a_r[k] * b[k * ldb + n0 + 16 c]  for R rows and the columns [n0, n0 + 16 NNC) clipped to N. */
static inline __attribute__((always_inline)) void nn_tile_k(const void *const *a, const int adt, const int R, const char *b,
                                                            const int bdt, int64_t ldb, int64_t Kd, int64_t n0,
                                                            int64_t N, float *c /* R x 16 NNC */) {
#if defined(__AVX512F__)
    __m512 acc[NR][NNC];
    __mmask16 mc[NNC];
    UNROLL for (int q = 0; q < NNC; q++) {
        int64_t left = N - n0 - 16 * q;
        mc[q] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int q = 0; q < NNC; q++) acc[r][q] = _mm512_setzero_ps();
    const size_t eb = esize(bdt);
    for (int64_t k = 0; k < Kd; k++) {
        const char *bk = b + ((size_t)k * (size_t)ldb + (size_t)n0) * eb;
        _mm_prefetch(bk + 8 * (size_t)ldb * eb, _MM_HINT_T0);
        __m512 bv[NNC];
        UNROLL for (int q = 0; q < NNC; q++) bv[q] = ld16(bk + 16 * q * eb, bdt, mc[q]);
        UNROLL for (int r = 0; r < R; r++) {
            __m512 av = _mm512_set1_ps(ld(a[r], adt, k));
            UNROLL for (int q = 0; q < NNC; q++) acc[r][q] = _mm512_fmadd_ps(av, bv[q], acc[r][q]);
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int q = 0; q < NNC; q++) _mm512_storeu_ps(c + (r * NNC + q) * 16, acc[r][q]);
#elif defined(V8)
    /* R <= NR = 6 rows x 16 columns (two vectors) per pass: 12 accumulators; the second pass reads b from L1/L2.
     * Row pointers are copied to locals so they stay in registers (each k then costs 2 loads of b, R broadcasts
     * and 2R FMAs). */
    const size_t eb = esize(bdt), ea = esize(adt), bstep = (size_t)ldb * eb;
    const char *ap[NR];
    UNROLL for (int r = 0; r < R; r++) ap[r] = (const char *)a[r];
    for (int64_t c0 = n0; c0 < n0 + 16 * NNC && c0 < N; c0 += 16) {
        const int64_t left = N - c0;
        __m256 acc[NR][2];
        UNROLL for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        const char *bk = b + (size_t)c0 * eb;
#define NN8_ROWS(k)                                                                                                \
    UNROLL for (int r = 0; r < R; r++) {                                                                           \
        const __m256 av = adt == DT_F32 ? _mm256_broadcast_ss((const float *)(ap[r] + (size_t)(k) * ea))           \
                                        : _mm256_set1_ps(bf16_to_f32(*(const bf16 *)(ap[r] + (size_t)(k) * ea))); \
        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);                                                            \
        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);                                                            \
    }
        if (left >= 16 && ldb > 16 * NNC) { /* b's rows far apart (not packed): prefetched */
            for (int64_t k = 0; k < Kd; k++, bk += bstep) {
                _mm_prefetch(bk + 8 * bstep, _MM_HINT_T0);
                const __m256 b0 = ld8(bk, bdt), b1 = ld8(bk + 8 * eb, bdt);
                NN8_ROWS(k)
            }
        } else if (left >= 16) { /* a packed strip, in cache (a prefetch would only take a load slot) */
            for (int64_t k = 0; k < Kd; k++, bk += bstep) {
                const __m256 b0 = ld8(bk, bdt), b1 = ld8(bk + 8 * eb, bdt);
                NN8_ROWS(k)
            }
        } else {
            for (int64_t k = 0; k < Kd; k++, bk += bstep) {
                const __m256 b0 = ld8_part(bk, bdt, min64(8, left));
                const __m256 b1 = left > 8 ? ld8_part(bk + 8 * eb, bdt, left - 8) : _mm256_setzero_ps();
                NN8_ROWS(k)
            }
        }
#undef NN8_ROWS
        UNROLL for (int r = 0; r < R; r++) {
            float *cr = c + r * 16 * NNC + (c0 - n0);
            _mm256_storeu_ps(cr, acc[r][0]);
            _mm256_storeu_ps(cr + 8, acc[r][1]);
        }
    }
#else
    for (int r = 0; r < R; r++)
        for (int64_t j = 0; j < 16 * NNC; j++) c[r * 16 * NNC + j] = 0.0f;
    for (int64_t k = 0; k < Kd; k++) {
        const char *bk = b + ((size_t)k * (size_t)ldb + (size_t)n0) * esize(bdt);
        int64_t w = min64(16 * NNC, N - n0);
        for (int r = 0; r < R; r++) {
            float av = ld(a[r], adt, k);
            float *cr = c + r * 16 * NNC;
#pragma omp simd
            for (int64_t j = 0; j < w; j++) cr[j] += av * ld(bk, bdt, j);
        }
    }
#endif
}

#if defined(__AVX512BF16__)
/* The same tile for bfloat16 a and b with the pair dot product: two rows k, k+1 of b interleaved (unpacklo/hi
 * within 128-bit lanes, so each accumulator holds a fixed permutation of 16 columns, undone at the end) against the
 * broadcast pair (a[k], a[k+1]); half the multiply instructions of the widening path. */
static inline __attribute__((always_inline)) void nn_tile_bf16_k(const void *const *a, const int R, const char *b,
                                                                 int64_t ldb, int64_t Kd, int64_t n0, int64_t N,
                                                                 float *c) {
    __m512 acc[NR][NNC];
    __mmask32 mc[NNC / 2];
    UNROLL for (int p = 0; p < NNC / 2; p++) {
        int64_t left = N - n0 - 32 * p;
        mc[p] = left >= 32 ? (__mmask32)0xffffffffu : left <= 0 ? (__mmask32)0 : (__mmask32)((1u << left) - 1);
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int q = 0; q < NNC; q++) acc[r][q] = _mm512_setzero_ps();
    const int64_t K2 = Kd & ~(int64_t)1;
    for (int64_t k = 0; k <= K2; k += 2) {
        if (k == Kd) break;
        const bf16 *b0 = (const bf16 *)b + (size_t)k * (size_t)ldb + (size_t)n0;
        const int tail = k + 1 == Kd; /* odd Kd: the last row pairs with zeros */
        _mm_prefetch((const char *)(b0 + 8 * (size_t)ldb), _MM_HINT_T0);
        _mm_prefetch((const char *)(b0 + 9 * (size_t)ldb), _MM_HINT_T0);
        __m512i lo[NNC / 2], hi[NNC / 2];
        UNROLL for (int p = 0; p < NNC / 2; p++) {
            __m512i r0 = _mm512_maskz_loadu_epi16(mc[p], b0 + 32 * p);
            __m512i r1 = tail ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(mc[p], b0 + ldb + 32 * p);
            lo[p] = _mm512_unpacklo_epi16(r0, r1);
            hi[p] = _mm512_unpackhi_epi16(r0, r1);
        }
        UNROLL for (int r = 0; r < R; r++) {
            const bf16 *ar = (const bf16 *)a[r] + k;
            int32_t pair; /* (a[k], a[k+1]) is one 32-bit load, broadcast by the load port */
            if (tail) pair = (int32_t)ar[0];
            else memcpy(&pair, ar, sizeof pair);
            __m512i av = _mm512_set1_epi32(pair);
            UNROLL for (int p = 0; p < NNC / 2; p++) {
                acc[r][2 * p] = _mm512_dpbf16_ps(acc[r][2 * p], (__m512bh)av, (__m512bh)lo[p]);
                acc[r][2 * p + 1] = _mm512_dpbf16_ps(acc[r][2 * p + 1], (__m512bh)av, (__m512bh)hi[p]);
            }
        }
    }
    /* lo holds columns 8l..8l+3 of lane l, hi columns 8l+4..8l+7: interleave the lanes back into column order */
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int p = 0; p < NNC / 2; p++) {
        __m512 l = acc[r][2 * p], h = acc[r][2 * p + 1];
        __m512 first = _mm512_shuffle_f32x4(l, h, _MM_SHUFFLE(1, 0, 1, 0));  /* l0 l1 h0 h1 */
        __m512 second = _mm512_shuffle_f32x4(l, h, _MM_SHUFFLE(3, 2, 3, 2)); /* l2 l3 h2 h3 */
        _mm512_storeu_ps(c + (r * NNC + 2 * p) * 16, _mm512_shuffle_f32x4(first, first, _MM_SHUFFLE(3, 1, 2, 0)));
        _mm512_storeu_ps(c + (r * NNC + 2 * p + 1) * 16, _mm512_shuffle_f32x4(second, second, _MM_SHUFFLE(3, 1, 2, 0)));
    }
}
#endif

static void nn_tile(const void *const *a, int adt, int R, const char *b, int bdt, int64_t ldb, int64_t Kd, int64_t n0,
                    int64_t N, float *c) {
#if defined(__AVX512BF16__)
#define NN_BF16(r) if (adt == DT_BF16 && bdt == DT_BF16) { nn_tile_bf16_k(a, r, b, ldb, Kd, n0, N, c); break; }
#else
#define NN_BF16(r)
#endif
#define NN_CASE(r)                                                                         \
    case r:                                                                                \
        NN_BF16(r)                                                                         \
        if (adt == DT_F32 && bdt == DT_F32)                                                \
            nn_tile_k(a, DT_F32, r, b, DT_F32, ldb, Kd, n0, N, c);                         \
        else if (adt == DT_F32)                                                            \
            nn_tile_k(a, DT_F32, r, b, DT_BF16, ldb, Kd, n0, N, c);                        \
        else if (bdt == DT_F32)                                                            \
            nn_tile_k(a, DT_BF16, r, b, DT_F32, ldb, Kd, n0, N, c);                        \
        else                                                                               \
            nn_tile_k(a, DT_BF16, r, b, DT_BF16, ldb, Kd, n0, N, c);                       \
        break;
    switch (R) {
        NN_CASE(1)
        NN_CASE(2)
        NN_CASE(3)
        NN_CASE(4)
        NN_CASE(5)
        NN_CASE(6)
#if NR > 6
        NN_CASE(7)
        NN_CASE(8)
#endif
    }
#undef NN_CASE
}

/* C[s, n] = sum_k A[ia(s), k] * B[e, k, n] for the rows s of expert e (start[e] <= s < end[e]), B [E, Kd, N]
 * contiguous; ia(s) = a_idx ? a_idx[s] : s. c_idx NULL: C[s, n] is written in dtype cdt (row stride ldc);
 * else float32 C[c_idx[s], n] += the result (the rows of one expert must have distinct c_idx). Each thread owns a
 * block of columns for all experts, so accumulation is race-free and in expert order (where no expert has more than
 * NN_FEW rows, nn_stream instead reads whole weight rows, and sums by column blocks in the same order). */
#define PACK_PF 16 /* weight rows ahead that the NN kernel's packing prefetches */
#if defined(V8)
/* AVX2: one item per thread, as wide as 4 KiB of each weight row, in passes of 128 reduction rows: the packing then
 * reads the weights in long runs of whole lines (a few hundred bytes of every row per item left the packing waiting
 * on memory: Zen 3, fp32, dH @ W_in of Mixtral-like experts with 32 rows 9.8 -> 8.9 ms, fine-grained with 16 rows
 * 12.1 -> 10.2 ms, 128 rows 53.7 -> 45.6 ms; g @ W_out the same or faster) */
#define NN_ITEMS_PER_THREAD 1
#define NN_ITEM_BYTES 4096
#define NN_KC 128
#else
#define NN_ITEMS_PER_THREAD 2 /* work items per thread of the NN kernel */
#define NN_ITEM_BYTES 256 /* bytes of each weight row per work item of the NN kernel, at most (128 bf16 columns) */
#define NN_KC 128 /* reduction rows per pass of the NN kernel where it can sum passes in fp32 (a strip of one tile's
                   * 64 columns of B is then 32 KiB of fp32, and stays in L1 while the expert's row blocks run over
                   * it: fp32 fine-grained experts of 128 rows 5-7% faster than passes of 256 rows, whose 64 KiB
                   * strips overflowed L1; bf16 the same) */
#endif
/* Rows per expert up to which the NN kernel streams whole weight rows (nn_stream): up to NN_FEW, except bf16
 * weights on the other builds than AVX2 (NN_FEW_BF16, 8). With more rows than one register group (NN_REGS),
 * each chunk of weight rows is read from memory once and from L1 by the later groups; the tiles' column blocks of
 * a few hundred bytes per weight row keep memory half idle. Measured on 2 Xeon (Sapphire Rapids) cores, fp32
 * against the tiles: fine-grained experts, dH @ W_in and g @ W_out together, 16 rows per expert 9.5 -> 5.6 ms, 32
 * rows 19.4 -> 15.0 ms, 64 rows 2-3% faster, 128 rows 10% slower; Mixtral-like 32 rows 11.6 -> 9.4 ms, 64 rows 21.4
 * -> 19.2 ms, 128 rows 5% slower. On AVX2, with chunks of ~128 KiB (nn_kchunk): Zen 3, 2 threads, paired
 * round-robin, weights from memory, against the packed tiles: Mixtral-like dH @ W_in and g @ W_out fp32 at 12 rows
 * 0.57x and 0.59x (10 rows, against the dot-product tiles, 0.55x and 0.56x), 16 rows 0.68x and 0.71x, 32 rows
 * 0.79-0.84x and 0.89-0.90x, 48 rows 0.85x and 1.02x, 64 rows 0.96x and 1.12x, 96 rows 0.98x and 1.22x; bf16 at
 * 32 rows 0.88x and 0.97x; fine-grained fp32 at 16 rows 0.74x and 0.79x (bf16 0.76x and 0.71x), 32 rows 0.93x and
 * 0.87x, 48 rows 1.02x and 0.97x: up to 40 rows (the packed tiles' PACKED_NN_MIN_ROWS starts above). */
#ifndef NN_FEW
#if defined(__AVX512F__)
#define NN_FEW 96
#elif defined(V8)
#define NN_FEW 40
#else
#define NN_FEW 8
#endif
#endif
#if defined(V8) || NN_FEW < 8
#define NN_FEW_BF16 NN_FEW
#else
#define NN_FEW_BF16 8
#endif
#define NN_STREAM_STEP 4 /* weight rows per step of nn_stream */
#define NN_ROW_COST 6 /* nn_stream's cost of a weight row beyond its multiply-adds, in rows of A (reading it) */

/* acc[r][:N] += sum_{k < kn} a_r[k] * b[k][:N] for R rows (a_r float32, kn <= NN_STREAM_STEP consecutive rows of b,
 * ldb apart, dtype bdt): one pass over the rows of b, which stay in L1 while each row's accumulator takes them. */
static inline __attribute__((always_inline)) void nn_stream_step(const char *b, const int bdt, size_t ldb, int64_t N,
                                                                 int kn, const float a[][NN_STREAM_STEP], int R,
                                                                 float *acc) {
    const char *b0 = b, *b1 = b + ldb, *b2 = b + 2 * ldb, *b3 = b + 3 * ldb;
    for (int r = 0; r < R; r++, acc += N) {
        const float a0 = a[r][0], a1 = a[r][1], a2 = a[r][2], a3 = a[r][3];
        if (kn == 4) {
#pragma omp simd
            for (int64_t j = 0; j < N; j++)
                acc[j] += a0 * ld(b0, bdt, j) + a1 * ld(b1, bdt, j) + a2 * ld(b2, bdt, j) + a3 * ld(b3, bdt, j);
        } else {
            for (int q = 0; q < kn; q++) {
                const char *bq = b + (size_t)q * ldb;
                const float aq = a[r][q];
#pragma omp simd
                for (int64_t j = 0; j < N; j++) acc[j] += aq * ld(bq, bdt, j);
            }
        }
    }
}

/* moe_small_nn where every active expert has few rows (NN_FEW), as in decode and its backward: the work is
 * reading the weights. The experts' weight rows, all of them in order, are split into one contiguous range per
 * thread, which streams whole rows (N elements) into per-thread fp32 partial sums of the rows of A it touches; the
 * partials are then summed into C by column blocks (each C element by one thread, experts in order: race-free). The
 * general kernel would read the weights in column blocks, a few hundred bytes of every row per pass, at about half
 * the memory rate. */
#define NN_REGS_MIN_F32 2 /* float32 weights: rows per expert from which nn_stream_regs runs (single rows keep the
                           * steps) */
#define NN_KCHUNK 64 /* most weight rows per chunk of nn_stream_regs (in L1/L2 while every column block reads them) */
/* The rows per chunk for an expert of R rows and weight rows of ldb bytes: 16 on AVX-512; on AVX2, from 9 rows
 * per expert, as many as fill ~128 KiB (16 to NN_KCHUNK, whole steps of 4), each register group's sums then read
 * and written once per chunk rather than once per 16 weight rows (Zen 3, 2 threads, Mixtral-like experts of 32
 * rows, against 16 weight rows: dH @ W_in, 2 KiB rows, 64 per chunk 0.82x, 32 0.84x, 128 1.03x; g @ W_out, 5.5 KiB
 * rows, 32 per chunk 0.89x, 64 0.96x, 128 1.11x; chunks of 96, 128 or 192 KiB within 1.5% of each other). With
 * up to 8 rows, bound by reading the weights, 16 (the large chunks took 1.04-1.34x at 2-8 rows), and fewer for
 * float32 experts of one register group's rows: 4 for up to NN_KCH_FEW_ROWS (3), 8 for 4-6, the chunk's weight
 * rows then fewer streams at once, and each group's sums read and written per chunk cheap with few rows (Zen 3,
 * 2 threads, Mixtral-like experts from memory, against 16: g @ W_out 2 rows 0.85x, 3 rows 0.78x, 4 rows 0.97x (8
 * per chunk), 6 rows 0.85x; dH @ W_in 0.74x, 0.81x, 0.83x, 0.90x; 8 rows, two register groups, 4 per chunk 1.18-1.26x
 * and 8 1.02-1.08x, hence 16; bf16, whose chunks widen their rows, 4 or 8 per chunk 0.95-1.40x: 16). The layer's
 * fp32 forward+backward at T = 16: Mixtral-like 0.96-0.97x, fine-grained 0.94-0.96x; T = 8 0.98x, T = 32 0.99x. */
#ifndef NN_KCH_FEW_ROWS
#define NN_KCH_FEW_ROWS 3
#endif
static inline int64_t nn_kchunk(size_t ldb, int64_t R, int bdt) {
#if defined(V8)
    const int64_t r = (int64_t)(((size_t)128 << 10) / (ldb ? ldb : 1)) / 4 * 4;
    if (bdt == DT_F32 && R <= 6) return R <= NN_KCH_FEW_ROWS ? 4 : 8; /* (6: one register group on AVX2) */
    return R <= 8 || r < 16 ? 16 : r > NN_KCHUNK ? NN_KCHUNK : r;
#else
    (void)ldb, (void)R, (void)bdt;
    return 16;
#endif
}
#if defined(__AVX512F__)
#define NN_REGS 8 /* rows whose sums nn_stream_regs keeps in registers at once */
/* acc[r][:N] += sum_{k < kn} a[r][k] * b[k][:N] for R (a constant, <= NN_REGS) rows: each 32 columns' sums of all
 * R rows in registers over the kn rows of b (bf16 widened once per load, not once per row of A), added to acc once;
 * pf: the next chunk of b (pf_bytes, may be 0), prefetched into L2 a share with each column block. */
static inline __attribute__((always_inline)) void nn_stream_regs(const char *b, const int bdt, size_t ldb, int64_t N,
                                                                 int kn, const float a[][NN_KCHUNK], const int R,
                                                                 float *acc, const char *pf, size_t pf_bytes) {
    const size_t eb = esize(bdt);
    const int64_t nblk = (N + 31) / 32;
    for (int64_t j0 = 0, blk = 0; j0 < N; j0 += 32, blk++) {
        const __mmask16 m0 = tail16(N - j0), m1 = tail16(N - j0 - 16 > 0 ? N - j0 - 16 : 0);
        if (pf_bytes) /* this block's share of the next chunk's lines */
            for (size_t o = pf_bytes * (size_t)blk / (size_t)nblk & ~(size_t)63;
                 o < pf_bytes * (size_t)(blk + 1) / (size_t)nblk; o += 64)
                _mm_prefetch(pf + o, _MM_HINT_T1);
        __m512 lo[NN_REGS], hi[NN_REGS];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_ps();
        const char *bk = b + (size_t)j0 * eb;
        for (int q = 0; q < kn; q++, bk += ldb) {
            const __m512 w0 = ld16(bk, bdt, m0), w1 = ld16(bk + 16 * eb, bdt, m1);
            for (int r = 0; r < R; r++) {
                const __m512 av = _mm512_set1_ps(a[r][q]);
                lo[r] = _mm512_fmadd_ps(av, w0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, w1, hi[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            float *o = acc + (size_t)r * (size_t)N + j0;
            _mm512_mask_storeu_ps(o, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, o), lo[r]));
            _mm512_mask_storeu_ps(o + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, o + 16), hi[r]));
        }
    }
}

#elif defined(V8)
/* The same on AVX2: each 16 columns' sums of up to NN_REGS (6) rows in 12 registers over the chunk's rows of b,
 * each weight vector loaded (and widened from bf16) once for all of them; the last N % 16 columns one by one.
 * Measured on Zen 3 (2 threads, paired round-robin), Mixtral-like experts (8, weights from memory) against the
 * steps of 4 weight rows below, which read and write every row's sums per step (and widened bf16 weights into a
 * buffer first): g @ W_out and dH @ W_in of 1 row per expert fp32 1.13x and 0.87x, bf16 0.72x and 0.75x; 2 rows
 * fp32 1.07x and 0.88x, bf16 0.59x and 0.62x; 4 rows fp32 0.95x and 0.75x, bf16 0.51x and 0.57x; 8 rows fp32 0.75x
 * and 0.61x, bf16 0.55x and 0.58x; the layer's training steps T = 16, bf16 0.88-0.92x, fp32 0.94x (Mixtral-like)
 * and 0.93-0.96x (fine-grained). Single float32 rows keep the steps: with these, the layer's fp32 step at T = 4 (one
 * row per expert) took 1.03-1.04x. (With chunks of 16 rows, experts of 12-32 rows measured the same as on the
 * packed tiles; with larger chunks, faster: see NN_FEW.) */
#define NN_REGS 6
static inline __attribute__((always_inline)) void nn_stream_regs(const char *b, const int bdt, size_t ldb, int64_t N,
                                                                 int kn, const float a[][NN_KCHUNK], const int R,
                                                                 float *acc, const char *pf, size_t pf_bytes) {
    const size_t eb = esize(bdt);
    const int64_t N16 = N / 16 * 16, nblk = (N + 15) / 16;
    for (int64_t j0 = 0, blk = 0; j0 < N; j0 += 16, blk++) {
        if (pf_bytes) /* this block's share of the next chunk's lines */
            for (size_t o = pf_bytes * (size_t)blk / (size_t)nblk & ~(size_t)63;
                 o < pf_bytes * (size_t)(blk + 1) / (size_t)nblk; o += 64)
                _mm_prefetch(pf + o, _MM_HINT_T1);
        if (j0 >= N16) { /* the last columns */
            for (int r = 0; r < R; r++)
                for (int64_t j = j0; j < N; j++) {
                    float sum = 0.0f;
                    for (int q = 0; q < kn; q++) sum += a[r][q] * ld(b + (size_t)q * ldb, bdt, j);
                    acc[(size_t)r * (size_t)N + j] += sum;
                }
            break;
        }
        __m256 lo[NN_REGS], hi[NN_REGS];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();
        const char *bk = b + (size_t)j0 * eb;
        for (int q = 0; q < kn; q++, bk += ldb) {
            const __m256 w0 = ld8(bk, bdt), w1 = ld8(bk + 8 * eb, bdt);
            for (int r = 0; r < R; r++) {
                const __m256 av = _mm256_broadcast_ss(&a[r][q]);
                lo[r] = _mm256_fmadd_ps(av, w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(av, w1, hi[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            float *o = acc + (size_t)r * (size_t)N + j0;
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), lo[r]));
            _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), hi[r]));
        }
    }
}

#endif
#if defined(__AVX512F__) || defined(V8)
static inline __attribute__((always_inline)) void nn_stream_dt(const char *b, const int bdt, size_t ldb, int64_t N,
                                                               int kn, const float a[][NN_KCHUNK], int R, float *acc,
                                                               const char *pf, size_t pf_bytes) {
    /* groups of up to NN_REGS rows, the chunk's weight rows read from L1 after the first group; the next chunk's
     * prefetches spread over the groups */
    const int ng = (R + NN_REGS - 1) / NN_REGS;
    for (int g = 0; g < ng; g++) {
        const int r0 = g * NN_REGS, G = R - r0 < NN_REGS ? R - r0 : NN_REGS;
        const size_t p0 = pf_bytes * (size_t)g / (size_t)ng & ~(size_t)63, p1 = pf_bytes * (size_t)(g + 1) / (size_t)ng;
        const char *pg = pf + p0;
        const size_t pn = p1 > p0 ? p1 - p0 : 0;
        float *ag = acc + (size_t)r0 * (size_t)N;
        switch (G) { /* (G constant in each: the sums stay in registers) */
        case 1: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 1, ag, pg, pn); break;
        case 2: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 2, ag, pg, pn); break;
        case 3: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 3, ag, pg, pn); break;
        case 4: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 4, ag, pg, pn); break;
        case 5: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 5, ag, pg, pn); break;
#if NN_REGS > 6
        case 6: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 6, ag, pg, pn); break;
        case 7: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 7, ag, pg, pn); break;
#endif
        default: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, NN_REGS, ag, pg, pn); break;
        }
    }
}
#endif

/* Partial sums of up to this many floats (16 KiB: the few-token step's few rows) live on the caller's stack. */
#ifndef NN_STACK_FLOATS
#define NN_STACK_FLOATS 4096
#endif

static int nn_stream(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *B, int bdt, int64_t Kd,
                     int64_t N, const int64_t *start, const int64_t *end, const int64_t *active, int64_t na, void *C,
                     int cdt, int64_t ldc, const int64_t *c_idx, int nt) {
    /* Thread t streams the units (weight rows, expert after expert) [cut[t], cut[t + 1]), cut where the units' cost
     * (an expert's rows plus NN_ROW_COST per weight row) is split evenly: experts of unequal rows (a router's) would
     * leave a split by units unbalanced. Its partial sums hold the rows of the experts its range touches, in order
     * (expert i's first at off[i] - off[span[2 t]], from poff[t]). */
    SCRATCH_ARRAY(int64_t, cut, nt + 1 + 2 * nt + na + 1 + nt, 256);
    if (!cut) return -5;
    int64_t *span = cut + nt + 1, *off = span + 2 * nt, *poff = off + na + 1; /* span: first and last expert */
    off[0] = 0;
    for (int64_t i = 0; i < na; i++) off[i + 1] = off[i] + end[active[i]] - start[active[i]];
#define NN_UNIT_COST(i) ((double)(off[(i) + 1] - off[i] + NN_ROW_COST)) /* of one weight row of active expert i */
    double cost = 0.0, before = 0.0; /* all units' cost; the cost of the experts before i */
    for (int64_t i = 0; i < na; i++) cost += (double)Kd * NN_UNIT_COST(i);
    cut[0] = 0;
    int t = 1;
    for (int64_t i = 0; i < na && t < nt; before += (double)Kd * NN_UNIT_COST(i), i++)
        for (double want; t < nt && before + (double)Kd * NN_UNIT_COST(i) >= (want = cost * t / nt); t++) {
            const int64_t u = i * Kd + (int64_t)((want - before) / NN_UNIT_COST(i) + 0.5);
            cut[t] = u < cut[t - 1] ? cut[t - 1] : u > na * Kd ? na * Kd : u;
        }
#undef NN_UNIT_COST
    for (; t <= nt; t++) cut[t] = na * Kd;
    size_t psize = 0;
    for (int t = 0; t < nt; t++) {
        span[2 * t] = cut[t] / Kd;
        span[2 * t + 1] = cut[t + 1] > cut[t] ? (cut[t + 1] - 1) / Kd : cut[t] / Kd - 1; /* empty range: no expert */
        poff[t] = (int64_t)psize;
        if (span[2 * t + 1] >= span[2 * t]) psize += (size_t)(off[span[2 * t + 1] + 1] - off[span[2 * t]]) * (size_t)N;
    }
    /* (a few rows' partial sums, a few-token step's: on the stack, no allocation) */
    SCRATCH_ARRAY(float, part, psize, NN_STACK_FLOATS);
    if (!part) {
        SCRATCH_FREE(cut);
        return -5;
    }
    const size_t eb = esize(bdt), ldb = (size_t)N * eb;
    const int64_t CB = 64; /* columns per block of the summing pass */
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int t = 0; t < nt; t++) {
            const int64_t u0 = cut[t], u1 = cut[t + 1];
            float *pt = part + poff[t] - (size_t)off[span[2 * t]] * (size_t)N;
#if defined(__AVX512F__) || defined(V8)
            float *wf = NULL; /* (bf16 rows: nn_stream_regs widens them itself) */
#else
            float *wf = bdt == DT_F32 ? NULL : malloc((size_t)NN_STREAM_STEP * (size_t)N * sizeof(float));
#endif
            for (int64_t u = u0; u < u1;) {
                const int64_t i = u / Kd, e = active[i], k0 = u % Kd, k1 = min64(Kd, k0 + (u1 - u));
                const int64_t s0 = start[e], R = end[e] - s0;
                float *acc = pt + (size_t)off[i] * (size_t)N;
                memset(acc, 0, (size_t)R * (size_t)N * sizeof(float));
                const char *be = (const char *)B + (size_t)e * (size_t)Kd * ldb;
                const void *ar[NN_FEW];
                for (int r = 0; r < R; r++) ar[r] = at(A, adt, lda, a_idx ? a_idx[s0 + r] : s0 + r, 0);
#if defined(__AVX512F__) || defined(V8)
                const int regs = bdt == DT_BF16 || R >= NN_REGS_MIN_F32;
                /* chunks of kch weight rows (contiguous: read once, in order, the next chunk prefetched),
                 * each column block's sums of all R rows in registers over the chunk. Measured on 2 Sapphire
                 * Rapids cores, Mixtral-like experts (weights in L3), against the steps below: bf16, 4 rows per
                 * expert g @ W_out 0.85 -> 0.42 ms, dH @ W_in 1.41 -> 0.81 ms; 7 rows 1.17 -> 0.54, 2.08 -> 1.03;
                 * fp32 4 rows 1.04 -> 0.64, 1.82 -> 1.60; fp32 single rows ~15% slower: they keep the steps */
                const int64_t kch = nn_kchunk(ldb, R, bdt);
                for (int64_t k = k0; k < k1 && regs; k += kch) {
                    const int kn = (int)min64(kch, k1 - k);
                    float a[NN_FEW][NN_KCHUNK];
                    for (int r = 0; r < R; r++)
                        for (int q = 0; q < kn; q++) a[r][q] = ld(ar[r], adt, k + q);
                    const char *b = be + (size_t)k * ldb;
                    const size_t next = k + kn < k1 ? (size_t)min64(kch, k1 - k - kn) * ldb : 0;
                    if (bdt == DT_F32) nn_stream_dt(b, DT_F32, ldb, N, kn, a, (int)R, acc, b + (size_t)kn * ldb, next);
                    else nn_stream_dt(b, DT_BF16, ldb, N, kn, a, (int)R, acc, b + (size_t)kn * ldb, next);
                }
                if (regs) {
                    u += k1 - k0;
                    continue;
                }
#endif
                for (int64_t k = k0; k < k1; k += NN_STREAM_STEP) {
                    const int kn = (int)min64(NN_STREAM_STEP, k1 - k);
                    float a[NN_FEW][NN_STREAM_STEP] = {{0.0f}};
                    for (int r = 0; r < R; r++)
                        for (int q = 0; q < kn; q++) a[r][q] = ld(ar[r], adt, k + q);
                    const char *b = be + (size_t)k * ldb;
                    if (bdt == DT_F32 || !wf) {
                        if (bdt == DT_F32) nn_stream_step(b, DT_F32, ldb, N, kn, a, (int)R, acc);
                        else nn_stream_step(b, DT_BF16, ldb, N, kn, a, (int)R, acc);
                    } else { /* bf16 rows converted once, not once per row of A */
                        for (int q = 0; q < kn; q++) {
                            const bf16 *bq = (const bf16 *)(b + (size_t)q * ldb);
                            float *o = wf + (size_t)q * (size_t)N;
#pragma omp simd
                            for (int64_t j = 0; j < N; j++) o[j] = bf16_to_f32(bq[j]);
                        }
                        nn_stream_step((const char *)wf, DT_F32, (size_t)N * 4, N, kn, a, (int)R, acc);
                    }
                }
                u += k1 - k0;
            }
            free(wf);
        }
#pragma omp for schedule(static)
        for (int64_t j0 = 0; j0 < N; j0 += CB) {
            const int64_t w = min64(CB, N - j0);
            for (int64_t i = 0; i < na; i++) {
                const int64_t e = active[i];
                for (int64_t s = start[e]; s < end[e]; s++) {
                    float sum[64] = {0.0f};
                    for (int t = 0; t < nt; t++) {
                        if (i < span[2 * t] || i > span[2 * t + 1]) continue;
                        const float *p =
                            part + poff[t] + (size_t)(off[i] - off[span[2 * t]] + s - start[e]) * (size_t)N + j0;
#pragma omp simd
                        for (int64_t j = 0; j < w; j++) sum[j] += p[j];
                    }
                    if (c_idx) {
                        float *o = (float *)C + (size_t)c_idx[s] * (size_t)ldc + j0;
#pragma omp simd
                        for (int64_t j = 0; j < w; j++) o[j] += sum[j];
                    } else {
                        void *o = at(C, cdt, ldc, s, j0);
                        for (int64_t j = 0; j < w; j++) st(o, cdt, j, sum[j]);
                    }
                }
            }
        }
    }
    SCRATCH_FREE(part);
    SCRATCH_FREE(cut);
    return 0;
}

static int small_nn(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *B, int bdt, int64_t Kd,
                    int64_t N, const int64_t *start, const int64_t *end, int64_t E, void *C, int cdt, int64_t ldc,
                    const int64_t *c_idx, int nthreads) {
    const int64_t NBLK = 16 * NNC;
    int64_t rows = 0, na = 0, most = 0; /* most: the rows of the largest expert */
    for (int64_t e = 0; e < E; e++) {
        rows += end[e] - start[e];
        na += end[e] > start[e];
        most = end[e] - start[e] > most ? end[e] - start[e] : most;
    }
    /* Work items of several tiles' columns (at most NN_ITEM_BYTES of each weight row): a row block of A is then
     * reused from cache by the item's tiles instead of being read again per NBLK columns. */
    const int nt = threads_for(gemm_work(rows, na, N, Kd), nthreads);
    if (na && most <= (bdt == DT_F32 ? NN_FEW : NN_FEW_BF16)) {
        SCRATCH_ARRAY(int64_t, active, na, 256);
        if (!active) return -5;
        for (int64_t e = 0, i = 0; e < E; e++)
            if (end[e] > start[e]) active[i++] = e;
        const int rc = nn_stream(A, adt, lda, a_idx, B, bdt, Kd, N, start, end, active, na, C, cdt, ldc, c_idx, nt);
        SCRATCH_FREE(active);
        return rc;
    }
    const size_t eb = esize(bdt);
    const int64_t IB = item_width(N, nt, NN_ITEMS_PER_THREAD, NBLK, NN_ITEM_BYTES / (int64_t)eb);
    const int64_t nb = (N + IB - 1) / IB;
    /* Passes over at most NN_KC reduction rows where their results can be summed in fp32 (C accumulated, or
     * written in fp32); a bf16 C is written once, from one pass over all of Kd. */
    const int64_t KC = (c_idx || cdt == DT_F32) ? min64(NN_KC, Kd) : Kd;
#pragma omp parallel num_threads(nt)
    {
        /* An expert with more than one row block first copies its item's columns of B, one pass of rows at a time,
         * into strips of NBLK columns, each contiguous ([strip][k][NBLK]): B's rows are N apart, and with N a
         * power of two (d_model) the tiles' column strips would all fall into the same few cache sets and be
         * evicted between row blocks. */
        char *pack = malloc((size_t)KC * (size_t)IB * eb);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nb; item++) {
            const int64_t i0 = item * IB, i1 = min64(i0 + IB, N), pw = i1 - i0;
            for (int64_t e = 0; e < E; e++) {
                if (end[e] <= start[e]) continue;
                const char *be = (const char *)B + (size_t)e * (size_t)Kd * (size_t)N * eb;
                const int packed = pack && end[e] - start[e] > NR;
                const int64_t kc = packed ? KC : Kd;
                for (int64_t k0 = 0; k0 < Kd; k0 += kc) {
                    const int64_t kn = min64(kc, Kd - k0);
                    if (packed) {
                        for (int64_t k = k0; k < k0 + kn; k++) { /* strided rows of a weight from memory: prefetched */
                            const char *bk = be + ((size_t)k * (size_t)N + (size_t)i0) * eb;
                            if (k + PACK_PF < Kd) prefetch_row(bk + (size_t)PACK_PF * (size_t)N * eb, pw * (int64_t)eb);
                            for (int64_t j = 0; j < pw; j += NBLK)
                                memcpy(pack + ((size_t)j * (size_t)kn + (size_t)(k - k0) * (size_t)NBLK) * eb,
                                       bk + (size_t)j * eb, (size_t)min64(NBLK, pw - j) * eb);
                        }
                    }
                    for (int64_t n0 = i0; n0 < i1; n0 += NBLK) {
                        const int64_t w = min64(NBLK, N - n0);
                        const char *bb = packed ? pack + (size_t)(n0 - i0) * (size_t)kn * eb
                                                : be + (size_t)k0 * (size_t)N * eb;
                        for (int64_t s = start[e]; s < end[e]; s += NR) {
                            const void *a[NR];
                            int R = (int)min64(NR, end[e] - s);
                            for (int r = 0; r < R; r++) a[r] = at(A, adt, lda, a_idx ? a_idx[s + r] : s + r, k0);
                            for (int64_t q = s + NR; q < min64(s + 2 * NR, end[e]); q++) { /* the next row block */
                                prefetch_row(at(A, adt, lda, a_idx ? a_idx[q] : q, k0), kn * (int64_t)esize(adt));
                                if (c_idx) prefetch_row((const float *)C + (size_t)c_idx[q] * (size_t)ldc + n0, w * 4);
                            }
                            float c[NR * 16 * NNC] __attribute__((aligned(64)));
                            nn_tile(a, adt, R, bb, bdt, packed ? NBLK : N, kn, packed ? 0 : n0, packed ? w : N, c);
                            for (int r = 0; r < R; r++) {
                                const float *cr = c + r * 16 * NNC;
                                if (c_idx || k0 > 0) { /* summed in fp32: C accumulates, or a later pass */
                                    float *o = c_idx ? (float *)C + (size_t)c_idx[s + r] * (size_t)ldc + n0
                                                     : (float *)at(C, DT_F32, ldc, s + r, n0);
#pragma omp simd
                                    for (int64_t j = 0; j < w; j++) o[j] += cr[j];
                                } else {
                                    void *o = at(C, cdt, ldc, s + r, n0);
                                    if (cdt == DT_F32) {
#pragma omp simd
                                        for (int64_t j = 0; j < w; j++) ((float *)o)[j] = cr[j];
                                    } else {
#pragma omp simd
                                        for (int64_t j = 0; j < w; j++) ((bf16 *)o)[j] = f32_to_bf16(cr[j]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        free(pack);
    }
    return 0;
}

#if defined(MOE_AMX)
/* Pack columns [n0, n0 + nw) of a [K, N] bf16 matrix (K a multiple of 32, nw of 16) into VNNI blocks: block
 * (nb, kb) at dst + (nb * K / 32 + kb) * 512, row p = the pairs (b[32 kb + 2 p, n], b[32 kb + 2 p + 1, n]) of its
 * 16 columns n. Block by block, each written whole (1 KiB in order), its 32 rows read from L1 after the first
 * column block brought them in, the next 32 rows prefetched a share per block. Row pair by row pair, every pair
 * wrote one line into each of the nw / 16 blocks, K / 32 KiB apart (all in one L1 set): on 2 Emerald Rapids cores
 * the data-gradient kernel on fine-grained experts 0.86-0.95x (g W_out and dH W_in, 16-1024 rows), Mixtral-like
 * 0.88-0.98x (16-256 rows); the layer's bf16 forward+backward at T = 128 0.97x (both shapes), T = 1024 0.99-1.02x. */
static void amx_pack_vnni(const bf16 *b, int64_t N, int64_t K, int64_t n0, int64_t nw, bf16 *dst) {
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const int64_t nbk = nw / 16;
    for (int64_t kb = 0; kb < K / 32; kb++) {
        const bf16 *rows = b + (size_t)(32 * kb) * (size_t)N + (size_t)n0;
        for (int64_t nb = 0; nb < nbk; nb++) {
            if (32 * kb + 32 < K)
                for (int64_t r = 32 * nb / nbk; r < 32 * (nb + 1) / nbk; r++)
                    prefetch_row(rows + (size_t)(32 + r) * (size_t)N, nw * 2);
            bf16 *o = dst + ((size_t)nb * (size_t)(K / 32) + (size_t)kb) * 512;
            for (int p = 0; p < 16; p++) {
                const bf16 *r0 = rows + (size_t)(2 * p) * (size_t)N + 16 * nb;
                const __m512i v0 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)r0));
                const __m512i v1 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(r0 + N)));
                _mm512_store_si512(o + 32 * p, _mm512_permutex2var_epi16(v0, idx, v1));
            }
        }
    }
}

/* moe_small_nn on the tiles, bf16 A and B, Kd a multiple of 32 and N of 16: each thread owns a range of columns (so
 * adding into C[c_idx[s]] is race-free and each row's sum runs in expert order), packs its columns of each expert's
 * B once, and runs the expert's rows over them 32 at a time (copied to a contiguous block, zero rows padding). */
static int amx_nn(const bf16 *A, int64_t lda, const int64_t *a_idx, const bf16 *B, int64_t Kd, int64_t N,
                  const int64_t *start, const int64_t *end, int64_t E, void *C, int cdt, int64_t ldc,
                  const int64_t *c_idx, int nthreads) {
    const int nt = gemm_threads(start, end, E, N, Kd, nthreads);
    const int64_t nblk = N / 16;
    int64_t a_rows = 0; /* (without a_idx) rows of A the segments cover: A has at least these */
    for (int64_t e = 0; e < E; e++) a_rows = end[e] > a_rows ? end[e] : a_rows;
    int err = 0;
#pragma omp parallel num_threads(nt) reduction(| : err)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t b0 = nblk * t / n, b1 = nblk * (t + 1) / n, n0 = 16 * b0, nw = 16 * (b1 - b0);
        bf16 *bp = nw ? aligned_alloc(64, (size_t)Kd * (size_t)nw * sizeof(bf16)) : NULL;
        bf16 *ap = aligned_alloc(64, (size_t)Kd * 32 * sizeof(bf16));
        if ((nw && !bp) || !ap) err = 1;
        else if (nw) {
            amx_config();
            for (int64_t e = 0; e < E; e++) {
                if (end[e] <= start[e]) continue;
                amx_pack_vnni(B + (size_t)e * (size_t)Kd * (size_t)N, N, Kd, n0, nw, bp);
                for (int64_t s0 = start[e]; s0 < end[e]; s0 += 32) {
                    const int64_t R = min64(32, end[e] - s0);
                    /* rows read in place where they are A's own consecutive rows and all 32 lie within the rows
                     * the segments cover (a row of the sums depends only on its own row of A, so rows past the
                     * expert's end only fill sums that are dropped); else copied, zero rows padding */
                    const bf16 *arows = ap;
                    int64_t ldr = Kd;
                    if (!a_idx && s0 + 32 <= a_rows) {
                        arows = A + (size_t)s0 * (size_t)lda;
                        ldr = lda;
                    } else {
                        for (int64_t r = 0; r < 32; r++) {
                            bf16 *dst = ap + (size_t)r * (size_t)Kd;
                            if (r < R) memcpy(dst, A + (size_t)(a_idx ? a_idx[s0 + r] : s0 + r) * (size_t)lda, (size_t)Kd * 2);
                            else memset(dst, 0, (size_t)Kd * 2);
                        }
                    }
                    for (int64_t jb = 0; jb < nw / 16; jb += 2) {
                        float c[4][256] __attribute__((aligned(64)));
                        const bf16 *p0 = bp + (size_t)jb * (size_t)Kd * 16;
                        const bf16 *p1 = jb + 1 < nw / 16 ? p0 + (size_t)Kd * 16 : NULL;
                        amx_tiles(arows, R > 16 ? arows + (size_t)16 * (size_t)ldr : NULL, ldr, p0, p1, Kd, c);
                        /* c[0]: rows 0-15 x block jb, c[1]: rows 0-15 x jb + 1, c[2], c[3]: rows 16-31 */
                        for (int64_t r = 0; r < R; r++)
                            for (int q = 0; q < 2 && jb + q < nw / 16; q++) {
                                const __m512 v = _mm512_load_ps(c[(r >= 16 ? 2 : 0) + q] + 16 * (r % 16));
                                const int64_t col = n0 + 16 * (jb + q);
                                if (c_idx) {
                                    float *o = (float *)C + (size_t)c_idx[s0 + r] * (size_t)ldc + col;
                                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), v));
                                } else {
                                    st16(at(C, cdt, ldc, s0 + r, col), cdt, 0xffff, v);
                                }
                            }
                    }
                }
            }
            _tile_release();
        }
        free(bp);
        free(ap);
    }
    return err ? -5 : 0;
}
#endif

int moe_small_nn(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *B, int bdt, int64_t Kd,
                 int64_t N, const int64_t *start, const int64_t *end, int64_t E, void *C, int cdt, int64_t ldc,
                 const int64_t *c_idx, int64_t packed_min, int nthreads) {
    /* experts of at least packed_min rows on the AMX tiles (bf16, whole 32-element steps) or the packed tiles
     * (AVX2 builds; float32 on AVX-512), the others on the dot-product tiles */
    int fast = 0; /* 1: AMX tiles, 2: packed tiles */
#if defined(MOE_AMX)
    fast = adt == DT_BF16 && bdt == DT_BF16 && Kd % 32 == 0 && N % 16 == 0 && amx_ready();
#endif
#if defined(MOE_GK)
    if (!fast && gk_serves(adt) && gk_serves(bdt)) fast = 2;
#endif
    int64_t n = 0;
    int64_t *seg = fast ? split_experts(start, end, E, packed_min, 1, 0, &n) : NULL;
    if (n < 0) return -5;
    if (!seg) return small_nn(A, adt, lda, a_idx, B, bdt, Kd, N, start, end, E, C, cdt, ldc, c_idx, nthreads);
    int rc = -1;
#if defined(MOE_AMX)
    if (fast == 1) rc = amx_nn(A, lda, a_idx, B, Kd, N, seg + 2 * E, seg + 3 * E, E, C, cdt, ldc, c_idx, nthreads);
#endif
#if defined(MOE_GK)
    if (fast == 2)
        rc = packed_nn(A, adt, lda, a_idx, B, bdt, Kd, N, seg + 2 * E, seg + 3 * E, E, C, cdt, ldc, c_idx, nthreads);
#endif
    if (rc == 0 && n < E) rc = small_nn(A, adt, lda, a_idx, B, bdt, Kd, N, seg, seg + E, E, C, cdt, ldc, c_idx, nthreads);
    free(seg);
    return rc;
}

#ifndef OTN
#if defined(V8)
#define OTN 6 /* rows of G per tile of the outer-product kernel (V8: 6 rows x 2 vectors, 12 accumulators) */
#else
#define OTN 4 /* rows of G per tile of the outer-product kernel */
#endif
#endif

#if defined(__AVX512BF16__)
/* The bf16 x bf16 outer-product tile with the pair dot product: rows s and s + 1 of B are interleaved
 * ([b_s[k], b_s+1[k]] in each 32-bit lane) and each A pair [a_s[n], a_s+1[n]] is broadcast, so one vdpbf16ps adds
 * both rows' products for 16 columns k (an odd last row pairs with zeros). acc[i][q] += sum_s A[s, n0 + i] *
 * B[s, k0 + 16 q + lane]. */
static inline __attribute__((always_inline)) void outer_bf16_pairs(
    const void *A, int64_t lda, const int64_t *a_idx, const void *B, int64_t ldb, const int64_t *b_idx, int64_t N,
    int64_t Kd, int64_t n0, int64_t k0, int64_t s0, int64_t s1, __m512 acc[OTN][NC]) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    __mmask32 mk[NC / 2];
    UNROLL for (int q = 0; q < NC / 2; q++) {
        int64_t left = Kd - k0 - 32 * q;
        mk[q] = left >= 32 ? (__mmask32)0xffffffffu : left <= 0 ? (__mmask32)0 : (__mmask32)((1u << left) - 1);
    }
    for (int64_t s = s0; s < s1; s += 2) {
        const int two = s + 1 < s1;
        const uint16_t *a0 = (const uint16_t *)A + (size_t)(a_idx ? a_idx[s] : s) * (size_t)lda;
        const uint16_t *a1 = two ? (const uint16_t *)A + (size_t)(a_idx ? a_idx[s + 1] : s + 1) * (size_t)lda : a0;
        const bf16 *b0 = (const bf16 *)B + (size_t)(b_idx ? b_idx[s] : s) * (size_t)ldb + k0;
        const bf16 *b1 = two ? (const bf16 *)B + (size_t)(b_idx ? b_idx[s + 1] : s + 1) * (size_t)ldb + k0 : b0;
        __m512i bp[NC];
        UNROLL for (int q = 0; q < NC / 2; q++) {
            __m512i v0 = _mm512_maskz_loadu_epi16(mk[q], b0 + 32 * q);
            __m512i v1 = two ? _mm512_maskz_loadu_epi16(mk[q], b1 + 32 * q) : _mm512_setzero_si512();
            bp[2 * q] = _mm512_permutex2var_epi16(v0, lo, v1);
            bp[2 * q + 1] = _mm512_permutex2var_epi16(v0, hi, v1);
        }
        UNROLL for (int i = 0; i < OTN; i++) {
            uint32_t p = 0;
            if (n0 + i < N) p = (uint32_t)a0[n0 + i] | (two ? (uint32_t)a1[n0 + i] << 16 : 0u);
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)p);
            UNROLL for (int q = 0; q < NC; q++) acc[i][q] = _mm512_dpbf16_ps(acc[i][q], av, (__m512bh)bp[q]);
        }
    }
}
#endif


#if defined(V8)
/* acc[i][q] += sum_s A[ia(s), n0 + i] * B[ib(s), c0 + 8 q + lane] for a whole tile (OTN rows of G, 16 columns),
 * dtypes constant at each call (outer8_full). */
static inline __attribute__((always_inline)) void outer8_tile(const void *A, const int adt, int64_t lda,
                                                              const int64_t *a_idx, const void *B, const int bdt,
                                                              int64_t ldb, const int64_t *b_idx, int64_t n0,
                                                              int64_t c0, int64_t s0, int64_t s1, __m256 acc[OTN][2]) {
    for (int64_t s = s0; s < s1; s++) {
        const char *ar = at(A, adt, lda, a_idx ? a_idx[s] : s, n0);
        const char *br = at(B, bdt, ldb, b_idx ? b_idx[s] : s, c0);
        const __m256 b0 = ld8(br, bdt), b1 = ld8(br + 8 * esize(bdt), bdt);
        UNROLL for (int i = 0; i < OTN; i++) {
            const __m256 av = _mm256_set1_ps(ld(ar, adt, i));
            acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
        }
    }
}

/* Store an outer-product tile: rows n0 .. n0 + nn of G (nn <= OTN), columns c0 .. c0 + min(16, left), written once
 * with streaming stores. */
static inline __attribute__((always_inline)) void outer8_store(char *ge, int gdt, int64_t Kd, int64_t n0, int64_t nn,
                                                               int64_t c0, int64_t left, __m256 acc[OTN][2]) {
    UNROLL for (int i = 0; i < OTN; i++) {
        if (i >= nn) continue;
        st8x2(at(ge, gdt, Kd, n0 + i, c0), gdt, acc[i][0], acc[i][1], min64(16, left), 1);
    }
}

/* bf16 weight gradients on AVX2: the kernel's 16-column strips of G come in pairs, the first one's rows held
 * (converted) until the second's are done, then each row's 64-byte run written at once, streamed where whole and
 * aligned (no read-for-ownership of the line; a half-written line streamed would cost a partial write). Measured on
 * Zen 3 (2 threads, paired), Mixtral-like experts against one plain 32-byte store per strip: dH^T x of 3-16 rows
 * per expert 0.77-0.90x, 32 rows 0.93x; g^T (w a) 0.89-0.96x. (Experts of one or two rows, whose rows of G are
 * written one after another, keep plain stores: streamed lines measured 1.35-1.5x there.) */
#ifndef OUTER_BF16_LINES
#define OUTER_BF16_LINES 1
#endif
/* The 64-byte run at o of a bf16 row of G: its first 16 values held (cvt8x2_bf16), then the left (> 0) of lo, hi. */
static inline __attribute__((always_inline)) void bf16_line(char *o, __m256i held, __m256 lo, __m256 hi,
                                                           int64_t left) {
    if (left >= 16 && ((uintptr_t)o & 63) == 0) {
        _mm256_stream_si256((__m256i *)o, held);
        _mm256_stream_si256((__m256i *)(o + 32), cvt8x2_bf16(lo, hi));
    } else {
        _mm256_storeu_si256((__m256i *)o, held);
        st8x2(o + 32, DT_BF16, lo, hi, min64(16, left), 0);
    }
}
/* float32 G (AVX2): each block of OTN rows summed, OUTER_BUF_COLS columns at a time, into a buffer in L1 with plain
 * stores, then streamed out row by row, rather than each 16-column strip streamed from its registers (the
 * multiply-adds then wait on the streaming stores: one Zen 3 core, 6 x 512 blocks, 3-16 rows per expert, 0.68-0.78x
 * the time as a loop alone). Measured on Zen 3 (2 threads, paired, from memory), the kernel on Mixtral-like dH^T x
 * (rows of 512) with 512-column buffers: 4 rows 0.77x, 8 rows 0.71x, 32 rows 0.88x; fine-grained 16 rows 0.90x and
 * 0.94x; rows of 1408 (g^T (w a)) 1.03-1.13x with 512-column buffers (the buffer and the expert's packed rows
 * overflow L1), 1.10-1.15x with whole rows, but 0.80x (4 rows), 0.97x (8) and 0.98x (32) with 128-column ones,
 * which against 512 columns took 0.97-0.98x on the rows of 512 and 256 too (256 columns 0.98-1.00x, 64 0.85-1.00x
 * on rows of 1408). The layer's fp32 forward+backward (512-column buffers, rows of up to 512): Mixtral-like
 * T = 16 0.93x, T = 1024 0.97x, T = 128 1.01x; fine-grained T = 16 0.98x, T = 128 0.95x, T = 1024 0.98x; then
 * 128-column buffers on every row length against that: Mixtral-like T = 16 0.965x, T = 128 and 1024 1.00x,
 * fine-grained T = 1024 1.00x. The same bits. */
/* An item packs its block of OTN columns of A with the next OUTER_AP_GROUP - 1 (one pass over the expert's rows,
 * each row's few lines read once from L1 for all of them, where a block per item read them again from L2 or L3 after
 * every item's strips had streamed B through L1), and the strips prefetch B OUTER_PF floats (2 KiB) ahead into L1.
 * Measured on Zen 3 (2 threads, paired, weights and gradients from memory), both together against neither:
 * fine-grained experts of 16 rows 0.94-0.97x, 128 rows 0.91-0.96x, 1024 rows 0.93-0.97x; Mixtral-like 32 rows
 * 0.96-0.97x, 256 rows 0.96-0.97x (dH^T x and g^T (w a) alike; the prefetch 256-1024 floats ahead the same within
 * noise, 8 blocks per pass as 4). The same bits. */
#ifndef OUTER_AP_GROUP
#define OUTER_AP_GROUP 4
#endif
#ifndef OUTER_PF
#define OUTER_PF 512
#endif
#ifndef OUTER_BUF
#define OUTER_BUF 1
#endif
#ifndef OUTER_BUF_COLS
#define OUTER_BUF_COLS 128
#endif
/* Rows n0 .. n0 + nn of G from the expert's Se rows packed: ap ([Se][OTN]) and bp (column strips [Kd / 16][Se][16]),
 * 16 columns at a time (out of line: inside the work loop, GCC reloaded a dozen values from the stack per strip).
 * For float32 G the loop over the Se rows is unrolled by 4: with a few dozen rows per strip its branch and exit
 * weighed (Zen 3, 2 threads, paired runs, the same bits: dH^T x and g^T (w a) of 4-128 rows per expert 0.90-0.99x,
 * mean 0.96x over 13 runs; by 8 the same within noise; the layer's fp32 training steps at T = 128 0.99x, fine-
 * grained T = 1024 0.96x). bf16 G keeps the plain loop (unrolled: 4 rows per expert 1.00-1.12x, mean 1.05x). */
static __attribute__((noinline)) void outer8_strips(const float *bp, const float *ap, int64_t Se, int64_t Kd, char *ge,
                                                    int gdt, int64_t n0, int64_t nn) {
    __m256i held[OTN]; /* bf16 G: each row's first half of a 64-byte run, converted (set before it is read) */
    UNROLL for (int i = 0; i < OTN; i++) held[i] = _mm256_setzero_si256();
    float buf[OUTER_BUF ? OTN : 1][OUTER_BUF ? OUTER_BUF_COLS : 16] __attribute__((aligned(64)));
    const int buffered = OUTER_BUF && gdt == DT_F32;
    for (int64_t c0 = 0, cb = 0; c0 < Kd; c0 += 16) {
        const int64_t left = Kd - c0;
        const float *b = bp + (size_t)(c0 / 16) * (size_t)Se * 16, *a = ap;
        __m256 acc[OTN][2];
        UNROLL for (int i = 0; i < OTN; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
#define OUTER8_ROW                                                                                                 \
    {                                                                                                              \
        if (OUTER_PF) _mm_prefetch((const char *)(b + OUTER_PF), _MM_HINT_T0);                                     \
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);                                         \
        UNROLL for (int i = 0; i < OTN; i++) {                                                                     \
            const __m256 av = _mm256_broadcast_ss(a + i);                                                          \
            acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);                                                        \
            acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);                                                        \
        }                                                                                                          \
    }
        if (gdt == DT_F32) {
#pragma GCC unroll 4
            for (int64_t s = 0; s < Se; s++, b += 16, a += OTN) OUTER8_ROW
        } else
            for (int64_t s = 0; s < Se; s++, b += 16, a += OTN) OUTER8_ROW
#undef OUTER8_ROW
        if (buffered) { /* the strip into the buffer; whole buffers of columns out to G */
            UNROLL for (int i = 0; i < OTN; i++) {
                _mm256_store_ps(buf[i] + (c0 - cb), acc[i][0]);
                _mm256_store_ps(buf[i] + (c0 - cb) + 8, acc[i][1]);
            }
            if (c0 + 16 - cb == OUTER_BUF_COLS || c0 + 16 >= Kd) {
                const int64_t cols = min64(c0 + 16, Kd) - cb;
                for (int i = 0; i < nn; i++) {
                    float *g = (float *)at(ge, DT_F32, Kd, n0 + i, cb);
                    int64_t c = 0;
                    if (((uintptr_t)g & 31) == 0)
                        for (; c + 8 <= cols; c += 8) _mm256_stream_ps(g + c, _mm256_load_ps(buf[i] + c));
                    for (; c < cols; c++) g[c] = buf[i][c];
                }
                cb = c0 + 16;
            }
            continue;
        }
        if (OUTER_BF16_LINES && gdt == DT_BF16 && (c0 & 31) == 0 && left > 16) { /* held for the next strip */
            UNROLL for (int i = 0; i < OTN; i++) held[i] = cvt8x2_bf16(acc[i][0], acc[i][1]);
            continue;
        }
        if (OUTER_BF16_LINES && gdt == DT_BF16 && (c0 & 31) == 16) { /* a whole line per row */
            UNROLL for (int i = 0; i < OTN; i++)
                if (i < nn) bf16_line(at(ge, gdt, Kd, n0 + i, c0 - 16), held[i], acc[i][0], acc[i][1], left);
            continue;
        }
        outer8_store(ge, gdt, Kd, n0, nn, c0, left, acc);
    }
}

static void outer8_full(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *B, int bdt, int64_t ldb,
                        const int64_t *b_idx, int64_t n0, int64_t c0, int64_t s0, int64_t s1, __m256 acc[OTN][2]) {
#define OUTER8(ad, bd) outer8_tile(A, ad, lda, a_idx, B, bd, ldb, b_idx, n0, c0, s0, s1, acc)
    if (adt == DT_F32 && bdt == DT_F32) OUTER8(DT_F32, DT_F32);
    else if (adt == DT_F32) OUTER8(DT_F32, DT_BF16);
    else if (bdt == DT_F32) OUTER8(DT_BF16, DT_F32);
    else OUTER8(DT_BF16, DT_BF16);
#undef OUTER8
}
#endif

#if defined(MOE_AMX)
#ifndef AMX_OUTER_GROUP_BYTES
#define AMX_OUTER_GROUP_BYTES (16 << 20) /* packed operands of the experts that run in one phase, at most */
#endif
#ifndef AMX_OUTER_B_BYTES
#define AMX_OUTER_B_BYTES (1 << 20) /* packed rows of B that amx_outer's 2 x 2 items keep in L2 at a time */
#endif
/* Rows per expert (padded to 32) up to which amx_outer's items are 1 x 4 tiles (see amx_tiles_outer): 5 tile loads
 * per 4 multiplies instead of 4, but each row of G gets two whole lines per visit, and where an expert's few K
 * steps make the gradient's stores the bound, that wins. Raised from 64 (2 Emerald Rapids cores, paired): 64
 * fine-grained experts of 112-144 rows, the kernel 0.77-0.83x; the layer's bf16 forward+backward fine-grained
 * T = 512 and 1024 0.95x, Mixtral-like T = 512 (128 rows per expert) 0.92x; Mixtral-like experts of 256 rows within
 * 1.5% either way, of 512 or more rows 1.05-1.18x the time as 1 x 4. */
#ifndef AMX_OUTER_WIDE_ROWS
#define AMX_OUTER_WIDE_ROWS 192
#endif
/* The weight-gradient kernel (moe_small_outer) on the tiles, bf16 A and B, N and Kd multiples of 16, per expert:
 * its rows of A transposed into [N / 16][Mp / 32] blocks of 16 x 32 (Mp: its rows padded to a multiple of 32 with
 * zeros; each 32 x 16 block of A made of pair-interleaved rows, then a 16 x 16 transpose of 32-bit pairs), its rows
 * of B into pair-interleaved blocks [Kd / 16][Mp / 32][16 pairs][16][2]; then G[e] tile by tile, 2 x 2 tiles of
 * 16 x 16 at a time (1 x 4 for experts of at most AMX_OUTER_WIDE_ROWS rows) over all of its rows, written once
 * (non-temporal stores). Each tile load of either operand is then 1 KiB in one piece: A^T as an [N, Mp] matrix had
 * its tiles' 16 rows Mp elements apart (4 KiB with 2048 rows: 16 pages, one L1 set), and one Mixtral-like expert
 * of 2048 rows took 0.89x (dH^T X) and 0.90x (g^T w a) the time this way, the layer's bf16 forward+backward at
 * T = 8192 0.95x, T = 1024 0.97x (2 Emerald Rapids cores, paired); fine-grained the same either way. */
#ifndef AMX_OUTER_PRIVATE_BYTES
#define AMX_OUTER_PRIVATE_BYTES (2 << 20) /* an expert's packed operands up to which one thread runs all of it */
#endif

/* Pack item (mc, blk) of one expert (rows s0 .. s0 + R of A and B, packed buffer at: its transpose of A in
 * [N / 16][Mp / 32] tiles, then B's blocks): block blk of N / 16 column blocks of A, then Kd / 16 of B, of its
 * 32-row chunk mc. */
static inline __attribute__((always_inline)) void amx_outer_pack(const bf16 *A, int64_t lda, const int64_t *a_idx,
                                                                 const bf16 *B, int64_t ldb, const int64_t *b_idx,
                                                                 int64_t s0, int64_t R, int64_t N, int64_t Mp,
                                                                 int64_t mc, int64_t blk, bf16 *at) {
    const __m512i ix = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const int64_t nn = N / 16, nm = Mp / 32;
    bf16 *bv = at + (size_t)N * (size_t)Mp;
    const int isa = blk < nn;
    const bf16 *src = isa ? A : B;
    const int64_t ld = isa ? lda : ldb, c0 = 16 * (isa ? blk : blk - nn);
    const int64_t *idx = isa ? a_idx : b_idx;
    __m512i v[16];
    for (int p = 0; p < 16; p++) {
        const int64_t r0 = 32 * mc + 2 * p, r1 = r0 + 1;
        __m512i x0 = _mm512_setzero_si512(), x1 = _mm512_setzero_si512();
        if (r0 < R)
            x0 = _mm512_castsi256_si512(_mm256_loadu_si256(
                (const __m256i *)(src + (size_t)(idx ? idx[s0 + r0] : s0 + r0) * (size_t)ld + c0)));
        if (r1 < R)
            x1 = _mm512_castsi256_si512(_mm256_loadu_si256(
                (const __m256i *)(src + (size_t)(idx ? idx[s0 + r1] : s0 + r1) * (size_t)ld + c0)));
        v[p] = _mm512_permutex2var_epi16(x0, ix, x1); /* [(src[r0][c], src[r1][c]) for 16 c] */
    }
    if (isa) { /* rows c0..c0+15 of the transpose, columns 32 mc..: one 16 x 32 block, whole */
        tr16x16(v);
        bf16 *dst = at + ((size_t)(c0 / 16) * (size_t)nm + (size_t)mc) * 512;
        for (int n = 0; n < 16; n++) _mm512_store_si512(dst + 32 * n, v[n]);
    } else {
        bf16 *dst = bv + ((size_t)(c0 / 16) * (size_t)nm + (size_t)mc) * 512;
        for (int p = 0; p < 16; p++) _mm512_store_si512(dst + 32 * p, v[p]);
    }
}

/* Tile items of an expert of Mp packed rows. */
static inline int64_t amx_outer_items(int64_t N, int64_t Kd, int64_t Mp) {
    const int64_t nn = N / 16, nk = Kd / 16;
    return Mp <= AMX_OUTER_WIDE_ROWS ? nn * ((nk + 3) / 4) : ((nn + 1) / 2) * ((nk + 1) / 2);
}

/* Tile item `local` of an expert (packed buffer at, Mp rows, its gradient ge): its sums into c, then st set up to
 * run their epilogue (during the thread's next item, or its drain). */
static inline __attribute__((always_inline)) void amx_outer_item(const bf16 *at, int64_t N, int64_t Kd, int64_t Mp,
                                                                 int64_t local, char *ge, float c[4][256],
                                                                 amx_epi *st) {
    const int64_t nn = N / 16, nk = Kd / 16, nm = Mp / 32;
    const bf16 *bv = at + (size_t)N * (size_t)Mp;
    int64_t n0, k0;
    int nq, nu;
    if (Mp <= AMX_OUTER_WIDE_ROWS) {
        const int64_t nq4 = (nk + 3) / 4;
        n0 = 16 * (local / nq4), k0 = 64 * (local % nq4), nq = (int)min64(4, nk - k0 / 16), nu = 16;
        const bf16 *p[4];
        for (int q = 0; q < 4; q++) p[q] = bv + (size_t)(k0 / 16 + (q < nq ? q : 0)) * (size_t)nm * 512;
        amx_tiles_outer(at + (size_t)(n0 / 16) * (size_t)nm * 512, p, nq, Mp, c, st);
    } else { /* where B's packed rows exceed 2 AMX_OUTER_B_BYTES, in chunks of column pairs whose rows of B fit
              * AMX_OUTER_B_BYTES, each chunk's items row pair by row pair: the chunk's B stays in L2 while A's row
              * pairs stream once per chunk (all of B per row pair, 5.5 MiB for a Mixtral-like expert's dW_out of
              * 2048 rows, came from L3 every time: 2.19 -> 1.49 ms on 2 Emerald Rapids cores; 0.5 or 2 MiB chunks
              * 1.62 and 1.98 ms; its dW_in, whose B is 2 MiB, 1.04x in 1 MiB chunks, as each chunk reads all of A) */
        const int64_t nkp = (nk + 1) / 2,
                      kch = 64 * Mp * nkp <= 2 * AMX_OUTER_B_BYTES ? nkp : max64(1, AMX_OUTER_B_BYTES / (64 * Mp));
        const int64_t ch = local / (((nn + 1) / 2) * kch), w = local % (((nn + 1) / 2) * kch),
                      ks = min64(kch, nkp - ch * kch);
        n0 = 32 * (w / ks), k0 = 32 * (ch * kch + w % ks);
        nq = k0 + 16 < Kd ? 2 : 1, nu = n0 + 16 < N ? 32 : 16;
        const bf16 *p0 = bv + (size_t)(k0 / 16) * (size_t)nm * 512;
        const bf16 *a0 = at + (size_t)(n0 / 16) * (size_t)nm * 512;
        amx_tiles_epi(a0, nu == 32 ? a0 + (size_t)nm * 512 : NULL, 32, 512, p0,
                      nq == 2 ? p0 + (size_t)nm * 512 : NULL, Mp, c, st, AMX_EPI_OUTER, NULL, NULL, 0);
    }
    st->c = (const float (*)[256])c;
    st->ge = ge;
    st->gn0 = n0;
    st->k0 = k0;
    st->nq = nq;
    st->nu = nu;
}

/* Experts whose packed operands fit AMX_OUTER_PRIVATE_BYTES (a Xeon core's L2) each run on one thread, taken in
 * turn: it packs them into its own buffer, which then stays in its L2 while all of the expert's tiles read it.
 * Packed together by all threads in groups of up to 16 MiB before any tile ran, they had their tiles read from L3:
 * on 2 Emerald Rapids cores (same process, paired), the kernel alone on 64 fine-grained experts of 128 rows 0.85-
 * 0.89x, of 16 rows 0.91-0.97x; the layer's bf16 forward+backward, fine-grained T = 128 0.94x, T = 1024 0.86x, T =
 * 8192 0.97x, Mixtral-like T = 1024 0.92x (1 MiB: 1.00x there, its experts' 1.7 MiB not taken; 3 and 4 MiB as 2).
 * The larger experts run in groups of consecutive experts packed together (up to AMX_OUTER_GROUP_BYTES, at least
 * one expert), all threads packing a group and then running its tiles: one pack phase and one tile phase per
 * group. */
static int amx_outer(const bf16 *A, int64_t lda, const int64_t *a_idx, const bf16 *B, int64_t ldb, const int64_t *b_idx,
                     int64_t N, int64_t Kd, const int64_t *start, const int64_t *end, int64_t E, void *G, int gdt,
                     int nthreads) {
    const int64_t nn = N / 16, nk = Kd / 16;
    /* per shared expert (cumulative, [E + 1]; private ones add nothing): packed elements, pack items, tile items;
     * the groups' first and end experts; the private experts */
    int64_t *cum = malloc((size_t)(6 * (E + 1)) * sizeof(int64_t));
    if (!cum) return -5;
    int64_t *el = cum, *pk = cum + (E + 1), *ck = cum + 2 * (E + 1), *grp = cum + 3 * (E + 1),
            *gend = cum + 4 * (E + 1), *priv = cum + 5 * (E + 1);
    int64_t ng = 0, np = 0, work = 0, priv_max = 0;
    el[0] = pk[0] = ck[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t R = end[e] - start[e], Mp = R > 0 ? (R + 31) / 32 * 32 : 0, elems = Mp * (N + Kd);
        const int own = R > 0 && elems * (int64_t)sizeof(bf16) <= AMX_OUTER_PRIVATE_BYTES;
        if (own) {
            priv[np++] = e;
            priv_max = elems > priv_max ? elems : priv_max;
        }
        el[e + 1] = el[e] + (own ? 0 : Mp * (N + Kd));
        pk[e + 1] = pk[e] + (own ? 0 : Mp / 32 * (nn + nk));
        ck[e + 1] = ck[e] + (R > 0 && !own ? amx_outer_items(N, Kd, Mp) : 0);
        work += R > 0 ? N * Kd : 0;
    }
    int64_t buf_max = 0;
    for (int64_t g0 = 0; g0 < E;) {
        int64_t g1 = g0 + 1;
        while (g1 < E && (el[g1 + 1] - el[g0]) * (int64_t)sizeof(bf16) <= AMX_OUTER_GROUP_BYTES) g1++;
        if (ck[g1] > ck[g0]) grp[ng] = g0, gend[ng++] = g1; /* (a group of private experts only has nothing to run) */
        buf_max = el[g1] - el[g0] > buf_max ? el[g1] - el[g0] : buf_max;
        g0 = g1;
    }
    if (!work) {
        free(cum);
        return 0;
    }
    const int nt = threads_for(work / 4, nthreads);
    bf16 *buf = aligned_alloc(64, (size_t)(buf_max + nt * priv_max + 32) * sizeof(bf16));
    if (!buf) {
        free(cum);
        return -5;
    }
#pragma omp parallel num_threads(nt)
    {
        amx_config();
        /* each item's rows are stored while the thread's next item's tiles run, as in amx_up */
        float cb[2][4][256] __attribute__((aligned(64)));
        amx_epi epi = {.gdt = gdt, .Kd = Kd}, *st = &epi;
        int cur = 0;
        bf16 *own = buf + (buf_max + 31) / 32 * 32 + (size_t)omp_get_thread_num() * (size_t)((priv_max + 31) / 32 * 32);
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t i = 0; i < np; i++) {
            const int64_t e = priv[i], s0 = start[e], R = end[e] - s0, Mp = (R + 31) / 32 * 32;
            char *ge = (char *)G + (size_t)e * (size_t)N * (size_t)Kd * esize(gdt);
            for (int64_t mc = 0; mc < Mp / 32; mc++)
                for (int64_t blk = 0; blk < nn + nk; blk++)
                    amx_outer_pack(A, lda, a_idx, B, ldb, b_idx, s0, R, N, Mp, mc, blk, own);
            for (int64_t local = 0, ni = amx_outer_items(N, Kd, Mp); local < ni; local++) {
                amx_outer_item(own, N, Kd, Mp, local, ge, cb[cur], st);
                cur ^= 1;
            }
        }
        for (int64_t g = 0; g < ng; g++) {
            const int64_t g0 = grp[g], g1 = gend[g];
            amx_epi_drain(st, AMX_EPI_OUTER); /* (the pack loop runs no tiles for pending units to overlap) */
            /* pack: one item per (expert, 32-row chunk, 16-column block) of A and of B */
#pragma omp for schedule(static)
            for (int64_t item = pk[g0]; item < pk[g1]; item++) {
                const int64_t e = seg_find(pk, g0, g1 - 1, item); /* the expert */
                const int64_t s0 = start[e], R = end[e] - s0, Mp = (R + 31) / 32 * 32, local = item - pk[e];
                amx_outer_pack(A, lda, a_idx, B, ldb, b_idx, s0, R, N, Mp, local / (nn + nk), local % (nn + nk),
                               buf + (el[e] - el[g0]));
            }
#pragma omp for schedule(static)
            for (int64_t item = ck[g0]; item < ck[g1]; item++) {
                const int64_t e = seg_find(ck, g0, g1 - 1, item); /* the expert */
                const int64_t Mp = (end[e] - start[e] + 31) / 32 * 32;
                amx_outer_item(buf + (el[e] - el[g0]), N, Kd, Mp, item - ck[e],
                               (char *)G + (size_t)e * (size_t)N * (size_t)Kd * esize(gdt), cb[cur], st);
                cur ^= 1;
            }
        }
        amx_epi_drain(st, AMX_EPI_OUTER);
        _mm_sfence();
        _tile_release();
    }
    free(buf);
    free(cum);
    return 0;
}
#endif

#ifndef OUTER_STACK_K
#define OUTER_STACK_K 2048 /* floats of a packed B row, at most, where an expert's rows are packed on the stack */
#endif
#define OUTER_PACK_MAX (4 << 20) /* bytes of an expert's packed rows of B, at most (else read in place) */
/* Experts of OUTER_FEW rows or fewer write G row by row, each row with its broadcasts hoisted and its pointer walked
 * (a loop that tested the dtype and the tail, and recomputed the row's address, at every 64 bytes written, a few
 * cycles each against a handful of multiply-adds, took 1.7-2.5x the time). The same bits. Measured on Zen 3 (2
 * threads, paired, weights and gradients from memory), the kernel on Mixtral-like experts: 1 row 0.40-0.43x, 2 rows
 * 0.53-0.58x; the layer's forward+backward: fp32 T = 1 0.89-0.94x, T = 4 0.84-0.94x, fine-grained T = 16 0.88x;
 * bf16 T = 1 0.90-0.93x, fine-grained T = 16 0.92x. */
#ifndef OUTER_FEW
#define OUTER_FEW 2 /* rows per expert up to which the outer-product kernel writes G row by row */
#endif
/* G[e, n, k] = sum_{s in expert e} A[ia(s), n] * B[ib(s), k]   for experts with rows (others untouched), G [E, N, Kd]
 * contiguous in dtype gdt; ia(s) = a_idx ? a_idx[s] : s, likewise ib. Work items are (expert, block of 4 rows of
 * G), each written once. */
#if defined(__AVX512F__)
/* Rows per expert up to which outer_regs writes the weight gradients: float32 up to OUTER_REG_ROWS while the
 * expert's rows of B fit OUTER_REG_BYTES (a share of L2), bf16 (where AMX takes the others) up to OUTER_REG_ROWS_BF16.
 * Measured on 2 Xeon (Sapphire Rapids) cores, fp32 against the tiles below: 1 row per expert 1.55 -> 1.37 ms (Mixtral-
 * like dW_in), 4 rows 2.11 -> 1.41, 7 rows 2.78 -> 1.58; g^T a of fine-grained experts with 16 rows 3.48 -> 2.68
 * ms, 64 rows 8.6 -> 7.3 ms, 128 rows 21.8 -> 18.0 ms; Mixtral-like 32 rows 3.70 -> 2.70 ms, 64 rows 7.9 -> 5.8
 * ms, 128 rows 16.0 -> 11.7 ms, 256 rows 36.4 -> 28.8 ms. */
#define OUTER_REG_ROWS 256
#define OUTER_REG_BYTES (3 << 19)
#define OUTER_REG_ROWS_BF16 4
/* G[e] = A[rows of e]^T B[rows of e] where no expert has more rows than above: each element of G is a short sum,
 * and the work is mostly writing G. An item is OUTER_G_ROWS rows of one expert's G; its expert's rows of B are
 * widened into a per-thread buffer once, and each 32 columns of the item's rows are summed over the R rows in
 * registers (16 sums) and written with non-temporal stores (a bf16 row's 32 columns: one whole line). Every item
 * streams the whole buffer from L2, so 8 rows of G by 2 vectors read half the buffer per multiply-add that 4 rows
 * by 4 vectors did: fp32 at 32 rows per expert 0.93x (Mixtral-like g^T a and dh^T x), 16 rows 0.94-0.95x
 * (fine-grained), Mixtral-like g^T a at 128 rows 0.92x; 2-4 rows and 256 rows unchanged; the layer's fp32
 * forward+backward at T = 128 0.973x (Mixtral-like) and 0.982x (fine-grained); 2 Emerald Rapids cores, same
 * process. */
#define OUTER_G_ROWS 8
static inline __attribute__((always_inline)) void outer_regs_block(const float *bw, int64_t K16, const float *av,
                                                                   const int R, int64_t Kd, int nr, char *g, int gdt,
                                                                   int64_t ldg) {
    enum { NV = 2 };
    for (int64_t k0 = 0; k0 < Kd; k0 += 16 * NV) {
        __m512 acc[OUTER_G_ROWS][NV];
        UNROLL for (int i = 0; i < OUTER_G_ROWS; i++) UNROLL for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            __m512 b[NV];
            UNROLL for (int v = 0; v < NV; v++) b[v] = _mm512_load_ps(bw + (size_t)r * (size_t)K16 + k0 + 16 * v);
            UNROLL for (int i = 0; i < OUTER_G_ROWS; i++) {
                const __m512 a = _mm512_set1_ps(av[r * OUTER_G_ROWS + i]);
                UNROLL for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
            }
        }
        for (int i = 0; i < nr; i++) UNROLL for (int v = 0; v < NV; v += 2) {
            const int64_t k = k0 + 16 * v;
            if (k >= Kd) break;
            const __mmask16 m0 = tail16(Kd - k), m1 = tail16(Kd - k - 16 > 0 ? Kd - k - 16 : 0);
            char *o = g + ((size_t)i * (size_t)ldg + (size_t)k) * esize(gdt);
            if (gdt == DT_BF16 && m1 == 0xffff && ((uintptr_t)o & 63) == 0) {
                _mm512_stream_si512((void *)o, _mm512_inserti64x4(_mm512_castsi256_si512(cvt16_bf16(acc[i][v])),
                                                                  cvt16_bf16(acc[i][v + 1]), 1));
                continue;
            }
            st16_stream(o, gdt, m0, acc[i][v]);
            if (m1) st16_stream(o + 16 * esize(gdt), gdt, m1, acc[i][v + 1]);
        }
    }
}

static int outer_regs(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *B, int bdt, int64_t ldb,
                      const int64_t *b_idx, int64_t N, int64_t Kd, const int64_t *start, const int64_t *end,
                      int64_t E, int64_t most, void *G, int gdt, int nthreads) {
    /* most: the rows of the largest expert, at most OUTER_REG_ROWS */
    if (most > OUTER_REG_ROWS) return -1;
    const int64_t nb = (N + OUTER_G_ROWS - 1) / OUTER_G_ROWS, K16 = (Kd + 63) / 64 * 64;
    int64_t na = 0;
    int64_t *active = malloc((size_t)(E ? E : 1) * sizeof(int64_t));
    if (!active) return -5;
    for (int64_t e = 0; e < E; e++)
        if (end[e] > start[e]) active[na++] = e;
    int err = 0;
#pragma omp parallel num_threads(threads_for(na * N * Kd / 4, nthreads)) reduction(| : err)
    {
        float *bw = aligned_alloc(64, (size_t)(most ? most : 1) * (size_t)K16 * sizeof(float));
        int64_t bw_e = -1;
        if (!bw) err = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < na * nb; item++) {
            if (!bw) continue;
            const int64_t e = active[item / nb], n0 = (item % nb) * OUTER_G_ROWS, s0 = start[e];
            const int R = (int)(end[e] - s0), nr = (int)min64(OUTER_G_ROWS, N - n0);
            if (bw_e != e) { /* the expert's rows of B, widened, zero-padded to whole 32-column steps */
                for (int r = 0; r < R; r++) {
                    const void *br = at(B, bdt, ldb, b_idx ? b_idx[s0 + r] : s0 + r, 0);
                    for (int64_t k = 0; k < K16; k += 16)
                        _mm512_store_ps(bw + (size_t)r * (size_t)K16 + k, ld16(at(br, bdt, 0, 0, k), bdt, tail16(Kd - k > 0 ? Kd - k : 0)));
                }
                bw_e = e;
            }
            float av[OUTER_REG_ROWS * OUTER_G_ROWS];
            for (int r = 0; r < R; r++) {
                const void *ar = at(A, adt, lda, a_idx ? a_idx[s0 + r] : s0 + r, 0);
                for (int i = 0; i < OUTER_G_ROWS; i++) av[r * OUTER_G_ROWS + i] = i < nr ? ld(ar, adt, n0 + i) : 0.0f;
            }
            char *g = (char *)G + ((size_t)e * (size_t)N + (size_t)n0) * (size_t)Kd * esize(gdt);
            switch (R) { /* (R constant in each up to 8: its loop unrolled) */
            case 1: outer_regs_block(bw, K16, av, 1, Kd, nr, g, gdt, Kd); break;
            case 2: outer_regs_block(bw, K16, av, 2, Kd, nr, g, gdt, Kd); break;
            case 3: outer_regs_block(bw, K16, av, 3, Kd, nr, g, gdt, Kd); break;
            case 4: outer_regs_block(bw, K16, av, 4, Kd, nr, g, gdt, Kd); break;
            case 5: outer_regs_block(bw, K16, av, 5, Kd, nr, g, gdt, Kd); break;
            case 6: outer_regs_block(bw, K16, av, 6, Kd, nr, g, gdt, Kd); break;
            case 7: outer_regs_block(bw, K16, av, 7, Kd, nr, g, gdt, Kd); break;
            case 8: outer_regs_block(bw, K16, av, 8, Kd, nr, g, gdt, Kd); break;
            default: outer_regs_block(bw, K16, av, R, Kd, nr, g, gdt, Kd); break;
            }
        }
        _mm_sfence(); /* this thread's non-temporal stores before the barrier */
        free(bw);
    }
    free(active);
    return err ? -5 : 0;
}
#endif

int moe_small_outer(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *B, int bdt, int64_t ldb,
                    const int64_t *b_idx, int64_t N, int64_t Kd, const int64_t *start, const int64_t *end, int64_t E,
                    void *G, int gdt, int nthreads) {
#if defined(__AVX512F__)
    /* Few rows per expert: outer_regs (see OUTER_REG_ROWS). bf16, against the AMX tiles on 2 Sapphire Rapids
     * cores: 1 row 1.98 -> 1.43 ms, 4 rows 1.98 -> 1.82, 7 rows 1.98 against 2.71 (so bf16 takes it up to 4 rows; on
     * CPUs without AMX, unmeasured, it keeps its own pair dot product) */
    int64_t most = 0;
    for (int64_t e = 0; e < E; e++) most = end[e] - start[e] > most ? end[e] - start[e] : most;
    const size_t b_bytes = (size_t)most * (size_t)Kd * sizeof(float);
    int regs = adt == DT_F32 && bdt == DT_F32 && most <= OUTER_REG_ROWS && (most <= 8 || b_bytes <= OUTER_REG_BYTES);
#if defined(MOE_AMX)
    regs |= adt == DT_BF16 && bdt == DT_BF16 && most <= OUTER_REG_ROWS_BF16 && amx_ready();
#endif
    if (regs) return outer_regs(A, adt, lda, a_idx, B, bdt, ldb, b_idx, N, Kd, start, end, E, most, G, gdt, nthreads);
#endif
#if defined(MOE_AMX)
    if (adt == DT_BF16 && bdt == DT_BF16 && N % 16 == 0 && Kd % 16 == 0 && amx_ready())
        return amx_outer(A, lda, a_idx, B, ldb, b_idx, N, Kd, start, end, E, G, gdt, nthreads);
#endif
    const int64_t nb = (N + OTN - 1) / OTN;
    int64_t work = 0, na = 0;
    SCRATCH_ARRAY(int64_t, active, E, 256); /* items over experts with rows only */
    if (!active) return -5;
    for (int64_t e = 0; e < E; e++)
        if (end[e] > start[e]) {
            work += N * Kd;
            active[na++] = e;
        }
#pragma omp parallel num_threads(threads_for(work / 4, nthreads))
    {
#if defined(V8)
    /* the expert's rows of B in fp32 column strips ([Kd / 16][rows][16], zero-padded) and the item's columns of A
     * ([rows][OTN]): the tile then reads both in order, with no row indices or dtype conversion per row */
    float *bp = NULL, *ap = NULL;
    int64_t bp_e = -1, cap = 0;
    const int64_t K16 = (Kd + 15) / 16 * 16;
    /* (experts of a row or two with a short B row, a few-token step's router: on the stack, no allocation) */
    float bp_st[OUTER_FEW * OUTER_STACK_K] __attribute__((aligned(64))), ap_st[OUTER_AP_GROUP * OUTER_FEW * OTN + 8];
    int64_t ap_e = -1, ap_b0 = 0, ap_b1 = 0; /* ap holds the blocks ap_b0 .. ap_b1 of expert ap_e's columns of A */
#endif
#pragma omp for schedule(static)
    for (int64_t item = 0; item < na * nb; item++) {
        const int64_t e = active[item / nb], n0 = (item % nb) * OTN, nn = min64(OTN, N - n0);
        const int64_t s0 = start[e], s1 = end[e];
        char *ge = (char *)G + (size_t)e * (size_t)N * (size_t)Kd * esize(gdt);
#if defined(V8)
        const int64_t Se = s1 - s0;
        const int fits = (size_t)Se * (size_t)K16 * 4 <= OUTER_PACK_MAX;
        if (fits && Se > cap) {
            if (bp != bp_st) free(bp), free(ap);
            const int st = Se <= OUTER_FEW && K16 <= OUTER_STACK_K;
            bp = st ? bp_st : malloc((size_t)Se * (size_t)K16 * 4);
            ap = st ? ap_st : malloc(((size_t)OUTER_AP_GROUP * (size_t)Se * OTN + 8) * 4);
            cap = bp && ap ? Se : 0;
            bp_e = ap_e = -1;
        }
        if (fits && cap >= Se) {
            if (bp_e != e) {
                for (int64_t s = 0; s < Se; s++) {
                    const char *br = at(B, bdt, ldb, b_idx ? b_idx[s0 + s] : s0 + s, 0);
                    for (int64_t c0 = 0; c0 < K16; c0 += 8) {
                        float *o = bp + (size_t)(c0 / 16) * (size_t)Se * 16 + (size_t)s * 16 + (c0 & 15);
                        _mm256_storeu_ps(o, c0 + 8 <= Kd ? ld8(br + (size_t)c0 * esize(bdt), bdt)
                                          : c0 < Kd ? ld8_part(br + (size_t)c0 * esize(bdt), bdt, Kd - c0)
                                                    : _mm256_setzero_ps());
                    }
                }
                bp_e = e;
            }
            const int64_t blk = n0 / OTN;
            if (ap_e != e || blk >= ap_b1) { /* this block and the next few (a thread's items come in order) */
                ap_e = e, ap_b0 = blk, ap_b1 = min64(nb, blk + OUTER_AP_GROUP);
                for (int64_t b = ap_b0; b < ap_b1; b++) {
                    float *o = ap + (size_t)(b - ap_b0) * (size_t)Se * OTN;
                    const int64_t c = b * OTN, w = min64(OTN, N - c);
                    if (c + 8 <= N) /* 8 values per row, the last 2 overwritten by the next row (or block) */
                        for (int64_t s = 0; s < Se; s++)
                            _mm256_storeu_ps(o + s * OTN,
                                             ld8(at(A, adt, lda, a_idx ? a_idx[s0 + s] : s0 + s, c), adt));
                    else
                        for (int64_t s = 0; s < Se; s++) {
                            const char *ar = at(A, adt, lda, a_idx ? a_idx[s0 + s] : s0 + s, 0);
                            UNROLL for (int i = 0; i < OTN; i++) o[s * OTN + i] = i < w ? ld(ar, adt, c + i) : 0.0f;
                        }
                }
            }
            const float *apb = ap + (size_t)(blk - ap_b0) * (size_t)Se * OTN;
            if (Se <= OUTER_FEW) { /* a row or two: all the work is writing G; each row of G written in order */
                const __m256 z = _mm256_setzero_ps();
                for (int i = 0; i < nn; i++) {
                    char *g = at(ge, gdt, Kd, n0 + i, 0);
                    const int stream = gdt == DT_F32 && ((uintptr_t)g & 31) == 0;
                    const __m256 a0 = _mm256_broadcast_ss(apb + i);
                    const __m256 a1 = Se == 2 ? _mm256_broadcast_ss(apb + OTN + i) : z;
                    const float *b = bp; /* (the strips are zero-padded to whole 16 columns) */
                    int64_t c0 = 0;
#define OUTER_FEW_STEP                                                                                             \
    __m256 lo = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b), z), hi = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b + 8), z);    \
    if (Se == 2) {                                                                                                 \
        lo = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b + 16), lo);                                                     \
        hi = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b + 24), hi);                                                     \
    }
                    for (; c0 + 16 <= Kd; c0 += 16, b += 16 * Se) {
                        OUTER_FEW_STEP
                        if (gdt == DT_BF16) /* (plain stores: see OUTER_BF16_LINES) */
                            _mm256_storeu_si256((__m256i *)(g + 2 * c0), cvt8x2_bf16(lo, hi));
                        else if (stream)
                            _mm256_stream_ps((float *)g + c0, lo), _mm256_stream_ps((float *)g + c0 + 8, hi);
                        else
                            _mm256_storeu_ps((float *)g + c0, lo), _mm256_storeu_ps((float *)g + c0 + 8, hi);
                    }
                    if (c0 < Kd) { /* the row's tail, outside the loop (inside, its store slowed every step) */
                        OUTER_FEW_STEP
                        st8x2(g + (size_t)c0 * esize(gdt), gdt, lo, hi, Kd - c0, 1);
                    }
#undef OUTER_FEW_STEP
                }
                continue;
            }
            outer8_strips(bp, apb, Se, Kd, ge, gdt, n0, nn);
            continue;
        }
#endif
        for (int64_t k0 = 0; k0 < Kd; k0 += 16 * NC) {
#if defined(__AVX512F__)
            __m512 acc[OTN][NC];
            __mmask16 mc[NC];
            UNROLL for (int q = 0; q < NC; q++) {
                int64_t left = Kd - k0 - 16 * q;
                mc[q] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
            }
            UNROLL for (int i = 0; i < OTN; i++) UNROLL for (int q = 0; q < NC; q++) acc[i][q] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
            if (adt == DT_BF16 && bdt == DT_BF16) {
                outer_bf16_pairs(A, lda, a_idx, B, ldb, b_idx, N, Kd, n0, k0, s0, s1, acc);
                goto store;
            }
#endif
            for (int64_t s = s0; s < s1; s++) {
                const void *ar = at(A, adt, lda, a_idx ? a_idx[s] : s, 0);
                const char *br = at(B, bdt, ldb, b_idx ? b_idx[s] : s, k0);
                __m512 bv[NC];
                if (bdt == DT_F32) {
                    UNROLL for (int q = 0; q < NC; q++) bv[q] = ld16(br + 64 * q, DT_F32, mc[q]);
                } else {
                    UNROLL for (int q = 0; q < NC; q++) bv[q] = ld16(br + 32 * q, DT_BF16, mc[q]);
                }
                UNROLL for (int i = 0; i < OTN; i++) {
                    __m512 av = _mm512_set1_ps(n0 + i < N ? ld(ar, adt, n0 + i) : 0.0f);
                    UNROLL for (int q = 0; q < NC; q++) acc[i][q] = _mm512_fmadd_ps(av, bv[q], acc[i][q]);
                }
            }
#if defined(__AVX512BF16__)
        store:
#endif
            UNROLL for (int i = 0; i < OTN; i++) UNROLL for (int q = 0; q < NC; q += 2) {
                if (i >= nn) continue;
                char *o = at(ge, gdt, Kd, n0 + i, k0 + 16 * q);
                if (gdt == DT_BF16 && mc[q] == 0xffff && mc[q + 1] == 0xffff && ((uintptr_t)o & 63) == 0) {
                    /* two bf16 vectors make one whole line: a single 64-byte streaming store */
                    __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(cvt16_bf16(acc[i][q])),
                                                      cvt16_bf16(acc[i][q + 1]), 1);
                    _mm512_stream_si512((void *)o, line);
                    continue;
                }
                if (mc[q]) st16_stream(o, gdt, mc[q], acc[i][q]);
                if (mc[q + 1]) st16_stream(at(ge, gdt, Kd, n0 + i, k0 + 16 * (q + 1)), gdt, mc[q + 1], acc[i][q + 1]);
            }
#elif defined(V8)
            /* 16 columns (two vectors) x OTN rows of G per pass over the expert's rows: 8 accumulators */
            for (int64_t c0 = k0; c0 < k0 + 16 * NC && c0 < Kd; c0 += 16) {
                const int64_t left = Kd - c0;
                __m256 acc[OTN][2];
                UNROLL for (int i = 0; i < OTN; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
                if (nn == OTN && left >= 16) outer8_full(A, adt, lda, a_idx, B, bdt, ldb, b_idx, n0, c0, s0, s1, acc);
                else for (int64_t s = s0; s < s1; s++) { /* a tile at the edge of G */
                    const void *ar = at(A, adt, lda, a_idx ? a_idx[s] : s, 0);
                    const char *br = at(B, bdt, ldb, b_idx ? b_idx[s] : s, c0);
                    __m256 b0, b1;
                    if (left >= 16) {
                        b0 = ld8(br, bdt);
                        b1 = ld8(br + 8 * esize(bdt), bdt);
                    } else {
                        b0 = ld8_part(br, bdt, min64(8, left));
                        b1 = left > 8 ? ld8_part(br + 8 * esize(bdt), bdt, left - 8) : _mm256_setzero_ps();
                    }
                    UNROLL for (int i = 0; i < OTN; i++) {
                        __m256 av = _mm256_set1_ps(n0 + i < N ? ld(ar, adt, n0 + i) : 0.0f);
                        acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
                        acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
                    }
                }
                outer8_store(ge, gdt, Kd, n0, nn, c0, left, acc);
            }
#else
            int64_t w = min64(16 * NC, Kd - k0);
            for (int i = 0; i < nn; i++) {
                float c[16 * NC];
                for (int64_t j = 0; j < w; j++) c[j] = 0.0f;
                for (int64_t s = s0; s < s1; s++) {
                    float av = ld(at(A, adt, lda, a_idx ? a_idx[s] : s, 0), adt, n0 + i);
                    const void *br = at(B, bdt, ldb, b_idx ? b_idx[s] : s, k0);
#pragma omp simd
                    for (int64_t j = 0; j < w; j++) c[j] += av * ld(br, bdt, j);
                }
                void *o = at(ge, gdt, Kd, n0 + i, k0);
                for (int64_t j = 0; j < w; j++) st(o, gdt, j, c[j]);
            }
#endif
        }
    }
#if defined(__AVX512F__) || defined(V8)
    _mm_sfence(); /* order this thread's non-temporal stores before the barrier */
#endif
#if defined(V8)
    if (bp != bp_st) free(bp), free(ap);
#endif
    }
    SCRATCH_FREE(active);
    return 0;
}

/* memset of n bytes with non-temporal stores: a buffer larger than the caches is then written once, with no
 * read-for-ownership of its lines (a plain store reads every line before writing it: half the bandwidth). */
static void zero_stream(char *p, int64_t n) {
#if defined(__AVX512F__)
    const int64_t head = min64(n, (int64_t)((64 - ((uintptr_t)p & 63)) & 63));
    memset(p, 0, (size_t)head);
    const __m512i z = _mm512_setzero_si512();
    int64_t i = head;
    for (; i + 64 <= n; i += 64) _mm512_stream_si512((void *)(p + i), z);
    memset(p + i, 0, (size_t)(n - i));
    _mm_sfence();
#elif defined(V8)
    const int64_t head = min64(n, (int64_t)((32 - ((uintptr_t)p & 31)) & 31));
    memset(p, 0, (size_t)head);
    const __m256i z = _mm256_setzero_si256();
    int64_t i = head;
    for (; i + 32 <= n; i += 32) _mm256_stream_si256((__m256i *)(p + i), z);
    memset(p + i, 0, (size_t)(n - i));
    _mm_sfence();
#else
    memset(p, 0, (size_t)n);
#endif
}

/* Zero the n byte ranges [ptr[r], ptr[r] + len[r]) (moe_zero_ranges: [p + off[r], p + off[r] + len[r])) with all threads in one parallel region, each thread an
 * equal share of their bytes taken in order (cut at whole lines of that order), streamed past the caches: the idle
 * experts' gradients of a few-token step are several runs of a few MiB (one task of 1 MiB per thread at a time
 * left the last task of an odd count to one thread: 2.75 MiB in 0.117 against 0.079 ms, 2 Xeon cores). */
static void zero_ranges(char *const *ptr, const int64_t *len, int64_t n, int nthreads) {
    int64_t total = 0;
    for (int64_t r = 0; r < n; r++) total += len[r];
#pragma omp parallel num_threads(threads_for(total / 4, nthreads))
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lines = (total + 63) / 64, b = min64(total, 64 * (lines * t / nt)),
                      e = min64(total, 64 * (lines * (t + 1) / nt));
        for (int64_t r = 0, pos = 0; r < n && pos < e; pos += len[r], r++) { /* range r: [pos, pos + len[r]) */
            const int64_t lo = pos > b ? pos : b, hi = pos + len[r] < e ? pos + len[r] : e;
            if (lo < hi) zero_stream(ptr[r] + (lo - pos), hi - lo);
        }
    }
}

int moe_zero_ranges(void *p, const int64_t *off, const int64_t *len, int64_t n, int nthreads) {
    char **ptr = malloc((size_t)(n > 0 ? n : 1) * sizeof(char *));
    if (!ptr) return -5;
    for (int64_t r = 0; r < n; r++) ptr[r] = (char *)p + off[r];
    zero_ranges(ptr, len, n, nthreads);
    free(ptr);
    return 0;
}

/* Write back and evict the n bytes at p from every cache level (benchmarks use it to time a layer whose weights are
 * in memory while the rest of the process stays warm, as in a model whose layers together exceed the caches). */
int moe_flush_cache(const void *p, int64_t n, int nthreads) {
#if defined(__x86_64__)
    /* split among the threads, so that every core is busy up to the timed run that follows, as in a model whose
     * layers run one after another: flushing a layer's weights on one thread for a few ms left the others idle,
     * and the next run, woken from that, took up to twice as long on a 2-core VM (its Python code too) */
    const uintptr_t a = (uintptr_t)p & ~(uintptr_t)63;
    const int64_t lines = n > 0 ? (int64_t)(((uintptr_t)p + (uintptr_t)n - a + 63) / 64) : 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        const int th = omp_get_thread_num(), nth = omp_get_num_threads();
        for (int64_t i = lines * th / nth; i < lines * (th + 1) / nth; i++)
            __builtin_ia32_clflush((const char *)(a + 64 * (uintptr_t)i));
        __builtin_ia32_mfence();
    }
    return 0;
#else
    (void)p;
    (void)n;
    (void)nthreads;
    return -1;
#endif
}

/* Read every float32 word of n byte ranges (each a multiple of 4 bytes) and store their sum in *sum, so that no
 * read can be left out: the time to stream exactly these bytes, and nothing else, from wherever they are (the
 * benchmarks' weight-read floor of a decode step). The concatenated ranges are split evenly among the threads. */
int moe_read_ranges(const void *const *ptr, const int64_t *nbytes, int64_t n, double *sum, int nthreads) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (nbytes[i] < 0 || nbytes[i] % 4) return -1;
        total += nbytes[i] / 4;
    }
    const int nt = threads_for(total, nthreads);
    double s = 0.0;
#pragma omp parallel num_threads(nt) reduction(+ : s)
    {
        const int th = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t lo = total * th / nth, hi = total * (th + 1) / nth; /* this thread's words */
        float acc[32] = {0.0f}; /* 32 independent sums: several vector accumulators, not one latency chain */
        int64_t base = 0;
        for (int64_t i = 0; i < n && base < hi; base += nbytes[i] / 4, i++) {
            const int64_t a = lo > base ? lo - base : 0, b = min64(hi - base, nbytes[i] / 4);
            const float *f = (const float *)ptr[i];
            int64_t j = a;
            for (; j + 32 <= b; j += 32)
                for (int q = 0; q < 32; q++) acc[q] += f[j + q];
            for (; j < b; j++) acc[0] += f[j];
        }
        for (int q = 0; q < 32; q++) s += acc[q];
    }
    *sum = s;
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Router top-k: idx[t, :k] = the k largest of scores[t, :E], largest first. Returns the number of rows whose answer
 * is ambiguous (a NaN, or equal values among the k + 1 largest, where the order or the set of the top k depends on
 * tie-breaking); callers then use their reference top-k for the whole batch, so ties resolve exactly as it does.
 * --------------------------------------------------------------------------------------------------------------- */
#if defined(__AVX512F__)
/* One row of at most 128 scores in registers: k rounds of (max, find it, knock it out), branch-free within a round.
 * Returns 1 if the row is ambiguous. */
static int topk_row_avx512(const float *row, int64_t E, int64_t k, int64_t *out) {
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
    __m512 r[8];
    const int nv = (int)((E + 15) / 16);
    for (int i = 0; i < nv; i++) {
        int64_t left = E - 16 * i;
        __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        r[i] = _mm512_mask_loadu_ps(ninf, m, row + 16 * i);
        if (_mm512_cmp_ps_mask(r[i], r[i], _CMP_UNORD_Q)) return 1; /* NaN */
    }
    for (int64_t j = 0; j < k; j++) {
        __m512 mx = r[0];
        for (int i = 1; i < nv; i++) mx = _mm512_max_ps(mx, r[i]);
        const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        int count = 0;
        int64_t pos = -1;
        for (int i = 0; i < nv; i++) {
            __mmask16 m = _mm512_cmp_ps_mask(r[i], best, _CMP_EQ_OQ);
            if (m) {
                if (pos < 0) pos = 16 * i + __builtin_ctz(m);
                count += __builtin_popcount(m);
                r[i] = _mm512_mask_mov_ps(r[i], m, ninf);
            }
        }
        /* a tie, or -inf chosen (it equals the padding): the order is the reference's to decide */
        if (count != 1 || pos >= E) return 1;
        out[j] = pos;
    }
    return 0;
}
#endif

/* The indices of the k largest of row[0..E) into out (largest first); nonzero, with out unwritten, if the row has
 * a NaN or a tie among its k + 1 largest values (where the answer depends on tie-breaking). */
static int topk_row(const float *row, int64_t E, int64_t k, int64_t *out) {
#if defined(__AVX512F__)
    if (E <= 128) return topk_row_avx512(row, E, k, out);
#endif
    float v[65];
    int64_t id[65];
    int64_t n = 0;
    const int64_t m = k < E ? k + 1 : k; /* keep one more than asked, to see a tie at the boundary */
    for (int64_t e = 0; e < E; e++) {
        float x = row[e];
        if (x != x) return 1;
        if (n == m && !(x > v[m - 1])) continue;
        int64_t p = n < m ? n++ : m - 1; /* insert after every value >= x (stable) */
        while (p > 0 && v[p - 1] < x) {
            v[p] = v[p - 1];
            id[p] = id[p - 1];
            p--;
        }
        v[p] = x;
        id[p] = e;
    }
    for (int64_t j = 1; j < n; j++)
        if (v[j] == v[j - 1]) return 1;
    for (int64_t j = 0; j < k; j++) out[j] = id[j];
    return 0;
}

int moe_topk_rows(const float *scores, int64_t ld, int64_t T, int64_t E, int64_t k, int64_t *idx, int nthreads) {
    if (k < 1 || k > 64 || k > E) return -1;
    int64_t ambiguous = 0;
#pragma omp parallel for schedule(static) reduction(+ : ambiguous) num_threads(threads_for(T * E * 4, nthreads))
    for (int64_t t = 0; t < T; t++)
        ambiguous += topk_row(scores + (size_t)t * (size_t)ld, E, k, idx + (size_t)t * (size_t)k);
    return (int)(ambiguous < 0x7fffffff ? ambiguous : 0x7fffffff);
}

/* Router logits: out[t, e] = x[t, :] . w[e, :] (+ b[e]) in float32, x and w float32 or bfloat16 (widened exactly),
 * b float32 or NULL. A bf16 layer routes in float32 without a float32 copy of its input (which took longer than
 * the product: 2 ms of a Mixtral-like layer's 8192 tokens). Each output is one dot product, in blocks of 4 tokens x
 * 4 experts whose 16 sums stay in AVX-512 registers over d (each row loaded once per block). */
#if defined(__AVX512F__)
/* s[i][j] = x[i, :] . w[j, :] for NT tokens and NE experts (compile-time constants where inlined: the sums stay
 * in registers), dx and dw the dtypes (likewise constant). */
static inline __attribute__((always_inline)) void logits_block(const void *x, const int dx, int64_t ld_x,
                                                               const void *w, const int dw, int64_t D, const int NT,
                                                               const int NE, float s[4][4]) {
    __m512 acc[4][4];
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < NE; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = tail16(D - d);
        __m512 xv[4], wv[4];
        for (int i = 0; i < NT; i++) xv[i] = ld16(at(x, dx, ld_x, i, d), dx, m);
        for (int j = 0; j < NE; j++) wv[j] = ld16(at(w, dw, D, j, d), dw, m);
        for (int i = 0; i < NT; i++)
            for (int j = 0; j < NE; j++) acc[i][j] = _mm512_fmadd_ps(xv[i], wv[j], acc[i][j]);
    }
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < NE; j++) s[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

static inline __attribute__((always_inline)) void logits_dt(const void *x, const int dx, int64_t ld_x,
                                                            const void *w, const int dw, int64_t D, int64_t nt,
                                                            int64_t ne, float s[4][4]) {
    if (nt == 4 && ne == 4)
        logits_block(x, dx, ld_x, w, dw, D, 4, 4, s);
    else
        for (int64_t i = 0; i < nt; i++)
            for (int64_t j = 0; j < ne; j++) {
                float one[4][4];
                logits_block(at(x, dx, ld_x, i, 0), dx, ld_x, at(w, dw, D, j, 0), dw, D, 1, 1, one);
                s[i][j] = one[0][0];
            }
}
#endif

static void router_logits(const void *x, int dx, int64_t ld_x, const void *w, int dw, const float *b, int64_t T,
                          int64_t E, int64_t D, float *out, int64_t ld_out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(T * E * D / 16, nthreads))
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const int64_t nt = T - t0 < 4 ? T - t0 : 4;
        const void *xt = at(x, dx, ld_x, t0, 0);
        for (int64_t e0 = 0; e0 < E; e0 += 4) {
            const int64_t ne = E - e0 < 4 ? E - e0 : 4;
            const void *we = at(w, dw, D, e0, 0);
            float s[4][4];
#if defined(__AVX512F__)
            /* (the dtypes constant in each call, so the loads specialise) */
            if (dx == DT_F32 && dw == DT_F32) logits_dt(xt, DT_F32, ld_x, we, DT_F32, D, nt, ne, s);
            else if (dx == DT_BF16 && dw == DT_BF16) logits_dt(xt, DT_BF16, ld_x, we, DT_BF16, D, nt, ne, s);
            else if (dx == DT_BF16) logits_dt(xt, DT_BF16, ld_x, we, DT_F32, D, nt, ne, s);
            else logits_dt(xt, DT_F32, ld_x, we, DT_BF16, D, nt, ne, s);
#else
            for (int64_t i = 0; i < nt; i++)
                for (int64_t j = 0; j < ne; j++) {
                    const void *xr = at(xt, dx, ld_x, i, 0), *wr = at(we, dw, D, j, 0);
                    float acc = 0.0f;
#define LOGIT_DOT(DX, DW)                                                                                          \
    do {                                                                                                           \
        _Pragma("omp simd reduction(+ : acc)") for (int64_t d = 0; d < D; d++) acc += ld(xr, DX, d) * ld(wr, DW, d); \
    } while (0)
                    if (dx == DT_F32 && dw == DT_F32) LOGIT_DOT(DT_F32, DT_F32);
                    else if (dx == DT_BF16 && dw == DT_BF16) LOGIT_DOT(DT_BF16, DT_BF16);
                    else if (dx == DT_BF16) LOGIT_DOT(DT_BF16, DT_F32);
                    else LOGIT_DOT(DT_F32, DT_BF16);
#undef LOGIT_DOT
                    s[i][j] = acc;
                }
#endif
            for (int64_t i = 0; i < nt; i++)
                for (int64_t j = 0; j < ne; j++)
                    out[(t0 + i) * ld_out + e0 + j] = b ? s[i][j] + b[e0 + j] : s[i][j];
        }
    }
}

int moe_router_logits(const void *x, int dx, int64_t ld_x, const void *w, int dw, const float *b, int64_t T,
                      int64_t E, int64_t D, float *out, int nthreads) {
    if (T < 0 || E < 1 || D < 1) return -1;
    router_logits(x, dx, ld_x, w, dw, b, T, E, D, out, E, nthreads);
    return 0;
}

#if defined(__AVX512F__)
/* The sum of v's 16 lanes in a fixed order, halves first (lane i + 8 onto i, then i + 4, i + 2, i + 1): route_row's,
 * which route_rows16 repeats lane-wise so that both give the same bits. */
static inline float sum16_tree(__m512 v) {
    const __m256 h = _mm256_add_ps(_mm512_extractf32x8_ps(v, 1), _mm512_castps512_ps256(v));
    const __m128 q = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
    const __m128 r = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}
#endif

/* p[e] = exp(p[e] - max p) / sum_e exp(p[e] - max p), in place (the sum in order, then one reciprocal) */
static inline void softmax_row(float *p, int64_t E) {
    float mx = -__builtin_inff(), sum = 0.0f;
    for (int64_t e = 0; e < E; e++) mx = p[e] > mx ? p[e] : mx;
    for (int64_t e = 0; e < E; e++) {
        p[e] = exp_f32(p[e] - mx);
        sum += p[e];
    }
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < E; e++) p[e] *= inv;
}

/* Softmax top-k of one token: p holds its E logits on entry and their softmax on return (c is scratch for the
 * choice values p + sel); writes the K chosen experts (largest choice first) and their weights
 *     wts[k] = p[ids[k]] / (renorm ? max(sum_k p[ids[k]], renorm_min) : 1) * scale.
 * Returns 1, with ids and wts unwritten, on a NaN or a tie among the K + 1 largest choice values. */
static int route_row(float *p, float *c, int64_t E, int64_t K, const float *sel, int renorm, float renorm_min,
                     float scale, int64_t *ids, float *wts) {
#if defined(__AVX512F__)
    __m512 vmx = _mm512_set1_ps(-__builtin_inff()), vsum = _mm512_setzero_ps();
    for (int64_t e = 0; e < E; e += 16) /* (a NaN logit makes its p, hence the sum and every p, NaN: ambiguous) */
        vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(vmx, tail16(E - e), p + e));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
    for (int64_t e = 0; e < E; e += 16) {
        const __mmask16 m = tail16(E - e);
        const __m512 v = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + e), mx));
        _mm512_mask_storeu_ps(p + e, m, v);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, v));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sum16_tree(vsum));
    for (int64_t e = 0; e < E; e += 16) {
        const __mmask16 m = tail16(E - e);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + e), inv);
        _mm512_mask_storeu_ps(p + e, m, v);
        _mm512_mask_storeu_ps(c + e, m, sel ? _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, sel + e)) : v);
    }
#else
    softmax_row(p, E);
    for (int64_t e = 0; e < E; e++) c[e] = sel ? p[e] + sel[e] : p[e];
#endif
    if (topk_row(c, E, K, ids)) return 1;
    float tot = 0.0f;
    for (int64_t k = 0; k < K; k++) tot += p[ids[k]];
    if (renorm_min > 0.0f && tot < renorm_min) tot = renorm_min;
    for (int64_t k = 0; k < K; k++) wts[k] = (renorm ? p[ids[k]] / tot : p[ids[k]]) * scale;
    return 0;
}

/* The routings other than softmax top-k that moe_route_decode runs (its mode, fmode; NULL: route_row's):
 *     mode[0] the scores s: 0 softmax of the logits, 1 their sigmoids, 2 the logits themselves
 *     mode[1] the weights: 0 the chosen experts' scores (divided by their sum + fmode[1] if renorm), 1 a softmax over
 *             them, 2 their sigmoids (divided by their sum + fmode[1] if renorm); then times scale
 *     mode[2] groups G (1: none): the choice values c = s + sel in G groups of E / G, mode[3] of them kept, by the
 *             sum of each group's two largest c (mode[4] = 0) or its largest (1); the others' c become fmode[0]
 *     fmode[2] > 0: the logits soft-capped first, l = fmode[2] tanh(l / fmode[2]) (Laguna)
 * Group-limited sigmoid top-k (DeepSeek-V3; softmax scores: V2) and top-k of logits then a softmax over them
 * (GPT-OSS, Granite-MoE). p holds the logits on entry (the scores after); c is scratch. Returns 1, with ids and wts
 * unwritten, on a NaN score or a tie at the boundary of the groups kept or of the K experts chosen. */
#define ROUTE_MAX_GROUPS 64
static int route_row_mode(float *p, float *c, int64_t E, int64_t K, const float *sel, int renorm, float scale,
                          const int64_t *mode, const float *fmode, int64_t *ids, float *wts) {
    const int64_t score = mode[0], weight = mode[1], G = mode[2], TG = mode[3];
    if (fmode[2] > 0.0f)
        for (int64_t e = 0; e < E; e++) p[e] = tanhf(p[e] / fmode[2]) * fmode[2];
    if (score == 0) {
        softmax_row(p, E);
    } else if (score == 1) {
        for (int64_t e = 0; e < E; e++) p[e] = sigmoid_f32(p[e]);
    }
    for (int64_t e = 0; e < E; e++) {
        if (p[e] != p[e]) return 1; /* (a NaN in a dropped group would vanish under the fill) */
        c[e] = sel ? p[e] + sel[e] : p[e];
    }
    if (G > 1 && TG < G) {
        const int64_t n = E / G;
        float gs[ROUTE_MAX_GROUPS];
        int keep[ROUTE_MAX_GROUPS];
        for (int64_t g = 0; g < G; g++) {
            float a = -__builtin_inff(), b = -__builtin_inff(); /* the group's largest and second largest c */
            for (int64_t i = g * n; i < g * n + n; i++) {
                if (c[i] > a) b = a, a = c[i];
                else if (c[i] > b) b = c[i];
            }
            gs[g] = mode[4] == 1 || n < 2 ? a : a + b;
            keep[g] = 0;
        }
        for (int64_t j = 0; j < TG; j++) {
            int64_t best = -1;
            for (int64_t g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            keep[best] = 1;
            if (j == TG - 1) /* a group left out scoring as the last one kept: the reference's to decide */
                for (int64_t g = 0; g < G; g++)
                    if (!keep[g] && !(gs[g] < gs[best])) return 1;
        }
        for (int64_t g = 0; g < G; g++)
            if (!keep[g])
                for (int64_t i = g * n; i < g * n + n; i++) c[i] = fmode[0];
    }
    if (topk_row(c, E, K, ids)) return 1;
    float tot = 0.0f;
    if (weight == 1) { /* a softmax over the chosen scores */
        for (int64_t k = 0; k < K; k++) wts[k] = p[ids[k]];
        softmax_row(wts, K);
        for (int64_t k = 0; k < K; k++) wts[k] *= scale;
        return 0;
    }
    for (int64_t k = 0; k < K; k++) tot += wts[k] = weight == 2 ? sigmoid_f32(p[ids[k]]) : p[ids[k]];
    for (int64_t k = 0; k < K; k++) wts[k] = (renorm ? wts[k] / (tot + fmode[1]) : wts[k]) * scale;
    return 0;
}

#if defined(__AVX512F__)
/* route_row for the n <= 16 rows of logits from row t0 (E <= 16 experts), a row per lane: each expert's values of
 * the 16 rows in one vector, so that the softmax's maximum and sum and every round of the top-k are vector
 * operations across experts rather than reductions across lanes (route_row's per-row chains of reductions took
 * ~58 ns a row for 8 experts). The same bits as route_row: the same exp16, the sum in sum16_tree's order, the same
 * divisions. Returns the number of the n rows with a NaN or a tie (their ids and wts unspecified). */
static int64_t route_rows16(const float *logits, int64_t ld, int64_t t0, int64_t n, int64_t E, int64_t K,
                            const float *sel, int renorm, float renorm_min, float scale, float *probs, int64_t *ids,
                            float *wts) {
    const __mmask16 rows = (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i at_ld = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)ld)),
                  at_e = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)E));
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff()), zero = _mm512_setzero_ps();
    __m512 v[16], pv[16];
    __m512 mx = ninf;
    for (int64_t e = 0; e < E; e++) {
        v[e] = _mm512_mask_i32gather_ps(zero, rows, at_ld, logits + t0 * ld + e, 4);
        mx = _mm512_max_ps(mx, v[e]);
    }
    for (int64_t e = 0; e < E; e++) v[e] = exp16(_mm512_sub_ps(v[e], mx));
    for (int64_t e = E; e < 16; e++) v[e] = zero;
    __m512 h[8];
    for (int i = 0; i < 8; i++) h[i] = _mm512_add_ps(v[i + 8], v[i]);
    for (int i = 0; i < 4; i++) h[i] = _mm512_add_ps(h[i + 4], h[i]);
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(h[0], h[2]), _mm512_add_ps(h[1], h[3]));
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
    __mmask16 bad = 0;
    for (int64_t e = 0; e < E; e++) {
        pv[e] = _mm512_mul_ps(v[e], inv);
        _mm512_mask_i32scatter_ps(probs + t0 * E + e, rows, at_e, pv[e], 4);
        v[e] = sel ? _mm512_add_ps(pv[e], _mm512_set1_ps(sel[e])) : pv[e]; /* the choice values */
        bad |= _mm512_cmp_ps_mask(v[e], v[e], _CMP_UNORD_Q);
    }
    int32_t pos[64][16] __attribute__((aligned(64)));
    __m512 tot = zero, pk[64];
    for (int64_t j = 0; j < K; j++) {
        __m512 best = v[0];
        for (int64_t e = 1; e < E; e++) best = _mm512_max_ps(best, v[e]);
        __m512i cnt = _mm512_setzero_si512(), at = _mm512_set1_epi32((int)E);
        pk[j] = zero;
        for (int64_t e = E - 1; e >= 0; e--) { /* (down to the first expert holding the maximum, as route_row) */
            const __mmask16 eq = _mm512_cmp_ps_mask(v[e], best, _CMP_EQ_OQ);
            cnt = _mm512_mask_add_epi32(cnt, eq, cnt, _mm512_set1_epi32(1));
            at = _mm512_mask_mov_epi32(at, eq, _mm512_set1_epi32((int)e));
            pk[j] = _mm512_mask_mov_ps(pk[j], eq, pv[e]);
            v[e] = _mm512_mask_mov_ps(v[e], eq, ninf);
        }
        if (E < 16) /* route_row's padding lanes hold -inf: a chosen -inf ties with them */
            cnt = _mm512_mask_add_epi32(cnt, _mm512_cmp_ps_mask(best, ninf, _CMP_EQ_OQ), cnt,
                                        _mm512_set1_epi32((int)(16 - E)));
        bad |= _mm512_cmpneq_epi32_mask(cnt, _mm512_set1_epi32(1));
        _mm512_store_si512((void *)pos[j], at);
        tot = _mm512_add_ps(tot, pk[j]);
    }
    if (renorm_min > 0.0f) tot = _mm512_mask_mov_ps(tot, _mm512_cmp_ps_mask(tot, _mm512_set1_ps(renorm_min), _CMP_LT_OQ),
                                                   _mm512_set1_ps(renorm_min));
    float w[64][16] __attribute__((aligned(64)));
    for (int64_t j = 0; j < K; j++)
        _mm512_store_ps(w[j], _mm512_mul_ps(renorm ? _mm512_div_ps(pk[j], tot) : pk[j], _mm512_set1_ps(scale)));
    for (int64_t r = 0; r < n; r++)
        for (int64_t j = 0; j < K; j++) {
            ids[(t0 + r) * K + j] = pos[j][r];
            wts[(t0 + r) * K + j] = w[j][r];
        }
    return __builtin_popcount((unsigned)(bad & rows));
}
#endif

/* Softmax top-k routing of T tokens from their float32 logits [T, E] (row stride ld): probs [T, E] (may alias
 * logits when ld == E), ids int64 and wts float32 [T, K], as route_row. Returns the number of rows with a NaN or a
 * tie (their ids and wts unwritten: the caller then routes the batch in PyTorch, which breaks ties its own way). */
int moe_softmax_topk(const float *logits, int64_t ld, int64_t T, int64_t E, int64_t K, const float *sel, int renorm,
                     float renorm_min, float scale, float *probs, int64_t *ids, float *wts, int nthreads) {
    if (K < 1 || K > 64 || K > E) return -1;
    int64_t ambiguous = 0;
#if defined(__AVX512F__)
    if (E <= 16 && ld < (1 << 26)) { /* 16 rows at a time, a row per lane (8192 x 8: 0.47 -> 0.05 ms, 2 cores) */
#pragma omp parallel for schedule(static) num_threads(threads_for(T * E * 8, nthreads)) reduction(+ : ambiguous)
        for (int64_t t0 = 0; t0 < T; t0 += 16)
            ambiguous += route_rows16(logits, ld, t0, T - t0 < 16 ? T - t0 : 16, E, K, sel, renorm, renorm_min, scale,
                                      probs, ids, wts);
        return (int)(ambiguous < 0x7fffffff ? ambiguous : 0x7fffffff);
    }
#endif
#pragma omp parallel num_threads(threads_for(T * E * 8, nthreads))
    {
        float *c = malloc((size_t)E * sizeof(float));
#pragma omp for schedule(static) reduction(+ : ambiguous)
        for (int64_t t = 0; t < T; t++) {
            float *p = probs + t * E;
            if (p != logits + t * ld) memcpy(p, logits + t * ld, (size_t)E * sizeof(float));
            ambiguous += c ? route_row(p, c, E, K, sel, renorm, renorm_min, scale, ids + t * K, wts + t * K) : 1;
        }
        free(c);
    }
    return (int)(ambiguous < 0x7fffffff ? ambiguous : 0x7fffffff);
}

/* Stable counting sort of S keys in [0, nb): sorted[i] the i-th smallest key, order[i] its position in key,
 * tok[i] = order[i] / K, counts[b] the keys equal to b. Returns -1 (nothing written) if a key is out of range. */
int moe_sort_keys(const int64_t *key, int64_t S, int64_t nb, int64_t K, int64_t *sorted, int64_t *order,
                  int64_t *tok, int64_t *counts) {
    if (nb < 1 || K < 1) return -1;
    int64_t *next = calloc((size_t)nb, sizeof(int64_t));
    if (!next) return -5;
    for (int64_t i = 0; i < S; i++) {
        if (key[i] < 0 || key[i] >= nb) {
            free(next);
            return -1;
        }
        next[key[i]]++;
    }
    for (int64_t b = 0, s = 0; b < nb; b++) {
        counts[b] = next[b];
        next[b] = s;
        s += counts[b];
    }
    for (int64_t i = 0; i < S; i++) {
        const int64_t j = next[key[i]]++;
        sorted[j] = key[i];
        order[j] = i;
        tok[j] = i / K;
    }
    free(next);
    return 0;
}

/* Softmax top-k routing of a few tokens, then their SwiGLU experts (moe_small_decode), in one call: one step of
 * decoding without the ~20 small PyTorch ops of routing on the host.
 *     logits[t, e] = x[t, :] . w_r[e, :] + b_r[e]             in float32 (b_r float32, may be NULL)
 *     p[t, :] = softmax(logits[t, :]);   ids[t, :] = indices of the K largest p[t, e] + sel[e] (sel may be NULL)
 *     wts[t, k] = p[t, ids[t, k]] / (renorm ? max(sum_k p[t, ids[t, k]], renorm_min) : 1) * scale
 * or, where mode is not NULL, route_row_mode's routing (group-limited sigmoid top-k, top-k of logits then a softmax
 * over them; renorm_min unused). x is [T, D] of dtype dt (the experts' dtype), w_r [E, D] of dtype dt_r; ids int64
 * and wts float32 [T, K] are
 * written (either NULL: kept in scratch of this call's own, for a caller that only wants out and counts). Returns 1,
 * with out untouched, where a row has a NaN or a tie among its K + 1 largest choice values
 * (the caller then routes in PyTorch, which breaks ties its own way); else as moe_small_decode. */
int moe_route_decode(const void *x, int64_t ld_x, const void *w_r, int dt_r, const float *b_r, const float *sel,
                     int64_t T, int64_t K, int64_t E, int renorm, float renorm_min, float scale, const int64_t *mode,
                     const float *fmode, int64_t *ids,
                     float *wts, const void *w_in, const void *b_in, const void *w_out, const void *b_out, int64_t D,
                     int64_t F, int dt, void *out, int out_dt, int64_t ld_out, int64_t *counts, int64_t packed_min,
                     int act, float act_p0, float act_p1, int nthreads) {
    if (K < 1 || K > 64 || K > E || act < ACT_SWIGLU || act > ACT_SILU) return -1;
    if (mode && (mode[0] < 0 || mode[0] > 2 || mode[1] < 0 || mode[1] > 2 || mode[2] < 1 || mode[2] > ROUTE_MAX_GROUPS
                 || E % mode[2] || mode[3] < 1 || mode[3] > mode[2] || mode[3] * (E / mode[2]) < K || !fmode))
        return -1;
    /* scratch: the routing where the caller keeps none (ids, wts), then the logits p and choice values c [T, E] */
    const int64_t S = T * K, own = (ids ? 0 : S * (int64_t)sizeof(int64_t)) + (wts ? 0 : S * (int64_t)sizeof(float));
    char *scratch = malloc((size_t)own + (size_t)(T * E * 2 + 1) * sizeof(float));
    if (!scratch) return -5;
    if (!ids) ids = (int64_t *)scratch; /* (int64 first: aligned as malloc's block) */
    if (!wts) wts = (float *)(scratch + (own - S * (int64_t)sizeof(float)));
    float *p = (float *)(scratch + own), *c = p + T * E;
    router_logits(x, dt, ld_x, w_r, dt_r, b_r, T, E, D, p, E, nthreads);
    int64_t ambiguous = 0;
    for (int64_t t = 0; t < T; t++) /* (a NaN in x or the weights, or a tie: routed in PyTorch instead) */
        ambiguous += mode ? route_row_mode(p + t * E, c + t * E, E, K, sel, renorm, scale, mode, fmode, ids + t * K,
                                           wts + t * K)
                          : route_row(p + t * E, c + t * E, E, K, sel, renorm, renorm_min, scale, ids + t * K, wts + t * K);
    if (ambiguous || T == 0) { /* (no tokens: nothing to compute, and out may be NULL, an empty tensor's pointer) */
        free(scratch);
        if (T == 0) memset(counts, 0, (size_t)E * sizeof(int64_t));
        return ambiguous ? 1 : 0;
    }
    /* the experts accumulate in float32: into out itself, or into a scratch block then rounded once into out */
    float *acc = out_dt == DT_F32 ? (float *)out : malloc((size_t)(T * D > 0 ? T * D : 1) * sizeof(float));
    if (!acc) {
        free(scratch);
        return -5;
    }
    const int64_t ld_acc = out_dt == DT_F32 ? ld_out : D;
    for (int64_t t = 0; t < T; t++) memset(acc + t * ld_acc, 0, (size_t)D * sizeof(float));
    int rc = moe_small_decode(x, ld_x, ids, wts, T, K, E, w_in, b_in, w_out, b_out, D, F, dt, acc, ld_acc, counts,
                              packed_min, act, act_p0, act_p1, nthreads);
    if (out_dt != DT_F32) {
        for (int64_t t = 0; rc == 0 && t < T; t++) gather_row(acc + t * D, DT_F32, at(out, out_dt, ld_out, t, 0), out_dt, D, 1.0f);
        free(acc);
    }
    free(scratch);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
 * A training step of a few tokens (softmax top-k router, SwiGLU experts without biases): routing, both projections
 * and, in backward, every gradient in one call each, so that a step pays for two calls rather than for the ~40
 * host ops of routing, dispatch and the expert kernels one by one.
 *
 * Forward: moe_route_decode's routing and experts (ids, wts as there), keeping what backward needs: probs [T, E]
 * (the softmax; logits, if not NULL, gets the router's logits before it), the slots grouped by expert (seg:
 * start [E], end [E], tok [S], slot [S] as group_slots writes them; ws [S] their weights) and the pre-activations h [S, 2F] in that order. out (float32 [T, D], row stride
 * ld_out) is zeroed here. up_min / down_min: the rows from which an expert takes the packed or AMX tiles (as the
 * packed_min of moe_small_up / moe_small_down). Returns 1 (nothing but probs written) where a token's choice is
 * ambiguous (a NaN, or a tie among its K + 1 largest choice values), else as moe_small_decode. */
int moe_route_train_fwd(const void *x, int64_t ld_x, const void *w_r, int dt_r, const float *b_r, const float *sel,
                        int64_t T, int64_t K, int64_t E, int renorm, float renorm_min, float scale, int64_t *ids,
                        float *wts, float *probs, float *logits, const void *w_in, const void *w_out, int64_t D,
                        int64_t F, int dt, int64_t *seg, float *ws, void *h, float *out, int64_t ld_out,
                        int64_t *counts, int64_t up_min, int64_t down_min, int nthreads) {
    if (K < 1 || K > 64 || K > E) return -1;
    float *c = malloc((size_t)E * sizeof(float));
    if (!c) return -5;
    router_logits(x, dt, ld_x, w_r, dt_r, b_r, T, E, D, probs, E, nthreads);
    if (logits) memcpy(logits, probs, (size_t)(T * E) * sizeof(float)); /* (the softmax overwrites probs' copy) */
    int64_t ambiguous = 0;
    for (int64_t t = 0; t < T; t++)
        ambiguous += route_row(probs + t * E, c, E, K, sel, renorm, renorm_min, scale, ids + t * K, wts + t * K);
    free(c);
    if (ambiguous) return 1;
    const int64_t S = T * K;
    int64_t *start = seg, *end = seg + E, *tok = end + E, *slot = tok + S;
    if (group_slots(ids, wts, S, K, E, start, end, tok, slot, ws, counts) < 0) return -4;
    void *a = malloc((size_t)(S ? S : 1) * (size_t)F * esize(dt));
    if (!a) return -5;
    for (int64_t t = 0; t < T; t++) memset(out + t * ld_out, 0, (size_t)D * sizeof(float));
    int rc = moe_small_up(x, ld_x, tok, start, end, E, w_in, NULL, 2 * F, D, dt, 1, h, a, 0, up_min, SW_MAX_ROWS,
                          nthreads);
    if (rc == 0)
        rc = moe_small_down(a, F, 0, tok, ws, start, end, E, w_out, NULL, D, F, dt, out, ld_out, down_min, nthreads);
    free(a);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
 * The data and weight gradients of one projection of a training step of a few tokens, float32, in one pass over
 * the weights: for each expert e with 1 to FEW_FUSED_MAX_ROWS rows s in [start[e], end[e]),
 *     acc[arow(s), c] += sum_n coef(s, n) * W[e, n, c]          (the data gradient: W read)
 *     dW[e, n, c]      = sum_s coef(s, n) * src(s, c)           (the weight gradient: written once)
 * for n < N, c < C (experts with no rows or more rows are the caller's). coef(s, n) = coef[crow(s) * ld_coef + n],
 * src(s, c) = src[srow(s) * ld_src + c], acc row arow(s); crow, srow, arow: index vectors (NULL: s itself).
 * With a few rows per expert both products are bound by memory (each weight read, each gradient written, for a
 * handful of multiply-adds), and one pass that reads a row of W and writes the same row of dW streams more bytes
 * per second than a pass of reads and a pass of writes: 2 Emerald Rapids cores, 8 Mixtral-like experts of 4 rows,
 * dH @ W_in with dH^T @ X 1.58-1.69 -> 1.46-1.56 ms, g @ W_out with g^T @ (w a) 0.82-0.86 -> 0.72-0.76 ms; 64
 * fine-grained experts of 2 rows 2.12-2.37 -> 1.77-2.03 ms (a loop that only reads and writes: 0.68 ms to read
 * 46 MiB, 0.87 to write them, 1.32 to do both, interleaved). With more rows the products are no longer bound by
 * memory and the separate kernels, which block for arithmetic, win (7 rows 1.13x, 12 rows 1.44x their time).
 * Each thread owns a range of the C columns (whole 32-column chunks) and runs every expert's rows n in order over
 * it, so every sum runs in one order whatever the thread count. */
#define FEW_FUSED_MAX_ROWS 6 /* rows per expert: 2 x 6 accumulator and 2 x 6 source vectors in registers (up to 4
                              * rows per expert measured 0.96x the layer's step time, up to 5 0.95x, 6 0.93-0.95x) */
#define FEW_FUSED_NB 32      /* rows n of W per block, each 32-column chunk run over a block before the next (8 rows
                              * 0.99x, 16 0.95x, 32 0.93x, 64 0.93x, 128 0.96x; prefetching a block ahead: no gain) */
#if defined(__AVX512F__)
/* Rows n0 .. n1 of W and dW, columns c0 .. c0 + 32 (masks mk), for M rows s; the rows' acc and src values of these
 * columns stay in registers, so each row n costs its 2 W loads, M coefficients and 4 M multiply-adds. Each dW
 * vector is summed over the rows in two interleaved partial sums (row r into sum r % 2), halving its chain of
 * dependent multiply-adds. */
static inline __attribute__((always_inline)) void few_fused_block(const int M, const float *W, int64_t C, int64_t n0,
                                                                  int64_t n1, int64_t c0, const __mmask16 *mk,
                                                                  const float *const *cp, const float *const *sp,
                                                                  float *const *ap, float *dW) {
    __m512 A[FEW_FUSED_MAX_ROWS][2], X[FEW_FUSED_MAX_ROWS][2];
    for (int r = 0; r < M; r++)
        for (int v = 0; v < 2; v++) {
            A[r][v] = _mm512_maskz_loadu_ps(mk[v], ap[r] + c0 + 16 * v);
            X[r][v] = _mm512_maskz_loadu_ps(mk[v], sp[r] + c0 + 16 * v);
        }
    const int whole = mk[0] == 0xffff && mk[1] == 0xffff;
    for (int64_t n = n0; n < n1; n++) {
        const float *wr = W + n * C + c0;
        __m512 w[2], d[2][2];
        for (int v = 0; v < 2; v++) {
            w[v] = _mm512_maskz_loadu_ps(mk[v], wr + 16 * v);
            d[v][0] = d[v][1] = _mm512_setzero_ps();
        }
        for (int r = 0; r < M; r++) {
            const __m512 cf = _mm512_set1_ps(cp[r][n]);
            for (int v = 0; v < 2; v++) {
                A[r][v] = _mm512_fmadd_ps(cf, w[v], A[r][v]);
                d[v][r % 2] = _mm512_fmadd_ps(cf, X[r][v], d[v][r % 2]);
            }
        }
        float *o = dW + n * C + c0;
        for (int v = 0; v < 2; v++) {
            const __m512 dv = _mm512_add_ps(d[v][0], d[v][1]);
            if (whole && ((uintptr_t)o & 63) == 0)
                _mm512_stream_ps(o + 16 * v, dv);
            else
                _mm512_mask_storeu_ps(o + 16 * v, mk[v], dv);
        }
    }
    for (int r = 0; r < M; r++)
        for (int v = 0; v < 2; v++) _mm512_mask_storeu_ps(ap[r] + c0 + 16 * v, mk[v], A[r][v]);
}

static void few_fused_f32(const float *W, int64_t N, int64_t C, const float *coef, int64_t ld_coef, const int64_t *crow,
                          const float *src, int64_t ld_src, const int64_t *srow, float *acc, int64_t ld_acc,
                         const int64_t *arow, const int64_t *start, const int64_t *end, int64_t E, float *dW,
                         int nthreads) {
    const int64_t nch = (C + 31) / 32;
    const int nt = threads_for(E * N * C, nthreads) < nch ? threads_for(E * N * C, nthreads) : (int)nch;
#pragma omp parallel num_threads(nt > 0 ? nt : 1)
    {
        const int t = omp_get_thread_num(), n_t = omp_get_num_threads();
        const int64_t ch0 = nch * t / n_t, ch1 = nch * (t + 1) / n_t;
        for (int64_t e = 0; e < E; e++) {
            const int64_t s0 = start[e];
            const int M = (int)(end[e] - start[e]);
            const float *We = W + (size_t)e * (size_t)N * (size_t)C;
            float *dWe = dW + (size_t)e * (size_t)N * (size_t)C;
            if (M == 0 || M > FEW_FUSED_MAX_ROWS) continue;
            const float *cp[FEW_FUSED_MAX_ROWS], *sp[FEW_FUSED_MAX_ROWS];
            float *ap[FEW_FUSED_MAX_ROWS];
            for (int r = 0; r < M; r++) {
                const int64_t s = s0 + r;
                cp[r] = coef + (crow ? crow[s] : s) * ld_coef;
                sp[r] = src + (srow ? srow[s] : s) * ld_src;
                ap[r] = acc + (arow ? arow[s] : s) * ld_acc;
            }
            for (int64_t n0 = 0; n0 < N; n0 += FEW_FUSED_NB) {
                const int64_t n1 = min64(n0 + FEW_FUSED_NB, N);
                for (int64_t c0 = 32 * ch0; c0 < min64(C, 32 * ch1); c0 += 32) {
                    const __mmask16 mk[2] = {tail16(C - c0), C - c0 > 16 ? tail16(C - c0 - 16) : 0};
#define FEW_FUSED_CASE(k) \
    case k: few_fused_block(k, We, C, n0, n1, c0, mk, cp, sp, ap, dWe); break;
                    switch (M) { FEW_FUSED_CASE(1) FEW_FUSED_CASE(2) FEW_FUSED_CASE(3) FEW_FUSED_CASE(4)
                                 FEW_FUSED_CASE(5) FEW_FUSED_CASE(6) }
#undef FEW_FUSED_CASE
                }
            }
        }
        _mm_sfence(); /* this thread's non-temporal stores before the barrier */
    }
}

/* end[e] for the experts few_fused_f32 leaves to the separate kernels (more than FEW_FUSED_MAX_ROWS rows), start[e]
 * for the others, into big; returns how many experts few_fused_f32 takes (1 to FEW_FUSED_MAX_ROWS rows), and sets
 * *nbig to how many it leaves. */
static int64_t few_fused_split(const int64_t *start, const int64_t *end, int64_t E, int64_t *big, int64_t *nbig) {
    int64_t n = 0;
    *nbig = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t m = end[e] - start[e];
        big[e] = m > FEW_FUSED_MAX_ROWS ? end[e] : start[e];
        n += m > 0 && m <= FEW_FUSED_MAX_ROWS;
        *nbig += m > FEW_FUSED_MAX_ROWS;
    }
    return n;
}
#else
/* (AVX-512 builds only, where it was measured: the others always take the separate kernels. A port to AVX2, 16-column
 * chunks of 1-5 rows, the rows' sums in registers and their source values read from L1, made the layer's fp32
 * training steps slower on Zen 3: T = 4-16 1.15-1.21x, T = 1 the same; 2 threads, paired round-robin.) */
static void few_fused_f32(const float *W, int64_t N, int64_t C, const float *coef, int64_t ld_coef, const int64_t *crow,
                          const float *src, int64_t ld_src, const int64_t *srow, float *acc, int64_t ld_acc,
                          const int64_t *arow, const int64_t *start, const int64_t *end, int64_t E, float *dW,
                          int nthreads) {
    (void)W, (void)N, (void)C, (void)coef, (void)ld_coef, (void)crow, (void)src, (void)ld_src, (void)srow;
    (void)acc, (void)ld_acc, (void)arow, (void)start, (void)end, (void)E, (void)dW, (void)nthreads;
}
static int64_t few_fused_split(const int64_t *start, const int64_t *end, int64_t E, int64_t *big, int64_t *nbig) {
    for (int64_t e = 0; e < E; e++) big[e] = end[e];
    *nbig = E;
    (void)start;
    return 0;
}
#endif

/* The idle experts' blocks (blk bytes each, from base) of a gradient buffer, zeroed in one streaming fill. */
static int zero_idle_experts(const int64_t *start, const int64_t *end, int64_t E, void *base, size_t blk,
                             int nthreads) {
    SCRATCH_ARRAY(char *, zp, E, 256);
    SCRATCH_ARRAY(int64_t, zn, E, 256);
    if (!zp || !zn) {
        SCRATCH_FREE(zp);
        SCRATCH_FREE(zn);
        return -5;
    }
    int64_t nz = 0;
    for (int64_t e = 0; e < E; e++)
        if (end[e] == start[e]) {
            zp[nz] = (char *)base + (size_t)e * blk;
            zn[nz++] = (int64_t)blk;
        }
    if (nz) zero_ranges(zp, zn, nz, nthreads);
    SCRATCH_FREE(zp);
    SCRATCH_FREE(zn);
    return 0;
}

/* dx += dlogits @ w_r (the router's term of the input gradient), iota: T scratch entries. */
static int router_dx(const float *dlogits, const void *w_r, int dt_r, int64_t T, int64_t E, int64_t D, float *dx,
                     int64_t *iota, int nthreads) {
    const int64_t zero = 0;
    for (int64_t t = 0; t < T; t++) iota[t] = t;
    return moe_small_nn(dlogits, DT_F32, E, NULL, w_r, dt_r, E, D, &zero, &T, 1, dx, DT_F32, D, iota, 0, nthreads);
}

/* Backward of moe_route_train_fwd from the gradient g [T, D] (dtype g_dt, row stride ld_g) of its output, with
 * the same x, weights and the ids, probs, seg, ws and h it kept, all but the input projection's weight gradient
 * (moe_route_train_bwd_in, from the dH this call leaves in h, in a buffer the caller allocates once this call's
 * scratch ga [S, F] (dtype dt) is freed: the step's peak memory then holds one of the two at a time, as the regular
 * path's does). Writes, where not NULL:
 *   dw_out   [E, D, F] (dt)        g[tok]^T @ (w a) per expert, zero for experts without slots
 *   dx       float32 [T, D]        dH @ W_in over each token's slots, plus the router's term dlogits @ w_r
 *   dlogits  float32 [T, E]        the router logits' gradient: softmax top-k's, from the weights' gradients
 *                                  ga . a and d_probs (float32 [T, E], the probabilities' own gradient, from a
 *                                  balancing loss; may be NULL), plus d_logits (the logits' own, from a z-loss; may
 *                                  be NULL); needed for dx (the router's weight gradient, dlogits^T @ x, is the
 *                                  caller's)
 * (the same kernels as the regular path's separate calls: moe_small_nn, moe_swiglu_bwd, moe_small_outer, the
 * streaming zero-fill). nn_min_g, nn_min_h: the packed_min of moe_small_nn for g @ W_out and dH @ W_in. In float32
 * (x and g), for the experts of 1 to FEW_FUSED_MAX_ROWS rows: with fuse & 1, ga and dw_out in one pass over W_out
 * (few_fused_f32); with fuse & 2 (the caller then computes dw_in), dx is left to moe_route_train_bwd_in, which
 * computes it with dw_in in one pass over W_in. *deferred (if not NULL): 1 where this call took the one pass over
 * W_out, plus 2 where it left dx to moe_route_train_bwd_in. wa: float32 [S, F] scratch for those (w a), or NULL
 * (no one pass). */
int moe_route_train_bwd(const void *g, int g_dt, int64_t ld_g, const void *w_r, int dt_r, const int64_t *ids,
                        const float *probs, int64_t T, int64_t K, int64_t E, int renorm, float renorm_min,
                        float scale, const int64_t *seg, const float *ws, void *h, void *ga, const void *w_in,
                        const void *w_out, int64_t D, int64_t F, int dt, float *dx, void *dw_out,
                        const float *d_probs, const float *d_logits, float *dlogits, int64_t nn_min_g,
                        int64_t nn_min_h, int fuse, float *wa, int *deferred, int nthreads) {
    const int64_t S = T * K, W = 2 * F;
    const int64_t *start = seg, *end = seg + E, *tok = end + E, *slot = tok + S;
    if (dx && !dlogits) return -1;
    /* float32 with experts of a few rows: each projection's data and weight gradients for those in one pass
     * (few_fused_f32), the separate kernels for the others (their ends in big, the others' empty) */
    int64_t *big = dt == DT_F32 && g_dt == DT_F32 && fuse && wa ? malloc((size_t)(E ? E : 1) * sizeof(int64_t)) : NULL;
    int64_t nbig = 0;
    const int64_t nfew = big ? few_fused_split(start, end, E, big, &nbig) : 0;
    const int fuse_out = nfew && (fuse & 1) && dw_out, defer_dx = nfew && (fuse & 2) && dx;
    if (deferred) *deferred = fuse_out | defer_dx << 1;
    float *dws = malloc((size_t)(S ? S : 1) * sizeof(float));
    float *dw_tk = malloc((size_t)(S ? S : 1) * sizeof(float));
    int64_t *iota = malloc((size_t)(T ? T : 1) * sizeof(int64_t));
    int rc = 0;
    if (!dws || !dw_tk || !iota) {
        rc = -5;
        goto done;
    }
    if (fuse_out) {
        /* w a (from h), then ga = g @ W_out with dW_out = g^T @ (w a) in one pass for the few-row experts, ga of
         * the others, dH and the router weights' gradients (and w a over ga), then the others' dW_out */
        rc = moe_swiglu_fwd(h, W, wa, F, S, F, dt, nthreads);
        for (int64_t s = 0; s < S; s++)
            for (int64_t j = 0; j < F; j++) wa[s * F + j] *= ws[s];
        memset(ga, 0, (size_t)S * (size_t)F * sizeof(float));
        few_fused_f32((const float *)w_out, D, F, (const float *)g, ld_g, tok, wa, F, NULL, (float *)ga, F, NULL,
                      start, end, E, (float *)dw_out, nthreads);
        if (rc == 0 && nbig)
            rc = moe_small_nn(g, g_dt, ld_g, tok, w_out, dt, D, F, start, big, E, ga, dt, F, NULL, nn_min_g, nthreads);
        if (rc == 0) rc = moe_swiglu_bwd(h, W, ga, F, ws, S, F, dt, h, W, nbig ? ga : NULL, F, dws, nthreads);
        if (rc == 0 && nbig)
            rc = moe_small_outer(g, g_dt, ld_g, tok, ga, dt, F, NULL, D, F, start, big, E, dw_out, dt, nthreads);
        if (rc == 0) rc = zero_idle_experts(start, end, E, dw_out, (size_t)D * (size_t)F * esize(dt), nthreads);
    } else {
        /* ga = g @ W_out (unweighted); then dH (over h), w a (over ga) and the router weights' gradients ga . a */
        rc = moe_small_nn(g, g_dt, ld_g, tok, w_out, dt, D, F, start, end, E, ga, dt, F, NULL, nn_min_g, nthreads);
        if (rc == 0) rc = moe_swiglu_bwd(h, W, ga, F, ws, S, F, dt, h, W, dw_out ? ga : NULL, F, dws, nthreads);
        if (rc == 0 && dw_out) {
            rc = moe_small_outer(g, g_dt, ld_g, tok, ga, dt, F, NULL, D, F, start, end, E, dw_out, dt, nthreads);
            if (rc == 0) rc = zero_idle_experts(start, end, E, dw_out, (size_t)D * (size_t)F * esize(dt), nthreads);
        }
    }
    if (rc == 0 && dx && !defer_dx) {
        for (int64_t t = 0; t < T; t++) memset(dx + t * D, 0, (size_t)D * sizeof(float));
        rc = moe_small_nn(h, dt, W, NULL, w_in, dt, W, D, start, end, E, dx, DT_F32, D, tok, nn_min_h, nthreads);
    }
    if (rc != 0 || !dlogits) goto done;
    for (int64_t s = 0; s < S; s++) dw_tk[slot[s]] = dws[s];
    for (int64_t t = 0; t < T; t++) { /* softmax top-k backward, as CPUTopKSoftmaxFunction's */
        const float *p = probs + t * E;
        float *dp = dlogits + t * E, *dw = dw_tk + t * K;
        const int64_t *id = ids + t * K;
        for (int64_t e = 0; e < E; e++) dp[e] = d_probs ? d_probs[t * E + e] : 0.0f;
        float tot = 0.0f, dot = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            dw[k] *= scale;
            tot += p[id[k]];
            dot += dw[k] * p[id[k]];
        }
        const int clamped = renorm && renorm_min > 0.0f && tot < renorm_min;
        const float den = clamped ? renorm_min : tot;
        for (int64_t k = 0; k < K; k++) /* w_k = p_k / den: d p_j += dw_j / den - [not clamped] sum_k dw_k p_k / den^2 */
            dp[id[k]] += renorm ? dw[k] / den - (clamped ? 0.0f : dot / (den * den)) : dw[k];
        float sum = 0.0f;
        for (int64_t e = 0; e < E; e++) sum += dp[e] * p[e];
        for (int64_t e = 0; e < E; e++) dp[e] = p[e] * (dp[e] - sum) + (d_logits ? d_logits[t * E + e] : 0.0f);
    }
    if (dx && !defer_dx) rc = router_dx(dlogits, w_r, dt_r, T, E, D, dx, iota, nthreads);
done:
    free(big);
    free(dws);
    free(dw_tk);
    free(iota);
    return rc;
}

/* The input projection's weight gradient of the few-token step, dw_in [E, 2F, D] (dt) = dH[rows of e]^T @ x[tok]
 * per expert from the dH moe_route_train_bwd left in h, zero for experts without slots; with dx (not NULL: where
 * moe_route_train_bwd deferred it, float32), also dx [T, D] = dH @ W_in over each token's slots plus the router's
 * term dlogits @ w_r, the few-row experts' dx and dw_in in one pass over W_in. nn_min_h as there. */
int moe_route_train_bwd_in(const void *h, const void *x, int64_t ld_x, const int64_t *seg, int64_t E, int64_t D,
                           int64_t F, int dt, void *dw_in, const void *w_in, float *dx, const float *dlogits,
                           const void *w_r, int dt_r, int64_t T, int64_t nn_min_h, int nthreads) {
    const int64_t *start = seg, *end = seg + E, *tok = end + E;
    int rc = 0;
    const int64_t *bend = end; /* the experts the separate kernels take */
    int64_t *big = NULL, nbig = 0;
    if (dx) { /* deferred by moe_route_train_bwd: dx = dH @ W_in with dW_in = dH^T @ x in one pass for the few-row
               * experts, dx of the others, then the router's term */
        big = malloc((size_t)(E ? E : 1) * sizeof(int64_t));
        int64_t *iota = malloc((size_t)(T ? T : 1) * sizeof(int64_t));
        if (dt != DT_F32 || !big || !iota) {
            free(big);
            free(iota);
            return dt != DT_F32 ? -1 : -5;
        }
        few_fused_split(start, end, E, big, &nbig);
        bend = big;
        for (int64_t t = 0; t < T; t++) memset(dx + t * D, 0, (size_t)D * sizeof(float));
        few_fused_f32((const float *)w_in, 2 * F, D, (const float *)h, 2 * F, NULL, (const float *)x, ld_x, tok, dx, D,
                      tok, start, end, E, (float *)dw_in, nthreads);
        if (nbig)
            rc = moe_small_nn(h, dt, 2 * F, NULL, w_in, dt, 2 * F, D, start, big, E, dx, DT_F32, D, tok, nn_min_h,
                              nthreads);
        if (rc == 0) rc = router_dx(dlogits, w_r, dt_r, T, E, D, dx, iota, nthreads);
        free(iota);
    }
    if (rc == 0 && (!dx || nbig))
        rc = moe_small_outer(h, dt, 2 * F, NULL, x, dt, ld_x, tok, 2 * F, D, start, bend, E, dw_in, dt, nthreads);
    if (rc == 0) rc = zero_idle_experts(start, end, E, dw_in, (size_t)2 * (size_t)D * (size_t)F * esize(dt), nthreads);
    free(big);
    return rc;
}
