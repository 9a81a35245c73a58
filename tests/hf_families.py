"""Tiny transformers MoE blocks built locally (random weights, no downloads) for parity tests."""

import importlib

import torch

transformers = importlib.import_module("transformers")

D, F, E = 32, 24, 8

# model_type -> block class name (in that model type's modeling module)
BLOCKS = {
    "mixtral": "MixtralSparseMoeBlock", "minimax": "MiniMaxSparseMoeBlock",
    "qwen3_vl_moe_text": "Qwen3VLMoeTextSparseMoeBlock", "qwen3_5_moe_text": "Qwen3_5MoeSparseMoeBlock",
    "hunyuan_v1_moe": "HunYuanMoEV1Moe", "qwen2_moe": "Qwen2MoeSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "qwen3_next": "Qwen3NextSparseMoeBlock", "qwen4_exp_text": "Qwen4ExpTextSparseMoeBlock",
    "qwen3_omni_moe_text": "Qwen3OmniMoeThinkerTextSparseMoeBlock",
    "qwen3_omni_moe_talker_text": "Qwen3OmniMoeTalkerTextSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock", "flex_olmo": "FlexOlmoSparseMoeBlock", "mellum": "MellumSparseMoeBlock",
    "jamba": "JambaSparseMoeBlock", "ernie4_5_moe": "Ernie4_5_MoeSparseMoeBlock",
    "granitemoe": "GraniteMoeMoE", "granitemoe_swa": "GraniteMoeSWAMoE", "granitemoeshared": "GraniteMoeSharedMoE",
    "granitemoehybrid": "GraniteMoeHybridMoE", "aria_text": "AriaTextMoELayer", "gpt_oss": "GptOssMLP",
    "cohere2_moe": "Cohere2MoeSparseMoeBlock", "kolibri1": "Kolibri1SparseMoeBlock",
    "deepseek_v3": "DeepseekV3MoE", "deepseek_v32": "DeepseekV32MoE", "glm4_moe": "Glm4MoeMoE",
    "glm4_moe_lite": "Glm4MoeLiteMoE", "glm4v_moe_text": "Glm4vMoeTextMoE", "glm_moe_dsa": "GlmMoeDsaMoE",
    "dots1": "Dots1MoE", "dots3_note_text": "Dots3NoteTextMoE", "exaone_moe": "ExaoneMoeSparseMoEBlock",
    "kimi_linear": "KimiLinearMoE", "bailing_hybrid": "BailingHybridMoE", "solar_open": "SolarOpenMoE",
    "mimo_v2_flash": "MiMoV2FlashMoE", "beam": "BeamMoE", "axk2": "AXK2MoE", "hy_v4": "HYV4MoE",
    "glm5_next_text": "Glm5NextTextMoE", "nemotron_h": "NemotronHMoE", "deepseek_v2": "DeepseekV2Moe",
    "deepseek_ocr2_text": "DeepseekOcr2TextMoe", "unlimited_ocr_text": "UnlimitedOcrTextMoe",
    "mistral4": "Mistral4MoE", "mistral_large4_text": "MistralLarge4TextMoE",
    "minimax_m2": "MiniMaxM2SparseMoeBlock", "minimax_m3_vl_text": "MiniMaxM3VLSparseMoeBlock", "hy_v3": "HYV3MoE",
    "laguna": "LagunaSparseMoeBlock", "lfm2_moe": "Lfm2MoeSparseMoeBlock", "afmoe": "AfmoeSparseMoeBlock",
    "flint": "FlintSparseMoeBlock", "step3p5": "Step3p7SparseMoeBlock",
}

# One superset of size options; every config picks the names it knows.
COMMON = dict(
    hidden_size=D, intermediate_size=F, moe_intermediate_size=F, shared_expert_intermediate_size=40,
    shared_intermediate_size=40, shared_experts_intermediate_size=20, moe_shared_expert_intermediate_size=40,
    num_experts=E, num_local_experts=E, n_routed_experts=E, moe_num_experts=E,
    num_experts_per_tok=2, moe_topk=2, moe_k=2, num_experts_per_token=2,
    n_group=4, topk_group=2, num_expert_group=4, n_shared_experts=2, num_shared_experts=2, moe_num_shared_experts=2,
    routed_scaling_factor=2.5, router_scaling_factor=2.5, route_scale=2.5, moe_routed_scaling_factor=2.5,
    norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)
# Per-family options that make the interesting paths run (and fix the few odd configs).
OVERRIDES = {
    "qwen2_moe": dict(norm_topk_prob=False),
    "olmoe": dict(norm_topk_prob=False),
    "deepseek_v2": dict(topk_method="group_limited_greedy"),
    "deepseek_v3": dict(norm_topk_prob=False),
    "kimi_linear": dict(moe_renormalize=False),
    "deepseek_ocr2_text": dict(topk_method="group_limited_greedy", mlp_layer_types=["sparse", "sparse"]),
    "lfm2_moe": dict(use_expert_bias=True, norm_topk_prob=True),
    "laguna": dict(moe_router_logit_softcapping=3.0),
    "cohere2_moe": dict(shared_expert_combination_strategy="average"),
    "kolibri1": dict(norm_topk_prob=True),
    "hy_v4": dict(swiglu_limit=0.5),
    "minimax_m3_vl_text": dict(swiglu_limit=0.5),
    "gpt_oss": dict(swiglu_limit=0.5),
    "nemotron_h": dict(moe_latent_size=None, layers_block_type=["moe", "moe"]),
    "granitemoehybrid": dict(mamba_n_heads=4),
    "dots3_note_text": dict(num_key_value_heads=4),
    "glm5_next_text": dict(swiglu_limit=0.5, num_key_value_heads=4),
    "bailing_hybrid": dict(swiglu_limits=[0.5, 0.5], swiglu_limits_shared=[0.5, 0.5]),
    "step3p5": dict(swiglu_limits=[0.5, 0.5], swiglu_limits_shared=[0.5, 0.5], moe_router_scaling_factor=2.5,
                    share_expert_dim=40),
}


def build_block(model_type: str, dtype=torch.float32, impl: str = "eager", **overrides):
    kwargs = {**COMMON, **OVERRIDES.get(model_type, {}), **overrides}
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    cfg._experts_implementation = impl
    module = importlib.import_module(type(cfg).__module__.replace(".configuration_", ".modeling_"))
    cls = getattr(module, BLOCKS[model_type])
    try:
        block = cls(cfg)
    except TypeError:
        block = cls(cfg, 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
        for name, b in block.named_buffers():
            if b.is_floating_point():  # selection biases: make them matter
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block.to(dtype)


def hf_forward(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out
