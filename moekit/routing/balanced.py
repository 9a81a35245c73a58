"""Balanced assignment routers: BASE layers (Lewis et al. 2021) and Sinkhorn routing (Clark et al. 2022).

BASE (§2.2, eq. 1-2):  in training, solve  max sum_t s_{t, a(t)}  s.t. every expert gets T/E tokens
(a linear assignment; here exact, via scipy's ``linear_sum_assignment``), with ``s_TE = x W``. The output of the
chosen expert is scaled by ``sigmoid(s_{t,a(t)})`` (eq. 3). At test time each token takes its best expert (greedy).

Sinkhorn / S-BASE ("Unified Scaling Laws for Routed Language Models", §2.1 and App. A): in training, balance
``exp(s_TE)`` with a few Sinkhorn iterations (rows sum to 1, columns to T/E) and take each token's top-k of that
plan; the weights stay the ordinary softmax of ``s`` at the chosen experts. At test time: plain top-k.

Both look at the whole batch in training, so they are not causal.
"""

from __future__ import annotations

import math

import torch

from .base import Router, RouterOutput, register_router

MAX_ASSIGNMENT_TOKENS = 2048  # larger batches are assigned in chunks of this many tokens


def balanced_assignment(scores_TE: torch.Tensor) -> torch.Tensor:
    """Expert per token maximising the total score with every expert holding ``ceil(T/E)`` tokens at most."""
    from scipy.optimize import linear_sum_assignment

    T, E = scores_TE.shape
    out = torch.empty(T, dtype=torch.long)
    for start in range(0, T, MAX_ASSIGNMENT_TOKENS):
        chunk = scores_TE[start:start + MAX_ASSIGNMENT_TOKENS].detach().double().cpu()
        cap = math.ceil(chunk.shape[0] / E)
        cost = -chunk.repeat_interleave(cap, dim=1).numpy()  # column j is a seat of expert j // cap
        rows, cols = linear_sum_assignment(cost)
        out[start + torch.as_tensor(rows)] = torch.as_tensor(cols) // cap
    return out.to(scores_TE.device)


@register_router("base")
class BaseLayerRouter(Router):
    """BASE layer: a balanced linear assignment in training, greedy top-1 at test time; weight ``sigmoid(s)``."""

    non_causal = True

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, bias: bool = False, jitter: float = 0.0):
        if top_k != 1:
            raise ValueError(f"BASE layers assign each token to one expert; got top_k={top_k}, use top_k=1")
        super().__init__(d_model, num_experts, 1, bias=bias, jitter=jitter)

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        if self.training and logits_TE.shape[0]:
            enabled = torch.tensor(sorted(set(range(self.num_experts)) - self.disabled), device=logits_TE.device)
            ids_T1 = enabled[balanced_assignment(logits_TE.index_select(1, enabled))][:, None]
        else:
            ids_T1 = logits_TE.argmax(dim=-1, keepdim=True)
        weights_T1 = torch.sigmoid(logits_TE.gather(-1, ids_T1))
        return RouterOutput(logits_TE, torch.softmax(logits_TE, dim=-1), ids_T1, weights_T1)


def sinkhorn(logits_TE: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """A transport plan close to ``exp(logits)`` whose rows sum to 1 and columns to ``T/E`` (log domain)."""
    T, E = logits_TE.shape
    log_p = logits_TE.float()
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
