/* decode.h: the sort-free decode step: slots grouped by expert, the decode activations, moe_small_decode.
 * (Part of the one translation unit moe_cpu.c, which includes the parts in order; each uses what the ones
 * before it define.) */
/* The S = T*K slots of ids [T, K] (ids < 0: empty) grouped by expert, a stable counting sort: expert e's slots are
 * start[e] <= s < end[e], each from token tok[s] = slot[s] / K with weight ws[s] = w[slot[s]]; counts[e] (may be
 * NULL) their number. start, end, tok, slot and ws are written (tok, slot and ws for the valid slots only, which
 * come first). Returns the valid slots, or -1 (nothing grouped) if an id is >= E. */
static int64_t group_slots(const int64_t *ids, const float *w, int64_t S, int64_t K, int64_t E, int64_t *start,
                           int64_t *end, int64_t *tok, int64_t *slot, float *ws, int64_t *counts) {
    for (int64_t e = 0; e < E; e++) end[e] = 0;
    for (int64_t i = 0; i < S; i++) {
        if (ids[i] >= E) return -1;
        if (ids[i] >= 0) end[ids[i]]++; /* counts first */
    }
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) {
        if (counts) counts[e] = end[e];
        start[e] = n;
        n += end[e];
        end[e] = start[e];
    }
    for (int64_t i = 0; i < S; i++) { /* stable: slots of an expert stay in token order */
        const int64_t e = ids[i];
        if (e < 0) continue;
        const int64_t s = end[e]++;
        tok[s] = i / K;
        slot[s] = i;
        ws[s] = w[i];
    }
    return n;
}

/* The activations of the decode kernels besides SwiGLU (whose epilogue every input-projection path fuses): gated,
 * a[s, j] = act(gate = h[s, j], up = h[s, F + j]), or plain (ACT_GELU on), a[s, j] = act(h[s, j]), for s < S,
 * j < F, in float32 from h as stored (rounded to bf16 in a bf16 layer, as its PyTorch path has it), with NaN kept
 * (a clamp of NaN is NaN, as torch.clamp's; relu(NaN) is NaN). p0, p1: GPT-OSS's alpha and limit; the clamped and
 * clipped SwiGLUs' limit in p0. */
enum { ACT_SWIGLU = 1, ACT_GEGLU, ACT_GEGLU_TANH, ACT_REGLU, ACT_GPT_OSS, ACT_SWIGLU_CLAMPED, ACT_SWIGLU_CLIPPED,
       ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_RELU2, ACT_SILU };
static inline float clamp_nan(float v, float lo, float hi) { return v > hi ? hi : v < lo ? lo : v; }
static inline float relu_nan(float v) { return v < 0.0f ? 0.0f : v; }
static inline float gelu_erf(float g) { return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)); }
static inline float gelu_tanh(float g) {
    return 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));
}
static void act_rows(const void *h, void *a, int dt, int64_t S, int64_t F, int act, float p0, float p1,
                     int nthreads) {
    const int gated = act < ACT_GELU;
#pragma omp parallel for schedule(static) num_threads(threads_for(S * F * 16, nthreads))
    for (int64_t s = 0; s < S; s++) {
        const void *hs = at(h, dt, gated ? 2 * F : F, s, 0);
        void *as = at(a, dt, F, s, 0);
        for (int64_t j = 0; j < F; j++) {
            const float g = ld(hs, dt, j), u = gated ? ld(hs, dt, F + j) : 1.0f;
            float v;
            switch (act) {
            case ACT_GEGLU: v = gelu_erf(g) * u; break;
            case ACT_GEGLU_TANH: v = gelu_tanh(g) * u; break;
            case ACT_REGLU: v = relu_nan(g) * u; break;
            case ACT_GPT_OSS: {
                const float gc = clamp_nan(g, -__builtin_inff(), p1);
                v = (clamp_nan(u, -p1, p1) + 1.0f) * (gc * sigmoid_f32(gc * p0));
                break;
            }
            case ACT_SWIGLU_CLAMPED: {
                const float gc = clamp_nan(g, -__builtin_inff(), p0);
                v = gc * sigmoid_f32(gc) * clamp_nan(u, -p0, p0);
                break;
            }
            case ACT_SWIGLU_CLIPPED: v = clamp_nan(g * sigmoid_f32(g), -__builtin_inff(), p0) * clamp_nan(u, -p0, p0); break;
            case ACT_GELU: v = gelu_erf(g); break;
            case ACT_GELU_TANH: v = gelu_tanh(g); break;
            case ACT_RELU: v = relu_nan(g); break;
            case ACT_RELU2: v = relu_nan(g) * relu_nan(g); break;
            case ACT_SILU: v = g * sigmoid_f32(g); break;
            default: v = g * sigmoid_f32(g) * u;
            }
            st(as, dt, j, v);
        }
    }
}

