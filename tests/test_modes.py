"""The layer under PyTorch's Python dispatch modes: FakeTensorMode (tensors without data: shape inference, memory
planning), FlopCounterMode (counts every matrix product, moekit's operators included) and selective activation
checkpointing; and on the meta device. Under a mode no CPU kernel is called directly (it would read fake tensors'
missing data, and no mode would see its work): the layer runs PyTorch's operations and moekit's own operators."""

import functools
import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import FlopCounterMode

import moekit
from moekit.kernels import cpu as kcpu

from .helpers import max_err, run_fwd_bwd
from .router_cases import CASES

D, F_, E, K = 32, 48, 8, 2
# tokens per path: fused decode (1), decode kernel (16), few-token training step (16), sorted dispatch (300)
TOKENS = [1, 16, 300]


def _layer(backend="auto", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    layer = moekit.MoE(D, F_, E, K, backend=backend, **kw)
    return layer if dtype == torch.float32 else layer.to(dtype)  # (fake parameters cannot be converted)


def _flops(layer, x, train: bool) -> int:
    layer.train(train)
    x = x.detach().requires_grad_(train)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        y = layer(x)
        if train:
            y.sum().backward()
    return counter.get_total_flops()


def test_no_kernel_is_called_under_a_dispatch_mode():
    assert not kcpu.bypassed()
    with FlopCounterMode(display=False):
        assert kcpu.bypassed() and kcpu.library() is None
    assert not kcpu.bypassed()


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype,made", [(torch.float32, "fake"), (torch.float32, "real"), (torch.bfloat16, "real")])
def test_fake_tensors_give_the_shapes_and_gradients(T, train, dtype, made):
    """A layer made under the mode (fake parameters) or before it (real ones, fake inputs): shapes, dtypes and
    gradients. (The CPU kernels were called on fake tensors' data pointers: the process crashed.)"""
    layer = None if made == "fake" else _layer(dtype=dtype, shared_experts=1)
    with FakeTensorMode(allow_non_fake_inputs=made == "real"):
        layer = (layer or _layer(dtype=dtype, shared_experts=1)).train(train)
        x = torch.randn(2, T, D, dtype=dtype, requires_grad=train)
        with torch.set_grad_enabled(train):
            y = layer(x)
            assert isinstance(y, FakeTensor) and y.shape == x.shape and y.dtype == dtype
            if train:
                y.sum().backward()
                assert x.grad.shape == x.shape
                assert all(p.grad is not None and p.grad.shape == p.shape for p in layer.parameters())


@pytest.mark.parametrize("backend", ["auto", "fused", "segment"])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flop_counter_counts_what_the_loop_reference_counts(backend, T, dtype):
    """FlopCounterMode saw none of the experts' work (0 FLOPs for the whole layer on CPU); now every backend counts
    the products the loop reference counts (one ``mm`` per expert and projection, in autograd's backward too),
    forward and forward+backward, and computes the same output under the mode as without it."""
    x = torch.randn(T, D).to(dtype)
    layer, ref = _layer(backend, dtype), _layer("loop", dtype)
    for train in (False, True):
        want = _flops(ref, x, train)
        assert want > 0 and _flops(layer, x, train) == want, train
    experts = 2 * T * K * D * (2 * F_ + F_)  # the arithmetic, for the record: SwiGLU's two projections, then one
    assert _flops(layer, x, False) == experts + 2 * T * D * E  # ... and the router's logits
    layer.eval()
    with torch.no_grad():
        plain = layer(x)
        with FlopCounterMode(display=False):
            counted = layer(x)
    assert max_err(counted, plain) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_flop_counter_made_before_the_first_counted_layer():
    """A FlopCounterMode copies PyTorch's table of formulas when it is made; one made before moekit's operators are
    registered (the first time a layer runs under a dispatch mode) counts them too."""
    x = torch.randn(300, D)
    early = FlopCounterMode(display=False)
    with early:
        _layer()(x)
    assert early.get_flop_counts()["Global"][torch.ops.moekit.fused_experts] == 2 * 300 * K * D * 3 * F_


def test_flop_counter_with_fake_tensors_counts_every_slot():
    with FakeTensorMode():
        layer, x = _layer(), torch.randn(300, D)
        forward = 2 * 300 * K * D * 3 * F_ + 2 * 300 * D * E  # experts and router
        assert _flops(layer, x, False) == forward
        assert _flops(layer, x, True) == 3 * forward  # ... and both products' two gradients


@pytest.mark.parametrize("T", TOKENS)
def test_selective_activation_checkpointing_gives_the_same_gradients(T):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    class Checkpointed(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            context = functools.partial(create_selective_checkpoint_contexts, policy)
            return checkpoint(self.layer, x, use_reentrant=False, context_fn=context)

    layer = _layer(shared_experts=1)
    x = torch.randn(T, D)
    want = run_fwd_bwd(layer, x)
    got = run_fwd_bwd(Checkpointed(layer), x)
    assert max_err(got[0], want[0]) < 1e-5 and max_err(got[1], want[1]) < 1e-5
    for name, g in want[2].items():
        assert max_err(got[2][f"layer.{name}"], g) < 1e-5, name


def test_capacity_and_other_routers_under_fake_tensors():
    """Routers whose work stays in tensors run under fake tensors too (capacity dispatch, group-limited sigmoid)."""
    with FakeTensorMode():
        for layer in (_layer(capacity_factor=1.0), _layer(router="sigmoid_topk", router_kwargs=dict(n_group=4,
                                                                                                    topk_group=2))):
            x = torch.randn(300, D, requires_grad=True)
            layer(x).sum().backward()
            assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["auto", "fused", "segment"])
def test_meta_tensors_give_the_shapes_and_the_flop_count(backend):
    """A model made on the meta device (no memory, as for counting a large model's FLOPs): shapes, gradients and the
    FLOP count of real tensors. (Autocast's check raised on the meta device, before any expert ran.)"""
    x = torch.randn(300, D)
    want = (_flops(_layer(backend), x, False), _flops(_layer(backend), x, True))
    with torch.device("meta"):
        layer = moekit.MoE(D, F_, E, K, backend=backend, shared_experts=1)
        y = layer(torch.randn(2, 300, D))
        assert y.shape == (2, 300, D) and y.is_meta
        layer = moekit.MoE(D, F_, E, K, backend=backend)
        assert (_flops(layer, x.to("meta"), False), _flops(layer, x.to("meta"), True)) == want
        assert all(p.grad is not None and p.grad.is_meta for p in layer.parameters())


class _Wrapped(torch.Tensor):
    """A wrapper tensor subclass (as DTensor or a quantized weight is one): its data in ``elem``, none of its own;
    it records every operation it sees, then runs it on the unwrapped tensors."""

    seen: list = []

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device,
                                                   requires_grad=elem.requires_grad)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        unwrap = functools.partial(torch.utils._pytree.tree_map_only, _Wrapped, lambda t: t.elem)
        out = func(*unwrap(args), **unwrap(kwargs or {}))
        return torch.utils._pytree.tree_map_only(torch.Tensor, _Wrapped, out)


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("where", ["input", "weights"])
def test_tensor_subclass_sees_the_experts_operators(T, train, where):
    """A subclass input, or subclass expert weights: the layer's operations go through its dispatch (the experts as
    moekit's operators), with the plain layer's results and gradients. (The kernels read the wrapper's data
    pointer: the process crashed.)"""
    layer, ref = _layer(shared_experts=1).train(train), _layer(shared_experts=1).train(train)
    if where == "weights":
        layer.experts.gate_up_proj = torch.nn.Parameter(_Wrapped(layer.experts.gate_up_proj.detach().clone()))
    x, g = torch.randn(T, D), torch.randn(T, D)

    def run(layer, wrap: bool):
        """(output, input gradient, parameter gradients), unwrapped, each checked to be of the input's kind"""
        def unwrap(t):
            assert type(t) is (_Wrapped if wrap else torch.Tensor)
            return t.elem if wrap else t

        xi = (_Wrapped(x.clone()) if wrap and where == "input" else x.clone()).requires_grad_(train)
        with torch.set_grad_enabled(train):
            y = layer(xi)
            if not train:
                return unwrap(y), None, {}
            y.backward(g)
        grads = {n: p.grad for n, p in layer.named_parameters()}
        if where == "weights":  # (the gradients of the plain parameters stay plain)
            grads = {n: t for n, t in grads.items() if n == "experts.gate_up_proj"}
        return unwrap(y), xi.grad if where == "weights" else unwrap(xi.grad), {n: unwrap(t) for n, t in grads.items()}

    _Wrapped.seen = []
    y, dx, grads = run(layer, wrap=True)
    op = "experts_decode" if not train and T * K <= 2048 else "fused_experts"
    assert any(f"moekit.{op}" in name for name in _Wrapped.seen)
    y_ref, dx_ref, grads_ref = run(ref, wrap=False)
    assert max_err(y, y_ref) < 1e-5
    if train:
        assert max_err(dx, dx_ref) < 1e-5
        for name in grads:
            assert max_err(grads[name], grads_ref[name]) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_backend_under_the_modes(dtype):
    """``torch._grouped_mm`` counts (PyTorch has no formula for it); fake tensors run it in bf16 (its meta function
    takes nothing else: fp32 takes the segment backend there); and its feature test (public:
    ``grouped_mm_supported``), first run under a mode, runs on real tensors the mode does not see (under fake
    tensors it failed, and grouped_mm was off for good; a FlopCounterMode counted it)."""
    from moekit.experts import backends

    x = torch.randn(300, D).to(dtype)
    for train in (False, True):
        assert _flops(_layer("grouped_mm", dtype), x, train) == _flops(_layer("loop", dtype), x, train)
    want = backends.grouped_mm_supported("cpu", dtype)
    for mode in (FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False)):
        backends._SUPPORT_CACHE.clear()
        layer = _layer("grouped_mm", dtype)
        with mode:
            assert backends.grouped_mm_supported("cpu", dtype) == want
            assert layer(torch.randn(300, D).to(dtype)).shape == (300, D)
        assert backends._SUPPORT_CACHE == {("cpu", dtype): want}
    assert mode.get_total_flops() == 2 * 300 * K * D * 3 * F_ + 2 * 300 * D * E  # (the layer's, not the probe's)


