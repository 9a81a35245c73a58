"""The layer inside torch.compile: run eagerly on its kernels where graph breaks are allowed, traced whole onto the
fused experts' custom operators where they are not (fullgraph, export), and those operators against the loop
reference, forward and backward."""

import warnings

import pytest
import torch

import moekit
from moekit.experts import backends
from moekit.experts import fused_function as ff
from moekit.experts import fused_op
from moekit.kernels import cpu as K

from .helpers import assert_fwd_bwd_close, max_err, run_fwd_bwd
from .test_cpu_kernels import rel_err
from .test_layer import make


@pytest.mark.slow
def test_torch_compile_matches_eager():
    layer = make("qwen2_gated_shared", "auto")
    x = torch.randn(2, 8, 16)
    eager = run_fwd_bwd(layer, x)
    compiled = torch.compile(layer)
    got = run_fwd_bwd(compiled, x)
    assert max_err(got[0], eager[0]) < 1e-5
    assert max_err(got[1], eager[1]) < 1e-5
    for k in eager[2]:
        assert max_err(got[2][k], eager[2][k]) < 1e-5


def test_torch_compile_in_inference_matches_eager():
    """A compiled layer in inference on a few tokens (where the eager layer runs the fused CPU decode, one kernel
    call that the compiler leaves to run as it is) gives the eager layer's output."""
    layer = make("mixtral", "auto").eval()
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        want = layer(x)
        got = torch.compile(layer)(x)
    assert max_err(got, want) < 1e-6


def _compile_case(T: int, grad: bool):
    torch.manual_seed(3)
    layer = moekit.MoE(64, 32, 8, 2, aux_loss="switch", z_loss_coef=1e-3)
    return layer, torch.randn(2, T, 64, requires_grad=grad)


def _spy_forward(monkeypatch) -> list:
    """Records, for each call of the layer's forward work, whether it ran traced (inside torch.compile's trace)."""
    traced = []
    inner = moekit.MoE._forward

    def spy(self, x, token_ids):
        traced.append(torch.compiler.is_compiling())
        return inner(self, x, token_ids)

    monkeypatch.setattr(moekit.MoE, "_forward", spy)
    return traced


@pytest.mark.skipif(not moekit.kernels.cpu.available(), reason="needs the CPU kernels")
@pytest.mark.parametrize("T,grad", [(1, False), (32, False), (4, True), (96, True)])
def test_torch_compile_runs_the_layer_eagerly_on_its_kernels(monkeypatch, T, grad):
    """Inside torch.compile (graph breaks allowed) the layer on CPU runs as in eager mode, on its kernels and fast
    paths (the fused decode and few-token training step included): one graph break, the same outputs, gradients and
    aux loss."""
    torch._dynamo.reset()
    layer, x = _compile_case(T, grad)
    traced = _spy_forward(monkeypatch)
    compiled = torch.compile(layer)
    with torch.set_grad_enabled(grad):
        if grad:
            want, got = run_fwd_bwd(layer, x), run_fwd_bwd(compiled, x)
            assert_fwd_bwd_close(got, want, 1e-6)
        else:
            want, got = layer(x), compiled(x)
            assert max_err(got, want) < 1e-6
    assert traced == [False, False]  # eager, then compiled: neither traced
    assert "aux_loss" in layer.stats
    explained = torch._dynamo.explain(layer)(x)
    assert len(explained.break_reasons) == 1 and "disable" in explained.break_reasons[0].reason


@pytest.mark.parametrize("T,grad", [(1, False), (32, False), (4, True), (96, True)])
def test_torch_compile_fullgraph_traces_the_layer(monkeypatch, T, grad):
    """Where graph breaks are errors (fullgraph=True), the layer is traced whole, with no kernel call in the graph
    (few-token inference too, whose eager paths call the kernels), and gives the eager layer's results."""
    torch._dynamo.reset()
    layer, x = _compile_case(T, grad)
    traced = _spy_forward(monkeypatch)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.set_grad_enabled(grad):  # (eager first: the layer's caches of its fast paths filled, then traced)
        if grad:
            want = run_fwd_bwd(layer, x)
            assert_fwd_bwd_close(run_fwd_bwd(compiled, x), want, 1e-5)
        else:
            want = layer(x)
            assert max_err(compiled(x), want) < 1e-5
    assert traced == [False, True]  # eager, then traced once while compiling


