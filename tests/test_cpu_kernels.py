"""moekit's CPU kernels (moekit/kernels/cpu.py + csrc/moe_cpu.c) and CPU GEMM provider, each against a float64
PyTorch reference: odd sizes (tails of every vector width), empty experts, gathered and scattered rows, biases,
float32 and bfloat16, NaN and infinity, thread-count independence, the PyTorch fallback, and bad arguments. The
layer-level tests (tests/test_layer.py) then check the fused backend that uses them against the loop reference."""

import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.kernels import cpu_gemm
from moekit.experts import fused_function as ff
from moekit.kernels import cpu as K

from .helpers import assert_fwd_bwd_close, max_err, num_threads, run_fwd_bwd

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}  # relative to the largest reference value


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() / max(want.double().abs().max().item(), 1e-30)


@pytest.fixture(autouse=True)
def _regular_training_path(monkeypatch):
    """The layers here check the fused backend's kernels on its own path: training steps of few tokens would
    otherwise take the few-token step (moekit.experts.train_step, checked in test_layer.py), unless a test turns it
    back on."""
    monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 0)


@pytest.fixture(params=list(K.ISA_FLAGS))
def kernels(request, monkeypatch):
    """The kernels built for each vector code path this CPU can run (MOEKIT_CPU_ISA): the best one (native), and
    the AVX2 and plain-C paths where they differ from it, so every path is checked on a machine that has it."""
    isa, native = request.param, K.vector_isa()
    if isa == "avx2" and native != "avx512":
        pytest.skip("the AVX2 path is the native one here, or this CPU has no AVX2")
    if isa == "generic" and native == "other":
        pytest.skip("the plain-C path is the native one here")
    if isa != "native":
        monkeypatch.setenv("MOEKIT_CPU_ISA", isa)
        K.reset()
        request.addfinalizer(K.reset)  # the next test loads the library its own environment asks for
    if K.library() is None:
        if K._compiler() is not None:  # a build that fails here is a defect of this path, not a reason to skip
            pytest.fail(f"the {isa} CPU kernels did not build: {K.unavailable_reason()}")
        pytest.skip(f"CPU kernels unavailable: {K.unavailable_reason()}")
    return K


@pytest.fixture
def no_kernels(monkeypatch):
    """Run with the PyTorch fallback, as on a machine without a C compiler."""
    monkeypatch.setattr(K, "_LIB", None)
    monkeypatch.setattr(K, "_TRIED", True)
    monkeypatch.setattr(K, "_WHY_NOT", "disabled by the test")


def segments(counts):
    offs = torch.tensor([0] + list(counts)).cumsum(0)
    return offs[:-1].contiguous(), offs[1:].contiguous()


def test_library_builds_where_a_compiler_exists():
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    assert K.library() is not None, K.unavailable_reason()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MOEKIT_CPU_KERNELS", "0")
    K.reset()
    try:
        assert K.library() is None and "MOEKIT_CPU_KERNELS=0" in K.unavailable_reason()
    finally:
        monkeypatch.delenv("MOEKIT_CPU_KERNELS")
        K.reset()


def test_a_broken_compiler_falls_back_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # exists, always fails
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    K.reset()
    try:
        assert K.library() is None and "could not build" in K.unavailable_reason()
        h = torch.randn(3, 8)
        assert torch.equal(K.swiglu(h), F.silu(h[:, :4]) * h[:, 4:])  # still correct, through PyTorch
    finally:
        monkeypatch.delenv("CC")
        K.reset()


# ---------------------------------------------------------------------------------------- row kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F_", [1, 21, 256])
def test_swiglu_forward_and_backward(kernels, dtype, F_):
    h = (torch.randn(13, 2 * F_) * 3).to(dtype)
    hd = h.double().requires_grad_(True)
    a_ref = F.silu(hd[:, :F_]) * hd[:, F_:]
    assert rel_err(K.swiglu(h), a_ref) < TOL[dtype]
    ga, w = torch.randn(13, F_).to(dtype), torch.rand(13)
    (dh_ref,) = torch.autograd.grad(a_ref, hd, ga.double() * w.double()[:, None])
    dh, aw, dw = K.swiglu_backward(h, ga, w)
    assert rel_err(dh, dh_ref) < 2 * TOL[dtype]
    assert rel_err(aw, a_ref.detach() * w.double()[:, None]) < TOL[dtype]
    assert rel_err(dw, (ga.double() * a_ref.detach()).sum(-1)) < TOL[dtype]


def test_swiglu_propagates_nan_and_infinity_like_pytorch(kernels):
    h = torch.tensor([[float("nan"), 1.0, float("inf"), -float("inf"), 2.0, float("nan"), 1.0, 1.0]])
    want = F.silu(h[:, :4]) * h[:, 4:]
    got = K.swiglu(h)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_with_scale_and_cast(kernels, src_dtype, dtype):
    src, idx, scale = torch.randn(9, 37).to(src_dtype), torch.tensor([4, 0, 8, 4]), torch.rand(4)
    want = (src.float()[idx] * scale[:, None]).to(dtype)
    assert torch.equal(K.gather_rows(src, idx, dtype, scale), want)
    assert torch.equal(K.gather_rows(src, idx, dtype), src[idx].to(dtype))
    for scale_ in (scale, None):  # padded to 7 rows: the extra rows are zero, with and without the C kernel
        padded = K.gather_rows(src, idx, dtype, scale_, rows=7)
        assert padded.shape == (7, 37) and not padded[4:].any()
        assert torch.equal(padded[:4], want if scale_ is not None else src[idx].to(dtype))
    with pytest.raises(ValueError, match="rows=3 is fewer"):
        K.gather_rows(src, idx, dtype, rows=3)


def test_gather_rows_padded_without_kernels(no_kernels):
    src, idx = torch.randn(9, 37), torch.tensor([4, 0, 8])
    for dtype, scale in ((torch.float32, None), (torch.bfloat16, torch.rand(3))):
        got = K.gather_rows(src, idx, dtype, scale, rows=8)
        want = src[idx] if scale is None else src[idx] * scale[:, None]
        assert got.shape == (8, 37) and not got[3:].any() and torch.equal(got[:3], want.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_rows(kernels, dtype):
    out = torch.randn(10, 37)
    idx, y, w = torch.tensor([7, 2, 9]), torch.randn(3, 37).to(dtype), torch.rand(3)
    want = out.clone().index_add_(0, idx, y.float() * w[:, None])
    K.scatter_add_rows(out, idx, y, w)
    assert max_err(out, want) < 1e-6


def test_zero_large_tensor(kernels):
    t = torch.ones(3, 1 << 19)
    K.zero_(t[1])
    assert t[1].abs().sum() == 0 and t[0].sum() == t[2].sum() == 1 << 19
    # streaming stores cover whole aligned 64-byte lines: an unaligned start and a ragged end are written plainly
    u = torch.ones((1 << 20) + 100, dtype=torch.bfloat16)
    K.zero_(u[13:13 + (1 << 20) + 5])
    assert (u[13:13 + (1 << 20) + 5] == 0).all() and (u[:13] == 1).all() and (u[13 + (1 << 20) + 5:] == 1).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_zeroes_every_run_and_nothing_else(kernels, dtype):
    """All runs in one call, the threads' shares cut across runs (odd row sizes: cuts and run ends off the lines)."""
    t = torch.ones(41, 3, 4099).to(dtype)
    runs = [(0, 1), (3, 7), (11, 2), (20, 20)]  # ~1.5 MiB in fp32: both threads
    K.zero_rows(t, runs + [(40, 0)])
    want = torch.ones(41, dtype=torch.bool)
    for s, n in runs:
        want[s:s + n] = False
    assert (t[~want] == 0).all() and (t[want] == 1).all()
    tiny = torch.ones(5, 3).to(dtype)
    K.zero_rows(tiny, [(1, 1), (4, 1)])
    assert tiny.sum(1).tolist() == [3, 0, 3, 3, 0]
    flat = torch.ones(3 << 18).to(dtype)  # one dimension: runs of elements
    K.zero_rows(flat, [(5, 1 << 18)])
    assert (flat[5:5 + (1 << 18)] == 0).all() and flat[:5].eq(1).all() and flat[5 + (1 << 18):].eq(1).all()
    with pytest.raises(ValueError, match="reach outside"):
        K.zero_rows(tiny, [(4, 2)])
    with pytest.raises(ValueError, match="contiguous"):
        K.zero_rows(t[:, :, ::2], [(0, 1)])


# ------------------------------------------------------------------------------- small-M expert GEMMs
def _small_problem(E, D, F_, counts, dtype, bias):
    g = torch.Generator().manual_seed(sum(counts) + E)
    T = max(counts) + 3
    S = sum(counts)
    x = torch.randn(T, D, generator=g).to(dtype)
    tok = torch.cat([torch.randperm(T, generator=g)[:c] for c in counts]) if S else torch.zeros(0, dtype=torch.long)
    w_in = (torch.randn(E, 2 * F_, D, generator=g) / D**0.5).to(dtype)
    w_out = (torch.randn(E, D, F_, generator=g) / F_**0.5).to(dtype)
    b_in = (torch.randn(E, 2 * F_, generator=g) * 0.1).to(dtype) if bias else None
    b_out = (torch.randn(E, D, generator=g) * 0.1).to(dtype) if bias else None
    return x, tok, torch.rand(S, generator=g), w_in, w_out, b_in, b_out


CASES = [  # (E, D, F, rows per expert)
    (3, 37, 21, [2, 0, 5]),  # tails of every vector width, an idle expert
    (4, 64, 32, [1, 4, 3, 9]),  # exact vector widths, more rows than one tile
    (3, 96, 64, [2, 1, 8]),  # the one- and two-row tiles of decode (rows of whole cache lines); 8 rows: 4 + 4
    (2, 130, 70, [24, 1]),
    (2, 300, 150, [13, 7]),  # wide outputs: work items of several tiles, a ragged last item
    (2, 530, 280, [8, 14]),  # reductions of several passes of the NN kernel (NN_KC rows each), a ragged last pass
    (2, 40, 1000, [7, 13]),  # fp32 output projection in chunks of k (rows of d_ff beyond the tiles' L1 share)
    (2, 1000, 40, [7, 5]),  # ...input projection (rows of d_model)
    (1, 40, 1700, [9]),  # ...and bf16 (its chunks: whole 32-element steps, a ragged last one)
    (1, 1700, 40, [9]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,D,F_,counts", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_small_experts_forward(kernels, dtype, E, D, F_, counts, bias):
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, counts, dtype, bias)
    # (float32 sums over k in one chain, as the packed and swapped tiles run them: their rounding grows with k)
    tol_in, tol_out = (TOL[dtype] * max(1.0, k / 512) for k in (D, F_))
    start, end = segments(counts)
    h, a = K.small_experts_up(x, tok, start, end, w_in, b_in, swiglu=True, keep_h=True)
    out = torch.zeros(x.shape[0], D)
    K.small_experts_down(a, tok, w, start, end, w_out, b_out, out)
    want_out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for e in range(E):
        s, t = start[e].item(), end[e].item()
        if s == t:
            continue
        h_ref = x[tok[s:t]].double() @ w_in[e].double().T + (0 if b_in is None else b_in[e].double())
        assert rel_err(h[s:t], h_ref) < tol_in
        a_ref = F.silu(h_ref[:, :F_]) * h_ref[:, F_:]
        assert rel_err(a[s:t], a_ref) < tol_in
        y = a[s:t].double() @ w_out[e].double().T + (0 if b_out is None else b_out[e].double())
        want_out.index_add_(0, tok[s:t], y * w[s:t, None].double())
    assert rel_err(out, want_out) < tol_out


@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, None])
def test_row_stream_input_projection(kernels, swiglu, bias, threads):
    """Float32 experts of 3 to 8 rows with d_model a multiple of 16 (AVX2 builds: the row-stream dot products, each
    weight row read start to end against all the expert's rows; others: the tiles) against the float64 reference:
    every row count of that range, 1-2 and 9 beside it, an idle expert, a last item of 36 activation columns
    (d_ff 100: 64 + 36), SwiGLU with the pre-activations kept and plain (2 d_ff outputs), one thread or all."""
    counts, D, F_ = [3, 4, 5, 0, 6, 7, 8, 2, 9, 1], 128, 100
    E = len(counts)
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, counts, torch.float32, bias)
    start, end = segments(counts)
    with num_threads(threads or torch.get_num_threads()):
        h, a = K.small_experts_up(x, tok, start, end, w_in, b_in, swiglu=swiglu, keep_h=True, packed_min_rows=1000)
    for e in range(E):
        s, t = start[e].item(), end[e].item()
        if s == t:
            continue
        h_ref = x[tok[s:t]].double() @ w_in[e].double().T + (0 if b_in is None else b_in[e].double())
        assert rel_err(h[s:t], h_ref) < TOL[torch.float32], e
        if swiglu:
            assert rel_err(a[s:t], F.silu(h_ref[:, :F_]) * h_ref[:, F_:]) < TOL[torch.float32], e


SWAPPED_CASES = [  # (E, D, F, rows per expert): the swapped tiles' edges (experts of 24 to 96 rows; others beside)
    (3, 37, 21, [24, 0, 29]),  # a group of 16 and one of 8 (one vector), 16 + 13 (3 padded rows); 7 tiles of 3
    (2, 530, 70, [40, 5]),  # 16 + 16 + 8; 70 = 23 x 3 + 1: a last SwiGLU tile of 1 column pair; 5 rows beside
    (3, 64, 32, [96, 23, 97]),  # six whole groups; a row fewer than the swapped tiles take, one more
    (2, 1000, 41, [37, 24]),  # a long reduction (d_model 1000); 82 = 13 x 6 + 4 plain output columns
]


