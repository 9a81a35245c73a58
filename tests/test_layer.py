"""The MoE layer: every backend against the loop reference, shapes, dtypes, autocast, compile."""

import random

import pytest
import torch

import moekit
from moekit.experts import BACKENDS
from moekit.experts.activations import ACTIVATIONS

from .helpers import max_err, num_threads, run_fwd_bwd
from .router_cases import CASES

FAST = [b for b in BACKENDS if b != "loop"]

CONFIGS = {
    "mixtral": dict(num_experts=8, top_k=2),
    "fine_grained_shared": dict(num_experts=16, top_k=4, shared_experts=2, shared_d_ff=24),
    "qwen2_gated_shared": dict(num_experts=6, top_k=2, shared_experts=1, shared_expert_gate=True),
    "deepseek": dict(num_experts=8, top_k=2, router="sigmoid_topk",
                     router_kwargs=dict(n_group=4, topk_group=2, scale=2.5)),
    "gpt_oss": dict(num_experts=4, top_k=2, router="topk_softmax", activation="gpt_oss", expert_bias=True),
    "gelu_mlp": dict(num_experts=4, top_k=1, activation="gelu"),
    "switch_capacity": dict(num_experts=4, top_k=1, router="switch", capacity_factor=0.5),
    "top2_capacity_position": dict(num_experts=4, top_k=2, capacity_factor=0.75, drop_policy="position"),
}


def make(name, backend, dtype=torch.float32, **extra):
    torch.manual_seed(1)
    layer = moekit.MoE(16, 32, backend=backend, **CONFIGS[name], **extra).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():  # non-zero biases so they are really tested
            if p.dim() <= 2 and "bias" in str(p.shape) or p.dim() == 1:
                p.uniform_(-0.1, 0.1)
    return layer


@pytest.fixture(params=["few_token_step", "regular"])
def train_path(request, monkeypatch):
    """Training steps of few tokens with a softmax top-k router run routing and experts in one kernel call each
    way (moekit.experts.train_step); "regular" turns that off, so that the experts' backends run them."""
    if request.param == "regular":
        monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 0)
    return request.param


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", FAST)
def test_backend_matches_loop_fp32(name, backend, train_path):
    x = torch.randn(3, 7, 16)
    ref = run_fwd_bwd(make(name, "loop"), x)
    got = run_fwd_bwd(make(name, backend), x)
    assert max_err(got[0], ref[0]) < 1e-5
    assert max_err(got[1], ref[1]) < 1e-5
    assert ref[2].keys() == got[2].keys()
    for k in ref[2]:
        assert max_err(got[2][k], ref[2][k]) < 1e-5, k


@pytest.mark.parametrize("name", ["mixtral", "deepseek", "gpt_oss", "switch_capacity"])
@pytest.mark.parametrize("backend", FAST)
def test_backend_matches_loop_bf16(name, backend, train_path):
    x = torch.randn(4, 9, 16).bfloat16()
    ref = run_fwd_bwd(make(name, "loop", torch.bfloat16), x)
    got = run_fwd_bwd(make(name, backend, torch.bfloat16), x)
    assert got[0].dtype == torch.bfloat16
    scale = ref[0].float().abs().max().item()
    assert max_err(got[0], ref[0]) <= 2e-2 * scale
    assert max_err(got[1], ref[1]) <= 2e-2 * ref[1].float().abs().max().item()
    for k in ref[2]:
        assert max_err(got[2][k], ref[2][k]) <= 3e-2 * ref[2][k].float().abs().max().item() + 1e-6, k


def test_bf16_close_to_fp32():
    x = torch.randn(4, 9, 16)
    y32 = make("mixtral", "auto")(x)
    y16 = make("mixtral", "auto", torch.bfloat16)(x.bfloat16())
    assert max_err(y16, y32) < 0.05 * y32.abs().max().item()


@pytest.mark.parametrize("shape", [(16,), (5, 16), (2, 3, 16), (2, 2, 3, 16), (0, 16), (2, 0, 16)])
def test_any_leading_shape(shape):
    layer = make("qwen2_gated_shared", "auto")
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    if x.numel():
        ref = make("qwen2_gated_shared", "loop")(x.detach().reshape(-1, 16)).reshape(shape)
        assert max_err(y, ref) < 1e-5


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_zero_tokens_and_idle_experts(backend):
    layer = make("mixtral", backend)
    y = layer(torch.zeros(0, 16))
    assert y.shape == (0, 16)
    # Force every token to expert 0 and 1: the other six experts get nothing.
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = layer.router.weight[1, 0] = 10.0
    x = torch.randn(6, 16).abs() + 0.1
    x[:, 0] = 1.0
    _, dx, g = run_fwd_bwd(layer, x)
    assert layer.stats["tokens_per_expert"].tolist() == [6, 6, 0, 0, 0, 0, 0, 0]
    assert torch.count_nonzero(g["experts.gate_up_proj"][2:]) == 0
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(name, dtype, backend, train_path):
    """No tokens, in inference and in a training step: an empty output, no tokens per expert, and gradients that are
    zeros (never uninitialised memory: the weight gradient of a single-matrix product of no rows, the bf16 router's,
    is the sum of nothing)."""
    layer = make(name, backend, dtype)
    for shape in [(0, 16), (2, 0, 16)]:
        layer.eval()
        with torch.no_grad():
            y = layer(torch.randn(*shape).to(dtype))
        assert y.shape == shape and y.dtype == dtype
        assert layer.stats["tokens_per_expert"].tolist() == [0] * layer.config.num_experts
        layer.train()
        junk = [torch.full_like(p, float("nan")) for p in layer.parameters()]
        del junk  # (memory a gradient allocated next may reuse: left unwritten, it shows)
        y, dx, g = run_fwd_bwd(layer, torch.randn(*shape).to(dtype))
        assert y.shape == shape and dx.shape == shape
        for k, v in g.items():
            assert torch.count_nonzero(v) == 0, k


