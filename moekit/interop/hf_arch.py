"""Which transformers MoE architectures moekit's language model reproduces, and how their ``config.json`` maps onto
:class:`moekit.models.LMConfig` (both ways).

Supported: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (:data:`ARCHITECTURES`); :data:`NOT_CONVERTIBLE` says why some
others are not. Options moekit cannot reproduce exactly (sliding windows, RoPE scaling, quantization...) are
refused with the config key that asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models import LMConfig
from .hf_files import HFCheckpointError

# ---------------------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """How one transformers family maps onto :class:`LMConfig` and moekit's tensor names.

    Attributes:
        model_type, hf_class: ``config.model_type`` and the ``architectures`` entry written back.
        defaults: transformers' defaults for the config keys read here (used when config.json omits them).
        expert_keys: config keys of the routed expert width and the expert count (first one present wins).
        expert_names: per-expert ``(gate, up, down)`` weight names in hub checkpoints.
        moe_prefixes: module name of the MoE block inside a decoder layer (the first is the v5 name).
        qk_norm: ``None``, ``"head"`` or ``"full"`` (see :class:`LMConfig`).
        qkv_bias, out_bias: config key that switches each attention bias on, or ``None`` for never.
        sparse_step: the family has ``decoder_sparse_step`` / ``mlp_only_layers`` (dense MLP layers between MoE ones).
        shared_expert: the family has one sigmoid-gated shared expert (Qwen2-MoE).
        clip_qkv: the family has the ``clip_qkv`` option (OLMoE).
        renormalize: how the top-k weights are normalised: a bool, or a config key.
    """

    model_type: str
    hf_class: str
    defaults: dict
    expert_keys: tuple[tuple[str, ...], tuple[str, ...]]
    expert_names: tuple[str, str, str]
    moe_prefixes: tuple[str, ...] = ("mlp",)
    qk_norm: str | None = None
    qkv_bias: str | None = None
    out_bias: str | None = None
    sparse_step: bool = False
    shared_expert: bool = False
    clip_qkv: bool = False
    renormalize: bool | str = "norm_topk_prob"


_COMMON = dict(hidden_act="silu", tie_word_embeddings=False, num_key_value_heads=None, head_dim=None)
ARCHITECTURES: dict[str, Arch] = {
    "mixtral": Arch("mixtral", "MixtralForCausalLM",
                    {**_COMMON, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32,
                     "num_key_value_heads": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001},
                    (("intermediate_size",), ("num_local_experts", "num_experts")), ("w1", "w3", "w2"),
                    moe_prefixes=("mlp", "block_sparse_moe"), renormalize=True),
    "qwen2_moe": Arch("qwen2_moe", "Qwen2MoeForCausalLM",
                      {**_COMMON, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "max_position_embeddings": 32768,
                       "num_key_value_heads": 16, "num_experts_per_tok": 4, "router_aux_loss_coef": 0.001,
                       "qkv_bias": True, "norm_topk_prob": False, "decoder_sparse_step": 1,
                       "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632},
                      (("moe_intermediate_size",), ("num_experts", "num_local_experts")),
                      ("gate_proj", "up_proj", "down_proj"), qkv_bias="qkv_bias", sparse_step=True,
                      shared_expert=True),
    "qwen3_moe": Arch("qwen3_moe", "Qwen3MoeForCausalLM",
                      {**_COMMON, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "max_position_embeddings": 32768,
                       "num_key_value_heads": 4, "num_experts_per_tok": 8, "router_aux_loss_coef": 0.001,
                       "attention_bias": False, "norm_topk_prob": False, "decoder_sparse_step": 1,
                       "moe_intermediate_size": 768},
                      (("moe_intermediate_size",), ("num_experts", "num_local_experts")),
                      ("gate_proj", "up_proj", "down_proj"), qk_norm="head", qkv_bias="attention_bias",
                      out_bias="attention_bias", sparse_step=True),
    "olmoe": Arch("olmoe", "OlmoeForCausalLM",
                  {**_COMMON, "rms_norm_eps": 1e-5, "rope_theta": 1e4, "max_position_embeddings": 4096,
                   "num_experts_per_tok": 8, "router_aux_loss_coef": 0.01, "attention_bias": False,
                   "norm_topk_prob": False, "clip_qkv": None},
                  (("intermediate_size",), ("num_experts", "num_local_experts")),
                  ("gate_proj", "up_proj", "down_proj"), qk_norm="full", qkv_bias="attention_bias",
                  out_bias="attention_bias", clip_qkv=True),
}

#: transformers MoE families that ``moekit convert`` does not turn into a moekit LM, and why (patch them instead).
NOT_CONVERTIBLE: dict[str, str] = {
    "deepseek_v2": "multi-head latent attention (MLA) and dense first layers",
    "deepseek_v3": "multi-head latent attention (MLA), dense first layers and group-limited sigmoid routing",
    "gpt_oss": "attention sinks, alternating sliding-window attention, YaRN RoPE and clamped SwiGLU experts",
    "granitemoe": "embedding/residual/logit multipliers and top-k-then-softmax routing",
    "jamba": "Mamba layers",
    "minimax": "lightning (linear) attention layers",
    "qwen3_next": "gated DeltaNet linear-attention layers and gated attention",
    "phimoe": "sparsemixer routing and LayerNorm",
    "dbrx": "a different attention (clipped fused QKV, LayerNorm) and block layout",
    "ernie4_5_moe": "a router selection bias with clamped renormalisation and dense first layers",
    "glm4_moe": "partial RoPE, dense first layers and group-limited sigmoid routing",
    "hunyuan_v1_moe": "q/k norms after RoPE and a per-layer expert count",
}


def supported_list() -> str:
    return ", ".join(f"{a.model_type} ({a.hf_class})" for a in ARCHITECTURES.values())


def arch_for(model_type: Any) -> Arch:
    """The :class:`Arch` of a ``model_type``, or a clear error listing the supported ones."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    why = NOT_CONVERTIBLE.get(model_type)
    reason = f" ({why}, which moekit's TransformerLM does not implement)" if why else ""
    raise HFCheckpointError(
        f"model_type {model_type!r} cannot be converted into a moekit LM{reason}. Supported: {supported_list()}. "
        "To run any transformers MoE model (54 families) on moekit's MoE layers instead, load it with "
        "transformers and call moekit.patch_hf(model)")


