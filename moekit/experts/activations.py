"""Expert activations. Gated ones take the concatenated ``[gate; up]`` projection of width ``2F``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """An expert nonlinearity. ``gated``: ``fn(gate, up)`` on the two halves; else ``fn(h)``."""

    name: str
    gated: bool
    fn: Callable[..., torch.Tensor] = field(repr=False, compare=False)
    kwargs: tuple = ()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fn(gate, up)
        return self.fn(h)


def _gpt_oss(alpha: float, limit: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # GPT-OSS clamped SwiGLU: (clamp(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return glu


def _swiglu_clamped(limit: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # clamped SwiGLU (HY-V4, GLM-5-Next, DeepSeek-V4): silu(min(gate, limit)) * clamp(up, -limit, limit)
        return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)

    return glu


def _swiglu_clipped(limit: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # SwiGLU clipped after the activation (Step-3.5/3.7, Ling): min(silu(gate), limit) * clamp(up, -limit, limit)
        return F.silu(gate).clamp(max=limit) * up.clamp(min=-limit, max=limit)

    return glu


def _relu2(h: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(h))


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


_GATED: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "swiglu": lambda g, u: F.silu(g) * u,
    "geglu": lambda g, u: F.gelu(g) * u,
    "geglu_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u,
    "reglu": lambda g, u: F.relu(g) * u,
}
_PLAIN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "relu2": _relu2,
    "silu": F.silu,
}
_PARAMETRIC: dict[str, tuple[dict, Callable[..., Callable]]] = {
    "gpt_oss": ({"alpha": 1.702, "limit": 7.0}, _gpt_oss),
    "swiglu_clamped": ({"limit": 7.0}, _swiglu_clamped),
    "swiglu_clipped": ({"limit": 7.0}, _swiglu_clipped),
}
ACTIVATIONS = tuple(_GATED) + tuple(_PLAIN) + tuple(_PARAMETRIC)


def get_activation(name: str | Activation, **kwargs) -> Activation:
    """Look up an activation by name. ``gpt_oss`` takes ``alpha`` (1.702) and ``limit`` (7.0);
    ``swiglu_clamped`` (gate clamped before the SiLU) and ``swiglu_clipped`` (SiLU output clipped) take ``limit``
    (7.0)."""
    if isinstance(name, Activation):
        return name
    if name in _PARAMETRIC:
        defaults, make = _PARAMETRIC[name]
        unknown = set(kwargs) - set(defaults)
        if unknown:
            raise ValueError(f"activation {name!r} takes {' and '.join(defaults)}, not {sorted(unknown)}")
        params = {**defaults, **{k: float(v) for k, v in kwargs.items()}}
        return Activation(name, True, make(**params), tuple(sorted(params.items())))
    if kwargs:
        raise ValueError(f"activation {name!r} takes no options, got {sorted(kwargs)}")
    if name in _GATED:
        return Activation(name, True, _GATED[name])
    if name in _PLAIN:
        return Activation(name, False, _PLAIN[name])
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
