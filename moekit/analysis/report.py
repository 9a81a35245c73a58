"""The routing report of a trained checkpoint: record routing on held-out text, write JSON, PNGs and one HTML file.

    build_report(ckpt_dir, corpus, "runs/x/report/report.html")
      → report.html (self-contained: plots embedded, opens offline), report.json, report-<plot>.png

Windows of ``seq_len`` bytes are taken evenly spaced over the corpus split (validation by default), labelled per
byte with token classes and domains (:mod:`moekit.analysis.labels`), and run through the model inside a
:class:`RoutingRecorder`. A separate short text sample is run with ``keep_assignments`` to colour it by expert.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..train.checkpoint import CheckpointError
from ..train.data import Corpus
from ..train.trainer import load_lm, read_metrics
from . import plots
from .html import render_html
from .labels import CLASS_NAMES, assign_domains, label_bytes, load_domain_labels
from .recorder import RoutingRecorder
from .stats import jsonable

SAMPLE_BYTES = 768


class ReportError(ValueError):
    """A report that cannot be made from these inputs (the message says what to change)."""


# -------------------------------------------------------------------------------------------- labelling
class SplitLabels:
    """Class and domain id per byte of one corpus split, computed file by file on demand (then cached)."""

    def __init__(self, corpus: Corpus, split: str, domain_map: dict[str, str] | None = None):
        self.data = corpus.split(split)
        every = corpus.files()
        domains = dict(zip((id(f) for f in every), assign_domains(every, domain_map)))
        self.files = sorted(corpus.files(split), key=lambda f: f["start"])
        self.starts = [f["start"] for f in self.files]
        self.file_domain = [domains[id(f)] for f in self.files]
        self.domain_names = sorted(set(self.file_domain))
        self._domain_id = {d: i for i, d in enumerate(self.domain_names)}
        self._cache: dict[int, np.ndarray] = {}
        self.schemes: dict[str, int] = {"python": 0, "bytes": 0}

    def _file_classes(self, k: int) -> np.ndarray:
        if k not in self._cache:
            f = self.files[k]
            classes, scheme = label_bytes(bytes(self.data[f["start"]:f["end"]]), f["path"])
            self.schemes[scheme] += 1
            self._cache[k] = classes
        return self._cache[k]

    def file_at(self, pos: int) -> int:
        return max(0, bisect.bisect_right(self.starts, pos) - 1)

    def labels(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """``(class ids, domain ids)`` int64 for bytes ``[start, end)`` of the split (``-1`` outside any file)."""
        cls = np.full(end - start, -1, dtype=np.int64)
        dom = np.full(end - start, -1, dtype=np.int64)
        k = self.file_at(start)
        while k < len(self.files) and self.files[k]["start"] < end:
            f = self.files[k]
            a, b = max(start, f["start"]), min(end, f["end"])
            if b > a:
                cls[a - start:b - start] = self._file_classes(k)[a - f["start"]:b - f["start"]]
                dom[a - start:b - start] = self._domain_id[self.file_domain[k]]
            k += 1
        return cls, dom


# ------------------------------------------------------------------------------------------------ inputs
def resolve_checkpoint(ckpt: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint folder, metrics.jsonl or None)`` from a run folder or a checkpoint folder."""
    path = Path(ckpt).expanduser()
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if not path.exists() and not path.with_name(path.name + ".old").exists():
        raise CheckpointError(f"no checkpoint at {path}: pass --ckpt the run folder written by `moekit train` "
                              "(it contains checkpoint/ and metrics.jsonl) or its checkpoint/ folder")
    for cand in (path.parent / "metrics.jsonl", path / "metrics.jsonl"):
        if cand.is_file():
            return path, cand
    return path, None


@dataclass
class Windows:
    starts: list[int]
    seq_len: int


