/* common.h: headers, scratch accounting, dtypes, threading, gather and scatter-add, scalar SwiGLU, and
 * the choice of vector code path (V8: AVX2 + FMA without AVX-512).
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
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
/* Column j of one row: writes aw[j] (aw not NULL), dgate and dup; returns ga[j] * a[j]. */
static inline __attribute__((always_inline)) float swiglu_bwd_at(const void *h, const void *ga, float w, void *dh,
                                                                  void *aw, int dt, int64_t F, int64_t j) {
    float x = ld(h, dt, j), up = ld(h, dt, F + j), g = ld(ga, dt, j);
    float s = sigmoid_f32(x), silu = x * s, av = silu * up, d = g * w;
    if (aw) st(aw, dt, j, av * w);
    st(dh, dt, j, d * up * (s + silu * (1.0f - s)));
    st(dh, dt, F + j, d * silu);
    return g * av;
}

static inline float swiglu_bwd_row(const void *h, const void *ga, float w, void *dh, void *aw, int dt, int64_t F) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < F; j++) acc += swiglu_bwd_at(h, ga, w, dh, aw, dt, F, j);
    return acc;
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
/* CPUs with AVX2 and FMA but not AVX-512 (AMD Zen 2/3, Intel before Skylake-SP) run 8-wide versions of the hot
 * loops (V8 below); others the plain loops, vectorised by the compiler. */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define V8 1
#endif
