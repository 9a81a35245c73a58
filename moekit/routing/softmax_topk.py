"""Softmax → top-k routing (Shazeer et al. 2017 without noise; Mixtral, Qwen2/3-MoE, OLMoE, DBRX).

    p_TE = softmax(x W^T)                    probabilities over all E experts
    ids_TK = topk(p_TE + b_E, K)             b_E: selection-only bias (aux-loss-free balancing), 0 by default
    w_TK = p[ids] (/ max(sum_k p[ids], renorm_min) if renormalize) * scale
"""

from __future__ import annotations

import functools

import torch

from .base import TopKRouter, register_router


@register_router("softmax_topk")
class SoftmaxTopK(TopKRouter):
    """Softmax over all experts, then the top-k probabilities as weights.

    Args:
        renormalize: divide the k weights by their sum (Mixtral always; Qwen/OLMoE ``norm_topk_prob``).
        renorm_min: lower clamp of that sum (ERNIE-4.5 ``moe_norm_min``); 0 = no clamp.
        scale: multiply the final weights by this factor.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, renormalize: bool = True,
                 renorm_min: float = 0.0, scale: float = 1.0, bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        self.renormalize, self.renorm_min, self.scale = renormalize, renorm_min, scale

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_TE, dim=-1)

    def balance_probs(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        return scores_TE

    def combine_weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        w_TK = scores_TE.gather(-1, ids_TK)
        if self.renormalize:
            total = w_TK.sum(dim=-1, keepdim=True)
            w_TK = w_TK / (total.clamp_min(self.renorm_min) if self.renorm_min > 0 else total)
        return w_TK * self.scale if self.scale != 1.0 else w_TK

    def decode_routing(self) -> tuple[bool, float, float] | None:
        """``(renormalize, renorm_min, scale)`` where this router's inference is exactly the softmax top-k above,
        which a fused decode kernel may then run (:func:`moekit.kernels.cpu.route_decode`); None for a subclass
        that changes a step, with disabled experts, or in training mode (input jitter)."""
        if self.training or self.disabled or self.weight is None or not _plain_steps(type(self)):
            return None
        return self.renormalize, float(self.renorm_min), float(self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, renormalize={self.renormalize}, scale={self.scale}"


_STEPS = ("forward", "logits", "route", "scores", "select", "combine_weights", "mask_disabled", "decode_routing")


@functools.cache
def _plain_steps(cls: type) -> bool:
    """Whether router class ``cls`` routes with SoftmaxTopK's own steps (a subclass may change any of them)."""
    return all(getattr(cls, name) is getattr(SoftmaxTopK, name) for name in _STEPS)


@register_router("switch")
class SwitchTop1(SoftmaxTopK):
    """Switch Transformer top-1 routing (Fedus et al. 2021, eq. 1-2): ``w = p_i(x)`` for ``i = argmax p(x)``.

    The single weight is the un-renormalised probability, so the router still gets a gradient. ``jitter`` is the
    paper's multiplicative input noise (they use 1e-2 in training).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, bias: bool = False, jitter: float = 0.0):
        if top_k != 1:
            raise ValueError(f"the switch router sends each token to exactly one expert; got top_k={top_k}, use top_k=1")
        super().__init__(d_model, num_experts, 1, renormalize=False, bias=bias, jitter=jitter)