@pytest.mark.parametrize("name", list(CASES))
def test_every_router_under_fake_tensors_and_the_flop_counter(name):
    """Every router in training and inference under fake tensors (shapes; the noisy top-k load loss's normal CDF
    validated its scale on the host, and hash routing's token-id check ran there: both failed), and under the FLOP
    counter with the experts counted (the expert-choice and soft routers included); the BASE router's training
    assignment, solved on the host from the scores' values, says so under fake tensors."""
    k, kwargs = CASES[name]
    for train in (False, True):
        layer = moekit.MoE(D, F_, E, k, router=name, router_kwargs=kwargs, allow_non_causal=True).train(train)
        extra = {"token_ids": torch.randint(0, 16, (40,))} if layer.router.needs_token_ids else {}
        x = torch.randn(40, D, requires_grad=train)
        with FakeTensorMode(allow_non_fake_inputs=True), torch.set_grad_enabled(train):
            if name == "base" and train:
                with pytest.raises(ValueError, match="fake and meta tensors"):
                    layer(x, **extra)
            else:
                y = layer(x, **extra)
                assert isinstance(y, FakeTensor) and y.shape == x.shape
                if train:
                    y.sum().backward()
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
            y = layer(x, **extra)
            if train:
                y.sum().backward()
        router = 2 * 40 * D * E * (3 if train else 1)  # (at most: the logits' product and its two gradients)
        assert counter.get_total_flops() > router + 2 * D * 3 * F_  # (and some expert's work)