/* Inference for a few tokens straight from the router's choices, with no sort on the host: the S = T*K slots are
 * grouped by expert here (a counting sort; token order kept within an expert), then the gated experts run through
 * moe_small_up and moe_small_down:  out[t] += sum_k w[t, k] * expert_{ids[t, k]}(x[t])   (ids < 0: empty slot).
 * act: the activation (ACT_SWIGLU fused into the input projection; the others of act_rows, with act_p0, act_p1,
 * between the projections); F the width of its output (the input projection's rows: 2F for the gated ones, F for
 * the plain ones).
 * out is float32 [T, D] and must be zeroed by the caller; counts (int64 [E], may be NULL) receives the slots per
 * expert; packed_min: the rows from which an expert leaves the dot-product tiles (as moe_small_up's; the caller
 * passes its build's threshold for the dtype). Returns -4 if an id is >= E, -5 if out of memory. */
int moe_small_decode(const void *x, int64_t ld_x, const int64_t *ids, const float *w, int64_t T, int64_t K, int64_t E,
                     const void *w_in, const void *b_in, const void *w_out, const void *b_out, int64_t D, int64_t F,
                     int dt, float *out, int64_t ld_out, int64_t *counts, int64_t packed_min, int act, float act_p0,
                     float act_p1, int nthreads) {
    if (act < ACT_SWIGLU || act > ACT_SILU) return -1;
    const int64_t S = T * K, W = act < ACT_GELU ? 2 * F : F;
    int64_t *start = calloc((size_t)(2 * E + 2 * S + 1), sizeof(int64_t));
    float *ws = malloc((size_t)(S ? S : 1) * sizeof(float));
    void *a = malloc((size_t)(S ? S : 1) * (size_t)F * esize(dt));
    /* (SwiGLU: the input projection's epilogue; the others: its pre-activations, then act_rows) */
    void *h = act == ACT_SWIGLU ? NULL : malloc((size_t)(S ? S : 1) * (size_t)W * esize(dt));
    int rc = 0;
    if (!start || !ws || !a || (act != ACT_SWIGLU && !h)) {
        rc = -5;
        goto done;
    }
    int64_t *end = start + E, *tok = end + E, *slot = tok + S;
    const int64_t n = group_slots(ids, w, S, K, E, start, end, tok, slot, ws, counts);
    if (n < 0) {
        rc = -4;
        goto done;
    }
    const int pk = act == ACT_SWIGLU; /* (the packed hand-over comes from the fused epilogue only) */
    rc = moe_small_up(x, ld_x, tok, start, end, E, w_in, b_in, W, D, dt, pk, h, pk ? a : NULL, pk, packed_min,
                      SW_MAX_ROWS, nthreads);
    if (rc == 0 && !pk) act_rows(h, a, dt, n, F, act, act_p0, act_p1, nthreads);
    if (rc == 0)
        rc = moe_small_down(a, F, pk, tok, ws, start, end, E, w_out, b_out, D, F, dt, out, ld_out, packed_min,
                            nthreads);
done:
    free(start);
    free(ws);
    free(a);
    free(h);
    return rc;
}

