"""The router zoo: hand-computed routing per family, determinism, gradients through the layer, learning."""

import itertools
import math

import pytest
import torch

import moekit
from moekit.routing import (ROUTERS, BaseLayerRouter, ExpertChoice, GShardTop2, HashRouter, HierarchicalRouter,
                            NoisyTopK, ReLURouter, SinkhornRouter, TopPRouter)
from moekit.routing.base_layer import balanced_assignment
from moekit.routing.sinkhorn import sinkhorn

from .router_cases import CASES

E, D = 4, 8


def layer_for(name, **extra):
    top_k, kwargs = CASES[name]
    return moekit.MoE(D, 16, E, top_k, router=name, router_kwargs=kwargs, **extra)


def call(layer, x, name):
    ids = torch.randint(0, 16, x.shape[:-1]) if name == "hash" else None
    return layer(x, token_ids=ids) if ids is not None else layer(x)


def test_every_registered_router_has_a_case():
    assert set(CASES) == set(ROUTERS)


# ------------------------------------------------------------------------------------------- hand-computed
def test_noisy_topk_eval_is_softmax_over_kept_logits_and_losses_in_training():
    r = NoisyTopK(D, E, 2)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = r.route(logits)
    assert out.topk_ids_TK.tolist() == [[1, 2]]
    e = torch.exp(torch.tensor([3.0, 2.0]))
    assert torch.allclose(out.topk_weights_TK[0], e / e.sum())
    with torch.no_grad():
        r.w_noise.normal_()
    r.train()
    x = torch.randn(64, D)
    o = r(x)
    assert set(o.aux_losses) == {"importance_loss", "load_loss"}
    (o.aux_losses["load_loss"] + o.topk_weights_TK.sum()).backward()
    assert r.w_noise.grad.abs().sum() > 0  # the load loss trains the noise scale
    r.eval()
    assert r(x).aux_losses == {}


def test_gshard_second_expert_dropped_when_weak():
    r = GShardTop2(D, E)
    logits = torch.tensor([[10.0, -10.0, -10.0, -10.0], [1.0, 1.0, -10.0, -10.0]])
    r.eval()
    o = r.route(logits)
    assert (o.topk_ids_TK >= 0).all() and torch.allclose(o.topk_weights_TK.sum(-1), torch.ones(2))
    r.train()
    kept = sum((r.route(logits).topk_ids_TK[:, 1] >= 0).int() for _ in range(200))
    assert kept[0] < 5  # g2 ~ 1e-9: kept with probability 2*g2
    assert kept[1] == 200  # g2 = 0.5: 2*g2 = 1, always kept


def test_expert_choice_each_expert_takes_its_best_tokens():
    r = ExpertChoice(D, 2, 1)  # c = 1 -> C = ceil(4 * 1 / 2) = 2 tokens per expert
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 0.5]])
    o = r.route(logits)
    p = torch.softmax(logits, -1)
    chosen = (o.topk_ids_TK >= 0)
    assert chosen[:, 0].tolist() == [True, True, False, False]   # expert 0: tokens 0 and 1
    assert chosen[:, 1].tolist() == [False, False, True, True]   # expert 1: tokens 2 and 3
    assert torch.allclose(o.topk_weights_TK[chosen], p[chosen])
    assert r.capacity(4) == 2 and ExpertChoice(D, 2, 1, capacity_factor=0.5).capacity(4) == 1


