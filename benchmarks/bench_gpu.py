"""GPU layer benchmark: moekit's ``triton`` and ``grouped_mm`` experts backends against the transformers MoE block
(each ``experts_implementation``: ``eager``, ``grouped_mm``, ``batched_mm``) on the same weights, in one process.

Same shapes as the CPU benchmark (:mod:`moekit.benchmark`: Mixtral-like D=512 F=1408 E=8 K=2, fine-grained D=512
F=256 E=64 K=8), T from 1 to 32768, fp32 and bf16, forward, forward+backward, and (T <= 16) forward with a cold L2.
Every candidate is also timed replayed as a CUDA graph (:func:`moekit.cuda_graphed`; ``--no-graphs`` to skip), since at
these sizes a layer's launches cost the host more than its kernels cost the GPU. Also in the same run: a dense SwiGLU FFN of equal active FLOPs, the experts' GEMMs alone on pre-sorted rows
(``torch._grouped_mm``, where it runs: the floor of any grouped-GEMM MoE), and the device's roofline, a large dense
GEMM (TFLOP/s; fp32 with and without TF32, bf16) and a large copy (GB/s). Timing: CUDA events, median of the repeats
after warm-up, candidates in an order shuffled every round, each run from an idle GPU; eager candidates are timed with
the host's issue of their launches (what running eagerly costs), CUDA graphs and the GEMM floor by the device's time
alone (the host queues the whole call behind a spin kernel first; see ``cuda_timeit_many``). Each moekit forward is also checked against the transformers
``eager`` output (max abs difference, in the row's note). Results go to ``benchmarks/results/layer_cuda.json``
(rewritten after every configuration, so an interrupted run keeps what it measured) and a markdown table is printed.

On the device machine, from the repository root:
    pip install --no-deps -e .
    python benchmarks/bench_gpu.py                      # full grid (about 5-10 minutes on an H100)
    python benchmarks/bench_gpu.py --quick              # T in {1, 1024}, bf16, a smoke run
    python benchmarks/bench_gpu.py --out $OUT/layer_cuda.json --shapes mixtral --dtypes bfloat16
    bash benchmarks/gpu_check.sh $OUT                   # CUDA tests, profile and benchmark, each time-limited
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import moekit
from moekit.benchmark import (HF_IMPLS, SHAPES, DenseFFN, Row, _dt, _f, _HFImpl, batched_mm_copy_bytes,
                              distinct_expert_bytes, drop_failing, expert_flops, hf_block, hf_peers, make_step,
                              write_marked_table)

TOKENS = (1, 16, 128, 1024, 8192, 32768)
MOEKIT_BACKENDS = ("triton", "grouped_mm")
RESULTS = Path.cwd() / "benchmarks" / "results"
#: the README's markers around the GPU table (``--merge ... --doc README.md``)
DOC_MARKER = "LAYER-BENCH-CUDA"


@dataclass
class GpuRow(Row):
    """A timed row: ``timing`` says how (``"device"``: the GPU's time alone, ``"issue"``: from an idle GPU, the host's
    issue included; see the timing notes below), ``host_ms`` is the median host time of the call itself."""
    timing: str = ""
    host_ms: float | None = None


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                         "On CPU run `python benchmarks/bench_layer.py` (or `moekit bench`) instead.")
    return torch.device("cuda")


# ----------------------------------------------------------------------------------------------- timing
# How a call is timed. CUDA events time the device: the span between two events is from when the GPU reaches the
# first to when it reaches the second. If the GPU is idle when the first is recorded, that span also holds the host's
# time to issue the call's work, and if the GPU is still busy with the call before, the host's issue is hidden behind
# it. Timed back to back in a fixed order, a candidate's figure therefore depended on its neighbour: in the first H200
# run moekit's graph replay, timed right after the eager candidates (idle GPU), carried the host's 31-49 us of issuing
# it, while transformers' graphs, queued behind moekit's still-running one, did not (moekit's forward graph took 0.070 ms
# at Mixtral-like bf16 T = 1 and 0.038 ms in the cold-L2 pass, where an L2 flush queued before every run hid everyone's
# issue; transformers' 0.060 and 0.063). Now every run starts from an idle GPU (synchronised), in an order shuffled each
# round, and is timed one of two ways:
# - issue-bound (eager candidates): nothing queued before it, so the span is the host's issue of the call plus the
#   GPU's tail: the latency of one call, which is what running eagerly costs;
# - device time (CUDA graphs, the GEMM floor, the roofline): a spin kernel (``torch.cuda._sleep``) is queued first, long
#   enough for the host to queue the whole call behind it, so the span is the GPU's time alone (a run whose host issue
#   outlasted the spin is not counted, and the spin grows).
ISSUE, DEVICE = "issue", "device"
HEAD_START_MIN_MS = 0.25  # the shortest spin queued before a device-timed run
_FLUSH: torch.Tensor | None = None


def flush_l2() -> None:
    """Overwrite a buffer larger than the L2 cache (so the next kernel reads its weights from HBM)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    _FLUSH.zero_()


