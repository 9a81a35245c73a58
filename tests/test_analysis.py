"""Routing analytics: recorder and statistics on fixed routing (hand-computed), token classes, domain labels, the
report of a tiny trained model, and the ``moekit report`` command."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

import moekit
from moekit.analysis import (CLASS_NAMES, LabelError, RoutingRecorder, RoutingStats, byte_classes, label_bytes,
                             load_domain_labels, mutual_information, python_classes)
from moekit.analysis.labels import assign_domains
from moekit.analysis.stats import profile_similarity
from moekit.cli import app
from moekit.models import LMConfig, TransformerLM
from moekit.routing import Router, RouterOutput
from moekit.train.checkpoint import save_checkpoint

from .analysis_helpers import MODEL, REPORT_TOKENS, TRAIN, tiny_run

E, K, D = 4, 2, 8


class FixedRouter(Router):
    """Returns the same routing every call (for hand-computed statistics)."""

    def __init__(self, ids_TK, probs_TE):
        super().__init__(D, E, K, gate=False)
        self.ids_TK = torch.tensor(ids_TK)
        self.probs_TE = torch.tensor(probs_TE, dtype=torch.float32)

    def forward(self, x_TD, ctx=None):
        w_TK = torch.where(self.ids_TK >= 0, 0.5, 0.0)
        return RouterOutput(self.probs_TE.log(), self.probs_TE, self.ids_TK, w_TK, may_have_empty=True)


# 6 tokens; -1 = empty slot
IDS_A = [[0, 1], [0, 2], [1, 0], [3, -1], [0, 1], [-1, -1]]
PROBS_A = [[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0.25] * 4, [0, 0, 0, 1], [0.5, 0.5, 0, 0], [0.25] * 4]
IDS_B = [[1, 2], [1, -1], [3, 0], [3, 1], [2, 3], [0, 1]]


def fixed_layer(ids, probs=PROBS_A, **options):
    return moekit.MoE(D, 8, E, K, router=FixedRouter(ids, probs), **options)


def test_fixed_routing_statistics_match_hand_computation():
    layer = fixed_layer(IDS_A)
    rec = RoutingRecorder(layer, class_names=["a", "b"])
    with rec as stats:
        rec.set_labels(token_class=torch.tensor([0, 0, 1, 1, 0, 1]))
        layer(torch.randn(6, D))
    s = stats.layers[0]
    assert s.tokens == 6 and s.calls == 1 and s.slots == 9
    assert s.demand_E.tolist() == [4, 3, 1, 1] and s.kept_E.tolist() == [4, 3, 1, 1]
    assert s.imbalance == pytest.approx(4 / 2.25)                     # max / mean = 4 / (9/4)
    assert s.cv == pytest.approx(math.sqrt(6.75 / 4) / 2.25)          # population std of [4,3,1,1] / mean
    assert s.empty_slots == 3 and s.tokens_without_expert == 1
    assert s.tokens_dropped == 0 and s.drop_fraction == 0
    # entropies of the six rows: 1, 0, 2, 0, 1, 2 bits; top-1 probabilities .5, 1, .25, 1, .5, .25
    assert s.entropy_bits == pytest.approx(1.0) and s.entropy_norm == pytest.approx(0.5)
    assert s.top1_confidence == pytest.approx(3.5 / 6)
    coact = np.diag([4, 3, 1, 1])
    coact[0, 1] = coact[1, 0] = 3  # tokens 0, 2, 4
    coact[0, 2] = coact[2, 0] = 1  # token 1
    assert s.coact_EE.tolist() == coact.tolist()
    # random distinct pairs at rates r = (4, 3, 1, 1) / 6: r_0 r_1 (K-1) E / (K (E-1)) = (4/6)(3/6)(4/6)
    assert s.coact_expected_EE[0, 1] == pytest.approx(4 / 6 * 3 / 6 * 4 / 6)
    # class a = tokens 0, 1, 4; class b = tokens 2, 3, 5 (token 5 has no slot)
    assert s.class_CE.tolist() == [[3, 2, 1, 0], [1, 1, 0, 1]] and s.class_tokens_C.tolist() == [3, 3]
    assert s.class_share_CE[0].tolist() == pytest.approx([1, 2 / 3, 1 / 3, 0])
    # I = sum n/N log2(n N / (n_c n_e)) over the non-zero cells, N = 9, n_c = (6, 3), n_e = (4, 3, 1, 1)
    mi = (3 / 9 * math.log2(27 / 24) + 2 / 9 * math.log2(18 / 18) + 1 / 9 * math.log2(9 / 6)
          + 1 / 9 * math.log2(9 / 12) + 1 / 9 * math.log2(9 / 9) + 1 / 9 * math.log2(9 / 3))
    h_class = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert s.mi_class == pytest.approx((mi, mi / h_class))
    assert mi == pytest.approx(0.25163, abs=1e-5)


def test_capacity_drops_are_counted():
    # demand e0: t0 t1 t2 t3 t5, e1: t0 t2 t4 t5, e2: t1 t4, e3: t3; capacity ceil(1.0 * 6 * 2 / 4) = 3,
    # "position" keeps the earliest: e0 drops t3 and t5, e1 drops t5
    ids = [[0, 1], [0, 2], [0, 1], [0, 3], [1, 2], [0, 1]]
    layer = fixed_layer(ids, capacity_factor=1.0, drop_policy="position")
    with RoutingRecorder(layer) as stats:
        layer(torch.randn(6, D))
        layer(torch.randn(6, D))
    s = stats.layers[0]
    assert s.calls == 2 and s.tokens == 12
    assert s.demand_E.tolist() == [10, 8, 4, 2] and s.kept_E.tolist() == [6, 6, 4, 2]
    assert s.dropped_E.tolist() == [4, 2, 0, 0] and s.drop_fraction == pytest.approx(6 / 24)
    assert s.tokens_dropped == 2 and s.tokens_partly_dropped == 4  # per call: t5 lost both; t3 and t5 lost one
    assert s.overflow_calls_E.tolist() == [2, 2, 0, 0]
    assert any("25.0% of routed slots were dropped" in line for line in stats.summary())


def test_consecutive_layers_overlap_and_module_order():
    model = nn.Sequential(fixed_layer(IDS_A), nn.Identity(), fixed_layer(IDS_B, [[0.25] * 4] * 6))
    with RoutingRecorder(model) as stats:
        model(torch.randn(6, D))
    a, b = stats.layers
    assert (a.name, b.name, a.label, b.label) == ("0", "2", "layer 0", "layer 2")
    # tokens choosing i in A and j in B (A: {0,1} {0,2} {0,1} {3} {0,1} {}; B: {1,2} {1} {0,3} {1,3} {2,3} {0,1})
    expected = [[1, 2, 2, 2], [1, 1, 2, 2], [0, 1, 0, 0], [0, 1, 0, 1]]
    assert a.next_EE.tolist() == expected and a.next_tokens == 6
    assert a.next_from_E.tolist() == [4, 3, 1, 1] and a.next_to_E.tolist() == [2, 4, 2, 3]
    assert a.next_overlap_EE[0, 1] == pytest.approx(2 / math.sqrt(4 * 4))
    assert a.next_overlap_EE[3, 3] == pytest.approx(1 / math.sqrt(1 * 3))
    assert b.next_EE is None


def test_every_records_a_subset_and_hooks_exist_only_inside():
    layer = fixed_layer(IDS_A)
    x = torch.randn(6, D)
    before = layer(x)
    with RoutingRecorder(layer, every=2) as stats:
        assert len(layer._routing_hooks) == 1
        inside = layer(x)
        for _ in range(4):
            layer(x)
    assert len(layer._routing_hooks) == 0
    assert torch.equal(before, inside)  # recording does not change the output
    assert stats.layers[0].calls == 3 and stats.layers[0].demand_E.tolist() == [12, 9, 3, 3]


class CountSyncs(TorchDispatchMode):
    """Counts the ops that make a device wait for the host (reading a value, data-dependent shapes)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name in self.SYNCING
        return func(*args, **(kwargs or {}))


