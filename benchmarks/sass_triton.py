"""What the Triton path's grouped GEMMs (and weight-gradient kernels) cost an H100 (sm_90), read from their machine code, on any machine: a static
measure (no GPU, no timing) for choosing tile configurations where no GPU is at hand.

Each case records the launches of one forward (and one forward + backward) of the experts at the benchmark's shapes
(``moekit.benchmark.SHAPES``: Mixtral-like and fine-grained) with a balanced routing (slot ``s`` to expert
``s mod E``), the launches replaced by records, then compiles every grouped-GEMM launch as Triton's JIT would
specialise it (:func:`moekit.kernels.triton_aot.compile_launch`) and reads the code
(:func:`~moekit.kernels.triton_aot.sass_stats`). Per GEMM: the tiles, the programs that work (row tiles that hold
rows x column tiles; for a weight gradient every expert's output tiles, each looping over its expert's rows), the
registers a thread, the instructions of the K loop's body and its steps (the most of any program). From them, per
case and summed over its GEMMs: the **longest program** (loop instructions x steps, summed over the GEMMs: what one
warp of the slowest program issues, the critical path where every program runs at once) and the **warp
instructions in all** (x warps x working programs: the issue work). Neither counts memory stalls, which is where
small GEMMs spend their time; they say how much each configuration asks of the SMs.

Each case is compiled under each choice of tiles the layer has at its rows: the layer's (``triton_moe.FMA_MAX_ROWS``
as it stands), 16-row ``tl.dot`` tiles only, and few-row tiles for 16-bit dtypes at one row per expert or fewer.

Writes ``benchmarks/results/sass_triton.json`` and the table between the SASS-TRITON markers of docs/performance.md.

``--spills`` instead compiles every Triton launch of a whole layer step (the router's kernels, the index, the GEMMs,
the combine and the backward's, recorded through ``bench_triton_host.py``'s stand-ins) at both shapes, fp32 and bf16,
these token counts, inference and training, and lists each specialisation that spills registers to local memory
(``benchmarks/results/sass_spills.json``, the SASS-SPILLS table of docs/performance.md).

    python benchmarks/sass_triton.py             (from the repository root; ~2 minutes, Triton's cache warm: seconds)
    python benchmarks/sass_triton.py --spills    (~4 minutes)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from rich.progress import track

import moekit
from moekit.benchmark import SHAPES, add_publish_args, publish

ROOT = Path.cwd()
OUT = ROOT / "benchmarks" / "results" / "sass_triton.json"
SPILLS_OUT = ROOT / "benchmarks" / "results" / "sass_spills.json"
DOC = ROOT / "docs" / "performance.md"
TOKENS = (1, 16, 128, 1024, 8192)
DTYPES = (torch.float32, torch.bfloat16)
MODES = ("fwd", "fwd+bwd")
TARGET = ("cuda", 90, 32)


def choices(dtype: torch.dtype, rows: float) -> dict[str, dict | None]:
    """The tile choices to compile at ``rows`` per expert: name -> ``FMA_MAX_ROWS`` (None: as it stands)."""
    from moekit.kernels import triton_moe as tm

    other = tm.other_tiles(rows, dtype)
    return {"layer": None, **({} if other is None else dict([other]))}


def record_launches(shape: str, dtype: torch.dtype, T: int, mode: str) -> tuple[list, torch.Tensor]:
    """The grouped-GEMM launches ``(grid, args, kwargs)`` of one pass of the experts, recorded instead of run, and
    the slots per expert."""
    from moekit.dispatch.local import LocalDispatcher
    from moekit.experts import Experts
    from moekit.experts import triton_backend as tb
    from moekit.kernels import triton_moe as tm
    from moekit.routing.base import RouterOutput

    s = SHAPES[shape]
    D, F, E, K = s["d_model"], s["d_ff"], s["num_experts"], s["top_k"]
    calls: list = []
    saved = tm._launch
    tm._launch = lambda kernel, grid, *a, **k: calls.append((kernel, grid, a, k))
    try:
        torch.manual_seed(0)
        ex = Experts(E, D, F).to(dtype)
        ids = (torch.arange(T * K) % E).view(T, K)
        train = mode == "fwd+bwd"
        weights = torch.full((T, K), 1.0 / K, requires_grad=train)
        logits = torch.zeros(T, E)
        plan = LocalDispatcher(E).plan(RouterOutput(logits, logits, ids, weights))
        x = torch.randn(T, D, dtype=dtype, requires_grad=train)
        with torch.set_grad_enabled(train):
            y = tb.TritonExpertsFunction.apply(x, ex.w_in, ex.w_out, ex.b_in, ex.b_out, plan.weights_TK,
                                               tb._Index.from_plan(plan), ex.activation, dtype, dtype)
            if train:  # (a contiguous gradient in the layer's dtype, as a layer without shared experts gets one)
                y.backward(torch.ones_like(y))
    finally:
        tm._launch = saved
    gemms = [(kernel, grid, a, k) for kernel, grid, a, k in calls
             if kernel.__name__ in ("_grouped_gemm_kernel", "_grouped_xty_kernel")]
    return gemms, plan.counts_E.clone()


#: the GEMMs of a pass in launch order: forward's up and down projections; backward's dA, the down projection's
#: weight gradient, dX, the up projection's weight gradient
ROLES = ("up", "down", "dA", "dW_down", "dX", "dW_up")


def measure(shape: str, dtype: torch.dtype, T: int, mode: str, memo: dict) -> dict:
    from moekit.kernels import triton_moe as tm
    from moekit.kernels.triton_aot import compile_launch, sass_stats

    s = SHAPES[shape]
    rows = T * s["top_k"] / s["num_experts"]
    out = {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "tokens": T, "mode": mode,
           "rows_per_expert": rows, "choices": {}}
    for name, fma in choices(dtype, rows).items():
        with tm.fma_rows(fma):
            gemms, counts = record_launches(shape, dtype, T, mode)
        per_gemm = []
        for i, (kernel, grid, args, kw) in enumerate(gemms):
            key, build = compile_launch(kernel, args, kw, TARGET)
            if key not in memo:
                memo[key] = sass_stats(build())
            st = memo[key]
            arg = dict(zip(kernel.arg_names, args))
            if kernel.__name__ == "_grouped_gemm_kernel":  # programs: row tiles of the used experts x column tiles
                programs = int(sum(math.ceil(int(c) / kw["BLOCK_M"]) for c in counts)) * \
                    math.ceil(arg["N"] / kw["BLOCK_N"])
                steps = [math.ceil(arg["K"] / kw["BLOCK_K"])] * programs
            else:  # an expert's output tiles (idle experts' too: they write zeros), each over the expert's rows
                out_tiles = math.ceil(arg["M"] / kw["BLOCK_M"]) * math.ceil(arg["N"] / kw["BLOCK_N"])
                steps = [math.ceil(int(c) / kw["BLOCK_K"]) for c in counts for _ in range(out_tiles)]
                programs = len(steps)
            per_gemm.append({
                "gemm": ROLES[i] if i < len(ROLES) else f"gemm{i}",
                "tiles": f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}",
                "cuda_cores": bool(kw["FMA"]), "programs": programs, "grid": grid[0], "warps": kw["num_warps"],
                "registers": st["registers"], "shared": st["shared"], "spill_stores": st["ops"].get("STL", 0),
                "loop": st["loop"], "loop_ops": st["loop_ops"], "steps": max(steps),
                "program_warp_instructions": st["loop"] * max(steps),
                "warp_instructions": st["loop"] * sum(steps) * kw["num_warps"]})
        out["choices"][name] = {
            "gemms": per_gemm,
            "longest_program": sum(g["program_warp_instructions"] for g in per_gemm),
            "warp_instructions": sum(g["warp_instructions"] for g in per_gemm),
        }
    return out


def run(shapes=tuple(SHAPES), dtypes=DTYPES, tokens=TOKENS, modes=MODES) -> dict:
    import triton

    memo: dict = {}
    cases = [(sh, dt, T, m) for sh in shapes for dt in dtypes for T in tokens for m in modes]
    rows = [measure(*c, memo) for c in track(cases, description="compiling for sm_90")]
    return {"meta": {"target": "sm_90 (H100), warp 32", "triton": triton.__version__, "torch": torch.__version__},
            "rows": rows}


def _k(n: float) -> str:
    return f"{n / 1e3:.1f}k" if n < 1e6 else f"{n / 1e6:.2f}M"


def table(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"Compiled for {m['target']} by Triton {m['triton']} without a GPU (`python benchmarks/sass_triton.py`): per "
        "pass, summed over its grouped GEMMs (forward: up and down projections; with backward also dA, dX and the "
        "two weight gradients), the warp instructions of the longest program's K loops (the critical path where all "
        "programs run at once) and in all. Static: memory stalls, where small GEMMs spend "
        "their time, are not counted. Each choice of tiles the layer has at these rows; **layer** is its own.",
        "",
        "| shape | dtype | T | pass | rows / expert | tiles (layer) | programs | registers | longest program | in all "
        "| other choice | its longest program | its in all |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in result["rows"]:
        mine = r["choices"]["layer"]
        other = [(n, c) for n, c in r["choices"].items() if n != "layer"]
        tiles_ = ", ".join(sorted({g["tiles"] + (" (CUDA cores)" if g["cuda_cores"] else "") for g in mine["gemms"]}))
        progs = "/".join(str(g["programs"]) for g in mine["gemms"])
        regs = "/".join(str(g["registers"]) for g in mine["gemms"])
        cells = ["", "", ""]
        if other:
            n, c = other[0]
            cells = [n, f"{_k(c['longest_program'])} ({c['longest_program'] / mine['longest_program']:.2f}×)",
                     f"{_k(c['warp_instructions'])} ({c['warp_instructions'] / mine['warp_instructions']:.2f}×)"]
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['tokens']} | {r['mode']} | {r['rows_per_expert']:g} | "
                     f"{tiles_} | {progs} | {regs} | {_k(mine['longest_program'])} | {_k(mine['warp_instructions'])} "
                     f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def layer_launches(shape: str, dtype: torch.dtype, T: int, mode: str, layer: moekit.MoE | None = None,
                   both: bool = False) -> list:
    """Every Triton launch ``(kernel, args, kwargs)`` of one step of a whole layer (``bench_triton_host.py``'s
    stand-ins: routing, index, experts, combine; with backward), the second of two steps (``both``: of the two).
    ``layer``: the layer to step (default: a fresh one of the shape, Triton backend)."""
    import bench_triton_host as bth

    from moekit.kernels import triton_moe as tm

    s = SHAPES[shape]
    D, F, E, K = s["d_model"], s["d_ff"], s["num_experts"], s["top_k"]
    torch.manual_seed(0)
    layer = layer if layer is not None else moekit.MoE(D, F, E, K, backend="triton").to(dtype)
    calls: list = []
    with bth.stand_ins() as stand:
        def launch(kernel, grid, *args, **kwargs):
            calls.append((kernel, args, kwargs))
            stand.launch(kernel, grid, *args, **kwargs)

        tm._launch = launch  # (stand_ins puts the real one back)
        step = bth.make_step(layer, torch.randn(T, D).to(dtype), mode)
        step()
        if not both:
            calls.clear()
        step()
    return calls


def spills(shapes=tuple(SHAPES), dtypes=DTYPES, tokens=TOKENS, modes=MODES) -> dict:
    """Each distinct specialisation of every kernel a layer step launches, compiled: its registers and spill stores,
    and the cases that launch it."""
    import triton

    from moekit.kernels.triton_aot import compile_launch, sass_stats

    seen: dict = {}
    cases = [(sh, dt, T, m) for sh in shapes for dt in dtypes for T in tokens for m in modes]
    for sh, dt, T, m in track(cases, description="compiling layer steps for sm_90"):
        for kernel, args, kwargs in layer_launches(sh, dt, T, m):
            key, build = compile_launch(kernel, args, kwargs, TARGET)
            if key not in seen:
                st = sass_stats(build())
                seen[key] = {"kernel": kernel.__name__, "registers": st["registers"],
                             "spill_stores": st["ops"].get("STL", 0), "spill_loads": st["ops"].get("LDL", 0),
                             "instructions": st["instructions"], "num_warps": kwargs.get("num_warps", 4),
                             "mma_in_loop": st["loop_ops"].get("HGMMA", 0), "mma_waits_in_loop": st["loop_waits"],
                             "constexprs": {k: str(v) for k, v in kwargs.items() if k.isupper()}, "cases": []}
            case = f"{sh} {str(dt).removeprefix('torch.')} T={T} {m}"
            if case not in seen[key]["cases"]:
                seen[key]["cases"].append(case)
    return {"meta": {"target": "sm_90 (H100), warp 32", "triton": triton.__version__, "torch": torch.__version__,
                     "cases": len(cases)}, "kernels": list(seen.values())}


def serialised(k: dict) -> bool:
    """Whether a compiled kernel waits for its tensor-core products one by one in its K loop (more than one wait a
    step: ``ptxas`` serialised them)."""
    return k.get("mma_in_loop", 0) > 1 and k.get("mma_waits_in_loop", 0) > 1


def spills_table(result: dict) -> str:
    m, ks = result["meta"], result["kernels"]
    spilling = [k for k in ks if k["spill_stores"] or k["spill_loads"]]
    bad = [k for k in ks if k["spill_stores"] or k["spill_loads"] or serialised(k)]
    lines = [f"Every Triton launch of a layer step at both shapes, fp32 and bf16, T = {', '.join(map(str, TOKENS))}, "
             f"inference and training ({m['cases']} steps), compiled for {m['target']} by Triton {m['triton']} "
             f"without a GPU (`python benchmarks/sass_triton.py --spills`): {len(ks)} distinct specialisations, "
             f"{len(spilling)} of them spilling registers to local memory, "
             f"{sum(map(serialised, ks))} waiting for each tensor-core product in their K loop "
             f"(of {sum(k.get('mma_in_loop', 0) > 0 for k in ks)} with tensor-core products there)"
             + (":" if bad else ".")]
    if bad:
        lines += ["", "| kernel | tiles and flags | warps | registers | spill stores / loads | tensor-core products "
                  "/ waits a K step | launched by |", "|---|---|---:|---:|---:|---:|---|"]
        for k in bad:
            c = k["constexprs"]
            tiles = "x".join(c[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if n in c) or \
                ", ".join(f"{n}={v}" for n, v in c.items() if n.startswith(("BLOCK", "CHUNK")))
            flags = ", ".join(n for n in ("GATHER", "SCATTER", "SCALE", "FMA") if c.get(n) == "True")
            lines.append(f"| `{k['kernel']}` | {tiles}{' ' + flags if flags else ''}, {c.get('DTYPE', '')} | "
                         f"{k['num_warps']} | {k['registers']} | {k['spill_stores']} / {k['spill_loads']} | "
                         f"{k.get('mma_in_loop', 0)} / {k.get('mma_waits_in_loop', 0)} | "
                         f"{'; '.join(k['cases'][:3])}{' ...' if len(k['cases']) > 3 else ''} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--spills", action="store_true", help="list the register spills of every kernel of a "
                        "layer step instead (its own JSON and table)")
    add_publish_args(parser, OUT, DOC)
    args = parser.parse_args(argv)
    if args.spills:
        result = spills(tokens=tuple(args.tokens))
        out = SPILLS_OUT if args.out == OUT else args.out
        publish(result, spills_table(result), out, None if args.no_doc else DOC, "SASS-SPILLS")
        return
    result = run(tokens=tuple(args.tokens))
    publish(result, table(result), args.out, None if args.no_doc else DOC, "SASS-TRITON")


if __name__ == "__main__":
    main()