def test_language_model_under_fake_tensors_the_flop_counter_and_on_meta():
    """moekit's language model: under fake tensors (its token-id check read the ids on the host: failed), and its
    experts' FLOPs counted the same on real and on meta tensors."""
    from moekit.models.config import get_preset
    from moekit.models.model import TransformerLM

    cfg = get_preset("tiny", vocab_size=64)
    ids = torch.randint(0, 64, (2, 16))
    counts = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            torch.manual_seed(0)
            model = TransformerLM(cfg)
        with FlopCounterMode(display=False) as counter:
            model(ids.to(device))
        counts.append(counter.get_flop_counts()["Global"])
    experts = [sum(v for op, v in c.items() if "moekit" in str(op)) for c in counts]
    assert experts[0] > 0 and experts[1] == experts[0]
    with FakeTensorMode():
        out = TransformerLM(cfg)(torch.randint(0, 64, (2, 16)))
    logits = out[0] if isinstance(out, tuple) else out
    assert isinstance(logits, FakeTensor) and logits.shape == (2, 16, 64)


def test_torch_func_grad_and_vmap():
    """``torch.func.grad`` over a training layer (balancing losses attached) gives autograd's gradients, and
    ``torch.func.vmap`` runs inference over a batch dimension. (The kernels read the transforms' wrapper tensors,
    which have no storage: both failed; the aux-loss Function lacked the setup_context these transforms need.)"""
    from torch.func import functional_call, grad, vmap

    layer = _layer(shared_experts=1)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    x = torch.randn(40, D)

    def loss(p, x):
        return functional_call(layer, p, (x,)).pow(2).sum()

    got = grad(loss)(params, x)
    layer.zero_grad(set_to_none=True)
    layer(x).pow(2).sum().backward()
    assert got.keys() == {n for n, p in layer.named_parameters()}
    for name, p in layer.named_parameters():
        assert max_err(got[name], p.grad) < 1e-5, name
    layer.eval()
    with torch.no_grad():
        batched = vmap(layer)(x.view(4, 10, D))
        assert max_err(batched, layer(x).view(4, 10, D)) < 1e-5


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("train", [False, True])
def test_forward_mode_ad_gives_the_tangents(T, train):
    """Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``): the tangent of the output equals the
    loop reference's and a central finite difference. (The fused paths dropped the tangent, silently: None.)"""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    layer, ref = _layer(shared_experts=1).train(train), _layer("loop", shared_experts=1).train(train)
    x, v = torch.randn(T, D), torch.randn(T, D)
    with fwAD.dual_level(), torch.set_grad_enabled(train):
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, v))).tangent
    assert tangent is not None
    assert max_err(tangent, jvp(ref, (x,), (v,))[1]) < 1e-5
    assert max_err(jvp(layer, (x,), (v,))[1], tangent) < 1e-5
    exact = _layer("loop", shared_experts=1).double().eval()
    eps = 1e-3  # (the router's logits are computed in fp32 even here)
    with torch.no_grad():
        fd = (exact((x + eps * v).double()) - exact((x - eps * v).double())) / (2 * eps)
    assert max_err(tangent, fd) < 1e-3 * fd.abs().max().item()


