"""Run a whole transformers v5 model on moekit's MoE layers: :func:`patch_hf` swaps every sparse-MoE block for a
:class:`MoEBlockPatch` around :func:`moekit.from_hf`'s layer; :func:`unpatch_hf` puts the original blocks back.

Weights are *shared*, not copied, wherever the two layouts agree: the moekit layer holds the very ``nn.Parameter``
objects of the transformers block (router, fused experts, shared experts, their gate) and the selection-bias
buffer, so an optimizer built before or after patching trains the model's own weights, and ``unpatch_hf`` returns
blocks that already hold the trained values. Where the layouts differ (GPT-OSS's transposed, interleaved experts;
Aria's transposed experts; MiniMax-M3's fused shared ``gate_up`` Linear; ERNIE-4.5's ``[1, E]`` selection bias)
the layer owns a copy, which ``unpatch_hf`` writes back into the block. :attr:`PatchedBlock.shared` and
:attr:`PatchedBlock.copied` list which is which.

While patched, ``model.state_dict()`` still uses the transformers names and layout (so ``save_pretrained`` writes a
normal checkpoint), ``load_state_dict`` accepts them, and ``output_router_logits=True`` still collects each layer's
router logits (moekit's, which equal the block's).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..layer import MoE
from .hf import FAMILIES, UNSUPPORTED, find_parts, from_hf

#: Families whose block returns ``(hidden_states, router_scores)`` instead of a tensor.
RETURNS_ROUTER_SCORES = frozenset({"gpt_oss"})



@dataclass
class Link:
    """One tensor of the transformers block (``hf_name``) and the moekit tensor(s) made from it.

    ``to_moekit(hf) -> tuple`` and ``to_hf(*moekit) -> hf`` convert between the layouts; ``None`` means the same
    layout (then ``moekit_names`` has one name and the layer shares the block's tensor object)."""

    hf_name: str
    moekit_names: tuple[str, ...]
    to_moekit: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
    to_hf: Callable[..., torch.Tensor] | None = None

    @property
    def same_layout(self) -> bool:
        return self.to_moekit is None


@dataclass
class PatchedBlock:
    """What :func:`patch_hf` replaced: the module at ``name`` (its original is ``original``, now run by ``layer``).

    Attributes:
        shared: tensor names (in the block) the moekit layer shares with it: trained in place.
        copied: tensor names the layer holds in another layout: written back by :func:`unpatch_hf`.
    """

    name: str
    model_type: str
    original: nn.Module
    layer: MoE
    links: list[Link] = field(repr=False)
    shared: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)

    def hf_tensors(self, grad: bool = False) -> dict[str, torch.Tensor]:
        """The layer's current tensors (or their gradients) under the block's names, in the block's layout."""
        own = _tensors(self.layer)
        out = {}
        for link in self.links:
            values = [own[n].grad if grad else own[n].detach() for n in link.moekit_names]
            if any(v is None for v in values):
                continue
            out[link.hf_name] = values[0] if link.same_layout else link.to_hf(*values)
        return out


