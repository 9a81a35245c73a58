"""MoE vs dense evidence: run `moekit compare` at a preset and record the result for the README.

    python benchmarks/compare.py [--preset tiny] [--seeds 0 1 2]

For each seed, trains the preset's MoE model and its dense baseline (equal active parameters, same data, steps and
seed), then writes ``benchmarks/results/compare_<preset>.json`` (every run's summary), copies the first seed's loss
curves to ``docs/img/compare_<preset>.png`` and replaces the table between the COMPARE markers in README.md.
Run from the repository root on a quiet machine (tokens/s are measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from moekit.benchmark import write_readme_table
from moekit.cli import load_corpus
from moekit.models import get_preset
from moekit.train.compare import compare
from moekit.train.trainer import TRAIN_PRESETS

ROOT = Path.cwd()


def table(runs: list[dict], preset: str) -> str:
    first = runs[0]
    m, d = first["moe"], first["dense"]
    fr = [r["moe_steps_fraction"] for r in runs]
    fr_s = ", ".join("not reached" if f is None else f"{100 * f:.0f}%" for f in fr)
    gaps = [r["val_loss_gap"] for r in runs]
    lines = [
        f"Preset `{preset}`, {first['steps']} steps of {first['tokens_per_step']:,} byte tokens, seeds "
        f"{', '.join(str(r['seed']) for r in runs)}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. Produced by `python benchmarks/compare.py`.",
        "",
        "| | MoE | dense |",
        "|---|---:|---:|",
        f"| parameters (total / active per token) | {m['total'] / 1e6:.2f}M / {m['active'] / 1e6:.2f}M | "
        f"{d['total'] / 1e6:.2f}M / {d['active'] / 1e6:.2f}M |",
        "| final validation loss (nats per byte), per seed | "
        + ", ".join(f"{r['moe']['final_val_loss']:.4f}" for r in runs) + " | "
        + ", ".join(f"{r['dense']['final_val_loss']:.4f}" for r in runs) + " |",
        f"| training tokens / s (median, seed {runs[0]['seed']}) | {m['tokens_per_s']:,.0f} | "
        f"{d['tokens_per_s']:,.0f} |",
        f"| steps for MoE to reach dense's final validation loss | {fr_s} | 100% |",
        f"| dense minus MoE final validation loss (mean of seeds) | {statistics.mean(gaps):+.4f} | |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-compare"))
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    args = ap.parse_args(argv)
    corpus = load_corpus(None)
    runs = []
    for seed in args.seeds:
        out = args.out / f"{args.preset}-seed{seed}"
        summary = compare(get_preset(args.preset), replace(TRAIN_PRESETS[args.preset], seed=seed), corpus, out,
                          overwrite=True)
        summary["seed"] = seed
        runs.append(summary)
        print(f"seed {seed}: MoE {summary['moe']['final_val_loss']:.4f}, dense {summary['dense']['final_val_loss']:.4f}, "
              f"MoE reaches dense's final loss at {summary['moe_steps_fraction']}", file=sys.stderr)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"compare_{args.preset}.json").write_text(json.dumps(
        {"preset": args.preset, "machine": platform.processor() or platform.machine(),
         "threads": torch.get_num_threads(), "torch": torch.__version__, "runs": runs}, indent=1))
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    shutil.copy(runs[0]["plot"], img / f"compare_{args.preset}.png")
    text = table(runs, args.preset)
    print(text)
    if not args.no_readme:
        write_readme_table(text, marker="COMPARE")


if __name__ == "__main__":
    main()
