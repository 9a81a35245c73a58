"""Byte-level text data: the default corpus (this interpreter's standard-library source) or the user's text.

``prepare_corpus(path, cache_dir)`` reads a text file or a folder of text files (default: every ``*.py`` of the
standard library, tests excluded), splits it into train and validation *by file* (deterministically, from a hash of
each file's relative path), and caches the bytes as ``train.bin``/``val.bin`` plus ``meta.json``. The cache is reused
while the source files are unchanged (same names, sizes and modification times) and is read memory-mapped.

``meta.json`` also lists every file's byte span and *domain* (its top-level folder or package), which the routing
analysis uses to ask which experts serve which part of the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

CACHE_VERSION = 1
VAL_FRACTION = 0.05  # share of files (by hash) held out for validation
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """Training data that is missing, empty, unreadable or too small."""


def encode(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as token ids (0..255)."""
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Token ids back to text (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# ------------------------------------------------------------------------------------------------ files
def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath) / name)
    return files


def _user_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        files.extend(Path(dirpath) / n for n in sorted(filenames) if not n.startswith("."))
    return files


def _is_val(rel: str) -> bool:
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "little")
    return (h % 10_000) < VAL_FRACTION * 10_000


def _domain(rel: str) -> str:
    """Top-level folder, or the module name for a file at the top (``json/decoder.py`` → ``json``)."""
    first = rel.split("/", 1)[0]
    return first[:-3] if first.endswith(".py") else first


@dataclass
class Corpus:
    """Token arrays (uint8, memory-mapped) of a prepared corpus and its metadata (``meta.json``)."""

    root: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def num_tokens(self, split: str) -> int:
        return int(self.split(split).shape[0])

    def files(self, split: str | None = None) -> list[dict]:
        """``{"path", "domain", "split", "start", "end"}`` per source file (byte offsets into its split)."""
        return [f for f in self.meta["files"] if split is None or f["split"] == split]


def _fingerprint(source: str, files: list[Path], base: Path) -> str:
    h = hashlib.sha1(f"{CACHE_VERSION}|{source}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(base) if f != base else f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def prepare_corpus(path: str | Path | None, cache_dir: str | Path, min_tokens: int = 1024) -> Corpus:
    """Build (or reuse) the token cache of ``path`` (a text file or folder; ``None`` = the stdlib source)."""
    if path is None:
        base, files, source = stdlib_root(), None, "stdlib"
        if not base.is_dir():
            raise DataError(f"the standard library source folder {base} does not exist; pass --data PATH")
        files = _stdlib_files(base)
    else:
        base = Path(path).expanduser()
        if not base.exists():
            raise DataError(f"data path {base} does not exist; give a text file or a folder of text files")
        if not (base.is_file() or base.is_dir()):
            raise DataError(f"data path {base} is neither a file nor a folder")
        files, source = _user_files(base), str(base.resolve())
    if not files:
        raise DataError(f"no files found under {base}; give a text file or a folder that contains text files")
    try:
        fingerprint = _fingerprint(source, files, base)
    except OSError as e:
        raise DataError(f"cannot read {e.filename}: {e.strerror}") from None
    cache = Path(cache_dir)
    meta_file = cache / "meta.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("fingerprint") == fingerprint:
                return _open(cache, meta)
        except (OSError, ValueError, KeyError):
            pass  # a broken cache is rebuilt below
    return _build(base, files, source, fingerprint, cache, min_tokens)


def _build(base: Path, files: list[Path], source: str, fingerprint: str, cache: Path, min_tokens: int) -> Corpus:
    chunks: dict[str, list[bytes]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    records, skipped = [], []
    single = base.is_file()
    for f in files:
        rel = f.name if single else f.relative_to(base).as_posix()
        try:
            raw = f.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror}") from None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)  # binary or non-UTF-8 file in a folder: not text
            continue
        if not raw:
            continue
        split = "val" if (not single and _is_val(rel)) else "train"
        records.append({"path": rel, "domain": _domain(rel) if not single else "text", "split": split,
                        "start": sizes[split], "end": sizes[split] + len(raw)})
        chunks[split].append(raw)
        sizes[split] += len(raw)
    if single and skipped:
        raise DataError(f"{base} is not UTF-8 text; give a text file")
    if sum(sizes.values()) == 0:
        raise DataError(f"{base} holds no text (every file is empty or not UTF-8); give a text file or folder")
    if sizes["val"] == 0 or sizes["train"] == 0:
        _split_last(records, chunks, sizes)
    if sizes["train"] < min_tokens or sizes["val"] < min_tokens // 8:
        raise DataError(f"{base} holds only {sum(sizes.values()):,} bytes of text; need at least "
                        f"{min_tokens + min_tokens // 8:,} to train and validate")
    cache.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "source": source, "tokens": sizes,
            "files": records, "skipped_non_text": skipped[:100], "num_skipped_non_text": len(skipped)}
    for split in ("train", "val"):
        tmp = cache / f"{split}.bin.tmp"
        with open(tmp, "wb") as fh:
            for c in chunks[split]:
                fh.write(c)
        os.replace(tmp, cache / f"{split}.bin")
    tmp = cache / "meta.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, cache / "meta.json")  # written last: a cache without meta.json is never trusted
    return _open(cache, meta)