def test_torch_compile_never_probes_the_gemm_library_while_tracing(monkeypatch):
    """The faster-GEMM probe (timed GEMMs) runs eagerly, never inside a trace: a process whose first use of the
    router is a compiled layer used to fail in Inductor's lowering of the probe's oneDNN call."""
    from moekit.kernels import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "_PROVIDER", {})
    torch._dynamo.reset()
    layer, x = _compile_case(8, True)
    assert_fwd_bwd_close(run_fwd_bwd(torch.compile(layer, fullgraph=True), x), run_fwd_bwd(layer, x), 1e-5)
    assert cpu_gemm._PROVIDER.keys() <= {torch.float32}  # (probed by the eager run only, if at all)


def _op_layer(activation: str = "swiglu", bias: bool = False, dtype=torch.float32, **kw):
    torch.manual_seed(5)
    layer = moekit.MoE(48, 40, 6, 2, backend="fused", activation=activation, expert_bias=bias, **kw).to(dtype)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "bias" in n:
                p.uniform_(-0.1, 0.1)
    return layer


@pytest.fixture
def op_backend(monkeypatch):
    """The layer's fused backend through the custom operators (eagerly: the operators run as they would inside a
    compiled graph), and its few-token training step off, so every step reaches them."""
    monkeypatch.setitem(backends.BACKENDS, "fused", lambda experts, x, plan, out_dtype=torch.float32: (
        fused_op.fused_op_backend(experts, x, plan, out_dtype, ff.needs_backward(experts, x, plan))))
    monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 0)
    calls = []
    forward = fused_op.fused_forward
    monkeypatch.setattr(fused_op, "fused_forward", lambda *a, **k: calls.append(k.get("save")) or forward(*a, **k))
    return calls


