/* tiles_packed.h: the packed tiles (projections and data gradients of experts with tens to hundreds of rows).
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
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
