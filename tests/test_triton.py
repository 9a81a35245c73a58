"""The ``triton`` experts backend against the ``loop`` reference, forward and backward (input, weight, bias and
router-weight gradients), fp32 / bf16 / fp16, with empty experts, empty slots, T = 0, odd dims and biases.

On CPU the kernels run under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before the
kernels are defined, and must not leak into the rest of the suite): one subprocess runs every case of
``tests/triton_cases.py`` and each case is then asserted here as its own test. On a CUDA machine, ``TestCUDA`` runs
the same cases (and larger ones) in-process on the GPU, plus checks that do not depend on speed. Without Triton these
tests skip; the fallback tests run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.dispatch.local import LocalDispatcher
from moekit.experts import BACKENDS, Experts, backends
from moekit.experts import triton_backend as tb
from moekit.routing.base import RouterOutput

from . import triton_cases as cases
from .helpers import max_err, run_fwd_bwd

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="Triton is not installed (it comes with moekit[test] on Linux x86_64/aarch64)")
HAS_CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ tolerances
def check_case(name: str, res: dict) -> None:
    """Assert one result of :func:`tests.triton_cases.run_case`."""
    assert "exception" not in res, f"{name}: {res['exception']}\n{res.get('traceback', '')}"
    if name.startswith("prepared"):  # the prepared inference call and the regular path: identical, step by step
        assert res["launches"] > 0, f"{name}: no Triton kernel was launched"
        assert res["prepared_calls"] == 8, f"{name}: the prepared call ran {res['prepared_calls']} times, not 8"
        for step, err in res["errors"].items():
            assert err == 0, f"{name}: {step}: the prepared call differs from the regular path by {err:.3g}"
        return
    if name != "zero_tokens":  # the kernels computed it, not a fallback
        assert res["launches"] > 0, f"{name}: no Triton kernel was launched"
    if "planless" in name:  # training and inference took the plan-free path: training routed by one top-k kernel
        # and indexed by one align kernel, inference (14 tokens) both in one
        got = (res["topk_launches"], res["align_launches"], res["route_align_launches"])
        assert got == (1, 1, 1), f"{name}: (top-k, align, route+align) launches {got}, expected (1, 1, 1)"
    elif "align_launches" in res:  # dropping or empty slots: the dispatcher's plan
        assert res["align_launches"] == res["route_align_launches"] == 0, \
            f"{name}: the plan-free path ran where slots can be empty or dropped"
    assert res["y_dtype"] == res["ref_y_dtype"]
    want_block_m = (cases.EXPERT_CASES.get(name.removesuffix("@bf16")) or {}).get("gpu_tiles")
    if want_block_m:  # the GPU's tiles, not the interpreter's 16-row ones
        assert max(res["block_m"]) == want_block_m, f"{name}: BLOCK_M {res['block_m']}, expected {want_block_m}"
    exact = res["dtype"] == "float32" and "autocast" not in name
    for key, err in res["errors"].items():
        scale = res["scales"][key]
        bound = 1e-5 * max(1.0, scale) if exact else 2e-2 * max(scale, 1e-3)
        assert err <= bound, f"{name}: {key} differs from the loop by {err:.3g} > {bound:.3g} (|ref| <= {scale:.3g})"
    for key, n in res.get("precast_mismatches", {}).items():
        assert n == 0, f"{name}: {key}: {n:g} entries differ between operands cast before the GEMMs and inside them"
    # 16-bit: no less accurate than the loop computing in the same dtype (both measured against an fp32 loop)
    for key, err in res.get("errors_vs_fp32", {}).items():
        loop_err, scale = res["loop_errors_vs_fp32"][key], res["scales"][key]
        bound = 1.5 * loop_err + 1e-3 * scale
        assert err <= bound, (f"{name}: {key} is {err:.3g} from fp32, the {res['dtype']} loop {loop_err:.3g} "
                              f"(bound {bound:.3g})")


# --------------------------------------------------------------------------------------- interpreter (CPU)
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.triton_cases", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the interpreter run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    res = json.loads(out.read_text())
    assert res["interpreting"], "TRITON_INTERPRET=1 did not switch the kernels to the interpreter"
    return res["cases"]


@needs_triton
@pytest.mark.parametrize("name", cases.all_case_names("cpu"))
def test_interpreter_matches_loop(interpreted, name):
    check_case(name, interpreted[name])


def test_check_case_rejects_wrong_results():
    """The tolerance check itself can fail: a gradient off by 1e-3 in fp32, or a bf16 result worse than the loop."""
    good = {"launches": 3, "dtype": "float32", "y_dtype": "torch.float32", "ref_y_dtype": "torch.float32",
            "errors": {"y": 1e-7, "x": 1e-3}, "scales": {"y": 1.0, "x": 1.0}}
    with pytest.raises(AssertionError, match="x differs"):
        check_case("swiglu", good)
    bf16 = {**good, "dtype": "bfloat16", "errors": {"y": 1e-3, "x": 1e-3},
            "errors_vs_fp32": {"y": 1e-2, "x": 1e-3}, "loop_errors_vs_fp32": {"y": 2e-3, "x": 1e-3}}
    with pytest.raises(AssertionError, match="y is"):
        check_case("swiglu@bf16", bf16)
    with pytest.raises(AssertionError, match="no Triton kernel"):
        check_case("swiglu", {**good, "launches": 0})


# ------------------------------------------------------------------------------------- selection / fallback
def _layer(backend: str, **kw):
    torch.manual_seed(1)
    return moekit.MoE(16, 24, num_experts=4, top_k=2, backend=backend, **kw)


def test_registered():
    assert "triton" in BACKENDS
    assert moekit.MoEConfig(16, 24, 4, 2, backend="triton").backend == "triton"


def test_cpu_without_interpreter_falls_back_to_fused(monkeypatch, caplog):
    if tb.interpreting():
        pytest.skip("this process runs Triton under the interpreter, so the kernels run on CPU instead")
    monkeypatch.setattr(tb, "_WARNED", set())
    monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 0)  # the fused backend's path, not the few-token step
    launches_before = cases._launches()
    x = torch.randn(11, 16)
    with caplog.at_level(logging.WARNING, logger=tb.__name__):
        got = run_fwd_bwd(_layer("triton"), x)
        run_fwd_bwd(_layer("triton"), x)
    ref = run_fwd_bwd(_layer("fused"), x)
    warnings = [r for r in caplog.records if "'triton' experts backend cannot run here" in r.getMessage()]
    assert len(warnings) == 1 and "'fused'" in warnings[0].getMessage()  # once, naming the replacement
    assert cases._launches() == launches_before
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    for k in ref[2]:
        assert torch.equal(got[2][k], ref[2][k]), k


def test_prepared_triton_call_only_where_triton_runs():
    """The layer's prepared Triton call (:meth:`moekit.MoE._triton_prepared`) is built only where the kernels run:
    not for ``auto`` on CPU, not for ``triton`` on CPU without the interpreter (the regular path warns and falls
    back there), not for a router with input jitter in training mode; its inference is never run in training
    mode."""
    x = torch.randn(5, 16)
    for backend in ("auto", "triton"):
        for train in (False, True):
            layer = _layer(backend).train(train)
            assert (layer._prepare_triton() is not None) == (backend == "triton" and tb.interpreting())
    jittery = _layer("triton", router_kwargs=dict(jitter=0.1))
    assert jittery.train()._prepare_triton() is None
    with torch.no_grad():
        assert _layer("auto").eval()._triton_inference(x) is None
        assert _layer("triton").train()._triton_inference(x) is None


def test_without_triton_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(tb, "_AVAILABLE", False)
    monkeypatch.setattr(tb, "_WARNED", set())
    assert tb.triton_usable(torch.device("cuda"), torch.float32) == "Triton is not installed"
    x = torch.randn(5, 16)
    with caplog.at_level(logging.WARNING, logger=tb.__name__):
        y = _layer("triton")(x)
    assert "Triton is not installed" in caplog.text
    assert max_err(y, _layer("loop")(x)) < 1e-5


def test_usable_reasons():
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    assert "float64" in tb.triton_usable(torch.device("cuda"), torch.float64)
    assert tb.triton_usable(torch.device("cuda"), torch.bfloat16) is None
    if not tb.interpreting():
        assert "TRITON_INTERPRET" in tb.triton_usable(torch.device("cpu"), torch.float32)


def test_auto_on_cpu_stays_fused(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("auto chose triton on CPU")

    calls = []
    real_fused = backends.fused_backend
    monkeypatch.setattr(backends, "triton_backend", boom)
    monkeypatch.setattr(backends, "fused_backend", lambda *a: calls.append(1) or real_fused(*a))
    monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 0)  # the backends' path, not the few-token step
    x = torch.randn(6, 16)
    y = _layer("auto")(x)
    assert calls and max_err(y, _layer("loop")(x)) < 1e-5


@needs_triton
@pytest.mark.parametrize("seed", range(6))
def test_tile_schedule_covers_every_row_once(seed):
    from moekit.kernels.triton_moe import tile_schedule

    g = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 9, (), generator=g))
    counts = torch.randint(0, 40, (E,), generator=g) * (torch.rand(E, generator=g) > 0.3)
    S = int(counts.sum()) + int(torch.randint(0, 5, (), generator=g))  # plus some empty slots at the end
    block_m = [16, 32, 64][seed % 3]
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    tile_expert, tile_row, num_tiles = tile_schedule(counts, offsets, S, block_m)
    assert tile_expert.shape == tile_row.shape == (num_tiles,)
    seen = torch.zeros(S, dtype=torch.int64)
    for e, r in zip(tile_expert.tolist(), tile_row.tolist()):
        if e < 0:
            continue
        end = int(offsets[e])
        start = end - int(counts[e])
        assert start <= r < end, (e, r, start, end)  # a tile starts inside its expert's segment
        seen[r:min(r + block_m, end)] += 1
    assert torch.equal(seen[:int(counts.sum())], torch.ones(int(counts.sum()), dtype=torch.int64))
    assert (tile_expert >= 0).sum() == ((counts + block_m - 1) // block_m).sum()


# ---------------------------------------------------------------------------------------------------- CUDA
@needs_triton
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
class TestCUDA:
    @pytest.mark.parametrize("name", cases.all_case_names("cuda"))
    def test_matches_loop(self, name):
        check_case(name, cases.run_case(name, "cuda"))

    def test_auto_picks_triton(self):
        x = torch.randn(7, 16, device="cuda")
        before = cases._launches()
        y = _layer("auto").cuda()(x)
        assert cases._launches() > before
        assert max_err(y, _layer("loop").cuda()(x)) < 1e-5

    def test_deterministic(self):
        x = torch.randn(64, 16, device="cuda")
        a = run_fwd_bwd(_layer("triton").cuda(), x)
        b = run_fwd_bwd(_layer("triton").cuda(), x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for k in a[2]:
            assert torch.equal(a[2][k], b[2][k]), k

    def test_no_host_sync(self):
        spec = dict(E=8, K=2, T=33, D=32, F=48)
        torch.manual_seed(0)
        ex = Experts(8, 32, 48, backend="triton").cuda()
        ids, weights, _ = cases._routing(spec, "cuda")
        weights.requires_grad_(True)
        logits = torch.zeros(33, 8, device="cuda")
        plan = LocalDispatcher(8).plan(RouterOutput(logits, logits, ids, weights))
        x = torch.randn(33, 32, device="cuda", requires_grad=True)
        ex(x, plan)  # compile the kernels first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ex(x, plan).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def test_tf32_follows_torch(self, monkeypatch):
        from moekit.kernels import triton_moe

        assert triton_moe.dot_precision(torch.float32) == ("ieee", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
        assert triton_moe.dot_precision(torch.float32) == ("tf32", False)


# ------------------------------------------------------------------------------- GPU compile without a GPU
def _captured_launches(monkeypatch, dtype: torch.dtype, backward: bool, T: int = 40, D: int = 64, F: int = 96,
                       E: int = 8, bias: bool = True) -> list:
    """The exact kernel launches (kernel, args, kwargs) of one forward of the backend over ``T`` tokens (``E``
    experts, top-2), in inference or with backward (training), recorded instead of run: CPU tensors stand in for GPU
    ones (their dtypes and alignment are what the compiler sees). The output and its gradient in ``dtype``,
    contiguous, as a layer's are."""
    from moekit.kernels import triton_moe

    calls = []
    monkeypatch.setattr(triton_moe, "_launch", lambda kernel, grid, *a, **k: calls.append((kernel, a, k)))
    torch.manual_seed(0)
    ex = Experts(E, D, F, bias=bias).to(dtype)
    ids, weights, _ = cases._routing(dict(E=E, K=2, T=T), "cpu")
    weights.requires_grad_(backward)
    logits = torch.zeros(T, E)
    plan = LocalDispatcher(E).plan(RouterOutput(logits, logits, ids, weights))
    x = torch.randn(T, D, dtype=dtype, requires_grad=backward)
    args = (x, ex.w_in, ex.w_out, ex.b_in, ex.b_out, plan.weights_TK)
    with torch.set_grad_enabled(backward):
        if backward:
            y = tb.TritonExpertsFunction.apply(*args, tb._Index.from_plan(plan), ex.activation, dtype, dtype)
            y.backward(torch.randn_like(y))
        else:  # (inference: the forward alone, keeping no pre-activations, as a layer runs it)
            tb._run(ex, x, plan.weights_TK, tb._Index.from_plan(plan), dtype, dtype)
    return calls


