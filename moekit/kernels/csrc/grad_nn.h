/* grad_nn.h: the data gradients, dY @ W (moe_small_nn).
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
/* ---------------------------------------------------------------------------------------------------------------
 * Small-M backward: the same grouping, for the two other GEMM shapes of backpropagation.
 *   moe_small_nn:    C[s, :] = A[s, :] @ B_e       (dA = dY @ W: B_e = W[e] is [Kd, N], N contiguous)
 *   moe_small_outer: G_e     = A_e^T @ B_e         (dW = dY^T @ X over the rows of expert e)
 * Both vectorise along the contiguous output dimension and accumulate in float32; bfloat16 operands are widened
 * on load (these shapes have no pair structure for vdpbf16ps to use).
 * --------------------------------------------------------------------------------------------------------------- */
#if defined(V8)
#ifndef NR
#define NR 6 /* token rows per tile of the NN kernel: 6 rows x 2 vectors = 12 of AVX2's 16 registers accumulate */
#endif
#ifndef NNC
#define NNC 2 /* 16-wide column vectors per tile of the NN kernel */
#endif
#else
/* AVX-512: 6 rows x 4 vectors (64 columns), 24 accumulators: 10 loads (4 of B, 6 broadcasts) per 24 FMAs, where 8 x
 * 2 took 10 per 16. Measured on 2 Xeon cores, dY @ W_out and dH @ W_in together: fp32 fine-grained experts of 128
 * rows 46.7 -> 42.4 ms in the machine's slow phase, 32-34 ms either way in its fast one; bf16 on the pair dot
 * product (AMX off) 16 rows 8.4 -> 7.8 ms, 128 rows the same */
#ifndef NR
#define NR 6 /* token rows per tile of the NN kernel */
#endif
#ifndef NNC
#define NNC 4 /* 16-wide column vectors per tile of the NN kernel */
#endif
#endif


/* acc[r][c] = sum_k a_r[k] * b[k * ldb + n0 + 16 c]  for R rows and the columns [n0, n0 + 16 NNC) clipped to N. */
static inline __attribute__((always_inline)) void nn_tile_k(const void *const *a, const int adt, const int R, const char *b,
                                                            const int bdt, int64_t ldb, int64_t Kd, int64_t n0,
                                                            int64_t N, float *c /* R x 16 NNC */) {
#if defined(__AVX512F__)
    __m512 acc[NR][NNC];
    __mmask16 mc[NNC];
    UNROLL for (int q = 0; q < NNC; q++) {
        int64_t left = N - n0 - 16 * q;
        mc[q] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int q = 0; q < NNC; q++) acc[r][q] = _mm512_setzero_ps();
    const size_t eb = esize(bdt);
    for (int64_t k = 0; k < Kd; k++) {
        const char *bk = b + ((size_t)k * (size_t)ldb + (size_t)n0) * eb;
        _mm_prefetch(bk + 8 * (size_t)ldb * eb, _MM_HINT_T0);
        __m512 bv[NNC];
        UNROLL for (int q = 0; q < NNC; q++) bv[q] = ld16(bk + 16 * q * eb, bdt, mc[q]);
        UNROLL for (int r = 0; r < R; r++) {
            __m512 av = _mm512_set1_ps(ld(a[r], adt, k));
            UNROLL for (int q = 0; q < NNC; q++) acc[r][q] = _mm512_fmadd_ps(av, bv[q], acc[r][q]);
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int q = 0; q < NNC; q++) _mm512_storeu_ps(c + (r * NNC + q) * 16, acc[r][q]);
#elif defined(V8)
    /* R <= NR = 6 rows x 16 columns (two vectors) per pass: 12 accumulators; the second pass reads b from L1/L2.
     * Row pointers are copied to locals so they stay in registers (each k then costs 2 loads of b, R broadcasts
     * and 2R FMAs). */
    const size_t eb = esize(bdt), ea = esize(adt), bstep = (size_t)ldb * eb;
    const char *ap[NR];
    UNROLL for (int r = 0; r < R; r++) ap[r] = (const char *)a[r];
    for (int64_t c0 = n0; c0 < n0 + 16 * NNC && c0 < N; c0 += 16) {
        const int64_t left = N - c0;
        __m256 acc[NR][2];
        UNROLL for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        const char *bk = b + (size_t)c0 * eb;
#define NN8_ROWS(k)                                                                                                \
    UNROLL for (int r = 0; r < R; r++) {                                                                           \
        const __m256 av = adt == DT_F32 ? _mm256_broadcast_ss((const float *)(ap[r] + (size_t)(k) * ea))           \
                                        : _mm256_set1_ps(bf16_to_f32(*(const bf16 *)(ap[r] + (size_t)(k) * ea))); \
        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);                                                            \
        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);                                                            \
    }
        if (left >= 16 && ldb > 16 * NNC) { /* b's rows far apart (not packed): prefetched */
            for (int64_t k = 0; k < Kd; k++, bk += bstep) {
                _mm_prefetch(bk + 8 * bstep, _MM_HINT_T0);
                const __m256 b0 = ld8(bk, bdt), b1 = ld8(bk + 8 * eb, bdt);
                NN8_ROWS(k)
            }
        } else if (left >= 16) { /* a packed strip, in cache (a prefetch would only take a load slot) */
            for (int64_t k = 0; k < Kd; k++, bk += bstep) {
                const __m256 b0 = ld8(bk, bdt), b1 = ld8(bk + 8 * eb, bdt);
                NN8_ROWS(k)
            }
        } else {
            for (int64_t k = 0; k < Kd; k++, bk += bstep) {
                const __m256 b0 = ld8_part(bk, bdt, min64(8, left));
                const __m256 b1 = left > 8 ? ld8_part(bk + 8 * eb, bdt, left - 8) : _mm256_setzero_ps();
                NN8_ROWS(k)
            }
        }
#undef NN8_ROWS
        UNROLL for (int r = 0; r < R; r++) {
            float *cr = c + r * 16 * NNC + (c0 - n0);
            _mm256_storeu_ps(cr, acc[r][0]);
            _mm256_storeu_ps(cr + 8, acc[r][1]);
        }
    }
