"""Robust routing: disabled experts, failing experts, causal safety, batch-prioritised capacity."""

import logging

import pytest
import torch

import moekit
from moekit.dispatch import LocalDispatcher
from moekit.routing import RouterOutput

from .router_cases import CASES


@pytest.mark.parametrize("name", ["softmax_topk", "topk_softmax", "sigmoid_topk", "noisy_topk", "gshard_top2",
                                  "sinkhorn", "top_p", "relu", "hierarchical", "expert_choice", "base", "switch"])
def test_disabled_experts_are_never_selected(name):
    torch.manual_seed(0)
    top_k, kwargs = CASES[name]
    layer = moekit.MoE(8, 16, 4, top_k, router=name, router_kwargs=kwargs)
    x = torch.randn(40, 8)
    layer.disable_experts([1, 2])
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        ids = layer.router(x).topk_ids_TK
        assert not torch.isin(ids, torch.tensor([1, 2])).any(), (name, mode)
        layer(x)
        assert layer.stats["tokens_per_expert"][[1, 2]].sum() == 0
    layer.enable_experts()
    layer.eval()
    assert torch.isin(layer.router(x).topk_ids_TK, torch.tensor([1, 2])).any()


def test_disabling_equals_masking_logits():
    torch.manual_seed(0)
    layer = moekit.MoE(8, 16, 6, 2)
    x = torch.randn(30, 8)
    layer.disable_experts(3)
    got = layer(x)
    with torch.no_grad():
        logits = layer.router.logits(x)
    manual = logits.clone()
    assert torch.isneginf(manual[:, 3]).all()
    layer.enable_experts(3)
    ref = layer.router.route(manual)
    plan = layer.dispatcher.plan(ref)
    assert torch.allclose(got, layer.experts(x, plan), atol=1e-6)


def test_tokens_whose_choices_are_all_down_go_to_best_remaining():
    layer = moekit.MoE(4, 8, 4, 2)
    with torch.no_grad():
        layer.router.weight.copy_(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
    x = torch.ones(1, 4)
    assert sorted(layer.router(x).topk_ids_TK[0].tolist()) == [0, 1]
    layer.disable_experts([0, 1])
    assert sorted(layer.router(x).topk_ids_TK[0].tolist()) == [2, 3]
    layer.disable_experts([2])  # only expert 3 left for 2 slots: one slot stays empty
    r = layer.router(x)
    assert sorted(r.topk_ids_TK[0].tolist()) == [-1, 3] and r.may_have_empty
    y = layer(x)
    assert torch.isfinite(y).all()


def test_disable_errors():
    layer = moekit.MoE(4, 8, 4, 2)
    with pytest.raises(ValueError, match="leave none"):
        layer.disable_experts([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"out of range for 4 experts"):
        layer.disable_experts([7])


class Flaky(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.mode = mode

    def forward(self, x):
        if self.mode == "raise":
            raise RuntimeError("expert is down")
        if self.mode == "nan":
            return self.lin(x) * float("nan")
        return self.lin(x)


def test_failing_experts_are_skipped_and_weights_renormalised(caplog):
    torch.manual_seed(0)
    experts = [Flaky("ok"), Flaky("raise"), Flaky("nan"), Flaky("ok")]
    layer = moekit.MoE(8, 8, 4, 2, experts=experts, on_expert_failure="skip")
    x = torch.randn(20, 8)
    with caplog.at_level(logging.WARNING):
        y = layer(x)
        layer(x)
    assert torch.isfinite(y).all()
    assert sum("expert 1 failed" in r.message for r in caplog.records) == 1  # logged once
    assert sum("expert 2 failed" in r.message for r in caplog.records) == 1
    assert layer.stats["expert_failures"].tolist() == [0, 2, 2, 0]
    r = layer.router(x)
    for t in range(20):
        ids, w = r.topk_ids_TK[t].tolist(), r.topk_weights_TK[t]
        alive = [k for k in range(2) if ids[k] in (0, 3)]
        expect = torch.zeros(8)
        if alive:
            scale = w.sum() / w[alive].sum()
            for k in alive:
                expect += w[k] * scale * experts[ids[k]](x[t:t + 1])[0]
        assert torch.allclose(y[t], expect, atol=1e-5), t
    y.sum().backward()  # the surviving path is differentiable
    assert experts[0].lin.weight.grad is not None


def test_failure_raises_by_default():
    layer = moekit.MoE(8, 8, 2, 2, experts=[Flaky("ok"), Flaky("raise")])
    with pytest.raises(RuntimeError, match="expert is down"):
        layer(torch.randn(4, 8))


def test_fused_experts_nan_weights_skipped():
    torch.manual_seed(0)
    layer = moekit.MoE(8, 16, 4, 2, on_expert_failure="skip")
    with torch.no_grad():
        layer.experts.down_proj[2].fill_(float("nan"))
    y = layer(torch.randn(32, 8))
    assert torch.isfinite(y).all() and layer.stats["expert_failures"][2] == 1


@pytest.mark.parametrize("name", ["expert_choice", "soft_moe", "base", "sinkhorn"])
def test_non_causal_routers_refused_in_causal_models(name):
    top_k, kwargs = CASES[name]
    with pytest.raises(ValueError, match="not causal"):
        moekit.MoE(8, 16, 4, top_k, router=name, router_kwargs=kwargs, causal=True)
    moekit.MoE(8, 16, 4, top_k, router=name, router_kwargs=kwargs, causal=True, allow_non_causal=True)
    moekit.MoE(8, 16, 4, 2, router="softmax_topk", causal=True)


def test_batch_priority_capacity():
    # 4 tokens, top-2, 2 experts, capacity 2: all first choices first, by token priority (max weight)
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.55, 0.45]])
    ro = RouterOutput(torch.zeros(4, 2), torch.full((4, 2), 0.5), ids, w)
    plan = LocalDispatcher(2, capacity_factor=0.5, drop_policy="batch_priority").plan(ro)
    assert plan.capacity == 2
    # expert 0 first choices by priority: t1 (0.9), t0 (0.6), t3 (0.55) -> keeps t1, t0; expert 1: t2 (0.7), then
    # second choices by priority: t1 (0.1) -> keeps t2, t1
    keep = plan.ids_TK >= 0
    assert keep.tolist() == [[True, False], [True, True], [True, False], [False, False]]