# ------------------------------------------------------------------------------------------- config mapping
def _get(hf: dict, arch: Arch, *keys: str):
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    for k in keys:
        if k in arch.defaults:
            return arch.defaults[k]
    return None


def _rope(hf: dict, arch: Arch) -> float:
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "?"
    rope_type = legacy.get("rope_type", legacy.get("type", rope_type)) if isinstance(legacy, dict) else "?"
    if rope_type != "default":
        raise HFCheckpointError(f"RoPE type {rope_type!r} (config rope_parameters / rope_scaling) is not supported; "
                                "moekit's LM implements the default rotary embedding only")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise HFCheckpointError(f"partial_rotary_factor={partial} is not supported (moekit rotates whole heads)")
    theta = params.get("rope_theta", hf.get("rope_theta", arch.defaults["rope_theta"]))
    return float(theta)


def _require(hf: dict, arch: Arch, key: str) -> Any:
    value = _get(hf, arch, key)
    if value is None:
        raise HFCheckpointError(f"config.json lacks {key!r}, which a {arch.model_type} model needs")
    return value


def lm_config_from_hf(hf: dict) -> LMConfig:
    """The :class:`LMConfig` of a supported transformers config (a ``config.json`` dict). Options moekit's LM cannot
    reproduce exactly are refused with the key that asks for them."""
    arch = arch_for(hf.get("model_type"))
    if hf.get("quantization_config"):
        raise HFCheckpointError("quantized checkpoints (config.json has quantization_config) are not supported; "
                                "convert the full-precision weights")
    act = _get(hf, arch, "hidden_act")
    if act not in ("silu", "swish"):
        raise HFCheckpointError(f"hidden_act={act!r} is not supported: moekit's converted experts are SwiGLU (silu)")
    sliding = hf.get("sliding_window")
    if hf.get("use_sliding_window") or (arch.model_type == "mixtral" and sliding is not None):
        raise HFCheckpointError(f"sliding-window attention (sliding_window={sliding}) is not implemented in moekit's "
                                "LM; set use_sliding_window=false / sliding_window=null if your sequences fit")
    d_model, n_heads = int(_require(hf, arch, "hidden_size")), int(_require(hf, arch, "num_attention_heads"))
    n_kv = int(_get(hf, arch, "num_key_value_heads") or n_heads)
    head_dim = hf.get("head_dim")
    if head_dim is not None and arch.qk_norm == "full" and int(head_dim) * n_heads != d_model:
        raise HFCheckpointError("OLMoE with head_dim * num_attention_heads != hidden_size is not supported")
    d_ff_expert = int(_require(hf, arch, *arch.expert_keys[0][:1]))
    num_experts = _get(hf, arch, *arch.expert_keys[1])
    if not num_experts:
        raise HFCheckpointError(f"config.json has no experts ({'/'.join(arch.expert_keys[1])} is 0 or missing): "
                                "this is not an MoE model")
    moe_every, d_ff = 1, d_ff_expert
    if arch.sparse_step:
        if hf.get("mlp_only_layers"):
            raise HFCheckpointError(f"mlp_only_layers={hf['mlp_only_layers']} is not supported: moekit places dense "
                                    "layers by decoder_sparse_step only")
        moe_every = int(_get(hf, arch, "decoder_sparse_step"))
        d_ff = int(_require(hf, arch, "intermediate_size"))
    renorm = arch.renormalize if isinstance(arch.renormalize, bool) else bool(_get(hf, arch, arch.renormalize))
    shared = {}
    if arch.shared_expert:
        width = int(_get(hf, arch, "shared_expert_intermediate_size") or 0)
        if width:
            shared = dict(shared_experts=1, shared_d_ff=width, shared_expert_gate=True)
    clip = _get(hf, arch, "clip_qkv") if arch.clip_qkv else None
    return LMConfig(
        vocab_size=int(_require(hf, arch, "vocab_size")), d_model=d_model,
        n_layers=int(_require(hf, arch, "num_hidden_layers")), n_heads=n_heads,
        max_seq_len=int(_get(hf, arch, "max_position_embeddings")), ffn="moe", moe_every=moe_every, d_ff=d_ff,
        num_experts=int(num_experts), top_k=int(_get(hf, arch, "num_experts_per_tok")), d_ff_expert=d_ff_expert,
        router="softmax_topk", router_kwargs={"renormalize": renorm}, aux_loss="switch",
        aux_loss_coef=float(_get(hf, arch, "router_aux_loss_coef")), z_loss_coef=0.0,
        rope_theta=_rope(hf, arch), norm_eps=float(_get(hf, arch, "rms_norm_eps")),
        tie_embeddings=bool(_get(hf, arch, "tie_word_embeddings")), n_kv_heads=n_kv,
        head_dim_override=int(head_dim) if head_dim is not None and int(head_dim) * n_heads != d_model else None,
        qk_norm=arch.qk_norm, qkv_bias=bool(arch.qkv_bias and _get(hf, arch, arch.qkv_bias)),
        out_bias=bool(arch.out_bias and _get(hf, arch, arch.out_bias)),
        clip_qkv=float(clip) if clip is not None else None, **shared)


