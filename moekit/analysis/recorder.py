"""Record the routing of every moekit MoE layer inside any ``nn.Module``.

    with RoutingRecorder(model, class_names=CLASS_NAMES) as stats:
        for ids_BL, classes_BL in batches:
            recorder.set_labels(token_class=classes_BL)     # optional: per-token labels for specialisation
            model(ids_BL)
    stats.layers[0].imbalance, stats.summary()

Hooks exist only inside the ``with`` block (``MoE.register_routing_hook``), so an unrecorded model runs exactly as
before. Each recorded forward adds a handful of small kernels per layer (scatter-adds into per-layer count tensors
that stay on the layer's device, and one ``[E, T] @ [T, E]`` product); nothing is copied to the host until the
statistics are read (once, when the block ends, or when ``stats`` is read inside it).

Notation: ``T`` tokens, ``E`` experts, ``K`` slots per token, ``C`` token classes, ``G`` domains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..layer import MoE
from ..routing.base import RouterOutput
from .stats import LayerStats, RoutingStats

_LN2 = math.log(2.0)


@dataclass
class _Acc:
    """Running sums of one layer, on its device (no host sync while recording)."""

    demand_E: torch.Tensor
    kept_E: torch.Tensor
    overflow_calls_E: torch.Tensor
    coact_EE: torch.Tensor
    next_EE: torch.Tensor
    next_from_E: torch.Tensor
    next_to_E: torch.Tensor
    scalars: torch.Tensor  # [empty_slots, tokens_without_expert, tokens_dropped, tokens_partly_dropped]
    entropy_sum: torch.Tensor
    top1_sum: torch.Tensor
    class_CE: torch.Tensor | None
    class_tokens_C: torch.Tensor | None
    domain_GE: torch.Tensor | None
    domain_tokens_G: torch.Tensor | None
    tokens: int = 0
    calls: int = 0
    next_tokens: int = 0
    soft: bool = False
    assignments: list = field(default_factory=list)


class RoutingRecorder:
    """Context manager that records the routing decisions of every :class:`moekit.MoE` inside ``model``.

    Args:
        model: any module containing moekit MoE layers (a moekit LM, a user's model, a converted HF model).
            Layers are taken in module order (``named_modules``) and named by their module path.
        class_names: names of the token classes, if you will give per-token classes with :meth:`set_labels`.
        domain_names: names of the domains, if you will give per-token domains.
        keep_assignments: also keep every recorded token's expert ids and weights (memory grows with the tokens
            recorded; meant for short samples, e.g. colouring a text by expert).
        every: record only every ``every``-th forward of each layer (1 = all).

    ``with recorder as stats`` yields a :class:`RoutingStats` that is filled in when the block ends (reading it
    inside the block gives a snapshot of what was recorded so far).

    What is recorded per layer: see :class:`moekit.analysis.stats.LayerStats`. Soft MoE layers have no token
    assignment: their load and drops are not recordable (every expert processes the same number of slots), so they
    record each token's *dominant* expert (largest combine weight) for specialisation, plus router entropy and
    confidence over the combine weights.
    """

    def __init__(self, model: nn.Module, *, class_names: Sequence[str] | None = None,
                 domain_names: Sequence[str] | None = None, keep_assignments: bool = False, every: int = 1):
        if not isinstance(model, nn.Module):
            raise ValueError(f"RoutingRecorder needs a torch.nn.Module, got {type(model).__name__}")
        self.names, self.layers = [], []
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                self.names.append(name or type(module).__name__)
                self.layers.append(module)
        if not self.layers:
            raise ValueError(f"no moekit MoE layers found in {type(model).__name__}: RoutingRecorder records "
                             "moekit.MoE layers only; build the model with moekit.MoE or convert Hugging Face "
                             "blocks with moekit.from_hf")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.class_names = None if class_names is None else list(class_names)
        self.domain_names = None if domain_names is None else list(domain_names)
        self.keep_assignments, self.every = keep_assignments, every
        self._acc: list[_Acc | None] = [None] * len(self.layers)
        self._seen = [0] * len(self.layers)
        self._handles: list = []
        self._class_T: torch.Tensor | None = None
        self._domain_T: torch.Tensor | None = None
        self._last: tuple[int, int, torch.Tensor] | None = None
        self._version = 0
        self._stats: RoutingStats | None = None

    # ------------------------------------------------------------------------------------------ context
    def __enter__(self) -> RoutingStats:
        if self._handles:
            raise RuntimeError("this RoutingRecorder is already recording; use one `with` block at a time")
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_routing_hook(self._make_hook(i)))
        self._stats = RoutingStats(self)
        return self._stats

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
        if self._stats is not None:
            try:
                self._stats._freeze()
            except Exception:  # never hide the error that ended the block
                if exc_type is None:
                    raise

    @property
    def recording(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------------------------------- labels
    def set_labels(self, token_class: torch.Tensor | None = None, domain: torch.Tensor | None = None) -> None:
        """Per-token labels for the following forwards (until changed): class and/or domain ids, any shape whose
        flattening matches the tokens the MoE layers see (e.g. ``[B, L]`` for an LM fed ``[B, L]`` ids).
        ``-1`` = unlabelled token. Pass ``None`` to stop labelling that kind."""
        self._class_T = self._check_labels(token_class, self.class_names, "token_class", "class_names")
        self._domain_T = self._check_labels(domain, self.domain_names, "domain", "domain_names")

    @staticmethod
    def _check_labels(labels, names, what: str, names_arg: str) -> torch.Tensor | None:
        if labels is None:
            return None
        if names is None:
            raise ValueError(f"set_labels({what}=...) needs the label names: build the recorder with "
                             f"RoutingRecorder(model, {names_arg}=[...])")
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"{what} labels must be integer ids, got dtype {labels.dtype}")
        labels = labels.reshape(-1).long()
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= len(names)):
            raise ValueError(f"{what} labels must lie in [-1, {len(names)}) for {len(names)} {names_arg}; "
                             f"got [{int(labels.min())}, {int(labels.max())}]")
        return labels

    # -------------------------------------------------------------------------------------------- hooks
    def _make_hook(self, index: int):
        def hook(layer: MoE, x_TD: torch.Tensor, routed: RouterOutput, plan) -> None:
            self._seen[index] += 1
            if (self._seen[index] - 1) % self.every:
                return
            with torch.no_grad():
                self._record(index, layer, x_TD, routed, plan)
            self._version += 1

        return hook

    def _new_acc(self, E: int, device: torch.device) -> _Acc:
        z = lambda *shape, dtype=torch.int64: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        C = len(self.class_names) if self.class_names else 0
        G = len(self.domain_names) if self.domain_names else 0
        return _Acc(z(E), z(E), z(E), z(E, E), z(E, E), z(E), z(E), z(4), z(dtype=torch.float64),
                    z(dtype=torch.float64), z(C, E) if C else None, z(C) if C else None,
                    z(G, E) if G else None, z(G) if G else None)

    def _record(self, i: int, layer: MoE, x_TD: torch.Tensor, routed: RouterOutput, plan) -> None:
        E = layer.config.num_experts
        ids_TK = routed.topk_ids_TK.detach()
        T, K = ids_TK.shape
        if T == 0:
            return
        dev = ids_TK.device
        for kind in ("_class_T", "_domain_T"):  # check (and move) the labels before counting anything
            labels = getattr(self, kind)
            if labels is None:
                continue
            if labels.numel() != T:
                raise ValueError(f"labels were set for {labels.numel()} tokens but MoE layer {self.names[i]!r} saw "
                                 f"{T}; call set_labels(...) with each batch's labels (or set_labels() to clear)")
            if labels.device != dev:  # moved once, then reused by the following layers
                setattr(self, kind, labels.to(dev, non_blocking=True))
        acc = self._acc[i]
        if acc is None:
            acc = self._acc[i] = self._new_acc(E, dev)
        acc.calls += 1
        acc.tokens += T
        acc.soft = acc.soft or routed.soft is not None
        valid_TK = ids_TK >= 0
        key_S = torch.where(valid_TK, ids_TK, E).reshape(-1)
        demand_E = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(
            0, key_S, torch.ones_like(key_S))[:E]
        acc.demand_E += demand_E
        # each token's chosen experts as a 0/1 row (a duplicate choice counts once)
        chosen_TE = torch.zeros(T, E + 1, device=dev).scatter_(1, torch.where(valid_TK, ids_TK, E), 1.0)[:, :E]
        acc.coact_EE += (chosen_TE.T @ chosen_TE).round().long()
        if self._last is not None and self._last[0] == i - 1 and self._last[1] == T:
            prev = self._acc[i - 1]
            prev_TE = self._last[2]
            if prev.next_EE.shape[1] != E:  # the next layer has a different number of experts
                prev.next_EE = torch.zeros(prev.next_EE.shape[0], E, dtype=torch.int64, device=dev)
                prev.next_to_E = torch.zeros(E, dtype=torch.int64, device=dev)
            prev.next_EE += (prev_TE.T @ chosen_TE).round().long()
            prev.next_from_E += prev_TE.sum(0).round().long()
            prev.next_to_E += chosen_TE.sum(0).round().long()
            prev.next_tokens += T
        self._last = (i, T, chosen_TE)

        has_choice_T = valid_TK.any(-1)
        kept_TK = valid_TK if plan is None else plan.ids_TK >= 0  # no plan: Soft MoE, nothing is dropped
        kept_E = demand_E if plan is None else plan.counts_E
        acc.kept_E += kept_E
        acc.overflow_calls_E += (demand_E > kept_E).long()
        dropped_TK = valid_TK & ~kept_TK
        acc.scalars += torch.stack([(~valid_TK).sum(), (~has_choice_T).sum(),
                                    (has_choice_T & ~kept_TK.any(-1)).sum(), dropped_TK.any(-1).sum()])

        p_TE = routed.probs_TE.detach().float()
        acc.entropy_sum += (-torch.special.xlogy(p_TE, p_TE).sum(-1)).sum().double() / _LN2
        acc.top1_sum += p_TE.amax(-1).sum().double()

        for labels, joint, totals in ((self._class_T, acc.class_CE, acc.class_tokens_C),
                                      (self._domain_T, acc.domain_GE, acc.domain_tokens_G)):
            if labels is not None and joint is not None:
                self._add_joint(joint, totals, labels, key_S, K, E)

        if self.keep_assignments:
            w_TK = routed.topk_weights_TK.detach().float()
            acc.assignments.append((ids_TK.clone(), torch.where(kept_TK, ids_TK, -1), w_TK.clone()))

    @staticmethod
    def _add_joint(joint_LE: torch.Tensor, totals_L: torch.Tensor, labels_T: torch.Tensor, key_S: torch.Tensor,
                   K: int, E: int) -> None:
        """``joint[label, expert] += 1`` per valid slot; ``totals[label] += 1`` per token (label ``-1`` skipped)."""
        L = joint_LE.shape[0]
        lab_T = torch.where(labels_T >= 0, labels_T, L)
        lab_S = lab_T.repeat_interleave(K)
        flat = torch.zeros((L + 1) * (E + 1), dtype=torch.int64, device=joint_LE.device)
        flat.scatter_add_(0, lab_S * (E + 1) + key_S, torch.ones_like(key_S))
        joint_LE += flat.view(L + 1, E + 1)[:L, :E]
        totals_L += torch.zeros(L + 1, dtype=torch.int64, device=joint_LE.device).scatter_add_(
            0, lab_T, torch.ones_like(lab_T))[:L]

    # -------------------------------------------------------------------------------------------- read
    def snapshot(self) -> list[LayerStats]:
        """Copy the running sums to the host as :class:`LayerStats`, one per layer (layers never called have
        zero counts)."""
        out = []
        for i, layer in enumerate(self.layers):
            E = layer.config.num_experts
            acc = self._acc[i] or self._new_acc(E, torch.device("cpu"))
            cpu = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
            empty, no_expert, dropped, partly = (int(v) for v in acc.scalars.cpu().tolist())
            assignments = None
            if self.keep_assignments:
                assignments = tuple(torch.cat([a[j] for a in acc.assignments]).cpu().numpy()
                                    if acc.assignments else None for j in range(3))
            out.append(LayerStats(
                name=self.names[i], num_experts=E, top_k=layer.config.top_k,
                soft=acc.soft,
                capacity_factor=layer.config.capacity_factor, calls=acc.calls, tokens=acc.tokens,
                demand_E=cpu(acc.demand_E), kept_E=cpu(acc.kept_E), overflow_calls_E=cpu(acc.overflow_calls_E),
                empty_slots=empty, tokens_without_expert=no_expert, tokens_dropped=dropped,
                tokens_partly_dropped=partly, entropy_sum_bits=float(acc.entropy_sum), top1_sum=float(acc.top1_sum),
                coact_EE=cpu(acc.coact_EE), next_EE=cpu(acc.next_EE) if acc.next_tokens else None,
                next_tokens=acc.next_tokens, next_from_E=cpu(acc.next_from_E), next_to_E=cpu(acc.next_to_E),
                class_CE=cpu(acc.class_CE), class_tokens_C=cpu(acc.class_tokens_C),
                domain_GE=cpu(acc.domain_GE), domain_tokens_G=cpu(acc.domain_tokens_G), assignments=assignments))
        return out