@pytest.mark.parametrize("E,D,F_,counts", SWAPPED_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_swapped_tiles_give_the_packed_tiles_bits(kernels, E, D, F_, counts, bias):
    """Float32 experts of 24 to 96 rows on AVX2 builds (swapped_rows): the input projection's swapped tiles (each
    output a sum over k in order in one accumulator, then the same epilogue) give the packed tiles' bits, SwiGLU
    with the pre-activations kept and plain, whatever the thread count; where neither runs (the dot-product tiles,
    which split the sums over k) the bits differ, so the swapped tiles did run."""
    lo, hi = K.swapped_rows(torch.float32)
    if hi == 0:
        pytest.skip("the swapped tiles are in AVX2 builds")
    assert (lo, hi) == (24, 96)  # (the cases' edges)
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, counts, torch.float32, bias)
    start, end = segments(counts)
    runs = {}
    for name, pm, sw, threads in (("packed", 1, 0, None), ("swapped", 1, None, None), ("swapped 1 thread", 1, None, 1),
                                  ("dot-product", 0, 0, None)):
        with num_threads(threads or torch.get_num_threads()):
            h, a = K.small_experts_up(x, tok, start, end, w_in, b_in, swiglu=True, keep_h=True, packed_min_rows=pm,
                                      swapped_max_rows=sw)
            plain, _ = K.small_experts_up(x, tok, start, end, w_in, b_in, swiglu=False, keep_h=True,
                                          packed_min_rows=pm, swapped_max_rows=sw)  # (2 F columns, 6 per tile)
        runs[name] = (h, a, plain)
    for name in ("swapped", "swapped 1 thread"):
        assert all(torch.equal(runs[name][i], runs["packed"][i]) for i in range(3))
    swapped = torch.cat([torch.arange(s, t) for s, t, c in zip(start.tolist(), end.tolist(), counts)
                         if lo <= c <= hi])
    assert not torch.equal(runs["dot-product"][0][swapped], runs["packed"][0][swapped])
    for e in range(E):  # (and the packed tiles' against the reference)
        s, t = start[e].item(), end[e].item()
        if s == t:
            continue
        h_ref = x[tok[s:t]].double() @ w_in[e].double().T + (0 if b_in is None else b_in[e].double())
        assert rel_err(runs["swapped"][0][s:t], h_ref) < TOL[torch.float32] * max(1.0, D / 512)


def test_swapped_tiles_in_the_fused_decode_and_the_few_token_step(kernels, monkeypatch):
    """The C callers of the swapped tiles: a float32 layer's inference of 96 tokens (the fused decode, ~24-48 rows
    per expert) and its training step (the few-token step) against the loop reference."""
    lo, hi = K.swapped_rows(torch.float32)
    if hi == 0:
        pytest.skip("the swapped tiles are in AVX2 builds")
    monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 256)
    torch.manual_seed(3)
    layer = moekit.MoE(40, 70, num_experts=6, top_k=2)
    loop = moekit.MoE(config=layer.config)
    loop.load_state_dict(layer.state_dict())
    loop.experts.backend = "loop"
    x = torch.randn(96, 40)
    called = []
    real = K.RouteDecode.__call__
    monkeypatch.setattr(K.RouteDecode, "__call__", lambda *a: called.append(1) or real(*a))
    layer.eval(), loop.eval()
    with torch.no_grad():
        counts = torch.bincount(layer.router(x).topk_ids_TK.flatten(), minlength=6)
        assert called == [] and int(counts.max()) <= hi and int(counts.min()) >= lo, counts
        assert max_err(layer(x), loop(x)) < 1e-5 and called == [1]
    layer.train(), loop.train()
    steps = []
    real_step = K.route_train_forward
    monkeypatch.setattr(K, "route_train_forward", lambda *a: steps.append(1) or real_step(*a))
    assert_fwd_bwd_close(run_fwd_bwd(layer, x), run_fwd_bwd(loop, x), 1e-5)
    assert steps == [1]


