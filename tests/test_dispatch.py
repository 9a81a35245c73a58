"""Property tests of the sort-based dispatcher (hypothesis) and the capacity policies."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit
from moekit.dispatch import LocalDispatcher
from moekit.routing import RouterOutput

from .helpers import max_err, run_fwd_bwd


@st.composite
def routings(draw, allow_empty=False):
    E = draw(st.integers(1, 9))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    if allow_empty and T and draw(st.booleans()):
        ids = torch.where(torch.rand(T, K, generator=g) < 0.3, -1, ids)
    w = torch.rand(T, K, generator=g)
    ro = RouterOutput(torch.zeros(T, E), torch.full((T, E), 1.0 / E), ids, w, may_have_empty=allow_empty)
    return ro, E, seed


@given(routings(allow_empty=True))
def test_permute_then_unpermute_is_identity(case):
    ro, E, seed = case
    plan = LocalDispatcher(E).plan(ro)
    T, K = ro.topk_ids_TK.shape
    assert sorted(plan.order_S.tolist()) == list(range(T * K))  # a permutation
    x = torch.randn(T, 5, generator=torch.Generator().manual_seed(seed))
    x_SD = plan.permute(x)
    assert torch.equal(x_SD, x[plan.order_S // K])
    # Un-permuting with unit weights sums each token K times (minus its empty slots).
    plan.weights_TK = torch.ones(T, K)
    n_valid = (ro.topk_ids_TK >= 0).sum(1, keepdim=True).float()
    assert torch.allclose(plan.combine(x_SD), x * n_valid, atol=1e-6)
    # Expert-contiguous: the sorted expert ids are non-decreasing, empties last.
    assert torch.all(plan.expert_S[1:] >= plan.expert_S[:-1])


@given(routings(allow_empty=True))
def test_counts_sum_to_valid_slots(case):
    ro, E, _ = case
    plan = LocalDispatcher(E).plan(ro)
    ids = ro.topk_ids_TK
    assert plan.counts_E.sum().item() == (ids >= 0).sum().item()
    if not ro.may_have_empty:
        assert plan.counts_E.sum().item() == ids.numel()  # T*K
    for e in range(E):
        assert plan.counts_E[e].item() == (ids == e).sum().item()
    assert plan.offsets_E.tolist() == torch.cumsum(plan.counts_E, 0).tolist()


@given(st.integers(1, 8), st.integers(1, 3), st.integers(0, 30), st.integers(0, 999), st.sampled_from(["swiglu", "gelu"]))
def test_each_output_is_weighted_sum_of_its_experts(E, K, T, seed, act):
    K = min(K, E)
    torch.manual_seed(seed)
    layer = moekit.MoE(6, 5, E, K, activation=act)
    x = torch.randn(T, 6)
    y = layer(x)
    ro = layer.router(x)
    ex = layer.experts
    expect = torch.zeros(T, 6)
    for t in range(T):
        for k in range(K):
            e = ro.topk_ids_TK[t, k]
            expect[t] += ro.topk_weights_TK[t, k] * (ex.activation(x[t] @ ex.w_in[e].T) @ ex.w_out[e].T)
    assert max_err(y, expect) < 1e-5


def reference_keep(ids, weights, E, capacity, policy):
    """Slow, obvious capacity rule: visit slots in priority order, keep while the expert has room."""
    T, K = ids.shape
    slots = [(t, k) for t in range(T) for k in range(K)]
    if policy == "probs":
        slots.sort(key=lambda tk: (-weights[tk].item(), tk[0] * K + tk[1]))
    used = [0] * E
    keep = torch.zeros(T, K, dtype=torch.bool)
    for t, k in slots:
        e = ids[t, k].item()
        if e >= 0 and used[e] < capacity:
            used[e] += 1
            keep[t, k] = True
    return keep


@given(routings(), st.floats(0.1, 2.0), st.sampled_from(["probs", "position"]))
def test_capacity_drops_exactly_the_policy_slots(case, cf, policy):
    ro, E, _ = case
    T, K = ro.topk_ids_TK.shape
    disp = LocalDispatcher(E, capacity_factor=cf, drop_policy=policy)
    plan = disp.plan(ro)
    capacity = max(1, math.ceil(cf * T * K / E))
    assert plan.capacity == capacity
    keep = reference_keep(ro.topk_ids_TK, ro.topk_weights_TK, E, capacity, policy)
    assert torch.equal(plan.ids_TK >= 0, keep)
    assert torch.equal(plan.ids_TK[keep], ro.topk_ids_TK[keep])
    assert plan.num_dropped.item() == T * K - keep.sum().item()
    assert (plan.counts_E <= capacity).all()


def test_capacity_position_example():
    # 4 tokens all want expert 0 (top-1), capacity 2 -> the first two tokens stay.
    ro = RouterOutput(torch.zeros(4, 2), torch.full((4, 2), 0.5), torch.zeros(4, 1, dtype=torch.long),
                      torch.tensor([[0.1], [0.9], [0.8], [0.2]]))
    pos = LocalDispatcher(2, capacity_factor=1.0, drop_policy="position").plan(ro)
    assert pos.ids_TK.flatten().tolist() == [0, 0, -1, -1]
    probs = LocalDispatcher(2, capacity_factor=1.0, drop_policy="probs").plan(ro)
    assert probs.ids_TK.flatten().tolist() == [-1, 0, 0, -1]


def test_dropped_tokens_get_zero_routed_output():
    layer = moekit.MoE(8, 16, 2, 1, router="switch", capacity_factor=0.5)
    x = torch.randn(12, 8)
    y = layer(x)
    plan = layer.dispatcher.plan(layer.router(x))
    dropped = (plan.ids_TK < 0).all(dim=1)
    assert dropped.any() and layer.stats["dropped"].item() == dropped.sum().item()
    assert torch.all(y[dropped] == 0)


def test_garbage_rows_never_leak(monkeypatch):
    """The grouped GEMM leaves rows past the last offset undefined; fill them with NaN and check nothing leaks."""
    from moekit.experts import backends

    real = backends._GROUPED_MM

    def nan_tail(x, w, offs):
        out = real(x, w, offs=offs)
        out[int(offs[-1]):] = float("nan")
        return out

    monkeypatch.setattr(backends, "_GROUPED_MM", nan_tail)
    for extra in (dict(), dict(expert_bias=True, activation="gpt_oss")):
        torch.manual_seed(0)
        layer = moekit.MoE(8, 16, 4, 2, capacity_factor=0.5, backend="grouped_mm", **extra)
        ref = moekit.MoE(8, 16, 4, 2, capacity_factor=0.5, backend="loop", **extra)
        ref.load_state_dict(layer.state_dict())
        x = torch.randn(20, 8)
        got, want = run_fwd_bwd(layer, x), run_fwd_bwd(ref, x)
        assert layer.stats["dropped"].item() > 0
        assert max_err(got[0], want[0]) < 1e-5 and max_err(got[1], want[1]) < 1e-5
        for k in want[2]:
            assert max_err(got[2][k], want[2][k]) < 1e-5, k


@pytest.mark.parametrize("backend", ["loop", "segment", "grouped_mm"])
def test_empty_slots_from_router_are_skipped(backend):
    """A router may leave slots empty (-1): they contribute nothing, forward or backward."""
    torch.manual_seed(0)
    layer = moekit.MoE(8, 16, 4, 2, backend=backend)
    x = torch.randn(6, 8)
    ro = layer.router(x)
    ids = ro.topk_ids_TK.clone()
    ids[::2, 1] = -1
    ro2 = RouterOutput(ro.logits_TE, ro.probs_TE, ids, ro.topk_weights_TK, may_have_empty=True)
    plan = layer.dispatcher.plan(ro2)
    y = layer.experts(x, plan)
    ex = layer.experts
    for t in range(6):
        expect = sum(ro.topk_weights_TK[t, k] * (ex.activation(x[t] @ ex.w_in[ids[t, k]].T) @ ex.w_out[ids[t, k]].T)
                     for k in range(2) if ids[t, k] >= 0)
        assert torch.allclose(y[t], expect, atol=1e-5)