def _captured_layer_inference_launches(monkeypatch) -> list:
    """The launches of one bf16 inference forward of a softmax top-k layer on the plan-free path (top-k routing
    and align kernels, then the experts'), recorded instead of run."""
    from moekit.kernels import triton_moe

    calls = []
    monkeypatch.setattr(triton_moe, "_launch", lambda kernel, grid, *a, **k: calls.append((kernel, a, k)))
    monkeypatch.setattr(tb, "triton_usable", lambda device, dtype: None)
    layer = moekit.MoE(64, 96, num_experts=8, top_k=2, backend="triton").to(torch.bfloat16).eval()
    with torch.no_grad():
        layer(torch.randn(40, 64, dtype=torch.bfloat16))
    return calls


@needs_triton
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_sm90(monkeypatch):
    """Compile every kernel variant of bf16 and fp32 forwards + backwards (16-row tiles, and the 1- and 2-row tiles of
    few rows per expert multiplied on the CUDA cores) for an H100 (sm_90) without a GPU,
    specialised as their launches would be, through Triton's own compiler and the bundled ptxas: catches what the
    interpreter lets through (types, shapes of tl.dot, shared-memory and register limits)."""
    if tb.interpreting():
        pytest.skip("the kernels are interpreted in this process")
    from moekit.kernels.triton_aot import compile_launch, sass_stats

    from moekit.kernels import triton_moe

    launches = _captured_launches(monkeypatch, torch.bfloat16, True)
    monkeypatch.setattr(triton_moe, "FMA_MAX_ROWS", {**triton_moe.FMA_MAX_ROWS, torch.bfloat16: 1})
    launches += _captured_launches(monkeypatch, torch.bfloat16, True, T=3)  # (bf16 few-row tiles: the GPU A/B's)
    monkeypatch.undo()
    launches += _captured_launches(monkeypatch, torch.float32, False) + \
        _captured_launches(monkeypatch, torch.float32, True, T=3) + \
        _captured_launches(monkeypatch, torch.float32, True, T=7) + _captured_layer_inference_launches(monkeypatch)
    recorded: list = []
    monkeypatch.setattr(triton_moe, "_launch", lambda kernel, grid, *a, **k: recorded.append((kernel, a, k)))
    triton_moe.align(torch.zeros(3000, 2, dtype=torch.int64), 64, 32)  # the three-launch path
    triton_moe.align(torch.zeros(8192, 8, dtype=torch.int64), 64, 64)  # (fine-grained T = 8192: 64 blocks)
    triton_moe.topk_softmax(torch.randn(128, 64), torch.zeros(64), 8, True, 0.0, 1.0)  # (fine-grained routing)
    triton_moe.route_and_align(torch.randn(16, 64), torch.zeros(64), 8, True, 0.0, 1.0, 16, save_p=True)
    triton_moe.align(torch.zeros(100, 2, dtype=torch.int64), 8, 16)  # one program (training's index)
    triton_moe.route_and_align(torch.randn(5, 8), torch.zeros(8), 2, True, 0.0, 1.0, 16, save_p=True)  # (training's)
    from moekit.routing.softmax_topk import SoftmaxTopK  # training routing: top-k with probabilities, backward

    monkeypatch.setattr(SoftmaxTopK, "_kernel_route_ok", lambda self, logits: True)
    routed = SoftmaxTopK(16, 8, 2).route(torch.randn(5, 8, requires_grad=True))
    (routed.topk_weights_TK.sum() + routed.probs_TE.sum()).backward()
    launches += recorded
    assert len(launches) >= 18
    assert {"_topk_softmax_kernel", "_topk_softmax_bwd_kernel", "_align_kernel", "_align_count_kernel",
            "_align_scan_kernel", "_align_place_kernel", "_route_align_kernel"} <= \
        {kernel.__name__ for kernel, _, _ in launches}
    gemm_tiles = {(a[0].dtype, k["BLOCK_M"], k["FMA"]) for kernel, a, k in launches
                  if kernel.__name__ == "_grouped_gemm_kernel"}
    assert {(torch.bfloat16, 16, False), (torch.bfloat16, 1, True), (torch.float32, 16, False),
            (torch.float32, 1, True), (torch.float32, 2, True)} <= gemm_tiles, gemm_tiles
    xty_steps = {(k["BLOCK_K"], k["FMA"]) for kernel, _, k in launches if kernel.__name__ == "_grouped_xty_kernel"}
    assert {(1, True), (2, True)} <= xty_steps and any(not fma for _, fma in xty_steps), xty_steps
    seen, compiled = set(), 0
    for kernel, args, kwargs in launches:
        try:
            key, build = compile_launch(kernel, args, kwargs)
        except NotImplementedError as e:  # (another Triton's internals)
            pytest.skip(str(e))
        if key in seen:
            continue
        seen.add(key)
        out = build()
        assert out.metadata.shared <= 227 * 1024, f"{kernel.__name__}: {out.metadata.shared} bytes of shared memory"
        compiled += 1
        if kernel.__name__.startswith(("_align", "_topk", "_route")):  # (tiles of bounded size a thread)
            stats = sass_stats(out)
            assert not any(op in stats["ops"] for op in ("STL", "LDL")), f"register spills: {kernel.__name__} {stats}"
        if kernel.__name__ in ("_grouped_gemm_kernel", "_grouped_xty_kernel") and kwargs["FMA"]:
            stats = sass_stats(out)  # the few-row tiles: CUDA-core FMAs, no tensor-core MMA, no register spills
            assert stats["ops"].get("FFMA", 0) > 0 and not any(op.startswith("HMMA") for op in stats["ops"]), stats
            assert 0 < stats["loop"] < stats["instructions"] and stats["registers"] <= 255
            assert not any(op in stats["ops"] for op in ("STL", "LDL")), f"register spills: {stats}"
    assert compiled >= 20