PACKED_CASES = [  # (E, D, F, rows per expert): the packed tiles' edges
    (3, 37, 21, [7, 0, 13]),  # tails of every width: k not a multiple of 8, a last panel of 5 columns, tiles of 1 row
    (2, 530, 70, [30, 6]),  # k in three blocks of 256 (the last ragged), output columns in 3 full panels and a tail
    (2, 2100, 20, [130, 1]),  # more rows than one block of widened rows (a bf16 expert's 1 MiB buffer: 120 rows)
    # float32 experts of GK_APACK_MIN_ROWS rows and more run on packed token rows (AVX2): k tails, tiles of 5 and 6
    (3, 37, 21, [300, 0, 257]),  # rows, an expert below the threshold beside them
    (2, 530, 70, [520, 3]),
    (1, 2100, 20, [1100]),  # packed rows in several blocks (GK_APACK_BYTES), each of two buffers used twice
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,D,F_,counts,packed_min", [(*c, None) for c in CASES] + [(*c, 1) for c in PACKED_CASES])
def test_small_experts_backward_gemms(kernels, dtype, E, D, F_, counts, packed_min):
    """The data gradients (dot-product tiles, or with packed_min=1 every expert in the packed tiles where the build
    has them, ``g`` fp32 against bf16 weights included) and the weight gradients."""
    x, tok, w, w_in, w_out, _, _ = _small_problem(E, D, F_, counts, dtype, False)
    tol = TOL[dtype] * max(1.0, D / 512)
    start, end = segments(counts)
    S, T = tok.shape[0], x.shape[0]
    g = torch.randn(T, D)
    # nn, stored: ga[s] = g[tok[s]] @ w_out[e]
    ga = torch.empty(S, F_, dtype=dtype)
    K.small_experts_nn(g, tok, w_out, start, end, ga, packed_min_rows=packed_min)
    # nn, accumulated: dx[tok[s]] += dh[s] @ w_in[e]
    dh = torch.randn(S, 2 * F_).to(dtype)
    dx = torch.ones(T, D)
    K.small_experts_nn(dh, None, w_in, start, end, dx, tok, packed_min_rows=packed_min)
    # outer: dW_in[e] = dh[rows]^T @ x[tok[rows]]; idle experts untouched
    dwin = torch.full(w_in.shape, 7.0).to(dtype)
    K.small_experts_outer(dh, None, x, tok, start, end, dwin)
    want_dx = torch.ones(T, D, dtype=torch.float64)
    for e in range(E):
        s, t = start[e].item(), end[e].item()
        if s == t:
            assert (dwin[e] == 7).all()
            continue
        assert rel_err(ga[s:t], g[tok[s:t]].double() @ w_out[e].double()) < tol
        want_dx.index_add_(0, tok[s:t], dh[s:t].double() @ w_in[e].double())
        assert rel_err(dwin[e], dh[s:t].double().T @ x[tok[s:t]].double()) < tol
    assert rel_err(dx, want_dx) < tol


needs_amx = pytest.mark.skipif(not K.amx(), reason="needs AMX tiles (Intel Sapphire Rapids or later), the kernels "
                               "built for them and the OS's permission")
AMX_CASES = [  # (E, D, F, rows per expert): 16-row blocks and their pairs, ragged and whole, idle and one-row experts
    (4, 64, 48, [4, 17, 0, 33]),
    (3, 96, 32, [16, 32, 1]),
    (2, 128, 64, [40, 5]),
    (3, 512, 64, [300, 0, 45]),  # both threads; two runs of packed blocks; the epilogue carried across experts
]


@needs_amx
@pytest.mark.parametrize("E,D,F_,counts", [c for c in AMX_CASES if c[2] % 32 == 0] + [(3, 64, 96, [70, 0, 2])])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("keep_h", [False, True])
def test_amx_packed_activation_gives_the_same_bits(kernels, E, D, F_, counts, bias, keep_h):
    """The input projection writing the activation in the output projection's packed layout (every expert on the
    tiles, 1-3 rows too) and the output projection reading it: the same h and the same combined output, bit for
    bit, as the two kernels with row-major activations on the tiles."""
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, counts, torch.bfloat16, bias)
    start, end = segments(counts)
    if not K.amx():  # (the AVX2 and plain-C builds)
        assert not K.amx_packed_usable(x, w_in, w_out, b_in, b_out)
        pytest.skip("this build has no AMX tiles")
    assert K.amx_packed_usable(x, w_in, w_out, b_in, b_out)
    h_want, a = K.small_experts_up(x, tok, start, end, w_in, b_in, swiglu=True, keep_h=True, packed_min_rows=1)
    want = torch.ones(x.shape[0], D)
    K.small_experts_down(a, tok, w, start, end, w_out, b_out, want, packed_min_rows=1)
    h, a_pk = K.amx_up_packed(x, tok, start, end, w_in, b_in, keep_h=keep_h)
    assert a_pk.shape == (sum(-(-c // 16) * 16 for c in counts), F_)
    assert (h is None) != keep_h and (h is None or torch.equal(h, h_want))
    got = torch.ones(x.shape[0], D)
    K.amx_down_packed(a_pk, tok, w, start, end, w_out, b_out, got)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="a_pk must be"):
        K.amx_down_packed(a_pk[16:], tok, w, start, end, w_out, b_out, got)
    # each token's first row storing, its last rounding the finished sum into a bf16 output: the same bits as
    # summing into zeros and casting after (tokens without rows are left alone)
    first = {int(t): s for s, t in reversed(list(enumerate(tok.tolist())))}
    last = {int(t): s for s, t in enumerate(tok.tolist())}
    flags = torch.zeros(tok.shape[0], dtype=torch.uint8)
    for t in first:
        flags[first[t]] += 1
        flags[last[t]] += 2
    want16 = torch.zeros(x.shape[0], D)
    K.small_experts_down(a, tok, w, start, end, w_out, b_out, want16, packed_min_rows=1)
    out16 = torch.full((x.shape[0], D), 7.0, dtype=torch.bfloat16)
    K.amx_down_packed(a_pk, tok, w, start, end, w_out, b_out, torch.full((x.shape[0], D), float("nan")),
                      flags=flags, out16=out16)
    rows = sorted(first)
    assert torch.equal(out16[rows], want16.bfloat16()[rows])
    assert (out16[[t for t in range(x.shape[0]) if t not in first]] == 7).all()
    with pytest.raises(ValueError, match="give both flags and out16"):
        K.amx_down_packed(a_pk, tok, w, start, end, w_out, b_out, got, flags=flags)


def test_row_flags_mark_each_tokens_first_and_last_row():
    if K.library() is None:
        pytest.skip("no CPU kernels")
    tok = torch.tensor([2, 0, 1, 2, 0, 2])  # token 2: rows 0, 3, 5; token 0: rows 1, 4; token 1: row 2 only
    assert K.row_flags(tok, 3).tolist() == [1, 1, 3, 0, 2, 2]
    assert K.row_flags(tok, 4) is None  # token 3 has no row


@needs_amx
@pytest.mark.parametrize("E,D,F_,counts", AMX_CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("swiglu", [False, True])
def test_amx_projections_match_the_avx512_tiles_and_the_reference(kernels, E, D, F_, counts, bias, swiglu):
    """bf16 on the AMX tiles (every expert of at least one row) against the AVX-512 tiles (packed_min_rows=0) and
    a float64 reference: h and the activation to one bf16 rounding, the combined output to fp32 sum order."""
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, counts, torch.bfloat16, bias)
    if not swiglu:
        w_in, b_in = w_in[:, :F_].contiguous(), None if b_in is None else b_in[:, :F_].contiguous()
    start, end = segments(counts)
    got, old = [K.small_experts_up(x, tok, start, end, w_in, b_in, swiglu=swiglu, keep_h=True, packed_min_rows=pm)
                for pm in (1, 0)]
    for e in range(E):
        s, t = start[e].item(), end[e].item()
        if s == t:
            continue
        h_ref = x[tok[s:t]].double() @ w_in[e].double().T + (0 if b_in is None else b_in[e].double())
        assert rel_err(got[0][s:t], h_ref) < TOL[torch.bfloat16]
        assert rel_err(got[0][s:t], old[0][s:t]) < TOL[torch.bfloat16]
        if swiglu:
            assert rel_err(got[1][s:t], F.silu(h_ref[:, :F_]) * h_ref[:, F_:]) < TOL[torch.bfloat16]
    if not swiglu:
        return
    a = got[1]
    outs = []
    for pm in (1, 0):
        out = torch.ones(x.shape[0], D)
        K.small_experts_down(a, tok, w, start, end, w_out, b_out, out, packed_min_rows=pm)
        outs.append(out)
    want = torch.ones(x.shape[0], D, dtype=torch.float64)
    for e in range(E):
        s, t = start[e].item(), end[e].item()
        if s == t:
            continue
        y = a[s:t].double() @ w_out[e].double().T + (0 if b_out is None else b_out[e].double())
        want.index_add_(0, tok[s:t], y * w[s:t, None].double())
    assert rel_err(outs[0], want) < 1e-5
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@needs_amx
@pytest.mark.parametrize("E,D,F_,counts", AMX_CASES)
def test_amx_data_and_weight_gradients(kernels, E, D, F_, counts):
    """small_experts_nn on the tiles: written (bf16 and fp32) and added into gathered fp32 rows; small_experts_outer
    on the tiles: every expert's rows in one reduction (several 32-row chunks, zero-padded), written as bf16 or
    fp32, idle experts untouched."""
    x, tok, w, w_in, w_out, _, _ = _small_problem(E, D, F_, counts, torch.bfloat16, False)
    start, end = segments(counts)
    S, T = tok.shape[0], x.shape[0]
    g = torch.randn(T, D).bfloat16()
    dh = torch.randn(S, 2 * F_).bfloat16()
    for out_dtype in (torch.bfloat16, torch.float32):
        ga = torch.empty(S, F_, dtype=out_dtype)
        K.small_experts_nn(g, tok, w_out, start, end, ga, packed_min_rows=1)
        for e in range(E):
            s, t = start[e].item(), end[e].item()
            if s == t:
                continue
            assert rel_err(ga[s:t], g[tok[s:t]].double() @ w_out[e].double()) < TOL[out_dtype]
    dx = torch.ones(T, D)
    K.small_experts_nn(dh, None, w_in, start, end, dx, tok, packed_min_rows=1)
    want = torch.ones(T, D, dtype=torch.float64)
    for e in range(E):
        s, t = start[e].item(), end[e].item()
        if s == t:
            continue
        want.index_add_(0, tok[s:t], dh[s:t].double() @ w_in[e].double())
    assert rel_err(dx, want) < 1e-5
    for g_dtype in (torch.bfloat16, torch.float32):
        dw = torch.full(w_in.shape, 7.0, dtype=g_dtype)
        K.small_experts_outer(dh, None, x, tok, start, end, dw)
        for e in range(E):
            s, t = start[e].item(), end[e].item()
            if s == t:
                assert (dw[e] == 7).all()
                continue
            assert rel_err(dw[e], dh[s:t].double().T @ x[tok[s:t]].double()) < TOL[g_dtype] + 1e-5


@needs_amx
@pytest.mark.parametrize("Kd", [16, 48, 80, 112, 528])
@pytest.mark.parametrize("counts", [[1, 0, 7], [32, 33, 64]])
def test_amx_outer_every_count_of_column_blocks(kernels, Kd, counts):
    """small_experts_outer on the tiles writes each row block of G with up to four 16-column tiles at a time: Kd of
    1-4 column blocks (and a last item of 1, 2 or 3 blocks after whole ones), rows of one or several 32-row chunks,
    both G dtypes, an idle expert untouched."""
    g = torch.Generator().manual_seed(Kd + sum(counts))
    start, end = segments(counts)
    S, N = sum(counts), 48
    a = torch.randn(S, N, generator=g).bfloat16()
    b = torch.randn(S + 5, Kd, generator=g).bfloat16()
    b_idx = torch.randperm(S + 5, generator=g)[:S]
    for g_dtype in (torch.bfloat16, torch.float32):
        grad = torch.full((len(counts), N, Kd), 7.0, dtype=g_dtype)
        K.small_experts_outer(a, None, b, b_idx, start, end, grad)
        for e, c in enumerate(counts):
            s, t = start[e].item(), end[e].item()
            if c == 0:
                assert (grad[e] == 7).all()
                continue
            assert rel_err(grad[e], a[s:t].double().T @ b[b_idx[s:t]].double()) < TOL[g_dtype] + 1e-5


@needs_amx
@pytest.mark.parametrize("Kd", [2096, 1024])  # B's packed rows over 2 MiB (in chunks, the last one partial) or not
def test_amx_outer_large_operands_in_chunks(kernels, Kd):
    """small_experts_outer on the tiles' 2 x 2 items for experts of many rows, where B's packed rows exceed what
    stays in L2 and the items go chunk of column pairs by chunk (a last pair of one column block, a last chunk of
    fewer pairs); an expert that fits runs as before; with Kd = 2096 the two large experts' packed operands exceed
    a thread's own buffer (AMX_OUTER_PRIVATE_BYTES) and run shared in one group, around the small ones that each run
    on one thread: G against a float64 reference."""
    g = torch.Generator().manual_seed(Kd)
    counts = [0, 500, 37, 600, 3]
    start, end = segments(counts)
    S, N = sum(counts), 48
    a = torch.randn(S, N, generator=g).bfloat16()
    b = torch.randn(S, Kd, generator=g).bfloat16()
    grad = torch.full((len(counts), N, Kd), 7.0)
    K.small_experts_outer(a, None, b, None, start, end, grad)
    assert (grad[0] == 7).all()
    for e in range(1, len(counts)):
        s, t = start[e].item(), end[e].item()
        assert rel_err(grad[e], a[s:t].double().T @ b[s:t].double()) < TOL[torch.float32] + 1e-5


@needs_amx
def test_library_amx_gemms_still_right_after_the_kernels_tiles(kernels):
    """oneDNN runs its own bf16 GEMMs on the tiles, in the same threads: after moekit's kernels configured and
    released them, its results are unchanged."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g).bfloat16(), torch.randn(256, 96, generator=g).bfloat16()
    want = a @ b
    x, tok, w, w_in, w_out, _, _ = _small_problem(2, 64, 32, [20, 17], torch.bfloat16, False)
    start, end = segments([20, 17])
    for _ in range(3):
        K.small_experts_up(x, tok, start, end, w_in, None, swiglu=True, keep_h=False, packed_min_rows=1)
        assert torch.equal(a @ b, want)
        assert rel_err(a @ b, a.double() @ b.double()) < TOL[torch.bfloat16]


def test_amx_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("MOEKIT_CPU_AMX", "0")
    K.reset()
    try:
        assert not K.amx()
    finally:
        monkeypatch.delenv("MOEKIT_CPU_AMX")
        K.reset()


@pytest.mark.parametrize("dtype,big", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_small_nn_few_rows_streams_weights_across_threads(kernels, dtype, big, threads):
    # every expert with few rows (AVX2 builds: at most 40; AVX-512: 8, fp32 96): the NN kernel splits all weight
    # rows into one range per thread, cut where the rows' cost is even (ranges that end inside an expert, an idle
    # expert, Kd not a multiple of the 4-row step or of the chunk) and sums the threads' partial rows afterwards;
    # tokens shared by experts accumulate into the same rows of out. The sums of up to 8 (AVX2: 6) rows stay in
    # registers over a chunk of weight rows, 32 (16) columns at a time, N's last 11 columns masked (one by one); fp32
    # single rows take steps of 4 weight rows. big: experts of 17 and 40 rows too (register groups of 8, 8 and 1
    # rows on AVX-512 builds; on AVX2 builds groups of 6 over chunks of 64 weight rows, 4 whole chunks and a part)
    counts, Kd, N = [3, 8, 0, 1, 6] + ([17, 40] if big else []), 301, 203
    start, end = segments(counts)
    S, T = sum(counts), 43
    g = torch.Generator().manual_seed(5)
    tok = torch.cat([torch.randperm(T, generator=g)[:c] for c in counts])
    a = torch.randn(T, Kd, generator=g).to(dtype)
    w = torch.randn(len(counts), Kd, N, generator=g).to(dtype)
    want = torch.stack([a[tok[s]].double() @ w[e].double() for e, c in enumerate(counts) for s in
                        range(start[e].item(), end[e].item())])
    with num_threads(threads):
        out = torch.full((S, N), 7.0).to(dtype)
        K.small_experts_nn(a, tok, w, start, end, out)  # written
        acc = torch.ones(T, N)
        K.small_experts_nn(a[tok], None, w, start, end, acc, tok)  # accumulated at the rows' tokens
    assert rel_err(out, want) < TOL[dtype]
    want_acc = torch.ones(T, N, dtype=torch.float64).index_add_(0, tok, want)
    assert rel_err(acc, want_acc) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [[3, 0, 1, 4], [8, 5, 0, 2], [1, 1], [1, 2, 0, 5], [17, 0, 40]])
@pytest.mark.parametrize("N,Kd", [(37, 45), (64, 512), (13, 200)])
def test_small_outer_few_rows_per_expert(kernels, dtype, counts, N, Kd):
    """Weight gradients where every expert has few rows (AVX-512 builds write them from registers, 4 rows of G at
    a time: fp32 up to 256 rows per expert, bf16 on AMX up to 4): rows of G in a last partial group of 4, columns in
    a partial 32- or 64-column step, both operands gathered by index, fp32 sums rounded into a bf16 G (the same bits
    as the fp32 G rounded), an idle expert left untouched; AVX2 builds' fp32 blocks of 128 columns written through
    a buffer (Kd 200: a whole block and a partial one; Kd 45: rows of G not 32-byte aligned), and experts of one or
    two rows on their own loop (Kd 512); AVX2 builds pack A's columns 4 blocks of 6 at a time (N 37: a group of 4
    blocks and one of 3, whose last block has a single column and the one before it too few for an 8-lane load)."""
    g = torch.Generator().manual_seed(sum(counts) + N)
    start, end = segments(counts)
    S, T = sum(counts), max(11, *counts)
    tok = torch.cat([torch.randperm(T, generator=g)[:c] for c in counts])
    a = torch.randn(T, N, generator=g).to(dtype)
    b = torch.randn(S, Kd, generator=g).to(dtype)
    grad = torch.full((len(counts), N, Kd), 7.0).to(dtype)
    K.small_experts_outer(a, tok, b, None, start, end, grad)
    grad2 = torch.full((len(counts), Kd, N), 7.0).to(dtype)
    K.small_experts_outer(b, None, a, tok, start, end, grad2)
    grad3 = torch.full((len(counts), N, Kd), 7.0, dtype=torch.bfloat16)
    K.small_experts_outer(a, tok, b, None, start, end, grad3)
    for e, c in enumerate(counts):
        s, t = start[e].item(), end[e].item()
        if c == 0:
            assert (grad[e] == 7).all() and (grad2[e] == 7).all() and (grad3[e] == 7).all()
            continue
        want = a[tok[s:t]].double().T @ b[s:t].double()
        assert rel_err(grad[e], want) < TOL[dtype]
        assert rel_err(grad2[e], want.T) < TOL[dtype]
        assert rel_err(grad3[e], want) < TOL[torch.bfloat16]
        if dtype == torch.float32:  # the same sums, each rounded to nearest even as it is stored (whole 16-column
            # strips in one store of both vectors, the partial ones element by element)
            assert torch.equal(grad3[e], grad[e].to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_outer_same_bits_for_any_thread_count(kernels, dtype):
    """Each element of G is summed by one work item in row order, so 1, 2 or 3 threads give the same bits: where a
    thread's first item starts inside an expert, in the middle of a group of column blocks that one pass packs
    together (AVX2 builds: 4 blocks of 6 columns of A), it packs its own group from there. N 37: 7 blocks, a
    group of 4 and one of 3 ending in a one-column block; 4 experts with rows, 28 items, so the third of 3 threads
    starts at the third block of the second expert (Kd 5400: enough work for the kernel to take 3 threads)."""
    counts, N, Kd = [5, 130, 0, 9, 40], 37, 5400
    start, end = segments(counts)
    g = torch.Generator().manual_seed(11)
    S = sum(counts)
    a = torch.randn(S, N, generator=g).to(dtype)
    b = torch.randn(S + 7, Kd, generator=g).to(dtype)
    b_idx = torch.randperm(S + 7, generator=g)[:S]
    got = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            grad = torch.full((len(counts), N, Kd), 7.0).to(dtype)
            K.small_experts_outer(a, None, b, b_idx, start, end, grad)
            got.append(grad)
    for grad in got[1:]:
        assert torch.equal(grad, got[0])
    for e, c in enumerate(counts):
        s, t = start[e].item(), end[e].item()
        if c == 0:
            assert (got[0][e] == 7).all()
        else:
            assert rel_err(got[0][e], a[s:t].double().T @ b[b_idx[s:t]].double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_outer_with_rows_too_many_to_pack(kernels, dtype):
    # an expert whose rows of b exceed the outer-product kernel's packing buffer (OUTER_PACK_MAX, 4 MiB of fp32)
    # is read in place; a small one next to it is packed
    counts, N, Kd = [300, 5], 7, 3500
    start, end = segments(counts)
    a = torch.randn(sum(counts), N).to(dtype)
    b = torch.randn(sum(counts), Kd).to(dtype)
    b_idx = torch.randperm(sum(counts))
    grad = torch.empty(2, N, Kd, dtype=dtype)
    K.small_experts_outer(a, None, b, b_idx, start, end, grad)
    for e in range(2):
        s, t = start[e].item(), end[e].item()
        assert rel_err(grad[e], a[s:t].double().T @ b[b_idx[s:t]].double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_matrix_calls_without_bounds(kernels, dtype):
    # start = end = None: one expert owning every row (of a, or of a_idx), as a plain matrix product; the same
    # results as explicit one-segment bounds
    g = torch.Generator().manual_seed(3)
    T, Kd, N = 5, 40, 33
    a = torch.randn(T, Kd, generator=g).to(dtype)
    w = torch.randn(1, Kd, N, generator=g).to(dtype)
    b = torch.randn(T, N, generator=g).to(dtype)
    out = torch.empty(T, N, dtype=dtype)
    K.small_experts_nn(a, None, w, None, None, out)
    assert rel_err(out, a.double() @ w[0].double()) < TOL[dtype]
    idx = torch.tensor([4, 0, 2])
    acc = torch.zeros(T, N)
    K.small_experts_nn(a, idx, w, None, None, acc, idx)  # rows of a_idx: 3 rows added at their own rows
    want = torch.zeros(T, N, dtype=torch.float64)
    want[idx] = a[idx].double() @ w[0].double()
    assert rel_err(acc, want) < TOL[dtype]
    grad = torch.empty(1, Kd, N, dtype=dtype)
    K.small_experts_outer(a, None, b, None, None, None, grad)
    assert rel_err(grad[0], a.double().T @ b.double()) < TOL[dtype]
    with pytest.raises(ValueError, match="single expert"):
        K.small_experts_outer(a, None, b, None, None, None, torch.empty(2, Kd, N, dtype=dtype))
    with pytest.raises(ValueError, match="both start and end"):
        K.small_experts_nn(a, None, w, torch.zeros(1, dtype=torch.int64), None, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_experts_decode_groups_slots_itself(kernels, dtype):
    E, D, F_ = 5, 37, 21
    x, _, _, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, [3, 1, 0, 2, 2], dtype, True)
    ids = torch.tensor([[3, 0], [0, -1], [4, 3], [0, 1]])
    wts = torch.rand(4, 2)
    y, counts = K.small_experts_decode(x[:4].contiguous(), ids, wts, w_in, b_in, w_out, b_out)
    assert counts.tolist() == [3, 1, 0, 2, 1]
    want = torch.zeros(4, D, dtype=torch.float64)
    for t in range(4):
        for k in range(2):
            e = ids[t, k].item()
            if e < 0:
                continue
            h = x[t].double() @ w_in[e].double().T + b_in[e].double()
            a = (F.silu(h[:F_]) * h[F_:]).to(dtype).double()
            want[t] += wts[t, k].double() * (a @ w_out[e].double().T + b_out[e].double())
    assert rel_err(y, want) < TOL[dtype]
    with pytest.raises(RuntimeError, match="moe_small_decode returned -4"):
        K.small_experts_decode(x[:1].contiguous(), torch.tensor([[E]]), torch.ones(1, 1), w_in, b_in, w_out, b_out)


DECODE_ACTS = {"geglu": {}, "geglu_tanh": {}, "reglu": {}, "gpt_oss": {"alpha": 1.702, "limit": 0.5},
               "swiglu_clamped": {"limit": 0.5}, "swiglu_clipped": {"limit": 0.2},  # (limits the values cross)
               "gelu": {}, "gelu_tanh": {}, "relu": {}, "relu2": {}, "silu": {}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(DECODE_ACTS))
def test_small_experts_decode_other_activations(kernels, name, dtype):
    """The decode kernel's activations besides SwiGLU, gated and plain (between the projections: the
    pre-activations stored in the layer's dtype, then the activation), on experts of 80, 75 and 5 rows (every
    input-projection path of the build), against moekit's own activation applied in float64; and through
    route_decode."""
    from moekit.experts.activations import Activation, get_activation

    torch.manual_seed(6)
    act = get_activation(name, **DECODE_ACTS[name])
    E, D, F_, T = 3, 37, 21, 80
    x, _, _, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, [T, 0, 0], dtype, True)
    x = x[:T].contiguous()
    if not act.gated:  # (an MLP expert: an input projection of F rows)
        w_in, b_in = w_in[:, :F_].contiguous(), b_in[:, :F_].contiguous()
    ids = torch.tensor([[0, 1]] * 75 + [[2, 0]] * 5)
    wts = torch.rand(T, 2)
    y, counts = K.small_experts_decode(x, ids, wts, w_in, b_in, w_out, b_out, activation=act)
    assert counts.tolist() == [80, 75, 5]
    h = (torch.einsum("td,efd->tef", x.double(), w_in.double()) + b_in.double()).to(dtype).double()
    a = act(h).to(dtype).double()  # [T, E, F]
    assert a.abs().max() > 0
    ye = torch.einsum("tef,edf->ted", a, w_out.double()) + b_out.double()
    want = (wts.double()[..., None] * ye.gather(1, ids[..., None].expand(T, 2, D))).sum(1)
    assert rel_err(y, want) < TOL[dtype]
    w_r = torch.randn(E, D).to(dtype)
    got = K.route_decode(x[:4].contiguous(), w_r, None, None, 2, True, 0.0, 1.0, w_in, b_in, w_out, b_out,
                         activation=act)
    assert got is not None
    assert torch.equal(got[0], K.small_experts_decode(x[:4].contiguous(), got[2], got[3], w_in, b_in, w_out, b_out,
                                                      activation=act)[0])
    cube = Activation("cube", False, lambda h: h**3)
    with pytest.raises(ValueError, match="no cube activation"):
        K.small_experts_decode(x, ids, wts, w_in, b_in, w_out, b_out, activation=cube)


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_experts_decode_many_rows_per_expert(kernels, dtype):
    """Experts of 80, 75 and 5 rows in one decode call: the large ones leave the dot-product tiles for the packed
    (or AMX) tiles of the build (from 24 rows on AVX2, 64 on AVX-512, 4 for bf16 on AMX), the small one stays; every
    token's sum against float64."""
    torch.manual_seed(5)
    E, D, F_, T = 3, 37, 21, 80
    x, _, _, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, [T, 0, 0], dtype, True)
    x = x[:T].contiguous()
    ids = torch.tensor([[0, 1]] * 75 + [[2, 0]] * 5)
    wts = torch.rand(T, 2)
    y, counts = K.small_experts_decode(x, ids, wts, w_in, b_in, w_out, b_out)
    assert counts.tolist() == [80, 75, 5]
    h = torch.einsum("td,efd->tef", x.double(), w_in.double()) + b_in.double()
    a = (F.silu(h[..., :F_]) * h[..., F_:]).to(dtype).double()  # [T, E, F]
    ye = torch.einsum("tef,edf->ted", a, w_out.double()) + b_out.double()
    want = (wts.double()[..., None] * ye.gather(1, ids[..., None].expand(T, 2, D))).sum(1)
    assert rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renorm,renorm_min,scale", [(True, 0.0, 1.0), (False, 0.0, 2.5), (True, 0.9, 1.0)])
