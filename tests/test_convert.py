"""moekit convert: Hugging Face MoE folders (saved locally with save_pretrained) ⇄ moekit's LM. Logits (fp32 max abs
err <= 1e-5) and greedy generation against transformers, bit-identical round trips, native moekit models exported,
the CLI, and every bad input as a clear error."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

pytest.importorskip("transformers")

from moekit.cli import app  # noqa: E402
from moekit.interop.convert import (ARCHITECTURES, from_hf_folder, lm_config_from_hf,  # noqa: E402
                                    to_hf_folder)
from moekit.interop.hf_files import HFCheckpointError, SafetensorsFolder  # noqa: E402
from moekit.models import LMConfig, TransformerLM  # noqa: E402
from moekit.train.checkpoint import save_checkpoint  # noqa: E402
from moekit.train.trainer import load_lm  # noqa: E402

from .hf_models import VOCAB, randomize, transformers  # noqa: E402

FAMILIES = sorted(ARCHITECTURES)
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=2, max_position_embeddings=64, eos_token_id=2, pad_token_id=0, bos_token_id=1,
             tie_word_embeddings=False)
EXTRA = {  # per family: its expert names and the options that exercise moekit's new attention features
    "mixtral": dict(num_local_experts=8, intermediate_size=24, rope_theta=1e6),
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      intermediate_size=48, decoder_sparse_step=2, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=24, intermediate_size=48, head_dim=16,
                      attention_bias=True, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, intermediate_size=24, clip_qkv=3.0, attention_bias=True),
}
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    """Write the measured numbers when MOEKIT_CONVERT_JSON is set (docs/huggingface.md quotes them)."""
    yield
    out = os.environ.get("MOEKIT_CONVERT_JSON")
    if out and RESULTS:
        Path(out).write_text(json.dumps(RESULTS, indent=1, sort_keys=True))


def make_hf(model_type: str, **overrides):
    cfg = transformers.AutoConfig.for_model(model_type, **{**SIZES, **EXTRA[model_type], **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize(model)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved folder per family (hub layout: per-expert tensors), and its HF model."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for mt in FAMILIES:
        model = make_hf(mt)
        model.save_pretrained(root / mt)
        out[mt] = (root / mt, model)
    return out


def ids(length: int = 12, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def check_against_hf(hf_model, ckpt: Path, tag: str) -> None:
    model, meta = load_lm(ckpt)
    x = ids(40)
    with torch.no_grad():
        want, got = hf_model(x).logits, model(x)[0]
    err = (want - got).abs().max().item()
    assert want.abs().max().item() > 0.5 and err <= 1e-5, err
    hf_model.generation_config.eos_token_id = None
    prompt = ids(5, batch=1, seed=4)
    want_ids = hf_model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    got_ids = model.generate(prompt, 24, greedy=True)
    assert torch.equal(want_ids, got_ids)
    RESULTS.setdefault(meta["hf"]["model_type"], {})[tag] = {"logits_max_abs_err": err, "greedy_identical": True}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_converted_model_matches_transformers(model_type, saved, tmp_path):
    folder, hf_model = saved[model_type]
    summary = from_hf_folder(folder, tmp_path / "mk")
    assert summary["layout"] == "per_expert" and summary["model_type"] == model_type
    assert (tmp_path / "mk" / "generation_config.json").is_file()  # side files come along
    check_against_hf(hf_model, tmp_path / "mk", "per_expert")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_round_trip_is_bit_identical_and_loads_in_transformers(model_type, saved, tmp_path):
    folder, hf_model = saved[model_type]
    from_hf_folder(folder, tmp_path / "mk")
    to_hf_folder(tmp_path / "mk", tmp_path / "back")
    src, back = SafetensorsFolder(folder), SafetensorsFolder(tmp_path / "back")
    assert sorted(src.names()) == sorted(back.names())
    for name in src.names():
        a, b = src.get(name), back.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((folder / "config.json")
                                                                                      .read_text())
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    assert all(torch.equal(a, b) for a, b in zip(hf_model.state_dict().values(), loaded.state_dict().values()))
    RESULTS.setdefault(model_type, {})["round_trip_bit_identical"] = len(src.names())


def test_fused_and_sharded_layouts(saved, tmp_path):
    """Read a v5 fused-layout folder and a sharded one; write both back; all load in transformers."""
    folder, hf_model = saved["qwen3_moe"]
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(folder / "config.json", fused / "config.json")
    save_file({n: t.contiguous() for n, t in hf_model.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})  # the module's own (fused 3D experts) names
    assert any(n.endswith("experts.gate_up_proj") for n in load_file(fused / "model.safetensors"))
    assert from_hf_folder(fused, tmp_path / "mk")["layout"] == "fused"
    check_against_hf(hf_model, tmp_path / "mk", "fused")
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3 and (sharded / "model.safetensors.index.json").is_file()
    from_hf_folder(sharded, tmp_path / "mk2")
    check_against_hf(hf_model, tmp_path / "mk2", "sharded")
    for layout in ("fused", "per_expert"):
        out = tmp_path / f"back_{layout}"
        summary = to_hf_folder(tmp_path / "mk", out, layout=layout, max_shard_bytes=30_000)
        assert len(summary["files"]) > 1
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        assert all(torch.equal(a, b) for a, b in zip(hf_model.state_dict().values(), loaded.state_dict().values()))


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    model = make_hf("mixtral").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    assert from_hf_folder(tmp_path / "hf", tmp_path / "mk")["dtypes"] == ["bfloat16"]
    to_hf_folder(tmp_path / "mk", tmp_path / "back")
    a, b = SafetensorsFolder(tmp_path / "hf"), SafetensorsFolder(tmp_path / "back")
    assert all(b.get(n).dtype == torch.bfloat16 and torch.equal(a.get(n), b.get(n)) for n in a.names())


NATIVE = {  # moekit configurations and the family each is written as
    "mixtral": dict(),
    "qwen3_moe": dict(qk_norm="head", n_kv_heads=2, moe_every=2, head_dim_override=16,
                      router_kwargs={"renormalize": False}, tie_embeddings=False),
    "olmoe": dict(qk_norm="full", qkv_bias=True, out_bias=True, clip_qkv=2.0),
    "qwen2_moe": dict(shared_experts=1, shared_expert_gate=True, shared_d_ff=40, qkv_bias=True),
}


@pytest.mark.parametrize("model_type", sorted(NATIVE))
def test_native_moekit_model_exports_to_transformers(model_type, tmp_path):
    cfg = LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, num_experts=4, top_k=2,
                   d_ff_expert=32, d_ff=48, **NATIVE[model_type])
    model = TransformerLM(cfg).eval()
    randomize(model)
    for layer in model.moe_layers():
        layer.router.expert_bias.zero_()  # transformers' families have no selection bias (see the test below)
    save_checkpoint(tmp_path / "ck", model, None, {"model_config": cfg.to_dict(), "step": 0})
    assert to_hf_folder(tmp_path / "ck", tmp_path / "hf")["model_type"] == model_type
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    x = ids(30)
    with torch.no_grad():
        err = (hf_model(x).logits - model(x)[0]).abs().max().item()
    assert err <= 1e-5, err
    # and back again: the config read from transformers is the same architecture
    back = lm_config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert (back.qk_norm, back.kv_heads, back.head_dim, back.shared_experts, back.moe_every, back.tie_embeddings) == \
        (cfg.qk_norm, cfg.kv_heads, cfg.head_dim, cfg.shared_experts, cfg.moe_every, cfg.tie_embeddings)


def test_native_model_that_fits_no_family_is_refused(tmp_path):
    cfg = LMConfig(d_model=32, n_layers=1, n_heads=4, num_experts=4, top_k=2, d_ff_expert=16, router="sigmoid_topk")
    save_checkpoint(tmp_path / "ck", TransformerLM(cfg), None, {"model_config": cfg.to_dict(), "step": 0})
    with pytest.raises(HFCheckpointError, match="matches no transformers family.*mixtral: its router is sigmoid"):
        to_hf_folder(tmp_path / "ck", tmp_path / "hf")
    cfg = LMConfig(d_model=32, n_layers=1, n_heads=4, num_experts=4, top_k=2, d_ff_expert=16)
    model = TransformerLM(cfg)
    model.blocks[0].ffn.router.expert_bias[1] = 0.5  # as auxiliary-loss-free balancing leaves it
    save_checkpoint(tmp_path / "ck2", model, None, {"model_config": cfg.to_dict(), "step": 0})
    with pytest.raises(HFCheckpointError, match="blocks.0.ffn.router.expert_bias is nonzero.*no selection bias"):
        to_hf_folder(tmp_path / "ck2", tmp_path / "hf")
    # one training step's load, whose bias step the model takes on its next forward: the bias is still zero
    cfg = LMConfig(d_model=32, n_layers=1, n_heads=4, num_experts=4, top_k=2, d_ff_expert=16, bias_update_rate=0.01)
    model = TransformerLM(cfg)
    model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert not model.blocks[0].ffn.router.expert_bias.any() and model.blocks[0].ffn.load_accum.any()
    save_checkpoint(tmp_path / "ck3", model, None, {"model_config": cfg.to_dict(), "step": 1})
    with pytest.raises(HFCheckpointError, match="blocks.0.ffn.load_accum holds load.*no selection bias"):
        to_hf_folder(tmp_path / "ck3", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_convert_both_ways_and_generate(saved, tmp_path):
    folder, hf_model = saved["mixtral"]
    runner = CliRunner()
    res = runner.invoke(app, ["convert", "--from-hf", str(folder), "--out", str(tmp_path / "mk")])
    assert res.exit_code == 0, res.output
    assert "per_expert" in res.output and "mixtral" in res.output
    res = runner.invoke(app, ["convert", "--to-hf", str(tmp_path / "mk"), "--out", str(tmp_path / "back"),
                              "--max-shard-size", "20KB"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    res = runner.invoke(app, ["convert", "--to-hf", str(tmp_path / "mk"), "--out", str(tmp_path / "back")])
    assert res.exit_code == 2 and "already exists" in res.output
    # greedy generation from the CLI, token ids in and out: the same tokens as transformers
    prompt = [5, 17, 33, 9]
    want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0]
    res = runner.invoke(app, ["generate", "--ckpt", str(tmp_path / "mk"), "--prompt-ids", "5,17,33,9",
                              "--max-new-tokens", "10", "--greedy"])
    assert res.exit_code == 0, res.output
    assert [int(t) for t in res.output.split()] == want.tolist()
    res = runner.invoke(app, ["generate", "--ckpt", str(tmp_path / "mk"), "--prompt", "hello"])
    assert res.exit_code == 2 and "--prompt-ids" in res.output


def word_tokenizer(folder: Path):
    """A word-level tokenizer over VOCAB words, built locally (nothing downloaded), saved next to the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def test_cli_generate_streams_text_with_the_models_tokenizer(saved, tmp_path):
    folder, hf_model = saved["olmoe"]
    shutil.copytree(folder, tmp_path / "hf")
    tok = word_tokenizer(tmp_path / "hf")
    from_hf_folder(tmp_path / "hf", tmp_path / "mk")
    prompt = "w5 w17 w40 w99"
    x = torch.tensor([tok(prompt)["input_ids"]])
    want = hf_model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=2)[0]
    res = CliRunner().invoke(app, ["generate", "--ckpt", str(tmp_path / "mk"), "--prompt", prompt,
                                   "--max-new-tokens", "12", "--greedy"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == tok.decode(want, skip_special_tokens=True)
    res = CliRunner().invoke(app, ["generate", "--ckpt", str(tmp_path / "mk"), "--prompt", prompt,
                                   "--max-new-tokens", "12", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"])
    assert res.exit_code == 0 and res.output.startswith(prompt) and len(res.output.split()) > 4


def test_generate_stops_at_the_stop_token():
    cfg = LMConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=64, num_experts=2, top_k=1,
                   d_ff_expert=8)
    model = TransformerLM(cfg).eval()
    free = model.generate(torch.tensor([[1, 2, 3], [3, 2, 1]]), 20, greedy=True)
    stop = int(free[0, 5])  # a token the first row produces at step 3
    out = model.generate(torch.tensor([[1, 2, 3], [3, 2, 1]]), 20, greedy=True, stop_ids=[stop])
    first = out[0, 3:].tolist()
    assert first.index(stop) <= 2 and all(t == stop for t in first[first.index(stop):])
    assert out.shape[1] <= free.shape[1]


# --------------------------------------------------------------------------------------------------- bad input
def copy_of(saved, model_type: str, dst: Path) -> Path:
    shutil.copytree(saved[model_type][0], dst)
    return dst


def test_unsupported_architectures_list_the_supported_ones(saved, tmp_path):
    folder = copy_of(saved, "mixtral", tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
    with pytest.raises(HFCheckpointError, match="'deepseek_v3'.*latent attention.*Supported: mixtral.*olmoe.*"
                                                "patch_hf"):
        from_hf_folder(folder, tmp_path / "out")
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(HFCheckpointError, match="'llama' cannot be converted.*Supported: mixtral"):
        from_hf_folder(folder, tmp_path / "out")
    (folder / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    with pytest.raises(HFCheckpointError, match="sliding_window=16"):
        from_hf_folder(folder, tmp_path / "out")
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(HFCheckpointError, match="RoPE type 'yarn'"):
        from_hf_folder(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_shards(saved, tmp_path):
    folder, hf_model = saved["qwen2_moe"]
    hf_model.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    shards = sorted((tmp_path / "s").glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(HFCheckpointError, match=f"shard {shards[1].name} .*corrupt or truncated"):
        from_hf_folder(tmp_path / "s", tmp_path / "out")
    shards[1].unlink()
    with pytest.raises(HFCheckpointError, match=f"shard {shards[1].name} is missing.*e\\.g\\. model\\."):
        from_hf_folder(tmp_path / "s", tmp_path / "out")
    (tmp_path / "s" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(HFCheckpointError, match="not a valid safetensors index"):
        from_hf_folder(tmp_path / "s", tmp_path / "out")


def rewrite(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_wrong_dtype_shape_missing_and_extra_tensors_are_named(saved, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    cases = [
        (lambda t: t.update({name: t[name].to(torch.int32)}), f"tensor {name} has dtype I32"),
        (lambda t: t.update({name: t[name][:-1]}), f"tensor {name} has shape \\[15, 32\\].*implies \\[16, 32\\]"),
        (lambda t: t.pop(name), f"lacks 1 tensor.*{name}"),
        (lambda t: t.update({"model.layers.9.mlp.gate.weight": torch.zeros(8, 32)}),
         "does not use.*model.layers.9.mlp.gate.weight"),
    ]
    for i, (change, message) in enumerate(cases):
        folder = copy_of(saved, "mixtral", tmp_path / f"m{i}")
        rewrite(folder, change)
        with pytest.raises(HFCheckpointError, match=message):
            from_hf_folder(folder, tmp_path / "out")


def test_pickles_are_never_read(saved, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(saved["mixtral"][0] / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code if unpickled")

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(HFCheckpointError, match="only pickled weights \\(pytorch_model.bin\\).*safetensors only"):
        from_hf_folder(folder, tmp_path / "out")
    with pytest.raises(HFCheckpointError, match="no config.json"):
        from_hf_folder(tmp_path, tmp_path / "out")


def test_quantized_and_existing_output_are_refused(saved, tmp_path):
    folder = copy_of(saved, "olmoe", tmp_path / "o")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(HFCheckpointError, match="quantized"):
        from_hf_folder(folder, tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(HFCheckpointError, match="already exists and is not empty"):
        from_hf_folder(saved["olmoe"][0], tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