def test_recording_adds_no_host_sync():
    model = TransformerLM(LMConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=32, num_experts=4, top_k=2,
                                   d_ff_expert=16, d_ff=32, capacity_factor=1.0))
    ids = torch.randint(0, 256, (2, 16))
    with CountSyncs() as plain:
        model(ids)
    rec = RoutingRecorder(model, class_names=["a", "b"], domain_names=["x"])
    with rec:
        rec.set_labels(token_class=torch.randint(0, 2, (2, 16)), domain=torch.zeros(2, 16, dtype=torch.long))
        with CountSyncs() as recorded:
            model(ids)
    assert recorded.count == plain.count  # the hooks only queue device work; statistics are read once, at exit
    with CountSyncs() as control:  # the counter does see a host read
        torch.ones(3).sum().item()
    assert control.count == 1


def test_soft_moe_records_dominant_expert_not_load():
    layer = moekit.MoE(D, 8, E, 1, router="soft_moe")
    x = torch.randn(2, 5, D)
    with RoutingRecorder(layer) as stats:
        layer(x)
    s = stats.layers[0]
    probs = layer.router(x.reshape(-1, D), moekit.routing.RoutingContext(5)).probs_TE
    assert s.soft and math.isnan(s.imbalance) and math.isnan(s.cv)
    assert s.demand_E.tolist() == torch.bincount(probs.argmax(-1), minlength=E).tolist()
    assert s.top1_confidence == pytest.approx(probs.max(-1).values.mean().item(), rel=1e-5)
    assert any("Soft MoE" in line for line in stats.summary())