@pytest.mark.parametrize("mode", ["library", "kernels", "packed_bwd"])
@pytest.mark.parametrize("case", ["swiglu", "gelu_bias", "gpt_oss_bias", "capacity", "bf16"])
def test_fused_op_matches_the_loop_reference(monkeypatch, op_backend, mode, case):
    """The operators' forward and backward (which rebuilds the plan and copies the saved pre-activations back) agree
    with the loop reference whichever path each expert takes: the library GEMMs one expert at a time (pre-activations
    saved with padding rows), the small-M kernels, or the packed tiles forward and backward."""
    kw = dict(swiglu={}, gelu_bias=dict(activation="gelu", bias=True),
              gpt_oss_bias=dict(activation="gpt_oss", bias=True, router="topk_softmax"),
              capacity=dict(capacity_factor=0.6), bf16=dict(dtype=torch.bfloat16))[case]
    x = torch.randn(60, 48).to(kw.get("dtype", torch.float32))
    ref = _op_layer(**kw)
    ref.experts.backend = "loop"
    want = run_fwd_bwd(ref, x)
    monkeypatch.setattr(ff, "SMALL_M", 10_000 if mode != "library" else 0)
    monkeypatch.setattr(ff, "SMALL_FWD_WORK", 0)
    monkeypatch.setattr(ff, "PACKED_MAX_ROWS", 10_000 if mode == "packed_bwd" else 0)
    monkeypatch.setattr(ff, "PACKED_BWD_MAX_ROWS", 10_000 if mode == "packed_bwd" else 0)
    monkeypatch.setattr(ff, "PACKED_AVX512_BWD_MAX_ROWS", 10_000 if mode == "packed_bwd" else 0)
    for name in ("PACKED_MIN_ROWS", "PACKED_NN_MIN_ROWS", "PACKED_MIN_ROWS_AVX512", "PACKED_NN_MIN_ROWS_AVX512"):
        monkeypatch.setattr(K, name, 1)
    layer = _op_layer(**kw)
    got = run_fwd_bwd(layer, x)
    if case == "bf16":  # (relative to the largest value: bf16 rounding)
        assert_fwd_bwd_close(got, want, 2e-2, 4e-2, err=rel_err)
    else:
        assert_fwd_bwd_close(got, want, 1e-5)
    assert op_backend == [True]  # one forward, keeping the pre-activations; the backward recomputed none
    with torch.no_grad():
        inferred = layer.eval()(x.reshape(12, 5, 48)).reshape(60, 48)  # (5 tokens a step: not the decode path)
        assert (rel_err if case == "bf16" else max_err)(inferred, ref.eval()(x)) < (2e-2 if case == "bf16" else 1e-5)


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_fused_op_registration_is_consistent(op_backend, capacity):
    """torch.library's own checks of the operators: schema, fake (meta) functions against the real ones, autograd
    registration, and that they survive tracing (with dropped slots too)."""
    layer = _op_layer(bias=True, capacity_factor=capacity)
    x = torch.randn(20, 48, requires_grad=True)
    with torch.no_grad():
        plan = layer.dispatcher.plan(layer.router(x))
    assert (plan.num_dropped > 0) == (capacity is not None)
    e = layer.experts
    weights_TK = plan.weights_TK.detach().requires_grad_(True)
    args = (x, e.w_in, e.w_out, e.b_in, e.b_out, weights_TK, plan.order_S, plan.token_S, plan.counts_E,
            "swiglu", [], torch.float32, torch.float32, True)
    torch.library.opcheck(fused_op.fused_experts, args)


@pytest.mark.skipif(not K.available(), reason="needs the CPU kernels")
def test_fullgraph_runs_the_fused_operators(monkeypatch):
    """Compiled whole, a training step of the layer on CPU runs the experts in the custom operators (its kernels),
    not in PyTorch's generic ops, with the eager layer's results."""
    torch._dynamo.reset()
    layer, x = _compile_case(64, True)
    want = run_fwd_bwd(layer, x)
    calls = []
    forward = fused_op.fused_forward
    monkeypatch.setattr(fused_op, "fused_forward", lambda *a, **k: calls.append(k.get("save")) or forward(*a, **k))
    got = run_fwd_bwd(torch.compile(layer, fullgraph=True), x)
    assert_fwd_bwd_close(got, want, 1e-5)
    assert calls and all(calls)


