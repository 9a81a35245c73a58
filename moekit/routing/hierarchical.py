"""Hierarchical mixture of experts: a two-level gate (Jordan & Jacobs 1994, "Hierarchical Mixtures of Experts and
the EM Algorithm", eq. 2-4).

    p(g | x)    = softmax_g(x W_group)                       which group of experts
    p(e | g, x) = softmax over the experts of group g of (x W)
    p(e | x)    = p(g(e) | x) * p(e | g(e), x)
    keep the ``topk_group`` best groups, then the ``top_k`` most probable experts among them; w = p(e | x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import acc_dtype, no_autocast
from .base import Router, RouterOutput, register_router


@register_router("hierarchical")
class HierarchicalRouter(Router):
    """Groups first, then experts within a group; weights are the joint probabilities.

    Args:
        n_group: groups (``num_experts`` must divide evenly).
        topk_group: groups a token may use.
        renormalize: divide the k weights by their sum.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, n_group: int = 2, topk_group: int = 1,
                 renormalize: bool = False, bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        if n_group < 1 or num_experts % n_group:
            raise ValueError(f"n_group={n_group} must be >= 1 and divide num_experts={num_experts}")
        if not 1 <= topk_group <= n_group or topk_group * (num_experts // n_group) < top_k:
            raise ValueError(f"topk_group={topk_group} groups of {num_experts // n_group} experts cannot hold "
                             f"top_k={top_k}; choose 1 <= topk_group <= n_group with enough experts")
        self.n_group, self.topk_group, self.renormalize = n_group, topk_group, renormalize
        self.group_weight = nn.Parameter(torch.randn(n_group, d_model) * d_model**-0.5)

    def forward(self, x_TD, ctx=None) -> RouterOutput:
        with no_autocast(x_TD.device.type):
            acc = acc_dtype(x_TD.dtype, self.group_weight.dtype)
            group_logits_TG = F.linear(x_TD.to(acc), self.group_weight.to(acc))
        return self._route(self.logits(x_TD), group_logits_TG)

    def _route(self, logits_TE: torch.Tensor, group_logits_TG: torch.Tensor) -> RouterOutput:
        T, E, G = logits_TE.shape[0], self.num_experts, self.n_group
        p_group_TG = torch.softmax(group_logits_TG, dim=-1)
        p_within_TGe = torch.softmax(logits_TE.view(T, G, E // G), dim=-1).nan_to_num(0.0)
        probs_TE = (p_group_TG[..., None] * p_within_TGe).view(T, E)
        with torch.no_grad():
            top_TG = p_group_TG.topk(self.topk_group, dim=-1).indices
            # (out of place, from a tensor: what torch.func.vmap has a batching rule for)
            keep_TG = torch.zeros_like(p_group_TG, dtype=torch.bool).scatter(1, top_TG, torch.ones_like(top_TG,
                                                                                               dtype=torch.bool))
            choice_TE = probs_TE.view(T, G, E // G).masked_fill(~keep_TG[..., None], -1.0).view(T, E)
            ids_TK = self.mask_disabled(choice_TE).topk(self.top_k, dim=-1).indices
        w_TK = probs_TE.gather(-1, ids_TK)
        if self.renormalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-9)
        return RouterOutput(logits_TE, probs_TE, ids_TK, w_TK)

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:  # pragma: no cover - needs the group logits
        raise NotImplementedError("HierarchicalRouter routes from x (it has its own group gate); call it on x")