class MoEBlockPatch(nn.Module):
    """Stands in for a transformers sparse-MoE block: called like it, returns what it returns, computes with moekit.

    The original block is kept (not as a submodule) in :attr:`original`; the moekit layer is :attr:`moe`."""

    def __init__(self, record: PatchedBlock):
        super().__init__()
        self.moe = record.layer
        self.__dict__["record"] = record  # plain attribute: not a submodule, not in state_dict
        self.returns_scores = record.model_type in RETURNS_ROUTER_SCORES
        self._routed = None
        self.moe.router.register_forward_hook(self._keep_routing)
        self.register_state_dict_post_hook(_hf_state_dict)
        self.register_load_state_dict_pre_hook(_load_hf_state_dict)

    @property
    def original(self) -> nn.Module:
        return self.record.original

    def _keep_routing(self, router, args, routed) -> None:
        self._routed = routed

    def forward(self, hidden_states: torch.Tensor):
        y = self.moe(hidden_states)
        routed, self._routed = self._routed, None
        if routed is None and self.returns_scores:  # (the fused decode routed inside its kernel call: route again)
            routed = self.moe.router(hidden_states.reshape(-1, hidden_states.shape[-1]))
        collected = _active_collector()
        if collected is not None and "router_logits" in collected:
            # (the layer's fused few-token paths route inside one kernel call, without calling the router module:
            # its logits again then, differentiable as the router's own, for transformers' balancing loss)
            logits = routed.logits_TE if routed is not None else self.moe.router.logits(
                hidden_states.reshape(-1, hidden_states.shape[-1]))
            collected["router_logits"].append(logits.to(hidden_states.dtype))
        if self.returns_scores:
            return y, routed.topk_weights_TK.to(hidden_states.dtype)
        return y

    def extra_repr(self) -> str:
        return f"{self.record.model_type}: {type(self.original).__name__} on moekit"


# ------------------------------------------------------------------------------------------------ patch
def patch_hf(model: nn.Module, *, backend: str = "auto", **options) -> list[PatchedBlock]:
    """Replace every sparse-MoE block of a transformers model by moekit's layer, in place, with the same weights.

    ``model(...)``, ``model.generate(...)`` and training then run on moekit's dispatch; outputs match the unpatched
    model to float rounding. Returns one :class:`PatchedBlock` per replaced block. ``backend`` and ``**options``
    (e.g. ``aux_loss="switch"`` to add moekit's balancing loss when fine-tuning) go to :func:`moekit.from_hf`.

    Raises ``ValueError`` (naming the supported families) when the model has no block moekit can run, or when one
    of its blocks belongs to a family moekit does not support; nothing is changed then.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"patch_hf needs a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if any(isinstance(m, MoEBlockPatch) for m in model.modules()):
        raise ValueError("this model is already patched by moekit; call moekit.unpatch_hf(model) first")
    records = []
    for name, module in model.named_modules():
        if not _looks_like_moe_block(module):
            continue
        layer = from_hf(module, backend=backend, **options)  # refuses unsupported families with the list
        record = PatchedBlock(name, find_parts(module).model_type, module, layer, _links(module))
        records.append(record)
    if not records:
        model_type = _model_type(model)
        why = UNSUPPORTED.get(model_type)
        raise ValueError(f"no sparse-MoE block that moekit can run was found in {type(model).__name__} "
                         f"(model_type {model_type!r}" + (f": {why}" if why else "") + "); supported families "
                         f"(router + fused experts + optional shared experts): {', '.join(sorted(FAMILIES))}")
    jitter = getattr(getattr(model, "config", None), "router_jitter_noise", 0.0) or 0.0
    if jitter > 0:
        warnings.warn(f"router_jitter_noise={jitter}: transformers multiplies the whole block input by noise in "
                      "training; moekit's patched layers do not (evaluation is unaffected)", stacklevel=2)
    _install_output_capturing(model)
    for record in records:
        record.shared, record.copied = _share(record)
        _set_submodule(model, record.name, MoEBlockPatch(record).train(record.original.training))
    return records


def share_hf(block: nn.Module, *, backend: str = "auto", **options) -> MoE:
    """:func:`moekit.from_hf` for one block, but the layer uses the block's own tensor objects wherever the layout
    is the same (the Hugging Face v5 fused layout: all of them), so the two read one copy of the weights (the layer
    benchmark compares them this way, neither evicting the other's weights from the caches)."""
    layer = from_hf(block, backend=backend, **options)
    record = PatchedBlock("", find_parts(block).model_type, block, layer, _links(block))
    record.shared, record.copied = _share(record)
    return layer


def unpatch_hf(model: nn.Module) -> list[str]:
    """Put the original transformers blocks back (holding the current, possibly fine-tuned, weights); returns the
    names of the restored modules."""
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, MoEBlockPatch):
            _sync_to_original(module.record)
            _set_submodule(model, name, module.original)
            restored.append(name)
    if not restored:
        raise ValueError("this model has no moekit-patched blocks (patch_hf was not called, or unpatch_hf already "
                         "restored them)")
    return restored