class CudaDevice:
    """The device operations the timing uses (tests replace them with a simulated stream)."""

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def spin(self, cycles: int) -> None:
        torch.cuda._sleep(int(cycles))

    def flush(self) -> None:
        flush_l2()

    def clock(self) -> float:
        return time.perf_counter()


def spin_cycles_per_ms(dev) -> float:
    """How many cycles of ``dev.spin`` take a millisecond of the device (its clock, measured now)."""
    cycles = 2_000_000
    rate = 0.0
    for _ in range(2):  # (the first also warms the clock up)
        dev.synchronize()
        a, b = dev.event(), dev.event()
        a.record()
        dev.spin(cycles)
        b.record()
        dev.synchronize()
        rate = cycles / max(a.elapsed_time(b), 1e-6)
    return rate


def cuda_timeit_many(fns: dict, *, warmup: int = 3, min_reps: int = 10, max_reps: int = 100, budget_s: float = 2.0,
                     cold: bool = False, device_timed=(), dev=None, seed: int = 0) -> dict:
    """Median CUDA-event time (ms) of each function after ``warmup`` untimed calls each (which also compile Triton
    kernels, capture graphs and fill the allocator cache), in rounds of every function in a shuffled order. Each run
    starts from an idle GPU; the functions named in ``device_timed`` get their device time, the others their
    issue-bound time (see the notes above). ``cold``: the L2 cache is overwritten before every run.
    Returns ``{name: (ms, reps, host_ms)}``, ``host_ms`` the median host time of the call itself."""
    dev = dev or CudaDevice()
    rng = random.Random(seed)
    head_ms: dict = {}
    if device_timed:
        per_ms = spin_cycles_per_ms(dev)
    for name, fn in fns.items():
        host = []
        for _ in range(warmup):
            t0 = dev.clock()
            fn()
            host.append((dev.clock() - t0) * 1e3)
        dev.synchronize()
        if name in device_timed:  # (the first call may have compiled or captured: not a measure of its issue)
            head_ms[name] = max(HEAD_START_MIN_MS, 2 * max(host[1:] or host))
    times: dict = {name: [] for name in fns}
    hosts: dict = {name: [] for name in fns}
    order = list(fns)
    start = dev.clock()
    rounds = 0
    while rounds < max_reps and (min(map(len, times.values())) < min_reps or dev.clock() - start < budget_s):
        rng.shuffle(order)
        for name in order:
            if cold:
                dev.flush()
            dev.synchronize()
            head = head_ms.get(name, 0.0)
            if head:
                dev.spin(head * per_ms)
            a, b = dev.event(), dev.event()
            t0 = dev.clock()
            a.record()
            fns[name]()
            b.record()
            host_ms = (dev.clock() - t0) * 1e3
            dev.synchronize()
            hosts[name].append(host_ms)
            if head and host_ms >= head:  # the GPU waited for the host: not the device's time alone
                head_ms[name] = 2 * host_ms
                continue
            times[name].append(a.elapsed_time(b))
        rounds += 1
    return {name: (statistics.median(ts) if ts else None, len(ts), statistics.median(hosts[name]))
            for name, ts in times.items()}


