"""Compile ahead, in parallel, every Triton kernel specialisation the GPU benchmark will launch, into Triton's cache.

Triton's JIT compiles each specialisation at its first launch, one after another in the launching process (a second
or more each, with ``ptxas``). ``benchmarks/bench_gpu.py`` runs one process per shape and dtype, each compiling its
own kernels in turn before it can time anything, on a lease with minutes to spend. This records the launches of
every layer step the benchmark runs (both shapes, fp32 and bf16, the token counts, inference and training, and the
other choice of tiles where ``bench_gpu.py`` times it), on CPU tensors through ``bench_triton_host.py``'s stand-ins
with the layer built as the benchmark builds it (from transformers' block where transformers is installed), keeps
one launch per specialisation, and compiles them in worker processes: on a GPU through the JIT itself
(``kernel.warmup``: the cache entries the benchmark's launches look up), without one (``--target``) ahead of time for
that target (:func:`moekit.kernels.triton_aot.compile_launch`, the same compiler and the same cache; its entries are
those of Triton 3.9's JIT). What a later process launches that is not in the cache still compiles as always.

    python benchmarks/warm_triton.py                      (on the GPU machine, from the repository root)
    python benchmarks/warm_triton.py --target cuda:90     (anywhere: the compiles for an sm_90 GPU)

Prints the launches recorded, the distinct specialisations, the entries Triton's cache gained and the time.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (sass_triton, bench_triton_host: in spawned workers too)

from moekit.benchmark import SHAPES, TOKENS  # noqa: E402

DTYPES = ("float32", "bfloat16")
MODES = ("fwd", "fwd+bwd")


class Ptr:
    """A tensor argument as Triton's JIT specialises it: its dtype and its address modulo 16 (the alignment hint),
    small enough to send to a worker process."""

    def __init__(self, dtype: torch.dtype, address: int):
        self.dtype, self.address = dtype, 1024 + address % 16

    def data_ptr(self) -> int:
        return self.address


def _spec(param, value):
    """What the JIT's specialisation keeps of one argument (or more: a finer key only compiles a launch twice,
    the second time from the cache): a tensor's dtype and 16-byte alignment; an integer's being 1, divisible by 16
    and within 32 bits; a constexpr's value; anything else by value."""
    if hasattr(value, "data_ptr"):
        return "ptr", str(value.dtype), value.data_ptr() % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool) and not param.is_constexpr:
        return "int", value == 1, value % 16 == 0, -2**31 <= value < 2**31
    return "value", repr(value)


