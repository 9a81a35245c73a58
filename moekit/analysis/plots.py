"""Matplotlib figures of :class:`RoutingStats` (headless ``Agg`` backend), each saved as a PNG that reads on its own.

Every function returns a ``Figure`` or ``None`` when there is nothing to plot (e.g. no labels, ``top_k = 1`` for
co-activation). :func:`save_all` writes them as ``<prefix>-<name>.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from .stats import RoutingStats  # noqa: E402

DPI = 96
MAX_DOMAINS = 16


def _grid(n: int, cell_w: float, cell_h: float, cols: int = 4):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cell_w * cols, cell_h * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _annotate(ax, values, fmt: str, image=None, max_cells: int = 300) -> None:
    """Write ``values`` in the cells; white text on dark cells of ``image`` (an ``imshow`` result)."""
    if values.size > max_cells:
        return
    colours = None if image is None else image.cmap(image.norm(image.get_array()))
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            dark = colours is not None and float(np.dot(colours[r, c, :3], (0.299, 0.587, 0.114))) < 0.5
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7, color="white" if dark else "black")


def load_heatmap(stats: RoutingStats):
    """Layer × expert: each expert's load relative to an even share (1.0 = its fair share)."""
    layers = [s for s in stats.layers if s.tokens]
    if not layers:
        return None
    E = max(s.num_experts for s in layers)
    rel = np.full((len(layers), E), np.nan)
    for i, s in enumerate(layers):
        if not s.soft:
            rel[i, :s.num_experts] = s.load_share_E * s.num_experts
    fig, ax = plt.subplots(figsize=(max(5.5, 0.55 * E + 2.5), 0.5 * len(layers) + 2.0))
    hi = max(2.0, float(np.nanmax(rel)) if np.isfinite(rel).any() else 2.0)
    im = ax.imshow(rel, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=hi), aspect="auto")
    _annotate(ax, rel, "{:.2f}", im)
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(layers)), [s.label + (" (soft)" if s.soft else "") for s in layers])
    ax.set_xlabel("expert")
    ax.set_title("Load per expert / even share\n(1.00 = fair share; from the router's choices)", fontsize=10)
    fig.colorbar(im, ax=ax, label="load / even share")
    fig.tight_layout()
    return fig