def even_windows(n_bytes: int, seq_len: int, tokens: int) -> Windows:
    if n_bytes < seq_len:
        raise ReportError(f"the analysed split holds only {n_bytes} bytes, fewer than one window of {seq_len}; "
                          "use --split train, a shorter --seq-len, or more text")
    count = max(1, min(math.ceil(tokens / seq_len), n_bytes // seq_len))
    return Windows(np.linspace(0, n_bytes - seq_len, count).astype(np.int64).tolist(), seq_len)


def pick_sample(labels: SplitLabels, length: int) -> int:
    """Start of the text sample: the first ``def`` or ``class`` line of the first file long enough to hold it
    (a file start for other text)."""
    data = labels.data
    for f in labels.files:
        if f["end"] - f["start"] < length:
            continue
        raw = bytes(data[f["start"]:f["end"]])
        for marker in (b"\ndef ", b"\nclass ", b"\n    def "):
            at = raw.find(marker)
            if 0 <= at <= len(raw) - length:
                return f["start"] + at + 1
        return f["start"]
    return 0


# ------------------------------------------------------------------------------------------------ report
@torch.no_grad()
def build_report(ckpt: str | Path, corpus: Corpus, out: str | Path | None = None, *,
                 domain_labels: str | Path | None = None, split: str = "val", tokens: int = 65536,
                 seq_len: int | None = None, batch_size: int = 16, sample_bytes: int = SAMPLE_BYTES) -> dict:
    """Analyse ``ckpt`` on ``corpus`` and write the report; returns ``{"html", "json", "pngs", "summary", ...}``.

    Args:
        ckpt: run folder (with ``checkpoint/`` and ``metrics.jsonl``) or checkpoint folder.
        corpus: the prepared corpus to route (normally the one the model was trained on).
        out: HTML path (default ``<run>/report/report.html``); the JSON and PNGs go beside it.
        domain_labels: optional JSON file mapping file paths or glob patterns to domain labels.
        split: ``"val"`` (held-out, default) or ``"train"``.
        tokens: bytes to analyse (rounded up to whole windows).
        seq_len: window length (default: the training ``seq_len``, at most the model's ``max_seq_len``).
    """
    if not isinstance(tokens, int) or tokens < 1:
        raise ReportError(f"tokens must be a positive integer, got {tokens!r}")
    ckpt_dir, metrics_file = resolve_checkpoint(ckpt)
    model, meta = load_lm(ckpt_dir)
    if not model.moe_layers():
        raise ReportError(f"{ckpt_dir} holds a dense model (ffn={model.config.ffn!r}): it has no MoE layers to "
                          "analyse; pass the checkpoint of an MoE run")
    mapping = load_domain_labels(domain_labels) if domain_labels is not None else None
    labels = SplitLabels(corpus, split, mapping)
    max_len = model.config.max_seq_len
    seq_len = seq_len or min(int(meta.get("train_config", {}).get("seq_len", 128)), max_len)
    if not 1 <= seq_len <= max_len:
        raise ReportError(f"seq_len={seq_len} must be between 1 and the model's max_seq_len={max_len}")
    windows = even_windows(len(labels.data), seq_len, tokens)

    recorder = RoutingRecorder(model, class_names=CLASS_NAMES, domain_names=labels.domain_names)
    with recorder as stats:
        for b in range(0, len(windows.starts), batch_size):
            starts = windows.starts[b:b + batch_size]
            ids = torch.from_numpy(np.stack([np.asarray(labels.data[s:s + seq_len]) for s in starts]).astype(np.int64))
            cls, dom = zip(*(labels.labels(s, s + seq_len) for s in starts))
            recorder.set_labels(token_class=torch.from_numpy(np.stack(cls)), domain=torch.from_numpy(np.stack(dom)))
            model(ids)
    stats.unit = "bytes"
    sample = _sample(model, labels, min(sample_bytes, len(labels.data)), max_len)

    out = Path(out) if out is not None else ckpt_dir.parent / "report" / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    records = read_metrics(metrics_file) if metrics_file else []
    pngs = plots.save_all(stats, out.parent, out.stem, records)
    summary = stats.summary()
    info = {"checkpoint": str(ckpt_dir), "step": meta.get("step"), "model_config": meta.get("model_config"),
            "data_source": corpus.meta.get("source"),
            "same_data_as_training": meta.get("data_fingerprint") == corpus.meta.get("fingerprint"),
            "split": split, "windows": len(windows.starts), "seq_len": seq_len,
            "bytes_analysed": len(windows.starts) * seq_len, "files_labelled": dict(labels.schemes),
            "domain_labels": None if domain_labels is None else str(domain_labels),
            "metrics": None if metrics_file is None else str(metrics_file)}
    json_path = out.with_suffix(".json")
    doc = {"report": info, "summary": summary, "stats": stats.to_dict(), "sample": sample,
           "plots": {k: p.name for k, p in pngs.items()}}
    json_path.write_text(json.dumps(jsonable(doc), indent=1))
    out.write_text(render_html(info, summary, stats, pngs, sample, json_path.name), encoding="utf-8")
    return {"html": out, "json": json_path, "pngs": pngs, "summary": summary, "stats": stats, "info": info}


def _sample(model, labels: SplitLabels, length: int, max_len: int) -> dict:
    """Route a contiguous text sample (in chunks of at most ``max_len``) and keep each byte's top expert."""
    start = pick_sample(labels, length)
    raw = bytes(labels.data[start:start + length])
    cls, _ = labels.labels(start, start + len(raw))
    recorder = RoutingRecorder(model, keep_assignments=True)
    with recorder as stats:
        for a in range(0, len(raw), max_len):
            model(torch.tensor([list(raw[a:a + max_len])], dtype=torch.long))
    layers = []
    for s in stats.layers:
        ids_TK, kept_TK, w_TK = s.assignments
        expert_T = np.full(len(raw), -1, dtype=np.int64)  # -1: no expert chosen; -2: all choices dropped
        best_w = np.where(kept_TK >= 0, w_TK, -np.inf)
        has_kept = (kept_TK >= 0).any(1)
        expert_T[has_kept] = kept_TK[has_kept, best_w[has_kept].argmax(1)]
        expert_T[~has_kept & (ids_TK >= 0).any(1)] = -2
        layers.append({"label": s.label, "expert": expert_T.tolist(), "num_experts": s.num_experts,
                       "soft": s.soft})
    f = labels.files[labels.file_at(start)] if labels.files else {"path": "?"}
    return {"file": f["path"], "offset_in_split": start, "bytes": list(raw), "classes": cls.tolist(),
            "layers": layers}
