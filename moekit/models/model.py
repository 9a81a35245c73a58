"""A decoder-only transformer language model whose feed-forward layers are moekit MoE layers (or dense FFNs).

    ids [B, L] ─► embed ─► n_layers × ( x + Attn(RMSNorm(x)),  x + FFN(RMSNorm(x)) ) ─► RMSNorm ─► head ─► logits

Attention is causal (grouped-query) attention with rotary positions through ``F.scaled_dot_product_attention``,
with the optional q/k norms and biases of Qwen and OLMoE; the FFN of layer ``i`` is an MoE layer where
``LMConfig.is_moe_layer(i)`` and a SwiGLU MLP elsewhere. Read top to bottom.

Notation: ``B`` batch, ``L`` sequence length, ``D`` model dim, ``H`` query heads, ``Hkv`` key/value heads, ``Hd`` head
dim, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoE
from ..routing.base import check_token_ids
from .config import LMConfig


# ------------------------------------------------------------------------------------------ rotary positions
def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [max_len, head_dim/2]`` of the rotary embedding (Su et al. 2021, eq. 34)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHLd: torch.Tensor, cos_Lh: torch.Tensor, sin_Lh: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs ``(x[..., :Hd/2], x[..., Hd/2:])`` by the position's angles (the "half" layout)."""
    x1, x2 = x_BHLd.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_Lh - x2 * sin_Lh, x2 * cos_Lh + x1 * sin_Lh), dim=-1)
    return out.to(x_BHLd.dtype)