def test_route_decode_routes_like_pytorch_then_runs_the_experts(kernels, dtype, renorm, renorm_min, scale):
    """Softmax top-k routing in the kernel (router bias, selection bias, renormalisation and its clamp, scale),
    against the same math in float64 PyTorch; then the experts as small_experts_decode runs them."""
    torch.manual_seed(3)
    E, D, F_, T, k = 7, 37, 21, 9, 3
    x, _, _, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, [2] * E, dtype, True)
    x = x[:T].contiguous()
    w_r, b_r, sel = torch.randn(E, D).to(dtype), torch.randn(E) * 0.1, torch.randn(E) * 0.05
    got = K.route_decode(x, w_r, b_r, sel, k, renorm, renorm_min, scale, w_in, b_in, w_out, b_out)
    assert got is not None
    y, counts, ids, wts = got
    p = torch.softmax(x.double() @ w_r.double().T + b_r.double(), -1)
    want_ids = torch.topk(p + sel.double(), k, dim=-1).indices
    assert torch.equal(ids, want_ids)
    want_w = p.gather(-1, want_ids)
    if renorm:
        want_w = want_w / want_w.sum(-1, keepdim=True).clamp_min(renorm_min)
    assert rel_err(wts, want_w * scale) < 1e-6
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=E).tolist()
    y_ref, _ = K.small_experts_decode(x, ids, wts, w_in, b_in, w_out, b_out)
    assert torch.equal(y, y_ref)
    # the output in the input's dtype: the same float32 sums, rounded once
    y_x = K.route_decode(x, w_r, b_r, sel, k, renorm, renorm_min, scale, w_in, b_in, w_out, b_out, dtype)[0]
    assert y_x.dtype == dtype and torch.equal(y_x, y_ref.to(dtype))
    # bound once and called again and again, the routing kept in the kernel's scratch: the same results
    bound = K.RouteDecode(w_r, b_r, sel, k, renorm, renorm_min, scale, w_in, b_in, w_out, b_out, dtype)
    for rows in (T, 1, T):
        y_b, counts_b = bound(x[:rows])
        assert torch.equal(y_b, y_x[:rows])
        assert counts_b.tolist() == torch.bincount(ids[:rows].flatten(), minlength=E).tolist()
    assert bound(x[:0])[0].shape == (0, D)


ROUTE_MODES = {
    "deepseek_v3": K.RouteMode("sigmoid", "scores", 4, 2, "top2_sum", float("-inf"), 1e-20),
    "deepseek_v2": K.RouteMode("softmax", "scores", 4, 3, "max", 0.0, 0.0),
    "sigmoid_plain": K.RouteMode("sigmoid", "scores", renorm_eps=1e-20),
    "sigmoid_softcapped": K.RouteMode("sigmoid", "scores", 4, 2, renorm_eps=1e-20, logit_softcap=0.3),
    "topk_softmax": K.RouteMode("logits", "softmax"),
    "topk_sigmoid": K.RouteMode("logits", "sigmoid"),
}


def _route_reference(logits, sel, mode, k, renorm, scale):
    """RouteMode's routing in float64 PyTorch, the steps as moekit's routers take them."""
    if mode.logit_softcap > 0:
        logits = torch.tanh(logits / mode.logit_softcap) * mode.logit_softcap
    score = {"softmax": lambda v: torch.softmax(v, -1), "sigmoid": torch.sigmoid, "logits": lambda v: v}
    s = score[mode.scores](logits)
    c = s + sel.double()
    if mode.n_group > 1 and mode.topk_group < mode.n_group:
        grouped = c.view(c.shape[0], mode.n_group, -1)
        gs = grouped.amax(-1) if mode.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(mode.topk_group, dim=-1).indices, True)
        c = grouped.masked_fill(~keep[..., None], mode.group_fill).view_as(c)
    ids = torch.topk(c, k, dim=-1).indices
    w = s.gather(-1, ids)
    if mode.weights == "softmax":
        w = torch.softmax(w, -1)
    else:
        w = torch.sigmoid(w) if mode.weights == "sigmoid" else w
        w = w / (w.sum(-1, keepdim=True) + mode.renorm_eps) if renorm else w
    return ids, w * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("name", list(ROUTE_MODES))
def test_route_decode_modes_route_like_pytorch(kernels, name, renorm, dtype):
    """The kernel's other routings (group-limited sigmoid or softmax top-k, top-k of the logits weighted by a
    softmax or sigmoids over them), with a router bias and a selection bias, against the same math in float64;
    then the experts as small_experts_decode runs them."""
    torch.manual_seed(5)
    E, D, F_, T, k = 8, 37, 21, 9, 2
    mode = ROUTE_MODES[name]
    x, _, _, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, [2] * E, dtype, True)
    x = x[:T].contiguous()
    w_r, b_r, sel = torch.randn(E, D).to(dtype), torch.randn(E) * 0.1, torch.randn(E) * 0.05
    got = K.route_decode(x, w_r, b_r, sel, k, renorm, 0.0, 1.5, w_in, b_in, w_out, b_out, mode=mode)
    assert got is not None
    y, counts, ids, wts = got
    want_ids, want_w = _route_reference(x.double() @ w_r.double().T + b_r.double(), sel, mode, k, renorm, 1.5)
    assert torch.equal(ids, want_ids)
    assert rel_err(wts, want_w) < 1e-6
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=E).tolist()
    assert torch.equal(y, K.small_experts_decode(x, ids, wts, w_in, b_in, w_out, b_out)[0])


def test_route_decode_modes_decline_ties_between_groups(kernels):
    """Two groups whose scores tie at the boundary of the groups kept: PyTorch's top-k decides (None), though the
    experts within either group would not tie; a NaN score likewise, even in a group the tie would drop."""
    E, D, F_ = 4, 8, 6
    x, _, _, w_in, w_out, _, _ = _small_problem(E, D, F_, [1] * E, torch.float32, False)
    x = x[:2].contiguous()
    half = torch.randn(2, D)
    mode = K.RouteMode("sigmoid", "scores", 2, 1)
    args = (1, True, 0.0, 1.0, w_in, None, w_out, None)
    assert K.route_decode(x, torch.cat([half, half]), None, None, *args, mode=mode) is None  # groups {0, 1}, {2, 3}
    assert K.route_decode(x, torch.cat([half, half.flip(0) * 0.5]), None, None, *args, mode=mode) is not None
    nan_x = x.clone()
    nan_x[0, 1] = float("nan")
    assert K.route_decode(nan_x, torch.randn(E, D), None, None, *args, mode=mode) is None


def test_route_decode_declines_ties_and_nan(kernels):
    """A tie among a token's k + 1 largest choices, or a NaN, is left to PyTorch (None), with nothing computed."""
    E, D, F_ = 4, 8, 6
    x, _, _, w_in, w_out, _, _ = _small_problem(E, D, F_, [1] * E, torch.float32, False)
    x = x[:2].contiguous()
    args = (2, True, 0.0, 1.0, w_in, None, w_out, None)
    assert K.route_decode(x, torch.zeros(E, D), None, None, *args) is None  # every probability equal
    tie_at_k = torch.zeros(E, D)
    tie_at_k[0] = 1.0  # one clear winner, then three equal: the second choice is a tie
    assert K.route_decode(x.abs(), tie_at_k, None, None, *args) is None
    nan_x = x.clone()
    nan_x[1, 3] = float("nan")
    assert K.route_decode(nan_x, torch.randn(E, D), None, None, *args) is None
    assert K.route_decode(x, torch.randn(E, D), None, None, *args) is not None


# ------------------------------------------------------------------------------------------ router kernels
@pytest.mark.parametrize("T,E,D", [(1, 8, 512), (13, 8, 37), (1030, 8, 512), (66, 16, 64), (9, 5, 48),
                                   (70, 64, 96), (3, 64, 512), (1100, 12, 64)])
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_router_logits_match_float64(kernels, T, E, D, w_dtype, bias):
    """A bf16 input's float32 logits without its float32 copy (the dot-product kernel's 4 x 4 blocks and their
    tails, D not a multiple of 16; on AMX CPUs, bf16 weights with a multiple of 16 experts on the tiles, and 8-15
    experts of 1024 tokens or more padded to 16), against the same products in float64."""
    torch.manual_seed(T + E + D)
    x, w = torch.randn(T, D).bfloat16(), torch.randn(E, D).to(w_dtype)
    b = torch.randn(E) if bias else None
    got = K.router_logits(x, w, b)
    want = x.double() @ w.double().T + (b.double() if bias else 0.0)
    if got is None:  # only more experts than the dot-product kernel takes, and not for the tiles
        tiles = w_dtype == torch.bfloat16 and K.amx() and E % 16 == 0 and D % 32 == 0 and T >= K.AMX_NN_MIN_ROWS
        assert E > K.ROUTER_LOGITS_MAX_EXPERTS and not tiles
        return
    assert got.dtype == torch.float32 and got.shape == (T, E)
    assert max_err(got, want) < 1e-5 * D ** 0.5
    strided = torch.randn(T, D + 3).bfloat16()[:, :D]  # rows with a stride
    strided.copy_(x)
    assert torch.equal(K.router_logits(strided, w, b), got)


def test_router_logits_decline_what_they_do_not_cover(kernels):
    x = torch.randn(5, 32)
    assert K.router_logits(x, torch.randn(8, 32)) is None  # float32 input: nothing to save
    assert K.router_logits(x.bfloat16(), torch.randn(8, 16)) is None  # shapes disagree
    assert K.router_logits(x.bfloat16(), torch.randn(8, 32), torch.randn(8).bfloat16()) is None  # bias dtype
    assert K.router_logits(x.bfloat16(), torch.randn(8, 32).double()) is None


@pytest.mark.parametrize("E", [8, 40])  # dx from the small-M kernel (<= CAST_NN_MAX_OUT outputs), or by blocks
def test_cast_linear_backward_by_blocks_matches_float64(kernels, monkeypatch, E):
    """A bf16 router computed in fp32 with many rows: its backward sums dw over blocks of x's rows converted one at
    a time (several blocks here) and writes dx in x's dtype; both as the float64 products give them."""
    monkeypatch.setattr(cpu_gemm, "CAST_BLOCK_BYTES", 64 * 4 * 48)  # 48 rows of 64 columns per block
    torch.manual_seed(E)
    x = torch.randn(130, 64).bfloat16().requires_grad_()
    w = torch.randn(E, 64).bfloat16().requires_grad_()
    out = cpu_gemm.linear_autograd(x, w, None, torch.float32)
    g = torch.randn(130, E)
    dx, dw = torch.autograd.grad(out, [x, w], g)
    assert dx.dtype == dw.dtype == torch.bfloat16
    want_dx, want_dw = g.double() @ w.double(), g.double().T @ x.double()
    assert max_err(dx, want_dx) <= 8e-3 * want_dx.abs().max().item()  # (one rounding to bf16)
    assert max_err(dw, want_dw) <= 8e-3 * want_dw.abs().max().item()