def spec_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """A key equal for two launches only if the JIT compiles them to the same code (it may tell apart launches the
    JIT would not)."""
    return (kernel.fn.__module__, kernel.__name__, tuple(_spec(p, a) for p, a in zip(kernel.params, args)),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


def _layer(shape: str, dtype: torch.dtype, backend: str = "triton"):
    """The layer as ``bench_gpu.py`` builds it: from transformers' block where transformers is installed."""
    import moekit

    s = SHAPES[shape]
    try:
        from moekit.benchmark import hf_block

        return moekit.from_hf(hf_block(s, dtype), backend=backend).to(dtype)
    except ImportError:
        return moekit.MoE(**{k: v for k, v in s.items() if k != "family"}, backend=backend).to(dtype)


def record(shapes=tuple(SHAPES), dtypes=DTYPES, tokens=TOKENS, modes=MODES) -> tuple[int, list]:
    """``(launches recorded, [(module, kernel name, args, kwargs)] one per specialisation)``: the layer steps of
    ``bench_gpu.py``, the Triton backend's under each choice of tiles it times (``triton_moe.other_tiles``) and the
    ``grouped_mm`` backend's (whose router runs Triton's routing kernels), arguments sendable to a worker (tensors
    as :class:`Ptr`)."""
    import sass_triton

    from moekit.kernels import triton_moe as tm

    seen: dict = {}
    n = 0
    for shape in shapes:
        for dtype in (getattr(torch, d) for d in dtypes):
            layers: dict = {}  # one per choice of tiles (a layer keeps the tiles it prepared for a token count)
            for T in tokens:
                other = tm.other_tiles(T * SHAPES[shape]["top_k"] / SHAPES[shape]["num_experts"], dtype)
                # (the grouped_mm layer's routing at the token counts where the Triton layer's runs in the index's
                # launch (route_and_align: up to 64 tokens); above, both launch the same routing kernels, and on CPU
                # tensors the grouped_mm layer's experts compute, for minutes at 8192 bf16 tokens)
                for backend, limits in (("triton", None), *([] if other is None else [("triton", other[1])]),
                                        *([("grouped_mm", None)] if T <= 64 else [])):
                    if (backend, repr(limits)) not in layers:
                        layers[backend, repr(limits)] = _layer(shape, dtype, backend)
                    layer = layers[backend, repr(limits)]
                    for mode in modes:
                        with tm.fma_rows(limits):
                            calls = sass_triton.layer_launches(shape, dtype, T, mode, layer=layer, both=True)
                        n += len(calls)
                        for kernel, args, kwargs in calls:
                            seen.setdefault(spec_key(kernel, args, kwargs), (
                                kernel.fn.__module__, kernel.__name__,
                                tuple(Ptr(a.dtype, a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args),
                                kwargs))
    return n, list(seen.values())


def compile_one(job: tuple, target: tuple | None) -> float:
    """Compile one specialisation into Triton's cache (seconds taken): through the JIT on this process's GPU
    (``target`` None; its launcher too), or ahead of time for ``target``."""
    module, name, args, kwargs = job
    kernel = getattr(importlib.import_module(module), name)
    t0 = time.perf_counter()
    if target is None:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        init = getattr(compiled, "_init_handles", None)
        if init is not None:  # (loads it and builds its launcher, which Triton caches on disk as well)
            init()
    else:
        from moekit.kernels.triton_aot import compile_launch

        compile_launch(kernel, args, kwargs, target)[1]()
    return time.perf_counter() - t0


def cache_dir() -> Path:
    """Triton's cache folder (``TRITON_CACHE_DIR``, else its default)."""
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):
        return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def entries() -> int:
    d = cache_dir()
    return sum(1 for p in d.iterdir() if p.is_dir()) if d.is_dir() else 0


def warm(jobs: list, workers: int, target: tuple | None) -> dict:
    """Compile ``jobs`` in ``workers`` processes (spawned: a GPU process cannot fork); per-job failures are counted
    and the first few reported, not raised (the benchmark compiles those itself)."""
    from rich.progress import track

    before, t0 = entries(), time.perf_counter()
    failed: list[str] = []
    busy = 0.0
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_one, job, target): job for job in jobs}
        for f in track(cf.as_completed(futures), total=len(futures), description="compiling", transient=True):
            if f.exception() is not None:
                failed.append(f"{futures[f][1]}: {type(f.exception()).__name__}: {f.exception()!s:.200}")
            else:
                busy += f.result()
    return {"specialisations": len(jobs), "failed": len(failed), "errors": failed[:3],
            "new_cache_entries": entries() - before, "seconds": time.perf_counter() - t0, "compile_s": busy}


def parse_target(text: str) -> tuple:
    """``cuda:90`` -> ``("cuda", 90, 32)``."""
    backend, _, arch = text.partition(":")
    if backend != "cuda" or not arch.isdigit():
        raise argparse.ArgumentTypeError(f"--target {text!r}: expected cuda:<compute capability>, e.g. cuda:90")
    return backend, int(arch), 32


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--target", type=parse_target, default=None,
                    help="compile ahead of time for this GPU (cuda:<compute capability>) instead of the one here")
    args = ap.parse_args(argv)
    if args.target is None and not torch.cuda.is_available():
        ap.error("no CUDA device here: name the GPU to compile for with --target (e.g. cuda:90)")
    t0 = time.perf_counter()
    n, jobs = record(args.shapes, args.dtypes, args.tokens, args.modes)
    recorded_s = time.perf_counter() - t0
    out = {"launches": n, "recorded_s": recorded_s, **warm(jobs, args.workers, args.target)}
    print(f"warm_triton: {out['launches']} launches recorded in {recorded_s:.1f} s, {out['specialisations']} "
          f"specialisations compiled in {out['seconds']:.1f} s by {args.workers} workers ({out['compile_s']:.1f} s of "
          f"compiling, one after another) into {cache_dir()} "
          f"({out['new_cache_entries']} new cache entries, {out['failed']} failed)", flush=True)
    for e in out["errors"]:
        print(f"  failed: {e}", flush=True)
    return out


if __name__ == "__main__":
    main()