#: LMConfig fields that define the computation (the others are training options).
ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "ffn", "moe_every", "d_ff", "num_experts", "top_k",
               "d_ff_expert", "shared_experts", "router", "router_kwargs", "capacity_factor", "rope_theta",
               "norm_eps", "tie_embeddings", "n_kv_heads", "head_dim_override", "qk_norm", "qkv_bias", "out_bias",
               "clip_qkv", "shared_d_ff", "shared_expert_gate")


def architecture_fields(cfg: LMConfig) -> dict:
    """The fields of ``cfg`` that define what the model computes, normalised (defaults resolved)."""
    d = {f: getattr(cfg, f) for f in ARCH_FIELDS}
    d.update(n_kv_heads=cfg.kv_heads, head_dim_override=cfg.head_dim, shared_d_ff=cfg.shared_d_ff or cfg.d_ff_expert)
    if cfg.moe_every == 1 or cfg.ffn == "dense":
        d["d_ff"] = None  # unused
    return d


def why_not(cfg: LMConfig, arch: Arch) -> str | None:
    """Why ``cfg`` cannot be written as ``arch`` (None if it can)."""
    if cfg.ffn != "moe":
        return "it is a dense model (ffn='dense')"
    if cfg.router != "softmax_topk" or set(cfg.router_kwargs) - {"renormalize"}:
        return f"its router is {cfg.router} {cfg.router_kwargs} (transformers families route by softmax → top-k)"
    if cfg.capacity_factor is not None:
        return "it drops tokens by capacity (capacity_factor is set)"
    renorm = cfg.router_kwargs.get("renormalize", True)
    if arch.renormalize is True and not renorm:
        return "Mixtral always renormalises the top-k weights (router_kwargs renormalize=False)"
    if cfg.qk_norm != arch.qk_norm:
        return f"qk_norm={cfg.qk_norm!r} (the family has {arch.qk_norm!r})"
    if cfg.moe_every != 1 and not arch.sparse_step:
        return f"moe_every={cfg.moe_every} (every layer of this family is MoE)"
    if (cfg.shared_experts > 0) != arch.shared_expert or (cfg.shared_experts and (cfg.shared_experts != 1
                                                                                  or not cfg.shared_expert_gate)):
        return "its shared experts differ (Qwen2-MoE has exactly one, sigmoid-gated; the others have none)"
    if cfg.qkv_bias and not arch.qkv_bias:
        return "it has query/key/value biases"
    if cfg.out_bias != bool(arch.out_bias and cfg.qkv_bias):
        return "its attention output bias does not match the family's"
    if cfg.clip_qkv is not None and not arch.clip_qkv:
        return "it clips q/k/v (clip_qkv)"
    if arch.qk_norm == "full" and cfg.head_dim * cfg.n_heads != cfg.d_model:
        return "OLMoE needs head_dim * n_heads == d_model"
    return None


