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

import torch

from ..models import LMConfig
from ..train.checkpoint import load_checkpoint, write_checkpoint
from .hf_arch import (ARCHITECTURES, NOT_CONVERTIBLE, Arch, architecture_fields, why_not, arch_for, hf_config_from_lm,
                      lm_config_from_hf)
from .hf_files import (FLOAT_DTYPES, SIDECARS, HFCheckpointError, SafetensorsFolder, check_out, new_folder,
                       read_config, write_folder)

#: Keys of old checkpoints that hold no weights (recomputed by every implementation); skipped when reading.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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
        if architecture_fields(lm_config_from_hf(hf)) != architecture_fields(cfg):
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
        if name.endswith("load_accum") and cfg.bias_update_rate > 0 and bool(t.any()):  # (a pending bias step)
            raise HFCheckpointError(f"{name} holds load for an auxiliary-loss-free bias step the model takes on its "
                                    f"next forward; {arch.model_type} has no selection bias, so the model would "
                                    "route differently in transformers")
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
        reasons[arch.model_type] = why_not(cfg, arch)
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
