"""Decode steps by router: the fused CPU decode (routing inside the experts' kernel call) against the same module's
regular path (the router's PyTorch steps, then the experts' decode kernel), same process, same weights.

For each router the fused decode routes as (softmax top-k; group-limited sigmoid top-k as in DeepSeek-V3: 8 groups
of 8 experts, 4 kept, or 4 groups of 2, 2 kept; plain sigmoid top-k; top-k softmax as in GPT-OSS), a layer of the
fine-grained shape of ../shared/DESIGN.md (d_model 512, d_ff 256, 64 experts, top-8) and the Mixtral-like one (512,
1408, 8, top-2), fp32 and bf16, T in {1, 4, 16} tokens:
the median of round-robin runs of ``layer(x)`` (no autograd, eval mode) with the fused decode and with it turned off
on the same module. Writes ``benchmarks/results/decode_routing_cpu.json`` and the table between the DECODE-ROUTING
markers of docs/performance.md.

    python benchmarks/bench_decode_routing.py        (from the repository root; ~2 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from rich.progress import track

import moekit
from moekit.benchmark import add_publish_args, cpu_name, publish, timeit_many
from moekit.kernels import cpu as kcpu
from moekit.utils import tune_cpu_allocator

ROOT = Path.cwd()
OUT = ROOT / "benchmarks" / "results" / "decode_routing_cpu.json"
DOC = ROOT / "docs" / "performance.md"
SHAPES = {"fine_grained": (512, 256, 64, 8), "mixtral": (512, 1408, 8, 2)}
ROUTERS = {
    "softmax_topk": dict(router="softmax_topk"),
    "sigmoid_topk, group-limited (DeepSeek-V3)": dict(router="sigmoid_topk",
                                                       router_kwargs=dict(n_group=8, topk_group=4, scale=2.5)),
    "sigmoid_topk, no groups": dict(router="sigmoid_topk"),
    "topk_softmax (GPT-OSS)": dict(router="topk_softmax", router_kwargs=dict(bias=True)),
}
TOKENS = (1, 4, 16)


def layer_for(shape: str, router: dict, dtype: torch.dtype) -> moekit.MoE:
    D, F, E, K = SHAPES[shape]
    kwargs = dict(router)
    if kwargs.get("router_kwargs", {}).get("n_group", 1) >= E:  # (8 experts: 4 groups of 2, 2 kept)
        kwargs["router_kwargs"] = dict(kwargs["router_kwargs"], n_group=4, topk_group=2)
    torch.manual_seed(0)
    layer = moekit.MoE(D, F, E, K, **kwargs).to(dtype).eval()
    with torch.no_grad():
        layer.router.expert_bias.uniform_(-0.05, 0.05)
    return layer


def run() -> dict:
    tune_cpu_allocator()
    rows = []
    cases = [(s, r, d, t) for s in SHAPES for r in ROUTERS for d in (torch.float32, torch.bfloat16) for t in TOKENS]
    for shape, router, dtype, T in track(cases, description="decode steps"):
        layer = layer_for(shape, ROUTERS[router], dtype)
        x = torch.randn(T, SHAPES[shape][0]).to(dtype)
        with torch.no_grad():
            fused = layer._fused_decode(x) is not None

            def regular():
                layer.__dict__["_fused_decode"] = lambda x: None  # (the regular path on the same module)
                try:
                    layer(x)
                finally:
                    del layer.__dict__["_fused_decode"]

            times = timeit_many({"fused": lambda: layer(x), "regular": regular}, min_rounds=15, max_rounds=61,
                                budget_s=2.0, warm_runs=2)
        rows.append({"shape": shape, "router": router, "dtype": str(dtype).removeprefix("torch."), "tokens": T,
                     "fused_decode_taken": fused, "fused_ms": times["fused"][0], "regular_ms": times["regular"][0],
                     "runs": times["fused"][1]})
    return {"rows": rows, "machine": {"cpu": cpu_name(), "isa": kcpu.isa(), "threads": torch.get_num_threads(),
                                      "torch": torch.__version__, "python": platform.python_version()}}


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"One decode step of a layer, `layer(x)` without autograd, {m['cpu']} ({m['isa']} kernels), "
             f"{m['threads']} threads: median µs of round-robin runs, the fused decode against the regular path on "
             "the same module (`python benchmarks/bench_decode_routing.py`).", "",
             "| shape | router | dtype | T = 1 fused / regular | T = 4 | T = 16 |", "|---|---|---|---:|---:|---:|"]
    groups: dict = {}
    for r in result["rows"]:
        groups.setdefault((r["shape"], r["router"], r["dtype"]), {})[r["tokens"]] = r
    for (shape, router, dt), by_t in groups.items():
        cells = [f"{1e3 * by_t[t]['fused_ms']:.0f} / {1e3 * by_t[t]['regular_ms']:.0f} "
                 f"({by_t[t]['regular_ms'] / by_t[t]['fused_ms']:.2f}×)" if by_t[t]["fused_decode_taken"]
                 else "not fused" for t in TOKENS]
        lines.append(f"| {shape} | {router} | {dt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_publish_args(parser, OUT, DOC)
    args = parser.parse_args(argv)
    if kcpu.library() is None:
        raise SystemExit(f"the CPU kernels are unavailable here ({kcpu.unavailable_reason()}): nothing to compare")
    result = run()
    publish(result, table(result), args.out, None if args.no_doc else DOC, "DECODE-ROUTING")


if __name__ == "__main__":
    main()
