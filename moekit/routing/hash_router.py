"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", §3).

    expert_tK = table[token_id_t]           a fixed map from vocabulary to experts, never learned
    y_t = (1/K) sum_k expert_{e_k}(x_t)

``method="random"``: a seeded random map (the paper's "Random Hash"). ``"balanced"``: the paper's "Balanced
assignment": ids sorted by their training-set frequency (``token_counts``) are given greedily to the least loaded
expert, so the expected load is even; without counts, ids are dealt round-robin. The layer needs the token ids:
``layer(x, token_ids=ids)``. Causal (a token's expert depends on its own id only).
"""

from __future__ import annotations

import torch

from .base import Router, RouterOutput, RoutingContext, check_token_ids, register_router


@register_router("hash")
class HashRouter(Router):
    """Each token id goes to fixed experts; no gate, no routing parameters, no balancing loss needed.

    Args:
        vocab_size: size of the id space.
        method: ``"balanced"`` or ``"random"``.
        token_counts: frequency of each id (length ``vocab_size``) for the balanced map.
        seed: seed of the random map.
    """

    needs_token_ids = True

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, vocab_size: int, method: str = "balanced",
                 token_counts=None, seed: int = 0, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, jitter=jitter, gate=False)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if method not in ("balanced", "random"):
            raise ValueError(f"method must be 'balanced' or 'random', got {method!r}")
        self.vocab_size, self.method = vocab_size, method
        self.register_buffer("table_VK", self._build(method, token_counts, seed))

    def _build(self, method: str, token_counts, seed: int) -> torch.Tensor:
        V, E, K = self.vocab_size, self.num_experts, self.top_k
        if method == "random":
            g = torch.Generator().manual_seed(seed)
            return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)])
        if token_counts is None:  # round-robin: K distinct experts per id, ids spread evenly
            v = torch.arange(V)[:, None]
            return (v * K + torch.arange(K)[None, :]) % E
        counts = torch.as_tensor(token_counts, dtype=torch.float64)
        if counts.shape != (V,):
            raise ValueError(f"token_counts must have vocab_size={V} entries, got shape {tuple(counts.shape)}")
        load = [0.0] * E
        table = torch.empty(V, K, dtype=torch.long)
        for v in torch.argsort(counts, descending=True, stable=True).tolist():
            picks = sorted(range(E), key=lambda e: (load[e], e))[:K]
            for k, e in enumerate(picks):
                table[v, k] = e
                load[e] += float(counts[v])
        return table

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> RouterOutput:
        ids_T = None if ctx is None else ctx.token_ids_T
        if ids_T is None:
            raise ValueError("hash routing needs token ids: call the layer as layer(x, token_ids=ids)")
        check_token_ids(ids_T, self.vocab_size)
        ids_TK = self.table_VK[ids_T.long()]
        if self.disabled:  # a disabled expert's ids move to the next enabled expert
            ids_TK = self._reroute(ids_TK)
        T, E = ids_TK.shape[0], self.num_experts
        weights_TK = torch.full(ids_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        probs_TE = torch.zeros(T, E, device=x_TD.device).scatter_add(-1, ids_TK, weights_TK)
        return RouterOutput(torch.zeros(T, E, device=x_TD.device), probs_TE, ids_TK, weights_TK)

    def _reroute(self, ids_TK: torch.Tensor) -> torch.Tensor:
        enabled = [e for e in range(self.num_experts) if e not in self.disabled]
        nxt = torch.tensor([min(enabled, key=lambda f: (f - e) % self.num_experts) for e in range(self.num_experts)],
                           device=ids_TK.device)
        return nxt[ids_TK]
