/* tiles_swapped.h: the swapped tiles (AVX2 float32 input projection of experts of a few dozen rows).
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
#if defined(V8) /* (V8 builds have the packed tiles, MOE_GK, whose pieces these reuse) */
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
