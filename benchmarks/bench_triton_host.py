"""Host time of the GPU (Triton) path, measured on any machine: what moekit's own Python and PyTorch calls cost around
the kernels of one inference forward and one training step, with every Triton launch replaced by a stand-in.

On a GPU a small layer is bound by its host: each PyTorch op or kernel launch costs 5-80 us to issue, far more than
the kernels of a few tokens take (see the README's GPU section). This measures the part moekit controls, on CPU
tensors: the layer's Python, its argument checks and tile configurations, the PyTorch ops around the kernels
(allocations, views, the balancing losses) and the autograd machinery; not Triton's own launcher (a stand-in
records each launch; those of the routing and of the index write valid routings, so the rest runs as it would).
The router's GEMM is PyTorch's, as off the CPU (here it also computes: ~1 MFLOP at 16 tokens), and the
CPU-only fast paths (fused decode, few-token training step, the CPU kernels' router GEMM), which a GPU never takes,
are switched off.

Per case: the median over rounds (single-threaded, after warm-up; each round times every case once), the Triton
launches per step, the top-level PyTorch operators per step (torch.profiler) and how many of those would launch a
kernel on a GPU (not views, allocations, detaches, casts to the same dtype): what a CUDA graph of the step replays.

The same stand-ins give the path's memory: the tensors a training step allocates do not depend on the device, so
the peak of a training step's allocations (``moekit.benchmark.peak_alloc_mb``, the CPU analogue of
``torch.cuda.max_memory_allocated`` above what was held before) is measured for the large batches the GPU table
reports memory for, against transformers' ``grouped_mm`` block on the same weights measured the same way (on CPU;
its allocations are PyTorch's own ops, the same on a GPU up to the caching allocator's rounding).

Writes ``benchmarks/results/triton_host_cpu.json`` and the tables between the TRITON-HOST markers of
docs/performance.md.

    python benchmarks/bench_triton_host.py        (from the repository root; ~3 minutes, two of them the
                                                  transformers block's bf16 GEMMs on a CPU without bf16 arithmetic)
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.progress import track

import moekit
from moekit.benchmark import add_publish_args, cpu_name, publish

ROOT = Path.cwd()
OUT = ROOT / "benchmarks" / "results" / "triton_host_cpu.json"
DOC = ROOT / "docs" / "performance.md"
SHAPES = {"mixtral": (512, 1408, 8, 2), "fine_grained": (512, 256, 64, 8)}
TOKENS = (1, 16)
MODES = ("fwd", "fwd+bwd")
#: (shape, dtype, T) of the training steps whose peak memory is measured
MEMORY_CASES = (("mixtral", torch.float32, 1024), ("mixtral", torch.bfloat16, 1024), ("mixtral", torch.float32, 8192),
                ("fine_grained", torch.float32, 1024), ("fine_grained", torch.bfloat16, 1024),
                ("fine_grained", torch.float32, 8192))


class StandIns:
    """Triton launches replaced by records; the routing kernel writes a valid routing (slot ``s`` to expert
    ``s % E``) and the index kernels an identity order, so the ops after them index within bounds. ``fills``: the
    PyTorch ops these writes took (not the layer's)."""

    def __init__(self):
        self.names, self.fills, self._cache = [], 0, {}

    def _fill(self, t: torch.Tensor, mod: int | None = None) -> None:
        key = (mod, t.numel(), t.dtype)
        if key not in self._cache:
            s = torch.arange(t.numel())
            self._cache[key] = (s if mod is None else s % mod).to(t.dtype).view(t.shape)
        t.copy_(self._cache[key])
        self.fills += 1

    def launch(self, kernel, grid, *args, **kwargs) -> None:
        name = kernel.__name__
        self.names.append(name)
        if name == "_topk_softmax_kernel":  # (logits_TE, stride, bias, ids, ...)
            self._fill(args[3], mod=args[0].shape[1])
        elif name == "_align_kernel":  # (ids, order, token, counts, ...)
            self._fill(args[1]), self._fill(args[2])
            args[3].zero_()
            self.fills += 1
        elif name == "_align_place_kernel":  # (ids, base, order, token, ...)
            self._fill(args[2]), self._fill(args[3])
        elif name == "_route_align_kernel":  # (logits_TE, stride, bias, ids, weights, p, order, token, counts, ...)
            self._fill(args[3], mod=args[0].shape[1])
            self._fill(args[6]), self._fill(args[7])
            args[8].zero_()
            self.fills += 1


@contextlib.contextmanager
def stand_ins():
    """Triton usable on CPU tensors, its launches recorded by :class:`StandIns`, the router's GEMM as off the CPU
    (``moekit.kernels.cpu_gemm.on_cpu`` False: PyTorch's GEMMs, not the CPU kernels)."""
    from moekit.experts import triton_backend as tb
    from moekit.kernels import cpu_gemm
    from moekit.kernels import triton_moe as tm

    s = StandIns()
    saved = tm._launch, tb.triton_usable, cpu_gemm.on_cpu
    tm._launch, tb.triton_usable, cpu_gemm.on_cpu = s.launch, (lambda device, dtype: None), (lambda t: False)
    try:
        yield s
    finally:
        tm._launch, tb.triton_usable, cpu_gemm.on_cpu = saved


def make_step(layer: moekit.MoE, x: torch.Tensor, mode: str):
    layer.__dict__["_fused_decode"] = lambda x: None  # (CPU-only paths, which a GPU never takes)
    layer.__dict__["_fused_train_step"] = lambda x_TD: None
    if mode == "fwd":
        layer.eval()

        def step():
            with torch.no_grad():
                layer(x)
    else:
        layer.train()

        def step():
            xi = x.detach().requires_grad_(True)
            y = layer(xi)
            y.backward(torch.ones_like(y))
            for p in layer.parameters():
                p.grad = None
    return step


#: top-level operators that launch no kernel on a GPU: views, allocations, detaches
NO_KERNEL = {"view", "_unsafe_view", "view_as", "reshape", "t", "transpose", "permute", "expand", "narrow", "select",
             "slice", "detach", "unsqueeze", "squeeze", "split", "split_with_sizes", "as_strided", "alias", "flatten",
             "unflatten", "empty", "empty_like", "new_empty", "empty_strided", "to", "contiguous", "type_as"}
#: ... unless they copy (a cast, a reshape or contiguous of a strided tensor): an operator below them
COPYING = {"aten::copy_", "aten::clone", "aten::_to_copy"}


def op_counts(step) -> tuple[int, int]:
    """``(top-level PyTorch operators, those of them that launch a kernel on a GPU)`` in one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()

    def copies(e) -> bool:
        return any(c.name in COPYING or copies(c) for c in e.cpu_children)

    tops = [e for e in prof.events() if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    kernels = sum(1 for e in tops if e.name.removeprefix("aten::") not in NO_KERNEL or copies(e))
    return len(tops), kernels


def run(rounds: int = 21, per_round: int = 40, tune_allocator: bool = True) -> dict:
    """``tune_allocator``: glibc keeps freed large blocks (:func:`moekit.utils.tune_cpu_allocator`, process-wide), as
    a GPU's caching allocator does; else a training step's weight gradients come from a fresh ``mmap`` each step,
    a cost no GPU step has."""
    if tune_allocator:
        from moekit.utils import tune_cpu_allocator

        tune_cpu_allocator()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the host thread that issues a GPU's work)
    try:
        return _run(rounds, per_round)
    finally:
        torch.set_num_threads(threads)


def _run(rounds: int, per_round: int) -> dict:
    cases = [(s, d, t, m) for s in SHAPES for d in (torch.bfloat16, torch.float32) for t in TOKENS for m in MODES]
    steps, rows = [], []
    with stand_ins() as s:
        for shape, dtype, T, mode in cases:
            D, F, E, K = SHAPES[shape]
            torch.manual_seed(0)
            layer = moekit.MoE(D, F, E, K, backend="triton").to(dtype)
            step = make_step(layer, torch.randn(T, D).to(dtype), mode)
            for _ in range(per_round):
                step()
            s.names.clear()
            step()
            launches = len(s.names)
            s.fills = 0
            ops, kernels = op_counts(step)  # (less the stand-ins' own writes, each one kernel)
            steps.append(step)
            rows.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."), "tokens": T, "mode": mode,
                         "launches": launches, "ops": ops - s.fills, "torch_kernels": kernels - s.fills,
                         "times_us": []})
        # round-robin: every round times each case once, so a drift of the machine hits every case alike; and a
        # yardstick of this machine's speed at the time: one plain PyTorch operator (this VM's speed drifts by a
        # third between runs, so the steps' times are best read in plain operators)
        a, b = torch.randn(16, 512), torch.randn(16, 512)
        plain_op_us = []
        for _ in track(range(rounds), description="host time"):
            for step, row in zip(steps, rows):
                t0 = time.perf_counter()
                for _ in range(per_round):
                    step()
                row["times_us"].append((time.perf_counter() - t0) / per_round * 1e6)
            t0 = time.perf_counter()
            for _ in range(per_round * 20):
                torch.add(a, b)
            plain_op_us.append((time.perf_counter() - t0) / (per_round * 20) * 1e6)
    for row in rows:
        row["host_us"] = statistics.median(row["times_us"])
    import triton

    return {"rows": rows, "plain_op_us": statistics.median(plain_op_us),
            "machine": {"cpu": cpu_name(), "threads": 1, "torch": torch.__version__, "triton": triton.__version__,
                        "python": platform.python_version()}}


def memory() -> list[dict]:
    """Peak MiB of one training step's allocations: the Triton path (launches stubbed) and transformers' block with
    ``grouped_mm``, on the same weights (:func:`moekit.benchmark.share_hf`)."""
    from moekit import benchmark as mb
    from moekit.interop.patch import share_hf

    rows = []
    for shape, dtype, T in track(MEMORY_CASES, description="peak memory"):
        D, F, E, K = SHAPES[shape]
        block = mb.hf_block(mb.SHAPES.get(shape) or dict(family="mixtral", d_model=D, d_ff=F, num_experts=E,
                                                         top_k=K), dtype)
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(0)).to(dtype)
        with stand_ins():
            mk = mb.peak_alloc_mb(make_step(share_hf(block, backend="triton"), x, "fwd+bwd"))
        hf = mb.peak_alloc_mb(mb.make_step(mb._HFImpl(block, "grouped_mm"), x[None], "fwd+bwd"))
        rows.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."), "tokens": T, "moekit_triton_mb": mk,
                     "hf_grouped_mm_mb": hf})
    return rows


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Host time of the Triton path per step, launches replaced by stand-ins, {m['cpu']}, one thread, torch "
             f"{m['torch']}, Triton {m['triton']}: median µs; the kernels a GPU would run per step (Triton launches "
             "+ PyTorch operators that launch one: not views, allocations or casts to the same dtype), which a CUDA "
             "graph replays too; and all top-level PyTorch operators, each with its host cost "
             "(`python benchmarks/bench_triton_host.py`)."
             + (f" The machine's speed in the same rounds: one plain PyTorch operator (`torch.add` of two 16 × 512 "
                f"fp32 tensors) took {result['plain_op_us']:.2f} µs; the steps in such operators: forward / "
                f"forward+backward." if result.get("plain_op_us") else ""), "",
             "| shape | dtype | T | forward µs | kernels | ops | forward+backward µs | kernels | ops |"
             + (" steps in plain ops |" if result.get("plain_op_us") else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if result.get("plain_op_us") else "")]
    groups: dict = {}
    for r in result["rows"]:
        groups.setdefault((r["shape"], r["dtype"], r["tokens"]), {})[r["mode"]] = r
    for (shape, dt, T), by_mode in groups.items():
        cells = [f"{r['host_us']:.0f} | {r['launches']} + {r['torch_kernels']} | {r['ops']}"
                 for r in (by_mode[md] for md in MODES)]
        if result.get("plain_op_us"):
            cells.append(" / ".join(f"{by_mode[md]['host_us'] / result['plain_op_us']:.0f}" for md in MODES))
        lines.append(f"| {shape} | {dt} | {T} | " + " | ".join(cells) + " |")
    if result.get("memory"):
        lines += ["", "Peak memory of a training step's allocations (MiB above what was held before: PyTorch's CPU "
                  "allocator's running total), the Triton path with its launches stubbed against transformers' "
                  "`grouped_mm` block on the same weights, both measured on CPU.", "",
                  "| shape | dtype | T | moekit Triton path MiB | transformers grouped_mm MiB | moekit / HF |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in result["memory"]:
            mk, hf = r["moekit_triton_mb"], r["hf_grouped_mm_mb"]
            ratio = f"{mk / hf:.2f}" if mk and hf else ""
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['tokens']} | {mk:.1f} | {hf:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_publish_args(parser, OUT, DOC)
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory comparison (~2 minutes); the doc's tables are then left as they are")
    args = parser.parse_args(argv)
    from moekit.experts.triton_backend import triton_available

    if not triton_available():
        raise SystemExit("Triton is not installed: its launches are what this measures around")
    result = run()
    if not args.no_memory:
        result["memory"] = memory()
    # (without the memory table the doc would lose it: a partial run is printed and saved, not published)
    publish(result, table(result), args.out, None if args.no_doc or args.no_memory else DOC, "TRITON-HOST")


if __name__ == "__main__":
    main()
