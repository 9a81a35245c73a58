"""moekit's CPU kernels (``csrc/moe_cpu.c`` and the parts it includes, ``csrc/*.h``): the experts' grouped GEMMs
(projections, data and weight gradients) with their epilogues fused, routing, decode and few-token training steps
in one call each, gather, weighted scatter-add and SwiGLU forward/backward.

PyTorch runs the memory-bound steps as several elementwise passes (and its ``index_add_`` on one thread), and a
library GEMM per expert pays call overhead and small-M blocking on the few rows of an expert; here each step is one
pass, on PyTorch's own OpenMP threads.

The C source (one translation unit) is compiled on first use with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``) with ``-O3 -march=native -fopenmp``, cached in ``kernels/`` of moekit's cache folder
(``$MOEKIT_CACHE``, default ``~/.cache/moekit``) by a hash of the sources, the compiler, the flags and the CPU, and
loaded with ctypes: no PyTorch headers, one build of ~17 s (2 Zen 3 cores) per source, compiler, flags and CPU.
Where no compiler works, or with ``MOEKIT_CPU_KERNELS=0``, :func:`library` returns None and callers use PyTorch ops
(same results up to rounding; slower). Every wrapper checks its tensors (device, dtype, layout, shapes) and raises
``ValueError`` naming the problem; it never reads out of bounds.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.autograd.forward_ad as _forward_ad

from ..utils import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "moe_cpu.c"  # includes the parts beside it, csrc/*.h
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-std=c11", "-Wall"]
#: ``MOEKIT_CPU_ISA``: the vector code paths to build (default ``native``, the best this CPU has: AVX-512 with
#: AVX512-BF16, AVX-512, AVX2 + FMA, or plain C). ``avx2`` or ``generic`` build a lesser path on a better CPU, which
#: the tests use to check every path the machine can run.
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "generic": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_LIB: ctypes.CDLL | None = None
_TRIED = False
_WHY_NOT: str | None = None
_AMX = False  # the bf16 projections run on AMX tiles (see amx())


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    return None


def _flags_line() -> str | None:
    """The ``flags`` line of /proc/cpuinfo, or None where there is none to read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((ln for ln in text.splitlines() if ln.startswith("flags")), "")


def _cpu_id() -> str:
    line = _flags_line()
    return (platform.machine() if line is None else line) + platform.processor()


def vector_isa() -> str:
    """``"avx512"``, ``"avx2"`` (with FMA) or ``"other"``: which vector code path of the kernels this CPU runs."""
    flags = set((_flags_line() or "").split())
    return "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "other"


def cache_dir() -> Path:
    return cache_root() / "kernels"


def isa() -> str:
    name = os.environ.get("MOEKIT_CPU_ISA", "native")
    if name not in ISA_FLAGS:
        raise ValueError(f"MOEKIT_CPU_ISA must be one of {', '.join(ISA_FLAGS)}, got {name!r}")
    return name


def _source_text() -> str:
    """The translation unit's files (moe_cpu.c and every part beside it), names and contents, for the build's key."""
    files = sorted(p for p in SOURCE.parent.iterdir() if p.suffix in (".c", ".h"))
    return "\0".join(f"{p.name}\0{p.read_text()}" for p in files)


def _build(cc: str) -> Path:
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = FLAGS + ISA_FLAGS[isa()]
    key = hashlib.sha256("\0".join([_source_text(), cc, version, " ".join(flags), _cpu_id()]).encode())
    out = cache_dir() / f"moe_cpu-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        proc = subprocess.run([*cc.split(), *flags, "-o", str(tmp_so), str(SOURCE), "-lm"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp_so, out)  # atomic: a concurrent build of the same key writes the same file
    return out


def bypassed() -> bool:
    """Whether PyTorch must see every operation, so that no kernel is called: while ``torch.compile`` traces (a
    kernel call is no operation a compiled graph can hold; a layer runs eagerly inside compiled code where it may,
    see :meth:`moekit.MoE.forward`), while a Python dispatch mode is active (``FlopCounterMode``, which would not
    see a kernel's work, ``FakeTensorMode``, whose tensors hold no data, ``DebugMode``...), inside a ``torch.func``
    transform or under forward-mode AD (:func:`plain_ops_only`) and inside :func:`bypass` (a layer's forward on
    tensor subclasses). Callers take PyTorch's operations then, or moekit's own operators, which such a mode or
    subclass sees as one call each."""
    # (plain_ops_only() written out: this runs a few times in every forward)
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 or \
        _forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None or \
        _LOCAL.__dict__.get("bypass", False)


def plain_ops_only(batching_ok: bool = False) -> bool:
    """Whether only PyTorch's own operations may run: inside a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``,
    ``jacrev``...: its tensors are wrappers without storage, and it follows neither the kernels nor moekit's custom
    operators' autograd) or under forward-mode AD (``torch.autograd.forward_ad``: a kernel would drop the tangents).
    ``batching_ok``: an operator without derivatives is fine under ``vmap`` alone (PyTorch runs it per sample).
    Never while ``torch.compile`` traces (whose tracing runs under transforms of its own: see :func:`bypassed`)."""
    if torch.compiler.is_compiling():
        return False
    if _forward_ad._current_level >= 0:
        return True
    top = torch._C._functorch.peek_interpreter_stack()
    return top is not None and not (batching_ok and top.key() == torch._C._functorch.TransformType.Vmap)


