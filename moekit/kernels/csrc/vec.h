/* vec.h: vector loads and stores of float32 and bfloat16 rows, bf16 rounding, exp, sigmoid and SwiGLU
 * in 8 (AVX2) and 16 (AVX-512) lanes.
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
#if defined(__AVX512F__)
/* masks of the first min(left, 16) (32) lanes */
static inline __attribute__((always_inline)) __mmask16 tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

static inline __attribute__((always_inline)) __mmask32 tail32(int64_t left) {
    return left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
}

/* [sum(a), sum(b), sum(c), sum(d)]: four horizontal sums in 12 instructions instead of four reduction chains. */
static inline __attribute__((always_inline)) __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); /* per lane a02 b02 a13 b13 */
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2))); /* per lane a b c d */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

#if defined(V8)
/* 8 float32, or 8 bfloat16 widened to float32 (bf16 is the top half of a float). */
static inline __attribute__((always_inline)) __m256 ld8(const void *p, int dt) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 16 bfloat16 as two float32 vectors: the even elements (shifted into the high half of each lane) and the odd ones
 * (masked): one integer operation per 8 values. A dot product or an elementwise op does not care about the order. */
static inline __attribute__((always_inline)) void ld16_bf16(const bf16 *p, __m256 *even, __m256 *odd) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* [sum(a), sum(b), sum(c), sum(d)] */
static inline __attribute__((always_inline)) __m128 reduce4_8(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d)); /* per 128-bit half: a b c d */
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* Make the compiler hold v in a register: otherwise it may fold a load into every FMA that uses it (one load per
 * row of a tile instead of one, which makes the tile bound by loads rather than FMAs). */
#ifndef NO_KEEP
#define KEEP_IN_REG(v) __asm__("" : "+x"(v))
#else
#define KEEP_IN_REG(v) (void)0
#endif

#ifndef RG8
#define RG8 2 /* token rows per pass of the 8-wide tile: 2 x TN accumulators, 2 row vectors and 1 weight vector (3 rows
                     * would need all 16 ymm registers and spill: 62 against 80 GFLOP/s on one Zen 3 core in L1) */
#endif

/* The first n <= 8 elements of a row (the rest zero): row tails. */
static inline __m256 ld8_part(const void *p, int dt, int64_t n) {
    float t[8] __attribute__((aligned(32))) = {0.0f};
    for (int64_t j = 0; j < n; j++) t[j] = ld(p, dt, j);
    return _mm256_load_ps(t);
}

/* f32_to_bf16 in vector form, the bfloat16 left in the high half of each lane (low half garbage). */
static inline __attribute__((always_inline)) __m256i round_bf16_hi8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
}

/* 8 float32 -> bfloat16, round to nearest even, NaN kept quiet (f32_to_bf16, vectorised). */
static inline __attribute__((always_inline)) __m128i cvt8_bf16(__m256 v) {
    __m256i r = _mm256_srli_epi32(round_bf16_hi8(v), 16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8));
}

/* Store the first n <= 8 elements of v; whole aligned vectors of output written once (weight gradients) with a
 * non-temporal store if stream (callers then end with _mm_sfence). */
static inline __attribute__((always_inline)) void st8(void *p, int dt, __m256 v, int64_t n, int stream) {
    if (n >= 8) {
        if (dt == DT_F32) {
            if (stream && ((uintptr_t)p & 31) == 0) _mm256_stream_ps((float *)p, v);
            else _mm256_storeu_ps((float *)p, v);
        } else {
            __m128i b = cvt8_bf16(v);
            if (stream && ((uintptr_t)p & 15) == 0) _mm_stream_si128((__m128i *)p, b);
            else _mm_storeu_si128((__m128i *)p, b);
        }
        return;
    }
    float t[8] __attribute__((aligned(32)));
    _mm256_store_ps(t, v);
    for (int64_t j = 0; j < n; j++) st(p, dt, j, t[j]);
}

