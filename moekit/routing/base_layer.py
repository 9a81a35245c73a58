"""BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models", §2.2 eq. 1-3).

    s_TE = x W
    training: solve  max sum_t s_{t, a(t)}  s.t. every expert gets T/E tokens   (a linear assignment, solved exactly
              with scipy's ``linear_sum_assignment``; batches over 2048 tokens are assigned in chunks)
    test time: a(t) = argmax_e s_te   (greedy)
    y_t = sigmoid(s_{t,a(t)}) * expert_{a(t)}(x_t)

The training assignment looks at the whole batch, so the router is not causal.
"""

from __future__ import annotations

import math

import torch

from .base import Router, RouterOutput, register_router

MAX_ASSIGNMENT_TOKENS = 2048  # larger batches are assigned in chunks of this many tokens


def balanced_assignment(scores_TE: torch.Tensor) -> torch.Tensor:
    """Expert per token maximising the total score with every expert holding ``ceil(T/E)`` tokens at most."""
    from scipy.optimize import linear_sum_assignment
    from torch._subclasses.fake_tensor import is_fake

    if scores_TE.is_meta or is_fake(scores_TE) or torch._C._functorch.is_functorch_wrapped_tensor(scores_TE):
        raise ValueError("the 'base' router's training assignment is solved on the host from the scores' values, "
                         "which fake and meta tensors and those of torch.func transforms (vmap, grad) do not have: "
                         "run it on real tensors, or in eval mode (greedy)")
    T, E = scores_TE.shape
    out = torch.empty(T, dtype=torch.long)
    for start in range(0, T, MAX_ASSIGNMENT_TOKENS):
        chunk = scores_TE[start:start + MAX_ASSIGNMENT_TOKENS].detach().double().cpu()
        cap = math.ceil(chunk.shape[0] / E)
        cost = -chunk.repeat_interleave(cap, dim=1).numpy()  # column j is a seat of expert j // cap
        rows, cols = linear_sum_assignment(cost)
        out[start + torch.as_tensor(rows)] = torch.as_tensor(cols) // cap
    return out.to(scores_TE.device)


@register_router("base")
class BaseLayerRouter(Router):
    """BASE layer: a balanced linear assignment in training, greedy top-1 at test time; weight ``sigmoid(s)``."""

    non_causal = True

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, bias: bool = False, jitter: float = 0.0):
        if top_k != 1:
            raise ValueError(f"BASE layers assign each token to one expert; got top_k={top_k}, use top_k=1")
        super().__init__(d_model, num_experts, 1, bias=bias, jitter=jitter)

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        if self.training and logits_TE.shape[0]:
            enabled = torch.tensor(sorted(set(range(self.num_experts)) - self.disabled), device=logits_TE.device)
            ids_T1 = enabled[balanced_assignment(logits_TE.index_select(1, enabled))][:, None]
        else:
            ids_T1 = logits_TE.argmax(dim=-1, keepdim=True)
        weights_T1 = torch.sigmoid(logits_TE.gather(-1, ids_T1))
        return RouterOutput(logits_TE, torch.softmax(logits_TE, dim=-1), ids_T1, weights_T1)
