"""Text in and out of a checkpoint for ``moekit generate``: bytes for moekit's byte-level models, the checkpoint's
own tokenizer (read locally with transformers) for models converted from Hugging Face.

A :class:`TextCodec` encodes the prompt and turns streamed token ids into text as soon as it is complete (whole
UTF-8 characters for bytes; the newly decoded suffix for tokenizers, held back while it ends in a partial character).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class TextCodec:
    """Encode prompts and decode streamed tokens for one checkpoint."""

    def __init__(self, tokenizer: Any | None = None, stop_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids or []
        self._tokens: list[int] = []
        self._shown = 0
        self._pending = bytearray()

    @property
    def kind(self) -> str:
        return "bytes" if self.tokenizer is None else "tokenizer"

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return list(self.tokenizer(text)["input_ids"])

    def start(self, prompt: list[int]) -> str:
        """Begin a continuation of ``prompt``; returns the prompt's text (decoded as the model sees it)."""
        if self.tokenizer is None:
            self._pending = bytearray()
            return bytes(prompt).decode("utf-8", errors="replace")
        self._tokens = list(prompt)
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        self._shown = len(text)
        return text

    def push(self, token: int) -> str:
        """Text completed by ``token`` (maybe empty)."""
        if self.tokenizer is None:
            self._pending.append(token)
            try:
                text = self._pending.decode("utf-8")
            except UnicodeDecodeError:
                if len(self._pending) < 4:
                    return ""
                text = self._pending.decode("utf-8", errors="replace")
            self._pending.clear()
            return text
        if token in self.stop_ids:
            return ""
        self._tokens.append(token)
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self._shown = text[self._shown:], len(text)
        return new

    def flush(self) -> str:
        """Whatever is still held back at the end."""
        if self.tokenizer is None:
            text, self._pending = self._pending.decode("utf-8", errors="replace"), bytearray()
            return text
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        new, self._shown = text[self._shown:], len(text)
        return new


def load_codec(ckpt: str | Path, meta: dict, vocab_size: int) -> TextCodec | None:
    """The codec of a checkpoint: its tokenizer if it has one, bytes for a 256-token model, else ``None`` (the
    caller must then take token ids)."""
    ckpt = Path(ckpt)
    stop = _stop_ids(ckpt, meta)
    if any((ckpt / f).is_file() for f in TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(f"{ckpt} has a Hugging Face tokenizer; reading it needs transformers "
                             "(pip install 'moekit[hf]'), or pass --prompt-ids") from None
        return TextCodec(AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True), stop)
    if vocab_size == 256 and not meta.get("hf"):
        return TextCodec(None, stop)
    return None


def _stop_ids(ckpt: Path, meta: dict) -> list[int]:
    """End-of-sequence ids from generation_config.json, else from the Hugging Face config the model came from."""
    eos = None
    gen = ckpt / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            eos = None
    if eos is None:
        eos = ((meta.get("hf") or {}).get("config") or {}).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
