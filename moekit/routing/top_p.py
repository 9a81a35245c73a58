"""Top-p routing ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models", Huang et al. 2024, §3.1 eq. 3-5).

    p_TE = softmax(x W);  sort descending;  keep the fewest experts whose cumulative probability reaches ``p``
    (at least ``min_k``, at most ``top_k`` slots);  w = p at the kept experts;  dynamic loss = -sum p log p

The number of experts varies per token; unused slots are empty.
"""

from __future__ import annotations

import torch

from .base import Router, RouterOutput, register_router


@register_router("top_p")
class TopPRouter(Router):
    """Each token takes the fewest experts whose probability mass reaches ``p`` (between ``min_k`` and ``top_k``).

    Args:
        p: probability mass threshold (the paper uses 0.4).
        min_k: experts every token gets at least.
        renormalize: divide the kept weights by their sum.
        entropy_coef: weight of the paper's dynamic loss (router entropy), 0 = off.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, p: float = 0.4, min_k: int = 1,
                 renormalize: bool = False, entropy_coef: float = 0.0, bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if not 1 <= min_k <= top_k:
            raise ValueError(f"min_k={min_k} must be between 1 and top_k={top_k}")
        self.p, self.min_k, self.renormalize, self.entropy_coef = p, min_k, renormalize, entropy_coef

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        mass_before_TK = top_TK.detach().cumsum(-1) - top_TK.detach()
        rank_K = torch.arange(self.top_k, device=logits_TE.device)
        keep_TK = (mass_before_TK < self.p) | (rank_K < self.min_k)
        keep_TK &= top_TK.detach() > 0  # never a disabled (probability 0) expert
        w_TK = torch.where(keep_TK, top_TK, 0.0)
        if self.renormalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-9)
        out = RouterOutput(logits_TE, probs_TE, torch.where(keep_TK, ids_TK, -1), w_TK, may_have_empty=True)
        out.metrics["experts_per_token"] = keep_TK.float().sum(-1).mean().detach() if keep_TK.numel() else \
            torch.zeros(())
        if self.training and self.entropy_coef > 0:
            ent = -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1).mean()
            out.aux_losses["dynamic_loss"] = self.entropy_coef * ent
        return out
