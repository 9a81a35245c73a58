"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", §2.1 eq. 3-5, App. A).

    H_TE   = x W_g + N(0, 1) * softplus(x W_noise)          noise only in training
    G_TE   = softmax(KeepTopK(H, k))                         weights: softmax over the k kept logits
    L_imp  = w_importance * CV(sum_t G_t)^2                  importance loss (eq. 6-7)
    P_TE   = Phi((x W_g - kth_excluding(H, k, e)) / softplus(x W_noise))    smooth P(expert e is in the top k)
    L_load = w_load * CV(sum_t P_t)^2                        load loss (App. A, eq. 8-10)

Multiplicative input jitter (``jitter``) is inherited from :class:`Router`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import RouterOutput, RoutingContext, TopKRouter, register_router


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (0 for a single value)."""
    if v.numel() <= 1:
        return v.sum() * 0.0
    return v.float().var() / (v.float().mean() ** 2 + 1e-10)


@register_router("noisy_topk")
class NoisyTopK(TopKRouter):
    """Sparsely-gated MoE gate with tunable Gaussian noise and the importance and load losses.

    Args:
        importance_coef: ``w_importance`` of the importance loss (the paper uses 0.1).
        load_coef: ``w_load`` of the load loss (the paper uses 0.1).
        noise: False disables the noise (then the load loss is skipped: it needs the noise scale).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, importance_coef: float = 0.01,
                 load_coef: float = 0.01, noise: bool = True, bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        self.importance_coef, self.load_coef = importance_coef, load_coef
        self.w_noise = nn.Parameter(torch.zeros(num_experts, d_model)) if noise else None  # zero init, as the paper

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> RouterOutput:
        clean_TE = self.logits(x_TD)
        noisy = self.training and self.w_noise is not None
        if noisy:
            std_TE = F.softplus(F.linear(x_TD.to(clean_TE.dtype), self.w_noise.to(clean_TE.dtype))) + 1e-2
            logits_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
        else:
            logits_TE = clean_TE
        out = self.route(logits_TE)
        if self.training:
            gates_TE = torch.zeros_like(logits_TE).scatter(-1, out.topk_ids_TK, out.topk_weights_TK)
            out.aux_losses["importance_loss"] = self.importance_coef * cv_squared(gates_TE.sum(0))
            if noisy and self.top_k < self.num_experts:
                out.aux_losses["load_loss"] = self.load_coef * cv_squared(
                    self._prob_in_topk(clean_TE, logits_TE, std_TE).sum(0))
        return out

    def _prob_in_topk(self, clean_TE, noisy_TE, std_TE) -> torch.Tensor:
        """P(e stays in the top k if its noise were redrawn): the threshold is the k-th largest noisy logit of the
        other experts, i.e. the (k+1)-th if e is in, the k-th if not."""
        clean_TE, noisy_TE = clean_TE.nan_to_num(neginf=-1e9), noisy_TE.nan_to_num(neginf=-1e9)  # disabled
        top_TK1 = noisy_TE.topk(self.top_k + 1, dim=-1).values
        kth_in, kth_out = top_TK1[:, self.top_k:self.top_k + 1], top_TK1[:, self.top_k - 1:self.top_k]
        is_in_TE = noisy_TE > kth_in
        p_if_in = torch.special.ndtr((clean_TE - kth_in) / std_TE)  # (the standard normal's CDF)
        p_if_out = torch.special.ndtr((clean_TE - kth_out) / std_TE)
        return torch.where(is_in_TE, p_if_in, p_if_out)

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE

    def combine_weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores_TE.gather(-1, ids_TK), dim=-1)
