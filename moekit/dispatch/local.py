"""Sort-based local dispatch: group token slots by expert, apply capacity, combine with router weights.

Notation: ``T`` tokens, ``K`` slots per token, ``S = T*K`` flattened slots, ``E`` experts, ``D`` model dim.

A :class:`DispatchPlan` holds only indices: tokens are never copied until an experts backend asks for
``plan.permute(x)`` (or gathers the rows itself inside a fused kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import cpu as kcpu
from ..routing.base import RouterOutput
from ..utils import acc_dtype

DROP_POLICIES = ("probs", "position", "batch_priority")


@dataclass
class DispatchPlan:
    """Where every (token, slot) goes, in expert-contiguous order.

    Attributes:
        ids_TK: expert per slot after capacity; ``-1`` = empty or dropped.
        weights_TK: router weight per slot (differentiable), as the router gave it.
        order_S: permutation of the ``S = T*K`` flattened slots sorting them by expert (empty slots last,
            token order kept inside each expert).
        token_S: token index of each sorted slot (``order_S // K``).
        expert_S: expert of each sorted slot (``E`` for empty slots).
        counts_E: kept slots per expert (int64).
        offsets_E: inclusive cumulative ``counts_E`` (int32), the ``offs`` of a grouped GEMM.
        num_dropped: slots the capacity limit removed (0-dim int64 tensor).
        capacity: per-expert capacity, or ``None`` when dropless.
        may_have_empty: False when every slot is known to be valid (lets backends skip masking).
    """

    ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    order_S: torch.Tensor
    token_S: torch.Tensor
    expert_S: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor
    num_dropped: torch.Tensor
    capacity: int | None
    may_have_empty: bool

    @property
    def num_tokens(self) -> int:
        return self.ids_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids_TK.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]

    def valid_S(self) -> torch.Tensor:
        return self.expert_S < self.num_experts

    def permute(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Token rows in expert-sorted slot order (empty slots included at the end)."""
        return x_TD[self.token_S]

    def weights_S(self) -> torch.Tensor:
        return self.weights_TK.reshape(-1)[self.order_S]

    def combine(self, y_SD: torch.Tensor, weighted: bool = False) -> torch.Tensor:
        """Weighted sum over each token's slots, accumulated in fp32 (float64 rows: float64):
        ``y_TD = sum_k w_TK * y``.

        ``y_SD`` is in sorted slot order. Rows of empty slots may hold garbage (even NaN); they are masked out.
        Pass ``weighted=True`` if the rows were already multiplied by their weights.
        """
        y_SD = y_SD.to(acc_dtype(y_SD.dtype))
        if self.may_have_empty:  # mask before weighting, or 0 * NaN would reach the router's gradient
            y_SD = torch.where(self.valid_S()[:, None], y_SD, 0.0)
        if not weighted:
            y_SD = y_SD * self.weights_S().to(y_SD.dtype)[:, None]
        inverse_S = torch.empty_like(self.order_S)
        inverse_S[self.order_S] = torch.arange(self.order_S.numel(), device=self.order_S.device)
        T, K = self.ids_TK.shape
        return y_SD[inverse_S].view(T, K, y_SD.shape[-1]).sum(dim=1)


class LocalDispatcher:
    """Builds :class:`DispatchPlan` s on one device.

    Args:
        num_experts: ``E``.
        capacity_factor: ``None`` for dropless; else each expert keeps at most
            ``ceil(capacity_factor * T * K / E)`` slots (at least ``min_capacity``).
        drop_policy: which slots an over-full expert keeps: ``"probs"`` the highest router weights,
            ``"position"`` the earliest tokens, ``"batch_priority"`` (Riquelme et al. 2021, V-MoE) all first
            choices before any second choice, tokens ordered by their highest router weight.
    """

    def __init__(self, num_experts: int, capacity_factor: float | None = None, drop_policy: str = "probs",
                 min_capacity: int = 1):
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.drop_policy, self.min_capacity = drop_policy, min_capacity

    def capacity(self, num_tokens: int, top_k: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return max(self.min_capacity, math.ceil(self.capacity_factor * num_tokens * top_k / self.num_experts))

    def plan(self, routed: RouterOutput) -> DispatchPlan:
        ids_TK, weights_TK = routed.topk_ids_TK, routed.topk_weights_TK
        T, K = ids_TK.shape
        E = self.num_experts
        with torch.no_grad():
            may_have_empty = routed.may_have_empty
            capacity = self.capacity(T, K)
            num_dropped = torch.zeros((), dtype=torch.int64, device=ids_TK.device)
            if capacity is not None:
                keep_TK = _capacity_keep(ids_TK, weights_TK.detach(), E, capacity, self.drop_policy)
                num_dropped = (~keep_TK & (ids_TK >= 0)).sum()
                ids_TK = torch.where(keep_TK, ids_TK, -1)
                may_have_empty = True
            # (every slot valid: the ids are the keys; the C sort refuses any out of range)
            valid = not may_have_empty and ids_TK.device.type == "cpu"
            key_S = (ids_TK if valid else torch.where(ids_TK >= 0, ids_TK, E)).reshape(-1)
            counted = kcpu.sort_keys(key_S.contiguous(), E + 1, K)  # (a counting sort, on CPU)
            if counted is not None:
                expert_S, order_S, token_S, counts_E = counted
            else:
                expert_S, order_S = torch.sort(key_S, stable=True)
                token_S = order_S // K
                # (out of place: under vmap the keys are batched, a fresh zero buffer is not)
                counts_E = torch.zeros(E + 1, dtype=torch.int64, device=ids_TK.device).scatter_add(
                    0, key_S, torch.ones_like(key_S))
            counts_E = counts_E[:E]
            offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        return DispatchPlan(ids_TK, weights_TK, order_S, token_S, expert_S, counts_E, offsets_E,
                            num_dropped, capacity, may_have_empty)


def _capacity_keep(ids_TK: torch.Tensor, weights_TK: torch.Tensor, E: int, capacity: int,
                   policy: str) -> torch.Tensor:
    """Boolean ``keep_TK``: per expert, the first ``capacity`` slots in policy order survive."""
    T, K = ids_TK.shape
    key_S = torch.where(ids_TK >= 0, ids_TK, E).reshape(-1)
    if policy == "probs":  # highest weight first; ties by position
        pre_S = torch.sort(-weights_TK.reshape(-1).float(), stable=True).indices
    elif policy == "batch_priority":  # V-MoE BPR: every token's 1st choice before any 2nd; tokens by max weight
        prio_S = -weights_TK.float().amax(dim=-1).repeat_interleave(K)
        by_prio_S = torch.sort(prio_S, stable=True).indices
        w_TK = weights_TK.float()
        rank_k_S = torch.argsort(torch.argsort(-w_TK, dim=-1, stable=True), dim=-1).reshape(-1)  # 0 = best slot
        pre_S = by_prio_S[torch.sort(rank_k_S[by_prio_S], stable=True).indices]
    else:  # "position": token order (flattened T*K order is token-major)
        pre_S = torch.arange(T * K, device=ids_TK.device)
    expert_S, sub_S = torch.sort(key_S[pre_S], stable=True)
    order_S = pre_S[sub_S]
    counts_E = torch.zeros(E + 1, dtype=torch.int64, device=ids_TK.device).scatter_add(
        0, key_S, torch.ones_like(key_S))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_S = torch.arange(T * K, device=ids_TK.device) - starts_E[expert_S]
    # (sorted order back to slot order through the inverse permutation, a gather: scattered into a zero buffer
    # in place, Inductor (torch 2.13, fullgraph=True) reordered reads of the buffer before the write in a layer
    # with the position drop policy, its experts then running on zero counts)
    keep_S = ((rank_S < capacity) & (expert_S < E)).gather(0, torch.argsort(order_S))
    return keep_S.view(T, K)
