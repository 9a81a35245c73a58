"""moekit.from_hf against transformers blocks of every supported family: forward (fp32 max abs err <= 1e-5),
input gradients and weight gradients."""

import json
import os

import pytest
import torch

import moekit
from moekit.interop.hf import FAMILIES, UNSUPPORTED, find_parts, hf_in_weight, hf_out_weight

from .hf_families import BLOCKS, D, build_block, hf_forward

pytest.importorskip("transformers")


def shared_grads(shared: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of a transformers shared MLP under moekit's names (fused gate_up split in two)."""
    out = {}
    for name, p in shared.named_parameters():
        if name.startswith("gate_up_proj."):
            kind = name.split(".")[1]
            g, u = p.grad.chunk(2, dim=0)
            out[f"gate_proj.{kind}"], out[f"up_proj.{kind}"] = g, u
        else:
            out[name] = p.grad
    return out


def grad_pairs(block, layer):
    parts = find_parts(block)
    ex = parts.experts
    in_name = "gate_up_proj" if getattr(ex, "has_gate", True) else "up_proj"
    bias = getattr(ex, f"{in_name}_bias", None)
    g_in, gb_in = hf_in_weight(ex, getattr(ex, in_name).grad, None if bias is None else bias.grad)
    pairs = [("router", layer.router.weight.grad, parts.router_weight.grad),
             ("experts_in", layer.experts.w_in.grad, g_in),
             ("experts_out", layer.experts.w_out.grad, hf_out_weight(ex, ex.down_proj.grad))]
    if gb_in is not None:
        pairs += [("experts_in_bias", layer.experts.b_in.grad, gb_in),
                  ("experts_out_bias", layer.experts.b_out.grad, ex.down_proj_bias.grad)]
    if parts.router_bias is not None:
        pairs.append(("router_bias", layer.router.bias.grad, parts.router_bias.grad))
    if parts.shared is not None:
        own = dict(layer.shared_experts.named_parameters())
        pairs += [(f"shared.{n}", own[n].grad, g) for n, g in shared_grads(parts.shared).items()]
    if parts.shared_gate is not None:
        pairs.append(("shared_gate", layer.shared_experts.gate.weight.grad, parts.shared_gate.weight.grad))
    return pairs


RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    out = os.environ.get("MOEKIT_PARITY_JSON")
    if out and RESULTS:
        with open(out, "w") as f:
            json.dump(RESULTS, f, indent=1, sort_keys=True)


@pytest.mark.parametrize("model_type", sorted(BLOCKS))
def test_forward_and_gradients_match_transformers(model_type):
    block = build_block(model_type)
    layer = moekit.from_hf(block)
    x = torch.randn(2, 11, D)
    xh, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    yh, ym = hf_forward(block, xh), layer(xm)
    fwd = (yh - ym).abs().max().item()
    assert fwd <= 1e-5, fwd
    g = torch.randn_like(yh)
    yh.backward(g)
    ym.backward(g)
    dx = (xh.grad - xm.grad).abs().max().item()
    assert dx <= 1e-5, dx
    worst = 0.0
    for name, got, want in grad_pairs(block, layer):
        assert got is not None and want is not None, name
        rel = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
        worst = max(worst, rel)
        assert rel <= 1e-5, (name, rel)
    RESULTS[model_type] = {"forward_max_abs": fwd, "input_grad_max_abs": dx, "weight_grad_max_rel": worst}


@pytest.mark.parametrize("model_type", sorted(BLOCKS))
def test_decode_inference_matches_transformers(model_type, monkeypatch):
    """Inference on a few tokens (eval mode, no autograd): the path of a decode step, against the block. Every
    family with gated experts the decode kernel has (SwiGLU, GPT-OSS's, the clamped and clipped SwiGLUs) takes the
    fused CPU decode, routing included (its routers are softmax top-k, top-k softmax or group-limited
    sigmoid/softmax top-k, logits soft-capped or not), the others the regular path."""
    block = build_block(model_type).eval()
    layer = moekit.from_hf(block).eval()
    calls = []
    real = moekit.kernels.cpu.RouteDecode.__call__
    monkeypatch.setattr(moekit.kernels.cpu.RouteDecode, "__call__", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 3, D)
    with torch.no_grad():
        err = (hf_forward(block, x) - layer(x)).abs().max().item()
    assert err <= 1e-5, err
    fusable = layer.config.activation in moekit.kernels.cpu.DECODE_ACTIVATIONS
    assert len(calls) == int(fusable and moekit.kernels.cpu.library() is not None)


def test_every_family_in_the_table_is_tested():
    assert set(FAMILIES) == set(BLOCKS)
    assert not set(FAMILIES) & set(UNSUPPORTED)


@pytest.mark.parametrize("backend", ["loop", "segment", "grouped_mm"])
@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_every_moekit_backend(model_type, backend):
    block = build_block(model_type)
    layer = moekit.from_hf(block, backend=backend)
    x = torch.randn(3, 5, D)
    assert (hf_forward(block, x) - layer(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_matches_every_transformers_backend(impl):
    block = build_block("qwen3_moe", impl=impl)
    layer = moekit.from_hf(block)
    x = torch.randn(3, 5, D)
    assert (hf_forward(block, x) - layer(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type,overrides", [
    ("deepseek_v3", dict(norm_topk_prob=True)),
    ("deepseek_v2", dict(topk_method="greedy")),
    ("cohere2_moe", dict(shared_expert_combination_strategy="sum", expert_selection_fn="sigmoid")),
    ("lfm2_moe", dict(use_expert_bias=False, norm_topk_prob=False)),
    ("axk2", dict(n_group=None, topk_group=None)),
])
def test_config_variants(model_type, overrides):
    block = build_block(model_type, **overrides)
    layer = moekit.from_hf(block)
    x = torch.randn(2, 7, D)
    assert (hf_forward(block, x) - layer(x)).abs().max().item() <= 1e-5


def test_bf16_close():
    block = build_block("mixtral", torch.bfloat16)
    layer = moekit.from_hf(block)
    assert layer.experts.w_in.dtype == torch.bfloat16
    x = torch.randn(2, 7, D).bfloat16()
    yh, ym = hf_forward(block, x), layer(x)
    assert ym.dtype == torch.bfloat16
    assert (yh.float() - ym.float()).abs().max().item() <= 0.02 * yh.float().abs().max().item()


def test_unsupported_blocks_are_clear_errors():
    with pytest.raises(ValueError, match="not a router \\+ fused-experts MoE block"):
        moekit.from_hf(torch.nn.Linear(4, 4))
    block = build_block("mixtral")
    block.experts.config.model_type = "made_up"
    with pytest.raises(ValueError, match="family 'made_up'.*not supported.*supported: "):
        moekit.from_hf(block)
    block.experts.config.model_type = "axk1"
    with pytest.raises(ValueError, match="'axk1'.*RMSNorm"):
        moekit.from_hf(block)
    nem = build_block("nemotron_h", moe_latent_size=16)
    with pytest.raises(ValueError, match="moe_latent_size"):
        moekit.from_hf(nem)