def test_output_is_weighted_sum_of_experts():
    layer = make("deepseek", "auto")
    x = torch.randn(10, 16)
    y = layer(x)
    routed = layer.router(x)
    ex = layer.experts
    for t in range(10):
        expect = torch.zeros(16)
        for k in range(2):
            e = routed.topk_ids_TK[t, k]
            h = ex.activation(x[t] @ ex.gate_up_proj[e].T)
            expect += routed.topk_weights_TK[t, k] * (h @ ex.down_proj[e].T)
        assert torch.allclose(y[t], expect, atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_autocast_bf16(backend):
    layer = make("mixtral", backend)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32  # same dtype as the input
    ref = make("mixtral", "loop", torch.bfloat16)(x.detach().bfloat16())
    assert max_err(y, ref) < 0.05 * ref.float().abs().max().item()
    y.sum().backward()
    assert layer.experts.gate_up_proj.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()


def test_module_list_experts():
    mlps = [torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 16)) for _ in range(4)]
    layer = moekit.MoE(16, 8, 4, 2, experts=mlps)
    x = torch.randn(5, 16)
    y = layer(x)
    r = layer.router(x)
    t = 3
    expect = sum(r.topk_weights_TK[t, k] * mlps[r.topk_ids_TK[t, k]](x[t]) for k in range(2))
    assert torch.allclose(y[t], expect, atol=1e-6)


def test_state_dict_roundtrip_and_names():
    layer = make("gpt_oss", "auto")
    names = set(layer.state_dict())
    assert {"router.weight", "router.expert_bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
            "experts.down_proj", "experts.down_proj_bias"} <= names
    other = moekit.MoE(config=layer.config)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "fine_grained_shared", "deepseek"])
@pytest.mark.parametrize("T", [1, 3, 8, 40, 80])
def test_decode_path_matches_loop(name, T):
    """Inference with few tokens skips the sort (Experts.decode); it must equal the reference."""
    from moekit.layer import DECODE_KERNEL_MAX_SLOTS, DECODE_MAX_SLOTS

    layer, ref = make(name, "auto"), make(name, "loop")
    x = torch.randn(T, 16)
    assert layer._decode_path(x, layer.router(x)) is False  # grad enabled: regular path
    slots = T * layer.config.top_k
    kernel = layer.experts.decode_kernel_usable(x)
    assert kernel == (layer.experts.activation.name in moekit.kernels.cpu.DECODE_ACTIVATIONS
                      and moekit.kernels.cpu.library() is not None)
    with torch.no_grad():
        assert layer._decode_path(x, layer.router(x)) == (
            slots <= DECODE_MAX_SLOTS or (kernel and slots <= DECODE_KERNEL_MAX_SLOTS))
        y, want = layer(x), ref(x)
    assert max_err(y, want) < 1e-5
    assert layer.stats["tokens_per_expert"].sum().item() == T * layer.config.top_k
    with torch.no_grad():
        y16 = make(name, "auto", torch.bfloat16)(x.bfloat16())
    assert max_err(y16, want) < 0.05 * want.abs().max().item()


