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

from ..experts.activations import get_activation
from ..layer import MoE


def _get(cfg, *names, default=None):
    """The first of ``names`` that the config has (transformers families spell the same option differently)."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


@dataclass
class Family:
    """How one transformers family routes and combines, in moekit terms.

    Attributes:
        router: moekit router name.
        router_kwargs: its options, read from the transformers config (and the block, for per-layer values).
        activation: override of the experts' activation: ``(config, experts module) -> (name, kwargs)`` (families
            that ignore ``hidden_act`` or set the activation per layer).
        shared_activation: override of the shared experts' activation: ``(config, shared module) -> (name, kwargs)``.
        shared_scale: constant on the shared output.
        check: returns why a given config cannot be expressed (or None), for options moekit does not cover.
    """

    router: str
    router_kwargs: Callable[[Any, nn.Module], dict] = field(default=lambda cfg, block: {})
    activation: Callable[[Any, nn.Module], tuple[str, dict]] | None = None
    shared_activation: Callable[[Any, nn.Module], tuple[str, dict]] | None = None
    shared_scale: Callable[[Any], float] = field(default=lambda cfg: 1.0)
    check: Callable[[Any, nn.Module], str | None] = field(default=lambda cfg, block: None)


def _softmax(renorm: bool | None = None, **extra) -> Family:
    """softmax → top-k. ``renorm=None``: follow ``config.norm_topk_prob``."""
    def kwargs(cfg, block):
        r = bool(_get(cfg, "norm_topk_prob", default=False)) if renorm is None else renorm
        return {"renormalize": r, **extra}
    return Family("softmax_topk", kwargs)


def _router_attr(block: nn.Module, names: tuple[str, ...]):
    """``(found, value)`` of the first of ``names`` set on the block's router module (the value used at run time)."""
    router = getattr(block, "gate", None) or getattr(block, "router", None)
    for n in names:
        if router is not None and hasattr(router, n):
            return True, getattr(router, n)
    return False, None


def _groups(cfg, block) -> tuple[int, int]:
    found, n_group = _router_attr(block, ("num_group", "n_group"))
    if not found:
        n_group = _get(cfg, "n_group", "num_expert_group")
    found, topk_group = _router_attr(block, ("topk_group",))
    if not found:
        topk_group = _get(cfg, "topk_group")
    return n_group or 1, topk_group or 1


def _deepseek_v3(group_fill: float = float("-inf"), scale: bool = True) -> Family:
    def kwargs(cfg, block):
        n_group, topk_group = _groups(cfg, block)
        return {"n_group": n_group, "topk_group": topk_group,
                "renormalize": bool(_get(cfg, "norm_topk_prob", "moe_renormalize", default=True)),
                "scale": float(_get(cfg, "routed_scaling_factor", default=1.0)) if scale else 1.0,
                "group_fill": group_fill}
    return Family("sigmoid_topk", kwargs)


def _deepseek_v2(cfg, block) -> dict:
    grouped = _get(cfg, "topk_method", default="greedy") == "group_limited_greedy"
    return {"score_func": "softmax", "group_score": "max", "group_fill": 0.0, "renormalize": False,
            "n_group": _groups(cfg, block)[0] if grouped else 1, "topk_group": _groups(cfg, block)[1] if grouped else 1,
            "scale": float(cfg.routed_scaling_factor)}


def _mistral4(always_renorm: bool) -> Family:
    def kwargs(cfg, block):
        return {"score_func": "softmax", "group_score": "top2_sum", "group_fill": 0.0,
                "n_group": _groups(cfg, block)[0], "topk_group": _groups(cfg, block)[1],
                "renormalize": always_renorm or bool(cfg.norm_topk_prob), "scale": float(cfg.routed_scaling_factor)}
    return Family("sigmoid_topk", kwargs)


def _sigmoid(renorm: bool | None = True, eps: float = 1e-20, scale_attr: tuple = (), **extra) -> Family:
    """sigmoid → top-k (selection bias if the block has one), no groups."""
    def kwargs(cfg, block):
        r = bool(_get(cfg, "norm_topk_prob", default=False)) if renorm is None else renorm
        scale = float(_get(cfg, *scale_attr, default=1.0)) if scale_attr else 1.0
        return {"renormalize": r, "renorm_eps": eps, "scale": scale, **{k: v(cfg) for k, v in extra.items()}}
    return Family("sigmoid_topk", kwargs)


