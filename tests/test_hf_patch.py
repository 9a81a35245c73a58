"""moekit.patch_hf on whole transformers models: logits (fp32 max abs err <= 1e-5), greedy generation, gradients,
fine-tuning through shared weights, unpatch_hf, state dicts, router logits, and clear errors."""

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import moekit  # noqa: E402
from moekit.interop.patch import MoEBlockPatch  # noqa: E402

from .hf_models import VOCAB, WHOLE_FAMILIES, build_model, output, transformers  # noqa: E402

KEY_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    out = os.environ.get("MOEKIT_PATCH_JSON")
    if out and RESULTS:
        with open(out, "w") as f:
            json.dump(RESULTS, f, indent=1, sort_keys=True)


def patched_pair(model_type: str):
    ref = build_model(model_type)
    model = copy.deepcopy(ref)
    records = moekit.patch_hf(model)
    return ref, model, records


def ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", WHOLE_FAMILIES)
def test_whole_model_outputs_match(model_type):
    ref, model, records = patched_pair(model_type)
    assert records and all(isinstance(model.get_submodule(r.name), MoEBlockPatch) for r in records)
    x = ids()
    with torch.no_grad():
        want, got = output(ref(input_ids=x, use_cache=False)), output(model(input_ids=x, use_cache=False))
    err = (want - got).abs().max().item()
    assert want.abs().max().item() > 0.1  # a real signal, not a vanishing one
    assert err <= 1e-5, err
    RESULTS.setdefault(model_type, {}).update(blocks=len(records), logits_max_abs_err=err,
                                              shared=len(records[0].shared), copied=len(records[0].copied))


@pytest.mark.parametrize("model_type", KEY_FAMILIES)
def test_greedy_generation_is_identical(model_type):
    ref, model, _ = patched_pair(model_type)
    for m in (ref, model):
        m.generation_config.eos_token_id = None
    prompt = ids(2, 6, seed=2)
    want = ref.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert want.shape == (2, 18)
    assert torch.equal(want, got)
    RESULTS.setdefault(model_type, {})["greedy_identical"] = True


def hf_grads(model, records) -> dict[str, torch.Tensor]:
    """Gradients of a patched model under the unpatched model's parameter names."""
    out = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and ".moe." not in n}
    for r in records:
        out.update({f"{r.name}.{n}": g for n, g in r.hf_tensors(grad=True).items()})
    return out


def assert_gradients_match(ref, model, records, run=None) -> float:
    """Backward of the same probe through ``ref`` and ``run`` (the patched ``model``, or a compiled wrapper of it):
    every parameter's gradient within 1e-5 relative to its largest value. Returns the worst relative error."""
    x = ids()
    probe = torch.randn(2, 9, VOCAB, generator=torch.Generator().manual_seed(3))
    for m in (ref, model if run is None else run):
        (output(m(input_ids=x, use_cache=False)) * probe).sum().backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    got = hf_grads(model, records)
    assert set(want) == set(got)
    worst = 0.0
    for name, g in want.items():
        rel = (g - got[name]).abs().max().item() / max(1.0, g.abs().max().item())
        worst = max(worst, rel)
        assert rel <= 1e-5, (name, rel)
    return worst


@pytest.mark.parametrize("model_type", KEY_FAMILIES)
def test_gradients_match(model_type):
    ref, model, records = patched_pair(model_type)
    RESULTS.setdefault(model_type, {})["grad_max_rel_err"] = assert_gradients_match(ref, model, records)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mixtral"])
def test_compiled_patched_model_matches(model_type):
    """A patched model under torch.compile (its moekit layers run eagerly inside the compiled code): the unpatched
    model's logits in inference, and its gradients in training."""
    torch._dynamo.reset()
    ref, model, records = patched_pair(model_type)
    compiled = torch.compile(model)
    x = ids()
    with torch.no_grad():
        want, got = output(ref(input_ids=x, use_cache=False)), output(compiled(input_ids=x, use_cache=False))
    assert (want - got).abs().max().item() <= 1e-5
    assert_gradients_match(ref, model, records, compiled)


@pytest.mark.slow
def test_patched_model_compiles_whole():
    """A patched model compiled with fullgraph=True (as transformers' compiled generation does): the unpatched
    model's logits at one token and at several, its moekit layers traced with their experts in custom operators."""
    torch._dynamo.reset()
    ref, model, _ = patched_pair("mixtral")
    compiled = torch.compile(model, fullgraph=True)
    for length in (1, 9):
        x = ids(length=length)
        with torch.no_grad():
            want, got = output(ref(input_ids=x, use_cache=False)), output(compiled(input_ids=x, use_cache=False))
        assert (want - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "minimax_m3_vl_text"])
def test_fine_tuning_trains_the_model_weights_and_unpatch_keeps_them(model_type):
    """One SGD step through moekit equals one step through transformers; after unpatch_hf the original blocks are
    back with the trained weights (shared tensors trained in place, copied ones written back)."""
    ref, model, records = patched_pair(model_type)
    originals = {r.name: r.original for r in records}
    x = ids()
    for m in (ref, model):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m.train()
        output(m(input_ids=x, use_cache=False)).logsumexp(-1).mean().backward()
        opt.step()
    before = {n: t.clone() for n, t in build_model(model_type).state_dict().items()}
    restored = moekit.unpatch_hf(model)
    assert sorted(restored) == sorted(originals)
    assert all(model.get_submodule(n) is o for n, o in originals.items())
    assert not any(isinstance(m, MoEBlockPatch) for m in model.modules())
    moved = 0
    for name, want in ref.state_dict().items():
        got = model.state_dict()[name]
        assert (want - got).abs().max().item() <= 1e-5, name
        moved += not torch.equal(want, before[name])
    assert moved > 10  # the step changed the weights, experts included
    if model_type == "mixtral":
        assert records[0].copied == [] and "experts.gate_up_proj" in records[0].shared
    else:
        assert records[0].copied


