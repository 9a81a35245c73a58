"""Balancing: auxiliary losses (values and gradient path), z-loss, auxiliary-loss-free bias."""

import pytest
import torch

import moekit
from moekit.balance import expert_load, load_balancing_loss, router_z_loss, sequence_balancing_loss

from .helpers import max_err


def test_switch_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    ids = torch.tensor([[0], [1]])
    # f = [1/2, 1/2, 0], P = [0.4, 0.4, 0.2] -> 3 * (0.2 + 0.2) = 1.2
    assert torch.isclose(load_balancing_loss(probs, ids), torch.tensor(1.2))
    uniform = torch.full((6, 3), 1 / 3)
    assert torch.isclose(load_balancing_loss(uniform, torch.tensor([[0], [1], [2]] * 2)), torch.tensor(1.0))


def test_sequence_loss_is_per_sequence_mean():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    ids = torch.tensor([[0], [0], [1], [0]])
    # seq 1: f=[1,0], P=[1,0] -> 2*1 = 2 ; seq 2: f=[.5,.5], P=[.25,.75] -> 2*.5 = 1 ; mean 1.5
    assert torch.isclose(sequence_balancing_loss(probs, ids, seq_len=2), torch.tensor(1.5))
    assert torch.isclose(sequence_balancing_loss(probs, ids, seq_len=4), load_balancing_loss(probs, ids))
    with pytest.raises(ValueError, match="do not split"):
        sequence_balancing_loss(probs, ids, seq_len=3)


def test_z_loss_and_load():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    lse = torch.log(torch.tensor(2.0))
    assert torch.isclose(router_z_loss(logits), ((lse**2) + (1 + lse) ** 2) / 2)
    assert expert_load(torch.tensor([[0, 1], [1, -1]]), 3).tolist() == [1.0, 2.0, 0.0]
    assert load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("path", ["plan", "few_token_step", "dynamic_k", "capacity"])
def test_layer_loss_and_load_from_the_dispatch_counts_equal_the_routing_counted(path):
    """A dropless layer hands its dispatch's slot counts to the switch loss and the bias load instead of counting the
    routing again; with capacity (kept slots fewer than the demand) it counts the routing. Either way the loss and
    the load are those of the routing's own counts."""
    torch.manual_seed(0)
    kw = dict(dynamic_k=dict(router="top_p", router_kwargs=dict(p=0.6)), capacity=dict(capacity_factor=0.5)).get(
        path, {})
    layer = moekit.MoE(16, 24, 8, 2, aux_loss_coef=0.01, bias_update_rate=0.1, bias_update="manual",
                       backend="auto" if path == "few_token_step" else "segment", **kw)
    seen = {}
    if path != "few_token_step":  # (a hook sends a training step down the regular path)
        layer.register_routing_hook(lambda mod, x, routed, plan: seen.update(routed=routed))
    x = torch.randn(2 if path == "few_token_step" else 40, 16, requires_grad=True)
    calls = []
    step = layer._fused_train_step
    layer._fused_train_step = lambda x_TD: calls.append(step(x_TD)) or calls[-1]
    layer(x).sum().backward()
    if path == "few_token_step":
        assert calls[-1] is not None, "the few-token training step did not run"
        seen["routed"] = layer.router(x.detach())
    routed = seen["routed"]
    demand = expert_load(routed.topk_ids_TK, 8)
    assert torch.equal(layer.load_accum, demand)
    assert (layer.stats["dropped"] > 0) == (path == "capacity")
    want = load_balancing_loss(routed.probs_TE.detach(), routed.topk_ids_TK)
    assert torch.allclose(layer.stats["aux_loss"], want, rtol=1e-6, atol=0), (layer.stats["aux_loss"], want)
    assert torch.equal(load_balancing_loss(routed.probs_TE, routed.topk_ids_TK, demand.long()), want)


