"""Top-k on logits, then weights from just those k logits (GPT-OSS, Granite-MoE, Aria, Cohere2-MoE, Kolibri).

    ids_TK = topk(l_TE + b_E, K),  l_TE = x W^T (+ bias)     b_E: selection-only bias (Kolibri), 0 by default
    w_TK   = softmax(l[ids])                                  weight_func="softmax": the weights sum to 1
    w_TK   = sigmoid(l[ids]) (/ sum if renormalize)           weight_func="sigmoid" (Cohere2 option, Kolibri)
    w_TK  *= scale
"""

from __future__ import annotations

import torch

from ..kernels import cpu as kcpu
from .base import TopKRouter, register_router


@register_router("topk_softmax")
class TopKSoftmax(TopKRouter):
    """Select the k largest logits, then weight them by a softmax (or sigmoids) over just those k.

    Args:
        weight_func: ``"softmax"`` over the k logits, or ``"sigmoid"`` of each.
        renormalize: with ``"sigmoid"``, divide the k weights by their sum.
        scale: multiply the final weights by this factor.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, weight_func: str = "softmax",
                 renormalize: bool = False, scale: float = 1.0, bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        if weight_func not in ("softmax", "sigmoid"):
            raise ValueError(f"weight_func must be 'softmax' or 'sigmoid', got {weight_func!r}")
        self.weight_func, self.renormalize, self.scale = weight_func, renormalize, scale

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE

    def combine_weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        top_TK = scores_TE.gather(-1, ids_TK)
        if self.weight_func == "softmax":
            w_TK = torch.softmax(top_TK, dim=-1)
        else:
            w_TK = torch.sigmoid(top_TK)
            if self.renormalize:
                w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        return w_TK * self.scale if self.scale != 1.0 else w_TK

    def fused_decode_routing(self) -> tuple[bool, float, float, kcpu.RouteMode | None] | None:
        """This routing as the fused decode kernel's :class:`moekit.kernels.cpu.RouteMode`."""
        if not self._plainly_routed(TopKSoftmax):
            return None
        return self.renormalize, 0.0, float(self.scale), kcpu.RouteMode("logits", self.weight_func)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_func={self.weight_func}, scale={self.scale}"
