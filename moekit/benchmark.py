"""Layer benchmark: moekit's MoE layer against its peers on the same weights, in one process.

Peers, per shape, dtype and token count ``T``:
- the transformers sparse-MoE block with each ``experts_implementation`` (``eager``, ``grouped_mm``, ``batched_mm``);
- a dense SwiGLU FFN with the same active FLOPs (hidden width ``K * F``);
- the machine's roofline measured in the same run: a large GEMM (GFLOP/s) and a large copy (GB/s).

Forward and forward+backward, fp32 and bf16; the median of repeated runs after warm-up.
Writes ``benchmarks/results/layer_<device>.json`` and replaces the table between the markers in README.md.

    moekit bench            (or python benchmarks/bench_layer.py)    full grid, ~15 minutes on 2 CPU cores
    moekit bench --quick                                             T in {1, 128}, fp32 only, a smoke run
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress

import moekit
from moekit.interop.patch import share_hf
from moekit.kernels import cpu_gemm
from moekit.experts.fused_function import cpu_bf16_gemm_is_slow
from moekit.utils import tune_cpu_allocator

ROOT = Path.cwd()  # run from the repository root: results and the README table are written there
RESULTS = ROOT / "benchmarks" / "results"
console = Console(stderr=True)

# Shapes from DESIGN.md: Mixtral-like and fine-grained DeepSeek/Qwen3-like (same active width K*F ~ 2-3k).
SHAPES = {
    "mixtral": dict(family="mixtral", d_model=512, d_ff=1408, num_experts=8, top_k=2),
    "fine_grained": dict(family="qwen3_moe", d_model=512, d_ff=256, num_experts=64, top_k=8),
}
TOKENS = (1, 16, 128, 1024, 8192)
DECODE_TOKENS = 16  # batches up to this size are memory-bound (the decode target)
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
BATCHED_MM_LIMIT_BYTES = 6 * 2**30  # batched_mm copies each slot's expert weights; skip where that cannot fit


@dataclass
class Row:
    shape: str
    dtype: str
    tokens: int
    mode: str  # "fwd" or "fwd+bwd"
    impl: str
    median_ms: float | None
    runs: int
    peak_mem_mb: float | None = None
    note: str = ""


# ----------------------------------------------------------------------------------------------- timing
def timeit(fn, *, min_runs: int = 3, max_runs: int = 15, budget_s: float = 4.0) -> tuple[float, int]:
    """Median wall time (ms) of ``fn()`` after one warm-up, with as many runs as fit in ``budget_s`` (warm caches)."""
    return timeit_many({"fn": fn}, min_rounds=min_runs, max_rounds=max_runs, budget_s=budget_s)["fn"]


_FLUSH: torch.Tensor | None = None


def flush_caches() -> None:
    """Evict the CPU caches (read a buffer much larger than the last-level cache), so every timed run starts with
    its weights in DRAM, as in a real model whose layers together exceed the cache. A read leaves the caches full of
    clean lines; a write would leave dirty ones, whose write-back would then halve the bandwidth the timed run sees,
    which no real decode step suffers."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(96 * 2**20, dtype=torch.float32)  # 384 MiB
    _FLUSH.sum()


#: A peer whose first run takes this many times the fastest peer's, and at least APART_MIN_S, is timed in a round-robin
#: of its own after the others' (see timeit_many).
APART_FACTOR, APART_MIN_S = 20.0, 0.5


def timeit_many(fns: dict, *, min_rounds: int = 5, max_rounds: int = 21, budget_s: float = 6.0,
                cold: dict | None = None, warm_runs: int = 1, peers: tuple = ()) -> dict:
    """Median wall time (ms) of each function, measured round-robin (one timed run of each per round, the order
    shuffled every round) so that drifts of a shared machine hit every candidate alike. Each timed run directly
    follows ``warm_runs`` untimed runs of the same function (warm: its weights, code and buffers are in cache; after
    a peer that swept the caches or left its own writes in them, one run does not restore that). With ``cold``
    (name -> the tensors it reads, e.g. its parameters), those tensors are then evicted from every cache level before the timed run: the weights come
    from memory while everything else stays warm, as for one layer of a model whose layers together exceed the
    caches (where eviction by address is not possible, all caches are flushed instead). Returns
    ``{name: (ms, runs)}``.

    Of the names in ``peers`` (one implementation's several backends), those whose first run takes over APART_FACTOR
    times the fastest peer's (and over APART_MIN_S seconds) are timed after the others, in a round-robin of their
    own: such a step sweeps gigabytes through memory (transformers' ``batched_mm`` copies the expert weights of every
    token slot: 2.2 GB in a Mixtral-like fp32 step of 128 tokens, 4.5 s), and in the others' round-robin it slowed
    the steps after it for longer than their untimed runs last: on Zen 3 (2 threads) Mixtral-like fp32 T = 128
    forward+backward, moekit 30.2 -> 37.4 ms and ``grouped_mm`` 48.5 -> 57.4 ms beside it (against beside
    ``eager``). The fastest peer always stays in the round-robin of the others."""
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    fastest = min((t for n, t in first.items() if n in peers), default=0.0)
    slow = [n for n, t in first.items() if n in peers and t > max(APART_FACTOR * fastest, APART_MIN_S)]
    out: dict = {}
    for group in ([n for n in fns if n not in slow], slow):
        if group:
            out.update(_round_robin({n: fns[n] for n in group}, min_rounds, max_rounds, budget_s, cold, warm_runs))
    return {n: out[n] for n in fns}


