"""Hugging Face transformers (v5) sparse-MoE blocks ⇄ :class:`moekit.MoE`, with the same weights.

A transformers MoE block is a router (``gate``/``router``, weight ``[E, D]``), a fused experts module (3D weights,
``@use_experts_implementation``) and, in some families, shared experts (+ a sigmoid gate). The experts' layout flags
(``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``) come from the decorator; the routing math is
family specific and lives in :data:`FAMILIES`, keyed by ``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..layer import MoE


@dataclass
class Family:
    """How one transformers family routes: a moekit router name and its options read from the HF config."""

    router: str
    router_kwargs: Callable[[Any], dict] = field(default=lambda cfg: {})
    notes: str = ""


def _norm(cfg) -> dict:
    return {"renormalize": bool(getattr(cfg, "norm_topk_prob", False))}


def _deepseek_v3(cfg) -> dict:
    return {"n_group": cfg.n_group or 1, "topk_group": cfg.topk_group or 1,
            "renormalize": bool(cfg.norm_topk_prob), "scale": float(cfg.routed_scaling_factor)}


FAMILIES: dict[str, Family] = {
    "mixtral": Family("softmax_topk", lambda cfg: {"renormalize": True}),
    "qwen2_moe": Family("softmax_topk", _norm),
    "qwen3_moe": Family("softmax_topk", _norm),
    "olmoe": Family("softmax_topk", _norm),
    "deepseek_v3": Family("sigmoid_topk", _deepseek_v3),
    "gpt_oss": Family("topk_softmax", lambda cfg: {"bias": True}),
}

# transformers' hidden_act → moekit activation (gated experts / plain MLP experts)
_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh",
               "gelu_new": "geglu_tanh", "relu": "reglu"}
_PLAIN_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu",
               "relu2": "relu2", "silu": "silu"}


@dataclass
class BlockParts:
    """The pieces of a transformers MoE block."""

    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None
    shared_gate: nn.Module | None
    config: Any

    @property
    def model_type(self) -> str:
        return getattr(self.config, "model_type", "?")


def find_parts(block: nn.Module) -> BlockParts:
    """Locate router, fused experts and shared experts among the block's direct children."""
    experts = router = shared = shared_gate = None
    for name, child in block.named_children():
        params = dict(child.named_parameters(recurse=False))
        if "down_proj" in params and params["down_proj"].dim() == 3:
            experts = child
        elif "weight" in params and params["weight"].dim() == 2 and name in ("gate", "router"):
            router = child
        elif name in ("shared_expert", "shared_experts", "shared_mlp"):
            shared = child
        elif name in ("shared_expert_gate",):
            shared_gate = child
    if experts is None or router is None:
        raise ValueError(f"{type(block).__name__} is not a router + fused-experts MoE block that moekit can read "
                         f"(found router={router is not None}, fused experts={experts is not None}); "
                         f"supported families: {', '.join(sorted(FAMILIES))}")
    config = getattr(experts, "config", None) or getattr(block, "config", None)
    return BlockParts(router, experts, shared, shared_gate, config)


def _expert_activation(experts: nn.Module, cfg) -> tuple[str, dict]:
    gate_fn = getattr(type(experts), "_apply_gate", None)
    if gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        if hasattr(experts, "alpha") and hasattr(experts, "limit"):
            return "gpt_oss", {"alpha": float(experts.alpha), "limit": float(experts.limit)}
        raise ValueError(f"{type(experts).__name__} has a custom gate that moekit does not know")
    act = getattr(cfg, "hidden_act", "silu")
    table = _GATED_ACTS if getattr(experts, "has_gate", True) else _PLAIN_ACTS
    if act not in table:
        raise ValueError(f"{type(experts).__name__}: activation {act!r} has no moekit equivalent; "
                         f"known: {', '.join(table)}")
    return table[act], {}


def hf_in_weight(experts: nn.Module, w: torch.Tensor | None = None,
                 b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The experts' input projection (or a same-shaped tensor, e.g. its gradient) as moekit's ``[E, width, D]``
    in concatenated ``[gate; up]`` order, with its bias."""
    gated = getattr(experts, "has_gate", True)
    if w is None:
        w = experts.gate_up_proj if gated else experts.up_proj
        b = getattr(experts, "gate_up_proj_bias" if gated else "up_proj_bias", None)
    if getattr(experts, "is_transposed", False):
        w = w.transpose(1, 2)
    if gated and not getattr(experts, "is_concatenated", True):  # interleaved [g0, u0, g1, u1, ...]
        w = torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)
        if b is not None:
            b = torch.cat([b[:, 0::2], b[:, 1::2]], dim=1)
    return w, b


def hf_out_weight(experts: nn.Module, w: torch.Tensor | None = None) -> torch.Tensor:
    """The experts' down projection (or a same-shaped tensor) as moekit's ``[E, D, F]``."""
    w = experts.down_proj if w is None else w
    return w.transpose(1, 2) if getattr(experts, "is_transposed", False) else w


def from_hf(block: nn.Module, *, backend: str = "auto", **options) -> MoE:
    """An :class:`moekit.MoE` that computes exactly what the transformers ``block`` computes, with copied weights.

    Args:
        block: a transformers v5 sparse-MoE block (e.g. ``model.model.layers[0].mlp``).
        backend: moekit experts backend.
        **options: further :class:`moekit.MoEConfig` fields (e.g. ``aux_loss="switch"`` for fine-tuning; by default
            no auxiliary loss is attached, as the transformers block attaches none).
    """
    parts = find_parts(block)
    family = FAMILIES.get(parts.model_type)
    if family is None:
        raise ValueError(f"transformers family {parts.model_type!r} ({type(block).__name__}) is not supported by "
                         f"moekit.from_hf; supported: {', '.join(sorted(FAMILIES))}")
    cfg, experts, router = parts.config, parts.experts, parts.router
    w_in, b_in = hf_in_weight(experts)
    w_out = hf_out_weight(experts)
    E, width, D = w_in.shape
    d_ff = w_out.shape[2]
    activation, act_kwargs = _expert_activation(experts, cfg)
    top_k = int(getattr(router, "top_k", None) or cfg.num_experts_per_tok)

    shared_kw: dict = {}
    if parts.shared is not None:
        shared_kw = {"shared_experts": 1, "shared_d_ff": parts.shared.down_proj.weight.shape[1],
                     "shared_expert_gate": parts.shared_gate is not None}
    kwargs = dict(router=family.router, router_kwargs=family.router_kwargs(cfg), activation=activation,
                  activation_kwargs=act_kwargs, expert_bias=b_in is not None, backend=backend, aux_loss=None)
    kwargs.update(shared_kw)
    kwargs.update(options)
    ref = experts.down_proj
    layer = MoE(D, d_ff, E, top_k, **kwargs).to(device=ref.device, dtype=ref.dtype)

    with torch.no_grad():
        layer.router.weight.copy_(router.weight)
        if layer.router.bias is not None:
            layer.router.bias.copy_(router.bias)
        if hasattr(router, "e_score_correction_bias"):
            layer.router.expert_bias.copy_(router.e_score_correction_bias)
        layer.experts.w_in.copy_(w_in)
        layer.experts.w_out.copy_(w_out)
        if b_in is not None:
            layer.experts.b_in.copy_(b_in)
            layer.experts.b_out.copy_(experts.down_proj_bias)
        if parts.shared is not None:
            s = layer.shared_experts
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(s, name).weight.copy_(getattr(parts.shared, name).weight)
            if parts.shared_gate is not None:
                s.gate.weight.copy_(parts.shared_gate.weight)
    return layer