@pytest.mark.parametrize("T", [1, 5, 64])
def test_export_matches_eager(T):
    """torch.export traces the layer whole: the exported program gives the eager layer's output, and the layer's
    statistics (tensors assigned to a module attribute, which export warns of) are not recorded there."""
    torch.manual_seed(4)
    layer = moekit.MoE(32, 16, 8, 2).eval()
    x = torch.randn(1, T, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(layer, (x,))
    assert not [w for w in caught if "stats" in str(w.message)]
    with torch.no_grad():
        assert max_err(program.module()(x), layer(x)) < 1e-6


@pytest.mark.skipif(not K.available(), reason="needs the CPU kernels")
@pytest.mark.parametrize("T", [1, 32])
def test_fullgraph_inference_of_a_few_tokens_runs_the_decode_kernel(monkeypatch, T):
    """Compiled whole, a few tokens' inference skips the sort as the eager layer does: the traced router's choices
    go straight to the decode kernel, one custom operator (``moekit::experts_decode``)."""
    torch._dynamo.reset()
    layer, x = _compile_case(T, False)
    layer.eval()
    calls = []
    decode = K.small_experts_decode
    monkeypatch.setattr(K, "small_experts_decode", lambda *a, **k: calls.append(a[0].shape[0]) or decode(*a, **k))
    with torch.no_grad():
        want = layer(x)
        calls.clear()  # (the eager layer's own path aside)
        got = torch.compile(layer, fullgraph=True)(x)
    assert max_err(got, want) < 1e-5
    assert calls == [2 * T]


@pytest.mark.skipif(not K.available(), reason="needs the CPU kernels")
def test_decode_operator_registration_is_consistent():
    torch.manual_seed(0)
    w_in, w_out = torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    ids = torch.tensor([[0, 2], [3, 2], [1, 0]])
    args = (torch.randn(3, 8), ids, torch.rand(3, 2), w_in, None, w_out, None, "swiglu", [])
    torch.library.opcheck(fused_op.experts_decode, args)


@pytest.mark.parametrize("policy", ["probs", "position", "batch_priority"])
@pytest.mark.parametrize("grad", [False, True])
def test_fullgraph_with_capacity_matches_eager(policy, grad):
    """Capacity dispatch compiled whole gives the eager layer's results under every drop policy (with the position
    policy Inductor once ran the experts on zero counts: the kept slots were scattered into a buffer in place)."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    layer = moekit.MoE(16, 32, num_experts=4, top_k=2, capacity_factor=0.75, drop_policy=policy)
    x = torch.randn(2, 20, 16)
    if grad:
        assert_fwd_bwd_close(run_fwd_bwd(torch.compile(layer, fullgraph=True), x), run_fwd_bwd(layer, x), 1e-5)
    else:
        layer.eval()
        with torch.no_grad():
            assert max_err(torch.compile(layer, fullgraph=True)(x), layer(x)) < 1e-5
    assert layer.stats["dropped"] > 0


def test_importing_moekit_leaves_the_compiler_unloaded():
    """``import moekit`` does not import ``torch._dynamo`` (which alone took ~1.5 s, doubling the import), although
    the layer's compile support refers to it."""
    import subprocess
    import sys

    code = "import sys, moekit; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(not K.available(), reason="needs the CPU kernels")
def test_saved_export_loads_in_a_fresh_process(tmp_path):
    """An exported layer (its experts in moekit's operators) saved with torch.export.save runs again in another
    process after ``import moekit``, which registers the operators."""
    import subprocess
    import sys

    torch.manual_seed(4)
    layer = moekit.MoE(32, 16, 8, 2).eval()
    out = {}
    for T in (1, 64):
        x = torch.randn(1, T, 32)
        program = torch.export.export(layer, (x,))
        names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("moekit." in name for name in names), names
        torch.export.save(program, tmp_path / f"layer{T}.pt2")
        torch.save(x, tmp_path / f"x{T}.pt")
        with torch.no_grad():
            out[T] = layer(x)
        torch.save(out[T], tmp_path / f"y{T}.pt")
    code = ("import sys, torch, moekit\n"
            "for T in (1, 64):\n"
            "    p = torch.export.load(f'{sys.argv[1]}/layer{T}.pt2')\n"
            "    x, y = torch.load(f'{sys.argv[1]}/x{T}.pt'), torch.load(f'{sys.argv[1]}/y{T}.pt')\n"
            "    assert (p.module()(x) - y).abs().max().item() < 1e-6, T\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


def test_fullgraph_hash_routing_checks_its_token_ids():
    """Hash routing compiled whole: the eager layer's output, and token ids out of range still raise (a check that
    runs inside the compiled code instead of a host branch on the ids)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = moekit.MoE(16, 32, 4, 1, router="hash", router_kwargs={"vocab_size": 16})
    x, ids = torch.randn(2, 8, 16), torch.randint(0, 16, (2, 8))
    compiled = torch.compile(layer, fullgraph=True)
    assert max_err(compiled(x, ids), layer(x, ids)) < 1e-6
    with pytest.raises(RuntimeError, match=r"token ids must lie in \[0, 16\)"):
        compiled(x, ids + 16)
