"""moekit.from_hf against transformers blocks: same forward (fp32 max abs err <= 1e-5) and the same gradients."""

import importlib

import pytest
import torch

import moekit
from moekit.interop.hf import find_parts, hf_in_weight, hf_out_weight

transformers = pytest.importorskip("transformers")

D, F, E = 32, 24, 8

# family -> (config class, modeling module, block class, config kwargs)
FAMILIES = {
    "mixtral": ("MixtralConfig", "mixtral", "MixtralSparseMoeBlock",
                dict(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "qwen2_moe", "Qwen2MoeSparseMoeBlock",
                  dict(hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=40, num_experts=E,
                       num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "qwen3_moe", "Qwen3MoeSparseMoeBlock",
                  dict(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=3,
                       norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "olmoe", "OlmoeSparseMoeBlock",
              dict(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "deepseek_v3", "DeepseekV3MoE",
                    dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=2,
                         n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5,
                         norm_topk_prob=True)),
    "gpt_oss": ("GptOssConfig", "gpt_oss", "GptOssMLP",
                dict(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2)),
}


def build_block(family, dtype=torch.float32, impl="eager"):
    cfg_name, mod, block_name, kwargs = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**kwargs)
    cfg._experts_implementation = impl
    block = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), block_name)(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
        for name, b in block.named_buffers():
            if "bias" in name:  # DeepSeek's score-correction bias: make it matter
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block.to(dtype)


def hf_forward(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def moekit_grads_as_hf(block, layer):
    """Map moekit gradients into the transformers parameter layout for comparison."""
    parts = find_parts(block)
    ex = parts.experts
    bias = getattr(ex, "gate_up_proj_bias", None)
    g_in, gb_in = hf_in_weight(ex, ex.gate_up_proj.grad, None if bias is None else bias.grad)
    pairs = [("router", layer.router.weight.grad, parts.router.weight.grad),
             ("gate_up", layer.experts.w_in.grad, g_in),
             ("down", layer.experts.w_out.grad, hf_out_weight(ex, ex.down_proj.grad))]
    if gb_in is not None:
        pairs += [("gate_up_bias", layer.experts.b_in.grad, gb_in),
                  ("down_bias", layer.experts.b_out.grad, ex.down_proj_bias.grad),
                  ("router_bias", layer.router.bias.grad, parts.router.bias.grad)]
    if parts.shared is not None:
        for n in ("gate_proj", "up_proj", "down_proj"):
            pairs.append((n, getattr(layer.shared_experts, n).weight.grad, getattr(parts.shared, n).weight.grad))
    if parts.shared_gate is not None:
        pairs.append(("shared_gate", layer.shared_experts.gate.weight.grad, parts.shared_gate.weight.grad))
    return pairs


PARITY: dict[str, float] = {}


@pytest.mark.parametrize("backend", ["loop", "auto"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_and_gradients_match_transformers(family, backend):
    block = build_block(family)
    layer = moekit.from_hf(block, backend=backend)
    x = torch.randn(2, 11, D)
    xh, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    yh, ym = hf_forward(block, xh), layer(xm)
    err = (yh - ym).abs().max().item()
    PARITY[f"{family}/{backend}"] = err
    assert err <= 1e-5, err
    g = torch.randn_like(yh)
    yh.backward(g)
    ym.backward(g)
    assert (xh.grad - xm.grad).abs().max().item() <= 1e-5
    for name, got, want in moekit_grads_as_hf(block, layer):
        assert got is not None and want is not None, name
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), name


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_matches_every_transformers_backend(impl):
    block = build_block("qwen3_moe", impl=impl)
    layer = moekit.from_hf(block)
    x = torch.randn(3, 5, D)
    assert (hf_forward(block, x) - layer(x)).abs().max().item() <= 1e-5


def test_bf16_close():
    block = build_block("mixtral", torch.bfloat16)
    layer = moekit.from_hf(block)
    assert layer.experts.w_in.dtype == torch.bfloat16
    x = torch.randn(2, 7, D).bfloat16()
    yh, ym = hf_forward(block, x), layer(x)
    assert ym.dtype == torch.bfloat16
    assert (yh.float() - ym.float()).abs().max().item() <= 0.02 * yh.float().abs().max().item()


def test_unsupported_block_is_a_clear_error():
    with pytest.raises(ValueError, match="not a router \\+ fused-experts MoE block"):
        moekit.from_hf(torch.nn.Linear(4, 4))
    block = build_block("mixtral")
    block.experts.config.model_type = "made_up"
    with pytest.raises(ValueError, match="family 'made_up'.*not supported.*supported: "):
        moekit.from_hf(block)
