/* projections.h: the projections' entry points (moe_small_up, moe_small_down), which split the experts among
 * the tile kinds, and the standalone SwiGLU kernels.
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
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

