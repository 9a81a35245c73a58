"""Language models built from moekit layers: a decoder-only transformer LM (MoE or dense FFNs)."""

from .config import PRESETS, LMConfig, get_preset
from .model import KVCache, TransformerLM, sample_next

__all__ = ["LMConfig", "PRESETS", "get_preset", "TransformerLM", "KVCache", "sample_next"]