def _cohere2(cfg, block) -> dict:
    avg = _get(cfg, "shared_expert_combination_strategy", default="sum") == "average" and \
        getattr(block, "shared_experts", None) is not None
    return {"weight_func": _get(cfg, "expert_selection_fn", default="softmax"),
            "renormalize": bool(_get(cfg, "norm_topk_prob", default=False)), "scale": 0.5 if avg else 1.0}


def _cohere2_shared_scale(cfg) -> float:
    return 0.5 if _get(cfg, "shared_expert_combination_strategy", default="sum") == "average" else 1.0


def _needs(attr: str, value, why: str):
    def check(cfg, block):
        return None if getattr(cfg, attr, value) == value else why
    return check


def _clamp(cfg, module) -> tuple[str, dict]:
    return "swiglu_clamped", {"limit": float(cfg.swiglu_limit)}


def _gpt_oss_act(cfg, module) -> tuple[str, dict]:
    return "gpt_oss", {"alpha": float(cfg.swiglu_alpha), "limit": float(cfg.swiglu_limit)}


def _clipped_after(cfg, module) -> tuple[str, dict]:
    """SwiGLU whose SiLU output and up half are clipped to ``module.limit`` (a per-layer bound; none: plain SwiGLU),
    as Step-3.5/3.7 and Ling's hybrid models do, for routed and shared experts alike."""
    if cfg.hidden_act not in ("silu", "swish"):
        raise ValueError(f"{type(module).__name__}: clipped activation {cfg.hidden_act!r} has no moekit equivalent; "
                         "known: silu")
    limit = getattr(module, "limit", None)
    return ("swiglu_clipped", {"limit": float(limit)}) if limit else ("swiglu", {})


def _nemotron_act(cfg, module) -> tuple[str, dict]:
    return _PLAIN_ACTS[cfg.mlp_hidden_act], {}


_SILU = lambda cfg, module: ("swiglu", {})  # noqa: E731 - families whose experts hard-code SiLU