SOFTMAX_FUSED = {  # (routed in the fused decode and in the few-token training step)
    "mixtral": dict(num_experts=8, top_k=2),
    "qwen_no_renorm_scaled": dict(num_experts=16, top_k=4, router_kwargs=dict(renormalize=False, scale=1.5)),
    "ernie_renorm_min": dict(num_experts=8, top_k=2, router_kwargs=dict(renorm_min=0.9)),
    "router_bias_shared": dict(num_experts=8, top_k=2, router_kwargs=dict(bias=True), shared_experts=1),
    "switch": dict(num_experts=4, top_k=1, router="switch"),
}
FUSED_DECODE = {
    **SOFTMAX_FUSED,
    # the decode kernel's other routings (kcpu.RouteMode)
    "deepseek_v3_groups": dict(num_experts=16, top_k=4, router="sigmoid_topk",
                               router_kwargs=dict(n_group=4, topk_group=2, scale=2.5)),
    "deepseek_v2_softmax_max": dict(num_experts=8, top_k=2, router="sigmoid_topk",
                                    router_kwargs=dict(n_group=4, topk_group=3, score_func="softmax",
                                                       group_score="max", group_fill=0.0, renormalize=False)),
    "sigmoid_plain": dict(num_experts=8, top_k=3, router="sigmoid_topk", router_kwargs=dict(scale=1.5)),
    "sigmoid_softcapped": dict(num_experts=8, top_k=2, router="sigmoid_topk", router_kwargs=dict(logit_softcap=0.5)),
    "gpt_oss_routing": dict(num_experts=8, top_k=2, router="topk_softmax", router_kwargs=dict(bias=True)),
    "topk_sigmoid_renorm": dict(num_experts=8, top_k=3, router="topk_softmax",
                                router_kwargs=dict(weight_func="sigmoid", renormalize=True, scale=0.5)),
    # the decode kernel's other gated activations
    "gpt_oss_experts": dict(num_experts=8, top_k=2, router="topk_softmax", router_kwargs=dict(bias=True),
                            activation="gpt_oss", activation_kwargs=dict(limit=0.5), expert_bias=True),
    "swiglu_clamped_groups": dict(num_experts=8, top_k=2, router="sigmoid_topk",
                                  router_kwargs=dict(n_group=2, topk_group=1), activation="swiglu_clamped",
                                  activation_kwargs=dict(limit=0.5)),
    "swiglu_clipped": dict(num_experts=8, top_k=2, activation="swiglu_clipped", activation_kwargs=dict(limit=0.2)),
    "geglu_tanh": dict(num_experts=8, top_k=2, activation="geglu_tanh"),
    "relu2_mlp": dict(num_experts=8, top_k=2, router="sigmoid_topk", activation="relu2"),
    "gelu_mlp_bias": dict(num_experts=8, top_k=1, router="switch", activation="gelu", expert_bias=True),
}