def balance_over_training(records: list[dict]):
    """The trainer's ``balance`` (max/mean tokens per expert of the last batch) and ``aux_loss`` per logged step."""
    pts = [(r["step"], r["balance"]) for r in records if isinstance(r.get("balance"), (int, float))
           and math.isfinite(r["balance"])]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps, bal = zip(*pts)
    ax.plot(steps, bal, color="tab:blue", label="balance (max / mean load)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("max / mean tokens per expert", color="tab:blue")
    aux = [(r["step"], r["aux_loss"]) for r in records if isinstance(r.get("aux_loss"), (int, float))]
    if aux:
        ax2 = ax.twinx()
        ax2.plot(*zip(*aux), color="tab:orange", alpha=0.7, label="aux loss")
        ax2.set_ylabel("auxiliary balancing loss", color="tab:orange")
    ax.set_title("Load balance over training (1.0 = perfectly balanced)", fontsize=10)
    fig.tight_layout()
    return fig


def _specialisation(stats: RoutingStats, kind: str):
    layers = [s for s in stats.layers if s.tokens and (s.class_CE if kind == "class" else s.domain_GE) is not None]
    if not layers:
        return None
    names = stats.class_names if kind == "class" else stats.domain_names
    totals = layers[0].class_tokens_C if kind == "class" else layers[0].domain_tokens_G  # same tokens every layer
    rows = np.flatnonzero(totals > 0)
    if kind == "domain":
        rows = rows[np.argsort(-totals[rows], kind="stable")][:MAX_DOMAINS]
    if len(rows) < 2:
        return None
    E = max(s.num_experts for s in layers)
    fig, axes = _grid(len(layers), 0.45 * E + 3.2, 0.33 * len(rows) + 1.6, cols=2)
    for ax, s in zip(axes, layers):
        share = (s.class_share_CE if kind == "class" else s.domain_share_GE)[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            lift = np.log2(share / s.token_rate_E[None, :])
        lift = np.clip(np.nan_to_num(lift, nan=0.0, neginf=-3.0, posinf=3.0), -3, 3)
        im = ax.imshow(lift, cmap="PuOr_r", vmin=-2, vmax=2, aspect="auto")
        _annotate(ax, 100 * share, "{:.0f}", im)
        ax.set_xticks(range(s.num_experts))
        ax.set_yticks(range(len(rows)), [f"{names[r]} ({totals[r]:,})" for r in rows], fontsize=8)
        ax.set_xlabel("expert")
        ax.set_title(s.label, fontsize=10)
    what = "token class" if kind == "class" else "domain"
    fig.suptitle(f"Specialisation by {what}: % of each {what}'s {stats.unit} that each expert takes\n"
                 f"(colour: vs the expert's share of all {stats.unit}; orange = more, purple = less)", fontsize=10)
    fig.tight_layout()
    return fig


def class_heatmaps(stats: RoutingStats):
    return _specialisation(stats, "class")


def domain_heatmaps(stats: RoutingStats):
    return _specialisation(stats, "domain")


def coactivation(stats: RoutingStats):
    """Per layer E × E: how often a pair is chosen together, relative to random choices (log2 colour)."""
    layers = [s for s in stats.layers if s.tokens and s.top_k > 1 and not s.soft]
    if not layers:
        return None
    E = max(s.num_experts for s in layers)
    fig, axes = _grid(len(layers), 0.4 * E + 2.2, 0.4 * E + 1.4, cols=4 if E <= 6 else 2)
    for ax, s in zip(axes, layers):
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = s.coact_rate_EE / s.coact_expected_EE
            np.fill_diagonal(ratio, np.nan)
            lg = np.log2(ratio)
        im = ax.imshow(np.clip(np.nan_to_num(lg, nan=0.0, neginf=-3), -3, 3), cmap="RdBu_r", vmin=-2, vmax=2)
        _annotate(ax, 100 * np.where(np.eye(s.num_experts, dtype=bool), np.nan, s.coact_rate_EE), "{:.0f}", im,
                  max_cells=256)
        ax.set_xticks(range(s.num_experts))
        ax.set_yticks(range(s.num_experts))
        ax.set_title(s.label, fontsize=10)
    fig.suptitle(f"Co-activation: % of {stats.unit} choosing both experts\n(colour: vs random choices of distinct experts; "
                 "red = together more often)", fontsize=10)
    fig.tight_layout()
    return fig


def layer_paths(stats: RoutingStats):
    """Consecutive layers: cosine overlap of the experts' token sets (1 = same tokens)."""
    pairs = [(s, t) for s, t in zip(stats.layers, stats.layers[1:]) if s.next_EE is not None]
    if not pairs:
        return None
    E = max(s.num_experts for s, _ in pairs)
    fig, axes = _grid(len(pairs), 0.4 * E + 2.4, 0.4 * E + 1.5, cols=4 if E <= 6 else 2)
    for ax, (s, t) in zip(axes, pairs):
        ov = s.next_overlap_EE
        im = ax.imshow(np.nan_to_num(ov), cmap="viridis", vmin=0, vmax=1)
        _annotate(ax, ov, "{:.2f}", im, max_cells=144)
        ax.set_xticks(range(ov.shape[1]))
        ax.set_yticks(range(ov.shape[0]))
        ax.set_xlabel(f"expert of {t.label}")
        ax.set_ylabel(f"expert of {s.label}")
    K, E0 = pairs[0][0].top_k, pairs[0][0].num_experts
    fig.suptitle(f"Experts across layers: overlap of the {stats.unit} they take\n(cosine; 1 = same {stats.unit}, "
                 f"unrelated routing ~ {K / E0:.2f})", fontsize=10)
    fig.tight_layout()
    return fig


def router_summary(stats: RoutingStats):
    """Per layer: normalised router entropy, top-1 confidence and normalised mutual information."""
    layers = [s for s in stats.layers if s.tokens]
    if not layers:
        return None
    series = {"router entropy / max": [s.entropy_norm for s in layers],
              "top-1 probability": [s.top1_confidence for s in layers]}
    if any(s.class_CE is not None for s in layers):
        series["I(expert; class) / H(class)"] = [s.mi_class[1] for s in layers]
    if any(s.domain_GE is not None for s in layers):
        series["I(expert; domain) / H(domain)"] = [s.mi_domain[1] for s in layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(layers) + 3), 3.6))
    w = 0.8 / len(series)
    x = np.arange(len(layers))
    for k, (name, vals) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * w, np.nan_to_num(np.asarray(vals, dtype=float)), w, label=name)
    ax.set_xticks(x, [s.label for s in layers])
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Router certainty, and what the expert\ntells about the label", fontsize=10)
    fig.tight_layout()
    return fig


PLOTS = {"load": load_heatmap, "router": router_summary, "classes": class_heatmaps, "domains": domain_heatmaps,
         "coactivation": coactivation, "paths": layer_paths}


def save_all(stats: RoutingStats, folder: str | Path, prefix: str,
             metrics: list[dict] | None = None) -> dict[str, Path]:
    """Render every plot that has data; returns ``{name: png path}`` in display order."""
    folder = Path(folder)
    out = {}
    figures = [("load", load_heatmap(stats)), ("balance", balance_over_training(metrics or []))]
    figures += [(name, fn(stats)) for name, fn in PLOTS.items() if name != "load"]
    for name, fig in figures:
        if fig is None:
            continue
        path = folder / f"{prefix}-{name}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        out[name] = path
    return out


__all__ = ["save_all", "PLOTS", "load_heatmap", "balance_over_training", "class_heatmaps", "domain_heatmaps",
           "coactivation", "layer_paths", "router_summary"]