# -------------------------------------------------------------------------------- vmap: per-sample gradients
def _per_sample_grads(layer, x_BTD, token_ids=None, randomness="error"):
    """``torch.func.vmap(grad(loss))`` over the samples of ``x_BTD`` (each a batch of one sequence)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in layer.named_parameters()}

    def loss(p, x, ids):
        kwargs = {} if ids is None else {"token_ids": ids[None]}
        return functional_call(layer, p, (x[None],), kwargs).pow(2).sum()

    return vmap(grad(loss), in_dims=(None, 0, None if token_ids is None else 0), randomness=randomness)(
        params, x_BTD, token_ids)


def _eager_grads(layer, x_TD, token_ids=None):
    layer.zero_grad(set_to_none=True)
    y = layer(x_TD[None]) if token_ids is None else layer(x_TD[None], token_ids=token_ids[None])
    y.pow(2).sum().backward()
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}


VMAP_CASES = {name: dict(router=name, top_k=k, router_kwargs=kw) for name, (k, kw) in CASES.items()
              if name not in ("base", "noisy_topk", "gshard_top2")}  # (the assignment needs values; random ones)
VMAP_CASES.update({
    "capacity_position": dict(capacity_factor=1.0, drop_policy="position"),
    "capacity_probs_bias": dict(capacity_factor=0.75, expert_bias=True),
    "shared_seq_aux_z_loss": dict(shared_experts=1, aux_loss="seq", z_loss_coef=1e-2),
    "gelu_experts": dict(activation="gelu", expert_bias=True),
    "module_list_experts": dict(experts="modules"),
})


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("case", sorted(VMAP_CASES))
def test_vmap_per_sample_gradients_equal_autograd_per_sample(case, T):
    """``vmap(grad(loss))`` (per-sample gradients, e.g. for differentially private training) over a training layer,
    balancing losses attached: each sample's gradients equal autograd's on that sample alone. The routing picks a
    different set of tokens per sample, so the experts run every expert on every token there (the ``dense``
    backend; user expert modules likewise). (The dispatch's counts, the balancing losses' and three routers' masks
    were written in place, which vmap cannot batch, and the experts selected rows by value.)"""
    kw = dict(VMAP_CASES[case])
    k = kw.pop("top_k", K)
    if kw.pop("experts", None) == "modules":
        torch.manual_seed(0)
        kw["experts"] = [torch.nn.Sequential(torch.nn.Linear(D, 12), torch.nn.GELU(), torch.nn.Linear(12, D))
                         for _ in range(E)]
    torch.manual_seed(0)
    layer = moekit.MoE(D, F_, E, k, **kw)
    B = 3
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, CASES["hash"][1]["vocab_size"], (B, T)) if case == "hash" else None
    got = _per_sample_grads(layer, x, ids)
    for b in range(B):
        want = _eager_grads(layer, x[b], None if ids is None else ids[b])
        for name, g in want.items():
            assert max_err(got[name][b], g) <= 1e-5 * max(1.0, g.abs().max().item()), (case, b, name)


@pytest.mark.parametrize("router", ["noisy_topk", "gshard_top2"])
def test_vmap_with_random_routing_runs_with_a_randomness_flag(router):
    """Routers that draw random numbers in training run under ``vmap(..., randomness="different")`` (vmap's own error
    asks for the flag otherwise); the gradients are finite and each sample's differ."""
    k, kw = CASES[router]
    torch.manual_seed(0)
    layer = moekit.MoE(D, F_, E, k, router=router, router_kwargs=kw)
    got = _per_sample_grads(layer, torch.randn(3, 9, D), randomness="different")
    g = got["router.weight"]
    assert g.shape == (3, E, D) and bool(torch.isfinite(g).all()) and not torch.equal(g[0], g[1])


