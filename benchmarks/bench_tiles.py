"""Tile benchmark: which CPU kernel path serves experts of a given number of rows, for the thresholds in
``moekit.kernels.cpu`` (``PACKED_MIN_ROWS``, ``PACKED_MIN_ROWS_AVX512``, ``AMX_MIN_ROWS``) and
``moekit.experts.fused_function`` (``SMALL_M``, ``PACKED_AVX512_MAX_WORK``, ``AMX_MAX_WORK``).

For the Mixtral-like and fine-grained expert shapes, every expert given the same number of rows (tokens in random
order, as routing leaves them), the input projection (with SwiGLU, keeping ``h``, as training does) and the output
projection (with the weighted combine) are timed on:

- ``dot``: the dot-product tiles (``packed_min_rows=0``);
- ``packed``: the packed tiles (AVX2; float32 on AVX-512) or, for bf16 on AMX CPUs, the AMX tiles
  (``packed_min_rows=1``); n/a where the build has neither for the dtype;
- ``default``: what the kernels pick by their thresholds (``packed_min_rows=None``);
- ``library``: the faster GEMM library's product per expert on rows already gathered, alone (no gather, activation
  or combine: a floor for the layer's library path, which adds those).

Candidates run round-robin in one process (median of the rounds, and the median of each round's ratio to ``dot``).
Writes ``benchmarks/results/tiles_cpu[_amx|_avx2].json`` and the table in docs/performance.md.

    python benchmarks/bench_tiles.py            # under a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from moekit.benchmark import SHAPES, cpu_kind_suffix, cpu_name, write_marked_table
from moekit.kernels import cpu as kcpu
from moekit.kernels.cpu_gemm import linear
from moekit.utils import tune_cpu_allocator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROWS = (8, 16, 32, 64, 96, 128, 256, 512)
CANDIDATES = ("dot", "packed", "default", "library")


def _problem(shape: dict, rows: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    E, D, F = shape["num_experts"], shape["d_model"], shape["d_ff"]
    S = rows * E
    counts = torch.full((E,), rows, dtype=torch.int64)
    end = counts.cumsum(0)
    x = torch.randn(S, D, generator=gen).to(dtype)
    return dict(
        x=x, tok=torch.randperm(S, generator=gen), start=end - counts, end=end,
        w_in=(torch.randn(E, 2 * F, D, generator=gen) * D ** -0.5).to(dtype),
        w_out=(torch.randn(E, D, F, generator=gen) * F ** -0.5).to(dtype),
        a=torch.randn(S, F, generator=gen).to(dtype), w=torch.rand(S, generator=gen),
        out=torch.zeros(S, D), E=E, rows=rows,
    )


def _calls(p: dict, kernel: str, packed_ok: bool) -> dict:
    """candidate -> a call of it (None: not available in this build)"""
    def up(pm):
        return lambda: kcpu.small_experts_up(p["x"], p["tok"], p["start"], p["end"], p["w_in"], None, swiglu=True,
                                             keep_h=True, packed_min_rows=pm)

    def down(pm):
        return lambda: kcpu.small_experts_down(p["a"], p["tok"], p["w"], p["start"], p["end"], p["w_out"], None,
                                               p["out"], packed_min_rows=pm)

    make = up if kernel == "up" else down
    rows = [(p["x"] if kernel == "up" else p["a"])[e * p["rows"]:(e + 1) * p["rows"]] for e in range(p["E"])]
    weights = p["w_in"] if kernel == "up" else p["w_out"]

    def library():
        for e in range(p["E"]):
            linear(rows[e], weights[e])

    return {"dot": make(0), "packed": make(1) if packed_ok else None, "default": make(None), "library": library}


def _time(calls: dict, rounds: int) -> dict:
    live = {k: f for k, f in calls.items() if f is not None}
    for f in live.values():  # warm-up (and the kernels' first build)
        f()
    ts = {k: [] for k in live}
    names = list(live)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            live[k]()
            ts[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": statistics.median(v) * 1e3,
                "paired_vs_dot": statistics.median(a / b for a, b in zip(v, ts["dot"]))} for k, v in ts.items()}


def bench(shapes, rows_list, dtypes, rounds: int) -> dict:
    tuned = tune_cpu_allocator()
    if kcpu.library() is None:
        raise SystemExit(f"the CPU kernels are unavailable here: {kcpu.unavailable_reason()}")
    gen = torch.Generator().manual_seed(0)
    meta = {"processor": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "isa": kcpu.vector_isa(), "amx": kcpu.amx(), "allocator_tuned": tuned,
            "packed_width": {str(d).removeprefix("torch."): kcpu.packed_width(d) for d in dtypes}}
    out = []
    todo = [(s, d, r, k) for s in shapes for d in dtypes for r in rows_list for k in ("up", "down")]
    with Progress(console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("tiles", total=len(todo))
        for name, dtype, rows, kernel in todo:
            p = _problem(SHAPES[name], rows, dtype, gen)
            packed_ok = kcpu.packed_tiles(dtype) or (dtype == torch.bfloat16 and kcpu.amx())
            res = _time(_calls(p, kernel, packed_ok), rounds)
            D, F = SHAPES[name]["d_model"], SHAPES[name]["d_ff"]
            flops = 2 * rows * p["E"] * D * F * (2 if kernel == "up" else 1)
            pm = kcpu._packed_min(None, dtype)  # the threshold the defaults apply
            out.append({"shape": name, "dtype": str(dtype).removeprefix("torch."), "rows": rows, "kernel": kernel,
                        "gflop": flops / 1e9, "default_path": "packed" if pm and rows >= pm else "dot", **res})
            progress.advance(task)
    return {"meta": meta, "rows": out}


def summarise(result: dict) -> str:
    m = result["meta"]
    lines = [f"Measured on {m['processor']} ({m['threads']} threads), torch {m['torch']}, kernels: {m['isa']}"
             f"{', bf16 on AMX tiles' if m['amx'] else ''}. Each cell: median ms over the round-robin rounds, and "
             "in brackets the median of each round's ratio to `dot` (below 1: faster); **bold**: the fastest "
             "kernel path; `library`: the GEMMs alone on gathered rows.", "",
             "| shape | dtype | rows / expert | kernel | dot ms | packed ms | default ms | library ms | default path | "
             "GFLOP/s (best kernel) |",
             "|---|---|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in result["rows"]:
        kernels = {k: r[k]["median_ms"] for k in ("dot", "packed") if k in r}
        best = min(kernels, key=kernels.get)

        def cell(k):
            if k not in r:
                return "n/a"
            ms = f"{r[k]['median_ms']:.3g}"
            ms = f"**{ms}**" if k == best else ms
            return ms if k == "dot" else f"{ms} ({r[k]['paired_vs_dot']:.2f})"

        lines.append(f"| {r['shape']} | {r['dtype']} | {r['rows']} | {r['kernel']} | "
                     + " | ".join(cell(k) for k in CANDIDATES)
                     + f" | {r['default_path']} | {r['gflop'] / kernels[best] * 1e3:.0f} |")
    return "\n".join(lines)


def names() -> tuple[str, str]:
    suffix = cpu_kind_suffix()
    return f"tiles_cpu{suffix}.json", "TILES-BENCH" + suffix.replace("_", "-").upper()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="*", type=int, default=list(ROWS))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/tiles_cpu*.json)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/performance.md")
    args = ap.parse_args(argv)
    if args.rounds < 1 or any(r < 1 for r in args.rows):
        ap.error("--rounds and every --rows must be at least 1")
    result = bench(args.shapes, args.rows, [getattr(torch, d) for d in args.dtypes], args.rounds)
    name, marker = names()
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    table = summarise(result)
    print(table)
    if not args.no_docs:
        write_marked_table(ROOT / "docs" / "performance.md", table, marker)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
