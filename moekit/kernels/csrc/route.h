/* route.h: routing: top-k, router logits, softmax top-k, the counting sort, routing and decode in one call.
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
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