def test_token_id_routed_layer():
    layer = moekit.MoE(D, 8, E, 1, router="hash", router_kwargs={"vocab_size": 10})
    ids = torch.arange(10)
    with RoutingRecorder(layer) as stats:
        layer(torch.randn(10, D), token_ids=ids)
    s = stats.layers[0]  # round-robin table: id v -> expert v % 4
    assert s.demand_E.tolist() == [3, 3, 2, 2] and s.entropy_bits == 0 and s.top1_confidence == 1


def test_transformer_lm_with_labels_and_json():
    cfg = LMConfig(d_model=16, n_layers=3, n_heads=2, max_seq_len=16, num_experts=4, top_k=2, d_ff_expert=16,
                   d_ff=32, moe_every=1)
    model = TransformerLM(cfg)
    rec = RoutingRecorder(model, class_names=CLASS_NAMES, domain_names=["x", "y"])
    ids = torch.randint(0, 256, (2, 8))
    with rec as stats:
        rec.set_labels(token_class=torch.zeros(2, 8, dtype=torch.long), domain=torch.tensor([[0] * 8, [1] * 8]))
        model(ids)
    assert [s.label for s in stats.layers] == ["layer 0", "layer 1", "layer 2"]
    for s in stats.layers:
        assert s.tokens == 16 and s.slots == 32
        assert s.domain_tokens_G.tolist() == [8, 8] and s.domain_GE.sum() == 32
        assert s.mi_class[0] == 0 and math.isnan(s.mi_class[1])  # one class: nothing to explain
    d = json.loads(json.dumps(stats.to_dict()))  # strict JSON (no NaN)
    assert d["layers"][0]["demand_E"] == stats.layers[0].demand_E.tolist()
    assert len(d["class_profile_similarity"]) == 2


def test_information_helpers():
    assert mutual_information([[2, 0], [0, 2]]) == pytest.approx((1.0, 1.0))
    assert mutual_information([[1, 1], [1, 1]]) == (0.0, 0.0)
    # p = [[3, 1], [1, 3]] / 8, uniform marginals: 2 * 3/8 log2(3/2) + 2 * 1/8 log2(1/2)
    assert mutual_information([[3, 1], [1, 3]])[0] == pytest.approx(0.75 * math.log2(1.5) - 0.25)
    assert all(math.isnan(v) for v in mutual_information(np.zeros((2, 2))))
    # expert 0 prefers label 0, expert 1 label 1: profiles p(l|e) - p(l) = (+.25, -.25) and (-.25, +.25)
    sim = profile_similarity([[3, 1], [1, 3]], [[3, 1], [1, 3]])
    assert sim.ravel().tolist() == pytest.approx([1, -1, -1, 1])


