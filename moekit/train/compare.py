"""MoE vs dense: train both at equal active parameters and steps, then plot and summarise.

The dense baseline is ``LMConfig.dense_baseline()``: every MoE FFN becomes a dense SwiGLU FFN as wide as the experts
a token activates, so both models spend the same compute per token (the MoE adds only its router).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from ..models import LMConfig
from .data import Corpus
from .trainer import Trainer, TrainConfig, read_metrics


def steps_to_reach(evals: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the validation loss reaches ``target`` (linear interpolation between evaluations)."""
    prev = None
    for step, loss in evals:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            (s0, l0) = prev
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        prev = (step, loss)
    return None


def _evals(metrics: list[dict]) -> list[tuple[int, float]]:
    return [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]


def _median_rate(metrics: list[dict]) -> float:
    rates = sorted(m["tokens_per_s"] for m in metrics if "tokens_per_s" in m)
    return rates[len(rates) // 2] if rates else float("nan")


def summarise(moe_metrics: list[dict], dense_metrics: list[dict], moe_params: dict, dense_params: dict,
              train_config: TrainConfig) -> dict[str, Any]:
    moe_evals, dense_evals = _evals(moe_metrics), _evals(dense_metrics)
    dense_final = dense_evals[-1][1]
    reach = steps_to_reach(moe_evals, dense_final)
    total = dense_evals[-1][0]
    return {
        "steps": total,
        "tokens_per_step": train_config.batch_size * train_config.seq_len * train_config.grad_accum,
        "moe": {"final_val_loss": moe_evals[-1][1], "tokens_per_s": _median_rate(moe_metrics), **moe_params},
        "dense": {"final_val_loss": dense_final, "tokens_per_s": _median_rate(dense_metrics), **dense_params},
        "moe_steps_to_dense_final_loss": reach,
        "moe_steps_fraction": None if reach is None else reach / total,
        "val_loss_gap": dense_final - moe_evals[-1][1],
    }


def plot_curves(moe_metrics: list[dict], dense_metrics: list[dict], summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for metrics, name, color in ((moe_metrics, "MoE", "tab:blue"), (dense_metrics, "dense", "tab:orange")):
        tr = [(m["step"], m["loss"]) for m in metrics]
        axes[0].plot([s for s, _ in tr], [v for _, v in tr], color=color, alpha=0.8, label=f"{name} train")
        ev = _evals(metrics)
        axes[1].plot([s for s, _ in ev], [v for _, v in ev], "o-", color=color, ms=3, label=f"{name} validation")
    reach = summary["moe_steps_to_dense_final_loss"]
    axes[1].axhline(summary["dense"]["final_val_loss"], color="tab:orange", ls=":", lw=1)
    if reach is not None:
        axes[1].axvline(reach, color="tab:blue", ls=":", lw=1)
        axes[1].annotate(f"MoE reaches dense's final loss\nat step {reach:.0f} ({100 * reach / summary['steps']:.0f}%)",
                         (reach, summary["dense"]["final_val_loss"]), textcoords="offset points", xytext=(8, 20),
                         fontsize=8)
    for ax, title in zip(axes, ("training loss (bytes, nats)", "validation loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"MoE ({summary['moe']['active'] / 1e6:.2f}M active / {summary['moe']['total'] / 1e6:.2f}M total) "
                 f"vs dense ({summary['dense']['active'] / 1e6:.2f}M)")
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


OUTPUTS = ("moe", "dense", "compare.json", "loss_curves.png")


def compare(model_config: LMConfig, train_config: TrainConfig, corpus: Corpus, out_dir: str | Path,
            quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train the MoE model and its dense baseline (same data, steps and seed); write compare.json and the plot.

    An earlier comparison in ``out_dir`` is an error unless ``overwrite`` (then only its own outputs are removed)."""
    if model_config.ffn != "moe":
        raise ValueError("compare needs an MoE model config (ffn='moe'); the dense baseline is derived from it")
    out = Path(out_dir)
    existing = [out / name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(f"{out} already holds a comparison ({', '.join(p.name for p in existing)}); choose another "
                         "--out or pass --overwrite to replace it (nothing was changed)")
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    runs = {}
    for name, cfg in (("moe", model_config), ("dense", model_config.dense_baseline())):
        trainer = Trainer(cfg, train_config, corpus, out / name, label=name, quiet=quiet)
        runs[name] = (trainer.run(), read_metrics(out / name / "metrics.jsonl"))
    summary = summarise(runs["moe"][1], runs["dense"][1], runs["moe"][0]["parameters"],
                        runs["dense"][0]["parameters"], train_config)
    summary["plot"] = str(plot_curves(runs["moe"][1], runs["dense"][1], summary, out))
    summary["model_config"] = model_config.to_dict()
    (out / "compare.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    return summary


def _json_default(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(type(o))