@pytest.mark.parametrize("T", [1, 16, 300])
def test_vmap_inference_equals_the_batched_layer(T):
    """Inference under vmap (one sample per call: the decode paths at a few tokens, the dispatch plan and every
    expert on every token beyond) equals the layer on the whole batch."""
    from torch.func import vmap

    layer = _layer(shared_experts=1).eval()
    x = torch.randn(4, T, D)
    with torch.no_grad():
        assert max_err(vmap(layer)(x), layer(x)) < 1e-5


def test_training_state_is_left_alone_inside_torch_func(caplog, monkeypatch):
    """Buffers a training forward updates (the auxiliary-loss-free bias's load, the ReLU router's L1 coefficient)
    are left as they are inside a torch.func transform, which its values cannot leave, with one warning each; the
    layer's stats after vmap are empty (not the transform's per-sample tensors, which fail on any later use)."""
    from torch.func import grad

    torch.manual_seed(0)
    layer = moekit.MoE(D, F_, E, 3, router="relu", bias_update_rate=1e-3, bias_update="manual")
    load, coef = layer.load_accum.clone(), layer.router.l1_coef.clone()
    monkeypatch.setattr(moekit.utils, "_FROZEN_WARNED", set())
    x = torch.randn(2, 8, D)
    with caplog.at_level(logging.WARNING, logger="moekit"):
        _per_sample_grads(layer, x)
        _per_sample_grads(layer, x)
    assert torch.equal(layer.load_accum, load) and torch.equal(layer.router.l1_coef, coef)
    assert layer.stats == {}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("bias and its load is not updated inside a torch.func transform" in m for m in messages) == 1
    assert sum("L1 coefficient is not updated" in m for m in messages) == 1  # (once per process)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)  # grad alone: stats stay usable
    assert float(layer.stats["tokens_per_expert"].sum()) > 0
    layer(x)  # outside: both updated
    assert not torch.equal(layer.load_accum, load) and not torch.equal(layer.router.l1_coef, coef)


