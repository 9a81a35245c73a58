"""Sigmoid scores with group-limited top-k (DeepSeek-V3, arXiv:2412.19437 eq. 12-16; DeepSeek-V2 §2.1.2).

    s_TE = sigmoid(x W^T)                               affinity of each token to each expert (softmax: V2)
    c_TE = s_TE + b_E                                   b_E: score-correction bias, for selection only
    group score_TG = sum of the top-2 c in the group    ("max" for DeepSeek-V2)
    keep the topk_group best groups, fill the rest with -inf (or 0);  ids_TK = topk(c masked, K)
    w_TK = s[ids] (/ (sum_k s[ids] + eps) if renormalize) * routed_scaling_factor

With ``n_group=1`` this is plain sigmoid top-k (MiniMax-M2, LFM2, AFMoE). ``logit_softcap`` applies
``c * tanh(l / c)`` to the logits first (Laguna).
"""

from __future__ import annotations

import torch

from ..kernels import cpu as kcpu
from .base import TopKRouter, register_router


@register_router("sigmoid_topk")
class GroupLimitedTopK(TopKRouter):
    """DeepSeek-style router: experts in ``n_group`` groups, a token may only use ``topk_group`` of them.

    Args:
        n_group: number of expert groups (``num_experts`` must divide evenly).
        topk_group: groups each token may pick from.
        score_func: ``"sigmoid"`` (V3) or ``"softmax"`` (V2).
        group_score: ``"top2_sum"`` (V3) or ``"max"`` (V2).
        group_fill: score given to experts of dropped groups: ``-inf`` (V3) or ``0.0`` (V2, Mistral-4).
        renormalize: divide the k weights by their sum plus ``renorm_eps``.
        scale: ``routed_scaling_factor``.
        logit_softcap: if > 0, logits become ``logit_softcap * tanh(logits / logit_softcap)``.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, n_group: int = 1, topk_group: int = 1,
                 score_func: str = "sigmoid", group_score: str = "top2_sum", group_fill: float = float("-inf"),
                 renormalize: bool = True, renorm_eps: float = 1e-20, scale: float = 1.0,
                 logit_softcap: float = 0.0, bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        if n_group < 1 or num_experts % n_group:
            raise ValueError(f"n_group={n_group} must be >= 1 and divide num_experts={num_experts}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must be between 1 and n_group={n_group}")
        if topk_group * (num_experts // n_group) < top_k:
            raise ValueError(f"topk_group={topk_group} groups of {num_experts // n_group} experts cannot hold "
                             f"top_k={top_k} experts; raise topk_group")
        if score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
        if group_score not in ("top2_sum", "max"):
            raise ValueError(f"group_score must be 'top2_sum' or 'max', got {group_score!r}")
        self.n_group, self.topk_group, self.score_func, self.group_score = n_group, topk_group, score_func, group_score
        self.group_fill, self.renormalize, self.renorm_eps = float(group_fill), renormalize, renorm_eps
        self.scale, self.logit_softcap = scale, logit_softcap

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = super().logits(x_TD)
        if self.logit_softcap > 0:
            logits_TE = torch.tanh(logits_TE / self.logit_softcap) * self.logit_softcap
        return logits_TE

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE.sigmoid() if self.score_func == "sigmoid" else torch.softmax(logits_TE, dim=-1)

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        choice_TE = self.mask_disabled(scores_TE + self.expert_bias.to(scores_TE.dtype))
        if self.n_group > 1:
            (T, E), G = choice_TE.shape, self.n_group
            grouped_TGe = choice_TE.view(T, G, E // G)  # (sizes given: -1 cannot be inferred with no tokens)
            if self.group_score == "max":
                group_TG = grouped_TGe.amax(dim=-1)
            else:
                top_TG2 = grouped_TGe.topk(min(2, grouped_TGe.shape[-1]), dim=-1).values
                if self.disabled:  # score a group by its enabled experts; a group with none can't win
                    dead_TG2 = torch.isneginf(top_TG2)
                    group_TG = torch.where(dead_TG2.all(-1), float("-inf"), top_TG2.masked_fill(dead_TG2, 0).sum(-1))
                else:
                    group_TG = top_TG2.sum(dim=-1)
            top_TG = group_TG.topk(self.topk_group, dim=-1, sorted=False).indices
            # (out of place, from a tensor: what torch.func.vmap has a batching rule for)
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(1, top_TG, torch.ones_like(top_TG,
                                                                                             dtype=torch.bool))
            # with disabled experts (-inf), experts of dropped groups must still outrank them: best remaining
            fill = min(self.group_fill, -1e30) if self.disabled else self.group_fill
            choice_TE = grouped_TGe.masked_fill(~keep_TG[..., None], fill).view(T, E)
        return torch.topk(choice_TE, self.top_k, dim=-1, sorted=False).indices

    def combine_weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        w_TK = scores_TE.gather(-1, ids_TK)
        if self.renormalize:
            w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + self.renorm_eps)
        return w_TK * self.scale

    def fused_decode_routing(self) -> tuple[bool, float, float, kcpu.RouteMode | None] | None:
        """This routing as the fused decode kernel's :class:`moekit.kernels.cpu.RouteMode`."""
        if not self._plainly_routed(GroupLimitedTopK) or self.n_group > kcpu.ROUTE_MAX_GROUPS:
            return None
        return self.renormalize, 0.0, float(self.scale), kcpu.RouteMode(
            self.score_func, "scores", self.n_group, self.topk_group, self.group_score, self.group_fill,
            float(self.renorm_eps), float(self.logit_softcap))

    def balance_probs(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        # DeepSeek-V3 eq. 19: the balance loss uses affinities normalised over all experts.
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_group={self.n_group}, topk_group={self.topk_group}, "
                f"score_func={self.score_func}, renormalize={self.renormalize}, scale={self.scale}")