def hf_config_from_lm(cfg: LMConfig, arch: Arch, dtype: str = "float32") -> dict:
    """A transformers ``config.json`` dict of family ``arch`` for a native moekit model."""
    reason = why_not(cfg, arch)
    if reason:
        raise HFCheckpointError(f"this moekit model cannot be written as {arch.model_type}: {reason}")
    hf = {"architectures": [arch.hf_class], "model_type": arch.model_type, "dtype": dtype,
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "tie_word_embeddings": cfg.tie_embeddings, "num_experts_per_tok": cfg.top_k,
          "router_aux_loss_coef": cfg.aux_loss_coef, "bos_token_id": None, "eos_token_id": None,
          "pad_token_id": None}
    if cfg.head_dim * cfg.n_heads != cfg.d_model or arch.model_type in ("mixtral", "qwen3_moe"):
        hf["head_dim"] = cfg.head_dim
    hf[arch.expert_keys[0][0]] = cfg.d_ff_expert
    hf[arch.expert_keys[1][0]] = cfg.num_experts
    if arch.renormalize == "norm_topk_prob":
        hf["norm_topk_prob"] = bool(cfg.router_kwargs.get("renormalize", True))
    if arch.sparse_step:
        hf.update(decoder_sparse_step=cfg.moe_every, mlp_only_layers=[], intermediate_size=cfg.d_ff,
                  use_sliding_window=False)
    if arch.shared_expert:
        hf["shared_expert_intermediate_size"] = cfg.shared_d_ff or cfg.d_ff_expert
    if arch.qkv_bias:
        hf[arch.qkv_bias] = cfg.qkv_bias
    if arch.clip_qkv:
        hf["clip_qkv"] = cfg.clip_qkv
    if arch.model_type == "mixtral":
        hf["sliding_window"] = None
    return hf