def test_what_vmap_cannot_batch_says_so():
    from torch.func import vmap

    base = moekit.MoE(D, F_, E, 1, router="base")
    with pytest.raises(ValueError, match="torch.func transforms"):
        vmap(base)(torch.randn(2, 5, D))
    skip = moekit.MoE(D, F_, E, K, on_expert_failure="skip")
    with pytest.raises(RuntimeError, match="on_expert_failure='raise' under vmap"):
        vmap(skip)(torch.randn(2, 5, D))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (PyTorch's per-sample fallback for attention)
def test_vmap_per_sample_gradients_of_the_language_model():
    """moekit's language model (every layer's routing, balancing losses, attention): per-sample gradients of the
    next-token loss with ``vmap(grad(...))`` equal autograd's on each sequence alone."""
    from torch.func import functional_call, grad, vmap

    from moekit.models.config import get_preset
    from moekit.models.model import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(get_preset("tiny", vocab_size=64))
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))

    def loss(p, seq):
        logits = functional_call(model, p, (seq[None],))[0]
        return torch.nn.functional.cross_entropy(logits[0, :-1], seq[1:])

    params = {n: p.detach() for n, p in model.named_parameters()}
    got = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    for b in range(3):
        model.zero_grad(set_to_none=True)
        loss(dict(model.named_parameters()), ids[b]).backward()
        for name, p in model.named_parameters():
            assert max_err(got[name][b], p.grad) <= 1e-5 * max(1.0, p.grad.abs().max().item()), (b, name)


# ------------------------------------------------------------------------------ second order: Hessian-vector products
def _hvp_setup(z_coef: float = 0.1):
    """A training layer with both balancing losses attached (``z_coef`` 0: the Switch loss alone, through its
    one-node attachment), and the same layer with none plus the losses written out: their Hessian-vector products
    must agree."""
    from moekit.balance import load_balancing_loss, router_z_loss

    torch.manual_seed(0)
    attached = moekit.MoE(16, 24, 4, 2, backend="loop", aux_loss_coef=0.5, z_loss_coef=z_coef).double()
    plain = moekit.MoE(16, 24, 4, 2, backend="loop", aux_loss_coef=0.0, z_loss_coef=0.0).double()
    plain.load_state_dict(attached.state_dict())
    x = torch.randn(20, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = {n: p.detach() for n, p in attached.named_parameters()}
    v = {n: torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(2)) for n, p in params.items()}

    def loss(p):
        return torch.func.functional_call(attached, p, (x,)).pow(2).sum()

    def explicit(p):
        routed = torch.func.functional_call(plain.router, {"weight": p["router.weight"]}, (x,))
        return torch.func.functional_call(plain, p, (x,)).pow(2).sum() + \
            0.5 * load_balancing_loss(routed.probs_TE, routed.topk_ids_TK) + z_coef * router_z_loss(routed.logits_TE)

    _, want = torch.func.jvp(torch.func.grad(explicit), (params,), (v,))
    return loss, params, v, want