@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen2_moe"])
def test_state_dict_keeps_transformers_names_and_save_pretrained_works(model_type, tmp_path):
    ref, model, _ = patched_pair(model_type)
    want, got = ref.state_dict(), model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp").moe.experts.down_proj.mul_(1.5)  # change a weight while patched
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, MoEBlockPatch) for m in loaded.modules())
    x = ids()
    with torch.no_grad():
        assert (output(loaded(input_ids=x)) - output(model(input_ids=x))).abs().max().item() <= 1e-5
        assert (output(loaded(input_ids=x)) - output(ref(input_ids=x))).abs().max().item() > 1e-3
    # load_state_dict with transformers names and layout, into the patched model
    other = build_model(model_type, seed=7)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert (output(other(input_ids=x)) - output(model(input_ids=x))).abs().max().item() <= 1e-5


def test_router_logits_and_aux_loss_are_collected():
    ref, model, records = patched_pair("mixtral")
    x = ids()
    want = ref(input_ids=x, labels=x, output_router_logits=True)
    got = model(input_ids=x, labels=x, output_router_logits=True)
    assert len(got.router_logits) == len(records) == 2
    for a, b in zip(want.router_logits, got.router_logits):
        assert (a - b).abs().max().item() <= 1e-5
    assert abs(want.aux_loss.item() - got.aux_loss.item()) <= 1e-6 and want.aux_loss.item() > 0
    moekit.unpatch_hf(model)  # the original routers record again
    again = model(input_ids=x, labels=x, output_router_logits=True)
    assert len(again.router_logits) == 2 and abs(again.aux_loss.item() - want.aux_loss.item()) <= 1e-6


def test_block_returns_what_the_original_returned():
    ref, model, _ = patched_pair("gpt_oss")
    h = torch.randn(1, 4, 32)
    want = ref.model.layers[0].mlp(h)
    got = model.model.layers[0].mlp(h)
    assert isinstance(want, tuple) and isinstance(got, tuple) and len(got) == len(want) == 2
    assert got[1].shape == want[1].shape == (4, 2)
    assert (want[0] - got[0]).abs().max().item() <= 1e-5 and (want[1] - got[1]).abs().max().item() <= 1e-5


def test_patched_layers_take_the_models_mode_and_decode_fused(monkeypatch):
    """A model patched in eval mode gets its MoE layers in eval mode (as its own .eval() would have set them), so
    greedy decoding runs the fused CPU decode; GPT-OSS's block still returns its router scores from it; a model
    patched in training mode gets training-mode layers, and .train() / .eval() afterwards reach them."""
    ref, model, records = patched_pair("gpt_oss")
    assert all(not r.layer.training and not model.get_submodule(r.name).training for r in records)
    calls = []
    real = moekit.kernels.cpu.RouteDecode.__call__
    monkeypatch.setattr(moekit.kernels.cpu.RouteDecode, "__call__", lambda *a: calls.append(1) or real(*a))
    h = torch.randn(1, 3, 32)
    with torch.no_grad():
        want, got = ref.model.layers[0].mlp(h), model.model.layers[0].mlp(h)
    assert (want[0] - got[0]).abs().max().item() <= 1e-5 and (want[1] - got[1]).abs().max().item() <= 1e-5
    assert len(calls) == int(moekit.kernels.cpu.library() is not None)
    model.train()
    assert all(r.layer.training for r in records)
    trained = build_model("mixtral").train()
    assert all(r.layer.training for r in moekit.patch_hf(trained))


def test_clear_errors():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="no sparse-MoE block.*'llama'.*supported families.*mixtral"):
        moekit.patch_hf(llama)
    with pytest.raises(ValueError, match="no moekit-patched blocks"):
        moekit.unpatch_hf(llama)
    _, model, _ = patched_pair("mixtral")
    with pytest.raises(ValueError, match="already patched"):
        moekit.patch_hf(model)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        moekit.patch_hf("mixtral")
    phimoe = build_model("phimoe", num_local_experts=8)  # a family whose routing moekit does not have
    with pytest.raises(ValueError, match="'phimoe'.*sparsemixer.*supported: .*mixtral"):
        moekit.patch_hf(phimoe)
    assert not any(isinstance(m, MoEBlockPatch) for m in phimoe.modules())  # nothing half-patched


@pytest.mark.parametrize("model_type", KEY_FAMILIES)
def test_flop_counter_and_fake_tensors_on_a_patched_model(model_type):
    """FlopCounterMode counts a patched model's FLOPs as it counts the unpatched model with transformers' eager
    experts (one product per expert hit; its grouped_mm experts count nothing there), and the patched model runs
    under fake tensors (its CPU kernels crashed the process on them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    ref, model, _ = patched_pair(model_type)
    ref.config._experts_implementation = "eager"
    counts = []
    for m in (ref, model):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(ids())
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] == counts[0]
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        logits = output(model(ids()))
        assert logits.shape == (2, 9, VOCAB)