@pytest.mark.parametrize("name", list(FUSED_DECODE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 6, 64, 300])  # (300: 600-4800 slots, around DECODE_KERNEL_MAX_SLOTS)
def test_fused_decode_matches_the_regular_path(name, dtype, T, monkeypatch):
    """Inference of a few tokens with a router the kernel routes as (softmax top-k, group-limited sigmoid or softmax
    top-k, top-k of the logits weighted by a softmax or sigmoids over them) runs routing and experts in one kernel
    call; it must give what routing in PyTorch and then the experts give (and the loop reference), and the same
    statistics."""
    if not moekit.kernels.cpu.available():
        pytest.skip("no CPU kernels")
    torch.manual_seed(2)
    layer = moekit.MoE(16, 32, **FUSED_DECODE[name]).to(dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:
                p.uniform_(-0.1, 0.1)
        layer.router.expert_bias.uniform_(-0.05, 0.05)  # the selection bias too
    x = torch.randn(2, T, 16).to(dtype)
    fused_calls = []
    real = moekit.kernels.cpu.RouteDecode.__call__
    monkeypatch.setattr(moekit.kernels.cpu.RouteDecode, "__call__", lambda *a: fused_calls.append(1) or real(*a))
    with torch.no_grad():
        y = layer(x)
        counts = layer.stats["tokens_per_expert"].clone()
        assert len(fused_calls) == (2 * T * layer.config.top_k <= moekit.layer.DECODE_KERNEL_MAX_SLOTS)
        monkeypatch.setattr(layer, "_fused_decode", lambda x_TD: None)
        want = layer(x)
        loop = moekit.MoE(config=layer.config).to(dtype).eval()
        loop.load_state_dict(layer.state_dict())
        loop.experts.backend = "loop"
        ref = loop(x.float() if dtype == torch.float32 else x)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2 * want.float().abs().max().item()
    assert max_err(y, want) <= tol
    assert max_err(y, ref) <= max(tol, 1e-5)
    assert torch.equal(counts, layer.stats["tokens_per_expert"])
    assert layer.stats["dropped"].item() == 0


@pytest.mark.parametrize("T,chunk_rows", [(300, 8192), (2000, 1100)])  # (above the decode path's slots; 1100 rows:
def test_bf16_inference_rounds_in_the_output_projection(T, chunk_rows, monkeypatch):  # calls for runs of experts)
    """bf16 inference with every expert on the AMX tiles: the output projection stores each token's first sum and
    rounds its finished sum into the bf16 output itself; the same bits as summing into zeros and casting after."""
    if not moekit.kernels.cpu.amx():
        pytest.skip("needs AMX tiles")
    torch.manual_seed(7)
    layer = moekit.MoE(64, 96, num_experts=4, top_k=2).bfloat16().eval()
    x = torch.randn(T, 64).bfloat16()
    monkeypatch.setattr(moekit.experts.fused_function, "CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(moekit.layer, "DECODE_KERNEL_MAX_SLOTS", 256)
    calls = []
    real = moekit.kernels.cpu.row_flags
    monkeypatch.setattr(moekit.kernels.cpu, "row_flags", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y = layer(x)
        assert calls == [1]
        monkeypatch.setattr(moekit.kernels.cpu, "row_flags", lambda *a: None)  # (zeros, sums, a cast)
        want = layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_takes_any_leading_shape(dtype, shared, monkeypatch):
    """The fused decode reads x of any leading shape in place (one token [D], [T, D], [B, T, D]) and returns its
    output in that shape and dtype, contiguous; a non-contiguous x, or token ids, take the regular path."""
    if not moekit.kernels.cpu.available():
        pytest.skip("no CPU kernels")
    torch.manual_seed(4)
    layer = moekit.MoE(16, 32, num_experts=8, top_k=2, shared_experts=shared).to(dtype).eval()
    calls = []
    real = moekit.kernels.cpu.RouteDecode.__call__
    monkeypatch.setattr(moekit.kernels.cpu.RouteDecode, "__call__", lambda *a: calls.append(1) or real(*a))
    base = torch.randn(2, 3, 32).to(dtype)
    cases = [(base[0, 0, :16].contiguous(), True), (base[0, :, :16].contiguous(), True),
             (base[..., :16].contiguous(), True), (base[..., :16], False), (base[0, :, :16].T.contiguous().T, False)]
    for x, fused in cases:
        calls.clear()
        with torch.no_grad():
            y = layer(x)
            assert len(calls) == int(fused), tuple(x.shape)
            want = moekit.MoE.forward(layer, x.contiguous(), token_ids=torch.zeros(x.shape[:-1], dtype=torch.long))
        assert len(calls) == int(fused)  # (token ids given: the regular path)
        assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
        assert max_err(y, want) <= (1e-6 if dtype == torch.float32 else 1e-2 * want.float().abs().max().item())


def test_fused_decode_follows_changes_to_the_module(monkeypatch):
    """The fused decode prepares its checks and arguments once per module state: weights updated in place, a
    replaced parameter, a cast, a new selection bias, disabled experts and another backend are all seen."""
    if not moekit.kernels.cpu.available():
        pytest.skip("no CPU kernels")
    torch.manual_seed(3)
    layer = moekit.MoE(16, 32, num_experts=8, top_k=2).to(torch.bfloat16).eval()
    x = torch.randn(3, 16).bfloat16()
    calls = []
    real = moekit.kernels.cpu.RouteDecode.__call__
    monkeypatch.setattr(moekit.kernels.cpu.RouteDecode, "__call__", lambda *a: calls.append(1) or real(*a))

    def check(fused: bool):
        calls.clear()
        with torch.no_grad():
            y = layer(x)
            assert len(calls) == int(fused)
            layer.__dict__["_fused_decode"] = lambda x_TD: None  # the regular path on the same module
            want = layer(x)
            del layer.__dict__["_fused_decode"]
        assert y.dtype == x.dtype and max_err(y, want) <= 1e-2 * want.float().abs().max().item()
        return y

    first = check(True)
    with torch.no_grad():
        layer.router.weight.mul_(-1)  # in place: same tensor, new routing
    assert not torch.equal(check(True), first)
    with torch.no_grad():  # the selection bias, held as an fp32 copy for a bf16 layer: a new copy is made
        layer.router.expert_bias.copy_(torch.where(torch.arange(8) < 2, 10.0, 0.0))
    check(True)
    with torch.no_grad():
        layer(x)  # (fused) every token now chooses experts 0 and 1
    assert layer.stats["tokens_per_expert"].nonzero().flatten().tolist() == [0, 1]
    layer.experts.down_proj = torch.nn.Parameter(torch.randn_like(layer.experts.down_proj))  # replaced
    check(True)
    layer.float()
    x = x.float()
    check(True)
    layer.disable_experts([3])  # the fused kernel has no disabled experts: the regular path runs
    check(False)
    layer.enable_experts()
    check(True)
    layer.experts.backend = "loop"
    check(False)


def test_fused_decode_only_where_it_computes_the_same_thing():
    """Training, autograd, hooks, disabled experts, capacity, autocast, other activations, a router subclass
    that changes a step: the fused decode declines (None) and the regular path runs."""
    if not moekit.kernels.cpu.available():
        pytest.skip("no CPU kernels")
    from moekit.routing.softmax_topk import SoftmaxTopK

    x = torch.randn(2, 16)

    def fused(layer):
        with torch.no_grad():
            return layer._fused_decode(x)

    base = moekit.MoE(16, 32, 8, 2).eval()
    assert fused(base) is not None
    assert fused(moekit.MoE(16, 32, 8, 2)) is None  # training mode
    with_hook = moekit.MoE(16, 32, 8, 2).eval()
    with_hook.register_routing_hook(lambda *a: None)
    assert fused(with_hook) is None
    disabled = moekit.MoE(16, 32, 8, 2).eval()
    disabled.disable_experts([3])
    assert fused(disabled) is None
    assert fused(moekit.MoE(16, 32, 8, 2, capacity_factor=1.0).eval()) is None
    # every activation moekit has runs in the decode kernels; the few-token training step's kernels are SwiGLU's
    gelu = moekit.MoE(16, 32, 8, 2, activation="gelu")
    assert gelu._train_step_prepared() is None and fused(gelu.eval()) is not None
    assert fused(moekit.MoE(16, 32, 8, 2, router="sigmoid_topk").eval()) is not None  # (a kcpu.RouteMode)
    assert fused(moekit.MoE(16, 32, 8, 2, backend="loop").eval()) is None
    # more choices per token than the kernel's selection keeps: declined, and the regular decode path serves it
    many = moekit.MoE(16, 32, 80, 70).eval()
    assert fused(many) is None
    with torch.no_grad():
        assert many(x).shape == x.shape and many.stats["tokens_per_expert"].sum().item() == 2 * 70
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(base) is None

    class Sharpened(SoftmaxTopK):
        def scores(self, logits_TE):
            return torch.softmax(2 * logits_TE, dim=-1)

    sharp = moekit.MoE(16, 32, 8, 2, router=Sharpened(16, 8, 2)).eval()
    assert fused(sharp) is None
    with torch.no_grad():  # ...and its own routing is what runs
        y = sharp(x)
    ids = torch.topk(torch.softmax(2 * sharp.router.logits(x), -1), 2).indices
    assert sharp.stats["tokens_per_expert"].tolist() == torch.bincount(ids.flatten(), minlength=8).tolist()
    assert torch.isfinite(y).all()


def test_fused_decode_leaves_ties_to_pytorch():
    """All router logits equal: every choice is a tie, which torch.topk breaks; the fused kernel declines and the
    layer's result is the regular path's."""
    layer = moekit.MoE(16, 32, 8, 2).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        x = torch.randn(3, 16)
        assert layer._fused_decode(x) is None
        y = layer(x)
    ids = torch.topk(torch.full((3, 8), 1 / 8), 2, dim=-1).indices  # torch.topk's own tie-break
    assert layer.stats["tokens_per_expert"].tolist() == torch.bincount(ids.flatten(), minlength=8).tolist()
    assert torch.isfinite(y).all()


TRAIN_STEP = {
    **SOFTMAX_FUSED,
    "mixtral_no_aux_loss": dict(num_experts=8, top_k=2, aux_loss=None),
    "seq_aux_loss": dict(num_experts=16, top_k=4, aux_loss="seq", aux_loss_coef=0.1),
    "bias_update": dict(num_experts=8, top_k=2, bias_update_rate=0.01),
    "z_loss": dict(num_experts=8, top_k=2, z_loss_coef=0.05),
}


def _train(layer, x, fused: bool, monkeypatch):
    """``(y, x.grad, parameter grads, stats, load_accum)`` of one training step (the few-token step or not)."""
    if not fused:
        monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 0)
    layer.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    y = layer(xi)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    monkeypatch.undo()
    return (y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None},
            dict(layer.stats), layer.load_accum.clone())


@pytest.mark.parametrize("name", list(TRAIN_STEP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 16, 200])  # (200: 400-800 slots, experts of dozens of rows)
def test_few_token_training_step_matches_the_regular_path(name, dtype, T, monkeypatch):
    """A training step of a few tokens with a softmax top-k router runs routing and experts in one kernel call
    forward and one backward; output, every gradient (input, router weight and bias, experts), the balancing loss
    and the statistics must be the regular path's, which the loop reference checks in turn."""
    if not moekit.kernels.cpu.available():
        pytest.skip("no CPU kernels")
    torch.manual_seed(4)
    layer = moekit.MoE(32, 64, **TRAIN_STEP[name]).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:
                p.uniform_(-0.1, 0.1)
        layer.router.expert_bias.uniform_(-0.05, 0.05)  # the selection bias too
    x = torch.randn(T, 32).to(dtype)
    calls = []
    real = moekit.kernels.cpu.route_train_forward
    monkeypatch.setattr(moekit.kernels.cpu, "route_train_forward", lambda *a: calls.append(1) or real(*a))
    state = {k: v.clone() for k, v in layer.state_dict().items()}  # (a bias update changes the selection bias)
    got = _train(layer, x, True, monkeypatch)
    assert calls == [1]
    layer.load_state_dict(state)
    want = _train(layer, x, False, monkeypatch)
    rel = 1e-5 if dtype == torch.float32 else 2e-2  # (bf16: the router's term of dx summed in fp32, not in bf16)
    assert got[0].dtype == dtype and max_err(got[0], want[0]) <= rel * want[0].float().abs().max().item()
    assert max_err(got[1], want[1]) <= rel * want[1].float().abs().max().item()
    assert got[2].keys() == want[2].keys() == {n for n, _ in layer.named_parameters()}
    for n in want[2]:
        assert got[2][n].dtype == want[2][n].dtype
        assert max_err(got[2][n], want[2][n]) <= rel * want[2][n].float().abs().max().item() + 1e-12, n
    assert got[3].keys() == want[3].keys()
    assert torch.equal(got[3]["tokens_per_expert"], want[3]["tokens_per_expert"])
    for loss in ("aux_loss", "z_loss"):
        if loss in want[3]:
            assert max_err(got[3][loss], want[3][loss]) <= 1e-5 * max(1.0, want[3][loss].abs().item())
    assert torch.allclose(got[4], want[4])  # (selection-bias load counts, where the bias is updated)


def test_few_token_training_step_gradients_match_the_loop_reference():
    """fp32 against the loop backend (a plain expert-by-expert forward that autograd differentiates)."""
    torch.manual_seed(5)
    layer = moekit.MoE(16, 32, num_experts=8, top_k=2, router_kwargs=dict(bias=True), shared_experts=1)
    loop = moekit.MoE(config=layer.config)
    loop.load_state_dict(layer.state_dict())
    loop.experts.backend = "loop"
    x = torch.randn(2, 3, 16)
    got, want = run_fwd_bwd(layer, x), run_fwd_bwd(loop, x)
    assert max_err(got[0], want[0]) < 1e-5 and max_err(got[1], want[1]) < 1e-5
    for k in want[2]:
        assert max_err(got[2][k], want[2][k]) < 1e-5, k


def test_few_token_training_step_with_frozen_parts(monkeypatch):
    """Only some inputs need gradients (a frozen router, frozen experts, an input without grad): the others are
    still exact, the frozen ones get none."""
    torch.manual_seed(6)
    x = torch.randn(4, 16)
    for frozen in (["router.weight"], ["experts.gate_up_proj", "experts.down_proj"], []):
        layer = moekit.MoE(16, 32, num_experts=8, top_k=2)
        for n, p in layer.named_parameters():
            p.requires_grad_(n not in frozen)
        for needs_x in (True, False):
            grads = []
            for fused in (True, False):
                monkeypatch.setattr(moekit.layer, "TRAIN_STEP_MAX_SLOTS", 256 if fused else 0)
                layer.zero_grad(set_to_none=True)
                xi = x.clone().requires_grad_(needs_x)
                (layer(xi) * torch.arange(16.0)).sum().backward()
                grads.append([xi.grad] + [p.grad for p in layer.parameters()])
            for a, b in zip(*grads):
                assert (a is None) == (b is None)
                assert a is None or max_err(a, b) < 1e-5
            assert [p.grad is None for p in layer.parameters()] == [not p.requires_grad for p in layer.parameters()]


def test_few_token_training_step_only_where_it_computes_the_same_thing():
    """Hooks, disabled experts, capacity, other activations or routers, expert biases, the loop backend, input
    jitter, autocast, too many slots: the step declines and the regular path runs."""
    if not moekit.kernels.cpu.available():
        pytest.skip("no CPU kernels")
    x = torch.randn(3, 16)
    assert moekit.MoE(16, 32, 8, 2)._fused_train_step(x) is not None
    assert moekit.MoE(16, 32, 8, 2).eval()._fused_train_step(x) is not None  # (eval mode with autograd: same)
    hooked = moekit.MoE(16, 32, 8, 2)
    hooked.register_routing_hook(lambda *a: None)
    disabled = moekit.MoE(16, 32, 8, 2)
    disabled.disable_experts([1])
    for layer in (hooked, disabled,
                  moekit.MoE(16, 32, 8, 2, capacity_factor=1.0), moekit.MoE(16, 32, 8, 2, activation="gelu"),
                  moekit.MoE(16, 32, 8, 2, router="sigmoid_topk"), moekit.MoE(16, 32, 8, 2, expert_bias=True),
                  moekit.MoE(16, 32, 8, 2, backend="loop"), moekit.MoE(16, 32, 8, 2, router_kwargs=dict(jitter=0.1))):
        assert layer._fused_train_step(x) is None
        y = layer(x)  # ...and the regular path serves it
        assert y.shape == x.shape and torch.isfinite(y).all()
    base = moekit.MoE(16, 32, 8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert base._fused_train_step(x) is None
    too_many = moekit.layer.TRAIN_STEP_MAX_SLOTS // 2 + 1
    assert base._fused_train_step(torch.randn(too_many, 16)) is None  # more slots than TRAIN_STEP_MAX_SLOTS
    assert base._fused_train_step(torch.randn(16, 6)[:, :3].T.contiguous().T) is None  # (not contiguous)


def test_few_token_training_step_leaves_ties_to_pytorch():
    """All router logits equal: every choice is a tie, which torch.topk breaks; the step declines before recording
    anything and the regular path's result is what the layer returns."""
    layer = moekit.MoE(16, 32, 8, 2)
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(3, 16, requires_grad=True)
    assert layer._fused_train_step(x) is None
    layer(x).sum().backward()
    ids = torch.topk(torch.full((3, 8), 1 / 8), 2, dim=-1).indices
    assert layer.stats["tokens_per_expert"].tolist() == torch.bincount(ids.flatten(), minlength=8).tolist()
    assert torch.isfinite(x.grad).all() and layer.router.weight.grad is not None


@pytest.mark.parametrize("T, kw", [(2, {}), (600, dict(shared_experts=1, activation="gelu"))],
                         ids=["few_token_step", "fused_experts"])
def test_second_backward_through_the_same_graph(T, kw):
    """``retain_graph=True`` and a second backward: the kernels' backward frees (or overwrites) what it kept as it
    goes, so the second pass differentiates the output recomputed in PyTorch's operations, and the gradients
    accumulate to exactly twice the first pass's (to rounding). (It was an error, or a crash in the bookkeeping.)"""
    layer = moekit.MoE(16, 32, 8, 2, **kw)
    x = torch.randn(T, 16, requires_grad=True)
    y = layer(x).pow(2).sum()
    y.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in layer.named_parameters()}
    x_once = x.grad.clone()
    y.backward()
    for n, p in layer.named_parameters():
        assert max_err(p.grad, 2 * once[n]) <= 1e-5 * max(1.0, once[n].abs().max().item()), n
    assert max_err(x.grad, 2 * x_once) <= 1e-5 * max(1.0, x_once.abs().max().item())


@pytest.mark.parametrize("family, d_ff, E, k", [("qwen3_moe", 32, 16, 4), ("mixtral", 96, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4])
def test_few_token_training_step_peak_is_at_most_grouped_mms(family, d_ff, E, k, dtype, T, monkeypatch):
    """The few-token training step's peak memory (forward+backward, as the benchmark measures it: PyTorch's
    allocator and the kernels' scratch) is at most that of the same block's transformers grouped_mm backend: both
    hold the experts' weight gradients, and moekit's backward drops the slot groups and dx's float32 sums before it
    allocates the router's gradient (they made its peak up to 592 bytes larger than grouped_mm's at T = 1, bf16 and
    fp32, fine-grained and Mixtral-like), and its last calls keep their few rows' buffers and bookkeeping on the
    stack (allocated, they made it 116-128 bytes larger at T = 1, bf16)."""
    pytest.importorskip("transformers")
    if not moekit.kernels.cpu.available():
        pytest.skip("no CPU kernels")
    from moekit import benchmark as B

    shape = {"family": family, "d_model": 64, "d_ff": d_ff, "num_experts": E, "top_k": k}
    block = B.hf_block(shape, dtype)
    layer = B.share_hf(block)
    hf = B.hf_peers(block, ("grouped_mm",), "tiny", shape, dtype, T, "fwd+bwd", [])["hf_grouped_mm"]
    x = torch.randn(1, T, 64).to(dtype)
    calls = []
    real = moekit.kernels.cpu.route_train_backward
    monkeypatch.setattr(moekit.kernels.cpu, "route_train_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ours, theirs = (B.peak_alloc_mb(B.make_step(m, x, "fwd+bwd")) for m in (layer, hf))
    assert calls  # (the few-token step ran)
    assert ours is not None and theirs is not None and ours <= theirs, (ours * 2**20, theirs * 2**20)


def test_routing_hook_sees_every_forward_and_can_be_removed():
    layer = make("mixtral", "auto")
    seen = []
    handle = layer.register_routing_hook(lambda l, x, routed, plan: seen.append((x.shape[0], plan.counts_E.sum())))
    layer(torch.randn(3, 16))
    assert seen == [(3, 6)]
    handle.remove()
    layer(torch.randn(3, 16))
    assert len(seen) == 1


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude (floored at 1e-3: a gradient that is zero
    in exact arithmetic may come out as rounding noise)."""
    return (a.double() - b.double()).abs().max().div(b.double().abs().max().clamp_min(1e-3)).item() if b.numel() else 0.0


def _random_case(seed: int) -> dict:
    """A layer and a batch of random sizes and options, reaching every kernel path the CPU has (few-token decode
    and training steps, dot-product, swapped and packed tiles, packed token rows from 256 rows per expert, library
    GEMMs)."""
    r = random.Random(seed)
    E = r.choice([1, 2, 3, 4, 8, 16])
    K = r.randint(1, min(E, 4))
    router = r.choice(["softmax_topk", "topk_softmax", "sigmoid_topk", "switch"])
    opts = dict(activation=r.choice(ACTIVATIONS), expert_bias=r.random() < 0.3)
    if r.random() < 0.2:
        opts["shared_experts"] = 1
    if r.random() < 0.2:
        opts.update(capacity_factor=r.choice([0.5, 1.25]), drop_policy=r.choice(["probs", "position"]))
    return dict(D=r.choice([8, 13, 40, 64, 96]), F=r.choice([5, 24, 48, 100, 160]), E=E,
                K=1 if router == "switch" else K, T=r.choice([0, 1, 2, 5, 16, 17, 64, 130, 320, 700, 1100, 2100]),
                router=router, opts=opts, dtype=r.choice([torch.float32, torch.float32, torch.bfloat16]),
                train=r.random() < 0.6, threads=r.choice([1, 2]))


@pytest.mark.parametrize("seed", range(40))
def test_the_fast_paths_match_the_loop_reference_at_any_size(seed):
    """The default backend against the loop reference in float64 (same weights, same batch), output, input gradient
    and every parameter's gradient: no further from it than 3x the loop backend in the layer's own dtype (both route
    in that dtype: a near-tie that float64 breaks the other way moves both), and within 2e-4 (fp32) / 5e-2 (bf16)
    wherever that is the looser bound."""
    c = _random_case(seed)
    torch.manual_seed(seed)
    ref = moekit.MoE(c["D"], c["F"], c["E"], c["K"], router=c["router"], backend="loop", **c["opts"])
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:  # non-zero biases
                p.uniform_(-0.1, 0.1)
    fast = moekit.MoE(c["D"], c["F"], c["E"], c["K"], router=c["router"], **c["opts"])
    exact = moekit.MoE(c["D"], c["F"], c["E"], c["K"], router=c["router"], backend="loop", **c["opts"])
    fast.load_state_dict(ref.state_dict())
    exact.load_state_dict(ref.state_dict())
    x = torch.randn(1, c["T"], c["D"])
    out = {}
    with num_threads(c["threads"]):
        for name, layer, dtype in (("fast", fast, c["dtype"]), ("loop", ref, c["dtype"]),
                                   ("exact", exact, torch.float64)):
            layer.to(dtype).train(c["train"])
            if c["train"]:
                out[name] = run_fwd_bwd(layer, x.to(dtype))
            else:
                with torch.no_grad():
                    out[name] = (layer(x.to(dtype)), None, {})
    tol = 2e-4 if c["dtype"] == torch.float32 else 5e-2
    got, loop, want = out["fast"], out["loop"], out["exact"]
    assert got[0].dtype == c["dtype"] and got[0].shape == x.shape
    pairs = [("y", got[0], loop[0], want[0])]
    if c["train"]:
        pairs.append(("dx", got[1], loop[1], want[1]))
        assert got[2].keys() == want[2].keys()
        pairs += [(k, got[2][k], loop[2][k], want[2][k]) for k in want[2]]
    for name, g, lp, w in pairs:
        assert _rel_err(g, w) <= max(tol, 3 * _rel_err(lp, w)), (name, _rel_err(g, w), _rel_err(lp, w))


# --------------------------------------------------------------------------------------------------- float64
def _float64_fd_error(layer, T: int, token_ids: bool = False) -> float:
    """Relative distance between a central finite difference (step 1e-6) of a float64 layer's output and its exact
    directional derivative (forward-mode AD): ~1e-10 where everything runs in float64; an fp32 rounding anywhere on
    the way (1e-8 of the output) puts ~1e-2 into the difference."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, layer.config.d_model, dtype=torch.float64, generator=g)
    v = torch.randn(x.shape, dtype=torch.float64, generator=g)
    ids = torch.randint(0, 16, (T,), generator=g) if token_ids else None
    f = (lambda z: layer(z, token_ids=ids)) if token_ids else layer
    with torch.no_grad():
        fd = (f(x + 1e-6 * v) - f(x - 1e-6 * v)) / 2e-6
    exact = torch.func.jvp(f, (x,), (v,))[1]
    assert f(x).dtype == torch.float64
    return ((fd - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("T", [2, 40, 600])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_float64_layer_computes_in_float64(backend, T):
    """A float64 layer (e.g. for finite-difference checks) routes, sums its experts' outputs and adds its shared
    experts in float64, on every backend (the CPU kernels' float64 layers run one product per expert), in
    training (balancing losses in float64) and in inference. (Router logits, sums and losses were fp32: a float64
    layer's output was 3-8e-8 from an exact computation.)"""
    torch.manual_seed(0)
    layer = moekit.MoE(16, 24, 4, 2, backend=backend, shared_experts=1, z_loss_coef=0.1).double()
    assert _float64_fd_error(layer.eval(), T) < 1e-6
    layer.train()(torch.randn(T, 16, dtype=torch.float64)).sum().backward()
    assert layer.stats["aux_loss"].dtype == layer.stats["z_loss"].dtype == torch.float64


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_routers_compute_in_float64(name):
    k, kw = CASES[name]
    torch.manual_seed(0)
    layer = moekit.MoE(16, 24, 4, k, router=name, router_kwargs=kw).double().eval()
    assert _float64_fd_error(layer, 40, token_ids=name == "hash") < 1e-6
