"""Top-k on logits → softmax over the k (GPT-OSS, Granite-MoE, Mixtral-style "softmax after top-k").

    ids_TK = topk(l_TE + b_E, K),  l_TE = x W^T (+ bias)
    w_TK   = softmax(l[ids])        the weights always sum to 1
"""

from __future__ import annotations

import torch

from .base import TopKRouter, register_router


@register_router("topk_softmax")
class TopKSoftmax(TopKRouter):
    """Select the k largest logits, then softmax over just those k."""

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE

    def combine_weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores_TE.gather(-1, ids_TK), dim=-1)