FAMILIES: dict[str, Family] = {
    # softmax → top-k (R1)
    "mixtral": _softmax(True), "minimax": _softmax(True), "qwen3_vl_moe_text": _softmax(True),
    "qwen3_5_moe_text": _softmax(True), "hunyuan_v1_moe": _softmax(True),
    "qwen2_moe": _softmax(), "qwen3_moe": _softmax(), "qwen3_next": _softmax(), "qwen4_exp_text": _softmax(),
    "qwen3_omni_moe_text": _softmax(), "qwen3_omni_moe_talker_text": _softmax(),
    "olmoe": _softmax(), "flex_olmo": _softmax(), "mellum": _softmax(), "jamba": _softmax(False),
    # softmax + selection bias, clamped renormalisation (ERNIE-4.5)
    "ernie4_5_moe": Family("softmax_topk", lambda cfg, block: {"renormalize": True,
                                                             "renorm_min": float(cfg.moe_norm_min)}),
    # top-k logits → softmax / sigmoid over k (R2, R7, R8)
    "granitemoe": Family("topk_softmax"), "granitemoe_swa": Family("topk_softmax"),
    "granitemoeshared": Family("topk_softmax"), "granitemoehybrid": Family("topk_softmax"),
    "aria_text": Family("topk_softmax", activation=_SILU,
                        shared_activation=lambda cfg, module: (_GATED_ACTS[cfg.hidden_act], {})),
    "gpt_oss": Family("topk_softmax", lambda cfg, block: {"bias": True}, activation=_gpt_oss_act),
    "cohere2_moe": Family("topk_softmax", _cohere2, shared_scale=_cohere2_shared_scale),
    "kolibri1": Family("topk_softmax", lambda cfg, block: {
        "weight_func": "sigmoid", "renormalize": bool(_get(cfg, "norm_topk_prob", default=False))}),
    # DeepSeek-V3: sigmoid, group-limited, correction bias, routed scaling (R3)
    **{name: _deepseek_v3() for name in (
        "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "glm4v_moe_text", "glm_moe_dsa", "dots1",
        "dots3_note_text", "exaone_moe", "kimi_linear", "solar_open", "mimo_v2_flash")},
    # Ling hybrid: DeepSeek-V3 routing, SwiGLU clipped after the activation on some layers (experts and shared)
    "bailing_hybrid": Family("sigmoid_topk", _deepseek_v3().router_kwargs, activation=_clipped_after,
                             shared_activation=_clipped_after),
    # Beam: the scaling is applied to the summed output (the same thing) and the SwiGLU runs in fp32
    "beam": Family("sigmoid_topk", _deepseek_v3().router_kwargs,
                   activation=lambda cfg, module: (_GATED_ACTS[cfg.hidden_act], {})),
    "axk2": _deepseek_v3(group_fill=0.0),
    "hy_v4": Family("sigmoid_topk", _deepseek_v3().router_kwargs, activation=_clamp,
                    shared_activation=lambda cfg, module: ("swiglu", {})),
    "glm5_next_text": Family("sigmoid_topk", _deepseek_v3().router_kwargs, activation=_clamp),
    "nemotron_h": Family("sigmoid_topk", _deepseek_v3().router_kwargs, activation=_nemotron_act,
                         check=_needs("moe_latent_size", None, "moe_latent_size is set (latent projections around "
                                      "the experts are not part of a moekit layer)")),
    # DeepSeek-V2 (R4) and Mistral-4 (R5): softmax with group limits, filled with 0
    "deepseek_v2": Family("sigmoid_topk", _deepseek_v2), "deepseek_ocr2_text": Family("sigmoid_topk", _deepseek_v2),
    "unlimited_ocr_text": Family("sigmoid_topk", _deepseek_v2),
    "mistral4": _mistral4(False), "mistral_large4_text": _mistral4(True),
    # sigmoid + selection bias, no groups (R3b)
    "minimax_m2": _sigmoid(eps=0.0),
    "minimax_m3_vl_text": Family("sigmoid_topk", _sigmoid(eps=0.0, scale_attr=("routed_scaling_factor",))
                                 .router_kwargs, activation=_gpt_oss_act),
    "hy_v3": _sigmoid(scale_attr=("router_scaling_factor",)),
    "laguna": _sigmoid(eps=0.0, scale_attr=("moe_routed_scaling_factor",),
                       logit_softcap=lambda cfg: float(_get(cfg, "moe_router_logit_softcapping", default=0.0))),
    "lfm2_moe": Family("sigmoid_topk", _sigmoid(None, eps=1e-6, scale_attr=("routed_scaling_factor",)).router_kwargs,
                       activation=_SILU),
    "afmoe": _sigmoid(scale_attr=("route_scale",)),
    # Step-3.5/3.7 text: sigmoid + selection bias, renormalised, scaled; SwiGLU clipped after the activation
    "step3p5": Family("sigmoid_topk", _sigmoid(eps=0.0, scale_attr=("moe_router_scaling_factor",)).router_kwargs,
                      activation=_clipped_after, shared_activation=_clipped_after),
    "flint": _sigmoid(None, eps=0.0),
}

# Families whose block cannot be written as router + experts (+ shared), with the reason.
UNSUPPORTED: dict[str, str] = {
    "axk1": "the block applies an RMSNorm to its output",
    "openai_privacy_filter": "its fp32-only expert path divides and re-multiplies by top_k",
    "muse_spark_text": "projections in and out of the experts and a norm on each expert's output",
    "inkling_text": "shared experts weighted per token by the router",
    "inkling2_text": "tanh-softcapped expert activation",
    "deepseek_v4": "hash routing by token id and sqrt-softplus scores",
    "ernie4_5_vl_moe_text": "separate text and vision expert sets",
    "gemma4_text": "the MoE lives inline in the decoder layer and its router sees a different input",
    "diffusion_gemma_text": "the MoE lives inline in the decoder layer and its router sees a different input",
    "phimoe": "sparsemixer routing",
    "zaya": "an MLP router with state carried between layers and a skip expert",
}