def test_soft_moe_slots_are_convex_mixes():
    torch.manual_seed(0)
    layer = moekit.MoE(D, 16, E, 1, router="soft_moe", router_kwargs={"slots": 2})
    x = torch.randn(3, 5, D)
    y = layer(x)
    o = layer.router(x.reshape(-1, D), moekit.routing.RoutingContext(seq_len=5))
    d, c = o.soft.dispatch_BLX, o.soft.combine_BLX
    assert torch.allclose(d.sum(1), torch.ones(3, E * 2)) and torch.allclose(c.sum(2), torch.ones(3, 5))
    # by hand: slot inputs, each slot through its expert, combine
    slots = torch.einsum("blx,bld->bxd", d, x)
    ex = layer.experts
    outs = torch.stack([ex.activation(slots[:, j] @ ex.w_in[j // 2].T) @ ex.w_out[j // 2].T for j in range(E * 2)], 1)
    assert torch.allclose(y, torch.einsum("blx,bxd->bld", c, outs), atol=1e-5)


def test_hash_routing_tables_and_errors():
    r = HashRouter(D, 4, 1, vocab_size=6)  # round-robin
    assert r.table_VK.flatten().tolist() == [0, 1, 2, 3, 0, 1]
    counts = [100, 1, 1, 1, 50, 50]
    rb = HashRouter(D, 2, 1, vocab_size=6, token_counts=counts)
    load = [sum(c for c, e in zip(counts, rb.table_VK.flatten().tolist()) if e == j) for j in range(2)]
    assert load == [101, 102] or load == [102, 101]  # greedy by frequency: as even as it gets
    rr = HashRouter(D, 4, 2, vocab_size=50, method="random", seed=1)
    assert (rr.table_VK[:, 0] != rr.table_VK[:, 1]).all()
    assert torch.equal(rr.table_VK, HashRouter(D, 4, 2, vocab_size=50, method="random", seed=1).table_VK)
    layer = moekit.MoE(D, 16, 4, 1, router="hash", router_kwargs={"vocab_size": 6})
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(2, D))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 6\)"):
        layer(torch.randn(2, D), token_ids=torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        layer(torch.randn(2, D), token_ids=torch.tensor([1]))
    ids = torch.tensor([0, 5, 3])
    layer(torch.randn(3, D), token_ids=ids)
    assert layer.stats["tokens_per_expert"].tolist() == [1, 1, 0, 1]


def test_base_assignment_is_optimal_and_balanced():
    torch.manual_seed(0)
    scores = torch.randn(6, 3)
    got = balanced_assignment(scores)
    assert torch.bincount(got, minlength=3).tolist() == [2, 2, 2]
    best = max((sum(scores[t, a[t]].item() for t in range(6)), a) for a in itertools.product(range(3), repeat=6)
               if all(a.count(e) == 2 for e in range(3)))
    assert math.isclose(sum(scores[t, got[t]].item() for t in range(6)), best[0], rel_tol=1e-9)
    r = BaseLayerRouter(D, 3)
    r.eval()
    o = r.route(scores)
    assert torch.equal(o.topk_ids_TK[:, 0], scores.argmax(-1))
    assert torch.allclose(o.topk_weights_TK[:, 0], torch.sigmoid(scores.max(-1).values))


def test_sinkhorn_balances_columns():
    torch.manual_seed(0)
    logits = torch.randn(64, 4) * 3 + torch.tensor([4.0, 0, 0, 0])
    plan = sinkhorn(logits, iters=30)
    assert torch.allclose(plan.sum(1), torch.ones(64), atol=1e-4)
    assert torch.allclose(plan.sum(0), torch.full((4,), 16.0), atol=0.05)
    r = SinkhornRouter(D, 4, 1)
    r.train()
    load_train = torch.bincount(r.route(logits).topk_ids_TK[:, 0], minlength=4)
    r.eval()
    load_eval = torch.bincount(r.route(logits).topk_ids_TK[:, 0], minlength=4)
    assert load_train.max() < load_eval.max()


def test_top_p_takes_fewest_experts_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]]))
    o = TopPRouter(D, 4, 3, p=0.6).route(logits)
    assert (o.topk_ids_TK >= 0).sum(-1).tolist() == [2, 1]
    assert o.topk_ids_TK[0, :2].tolist() == [0, 1]
    assert torch.allclose(o.topk_weights_TK[0, :2], torch.tensor([0.5, 0.3]))
    o = TopPRouter(D, 4, 3, p=0.95, min_k=2).route(logits)
    assert (o.topk_ids_TK >= 0).sum(-1).tolist() == [3, 2]  # capped at top_k=3; min_k=2


