"""GShard top-2 gating with random routing of the second expert (Lepikhin et al. 2020, Algorithm 1).

    p_TE = softmax(x W);  e1 = argmax p;  e2 = argmax of p without e1
    g1, g2 = p[e1], p[e2] renormalised to sum to 1
    training: keep e2 only with probability min(1, 2 * g2)  (a weak second choice is often skipped)
    eval: both kept (deterministic)

A dropped second choice leaves an empty slot. Capacity and its drop policy belong to the dispatcher
(``capacity_factor=``, ``drop_policy="position"`` is GShard's order; ``"batch_priority"`` is V-MoE's BPR).
"""

from __future__ import annotations

import torch

from .base import RouterOutput, TopKRouter, register_router


@register_router("gshard_top2")
class GShardTop2(TopKRouter):
    """Top-2 softmax gating whose second expert is sampled with probability ``min(1, 2 * g2)`` in training."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, bias: bool = False, jitter: float = 0.0):
        if top_k != 2:
            raise ValueError(f"gshard_top2 routes each token to two experts; got top_k={top_k}, use top_k=2")
        if num_experts < 2:
            raise ValueError("gshard_top2 needs at least 2 experts")
        super().__init__(d_model, num_experts, 2, bias=bias, jitter=jitter)

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_TE, dim=-1)

    def balance_probs(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        return scores_TE

    def combine_weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        w_TK = scores_TE.gather(-1, ids_TK)
        return w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-9)

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        out = super().route(logits_TE)
        if self.training:
            keep2_T = torch.rand_like(out.topk_weights_TK[:, 1]) < 2 * out.topk_weights_TK[:, 1].detach()
            out.topk_ids_TK = torch.stack([out.topk_ids_TK[:, 0], torch.where(keep2_T, out.topk_ids_TK[:, 1], -1)], 1)
            out.topk_weights_TK = torch.stack([out.topk_weights_TK[:, 0],
                                               torch.where(keep2_T, out.topk_weights_TK[:, 1], 0.0)], 1)
            out.may_have_empty = True
            out.metrics["second_expert_kept"] = keep2_T.float().mean().detach()
        return out
