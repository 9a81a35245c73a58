"""Tiny whole transformers MoE models built locally (random weights, no downloads) for patch and convert tests."""

import importlib

import torch

from .hf_families import BLOCKS, COMMON, OVERRIDES

transformers = importlib.import_module("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 128

# Options every whole model needs on top of the block sizes of hf_families (vocabulary, MLA sizes, one dense layer
# first where the family has "first_k_dense_replace").
WHOLE = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64,
             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=16, qk_head_dim=8,
             first_k_dense_replace=1, tie_word_embeddings=False)
_MLA = dict(head_dim=4, num_key_value_heads=4)
WHOLE_OVERRIDES = {
    "beam": dict(mlp_layer_types=["dense", "sparse"]), "flint": dict(mlp_only_layers=[0]),
    "step3p5": dict(mlp_layer_types=["dense", "sparse"], sliding_window=16),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "glm4v_moe_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0],
                                            "partial_rotary_factor": 0.5}),
    **{name: _MLA for name in ("axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
                               "kimi_linear", "mistral4", "mistral_large4_text")},
}
# Families without a text-only CausalLM class: their decoder model is built instead.
MODEL_CLASSES = {"qwen3_omni_moe_text": "Qwen3OmniMoeThinkerTextModel", "deepseek_ocr2_text": "DeepseekOcr2TextModel",
                 "unlimited_ocr_text": "UnlimitedOcrTextModel", "step3p5": "Step3p7TextModel"}
# Families left out of whole-model tests (their blocks are covered by test_hf_parity), with the reason.
NOT_WHOLE = {
    "glm5_next_text": "its tiny config builds no MoE layer and the DSA attention needs a large config",
    "qwen3_omni_moe_talker_text": "the talker model takes codec embeddings, not token ids",
    "kimi_linear": "the torch fallback of its linear attention takes ~6 s per forward on this CPU",
    "qwen3_next": "the torch fallback of its gated DeltaNet takes ~4 s per forward on this CPU",
}
WHOLE_FAMILIES = sorted(set(BLOCKS) - set(NOT_WHOLE))


def build_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random model of a family (a CausalLM where transformers has one), in eval mode."""
    kwargs = {**COMMON, **OVERRIDES.get(model_type, {}), **WHOLE, **WHOLE_OVERRIDES.get(model_type, {}), **overrides}
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    if model_type in MODEL_CLASSES:
        module = importlib.import_module(type(cfg).__module__.replace(".configuration_", ".modeling_"))
        model = getattr(module, MODEL_CLASSES[model_type])(cfg)
    else:
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        except ValueError:
            model = transformers.AutoModel.from_config(cfg)
    randomize(model, seed)
    return model.eval()


def randomize(model, seed: int = 0) -> None:
    """Weights with unit-scale outputs (logits O(1), routing far from uniform), random biases, norm gains and
    selection biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            elif "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "norm" in name:  # gains near 1, but each distinct, so a misplaced one shows
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if b.is_floating_point() and "bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def output(out) -> torch.Tensor:
    """Logits of a CausalLM output, or the last hidden state of a base model."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state
