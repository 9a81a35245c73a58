/* grad_outer.h: the weight gradients, A^T @ B per expert (moe_small_outer).
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
#define NC 4 /* 16-wide column vectors per tile */

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
