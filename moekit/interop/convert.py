"""Hugging Face MoE checkpoints ⇄ moekit's own language model (:class:`moekit.models.TransformerLM`).

    HF folder (config.json + safetensors) ──from_hf_folder──► moekit checkpoint (model.safetensors + trainer.json)
    moekit checkpoint ──────────────────────to_hf_folder────► HF folder that ``from_pretrained`` loads

Supported architectures (:data:`ARCHITECTURES`): Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE, the decoder-only MoE
models whose attention moekit's LM reproduces exactly (RMSNorm, "half" RoPE, grouped-query SDPA, optional q/k norm
and biases). Others are listed in :data:`NOT_CONVERTIBLE` with the reason; their MoE blocks still run on moekit
through :func:`moekit.patch_hf`.

Expert weights are read in either layout: the fused 3D tensors of transformers v5 (``experts.gate_up_proj
[E, 2F, D]``, ``experts.down_proj [E, D, F]``) or the per-expert matrices of hub checkpoints (``experts.{e}.w1/w3/w2``
for Mixtral, ``experts.{e}.gate_proj/up_proj/down_proj`` for Qwen and OLMoE). Conversion only concatenates, stacks
and splits, so the round trip HF → moekit → HF gives back every tensor bit for bit, in the layout it came in.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models import LMConfig
from ..train.checkpoint import load_checkpoint, write_checkpoint
from .hf_files import (FLOAT_DTYPES, SIDECARS, HFCheckpointError, SafetensorsFolder, check_out, new_folder,
                       read_config, write_folder)

#: Keys of old checkpoints that hold no weights (recomputed by every implementation); skipped when reading.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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


def _arch_view(cfg: LMConfig) -> dict:
    d = {f: getattr(cfg, f) for f in ARCH_FIELDS}
    d.update(n_kv_heads=cfg.kv_heads, head_dim_override=cfg.head_dim, shared_d_ff=cfg.shared_d_ff or cfg.d_ff_expert)
    if cfg.moe_every == 1 or cfg.ffn == "dense":
        d["d_ff"] = None  # unused
    return d


def _fit(cfg: LMConfig, arch: Arch) -> str | None:
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
    reason = _fit(cfg, arch)
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


# ------------------------------------------------------------------------------------------- tensor mapping
@dataclass
class Rule:
    """One moekit tensor made of Hugging Face tensors: the ``parts`` are concatenated along ``dim``. With ``stack``,
    each part is a tuple of per-expert matrices stacked on a new dim 0 first (``dim`` counts that new dim)."""

    target: str
    parts: list[tuple[str, ...]]
    dim: int = 0
    stack: bool = False


@dataclass
class Layout:
    """How the MoE blocks are stored: ``experts`` is ``"fused"`` (v5 3D tensors) or ``"per_expert"`` (hub), under
    module name ``prefix`` (``mlp``, or ``block_sparse_moe`` in original Mixtral checkpoints)."""

    experts: str = "per_expert"
    prefix: str = "mlp"


def tensor_rules(cfg: LMConfig, arch: Arch, layout: Layout) -> tuple[list[Rule], dict[str, tuple[int, ...]]]:
    """The rules that build every moekit tensor, and the expected shape of every Hugging Face tensor."""
    D, H, Hkv, Hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    E, Fe = cfg.num_experts, cfg.d_ff_expert
    rules: list[Rule] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def add(target: str, parts: list[tuple[str, ...]], part_shapes: list[tuple[int, ...]], dim: int = 0,
            stack: bool = False) -> None:
        rules.append(Rule(target, parts, dim, stack))
        for names, shape in zip(parts, part_shapes):
            shapes.update({n: shape for n in names})

    add("embed.weight", [("model.embed_tokens.weight",)], [(cfg.vocab_size, D)])
    add("norm.weight", [("model.norm.weight",)], [(D,)])
    if not cfg.tie_embeddings:
        add("head.weight", [("lm_head.weight",)], [(cfg.vocab_size, D)])
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        add(b + "attn_norm.weight", [(p + "input_layernorm.weight",)], [(D,)])
        add(b + "ffn_norm.weight", [(p + "post_attention_layernorm.weight",)], [(D,)])
        a = p + "self_attn."
        qkv_shapes = [(H * Hd, D), (Hkv * Hd, D), (Hkv * Hd, D)]
        add(b + "attn.qkv.weight", [(a + f"{n}_proj.weight",) for n in "qkv"], qkv_shapes)
        if cfg.qkv_bias:
            add(b + "attn.qkv.bias", [(a + f"{n}_proj.bias",) for n in "qkv"], [s[:1] for s in qkv_shapes])
        add(b + "attn.out.weight", [(a + "o_proj.weight",)], [(D, H * Hd)])
        if cfg.out_bias:
            add(b + "attn.out.bias", [(a + "o_proj.bias",)], [(D,)])
        if cfg.qk_norm is not None:
            q_dim, k_dim = (Hd, Hd) if cfg.qk_norm == "head" else (H * Hd, Hkv * Hd)
            add(b + "attn.q_norm.weight", [(a + "q_norm.weight",)], [(q_dim,)])
            add(b + "attn.k_norm.weight", [(a + "k_norm.weight",)], [(k_dim,)])
        if not cfg.is_moe_layer(i):
            m = p + "mlp."
            add(b + "ffn.gate_up.weight", [(m + "gate_proj.weight",), (m + "up_proj.weight",)],
                [(cfg.d_ff, D), (cfg.d_ff, D)])
            add(b + "ffn.down.weight", [(m + "down_proj.weight",)], [(D, cfg.d_ff)])
            continue
        m = p + layout.prefix + "."
        add(b + "ffn.router.weight", [(m + "gate.weight",)], [(E, D)])
        if layout.experts == "fused":
            add(b + "ffn.experts.gate_up_proj", [(m + "experts.gate_up_proj",)], [(E, 2 * Fe, D)])
            add(b + "ffn.experts.down_proj", [(m + "experts.down_proj",)], [(E, D, Fe)])
        else:
            g, u, d = arch.expert_names
            add(b + "ffn.experts.gate_up_proj", [tuple(f"{m}experts.{e}.{n}.weight" for e in range(E)) for n in (g, u)],
                [(Fe, D), (Fe, D)], dim=1, stack=True)
            add(b + "ffn.experts.down_proj", [tuple(f"{m}experts.{e}.{d}.weight" for e in range(E))], [(D, Fe)],
                stack=True)
        if cfg.shared_experts:
            s, Fs = m + "shared_expert.", cfg.shared_d_ff or Fe
            for name, shape in (("gate_proj", (Fs, D)), ("up_proj", (Fs, D)), ("down_proj", (D, Fs))):
                add(f"{b}ffn.shared_experts.{name}.weight", [(s + f"{name}.weight",)], [shape])
            if cfg.shared_expert_gate:
                add(b + "ffn.shared_experts.gate.weight", [(m + "shared_expert_gate.weight",)], [(1, D)])
    return rules, shapes


def moekit_buffers(cfg: LMConfig) -> dict[str, torch.Tensor]:
    """The persistent buffers of a fresh model's MoE layers (load counters and selection biases, all zero)."""
    out = {}
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            out[f"blocks.{i}.ffn.load_accum"] = torch.zeros(cfg.num_experts)
            out[f"blocks.{i}.ffn.router.expert_bias"] = torch.zeros(cfg.num_experts)
    return out