# -------------------------------------------------------------------------------------------- weights
def _links(block: nn.Module) -> list[Link]:
    """Every tensor the layer takes from the block, with the layout transforms where they differ."""
    parts = find_parts(block)
    ex = parts.experts
    transposed = getattr(ex, "is_transposed", False)
    gated = getattr(ex, "has_gate", True)
    interleaved = gated and not getattr(ex, "is_concatenated", True)
    in_name = "gate_up_proj" if gated else "up_proj"
    links = [Link(parts.paths["router_weight"], ("router.weight",))]
    if parts.router_bias is not None:
        links.append(Link(parts.paths["router_bias"], ("router.bias",)))
    if parts.selection_bias is not None:
        shape = parts.selection_bias.shape
        if len(shape) == 1:
            links.append(Link(parts.paths["selection_bias"], ("router.expert_bias",)))
        else:  # ERNIE-4.5 keeps it as [1, E]
            links.append(Link(parts.paths["selection_bias"], ("router.expert_bias",), lambda t: (t.reshape(-1),),
                              lambda t: t.reshape(shape)))

    def deinterleave(w):  # [g0, u0, g1, u1, ...] on dim 1 -> [g; u]
        return torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)

    def interleave(w):
        return torch.stack(w.chunk(2, dim=1), dim=2).flatten(1, 2)

    def in_to_moekit(w):  # HF [E, 2F, D] or transposed [E, D, 2F], maybe interleaved -> moekit [E, 2F, D]
        w = w.transpose(1, 2) if transposed else w
        return (deinterleave(w) if interleaved else w,)

    def in_to_hf(w):
        w = interleave(w) if interleaved else w
        return w.transpose(1, 2) if transposed else w

    def swap(w):
        return w.transpose(1, 2)

    if transposed or interleaved:
        links.append(Link(f"experts.{in_name}", (f"experts.{in_name}",), in_to_moekit, in_to_hf))
    else:
        links.append(Link(f"experts.{in_name}", (f"experts.{in_name}",)))
    if transposed:
        links.append(Link("experts.down_proj", ("experts.down_proj",), lambda w: (swap(w),), swap))
    else:
        links.append(Link("experts.down_proj", ("experts.down_proj",)))
    if getattr(ex, f"{in_name}_bias", None) is not None:
        if interleaved:
            links.append(Link(f"experts.{in_name}_bias", (f"experts.{in_name}_bias",),
                              lambda b: (deinterleave(b),), interleave))
        else:
            links.append(Link(f"experts.{in_name}_bias", (f"experts.{in_name}_bias",)))
        links.append(Link("experts.down_proj_bias", ("experts.down_proj_bias",)))
    if parts.shared is not None:
        s = parts.paths["shared"]
        fused = getattr(parts.shared, "gate_up_proj", None)
        for kind in ("weight", "bias"):
            if isinstance(fused, nn.Linear) and getattr(fused, kind) is not None:  # one Linear -> gate_proj, up_proj
                links.append(Link(f"{s}.gate_up_proj.{kind}",
                                  (f"shared_experts.gate_proj.{kind}", f"shared_experts.up_proj.{kind}"),
                                  lambda t: t.chunk(2, dim=0), lambda g, u: torch.cat([g, u], dim=0)))
            for name in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(parts.shared, name, None)
                if isinstance(lin, nn.Linear) and getattr(lin, kind) is not None:
                    links.append(Link(f"{s}.{name}.{kind}", (f"shared_experts.{name}.{kind}",)))
        if parts.shared_gate is not None:
            links.append(Link("shared_expert_gate.weight", ("shared_experts.gate.weight",)))
    return links