#else
    for (int r = 0; r < R; r++)
        for (int64_t j = 0; j < 16 * NNC; j++) c[r * 16 * NNC + j] = 0.0f;
    for (int64_t k = 0; k < Kd; k++) {
        const char *bk = b + ((size_t)k * (size_t)ldb + (size_t)n0) * esize(bdt);
        int64_t w = min64(16 * NNC, N - n0);
        for (int r = 0; r < R; r++) {
            float av = ld(a[r], adt, k);
            float *cr = c + r * 16 * NNC;
#pragma omp simd
            for (int64_t j = 0; j < w; j++) cr[j] += av * ld(bk, bdt, j);
        }
    }
#endif
}

#if defined(__AVX512BF16__)
/* The same tile for bfloat16 a and b with the pair dot product: two rows k, k+1 of b interleaved (unpacklo/hi
 * within 128-bit lanes, so each accumulator holds a fixed permutation of 16 columns, undone at the end) against the
 * broadcast pair (a[k], a[k+1]); half the multiply instructions of the widening path. */
static inline __attribute__((always_inline)) void nn_tile_bf16_k(const void *const *a, const int R, const char *b,
                                                                 int64_t ldb, int64_t Kd, int64_t n0, int64_t N,
                                                                 float *c) {
    __m512 acc[NR][NNC];
    __mmask32 mc[NNC / 2];
    UNROLL for (int p = 0; p < NNC / 2; p++) {
        int64_t left = N - n0 - 32 * p;
        mc[p] = left >= 32 ? (__mmask32)0xffffffffu : left <= 0 ? (__mmask32)0 : (__mmask32)((1u << left) - 1);
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int q = 0; q < NNC; q++) acc[r][q] = _mm512_setzero_ps();
    const int64_t K2 = Kd & ~(int64_t)1;
    for (int64_t k = 0; k <= K2; k += 2) {
        if (k == Kd) break;
        const bf16 *b0 = (const bf16 *)b + (size_t)k * (size_t)ldb + (size_t)n0;
        const int tail = k + 1 == Kd; /* odd Kd: the last row pairs with zeros */
        _mm_prefetch((const char *)(b0 + 8 * (size_t)ldb), _MM_HINT_T0);
        _mm_prefetch((const char *)(b0 + 9 * (size_t)ldb), _MM_HINT_T0);
        __m512i lo[NNC / 2], hi[NNC / 2];
        UNROLL for (int p = 0; p < NNC / 2; p++) {
            __m512i r0 = _mm512_maskz_loadu_epi16(mc[p], b0 + 32 * p);
            __m512i r1 = tail ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(mc[p], b0 + ldb + 32 * p);
            lo[p] = _mm512_unpacklo_epi16(r0, r1);
            hi[p] = _mm512_unpackhi_epi16(r0, r1);
        }
        UNROLL for (int r = 0; r < R; r++) {
            const bf16 *ar = (const bf16 *)a[r] + k;
            int32_t pair; /* (a[k], a[k+1]) is one 32-bit load, broadcast by the load port */
            if (tail) pair = (int32_t)ar[0];
            else memcpy(&pair, ar, sizeof pair);
            __m512i av = _mm512_set1_epi32(pair);
            UNROLL for (int p = 0; p < NNC / 2; p++) {
                acc[r][2 * p] = _mm512_dpbf16_ps(acc[r][2 * p], (__m512bh)av, (__m512bh)lo[p]);
                acc[r][2 * p + 1] = _mm512_dpbf16_ps(acc[r][2 * p + 1], (__m512bh)av, (__m512bh)hi[p]);
            }
        }
    }
    /* lo holds columns 8l..8l+3 of lane l, hi columns 8l+4..8l+7: interleave the lanes back into column order */
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int p = 0; p < NNC / 2; p++) {
        __m512 l = acc[r][2 * p], h = acc[r][2 * p + 1];
        __m512 first = _mm512_shuffle_f32x4(l, h, _MM_SHUFFLE(1, 0, 1, 0));  /* l0 l1 h0 h1 */
        __m512 second = _mm512_shuffle_f32x4(l, h, _MM_SHUFFLE(3, 2, 3, 2)); /* l2 l3 h2 h3 */
        _mm512_storeu_ps(c + (r * NNC + 2 * p) * 16, _mm512_shuffle_f32x4(first, first, _MM_SHUFFLE(3, 1, 2, 0)));
        _mm512_storeu_ps(c + (r * NNC + 2 * p + 1) * 16, _mm512_shuffle_f32x4(second, second, _MM_SHUFFLE(3, 1, 2, 0)));
    }
}
#endif

static void nn_tile(const void *const *a, int adt, int R, const char *b, int bdt, int64_t ldb, int64_t Kd, int64_t n0,
                    int64_t N, float *c) {
#if defined(__AVX512BF16__)
#define NN_BF16(r) if (adt == DT_BF16 && bdt == DT_BF16) { nn_tile_bf16_k(a, r, b, ldb, Kd, n0, N, c); break; }
#else
#define NN_BF16(r)
#endif
#define NN_CASE(r)                                                                         \
    case r:                                                                                \
        NN_BF16(r)                                                                         \
        if (adt == DT_F32 && bdt == DT_F32)                                                \
            nn_tile_k(a, DT_F32, r, b, DT_F32, ldb, Kd, n0, N, c);                         \
        else if (adt == DT_F32)                                                            \
            nn_tile_k(a, DT_F32, r, b, DT_BF16, ldb, Kd, n0, N, c);                        \
        else if (bdt == DT_F32)                                                            \
            nn_tile_k(a, DT_BF16, r, b, DT_F32, ldb, Kd, n0, N, c);                        \
        else                                                                               \
            nn_tile_k(a, DT_BF16, r, b, DT_BF16, ldb, Kd, n0, N, c);                       \
        break;
    switch (R) {
        NN_CASE(1)
        NN_CASE(2)
        NN_CASE(3)
        NN_CASE(4)
        NN_CASE(5)
        NN_CASE(6)
#if NR > 6
        NN_CASE(7)
        NN_CASE(8)
#endif
    }
#undef NN_CASE
}

/* C[s, n] = sum_k A[ia(s), k] * B[e, k, n] for the rows s of expert e (start[e] <= s < end[e]), B [E, Kd, N]
 * contiguous; ia(s) = a_idx ? a_idx[s] : s. c_idx NULL: C[s, n] is written in dtype cdt (row stride ldc);
 * else float32 C[c_idx[s], n] += the result (the rows of one expert must have distinct c_idx). Each thread owns a
 * block of columns for all experts, so accumulation is race-free and in expert order (where no expert has more than
 * NN_FEW rows, nn_stream instead reads whole weight rows, and sums by column blocks in the same order). */