def test_bf16_router_logits_take_the_kernel_forward_and_backward(kernels):
    """A bf16 router computed in fp32 (its default) gets the kernel's logits, and the same gradients as F.linear on
    the float32 copies."""
    torch.manual_seed(0)
    x = torch.randn(40, 64).bfloat16().requires_grad_()
    w = torch.randn(8, 64).bfloat16().requires_grad_()
    b = torch.randn(8, requires_grad=True)
    out = cpu_gemm.linear_autograd(x, w, b, torch.float32)
    assert torch.equal(out.detach(), K.router_logits(x.detach(), w.detach(), b.detach()))
    g = torch.randn(40, 8)
    got = torch.autograd.grad(out, [x, w, b], g)
    want = torch.autograd.grad(F.linear(x.float(), w.float(), b), [x, w, b], g)
    for a, c in zip(got, want):
        assert a.dtype == c.dtype and max_err(a, c) < 1e-2


@pytest.mark.parametrize("E,k", [(8, 2), (64, 8), (60, 6), (16, 16), (5, 1), (12, 3)])  # (E <= 16: a row per lane)
@pytest.mark.parametrize("renorm,renorm_min,scale", [(True, 0.0, 1.0), (False, 0.0, 2.5), (True, 0.9, 1.0)])
def test_softmax_topk_kernel_matches_pytorch(kernels, E, k, renorm, renorm_min, scale):
    torch.manual_seed(E * k)
    T = K.ROUTE_MIN_SCORES // E + 5
    logits, sel = torch.randn(T, E) * 3, torch.randn(E) * 0.05
    ids, wts, probs = K.softmax_topk(logits, sel, k, renorm, renorm_min, scale)
    p = torch.softmax(logits.double(), -1)
    assert max_err(probs, p) < 1e-6
    assert torch.equal(ids, torch.topk(p + sel.double(), k, dim=-1).indices)
    want = p.gather(-1, ids)
    if renorm:
        want = want / want.sum(-1, keepdim=True).clamp_min(renorm_min)
    assert max_err(wts, want * scale) < 1e-6 * max(scale, 1.0)
    assert K.softmax_topk(logits[:3], sel, k, renorm, renorm_min, scale) is None  # too few scores: PyTorch's


