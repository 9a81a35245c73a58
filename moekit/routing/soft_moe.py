"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts", §2.1 eq. 1-3, §2.3).

    logits_BLX = l2norm(x_BLD) @ (scale * l2norm(phi_XD))^T      X = E * slots learned slot embeddings
    D_BLX = softmax over the L tokens of a sequence   (dispatch: each slot is a convex mix of tokens)
    C_BLX = softmax over the X slots                  (combine: each token is a convex mix of slot outputs)
    slots_BXD = D^T x ;  expert e processes slots [e*slots, (e+1)*slots) ;  y_BLD = C y_slots

Every expert sees every sequence (no token is dropped, load is balanced by construction), and it is fully
differentiable. Not causal (a slot mixes the whole sequence): for encoders and vision models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import acc_dtype, no_autocast
from .base import Router, RouterOutput, RoutingContext, SoftRouting, register_router


@register_router("soft_moe")
class SoftMoE(Router):
    """Slots as softmax-weighted mixtures of a sequence's tokens.

    Args:
        slots: slots per expert (default 1).
    """

    non_causal = True

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, slots: int = 1, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, jitter=jitter, gate=False)
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self.slot_embed = nn.Parameter(torch.randn(num_experts * slots, d_model) * d_model**-0.5)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> RouterOutput:
        T = x_TD.shape[0]
        L = (ctx.seq_len if ctx is not None and ctx.seq_len else T) or 1
        if T % L:
            raise ValueError(f"soft_moe: {T} tokens do not split into sequences of {L}")
        B, E, S = T // L, self.num_experts, self.slots
        with no_autocast(x_TD.device.type):
            acc = acc_dtype(x_TD.dtype, self.slot_embed.dtype)
            phi_XD = self.scale * F.normalize(self.slot_embed.to(acc), dim=-1)
            logits_BLX = F.normalize(x_TD.to(acc), dim=-1).view(B, L, x_TD.shape[1]) @ phi_XD.T
            if self.disabled:  # a disabled expert's slots receive and return nothing
                logits_BLX = logits_BLX.masked_fill(~self.expert_enabled.repeat_interleave(S), float("-inf"))
            dispatch_BLX = torch.softmax(logits_BLX, dim=1)
            if self.disabled:
                dispatch_BLX = torch.nan_to_num(dispatch_BLX, nan=0.0)
            combine_BLX = torch.softmax(logits_BLX, dim=2)
        probs_TE = combine_BLX.reshape(T, E, S).sum(-1)
        logits_TE = logits_BLX.reshape(T, E, S).logsumexp(-1)
        ids_T1 = probs_TE.argmax(-1, keepdim=True)  # dominant expert per token, for statistics only
        return RouterOutput(logits_TE, probs_TE, ids_T1, probs_TE.gather(-1, ids_T1),
                            soft=SoftRouting(dispatch_BLX, combine_BLX, S))