def _split_last(records: list[dict], chunks: dict[str, list[bytes]], sizes: dict[str, int]) -> None:
    """Too few files for a split by file: move the last 10% of all bytes (ending the last file) to validation."""
    data = b"".join(chunks["train"] + chunks["val"])
    files = sorted(records, key=lambda r: (r["split"] != "train", r["start"]))
    cut = len(data) - max(1, len(data) // 10)
    out, pos = [], 0
    for r in files:
        n = r["end"] - r["start"]
        if pos < cut < pos + n:  # this file straddles the cut: split it in two
            out.append({**r, "split": "train", "start": pos, "end": cut})
            out.append({**r, "split": "val", "start": 0, "end": pos + n - cut})
        elif pos >= cut:
            out.append({**r, "split": "val", "start": pos - cut, "end": pos + n - cut})
        else:
            out.append({**r, "split": "train", "start": pos, "end": pos + n})
        pos += n
    records[:] = out
    chunks["train"], chunks["val"] = [data[:cut]], [data[cut:]]
    sizes["train"], sizes["val"] = cut, len(data) - cut


def _open(cache: Path, meta: dict) -> Corpus:
    arrays = {}
    for split in ("train", "val"):
        f = cache / f"{split}.bin"
        n = meta["tokens"][split]
        if not f.is_file() or f.stat().st_size != n:
            raise DataError(f"token cache {f} is missing or truncated; delete {cache} to rebuild it")
        arrays[split] = np.memmap(f, dtype=np.uint8, mode="r", shape=(n,))
    return Corpus(cache, meta, arrays["train"], arrays["val"])


# ---------------------------------------------------------------------------------------------- batches
def _rows(data: np.ndarray, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    block = np.stack([np.asarray(data[s:s + seq_len + 1]) for s in starts]).astype(np.int64)
    block_t = torch.from_numpy(block)
    return block_t[:, :-1], block_t[:, 1:]


def _check_len(corpus: Corpus, split: str, seq_len: int) -> int:
    n = corpus.num_tokens(split)
    if n < seq_len + 1:
        raise DataError(f"the {split} split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        "use a shorter seq_len or more text")
    return n


def get_batch(corpus: Corpus, split: str, batch_size: int, seq_len: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs ``[B, L]`` and next-byte targets ``[B, L]`` (int64), drawn with ``generator``."""
    n = _check_len(corpus, split, seq_len)
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator).tolist()
    return _rows(corpus.split(split), starts, seq_len)


def iter_eval_batches(corpus: Corpus, split: str, batch_size: int, seq_len: int,
                      num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same evenly spaced windows every time (a fixed evaluation set spread over the whole split)."""
    n = _check_len(corpus, split, seq_len)
    total = batch_size * num_batches
    starts = np.linspace(0, n - seq_len - 1, total).astype(np.int64).tolist()
    for b in range(num_batches):
        yield _rows(corpus.split(split), starts[b * batch_size:(b + 1) * batch_size], seq_len)
