"""The layer inside ``torch.compile`` on CPU: eager against compiled (where the layer runs eagerly on its kernels, one
graph break) and compiled with ``fullgraph=True`` (the layer traced whole, as compiled code without graph breaks
must run it: router and sort as PyTorch ops, the experts in moekit's custom operators), with transformers' MoE block (``grouped_mm`` experts) eager and compiled as the
peer, same process, same weights.

Shapes of ../shared/DESIGN.md (Mixtral-like and fine-grained), T in {1, 16, 128, 1024} tokens, forward (inference:
eval mode, no autograd) and forward+backward (training mode): the median ms of round-robin runs after warm-up, each
compiled candidate compiled afresh for its row (static shapes), its compile time recorded. Writes
``benchmarks/results/compile_cpu.json`` and the table between the COMPILE-BENCH markers of docs/performance.md.

    python benchmarks/bench_compile.py [--dtypes float32 bfloat16] [--tokens 1 16 128 1024]   (repository root;
    ~2 minutes for fp32 on 2 CPU cores, most of it compiling)
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from rich.progress import track

import moekit
from moekit.benchmark import SHAPES, _HFImpl, add_publish_args, cpu_name, hf_block, make_step, publish, share_hf, \
    timeit_many
from moekit.kernels import cpu as kcpu
from moekit.utils import tune_cpu_allocator

ROOT = Path.cwd()
OUT = ROOT / "benchmarks" / "results" / "compile_cpu.json"
DOC = ROOT / "docs" / "performance.md"
TOKENS = (1, 16, 128, 1024)
MODES = ("fwd", "fwd+bwd")
#: candidate -> (module to run, compile options or None for eager)
CANDIDATES = {
    "moekit": ("moekit", None),
    "moekit_compiled": ("moekit", {}),
    "moekit_fullgraph": ("moekit_traced", {"fullgraph": True}),
    "hf_grouped_mm": ("hf", None),
    "hf_grouped_mm_compiled": ("hf", {}),
}


class _Traced(torch.nn.Module):
    """The layer as ``fullgraph=True`` compiles it (:meth:`moekit.MoE.forward`: traced whole), under a forward of
    its own: compiled code is cached per function, whatever the compile options, so the same layer compiled both
    ways in one process would otherwise run the first compilation's code for both."""

    def __init__(self, layer: moekit.MoE):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer._forward(x, None)


def run(dtypes, tokens, shapes) -> dict:
    tune_cpu_allocator()
    rows = []
    cases = [(s, d, t, m) for s in shapes for d in dtypes for t in tokens for m in MODES]
    for shape_name, dtype, T, mode in track(cases, description="compiled and eager steps"):
        shape = SHAPES[shape_name]
        block = hf_block(shape, dtype)
        layer = share_hf(block)
        modules = {"moekit": layer, "moekit_traced": _Traced(layer), "hf": _HFImpl(block, "grouped_mm")}
        x = torch.randn(1, T, shape["d_model"]).to(dtype)
        torch._dynamo.reset()  # (each row compiled afresh for its shapes, static)
        steps, first_s = {}, {}
        for name, (which, options) in CANDIDATES.items():
            module = modules[which] if options is None else torch.compile(modules[which], **options)
            steps[name] = make_step(module, x, mode)
            t0 = time.perf_counter()
            steps[name]()  # (compiles)
            first_s[name] = time.perf_counter() - t0
        times = timeit_many(steps, min_rounds=11, max_rounds=41, budget_s=6.0 if T >= 1024 else 3.0, warm_runs=1)
        rows.append({"shape": shape_name, "dtype": str(dtype).removeprefix("torch."), "tokens": T, "mode": mode,
                     "ms": {n: times[n][0] for n in steps}, "runs": times["moekit"][1], "first_call_s": first_s})
    return {"rows": rows, "machine": {"cpu": cpu_name(), "isa": kcpu.isa(), "threads": torch.get_num_threads(),
                                      "torch": torch.__version__, "python": platform.python_version()}}


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']} ({m['isa']} kernels), {m['threads']} threads, torch {m['torch']}: median ms of "
             "round-robin runs (`python benchmarks/bench_compile.py`). **compiled**: `torch.compile(layer)`, where "
             "the layer runs eagerly on its kernels (one graph break); **fullgraph**: `torch.compile(layer, "
             "fullgraph=True)`, the layer traced whole, its experts in moekit's custom operators; transformers' block with "
             "its `grouped_mm` "
             "experts, eager and compiled. In brackets: over moekit eager.", "",
             "| shape | dtype | T | pass | moekit eager | compiled | fullgraph | HF grouped_mm eager | HF compiled "
             "| HF compiled / moekit compiled |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ms = r["ms"]
        e = ms["moekit"]

        def cell(n):
            return f"{ms[n]:.3g} ({ms[n] / e:.2f}×)"

        lines.append(f"| {r['shape']} | {r['dtype']} | {r['tokens']} | {r['mode']} | {e:.3g} | "
                     f"{cell('moekit_compiled')} | {cell('moekit_fullgraph')} | {cell('hf_grouped_mm')} | "
                     f"{cell('hf_grouped_mm_compiled')} | "
                     f"{ms['hf_grouped_mm_compiled'] / ms['moekit_compiled']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="*", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    add_publish_args(parser, OUT, DOC)
    args = parser.parse_args(argv)
    if kcpu.library() is None:
        raise SystemExit(f"the CPU kernels are unavailable here ({kcpu.unavailable_reason()}): nothing to compare")
    result = run([getattr(torch, d) for d in args.dtypes], args.tokens, args.shapes)
    publish(result, table(result), args.out, None if args.no_doc else DOC, "COMPILE-BENCH")


if __name__ == "__main__":
    main()
