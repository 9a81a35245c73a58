"""Plain-language findings from :class:`RoutingStats`: balance, drops, confidence, specialists, co-activation.

A *specialist* is an expert whose share of a class (or domain) is well above its share of all tokens:
``class_share[c, e] >= MIN_LIFT * token_rate[e]`` and ``class_share[c, e] - token_rate[e] >= MIN_EXCESS``, for
classes holding at least ``MIN_SUPPORT`` of the labelled tokens. The lines name those with the largest excess
``class_share - token_rate``, at most one per class (or domain).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .stats import LayerStats, RoutingStats

MIN_LIFT = 1.5      # share of the class at least 1.5x the expert's share of all tokens
MIN_SUPPORT = 0.005  # the class (or domain) holds at least 0.5% of the labelled tokens...
MIN_COUNT = 20      # ...and at least 20 of them
MIN_EXCESS = 0.10   # the expert takes at least 10 points more of the class than of all tokens
MIN_PAIR_RATE = 0.05  # co-activation: a pair chosen together by at least 5% of tokens


def summary_lines(stats: "RoutingStats", max_specialists: int = 4) -> list[str]:
    layers = [s for s in stats.layers if s.tokens]
    if not layers:
        return ["No routing was recorded (no MoE layer ran inside the recorder)."]
    unit = stats.unit
    lines = [_balance_line(layers), _drop_line(layers, unit), _confidence_line(layers)]
    lines += [f"{s.label} is a Soft MoE layer: every expert processes the same number of slots, so load and drops "
              "are not recordable; specialisation uses each token's dominant expert." for s in layers if s.soft]
    lines += _specialists(layers, stats.class_names, "class", unit, max_specialists)
    lines += _specialists(layers, stats.domain_names, "domain", unit, max(2, max_specialists // 2))
    lines += _mi_lines(layers)
    co = _coactivation_line(layers, unit)
    if co:
        lines.append(co)
    path = _path_line(layers, unit)
    if path:
        lines.append(path)
    return [ln for ln in lines if ln]


def _balance_line(layers: list["LayerStats"]) -> str:
    hard = [s for s in layers if not s.soft]
    if not hard:
        return ""
    worst = max(hard, key=lambda s: s.imbalance)
    e = int(np.argmax(worst.demand_E))
    mean = float(np.mean([s.imbalance for s in hard]))
    verdict = "well balanced" if mean < 1.25 else "somewhat unbalanced" if mean < 2 else "unbalanced"
    return (f"Load is {verdict}: the busiest expert of a layer gets on average {mean:.2f}x the mean load (1.00 = "
            f"perfect). Least balanced: {worst.label}, where expert {e} gets {worst.load_share_E[e]:.0%} of the "
            f"routed slots (an even share is {1 / worst.num_experts:.0%}).")


def _drop_line(layers: list["LayerStats"], unit: str) -> str:
    hard = [s for s in layers if not s.soft]
    out = []
    dropped = sum(int(s.dropped_E.sum()) for s in hard)
    if dropped:
        slots = sum(s.slots for s in hard)
        worst = max(hard, key=lambda s: s.dropped_E.max())
        e = int(np.argmax(worst.dropped_E))
        lost = sum(s.tokens_dropped for s in hard)
        out.append(f"{dropped / slots:.1%} of routed slots were dropped for capacity; {lost:,} {unit} lost all "
                   f"their experts. Most over capacity: {worst.label} expert {e} ({int(worst.dropped_E[e]):,} slots "
                   f"dropped, over capacity in {int(worst.overflow_calls_E[e])} of {worst.calls} forwards).")
    elif hard:
        capped = any(s.capacity_factor is not None for s in hard)
        out.append("No tokens were dropped" + (" (every expert stayed within capacity)." if capped
                                                else " (dropless routing)."))
    without = sum(s.tokens_without_expert for s in layers)
    if without:
        out.append(f"{without:,} {unit} got no expert at all (the router left all their slots empty).")
    return " ".join(out)


def _confidence_line(layers: list["LayerStats"]) -> str:
    conf = float(np.mean([s.top1_confidence for s in layers]))
    ent = float(np.mean([s.entropy_norm for s in layers]))
    uniform = float(np.mean([1 / s.num_experts for s in layers]))
    word = "confident" if conf > 3 * uniform else "fairly unsure" if conf < 1.5 * uniform else "moderately sure"
    return (f"Routers are {word}: mean top-1 probability {conf:.2f} (uniform routing would give {uniform:.2f}); "
            f"router entropy is {ent:.0%} of its maximum.")


def _specialists(layers, names: list[str], kind: str, unit: str, limit: int) -> list[str]:
    best: dict[int, tuple] = {}  # label id -> (lift, layer, expert, share, rate)
    for s in layers:
        joint = s.class_CE if kind == "class" else s.domain_GE
        totals = s.class_tokens_C if kind == "class" else s.domain_tokens_G
        if joint is None or totals.sum() == 0:
            continue
        share = s.class_share_CE if kind == "class" else s.domain_share_GE
        rate_E = s.token_rate_E
        supported = np.flatnonzero((totals >= MIN_SUPPORT * totals.sum()) & (totals >= MIN_COUNT))
        if len(np.flatnonzero(totals)) < 2:
            continue  # a single class or domain: nothing to specialise on
        for c in supported:
            for e in range(s.num_experts):
                if rate_E[e] <= 0:
                    continue
                excess = share[c, e] - rate_E[e]
                if (share[c, e] >= MIN_LIFT * rate_E[e] and excess >= MIN_EXCESS
                        and (c not in best or excess > best[c][0])):
                    best[c] = (excess, s, e, share[c, e], rate_E[e])
    out = []
    for c, (_, s, e, share, rate) in sorted(best.items(), key=lambda kv: -kv[1][0])[:limit]:
        what = f"{names[c]} {unit}" if kind == "class" else f"the {names[c]!r} domain's {unit}"
        out.append(f"{s.label} expert {e} takes {share:.0%} of {what} (but only {rate:.0%} of all {unit}).")
    labelled = [s.class_tokens_C if kind == "class" else s.domain_tokens_G for s in layers]
    if not out and any(t is not None and len(np.flatnonzero(t)) >= 2 for t in labelled):
        out.append(f"No expert specialises by {kind}: none takes a {kind}'s {unit} at {MIN_LIFT}x its share of "
                   f"all {unit} (and {MIN_EXCESS:.0%} points more).")
    return out


def _mi_lines(layers) -> list[str]:
    out = []
    for kind, attr in (("token class", "mi_class"), ("domain", "mi_domain")):
        vals = [(getattr(s, attr), s) for s in layers if not math.isnan(getattr(s, attr)[1])]  # >= 2 labels
        if not vals:
            continue
        (mi, norm), s = max(vals, key=lambda v: v[0][0])
        out.append(f"The expert says most about the {kind} in {s.label}: I(expert; {kind}) = {mi:.3f} bits, "
                   f"{norm:.1%} of the {kind} entropy.")
    return out


def _coactivation_line(layers, unit: str) -> str:
    best = None
    for s in layers:
        if s.top_k < 2 or s.soft:
            continue
        rate_EE, expected_EE = s.coact_rate_EE, s.coact_expected_EE
        for i in range(s.num_experts):
            for j in range(i + 1, s.num_experts):
                expected = expected_EE[i, j]
                if rate_EE[i, j] >= MIN_PAIR_RATE and expected > 0:
                    ratio = rate_EE[i, j] / expected
                    if best is None or ratio > best[0]:
                        best = (ratio, s, i, j, rate_EE[i, j])
    if best is None or best[0] < MIN_LIFT:
        return ""
    ratio, s, i, j, rate = best
    return (f"Experts that pair up: in {s.label}, experts {i} and {j} are chosen together by {rate:.0%} of {unit}, "
            f"{ratio:.1f}x what random choices of {s.top_k} distinct experts would give.")


def _path_line(layers, unit: str) -> str:
    best = None
    for s in layers:
        if s.next_EE is None or s.next_from_E is None:
            continue
        nxt = next((t for t in layers if layers.index(t) == layers.index(s) + 1), None)
        if nxt is None:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            p_EE = s.next_EE / s.next_from_E[:, None]
        rate_next = s.next_to_E / max(s.next_tokens, 1)
        for i in range(p_EE.shape[0]):
            if s.next_from_E[i] < MIN_SUPPORT * s.next_tokens:
                continue
            j = int(np.nanargmax(p_EE[i])) if np.isfinite(p_EE[i]).any() else None
            if j is None or rate_next[j] <= 0:
                continue
            lift = p_EE[i, j] / rate_next[j]
            if best is None or lift > best[0]:
                best = (lift, s, nxt, i, j, p_EE[i, j], rate_next[j])
    if best is None or best[0] < MIN_LIFT:
        return ""
    lift, s, nxt, i, j, p, r = best
    return (f"Routing paths: {p:.0%} of the {unit} {s.label} sends to expert {i} go to expert {j} in "
            f"{nxt.label} (which takes {r:.0%} of all {unit}).")