# ------------------------------------------------------------------------------------------- token classes
def names(classes):
    return [CLASS_NAMES[c] for c in classes]


def test_python_token_classes_map_characters_to_bytes():
    src = 'café = 0x1F  # ü\nif x:\n    s = "é"\n'.encode()
    KW, ID, NUM, STR, COM, WS, OP = CLASS_NAMES[:7]
    expected = ([ID] * 5 + [WS, OP, WS] + [NUM] * 4 + [WS] * 2 + [COM] * 4 + [WS]  # café (5 bytes) ... # ü\n
                + [KW] * 2 + [WS, ID, OP, WS]                                       # if x:\n
                + [WS] * 4 + [ID, WS, OP, WS] + [STR] * 4 + [WS])                   # indent s = "é"\n
    got = names(python_classes(src))
    assert len(got) == len(src) == len(expected)
    assert got == expected


def test_byte_classes_and_fallbacks():
    assert names(byte_classes("Ab 9,é".encode())) == ["letter", "letter", "space", "digit", "punctuation",
                                                      "non-ASCII", "non-ASCII"]
    bad = b"def f(:\n    x = [1,\n"  # unclosed brackets: tokenize fails, byte classes instead
    assert python_classes(bad) is None
    classes, scheme = label_bytes(bad, "pkg/bad.py")
    assert scheme == "bytes" and names(classes)[:4] == ["letter"] * 3 + ["space"]
    assert label_bytes(b"x = 1\n", "notes.txt")[1] == "bytes" and label_bytes(b"x = 1\n", "m.py")[1] == "python"