# ------------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of the tokens seen so far, per layer, preallocated to ``max_len`` positions
    (``n_kv_heads`` heads each: grouped-query attention caches only the shared key/value heads)."""

    def __init__(self, config: LMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.length = 0  # positions filled (advanced by the model after all layers ran)
        self.max_len = max_len

    def update(self, layer: int, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k_BHLd.shape[2]
        self.k[layer][:, :, start:end] = k_BHLd
        self.v[layer][:, :, start:end] = v_BHLd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ------------------------------------------------------------------------------------------------- modules
class Attention(nn.Module):
    """Causal self-attention: ``H`` query heads, ``Hkv`` key/value heads (grouped-query when ``Hkv < H``), one fused
    ``qkv`` projection ``[q (H*Hd); k (Hkv*Hd); v (Hkv*Hd)]``, optional q/k RMSNorm, RoPE, SDPA."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.widths = (q_width, kv_width, kv_width)
        self.qkv = nn.Linear(config.d_model, q_width + 2 * kv_width, bias=config.qkv_bias)
        self.out = nn.Linear(q_width, config.d_model, bias=config.out_bias)
        self.qk_norm, self.clip_qkv = config.qk_norm, config.clip_qkv
        if config.qk_norm is not None:  # "head": per head (Qwen3); "full": across all heads at once (OLMoE)
            q_dim, k_dim = (self.head_dim, self.head_dim) if config.qk_norm == "head" else (q_width, kv_width)
            self.q_norm = nn.RMSNorm(q_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(k_dim, eps=config.norm_eps)

    def forward(self, x_BLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q, k, v = self.qkv(x_BLD).split(self.widths, dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        # q: [B, H, L, Hd]; k, v: [B, Hkv, L, Hd]
        q = q.view(B, L, self.n_heads, self.head_dim)
        k = k.view(B, L, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            past = cache.length
            k, v = cache.update(layer, k, v)
            if L == 1:  # one new token attends to everything cached
                o = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # a chunk: causal within the chunk, full over the past
                mask = torch.ones(L, past + L, dtype=torch.bool, device=x_BLD.device).tril(diagonal=past)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out(o.transpose(1, 2).reshape(B, L, -1))


class DenseFFN(nn.Module):
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))`` with the gate and up projections fused in one Linear."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LMConfig, i: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.is_moe = config.is_moe_layer(i)
        self.ffn = MoE(config=config.moe_config()) if self.is_moe else DenseFFN(config.d_model,
                                                                                config.dense_ffn_width(i))

    def forward(self, x: torch.Tensor, cos, sin, layer: int, cache: KVCache | None,
                ids: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, layer, cache)
        h = self.ffn_norm(x)
        if self.is_moe and self.ffn.router.needs_token_ids:
            return x + self.ffn(h, token_ids=ids)
        return x + self.ffn(h)


class TransformerLM(nn.Module):
    """Decoder-only LM built from an :class:`LMConfig`.

    ``model(ids)`` returns ``(logits [B, L, V], None)``; ``model(ids, targets)`` returns ``(logits, loss)`` with the
    mean cross-entropy (targets ``-1`` are ignored). The MoE layers' auxiliary losses reach the gradient through
    their outputs (see :class:`moekit.MoE`), so ``loss.backward()`` is all a training loop needs.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2-style init: N(0, init_std) everywhere, residual output projections scaled by 1/sqrt(2 n_layers).

        Dense FFNs and routed experts get the same init, so MoE and dense baselines start alike; routers keep theirs.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.out.weight, std=out_std)
            for bias in (block.attn.qkv.bias, block.attn.out.bias):
                if bias is not None:
                    nn.init.zeros_(bias)
            if block.is_moe:
                nn.init.normal_(block.ffn.experts.w_in, std=std)
                nn.init.normal_(block.ffn.experts.w_out, std=out_std)
                shared = block.ffn.shared_experts
                if shared is not None:
                    for lin in (shared.gate_proj, shared.up_proj):
                        if lin is not None:
                            nn.init.normal_(lin.weight, std=std)
                    nn.init.normal_(shared.down_proj.weight, std=out_std)
            else:
                nn.init.normal_(block.ffn.gate_up.weight, std=std)
                nn.init.normal_(block.ffn.down.weight, std=out_std)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, ids_BL: torch.Tensor, targets_BL: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``last_only``: compute the logits of the last position only (``[B, 1, V]``; generation needs no more)."""
        self._check_ids(ids_BL, cache)
        if last_only and targets_BL is not None:
            raise ValueError("last_only=True computes no loss; pass targets only without it")
        start = 0 if cache is None else cache.length
        L = ids_BL.shape[1]
        cos, sin = self.rope_cos[start:start + L], self.rope_sin[start:start + L]
        x = self.embed(ids_BL)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, i, cache, ids_BL)
        if cache is not None:
            cache.length += L
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x))
        loss = None
        if targets_BL is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BL.reshape(-1), ignore_index=-1)
        return logits, loss

    def _check_ids(self, ids: torch.Tensor, cache: KVCache | None) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"TransformerLM takes integer token ids shaped [batch, seq], got "
                             f"{getattr(ids, 'shape', type(ids).__name__)} {getattr(ids, 'dtype', '')}")
        end = ids.shape[1] + (0 if cache is None else cache.length)
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                             "shorten the input or build the model with a larger max_seq_len")
        check_token_ids(ids, self.config.vocab_size)

    # ---------------------------------------------------------------------------------------------- inspect
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def num_parameters(self) -> dict[str, int]:
        """``total`` parameters, ``active`` per token (routed experts count ``top_k / num_experts`` of theirs;
        tied weights once), and ``embedding`` (the token embedding)."""
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        inactive = 0
        for layer in self.moe_layers():
            c = layer.config
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            inactive += expert_params - expert_params * c.top_k // c.num_experts
        return {"total": total, "active": total - inactive, "embedding": self.embed.weight.numel()}

    # -------------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, ids_BL: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None,
                 stream: Callable[[int], None] | None = None, stop_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Continue ``ids_BL`` by ``max_new_tokens`` tokens with a KV cache; returns ``[B, L + new]``.

        ``greedy`` takes the argmax; otherwise samples from ``softmax(logits / temperature)``, restricted to the
        smallest set of tokens whose probability reaches ``top_p`` when given. ``stream(token)`` is called with each
        new token of the first sequence as it is produced. With ``stop_ids`` (e.g. end-of-sequence ids), a sequence
        that produced one is finished: it repeats that token while the others go on, and generation ends early once
        all are finished.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature} (or use greedy=True)")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        B, L = ids_BL.shape
        if L + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len="
                             f"{self.config.max_seq_len}; generate fewer tokens or shorten the prompt")
        was_training = self.training
        self.eval()
        cache = KVCache(self.config, B, L + max_new_tokens, self.embed.weight.dtype, ids_BL.device)
        out = [ids_BL]
        stop = torch.tensor(sorted(set(stop_ids)), device=ids_BL.device) if stop_ids else None
        finished_B1 = torch.zeros(B, 1, dtype=torch.bool, device=ids_BL.device)
        logits, _ = self(ids_BL, cache=cache, last_only=True)
        for _ in range(max_new_tokens):
            next_B1 = sample_next(logits[:, -1].float(), temperature, top_p, greedy, generator)
            if stop is not None:
                next_B1 = torch.where(finished_B1, out[-1][:, -1:], next_B1)  # finished rows repeat their stop token
            out.append(next_B1)
            if stream is not None and not finished_B1[0, 0]:
                stream(int(next_B1[0, 0]))
            if stop is not None:
                finished_B1 = finished_B1 | torch.isin(next_B1, stop)
                if bool(finished_B1.all()):
                    break
            if cache.length < cache.max_len:
                logits, _ = self(next_B1, cache=cache)
        self.train(was_training)
        return torch.cat(out, dim=1)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float | None, greedy: bool,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row ``[B, 1]``: argmax, or a sample from the temperature-scaled (nucleus-truncated) softmax."""
    if greedy:
        return logits_BV.argmax(-1, keepdim=True)
    probs = torch.softmax(logits_BV / temperature, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass before it is < top_p (the first token is always kept)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)
