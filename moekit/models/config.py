"""Configuration of a decoder-only language model whose feed-forward layers are MoE (or dense) layers.

One dataclass, :class:`LMConfig`, validates itself on construction, round-trips through JSON (``to_dict`` /
``from_dict``), builds the :class:`moekit.MoEConfig` of its MoE layers, and derives its compute-matched dense
baseline. Named presets live in :data:`PRESETS`.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..config import MoEConfig
from ..routing import ROUTERS
from ..utils import dataclass_from_dict

FFN_KINDS = ("moe", "dense")
QK_NORMS = (None, "head", "full")


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _positive_number(name: str, v: Any) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise ValueError(f"{name} must be a number > 0, got {v!r}")


@dataclass
class LMConfig:
    """A decoder-only transformer LM: pre-norm blocks of RoPE attention and a SwiGLU FFN, MoE or dense.

    Attributes:
        vocab_size: number of token ids ``V`` (256: bytes).
        d_model: residual width ``D``.
        n_layers: transformer blocks.
        n_heads: attention heads ``H``; ``d_model / n_heads`` must be an even head dim (RoPE rotates pairs).
        max_seq_len: longest sequence (prompt plus generated tokens) the model accepts.
        ffn: ``"moe"`` (MoE FFNs where ``moe_every`` says) or ``"dense"`` (the compute-matched dense baseline).
        moe_every: 1 = every layer is MoE; ``N`` = layers ``i`` with ``(i + 1) % N == 0`` are MoE, the rest dense.
        d_ff: hidden width of the ordinary dense FFN layers (those that are not MoE positions).
        num_experts, top_k: routed experts per MoE layer and experts per token.
        d_ff_expert: hidden width of one routed (and one shared) expert.
        shared_experts: always-on shared experts per MoE layer (0 = none).
        router, router_kwargs: router name and options (see ``moekit.routing.ROUTERS``); must be causal.
        capacity_factor: ``None`` = dropless; else per-expert capacity (note: dropping by capacity makes a token's
            output depend on the other tokens of the batch, later ones included).
        aux_loss, aux_loss_coef, z_loss_coef, bias_update_rate: load balancing (see :class:`moekit.MoEConfig`).
        backend: experts backend of the MoE layers.
        rope_theta: base of the rotary position embedding frequencies.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: the output head shares the token embedding matrix.
        init_std: standard deviation of the normal init of Linear and Embedding weights (the MoE layers keep
            their own init).
        n_kv_heads: key/value heads of grouped-query attention (``None`` = ``n_heads``, plain multi-head); must
            divide ``n_heads``.
        head_dim_override: width of one attention head (``None`` = ``d_model / n_heads``); Qwen3-MoE uses wider
            heads than ``d_model / n_heads``.
        qk_norm: RMSNorm on queries and keys before RoPE: ``None``, ``"head"`` (over each head's dims, Qwen3) or
            ``"full"`` (over all heads' dims at once, OLMoE).
        qkv_bias, out_bias: biases on the query/key/value projection and on the attention output projection.
        clip_qkv: clamp queries, keys and values to ``[-clip_qkv, clip_qkv]`` (OLMoE option; ``None`` = off).
        shared_d_ff: hidden width of one shared expert (``None`` = ``d_ff_expert``).
        shared_expert_gate: scale the shared experts' output by ``sigmoid(x @ w)`` (Qwen2-MoE).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    ffn: str = "moe"
    moe_every: int = 1
    d_ff: int = 512
    num_experts: int = 8
    top_k: int = 2
    d_ff_expert: int = 256
    shared_experts: int = 0
    router: str = "softmax_topk"
    router_kwargs: dict = field(default_factory=dict)
    capacity_factor: float | None = None
    aux_loss: str | None = "switch"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    backend: str = "auto"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    n_kv_heads: int | None = None
    head_dim_override: int | None = None
    qk_norm: str | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    clip_qkv: float | None = None
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "moe_every", "d_ff",
                     "num_experts", "top_k", "d_ff_expert"):
            _positive_int(name, getattr(self, name))
        for name in ("n_kv_heads", "head_dim_override", "shared_d_ff"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.head_dim_override is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                             "choose n_heads that divides d_model (or set head_dim_override)")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} is odd, but rotary embeddings rotate pairs of dimensions; "
                             "choose d_model and n_heads with an even quotient (or an even head_dim_override)")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads} "
                             "(each key/value head serves n_heads / n_kv_heads query heads)")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        for name in ("qkv_bias", "out_bias", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.clip_qkv is not None:
            _positive_number("clip_qkv", self.clip_qkv)
        if self.shared_expert_gate and self.shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs shared_experts >= 1")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.moe_every > self.n_layers:
            raise ValueError(f"moe_every={self.moe_every} > n_layers={self.n_layers} leaves no MoE layer; "
                             f"choose moe_every <= n_layers")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}; "
                             "choose top_k <= num_experts")
        if not isinstance(self.shared_experts, int) or isinstance(self.shared_experts, bool) \
                or self.shared_experts < 0:
            raise ValueError(f"shared_experts must be an integer >= 0, got {self.shared_experts!r}")
        if not isinstance(self.router_kwargs, dict):
            raise ValueError(f"router_kwargs must be a dict, got {type(self.router_kwargs).__name__}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; known routers: {', '.join(sorted(ROUTERS))}")
        if getattr(ROUTERS[self.router], "non_causal", False):
            causal = sorted(n for n, r in ROUTERS.items() if not getattr(r, "non_causal", False))
            raise ValueError(f"router {self.router!r} is not causal (a token's routing depends on later tokens), "
                             f"so it cannot serve a causal language model; choose one of {', '.join(causal)}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            _positive_number(name, getattr(self, name))
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        # The remaining MoE fields (capacity_factor, aux_loss, coefficients, backend) are checked by MoEConfig,
        # whose field names are the same as ours.
        self.moe_config()

    # ----------------------------------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def active_d_ff(self) -> int:
        """Hidden width of a dense SwiGLU FFN with the active compute of one MoE FFN (routed + shared experts)."""
        return self.top_k * self.d_ff_expert + self.shared_experts * (self.shared_d_ff or self.d_ff_expert)

    def _check_layer(self, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < self.n_layers:
            raise ValueError(f"layer index must be in [0, {self.n_layers}), got {i!r}")

    def is_moe_position(self, i: int) -> bool:
        """Whether layer ``i`` is an MoE layer in the MoE model (by ``moe_every``), whatever ``ffn`` is."""
        self._check_layer(i)
        return (i + 1) % self.moe_every == 0

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` of this model has an MoE FFN (never when ``ffn == "dense"``)."""
        return self.ffn == "moe" and self.is_moe_position(i)

    def dense_ffn_width(self, i: int) -> int:
        """Hidden width of layer ``i``'s dense FFN: ``active_d_ff`` at MoE positions, ``d_ff`` elsewhere."""
        if self.is_moe_layer(i):
            raise ValueError(f"layer {i} is an MoE layer; it has no dense FFN width")
        return self.active_d_ff if self.is_moe_position(i) else self.d_ff

    def moe_config(self) -> MoEConfig:
        """The :class:`moekit.MoEConfig` of this model's MoE layers (``moekit.MoE(config=cfg.moe_config())``)."""
        return MoEConfig(
            d_model=self.d_model, d_ff=self.d_ff_expert, num_experts=self.num_experts, top_k=self.top_k,
            router=self.router, router_kwargs=copy.deepcopy(self.router_kwargs), shared_experts=self.shared_experts,
            shared_d_ff=self.shared_d_ff, shared_expert_gate=self.shared_expert_gate, capacity_factor=self.capacity_factor, backend=self.backend, aux_loss=self.aux_loss,
            aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef, bias_update_rate=self.bias_update_rate,
            causal=True)

    def dense_baseline(self) -> "LMConfig":
        """The same model with dense FFNs: MoE positions get width ``active_d_ff``, the others keep ``d_ff``.

        Its parameter count equals the MoE model's active parameters minus the routers' weights."""
        return replace(copy.deepcopy(self), ffn="dense")

    # ----------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """A JSON-able dict of every field (``from_dict`` inverts it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        """Build from a dict such as ``to_dict()`` wrote; missing keys take their defaults, unknown keys fail."""
        return dataclass_from_dict(cls, d)


PRESETS: dict[str, LMConfig] = {
    # A few CPU minutes (`make demo`). Chosen by a sweep on the default corpus (benchmarks/compare.py, README):
    # d_model 64 is small enough for the FFN capacity to matter within 1,200 steps; 16 fine-grained experts (top-2)
    # plus one shared expert beat 8 wide ones, top-1 and 32 experts; lr 6e-3 suits both MoE and dense.
    "tiny": LMConfig(d_model=64, n_layers=4, n_heads=4, max_seq_len=256, num_experts=16, top_k=2, d_ff_expert=128,
                     shared_experts=1, d_ff=384),
    # The same recipe, wider and longer (not swept: the sweep above ran at the tiny size only).
    "small": LMConfig(d_model=256, n_layers=6, n_heads=8, max_seq_len=256, num_experts=16, top_k=2,
                      d_ff_expert=256, shared_experts=1, d_ff=768),
}


def get_preset(name: str, **overrides) -> LMConfig:
    """A fresh copy of preset ``name``, with any field replaced by ``overrides`` (validated again)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
    known = {f.name for f in fields(LMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown LMConfig fields {unknown} in overrides; known fields: {sorted(known)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)
