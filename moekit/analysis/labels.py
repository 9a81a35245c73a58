"""Per-byte labels for routing analysis: token classes (what kind of text a byte is part of) and domains (which part
of the corpus it comes from).

Token classes. One vocabulary of 12 classes, :data:`CLASS_NAMES`:

- Python source (files ending in ``.py`` that Python's own :mod:`tokenize` accepts): ``keyword``, ``identifier``,
  ``number``, ``string literal`` (docstrings and f-strings included), ``comment``, ``whitespace/indent`` (spaces,
  tabs, newlines, indentation) and ``operator/punct`` (operators, brackets, a line-continuation backslash).
- Any other text, and ``.py`` files that do not tokenize: byte classes ``letter`` (ASCII A-Z a-z), ``digit``,
  ``space`` (space, tab, newline, CR, FF, VT), ``punctuation`` (every other ASCII byte) and ``non-ASCII`` (bytes of
  multi-byte UTF-8 characters).

``tokenize`` reports (row, column) in *characters*; the columns are mapped to UTF-8 byte offsets, so every byte of a
multi-byte character gets the class of the token that contains it.

Domains. By default a file's domain is the one ``meta.json`` records (its top-level folder or package, e.g.
``json/decoder.py`` → ``json``). A *domain label file* overrides it: a JSON object whose keys are file paths as
``meta.json`` lists them (relative to the data folder) or ``fnmatch`` glob patterns, and whose values are labels::

    {"email/*": "mail", "http/*": "web", "urllib/*": "web", "*.md": "docs"}

The first key (in file order) that matches a path wins (``*`` also matches ``/``); unmatched files keep their
default domain. A key that
matches no file of the corpus is an error (it is almost always a typo).
"""

from __future__ import annotations

import io
import json
import keyword
import tokenize
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

PY_CLASSES = ("keyword", "identifier", "number", "string literal", "comment", "whitespace/indent", "operator/punct")
BYTE_CLASSES = ("letter", "digit", "space", "punctuation", "non-ASCII")
CLASS_NAMES = PY_CLASSES + BYTE_CLASSES
(KEYWORD, IDENTIFIER, NUMBER, STRING, COMMENT, WHITESPACE, OPERATOR,
 LETTER, DIGIT, SPACE, PUNCT, NON_ASCII) = range(len(CLASS_NAMES))


class LabelError(ValueError):
    """A domain label file that is missing, malformed or does not fit the corpus."""


# ------------------------------------------------------------------------------------------- byte classes
def _byte_lut() -> np.ndarray:
    lut = np.full(256, PUNCT, dtype=np.uint8)
    lut[0x80:] = NON_ASCII
    for lo, hi in ((ord("a"), ord("z")), (ord("A"), ord("Z"))):
        lut[lo:hi + 1] = LETTER
    lut[ord("0"):ord("9") + 1] = DIGIT
    lut[list(b" \t\n\r\f\v")] = SPACE
    return lut


_BYTE_LUT = _byte_lut()


def byte_classes(raw: bytes) -> np.ndarray:
    """Class id per byte (``letter``, ``digit``, ``space``, ``punctuation``, ``non-ASCII``), uint8 ``[len(raw)]``."""
    return _BYTE_LUT[np.frombuffer(raw, dtype=np.uint8)]


# ----------------------------------------------------------------------------------------- Python classes
def _char_to_byte(text: str, n_bytes: int) -> np.ndarray | None:
    """``offset[i]`` = byte offset of character ``i`` (with ``offset[len(text)] = n_bytes``); None if all ASCII."""
    if len(text) == n_bytes:
        return None
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate(([0], np.cumsum(width)))


