"""Process-level helpers."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_TUNED = False


def cache_root() -> Path:
    """Where moekit caches derived files (tokenised corpora, compiled CPU kernels): ``$MOEKIT_CACHE``, else
    ``$XDG_CACHE_HOME/moekit``, else ``~/.cache/moekit``."""
    base = os.environ.get("MOEKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moekit")
    return Path(base)


def tune_cpu_allocator(mmap_threshold: int = 2**30, trim_threshold: int = 2**31 - 1) -> bool:
    """Make glibc keep freed large blocks for reuse instead of returning them to the kernel.

    PyTorch's CPU allocator hands big tensors straight to ``malloc``; glibc serves blocks above 32 MiB with a fresh
    ``mmap``, so every training step page-faults its weight gradients and activations in again (on a VM that can
    cost more than the math). Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps that memory in the heap.
    The process's resident memory then stays near its peak. Returns True if applied (glibc on Linux only).
    """
    global _TUNED
    if _TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    _TUNED = ok
    return ok


def dataclass_from_dict(cls, d):
    """``cls(**d)`` for a config dataclass, refusing a non-dict or unknown keys with an error that lists the known
    ones (missing keys take their defaults; the dict is deep-copied, so the config never aliases it)."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return cls(**copy.deepcopy(d))


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)`` for any device type: False where it has no autocast (``meta``,
    where PyTorch's own check raises)."""
    import torch

    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def no_autocast(device_type: str):
    """A context with autocast off on ``device_type``: an empty one where autocast is off already or the device has
    none (e.g. ``meta``), since entering a disabled ``torch.autocast`` costs ~5-10 us a call."""
    import contextlib

    import torch

    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


_FROZEN_WARNED: set[str] = set()


def in_backward_pass() -> bool:
    """Whether this code runs inside an autograd backward pass (e.g. activation checkpointing recomputing a
    forward there)."""
    import torch

    return torch._C._current_graph_task_id() != -1


def state_frozen(what: str) -> bool:
    """Whether training state (a buffer a forward updates in place: ``what``) must be left as it is, because a
    ``torch.func`` transform (``vmap``, ``grad``, ``jvp``...) is running: the values computed there are its wrapper
    tensors (under ``vmap`` one per sample), which may neither leave it nor be written into a tensor from outside it.
    Warns once per ``what``. Also (without a warning) where a forward runs inside a backward pass: activation
    checkpointing's recomputation of a forward whose state updates were made already. Never while ``torch.compile``
    traces."""
    import torch

    if torch.compiler.is_compiling():
        return False
    if in_backward_pass():  # (a forward recomputed in backward)
        return True
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    import logging

    if what not in _FROZEN_WARNED:
        _FROZEN_WARNED.add(what)
        logging.getLogger("moekit").warning(
            "%s is not updated inside a torch.func transform (vmap, grad...): its values there cannot leave the "
            "transform. A forward outside it (e.g. under torch.no_grad() in training mode) updates it", what)
    return True


def grads_by_reference(reference, inputs: tuple, needs: tuple, grad_outputs: tuple) -> tuple:
    """The backward of a custom autograd Function where its own cannot serve: a pass that builds a graph of the
    gradients (``create_graph=True``: double backward), whose own backward is not differentiable (kernels, saved
    intermediates), or a second pass through the same graph (``retain_graph=True``, e.g. ``gradcheck``) after its
    own freed what it kept. The gradients of ``reference(*inputs)`` (the same outputs in PyTorch's operations; a
    tensor or a tuple, matched with ``grad_outputs``, None where no gradient arrives) with respect to the ``inputs``
    that ``needs`` marks, their graph built where grad mode is on (in a ``create_graph=True`` pass), so that a
    second backward differentiates them. Returns one entry per input (None where not needed)."""
    import torch

    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # (each input through a view of its own: the gradient with respect to it is then the partial derivative, not
        # the total one, which would also follow one input's history into another's, e.g. the routing weights' into
        # the tokens; its graph still reaches the input)
        inputs = tuple(None if t is None else t.view_as(t) for t in inputs)
        outs = reference(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    wrt = [t for t, need in zip(inputs, needs) if need]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=create_graph,
                                   allow_unused=True) if pairs and wrt else [None] * len(wrt))
    return tuple(next(got) if need else None for need in needs)


def acc_dtype(*dtypes) -> torch.dtype:
    """The dtype sums, router logits and balancing losses are computed in for tensors of ``dtypes``: float64 where
    any is float64, else float32 (bf16 and fp16 layers too)."""
    import torch

    return torch.float64 if torch.float64 in dtypes else torch.float32
