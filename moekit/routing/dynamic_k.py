"""Dynamic-k routers: top-p routing and ReLU routing.

Top-p ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models", Huang et al. 2024, §3.1 eq. 3-5):

    p_TE = softmax(x W);  sort descending;  keep the fewest experts whose cumulative probability reaches ``p``
    (at least ``min_k``, at most ``top_k`` slots);  w = p at the kept experts;  dynamic loss = -sum p log p

ReLU routing (ReMoE, "ReLU Routing for Fully Differentiable MoE", Wang et al. 2024, §3 eq. 4-7):

    g_TE = relu(x W);  token t uses every expert with g_te > 0 (at most ``top_k`` slots, highest first)
    L_reg = lambda * mean_t sum_e g_te,   lambda <- lambda * alpha^sign(target - sparsity) every training step
    target sparsity = 1 - k_target / E  (``k_target`` experts per token on average)
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


@register_router("relu")
class ReLURouter(Router):
    """ReMoE: ReLU gates, sparsity steered by an adaptive L1 penalty towards ``k_target`` experts per token.

    Args:
        k_target: average active experts per token to aim for (default ``top_k / 2``, at least 1).
        lambda_init, alpha: the L1 coefficient's start and its multiplicative step per training step. The paper
            uses 1e-8 and 1.2 over long runs; 1.2 overshoots in short runs (in ``benchmarks/routers.py`` three
            quarters of the tokens end up with no expert), so the default step here is 1.05.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, k_target: float | None = None,
                 lambda_init: float = 1e-8, alpha: float = 1.05, bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        self.k_target = float(k_target if k_target is not None else max(1.0, top_k / 2))
        if not 0 < self.k_target <= num_experts:
            raise ValueError(f"k_target must be in (0, num_experts], got {self.k_target}")
        self.alpha = alpha
        self.register_buffer("l1_coef", torch.tensor(float(lambda_init)))

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        gates_TE = torch.relu(logits_TE.nan_to_num(neginf=-1.0))
        top_TK, ids_TK = gates_TE.topk(self.top_k, dim=-1)
        active_TK = top_TK > 0
        probs_TE = gates_TE / gates_TE.sum(-1, keepdim=True).clamp_min(1e-9)
        out = RouterOutput(logits_TE, probs_TE, torch.where(active_TK, ids_TK, -1), top_TK, may_have_empty=True)
        active = (gates_TE > 0).float().sum(-1).mean().detach() if gates_TE.numel() else torch.zeros(())
        out.metrics["experts_per_token"] = active
        if self.training and gates_TE.numel():
            out.aux_losses["relu_l1"] = self.l1_coef.clone() * gates_TE.sum(-1).mean()
            with torch.no_grad():  # eq. 7: raise lambda while too dense, lower it while too sparse
                self.l1_coef *= self.alpha ** torch.sign(active - self.k_target)
        return out