def _eager_hvp(loss, params, v):
    ps = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    g = torch.autograd.grad(loss(ps), list(ps.values()), create_graph=True)
    hv = torch.autograd.grad(sum((gi * v[n]).sum() for gi, n in zip(g, ps)), list(ps.values()))
    return dict(zip(ps, hv))


@pytest.mark.parametrize("z_coef", [0.1, 0.0])
def test_hessian_vector_products_count_the_balancing_losses_once(z_coef):
    """Hessian-vector products of a loss through a layer whose balancing losses are attached to its output equal
    those of the same loss with the balancing losses added explicitly: by double backward (the losses' Function
    added their gradient again in the second pass: the router weight's product off by 1%) and by forward-over-
    reverse ``jvp(grad(...))`` (which dropped the losses: not attached under forward-mode AD)."""
    loss, params, v, want = _hvp_setup(z_coef)
    _, fr = torch.func.jvp(torch.func.grad(loss), (params,), (v,))
    rr = _eager_hvp(loss, params, v)
    for name, w in want.items():
        tol = 1e-5 * w.abs().max().item()  # (the router's logits are fp32)
        assert max_err(fr[name], w) <= tol, ("jvp(grad)", name)
        assert max_err(rr[name], w) <= tol, ("double backward", name)
    assert want["router.weight"].abs().max() > 1.0


def test_reverse_over_reverse_transforms_refuse_attached_losses():
    """torch.func's reverse-over-reverse (``vjp`` of ``grad``) would count the attached losses' gradient wrongly:
    a clear error naming the exact ways instead."""
    loss, params, v, _ = _hvp_setup(0.0)
    with pytest.raises(RuntimeError, match="forward-over-reverse"):
        torch.func.vjp(torch.func.grad(loss), params)[1](v)


@pytest.mark.parametrize("backend", ["auto", "segment", "grouped_mm", "dense"])
@pytest.mark.parametrize("T", [4, 400, 1200])  # few-token training step; routing kernel; fused experts Function
@pytest.mark.parametrize("kw", [dict(aux_loss_coef=0.3, z_loss_coef=0.1),
                                dict(shared_experts=1, activation="gelu", expert_bias=True, capacity_factor=1.0)],
                         ids=["losses", "shared_gelu_capacity"])
def test_double_backward_through_every_path(backend, T, kw):
    """Double backward (``create_graph=True``, then a second backward: Hessian-vector products, gradient
    penalties) through the kernels' autograd Functions gives what forward-over-reverse gives on the loop
    reference: each Function's backward, where it builds a graph, differentiates its output recomputed in
    PyTorch's operations. (The routing kernel's backward treated its saved probabilities as constants: the
    router's products 20% off, silently; the fused experts and the few-token step failed, the ``segment``
    operator had no second derivative.)"""
    torch.manual_seed(0)
    ref = moekit.MoE(32, 48, 8, 2, backend="loop", **kw)
    layer = moekit.MoE(32, 48, 8, 2, backend=backend, **kw)
    layer.load_state_dict(ref.state_dict())
    params = {n: p.detach() for n, p in ref.named_parameters()}
    params["x"] = torch.randn(T, 32, generator=torch.Generator().manual_seed(1))  # (the input's terms too)
    v = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) for n, p in params.items()}

    def loss(module):
        return lambda p: torch.func.functional_call(module, {n: t for n, t in p.items() if n != "x"},
                                                    (p["x"],)).pow(2).sum()

    want = torch.func.jvp(torch.func.grad(loss(ref)), (params,), (v,))[1]
    got = _eager_hvp(loss(layer), params, v)
    for name, w in want.items():
        assert max_err(got[name], w) <= 1e-4 * w.abs().max().item(), name
