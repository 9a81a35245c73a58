"""Router interface: the policy half of an MoE layer.

A router maps tokens ``x_TD`` to a :class:`RouterOutput`: which experts each token goes to and with what
weight. It never touches dispatch or expert math, so adding a routing family is one new file.

Notation: ``T`` tokens, ``D`` model dim, ``E`` experts, ``K`` expert slots per token.

A slot whose expert id is ``-1`` is empty (a dynamic-k router that picked fewer than ``K`` experts, an
expert-choice router that left a token out, or a slot dropped for capacity). Its weight is ignored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..kernels import cpu as kcpu
from ..kernels.cpu_gemm import linear_autograd
from ..utils import acc_dtype, no_autocast


@dataclass
class RoutingContext:
    """What a router may know besides the token vectors.

    Attributes:
        seq_len: tokens per sequence (the layer input's second-to-last dim; all tokens for 2-D input).
        token_ids_T: the token ids of the ``T`` tokens, for routers that route by id (hash routing).
    """

    seq_len: int | None = None
    token_ids_T: torch.Tensor | None = None


@dataclass
class SoftRouting:
    """Soft MoE: each expert sees ``slots`` weighted mixtures of a sequence's tokens instead of tokens.

    ``dispatch_BLX`` (softmax over the ``L`` tokens of a sequence) mixes tokens into the ``X = E * slots`` slots;
    ``combine_BLX`` (softmax over slots) mixes the slot outputs back into each token. Slot ``x`` belongs to expert
    ``x // slots``.
    """

    dispatch_BLX: torch.Tensor
    combine_BLX: torch.Tensor
    slots: int


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
        soft: set by Soft-MoE-style routers instead of a token assignment (then the layer mixes slots).
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    may_have_empty: bool = False
    soft: SoftRouting | None = None

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

    #: True when a token's routing depends on other tokens of the batch (expert choice, Soft MoE, BASE), so the
    #: router must not be used in a causal language model without the user's explicit consent.
    non_causal: bool = False
    #: True for routers that need ``RoutingContext.token_ids_T`` (hash routing).
    needs_token_ids: bool = False

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False, jitter: float = 0.0,
                 gate: bool = True):
        super().__init__()
        _check_sizes(d_model, num_experts, top_k)
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.d_model, self.num_experts, self.top_k, self.jitter = d_model, num_experts, top_k, jitter
        self.weight = nn.Parameter(torch.empty(num_experts, d_model)) if gate else None
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        # Selection-only bias (DeepSeek-V3 "score correction", aux-loss-free balancing). Never gets gradients.
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # Experts that may be chosen (see disable_experts); runtime state, not saved in checkpoints.
        self.register_buffer("expert_enabled", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        self.disabled: frozenset[int] = frozenset()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.normal_(self.weight, std=self.d_model**-0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # ------------------------------------------------------------------------------------- robust routing
    def disable_experts(self, ids) -> None:
        """Never route to these experts (until re-enabled); their logits are treated as ``-inf``."""
        ids = _expert_ids(ids, self.num_experts)
        if len(self.disabled | ids) >= self.num_experts:
            raise ValueError(f"cannot disable experts {sorted(ids)}: that would leave none of the "
                             f"{self.num_experts} experts enabled")
        self.disabled = frozenset(self.disabled | ids)
        self._sync_enabled()

    def enable_experts(self, ids=None) -> None:
        """Re-enable these experts (all of them if ``ids`` is None)."""
        self.disabled = frozenset() if ids is None else frozenset(self.disabled - _expert_ids(ids, self.num_experts))
        self._sync_enabled()

    def _sync_enabled(self) -> None:
        mask = torch.ones(self.num_experts, dtype=torch.bool)
        mask[list(self.disabled)] = False
        self.expert_enabled.copy_(mask)

    def mask_disabled(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """``-inf`` for disabled experts (no-op, and no extra op, when all are enabled)."""
        if not self.disabled:
            return scores_TE
        return scores_TE.masked_fill(~self.expert_enabled, float("-inf"))

    # ------------------------------------------------------------------------------------------- routing
    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (float64 for a float64 layer; autocast is disabled here so routing never happens in
        bf16); disabled experts get ``-inf``."""
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        acc = acc_dtype(x_TD.dtype, self.weight.dtype)  # (float64 layers: float64)
        bias = None if self.bias is None else self.bias.to(acc)
        with no_autocast(x_TD.device.type):
            return self.mask_disabled(linear_autograd(x_TD, self.weight, bias, acc))

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> RouterOutput:
        return self.route(self.logits(x_TD))

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_routing(self) -> tuple[bool, float, float] | None:
        """``(renormalize, renorm_min, scale)`` if this router's routing is plain softmax top-k, which a fused
        kernel may run in its place; None (the default) otherwise."""
        return None

    def fused_decode_routing(self) -> tuple[bool, float, float, kcpu.RouteMode | None] | None:
        """``(renormalize, renorm_min, scale, mode)`` where the fused decode kernel
        (:class:`moekit.kernels.cpu.RouteDecode`) can route as this router does in inference: softmax top-k
        (``mode`` None; :meth:`decode_routing`), or the routing of a :class:`moekit.kernels.cpu.RouteMode`; None
        otherwise."""
        spec = self.decode_routing()
        return None if spec is None else (*spec, None)

    def _plainly_routed(self, base: type) -> bool:
        """Whether this router routes with ``base``'s own steps, without disabled experts, input jitter in
        training or a missing gate: what a fused kernel that replaces those steps needs."""
        return not ((self.training and self.jitter > 0) or self.disabled or self.weight is None) \
            and same_steps(type(self), base)

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
        choice_TE = self.mask_disabled(scores_TE + self.expert_bias.to(scores_TE.dtype))
        return kcpu.topk_indices(choice_TE.detach(), self.top_k)

    def combine_weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        return scores_TE.gather(-1, ids_TK)

    def balance_probs(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        """The distribution the balancing losses see; softmax of the logits unless a router says otherwise."""
        return torch.softmax(logits_TE, dim=-1)

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        scores_TE = self.scores(logits_TE)
        ids_TK = self.select(scores_TE)
        weights_TK = self.combine_weights(scores_TE, ids_TK)
        if self.disabled:  # a slot with no enabled expert left to take (too few remain) stays empty
            ids_TK = torch.where(self.expert_enabled[ids_TK], ids_TK, -1)
            weights_TK = torch.where(ids_TK >= 0, weights_TK, 0.0)
        return RouterOutput(logits_TE, self.balance_probs(logits_TE, scores_TE), ids_TK, weights_TK,
                            may_have_empty=bool(self.disabled))


#: The methods whose definitions make a router's routing (a subclass that redefines any routes its own way).
ROUTING_STEPS = ("forward", "logits", "route", "scores", "select", "combine_weights", "mask_disabled",
                 "decode_routing", "fused_decode_routing")


def same_steps(cls: type, base: type) -> bool:
    """Whether router class ``cls`` routes with ``base``'s own steps (a subclass may change any of them). Cached,
    except while ``torch.compile`` traces (which warns of a cache it cannot see into, and traces the check itself)."""
    return _same_steps(cls, base) if torch.compiler.is_compiling() else _same_steps_cached(cls, base)


def _same_steps(cls: type, base: type) -> bool:
    return all(getattr(cls, name) is getattr(base, name) for name in ROUTING_STEPS)


_same_steps_cached = functools.cache(_same_steps)


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless every token id lies in ``[0, vocab_size)``. Where the ids' values cannot be read on the host
    (while ``torch.compile`` traces, under fake tensors and other bypasses, :func:`moekit.kernels.cpu.bypassed`) the
    same check runs inside the computation (``torch._assert_async``); meta tensors have no values to check, nor has
    ``torch.func.vmap`` a batched form of that assertion (there the lookup by id itself fails on a CPU tensor)."""
    if not ids.numel() or ids.is_meta or kcpu.vmapping():
        return
    if kcpu.bypassed():
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(), f"token ids must lie in [0, {vocab_size})")
    elif int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got range [{int(ids.min())}, {int(ids.max())}]")


def _expert_ids(ids, num_experts: int) -> frozenset[int]:
    ids = frozenset(int(i) for i in ([ids] if isinstance(ids, int) else ids))
    bad = sorted(i for i in ids if not 0 <= i < num_experts)
    if bad:
        raise ValueError(f"expert ids {bad} are out of range for {num_experts} experts (0..{num_experts - 1})")
    return ids


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