/* Store the first n <= 16 elements of lo (8) then hi (8), as st8 does; whole bfloat16 pairs as one 32-byte store of
 * both vectors (cvt8x2_bf16, rounded as cvt8_bf16 rounds), plain even where stream is set: 32 bytes streamed are
 * half a line, and a half-written line costs the write-combining buffers a partial write (whole lines: bf16_line).
 * Measured on Zen 3 (2 threads), Mixtral-like experts' weight gradients in bf16 against two 16-byte streaming
 * stores: dW_in of 1-16 rows per expert 0.67-0.76x, dW_out 0.75-0.89x. */
static inline __attribute__((always_inline)) __m256i cvt8x2_bf16(__m256 lo, __m256 hi) {
    const __m256i r = _mm256_packus_epi32(_mm256_srli_epi32(round_bf16_hi8(lo), 16),
                                          _mm256_srli_epi32(round_bf16_hi8(hi), 16));
    return _mm256_permute4x64_epi64(r, 0xd8);
}
static inline __attribute__((always_inline)) void st8x2(void *p, int dt, __m256 lo, __m256 hi, int64_t n,
                                                       int stream) {
    if (dt == DT_BF16 && n >= 16) {
        _mm256_storeu_si256((__m256i *)p, cvt8x2_bf16(lo, hi));
        return;
    }
    st8(p, dt, lo, min64(8, n), stream);
    if (n > 8) st8((char *)p + 8 * esize(dt), dt, hi, n - 8, stream);
}
#endif

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) __m512 ld16(const void *p, int dt, __mmask16 m) {
    if (dt == DT_F32) return _mm512_maskz_loadu_ps(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* f32_to_bf16 in vector form, the bfloat16 left in the high half of each lane (low half garbage). */
static inline __attribute__((always_inline)) __m512i round_bf16_hi(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
}

/* 16 float32 -> bfloat16, round to nearest even, NaN kept quiet. With AVX512-BF16, the hardware conversion, which
 * rounds and quiets NaN as f32_to_bf16 does but flushes denormals to zero, serves vectors without a denormal lane
 * (one fpclass test), the integer rounding the others: the bits are f32_to_bf16's either way (every float32
 * compared once; SwiGLU's bf16 rows 5% faster, its backward 13%, on 2 Sapphire Rapids cores). st32_bf16 too. */
static inline __attribute__((always_inline)) __m256i cvt16_bf16(__m512 v) {
#if defined(__AVX512BF16__)
    if (__builtin_expect(!_mm512_fpclass_ps_mask(v, 0x20), 1)) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16_hi(v), 16));
}

static inline __attribute__((always_inline)) void st16(void *p, int dt, __mmask16 m, __m512 v) {
    if (dt == DT_F32)
        _mm512_mask_storeu_ps(p, m, v);
    else
        _mm256_mask_storeu_epi16(p, m, cvt16_bf16(v));
}

/* Store for output written once and not read soon (weight gradients): a non-temporal store where the vector is
 * whole and aligned (no read-for-ownership of the line), else a plain masked store. Callers end with _mm_sfence. */
static inline __attribute__((always_inline)) void st16_stream(void *p, int dt, __mmask16 m, __m512 v) {
    if (dt == DT_F32) {
        if (m == 0xffff && ((uintptr_t)p & 63) == 0)
            _mm512_stream_ps(p, v);
        else
            _mm512_mask_storeu_ps(p, m, v);
    } else {
        __m256i b = cvt16_bf16(v);
        if (m == 0xffff && ((uintptr_t)p & 31) == 0)
            _mm256_stream_si256(p, b);
        else
            _mm256_mask_storeu_epi16(p, m, b);
    }
}
#endif

#if defined(__AVX512F__)
/* exp_f32, sigmoid_f32 and the SwiGLU rows in explicit AVX-512, operation for operation the scalar code (so the
 * results are the same bits); bfloat16 rows are widened on load and rounded to nearest even on store. */