#define PACK_PF 16 /* weight rows ahead that the NN kernel's packing prefetches */
#if defined(V8)
/* AVX2: one item per thread, as wide as 4 KiB of each weight row, in passes of 128 reduction rows: the packing then
 * reads the weights in long runs of whole lines (a few hundred bytes of every row per item left the packing waiting
 * on memory: Zen 3, fp32, dH @ W_in of Mixtral-like experts with 32 rows 9.8 -> 8.9 ms, fine-grained with 16 rows
 * 12.1 -> 10.2 ms, 128 rows 53.7 -> 45.6 ms; g @ W_out the same or faster) */
#define NN_ITEMS_PER_THREAD 1
#define NN_ITEM_BYTES 4096
#define NN_KC 128
#else
#define NN_ITEMS_PER_THREAD 2 /* work items per thread of the NN kernel */
#define NN_ITEM_BYTES 256 /* bytes of each weight row per work item of the NN kernel, at most (128 bf16 columns) */
#define NN_KC 128 /* reduction rows per pass of the NN kernel where it can sum passes in fp32 (a strip of one tile's
                   * 64 columns of B is then 32 KiB of fp32, and stays in L1 while the expert's row blocks run over
                   * it: fp32 fine-grained experts of 128 rows 5-7% faster than passes of 256 rows, whose 64 KiB
                   * strips overflowed L1; bf16 the same) */
#endif
/* Rows per expert up to which the NN kernel streams whole weight rows (nn_stream): up to NN_FEW, except bf16
 * weights on the other builds than AVX2 (NN_FEW_BF16, 8). With more rows than one register group (NN_REGS),
 * each chunk of weight rows is read from memory once and from L1 by the later groups; the tiles' column blocks of
 * a few hundred bytes per weight row keep memory half idle. Measured on 2 Xeon (Sapphire Rapids) cores, fp32
 * against the tiles: fine-grained experts, dH @ W_in and g @ W_out together, 16 rows per expert 9.5 -> 5.6 ms, 32
 * rows 19.4 -> 15.0 ms, 64 rows 2-3% faster, 128 rows 10% slower; Mixtral-like 32 rows 11.6 -> 9.4 ms, 64 rows 21.4
 * -> 19.2 ms, 128 rows 5% slower. On AVX2, with chunks of ~128 KiB (nn_kchunk): Zen 3, 2 threads, paired
 * round-robin, weights from memory, against the packed tiles: Mixtral-like dH @ W_in and g @ W_out fp32 at 12 rows
 * 0.57x and 0.59x (10 rows, against the dot-product tiles, 0.55x and 0.56x), 16 rows 0.68x and 0.71x, 32 rows
 * 0.79-0.84x and 0.89-0.90x, 48 rows 0.85x and 1.02x, 64 rows 0.96x and 1.12x, 96 rows 0.98x and 1.22x; bf16 at
 * 32 rows 0.88x and 0.97x; fine-grained fp32 at 16 rows 0.74x and 0.79x (bf16 0.76x and 0.71x), 32 rows 0.93x and
 * 0.87x, 48 rows 1.02x and 0.97x: up to 40 rows (the packed tiles' PACKED_NN_MIN_ROWS starts above). */
#ifndef NN_FEW
#if defined(__AVX512F__)
#define NN_FEW 96
#elif defined(V8)
#define NN_FEW 40
#else
#define NN_FEW 8
#endif
#endif
#if defined(V8) || NN_FEW < 8
#define NN_FEW_BF16 NN_FEW
#else
#define NN_FEW_BF16 8
#endif
#define NN_STREAM_STEP 4 /* weight rows per step of nn_stream */
#define NN_ROW_COST 6 /* nn_stream's cost of a weight row beyond its multiply-adds, in rows of A (reading it) */

/* acc[r][:N] += sum_{k < kn} a_r[k] * b[k][:N] for R rows (a_r float32, kn <= NN_STREAM_STEP consecutive rows of b,
 * ldb apart, dtype bdt): one pass over the rows of b, which stay in L1 while each row's accumulator takes them. */
static inline __attribute__((always_inline)) void nn_stream_step(const char *b, const int bdt, size_t ldb, int64_t N,
                                                                 int kn, const float a[][NN_STREAM_STEP], int R,
                                                                 float *acc) {
    const char *b0 = b, *b1 = b + ldb, *b2 = b + 2 * ldb, *b3 = b + 3 * ldb;
    for (int r = 0; r < R; r++, acc += N) {
        const float a0 = a[r][0], a1 = a[r][1], a2 = a[r][2], a3 = a[r][3];
        if (kn == 4) {
#pragma omp simd
            for (int64_t j = 0; j < N; j++)
                acc[j] += a0 * ld(b0, bdt, j) + a1 * ld(b1, bdt, j) + a2 * ld(b2, bdt, j) + a3 * ld(b3, bdt, j);
        } else {
            for (int q = 0; q < kn; q++) {
                const char *bq = b + (size_t)q * ldb;
                const float aq = a[r][q];
#pragma omp simd
                for (int64_t j = 0; j < N; j++) acc[j] += aq * ld(bq, bdt, j);
            }
        }
    }
}

/* moe_small_nn where every active expert has few rows (NN_FEW), as in decode and its backward: the work is
 * reading the weights. The experts' weight rows, all of them in order, are split into one contiguous range per
 * thread, which streams whole rows (N elements) into per-thread fp32 partial sums of the rows of A it touches; the
 * partials are then summed into C by column blocks (each C element by one thread, experts in order: race-free). The
 * general kernel would read the weights in column blocks, a few hundred bytes of every row per pass, at about half
 * the memory rate. */
#define NN_REGS_MIN_F32 2 /* float32 weights: rows per expert from which nn_stream_regs runs (single rows keep the
                           * steps) */
