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

static inline size_t esize(int dt) { return dt == DT_F32 ? 4 : 2; }

/* Address of element (i, j) of a row-major matrix with row stride ld. */
static inline char *at(const void *base, int dt, int64_t ld, int64_t i, int64_t j) {
    return (char *)base + ((size_t)i * (size_t)ld + (size_t)j) * esize(dt);
}

/* e^x for float32, vectorisable (Cephes-style: 2^round(x/ln2) times a degree-6 polynomial, ~1 ulp). The clamps use
 * comparisons, so NaN passes through unchanged. */
static inline float exp_f32(float x) {
    x = x > 88.3762626647949f ? 88.3762626647949f : x;
    x = x < -87.3365447504019f ? -87.3365447504019f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    union { uint32_t u; float f; } s;
    s.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * s.f;
}

/* 1 / (1 + e^-x); like PyTorch's, it is 0 at x = -inf (so silu(-inf) = -inf * 0 = NaN, as in PyTorch). */
static inline float sigmoid_f32(float x) {
    float e = exp_f32(-x);
    e = -x > 88.3762626647949f ? __builtin_inff() : e;
    return 1.0f / (1.0f + e);
}

/* Threads for a job of `work` elements: one thread below ~64k elements (a fork/join costs more than it saves). */
static inline int threads_for(int64_t work, int nthreads) {
    int64_t t = work / 65536;
    if (t < 1) t = 1;
    return t < nthreads ? (int)t : nthreads;
}

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
        float s = scale ? scale[i] : 1.0f;
        if (src_dt == DT_F32 && dst_dt == DT_F32) gather_row(r, DT_F32, o, DT_F32, n, s);
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

int moe_swiglu_fwd(const void *h, int64_t ld_h, void *a, int64_t ld_a, int64_t m, int64_t F, int dt, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(m * F, nthreads))
    for (int64_t i = 0; i < m; i++) {
        const void *hr = at(h, dt, ld_h, i, 0);
        void *ar = at(a, dt, ld_a, i, 0);
#define SWIGLU(d) swiglu_row(hr, ar, d, F)
        DISPATCH1(dt, SWIGLU);
#undef SWIGLU
    }
    return 0;
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

int moe_swiglu_bwd(const void *h, int64_t ld_h, const void *ga, int64_t ld_ga, const float *w, int64_t m, int64_t F,
                   int dt, void *dh, int64_t ld_dh, void *aw, int64_t ld_aw, float *dw, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(m * F, nthreads))
    for (int64_t i = 0; i < m; i++) {
        const void *hr = at(h, dt, ld_h, i, 0), *gr = at(ga, dt, ld_ga, i, 0);
        void *dr = at(dh, dt, ld_dh, i, 0), *ar = aw ? at(aw, dt, ld_aw, i, 0) : NULL;
        float acc;
#define SWIGLU_BWD(d) (ar ? swiglu_bwd_row(hr, gr, w[i], dr, ar, d, F) : swiglu_bwd_row(hr, gr, w[i], dr, NULL, d, F))
        acc = DISPATCH1(dt, SWIGLU_BWD);
#undef SWIGLU_BWD
        if (dw) dw[i] = acc;
    }
    return 0;
}
