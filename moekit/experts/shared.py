"""Shared (always-on) experts: one dense MLP every token passes through, optionally scaled by a sigmoid gate.

DeepSeek-MoE/V3: ``n`` shared experts of width ``F`` are one MLP of width ``n*F``. Qwen2-MoE: one shared expert
scaled by ``sigmoid(x @ w_gate)``. Layout follows Hugging Face: ``gate_proj``/``up_proj``/``down_proj`` Linears.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import Activation, get_activation


class SharedExperts(nn.Module):
    """Dense MLP ``down(act(gate(x)) * up(x))`` (or ``down(act(up(x)))``) with an optional sigmoid gate."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str | Activation = "swiglu",
                 activation_kwargs: dict | None = None, gate: bool = False, bias: bool = False):
        super().__init__()
        self.activation = get_activation(activation, **(activation_kwargs or {}))
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias) if self.activation.gated else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            h = self.activation.fn(self.gate_proj(x_TD), self.up_proj(x_TD))
        else:
            h = self.activation.fn(self.up_proj(x_TD))
        y = self.down_proj(h)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x_TD)) * y
        return y