#define NN_KCHUNK 64 /* most weight rows per chunk of nn_stream_regs (in L1/L2 while every column block reads them) */
/* The rows per chunk for an expert of R rows and weight rows of ldb bytes: 16 on AVX-512; on AVX2, from 9 rows
 * per expert, as many as fill ~128 KiB (16 to NN_KCHUNK, whole steps of 4), each register group's sums then read
 * and written once per chunk rather than once per 16 weight rows (Zen 3, 2 threads, Mixtral-like experts of 32
 * rows, against 16 weight rows: dH @ W_in, 2 KiB rows, 64 per chunk 0.82x, 32 0.84x, 128 1.03x; g @ W_out, 5.5 KiB
 * rows, 32 per chunk 0.89x, 64 0.96x, 128 1.11x; chunks of 96, 128 or 192 KiB within 1.5% of each other). With
 * up to 8 rows, bound by reading the weights, 16 (the large chunks took 1.04-1.34x at 2-8 rows), and fewer for
 * float32 experts of one register group's rows: 4 for up to NN_KCH_FEW_ROWS (3), 8 for 4-6, the chunk's weight
 * rows then fewer streams at once, and each group's sums read and written per chunk cheap with few rows (Zen 3,
 * 2 threads, Mixtral-like experts from memory, against 16: g @ W_out 2 rows 0.85x, 3 rows 0.78x, 4 rows 0.97x (8
 * per chunk), 6 rows 0.85x; dH @ W_in 0.74x, 0.81x, 0.83x, 0.90x; 8 rows, two register groups, 4 per chunk 1.18-1.26x
 * and 8 1.02-1.08x, hence 16; bf16, whose chunks widen their rows, 4 or 8 per chunk 0.95-1.40x: 16). The layer's
 * fp32 forward+backward at T = 16: Mixtral-like 0.96-0.97x, fine-grained 0.94-0.96x; T = 8 0.98x, T = 32 0.99x. */
#ifndef NN_KCH_FEW_ROWS
#define NN_KCH_FEW_ROWS 3
#endif
static inline int64_t nn_kchunk(size_t ldb, int64_t R, int bdt) {
#if defined(V8)
    const int64_t r = (int64_t)(((size_t)128 << 10) / (ldb ? ldb : 1)) / 4 * 4;
    if (bdt == DT_F32 && R <= 6) return R <= NN_KCH_FEW_ROWS ? 4 : 8; /* (6: one register group on AVX2) */
    return R <= 8 || r < 16 ? 16 : r > NN_KCHUNK ? NN_KCHUNK : r;
#else
    (void)ldb, (void)R, (void)bdt;
    return 16;
#endif
}
#if defined(__AVX512F__)
#define NN_REGS 8 /* rows whose sums nn_stream_regs keeps in registers at once */
/* acc[r][:N] += sum_{k < kn} a[r][k] * b[k][:N] for R (a constant, <= NN_REGS) rows: each 32 columns' sums of all
 * R rows in registers over the kn rows of b (bf16 widened once per load, not once per row of A), added to acc once;
 * pf: the next chunk of b (pf_bytes, may be 0), prefetched into L2 a share with each column block. */
static inline __attribute__((always_inline)) void nn_stream_regs(const char *b, const int bdt, size_t ldb, int64_t N,
                                                                 int kn, const float a[][NN_KCHUNK], const int R,
                                                                 float *acc, const char *pf, size_t pf_bytes) {
    const size_t eb = esize(bdt);
    const int64_t nblk = (N + 31) / 32;
    for (int64_t j0 = 0, blk = 0; j0 < N; j0 += 32, blk++) {
        const __mmask16 m0 = tail16(N - j0), m1 = tail16(N - j0 - 16 > 0 ? N - j0 - 16 : 0);
        if (pf_bytes) /* this block's share of the next chunk's lines */
            for (size_t o = pf_bytes * (size_t)blk / (size_t)nblk & ~(size_t)63;
                 o < pf_bytes * (size_t)(blk + 1) / (size_t)nblk; o += 64)
                _mm_prefetch(pf + o, _MM_HINT_T1);
        __m512 lo[NN_REGS], hi[NN_REGS];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_ps();
        const char *bk = b + (size_t)j0 * eb;
        for (int q = 0; q < kn; q++, bk += ldb) {
            const __m512 w0 = ld16(bk, bdt, m0), w1 = ld16(bk + 16 * eb, bdt, m1);
            for (int r = 0; r < R; r++) {
                const __m512 av = _mm512_set1_ps(a[r][q]);
                lo[r] = _mm512_fmadd_ps(av, w0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, w1, hi[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            float *o = acc + (size_t)r * (size_t)N + j0;
            _mm512_mask_storeu_ps(o, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, o), lo[r]));
            _mm512_mask_storeu_ps(o + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, o + 16), hi[r]));
        }
    }
}

#elif defined(V8)
/* The same on AVX2: each 16 columns' sums of up to NN_REGS (6) rows in 12 registers over the chunk's rows of b,
 * each weight vector loaded (and widened from bf16) once for all of them; the last N % 16 columns one by one.
 * Measured on Zen 3 (2 threads, paired round-robin), Mixtral-like experts (8, weights from memory) against the
 * steps of 4 weight rows below, which read and write every row's sums per step (and widened bf16 weights into a
 * buffer first): g @ W_out and dH @ W_in of 1 row per expert fp32 1.13x and 0.87x, bf16 0.72x and 0.75x; 2 rows
 * fp32 1.07x and 0.88x, bf16 0.59x and 0.62x; 4 rows fp32 0.95x and 0.75x, bf16 0.51x and 0.57x; 8 rows fp32 0.75x
 * and 0.61x, bf16 0.55x and 0.58x; the layer's training steps T = 16, bf16 0.88-0.92x, fp32 0.94x (Mixtral-like)
 * and 0.93-0.96x (fine-grained). Single float32 rows keep the steps: with these, the layer's fp32 step at T = 4 (one
 * row per expert) took 1.03-1.04x. (With chunks of 16 rows, experts of 12-32 rows measured the same as on the
 * packed tiles; with larger chunks, faster: see NN_FEW.) */
