"""Hugging Face checkpoint folders on disk: ``config.json`` + safetensors (one file, or shards with an index).

Only safetensors are ever read: a folder that holds only pickled weights (``pytorch_model.bin``, ``*.pt``...) is
refused with an explanation, never opened. Tensors are read lazily, one at a time, and every problem (missing or
corrupt shard, a tensor the index promises but the shard lacks) is a :class:`HFCheckpointError` naming the file and
the tensor.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")
#: Files copied along with the weights (tokenizer and generation defaults), when present.
SIDECARS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
            "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint folder that is missing, incomplete, corrupt or not what moekit can read."""


def read_config(folder: str | Path) -> dict:
    """The ``config.json`` of a checkpoint folder, as a dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFCheckpointError(f"{folder} is not a folder; pass the folder that holds config.json and the "
                                "*.safetensors files (a local copy of the model; nothing is downloaded)")
    file = folder / "config.json"
    if not file.is_file():
        raise HFCheckpointError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFCheckpointError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


class SafetensorsFolder:
    """The tensors of a checkpoint folder: ``names()``, ``shape(name)``, ``dtype(name)`` (from the headers, without
    reading data) and ``get(name)``. Shards are opened once and validated on construction."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index = self.folder / INDEX
        if index.is_file():
            self._read_index(index)
        elif (self.folder / SINGLE).is_file():
            self._open(self.folder / SINGLE)
            self._where = {name: self.folder / SINGLE for name in self._handles[self.folder / SINGLE].keys()}
        else:
            others = sorted(p.name for p in self.folder.glob("*.safetensors"))
            pickles = [n for n in PICKLES if (self.folder / n).exists()] + sorted(
                p.name for p in self.folder.glob("*.bin"))
            if others:
                raise HFCheckpointError(f"{self.folder} has safetensors files {others[:4]} but neither {SINGLE} nor "
                                        f"{INDEX}; add the index that maps tensor names to these files")
            if pickles:
                raise HFCheckpointError(
                    f"{self.folder} holds only pickled weights ({', '.join(sorted(set(pickles)))}); moekit reads "
                    "safetensors only, because unpickling can run arbitrary code. In an environment you trust, "
                    "re-save them: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out)")
            raise HFCheckpointError(f"{self.folder} has no {SINGLE} or {INDEX}: no weights to read")

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); it must "
                                    'be {"weight_map": {"tensor name": "shard file", ...}}') from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index} has an empty or malformed weight_map")
        for shard in sorted(set(weight_map.values())):
            path = self.folder / str(shard)
            if not path.is_file():
                names = sorted(n for n, s in weight_map.items() if s == shard)
                raise HFCheckpointError(f"shard {shard} is missing from {self.folder} (the index maps {len(names)} "
                                        f"tensors to it, e.g. {names[0]}); copy the complete checkpoint")
            self._open(path)
        for name, shard in weight_map.items():
            path = self.folder / str(shard)
            if name not in self._handles[path].keys():
                raise HFCheckpointError(f"tensor {name} is listed in {INDEX} under {shard}, but that shard does not "
                                        "contain it; the shard or the index is from another checkpoint")
            self._where[name] = path

    def _open(self, path: Path) -> None:
        try:
            self._handles[path] = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise HFCheckpointError(f"shard {path.name} in {self.folder} is corrupt or truncated ({e}); "
                                    "download or copy it again") from None

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype code (``F32``, ``BF16``, ``I64``...)."""
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise HFCheckpointError(f"tensor {name} is not in the checkpoint at {self.folder}")
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise HFCheckpointError(f"tensor {name} in {self._where[name].name} cannot be read ({e}); the shard "
                                    "is corrupt") from None


def write_folder(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor],
                 max_shard_bytes: int | None = None) -> list[Path]:
    """Write ``config.json`` and the tensors as ``model.safetensors``, or as shards plus an index when they exceed
    ``max_shard_bytes``. Returns the weight files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    total = sum(sizes.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / SINGLE), metadata={"format": "pt"})
        return [folder / SINGLE]
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += sizes[name]
    width = max(5, int(math.log10(len(shards))) + 1)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:0{width}d}-of-{len(shards):0{width}d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
        files.append(folder / file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty output folder unless asked to."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HFCheckpointError(f"{out} already exists and is not empty; choose another output folder or pass "
                                "overwrite=True (--overwrite) to replace it")


@contextmanager
def new_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside ``out`` that replaces ``out`` only when the block completes."""
    out = Path(out)
    check_out(out, overwrite)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