@pytest.mark.parametrize("aux,z_coef", [("switch", 0.1), ("seq", 0.1), ("switch", 0.0)])
def test_aux_loss_reaches_router_gradient_without_the_user(aux, z_coef):
    """The attached losses' gradient reaches the router exactly; the Switch loss alone (z_coef 0) attaches through
    its own one-node Function (:class:`moekit.balance.AttachSwitchLoss`), the rest through the losses' graph."""
    torch.manual_seed(0)
    layer = moekit.MoE(8, 16, 4, 2, aux_loss=aux, aux_loss_coef=0.5, z_loss_coef=z_coef)
    x = torch.randn(3, 5, 8)
    y = layer(x)
    fused = aux == "switch" and z_coef == 0
    assert (type(y.grad_fn).__name__ == "AttachSwitchLossBackward") == fused, y.grad_fn
    (y * 0).sum().backward()  # the task loss gives the router no gradient at all ...
    got = layer.router.weight.grad.clone()
    # ... so the router's gradient must be exactly that of 0.5 * aux + 0.1 * z computed by hand.
    layer.zero_grad()
    r = layer.router(x.reshape(-1, 8))
    lb = (sequence_balancing_loss(r.probs_TE, r.topk_ids_TK, 5) if aux == "seq"
          else load_balancing_loss(r.probs_TE, r.topk_ids_TK))
    (0.5 * lb + z_coef * router_z_loss(r.logits_TE)).backward()
    assert got.abs().sum() > 0
    assert torch.allclose(got, layer.router.weight.grad, atol=1e-7)
    assert torch.isclose(layer.stats["aux_loss"], lb.detach())
    assert ("z_loss" in layer.stats) == (z_coef > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_switch_loss_and_gradient_equal_the_loss_differentiated(dtype):
    """:func:`moekit.balance.load_balancing_loss_and_gradient` (what the one-node attachment sends back) is the loss
    and autograd's gradient of it, counting empty slots out, in the loss's dtype."""
    from moekit.balance import load_balancing_loss_and_gradient

    torch.manual_seed(0)
    probs = torch.randn(11, 6, dtype=dtype).softmax(-1).requires_grad_(True)
    ids = torch.randint(0, 6, (11, 3))
    ids[2, 1] = -1
    want = load_balancing_loss(probs, ids)
    want.backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    value, g_E = load_balancing_loss_and_gradient(probs, expert_load(ids, 6))
    assert value.dtype == g_E.dtype == dtype and not value.requires_grad and not g_E.requires_grad
    assert torch.allclose(value, want.detach(), rtol=tol, atol=0)
    assert torch.allclose(g_E.expand(11, 6), probs.grad, rtol=tol, atol=0)
    # the counts' sum given (no empty slot): the same; a wrong sum would scale both
    full = torch.randint(0, 6, (11, 3))
    want_full = load_balancing_loss(probs.detach(), full)
    for total in (33, None):
        v, g = load_balancing_loss_and_gradient(probs, expert_load(full, 6), total)
        assert torch.allclose(v, want_full, rtol=tol, atol=0) and torch.allclose(g.sum() * 11 / 6, g.new_ones(()))
    assert not torch.allclose(load_balancing_loss_and_gradient(probs, expert_load(full, 6), 30)[0], want_full)


def test_aux_loss_scale_and_switch_off():
    torch.manual_seed(0)
    layer = moekit.MoE(8, 16, 4, 2, aux_loss_coef=0.5)
    x = torch.randn(6, 8)
    (layer(x) * 0).sum().backward()
    g1 = layer.router.weight.grad.clone()
    layer.zero_grad()
    layer.aux_loss_scale = 0.25
    (layer(x) * 0).sum().backward()
    assert torch.allclose(layer.router.weight.grad, 0.25 * g1)
    off = moekit.MoE(8, 16, 4, 2, aux_loss=None)
    (off(x) * 0).sum().backward()
    assert off.router.weight.grad is None or off.router.weight.grad.abs().sum() == 0
    assert "aux_loss" not in off.stats
    zero = moekit.MoE(8, 16, 4, 2, aux_loss_coef=0.0)
    zero(x)
    assert "aux_loss" not in zero.stats


def test_no_aux_graph_in_inference():
    layer = moekit.MoE(8, 16, 4, 2)
    with torch.no_grad():
        y = layer(torch.randn(4, 8))
    assert y.grad_fn is None and "aux_loss" in layer.stats


def skewed_layer(**kw):
    torch.manual_seed(0)
    layer = moekit.MoE(8, 16, 8, 2, router="sigmoid_topk", aux_loss=None, **kw)
    with torch.no_grad():
        layer.router.weight[0] += 2.0  # expert 0 is favoured by every positive-leaning token
        layer.router.weight[1] += 1.0
    return layer


def imbalance(layer, x):
    with torch.no_grad():
        load = layer.stats["tokens_per_expert"].float() if layer(x) is not None else None
    return (load.max() / load.mean()).item()


def test_aux_loss_free_bias_balances_load_automatically():
    x = torch.randn(512, 8).abs()
    layer = skewed_layer(bias_update_rate=0.001)
    layer.eval()
    before = imbalance(layer, x)
    layer.train()
    for _ in range(400):
        layer(x)
    layer.eval()
    after = imbalance(layer, x)
    assert before > 2.0 and after < 1.2, (before, after)
    assert layer.router.expert_bias[0] < 0 < layer.router.expert_bias.max()


def test_manual_bias_update_accumulates_until_called():
    layer = skewed_layer(bias_update_rate=0.05, bias_update="manual")
    x = torch.randn(64, 8).abs()
    layer(x)
    layer(x)
    assert torch.all(layer.router.expert_bias == 0)
    assert layer.load_accum.sum().item() == 2 * 64 * 2
    layer.update_bias()
    assert layer.router.expert_bias[0].item() == pytest.approx(-0.05)
    assert layer.load_accum.sum().item() == 0
    with pytest.raises(ValueError, match="bias_update_rate > 0"):
        moekit.MoE(8, 16, 4, 2).update_bias()


def test_auto_bias_step_is_taken_before_the_next_forward():
    """``bias_update="auto"``: a training forward's load steps the bias when the layer next runs, before it routes
    (so the forward that saw the load, recomputed in backward under activation checkpointing, routes as it did)."""
    layer = skewed_layer(bias_update_rate=0.05)
    x = torch.randn(64, 8).abs()
    layer(x)
    assert torch.all(layer.router.expert_bias == 0) and layer.load_accum.sum().item() == 64 * 2
    load = layer.load_accum.clone()
    layer(x)
    want = torch.zeros_like(layer.router.expert_bias)
    moekit.balance.update_expert_bias(want, load, 0.05)
    assert torch.equal(layer.router.expert_bias, want) and layer.load_accum.sum().item() == 64 * 2


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kw", [dict(bias_update_rate=0.05), dict(bias_update_rate=0.05, bias_update="manual"),
                                dict(router="relu", top_k=3, alpha=2.0)], ids=["auto", "manual", "relu"])