def _round_robin(fns: dict, min_rounds: int, max_rounds: int, budget_s: float, cold: dict | None,
                 warm_runs: int) -> dict:
    """timeit_many's rounds over candidates already run once."""
    from moekit.kernels import cpu as kcpu

    times: dict = {name: [] for name in fns}
    names = list(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        # a new order every round (shuffled, seeded by the round): what ran just before (a memory-heavy peer, a GEMM
        # that lowered the clock) then affects every candidate alike. (A rotation keeps each candidate's predecessor:
        # the one after transformers' batched_mm backend, which streams gigabytes, then found its weights evicted
        # in every round, its untimed run not enough to bring them back: fine-grained fp32 T = 128, moekit 4.31 ms
        # in the rotation against 3.45 alone or beside any other peer, 2 Emerald Rapids cores.)
        order = list(names)
        random.Random(rounds).shuffle(order)
        for name in order:
            fn = fns[name]
            for _ in range(warm_runs):
                fn()  # untimed
            if cold is not None and not kcpu.flush_from_cache(cold.get(name, ())):
                flush_caches()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: (statistics.median(ts) * 1e3, len(ts)) for name, ts in times.items()}


#: What the peak-memory column counts (``meta["peak_memory"]`` of a result; older results have none).
PEAK_MEMORY = "pytorch allocator + kernel scratch"