def test_domain_labels(tmp_path):
    files = [{"path": "email/a.py", "domain": "email"}, {"path": "json/b.py", "domain": "json"},
             {"path": "os.py", "domain": "os"}]
    good = tmp_path / "labels.json"
    good.write_text(json.dumps({"email/*": "mail", "os.py": "system"}))
    assert assign_domains(files, load_domain_labels(good)) == ["mail", "json", "system"]
    with pytest.raises(LabelError, match="match no file"):
        assign_domains(files, {"emial/*": "mail"})
    with pytest.raises(LabelError, match="does not exist"):
        load_domain_labels(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LabelError, match="not valid JSON"):
        load_domain_labels(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(LabelError, match="JSON object"):
        load_domain_labels(tmp_path / "list.json")


def test_recorder_errors():
    with pytest.raises(ValueError, match="no moekit MoE layers found in Linear"):
        RoutingRecorder(nn.Linear(4, 4))
    layer = fixed_layer(IDS_A)
    with pytest.raises(ValueError, match="class_names"):
        RoutingRecorder(layer).set_labels(token_class=torch.zeros(6, dtype=torch.long))
    rec = RoutingRecorder(layer, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"must lie in \[-1, 2\)"):
        rec.set_labels(token_class=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="labels were set for 2 tokens but MoE layer"):
        with rec as stats:
            rec.set_labels(token_class=torch.tensor([0, 1]))
            layer(torch.randn(6, D))
    assert not layer._routing_hooks  # removed even after the error
    assert stats.layers[0].calls == 0  # and nothing half-counted


# ---------------------------------------------------------------------------------------------------- report
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def test_report_of_a_tiny_trained_model(tiny):
    result = tiny["report"]
    html_text = result["html"].read_text()
    doc = json.loads(result["json"].read_text())
    info = doc["report"]
    windows = REPORT_TOKENS // TRAIN.seq_len
    assert info["windows"] == windows and info["bytes_analysed"] == windows * TRAIN.seq_len
    assert info["files_labelled"] == {"python": 2, "bytes": 1} and info["same_data_as_training"]
    layers = doc["stats"]["layers"]
    assert [entry["label"] for entry in layers] == ["layer 0", "layer 1"]
    for entry in layers:
        assert entry["tokens"] == 2048 and sum(entry["demand_E"]) == 2048 * MODEL.top_k  # no empty slots
        assert sum(entry["token_class"]["tokens_C"]) == 2048 and sum(entry["domain"]["tokens_G"]) == 2048
    assert doc["stats"]["domain_names"] == ["alpha", "beta", "notes"]
    # the val split holds one 2,664-byte numeric .py file, one 1,870-byte string-heavy one and 2,400 bytes of prose
    dom_tokens = layers[0]["domain"]["tokens_G"]
    assert dom_tokens[2] > 0 and dom_tokens[0] > dom_tokens[1]
    assert "No tokens were dropped (dropless routing)." in doc["summary"]
    pngs = result["pngs"]
    assert {"load", "balance", "router", "classes", "domains", "coactivation", "paths"} <= set(pngs)
    for path in pngs.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html_text.count('src="data:image/png;base64,') == len(pngs)
    assert "http://" not in html_text and "https://" not in html_text and "<script" not in html_text
    for line in doc["summary"]:
        assert line.replace('"', "&quot;").replace("'", "&#x27;") in html_text
    sample = doc["sample"]
    assert len(sample["bytes"]) == 200 and all(0 <= e < 4 for e in sample["layers"][0]["expert"])


def test_cli_report_and_errors(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    out = tmp_path / "r" / "routing.html"
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"alpha/*": "code", "beta/*": "code"}))
    r = runner.invoke(app, ["report", "--ckpt", str(tiny["run"]), "--data", str(tiny["data"]), "--out", str(out),
                            "--tokens", "512", "--labels", str(labels)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and (tmp_path / "r" / "routing.json").is_file()
    assert (tmp_path / "r" / "routing-load.png").is_file() and "report:" in r.output
    assert json.loads((tmp_path / "r" / "routing.json").read_text())["stats"]["domain_names"] == ["code", "notes"]

    def fails(args, *needles):
        res = runner.invoke(app, ["report", *args])
        assert res.exit_code == 2, res.output
        for n in needles:
            assert n in " ".join(res.output.split()), res.output

    data = ["--data", str(tiny["data"])]
    fails(["--ckpt", str(tmp_path / "nothing"), *data], "no checkpoint at")
    fails(["--ckpt", str(tiny["run"]), *data, "--labels", str(tmp_path / "nope.json")], "nope.json", "does not exist")
    labels.write_text(json.dumps({"gamma/*": "x"}))
    fails(["--ckpt", str(tiny["run"]), *data, "--labels", str(labels)], "gamma/*", "match no file")
    fails(["--ckpt", str(tiny["run"]), *data, "--split", "test"], "--split must be")
    dense = tmp_path / "dense"
    save_checkpoint(dense, TransformerLM(MODEL.dense_baseline()), None, {"model_config": MODEL.dense_baseline()
                                                                         .to_dict(), "step": 0})
    fails(["--ckpt", str(dense), *data], "dense model", "no MoE layers")
    r = runner.invoke(app, ["report", "--help"])
    assert r.exit_code == 0 and "--labels" in r.output and "--split" in r.output


def test_summary_names_specialists():
    # 60 string-literal tokens go to experts 0 and 1, 20 comment tokens to experts 2 and 3
    layer = fixed_layer([[0, 1]] * 60 + [[2, 3]] * 20, [[0.25] * 4] * 80)
    rec = RoutingRecorder(layer, class_names=["string literal", "comment"])
    with rec as live:
        rec.set_labels(token_class=torch.tensor([0] * 60 + [1] * 20))
        layer(torch.randn(80, D))
    stats = RoutingStats(live.layers, class_names=["string literal", "comment"], unit="bytes")
    lines = stats.summary()
    # expert 2 takes all 20 comments but only 20 of the 80 bytes; experts 0/1 take 100% of strings but also 75% of
    # all bytes (below the 1.5x threshold), so they are not called specialists
    assert "MoE expert 2 takes 100% of comment bytes (but only 25% of all bytes)." in lines
    assert not any("of string literal bytes" in line for line in lines)
    # random pairs of distinct experts at rates 1/4 each: .25 * .25 * (1 * 4) / (2 * 3) = 1/24, and 25% / (1/24) = 6
    assert any("experts 2 and 3 are chosen together by 25% of bytes, 6.0x what random choices of 2" in line
               for line in lines)
