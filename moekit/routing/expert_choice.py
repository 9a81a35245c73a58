"""Expert Choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", §3.1 eq. 1-2).

    S_TE = softmax(x W)                         token-to-expert affinity
    G_EC, I_EC = TopK(S^T, C)                   each expert takes its C best tokens,  C = ceil(T * c / E)
    y_t = sum_{e: t in I_e} S_te * expert_e(x_t)

``c`` (the layer's ``top_k``, or ``capacity_factor``) is the average number of experts per token. Load is perfectly
balanced by construction; a token may get no expert at all (it then passes through the residual).

Not causal: whether token t is chosen depends on every other token of the batch, later ones included, so a causal
language model would leak the future. The layer refuses it when ``causal=True`` unless ``allow_non_causal=True``.
"""

from __future__ import annotations

import math

import torch

from .base import Router, RouterOutput, register_router


@register_router("expert_choice")
class ExpertChoice(Router):
    """Experts choose tokens: each of the E experts takes the ``C`` tokens with the highest affinity.

    Args:
        capacity_factor: ``c``, average experts per token (default: ``top_k``).
    """

    non_causal = True

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, capacity_factor: float | None = None,
                 bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        self.capacity_factor = float(top_k if capacity_factor is None else capacity_factor)
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(num_tokens * self.capacity_factor / self.num_experts))

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        chosen_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
        if T:
            top_EC = probs_TE.T.topk(self.capacity(T), dim=-1).indices  # each expert's tokens
            # (out of place, from a tensor: what torch.func.vmap has a batching rule for)
            chosen_TE = chosen_TE.scatter(0, top_EC.T, torch.ones_like(top_EC.T, dtype=torch.bool))
            if self.disabled:
                chosen_TE &= self.expert_enabled
        experts_TE = torch.arange(E, device=logits_TE.device).expand(T, E)
        ids_TE = torch.where(chosen_TE, experts_TE, -1)
        weights_TE = torch.where(chosen_TE, probs_TE, 0.0)
        metrics = {"tokens_without_expert": (~chosen_TE.any(-1)).float().mean().detach()} if T else {}
        return RouterOutput(logits_TE, probs_TE, ids_TE, weights_TE, metrics=metrics, may_have_empty=True)