#define NN_REGS 6
static inline __attribute__((always_inline)) void nn_stream_regs(const char *b, const int bdt, size_t ldb, int64_t N,
                                                                 int kn, const float a[][NN_KCHUNK], const int R,
                                                                 float *acc, const char *pf, size_t pf_bytes) {
    const size_t eb = esize(bdt);
    const int64_t N16 = N / 16 * 16, nblk = (N + 15) / 16;
    for (int64_t j0 = 0, blk = 0; j0 < N; j0 += 16, blk++) {
        if (pf_bytes) /* this block's share of the next chunk's lines */
            for (size_t o = pf_bytes * (size_t)blk / (size_t)nblk & ~(size_t)63;
                 o < pf_bytes * (size_t)(blk + 1) / (size_t)nblk; o += 64)
                _mm_prefetch(pf + o, _MM_HINT_T1);
        if (j0 >= N16) { /* the last columns */
            for (int r = 0; r < R; r++)
                for (int64_t j = j0; j < N; j++) {
                    float sum = 0.0f;
                    for (int q = 0; q < kn; q++) sum += a[r][q] * ld(b + (size_t)q * ldb, bdt, j);
                    acc[(size_t)r * (size_t)N + j] += sum;
                }
            break;
        }
        __m256 lo[NN_REGS], hi[NN_REGS];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();
        const char *bk = b + (size_t)j0 * eb;
        for (int q = 0; q < kn; q++, bk += ldb) {
            const __m256 w0 = ld8(bk, bdt), w1 = ld8(bk + 8 * eb, bdt);
            for (int r = 0; r < R; r++) {
                const __m256 av = _mm256_broadcast_ss(&a[r][q]);
                lo[r] = _mm256_fmadd_ps(av, w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(av, w1, hi[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            float *o = acc + (size_t)r * (size_t)N + j0;
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), lo[r]));
            _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), hi[r]));
        }
    }
}

#endif
#if defined(__AVX512F__) || defined(V8)
static inline __attribute__((always_inline)) void nn_stream_dt(const char *b, const int bdt, size_t ldb, int64_t N,
                                                               int kn, const float a[][NN_KCHUNK], int R, float *acc,
                                                               const char *pf, size_t pf_bytes) {
    /* groups of up to NN_REGS rows, the chunk's weight rows read from L1 after the first group; the next chunk's
     * prefetches spread over the groups */
    const int ng = (R + NN_REGS - 1) / NN_REGS;
    for (int g = 0; g < ng; g++) {
        const int r0 = g * NN_REGS, G = R - r0 < NN_REGS ? R - r0 : NN_REGS;
        const size_t p0 = pf_bytes * (size_t)g / (size_t)ng & ~(size_t)63, p1 = pf_bytes * (size_t)(g + 1) / (size_t)ng;
        const char *pg = pf + p0;
        const size_t pn = p1 > p0 ? p1 - p0 : 0;
        float *ag = acc + (size_t)r0 * (size_t)N;
        switch (G) { /* (G constant in each: the sums stay in registers) */
        case 1: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 1, ag, pg, pn); break;
        case 2: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 2, ag, pg, pn); break;
        case 3: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 3, ag, pg, pn); break;
        case 4: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 4, ag, pg, pn); break;
        case 5: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 5, ag, pg, pn); break;
#if NN_REGS > 6
        case 6: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 6, ag, pg, pn); break;
        case 7: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, 7, ag, pg, pn); break;
#endif
        default: nn_stream_regs(b, bdt, ldb, N, kn, a + r0, NN_REGS, ag, pg, pn); break;
        }
    }
}
#endif

/* Partial sums of up to this many floats (16 KiB: the few-token step's few rows) live on the caller's stack. */
#ifndef NN_STACK_FLOATS
#define NN_STACK_FLOATS 4096
#endif

