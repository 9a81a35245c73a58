"""Router interface: the policy half of an MoE layer.

A router maps tokens ``x_TD`` to a :class:`RouterOutput`: which experts each token goes to and with what
weight. It never touches dispatch or expert math, so adding a routing family is one new file.

Notation: ``T`` tokens, ``D`` model dim, ``E`` experts, ``K`` expert slots per token.

A slot whose expert id is ``-1`` is empty (a dynamic-k router that picked fewer than ``K`` experts, an
expert-choice router that left a token out, or a slot dropped for capacity). Its weight is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    """What a router decided for ``T`` tokens.

    Attributes:
        logits_TE: raw router logits (fp32), before any masking.
        probs_TE: per-token distribution over experts used by the balancing losses (rows sum to 1).
        topk_ids_TK: chosen expert per slot (int64); ``-1`` marks an empty slot.
        topk_weights_TK: the combine weight of each slot (fp32, differentiable w.r.t. the router).
        aux_losses: extra router-specific losses (already scaled by their coefficients).
        metrics: router-specific numbers for logging (detached tensors).
        may_have_empty: True if some ``topk_ids_TK`` may be ``-1`` (a static promise, so no host sync is needed).
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    may_have_empty: bool = False

    @property
    def num_tokens(self) -> int:
        return self.topk_ids_TK.shape[0]


class Router(nn.Module):
    """Base router: a linear gate ``logits_TE = x_TD @ weight_ED.T (+ bias_E)`` computed in fp32.

    Subclasses implement :meth:`route`, turning logits into a :class:`RouterOutput`. The gate weight uses the
    Hugging Face layout ``[E, D]`` so conversion is a copy.

    Args:
        d_model: token width ``D``.
        num_experts: ``E``.
        top_k: expert slots per token ``K``.
        bias: learnable logit bias (GPT-OSS, Granite-MoE).
        jitter: multiplicative input jitter ``x * U(1-eps, 1+eps)`` on the router input in training (Switch).
    """

    #: True when a token's routing depends on other tokens of the batch (expert choice, Soft MoE, BASE).
    non_causal: bool = False

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False, jitter: float = 0.0):
        super().__init__()
        _check_sizes(d_model, num_experts, top_k)
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.d_model, self.num_experts, self.top_k, self.jitter = d_model, num_experts, top_k, jitter
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        # Selection-only bias (DeepSeek-V3 "score correction", aux-loss-free balancing). Never gets gradients.
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.d_model**-0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (autocast is disabled here so routing never happens in bf16)."""
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(x_TD.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x_TD.float(), self.weight.float(), bias)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        return self.route(self.logits(x_TD))

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"


class TopKRouter(Router):
    """Tokens choose experts: a template for every top-k router.

    ``route`` = ``scores`` (e.g. softmax) → ``select`` (top-k of scores + selection bias) → ``combine_weights``
    (gather, optional renormalisation and scaling). Subclasses override the steps that differ.
    """

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        choice_TE = scores_TE + self.expert_bias.to(scores_TE.dtype)
        return torch.topk(choice_TE, self.top_k, dim=-1).indices

    def combine_weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        return scores_TE.gather(-1, ids_TK)

    def balance_probs(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        """The distribution the balancing losses see; softmax of the logits unless a router says otherwise."""
        return torch.softmax(logits_TE, dim=-1)

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        scores_TE = self.scores(logits_TE)
        ids_TK = self.select(scores_TE)
        weights_TK = self.combine_weights(scores_TE, ids_TK)
        return RouterOutput(logits_TE, self.balance_probs(logits_TE, scores_TE), ids_TK, weights_TK)


def _check_sizes(d_model: int, num_experts: int, top_k: int) -> None:
    for name, v in (("d_model", d_model), ("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}; choose top_k <= num_experts")


# ----------------------------------------------------------------------------------------------- registry
ROUTERS: dict[str, Callable[..., Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: make a router selectable by ``name`` in ``MoE(router=name)``."""

    def deco(cls: type[Router]) -> type[Router]:
        if name in ROUTERS:
            raise ValueError(f"router name {name!r} is already registered to {ROUTERS[name]}")
        ROUTERS[name] = cls
        return cls

    return deco


def build_router(name: str, d_model: int, num_experts: int, top_k: int, **kwargs) -> Router:
    """Build a registered router by name; unknown names list the known ones."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known routers: {', '.join(sorted(ROUTERS))}")
    try:
        return ROUTERS[name](d_model, num_experts, top_k, **kwargs)
    except TypeError as e:  # unexpected keyword: say which router and what it takes
        raise ValueError(f"router {name!r}: {e}") from None