static inline __attribute__((always_inline)) __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), x); /* min/max return x where x is NaN: NaN passes */
    x = _mm512_max_ps(_mm512_set1_ps(EXP_LO), x);
    const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(EXP_LOG2E), _mm512_set1_ps(EXP_MAGIC));
    __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(EXP_MAGIC));
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(EXP_BIAS)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

static inline __attribute__((always_inline)) __m512 sigmoid16(__m512 x) {
    __m512 nx = _mm512_sub_ps(_mm512_setzero_ps(), x);
    __m512 e = exp16(nx);
    e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(nx, _mm512_set1_ps(EXP_HI), _CMP_GT_OQ),
                           _mm512_set1_ps(__builtin_inff()));
    return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* 32 bfloat16 as two float32 vectors without any lane shuffle: the even elements (shifted up into the high half of
 * each 32-bit lane) and the odd ones (already there, low half cleared). Elementwise code runs on both and
 * st32_bf16 puts them back in order; widening with shuffles instead costs ~1.6x the time of a SwiGLU row. */
static inline __attribute__((always_inline)) void ld32_bf16(const void *p, __mmask32 m, __m512 *even, __m512 *odd) {
    __m512i v = _mm512_maskz_loadu_epi16(m, p);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline __attribute__((always_inline)) void st32_bf16(void *p, __mmask32 m, __m512 even, __m512 odd) {
#if defined(__AVX512BF16__)
    if (__builtin_expect(!(_mm512_fpclass_ps_mask(even, 0x20) | _mm512_fpclass_ps_mask(odd, 0x20)), 1)) {
        const __m512i ix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                            23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        _mm512_mask_storeu_epi16(p, m, _mm512_permutexvar_epi16(ix, (__m512i)_mm512_cvtne2ps_pbh(odd, even)));
        return;
    }
#endif
    __m512i r = _mm512_or_si512(_mm512_srli_epi32(round_bf16_hi(even), 16),
                                _mm512_and_si512(round_bf16_hi(odd), _mm512_set1_epi32((int)0xffff0000u)));
    _mm512_mask_storeu_epi16(p, m, r);
}

static inline __attribute__((always_inline)) __m512 swiglu16(__m512 g, __m512 u) {
    return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u);
}

static inline __attribute__((always_inline)) void swiglu_row16(const void *h, void *a, int dt, int64_t F) {
    if (dt == DT_BF16) {
        const bf16 *hb = (const bf16 *)h;
        for (int64_t j = 0; j < F; j += 32) {
            __mmask32 m = tail32(F - j);
            __m512 g0, g1, u0, u1;
            ld32_bf16(hb + j, m, &g0, &g1);
            ld32_bf16(hb + F + j, m, &u0, &u1);
            st32_bf16((bf16 *)a + j, m, swiglu16(g0, u0), swiglu16(g1, u1));
        }
        return;
    }
    const float *hf = (const float *)h;
    for (int64_t j = 0; j < F; j += 16) {
        __mmask16 m = tail16(F - j);
        st16((float *)a + j, DT_F32, m, swiglu16(ld16(hf + j, DT_F32, m), ld16(hf + F + j, DT_F32, m)));
    }
}

/* One vector of swiglu_bwd_row: returns ga * a for the router-weight gradient, sets w a, dgate and dup. */
static inline __attribute__((always_inline)) __m512 swiglu_bwd16(__m512 x, __m512 up, __m512 g, __m512 wv,
                                                                 __m512 *aw, __m512 *dgate, __m512 *dup) {
    __m512 s = sigmoid16(x), silu = _mm512_mul_ps(x, s), av = _mm512_mul_ps(silu, up), d = _mm512_mul_ps(g, wv);
    *aw = _mm512_mul_ps(av, wv);
    *dgate = _mm512_mul_ps(_mm512_mul_ps(d, up), _mm512_fmadd_ps(silu, _mm512_sub_ps(_mm512_set1_ps(1.0f), s), s));
    *dup = _mm512_mul_ps(d, silu);
    return _mm512_mul_ps(g, av);
}