static int nn_stream(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *B, int bdt, int64_t Kd,
                     int64_t N, const int64_t *start, const int64_t *end, const int64_t *active, int64_t na, void *C,
                     int cdt, int64_t ldc, const int64_t *c_idx, int nt) {
    /* Thread t streams the units (weight rows, expert after expert) [cut[t], cut[t + 1]), cut where the units' cost
     * (an expert's rows plus NN_ROW_COST per weight row) is split evenly: experts of unequal rows (a router's) would
     * leave a split by units unbalanced. Its partial sums hold the rows of the experts its range touches, in order
     * (expert i's first at off[i] - off[span[2 t]], from poff[t]). */
    SCRATCH_ARRAY(int64_t, cut, nt + 1 + 2 * nt + na + 1 + nt, 256);
    if (!cut) return -5;
    int64_t *span = cut + nt + 1, *off = span + 2 * nt, *poff = off + na + 1; /* span: first and last expert */
    off[0] = 0;
    for (int64_t i = 0; i < na; i++) off[i + 1] = off[i] + end[active[i]] - start[active[i]];
#define NN_UNIT_COST(i) ((double)(off[(i) + 1] - off[i] + NN_ROW_COST)) /* of one weight row of active expert i */
    double cost = 0.0, before = 0.0; /* all units' cost; the cost of the experts before i */
    for (int64_t i = 0; i < na; i++) cost += (double)Kd * NN_UNIT_COST(i);
    cut[0] = 0;
    int t = 1;
    for (int64_t i = 0; i < na && t < nt; before += (double)Kd * NN_UNIT_COST(i), i++)
        for (double want; t < nt && before + (double)Kd * NN_UNIT_COST(i) >= (want = cost * t / nt); t++) {
            const int64_t u = i * Kd + (int64_t)((want - before) / NN_UNIT_COST(i) + 0.5);
            cut[t] = u < cut[t - 1] ? cut[t - 1] : u > na * Kd ? na * Kd : u;
        }
#undef NN_UNIT_COST
    for (; t <= nt; t++) cut[t] = na * Kd;
    size_t psize = 0;
    for (int t = 0; t < nt; t++) {
        span[2 * t] = cut[t] / Kd;
        span[2 * t + 1] = cut[t + 1] > cut[t] ? (cut[t + 1] - 1) / Kd : cut[t] / Kd - 1; /* empty range: no expert */
        poff[t] = (int64_t)psize;
        if (span[2 * t + 1] >= span[2 * t]) psize += (size_t)(off[span[2 * t + 1] + 1] - off[span[2 * t]]) * (size_t)N;
    }
    /* (a few rows' partial sums, a few-token step's: on the stack, no allocation) */
    SCRATCH_ARRAY(float, part, psize, NN_STACK_FLOATS);
    if (!part) {
        SCRATCH_FREE(cut);
        return -5;
    }
    const size_t eb = esize(bdt), ldb = (size_t)N * eb;
    const int64_t CB = 64; /* columns per block of the summing pass */
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int t = 0; t < nt; t++) {
            const int64_t u0 = cut[t], u1 = cut[t + 1];
            float *pt = part + poff[t] - (size_t)off[span[2 * t]] * (size_t)N;
#if defined(__AVX512F__) || defined(V8)
            float *wf = NULL; /* (bf16 rows: nn_stream_regs widens them itself) */
#else
            float *wf = bdt == DT_F32 ? NULL : malloc((size_t)NN_STREAM_STEP * (size_t)N * sizeof(float));
#endif
            for (int64_t u = u0; u < u1;) {
                const int64_t i = u / Kd, e = active[i], k0 = u % Kd, k1 = min64(Kd, k0 + (u1 - u));
                const int64_t s0 = start[e], R = end[e] - s0;
                float *acc = pt + (size_t)off[i] * (size_t)N;
                memset(acc, 0, (size_t)R * (size_t)N * sizeof(float));
                const char *be = (const char *)B + (size_t)e * (size_t)Kd * ldb;
                const void *ar[NN_FEW];
                for (int r = 0; r < R; r++) ar[r] = at(A, adt, lda, a_idx ? a_idx[s0 + r] : s0 + r, 0);
#if defined(__AVX512F__) || defined(V8)
                const int regs = bdt == DT_BF16 || R >= NN_REGS_MIN_F32;
                /* chunks of kch weight rows (contiguous: read once, in order, the next chunk prefetched),
                 * each column block's sums of all R rows in registers over the chunk. Measured on 2 Sapphire
                 * Rapids cores, Mixtral-like experts (weights in L3), against the steps below: bf16, 4 rows per
                 * expert g @ W_out 0.85 -> 0.42 ms, dH @ W_in 1.41 -> 0.81 ms; 7 rows 1.17 -> 0.54, 2.08 -> 1.03;
                 * fp32 4 rows 1.04 -> 0.64, 1.82 -> 1.60; fp32 single rows ~15% slower: they keep the steps */
                const int64_t kch = nn_kchunk(ldb, R, bdt);
                for (int64_t k = k0; k < k1 && regs; k += kch) {
                    const int kn = (int)min64(kch, k1 - k);
                    float a[NN_FEW][NN_KCHUNK];
                    for (int r = 0; r < R; r++)
                        for (int q = 0; q < kn; q++) a[r][q] = ld(ar[r], adt, k + q);
                    const char *b = be + (size_t)k * ldb;
                    const size_t next = k + kn < k1 ? (size_t)min64(kch, k1 - k - kn) * ldb : 0;
                    if (bdt == DT_F32) nn_stream_dt(b, DT_F32, ldb, N, kn, a, (int)R, acc, b + (size_t)kn * ldb, next);
                    else nn_stream_dt(b, DT_BF16, ldb, N, kn, a, (int)R, acc, b + (size_t)kn * ldb, next);
                }
                if (regs) {
                    u += k1 - k0;
                    continue;
                }
#endif
                for (int64_t k = k0; k < k1; k += NN_STREAM_STEP) {
                    const int kn = (int)min64(NN_STREAM_STEP, k1 - k);
                    float a[NN_FEW][NN_STREAM_STEP] = {{0.0f}};
                    for (int r = 0; r < R; r++)
                        for (int q = 0; q < kn; q++) a[r][q] = ld(ar[r], adt, k + q);
                    const char *b = be + (size_t)k * ldb;
                    if (bdt == DT_F32 || !wf) {
                        if (bdt == DT_F32) nn_stream_step(b, DT_F32, ldb, N, kn, a, (int)R, acc);
                        else nn_stream_step(b, DT_BF16, ldb, N, kn, a, (int)R, acc);
                    } else { /* bf16 rows converted once, not once per row of A */
                        for (int q = 0; q < kn; q++) {
                            const bf16 *bq = (const bf16 *)(b + (size_t)q * ldb);
                            float *o = wf + (size_t)q * (size_t)N;
#pragma omp simd
                            for (int64_t j = 0; j < N; j++) o[j] = bf16_to_f32(bq[j]);
                        }
                        nn_stream_step((const char *)wf, DT_F32, (size_t)N * 4, N, kn, a, (int)R, acc);
                    }
                }
                u += k1 - k0;
            }
            free(wf);
        }
#pragma omp for schedule(static)
        for (int64_t j0 = 0; j0 < N; j0 += CB) {
            const int64_t w = min64(CB, N - j0);
            for (int64_t i = 0; i < na; i++) {
                const int64_t e = active[i];
                for (int64_t s = start[e]; s < end[e]; s++) {
                    float sum[64] = {0.0f};
                    for (int t = 0; t < nt; t++) {
                        if (i < span[2 * t] || i > span[2 * t + 1]) continue;
                        const float *p =
                            part + poff[t] + (size_t)(off[i] - off[span[2 * t]] + s - start[e]) * (size_t)N + j0;
#pragma omp simd
                        for (int64_t j = 0; j < w; j++) sum[j] += p[j];
                    }
                    if (c_idx) {
                        float *o = (float *)C + (size_t)c_idx[s] * (size_t)ldc + j0;
#pragma omp simd
                        for (int64_t j = 0; j < w; j++) o[j] += sum[j];
                    } else {
                        void *o = at(C, cdt, ldc, s, j0);
                        for (int64_t j = 0; j < w; j++) st(o, cdt, j, sum[j]);
                    }
                }
            }
        }
    }
    SCRATCH_FREE(part);
    SCRATCH_FREE(cut);
    return 0;
}