def peak_mem_mb(fn) -> float:
    """Peak CUDA memory allocated during one call of ``fn`` beyond what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def roofline() -> dict:
    """Dense GEMM TFLOP/s (fp32 exact, fp32 with TF32, bf16) and copy GB/s, measured now on this device."""
    n = 8192
    out = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, allow in (("float32", torch.float32, False), ("tf32", torch.float32, True),
                                   ("bfloat16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = allow
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            ms = cuda_timeit_many({"mm": lambda a=a, b=b: a @ b}, min_reps=5, max_reps=20, budget_s=1.0,
                                  device_timed={"mm"})["mm"][0]
            out[f"gemm_tflops_{name}"] = 2 * n**3 / (ms / 1e3) / 1e12
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = cuda_timeit_many({"copy": lambda dst=dst, src=src: dst.copy_(src)}, min_reps=5, max_reps=20, budget_s=1.0,
                          device_timed={"copy"})["copy"][0]
    out["copy_gbps"] = 2 * src.numel() * 4 / (ms / 1e3) / 1e9  # read + write
    del src, dst
    torch.cuda.empty_cache()
    return out


class GroupedGemmFloor:
    """The routed experts' GEMMs alone on pre-sorted rows with uniform routing (``torch._grouped_mm``): no router,
    gather, activation or combine."""

    def __init__(self, shape: dict, tokens: int, dtype: torch.dtype):
        from moekit.experts.backends import _GROUPED_MM

        E, K, D, F = shape["num_experts"], shape["top_k"], shape["d_model"], shape["d_ff"]
        S = tokens * K
        counts = torch.tensor([S // E + (1 if e < S % E else 0) for e in range(E)])
        self.offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
        self.x = torch.randn(S, D, device="cuda", dtype=dtype)
        self.a = torch.randn(S, F, device="cuda", dtype=dtype)
        self.w1 = torch.randn(E, D, 2 * F, device="cuda", dtype=dtype)
        self.w2 = torch.randn(E, F, D, device="cuda", dtype=dtype)
        self.mm = _GROUPED_MM

    def step(self, backward: bool) -> None:
        h = self.mm(self.x, self.w1, offs=self.offs)
        y = self.mm(self.a, self.w2, offs=self.offs)
        if backward:  # dA, dX: same shapes as forward, transposed weights; dW: per expert x_e^T g_e
            self.mm(y, self.w2.transpose(-2, -1), offs=self.offs)
            self.mm(h, self.w1.transpose(-2, -1), offs=self.offs)
            self.mm(y.T, self.a, offs=self.offs)
            self.mm(h.T, self.x, offs=self.offs)


#: transformers' batched_mm copies every slot's expert weights; a CUDA graph keeps those copies in its memory pool
#: for as long as it lives, which filled the 141 GB card across a run once they reached a few GiB each
GRAPH_BATCHED_MM_LIMIT_BYTES = 2**30


def graph_skip_reason(name: str, shape: dict, dtype: torch.dtype, T: int, mode: str) -> str:
    """Why a transformers backend is not captured as a CUDA graph here ("" if it is)."""
    if name == "hf_eager":  # (every capture of it failed with cudaErrorStreamCaptureInvalidated on an H200)
        return "not capturable: its per-expert loop synchronises with the host (torch.where on the routing)"
    if name == "hf_batched_mm":
        need = batched_mm_copy_bytes(shape, dtype, T, mode)
        if need > GRAPH_BATCHED_MM_LIMIT_BYTES:
            return f"its graph would hold {need / 2**30:.1f} GiB of copied weights"
    return ""


def graph_step(module, x, mode: str):
    """:func:`moekit.benchmark.make_step` on a CUDA graph of ``module`` (:func:`moekit.cuda_graphed`), captured at
    the first call (so a module that cannot be captured fails in the benchmark's warm-up pass and is reported)."""
    state: dict = {}
    forward_only = "bwd" not in mode

    def step():
        if "run" not in state:
            module.train(not forward_only)
            if forward_only:
                graph = moekit.cuda_graphed(module, x)
                state["run"] = lambda: graph(x)
            else:
                moekit.cuda_graphed(module, x.detach().requires_grad_(True), backward=True)
                state["run"] = make_step(module, x, mode)
        state["run"]()
    return step


#: moekit's Triton layer, graphed, with the other choice of tiles for its GEMMs (``triton_moe.FMA_MAX_ROWS``) where
#: there is one at decode sizes: 16-row ``tl.dot`` tiles where it takes few-row ones (fp32 up to 8 rows per expert),
#: few-row ones for 16-bit at one row per expert or fewer. The A/B of that choice, listed after the table.
OTHER_TILES = "moekit_triton_other_tiles_graph"


def other_tiles(shape: dict, dtype: torch.dtype, T: int) -> dict | None:
    """``FMA_MAX_ROWS`` for the other choice of tiles at these rows (``triton_moe.other_tiles``), or None."""
    from moekit.kernels import triton_moe

    other = triton_moe.other_tiles(T * shape["top_k"] / shape["num_experts"], dtype)
    return None if other is None else other[1]


def with_tiles(step, fma_max_rows: dict):
    """``step`` (its first call captures the graphs, forward and backward) with ``FMA_MAX_ROWS`` set so."""
    from moekit.kernels import triton_moe

    def run():
        with triton_moe.fma_rows(fma_max_rows):
            step()
    return run


def tiles_note(shape: dict, dtype: torch.dtype, T: int, fma_max_rows: dict | None = None) -> str:
    """Which tiles moekit's Triton GEMMs take on a GPU for these rows, with ``FMA_MAX_ROWS`` as it stands or as given."""
    from moekit.kernels import triton_moe

    limits = triton_moe.FMA_MAX_ROWS if fma_max_rows is None else fma_max_rows
    bm = triton_moe._block_m(T * shape["top_k"] / shape["num_experts"], False, limits.get(dtype, 0))
    return f"tiles: {bm}-row (CUDA cores)" if bm < 16 else "tiles: tl.dot"


# ------------------------------------------------------------------------------------------------- runner
def bench(shapes, tokens, dtypes, modes, out_path: Path, budget_s: float, graphs: bool = True) -> dict:
    dev = require_cuda()
    torch.manual_seed(0)
    meta = {"device": torch.cuda.get_device_name(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "moekit": moekit.__version__, "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    for mod in ("triton", "transformers"):
        try:
            meta[mod] = __import__(mod).__version__
        except ImportError:
            meta[mod] = None
    result = {"meta": meta, "roofline": roofline(), "shapes": {k: SHAPES[k] for k in shapes}, "rows": []}
    from moekit.experts.backends import grouped_mm_supported

    jobs = [(s, dt, t, m) for s in shapes for dt in dtypes for t in tokens for m in modes
            if m != "fwd-cold" or t <= 16]
    for i, (shape_name, dtype, T, mode) in enumerate(jobs):
        shape = SHAPES[shape_name]
        print(f"[{i + 1}/{len(jobs)}] {shape_name} {_dt(dtype)} T={T} {mode}", file=sys.stderr, flush=True)
        rows: list[Row] = []
        x = torch.randn(1, T, shape["d_model"], device=dev).to(dtype)
        block = hf_block(shape, dtype).to(dev) if meta["transformers"] else None
        candidates: dict = {}
        for backend in MOEKIT_BACKENDS:
            if block is not None:
                layer = moekit.from_hf(block, backend=backend).to(dev, dtype)
            else:
                layer = moekit.MoE(**{k: v for k, v in shape.items() if k != "family"}, backend=backend).to(dev, dtype)
            candidates[f"moekit_{backend}"] = layer
        if block is not None:
            candidates.update(hf_peers(block, HF_IMPLS, shape_name, shape, dtype, T, mode, rows))
        candidates["dense_equal_flops"] = DenseFFN(shape["d_model"], shape["top_k"] * shape["d_ff"]).to(dev, dtype)
        graphed: dict = {}
        if graphs:  # the same computations replayed as CUDA graphs (fresh modules: capture changes them)
            graphed["moekit_triton_graph"] = moekit.from_hf(block, backend="triton").to(dev, dtype) \
                if block is not None else copy.deepcopy(candidates["moekit_triton"])
            for n in [n for n in candidates if n.startswith("hf_")]:
                why = graph_skip_reason(n, shape, dtype, T, mode)
                if why:
                    rows.append(Row(shape_name, _dt(dtype), T, mode, f"{n}_graph", None, 0, note=f"skipped: {why}"))
                else:
                    graphed[f"{n}_graph"] = _HFImpl(block, n.removeprefix("hf_"))
            graphed["dense_equal_flops_graph"] = copy.deepcopy(candidates["dense_equal_flops"])
        notes: dict[str, str] = {}
        if mode == "fwd" and block is not None:  # the same numbers as transformers, at this size
            with torch.no_grad():
                ref = _HFImpl(block, "eager")(x)
                ref = (ref[0] if isinstance(ref, tuple) else ref).float()
                for name in [n for n in candidates if n.startswith("moekit_")]:
                    try:
                        err = (candidates[name](x).float() - ref).abs().max().item()
                        notes[name] = f"max|y - hf_eager| = {err:.2e} (|y| <= {ref.abs().max().item():.2e})"
                    except Exception as e:  # noqa: BLE001 - reported below by the timing pass
                        notes[name] = f"error: {e!s:.120}"
        steps = {name: make_step(m, x, mode) for name, m in candidates.items()}
        steps.update({name: graph_step(m, x, mode) for name, m in graphed.items()})
        other = other_tiles(shape, dtype, T) if graphs else None
        if other is not None:  # the A/B of the GEMMs' tiles
            layer = moekit.from_hf(block, backend="triton").to(dev, dtype) if block is not None else \
                copy.deepcopy(candidates["moekit_triton"])
            graphed[OTHER_TILES] = layer
            steps[OTHER_TILES] = with_tiles(graph_step(layer, x, mode), other)
            notes[OTHER_TILES] = tiles_note(shape, dtype, T, other)
            notes["moekit_triton_graph"] = tiles_note(shape, dtype, T)
        if grouped_mm_supported("cuda", dtype):
            floor = GroupedGemmFloor(shape, T, dtype)
            steps["gemm_floor"] = lambda: floor.step(backward=mode == "fwd+bwd")
        drop_failing(steps, lambda name, e: rows.append(
            Row(shape_name, _dt(dtype), T, mode, name, None, 0, note=f"error: {e!s:.160}")),
            cleanup=torch.cuda.empty_cache)
        device_timed = {name for name in steps if name in graphed or name == "gemm_floor"}
        timed = cuda_timeit_many(steps, budget_s=budget_s, cold=mode == "fwd-cold", device_timed=device_timed)
        for name, (ms, reps, host_ms) in timed.items():
            # (a graph's memory is taken at capture, not while it replays: no peak measured for it)
            mem = peak_mem_mb(steps[name]) if mode == "fwd+bwd" and T >= 1024 and name not in graphed else None
            rows.append(GpuRow(shape_name, _dt(dtype), T, mode, name, ms, reps, mem, notes.get(name, ""),
                               timing=DEVICE if name in device_timed else ISSUE, host_ms=host_ms))
        result["rows"] += [asdict(r) for r in rows]
        out_path.write_text(json.dumps(result, indent=1))
        del candidates, graphed, steps, block, x
        gc.collect()
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------- report
def summarise(result: dict) -> str:
    """Markdown: per (shape, dtype, T, pass) moekit's triton backend run eagerly and as a CUDA graph, its grouped_mm
    backend, the best transformers backend run eagerly and the best one captured as a CUDA graph (where it can be),
    the ratio of the best transformers time to the best moekit time, the fraction of the measured GEMM roofline,
    the grouped-GEMM floor, the decode memory floor and the fwd+bwd peak memory."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        by_key.setdefault((r["shape"], r["dtype"], r["tokens"], r["mode"]), {})[r["impl"]] = r
    roof = result["roofline"]
    lines = [
        "| shape | dtype | T | pass | triton ms | triton graph ms | grouped_mm ms | best HF eager ms | "
        "best HF graph ms | HF / moekit | dense (graph) ms | % GEMM roofline | GEMM floor ms | decode floor ms | "
        "peak MiB triton / HF grouped_mm |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def best(impls: dict, graph: bool):
        found = [(r["median_ms"], n.removeprefix("hf_").removesuffix("_graph")) for n, r in impls.items()
                 if n.startswith("hf_") and n.endswith("_graph") == graph and r["median_ms"] is not None]
        return min(found) if found else None

    for (shape, dtype, T, mode), impls in by_key.items():
        if mode == "-":  # (a group's process failed: listed under errors)
            continue

        def ms(name):
            return impls.get(name, {}).get("median_ms")

        ours = [t for t in (ms("moekit_triton"), ms("moekit_triton_graph"), ms("moekit_grouped_mm")) if t]
        mk = min(ours) if ours else None
        hf_e, hf_g = best(impls, False), best(impls, True)
        hf = min(b for b in (hf_e, hf_g) if b) if (hf_e or hf_g) else None
        flops = expert_flops(result["shapes"][shape], T) * (3 if mode == "fwd+bwd" else 1)
        peak = result.get("rooflines", {}).get(f"{shape}/{dtype}", roof)[f"gemm_tflops_{dtype}"] * 1e12
        frac = f"{100 * flops / (mk / 1e3) / peak:.0f}%" if mk else ""
        decode = ""
        if T <= 16 and mode != "fwd+bwd":
            copy = result.get("rooflines", {}).get(f"{shape}/{dtype}", roof)["copy_gbps"]
            decode = _f(distinct_expert_bytes(result["shapes"][shape], T, getattr(torch, dtype)) / (copy * 1e9) * 1e3)
        m_tr, m_hf = impls.get("moekit_triton", {}).get("peak_mem_mb"), impls.get("hf_grouped_mm", {}).get("peak_mem_mb")
        mem = f"{m_tr:.0f} / {m_hf:.0f}" if m_tr is not None and m_hf is not None else ""
        ratio = f"{hf[0] / mk:.2f}×" if hf and mk else ""
        dense = ms("dense_equal_flops_graph") or ms("dense_equal_flops")

        def cell(b):
            return f"{_f(b[0])} ({b[1]})" if b else "n/a"

        lines.append(f"| {shape} | {dtype} | {T} | {mode} | {_f(ms('moekit_triton'))} | "
                     f"{_f(ms('moekit_triton_graph'))} | {_f(ms('moekit_grouped_mm'))} | {cell(hf_e)} | {cell(hf_g)} | "
                     f"{ratio} | {_f(dense)} | {frac} | {_f(ms('gemm_floor'))} | {decode} | {mem} |")
    m = result["meta"]
    head = (f"Measured on {m['device']} (sm_{m['capability'].replace('.', '')}), torch {m['torch']} (CUDA {m['cuda']}), "
            f"triton {m['triton']}, transformers {m['transformers']}. Roofline in the same run: GEMM "
            f"{roof['gemm_tflops_float32']:.0f} TFLOP/s fp32, {roof['gemm_tflops_tf32']:.0f} tf32, "
            f"{roof['gemm_tflops_bfloat16']:.0f} bf16; copy {roof['copy_gbps']:.0f} GB/s. fp32 GEMMs run without TF32 "
            f"(torch's default), so fp32 rows are compared with the fp32 roofline. " + (
                "Eager columns: one call from an idle GPU, the host's issue of its launches included; graph columns and "
                "the GEMM floor: the GPU's time alone." if any(r.get("timing") for r in result["rows"]) else
                "Timed back to back in a fixed order, so a graph's time holds the host's issue of it or not depending "
                "on its neighbour (the benchmark's first protocol; see cuda_timeit_many)."))
    errors = [f"- {r['shape']} {r['dtype']} T={r['tokens']} {r['mode']} {r['impl']}: {r['note']}"
              for r in result["rows"] if r["note"].startswith(("error", "max|", "skipped"))]
    ab = [f"- {shape} {dtype} T={T} {mode}: {_f(mine['median_ms'])} ms ({mine['note'].removeprefix('tiles: ')}, "
          f"the layer's), {_f(alt['median_ms'])} ({alt['note'].removeprefix('tiles: ')}): "
          f"{alt['median_ms'] / mine['median_ms']:.2f}x"
          for (shape, dtype, T, mode), impls in by_key.items()
          for mine, alt in [(impls.get("moekit_triton_graph", {}), impls.get(OTHER_TILES, {}))]
          if mine.get("median_ms") and alt.get("median_ms")]
    return head + "\n\n" + "\n".join(lines) + \
        ("\n\nThe GEMMs' tiles, the layer's choice and the other (graphs, device time):\n" + "\n".join(ab)
         if ab else "") + \
        ("\n\nChecks and errors:\n" + "\n".join(errors) if errors else "")


def child_args(argv: list[str]) -> list[str]:
    """``argv`` without ``--out``, ``--shapes`` and ``--dtypes`` (and their values): what each group's process shares."""
    rest, skip = [], False
    for a in argv:
        name = a.split("=", 1)[0]
        if name in ("--out", "--shapes", "--dtypes"):
            skip = "=" not in a  # the values follow, up to the next option
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        rest.append(a)
    return rest


def run_isolated(groups: list[tuple[str, str]], argv: list[str], out: Path) -> dict:
    """Each (shape, dtype) in its own process, merged into ``out`` after each: CUDA-graph memory pools of one group
    (transformers' batched_mm keeps its weight copies in them) cannot then fill the card for the next, and a group
    that fails leaves the others' rows. Each group keeps the roofline measured in its own process."""
    import subprocess

    rest = child_args(argv)
    merged: dict = {}
    failed: list[dict] = []
    for shape, dtype in groups:
        part = out.with_name(f"{out.stem}.{shape}.{dtype}.json")
        cmd = [sys.executable, __file__, *rest, "--in-process", "--shapes", shape, "--dtypes", dtype, "--out", str(part)]
        rc = subprocess.run(cmd).returncode
        res = json.loads(part.read_text()) if part.exists() else None
        if res is not None:
            part.unlink()
        if rc != 0:
            print(f"{shape} {dtype}: the process exited with {rc}", file=sys.stderr)
            failed.append(asdict(Row(shape, dtype, 0, "-", "process", None, 0,
                                     note=f"error: this group's process exited with {rc}"
                                          + ("" if res else ", before any result"))))
        if res is not None:
            if not merged:
                merged = {**res, "rooflines": {}, "rows": []}
            merged["shapes"].update(res["shapes"])
            merged["rooflines"][f"{shape}/{dtype}"] = res["roofline"]
            merged["rows"] += res["rows"]
        if merged:
            out.write_text(json.dumps({**merged, "rows": merged["rows"] + failed}, indent=1))
    if not merged:
        raise SystemExit("no shape and dtype produced results: see the errors above")
    merged["rows"] += failed
    return merged


def merge(results: list[dict]) -> dict:
    """Several runs' results as one (rows in run order), each (shape, dtype) group keeping the roofline measured in
    its own process."""
    merged = {**results[0], "shapes": {}, "rooflines": {}, "rows": []}
    for res in results:
        merged["shapes"].update(res["shapes"])
        merged["rooflines"].update(res.get("rooflines") or {
            f"{r['shape']}/{r['dtype']}": res["roofline"] for r in res["rows"] if r["mode"] != "-"})
        merged["rows"] += res["rows"]
    return merged


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: T in {1, 1024}, bf16, fwd and fwd+bwd")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd", "fwd-cold"], choices=["fwd", "fwd+bwd", "fwd-cold"],
                    help="fwd-cold: forward with the L2 cache overwritten before each run (T <= 16 only)")
    ap.add_argument("--budget-s", type=float, default=1.5, help="timing budget per configuration (after warm-up)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replays of each candidate")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/layer_cuda.json)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every shape and dtype in this process (default: one process each, see run_isolated)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                    help="merge these runs' results (those that exist) into --out and print the table; runs nothing")
    ap.add_argument("--doc", type=Path, default=None, metavar="MARKDOWN",
                    help=f"with --merge: also write the table (without its checks and errors) between the "
                         f"{DOC_MARKER} markers of this file (the README, where the GPU table lives)")
    args = ap.parse_args(argv)
    if args.merge:
        found = [json.loads(f.read_text()) for f in args.merge if f.exists()]
        if not found:
            raise SystemExit(f"none of {[str(f) for f in args.merge]} exists")
        result = merge(found)
        out = args.out or RESULTS / "layer_cuda.json"
        out.write_text(json.dumps(result, indent=1))
        text = summarise(result)
        if args.doc is not None:
            write_marked_table(args.doc, text.split("\n\nChecks and errors:\n")[0], DOC_MARKER)
        print(text)
        return
    require_cuda()
    if args.quick:
        args.tokens, args.dtypes, args.modes = [1, 1024], ["bfloat16"], ["fwd", "fwd+bwd"]
    out = args.out or RESULTS / ("layer_cuda_quick.json" if args.quick else "layer_cuda.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = [(sh, dt) for sh in args.shapes for dt in args.dtypes]
    if len(groups) > 1 and not args.in_process:
        result = run_isolated(groups, argv if argv is not None else sys.argv[1:], out)
    else:
        result = bench(args.shapes, args.tokens, [getattr(torch, d) for d in args.dtypes], args.modes, out,
                       args.budget_s, graphs=not args.no_graphs)
    print(summarise(result))
    print(f"results written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
