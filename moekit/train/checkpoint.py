"""Checkpoints: tensors in safetensors, everything else in JSON; nothing is ever loaded with pickle.

A checkpoint is a folder::

    model.safetensors       model weights (tied weights stored once)
    optimizer.safetensors   AdamW moments and step counts, keyed "<param index>.<name>"
    trainer.json            format marker, model and training configs, step, RNG state, extra state

Saving is atomic at the folder level: the new checkpoint is written to ``<dir>.tmp``, the old one is moved to
``<dir>.old``, the new one is renamed into place, and only then is the old one deleted. A crash at any point
leaves either the new or the previous checkpoint loadable (``load_checkpoint`` falls back to ``<dir>.old``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "moekit-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, corrupt, or not a moekit checkpoint."""


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied tensors (safetensors refuses shared storage)."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state into tensors (for safetensors) and JSON-able hyperparameters."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"{idx}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically (see module docstring). ``meta`` must be JSON-able."""
    files = {"model.safetensors": _unique_state_dict(model)}
    extra = {}
    if optimizer is not None:
        files["optimizer.safetensors"], extra["optimizer"] = optimizer_tensors(optimizer)
    return write_checkpoint(path, files, {**meta, **extra})


def write_checkpoint(path: str | Path, files: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
    """Atomically write a checkpoint folder: each ``files`` entry as a safetensors file, ``meta`` as trainer.json
    (with the format marker). ``save_checkpoint`` uses it; converters that have tensors but no model do too."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, tensors in files.items():
        save_file(tensors, tmp / name, metadata={"format": FORMAT})
    _write_json(tmp / "trainer.json", {"format": FORMAT, "version": VERSION, **meta})
    _fsync_dir(tmp)
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(meta, model tensors, optimizer tensors or None)`` of a checkpoint folder, validated.

    Falls back to ``<path>.old`` when a save was interrupted between its two renames.
    """
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: expected a folder written by `moekit train` "
                              "(with model.safetensors and trainer.json)")
    meta_file = path / "trainer.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a moekit checkpoint: trainer.json is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e}); restore it or train again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a moekit checkpoint (trainer.json has no format '{FORMAT}')")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer moekit (format version {meta['version']}); upgrade")
    model = _load_tensors(path / "model.safetensors")
    opt = _load_tensors(path / "optimizer.safetensors") if (path / "optimizer.safetensors").exists() else None
    return meta, model, opt


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {file} is corrupt or not safetensors ({e})") from None


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Load weights strictly, allowing only the omitted second names of tied tensors; clear errors otherwise."""
    own = model.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise CheckpointError(f"{where} has tensors this model does not: {unexpected[:5]} "
                              "(does the checkpoint's config match the model?)")
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(own[name].shape)}")
    missing = set(own) - set(tensors)
    tied = {n for n in missing if _is_tied(model, n)}
    if missing - tied:
        raise CheckpointError(f"{where} lacks tensors {sorted(missing - tied)[:5]}")
    model.load_state_dict(tensors, strict=False)


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    target = model.state_dict()[name]
    return any(other is not name and t.data_ptr() == target.data_ptr() and t.shape == target.shape
               for other, t in model.state_dict().items() if other != name)


def _write_json(file: Path, obj: Any) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
