/* amx.h: the AMX tiles (bfloat16 projections on Sapphire Rapids and later).
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */

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

