/* memory.h: streaming zero fills, cache eviction and the reads the benchmarks time.
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */

/* memset of n bytes with non-temporal stores: a buffer larger than the caches is then written once, with no
 * read-for-ownership of its lines (a plain store reads every line before writing it: half the bandwidth). */
static void zero_stream(char *p, int64_t n) {
#if defined(__AVX512F__)
    const int64_t head = min64(n, (int64_t)((64 - ((uintptr_t)p & 63)) & 63));
    memset(p, 0, (size_t)head);
    const __m512i z = _mm512_setzero_si512();
    int64_t i = head;
    for (; i + 64 <= n; i += 64) _mm512_stream_si512((void *)(p + i), z);
    memset(p + i, 0, (size_t)(n - i));
    _mm_sfence();
#elif defined(V8)
    const int64_t head = min64(n, (int64_t)((32 - ((uintptr_t)p & 31)) & 31));
    memset(p, 0, (size_t)head);
    const __m256i z = _mm256_setzero_si256();
    int64_t i = head;
    for (; i + 32 <= n; i += 32) _mm256_stream_si256((__m256i *)(p + i), z);
    memset(p + i, 0, (size_t)(n - i));
    _mm_sfence();
#else
    memset(p, 0, (size_t)n);
#endif
}

/* Zero the n byte ranges [ptr[r], ptr[r] + len[r]) (moe_zero_ranges: [p + off[r], p + off[r] + len[r])) with all threads in one parallel region, each thread an
 * equal share of their bytes taken in order (cut at whole lines of that order), streamed past the caches: the idle
 * experts' gradients of a few-token step are several runs of a few MiB (one task of 1 MiB per thread at a time
 * left the last task of an odd count to one thread: 2.75 MiB in 0.117 against 0.079 ms, 2 Xeon cores). */
static void zero_ranges(char *const *ptr, const int64_t *len, int64_t n, int nthreads) {
    int64_t total = 0;
    for (int64_t r = 0; r < n; r++) total += len[r];
#pragma omp parallel num_threads(threads_for(total / 4, nthreads))
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lines = (total + 63) / 64, b = min64(total, 64 * (lines * t / nt)),
                      e = min64(total, 64 * (lines * (t + 1) / nt));
        for (int64_t r = 0, pos = 0; r < n && pos < e; pos += len[r], r++) { /* range r: [pos, pos + len[r]) */
            const int64_t lo = pos > b ? pos : b, hi = pos + len[r] < e ? pos + len[r] : e;
            if (lo < hi) zero_stream(ptr[r] + (lo - pos), hi - lo);
        }
    }
}

int moe_zero_ranges(void *p, const int64_t *off, const int64_t *len, int64_t n, int nthreads) {
    char **ptr = malloc((size_t)(n > 0 ? n : 1) * sizeof(char *));
    if (!ptr) return -5;
    for (int64_t r = 0; r < n; r++) ptr[r] = (char *)p + off[r];
    zero_ranges(ptr, len, n, nthreads);
    free(ptr);
    return 0;
}

/* Write back and evict the n bytes at p from every cache level (benchmarks use it to time a layer whose weights are
 * in memory while the rest of the process stays warm, as in a model whose layers together exceed the caches). */
int moe_flush_cache(const void *p, int64_t n, int nthreads) {
#if defined(__x86_64__)
    /* split among the threads, so that every core is busy up to the timed run that follows, as in a model whose
     * layers run one after another: flushing a layer's weights on one thread for a few ms left the others idle,
     * and the next run, woken from that, took up to twice as long on a 2-core VM (its Python code too) */
    const uintptr_t a = (uintptr_t)p & ~(uintptr_t)63;
    const int64_t lines = n > 0 ? (int64_t)(((uintptr_t)p + (uintptr_t)n - a + 63) / 64) : 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        const int th = omp_get_thread_num(), nth = omp_get_num_threads();
        for (int64_t i = lines * th / nth; i < lines * (th + 1) / nth; i++)
            __builtin_ia32_clflush((const char *)(a + 64 * (uintptr_t)i));
        __builtin_ia32_mfence();
    }
    return 0;
#else
    (void)p;
    (void)n;
    (void)nthreads;
    return -1;
#endif
}

/* Read every float32 word of n byte ranges (each a multiple of 4 bytes) and store their sum in *sum, so that no
 * read can be left out: the time to stream exactly these bytes, and nothing else, from wherever they are (the
 * benchmarks' weight-read floor of a decode step). The concatenated ranges are split evenly among the threads. */
int moe_read_ranges(const void *const *ptr, const int64_t *nbytes, int64_t n, double *sum, int nthreads) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (nbytes[i] < 0 || nbytes[i] % 4) return -1;
        total += nbytes[i] / 4;
    }
    const int nt = threads_for(total, nthreads);
    double s = 0.0;
#pragma omp parallel num_threads(nt) reduction(+ : s)
    {
        const int th = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t lo = total * th / nth, hi = total * (th + 1) / nth; /* this thread's words */
        float acc[32] = {0.0f}; /* 32 independent sums: several vector accumulators, not one latency chain */
        int64_t base = 0;
        for (int64_t i = 0; i < n && base < hi; base += nbytes[i] / 4, i++) {
            const int64_t a = lo > base ? lo - base : 0, b = min64(hi - base, nbytes[i] / 4);
            const float *f = (const float *)ptr[i];
            int64_t j = a;
            for (; j + 32 <= b; j += 32)
                for (int q = 0; q < 32; q++) acc[q] += f[j + q];
            for (; j < b; j++) acc[0] += f[j];
        }
        for (int q = 0; q < 32; q++) s += acc[q];
    }
    *sum = s;
    return 0;
}

