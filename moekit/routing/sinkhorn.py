"""Sinkhorn routing, S-BASE ("Unified Scaling Laws for Routed Language Models", Clark et al. 2022, §2.1, App. A).

    training: balance exp(s_TE) with a few Sinkhorn iterations (rows sum to 1, columns to T/E) and give each token
              the top-k experts of that plan
    test time: plain top-k of s
    w_TK = softmax(s)[chosen]  (optionally renormalised)

The training plan looks at the whole batch, so the router is not causal.
"""

from __future__ import annotations

import math

import torch

from ..utils import acc_dtype
from .base import Router, RouterOutput, register_router


def sinkhorn(logits_TE: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """A transport plan close to ``exp(logits)`` whose rows sum to 1 and columns to ``T/E`` (log domain)."""
    T, E = logits_TE.shape
    log_p = logits_TE.to(acc_dtype(logits_TE.dtype))
    log_col = math.log(T / E)
    for _ in range(iters):
        log_p = log_p - log_p.logsumexp(dim=0, keepdim=True) + log_col  # columns
        log_p = log_p - log_p.logsumexp(dim=1, keepdim=True)           # rows
    return log_p.exp()


@register_router("sinkhorn")
class SinkhornRouter(Router):
    """S-BASE: top-k of a Sinkhorn-balanced plan in training, plain top-k at test time; softmax weights.

    Args:
        iters: Sinkhorn iterations.
        renormalize: divide the k weights by their sum.
    """

    non_causal = True

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, iters: int = 8, renormalize: bool = True,
                 bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        self.iters, self.renormalize = iters, renormalize

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        with torch.no_grad():
            if self.training and logits_TE.shape[0]:
                choice_TE = self.mask_disabled(sinkhorn(logits_TE.nan_to_num(neginf=-1e9), self.iters))
            else:
                choice_TE = logits_TE
            ids_TK = choice_TE.topk(self.top_k, dim=-1).indices
        w_TK = probs_TE.gather(-1, ids_TK)
        if self.renormalize:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        return RouterOutput(logits_TE, probs_TE, ids_TK, w_TK)
