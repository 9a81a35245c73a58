"""Training: byte-level data, the trainer, checkpoints, and the MoE-vs-dense comparison."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import Corpus, DataError, decode, encode, prepare_corpus
from .trainer import TRAIN_PRESETS, Trainer, TrainConfig, load_lm, read_metrics

__all__ = ["Corpus", "DataError", "prepare_corpus", "encode", "decode", "Trainer", "TrainConfig", "TRAIN_PRESETS",
           "load_lm", "read_metrics", "CheckpointError", "load_checkpoint", "save_checkpoint"]
