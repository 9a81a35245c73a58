/* route_train.h: the few-token training step: routing, both projections and every gradient in one call each.
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
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
