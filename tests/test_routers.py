"""Routers: hand-computed routing on small inputs."""

import pytest
import torch

from moekit.routing import GroupLimitedTopK, SoftmaxTopK, SwitchTop1, TopKSoftmax, build_router


def with_logits(router, logits):
    """Route fixed logits through a router (bypassing its gate)."""
    return router.route(torch.tensor(logits, dtype=torch.float32))


def test_softmax_topk_renormalised_and_not():
    logits = [[2.0, 1.0, 0.0, -1.0]]
    p = torch.softmax(torch.tensor(logits), -1)[0]
    r = with_logits(SoftmaxTopK(4, 4, 2), logits)
    assert r.topk_ids_TK.tolist() == [[0, 1]]
    assert torch.allclose(r.topk_weights_TK[0], p[:2] / p[:2].sum())
    r = with_logits(SoftmaxTopK(4, 4, 2, renormalize=False, scale=2.0), logits)
    assert torch.allclose(r.topk_weights_TK[0], 2.0 * p[:2])
    assert torch.allclose(r.probs_TE[0], p)


def test_topk_softmax_gpt_oss_style():
    r = with_logits(TopKSoftmax(4, 4, 2), [[0.0, 3.0, 1.0, 2.0]])
    assert r.topk_ids_TK.tolist() == [[1, 3]]
    e = torch.exp(torch.tensor([3.0, 2.0]))
    assert torch.allclose(r.topk_weights_TK[0], e / e.sum())


def test_switch_top1_keeps_raw_probability():
    r = with_logits(SwitchTop1(4, 3), [[0.0, 1.0, 0.5]])
    p = torch.softmax(torch.tensor([0.0, 1.0, 0.5]), -1)
    assert r.topk_ids_TK.tolist() == [[1]]
    assert torch.allclose(r.topk_weights_TK[0, 0], p[1])
    with pytest.raises(ValueError, match="exactly one expert"):
        SwitchTop1(4, 3, 2)


def test_group_limited_sigmoid_deepseek_v3():
    # 8 experts in 4 groups of 2; each token may use 2 groups, picks top-2 experts there.
    logits = torch.tensor([[4.0, -4.0, 3.0, 3.0, 5.0, -9.0, 0.0, 0.0]])
    router = GroupLimitedTopK(4, 8, 2, n_group=4, topk_group=2, scale=2.5)
    s = logits.sigmoid()[0]
    # group scores (top-2 sum): g0 = s0+s1, g1 = s2+s3 (best), g2 = s4+s5, g3 = s6+s7
    # g1 = 2*sig(3)=1.905 ; g0 = 0.982+0.018=1.0 ; g2 = 0.993+0.0001 ; g3 = 1.0 -> groups 1 and (g3 or g0)
    r = router.route(logits)
    ids = sorted(r.topk_ids_TK[0].tolist())
    assert ids == [2, 3]  # expert 4 (the single best) is in a losing group and must not be chosen
    w = s[[2, 3]] / s[[2, 3]].sum() * 2.5
    assert torch.allclose(r.topk_weights_TK[0].sort().values, w.sort().values)


def test_selection_bias_changes_choice_not_weight():
    router = GroupLimitedTopK(4, 4, 1)
    logits = torch.tensor([[1.0, 0.9, 0.0, 0.0]])
    assert router.route(logits).topk_ids_TK.tolist() == [[0]]
    router.expert_bias[1] = 0.5
    r = router.route(logits)
    assert r.topk_ids_TK.tolist() == [[1]]
    assert torch.allclose(r.topk_weights_TK, torch.ones(1, 1))  # renormalised sigmoid of the unbiased score
    sm = SoftmaxTopK(4, 4, 1, renormalize=False)
    sm.expert_bias[2] = 1.0
    r = sm.route(logits)
    assert r.topk_ids_TK.tolist() == [[2]]
    assert torch.allclose(r.topk_weights_TK[0, 0], torch.softmax(logits, -1)[0, 2])


def test_router_runs_in_fp32_under_bf16_and_autocast():
    router = SoftmaxTopK(8, 4, 2).bfloat16()
    x = torch.randn(5, 8).bfloat16()
    assert router(x).logits_TE.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert SoftmaxTopK(8, 4, 2)(torch.randn(5, 8)).logits_TE.dtype == torch.float32


def test_router_registry_errors():
    with pytest.raises(ValueError, match="unknown router 'nope'.*softmax_topk"):
        build_router("nope", 8, 4, 2)
    with pytest.raises(ValueError, match="router 'softmax_topk'"):
        build_router("softmax_topk", 8, 4, 2, n_group=2)
    with pytest.raises(ValueError, match="n_group=3 must be >= 1 and divide num_experts=8"):
        GroupLimitedTopK(4, 8, 2, n_group=3)
    with pytest.raises(ValueError, match="cannot hold"):
        GroupLimitedTopK(4, 8, 4, n_group=4, topk_group=1)
