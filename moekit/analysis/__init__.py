"""Routing analytics: record what every MoE layer decides, compute statistics, plot them, write a report.

- :class:`RoutingRecorder` (``recorder.py``): ``with RoutingRecorder(model) as stats: model(x)``.
- :class:`RoutingStats` / :class:`LayerStats` (``stats.py``): load, balance, entropy, drops, co-activation,
  specialisation and mutual information, similarity across layers.
- ``labels.py``: token classes per byte (Python's ``tokenize`` for source, byte classes otherwise) and domains.
- ``plots.py``, ``html.py``, ``report.py``: matplotlib figures and the one-file HTML report (``moekit report``).

See docs/analysis.md.
"""

from .labels import CLASS_NAMES, LabelError, byte_classes, label_bytes, load_domain_labels, python_classes
from .recorder import RoutingRecorder
from .stats import LayerStats, RoutingStats, mutual_information

__all__ = ["RoutingRecorder", "RoutingStats", "LayerStats", "mutual_information", "CLASS_NAMES", "LabelError",
           "byte_classes", "python_classes", "label_bytes", "load_domain_labels", "build_report"]


def build_report(*args, **kwargs):
    """Write the HTML + JSON + PNG routing report of a checkpoint (see :func:`moekit.analysis.report.build_report`)."""
    from .report import build_report as _build

    return _build(*args, **kwargs)