def detect_layout(names: set[str], cfg: LMConfig, arch: Arch) -> Layout:
    """Which expert layout and MoE module name the checkpoint uses (judged on its first MoE layer)."""
    first = next(i for i in range(cfg.n_layers) if cfg.is_moe_layer(i))
    for prefix in arch.moe_prefixes:
        m = f"model.layers.{first}.{prefix}."
        if m + "experts.gate_up_proj" in names:
            return Layout("fused", prefix)
        if f"{m}experts.0.{arch.expert_names[0]}.weight" in names:
            return Layout("per_expert", prefix)
    want = f"model.layers.{first}.{arch.moe_prefixes[0]}."
    raise HFCheckpointError(f"no expert weights found for layer {first}: expected {want}experts.gate_up_proj (fused) "
                            f"or {want}experts.0.{arch.expert_names[0]}.weight (per expert); is this really a "
                            f"{arch.model_type} checkpoint?")


# ------------------------------------------------------------------------------------------------- HF → moekit
def read_hf_folder(folder: str | Path) -> tuple[dict, LMConfig, Layout, dict[str, torch.Tensor]]:
    """Read a Hugging Face checkpoint folder into ``(hf config, LMConfig, layout, moekit tensors)``.

    Every tensor is checked against the shape the config implies and must be floating point; missing and unexpected
    tensors are errors naming them. Dtypes are kept as stored."""
    hf = read_config(folder)
    cfg = lm_config_from_hf(hf)
    arch = ARCHITECTURES[hf["model_type"]]
    src = SafetensorsFolder(folder)
    names = {n for n in src.names() if not n.endswith(IGNORED_SUFFIXES)}
    layout = detect_layout(names, cfg, arch)
    rules, shapes = tensor_rules(cfg, arch, layout)
    extra = names - set(shapes)
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        extra.discard("lm_head.weight")  # a tied copy some exporters write; the embedding is used
    missing = sorted(set(shapes) - names)
    if missing:
        raise HFCheckpointError(f"the checkpoint lacks {len(missing)} tensor(s) a {arch.model_type} model with this "
                                f"config needs, e.g. {missing[:3]}; is a shard missing or the config wrong?")
    if extra:
        raise HFCheckpointError(f"the checkpoint has {len(extra)} tensor(s) that a {arch.model_type} model with this "
                                f"config does not use, e.g. {sorted(extra)[:3]}; config.json does not describe "
                                "these weights")
    for name, want in shapes.items():
        code = src.dtype_name(name)
        if code not in FLOAT_DTYPES:
            raise HFCheckpointError(f"tensor {name} has dtype {code}; moekit converts floating-point weights only "
                                    f"({', '.join(FLOAT_DTYPES)}); quantized checkpoints are not supported")
        if src.shape(name) != want:
            raise HFCheckpointError(f"tensor {name} has shape {list(src.shape(name))}, but config.json implies "
                                    f"{list(want)}; the weights and config.json do not belong together")
    tensors = {}
    for rule in rules:
        tensors[rule.target] = _join(rule, src)
    tensors.update(moekit_buffers(cfg))
    return hf, cfg, layout, tensors