def test_activation_checkpointing_gives_the_same_steps(kw, reentrant):
    """A layer under ``torch.utils.checkpoint`` (its forward recomputed in backward) trains exactly as without it:
    the same gradients, balancing bias, load and ReLU L1 coefficient over three steps. (The bias stepped at the end
    of each forward: the recomputation routed with the stepped bias, its gradients silently off (reentrant: an
    entry off by 1.67), and the recomputation stepped the bias, the load and the L1 coefficient a second time.)"""
    from torch.utils.checkpoint import checkpoint

    def train(checkpointed: bool):
        torch.manual_seed(0)
        opts = dict(kw)
        k = opts.pop("top_k", 2)
        router_kwargs = {"alpha": opts.pop("alpha")} if "alpha" in opts else {}
        layer = moekit.MoE(32, 48, 8, k, router_kwargs=router_kwargs, **opts)
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        grads = []
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            y = checkpoint(layer, x, use_reentrant=reentrant) if checkpointed else layer(x)
            y.pow(2).sum().backward()
            grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
        return grads, {n: b.clone() for n, b in layer.named_buffers()}

    (want, want_buffers), (got, got_buffers) = train(False), train(True)
    for step, (g, w) in enumerate(zip(got, want)):
        for name in w:
            assert max_err(g[name], w[name]) < 1e-5, (step, name)
    for name, b in want_buffers.items():
        assert torch.equal(got_buffers[name], b), name
    assert any(b.abs().sum() > 0 for n, b in want_buffers.items() if "bias" in n or "l1" in n or "load" in n)


def test_aux_loss_attach_class_follows_the_mode():
    """Outside torch.func transforms the losses attach through a Function without ``setup_context`` (whose ``apply``
    binds no signature: ~10 against ~60 us of host time a call); under a transform the one with ``setup_context``
    and a vmap rule, under forward-mode AD the one with a ``jvp``. Each attaches the same gradient."""
    from moekit.balance import AttachAuxLoss, AttachAuxLossFunc, AttachAuxLossJvp

    seen = []

    def f(y, aux):
        seen.append(AttachAuxLoss.pick())
        return seen[-1].apply(y, aux, 0.5).sum()

    y, aux = torch.randn(3, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    f(y, aux).backward()
    assert seen[-1] is AttachAuxLoss
    assert AttachAuxLoss.setup_context is torch.autograd.Function.setup_context  # (not overridden)
    assert (y.grad == 1).all() and aux.grad.item() == 0.5
    g_y, g_aux = torch.func.grad(f, argnums=(0, 1))(y.detach(), aux.detach())
    assert seen[-1] is AttachAuxLossFunc and (g_y == 1).all() and g_aux.item() == 0.5
    torch.func.jvp(lambda y: f(y, aux.detach()), (y.detach(),), (torch.ones(3),))
    assert seen[-1] is AttachAuxLossJvp