def python_classes(raw: bytes) -> np.ndarray | None:
    """Class id per byte of Python source from :mod:`tokenize`, or ``None`` if the text does not tokenize.

    Bytes between tokens are ``whitespace/indent`` (or ``operator/punct`` for a continuation backslash)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    ws = np.frombuffer(b" \t\n\r\f\v", dtype=np.uint8)
    out = np.where(np.isin(np.frombuffer(raw, dtype=np.uint8), ws), WHITESPACE, OPERATOR).astype(np.uint8)
    line_start = [0]  # character offset of each line, split exactly as tokenize's readline splits (on "\n")
    for line in io.StringIO(text, newline="\n"):
        line_start.append(line_start[-1] + len(line))
    to_byte = _char_to_byte(text, len(raw))
    spans: list[tuple[int, int, int]] = []
    fstring_starts: list[int] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text, newline="\n").readline):
            kind = _token_class(tok)
            (r0, c0), (r1, c1) = tok.start, tok.end
            if r0 - 1 >= len(line_start) or r1 - 1 >= len(line_start):
                continue  # ENDMARKER / trailing DEDENT past the last line
            a, b = line_start[r0 - 1] + c0, line_start[r1 - 1] + c1
            name = tokenize.tok_name[tok.type]
            if name == "FSTRING_START":  # Python >= 3.12 splits f-strings into tokens: paint the whole literal
                fstring_starts.append(a)
            elif name == "FSTRING_END" and fstring_starts:
                spans.append((fstring_starts.pop(), b, STRING))
            elif kind is not None and b > a:
                spans.append((a, b, kind))
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    # an f-string's span is appended at its FSTRING_END, after the tokens inside it, so it paints over them
    for a, b, kind in spans:
        if to_byte is not None:
            a, b = int(to_byte[a]), int(to_byte[b])
        out[a:b] = kind
    return out


def _token_class(tok: tokenize.TokenInfo) -> int | None:
    name = tokenize.tok_name[tok.type]
    if name == "NAME":
        return KEYWORD if keyword.iskeyword(tok.string) else IDENTIFIER
    if name == "NUMBER":
        return NUMBER
    if name in ("STRING", "FSTRING_MIDDLE"):
        return STRING
    if name == "COMMENT":
        return COMMENT
    if name in ("NEWLINE", "NL", "INDENT", "DEDENT"):
        return WHITESPACE
    if name == "OP":
        return OPERATOR
    if name == "ERRORTOKEN":  # a stray character such as "$" or "?": whitespace if blank, else punctuation
        return WHITESPACE if tok.string.isspace() else OPERATOR
    return None  # ENCODING, ENDMARKER, TYPE_COMMENT ...


def label_bytes(raw: bytes, path: str = "") -> tuple[np.ndarray, str]:
    """``(class id per byte, scheme)``: ``"python"`` for ``.py`` files that tokenize, else ``"bytes"``."""
    if path.endswith(".py"):
        classes = python_classes(raw)
        if classes is not None:
            return classes, "python"
    return byte_classes(raw), "bytes"


# ------------------------------------------------------------------------------------------------ domains
def load_domain_labels(path: str | Path) -> dict[str, str]:
    """Read a domain label file (see the module docstring): a JSON object ``{path or glob: label}``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LabelError(f"domain label file {p} does not exist; give a JSON file such as "
                         '{"email/*": "mail", "json/*": "data"}')
    try:
        mapping = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LabelError(f"domain label file {p} is not valid JSON ({e}); it must be an object "
                         'mapping file paths or glob patterns to labels, e.g. {"email/*": "mail"}') from None
    if not isinstance(mapping, dict) or not mapping:
        raise LabelError(f"domain label file {p} must hold a non-empty JSON object mapping file paths or glob "
                         f'patterns to labels, e.g. {{"email/*": "mail"}}; got {type(mapping).__name__}')
    bad = [k for k, v in mapping.items() if not isinstance(v, str) or not v]
    if bad:
        raise LabelError(f"domain label file {p}: the labels of {bad[:5]} are not non-empty strings")
    return mapping


def assign_domains(files: list[dict], mapping: dict[str, str] | None) -> list[str]:
    """Domain of each ``meta.json`` file record: the first matching key of ``mapping``, else its own domain."""
    if not mapping:
        return [f["domain"] for f in files]
    used: set[str] = set()
    out = []
    for f in files:
        label = f["domain"]
        for pattern, value in mapping.items():
            if f["path"] == pattern or fnmatchcase(f["path"], pattern):
                label = value
                used.add(pattern)
                break
        out.append(label)
    unused = [k for k in mapping if k not in used]
    if unused:
        example = ", ".join(f["path"] for f in files[:3])
        raise LabelError(f"domain labels {unused[:5]} match no file of the corpus; keys are paths relative to the "
                         f"data folder or glob patterns over them (e.g. {example})")
    return out