@pytest.mark.parametrize("E", [8, 16, 40])
def test_softmax_topk_kernel_leaves_ties_and_nan_to_pytorch(kernels, E):
    T = K.ROUTE_MIN_SCORES // E + 1
    logits = torch.randn(T, E)
    assert K.softmax_topk(logits, None, 2, True, 0.0, 1.0) is not None
    for bad in ("tie", "tie_at_k", "nan"):
        s = logits.clone()
        if bad == "tie":
            s[T // 2, :3] = 5.0  # three equal largest: the top 2 depend on tie-breaking
        elif bad == "tie_at_k":
            s[T // 3, :3] = torch.tensor([6.0, 5.0, 5.0])  # the second choice ties with the third
        else:
            s[T - 1, 40 % E] = float("nan")
        assert K.softmax_topk(s, None, 2, True, 0.0, 1.0) is None, bad


@pytest.mark.parametrize("renorm,renorm_min,scale", [(True, 0.0, 1.0), (False, 0.0, 2.5), (True, 0.6, 1.5)])
@pytest.mark.parametrize("aux", [False, True])
def test_softmax_topk_router_on_the_kernel_routes_and_differentiates_like_pytorch(kernels, renorm, renorm_min, scale,
                                                                                 aux):
    """SoftmaxTopK.route on the C kernel against its PyTorch steps: the same choices, weights and probabilities,
    and the same logits' gradient through the weights (the renormalisation, its clamp for some rows, the scale)
    and through the probabilities (a balancing loss)."""
    torch.manual_seed(7)
    E, k = 16, 4
    router = moekit.routing.SoftmaxTopK(32, E, k, renormalize=renorm, renorm_min=renorm_min, scale=scale)
    T = K.ROUTE_MIN_SCORES // E + 3
    logits = (torch.randn(T, E) * 2).requires_grad_()
    got = router.route(logits)
    want = moekit.routing.base.TopKRouter.route(router, logits)
    assert torch.equal(got.topk_ids_TK, want.topk_ids_TK)
    assert max_err(got.topk_weights_TK, want.topk_weights_TK) < 1e-6
    assert max_err(got.probs_TE, want.probs_TE) < 1e-6
    gw, gp = torch.randn(T, k), torch.randn(T, E)

    def loss(r):
        return (r.topk_weights_TK * gw).sum() + ((r.probs_TE * gp).sum() if aux else 0.0)

    (d_got,) = torch.autograd.grad(loss(got), logits)
    (d_want,) = torch.autograd.grad(loss(want), logits)
    assert max_err(d_got, d_want) < 1e-6


@pytest.mark.parametrize("S,bins,k", [(0, 3, 1), (1, 1, 1), (5000, 9, 2), (65536, 65, 8)])
def test_sort_keys_is_torchs_stable_sort(kernels, S, bins, k):
    torch.manual_seed(S)
    key = torch.randint(0, bins, (S,))
    srt, order, tok, counts = K.sort_keys(key, bins, k)
    want = torch.sort(key, stable=True)
    assert torch.equal(srt, want.values) and torch.equal(order, want.indices)
    assert torch.equal(tok, want.indices // k)
    assert torch.equal(counts, torch.bincount(key, minlength=bins))
    with pytest.raises(ValueError, match="outside"):
        K.sort_keys(torch.tensor([0, bins]), bins, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(kernels, dtype):
    """Bit for bit the same on 1, 2 or 3 threads, with experts of very uneven rows (the input projection splits its
    items among the threads by cost, so a boundary can fall anywhere inside an expert) and an idle one; the layer is
    large enough for the kernels to use every thread they are given."""
    counts = [1, 0, 12, 2, 30, 3, 1]
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(7, 256, 128, counts, dtype, True)
    start, end = segments(counts)

    def run():
        _, a = K.small_experts_up(x, tok, start, end, w_in, b_in, True, False)
        out = torch.zeros(x.shape[0], 256)
        K.small_experts_down(a, tok, w, start, end, w_out, b_out, out)
        g = torch.zeros(w_in.shape)
        K.small_experts_outer(torch.randn(sum(counts), 256, generator=torch.Generator().manual_seed(0)), None, x, tok,
                              start, end, g)
        return a, out, g

    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            results.append(run())
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_are_refused_with_the_reason(kernels):
    h = torch.randn(4, 8)
    with pytest.raises(ValueError, match="even width"):
        K.swiglu(torch.randn(4, 7))
    with pytest.raises(ValueError, match="outside"):
        K.gather_rows(h, torch.tensor([0, 4]), torch.float32, torch.ones(2))
    with pytest.raises(ValueError, match="must be float32"):
        K.scatter_add_rows(torch.zeros(4, 8, dtype=torch.float64), torch.tensor([0]), torch.randn(1, 8))
    with pytest.raises(ValueError, match="ga must be"):
        K.swiglu_backward(h, torch.randn(4, 3), torch.ones(4))
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(3, 37, 21, [2, 0, 5], torch.float32, False)
    start, end = segments([2, 0, 5])
    with pytest.raises(ValueError, match="w_in must be a contiguous"):
        K.small_experts_up(x, tok, start, end, w_in.bfloat16(), None, True, False)
    with pytest.raises(ValueError, match="segments must satisfy"):
        K.small_experts_up(x, tok, end, start, w_in, None, True, False)
    with pytest.raises(ValueError, match="contiguous, non-overlapping rows"):
        K.small_experts_up(x.T.contiguous().T, tok, start, end, w_in, None, True, False)


# ---------------------------------------------------------------------------------- PyTorch fallback
@pytest.mark.parametrize("dtype", DTYPES)
def test_fallback_equals_kernels(kernels, monkeypatch, dtype):
    h, ga, w = (torch.randn(6, 42) * 2).to(dtype), torch.randn(6, 21).to(dtype), torch.rand(6)
    out, idx, y = torch.randn(8, 21), torch.tensor([5, 1, 7]), torch.randn(3, 21).to(dtype)
    c = (K.swiglu(h), *K.swiglu_backward(h, ga, w), K.gather_rows(h, idx % 6, torch.float32, w[:3]))
    out_c = out.clone()
    K.scatter_add_rows(out_c, idx, y, w[:3])
    with monkeypatch.context() as m:  # (undone here, before the kernels fixture forgets this test's library)
        m.setattr(K, "_LIB", None)
        m.setattr(K, "_TRIED", True)
        p = (K.swiglu(h), *K.swiglu_backward(h, ga, w), K.gather_rows(h, idx % 6, torch.float32, w[:3]))
        out_p = out.clone()
        K.scatter_add_rows(out_p, idx, y, w[:3])
    for a, b in zip(c, p):
        assert rel_err(a, b) < TOL[dtype]
    assert max_err(out_c, out_p) < 1e-6


# ------------------------------------------------------------------------------------ the fused layer
def _layer(dtype, bias=False, **kw):
    torch.manual_seed(3)
    layer = moekit.MoE(48, 40, 6, 2, backend="fused", expert_bias=bias, **kw).to(dtype)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "bias" in n:
                p.uniform_(-0.1, 0.1)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 5, 40, 300])  # all experts small ... all large, and mixed in between
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_backend_matches_loop(dtype, T, activation, bias):
    x = torch.randn(T, 48).to(dtype)
    got = run_fwd_bwd(_layer(dtype, bias, activation=activation), x)
    ref_layer = _layer(dtype, bias, activation=activation)
    ref_layer.experts.backend = "loop"
    ref = run_fwd_bwd(ref_layer, x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_fwd_bwd_close(got, ref, tol, tol if dtype == torch.float32 else 4e-2, err=rel_err)


@needs_amx
@pytest.mark.parametrize("T", [3, 40, 300])  # the AVX-512 tiles (< 4 rows per expert), mixed, all on the tiles
@pytest.mark.parametrize("bias", [False, True])
def test_fused_backend_on_amx_tiles_matches_loop(T, bias):
    """A bf16 layer whose shapes the AMX kernels take (d_model and d_ff multiples of 32): forward, input and every
    weight gradient against the loop backend; in eval mode too (the decode kernel, tiles from 4 rows per expert)."""
    def make():
        torch.manual_seed(5)
        layer = moekit.MoE(64, 96, 6, 2, backend="fused", expert_bias=bias).to(torch.bfloat16)
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if "bias" in n:
                    p.uniform_(-0.1, 0.1)
        return layer
    x = torch.randn(T, 64).bfloat16()
    ref_layer = make()
    ref_layer.experts.backend = "loop"
    assert_fwd_bwd_close(run_fwd_bwd(make(), x), run_fwd_bwd(ref_layer, x), 2e-2, 4e-2, err=rel_err)
    with torch.no_grad():
        got, want = make().eval()(x), ref_layer.eval()(x)
    assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("mode", ["never", "mixed", "always", "forward_only", "packed", "packed_bwd"])
def test_fused_paths_agree(monkeypatch, mode):
    """Forward and backward the same whichever experts run in the small-M kernels (packed: every forward in the
    packed tiles, where the build has them, and every backward with the library; packed_bwd: backward in the
    kernels too)."""
    x = torch.randn(60, 48)
    ref_layer = _layer(torch.float32)
    ref_layer.experts.backend = "loop"
    want = run_fwd_bwd(ref_layer, x)
    counts = sorted(torch.bincount(_layer(torch.float32).router(x).topk_ids_TK.flatten(), minlength=6).tolist())
    small_m = {"never": 0, "mixed": counts[len(counts) // 2], "always": 10_000, "forward_only": 10_000,
               "packed": 0, "packed_bwd": 0}[mode]
    assert mode != "mixed" or counts[0] <= small_m < counts[-1]
    monkeypatch.setattr(ff, "SMALL_M", small_m)
    monkeypatch.setattr(ff, "SMALL_FWD_WORK", 0)
    monkeypatch.setattr(ff, "PACKED_MAX_ROWS", 10_000 if mode.startswith("packed") else 0)
    monkeypatch.setattr(ff, "PACKED_BWD_MAX_ROWS", 10_000 if mode == "packed_bwd" else 0)
    monkeypatch.setattr(ff, "PACKED_AVX512_BWD_MAX_ROWS", 10_000 if mode == "packed_bwd" else 0)
    monkeypatch.setattr(ff, "PACKED_AVX512_MAX_WORK", 10**12)
    for name in ("PACKED_MIN_ROWS", "PACKED_NN_MIN_ROWS", "PACKED_MIN_ROWS_AVX512", "PACKED_NN_MIN_ROWS_AVX512"):
        monkeypatch.setattr(K, name, 1)
    monkeypatch.setattr(ff, "SMALL_BWD_WORK", 0 if mode == "forward_only" else 10**12)
    got = run_fwd_bwd(_layer(torch.float32), x)
    assert_fwd_bwd_close(got, want, 1e-5)


@pytest.mark.parametrize("rows", [10_000, 70, 1])
def test_chunks_agree(monkeypatch, rows):
    """Small experts run in chunks of at most CHUNK_ROWS rows (an expert larger than the limit makes a chunk alone):
    forward, inference and backward the same however the experts are split."""
    x = torch.randn(150, 48)  # 300 rows over 6 experts
    monkeypatch.setattr(moekit.layer, "DECODE_KERNEL_MAX_SLOTS", 256)  # inference of 300 slots: not the decode path
    ref_layer = _layer(torch.float32)
    ref_layer.experts.backend = "loop"
    want = run_fwd_bwd(ref_layer, x)
    monkeypatch.setattr(ff, "SMALL_M", 10_000)
    monkeypatch.setattr(ff, "CHUNK_ROWS", rows)
    chunks = []
    make = ff._Plan.make.__func__

    def counting_make(cls, *args, **kw):
        plan = make(cls, *args, **kw)
        chunks.append(plan.chunks)
        return plan

    monkeypatch.setattr(ff._Plan, "make", classmethod(counting_make))
    layer = _layer(torch.float32)
    got = run_fwd_bwd(layer, x)
    layer.eval()
    with torch.no_grad():
        inferred = layer(x)
    assert [len(c) == 1 for c in chunks] == [rows >= 300] * 2
    assert all(c.r1 - c.r0 <= rows or len(c.segs) == 1 for cs in chunks for c in cs)
    assert max_err(inferred, want[0]) < 1e-5
    assert_fwd_bwd_close(got, want, 1e-5)


def test_chunks_do_not_raise_the_peak(monkeypatch):
    """Backward frees each chunk's pre-activation gradient before the next chunk's temporaries: a step split into a
    chunk per expert holds no more memory at its peak than one with every expert in one chunk (it held one more
    chunk's [rows, d_ff] buffer when the last reference lived until the next chunk)."""
    from moekit.benchmark import peak_alloc_mb

    torch.manual_seed(0)
    layer = moekit.MoE(64, 96, 8, 2)
    x = torch.randn(512, 64)
    monkeypatch.setattr(ff, "SMALL_M", 10_000)

    def step():
        xx = x.clone().requires_grad_()
        layer(xx).sum().backward()
        layer.zero_grad(set_to_none=True)

    peaks = {}
    for rows in (10_000, 1):
        monkeypatch.setattr(ff, "CHUNK_ROWS", rows)
        peaks[rows] = peak_alloc_mb(step)
    # (allowing 16 KiB for the chunks' own row bounds: one chunk's [rows, d_ff] buffer is ~96 KiB here)
    assert peaks[1] is not None and peaks[1] <= peaks[10_000] + 16 / 1024, peaks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_library_experts_run_on_padded_rows(monkeypatch, dtype, bias):
    """Experts on library GEMMs get their rows padded to a multiple of PAD_ROWS (oneDNN is slower on other row
    counts); the padding rows change nothing, forward or backward, router weights and biases included."""
    x = torch.randn(61, 48).to(dtype)
    ref_layer = _layer(dtype, bias, activation="gelu")
    ref_layer.experts.backend = "loop"
    want = run_fwd_bwd(ref_layer, x)
    monkeypatch.setattr(ff, "SMALL_M", 0)
    monkeypatch.setattr(ff, "SMALL_FWD_WORK", 0)
    monkeypatch.setattr(ff, "PACKED_MAX_ROWS", 0)
    rows = []

    def linear(a, w, b=None):
        rows.append(a.shape[0])
        return cpu_gemm.linear(a, w, b)

    monkeypatch.setattr(ff, "linear", linear)
    got = run_fwd_bwd(_layer(dtype, bias, activation="gelu"), x)
    assert rows and all(r % ff.PAD_ROWS == 0 for r in rows)
    counts = torch.bincount(ref_layer.router(x).topk_ids_TK.flatten(), minlength=6)
    assert any(c % ff.PAD_ROWS for c in counts.tolist())  # some expert really was padded
    assert_fwd_bwd_close(got, want, 1e-5 if dtype == torch.float32 else 4e-2, err=rel_err)


@pytest.mark.parametrize("outer_max_rows", [4096, 8])
def test_library_backward_takes_bf16_weight_gradients_from_the_outer_kernel_on_amx(monkeypatch, outer_max_rows):
    """Experts on library GEMMs (forward and backward) take their bf16 weight gradients from the outer-product
    kernel where it runs on AMX tiles and they have at most AMX_OUTER_MAX_ROWS rows (reading the input's rows in
    place), from the library beyond (or without AMX): the loop reference's forward and gradients either way."""
    torch.manual_seed(5)
    layer = moekit.MoE(64, 96, 4, 2, backend="fused").bfloat16()
    ref_layer = moekit.MoE(64, 96, 4, 2, backend="loop").bfloat16()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(50, 64).bfloat16()
    want = run_fwd_bwd(ref_layer, x)
    for name, value in (("SMALL_M", 0), ("SMALL_FWD_WORK", 0), ("PACKED_MAX_ROWS", 0), ("AMX_MAX_WORK", 0),
                        ("AMX_OUTER_MAX_ROWS", outer_max_rows)):
        monkeypatch.setattr(ff, name, value)
    calls = []
    outer = K.small_experts_outer

    def spy(a, a_idx, b, b_idx, start, end, grad):
        calls.append((a.shape[0], b_idx is not None))
        return outer(a, a_idx, b, b_idx, start, end, grad)

    monkeypatch.setattr(K, "small_experts_outer", spy)
    got = run_fwd_bwd(layer, x)
    counts = torch.bincount(ref_layer.router(x).topk_ids_TK.flatten(), minlength=4).tolist()
    assert all(8 < c <= 4096 for c in counts)
    if K.amx() and outer_max_rows == 4096:  # dW_out from the gathered rows, dW_in reading x's rows in place
        assert sorted(calls) == sorted([(c, False) for c in counts] + [(c, True) for c in counts])
    else:
        assert calls == []
    assert_fwd_bwd_close(got, want, 2e-2, 4e-2, err=rel_err)


@pytest.mark.parametrize("fwd_max_d", [1024, 0])
@pytest.mark.parametrize("d_ff,bias", [(96, False), (64, True)])
def test_large_bf16_experts_on_amx_tiles_in_inference(monkeypatch, fwd_max_d, d_ff, bias):
    """bf16 SwiGLU experts too large for the tiles (AMX_MAX_WORK) run in the library in training, forward and
    backward, and on the tiles all the same in inference where d_model is at most AMX_FWD_MAX_D (the activation
    handed over packed): forward, gradients and inference as the loop reference's either way."""
    def make():
        torch.manual_seed(5)
        layer = moekit.MoE(64, d_ff, 4, 2, backend="fused", expert_bias=bias).bfloat16()
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if "bias" in n:
                    p.uniform_(-0.1, 0.1)
        return layer
    ref_layer = make()
    ref_layer.experts.backend = "loop"
    x = torch.randn(150, 64).bfloat16()  # 300 rows: inference too runs the full path, not the decode kernel
    want = run_fwd_bwd(ref_layer, x)
    for name, value in (("SMALL_M", 0), ("SMALL_FWD_WORK", 0), ("AMX_MAX_WORK", 0), ("AMX_FWD_MAX_D", fwd_max_d)):
        monkeypatch.setattr(ff, name, value)
    calls = {"up": [], "outer": []}
    up, outer = K.amx_up_packed, K.small_experts_outer

    def spy_up(x, tok, start, end, *args, **kwargs):
        calls["up"].append(sorted((end - start).tolist()))
        return up(x, tok, start, end, *args, **kwargs)

    def spy_outer(*args):  # the library path's weight gradients (on the tiles' outer-product kernel)
        calls["outer"].append(args[0].shape[0])
        return outer(*args)

    monkeypatch.setattr(K, "amx_up_packed", spy_up)
    monkeypatch.setattr(K, "small_experts_outer", spy_outer)
    got = run_fwd_bwd(make(), x)
    counts = torch.bincount(ref_layer.router(x).topk_ids_TK.flatten(), minlength=4).tolist()
    assert any(c % 16 for c in counts)  # a ragged last block of 16 rows
    if K.amx():
        assert calls["up"] == [] and len(calls["outer"]) == 2 * sum(c > 0 for c in counts)  # the library path's
    assert_fwd_bwd_close(got, want, 2e-2, 4e-2, err=rel_err)
    with torch.no_grad():
        assert rel_err(make().eval()(x), ref_layer.eval()(x)) < 2e-2
    if K.amx():
        assert sorted(r for rows in calls["up"] for r in rows if r) == (sorted(counts) if fwd_max_d else [])


def test_fused_backend_without_kernels_matches_loop(no_kernels):
    x = torch.randn(40, 48)
    got = run_fwd_bwd(_layer(torch.float32), x)
    ref_layer = _layer(torch.float32)
    ref_layer.experts.backend = "loop"
    ref = run_fwd_bwd(ref_layer, x)
    assert max_err(got[0], ref[0]) < 1e-5 and max_err(got[1], ref[1]) < 1e-5
    with torch.no_grad():
        assert max_err(_layer(torch.float32)(x[:2]), ref_layer(x[:2])) < 1e-5  # decode path too


# ------------------------------------------------------------------------------------ GEMM provider
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_gemm_is_exact_precision(dtype):
    a, w, b = torch.randn(33, 70).to(dtype), torch.randn(45, 70).to(dtype), torch.randn(45).to(dtype)
    want = a.double() @ w.double().T + b.double()
    assert rel_err(cpu_gemm.linear(a, w, b), want) < (2e-6 if dtype == torch.float32 else 1e-2)
    assert rel_err(cpu_gemm.linear(a, w.T.contiguous().T), a.double() @ w.double().T) < TOL[dtype]
    assert cpu_gemm.linear(a[:0], w).shape == (0, 45)  # no rows (oneDNN refuses empty problems)
    out = torch.empty(45, 33, dtype=dtype).T
    cpu_gemm.linear_into(out, a, w)
    assert rel_err(out, a.double() @ w.double().T) < TOL[dtype]


@pytest.mark.parametrize("small_macs", [None, 0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_into_chunks_and_dtypes(dtype, small_macs, monkeypatch):
    """Every route of ``linear_into``: torch.mm with ``out=``, oneDNN in row chunks (also when small problems would
    go to torch.mm: ``small_macs=0``), and an fp32 product written into a bf16 output a few rows at a time."""
    if small_macs is not None:
        monkeypatch.setattr(cpu_gemm, "SMALL_GEMM_MACS", small_macs)
    a, w = torch.randn(37, 70).to(dtype), torch.randn(45, 70).to(dtype)
    want = a.double() @ w.double().T
    for chunk in (cpu_gemm.INTO_CHUNK_BYTES, 45 * 4 * 5):  # one chunk; 5 rows at a time (the last one short)
        out = torch.full((37, 45), float("nan"), dtype=dtype)
        cpu_gemm.linear_into(out, a, w, chunk_bytes=chunk)
        assert rel_err(out, want) < TOL[dtype]
        mixed = torch.full((37, 45), float("nan"), dtype=torch.bfloat16)  # computed in fp32, stored in bf16
        cpu_gemm.linear_into(mixed, a.float(), w.float(), chunk_bytes=chunk)
        assert rel_err(mixed, want) < 1e-2


@pytest.mark.parametrize("chunk", [None, 100, 1])
def test_matmul_cast_converts_the_weight_in_blocks(chunk, monkeypatch):
    """a @ w with a bf16 w computed in fp32, its rows converted a block at a time (blocks of 5, 1, or all 37
    rows): the fp32 product of the bf16 values; with w already fp32, the plain product."""
    a, w = torch.randn(9, 37), torch.randn(37, 5).bfloat16()
    cpu_gemm.provider(torch.float32)  # (measured once, with conversions of its own)
    converted = []
    real = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *args, **kw: (t.dtype == torch.bfloat16 and converted.append(
        t.shape[0])) or real(t, *args, **kw))
    got = cpu_gemm.matmul_cast(a, w, torch.float32, chunk)
    monkeypatch.undo()
    assert got.dtype == torch.float32 and rel_err(got, a.double() @ w.double()) < 1e-6
    assert max(converted) == {None: 37, 100: 5, 1: 1}[chunk] and sum(converted) == 37
    w32 = w.float()
    assert torch.equal(cpu_gemm.matmul_cast(a, w32, torch.float32, 1), a @ w32)


@pytest.mark.parametrize("upcast", ["0", "1"])
def test_bf16_layer_computed_in_fp32_matches_loop_and_holds_no_fp32_weights(upcast, monkeypatch):
    """A bf16 layer whose experts compute in fp32 (MOEKIT_CPU_BF16_UPCAST=1; CPUs with a slow bf16 GEMM) or in
    bf16: forward and backward match the loop reference. Computed in fp32, backward converts the weights a block at
    a time and keeps each expert's dH in bf16 for the input projection's weight gradient, which comes last: its
    peak memory then holds no fp32 copy of a whole expert weight (blocks are made small here, so every conversion
    takes several)."""
    monkeypatch.setenv("MOEKIT_CPU_BF16_UPCAST", upcast)
    monkeypatch.setattr(cpu_gemm, "CAST_CHUNK_BYTES", 1024)
    x = torch.randn(400, 48).bfloat16()
    layer = _layer(torch.bfloat16, True)
    assert ff.fused_compute_dtype(x, layer.experts.w_in, [133] * 6) == (torch.float32 if upcast == "1" else torch.bfloat16)
    got = run_fwd_bwd(layer, x)
    ref_layer = _layer(torch.bfloat16, True)
    ref_layer.experts.backend = "loop"
    ref = run_fwd_bwd(ref_layer, x)
    assert_fwd_bwd_close(got, ref, 2e-2, 4e-2, err=rel_err)
    # backward converts no whole expert weight (shapes [80, 48] and [48, 40]) to fp32, only blocks of its rows
    converted = []
    real = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *args, **kw: converted.append(tuple(t.shape)) or real(
        t, *args, **kw))
    out = layer(x.requires_grad_(True))
    converted.clear()
    out.float().sum().backward()
    monkeypatch.undo()
    if upcast == "1":
        blocks = [s for s in converted if s[1:] in ((48,), (40,)) and s[0] < 80]
        assert blocks and (80, 48) not in converted and (48, 40) not in converted


@pytest.mark.parametrize("tokens", [300, 5, 1])
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_linear_autograd_bf16_weight_fp32_compute(tokens, x_dtype, monkeypatch):
    """A bf16 router computed in fp32: the gradients come back in the operands' dtypes, equal to the rounded fp32
    products. With fewer tokens than experts (decode-size training) backward runs the C kernels, which read the
    bf16 weight as it is: no fp32 copy of the weight or of the weight gradient (they would make the step's peak
    memory exceed a bf16 model's)."""
    x = torch.randn(tokens, 64).to(x_dtype).requires_grad_(True)
    w = torch.randn(24, 64).bfloat16().requires_grad_(True)
    g = torch.randn(tokens, 24)
    out = cpu_gemm.linear_autograd(x, w, None, torch.float32)
    assert out.dtype == torch.float32
    called = []
    real = K._call
    monkeypatch.setattr(K, "_call", lambda fn, *args: called.append(fn.__name__) or real(fn, *args))
    dx, dw = torch.autograd.grad(out, [x, w], g)
    assert dw.dtype == torch.bfloat16 and dx.dtype == x_dtype
    assert rel_err(dw, g.double().T @ x.double()) < 1e-2 and rel_err(dx, g.double() @ w.double()) < 1e-2
    kernels = K.library() is not None and tokens < 24
    assert ({"moe_small_nn", "moe_small_outer"} <= set(called)) == kernels


def test_small_fp32_gemms_skip_onednn(monkeypatch):
    """A tiny fp32 product (a router's logits for one token) goes to torch's GEMM, whose call costs a quarter of
    oneDNN's; a large one to the provider."""
    monkeypatch.setattr(cpu_gemm, "_PROVIDER", {torch.float32: "onednn", torch.bfloat16: "onednn"})
    small, big = torch.randn(1, 512), torch.randn(256, 512)
    w = torch.randn(64, 512)
    assert not cpu_gemm._use_onednn(small, w)
    assert cpu_gemm._use_onednn(big, torch.randn(1024, 512)) == (cpu_gemm._LP is not None)
    assert cpu_gemm._use_onednn(small.bfloat16(), w.bfloat16()) == (cpu_gemm._LP is not None)  # bf16: always


@pytest.mark.parametrize("wgrad", ["onednn", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_into_weight_gradient_takes_its_own_provider(dtype, wgrad, monkeypatch):
    """A weight-gradient product (``a`` a transposed view) goes to ``wgrad_provider``'s library while other
    products stay with the forward's provider (oneDNN here), each into ``out`` with the exact product."""
    if cpu_gemm._LP is None:
        pytest.skip("no oneDNN linear in this torch build")
    if not cpu_gemm._onednn_works(dtype):
        pytest.skip(f"oneDNN's linear does not run {dtype} on this CPU")
    monkeypatch.setattr(cpu_gemm, "_PROVIDER", {torch.float32: "onednn", torch.bfloat16: "onednn"})
    monkeypatch.setattr(cpu_gemm, "_WGRAD_PROVIDER", {dtype: wgrad})
    calls = []
    real_lp = cpu_gemm._LP
    monkeypatch.setattr(cpu_gemm, "_LP", lambda *a: calls.append(a[0].shape) or real_lp(*a))
    g, x = torch.randn(600, 64).to(dtype), torch.randn(600, 48).to(dtype)  # rows of one expert (> SMALL_GEMM_MACS)
    out = torch.full((64, 48), float("nan"), dtype=dtype)
    cpu_gemm.linear_into(out, g.T, x.T)  # out = g^T x
    assert rel_err(out, g.double().T @ x.double()) < TOL[dtype]
    assert bool(calls) == (wgrad == "onednn" and dtype == torch.float32)  # (bf16 runs in torch.mm's oneDNN)
    calls.clear()
    out2 = torch.full((64, 48), float("nan"), dtype=dtype)
    cpu_gemm.linear_into(out2, g.T.contiguous(), x.T.contiguous())  # the same product, a contiguous left operand
    assert rel_err(out2, g.double().T @ x.double()) < TOL[dtype]
    assert bool(calls) == (dtype == torch.float32)
    assert cpu_gemm.wgrad_provider(dtype) == wgrad


def test_cpu_gemm_provider_choice(monkeypatch):
    assert cpu_gemm.provider(torch.float32) in ("onednn", "torch")
    assert cpu_gemm.provider(torch.float64) == "torch"
    monkeypatch.setattr(cpu_gemm, "_PROVIDER", {})
    monkeypatch.setenv("MOEKIT_CPU_GEMM", "fastest")
    with pytest.raises(ValueError, match="MOEKIT_CPU_GEMM must be"):
        cpu_gemm.provider(torch.float32)
    monkeypatch.setenv("MOEKIT_CPU_GEMM", "torch")
    assert cpu_gemm.provider(torch.float32) == "torch"


@pytest.mark.parametrize("drift", ["swing", "slow_start"])
@pytest.mark.parametrize("onednn_cost,mm_cost,want", [(1.0, 1.25, "onednn"), (1.0, 1.05, "torch"),
                                                       (1.0, 0.8, "torch")])
def test_provider_probe_pairs_its_timings(monkeypatch, drift, onednn_cost, mm_cost, want):
    """The provider probe decides on the two libraries' timings taken side by side, round by round: on a machine
    whose speed swings 4x from one round to the next, or that runs 4x slower for the first 6 calls (timing one
    library's runs and then the other's would then see oneDNN slow and pick MKL), it still picks oneDNN exactly where
    it is over 1.1x faster."""
    clock, calls = [0.0], [0]
    monkeypatch.setattr(cpu_gemm.time, "perf_counter", lambda: clock[0])

    def call(cost):
        def fn():  # (the warm-up pair and each round's two calls at one speed)
            slow = (calls[0] // 2) % 2 if drift == "swing" else calls[0] < 6
            clock[0] += cost * (4.0 if slow else 1.0)
            calls[0] += 1
        return fn

    assert cpu_gemm._faster(call(onednn_cost), call(mm_cost)) == want
    assert calls[0] == 2 + 2 * cpu_gemm.PROBE_ROUNDS


@pytest.mark.parametrize("bias", [False, True])
def test_linear_autograd_matches_pytorch(bias):
    x = torch.randn(9, 13, requires_grad=True)
    w = torch.randn(7, 13, requires_grad=True)
    b = torch.randn(7, requires_grad=True) if bias else None
    g = torch.randn(9, 7)
    got = torch.autograd.grad(cpu_gemm.linear_autograd(x, w, b), [x, w] + ([b] if bias else []), g)
    want = torch.autograd.grad(F.linear(x, w, b), [x, w] + ([b] if bias else []), g)
    for a, c in zip(got, want):
        assert max_err(a, c) < 1e-5


@pytest.mark.parametrize("d_model,d_ff,E,k,T,seed",
                         [(32, 64, 8, 2, 5, 0), (40, 24, 6, 2, 20, 3), (48, 40, 16, 4, 3, 1)])
def test_few_token_step_one_pass_gradients(kernels, d_model, d_ff, E, k, T, seed, monkeypatch):
    """fp32 on AVX-512: the experts of 1 to 6 rows take each projection's data and weight gradients in one pass
    over its weights (the others the separate kernels, idle ones zeros). Every gradient matches the two-pass
    kernels and the loop reference, with widths that are not multiples of 32, and the sums do not depend on the
    thread count."""
    kcpu = kernels
    monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 256)
    torch.manual_seed(seed)
    layer = moekit.MoE(d_model, d_ff, num_experts=E, top_k=k)
    loop = moekit.MoE(config=layer.config)
    loop.load_state_dict(layer.state_dict())
    loop.experts.backend = "loop"
    x = torch.randn(T, d_model)
    fused = []
    real = kcpu.route_train_backward
    def backward(*a, **kw):  # (records whether the one pass ran, which backward sets on what forward kept)
        res = real(*a, **kw)
        fused.append(a[4].fused)
        return res

    monkeypatch.setattr(kcpu, "route_train_backward", backward)
    runs = {}
    for name, one_pass, threads in (("one pass", True, None), ("two passes", False, None), ("1 thread", True, 1)):
        monkeypatch.setattr(kcpu, "TRAIN_FUSED", one_pass)
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            runs[name] = run_fwd_bwd(layer, x)
        finally:
            torch.set_num_threads(before)
    on = kcpu.packed_width(torch.float32) == 32  # (AVX-512 builds only; the others take two passes)
    assert fused == [on, False, on]
    rows = layer.stats["tokens_per_expert"]
    assert ((rows > 0) & (rows <= 6)).any()
    if d_ff == 24:  # (this case has experts of more than 6 rows too: the separate kernels beside the one pass)
        assert (rows > 6).any()
    if E == 16:
        assert (rows == 0).any()
    want = run_fwd_bwd(loop, x)
    for got in (runs["one pass"], runs["two passes"]):
        assert max_err(got[0], want[0]) < 1e-5 and max_err(got[1], want[1]) < 1e-5
        for n in want[2]:
            assert max_err(got[2][n], want[2][n]) < 1e-5, n
    one, single = runs["one pass"], runs["1 thread"]
    assert torch.equal(one[1], single[1]) and all(torch.equal(one[2][n], single[2][n]) for n in one[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_layer_runs_on_the_kernels_not_the_fallbacks(kernels, monkeypatch, dtype):
    """Small experts take the small-M kernels forward and backward, and the SwiGLU backward takes its kernel (a
    silent fallback to PyTorch ops would still be correct, only slow, so only this test would notice); the
    few-token training step takes its two kernel calls on this code path too, with the regular path's result."""
    called = []
    real = K._call
    monkeypatch.setattr(K, "_call", lambda fn, *args: called.append(fn.__name__) or real(fn, *args))
    layer = _layer(dtype)
    x = torch.randn(12, 48).to(dtype)
    want = run_fwd_bwd(layer, x)  # (the regular path: see _regular_training_path)
    assert {"moe_small_up", "moe_small_down", "moe_small_nn", "moe_small_outer", "moe_swiglu_bwd"} <= set(called)
    steps = []
    for name in ("route_train_forward", "route_train_backward"):
        monkeypatch.setattr(K, name, lambda *a, _real=getattr(K, name), _n=name, **kw: steps.append(_n) or _real(*a, **kw))
    monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 256)
    got = run_fwd_bwd(layer, x)
    assert steps == ["route_train_forward", "route_train_backward"]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_fwd_bwd_close(got, want, tol, err=rel_err)
    called.clear()
    with torch.no_grad():
        layer(torch.randn(2, 48).to(dtype))
    assert [c for c in called if c != "moe_router_logits"] == ["moe_small_decode"]  # (a bf16 router: its kernel)


# ------------------------------------------------------------------------------------------------ router top-k
@pytest.mark.parametrize("E,k", [(64, 8), (8, 2), (16, 16), (128, 1), (100, 64), (200, 10), (300, 64)])  # >128: scalar path
def test_topk_indices_matches_torch(E, k):
    torch.manual_seed(E + k)
    T = K.TOPK_MIN_SCORES // E + 7  # over the threshold, so the kernel runs where it is built
    scores = torch.randn(T, E).softmax(-1)
    scores[3, :] = float("-inf")  # a fully masked row would tie: falls back as a whole...
    scores[3, 5] = 0.0
    if k == 1:  # ...but with one finite value and k = 1 there is no tie
        assert torch.equal(K.topk_indices(scores, k), torch.topk(scores, k, dim=-1).indices)
    scores[3] = torch.rand(E)
    got = K.topk_indices(scores, k)
    assert got.dtype == torch.int64 and got.shape == (T, k)
    assert torch.equal(got, torch.topk(scores, k, dim=-1).indices)


def test_topk_indices_ties_and_nan_resolve_like_torch(monkeypatch):
    T, E = K.TOPK_MIN_SCORES // 64, 64
    calls = []
    real = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    scores = torch.randn(T, E)
    if K.library() is not None:
        K.topk_indices(scores, 8)
        assert not calls  # no ties: the kernel answered
    for bad in ("tie", "nan"):
        s = scores.clone()
        if bad == "tie":
            s[T // 2, :3] = 10.0  # three equal values among the top 8: order is PyTorch's to decide
        else:
            s[T - 1, 7] = float("nan")
        calls.clear()
        assert torch.equal(K.topk_indices(s, 8), real(s, 8, dim=-1).indices)
        assert calls  # the batch went to torch.topk
    # a tie below the k + 1 largest does not matter
    s = scores.clone()
    s[0, :] = torch.arange(E, dtype=torch.float32)
    s[0, :2] = -5.0
    calls.clear()
    assert torch.equal(K.topk_indices(s, 8), real(s, 8, dim=-1).indices)
    assert bool(calls) == (K.library() is None)


def test_topk_indices_small_or_other_dtypes_use_torch():
    s = torch.randn(4, 8)
    assert torch.equal(K.topk_indices(s, 3), torch.topk(s, 3, dim=-1).indices)
    b = torch.randn(1024, 64, dtype=torch.bfloat16)
    assert torch.equal(K.topk_indices(b, 4), torch.topk(b, 4, dim=-1).indices)


@pytest.mark.parametrize("where", ["cpu", "device"])
def test_linear_autograd_with_a_cast_keeps_no_cast_copy_for_backward(where, monkeypatch):
    """A bf16 router computed in fp32: backward needs the weight and the input, and gets the bf16 tensors
    themselves (cast again there), not fp32 copies held from forward to backward; on CPU with the CPU kernels, on a
    device (here: CPU tensors taken as a GPU's, ``on_cpu`` False) with PyTorch's GEMMs, from
    ``DEVICE_CAST_MIN_ELEMENTS`` input elements (fewer: PyTorch's own nodes, cheaper on the host)."""
    if where == "device":
        monkeypatch.setattr(cpu_gemm, "on_cpu", lambda t: False)
        monkeypatch.setattr(cpu_gemm, "DEVICE_CAST_MIN_ELEMENTS", 5 * 16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 16, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(4, 16, generator=g).bfloat16().requires_grad_(True)
    if where == "device":  # (one row fewer than the threshold: autograd's own linear)
        small = cpu_gemm.linear_autograd(x[:4], w, None, torch.float32)
        assert type(small.grad_fn).__name__ != "_LinearBackward"
    y = cpu_gemm.linear_autograd(x, w, None, torch.float32)
    assert y.dtype == torch.float32 and type(y.grad_fn).__name__ == "_LinearBackward"
    assert all(t is None or t.dtype == torch.bfloat16 for t in y.grad_fn.saved_tensors)  # (None: no bias)
    gy = torch.randn(5, 4, generator=g)
    y.backward(gy)
    xr, wr = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    torch.nn.functional.linear(xr, wr).backward(gy)
    assert torch.allclose(y.detach(), xr.detach() @ wr.detach().T, rtol=1e-5, atol=1e-5)
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert rel_err(x.grad, xr.grad) < 1e-2 and rel_err(w.grad, wr.grad) < 1e-2


def test_read_tensors_reads_every_word_of_every_tensor(kernels):
    """The weight-read floor's kernel: its checksum is the sum of all float32 words of the given tensors (so no
    read is skipped), however the threads split them; bad tensors get a clear error."""
    w = torch.randn(9, 331, 171)  # 3 x 56601 + 5 words: two threads' halves meet inside a tensor
    parts = [w[2], w[3], w[7], torch.randn(5)]
    want = sum(p.double().sum().item() for p in parts)
    for threads in (1, 2, 3):
        with num_threads(threads):
            assert abs(K.read_tensors(parts) - want) < 1e-2
    assert K.read_tensors([]) == 0.0
    b = torch.randn(64, 10).bfloat16()  # read as the float32 words its bytes make
    assert abs(K.read_tensors([b]) - b.view(torch.float32).double().sum().item()) < 1e-3
    with pytest.raises(ValueError, match="contiguous CPU float32/bfloat16"):
        K.read_tensors([w[:, 0]])


def test_flush_from_cache_keeps_the_data(kernels):
    """The cold benchmarks' eviction (clflush on every thread) writes back and keeps every byte, for any number of
    threads and ranges that start and end inside a cache line."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        assert K.flush_from_cache([torch.ones(4)]) is False
        return
    base = torch.randn(70_001)
    for threads in (1, 2, 3):
        with num_threads(threads):
            t = base.clone()
            t[3:-5].mul_(2.0)  # dirty lines, to be written back
            want = t.clone()
            assert K.flush_from_cache([t[3:-5], t[:1], torch.empty(0)]) is True
            assert torch.equal(t, want)




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,D,F_,counts", PACKED_CASES)
@pytest.mark.parametrize("swiglu", [True, False])
def test_packed_tiles_match_the_reference(kernels, dtype, E, D, F_, counts, swiglu):
    """Every expert through the packed tiles (packed_min_rows=1), forward of both projections, with biases."""
    if not K.packed_tiles(dtype):
        pytest.skip("this build has no packed tiles for these operands (AVX2: float32 and bf16; AVX-512: float32)")
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, counts, dtype, True)
    tol = TOL[dtype] * max(1.0, D / 512)  # fp32 sums of 2100 products round further than those of 530
    start, end = segments(counts)
    h, a = K.small_experts_up(x, tok, start, end, w_in, b_in, swiglu=swiglu, keep_h=True, packed_min_rows=1)
    act = a if swiglu else h  # the plain path projects to 2F columns, which w_out then takes as [D, F] below
    w_o = w_out if swiglu else torch.cat([w_out, w_out], 2).contiguous()
    out = torch.zeros(x.shape[0], D)
    K.small_experts_down(act, tok, w, start, end, w_o, b_out, out, packed_min_rows=1)
    want_out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for e in range(E):
        s, t = start[e].item(), end[e].item()
        if s == t:
            continue
        h_ref = x[tok[s:t]].double() @ w_in[e].double().T + b_in[e].double()
        assert rel_err(h[s:t], h_ref) < tol
        if swiglu:
            assert rel_err(a[s:t], F.silu(h_ref[:, :F_]) * h_ref[:, F_:]) < tol
        y = act[s:t].double() @ w_o[e].double().T + b_out[e].double()
        want_out.index_add_(0, tok[s:t], y * w[s:t, None].double())
    assert rel_err(out, want_out) < tol


HANDOVER_CASES = [  # (E, D, F, rows per expert): F a multiple of 8, experts above and below GK_APACK_MIN_ROWS
    (3, 40, 24, [300, 0, 257]),  # tiles of 5 and 6 rows
    (2, 530, 72, [520, 3]),  # d_model not a multiple of 8, three k blocks of the input projection
    (1, 2100, 16, [1100]),  # several blocks of rows, cut alike in both projections
    (2, 64, 48, [300, 130]),  # d_ff a multiple of 16 (AVX2: the input projection's panels pair, 6 of them: on 2
    # threads the second starts at an odd one, which writes alone), one expert packed and one not
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,D,F_,counts", HANDOVER_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_handed_over_activation_gives_the_same_bits(kernels, dtype, E, D, F_, counts, bias):
    """SwiGLU's activation handed from the input projection to the output projection in the packed tiles' layout
    gives the output of the activation passed as rows, bit for bit, on any thread count (and so the input
    projection's paired panels, which write two panels' rows at once, those of a panel alone); where the packed tiles
    take float32 rows packed (AVX2 builds), the activation really comes in that layout."""
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(E, D, F_, counts, dtype, bias)
    start, end = segments(counts)
    T = x.shape[0]
    results = {}
    for hand_over in (False, True):
        for threads in (1, 2, 3):
            with num_threads(threads):
                h, a = K.small_experts_up(x, tok, start, end, w_in, b_in, swiglu=True, keep_h=True,
                                          hand_over=hand_over)
                out = torch.zeros(T, D)
                K.small_experts_down(a, tok, w, start, end, w_out, b_out, out, handed_over=hand_over)
                results[hand_over, threads] = h, a, out
    h0, a0, out0 = results[False, 1]
    for (hand_over, _), (h, a, out) in results.items():
        assert torch.equal(out, out0) and torch.equal(h, h0)
        if not hand_over:
            assert torch.equal(a, a0)
    if K.packed_width(torch.float32) == 16 and dtype == torch.float32:  # rows of >= 256-row experts: packed
        assert not torch.equal(results[True, 1][1][:counts[0]], a0[:counts[0]])
    want = torch.zeros(T, D, dtype=torch.float64)
    for e in range(E):
        s, t = start[e].item(), end[e].item()
        if s < t:
            hr = x[tok[s:t]].double() @ w_in[e].double().T + (b_in[e].double() if bias else 0)
            y = (F.silu(hr[:, :F_]) * hr[:, F_:]) @ w_out[e].double().T + (b_out[e].double() if bias else 0)
            want.index_add_(0, tok[s:t], y * w[s:t, None].double())
    assert rel_err(out0, want) < TOL[dtype] * max(1.0, D / 512)


def test_handed_over_activation_must_be_the_returned_tensor(kernels):
    x, tok, w, w_in, w_out, _, _ = _small_problem(1, 40, 24, [300], torch.float32, False)
    start, end = segments([300])
    _, a = K.small_experts_up(x, tok, start, end, w_in, None, swiglu=True, keep_h=False, hand_over=True)
    strided = torch.empty(a.shape[0], 2 * a.shape[1])[:, :a.shape[1]]
    strided.copy_(a)
    with pytest.raises(ValueError, match="contiguous tensor it returned"):
        K.small_experts_down(strided, tok, w, start, end, w_out, None, torch.zeros(x.shape[0], 40), handed_over=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_tiles_same_bits_for_any_thread_count(kernels, dtype):
    """The packed tiles give the same bits on 1, 2 or 3 threads, in both projections and the data gradients (each
    output element is summed by one thread in the same order, whichever thread packs which tiles of rows), for
    experts above and below the packed-rows threshold, against float64 too."""
    if not K.packed_tiles(dtype):
        pytest.skip("this build has no packed tiles for these operands (AVX2: float32 and bf16; AVX-512: float32)")
    counts = [300, 0, 263, 40]
    x, tok, w, w_in, w_out, _, _ = _small_problem(4, 37, 53, counts, dtype, False)
    start, end = segments(counts)
    S, T = tok.shape[0], x.shape[0]
    dh = torch.randn(S, 106).to(dtype)
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            h, a = K.small_experts_up(x, tok, start, end, w_in, None, swiglu=True, keep_h=True, packed_min_rows=1)
            out = torch.zeros(T, 37)
            K.small_experts_down(a, tok, w, start, end, w_out, None, out, packed_min_rows=1)
            dx = torch.zeros(T, 37)
            K.small_experts_nn(dh, None, w_in, start, end, dx, tok, packed_min_rows=1)
            results.append((h, a, out, dx))
    for got in results[1:]:
        for t, want in zip(got, results[0]):
            assert torch.equal(t, want)
    h, _, _, dx = results[0]
    want_dx = torch.zeros(T, 37, dtype=torch.float64)
    for e in range(4):
        s, t = start[e].item(), end[e].item()
        if s < t:
            assert rel_err(h[s:t], x[tok[s:t]].double() @ w_in[e].double().T) < TOL[dtype]
            want_dx.index_add_(0, tok[s:t], dh[s:t].double() @ w_in[e].double())
    assert rel_err(dx, want_dx) < TOL[dtype]


def test_packed_and_dot_product_tiles_agree_in_one_call(kernels):
    """Experts split between the two kinds of tile by their rows give what either kind alone gives."""
    if not K.packed_tiles(torch.float32):
        pytest.skip("this build has no packed tiles for these operands (AVX2: float32 and bf16; AVX-512: float32)")
    x, tok, w, w_in, w_out, b_in, b_out = _small_problem(4, 64, 40, [3, 40, 0, 25], torch.float32, False)
    start, end = segments([3, 40, 0, 25])
    outs = []
    for packed_min in (0, 24, 1):
        _, a = K.small_experts_up(x, tok, start, end, w_in, None, True, False, packed_min_rows=packed_min)
        out = torch.zeros(x.shape[0], 64)
        K.small_experts_down(a, tok, w, start, end, w_out, None, out, packed_min_rows=packed_min)
        outs.append((a, out))
    for a, out in outs[1:]:
        torch.testing.assert_close(a, outs[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, outs[0][1], rtol=1e-5, atol=1e-6)


def test_bf16_rounding_of_denormal_and_special_results(kernels):
    """bf16 results round as PyTorch rounds, denormals included (the hardware conversion flushes them to zero, so
    vectors holding one take the integer rounding): gate 100 makes silu exactly 100 in both, so silu * up is the
    same float32 product; up spans denormal, normal, zero, infinite and NaN values."""
    up = torch.tensor([1e-40, -7e-41, 5e-41, 1.1e-40, 0.0, 2.5, float("inf"), float("nan")] * 8)
    up[::3] *= 0.37  # more mantissas
    h = torch.cat([torch.full_like(up, 100.0), up])[None].repeat(5, 1).bfloat16()
    h[1:, 64:] = h[1:, 64:] * 1e30  # rows of normal results only beside them
    got = K.swiglu(h)
    want = (F.silu(h[:, :64].float()) * h[:, 64:].float()).bfloat16()
    denormal = (want.float().abs() < torch.finfo(torch.float32).tiny) & (want.float() != 0)
    assert denormal[0].sum() >= 16  # (the case the hardware conversion would flush)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


#: Targets whose code paths this machine may not run (so its builds never compile them): AVX2 + FMA, AVX-512,
#: AVX512-BF16, AMX, plain x86-64.
CROSS_TARGETS = ["haswell", "skylake-avx512", "cooperlake", "sapphirerapids", "x86-64"]


@pytest.mark.parametrize("march", CROSS_TARGETS)
def test_kernel_source_compiles_cleanly_for_every_target(march):
    """The kernels' C source compiles without a warning for each instruction set it has paths for, including those
    this CPU lacks (checked by the compiler's front end, which needs no such CPU): a macro or function missing from one
    target's path would otherwise fail only when a machine of that kind first builds it."""
    cc = K._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    flags = [f for f in K.FLAGS if f not in ("-march=native", "-shared")]
    proc = subprocess.run([*cc.split(), *flags, f"-march={march}", "-Werror", "-fsyntax-only", str(K.SOURCE)],
                          capture_output=True, text=True, timeout=120)
    if "bad value" in proc.stderr or "unrecognized" in proc.stderr:
        pytest.skip(f"{cc} does not know -march={march}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kernel_parts_are_all_included_once_and_key_the_build(tmp_path, monkeypatch):
    """moe_cpu.c includes every part beside it exactly once (a part left out would be dead code; one included twice,
    a redefinition), and an edit to any part changes the cached build's key, so a stale library is never loaded."""
    root = K.SOURCE.read_text()
    included = re.findall(r'^#include "([^"]+)"$', root, flags=re.M)
    parts = sorted(p.name for p in K.SOURCE.parent.glob("*.h"))
    assert sorted(included) == parts and len(included) == len(set(included)) and len(parts) >= 10
    for p in parts:  # parts include nothing themselves: the order lives in one place
        assert not re.search(r'^#include "', (K.SOURCE.parent / p).read_text(), flags=re.M), p
    copy = tmp_path / "csrc"
    copy.mkdir()
    for p in K.SOURCE.parent.glob("*.[ch]"):
        (copy / p.name).write_text(p.read_text())
    monkeypatch.setattr(K, "SOURCE", copy / "moe_cpu.c")
    before = K._source_text()
    (copy / parts[-1]).write_text((copy / parts[-1]).read_text() + "\n")
    assert K._source_text() != before


def test_scratch_is_counted_and_released(kernels):
    """Every buffer the kernels allocate is counted (PyTorch never sees it; the benchmark adds it to PyTorch's peak)
    and freed before the call returns; ``reset_peak`` restarts the high-water mark from what is held now."""
    counts, Kd, N = [20, 0, 20], 96, 512  # few rows per expert: the threads' partial sums (40 x 512 floats) are
    start, end = segments(counts)  # allocated (AVX2 builds' nn_stream; other paths allocate their own buffers)
    g = torch.Generator().manual_seed(3)
    a, w = torch.randn(40, Kd, generator=g), torch.randn(3, Kd, N, generator=g)
    out = torch.empty(40, N)
    assert K.scratch_bytes(reset_peak=True)[0] == 0
    assert K.scratch_bytes() == (0, 0)
    K.small_experts_nn(a, None, w, start, end, out)
    held, peak = K.scratch_bytes(reset_peak=True)
    assert held == 0 and peak > 0
    if K.vector_isa() == "avx2" and K.isa() != "generic":  # (partials beyond the 16 KiB kept on the stack)
        assert peak >= 40 * N * 4
    assert K.scratch_bytes() == (0, 0)


def test_peak_memory_counts_the_kernels_scratch(kernels):
    """The benchmark's peak memory of a call that only runs a kernel is that kernel's scratch: PyTorch's profiler
    alone reads ~0 for it."""
    from moekit.benchmark import peak_alloc_mb

    counts, Kd, N = [20, 0, 20], 96, 512
    start, end = segments(counts)
    a, w, out = torch.randn(40, Kd), torch.randn(3, Kd, N), torch.empty(40, N)

    def step():
        K.small_experts_nn(a, None, w, start, end, out)

    step()
    K.scratch_bytes(reset_peak=True)
    step()
    scratch = K.scratch_bytes()[1]
    mb = peak_alloc_mb(step)
    assert scratch > 0 and mb is not None and mb * 2**20 >= scratch, (mb, scratch)