def _share(record: PatchedBlock) -> tuple[list[str], list[str]]:
    """Make the layer use the block's own tensor objects wherever the layout is the same."""
    hf = _tensors(record.original)
    shared, copied = [], []
    for link in record.links:
        if not link.same_layout:
            copied.append(link.hf_name)
            continue
        owner, attr = _owner(record.layer, link.moekit_names[0])
        src = hf[link.hf_name]
        if attr in owner._parameters:
            if not isinstance(src, nn.Parameter):
                raise ValueError(f"{record.name}.{link.hf_name} is not an nn.Parameter; moekit cannot share it")
            owner._parameters[attr] = src
        else:
            owner._buffers[attr] = src
        shared.append(link.hf_name)
    return shared, copied


def _sync_to_original(record: PatchedBlock) -> None:
    """Write the layer's current values into the block's tensors it does not share (and into shared ones whose
    object was replaced, e.g. buffers moved by ``model.to(...)``)."""
    hf, own = _tensors(record.original), _tensors(record.layer)
    with torch.no_grad():
        for link in record.links:
            target = hf[link.hf_name]
            if link.same_layout and own[link.moekit_names[0]] is target:
                continue
            values = [own[n].detach() for n in link.moekit_names]
            target.data = (values[0] if link.same_layout else link.to_hf(*values)).clone()
    record.original.to(record.layer.router.weight.device)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    path, _, attr = dotted.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = _owner(root, name)
    setattr(parent, attr, module)  # ModuleList and ModuleDict accept string keys through setattr as well


def _looks_like_moe_block(module: nn.Module) -> bool:
    try:
        find_parts(module)
    except ValueError:
        return False
    return True


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", None) if cfg is not None else None
    return getattr(text, "model_type", None) or getattr(cfg, "model_type", None)


# ------------------------------------------------------------------------------------------- state dict
def _hf_state_dict(module: MoEBlockPatch, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict()`` of a patched block = the original block's, holding the layer's current values."""
    for key in [k for k in state_dict if k.startswith(prefix + "moe.")]:
        del state_dict[key]
    current = module.record.hf_tensors()
    for name, t in module.record.original.state_dict().items():
        state_dict[prefix + name] = current.get(name, t)


def _load_hf_state_dict(module: MoEBlockPatch, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` with the original block's names: turn them into the layer's names and layout."""
    record = module.record
    original = record.original.state_dict(keep_vars=True)
    if not any(prefix + n in state_dict for n in original):
        return  # moekit names (or nothing for this block): load as usual
    linked = {link.hf_name for link in record.links}
    for link in record.links:
        value = state_dict.get(prefix + link.hf_name)
        if value is not None:
            values = (value,) if link.same_layout else link.to_moekit(value)
            state_dict.update({prefix + "moe." + n: v for n, v in zip(link.moekit_names, values)})
    with torch.no_grad():
        for name, t in original.items():
            value = state_dict.pop(prefix + name, None)
            if value is not None and name not in linked:
                t.copy_(value)
    for name, t in record.layer.state_dict().items():  # moekit-only state (load counters) keeps its value
        state_dict.setdefault(prefix + "moe." + name, t)


# ---------------------------------------------------------------------------------- router logits capture
def _active_collector():
    """transformers' per-call output collector (dict of lists) when ``output_*`` capture is on, else None."""
    try:
        from transformers.utils.output_capturing import _active_collector as collector
    except ImportError:  # transformers without output capturing: nothing to record into
        return None
    return collector.get()


def _install_output_capturing(model: nn.Module) -> None:
    """Install transformers' output-capturing hooks now, while the original routers are in the model, so that they
    still record after :func:`unpatch_hf` (transformers installs them once, lazily, on first use)."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and getattr(module, "_can_record_outputs", None):
            maybe_install_capturing_hooks(module)
            break
