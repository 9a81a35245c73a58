"""Trainer, checkpoints, resume, compare and the CLI on tiny models and a small local text."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import app
from moekit.models import LMConfig, TransformerLM
from moekit.train import checkpoint as ckpt_mod
from moekit.train.checkpoint import CheckpointError, load_checkpoint
from moekit.train.compare import steps_to_reach, summarise
from moekit.train.data import DataError, prepare_corpus
from moekit.train.trainer import Trainer, TrainConfig, load_lm, read_metrics

TEXT = ("def add(a, b):\n    return a + b\n\n"
        "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n") * 30

MODEL = LMConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, num_experts=4, top_k=2, d_ff_expert=32, d_ff=64)
TRAIN = TrainConfig(steps=20, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=5, eval_batches=2,
                    log_every=1, ckpt_every=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i in range(4):
        (root / f"part{i}.py").write_text(TEXT)
    return prepare_corpus(root, tmp_path_factory.mktemp("cache"))


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl")]


def test_training_lowers_loss_and_logs(corpus, tmp_path):
    summary = Trainer(MODEL, replace(TRAIN, steps=60), corpus, tmp_path, quiet=True).run()
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert len(metrics) == 60 and metrics[-1]["step"] == 60
    assert metrics[-1]["loss"] < 0.6 * metrics[0]["loss"]
    assert {"tokens_per_s", "balance", "aux_loss", "lr", "grad_norm"} <= metrics[-1].keys()
    assert sum("val_loss" in m for m in metrics) == 12
    assert summary["final_val_loss"] == metrics[-1]["val_loss"]
    # warm-up then cosine: lr rises for 2 steps, then falls
    lrs = [m["lr"] for m in metrics]
    assert lrs[0] < lrs[1] and lrs[5] > lrs[-1] >= TRAIN.lr * TRAIN.min_lr_ratio


def test_checkpoint_round_trip(corpus, tmp_path):
    trainer = Trainer(MODEL, replace(TRAIN, steps=5), corpus, tmp_path, quiet=True)
    trainer.run()
    model, meta = load_lm(tmp_path / "checkpoint")
    assert meta["step"] == 5 and LMConfig.from_dict(meta["model_config"]) == MODEL
    x = torch.randint(0, 256, (2, 16))
    trainer.model.eval()
    assert torch.equal(model(x)[0], trainer.model(x)[0])
    files = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "trainer.json"}


class Killed(Exception):
    pass


def test_resume_is_bit_identical(corpus, tmp_path):
    full = tmp_path / "full"
    Trainer(MODEL, TRAIN, corpus, full, quiet=True).run()

    part = tmp_path / "part"

    def kill_at_13(record):
        if record["step"] == 13:
            raise Killed

    with pytest.raises(Killed):
        Trainer(MODEL, TRAIN, corpus, part, quiet=True, on_log=kill_at_13).run()
    assert load_checkpoint(part / "checkpoint")[0]["step"] == 10
    Trainer(MODEL, TRAIN, corpus, part, resume=True, quiet=True).run()
    assert losses(part) == losses(full)  # exact equality, every step
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [m.get("val_loss") for m in a] == [m.get("val_loss") for m in b]
    ta, tb = load_checkpoint(full / "checkpoint")[1], load_checkpoint(part / "checkpoint")[1]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_killed_mid_save_leaves_previous_checkpoint(corpus, tmp_path, monkeypatch):
    trainer = Trainer(MODEL, TRAIN, corpus, tmp_path, quiet=True)
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def dying_save(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint (step 20): die after writing its model file
            raise Killed
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    with pytest.raises(Killed):
        trainer.run()
    meta, tensors, opt = load_checkpoint(tmp_path / "checkpoint")
    assert meta["step"] == 10 and opt is not None
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    Trainer(MODEL, TRAIN, corpus, tmp_path, resume=True, quiet=True).run()  # and it resumes from there
    assert load_checkpoint(tmp_path / "checkpoint")[0]["step"] == 20


def test_interrupted_rename_falls_back_to_old(corpus, tmp_path):
    Trainer(MODEL, replace(TRAIN, steps=3), corpus, tmp_path, quiet=True).run()
    ck = tmp_path / "checkpoint"
    ck.rename(tmp_path / "checkpoint.old")  # as if killed between the two renames
    assert load_checkpoint(ck)[0]["step"] == 3


def test_bad_checkpoints_and_no_overwrite(corpus, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "trainer.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a moekit checkpoint"):
        load_checkpoint(foreign)
    run = tmp_path / "run"
    Trainer(MODEL, replace(TRAIN, steps=2), corpus, run, quiet=True).run()
    model_file = run / "checkpoint" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(run / "checkpoint")
    (run / "checkpoint" / "trainer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(run / "checkpoint")
    before = sorted((p.name, p.stat().st_size) for p in (run / "checkpoint").iterdir())
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        Trainer(MODEL, TRAIN, corpus, run, quiet=True)
    assert sorted((p.name, p.stat().st_size) for p in (run / "checkpoint").iterdir()) == before


def test_resume_refuses_other_config(corpus, tmp_path):
    Trainer(MODEL, replace(TRAIN, steps=2), corpus, tmp_path, quiet=True).run()
    with pytest.raises(ValueError, match="different model config"):
        Trainer(replace(MODEL, top_k=1), TRAIN, corpus, tmp_path, resume=True, quiet=True)
    with pytest.raises(ValueError, match="different training options"):
        Trainer(MODEL, replace(TRAIN, lr=1.0), corpus, tmp_path, resume=True, quiet=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(MODEL, TRAIN, corpus, tmp_path / "empty", resume=True, quiet=True)


def test_compare_summary_and_steps_to_reach():
    assert steps_to_reach([(10, 3.0), (20, 2.0), (30, 1.0)], 1.5) == 25.0
    assert steps_to_reach([(10, 3.0)], 1.0) is None
    moe = [{"step": s, "loss": 3 - s / 100, "val_loss": 3 - s / 50, "tokens_per_s": 100.0} for s in (50, 100)]
    dense = [{"step": s, "loss": 3 - s / 200, "val_loss": 3 - s / 100, "tokens_per_s": 120.0} for s in (50, 100)]
    p = {"total": 10, "active": 5, "embedding": 1}
    s = summarise(moe, dense, p, p, TRAIN)
    assert s["moe_steps_to_dense_final_loss"] == 50 and s["moe_steps_fraction"] == 0.5


def test_dense_baseline_and_config_errors():
    dense = TransformerLM(MODEL.dense_baseline())
    moe = TransformerLM(MODEL)
    assert moe.num_parameters()["active"] > dense.num_parameters()["active"] - 1  # equal up to the routers
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError):
        prepare_corpus(tmp_path / "missing.txt", tmp_path / "cache")


# -------------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_train_generate_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 4)
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    assert "final validation loss" in r.output and (out / "checkpoint" / "model.safetensors").exists()
    r = runner.invoke(app, ["generate", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "8",
                            "--greedy"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("def ")
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--steps", "3"])
    assert r.exit_code == 2 and "already holds a checkpoint" in r.output
    r = runner.invoke(app, ["train", "--preset", "tinny", "--data", str(data)])
    assert r.exit_code == 2 and "tiny" in r.output
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "nope.txt" in r.output
    r = runner.invoke(app, ["generate", "--ckpt", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no checkpoint" in r.output
    for cmd in ("train", "compare", "generate", "bench"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "--" in r.output


@pytest.mark.slow
def test_cli_compare_writes_results_and_guards_earlier_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 4)
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(data), "--out", str(out), "--steps", "4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "compare.json").read_text())
    assert summary["steps"] == 4 and summary["moe"]["total"] > summary["moe"]["active"]
    assert summary["moe"]["active"] - summary["dense"]["active"] < 0.02 * summary["dense"]["active"]  # routers only
    assert (out / "loss_curves.png").stat().st_size > 0 and "MoE vs dense" in r.output
    stamp = (out / "compare.json").stat().st_mtime_ns
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (out / "compare.json").stat().st_mtime_ns == stamp  # nothing was touched
    r = CliRunner().invoke(app, args + ["--overwrite", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "compare.json").read_text())["moe"]["final_val_loss"] != summary["moe"]["final_val_loss"]


def test_tiny_model_overfits_a_small_text(tmp_path):
    text = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
            "        self.x, self.y = x, y\n\n") * 12
    (tmp_path / "t.txt").write_text(text)
    corpus = prepare_corpus(tmp_path / "t.txt", tmp_path / "cache")
    cfg = TrainConfig(steps=150, batch_size=8, seq_len=48, lr=1e-2, warmup=10, eval_every=50, eval_batches=2,
                      log_every=1)
    trainer = Trainer(MODEL, cfg, corpus, tmp_path / "run", quiet=True)
    summary = trainer.run()
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["loss"]
    assert first > 4.0 and summary["final_val_loss"] < 0.2  # from ~ln(256) to memorised
    prompt = torch.tensor([list(b"class Point:\n")])
    out = trainer.model.generate(prompt, 24, greedy=True)
    assert bytes(out[0].tolist()) == b"class Point:\n    def __init__(self, x, y):"[:37]