static int small_nn(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *B, int bdt, int64_t Kd,
                    int64_t N, const int64_t *start, const int64_t *end, int64_t E, void *C, int cdt, int64_t ldc,
                    const int64_t *c_idx, int nthreads) {
    const int64_t NBLK = 16 * NNC;
    int64_t rows = 0, na = 0, most = 0; /* most: the rows of the largest expert */
    for (int64_t e = 0; e < E; e++) {
        rows += end[e] - start[e];
        na += end[e] > start[e];
        most = end[e] - start[e] > most ? end[e] - start[e] : most;
    }
    /* Work items of several tiles' columns (at most NN_ITEM_BYTES of each weight row): a row block of A is then
     * reused from cache by the item's tiles instead of being read again per NBLK columns. */
    const int nt = threads_for(gemm_work(rows, na, N, Kd), nthreads);
    if (na && most <= (bdt == DT_F32 ? NN_FEW : NN_FEW_BF16)) {
        SCRATCH_ARRAY(int64_t, active, na, 256);
        if (!active) return -5;
        for (int64_t e = 0, i = 0; e < E; e++)
            if (end[e] > start[e]) active[i++] = e;
        const int rc = nn_stream(A, adt, lda, a_idx, B, bdt, Kd, N, start, end, active, na, C, cdt, ldc, c_idx, nt);
        SCRATCH_FREE(active);
        return rc;
    }
    const size_t eb = esize(bdt);
    const int64_t IB = item_width(N, nt, NN_ITEMS_PER_THREAD, NBLK, NN_ITEM_BYTES / (int64_t)eb);
    const int64_t nb = (N + IB - 1) / IB;
    /* Passes over at most NN_KC reduction rows where their results can be summed in fp32 (C accumulated, or
     * written in fp32); a bf16 C is written once, from one pass over all of Kd. */
    const int64_t KC = (c_idx || cdt == DT_F32) ? min64(NN_KC, Kd) : Kd;
#pragma omp parallel num_threads(nt)
    {
        /* An expert with more than one row block first copies its item's columns of B, one pass of rows at a time,
         * into strips of NBLK columns, each contiguous ([strip][k][NBLK]): B's rows are N apart, and with N a
         * power of two (d_model) the tiles' column strips would all fall into the same few cache sets and be
         * evicted between row blocks. */
        char *pack = malloc((size_t)KC * (size_t)IB * eb);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nb; item++) {
            const int64_t i0 = item * IB, i1 = min64(i0 + IB, N), pw = i1 - i0;
            for (int64_t e = 0; e < E; e++) {
                if (end[e] <= start[e]) continue;
                const char *be = (const char *)B + (size_t)e * (size_t)Kd * (size_t)N * eb;
                const int packed = pack && end[e] - start[e] > NR;
                const int64_t kc = packed ? KC : Kd;
                for (int64_t k0 = 0; k0 < Kd; k0 += kc) {
                    const int64_t kn = min64(kc, Kd - k0);
                    if (packed) {
                        for (int64_t k = k0; k < k0 + kn; k++) { /* strided rows of a weight from memory: prefetched */
                            const char *bk = be + ((size_t)k * (size_t)N + (size_t)i0) * eb;
                            if (k + PACK_PF < Kd) prefetch_row(bk + (size_t)PACK_PF * (size_t)N * eb, pw * (int64_t)eb);
                            for (int64_t j = 0; j < pw; j += NBLK)
                                memcpy(pack + ((size_t)j * (size_t)kn + (size_t)(k - k0) * (size_t)NBLK) * eb,
                                       bk + (size_t)j * eb, (size_t)min64(NBLK, pw - j) * eb);
                        }
                    }
                    for (int64_t n0 = i0; n0 < i1; n0 += NBLK) {
                        const int64_t w = min64(NBLK, N - n0);
                        const char *bb = packed ? pack + (size_t)(n0 - i0) * (size_t)kn * eb
                                                : be + (size_t)k0 * (size_t)N * eb;
                        for (int64_t s = start[e]; s < end[e]; s += NR) {
                            const void *a[NR];
                            int R = (int)min64(NR, end[e] - s);
                            for (int r = 0; r < R; r++) a[r] = at(A, adt, lda, a_idx ? a_idx[s + r] : s + r, k0);
                            for (int64_t q = s + NR; q < min64(s + 2 * NR, end[e]); q++) { /* the next row block */
                                prefetch_row(at(A, adt, lda, a_idx ? a_idx[q] : q, k0), kn * (int64_t)esize(adt));
                                if (c_idx) prefetch_row((const float *)C + (size_t)c_idx[q] * (size_t)ldc + n0, w * 4);
                            }
                            float c[NR * 16 * NNC] __attribute__((aligned(64)));
                            nn_tile(a, adt, R, bb, bdt, packed ? NBLK : N, kn, packed ? 0 : n0, packed ? w : N, c);
                            for (int r = 0; r < R; r++) {
                                const float *cr = c + r * 16 * NNC;
                                if (c_idx || k0 > 0) { /* summed in fp32: C accumulates, or a later pass */
                                    float *o = c_idx ? (float *)C + (size_t)c_idx[s + r] * (size_t)ldc + n0
                                                     : (float *)at(C, DT_F32, ldc, s + r, n0);
#pragma omp simd
                                    for (int64_t j = 0; j < w; j++) o[j] += cr[j];
                                } else {
                                    void *o = at(C, cdt, ldc, s + r, n0);
                                    if (cdt == DT_F32) {
#pragma omp simd
                                        for (int64_t j = 0; j < w; j++) ((float *)o)[j] = cr[j];
                                    } else {
#pragma omp simd
                                        for (int64_t j = 0; j < w; j++) ((bf16 *)o)[j] = f32_to_bf16(cr[j]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        free(pack);
    }
    return 0;
}

#if defined(MOE_AMX)
/* Pack columns [n0, n0 + nw) of a [K, N] bf16 matrix (K a multiple of 32, nw of 16) into VNNI blocks: block
 * (nb, kb) at dst + (nb * K / 32 + kb) * 512, row p = the pairs (b[32 kb + 2 p, n], b[32 kb + 2 p + 1, n]) of its
 * 16 columns n. Block by block, each written whole (1 KiB in order), its 32 rows read from L1 after the first
 * column block brought them in, the next 32 rows prefetched a share per block. Row pair by row pair, every pair
 * wrote one line into each of the nw / 16 blocks, K / 32 KiB apart (all in one L1 set): on 2 Emerald Rapids cores
 * the data-gradient kernel on fine-grained experts 0.86-0.95x (g W_out and dH W_in, 16-1024 rows), Mixtral-like
 * 0.88-0.98x (16-256 rows); the layer's bf16 forward+backward at T = 128 0.97x (both shapes), T = 1024 0.99-1.02x. */
static void amx_pack_vnni(const bf16 *b, int64_t N, int64_t K, int64_t n0, int64_t nw, bf16 *dst) {
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const int64_t nbk = nw / 16;
    for (int64_t kb = 0; kb < K / 32; kb++) {
        const bf16 *rows = b + (size_t)(32 * kb) * (size_t)N + (size_t)n0;
        for (int64_t nb = 0; nb < nbk; nb++) {
            if (32 * kb + 32 < K)
                for (int64_t r = 32 * nb / nbk; r < 32 * (nb + 1) / nbk; r++)
                    prefetch_row(rows + (size_t)(32 + r) * (size_t)N, nw * 2);
            bf16 *o = dst + ((size_t)nb * (size_t)(K / 32) + (size_t)kb) * 512;
            for (int p = 0; p < 16; p++) {
                const bf16 *r0 = rows + (size_t)(2 * p) * (size_t)N + 16 * nb;
                const __m512i v0 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)r0));
                const __m512i v1 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(r0 + N)));
                _mm512_store_si512(o + 32 * p, _mm512_permutex2var_epi16(v0, idx, v1));
            }
        }
    }
}

/* moe_small_nn on the tiles, bf16 A and B, Kd a multiple of 32 and N of 16: each thread owns a range of columns (so
 * adding into C[c_idx[s]] is race-free and each row's sum runs in expert order), packs its columns of each expert's
 * B once, and runs the expert's rows over them 32 at a time (copied to a contiguous block, zero rows padding). */
static int amx_nn(const bf16 *A, int64_t lda, const int64_t *a_idx, const bf16 *B, int64_t Kd, int64_t N,
                  const int64_t *start, const int64_t *end, int64_t E, void *C, int cdt, int64_t ldc,
                  const int64_t *c_idx, int nthreads) {
    const int nt = gemm_threads(start, end, E, N, Kd, nthreads);
    const int64_t nblk = N / 16;
    int64_t a_rows = 0; /* (without a_idx) rows of A the segments cover: A has at least these */
    for (int64_t e = 0; e < E; e++) a_rows = end[e] > a_rows ? end[e] : a_rows;
    int err = 0;
#pragma omp parallel num_threads(nt) reduction(| : err)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t b0 = nblk * t / n, b1 = nblk * (t + 1) / n, n0 = 16 * b0, nw = 16 * (b1 - b0);
        bf16 *bp = nw ? aligned_alloc(64, (size_t)Kd * (size_t)nw * sizeof(bf16)) : NULL;
        bf16 *ap = aligned_alloc(64, (size_t)Kd * 32 * sizeof(bf16));
        if ((nw && !bp) || !ap) err = 1;
        else if (nw) {
            amx_config();
            for (int64_t e = 0; e < E; e++) {
                if (end[e] <= start[e]) continue;
                amx_pack_vnni(B + (size_t)e * (size_t)Kd * (size_t)N, N, Kd, n0, nw, bp);
                for (int64_t s0 = start[e]; s0 < end[e]; s0 += 32) {
                    const int64_t R = min64(32, end[e] - s0);
                    /* rows read in place where they are A's own consecutive rows and all 32 lie within the rows
                     * the segments cover (a row of the sums depends only on its own row of A, so rows past the
                     * expert's end only fill sums that are dropped); else copied, zero rows padding */
                    const bf16 *arows = ap;
                    int64_t ldr = Kd;
                    if (!a_idx && s0 + 32 <= a_rows) {
                        arows = A + (size_t)s0 * (size_t)lda;
                        ldr = lda;
                    } else {
                        for (int64_t r = 0; r < 32; r++) {
                            bf16 *dst = ap + (size_t)r * (size_t)Kd;
                            if (r < R) memcpy(dst, A + (size_t)(a_idx ? a_idx[s0 + r] : s0 + r) * (size_t)lda, (size_t)Kd * 2);
                            else memset(dst, 0, (size_t)Kd * 2);
                        }
                    }
                    for (int64_t jb = 0; jb < nw / 16; jb += 2) {
                        float c[4][256] __attribute__((aligned(64)));
                        const bf16 *p0 = bp + (size_t)jb * (size_t)Kd * 16;
                        const bf16 *p1 = jb + 1 < nw / 16 ? p0 + (size_t)Kd * 16 : NULL;
                        amx_tiles(arows, R > 16 ? arows + (size_t)16 * (size_t)ldr : NULL, ldr, p0, p1, Kd, c);
                        /* c[0]: rows 0-15 x block jb, c[1]: rows 0-15 x jb + 1, c[2], c[3]: rows 16-31 */
                        for (int64_t r = 0; r < R; r++)
                            for (int q = 0; q < 2 && jb + q < nw / 16; q++) {
                                const __m512 v = _mm512_load_ps(c[(r >= 16 ? 2 : 0) + q] + 16 * (r % 16));
                                const int64_t col = n0 + 16 * (jb + q);
                                if (c_idx) {
                                    float *o = (float *)C + (size_t)c_idx[s0 + r] * (size_t)ldc + col;
                                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), v));
                                } else {
                                    st16(at(C, cdt, ldc, s0 + r, col), cdt, 0xffff, v);
                                }
                            }
                    }
                }
            }
            _tile_release();
        }
        free(bp);
        free(ap);
    }
    return err ? -5 : 0;
}
#endif