@needs_triton
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("rows", [200, 600])
@pytest.mark.parametrize("backward", [True, False], ids=["training", "inference"])
def test_tensor_core_tiles_take_operands_straight_from_memory_on_sm90(monkeypatch, rows, backward):
    """bf16 training and inference at 64- and 128-row tiles (rows per expert 200 and 600), compiled for an H100: every
    grouped GEMM and weight gradient multiplies on the tensor cores (HGMMA) with operands that go from memory to
    shared memory untouched (no multiply or conversion inside the K loop: the router weights are applied in the
    epilogues), its products in flight while the next operands load (one wait a K step: ptxas had serialised them,
    a wait after each, in the inference SwiGLU forward whose epilogue computed g * sigmoid(g)), and no kernel spills
    registers (the SwiGLU epilogues, forward and backward, take 64-column tiles)."""
    if tb.interpreting():
        pytest.skip("the kernels are interpreted in this process")
    from moekit.kernels.triton_aot import compile_launch, sass_stats

    launches = [(k, a, kw) for k, a, kw in _captured_launches(monkeypatch, torch.bfloat16, backward, T=rows, D=128,
                                                              F=128, E=2, bias=False)
                if k.__name__ in ("_grouped_gemm_kernel", "_grouped_xty_kernel")]
    assert len(launches) == (6 if backward else 2)
    assert {kw["BLOCK_M"] for k, _, kw in launches if k.__name__ == "_grouped_gemm_kernel"} == \
        {64 if rows == 200 else 128}
    assert any(kw["EPILOGUE"] == 1 and kw["SAVE_H"] == backward for _, _, kw in launches)
    if backward:
        assert any(kw.get("SCALE") for _, _, kw in launches) and any(kw["EPILOGUE"] == 2 for k, _, kw in launches
                                                                    if k.__name__ == "_grouped_gemm_kernel")
    for kernel, args, kwargs in launches:
        try:
            _, build = compile_launch(kernel, args, kwargs)
        except NotImplementedError as e:  # (another Triton's internals)
            pytest.skip(str(e))
        st = sass_stats(build())
        what = f"{kernel.__name__} {dict((n, kwargs[n]) for n in ('BLOCK_M', 'BLOCK_N', 'BLOCK_K'))}: {st}"
        assert st["loop_ops"].get("HGMMA", 0) > 0 and st["loop_ops"].get("LDGSTS", 0) > 0, what
        assert not {"FMUL", "FFMA", "F2FP", "F2F", "STS"} & set(st["loop_ops"]), what
        assert st["loop_waits"] == 1, f"tensor-core products waited for one by one: {what}"
        assert not {"STL", "LDL"} & set(st["ops"]), f"register spills: {what}"


def test_auto_leaves_triton_for_fp32_only_with_many_rows_per_expert():
    """``auto`` on a GPU: Triton for 16-bit at any load and for fp32 below the measured crossover, the library's
    exact fp32 GEMMs above it."""
    from moekit.experts.backends import AUTO_FP32_TRITON_MAX_ROWS, auto_prefers_triton

    assert auto_prefers_triton(torch.bfloat16, 10 * AUTO_FP32_TRITON_MAX_ROWS)
    assert auto_prefers_triton(torch.float32, AUTO_FP32_TRITON_MAX_ROWS / 4)
    assert not auto_prefers_triton(torch.float32, AUTO_FP32_TRITON_MAX_ROWS)