def peak_alloc_mb(fn) -> float | None:
    """Peak bytes held during one call of ``fn`` (MiB), above what was held before: by PyTorch's CPU allocator (the
    CPU analogue of ``torch.cuda.max_memory_allocated``) together with the scratch of moekit's C kernels, which
    comes from the C allocator and which PyTorch never sees. PyTorch's part is read from the profiler's allocation
    events, each of which carries the allocator's running total, so peaks inside a single large operator (a fused
    autograd Function, a grouped GEMM) are seen too, independent of what malloc does with freed memory; each kernel
    call that held scratch leaves an event of its own there (:func:`moekit.kernels.cpu.scratch_marks`), and its
    scratch is added to the total PyTorch held at that moment. Scratch that the math libraries allocate inside
    their GEMMs (oneDNN's or MKL's packing buffers, under moekit and transformers alike) is counted for neither."""
    try:
        import tempfile

        from torch.profiler import ProfilerActivity, profile, record_function

        from moekit.kernels import cpu as kcpu

        # Two calls, the peak taken over the second: the profiler cannot see the release of memory allocated before
        # it started (a layer's statistics or cache from the previous call), so in a single profiled call a
        # module that replaces what it keeps would be charged for both the old and the new copy.
        with kcpu.scratch_marks(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
            with record_function("moekit_peak_measured_call"):
                kcpu.scratch_bytes(reset_peak=True)
                fn()
                scratch_peak = kcpu.scratch_bytes()[1]
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        return _peak_from_trace(events, scratch_peak) / 2**20
    except Exception:  # noqa: BLE001
        return None


def _peak_from_trace(events: list[dict], scratch_peak: int) -> int:
    """Bytes: the peak of the measured call (the ``moekit_peak_measured_call`` event) in a profiler trace, PyTorch's
    allocator and the C kernels' scratch marks together (see :func:`peak_alloc_mb`); ``scratch_peak`` is the most
    scratch held at once during the call by the kernels' own count: where no mark accounts for it (a call the marks
    did not see), it is added to PyTorch's peak whole, an upper bound."""
    from moekit.kernels.cpu import SCRATCH_MARK

    mark = next(e for e in events if e.get("name") == "moekit_peak_measured_call" and e.get("ph") == "X")
    t0, t1 = mark["ts"], mark["ts"] + mark["dur"]
    inside = sorted((e for e in events if t0 <= e.get("ts", -1) <= t1 and (
        (e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
        or str(e.get("name", "")).startswith(SCRATCH_MARK))), key=lambda e: e["ts"])
    mem = [e for e in inside if e["name"] == "[memory]"]
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"] if mem else 0
    now, torch_peak, peak, marked = base, base, base, 0
    for e in inside:
        if e["name"] == "[memory]":
            now = e["args"]["Total Allocated"]
            torch_peak = max(torch_peak, now)
            peak = max(peak, now)
        else:
            scratch = int(e["name"][len(SCRATCH_MARK):])
            marked = max(marked, scratch)
            peak = max(peak, now + scratch)
    if scratch_peak > marked:
        peak = max(peak, torch_peak + scratch_peak)
    return max(0, peak - base)


def _gemms(dtype: torch.dtype, n: int) -> dict:
    """An n-cube GEMM with each CPU GEMM library PyTorch ships: ``torch.mm``, and oneDNN where it runs."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    gemms = {"torch.mm": lambda: a @ b}
    if cpu_gemm.provider(dtype) == "onednn" or cpu_gemm._onednn_works(dtype):
        bt = b.T.contiguous()
        gemms["onednn"] = lambda: cpu_gemm._LP(a, bt, None, "none", [], "")
    return gemms


#: Side of the cube that measures the large-GEMM rate; a library that would take over GEMM_MAX_RUN_S seconds on it
#: runs a cube sized for GEMM_SLOW_RUN_S instead (see gemm_rates).
GEMM_N, GEMM_MAX_RUN_S, GEMM_SLOW_RUN_S = 2048, 1.0, 0.25


def gemm_rates(dtype: torch.dtype) -> dict[str, float]:
    """The large-GEMM rate (GFLOP/s, a GEMM_N-cube) of each CPU GEMM library PyTorch ships (see _gemms). A library
    so slow that one such GEMM would take over GEMM_MAX_RUN_S (PyTorch's bf16 GEMM on a CPU without bf16
    arithmetic: 0.3 GFLOP/s, a minute a run, twice per timed run) runs a smaller cube, sized for GEMM_SLOW_RUN_S a
    run: its rate is then far below the bound (the fastest library of every dtype the layer may compute in) and
    needs no more precision."""
    rates = {}
    for name, fn in _gemms(dtype, 256).items():
        n = _cube_side(2 * 256**3 / (timeit(fn, min_runs=1, max_runs=3, budget_s=0.1)[0] / 1e3))
        rates[name] = 2 * n**3 / (timeit(_gemms(dtype, n)[name], min_runs=5, budget_s=3.0)[0] / 1e3) / 1e9
    return rates


def _cube_side(flops_per_s: float) -> int:
    """GEMM_N, or for a library too slow to run that cube within GEMM_MAX_RUN_S, the side of a cube that takes about
    GEMM_SLOW_RUN_S at this rate."""
    if 2 * GEMM_N**3 < flops_per_s * GEMM_MAX_RUN_S:
        return GEMM_N
    return max(256, round((flops_per_s * GEMM_SLOW_RUN_S / 2) ** (1 / 3) / 64) * 64)


def roofline(dtype: torch.dtype) -> dict:
    """Measured machine limits in this process: the large-GEMM rate of each library (the roofline is the faster)
    and the large-copy rate (GB/s)."""
    rates = gemm_rates(dtype)
    return {"gemm_gflops": max(rates.values()), "gemm_by_library": rates, "copy_gbps": copy_rate()}


def bound_dtypes(dtype: str) -> list[str]:
    """The dtypes whose GEMM rate bounds a layer of this dtype: its own, and for bf16 fp32 too, since on CPUs with
    slow bf16 GEMMs the layer may compute bf16 in fp32 (see fused_compute_dtype); the faster one bounds."""
    return [dtype, "float32"] if dtype == "bfloat16" else [dtype]


def roof_gflops(roof: dict, dtype: str) -> float:
    """The GEMM rate bounding a layer of ``dtype`` under the roofline ``roof`` (dtype name -> :func:`roofline`)."""
    return max(roof[d]["gemm_gflops"] for d in bound_dtypes(dtype) if d in roof)


def copy_rate() -> float:
    """The large-copy rate (GB/s, bytes read + written) of this machine right now: a 256 MiB float32 copy."""
    src = torch.empty(64 * 2**20, dtype=torch.float32)
    src.uniform_()
    dst = torch.empty_like(src)
    ms_c, _ = timeit(lambda: dst.copy_(src), min_runs=5, budget_s=2.0)
    return 2 * src.numel() * 4 / (ms_c / 1e3) / 1e9


def best_gemm_step(dtype: str) -> tuple:
    """``(rate, gemm, flops)``: the large-GEMM rate (GFLOP/s) bounding a layer of ``dtype`` (the fastest library of
    :func:`bound_dtypes`, measured now), that library's GEMM cube, and its FLOPs."""
    rate, d, lib = max((r, d, lib) for d in bound_dtypes(dtype) for lib, r in gemm_rates(getattr(torch, d)).items())
    n = _cube_side(rate * 1e9)
    return rate, _gemms(getattr(torch, d), n)[lib], 2 * n**3


# ------------------------------------------------------------------------------------------------ models
def hf_block(shape: dict, dtype: torch.dtype):
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if shape["family"] == "mixtral":
        cfg = MixtralConfig(hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
                            num_local_experts=shape["num_experts"], num_experts_per_tok=shape["top_k"])
        block = MixtralSparseMoeBlock(cfg)
    else:
        cfg = Qwen3MoeConfig(hidden_size=shape["d_model"], moe_intermediate_size=shape["d_ff"],
                             num_experts=shape["num_experts"], num_experts_per_tok=shape["top_k"],
                             norm_topk_prob=True)
        block = Qwen3MoeSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return block.to(dtype)


class DenseFFN(torch.nn.Module):
    """SwiGLU FFN of hidden width ``K * F``: the same active FLOPs as the MoE's routed experts."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate_up = torch.nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = torch.nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class GemmFloor:
    """Only the routed experts' GEMMs on pre-sorted rows (uniform routing), one library GEMM per expert and
    projection with the fastest library of the machine (:mod:`moekit.kernels.cpu_gemm`): no router, gather,
    activation or combine. What any MoE built on per-expert library GEMMs pays at least."""

    def __init__(self, shape: dict, tokens: int, dtype: torch.dtype):
        E, K, D, Fh = shape["num_experts"], shape["top_k"], shape["d_model"], shape["d_ff"]
        S = tokens * K
        self.counts = [S // E + (1 if e < S % E else 0) for e in range(E)]
        # the dtype the platform runs fastest (bf16 -> fp32 on CPUs without fast bf16, as moekit's fused backend)
        if dtype == torch.bfloat16 and cpu_bf16_gemm_is_slow():
            dtype = torch.float32
        self.x = torch.randn(S, D).to(dtype)
        self.a = torch.randn(S, Fh).to(dtype)
        self.w1 = torch.randn(E, 2 * Fh, D).to(dtype)
        self.w2 = torch.randn(E, D, Fh).to(dtype)

    def step(self, backward: bool) -> None:
        start = 0
        lin = cpu_gemm.linear
        for e, n in enumerate(self.counts):
            if not n:
                continue
            x, a = self.x[start:start + n], self.a[start:start + n]
            h = lin(x, self.w1[e])
            y = lin(a, self.w2[e])
            if backward:
                lin(y, self.w2[e].T), lin(y.T, a.T), lin(h, self.w1[e].T), lin(h.T, x.T)  # dA, dW2, dX, dW1
            start += n


def touched_weights(layer, x: torch.Tensor) -> list[torch.Tensor]:
    """The weight matrices of the distinct experts ``layer``'s router sends the tokens of ``x`` to: the bytes any
    implementation of that inference step must read (transformers' block shares them, see share_hf)."""
    with torch.no_grad():
        ids = layer.router(x.reshape(-1, x.shape[-1])).topk_ids_TK.unique().tolist()
    return [w[e] for e in ids if e >= 0 for w in (layer.experts.w_in, layer.experts.w_out)]


def expert_flops(shape: dict, tokens: int) -> float:
    """Forward FLOPs of the routed experts (2 per multiply-add): gate/up (2F x D) and down (D x F) per slot."""
    D, Fh, K = shape["d_model"], shape["d_ff"], shape["top_k"]
    return 2.0 * tokens * K * (D * 2 * Fh + Fh * D)


def distinct_expert_bytes(shape: dict, tokens: int, dtype: torch.dtype) -> float:
    """Expected bytes of the distinct experts a batch touches (uniform routing), the decode memory floor."""
    E, K, D, Fh = shape["num_experts"], shape["top_k"], shape["d_model"], shape["d_ff"]
    expected_touched = E * (1 - (1 - K / E) ** tokens)
    per_expert = 3 * D * Fh * torch.empty((), dtype=dtype).element_size()
    return expected_touched * per_expert


def machine_bound_ms(shape: dict, tokens: int, dtype: str, mode: str, roof: dict,
                     copy_gbps: float | None = None, gemm_gflops: float | None = None) -> float:
    """A lower bound on the time of any implementation on this machine: the larger of the routed experts' FLOPs at
    the measured large-GEMM rate (``gemm_gflops``, else the roofline's; x3 for forward+backward) and the memory
    every implementation must move at the measured copy rate (``copy_gbps``, else the roofline's): the distinct
    experts' weights (read once), plus for forward+backward the dense weight gradient of every expert (written
    once)."""
    flops = expert_flops(shape, tokens) * (3 if "bwd" in mode else 1)
    dt = getattr(torch, dtype)
    nbytes = distinct_expert_bytes(shape, tokens, dt)
    if "bwd" in mode:
        nbytes += 3 * shape["num_experts"] * shape["d_model"] * shape["d_ff"] * dt.itemsize
    return max(flops / ((gemm_gflops or roof_gflops(roof, dtype)) * 1e9),
               nbytes / ((copy_gbps or roof[dtype]["copy_gbps"]) * 1e9)) * 1e3


# ------------------------------------------------------------------------------------------------- runner
def make_step(module, x, mode: str):
    """One timed step of ``module`` on ``x``: forward-only modes run inference (eval mode, no autograd), as a model
    serving tokens does (a layer in training mode would also compute its balancing losses, which nothing can use
    there); ``fwd+bwd`` trains (training mode, backward of a sum, gradients freed)."""
    forward_only = mode.startswith("fwd") and "bwd" not in mode
    module.train(not forward_only)
    if forward_only:
        def step():
            with torch.no_grad():
                module(x)
    else:
        def step():
            xi = x.detach().requires_grad_(True)
            out = module(xi)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(torch.ones_like(out))
            # freed at the end (as zero_grad(set_to_none=True) before the next step would), so every step, and the
            # peak-memory measurement, starts with no gradients held
            for p in module.parameters():
                p.grad = None
    return step


def bench(shapes, tokens, dtypes, modes, impls, tune_allocator: bool = True) -> dict:
    torch.manual_seed(0)
    tuned = tune_cpu_allocator() if tune_allocator else False
    from moekit.kernels import cpu as kcpu

    meta = {"allocator_tuned": tuned, "cpu_kernels": ("built, bf16 on AMX tiles" if kcpu.amx() else "built")
            if kcpu.library() is not None else f"unavailable ({kcpu.unavailable_reason()})",
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "processor": cpu_name(), "threads": torch.get_num_threads(), "moekit": moekit.__version__,
        "peak_memory": PEAK_MEMORY,
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    # every dtype whose GEMM may bound a requested one (bf16 rows: fp32 too), so a bf16-only run has its bound
    roof = {d: roofline(getattr(torch, d)) for d in dict.fromkeys(b for dt in dtypes for b in bound_dtypes(_dt(dt)))}
    # The FLOP-bound rows (T > DECODE_TOKENS) are bounded by the rate of the fastest large GEMM timed in their own
    # pass, round-robin with the candidates, so at the same moments (one measured at the start, or just before the
    # group, can come from a faster or slower moment of a shared machine than the rows: 122-173 GFLOP/s seen). The
    # memory-bound rows use the copy rate measured just before their pass (their memory bandwidth drifts too: 41-70
    # GB/s seen on one VM, 19-27 on another); not in the round-robin, where the 256 MiB copy slowed the warm
    # decode steps after it by 1.3-2x. Under "<group>/<pass>"; under "<group>", the GEMM rate measured just before
    # the group, which picks the library.
    copy_at: dict[str, float] = {}
    gemm_at: dict[str, float] = {}
    roof_gemm: dict[str, tuple] = {}
    rows: list[Row] = []
    jobs = [(s, dt, t, m) for s in shapes for dt in dtypes for t in tokens for m in modes
            if m != "fwd-cold" or t <= DECODE_TOKENS]
    with Progress(console=console, transient=False, auto_refresh=False) as progress:  # no refresh thread while timing
        task = progress.add_task("benchmarking", total=len(jobs))
        for shape_name, dtype, T, mode in jobs:
            shape = SHAPES[shape_name]
            progress.update(task, description=f"{shape_name} {dtype} T={T} {mode}")
            group = f"{shape_name}/{_dt(dtype)}/{T}"
            if T <= DECODE_TOKENS:
                copy_at[f"{group}/{mode}"] = copy_rate()
            elif group not in roof_gemm:
                roof_gemm.clear()  # (one group's operands at a time)
                gemm_at[group], *roof_gemm[group] = best_gemm_step(_dt(dtype))
            block = hf_block(shape, dtype) if meta["transformers"] else None
            # the layer shares the block's weight tensors: one copy in memory, as in a real model
            layer = share_hf(block) if block is not None else \
                moekit.MoE(**{k: v for k, v in shape.items() if k != "family"}).to(dtype)
            dense = DenseFFN(shape["d_model"], shape["top_k"] * shape["d_ff"]).to(dtype)
            x = torch.randn(1, T, shape["d_model"]).to(dtype)
            candidates = {"moekit": layer}
            if block is not None:
                candidates.update(hf_peers(block, impls, shape_name, shape, dtype, T, mode, rows))
            candidates["dense_equal_flops"] = dense
            steps = {name: make_step(m, x, mode) for name, m in candidates.items()}
            floor = GemmFloor(shape, T, dtype)
            steps["gemm_floor"] = lambda: floor.step(backward=mode == "fwd+bwd")
            touched = None
            if T <= DECODE_TOKENS and kcpu.library() is not None:
                touched = touched_weights(layer, x)  # the decode step's floor: reading these bytes, nothing else
                if "bwd" in mode:  # ...and a training step's: reading them again (backward's data gradients need
                    # the weights once the upstream gradient exists) and writing every expert's weight gradient
                    grads = [torch.empty_like(w) for w in (layer.experts.w_in, layer.experts.w_out)]
                    steps["weight_read"] = lambda: (kcpu.read_tensors(touched), kcpu.read_tensors(touched),
                                                    [kcpu.zero_(g) for g in grads])
                else:
                    steps["weight_read"] = lambda: kcpu.read_tensors(touched)
            drop_failing(steps, lambda name, e: rows.append(
                Row(shape_name, _dt(dtype), T, mode, name, None, 0, note=f"error: {e!s:.120}")))
            cold = None
            if mode == "fwd-cold":  # what each candidate reads from memory in a deep model: its weights
                cold = {name: list(m.parameters()) for name, m in candidates.items()}
                cold["gemm_floor"] = [floor.w1, floor.w2]
                if touched is not None:
                    cold["weight_read"] = touched
            if T > DECODE_TOKENS:
                steps["roofline"] = roof_gemm[group][0]  # the machine's limit, timed at the same moments
            # (at least 5 rounds even where one takes seconds: these VMs' tile unit switches between two speeds
            # within seconds, and a median of 3 rounds could fall on either)
            # (two untimed runs before each timed one where a step is short: after a peer's run, the first of them
            # still pays for that peer's traffic, e.g. Mixtral-like fp32 T = 1 forward+backward, where each candidate
            # writes 66 MiB of weight gradients where the other's were: grouped_mm 3.67-3.78 ms after one, 2.71-2.88
            # after two, moekit 2.54-2.60 and 2.38-2.51)
            timed = timeit_many(steps, budget_s=3.0 if T <= 128 else 8.0, min_rounds=11 if T <= 128 else 5,
                                cold=cold, warm_runs=2 if T <= 128 else 1,
                                peers=tuple(n for n in steps if n.startswith("hf_")))
            if T > DECODE_TOKENS:
                gemm_at[f"{group}/{mode}"] = roof_gemm[group][1] / (timed.pop("roofline")[0] / 1e3) / 1e9
            for name, (ms, runs) in timed.items():
                mem = None
                if mode == "fwd+bwd" and name in ("moekit", "hf_grouped_mm"):
                    mem = peak_alloc_mb(steps[name])
                rows.append(Row(shape_name, _dt(dtype), T, mode, name, ms, runs, mem))
            gc.collect()
            progress.advance(task)
            progress.refresh()
    return {"meta": meta, "roofline": roof, "copy_gbps_at": copy_at, "gemm_gflops_at": gemm_at,
            "shapes": {k: SHAPES[k] for k in shapes},
            "rows": [asdict(r) for r in rows]}


class _HFImpl(torch.nn.Module):
    """The transformers block run with one ``experts_implementation``."""

    def __init__(self, block, impl: str):
        super().__init__()
        self.block, self.impl = block, impl

    def forward(self, x):
        self.block.experts.config._experts_implementation = self.impl
        return self.block(x)


def drop_failing(steps: dict, on_failure, cleanup=None) -> None:
    """Run every step once (a warm-up); a step that raises is removed and reported with ``on_failure(name, error)``,
    then ``cleanup()`` (if given) runs, so one failing peer never stops the benchmark."""
    for name, step in list(steps.items()):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - any failure of a peer is reported, not fatal
            on_failure(name, e)
            del steps[name]
            if cleanup is not None:
                cleanup()


def batched_mm_copy_bytes(shape: dict, dtype: torch.dtype, T: int, mode: str) -> int:
    """The expert weights transformers' ``batched_mm`` copies, one per slot (twice with backward)."""
    need = T * shape["top_k"] * 3 * shape["d_model"] * shape["d_ff"] * dtype.itemsize
    return need * (2 if "bwd" in mode else 1)


def hf_peers(block, impls, shape_name: str, shape: dict, dtype: torch.dtype, T: int, mode: str,
             rows: list[Row]) -> dict[str, torch.nn.Module]:
    """The transformers block under each ``experts_implementation``; ``batched_mm`` is skipped (with a row saying
    so) where its per-slot copies of the expert weights would not fit in memory."""
    peers = {}
    for impl in impls:
        if impl == "batched_mm":
            need = batched_mm_copy_bytes(shape, dtype, T, mode)
            if need > BATCHED_MM_LIMIT_BYTES:
                rows.append(Row(shape_name, _dt(dtype), T, mode, f"hf_{impl}", None, 0,
                                note=f"skipped: needs {need / 2**30:.0f} GiB of copied weights"))
                continue
        peers[f"hf_{impl}"] = _HFImpl(block, impl)
    return peers


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ------------------------------------------------------------------------------------------------- report
#: Targets of the layer benchmark: HF / moekit, the GEMM-roofline fraction at T >= 1024, the decode-floor ratio at
#: T <= 16 (forward), and the peak memory of forward+backward against transformers' grouped_mm backend.
SPEEDUP_TARGET, ROOFLINE_TARGET, DECODE_TARGET = 1.5, 0.80, 1.5


def summarise(result: dict) -> str:
    """Markdown table: per (shape, dtype, T, mode) moekit's time, the best HF backend, ratios, the machine bound and
    the roofline fraction; then which targets each row meets, and where the bound proves a target impossible."""
    rows = result["rows"]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["shape"], r["dtype"], r["tokens"], r["mode"]), {})[r["impl"]] = r
    lines = [
        "| shape | dtype | T | pass | moekit ms | best HF (backend) ms | HF / moekit | bound ms | HF / bound | "
        "moekit / bound | % GEMM roofline | library-GEMM floor ms | weight-read floor ms | dense ms | "
        "peak MiB moekit / HF grouped_mm |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    checks = {"speed": [], "roofline": [], "decode": [], "memory": []}
    for (shape, dtype, T, mode), impls in by_key.items():
        mk = impls.get("moekit", {}).get("median_ms")
        hf = [(r["median_ms"], name.removeprefix("hf_")) for name, r in impls.items()
              if name.startswith("hf_") and r["median_ms"] is not None]
        best = min(hf) if hf else None
        dense = impls.get("dense_equal_flops", {}).get("median_ms")
        gemm_floor = impls.get("gemm_floor", {}).get("median_ms")
        read_floor = impls.get("weight_read", {}).get("median_ms")
        sh = result["shapes"][shape]
        flops = expert_flops(sh, T) * (3 if mode == "fwd+bwd" else 1)
        # the rates timed in the row's own pass ("<group>/<pass>"), else those measured just before its group (older
        # results), else the run's roofline
        group = f"{shape}/{dtype}/{T}"
        gemm_at, copy_at = result.get("gemm_gflops_at", {}), result.get("copy_gbps_at", {})
        rate = gemm_at.get(f"{group}/{mode}") or gemm_at.get(group) or roof_gflops(result["roofline"], dtype)

        def roof_frac(ms):  # the experts' FLOP rate at this time, over the roofline rate
            return flops / (ms / 1e3) / 1e9 / rate

        frac = roof_frac(mk) if mk else None
        bound = machine_bound_ms(sh, T, dtype, mode, result["roofline"],
                                 copy_at.get(f"{group}/{mode}") or copy_at.get(group), rate)
        mem_mk = impls.get("moekit", {}).get("peak_mem_mb")
        mem_hf = impls.get("hf_grouped_mm", {}).get("peak_mem_mb")
        mem = f"{mem_mk:.1f} / {mem_hf:.1f}" if mem_mk is not None and mem_hf is not None else ""
        key = f"{shape} {dtype} T={T} {mode}"
        if mk and best:  # the last entry: the speed-up that the library's GEMMs alone would give, where moekit is
            # no faster than them (where it is, its own kernels beat the library): the faster of the experts' GEMMs
            # one per expert (the library-GEMM floor) and the dense FFN of equal active FLOPs (the same arithmetic
            # as a few large GEMMs, the shapes the library runs best, with no routing at all). The bound a speed-up
            # is held to: the smaller of the machine bound and the memory floor measured in the row (T <= 16),
            # which is below the bound where the weights stay in cache or writing beats copying
            limit = min(bound, read_floor) if read_floor else bound
            lib = min((v for v in (gemm_floor, dense) if v), default=None)
            checks["speed"].append((key, best[0] / mk, best[0] / limit,
                                    best[0] / lib if lib and mk >= lib else None))
        if mk and T >= 1024 and frac is not None:
            checks["roofline"].append((key, frac, roof_frac(gemm_floor) if gemm_floor else None))
        if mk and T <= DECODE_TOKENS and "bwd" not in mode:
            checks["decode"].append((key, mk / bound, read_floor / bound if read_floor else None))
        if mem:
            checks["memory"].append((key, mem_mk, mem_hf))
        lines.append(
            f"| {shape} | {dtype} | {T} | {mode} | {_f(mk)} | "
            f"{_f(best[0]) + ' (' + best[1] + ')' if best else 'n/a'} | "
            f"{(best[0] / mk if best and mk else float('nan')):.2f}× | {_f(bound)} | "
            f"{(best[0] / bound if best else float('nan')):.2f}× | {(mk / bound if mk else float('nan')):.2f}× | "
            f"{'' if frac is None else f'{100 * frac:.0f}%'} | {_f(gemm_floor)} | {_f(read_floor)} | {_f(dense)} | "
            f"{mem} |")
    m, rf = result["meta"], result["roofline"]
    libs = lambda v: ", ".join(f"{k} {_f(g)}" for k, g in v.get("gemm_by_library", {}).items())  # noqa: E731
    head = (f"Measured on {m['processor']} ({m['threads']} threads), torch {m['torch']}, transformers "
            f"{m['transformers']}, moekit CPU kernels: {m.get('cpu_kernels', 'n/a')}, glibc malloc tuned: "
            f"{m.get('allocator_tuned')}. Roofline in the same run (the faster GEMM library): " + "; ".join(
                f"{dt} GEMM {_f(v['gemm_gflops'])} GFLOP/s ({libs(v)})" for dt, v in rf.items())
            + _measured_range(result, "gemm_gflops_at", f"the FLOP-bound rows, T > {DECODE_TOKENS}, use the rate",
                              "{:.0f}", "GFLOP/s", "timed in their own pass, round-robin with the candidates")
            + f"; copy {next(iter(rf.values()))['copy_gbps']:.1f} GB/s"
            + _measured_range(result, "copy_gbps_at", f"the memory-bound rows, T <= {DECODE_TOKENS}, use the copy "
                              "rate", "{:.1f}", "GB/s", "measured just before their pass") + ". Peak memory: "
            + ("PyTorch's allocator and the moekit kernels' own scratch together" if m.get("peak_memory") ==
               PEAK_MEMORY else "PyTorch's allocator only (results from before the kernels' own scratch was counted)")
            + ".")
    return head + "\n\n" + "\n".join(lines) + "\n\n" + targets_summary(checks)


def _measured_range(result: dict, key: str, rows: str, fmt: str, unit: str, how: str) -> str:
    """`` (<rows> <how>: lo-hi unit)`` for the per-pass rates under ``key`` (``<group>/<pass>``), else ``(...
    measured just before their group ...)`` for per-group ones (older results), if any."""
    at = result.get(key, {})
    per_pass = [v for k, v in at.items() if k.count("/") == 3]
    if not per_pass:
        how, per_pass = "measured just before their group", list(at.values())
    if not per_pass:
        return ""
    return f" ({rows} {how}: {fmt.format(min(per_pass))}-{fmt.format(max(per_pass))} {unit})"


def targets_summary(checks: dict) -> str:
    """Plain-language account of the targets: met, proven impossible by the machine bound, beyond what the library
    GEMMs allow (the same FLOPs on them with no routing are too slow: the experts' GEMMs alone, one per expert, or
    the dense FFN of equal active FLOPs), or missed."""
    out = []
    speed = checks["speed"]
    met = [k for k, r, _, _ in speed if r >= SPEEDUP_TARGET]
    impossible = [(k, r, hb) for k, r, hb, _ in speed if r < SPEEDUP_TARGET and hb < SPEEDUP_TARGET]
    beyond = [(k, r, hf) for k, r, hb, hf in speed
              if r < SPEEDUP_TARGET and hb >= SPEEDUP_TARGET and hf is not None and hf < SPEEDUP_TARGET]
    missed = [(k, r, hb) for k, r, hb, hf in speed
              if r < SPEEDUP_TARGET and hb >= SPEEDUP_TARGET and (hf is None or hf >= SPEEDUP_TARGET)]
    out.append(f"- **≥ {SPEEDUP_TARGET}× faster than the best transformers backend**: {len(met)} of {len(speed)} rows. "
               f"Impossible on this machine in {len(impossible)} rows, where transformers already runs within "
               f"{SPEEDUP_TARGET}× of the machine bound (HF / bound < {SPEEDUP_TARGET}; at T ≤ 16, of the bound or "
               "the measured memory floor, whichever is lower): "
               + (", ".join(f"{k} ({r:.2f}×, bound allows {hb:.2f}×)" for k, r, hb in impossible) or "none") + ". "
               f"Beyond the library GEMMs in {len(beyond)} rows (not met: a faster GEMM than the library's would be "
               "needed), where moekit is no faster than the same FLOPs on the library's GEMMs with no routing (the "
               "faster of the library-GEMM floor, the experts' GEMMs alone with no router, gather, activation or "
               f"combine, and the dense FFN of equal active FLOPs) and that takes more than HF / {SPEEDUP_TARGET}: "
               + (", ".join(f"{k} ({r:.2f}×, the library allows {hf:.2f}×)" for k, r, hf in beyond) or "none")
               + ". "
               "Missed although both allow it: "
               + (", ".join(f"{k} ({r:.2f}×, bound allows {hb:.2f}×)" for k, r, hb in missed) or "none") + ".")
    roof = checks["roofline"]
    low = [(k, f, ff) for k, f, ff in roof if f < ROOFLINE_TARGET]
    out.append(f"- **≥ {ROOFLINE_TARGET:.0%} of the GEMM roofline at T ≥ 1024**: {len(roof) - len(low)} of {len(roof)} "
               "rows; below (in brackets: the library-GEMM floor's own fraction): "
               + (", ".join(f"{k} ({f:.0%}; {'n/a' if ff is None else f'{ff:.0%}'})" for k, f, ff in low) or "none")
               + ".")
    dec = checks["decode"]
    far = [(k, r, rr) for k, r, rr in dec if r > DECODE_TARGET]
    unreadable = [(k, r, rr) for k, r, rr in far if rr is not None and rr > DECODE_TARGET]
    slow = [(k, r, rr) for k, r, rr in far if rr is None or rr <= DECODE_TARGET]
    out.append(f"- **within {DECODE_TARGET}× of the memory floor at T ≤ 16 (forward)**: {len(dec) - len(far)} of "
               f"{len(dec)} rows. Impossible on this machine in {len(unreadable)} rows, where just reading the "
               f"touched experts' weights (the weight-read floor: one pass over those bytes, on every thread, with "
               f"no arithmetic) takes more than {DECODE_TARGET}× the bound: "
               + (", ".join(f"{k} ({r:.2f}×, the read alone {rr:.2f}×)" for k, r, rr in unreadable) or "none")
               + ". Missed: " + (", ".join(f"{k} ({r:.2f}×" + ("" if rr is None else f", the read alone {rr:.2f}×")
                                           + ")" for k, r, rr in slow) or "none") + ".")
    mem = checks["memory"]
    over = [(k, a, b) for k, a, b in mem if a > b]
    out.append(f"- **peak memory of forward+backward ≤ transformers grouped_mm**: {len(mem) - len(over)} of {len(mem)} "
               "rows; above: " + (", ".join(f"{k} ({a:.3f} > {b:.3f} MiB)" for k, a, b in over) or "none") + ".")
    return "\n".join(out)


def _f(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def write_marked_table(path: Path, table: str, marker: str) -> None:
    """Replace the text between ``<!-- marker:START -->`` and ``<!-- marker:END -->`` in ``path`` with ``table``."""
    if not path.exists():
        console.print(f"[yellow]no {path}; table not written[/]")
        return
    text = path.read_text()
    start, end = f"<!-- {marker}:START -->", f"<!-- {marker}:END -->"
    if start not in text or end not in text:
        console.print(f"[yellow]{path.name} has no {start} ... {end} markers; table not written[/]")
        return
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    path.write_text(f"{before}{start}\n{table}\n{end}{after}")


def add_publish_args(parser: argparse.ArgumentParser, out: Path, doc: Path) -> argparse.ArgumentParser:
    """A benchmark script's ``--out`` (its JSON, ``out`` by default) and ``--no-doc`` (leave its table in ``doc``
    alone), which :func:`publish` takes."""
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--no-doc", action="store_true",
                        help=f"do not rewrite the table in {doc.parent.name}/{doc.name}")
    return parser


def publish(result: dict, text: str, out: Path, doc: Path | None, marker: str) -> None:
    """A benchmark script's last step: ``result`` as JSON to ``out``, its table ``text`` between ``marker``'s markers
    in ``doc`` (unless None), and printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if doc is not None:
        write_marked_table(doc, text, marker)
    print(text)


def write_readme_table(table: str, marker: str = "LAYER-BENCH") -> None:
    write_marked_table(ROOT / "README.md", table, marker)


def result_names(quick: bool = False) -> tuple[str, str]:
    """(JSON file name, README marker) of this machine's results, by the kernel path its CPU runs
    (:func:`moekit.kernels.cpu.vector_isa`): AVX-512 machines write ``layer_cpu.json`` and the main table, those
    whose bf16 runs on AMX tiles (:func:`moekit.kernels.cpu.amx`) ``layer_cpu_amx.json``, others
    ``layer_cpu_<isa>.json``, each with the table marked ``LAYER-BENCH-<NAME>``."""
    suffix = cpu_kind_suffix()
    return f"layer_cpu{'_quick' if quick else ''}{suffix}.json", "LAYER-BENCH" + suffix.replace("_", "-").upper()


def cpu_kind_suffix() -> str:
    """The suffix of this kind of CPU's result files and README/docs markers: ``""`` on AVX-512, ``"_amx"`` where
    bf16 runs on AMX tiles, else ``"_<isa>"`` (:func:`moekit.kernels.cpu.vector_isa`)."""
    from moekit.kernels import cpu as kcpu

    isa = kcpu.vector_isa()
    return "_amx" if kcpu.amx() else "" if isa == "avx512" else f"_{isa}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke grid: T in {1, 128}, fp32, forward only")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd", "fwd-cold"],
                    choices=["fwd", "fwd+bwd", "fwd-cold"],
                    help="fwd-cold: forward with the weights evicted from the caches before each run (decode "
                         "sizes, T <= 16, only)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/layer_cpu.json on AVX-512 CPUs, "
                         "layer_cpu_amx.json where bf16 runs on AMX tiles, else layer_cpu_avx2.json / "
                         "layer_cpu_other.json, each with its own README table)")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    ap.add_argument("--no-tune-allocator", action="store_true",
                    help="leave glibc's malloc as it is (by default moekit.utils.tune_cpu_allocator() is applied to "
                         "the whole process, so every peer benefits alike)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.dtypes, args.modes = [1, 128], ["float32"], ["fwd", "fwd-cold"]
    dtypes = [getattr(torch, d) for d in args.dtypes]
    result = bench(args.shapes, args.tokens, dtypes, args.modes, HF_IMPLS, tune_allocator=not args.no_tune_allocator)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name, marker = result_names(args.quick)
    out = args.out or RESULTS / name
    out.write_text(json.dumps(result, indent=1))
    table = summarise(result)
    print(table)
    if not (args.quick or args.no_readme):
        write_readme_table(table, marker)
    console.print(f"results written to {out}")


if __name__ == "__main__":
    sys.exit(main())