static inline __attribute__((always_inline)) float swiglu_bwd_row16(const void *h, const void *ga, float w, void *dh,
                                                                    void *aw, int dt, int64_t F) {
    const __m512 wv = _mm512_set1_ps(w);
    __m512 acc = _mm512_setzero_ps(), a0, a1, dg0, dg1, du0, du1;
    if (dt == DT_BF16) {
        const bf16 *hb = (const bf16 *)h, *gb = (const bf16 *)ga;
        bf16 *db = (bf16 *)dh;
        for (int64_t j = 0; j < F; j += 32) {
            __mmask32 m = tail32(F - j);
            __m512 x0, x1, u0, u1, g0, g1;
            ld32_bf16(hb + j, m, &x0, &x1);
            ld32_bf16(hb + F + j, m, &u0, &u1);
            ld32_bf16(gb + j, m, &g0, &g1);
            acc = _mm512_add_ps(acc, swiglu_bwd16(x0, u0, g0, wv, &a0, &dg0, &du0));
            acc = _mm512_add_ps(acc, swiglu_bwd16(x1, u1, g1, wv, &a1, &dg1, &du1));
            if (aw) st32_bf16((bf16 *)aw + j, m, a0, a1);
            st32_bf16(db + j, m, dg0, dg1);
            st32_bf16(db + F + j, m, du0, du1);
        }
    } else {
        const float *hf = (const float *)h, *gf = (const float *)ga;
        float *df = (float *)dh;
        for (int64_t j = 0; j < F; j += 16) {
            __mmask16 m = tail16(F - j);
            acc = _mm512_add_ps(acc, swiglu_bwd16(ld16(hf + j, DT_F32, m), ld16(hf + F + j, DT_F32, m),
                                                  ld16(gf + j, DT_F32, m), wv, &a0, &dg0, &du0));
            if (aw) st16((float *)aw + j, DT_F32, m, a0);
            st16(df + j, DT_F32, m, dg0);
            st16(df + F + j, DT_F32, m, du0);
        }
    }
    return _mm512_reduce_add_ps(acc);
}
#define SWIGLU_ROW swiglu_row16
#define SWIGLU_BWD_ROW swiglu_bwd_row16
#elif defined(V8)
/* The same in 8-wide AVX2: exp_f32 and sigmoid_f32 operation for operation; a vector of 16 bfloat16 is split into
 * its even and odd elements (no lane shuffle), row tails run the scalar code. */
static inline __attribute__((always_inline)) __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), x); /* min/max return x where x is NaN: NaN passes */
    x = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x);
    const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), _mm256_set1_ps(EXP_MAGIC));
    __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(EXP_MAGIC));
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(EXP_BIAS)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __attribute__((always_inline)) __m256 sigmoid8(__m256 x) {
    __m256 nx = _mm256_sub_ps(_mm256_setzero_ps(), x);
    __m256 e = _mm256_blendv_ps(exp8(nx), _mm256_set1_ps(__builtin_inff()),
                                _mm256_cmp_ps(nx, _mm256_set1_ps(EXP_HI), _CMP_GT_OQ));
    return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

static inline __attribute__((always_inline)) void st16_bf16(bf16 *p, __m256 even, __m256 odd) {
    __m256i r = _mm256_or_si256(_mm256_srli_epi32(round_bf16_hi8(even), 16),
                                _mm256_and_si256(round_bf16_hi8(odd), _mm256_set1_epi32((int)0xffff0000u)));
    _mm256_storeu_si256((__m256i *)p, r);
}

static inline __attribute__((always_inline)) __m256 swiglu8(__m256 g, __m256 u) {
    return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), u);
}