def _join(rule: Rule, src: SafetensorsFolder) -> torch.Tensor:
    parts = [[src.get(n) for n in names] for names in rule.parts]
    dtypes = {t.dtype for ts in parts for t in ts}
    if len(dtypes) > 1:
        names = [n for ns in rule.parts for n in ns]
        raise HFCheckpointError(f"tensors {names[:4]} have different dtypes {sorted(map(str, dtypes))}; moekit "
                                f"fuses them into {rule.target} and needs one dtype")
    pieces = [torch.stack(ts) if rule.stack else ts[0] for ts in parts]
    return pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces, dim=rule.dim)


def from_hf_folder(folder: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Convert a Hugging Face checkpoint folder into a moekit checkpoint folder ``out`` (loadable with
    :func:`moekit.train.trainer.load_lm` and ``moekit generate --ckpt``); tokenizer files come along. Returns a
    summary."""
    folder, out = Path(folder), Path(out)
    check_out(out, overwrite)
    hf, cfg, layout, tensors = read_hf_folder(folder)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for n, t in tensors.items() if "load_accum" not in n
                     and "expert_bias" not in n})
    meta = {"model_config": cfg.to_dict(), "step": 0,
            "hf": {"model_type": hf["model_type"], "config": hf, "layout": {"experts": layout.experts,
                                                                              "prefix": layout.prefix},
                   "source": str(folder.resolve())}}
    write_checkpoint(out, {"model.safetensors": tensors}, meta)
    copied = _copy_sidecars(folder, out)
    return {"out": str(out), "model_type": hf["model_type"], "layout": layout.experts, "tensors": len(tensors),
            "dtypes": dtypes, "parameters": sum(t.numel() for t in tensors.values()), "copied": copied}


def _copy_sidecars(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDECARS:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


# ------------------------------------------------------------------------------------------------- moekit → HF
def to_hf_folder(ckpt: str | Path, out: str | Path, *, model_type: str | None = None, layout: str | None = None,
                 max_shard_bytes: int | None = None, overwrite: bool = False) -> dict:
    """Write a moekit checkpoint as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    A checkpoint converted from Hugging Face keeps its original ``config.json`` and expert layout (so the round trip
    is bit-identical); a native moekit model is written as the family ``model_type`` (default: the one its
    architecture matches). ``layout`` = ``"per_expert"`` (hub style) or ``"fused"`` overrides the expert layout."""
    ckpt, out = Path(ckpt), Path(out)
    check_out(out, overwrite)
    meta, tensors, _ = load_checkpoint(ckpt)
    try:
        cfg = LMConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise HFCheckpointError(f"{ckpt}: trainer.json has no valid model_config ({e})") from None
    origin = meta.get("hf")
    if origin:
        hf = copy.deepcopy(origin["config"])
        arch = arch_for(hf.get("model_type"))
        if model_type not in (None, arch.model_type):
            raise HFCheckpointError(f"{ckpt} was converted from {arch.model_type}; it cannot be written as "
                                    f"{model_type}")
        if _arch_view(lm_config_from_hf(hf)) != _arch_view(cfg):
            raise HFCheckpointError(f"{ckpt}: its model_config no longer matches the Hugging Face config it came "
                                    "from; convert it as a native model (remove the 'hf' entry of trainer.json)")
        lay = Layout(**origin.get("layout", {}))
    else:
        arch = _pick_arch(cfg) if model_type is None else arch_for(model_type)
        dtype = str(tensors["embed.weight"].dtype).removeprefix("torch.")
        hf = hf_config_from_lm(cfg, arch, dtype)
        lay = Layout("per_expert", arch.moe_prefixes[0])
    if layout is not None:
        if layout not in ("per_expert", "fused"):
            raise HFCheckpointError(f"layout must be 'per_expert' or 'fused', got {layout!r}")
        lay = Layout(layout, arch.moe_prefixes[0] if layout == "fused" else lay.prefix)
    for name, t in tensors.items():
        if name.endswith("router.expert_bias") and bool(t.any()):
            raise HFCheckpointError(f"{name} is nonzero (auxiliary-loss-free balancing sets it); {arch.model_type} "
                                    "has no selection bias, so the model would route differently in transformers")
    rules, shapes = tensor_rules(cfg, arch, lay)
    hf_tensors = {}
    for rule in rules:
        if rule.target not in tensors:
            raise HFCheckpointError(f"{ckpt} lacks tensor {rule.target}")
        hf_tensors.update(_split(rule, tensors[rule.target], shapes))
    with new_folder(out, overwrite) as tmp:
        files = write_folder(tmp, hf, hf_tensors, max_shard_bytes)
        copied = _copy_sidecars(ckpt, tmp)
    return {"out": str(out), "model_type": arch.model_type, "layout": lay.experts, "tensors": len(hf_tensors),
            "files": [f.name for f in files], "copied": copied}


def _pick_arch(cfg: LMConfig) -> Arch:
    reasons = {}
    for arch in ARCHITECTURES.values():
        reasons[arch.model_type] = _fit(cfg, arch)
        if reasons[arch.model_type] is None:
            return arch
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise HFCheckpointError(f"this moekit model matches no transformers family moekit can write ({detail})")


def _split(rule: Rule, t: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    pieces = (t,)
    if len(rule.parts) > 1:
        sizes = [shapes[names[0]][rule.dim - 1 if rule.stack else rule.dim] for names in rule.parts]
        if t.dim() <= rule.dim or sum(sizes) != t.shape[rule.dim]:
            raise HFCheckpointError(f"moekit tensor {rule.target} has shape {list(t.shape)}, which does not match "
                                    "its model_config; the checkpoint is inconsistent")
        pieces = t.split(sizes, dim=rule.dim)
    if rule.stack and t.shape[0] != len(rule.parts[0]):
        raise HFCheckpointError(f"moekit tensor {rule.target} has {t.shape[0]} experts, its model_config "
                                f"{len(rule.parts[0])}; the checkpoint is inconsistent")
    out = {}
    for names, piece in zip(rule.parts, pieces):
        if rule.stack:
            out.update({n: e.clone() for n, e in zip(names, piece.unbind(0))})
        else:
            out[names[0]] = piece.clone()
    for n, v in out.items():
        if tuple(v.shape) != shapes[n]:
            raise HFCheckpointError(f"moekit tensor {rule.target} has shape {list(t.shape)}; {n} would get "
                                    f"{list(v.shape)} instead of {list(shapes[n])}")
    return out


__all__ = ["ARCHITECTURES", "NOT_CONVERTIBLE", "Arch", "HFCheckpointError", "Layout", "from_hf_folder",
           "to_hf_folder", "read_hf_folder", "lm_config_from_hf", "hf_config_from_lm", "tensor_rules"]
