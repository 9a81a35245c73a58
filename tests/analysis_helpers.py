"""A tiny trained MoE LM and its routing report, built once per test session and shared by the analysis tests."""

from __future__ import annotations

from pathlib import Path

from moekit.models import LMConfig
from moekit.train.data import _is_val, prepare_corpus
from moekit.train.trainer import Trainer, TrainConfig

MODEL = LMConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, num_experts=4, top_k=2, d_ff_expert=32, d_ff=64)
TRAIN = TrainConfig(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=4, eval_batches=1,
                    log_every=1, ckpt_every=0)
REPORT_TOKENS = 2048

NUMERIC = ("def scale(values, factor=2.5):\n    # multiply every value\n    total = 0\n"
           "    for i in range(len(values)):\n        values[i] = values[i] * factor + 1e-3\n"
           "        total += values[i] ** 2\n    return total / (len(values) or 1)\n\n")
STRINGS = ('def greet(name):\n    """Return a friendly greeting for name."""\n'
           "    message = f'Hello, {name}! Welcome to the \"moekit\" demo.'\n"
           "    return message.replace('demo', 'test')  # keep it short\n\n")
PROSE = "Mixture-of-Experts models route each token to a few experts; this note is plain text, not code.\n"


def _val_name(pattern: str) -> str:
    """The first name of the pattern that the corpus' hash puts in the validation split."""
    return next(pattern.format(i) for i in range(10_000) if _is_val(pattern.format(i)))


def write_data(root: Path) -> Path:
    """Two Python packages (numeric code, string-heavy code) and a folder of prose; one file of each held out."""
    for rel, text in (("alpha/a{}.py", NUMERIC * 12), ("beta/b{}.py", STRINGS * 10), ("notes/n{}.txt", PROSE * 25)):
        val = _val_name(rel)
        for i in range(3):
            name = rel.format(i)
            if name != val:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_text(text)
        (root / val).parent.mkdir(parents=True, exist_ok=True)
        (root / val).write_text(text)
    return root


_CACHE: dict = {}


def tiny_run(tmp_path_factory) -> dict:
    """``{"data", "corpus", "run", "report"}``: data folder, corpus, trained run folder and build_report result."""
    if not _CACHE:
        from moekit.analysis import build_report

        data = write_data(tmp_path_factory.mktemp("analysis_data"))
        corpus = prepare_corpus(data, tmp_path_factory.mktemp("analysis_cache"))
        run = tmp_path_factory.mktemp("analysis_run")
        Trainer(MODEL, TRAIN, corpus, run, quiet=True).run()
        report = build_report(run, corpus, run / "report" / "report.html", tokens=REPORT_TOKENS, sample_bytes=200)
        _CACHE.update(data=data, corpus=corpus, run=run, report=report)
    return _CACHE