static inline __attribute__((always_inline)) void swiglu_row8(const void *h, void *a, int dt, int64_t F) {
    int64_t j = 0;
    if (dt == DT_BF16) {
        const bf16 *hb = (const bf16 *)h;
        for (; j + 16 <= F; j += 16) {
            __m256 g0, g1, u0, u1;
            ld16_bf16(hb + j, &g0, &g1);
            ld16_bf16(hb + F + j, &u0, &u1);
            st16_bf16((bf16 *)a + j, swiglu8(g0, u0), swiglu8(g1, u1));
        }
    } else {
        const float *hf = (const float *)h;
        for (; j + 8 <= F; j += 8)
            _mm256_storeu_ps((float *)a + j, swiglu8(_mm256_loadu_ps(hf + j), _mm256_loadu_ps(hf + F + j)));
    }
    for (; j < F; j++) {
        float g = ld(h, dt, j);
        st(a, dt, j, g * sigmoid_f32(g) * ld(h, dt, F + j));
    }
}

static inline __attribute__((always_inline)) __m256 swiglu_bwd8(__m256 x, __m256 up, __m256 g, __m256 wv,
                                                                __m256 *aw, __m256 *dgate, __m256 *dup) {
    __m256 s = sigmoid8(x), silu = _mm256_mul_ps(x, s), av = _mm256_mul_ps(silu, up), d = _mm256_mul_ps(g, wv);
    *aw = _mm256_mul_ps(av, wv);
    *dgate = _mm256_mul_ps(_mm256_mul_ps(d, up), _mm256_fmadd_ps(silu, _mm256_sub_ps(_mm256_set1_ps(1.0f), s), s));
    *dup = _mm256_mul_ps(d, silu);
    return _mm256_mul_ps(g, av);
}

static inline __attribute__((always_inline)) float swiglu_bwd_row8(const void *h, const void *ga, float w, void *dh,
                                                                   void *aw, int dt, int64_t F) {
    const __m256 wv = _mm256_set1_ps(w);
    __m256 acc = _mm256_setzero_ps(), a0, a1, dg0, dg1, du0, du1;
    int64_t j = 0;
    if (dt == DT_BF16) {
        const bf16 *hb = (const bf16 *)h, *gb = (const bf16 *)ga;
        bf16 *db = (bf16 *)dh;
        for (; j + 16 <= F; j += 16) {
            __m256 x0, x1, u0, u1, g0, g1;
            ld16_bf16(hb + j, &x0, &x1);
            ld16_bf16(hb + F + j, &u0, &u1);
            ld16_bf16(gb + j, &g0, &g1);
            acc = _mm256_add_ps(acc, swiglu_bwd8(x0, u0, g0, wv, &a0, &dg0, &du0));
            acc = _mm256_add_ps(acc, swiglu_bwd8(x1, u1, g1, wv, &a1, &dg1, &du1));
            if (aw) st16_bf16((bf16 *)aw + j, a0, a1);
            st16_bf16(db + j, dg0, dg1);
            st16_bf16(db + F + j, du0, du1);
        }
    } else {
        const float *hf = (const float *)h, *gf = (const float *)ga;
        float *df = (float *)dh;
        for (; j + 8 <= F; j += 8) {
            acc = _mm256_add_ps(acc, swiglu_bwd8(_mm256_loadu_ps(hf + j), _mm256_loadu_ps(hf + F + j),
                                                 _mm256_loadu_ps(gf + j), wv, &a0, &dg0, &du0));
            if (aw) _mm256_storeu_ps((float *)aw + j, a0);
            _mm256_storeu_ps(df + j, dg0);
            _mm256_storeu_ps(df + F + j, du0);
        }
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    float sum = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
    for (; j < F; j++) sum += swiglu_bwd_at(h, ga, w, dh, aw, dt, F, j); /* the row's tail */
    return sum;
}
#define SWIGLU_ROW swiglu_row8
#define SWIGLU_BWD_ROW swiglu_bwd_row8
#else
#define SWIGLU_ROW swiglu_row
#define SWIGLU_BWD_ROW swiglu_bwd_row
#endif