def vmapping() -> bool:
    """Whether a ``torch.func.vmap`` transform is on the stack, at any level (``vmap(grad(f))`` too): tensors then
    hold a batch of samples each, so an operation whose output's shape depends on the data (``torch.where(mask)``,
    ``.tolist()``) cannot run; never while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():  # (first: Dynamo cannot trace get_interpreter_stack)
        return False
    stack = torch._C._functorch.get_interpreter_stack()
    return stack is not None and any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack)


def forward_ad() -> bool:
    """Whether forward-mode AD runs (``torch.autograd.forward_ad``'s dual level, or ``torch.func.jvp``), never while
    ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return False
    top = torch._C._functorch.peek_interpreter_stack()
    return _forward_ad._current_level >= 0 or (top is not None and top.key() == torch._C._functorch.TransformType.Jvp)


_LOCAL = threading.local()
#: the tensor types the kernels read (:func:`plain`)
PLAIN = (torch.Tensor, torch.nn.Parameter)


@contextlib.contextmanager
def bypass(on: bool = True):
    """No kernel called inside (:func:`bypassed`), in this thread; ``on=False``: kernels allowed again inside (an
    operator's implementation, on the plain tensors a subclass passed it)."""
    before = _LOCAL.__dict__.get("bypass", False)
    _LOCAL.bypass = on
    try:
        yield
    finally:
        _LOCAL.bypass = before


def plain(*tensors: torch.Tensor | None) -> bool:
    """Whether each of ``tensors`` (None skipped) is a plain tensor or parameter: a tensor subclass (a wrapper such
    as DTensor or a quantized weight, or one that logs or transforms operations) has its own dispatch, which a
    kernel call would go around, and a wrapper holds no data of its own to read."""
    return all(t is None or type(t) in PLAIN for t in tensors)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built here (see :func:`unavailable_reason`) or must not
    be called now (:func:`bypassed`)."""
    if bypassed():
        return None
    return _load()


def available() -> bool:
    """Whether the compiled kernels load here (built on first use), also while ``torch.compile`` traces."""
    return _load() is not None


# While tracing: run once, the answer a constant of the compiled code (what ``torch._dynamo.assume_constant_result``
# marks, set by hand: importing ``torch._dynamo`` for it would double the time ``import moekit`` takes).
available._dynamo_marked_constant = True


def _load() -> ctypes.CDLL | None:
    global _LIB, _TRIED, _WHY_NOT, _AMX
    if _TRIED:
        return _LIB
    _TRIED = True
    if os.environ.get("MOEKIT_CPU_KERNELS", "1") == "0":
        _WHY_NOT = "disabled by MOEKIT_CPU_KERNELS=0"
        return None
    cc = _compiler()
    if cc is None:
        _WHY_NOT = "no C compiler found (set $CC)"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
            _LIB = lib
            _AMX = bool(lib.moe_amx(int(os.environ.get("MOEKIT_CPU_AMX", "1") != "0")))
        except Exception as e:  # noqa: BLE001 - any build or load failure means "use the PyTorch ops"
            _WHY_NOT = f"could not build {SOURCE.name}: {e}"
    if _WHY_NOT:
        log.warning("moekit CPU kernels unavailable (%s); using PyTorch ops, which are slower", _WHY_NOT)
    return _LIB


def unavailable_reason() -> str | None:
    library()
    return _WHY_NOT


def reset() -> None:
    """Forget the loaded library (tests use it to switch the kernels off and on through the environment)."""
    global _LIB, _TRIED, _WHY_NOT, _AMX
    _LIB, _TRIED, _WHY_NOT, _AMX = None, False, None, False


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {
        "moe_gather_rows": [P, I, I64, P, P, I64, I64, P, I, I64, I],
        "moe_scatter_add_rows": [P, I64, P, I, I64, P, P, I64, I64, I],
        "moe_swiglu_fwd": [P, I64, P, I64, I64, I64, I, I],
        "moe_swiglu_bwd": [P, I64, P, I64, P, I64, I64, I, P, I64, P, I64, P, I],
        "moe_small_up": [P, I64, P, P, P, I64, P, P, I64, I64, I, I, P, P, I, I64, I64, I],
        "moe_small_down": [P, I64, I, P, P, P, P, I64, P, P, I64, I64, I, P, I64, I64, I],
        "moe_packed_tiles": [I],
        "moe_swapped_rows": [I, I],
        "moe_amx": [I],
        "moe_amx_up_packed": [P, I64, P, P, P, I64, P, P, I64, I64, P, P, I],
        "moe_amx_down_packed": [P, P, P, P, P, I64, P, P, I64, I64, P, I64, P, P, I64, I],
        "moe_row_flags": [P, I64, I64, P],
        "moe_small_decode": [P, I64, P, P, I64, I64, I64, P, P, P, P, I64, I64, I, P, I64, P, I64, I, ctypes.c_float,
                             ctypes.c_float, I],
        "moe_small_nn": [P, I, I64, P, P, I, I64, I64, P, P, I64, P, I, I64, P, I64, I],
        "moe_small_outer": [P, I, I64, P, P, I, I64, P, I64, I64, P, P, I64, P, I, I],
        "moe_zero_ranges": [P, P, P, I64, I],
        "moe_flush_cache": [P, I64, I],
        "moe_read_ranges": [P, P, I64, P, I],
        "moe_topk_rows": [P, I64, I64, I64, I64, P, I],
        "moe_router_logits": [P, I, I64, P, I, P, I64, I64, I64, P, I],
        "moe_softmax_topk": [P, I64, I64, I64, I64, P, I, ctypes.c_float, ctypes.c_float, P, P, P, I],
        "moe_sort_keys": [P, I64, I64, I64, P, P, P, P],
        "moe_route_decode": [P, I64, P, I, P, P, I64, I64, I64, I, ctypes.c_float, ctypes.c_float, P, P, P, P, P, P,
                             P, P, I64, I64, I, P, I, I64, P, I64, I, ctypes.c_float, ctypes.c_float, I],
        "moe_route_train_fwd": [P, I64, P, I, P, P, I64, I64, I64, I, ctypes.c_float, ctypes.c_float, P, P, P, P, P, P,
                                I64, I64, I, P, P, P, P, I64, P, I64, I64, I],
        "moe_route_train_bwd": [P, I, I64, P, I, P, P, I64, I64, I64, I, ctypes.c_float, ctypes.c_float, P, P, P, P, P,
                                P, I64, I64, I, P, P, P, P, P, I64, I64, I, P, P, I],
        "moe_route_train_bwd_in": [P, P, I64, P, I64, I64, I64, I, P, P, P, P, P, I, I64, I64, I],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int64 if name == "moe_row_flags" else ctypes.c_int
    lib.moe_scratch_stats.argtypes, lib.moe_scratch_stats.restype = [P], None
    lib.moe_scratch_reset_peak.argtypes, lib.moe_scratch_reset_peak.restype = [ctypes.c_int], None


# ------------------------------------------------------------------------------------------------ checks
def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _dt(t: torch.Tensor, name: str) -> int:
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32 or bfloat16, got {t.dtype}")
    return _DTYPES[t.dtype]


def _rows(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> int:
    """Check a CPU matrix of this shape whose rows are contiguous; return its row stride."""
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1) or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        raise ValueError(f"{name} must be a matrix with contiguous, non-overlapping rows, got strides {t.stride()}")
    return t.stride(0)


def _vector(t: torch.Tensor | None, name: str, n: int, dtype: torch.dtype) -> None:
    if t is None:
        return
    if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != (n,) or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU {dtype} vector of length {n}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _index(idx: torch.Tensor, name: str, m: int, bound: int) -> None:
    _vector(idx, name, m, torch.int64)
    if m and (int(idx.min()) < 0 or int(idx.max()) >= bound):
        raise ValueError(f"{name} has entries outside [0, {bound})")


def _call(fn, *args) -> None:
    rc = fn(*args)
    if rc != 0:
        raise RuntimeError(f"moekit CPU kernel {fn.__name__} returned {rc}: arguments the checks let through")


def _threads() -> int:
    return torch.get_num_threads()


def _require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"moekit CPU kernels are unavailable ({_WHY_NOT}); this op has no PyTorch fallback, check "
                           "small_gemm_usable() first")
    return lib


def _use_c(*tensors: torch.Tensor | None) -> bool:
    """The C kernels take CPU float32/bfloat16 matrices with contiguous rows; anything else runs in PyTorch."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype not in _DTYPES or t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            return False
    return library() is not None


def scratch_bytes(reset_peak: bool = False) -> tuple[int, int]:
    """``(held, peak)``: bytes of scratch the C kernels hold now and the most they held at once (since the library
    loaded, or since the last ``reset_peak=True``, which restarts the peak from what is held now; the counts are
    read first). This memory comes from the C allocator, so PyTorch's memory statistics and profiler never see it;
    the benchmark adds the peak to PyTorch's. ``(0, 0)`` where the kernels are unavailable."""
    lib = library()
    if lib is None:
        return 0, 0
    out = (ctypes.c_int64 * 3)()
    lib.moe_scratch_stats(out)
    if reset_peak:
        lib.moe_scratch_reset_peak(1)
    return int(out[0]), int(out[1])


#: Name prefix of the profiler events :func:`scratch_marks` records; the bytes follow it.
SCRATCH_MARK = "moekit_c_scratch:"


class _ScratchMarking:
    """The library as :func:`scratch_marks` hands it out: each kernel call is followed by a zero-length profiler
    event naming the most scratch it held at once, where it held any."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib

    def __getitem__(self, name: str):
        return self._lib[name]

    def __getattr__(self, name: str):
        fn = getattr(self._lib, name)
        if not name.startswith("moe_") or name.startswith("moe_scratch"):
            return fn
        lib = self._lib
        out = (ctypes.c_int64 * 3)()

        def call(*args):
            lib.moe_scratch_reset_peak(2)  # (the second mark: this call's own)
            rc = fn(*args)
            lib.moe_scratch_stats(out)
            if out[2]:
                with torch.profiler.record_function(f"{SCRATCH_MARK}{int(out[2])}"):
                    pass
            return rc

        call.__name__ = name
        return call


@contextlib.contextmanager
def scratch_marks():
    """Within the block, every call of a kernel that allocated scratch is followed by a profiler event named
    ``SCRATCH_MARK + str(bytes)``, ``bytes`` the most scratch it held at once (all of it is freed before the call
    returns): under ``torch.profiler.profile(profile_memory=True)`` it lands between the allocator's events, so a
    peak-memory reading can add each call's scratch to what PyTorch held at that moment (see
    :func:`moekit.benchmark.peak_alloc_mb`). Calls through function objects taken from the library before the block
    (a bound decode step's) are not marked; the global peak of :func:`scratch_bytes` still counts them."""
    global _LIB
    lib = library()
    if lib is None:
        yield
        return
    _LIB = _ScratchMarking(lib)
    try:
        yield
    finally:
        _LIB = lib


# --------------------------------------------------------------------------------------------- wrappers
# Each op runs the C kernel where it can and the equivalent PyTorch ops otherwise (same values up to rounding).
# ``check_index=False`` skips the bounds check of index vectors that moekit's own dispatcher produced.

def flush_from_cache(tensors) -> bool:
    """Evict these CPU tensors' memory from every cache level (x86 ``clflush``, on all of PyTorch's threads); False
    where that cannot be done here (no library, or not x86)."""
    lib = library()
    if lib is None:
        return False
    for t in tensors:
        if t.device.type != "cpu" or not t.numel():
            continue
        if lib.moe_flush_cache(t.data_ptr(), t.numel() * t.element_size(), _threads()) != 0:
            return False
    return True


def read_tensors(tensors) -> float:
    """Read every byte of these contiguous CPU float32/bfloat16 tensors once, the work split evenly among
    PyTorch's threads, and return the sum of their float32 words (a checksum, nothing more: it only ensures every
    read happens). Benchmarks time it as the floor of a step that must stream these bytes."""
    lib = _require()
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _DTYPES or t.numel() * t.element_size() % 4:
            raise ValueError(f"read_tensors takes contiguous CPU float32/bfloat16 tensors of whole 4-byte words, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    n = len(tensors)
    ptrs = (ctypes.c_void_p * max(n, 1))(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * max(n, 1))(*[t.numel() * t.element_size() for t in tensors])
    total = ctypes.c_double()
    _call(lib.moe_read_ranges, ptrs, sizes, n, ctypes.byref(total), _threads())
    return total.value


def zero_(t: torch.Tensor) -> torch.Tensor:
    """``t.zero_()``, with all threads and streaming stores for a large contiguous CPU tensor."""
    if t.device.type == "cpu" and t.is_contiguous() and t.numel() * t.element_size() >= 1 << 20 and \
            library() is not None:
        zero_rows(t.view(-1), [(0, t.numel())])
        return t
    return t.zero_()


def zero_rows(t: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """``t[s:s + n].zero_()`` for each ``(s, n)`` in ``runs`` (along dim 0 of a contiguous CPU tensor): all runs in
    one call of every thread, each an equal share of their bytes, with streaming stores (the idle experts'
    gradient blocks of a step)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"zero_rows needs a contiguous CPU tensor, got strides {t.stride()} on {t.device}")
    rows = t.shape[0] if t.dim() else 1
    if any(n < 0 or s < 0 or s + n > rows for s, n in runs):
        raise ValueError(f"zero_rows: runs {runs} reach outside the {rows} rows of the tensor")
    runs = [(s, n) for s, n in runs if n]
    if not runs:
        return t
    if library() is None:
        for s, n in runs:
            t[s:s + n].zero_()
        return t
    row = t.numel() // rows * t.element_size()  # bytes per index of dim 0 (rows > 0: a run is left)
    off = (ctypes.c_int64 * len(runs))(*(s * row for s, _ in runs))
    size = (ctypes.c_int64 * len(runs))(*(n * row for _, n in runs))
    _call(library().moe_zero_ranges, t.data_ptr(), ctypes.addressof(off), ctypes.addressof(size), len(runs),
          _threads())
    return t


#: Below this many scores PyTorch's own top-k is as fast (its per-call cost is small; the C kernel's edge is per row).
TOPK_MIN_SCORES = 1 << 15


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.topk(scores, k, dim=-1).indices`` for a [T, E] matrix of router scores (largest first). Large float32
    CPU batches run a C kernel (a partial insertion sort per row, ~5x faster than ``torch.topk`` at 8192 x 64); any
    NaN, or a tie among a row's k + 1 largest values, where the answer depends on tie-breaking, sends the whole
    batch to ``torch.topk`` so that ties resolve exactly as PyTorch resolves them."""
    if scores.dim() == 2 and scores.dtype == torch.float32 and scores.numel() >= TOPK_MIN_SCORES and \
            1 <= k <= min(64, scores.shape[1]) and _use_c(scores):
        T, E = scores.shape
        ids = torch.empty(T, k, dtype=torch.int64)
        rc = library().moe_topk_rows(scores.data_ptr(), scores.stride(0), T, E, k, ids.data_ptr(), _threads())
        if rc == 0:
            return ids
        if rc < 0:
            raise RuntimeError(f"moekit CPU kernel moe_topk_rows returned {rc}")
    return torch.topk(scores, k, dim=-1).indices


#: Routers with at most this many experts compute their float32 logits from a bfloat16 input in the C dot-product
#: kernel (:func:`router_logits`); with more, the product outweighs the input's float32 copy it saves (measured on 2
#: Sapphire Rapids cores, 8192 x 512 tokens: 8 experts 0.82 against 1.75 ms, 16 experts 1.77 / 1.82 ms, 64 experts
#: 6.0 against 3.8 ms), unless the AMX tiles take them.
ROUTER_LOGITS_MAX_EXPERTS = 16


def router_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ w.T + b`` in float32 for a bfloat16 ``x [T, D]`` (no float32 copy of it is made) and a float32 or
    bfloat16 ``w [E, D]``, ``b`` float32 ``[E]`` or None: a bf16 layer's router logits, each a float32 sum of exact
    products. A bf16 ``w`` with a multiple of 16 experts runs on the AMX tiles where there are some (:func:`amx`;
    8192 tokens, 64 experts: 1.3 ms against 3.8 for the cast and the library GEMM), fewer experts too where
    ``ROUTER_LOGITS_AMX_MIN_EXPERTS`` and ``ROUTER_LOGITS_AMX_PAD_MIN_TOKENS`` say so; else up to
    ``ROUTER_LOGITS_MAX_EXPERTS`` experts in a dot-product kernel. None where neither applies (a float32 ``x``,
    other dtypes or layouts, no library): the caller then casts and uses the library GEMM."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or \
            w.shape[0] < 1 or not _use_c(x, w) or \
            (b is not None and (b.dtype != torch.float32 or b.shape != (w.shape[0],) or b.device != x.device)):
        return None
    (T, D), E = x.shape, w.shape[0]
    if w.dtype == torch.bfloat16 and amx() and D % 32 == 0 and T >= AMX_NN_MIN_ROWS and \
            (E % 16 == 0 or (E >= ROUTER_LOGITS_AMX_MIN_EXPERTS and T >= ROUTER_LOGITS_AMX_PAD_MIN_TOKENS)):
        Ep = -(-E // 16) * 16  # (zero weight rows up to a multiple of 16: their logits are dropped)
        w_t = w.new_zeros(D, Ep)
        w_t[:, :E] = w.T
        out = torch.empty(T, Ep, dtype=torch.float32)
        small_experts_nn(x, None, w_t.unsqueeze(0), None, None, out)
        out = out if Ep == E else out[:, :E].contiguous()
        return out if b is None else out.add_(b)
    out = torch.empty(T, E, dtype=torch.float32)
    if E > ROUTER_LOGITS_MAX_EXPERTS or not w.is_contiguous():
        return None
    _call(library().moe_router_logits, _ptr(x), _DTYPES[x.dtype], x.stride(0), _ptr(w), _DTYPES[w.dtype],
          _ptr(None if b is None else b.contiguous()), T, E, D, _ptr(out), _threads())
    return out


#: Fewer experts than a multiple of 16 take the AMX tiles too, their weights padded with zero rows, from this many
#: experts and tokens: 8192 tokens, 8 experts 0.56 -> 0.40 ms, 12 experts 0.85 -> 0.39 ms; 1024 tokens 0.072 ->
#: 0.062 ms (8); 4 experts or 256 tokens lose (2 Emerald Rapids cores).
ROUTER_LOGITS_AMX_MIN_EXPERTS = 8
ROUTER_LOGITS_AMX_PAD_MIN_TOKENS = 1024

#: Softmax top-k routing of at least this many scores runs in the C kernel (:func:`softmax_topk`); fewer cost
#: PyTorch's ~10 small ops little.
ROUTE_MIN_SCORES = 1024


def softmax_topk(logits: torch.Tensor, selection_bias: torch.Tensor | None, k: int, renormalize: bool,
                 renorm_min: float, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Softmax top-k routing of float32 ``logits [T, E]`` in one pass (what :class:`moekit.routing.SoftmaxTopK`
    computes, up to the rounding of the softmax): ``(ids [T, k] int64, weights [T, k] float32, probs [T, E])``,
    ``ids`` the ``k`` largest ``probs + selection_bias`` (largest first), ``weights`` their ``probs`` divided by
    ``max(sum, renorm_min)`` if ``renormalize``, times ``scale``. None where it does not apply (fewer than
    ``ROUTE_MIN_SCORES`` scores, not a float32 CPU matrix, ``k`` above 64, no library) or where a row's choice is
    ambiguous (a NaN, or a tie among its ``k + 1`` largest values): the caller then routes in PyTorch, which
    resolves ties its own way."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.numel() < ROUTE_MIN_SCORES or \
            not 1 <= k <= min(64, logits.shape[1]) or not _use_c(logits):
        return None
    T, E = logits.shape
    if selection_bias is not None:
        _vector(selection_bias, "selection_bias", E, torch.float32)
    ids = torch.empty(T, k, dtype=torch.int64)
    weights = torch.empty(T, k, dtype=torch.float32)
    probs = torch.empty(T, E, dtype=torch.float32)
    rc = library().moe_softmax_topk(_ptr(logits), logits.stride(0), T, E, k, _ptr(selection_bias), int(renormalize),
                                    renorm_min, scale, _ptr(probs), _ptr(ids), _ptr(weights), _threads())
    if rc < 0:
        raise RuntimeError(f"moekit CPU kernel moe_softmax_topk returned {rc}: arguments the checks let through")
    return None if rc else (ids, weights, probs)


def sort_keys(key: torch.Tensor, bins: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor] | None:
    """Stable sort of int64 ``key [S]`` with values in ``[0, bins)``, by counting: ``(sorted, order, order // k,
    counts [bins])``, ``sorted, order`` as ``torch.sort(key, stable=True)`` gives them (the slots of a dispatch
    plan grouped by expert: ~1 ms -> ~0.1 ms for 16k slots). None without the library or for a non-CPU or
    non-int64 ``key``; raises ValueError for a key out of range."""
    if key.device.type != "cpu" or key.dtype != torch.int64 or key.dim() != 1 or not key.is_contiguous() or \
            library() is None:
        return None
    S = key.shape[0]
    srt, order, tok = (torch.empty(S, dtype=torch.int64) for _ in range(3))
    counts = torch.empty(bins, dtype=torch.int64)
    rc = library().moe_sort_keys(_ptr(key), S, bins, k, _ptr(srt), _ptr(order), _ptr(tok), _ptr(counts))
    if rc == -1:
        raise ValueError(f"sort_keys: a key is outside [0, {bins}) (or bins={bins}, k={k} is not positive)")
    if rc != 0:
        raise RuntimeError(f"moekit CPU kernel moe_sort_keys returned {rc}")
    return srt, order, tok, counts


def gather_rows(src: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None,
                check_index: bool = True, rows: int | None = None) -> torch.Tensor:
    """``(scale[:, None] * src[idx]).to(dtype)`` in one pass; ``scale`` is an optional float32 vector. With ``rows``
    (at least ``len(idx)``), the result has that many rows, the extra ones zero (padding for the library GEMMs)."""
    m, n = idx.shape[0], src.shape[1]
    rows = m if rows is None else rows
    if rows < m:
        raise ValueError(f"rows={rows} is fewer than the {m} indices; pass rows >= len(idx)")
    out = torch.empty(rows, n, dtype=dtype)
    if rows > m:
        out[m:].zero_()
    if not _use_c(src) or dtype not in _DTYPES:
        g = src.index_select(0, idx)
        out[:m] = g if scale is None else g * scale[:, None]
        return out
    ld = _rows(src, "src", (src.shape[0], n))
    if check_index:
        _index(idx, "idx", m, src.shape[0])
    _vector(scale, "scale", m, torch.float32)
    _call(library().moe_gather_rows, _ptr(src), _dt(src, "src"), ld, _ptr(idx), _ptr(scale), m, n, _ptr(out),
          _dt(out, "dtype"), n, _threads())
    return out


def scatter_add_rows(out: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None,
                     check_index: bool = True) -> None:
    """``out[idx] += w[:, None] * y`` for float32 ``out`` and distinct ``idx`` (the rows of one expert)."""
    m, n = y.shape
    if out.dtype != torch.float32:
        raise ValueError(f"out must be float32, got {out.dtype}")
    if not _use_c(out, y):
        y = y.float()
        out.index_add_(0, idx, y if w is None else y * w[:, None])
        return
    ld_out = _rows(out, "out", (out.shape[0], n))
    ld_y = _rows(y, "y", (m, n))
    if check_index:
        _index(idx, "idx", m, out.shape[0])
    _vector(w, "w", m, torch.float32)
    _call(library().moe_scatter_add_rows, _ptr(out), ld_out, _ptr(y), _dt(y, "y"), ld_y, _ptr(idx), _ptr(w), m, n,
          _threads())


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``h = [gate | up]`` of shape ``[m, 2F]``, in ``h``'s dtype."""
    m, W = h.shape
    if W % 2:
        raise ValueError(f"SwiGLU needs an even width [gate | up], got {W}")
    if not _use_c(h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    ld = _rows(h, "h", (m, W))
    a = torch.empty(m, W // 2, dtype=h.dtype)
    _call(library().moe_swiglu_fwd, _ptr(h), ld, _ptr(a), W // 2, m, W // 2, _dt(h, "h"), _threads())
    return a


def swiglu_backward(h: torch.Tensor, ga: torch.Tensor, w: torch.Tensor, need_dw: bool = True,
                    need_aw: bool = True, out: tuple | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """SwiGLU backward of one expert's rows: ``(dh [m, 2F], aw = w * a [m, F], dw [m] float32)`` from the
    pre-activation ``h = [gate | up]``, the unweighted gradient ``ga`` of the activation output and the float32
    router weights ``w`` of the rows, where ``a = silu(gate) * up``, ``dw = rowsum(ga * a)`` and ``dh`` is the
    gradient of ``[gate | up]`` given ``w * ga``. ``out``: optional ``(dh, aw, dw)`` tensors to write into."""
    m, W = h.shape
    F = W // 2
    if ga.dtype != h.dtype or tuple(ga.shape) != (m, F):
        raise ValueError(f"ga must be {h.dtype} of shape {(m, F)}, got {ga.dtype} {tuple(ga.shape)}")
    _vector(w, "w", m, torch.float32)
    if not _use_c(h, ga, *(out[:2] if out else ())):  # (dh, aw) matrices; dw is a vector
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        a = silu * up
        d = ga * w[:, None].to(ga.dtype)
        res = (torch.cat([d * up * (sig + silu * (1 - sig)), d * silu], dim=-1),
               a * w[:, None].to(a.dtype) if need_aw else None, (ga.float() * a.float()).sum(-1) if need_dw else None)
        if out is None:
            return res
        for dst, src in zip(out, res):
            if dst is not None and src is not None:
                dst.copy_(src)
        return out
    dh, aw, dw = out if out is not None else (torch.empty(m, W, dtype=h.dtype),
                                                torch.empty(m, F, dtype=h.dtype) if need_aw else None,
                                                torch.empty(m, dtype=torch.float32) if need_dw else None)
    ld_dh = _rows(dh, "dh", (m, W))
    ld_aw = _rows(aw, "aw", (m, F)) if aw is not None else 0
    if dw is not None:
        _vector(dw, "dw", m, torch.float32)
    if dh.dtype != h.dtype or (aw is not None and aw.dtype != h.dtype):
        raise ValueError(f"dh and aw must have h's dtype {h.dtype}")
    _call(library().moe_swiglu_bwd, _ptr(h), _rows(h, "h", (m, W)), _ptr(ga), _rows(ga, "ga", (m, F)), _ptr(w), m, F,
          _dt(h, "h"), _ptr(dh), ld_dh, _ptr(aw), ld_aw, _ptr(dw), _threads())
    return dh, aw, dw


# ------------------------------------------------------------------------------------ small-M expert GEMMs
def _stacked(w: torch.Tensor | None, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if w is None:
        return
    if w.device.type != "cpu" or w.dtype != dtype or tuple(w.shape) != shape or not w.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape {shape}, got {w.dtype} "
                         f"{tuple(w.shape)} on {w.device} (contiguous: {w.is_contiguous()})")


#: Experts with at least this many rows run both projections, and the data gradients of backward, in the packed
#: 6 x 16 tiles where the kernels have them (AVX2 builds: a 16-column block of weights packed once as float32, then
#: 12 FMAs per 8 loads), the others in the dot-product tiles. Measured on Zen 3, 2 threads: 16 rows per expert the
#: same either way (fine-grained up 8.4 / 9.0 ms fp32, 7.0 / 6.9 ms bf16), 32 rows 1.2-1.4x faster packed, 64-128
#: rows 1.3-1.6x (fine-grained fp32 input projection 57 -> 37 ms at 128 rows); dH @ W_in at 128 rows 1.1-1.2x in
#: fp32, 1.6-1.7x in bf16 (74-88 -> 130-141 GFLOP/s). (The weight gradients keep their outer-product kernel, whose
#: 6 x 16 tiles read both operands packed already: 120-139 GFLOP/s, where a packed-tile version measured 70-116.)
PACKED_MIN_ROWS = 24
#: ...except in the data-gradient kernel (:func:`small_experts_nn`), whose dot-product tiles read the weights across
#: their rows (``w[e]`` is ``[K, N]``): there the packed tiles win from fewer rows. Measured on Zen 3, 2 threads, the
#: kernel alone: ``g @ W_out`` of Mixtral-like experts of 16-24 rows 52-55 -> 66-74 GFLOP/s; in the layer, fine-
#: grained forward+backward at T = 128 (8-25 rows per expert) fp32 37.7 -> 35.5 ms and 45.8 -> 43.1 ms (two runs),
#: bf16 46.8 -> 42.3 and 50.4 -> 47.5 ms with 12 rather than 24; 4 rows was slower at T = 16 (2-4 rows per expert).
#: Since then the experts of up to 40 rows stream whole weight rows in chunks of ~128 KiB instead (the kernels'
#: ``NN_FEW``; Zen 3, the kernel alone, weights from memory: 16 rows 0.68-0.79x the packed tiles' time, 32 rows
#: 0.79-0.93x, 48 rows 0.85-1.02x, 64 rows 0.96-1.12x), hence 41.
PACKED_NN_MIN_ROWS = 41
#: AVX-512 builds run float32 experts of at least this many rows on their packed tiles (12 token rows x 32 columns,
#: 24 accumulators; their dot-product tiles are 6 x 4 weight rows of 16 lanes and reduce across lanes at the end, so
#: they keep more of their rate on few rows, and transposing the weights into panels costs the packed tiles ~8 / rows
#: of their time). Measured on 2 Emerald Rapids cores, fp32, the kernels alone (packed / dot-product, paired
#: round-robin): input and output projection at 16 rows per expert 1.31 / 1.22 (slower), 32 rows 1.06 / 1.00, 48
#: rows 1.00 / 0.95 Mixtral-like and 1.08 / 1.17 fine-grained, 64 rows 0.97 / 0.95 and 1.04 / 0.99, 96 rows 0.92 /
#: 0.90 and 0.94 / 0.95, 128 rows 0.78-0.90 / 0.84-0.87 and 0.86 / 0.87 (up to 251 GFLOP/s, the output projection).
PACKED_MIN_ROWS_AVX512 = 64
#: ...and their data gradients none (0): the dot-product tiles' column strips keep up there (Mixtral-like ``dH @
#: W_in`` 1.29x slower packed at 32 rows, 1.02x at 128; ``g @ W_out`` 1.01-1.02x; fine-grained 0.91-1.10x).
PACKED_NN_MIN_ROWS_AVX512 = 0


def packed_width(dtype: torch.dtype | None = None) -> int:
    """The packed tiles' panel width for operands of ``dtype`` (None: of every dtype) in the kernels built here: 16
    on AVX2 builds (float32 and bfloat16), 32 on AVX-512 builds (float32: their bfloat16 has the pair dot product,
    or AMX tiles); 0 where there are none."""
    lib = library()
    if lib is None or (dtype is not None and dtype not in _DTYPES):
        return 0
    return int(lib.moe_packed_tiles(-1 if dtype is None else _DTYPES[dtype]))


def packed_tiles(dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels built here run operands of ``dtype`` (None: of every dtype) on packed tiles."""
    return packed_width(dtype) > 0


#: bf16 experts with at least this many rows run their forward projections (:func:`small_experts_up`,
#: :func:`small_experts_down`) on AMX tiles where the CPU has them (Intel Sapphire Rapids and later): 16 x 16 x 32
#: multiply-adds per instruction, the token rows packed per call and padded to multiples of 16. Measured on 2
#: Sapphire Rapids cores, the two projections against the AVX-512 tiles: 1-2 rows per expert the same or slower
#: (Mixtral-like, one row: 0.45 against 0.44 ms), 4 rows 1.4x faster (1.26 against 1.76 ms), 32 rows 6x (1.55
#: against 9.5 ms), 128 rows and more 3.3-5x. (The decode kernel takes the same threshold.)
AMX_MIN_ROWS = 4


def amx() -> bool:
    """Whether the bf16 projections run on AMX tiles: the kernels were built with them, the OS lets this process use
    them, and ``MOEKIT_CPU_AMX`` was not ``0`` when the library was loaded (``0`` turns them off in every kernel)."""
    library()
    return _AMX


#: ...and from this many rows in the data-gradient kernel (:func:`small_experts_nn`), which packs each expert's
#: weights into pair-interleaved blocks per call: measured on 2 Sapphire Rapids cores against the AVX-512 tiles,
#: 4 rows per expert 0.55-1.4x, 8 rows 0.7-1.9x, 16 rows 1.6-2.9x, 32 rows 2.2-3.5x (Mixtral-like and
#: fine-grained experts, ``dH @ W_in`` and ``g @ W_out``); in the layer, forward+backward against 4 rows (same
#: process): Mixtral-like T = 8 9.11 -> 8.52 ms, T = 16 11.6 -> 10.7 ms, fine-grained T = 16-64 within 2%.
AMX_NN_MIN_ROWS = 8


def _packed_min(packed_min_rows: int | None, dtype: torch.dtype | None, nn: bool = False) -> int:
    """The rows from which an expert takes the packed (or AMX) tiles: ``packed_min_rows`` if given, else the
    threshold of this build for the operands' dtype (None: mixed) and kernel (``nn``: the data gradients)."""
    if packed_min_rows is not None:
        return max(0, packed_min_rows)
    width = packed_width(dtype)
    if width == 32:  # AVX-512 builds (float32)
        return PACKED_NN_MIN_ROWS_AVX512 if nn else PACKED_MIN_ROWS_AVX512
    if width:
        return PACKED_NN_MIN_ROWS if nn else PACKED_MIN_ROWS
    if dtype == torch.bfloat16 and amx():  # the bf16 experts of so many rows on AMX tiles
        return AMX_NN_MIN_ROWS if nn else AMX_MIN_ROWS
    return 0


def swapped_rows(dtype: torch.dtype) -> tuple[int, int]:
    """``(fewest, most)`` rows of an expert whose input projection takes the swapped tiles for operands of ``dtype``
    in the kernels built here (float32 on AVX2 builds: 24-96; 6 weight rows, each value broadcast from the row in
    place, times 16 token rows transposed once per expert: no packing of the weights; measured on Zen 3, see the
    kernels' sw_run), else ``(0, 0)``. The kernels' own callers (the fused decode, the few-token step) use the same."""
    lib = library()
    if lib is None or dtype not in _DTYPES:
        return 0, 0
    return int(lib.moe_swapped_rows(_DTYPES[dtype], 0)), int(lib.moe_swapped_rows(_DTYPES[dtype], 1))


def _swapped_max(swapped_max_rows: int | None, dtype: torch.dtype) -> int:
    """``swapped_max_rows`` if given (0: none), else the most of :func:`swapped_rows`."""
    return max(0, swapped_max_rows) if swapped_max_rows is not None else swapped_rows(dtype)[1]


def small_gemm_usable(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether :func:`small_experts_up`/:func:`small_experts_down` can run: the library is built, ``x`` is a CPU
    float32/bfloat16 matrix with contiguous rows and the stacked weights are contiguous in the same dtype."""
    return _use_c(x) and all(w is None or (w.dtype == x.dtype and w.device.type == "cpu" and w.is_contiguous())
                             for w in weights)


def _segments_arg(start: torch.Tensor, end: torch.Tensor, E: int, S: int, check: bool) -> None:
    _vector(start, "start", E, torch.int64)
    _vector(end, "end", E, torch.int64)
    if check and E and (bool((start < 0).any()) or bool((end < start).any()) or int(end.max()) > S):
        raise ValueError(f"expert segments must satisfy 0 <= start <= end <= {S}")


def _up_args(x, tok, start, end, w_in, b_in, check_index, dtype) -> tuple[int, int, int, int, int]:
    """Check the arguments of an input-projection kernel (weights in ``dtype``); ``(E, W, D, S, ld_x)``."""
    E, W, D = w_in.shape
    S = tok.shape[0]
    ld_x = _rows(x, "x", (x.shape[0], D))
    _stacked(w_in, "w_in", (E, W, D), dtype)
    _stacked(b_in, "b_in", (E, W), dtype)
    _vector(tok, "tok", S, torch.int64)
    _segments_arg(start, end, E, S, check_index)
    if check_index:
        _index(tok, "tok", S, x.shape[0])
    return E, W, D, S, ld_x


def _down_args(tok, w, start, end, w_out, b_out, out, check_index, dtype) -> tuple[int, int, int, int, int]:
    """Check the arguments of an output-projection kernel (weights in ``dtype``) but its activation;
    ``(E, D, F, S, ld_out)``."""
    E, D, F = w_out.shape
    S = tok.shape[0]
    _stacked(w_out, "w_out", (E, D, F), dtype)
    _stacked(b_out, "b_out", (E, D), dtype)
    _vector(tok, "tok", S, torch.int64)
    _vector(w, "w", S, torch.float32)
    _segments_arg(start, end, E, S, check_index)
    if out.dtype != torch.float32:
        raise ValueError(f"out must be float32, got {out.dtype}")
    ld_out = _rows(out, "out", (out.shape[0], D))
    if check_index:
        _index(tok, "tok", S, out.shape[0])
    return E, D, F, S, ld_out


def small_experts_up(x: torch.Tensor, tok: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                     w_in: torch.Tensor, b_in: torch.Tensor | None, swiglu: bool, keep_h: bool,
                     check_index: bool = True, packed_min_rows: int | None = None, hand_over: bool = False,
                     swapped_max_rows: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input projection of all experts in one call: for the sorted slots ``s`` of expert ``e``
    (``start[e] <= s < end[e]``; other rows are left unwritten), ``h[s] = x[tok[s]] @ w_in[e].T + b_in[e]``.
    Returns ``(h, a)``: with ``swiglu``, ``a = silu(h[:, :F]) * h[:, F:]`` and ``h`` only if ``keep_h``; else
    ``(h, None)``. Experts with at least ``packed_min_rows`` rows (default :data:`PACKED_MIN_ROWS` on AVX2 builds,
    :data:`PACKED_MIN_ROWS_AVX512` for float32 on AVX-512 ones, :data:`AMX_MIN_ROWS` for bf16 on AMX tiles, else
    none; 0: none) run in the packed (or AMX) tiles, except that experts from the fewest rows of
    :func:`swapped_rows` to ``swapped_max_rows`` (default: its most; 0: none) run in the swapped tiles.

    ``hand_over`` (SwiGLU): ``a`` is only for :func:`small_experts_down` with ``handed_over=True`` and the same
    ``tok``, ``start``, ``end`` and ``packed_min_rows``: where the output projection would pack a block of rows
    into its tiles' layout first (float32 on AVX2 builds, experts of many rows), they come in that layout already,
    so it packs nothing (``a`` then holds the same values but not as rows)."""
    E, W, D, S, ld_x = _up_args(x, tok, start, end, w_in, b_in, check_index, x.dtype)
    if swiglu and W % 2:
        raise ValueError(f"SwiGLU needs an even input-projection width, got {W}")
    h = torch.empty(S, W, dtype=x.dtype) if (keep_h or not swiglu) else None
    a = torch.empty(S, W // 2, dtype=x.dtype) if swiglu else None
    _call(_require().moe_small_up, _ptr(x), ld_x, _ptr(tok), _ptr(start), _ptr(end), E, _ptr(w_in), _ptr(b_in), W,
          D, _dt(x, "x"), int(swiglu), _ptr(h), _ptr(a), int(hand_over),
          _packed_min(packed_min_rows, x.dtype), _swapped_max(swapped_max_rows, x.dtype), _threads())
    return h, a


def small_experts_down(a: torch.Tensor, tok: torch.Tensor, w: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                       w_out: torch.Tensor, b_out: torch.Tensor | None, out: torch.Tensor,
                       check_index: bool = True, packed_min_rows: int | None = None,
                       handed_over: bool = False) -> None:
    """Output projection and weighted combine of all experts in one call:
    ``out[tok[s]] += w[s] * (a[s] @ w_out[e].T + b_out[e])`` for the sorted slots ``s`` of expert ``e``
    (``start[e] <= s < end[e]``), into float32 ``out``. Each token's sum runs in a fixed order whatever the thread
    count: its packed experts' terms (``packed_min_rows`` as in :func:`small_experts_up`), then the others', each in
    expert order. ``handed_over``: ``a`` came from :func:`small_experts_up` with ``hand_over=True`` (contiguous)."""
    ld_a = _rows(a, "a", (tok.shape[0], w_out.shape[2]))
    if handed_over and not a.is_contiguous():
        raise ValueError("a handed over from small_experts_up must be the contiguous tensor it returned")
    E, D, F, _, ld_out = _down_args(tok, w, start, end, w_out, b_out, out, check_index, a.dtype)
    _call(_require().moe_small_down, _ptr(a), ld_a, int(handed_over), _ptr(tok), _ptr(w), _ptr(start), _ptr(end), E,
          _ptr(w_out), _ptr(b_out), D, F, _dt(a, "a"), _ptr(out), ld_out, _packed_min(packed_min_rows, a.dtype),
          _threads())


def amx_packed_usable(x: torch.Tensor, w_in: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether :func:`amx_up_packed` and :func:`amx_down_packed` can run: bf16 on AMX tiles, d_model and d_ff
    multiples of 32, the operands as :func:`small_gemm_usable` wants them."""
    return (x.dtype == torch.bfloat16 and amx() and w_in.shape[2] % 32 == 0 and w_in.shape[1] % 64 == 0
            and small_gemm_usable(x, w_in, *weights))


def _packed_rows(start: torch.Tensor, end: torch.Tensor) -> int:
    return int(((end - start + 15) // 16).sum()) * 16


def amx_up_packed(x: torch.Tensor, tok: torch.Tensor, start: torch.Tensor, end: torch.Tensor, w_in: torch.Tensor,
                  b_in: torch.Tensor | None, keep_h: bool, check_index: bool = True
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`small_experts_up` with SwiGLU for bf16 experts on the AMX tiles (every expert with rows, however
    few), the activation written in the output projection's packed layout (see :func:`amx_packed_usable`): returns
    ``(h or None, a_pk)``, where ``a_pk`` is opaque (``[rows of every expert rounded up to 16, d_ff]`` bf16), for
    :func:`amx_down_packed` with the same ``tok``, ``start`` and ``end``. No pass packs the activation for the
    output projection's tiles, and the input projection's sums need no transpose for it."""
    E, W, D, S, ld_x = _up_args(x, tok, start, end, w_in, b_in, check_index, torch.bfloat16)
    if x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bfloat16, got {x.dtype}")
    h = torch.empty(S, W, dtype=x.dtype) if keep_h else None
    a_pk = torch.empty(_packed_rows(start, end), W // 2, dtype=x.dtype)
    _call(_require().moe_amx_up_packed, _ptr(x), ld_x, _ptr(tok), _ptr(start), _ptr(end), E, _ptr(w_in), _ptr(b_in),
          D, W // 2, _ptr(h), _ptr(a_pk), _threads())
    return h, a_pk


def amx_down_packed(a_pk: torch.Tensor, tok: torch.Tensor, w: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                    w_out: torch.Tensor, b_out: torch.Tensor | None, out: torch.Tensor,
                    check_index: bool = True, flags: torch.Tensor | None = None,
                    out16: torch.Tensor | None = None) -> None:
    """:func:`small_experts_down` reading the activation ``a_pk`` that :func:`amx_up_packed` wrote for the same
    ``tok``, ``start`` and ``end``. With ``flags`` (:func:`row_flags` of these rows, or of all the rows of which
    these are a run, called in expert order) and ``out16`` (bf16 ``[T, D]``, 64-byte aligned rows): a token's
    first row stores into ``out`` instead of adding (``out`` need not be zeroed), and its last writes the finished
    sum, rounded once, to ``out16`` instead (``out`` then holds no finished row): no zero-fill of ``out`` and no
    cast pass after."""
    E, D, F, _, ld_out = _down_args(tok, w, start, end, w_out, b_out, out, check_index, torch.bfloat16)
    if a_pk.dtype != torch.bfloat16 or tuple(a_pk.shape) != (_packed_rows(start, end), F) or not a_pk.is_contiguous():
        raise ValueError(f"a_pk must be the contiguous bf16 [{_packed_rows(start, end)}, {F}] tensor amx_up_packed "
                         f"returned for these segments, got {a_pk.dtype} {tuple(a_pk.shape)}")
    ld16 = 0
    if (flags is None) != (out16 is None):
        raise ValueError("give both flags and out16, or neither")
    if flags is not None:
        _vector(flags, "flags", tok.shape[0], torch.uint8)
        ld16 = _rows(out16, "out16", (out.shape[0], D))
        if out16.dtype != torch.bfloat16 or out16.data_ptr() % 64 or ld16 % 32:
            raise ValueError(f"out16 must be bf16 with 64-byte aligned rows, got {out16.dtype} at "
                             f"{out16.data_ptr() % 64} past a line, row stride {ld16}")
    _call(_require().moe_amx_down_packed, _ptr(a_pk), _ptr(tok), _ptr(w), _ptr(start), _ptr(end), E, _ptr(w_out),
          _ptr(b_out), D, F, _ptr(out), ld_out, _ptr(flags), _ptr(out16), ld16, _threads())


def row_flags(tok: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """Per sorted row ``s`` (token ``tok[s] < tokens``) a uint8: bit 0 where ``s`` is its token's first row, bit 1
    where its last (see :func:`amx_down_packed`); None where some token has no row (its output would never be
    written)."""
    _vector(tok, "tok", tok.shape[0], torch.int64)
    fl = torch.empty(tok.shape[0], dtype=torch.uint8)
    none = _require().moe_row_flags(_ptr(tok), tok.shape[0], tokens, _ptr(fl))
    if none < 0:
        raise RuntimeError(f"moekit CPU kernel moe_row_flags returned {none}")
    return None if none else fl


#: The activations the decode kernels run (moe_cpu.c's ACT_*; SwiGLU fused into the input projection, the others
#: applied between the projections), by moekit's activation name, with the names of their parameters in order:
#: every one moekit has.
DECODE_ACTIVATIONS = {"swiglu": (1, ()), "geglu": (2, ()), "geglu_tanh": (3, ()), "reglu": (4, ()),
                      "gpt_oss": (5, ("alpha", "limit")), "swiglu_clamped": (6, ("limit",)),
                      "swiglu_clipped": (7, ("limit",)), "gelu": (8, ()), "gelu_tanh": (9, ()), "relu": (10, ()),
                      "relu2": (11, ()), "silu": (12, ())}


def decode_activation(activation=None) -> tuple[tuple[int, float, float], bool]:
    """The decode kernels' ``(act, act_p0, act_p1)`` for a :class:`moekit.experts.activations.Activation` (None:
    SwiGLU), and whether it is gated (its input projection twice the activation's width)."""
    if activation is None:
        return (1, 0.0, 0.0), True
    spec = DECODE_ACTIVATIONS.get(activation.name)
    if spec is None:
        raise ValueError(f"the decode kernels have no {activation.name} activation; use one of "
                         f"{', '.join(DECODE_ACTIVATIONS)}")
    params = dict(activation.kwargs)
    p = [float(params[k]) for k in spec[1]] + [0.0, 0.0]
    return (spec[0], p[0], p[1]), activation.gated


def small_experts_decode(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, w_in: torch.Tensor,
                         b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
                         check: bool = True, activation=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts (SwiGLU, or ``activation``: any of :data:`DECODE_ACTIVATIONS`, gated with ``w_in [E, 2F, D]`` or
    plain with ``w_in [E, F, D]``) for a few tokens straight from the router's choices: float32
    ``y[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t])`` (``ids < 0``: empty slot), with the slots grouped by expert
    inside the kernel (no sort, no host round trip); experts with at least this build's packed-tile (or AMX)
    threshold of rows for ``x``'s dtype run on those tiles, as in :func:`small_experts_up`. Returns
    ``(y [T, D], slots per expert [E] int64)``.
    ``check=False`` skips the argument checks (for callers that built the arguments themselves)."""
    act, gated = decode_activation(activation)
    E, W, D = w_in.shape
    F = W // 2 if gated else W  # (the activation's width)
    T, K = ids.shape
    if check:
        _rows(x, "x", (T, D))
        _stacked(w_in, "w_in", (E, W, D), x.dtype)
        _stacked(b_in, "b_in", (E, W), x.dtype)
        _stacked(w_out, "w_out", (E, D, F), x.dtype)
        _stacked(b_out, "b_out", (E, D), x.dtype)
        if ids.dtype != torch.int64 or not ids.is_contiguous() or w.dtype != torch.float32 or w.shape != ids.shape \
                or not w.is_contiguous():
            raise ValueError(f"ids must be contiguous int64 and w contiguous float32, both [T, K]; got {ids.dtype} "
                             f"{tuple(ids.shape)} and {w.dtype} {tuple(w.shape)}")
    out = torch.zeros(T, D, dtype=torch.float32)
    counts = torch.empty(E, dtype=torch.int64)
    _call(_require().moe_small_decode, _ptr(x), x.stride(0), _ptr(ids), _ptr(w), T, K, E, _ptr(w_in), _ptr(b_in),
          _ptr(w_out), _ptr(b_out), D, F, _dt(x, "x"), _ptr(out), D, _ptr(counts), _packed_min(None, x.dtype), *act,
          _threads())
    return out, counts


#: Largest top-k that route_decode takes (its per-token selection keeps k + 1 candidates on the stack).
ROUTE_DECODE_MAX_K = 64


def route_decode(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor | None,
                 selection_bias: torch.Tensor | None, k: int, renormalize: bool, renorm_min: float, scale: float,
                 w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
                 out_dtype: torch.dtype = torch.float32, mode: RouteMode | None = None, activation=None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Softmax top-k routing and the SwiGLU experts (or ``activation``'s, as :func:`small_experts_decode` takes)
    of a few tokens in one kernel call (inference):
    ``p = softmax(x @ router_w.T + router_b)`` in float32, the ``k`` largest ``p + selection_bias`` chosen, their
    ``p`` (divided by ``max(sum, renorm_min)`` if ``renormalize``, times ``scale``) as weights, then
    :func:`small_experts_decode`. Returns ``(y [T, D], slots per expert [E], ids [T, k], weights [T, k])``, ``y``
    summed in float32 and returned in ``out_dtype`` (float32 or bfloat16: rounded once, in the kernel),
    or None where a token's choice is ambiguous (a NaN, or a tie among its ``k + 1`` largest values): the caller
    then routes in PyTorch, which resolves ties its own way. The caller checks the arguments (shapes, dtypes,
    contiguity: ``x`` and the experts' weights one dtype, ``router_w`` float32 or bfloat16, the biases float32;
    ``1 <= k <= min(ROUTE_DECODE_MAX_K, E)``). ``mode`` (a :class:`RouteMode`) routes another way instead:
    group-limited sigmoid top-k, top-k of the logits weighted by a softmax over them (``renorm_min`` then unused).
    A caller that runs the same weights again and again binds them once with :class:`RouteDecode`."""
    return RouteDecode(router_w, router_b, selection_bias, k, renormalize, renorm_min, scale, w_in, b_in, w_out,
                       b_out, out_dtype, mode, activation)(x, routing=True)


@dataclass(frozen=True)
class RouteMode:
    """A routing other than softmax top-k for :func:`route_decode` (the kernel's ``route_row_mode``): the scores
    ``s`` of the logits (``"softmax"``, ``"sigmoid"`` or ``"logits"``: the logits themselves), the ``k`` largest
    choice values ``s + selection_bias`` chosen, within the ``topk_group`` of ``n_group`` groups of experts with the
    best group scores (``"top2_sum"``: the sum of a group's two largest choice values; ``"max"``: its largest) where
    ``n_group > 1``, the experts of the other groups given the choice value ``group_fill``; the weights
    (``"scores"``: the chosen scores, ``"softmax"``: a softmax over them, ``"sigmoid"``: their sigmoids) divided by
    their sum plus ``renorm_eps`` where renormalised (not the softmax), then scaled; with ``logit_softcap > 0`` the
    logits ``l`` are ``logit_softcap * tanh(l / logit_softcap)`` first. At most :data:`ROUTE_MAX_GROUPS` groups."""

    scores: str = "sigmoid"
    weights: str = "scores"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    group_fill: float = float("-inf")
    renorm_eps: float = 0.0
    logit_softcap: float = 0.0

    def kernel_args(self) -> tuple[ctypes.Array, ctypes.Array]:
        """The kernel's ``mode`` (int64 [5]) and ``fmode`` (float32 [3]) arrays."""
        code = ({"softmax": 0, "sigmoid": 1, "logits": 2}[self.scores], {"scores": 0, "softmax": 1, "sigmoid": 2}[
            self.weights], self.n_group, self.topk_group, {"top2_sum": 0, "max": 1}[self.group_score])
        return (ctypes.c_int64 * 5)(*code), (ctypes.c_float * 3)(self.group_fill, self.renorm_eps,
                                                                   self.logit_softcap)


#: Most groups of experts a RouteMode may have (the kernel keeps their scores on the stack).
ROUTE_MAX_GROUPS = 64


class RouteDecode:
    """:func:`route_decode` bound to one set of router and expert weights, its arguments converted for the kernel
    once: a call then pays for its output's allocation and the kernel, not for converting some twenty arguments
    (a one-token step's host time, fine-grained bf16 experts on Zen 3: see ``__call__``). It holds the tensors it
    was given; they must stay where they are, unchanged in shape and dtype (the layer binds anew whenever its
    parameters are replaced, moved or cast)."""

    def __init__(self, router_w: torch.Tensor, router_b: torch.Tensor | None, selection_bias: torch.Tensor | None,
                 k: int, renormalize: bool, renorm_min: float, scale: float, w_in: torch.Tensor,
                 b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
                 out_dtype: torch.dtype = torch.float32, mode: RouteMode | None = None, activation=None):
        act, gated = decode_activation(activation)
        lib = _require()
        # a function object of its own, without argtypes: the arguments below are ctypes values already
        self._fn = lib["moe_route_decode"]
        self._fn.restype = ctypes.c_int
        P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        E, W, D = w_in.shape
        self.k, self.num_experts, self.d_model, self.out_dtype = k, E, D, out_dtype
        self._tensors = (router_w, router_b, selection_bias, w_in, b_in, w_out, b_out)  # (kept alive)
        self._router = (P(_ptr(router_w)), I(_DTYPES[router_w.dtype]), P(_ptr(router_b)), P(_ptr(selection_bias)))
        self._routing = (I64(k), I64(E), I(int(renormalize)), ctypes.c_float(renorm_min), ctypes.c_float(scale),
                         *(mode.kernel_args() if mode is not None else (None, None)))
        self._experts = (P(_ptr(w_in)), P(_ptr(b_in)), P(_ptr(w_out)), P(_ptr(b_out)), I64(D),
                         I64(W // 2 if gated else W), I(_DTYPES[w_in.dtype]))
        self._out = (I(_DTYPES[out_dtype]), I64(D))
        self._tail = (I64(_packed_min(None, w_in.dtype)), I(act[0]), ctypes.c_float(act[1]), ctypes.c_float(act[2]))

    def __call__(self, x: torch.Tensor, routing: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor] | None:
        """``(y, slots per expert [E])`` of ``x`` (the experts' dtype; ``[T, D]`` with contiguous rows, or
        contiguous ``[..., D]``: T = its rows), ``y`` contiguous in ``x``'s shape, with the routing
        ``(ids [T, k], weights [T, k])`` after them if ``routing``; None where a token's choice is ambiguous (see
        :func:`route_decode`)."""
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        if x.dim() == 2:
            T, ld = x.shape[0], x.stride(0)
        else:
            T, ld = x.numel() // self.d_model, self.d_model
        out = torch.empty_like(x, dtype=self.out_dtype, memory_format=torch.contiguous_format)  # (zeroed by the kernel)
        counts = torch.empty(self.num_experts, dtype=torch.int64)
        ids = torch.empty(T, self.k, dtype=torch.int64) if routing else None
        wts = torch.empty(T, self.k, dtype=torch.float32) if routing else None
        rc = self._fn(P(x.data_ptr()), I64(ld), *self._router, I64(T), *self._routing, P(_ptr(ids)),
                      P(_ptr(wts)), *self._experts, P(out.data_ptr()), *self._out, P(counts.data_ptr()),
                      *self._tail, ctypes.c_int(_threads()))
        if rc == 1:
            return None
        if rc != 0:
            raise RuntimeError(f"moekit CPU kernel moe_route_decode returned {rc}: arguments the checks let through")
        return (out, counts, ids, wts) if routing else (out, counts)


@dataclass
class TrainStepSaved:
    """What :func:`route_train_forward` keeps for :func:`route_train_backward`: the routing (``ids [T, k]``,
    ``probs [T, E]``: the softmax), the slots grouped by expert (``seg``: start ``[E]``, end ``[E]``, token ``[S]``,
    slot ``[S]``; ``ws [S]`` their weights) and the pre-activations ``h [S, 2F]`` in that order (overwritten by
    backward, which drops ``seg``, ``ws`` and ``h`` once done with them); ``fused``: whether backward took some
    experts' data and weight gradients in one pass (set by it)."""

    ids: torch.Tensor
    probs: torch.Tensor
    seg: torch.Tensor | None
    ws: torch.Tensor | None
    h: torch.Tensor | None
    fused: bool = False


def route_train_forward(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor | None,
                        selection_bias: torch.Tensor | None, k: int, renormalize: bool, renorm_min: float,
                        scale: float, w_in: torch.Tensor, w_out: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, TrainStepSaved] | None:
    """The forward of a few-token training step in one kernel call: :func:`route_decode`'s softmax top-k routing
    and SwiGLU experts (no expert biases), keeping what :func:`route_train_backward` needs. Returns
    ``(y [T, D] float32, slots per expert [E], weights [T, k] float32, logits [T, E] float32, saved)``, or None
    where a token's choice is
    ambiguous (a NaN, or a tie among its ``k + 1`` largest values: route in PyTorch instead). The caller checks the
    arguments as for :func:`route_decode` (``x`` contiguous in the experts' dtype)."""
    E, W, D = w_in.shape
    T, F = x.shape[0], W // 2
    S = T * k
    out = torch.empty(T, D, dtype=torch.float32)  # (zeroed by the kernel)
    counts = torch.empty(E, dtype=torch.int64)
    ids = torch.empty(T, k, dtype=torch.int64)
    wts = torch.empty(T, k, dtype=torch.float32)
    probs = torch.empty(T, E, dtype=torch.float32)
    logits = torch.empty(T, E, dtype=torch.float32)
    seg = torch.empty(2 * E + 2 * S, dtype=torch.int64)
    ws = torch.empty(S, dtype=torch.float32)
    h = torch.empty(S, W, dtype=x.dtype)
    rc = _require().moe_route_train_fwd(
        _ptr(x), x.stride(0), _ptr(router_w), _DTYPES[router_w.dtype], _ptr(router_b), _ptr(selection_bias), T, k, E,
        int(renormalize), renorm_min, scale, _ptr(ids), _ptr(wts), _ptr(probs), _ptr(logits), _ptr(w_in),
        _ptr(w_out), D, F, _DTYPES[x.dtype], _ptr(seg), _ptr(ws), _ptr(h), _ptr(out), D, _ptr(counts),
        _packed_min(None, x.dtype), _packed_min(None, x.dtype), _threads())
    if rc == 1:
        return None
    if rc != 0:
        raise RuntimeError(f"moekit CPU kernel moe_route_train_fwd returned {rc}: arguments the checks let through")
    return out, counts, wts, logits, TrainStepSaved(ids, probs, seg, ws, h)


#: The few-token training step's backward in float32 computes each projection's data and weight gradients in one
#: pass over the weights of the experts with at most 6 rows (the kernel's ``FEW_FUSED_MAX_ROWS``): reading a weight
#: row and writing its gradient's row together streams more bytes per second than two passes. False: two passes.
TRAIN_FUSED = True


def route_train_backward(g: torch.Tensor, d_probs: torch.Tensor | None, x: torch.Tensor, router_w: torch.Tensor,
                         saved: TrainStepSaved, renormalize: bool, renorm_min: float, scale: float, w_in: torch.Tensor,
                         w_out: torch.Tensor, need_x: bool, need_w_in: bool, need_w_out: bool, need_logits: bool,
                         need_router_w: bool, d_logits_in: torch.Tensor | None = None,
                         dx_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | None, ...]:
    """The backward of :func:`route_train_forward` from the gradient ``g [T, D]`` (float32 or the experts' dtype,
    contiguous) of its output, ``d_probs`` (float32 ``[T, E]`` or None) of the saved probabilities (a balancing
    loss's) and ``d_logits_in`` (the same, or None) of its logits (a z-loss's): ``(dx, dW_in, dW_out,
    d_logits [T, E] float32, dW_router)``, each None where not asked for (dx in ``dx_dtype``, summed in float32,
    includes the router's term ``d_logits @ router_w``). Consumes ``saved.h``, ``saved.seg`` and ``saved.ws``. One
    kernel call for all but the input projection's weight gradient, a second for that, whose buffer (the largest)
    is allocated once the first call's scratch is freed, and the router's weight gradient last, once the
    pre-activations, the groups and dx's float32 sums are: the peak holds the experts' gradients and what the step
    keeps, as the regular path's does."""
    E, W, D = w_in.shape
    T, k = saved.ids.shape
    h, saved.h = saved.h, None
    if h is None:
        raise RuntimeError("this few-token training step was already backpropagated (its pre-activations are "
                           "overwritten by the first backward): retain_graph=True is not supported by it")
    for name, t in (("d_probs", d_probs), ("d_logits_in", d_logits_in)):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (T, E)):
            raise ValueError(f"{name} must be float32 of shape {(T, E)}, got {t.dtype} {tuple(t.shape)}")
    d_probs = None if d_probs is None else d_probs.contiguous()
    d_logits_in = None if d_logits_in is None else d_logits_in.contiguous()
    lib = _require()
    dx = torch.empty(T, D, dtype=torch.float32) if need_x else None
    d_wout = torch.empty_like(w_out) if need_w_out else None
    d_logits = torch.empty(T, E, dtype=torch.float32) if need_logits or need_x or need_router_w else None
    ga = torch.empty(T * k, W // 2, dtype=x.dtype)  # (scratch: g @ W_out, then w a)
    # (float32 with a few rows per expert: each projection's data and weight gradients in one pass; the input
    # projection's data gradient then comes with its weight gradient, in the second call)
    fuse = (1 | (2 if need_w_in else 0)) if TRAIN_FUSED else 0
    wa = torch.empty(T * k, W // 2, dtype=torch.float32) if fuse and x.dtype == torch.float32 else None  # (w a)
    deferred = ctypes.c_int(0)
    rc = lib.moe_route_train_bwd(
        _ptr(g), _dt(g, "g"), g.stride(0), _ptr(router_w), _DTYPES[router_w.dtype], _ptr(saved.ids),
        _ptr(saved.probs), T, k, E, int(renormalize), renorm_min, scale, _ptr(saved.seg), _ptr(saved.ws), _ptr(h),
        _ptr(ga), _ptr(w_in), _ptr(w_out), D, W // 2, _DTYPES[x.dtype], _ptr(dx), _ptr(d_wout), _ptr(d_probs),
        _ptr(d_logits_in), _ptr(d_logits), _packed_min(None, g.dtype if g.dtype == x.dtype else None, nn=True),
        _packed_min(None, x.dtype, nn=True), fuse, _ptr(wa), ctypes.byref(deferred), _threads())
    if rc != 0:
        raise RuntimeError(f"moekit CPU kernel moe_route_train_bwd returned {rc}: arguments the checks let through")
    del ga, wa
    saved.fused = deferred.value != 0
    d_win = None
    if need_w_in:
        d_win = torch.empty_like(w_in)
        late_dx = dx if deferred.value & 2 else None
        _call(lib.moe_route_train_bwd_in, _ptr(h), _ptr(x), x.stride(0), _ptr(saved.seg), E, D, W // 2,
              _DTYPES[x.dtype], _ptr(d_win), _ptr(w_in), _ptr(late_dx),
              _ptr(d_logits if late_dx is not None else None), _ptr(router_w), _DTYPES[router_w.dtype], T,
              _packed_min(None, x.dtype, nn=True), _threads())
    del h
    saved.seg = saved.ws = None
    if dx is not None and dx.dtype != dx_dtype:
        dx = dx.to(dx_dtype)  # (before the router's gradient: the peak holds one copy of dx, not both)
    d_wr = None
    if need_router_w:
        d_wr = torch.empty_like(router_w)
        small_experts_outer(d_logits, None, x, None, None, None, d_wr.unsqueeze(0))
    return dx, d_win, d_wout, d_logits, d_wr


def _bounds(start: torch.Tensor | None, end: torch.Tensor | None, E: int, rows: int):
    """The ``start``/``end`` pointers of a grouped call; both None: one expert (``E == 1``) owning all ``rows`` rows,
    passed from a ctypes array rather than two tensors (a single-matrix call allocates nothing for them). Returns
    ``(start_ptr, end_ptr, keep)``: ``keep`` must stay referenced until the call returns."""
    if start is None and end is None:
        if E != 1:
            raise ValueError(f"start and end may be omitted only for a single expert, got {E} experts")
        keep = (ctypes.c_int64 * 2)(0, rows)
        base = ctypes.addressof(keep)
        return base, base + 8, keep
    if start is None or end is None:
        raise ValueError("give both start and end, or neither (one expert owning every row)")
    _vector(start, "start", E, torch.int64)
    _vector(end, "end", E, torch.int64)
    return _ptr(start), _ptr(end), None


def small_experts_nn(a: torch.Tensor, a_idx: torch.Tensor | None, w: torch.Tensor, start: torch.Tensor | None,
                     end: torch.Tensor | None, out: torch.Tensor, out_idx: torch.Tensor | None = None,
                     packed_min_rows: int | None = None) -> None:
    """``a[rows of e] @ w[e]`` for every expert at once, ``w`` stacked ``[E, K, N]`` (N contiguous): the data
    gradients of backward (``g @ W_down``, ``dH @ W_up``). Row ``s`` of expert ``e`` (``start[e] <= s < end[e]``;
    both None: a single expert owning every row of ``a``, or of ``a_idx``) reads ``a[a_idx[s]]`` (or ``a[s]``).
    Without ``out_idx`` the result is written to ``out[s]`` (``out``'s dtype); with it, added to float32
    ``out[out_idx[s]]`` (distinct within an expert; race-free; its packed experts' terms first, as in
    :func:`small_experts_down`). ``packed_min_rows``: as in :func:`small_experts_up`, its defaults
    :data:`PACKED_NN_MIN_ROWS`, :data:`PACKED_NN_MIN_ROWS_AVX512` and :data:`AMX_NN_MIN_ROWS`."""
    E, Kd, N = w.shape
    ld_a = _rows(a, "a", (a.shape[0], Kd))
    _stacked(w, "w", (E, Kd, N), w.dtype)
    _dt(w, "w")
    p_start, p_end, keep = _bounds(start, end, E, a.shape[0] if a_idx is None else a_idx.shape[0])
    if out_idx is not None and out.dtype != torch.float32:
        raise ValueError(f"accumulating into out needs float32, got {out.dtype}")
    ld_out = _rows(out, "out", (out.shape[0], N))
    _call(_require().moe_small_nn, _ptr(a), _dt(a, "a"), ld_a, _ptr(a_idx), _ptr(w), _dt(w, "w"), Kd, N, p_start,
          p_end, E, _ptr(out), _dt(out, "out"), ld_out, _ptr(out_idx),
          _packed_min(packed_min_rows, a.dtype if w.dtype == a.dtype else None, nn=True),
          _threads())
    del keep


def small_experts_outer(a: torch.Tensor, a_idx: torch.Tensor | None, b: torch.Tensor, b_idx: torch.Tensor | None,
                        start: torch.Tensor | None, end: torch.Tensor | None, grad: torch.Tensor) -> None:
    """Weight gradients of every expert at once: ``grad[e] = a[rows of e]^T @ b[rows of e]`` for ``grad`` stacked
    ``[E, N, K]`` (contiguous, any of float32/bfloat16), row ``s`` reading ``a[a_idx[s]]`` and ``b[b_idx[s]]`` (or
    row ``s``); ``start``/``end`` both None: a single expert owning every row of ``a`` (or of ``a_idx``), its
    gradient zeroed where there are none. Experts of ``start``/``end`` with no rows are left untouched."""
    E, N, Kd = grad.shape
    ld_a = _rows(a, "a", (a.shape[0], N))
    ld_b = _rows(b, "b", (b.shape[0], Kd))
    _stacked(grad, "grad", (E, N, Kd), grad.dtype)
    _dt(grad, "grad")
    rows = a.shape[0] if a_idx is None else a_idx.shape[0]
    if start is None and end is None and E == 1 and not rows:  # (the sum of no products)
        grad.zero_()
        return
    p_start, p_end, keep = _bounds(start, end, E, rows)
    _call(_require().moe_small_outer, _ptr(a), _dt(a, "a"), ld_a, _ptr(a_idx), _ptr(b), _dt(b, "b"), ld_b, _ptr(b_idx),
          N, Kd, p_start, p_end, E, _ptr(grad), _dt(grad, "grad"), _threads())
    del keep
