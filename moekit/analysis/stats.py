"""Routing statistics computed from the counts a :class:`RoutingRecorder` collects (all on the host, numpy).

Notation: ``E`` experts, ``C`` token classes, ``G`` domains. A *slot* is one (token, chosen expert) pair: a top-k
router gives each token ``K`` slots, a dynamic router may leave slots empty (expert id ``-1``).

Definitions (per layer):

- ``demand_E``: slots the router assigned to each expert (its choices, *before* capacity).
  ``kept_E``: slots the expert actually processed (after capacity). ``dropped_E = demand_E - kept_E``.
- ``imbalance = max(demand_E) / mean(demand_E)``: 1.0 is perfect balance, ``E`` is one expert taking everything.
  (The trainer's ``balance`` metric is the same ratio on ``kept_E`` of the last batch: equal when dropless.)
  ``cv = std(demand_E) / mean(demand_E)`` (population std): the coefficient of variation, 0 when balanced.
- ``entropy_bits``: mean over tokens of the router distribution's entropy ``-sum_e p_e log2 p_e`` (``probs_TE``;
  at most ``log2 E``), ``entropy_norm`` divides it by ``log2 E``. ``top1_confidence``: mean of ``max_e p_e``.
- ``tokens_dropped``: tokens that had at least one expert chosen and lost all of them to capacity (they get only
  the residual and shared experts); ``tokens_partly_dropped``: tokens that lost at least one slot;
  ``overflow_calls_E``: forwards in which the expert was over capacity. ``empty_slots``: slots the router left
  empty; ``tokens_without_expert``: tokens with no expert chosen at all (e.g. Expert Choice).
- ``coact_EE``: co-activation, ``coact_EE[i, j]`` = tokens that chose both ``i`` and ``j`` (``i != j``); the
  diagonal is the tokens that chose ``i``. ``coact_rate_EE = coact_EE / tokens``. ``coact_expected_EE`` is the
  pair rate if each token drew its ``K`` *distinct* experts at random with the observed per-expert rates ``r``:
  ``r_i r_j (K - 1) E / (K (E - 1))`` (exact for uniform rates, where it is ``K (K - 1) / (E (E - 1))``; plain
  ``r_i r_j`` would overstate it, since a token never picks the same expert twice).
- Specialisation: ``class_CE[c, e]`` counts the slots of class-``c`` tokens routed to ``e`` (router choices);
  ``class_tokens_C[c]`` counts class-``c`` tokens. ``class_share_CE = class_CE / class_tokens_C`` is the fraction
  of class-``c`` tokens that expert ``e`` takes (a row sums to about ``K``). Same for domains (``domain_GE``).
- Mutual information (:func:`mutual_information`): ``I(expert; class) = sum_{c,e} p(c,e) log2(p(c,e) / (p(c)
  p(e)))`` in bits, with ``p(c, e) = class_CE / class_CE.sum()`` the joint distribution over slots. It is 0 when
  the experts see the same mix of classes and reaches ``H(class)`` when the expert determines the class;
  ``mi_norm = I / H(class)`` (``H`` of the same slot-weighted class marginal) is the fraction of the class's
  uncertainty that knowing the expert removes, in [0, 1].
- Similarity of experts across consecutive MoE layers ``a`` → ``b`` (same tokens):
  ``overlap[i, j] = n_ij / sqrt(n_i n_j)``, the cosine similarity of the two experts' token sets (``n_ij`` tokens
  chose ``i`` in ``a`` and ``j`` in ``b``; ``n_i``, ``n_j`` tokens chose each). 1 = exactly the same tokens, about
  ``K / E`` for unrelated routing. And, with token classes, ``profile[i, j]`` = cosine similarity of the experts'
  specialisation profiles ``p(class | expert) - p(class)`` (1 = same preferences, -1 = opposite, 0 = unrelated).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .recorder import RoutingRecorder


# ------------------------------------------------------------------------------------------- information
def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy in bits of a distribution (zeros ignored)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(joint: np.ndarray) -> tuple[float, float]:
    """``(I in bits, I / H(rows))`` of a joint count table ``[rows, cols]`` (e.g. class × expert).

    ``I = sum p(r,c) log2(p(r,c) / (p(r) p(c)))``; ``nan`` when the table is empty; the normalised value is ``nan``
    when the rows have zero entropy (a single class)."""
    joint = np.asarray(joint, dtype=np.float64)
    n = joint.sum()
    if n <= 0:
        return math.nan, math.nan
    p = joint / n
    pr, pc = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / np.outer(pr, pc)[nz])).sum())
    mi = max(mi, 0.0)  # rounding can leave -1e-17
    h = entropy_bits(pr)
    return mi, (mi / h if h > 0 else math.nan)


def profile_similarity(joint_a: np.ndarray, joint_b: np.ndarray) -> np.ndarray:
    """``[E_a, E_b]`` cosine similarity of the experts' profiles ``p(label | expert) - p(label)`` (see module doc);
    ``nan`` for an expert with no slots or no deviation from the mix."""
    def deviation(joint):
        joint = np.asarray(joint, dtype=np.float64)
        col = joint.sum(0, keepdims=True)
        mix = joint.sum(1, keepdims=True) / max(joint.sum(), 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            dev = joint / col - mix
            return dev / np.linalg.norm(dev, axis=0, keepdims=True)

    return deviation(joint_a).T @ deviation(joint_b)


def _ratio(a, b) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64)


# ------------------------------------------------------------------------------------------------- layers
@dataclass
class LayerStats:
    """Counts recorded for one MoE layer and the statistics derived from them (see the module docstring)."""

    name: str
    num_experts: int
    top_k: int
    soft: bool
    capacity_factor: float | None
    calls: int
    tokens: int
    demand_E: np.ndarray
    kept_E: np.ndarray
    overflow_calls_E: np.ndarray
    empty_slots: int
    tokens_without_expert: int
    tokens_dropped: int
    tokens_partly_dropped: int
    entropy_sum_bits: float
    top1_sum: float
    coact_EE: np.ndarray
    next_EE: np.ndarray | None = None
    next_tokens: int = 0
    next_from_E: np.ndarray | None = None
    next_to_E: np.ndarray | None = None
    class_CE: np.ndarray | None = None
    class_tokens_C: np.ndarray | None = None
    domain_GE: np.ndarray | None = None
    domain_tokens_G: np.ndarray | None = None
    assignments: tuple | None = None  # (ids_TK, kept_ids_TK, weights_TK) of every recorded token, if kept
    label: str = ""

    # ---------------------------------------------------------------------------------------------- load
    @property
    def slots(self) -> int:
        return int(self.demand_E.sum())

    @property
    def load_share_E(self) -> np.ndarray:
        """Fraction of the routed slots each expert receives (``1 / E`` each when balanced)."""
        return _ratio(self.demand_E, max(self.slots, 1))

    @property
    def token_rate_E(self) -> np.ndarray:
        """Fraction of all tokens that chose each expert (sums to about ``K``)."""
        return _ratio(self.demand_E, max(self.tokens, 1))

    @property
    def imbalance(self) -> float:
        """``max / mean`` of ``demand_E`` (1.0 = balanced); ``nan`` for Soft MoE (not recordable) or no tokens."""
        if self.soft or self.slots == 0:
            return math.nan
        return float(self.demand_E.max() / self.demand_E.mean())

    @property
    def cv(self) -> float:
        """Coefficient of variation ``std / mean`` of ``demand_E`` (0 = balanced); ``nan`` like ``imbalance``."""
        if self.soft or self.slots == 0:
            return math.nan
        d = self.demand_E.astype(np.float64)
        return float(d.std() / d.mean())

    # -------------------------------------------------------------------------------------------- router
    @property
    def entropy_bits(self) -> float:
        return self.entropy_sum_bits / self.tokens if self.tokens else math.nan

    @property
    def entropy_norm(self) -> float:
        return self.entropy_bits / math.log2(self.num_experts) if self.num_experts > 1 else math.nan

    @property
    def top1_confidence(self) -> float:
        return self.top1_sum / self.tokens if self.tokens else math.nan

    # --------------------------------------------------------------------------------------------- drops
    @property
    def dropped_E(self) -> np.ndarray:
        return self.demand_E - self.kept_E

    @property
    def drop_fraction(self) -> float:
        """Dropped slots / routed slots (0 when dropless)."""
        return float(self.dropped_E.sum() / self.slots) if self.slots else math.nan

    # ------------------------------------------------------------------------------------- co-activation
    @property
    def coact_rate_EE(self) -> np.ndarray:
        return _ratio(self.coact_EE, max(self.tokens, 1))

    @property
    def coact_expected_EE(self) -> np.ndarray:
        """Pair rate under random choices of ``K`` distinct experts with the observed rates (see module doc)."""
        K, E = self.top_k, self.num_experts
        r_E = self.token_rate_E
        return np.outer(r_E, r_E) * ((K - 1) * E / (K * (E - 1)) if E > 1 else 0.0)

    # ----------------------------------------------------------------------------------- specialisation
    @property
    def class_share_CE(self) -> np.ndarray | None:
        """Fraction of class-``c`` tokens that expert ``e`` takes (``nan`` rows for classes never seen)."""
        return None if self.class_CE is None else _ratio(self.class_CE, self.class_tokens_C[:, None])

    @property
    def domain_share_GE(self) -> np.ndarray | None:
        return None if self.domain_GE is None else _ratio(self.domain_GE, self.domain_tokens_G[:, None])

    @property
    def mi_class(self) -> tuple[float, float]:
        """``(I(expert; class) bits, I / H(class))``; ``(nan, nan)`` without class labels."""
        return (math.nan, math.nan) if self.class_CE is None else mutual_information(self.class_CE)

    @property
    def mi_domain(self) -> tuple[float, float]:
        return (math.nan, math.nan) if self.domain_GE is None else mutual_information(self.domain_GE)

    # ------------------------------------------------------------------------------------- across layers
    @property
    def next_overlap_EE(self) -> np.ndarray | None:
        """Cosine overlap of token sets with the next MoE layer (``[E, E_next]``), if it was recorded."""
        if self.next_EE is None:
            return None
        return _ratio(self.next_EE, np.sqrt(np.outer(self.next_from_E, self.next_to_E)))

    def to_dict(self) -> dict[str, Any]:
        mi_c, mi_cn = self.mi_class
        mi_d, mi_dn = self.mi_domain
        d = {"name": self.name, "label": self.label, "soft": self.soft, "num_experts": self.num_experts,
             "top_k": self.top_k, "capacity_factor": self.capacity_factor, "calls": self.calls,
             "tokens": self.tokens, "slots": self.slots, "demand_E": self.demand_E, "kept_E": self.kept_E,
             "load_share_E": self.load_share_E, "imbalance_max_mean": self.imbalance, "cv": self.cv,
             "entropy_bits": self.entropy_bits, "entropy_norm": self.entropy_norm,
             "top1_confidence": self.top1_confidence, "dropped_E": self.dropped_E,
             "drop_fraction": self.drop_fraction, "tokens_dropped": self.tokens_dropped,
             "tokens_partly_dropped": self.tokens_partly_dropped, "overflow_calls_E": self.overflow_calls_E,
             "empty_slots": self.empty_slots, "tokens_without_expert": self.tokens_without_expert,
             "coactivation_EE": self.coact_EE}
        if self.class_CE is not None:
            d["token_class"] = {"counts_CE": self.class_CE, "tokens_C": self.class_tokens_C,
                                "share_CE": self.class_share_CE, "mi_bits": mi_c, "mi_norm": mi_cn}
        if self.domain_GE is not None:
            d["domain"] = {"counts_GE": self.domain_GE, "tokens_G": self.domain_tokens_G,
                           "share_GE": self.domain_share_GE, "mi_bits": mi_d, "mi_norm": mi_dn}
        if self.next_EE is not None:
            d["next_layer"] = {"counts_EE": self.next_EE, "overlap_EE": self.next_overlap_EE,
                               "tokens": self.next_tokens}
        return d


# ------------------------------------------------------------------------------------------------ model
class RoutingStats:
    """Statistics of every recorded MoE layer (in module order), yielded by ``with RoutingRecorder(model)``.

    Args:
        source: the recorder filling it (read lazily, frozen when its ``with`` block ends), or ready
            :class:`LayerStats`.
        class_names, domain_names: names of the label ids (taken from the recorder when it is the source).
        unit: how the summary calls a token (``"bytes"`` for byte-level models).
    """

    def __init__(self, source: "RoutingRecorder | list[LayerStats]", class_names=None, domain_names=None,
                 unit: str = "tokens"):
        self._recorder = None if isinstance(source, list) else source
        self._layers = list(source) if isinstance(source, list) else None
        self._version = -1
        rec_classes = getattr(self._recorder, "class_names", None)
        rec_domains = getattr(self._recorder, "domain_names", None)
        self.class_names = list(class_names or rec_classes or [])
        self.domain_names = list(domain_names or rec_domains or [])
        self.unit = unit
        if self._layers is not None:
            _set_labels(self._layers)

    @property
    def layers(self) -> list[LayerStats]:
        rec = self._recorder
        if rec is not None and (self._layers is None or self._version != rec._version):
            self._layers = rec.snapshot()
            self._version = rec._version
            _set_labels(self._layers)
        return self._layers

    def _freeze(self) -> None:
        """Called when recording ends: take the final snapshot and let go of the recorder."""
        self.layers  # noqa: B018 - refresh
        self._recorder = None

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, key: int | str) -> LayerStats:
        """A layer by position, module name or display label (``"layer 3"``)."""
        if isinstance(key, int):
            return self.layers[key]
        for s in self.layers:
            if key in (s.name, s.label):
                return s
        raise KeyError(f"no MoE layer named {key!r}; layers: {[s.name for s in self.layers]}")

    # ------------------------------------------------------------------------------------------ overall
    def overall(self) -> dict[str, float]:
        """Means over the layers that saw tokens (Soft MoE layers excluded from load and drops)."""
        seen = [s for s in self.layers if s.tokens]
        hard = [s for s in seen if not s.soft]

        def mean(vals):
            vals = [v for v in vals if not math.isnan(v)]
            return float(np.mean(vals)) if vals else math.nan

        slots = sum(s.slots for s in hard)
        return {"layers": len(self.layers), "tokens": max((s.tokens for s in seen), default=0),
                "imbalance_max_mean": mean(s.imbalance for s in hard), "cv": mean(s.cv for s in hard),
                "worst_imbalance": max((s.imbalance for s in hard), default=math.nan),
                "entropy_norm": mean(s.entropy_norm for s in seen),
                "top1_confidence": mean(s.top1_confidence for s in seen),
                "drop_fraction": float(sum(int(s.dropped_E.sum()) for s in hard) / slots) if slots else math.nan,
                "mi_class_norm": mean(s.mi_class[1] for s in seen),
                "mi_domain_norm": mean(s.mi_domain[1] for s in seen)}

    def class_profile_similarity(self) -> list[tuple[str, str, np.ndarray]]:
        """``(layer a, layer b, [E_a, E_b] profile cosine)`` for consecutive layers with token classes."""
        out = []
        for a, b in zip(self.layers, self.layers[1:]):
            if a.class_CE is not None and b.class_CE is not None and a.class_CE.sum() and b.class_CE.sum():
                out.append((a.label, b.label, profile_similarity(a.class_CE, b.class_CE)))
        return out

    def summary(self, max_specialists: int = 4) -> list[str]:
        """Short plain-language findings (see :mod:`moekit.analysis.summary`)."""
        from .summary import summary_lines

        return summary_lines(self, max_specialists=max_specialists)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able Python (arrays as lists, ``nan`` as ``None``)."""
        d = {"class_names": self.class_names, "domain_names": self.domain_names, "unit": self.unit,
             "overall": self.overall(), "layers": [s.to_dict() for s in self.layers],
             "class_profile_similarity": [{"a": a, "b": b, "cosine_EE": m}
                                          for a, b, m in self.class_profile_similarity()],
             "summary": self.summary()}
        return jsonable(d)


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) or math.isinf(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _set_labels(layers: list[LayerStats]) -> None:
    """Display labels: ``layer N`` when every module path holds a distinct number (``blocks.3.ffn``), else the
    module path itself."""
    nums = []
    for s in layers:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", s.name)
        nums.append(m.group(1) if m else None)
    ok = None not in nums and len(set(nums)) == len(nums)
    for s, n in zip(layers, nums):
        s.label = f"layer {n}" if ok else s.name
