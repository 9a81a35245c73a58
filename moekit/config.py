"""Configuration of an MoE layer: one dataclass that validates itself on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .balance import AUX_LOSSES
from .dispatch.local import DROP_POLICIES
from .experts.activations import ACTIVATIONS
from .experts.backends import BACKENDS
from .utils import dataclass_from_dict


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class MoEConfig:
    """Everything that defines an :class:`moekit.MoE` layer.

    Attributes:
        d_model: token width ``D`` (input and output).
        d_ff: hidden width ``F`` of one routed expert.
        num_experts: routed experts ``E``.
        top_k: experts per token ``K``.
        router: registered router name (see ``moekit.routing.ROUTERS``).
        router_kwargs: options for that router (e.g. ``{"renormalize": False}``).
        shared_experts: number of always-on shared experts (0 = none); they form one MLP of width
            ``shared_experts * shared_d_ff``.
        shared_d_ff: width of one shared expert (default ``d_ff``).
        shared_expert_gate: scale the shared output by ``sigmoid(x @ w)`` (Qwen2-MoE).
        shared_activation, shared_activation_kwargs: the shared experts' nonlinearity (default: ``activation``).
        shared_bias: biases on the shared experts' projections.
        shared_scale: constant factor on the shared output (0.5 with a 0.5 router scale = Cohere2's "average").
        capacity_factor: ``None`` = dropless; else per-expert capacity ``ceil(cf * T * K / E)``.
        drop_policy: over capacity, keep the highest-weight slots (``"probs"``) or the earliest tokens
            (``"position"``).
        activation, activation_kwargs: expert nonlinearity (``swiglu`` default; ``gelu``, ``relu``, ``gpt_oss``...).
        expert_bias: biases on the expert projections.
        backend: experts backend: ``auto``, ``loop`` (reference), ``segment``, ``grouped_mm``, ``fused``,
            ``triton`` (CUDA; see ``moekit.experts.triton_backend``).
        aux_loss: ``"switch"`` (batch-level), ``"seq"`` (sequence-level) or ``None``.
        aux_loss_coef: weight of the auxiliary loss (0 switches it off).
        z_loss_coef: weight of the router z-loss (0 = off).
        bias_update_rate: auxiliary-loss-free balancing step ``gamma`` (0 = off).
        bias_update: ``"auto"`` (each training forward's load steps the bias when the layer next runs a forward,
            so a forward recomputed under activation checkpointing routes as the original did) or ``"manual"``
            (call ``layer.update_bias()``).
        causal: the layer sits in a causal (autoregressive) model; non-causal routers are then refused.
        allow_non_causal: accept a non-causal router in a causal model anyway (it leaks future tokens).
        on_expert_failure: ``"raise"``, or ``"skip"``: an expert that raises or returns non-finite values is
            dropped for that call and its tokens' weights are renormalised over their surviving choices.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    router: str = "softmax_topk"
    router_kwargs: dict = field(default_factory=dict)
    shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    shared_activation: str | None = None
    shared_activation_kwargs: dict | None = None
    shared_bias: bool = False
    shared_scale: float = 1.0
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    activation: str = "swiglu"
    activation_kwargs: dict = field(default_factory=dict)
    expert_bias: bool = False
    backend: str = "auto"
    aux_loss: str | None = "switch"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    bias_update: str = "auto"
    causal: bool = False
    allow_non_causal: bool = False
    on_expert_failure: str = "raise"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            _positive_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}; "
                             "choose top_k <= num_experts")
        if not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            raise ValueError(f"shared_experts must be an integer >= 0, got {self.shared_experts!r}")
        if self.shared_d_ff is not None:
            _positive_int("shared_d_ff", self.shared_d_ff)
        if self.shared_expert_gate and self.shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs shared_experts >= 1")
        if self.capacity_factor is not None and not (isinstance(self.capacity_factor, (int, float))
                                                     and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be > 0, or None for dropless routing; got {self.capacity_factor!r}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        for name in ("activation", "shared_activation"):
            act = getattr(self, name)
            if act is not None and act not in ACTIVATIONS:
                raise ValueError(f"unknown {name} {act!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.aux_loss not in (*AUX_LOSSES, None):
            raise ValueError(f"aux_loss must be one of {AUX_LOSSES} or None, got {self.aux_loss!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.on_expert_failure not in ("raise", "skip"):
            raise ValueError(f"on_expert_failure must be 'raise' or 'skip', got {self.on_expert_failure!r}")
        if self.bias_update not in ("auto", "manual"):
            raise ValueError(f"bias_update must be 'auto' or 'manual', got {self.bias_update!r}")

    @property
    def shared_act(self) -> tuple[str, dict]:
        if self.shared_activation is None:
            return self.activation, self.activation_kwargs
        return self.shared_activation, self.shared_activation_kwargs or {}

    @property
    def shared_width(self) -> int:
        return self.shared_experts * (self.shared_d_ff or self.d_ff)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        """Build from a dict such as ``to_dict()`` wrote; missing keys take their defaults, unknown keys fail."""
        return dataclass_from_dict(cls, d)
