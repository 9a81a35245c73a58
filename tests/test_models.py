"""TransformerLM: causality, KV-cache decoding against full recomputation, sampling, parameter counts, configs."""

from dataclasses import replace

import pytest
import torch

from moekit.models import LMConfig, TransformerLM, get_preset, sample_next

CFG = LMConfig(d_model=32, n_layers=3, n_heads=4, max_seq_len=48, num_experts=4, top_k=2, d_ff_expert=16, d_ff=40,
               moe_every=2)


def test_layers_follow_moe_every_and_dense_baseline_keeps_active_width():
    model = TransformerLM(CFG)
    assert [b.is_moe for b in model.blocks] == [False, True, False]
    dense = TransformerLM(CFG.dense_baseline())
    assert not dense.moe_layers()
    assert dense.blocks[1].ffn.down.in_features == CFG.top_k * CFG.d_ff_expert  # active width at the MoE spot
    assert dense.blocks[0].ffn.down.in_features == CFG.d_ff
    moe_p, dense_p = model.num_parameters(), dense.num_parameters()
    router = CFG.num_experts * CFG.d_model
    assert moe_p["active"] == dense_p["active"] + router  # equal active compute, plus the router's gate
    expert = 3 * CFG.d_model * CFG.d_ff_expert  # gate, up and down of one SwiGLU expert
    assert moe_p["total"] - moe_p["active"] == (CFG.num_experts - CFG.top_k) * expert
    assert moe_p["embedding"] == CFG.vocab_size * CFG.d_model


def test_logits_are_causal():
    model = TransformerLM(CFG).eval()
    ids = torch.randint(0, 256, (2, 20))
    other = ids.clone()
    other[:, 12:] = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        a, b = model(ids)[0], model(other)[0]
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("chunks", [[7, 1, 1, 1], [3, 4, 3]])
def test_kv_cache_matches_full_recompute(chunks):
    from moekit.models.model import KVCache

    model = TransformerLM(CFG).eval()
    ids = torch.randint(0, 256, (2, sum(chunks)))
    with torch.no_grad():
        full = model(ids)[0]
        cache = KVCache(CFG, 2, sum(chunks), torch.float32, ids.device)
        parts, start = [], 0
        for n in chunks:
            parts.append(model(ids[:, start:start + n], cache=cache)[0])
            start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-5)
    assert cache.length == sum(chunks)


def test_greedy_generate_equals_stepwise_argmax_and_streams():
    model = TransformerLM(CFG).eval()
    prompt = torch.randint(0, 256, (1, 5))
    streamed = []
    out = model.generate(prompt, 6, greedy=True, stream=streamed.append)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    assert streamed == out[0, 5:].tolist()


def test_sampling_top_p_and_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, 1.0, 0.7, False, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; the third is never reached
    assert int(sample_next(logits, 1.0, None, True, None)) == 0
    model = TransformerLM(CFG).eval()
    prompt = torch.randint(0, 256, (1, 4))
    a = model.generate(prompt, 8, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 8, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bad_inputs_are_clear_errors():
    model = TransformerLM(CFG)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        model(torch.full((1, 4), 256))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 2, temperature=0.0)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        replace(CFG, n_heads=5)
    with pytest.raises(ValueError, match="odd"):
        LMConfig(d_model=36, n_heads=4)
    with pytest.raises(ValueError, match="not causal"):
        replace(CFG, router="expert_choice")
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        get_preset("tiyn")
    with pytest.raises(ValueError, match="unknown LMConfig fields"):
        LMConfig.from_dict({"d_modle": 3})
    assert LMConfig.from_dict(CFG.to_dict()) == CFG


def test_hash_router_gets_token_ids():
    cfg = replace(CFG, router="hash", router_kwargs={"vocab_size": 256}, top_k=1, moe_every=1)
    model = TransformerLM(cfg)
    ids = torch.randint(0, 256, (2, 10))
    _, loss = model(ids, ids)
    loss.backward()
    assert torch.isfinite(loss)
