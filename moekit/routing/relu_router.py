"""ReLU routing (ReMoE, "ReLU Routing for Fully Differentiable MoE", Wang et al. 2024, §3 eq. 4-7).

    g_TE = relu(x W);  token t uses every expert with g_te > 0 (at most ``top_k`` slots, highest first)
    L_reg = lambda * mean_t sum_e g_te,   lambda <- lambda * alpha^sign(active - k_target) every training step
    (``k_target`` experts per token on average; the paper states it as a target sparsity 1 - k/E)
"""

from __future__ import annotations

import torch

from ..utils import state_frozen
from .base import Router, RouterOutput, register_router


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
            if state_frozen("the ReLU router's L1 coefficient"):
                return out
            with torch.no_grad():  # eq. 7: raise lambda while too dense, lower it while too sparse
                self.l1_coef *= self.alpha ** torch.sign(active - self.k_target)
        return out