def test_relu_router_uses_positive_gates_and_adapts_l1():
    r = ReLURouter(D, 4, 4, k_target=1)
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    o = r.route(logits)
    assert sorted(i for i in o.topk_ids_TK[0].tolist() if i >= 0) == [0, 2]
    assert sorted(o.topk_weights_TK[0].tolist()) == [0.0, 0.0, 1.0, 2.0]
    r.train()
    before = r.l1_coef.item()
    r.route(logits)  # 2 active > target 1: penalty grows
    assert r.l1_coef.item() == pytest.approx(before * 1.05)
    r.route(torch.tensor([[-1.0, -1.0, -1.0, -1.0]]))  # 0 active < 1: shrinks
    assert r.l1_coef.item() == pytest.approx(before)


def test_hierarchical_joint_probabilities():
    r = HierarchicalRouter(D, 4, 1, n_group=2, topk_group=1)
    logits = torch.tensor([[0.0, 1.0, 5.0, 5.0]])
    groups = torch.tensor([[2.0, 0.0]])  # group 0 favoured although group 1 has the larger expert logits
    o = r._route(logits, groups)
    pg = torch.softmax(groups, -1)[0]
    pe = torch.softmax(torch.tensor([0.0, 1.0]), -1)
    assert o.topk_ids_TK.tolist() == [[1]]
    assert torch.allclose(o.topk_weights_TK[0, 0], pg[0] * pe[1])
    assert torch.allclose(o.probs_TE.sum(), torch.tensor(1.0))


# ----------------------------------------------------------------------------------- every router, generic
@pytest.mark.parametrize("name", sorted(CASES))
def test_router_deterministic_in_eval_and_trains_through_layer(name):
    torch.manual_seed(0)
    layer = layer_for(name)
    x = torch.randn(2, 6, D, requires_grad=True)
    ids = torch.randint(0, 16, (2, 6))
    kw = {"token_ids": ids} if name == "hash" else {}
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x, **kw), layer(x, **kw))
    layer.train()
    y = layer(x, **kw)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for n, p in layer.named_parameters() if n.startswith("router.") and p.grad is not None]
    if name != "hash":  # hash routing has no router parameters by design
        assert grads and any(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_router_takes_an_empty_batch(name):
    """No tokens (an empty batch, sequences of length 0): an empty output in inference and in training, gradients
    of zeros, no tokens per expert; or, where the router cannot route an empty batch, a clear error."""
    torch.manual_seed(0)
    layer = layer_for(name)
    for shape in [(0, D), (2, 0, D)]:
        x = torch.randn(*shape, requires_grad=True)
        ids = torch.randint(0, 16, shape[:-1])
        kw = {"token_ids": ids} if name == "hash" else {}
        layer.eval()
        with torch.no_grad():
            assert layer(x, **kw).shape == shape
        layer.train()
        layer.zero_grad(set_to_none=True)
        y = layer(x, **kw)
        assert y.shape == shape
        y.sum().backward()  # (with the balancing losses the layer attaches to y)
        assert x.grad.shape == shape
        assert int(layer.stats["tokens_per_expert"].sum()) == 0
        for n, p in layer.named_parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, n


def synthetic_task(n=64, L=8, V=16, tasks=4, seed=0):
    """Token sequences whose first token names one of 4 tasks; the target of each token is a task-specific map."""
    g = torch.Generator().manual_seed(seed)
    task = torch.randint(0, tasks, (n,), generator=g)
    tok = torch.randint(0, V, (n, L), generator=g)
    perms = torch.stack([torch.randperm(V, generator=g) for _ in range(tasks)])
    return tok, task, perms[task[:, None], tok]


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiny_model_learns_with_every_router(name):
    torch.manual_seed(0)
    V, tasks = 16, 4
    tok, task, target = synthetic_task(V=V, tasks=tasks)
    top_k, kwargs = CASES[name]
    emb, temb = torch.nn.Embedding(V, D), torch.nn.Embedding(tasks, D)
    moe = moekit.MoE(D, 32, E, top_k, router=name, router_kwargs=kwargs)
    head = torch.nn.Linear(D, V)
    params = [*emb.parameters(), *temb.parameters(), *moe.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def loss_fn():
        h = emb(tok) + temb(task)[:, None]
        h = h + moe(h, token_ids=tok) if name == "hash" else h + moe(h)
        return torch.nn.functional.cross_entropy(head(h).reshape(-1, V), target.reshape(-1))

    start = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * start, (name, start, loss.item())
