/* tiles_dot.h: the dot-product tiles (small-M projections of decode and small batches).
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
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