# transformers' hidden_act → moekit activation (gated experts / plain MLP experts)
_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh",
               "gelu_new": "geglu_tanh", "relu": "reglu"}
_PLAIN_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu",
               "relu2": "relu2", "silu": "silu"}


_ROUTER_WEIGHTS = ("gate.weight", "router.weight", "gate.wg.weight", "router.gate.weight")
_ROUTER_BIASES = ("router.bias",)
_SELECTION_BIASES = ("gate.e_score_correction_bias", "router.e_score_correction_bias", "e_score_correction_bias",
                     "expert_bias", "gate.moe_statics.e_score_correction_bias")
_SHARED = ("shared_expert", "shared_experts", "shared_mlp")


def _lookup(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first(root: nn.Module, paths: tuple[str, ...]) -> tuple[str | None, Any]:
    for path in paths:
        obj = _lookup(root, path)
        if isinstance(obj, torch.Tensor):
            return path, obj
    return None, None


@dataclass
class BlockParts:
    """The pieces of a transformers MoE block, found by name."""

    router_weight: torch.Tensor
    router_bias: torch.Tensor | None
    selection_bias: torch.Tensor | None
    experts: nn.Module
    shared: nn.Module | None
    shared_gate: nn.Module | None
    config: Any
    paths: dict[str, str | None]

    @property
    def model_type(self) -> str:
        return getattr(self.config, "model_type", "?")


def find_parts(block: nn.Module) -> BlockParts:
    """Locate router weight, selection bias, fused experts and shared experts inside a transformers MoE block."""
    experts = getattr(block, "experts", None)
    w_path, router_w = _first(block, _ROUTER_WEIGHTS)
    fused = experts is not None and isinstance(getattr(experts, "down_proj", None), torch.Tensor) and \
        experts.down_proj.dim() == 3
    if not fused or router_w is None:
        raise ValueError(f"{type(block).__name__} is not a router + fused-experts MoE block that moekit can read "
                         f"(found router weight={router_w is not None}, fused experts={fused}); supported "
                         f"families: {', '.join(sorted(FAMILIES))}")
    b_path, router_b = _first(block, _ROUTER_BIASES)
    s_path, sel_b = _first(block, _SELECTION_BIASES)
    shared_name = next((n for n in _SHARED if isinstance(getattr(block, n, None), nn.Module)), None)
    config = getattr(experts, "config", None) or getattr(block, "config", None)
    return BlockParts(router_w, router_b, sel_b, experts, getattr(block, shared_name) if shared_name else None,
                      getattr(block, "shared_expert_gate", None), config,
                      {"router_weight": w_path, "router_bias": b_path, "selection_bias": s_path, "shared": shared_name})


def _expert_activation(experts: nn.Module, cfg) -> tuple[str, dict]:
    gate_fn = getattr(type(experts), "_apply_gate", None)
    if gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        raise ValueError(f"{type(experts).__name__} has a custom gate function that moekit does not know")
    act = getattr(cfg, "hidden_act", "silu")
    table = _GATED_ACTS if getattr(experts, "has_gate", True) else _PLAIN_ACTS
    if act not in table:
        raise ValueError(f"{type(experts).__name__}: activation {act!r} has no moekit equivalent; "
                         f"known: {', '.join(table)}")
    return table[act], {}


def _shared_weights(shared: nn.Module) -> dict[str, torch.Tensor]:
    """The shared MLP's tensors under moekit's names (a fused ``gate_up_proj`` Linear is split)."""
    out = {}
    if isinstance(getattr(shared, "gate_up_proj", None), nn.Linear):
        g, u = shared.gate_up_proj.weight.chunk(2, dim=0)
        out.update({"gate_proj.weight": g, "up_proj.weight": u})
        if shared.gate_up_proj.bias is not None:
            gb, ub = shared.gate_up_proj.bias.chunk(2)
            out.update({"gate_proj.bias": gb, "up_proj.bias": ub})
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(shared, name, None)
        if isinstance(lin, nn.Linear):
            out[f"{name}.weight"] = lin.weight
            if lin.bias is not None:
                out[f"{name}.bias"] = lin.bias
    if "down_proj.weight" not in out or "up_proj.weight" not in out:
        raise ValueError(f"shared experts {type(shared).__name__} are not a gate/up/down MLP moekit can read")
    return out


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
    """An :class:`moekit.MoE` that computes exactly what the transformers ``block`` computes, with copied weights,
    in the block's mode (training or eval).

    Args:
        block: a transformers v5 sparse-MoE block (e.g. ``model.model.layers[0].mlp``).
        backend: moekit experts backend.
        **options: further :class:`moekit.MoEConfig` fields (e.g. ``aux_loss="switch"`` for fine-tuning; by default
            no auxiliary loss is attached, as the transformers block attaches none).
    """
    parts = find_parts(block)
    family = FAMILIES.get(parts.model_type)
    if family is None:
        why = UNSUPPORTED.get(parts.model_type)
        raise ValueError(f"transformers family {parts.model_type!r} ({type(block).__name__}) is not supported by "
                         f"moekit.from_hf" + (f": {why}" if why else "") +
                         f"; supported: {', '.join(sorted(FAMILIES))}")
    cfg, experts = parts.config, parts.experts
    reason = family.check(cfg, block)
    if reason:
        raise ValueError(f"{parts.model_type} block cannot be converted: {reason}")
    w_in, b_in = hf_in_weight(experts)
    w_out = hf_out_weight(experts)
    E, _, D = w_in.shape
    d_ff = w_out.shape[2]
    activation, act_kwargs = family.activation(cfg, experts) if family.activation else _expert_activation(experts, cfg)
    top_k = int(_get(block, "top_k", default=None) or _get(getattr(block, "gate", None), "top_k", default=None)
                or _get(getattr(block, "router", None), "top_k", default=None)
                or _get(cfg, "num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token"))
    router_kwargs = family.router_kwargs(cfg, block)
    if parts.router_bias is not None:
        router_kwargs["bias"] = True

    kwargs = dict(router=family.router, router_kwargs=router_kwargs, activation=activation,
                  activation_kwargs=act_kwargs, expert_bias=b_in is not None, backend=backend, aux_loss=None)
    shared = _shared_weights(parts.shared) if parts.shared is not None else None
    if shared is not None:
        shared_act, shared_act_kwargs = (family.shared_activation(cfg, parts.shared) if family.shared_activation
                                         else (activation, act_kwargs))
        if ("gate_proj.weight" in shared) != get_activation(shared_act, **shared_act_kwargs).gated:
            raise ValueError(f"{parts.model_type}: shared experts do not match activation {shared_act!r}")
        kwargs.update(shared_experts=1, shared_d_ff=shared["down_proj.weight"].shape[1],
                      shared_expert_gate=parts.shared_gate is not None, shared_activation=shared_act,
                      shared_activation_kwargs=shared_act_kwargs, shared_bias="down_proj.bias" in shared,
                      shared_scale=family.shared_scale(cfg))
    kwargs.update(options)
    ref = experts.down_proj
    layer = MoE(D, d_ff, E, top_k, **kwargs).to(device=ref.device, dtype=ref.dtype)

    with torch.no_grad():
        layer.router.weight.copy_(parts.router_weight)
        if parts.router_bias is not None:
            layer.router.bias.copy_(parts.router_bias)
        if parts.selection_bias is not None:
            layer.router.expert_bias.copy_(parts.selection_bias.reshape(-1))
        layer.experts.w_in.copy_(w_in)
        layer.experts.w_out.copy_(w_out)
        if b_in is not None:
            layer.experts.b_in.copy_(b_in)
            layer.experts.b_out.copy_(experts.down_proj_bias)
        if shared is not None:
            own = dict(layer.shared_experts.named_parameters())
            for name, tensor in shared.items():
                own[name].copy_(tensor)
            if parts.shared_gate is not None:
                layer.shared_experts.gate.weight.copy_(parts.shared_gate.weight)
    # in the block's mode: a block of a model already in eval mode gives a layer in eval mode (its inference paths,
    # no balancing statistics or selection-bias updates), as the model's own .eval() would have set it
    return layer.train(block.training)