int moe_small_nn(const void *A, int adt, int64_t lda, const int64_t *a_idx, const void *B, int bdt, int64_t Kd,
                 int64_t N, const int64_t *start, const int64_t *end, int64_t E, void *C, int cdt, int64_t ldc,
                 const int64_t *c_idx, int64_t packed_min, int nthreads) {
    /* experts of at least packed_min rows on the AMX tiles (bf16, whole 32-element steps) or the packed tiles
     * (AVX2 builds; float32 on AVX-512), the others on the dot-product tiles */
    int fast = 0; /* 1: AMX tiles, 2: packed tiles */
#if defined(MOE_AMX)
    fast = adt == DT_BF16 && bdt == DT_BF16 && Kd % 32 == 0 && N % 16 == 0 && amx_ready();
#endif
#if defined(MOE_GK)
    if (!fast && gk_serves(adt) && gk_serves(bdt)) fast = 2;
#endif
    int64_t n = 0;
    int64_t *seg = fast ? split_experts(start, end, E, packed_min, 1, 0, &n) : NULL;
    if (n < 0) return -5;
    if (!seg) return small_nn(A, adt, lda, a_idx, B, bdt, Kd, N, start, end, E, C, cdt, ldc, c_idx, nthreads);
    int rc = -1;
#if defined(MOE_AMX)
    if (fast == 1) rc = amx_nn(A, lda, a_idx, B, Kd, N, seg + 2 * E, seg + 3 * E, E, C, cdt, ldc, c_idx, nthreads);
#endif
#if defined(MOE_GK)
    if (fast == 2)
        rc = packed_nn(A, adt, lda, a_idx, B, bdt, Kd, N, seg + 2 * E, seg + 3 * E, E, C, cdt, ldc, c_idx, nthreads);
#endif
    if (rc == 0 && n < E) rc = small_nn(A, adt, lda, a_idx, B, bdt, Kd, N, seg, seg + E, E, C, cdt, ldc, c_idx, nthreads);
    free(seg);
    return rc;
}
