"""The layer benchmark's measuring tools (moekit.benchmark): what they report must be what happened."""

import functools

import pytest
import torch

from moekit import benchmark as B
from moekit.kernels import cpu as K


def test_timeit_many_shuffles_the_order_and_warms_each_candidate_first():
    """Every timed run directly follows ``warm_runs`` untimed runs of the same candidate, and the order changes from
    round to round so that no candidate always follows the same peer (a rotation kept each one's predecessor)."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
    real = B.time.perf_counter
    clock = iter(range(10**6))

    def perf_counter():  # (a fake clock: 1 ms a reading)
        return next(clock) * 1e-3

    for warm in (1, 2):
        calls.clear()
        B.time.perf_counter = perf_counter
        try:
            out = B.timeit_many(fns, min_rounds=12, max_rounds=12, budget_s=0.0, warm_runs=warm)
        finally:
            B.time.perf_counter = real
        assert {k: v[1] for k, v in out.items()} == dict.fromkeys("abcde", 12)
        timed = calls[len(fns):]  # (after the first call of each)
        rounds = [timed[i * 5 * (warm + 1):(i + 1) * 5 * (warm + 1)] for i in range(12)]
        for rnd in rounds:
            for j in range(5):  # warm untimed runs, then the timed one, of one candidate
                block = rnd[j * (warm + 1):(j + 1) * (warm + 1)]
                assert len(set(block)) == 1
        orders = [tuple(rnd[::warm + 1]) for rnd in rounds]
        assert all(sorted(o) == list("abcde") for o in orders)
        predecessors = {o[o.index("a") - 1] for o in orders if o.index("a") > 0}
        assert len(predecessors) > 1


def test_timeit_many_times_a_memory_sweeping_peer_apart():
    """A peer whose first run takes over APART_FACTOR times the fastest peer's (and APART_MIN_S) runs in a
    round-robin of its own after the others', so its sweeps of memory never precede their timed runs; each still
    gets its own median; a candidate outside ``peers``, however slow, stays."""
    calls, now = [], [0.0]
    cost = {"a": 1e-3, "b": 2e-3, "slow": 5.0}

    def make(name):
        def fn():
            calls.append(name)
            now[0] += cost[name]
        return fn

    real = B.time.perf_counter
    B.time.perf_counter = lambda: now[0]
    try:
        out = B.timeit_many({n: make(n) for n in cost}, min_rounds=4, max_rounds=4, budget_s=0.0, warm_runs=1,
                            peers=("b", "slow"))
        n1 = len(calls)
        together = B.timeit_many({n: make(n) for n in cost}, min_rounds=4, max_rounds=4, budget_s=0.0, warm_runs=1,
                                 peers=("a", "b"))
    finally:
        B.time.perf_counter = real
    assert {n: round(v[0], 6) for n, v in out.items()} == {"a": 1.0, "b": 2.0, "slow": 5000.0}
    assert {n: v[1] for n, v in out.items()} == dict.fromkeys(cost, 4) and list(out) == list(cost)
    assert calls[:3] == ["a", "b", "slow"]  # (each candidate's first run, which tells the slow one)
    rest = calls[3:n1]
    last_fast = max(i for i, n in enumerate(rest) if n != "slow")
    assert "slow" not in rest[:last_fast] and rest[last_fast + 1:].count("slow") >= 4 * 2  # (timed + untimed)
    # not a peer: its runs come between the others' every round
    mixed = calls[n1 + 3:]
    assert {n: v[1] for n, v in together.items()} == dict.fromkeys(cost, 4)
    assert max(i for i, n in enumerate(mixed) if n != "slow") > mixed.index("slow")


def test_peak_alloc_counts_transients_not_replaced_state():
    """A step that briefly holds 4 MiB and replaces a 1 MiB tensor it keeps (as a layer keeps its statistics)
    peaks at 4 MiB above what was held before it (5 MiB would charge it for the old state's copy too)."""
    kept = {"state": torch.zeros(2**18)}  # 1 MiB of float32

    def step():
        kept["state"] = torch.zeros(2**18)  # the new state replaces the old: no net growth
        tmp = torch.ones(2**20)  # 4 MiB, freed at the end of the step
        tmp.add_(1)

    mb = B.peak_alloc_mb(step)
    assert mb is not None and abs(mb - 4.0) < 0.05, mb


def test_peak_alloc_sees_peaks_inside_one_operator():
    x = torch.randn(512, 512)
    mb = B.peak_alloc_mb(lambda: (x @ x).sum())  # the 1 MiB product lives only inside the expression
    assert mb is not None and 0.99 < mb < 1.5, mb


def test_machine_bound_is_the_larger_of_flops_and_bytes():
    shape = B.SHAPES["mixtral"]
    roof = {"float32": {"gemm_gflops": 100.0, "copy_gbps": 10.0}}
    flops_ms = B.expert_flops(shape, 1024) / 100e9 * 1e3
    assert B.machine_bound_ms(shape, 1024, "float32", "fwd", roof) == flops_ms  # large T: FLOP-bound
    # the GEMM rate measured just before the row's group, where given
    assert B.machine_bound_ms(shape, 1024, "float32", "fwd", roof, gemm_gflops=200.0) == flops_ms / 2
    # bf16 layers are bounded by the faster of the bf16 and fp32 GEMMs (a slow-bf16 CPU computes them in fp32)
    roof2 = {**roof, "bfloat16": {"gemm_gflops": 25.0, "copy_gbps": 10.0}}
    assert B.roof_gflops(roof2, "bfloat16") == 100.0 and B.roof_gflops(roof2, "float32") == 100.0
    bytes_ms = B.distinct_expert_bytes(shape, 1, torch.float32) / 10e9 * 1e3
    assert B.machine_bound_ms(shape, 1, "float32", "fwd", roof) == bytes_ms  # one token: memory-bound
    assert B.machine_bound_ms(shape, 1, "float32", "fwd", roof, copy_gbps=20.0) == bytes_ms / 2
    # forward+backward also writes every expert's weight gradient once
    grads = 3 * 8 * 512 * 1408 * 4 / 10e9 * 1e3
    assert abs(B.machine_bound_ms(shape, 1, "float32", "fwd+bwd", roof) - (bytes_ms + grads)) < 1e-9


def test_each_kind_of_cpu_writes_its_own_results_and_table(monkeypatch):
    monkeypatch.setattr(K, "amx", lambda: False)
    monkeypatch.setattr(K, "vector_isa", lambda: "avx512")
    assert B.result_names() == ("layer_cpu.json", "LAYER-BENCH")
    assert B.result_names(quick=True) == ("layer_cpu_quick.json", "LAYER-BENCH")
    monkeypatch.setattr(K, "vector_isa", lambda: "avx2")
    assert B.result_names() == ("layer_cpu_avx2.json", "LAYER-BENCH-AVX2")
    monkeypatch.setattr(K, "vector_isa", lambda: "avx512")
    monkeypatch.setattr(K, "amx", lambda: True)
    assert B.result_names() == ("layer_cpu_amx.json", "LAYER-BENCH-AMX")
    readme = (B.ROOT / "README.md").read_text()
    for marker in ("LAYER-BENCH", "LAYER-BENCH-AVX2", "LAYER-BENCH-AMX"):  # the README has a table for each
        assert f"<!-- {marker}:START -->" in readme and f"<!-- {marker}:END -->" in readme


def test_gemm_rates_measure_a_very_slow_library_on_a_smaller_cube(monkeypatch):
    """A GEMM library that would take over GEMM_MAX_RUN_S on the full cube runs one sized for GEMM_SLOW_RUN_S; a
    fast one runs the full cube. Both rates come out as the fake libraries' own (sleeps of n^3 FLOPs' time)."""
    import time

    monkeypatch.setattr(B, "GEMM_N", 512)
    monkeypatch.setattr(B, "GEMM_MAX_RUN_S", 0.01)
    monkeypatch.setattr(B, "GEMM_SLOW_RUN_S", 0.005)
    sizes = []

    def fake(dtype, n):  # "fast" at 200 GFLOP/s (2.7e8 FLOPs: 1.3 ms), "slow" at 4 GFLOP/s (67 ms on the full cube)
        sizes.append(n)
        return {"fast": lambda: time.sleep(2 * n**3 / 200e9), "slow": lambda: time.sleep(2 * n**3 / 4e9)}

    monkeypatch.setattr(B, "_gemms", fake)
    rates = B.gemm_rates(torch.float32)
    assert sizes[0] == 256 and sizes[1:] == [512, 256]  # slow: (4e9 * 0.005 / 2)^(1/3) = 215 -> the minimum, 256
    assert 100 < rates["fast"] <= 200 and 2 < rates["slow"] <= 4


def test_decode_rows_time_the_weight_read_floor_and_the_summary_uses_it(monkeypatch):
    """A small end-to-end run: decode-size rows also time one read of the touched experts' weights (the bytes every
    implementation of the step must read; forward+backward rows: a second read, backward's, and one write of every
    weight gradient); the
    summary calls a decode miss impossible only where that read alone exceeds the target, and a plain miss
    otherwise, and holds a speed-up at T <= 16 to the lower of the bound and that floor."""
    if K.library() is None:
        pytest.skip("no CPU kernels")
    tiny = dict(family="mixtral", d_model=64, d_ff=96, num_experts=8, top_k=2)
    monkeypatch.setattr(B, "SHAPES", {"mixtral": tiny})
    monkeypatch.setattr(B, "GEMM_N", 256)
    monkeypatch.setattr(B, "copy_rate", lambda: 10.0)
    result = B.bench(["mixtral"], [1, 32], [torch.float32], ["fwd", "fwd+bwd", "fwd-cold"], ["grouped_mm"],
                     tune_allocator=False)
    assert set(result["roofline"]) == {"float32"}
    # each pass's bound: the copy rate measured just before it (T <= 16), the GEMM timed in its round-robin (T > 16)
    assert set(result["copy_gbps_at"]) == {f"mixtral/float32/1/{m}" for m in ("fwd", "fwd+bwd", "fwd-cold")}
    assert set(result["gemm_gflops_at"]) == {"mixtral/float32/32", "mixtral/float32/32/fwd",
                                             "mixtral/float32/32/fwd+bwd"}
    assert all(v > 0 for v in (*result["copy_gbps_at"].values(), *result["gemm_gflops_at"].values()))
    assert not any(r["impl"] == "roofline" for r in result["rows"])
    reads = {r["mode"]: r for r in result["rows"] if r["impl"] == "weight_read"}
    assert set(reads) == {"fwd", "fwd+bwd", "fwd-cold"} and all(r["median_ms"] > 0 for r in reads.values())
    captured = []
    real_summary = B.targets_summary
    monkeypatch.setattr(B, "targets_summary", lambda checks: captured.append(checks) or real_summary(checks))
    table = B.summarise(result)
    speed = {k: hb for k, _, hb, _ in captured[0]["speed"]}
    for mode in ("fwd", "fwd+bwd"):
        rows = {r["impl"]: r["median_ms"] for r in result["rows"] if r["tokens"] == 1 and r["mode"] == mode}
        bound = B.machine_bound_ms(tiny, 1, "float32", mode, result["roofline"],
                                   result["copy_gbps_at"][f"mixtral/float32/1/{mode}"],
                                   B.roof_gflops(result["roofline"], "float32"))
        assert speed[f"mixtral float32 T=1 {mode}"] == pytest.approx(
            rows["hf_grouped_mm"] / min(bound, rows["weight_read"]))
    assert "weight-read floor ms" in table
    assert "use the rate timed in their own pass, round-robin with the candidates" in table
    assert "use the copy rate measured just before their pass" in table
    row = next(line for line in table.splitlines() if line.startswith("| mixtral | float32 | 1 | fwd-cold |"))
    assert row.split("|")[13].strip() == B._f(reads["fwd-cold"]["median_ms"])

    checks = {"speed": [], "roofline": [], "memory": [],
              "decode": [("a", 1.2, 0.9), ("b", 2.0, 1.7), ("c", 1.8, 1.1), ("d", 1.9, None)]}
    text = B.targets_summary(checks)
    assert "1 of 4 rows. Impossible on this machine in 1 rows" in text
    assert "b (2.00×, the read alone 1.70×)" in text
    assert "Missed: c (1.80×, the read alone 1.10×), d (1.90×)." in text


def test_a_bf16_only_run_measures_the_fp32_roofline_that_bounds_it(monkeypatch):
    """bf16 rows are bounded by the faster of the bf16 and fp32 GEMMs (a CPU without fast bf16 computes them in
    fp32), so a run of bf16 rows alone measures both rooflines; else its decode rows got a bound from PyTorch's
    0.3 GFLOP/s bf16 GEMM."""
    tiny = dict(family="mixtral", d_model=64, d_ff=96, num_experts=8, top_k=2)
    monkeypatch.setattr(B, "SHAPES", {"mixtral": tiny})
    measured = []
    monkeypatch.setattr(B, "roofline", lambda dt: measured.append(dt) or
                        {"gemm_gflops": 1.0 if dt == torch.bfloat16 else 100.0, "copy_gbps": 10.0})
    monkeypatch.setattr(B, "copy_rate", lambda: 10.0)
    result = B.bench(["mixtral"], [1], [torch.bfloat16], ["fwd"], [], tune_allocator=False)
    assert measured == [torch.bfloat16, torch.float32] and set(result["roofline"]) == {"bfloat16", "float32"}
    bytes_ms = B.distinct_expert_bytes(tiny, 1, torch.bfloat16) / 10e9 * 1e3
    flops_ms = B.expert_flops(tiny, 1) / 100e9 * 1e3
    assert B.machine_bound_ms(tiny, 1, "bfloat16", "fwd", result["roofline"], 10.0) == max(bytes_ms, flops_ms)


def test_merged_results_keep_each_pass_rate():
    """A result merged from runs of one pass each keeps each pass's GEMM rate under "<group>/<pass>": the roofline
    column of each row then uses its own run's rate, and a row without one the group's."""
    shape = dict(family="mixtral", d_model=64, d_ff=96, num_experts=8, top_k=2)
    flops = B.expert_flops(shape, 128)
    rows = [dict(shape="mixtral", dtype="float32", tokens=128, mode=mode, impl="moekit", median_ms=ms, runs=3,
                 peak_mem_mb=None, note="") for mode, ms in (("fwd", 1.0), ("fwd+bwd", 3.0))]
    result = {"meta": {"processor": "cpu", "threads": 2, "torch": "x", "transformers": "y", "cpu_kernels": "built",
                       "allocator_tuned": True},
              "roofline": {"float32": {"gemm_gflops": 1.0, "gemm_by_library": {"torch.mm": 1.0}, "copy_gbps": 1.0}},
              "shapes": {"mixtral": shape}, "rows": rows, "copy_gbps_at": {},
              "gemm_gflops_at": {"mixtral/float32/128": flops / 1e9 / 1e-3 / 0.5,  # the fwd row: 50%
                                 "mixtral/float32/128/fwd+bwd": 3 * flops / 1e9 / 3e-3 / 0.25}}  # 25%
    table = B.summarise(result)
    cols = {line.split("|")[4].strip(): line.split("|")[11].strip() for line in table.splitlines()
            if line.startswith("| mixtral |")}
    assert cols == {"fwd": "50%", "fwd+bwd": "25%"}


def _bench_script(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # (its dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def _bench_gpu():
    """benchmarks/bench_gpu.py (it runs only on a GPU; its bookkeeping is tested here)."""
    return _bench_script("bench_gpu")


def test_gpu_benchmark_runs_each_group_in_its_own_process_and_merges_them(monkeypatch, tmp_path):
    import json
    import subprocess
    from dataclasses import asdict
    from pathlib import Path

    G = _bench_gpu()
    argv = ["--shapes", "mixtral", "fine_grained", "--tokens", "1", "--dtypes", "bfloat16", "--out=x.json",
            "--budget-s", "0.5"]
    assert G.child_args(argv) == ["--tokens", "1", "--budget-s", "0.5"]
    rates = {"mixtral": 800.0, "fine_grained": 400.0}
    ran = []

    def fake_run(cmd):  # a child: one group's rows and its own roofline, or a crash for fine_grained
        shape, out = cmd[cmd.index("--shapes") + 1], cmd[cmd.index("--out") + 1]
        ran.append((shape, cmd[cmd.index("--dtypes") + 1]))
        if shape == "fine_grained":
            return subprocess.CompletedProcess(cmd, 1)
        row = G.Row(shape, "bfloat16", 1024, "fwd", "moekit_triton", 1.0, 10)
        roof = {"gemm_tflops_float32": 50.0, "gemm_tflops_tf32": 400.0, "gemm_tflops_bfloat16": rates[shape],
                "copy_gbps": 4000.0}
        Path(out).write_text(json.dumps({"meta": {"device": "gpu", "capability": "9.0", "torch": "t", "cuda": "c",
                                                  "triton": "3", "transformers": "5"},
                                         "roofline": roof, "shapes": {shape: G.SHAPES[shape]}, "rows": [asdict(row)]}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "layer_cuda.json"
    merged = G.run_isolated([("mixtral", "bfloat16"), ("fine_grained", "bfloat16")], argv, out)
    assert ran == [("mixtral", "bfloat16"), ("fine_grained", "bfloat16")]
    assert json.loads(out.read_text()) == merged and not list(tmp_path.glob("layer_cuda.*.json"))
    assert merged["rooflines"] == {"mixtral/bfloat16": merged["roofline"]}
    assert [r["impl"] for r in merged["rows"]] == ["moekit_triton", "process"]  # the crashed group: an error row
    assert merged["rows"][1]["shape"] == "fine_grained" and "exited with 1, before any result" in merged["rows"][1]["note"]
    table = G.summarise(merged)
    flops = B.expert_flops(G.SHAPES["mixtral"], 1024)
    assert f"| {100 * flops / 1e-3 / 800e12:.0f}% |" in table  # against the group's own roofline


def test_tile_benchmark_times_every_path_of_each_kernel(tmp_path):
    """benchmarks/bench_tiles.py on a tiny grid: both kernels, each candidate timed (packed where the build has a
    packed or AMX path for the dtype), the path the thresholds take named, and a table with a row per measurement."""
    mod = _bench_script("bench_tiles")
    if K.library() is None:
        pytest.skip(f"CPU kernels unavailable: {K.unavailable_reason()}")
    result = mod.bench(["fine_grained"], [2, 70], [torch.float32], rounds=2)
    assert [(r["rows"], r["kernel"]) for r in result["rows"]] == [(2, "up"), (2, "down"), (70, "up"), (70, "down")]
    for r in result["rows"]:
        assert {"dot", "default", "library"} <= set(r) and (("packed" in r) == K.packed_tiles(torch.float32))
        assert all(r[k]["median_ms"] > 0 for k in mod.CANDIDATES if k in r)
        assert r["dot"]["paired_vs_dot"] == 1.0
        assert r["default_path"] == ("packed" if K.packed_tiles(torch.float32) and r["rows"] >= K._packed_min(
            None, torch.float32) else "dot")
    table = mod.summarise(result)
    assert table.count("\n| fine_grained | float32 |") == 4


def test_decode_routing_benchmark_pairs_fused_and_regular_steps(tmp_path, monkeypatch):
    """benchmarks/bench_decode_routing.py on a tiny grid: every router case takes the fused decode, each step is timed
    fused and on the regular path of the same module, and the table has a row per (shape, router, dtype)."""
    import json

    mod = _bench_script("bench_decode_routing")
    if K.library() is None:
        pytest.skip(f"CPU kernels unavailable: {K.unavailable_reason()}")
    monkeypatch.setattr(mod, "SHAPES", {"tiny": (16, 32, 8, 2)})
    monkeypatch.setattr(mod, "TOKENS", (1, 4, 16))
    out = tmp_path / "decode.json"
    mod.main(["--out", str(out), "--no-doc"])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(mod.ROUTERS) * 2 * 3
    assert all(r["fused_decode_taken"] and r["fused_ms"] > 0 and r["regular_ms"] > 0 for r in rows)
    table = mod.table({"rows": rows, "machine": {"cpu": "x", "isa": "y", "threads": 1}})
    assert table.count("\n| tiny |") == len(mod.ROUTERS) * 2 and "not fused" not in table


def _trace(memory, marks, scratch_mark="moekit_c_scratch:"):
    """A profiler trace of the measured call: allocator events (ts, bytes, running total) and scratch marks (ts,
    bytes)."""
    events = [{"name": "moekit_peak_measured_call", "ph": "X", "ts": 0, "dur": 100}]
    events += [{"name": "[memory]", "ts": ts, "args": {"Device Type": 0, "Bytes": b, "Total Allocated": tot}}
               for ts, b, tot in memory]
    events += [{"name": f"{scratch_mark}{b}", "ph": "X", "ts": ts, "dur": 0} for ts, b in marks]
    return events


def test_peak_adds_each_calls_scratch_to_what_pytorch_held_then():
    # base 100 bytes; PyTorch goes to 1100, a kernel holds 5000 of scratch, PyTorch then peaks at 3100
    memory = [(10, 1000, 1100), (30, 2000, 3100), (40, -2000, 1100)]
    assert B._peak_from_trace(_trace(memory, [(20, 5000)]), 5000) == 6000  # 1000 + 5000 at t = 20
    assert B._peak_from_trace(_trace(memory, [(35, 500)]), 500) == 3500  # 3000 + 500 at t = 35
    assert B._peak_from_trace(_trace(memory, []), 0) == 3000
    # scratch the marks do not account for (a call they did not see) is added to PyTorch's peak whole
    assert B._peak_from_trace(_trace(memory, [(20, 100)]), 7000) == 10000
    # events outside the measured call do not count
    assert B._peak_from_trace(_trace(memory + [(150, 10**6, 10**6)], [(120, 10**6)]), 0) == 3000


def test_a_speed_miss_is_beyond_the_library_only_where_its_gemms_alone_are_too_slow():
    """A row short of the speed-up target, though the machine bound allows it, counts as beyond the library GEMMs
    (not met) only where moekit is no faster than the same FLOPs on the library's GEMMs with no routing (the faster
    of the per-expert GEMM floor and the dense FFN of equal active FLOPs) and that alone allows less than the
    target; otherwise it is a plain miss."""
    shape = dict(family="mixtral", d_model=512, d_ff=256, num_experts=64, top_k=8)
    roof = {"float32": {"gemm_gflops": 1000.0, "gemm_by_library": {"torch.mm": 1000.0}, "copy_gbps": 20.0}}

    def result(mk, hf, gemm_floor, dense):
        rows = [dict(shape="s", dtype="float32", tokens=1024, mode="fwd+bwd", impl=name, median_ms=ms, runs=5,
                     peak_mem_mb=None)
                for name, ms in [("moekit", mk), ("hf_grouped_mm", hf), ("gemm_floor", gemm_floor),
                                 ("dense_equal_flops", dense)]]
        meta = dict(processor="cpu", threads=2, torch="t", transformers="x", peak_memory=B.PEAK_MEMORY)
        return dict(meta=meta, roofline=roof, copy_gbps_at={}, gemm_gflops_at={}, shapes={"s": shape}, rows=rows)

    bound = B.machine_bound_ms(shape, 1024, "float32", "fwd+bwd", roof)
    assert 188 / bound > 1.5  # the machine bound allows the target in every case below
    # moekit (131) slower than the dense FFN (127), which allows 188 / 127 = 1.48x: beyond the library
    text = B.summarise(result(131.0, 188.0, 143.0, 127.0))
    assert "s float32 T=1024 fwd+bwd (1.44×, the library allows 1.48×)" in text
    assert "Missed although both allow it: none." in text
    # moekit faster than both floors: its own kernels beat the library, so the miss is a plain one
    text = B.summarise(result(131.0, 188.0, 143.0, 135.0))
    assert "Missed although both allow it: s float32 T=1024 fwd+bwd (1.44×" in text
    # the floors themselves allow the target (188 / 120 = 1.57x): a plain miss too
    text = B.summarise(result(131.0, 188.0, 143.0, 120.0))
    assert "Missed although both allow it: s float32 T=1024 fwd+bwd (1.44×" in text
    # no dense FFN in the row: the per-expert floor alone decides, as before
    text = B.summarise(result(150.0, 188.0, 143.0, None))
    assert "s float32 T=1024 fwd+bwd (1.25×, the library allows 1.31×)" in text


def test_triton_host_benchmark_times_the_triton_path_with_launches_stubbed(tmp_path, monkeypatch):
    """benchmarks/bench_triton_host.py on a tiny grid: each step runs the Triton path (its launches recorded by the
    stand-ins: 5 in an inference forward, 12 in a training step), the stand-ins and the thread count are restored
    afterwards, the table has a row per (shape, dtype, T), and a training step's peak memory is measured for the
    Triton path and transformers' block."""
    import json

    pytest.importorskip("triton")
    from moekit.experts import triton_backend as tb
    from moekit.kernels import triton_moe as tm

    mod = _bench_script("bench_triton_host")
    monkeypatch.setattr(mod, "SHAPES", {"tiny": (16, 32, 8, 2)})
    monkeypatch.setattr(mod, "TOKENS", (1, 3))
    monkeypatch.setattr(mod, "MEMORY_CASES", (("tiny", torch.float32, 40),))
    monkeypatch.setattr(mod, "run", functools.partial(mod.run, rounds=2, per_round=2, tune_allocator=False))
    from moekit.kernels import cpu_gemm

    saved = tm._launch, tb.triton_usable, cpu_gemm.on_cpu, torch.get_num_threads()
    out = tmp_path / "host.json"
    mod.main(["--out", str(out), "--no-doc"])
    assert (tm._launch, tb.triton_usable, cpu_gemm.on_cpu, torch.get_num_threads()) == saved
    result = json.loads(out.read_text())
    rows = result["rows"]
    (mem,) = result["memory"]  # (both peaks measured, each at least the experts' weight gradients: 8 x 3 x 16 x 32)
    assert min(mem["moekit_triton_mb"], mem["hf_grouped_mm_mb"]) * 2**20 >= 8 * 3 * 16 * 32 * 4
    assert len(rows) == 2 * 2 * 2
    assert all(r["host_us"] > 0 and 0 < r["torch_kernels"] < r["ops"] for r in rows)  # (views launch nothing)
    assert 0 < result["plain_op_us"] < min(r["host_us"] for r in rows)
    assert {r["launches"] for r in rows if r["mode"] == "fwd"} == {4}  # (routing and index in one)
    assert {r["launches"] for r in rows if r["mode"] == "fwd+bwd"} == {11}
    table = mod.table({"rows": rows, "machine": {"cpu": "x", "torch": "t", "triton": "3"}, "memory": [mem],
                       "plain_op_us": result["plain_op_us"]})
    assert table.count("\n| tiny |") == 5 and "| tiny | float32 | 40 |" in table and "plain PyTorch operator" in table


class _SimStream:
    """One CUDA stream and the host, simulated (times in ms): a launch issued at host time ``h`` starts when the GPU
    has finished what was queued before it and ``h`` has come; an event is stamped when the GPU reaches it;
    ``synchronize`` makes the host wait for the GPU. The spin kernel runs ``CYCLES_PER_MS`` cycles a millisecond."""

    CYCLES_PER_MS = 1.5e6

    def __init__(self):
        self.host = 0.0
        self.gpu_free = 0.0
        self.flushes = 0
        self.spins = []

    def launch(self, gpu_ms: float) -> None:
        self.gpu_free = max(self.gpu_free, self.host) + gpu_ms

    def issue(self, host_ms: float) -> None:
        self.host += host_ms

    def synchronize(self) -> None:
        self.host = max(self.host, self.gpu_free)

    def event(self):
        sim = self

        class Event:
            def record(self):
                self.at = max(sim.host, sim.gpu_free)  # (nothing queued after it yet: stamped when the GPU gets there)
                sim.gpu_free = self.at

            def elapsed_time(self, end):
                return end.at - self.at

        return Event()

    def spin(self, cycles: int) -> None:
        self.spins.append(cycles / self.CYCLES_PER_MS)
        self.launch(cycles / self.CYCLES_PER_MS)

    def flush(self) -> None:
        self.flushes += 1
        self.launch(0.15)

    def clock(self) -> float:
        return self.host / 1e3  # (seconds, as time.perf_counter)


def _sim_call(sim, ops, pre_ms=0.0):
    """A call that spends ``pre_ms`` on the host, then issues each ``(host_ms, gpu_ms)`` launch in turn."""
    def call():
        sim.issue(pre_ms)
        for host_ms, gpu_ms in ops:
            sim.issue(host_ms)
            sim.launch(gpu_ms)
    return call


def test_gpu_benchmark_times_graphs_by_device_time_and_eager_calls_from_an_idle_gpu():
    """bench_gpu.cuda_timeit_many on a simulated stream: a graph replay (0.03 ms of host issue, 0.038 ms of GPU) is
    timed at its GPU time wherever it falls in the order, an eager call (10 launches of 0.05 ms host, 0.002 GPU) at its
    issue plus the GPU's tail, both the same warm and cold; the protocol before (back to back, fixed order) gave the
    graph placed after an eager call the host's issue and the next graph none."""
    G = _bench_gpu()
    sim = _SimStream()
    fns = {"eager": _sim_call(sim, [(0.05, 0.002)] * 10), "graph_a": _sim_call(sim, [(0.03, 0.038)]),
           "graph_b": _sim_call(sim, [(0.03, 0.060)])}
    for cold in (False, True):
        out = G.cuda_timeit_many(fns, min_reps=12, max_reps=12, budget_s=0.0, cold=cold,
                                 device_timed={"graph_a", "graph_b"}, dev=sim)
        assert out["graph_a"][:2] == (pytest.approx(0.038), 12) and out["graph_b"][0] == pytest.approx(0.060)
        assert out["eager"][:2] == (pytest.approx(0.5 + 0.002), 12)
        assert out["graph_a"][2] == pytest.approx(0.03) and out["eager"][2] == pytest.approx(0.5)
    assert sim.flushes == 3 * 12  # (cold: before every run)
    # the head start before each graph run: the minimum, above twice the graphs' 0.03 ms issue
    # (the others, 2M cycles each, measured the device's clock: two per call)
    heads = [x for x in sim.spins if x < 1.0]
    assert heads == pytest.approx([G.HEAD_START_MIN_MS] * (2 * 2 * 12))

    # the first protocol on the same calls: the graph after the eager call pays its issue, the one after it does not
    def back_to_back(order):
        stamps = {}
        sim.synchronize()
        for name in order:
            a, b = sim.event(), sim.event()
            a.record()
            fns[name]()
            b.record()
            stamps[name] = a.elapsed_time(b)
        return stamps

    old = back_to_back(["eager", "graph_a", "graph_b"])
    # (graph_a: the issue, less the eager call's 0.002 ms tail it overlaps, and its own 0.038 ms)
    assert old["graph_a"] == pytest.approx(0.03 - 0.002 + 0.038) and old["graph_b"] == pytest.approx(0.060)


def test_gpu_benchmark_drops_runs_whose_issue_outlasted_the_head_start():
    """A device-timed call whose host issue grows after warm-up (here to 1 ms, past the 0.25 ms head start): the runs
    where the GPU waited for the host are not counted, the head start grows, and the median is the GPU's time."""
    G = _bench_gpu()
    sim = _SimStream()
    calls = {"n": 0}

    def slow_later():
        calls["n"] += 1
        sim.issue(0.01 if calls["n"] <= 3 else 1.0)  # (3 warm-up calls)
        sim.launch(0.04)

    out = G.cuda_timeit_many({"graph": slow_later}, min_reps=5, max_reps=6, budget_s=0.0, device_timed={"graph"},
                             dev=sim)
    assert out["graph"][:2] == (pytest.approx(0.04), 5)  # 6 runs, the first too short a head start
    # (after the two spins that measure the device's clock) the head start: 0.25 ms, then twice the 1 ms issue
    assert sim.spins[2:] == pytest.approx([G.HEAD_START_MIN_MS] + [2.0] * 5)


def test_gpu_benchmark_pairs_the_layers_tiles_with_the_other_choice():
    """At decode sizes bench_gpu.py also times the graphed layer with the other choice of GEMM tiles (fp32: 16-row
    tl.dot tiles instead of few-row ones; bf16 at one row per expert: few-row tiles instead of tl.dot), set for its
    first call (the capture) and restored after, and lists each pair after the table, named by the tiles they ran."""
    from moekit.kernels import triton_moe as tm

    G = _bench_gpu()
    mixtral, fine = G.SHAPES["mixtral"], G.SHAPES["fine_grained"]
    assert G.other_tiles(mixtral, torch.float32, 16) == {} and G.other_tiles(fine, torch.float32, 1) == {}
    assert G.other_tiles(mixtral, torch.bfloat16, 1) == {**tm.FMA_MAX_ROWS, torch.bfloat16: 1}
    assert G.other_tiles(mixtral, torch.bfloat16, 16) is None and G.other_tiles(mixtral, torch.float32, 128) is None
    assert G.tiles_note(mixtral, torch.float32, 16) == "tiles: 4-row (CUDA cores)"
    assert G.tiles_note(mixtral, torch.float32, 16, {}) == G.tiles_note(mixtral, torch.bfloat16, 1) == "tiles: tl.dot"
    assert G.tiles_note(mixtral, torch.bfloat16, 1, G.other_tiles(mixtral, torch.bfloat16, 1)) == \
        "tiles: 1-row (CUDA cores)"
    seen, before = [], dict(tm.FMA_MAX_ROWS)
    G.with_tiles(lambda: seen.append(tm.block_m_for(0.25, torch.float32)), {})()
    assert seen == [16] and tm.FMA_MAX_ROWS == before and tm.block_m_for(0.25, torch.float32) == 1
    rows = [dict(shape="mixtral", dtype="float32", tokens=1, mode="fwd", impl=impl, median_ms=ms, runs=10,
                 peak_mem_mb=None, note=note) for impl, ms, note in (
        ("moekit_triton_graph", 0.05, "tiles: 1-row (CUDA cores)"), (G.OTHER_TILES, 0.1, "tiles: tl.dot"),
        ("hf_batched_mm_graph", 0.06, ""))]
    roof = {"gemm_tflops_float32": 50.0, "gemm_tflops_tf32": 400.0, "gemm_tflops_bfloat16": 800.0, "copy_gbps": 4e3}
    table = G.summarise({"meta": {"device": "gpu", "capability": "9.0", "torch": "t", "cuda": "c", "triton": "3",
                                  "transformers": "5"}, "roofline": roof, "shapes": {"mixtral": mixtral}, "rows": rows})
    assert "| 1.20× |" in table  # (the table's moekit: the layer as it runs, 0.05 ms; not the A/B's 0.1)
    assert "- mixtral float32 T=1 fwd: 0.050 ms (1-row (CUDA cores), the layer's), 0.100 (tl.dot): 2.00x" in table


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_sass_benchmark_reads_the_compiled_gemms_of_each_tile_choice():
    """benchmarks/sass_triton.py on two one-token cases: the grouped GEMMs compiled for sm_90 and read back; fp32
    takes the few-row tiles (CUDA cores) whose longest program issues far fewer instructions than 16-row tl.dot
    tiles, bf16 keeps tl.dot with few-row tiles as the other choice; a table row per case."""
    pytest.importorskip("triton")
    mod = _bench_script("sass_triton")
    try:
        result = mod.run(shapes=("mixtral",), tokens=(1,), modes=("fwd", "fwd+bwd"))
    except NotImplementedError as e:  # (another Triton's internals)
        pytest.skip(str(e))
    by_dtype = {r["dtype"]: r for r in result["rows"] if r["mode"] == "fwd"}
    (bwd32,) = [r["choices"] for r in result["rows"] if r["mode"] == "fwd+bwd" and r["dtype"] == "float32"]
    assert [g["gemm"] for g in bwd32["layer"]["gemms"]] == ["up", "down", "dA", "dW_down", "dX", "dW_up"]
    dw = [g for g in bwd32["layer"]["gemms"] if g["gemm"].startswith("dW")]  # (1 row per used expert: 1 step)
    assert all(g["cuda_cores"] and g["steps"] == 1 for g in dw)
    assert bwd32["tl.dot"]["warp_instructions"] > bwd32["layer"]["warp_instructions"]
    fp32, bf16 = by_dtype["float32"]["choices"], by_dtype["bfloat16"]["choices"]
    assert set(fp32) == {"layer", "tl.dot"} and set(bf16) == {"layer", "few-row"}
    assert all(g["cuda_cores"] for g in fp32["layer"]["gemms"]) and not any(g["cuda_cores"] for g in fp32["tl.dot"]["gemms"])
    assert [g["gemm"] for g in fp32["layer"]["gemms"]] == ["up", "down"]
    assert [g["programs"] for g in fp32["layer"]["gemms"]] == [2 * 1408 // 16, 2 * 512 // 16]  # (2 experts of 1 row)
    assert fp32["tl.dot"]["longest_program"] > 5 * fp32["layer"]["longest_program"] > 0
    assert all(g["registers"] and g["loop"] and g["steps"] for c in (fp32, bf16) for ch in c.values() for g in ch["gemms"])
    text = mod.table(result)
    assert text.count("\n| mixtral |") == 4 and "| tl.dot |" in text and "| few-row |" in text


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_sass_spill_sweep_compiles_every_kernel_of_a_layer_step():
    """benchmarks/sass_triton.py --spills on one fine-grained bf16 training step of 8 tokens: every kernel the layer
    launches (routing and index in one, the GEMMs, combine, the router-weight and routing gradients) compiled once
    per specialisation with its registers and spills; the table lists the spilling ones and says how many."""
    pytest.importorskip("triton")
    mod = _bench_script("sass_triton")
    _bench_script("bench_triton_host")  # (whose stand-ins it takes, imported by name)
    try:
        result = mod.spills(shapes=("fine_grained",), dtypes=(torch.bfloat16,), tokens=(8,), modes=("fwd+bwd",))
    except NotImplementedError as e:  # (another Triton's internals)
        pytest.skip(str(e))
    names = {k["kernel"] for k in result["kernels"]}
    assert {"_route_align_kernel", "_grouped_gemm_kernel", "_grouped_xty_kernel", "_combine_kernel",
            "_weights_grad_kernel", "_topk_softmax_bwd_kernel"} <= names, names
    assert all(k["registers"] and k["instructions"] and k["cases"] == ["fine_grained bfloat16 T=8 fwd+bwd"]
               for k in result["kernels"])
    text = mod.spills_table(result)
    bad = [k for k in result["kernels"] if k["spill_stores"] or k["spill_loads"]]
    assert f"{len(result['kernels'])} distinct specialisations, {len(bad)} of them spilling" in text
    assert text.count("\n| `_") == len(bad)
    bad.append(dict(result["kernels"][0], spill_stores=2, spill_loads=3))  # (a spilling one is listed)
    text = mod.spills_table(dict(result, kernels=result["kernels"] + bad[-1:]))
    assert f"| {bad[-1]['registers']} | 2 / 3 | " in text
    # (and one whose tensor-core products are waited for one by one; one wait a step is the pipelined loop)
    fine = dict(result["kernels"][0], mma_in_loop=4, mma_waits_in_loop=1)
    slow = dict(fine, mma_waits_in_loop=4)
    text = mod.spills_table(dict(result, kernels=result["kernels"] + [fine, slow]))
    assert "1 waiting for each tensor-core product in their K loop" in text and text.count("| 4 / 4 |") == 1
    assert "| 4 / 1 |" not in text


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_warm_triton_fills_the_cache_the_jit_then_reads(tmp_path, monkeypatch):
    """benchmarks/warm_triton.py on the one-token Mixtral-like fp32 forward (the Triton layer under both choices of
    tiles, the grouped_mm layer): its launches recorded as the GPU benchmark builds the layers, one job per
    specialisation, compiled ahead for sm_90 by two
    worker processes into an empty cache. Triton's JIT then launching the same steps on the CPU tensors themselves
    (a stand-in driver reporting an sm_90 GPU; ``warmup``: compile, no launch) finds every specialisation there and
    compiles nothing, while a step that was not warmed (bf16) adds entries; a second warm adds none."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from moekit.kernels import triton_moe as tm

    W = _bench_script("warm_triton")
    S = _bench_script("sass_triton")
    _bench_script("bench_triton_host")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    case = dict(shapes=("mixtral",), dtypes=("float32",), tokens=(1,), modes=("fwd",))
    n, jobs = W.record(**case)
    assert n > len(jobs) >= 3 and {j[1] for j in jobs} >= {"_route_align_kernel", "_grouped_gemm_kernel"}
    try:
        W.compile_one(jobs[0], ("cuda", 90, 32))  # (in this process: another Triton's internals skip here)
    except NotImplementedError as e:
        pytest.skip(str(e))
    first = W.warm(jobs, workers=2, target=("cuda", 90, 32))
    assert first["failed"] == 0 and first["specialisations"] == len(jobs), first
    assert W.entries() == len(jobs)  # (one entry per specialisation: the key is no finer than the JIT's here)
    assert W.warm(jobs, workers=2, target=("cuda", 90, 32))["new_cache_entries"] == 0

    class Sm90:  # the JIT's view of a device: no GPU is touched before a launch, which warmup skips
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    def jit(dtype, limits=None, backend="triton"):
        layer = W._layer("mixtral", dtype, backend)
        with tm.fma_rows(limits):
            calls = S.layer_launches("mixtral", dtype, 1, "fwd", layer=layer, both=True)
        for kernel, args, kwargs in calls:
            kernel.warmup(*args, grid=(1,), **kwargs)
        return {k for k, _, _ in calls}

    monkeypatch.setattr(driver, "_active", Sm90())
    kernels: set = set()
    try:
        kernels |= jit(torch.float32)
        kernels |= jit(torch.float32, tm.other_tiles(0.25, torch.float32)[1])
        kernels |= jit(torch.float32, backend="grouped_mm")  # (its router's Triton kernels)
        assert W.entries() == len(jobs)  # every specialisation the JIT asked for was there
        kernels |= jit(torch.bfloat16)
        assert W.entries() > len(jobs)  # (and one it did not warm is not)
    finally:
        for k in kernels:  # (binders made for the stand-in device)
            k.device_caches.clear()


def test_gpu_benchmark_merges_runs_keeping_each_groups_roofline(tmp_path, capsys):
    """bench_gpu.py --merge (no GPU needed): a run of several groups (its rooflines per group) and a single group's
    partial result (one roofline) as one result, rows in run order, each group with its own roofline; missing files
    are left out."""
    import json

    G = _bench_gpu()
    meta = {"device": "gpu", "capability": "9.0", "torch": "t", "cuda": "c", "triton": "3", "transformers": "5"}

    def roof(bf16):
        return {"gemm_tflops_float32": 50.0, "gemm_tflops_tf32": 400.0, "gemm_tflops_bfloat16": bf16,
                "copy_gbps": 4e3}

    def row(shape, dtype, T):
        return dict(shape=shape, dtype=dtype, tokens=T, mode="fwd", impl="moekit_triton_graph", median_ms=0.05,
                    runs=10, peak_mem_mb=None, note="")

    decode = {"meta": meta, "roofline": roof(700.0), "shapes": {"mixtral": G.SHAPES["mixtral"]},
              "rooflines": {"mixtral/bfloat16": roof(700.0)}, "rows": [row("mixtral", "bfloat16", 1)]}
    part = {"meta": meta, "roofline": roof(800.0), "shapes": {"fine_grained": G.SHAPES["fine_grained"]},
            "rows": [row("fine_grained", "float32", 1)]}
    paths = [tmp_path / "decode.json", tmp_path / "decode.fine_grained.float32.json", tmp_path / "large.json"]
    paths[0].write_text(json.dumps(decode))
    paths[1].write_text(json.dumps(part))
    out = tmp_path / "layer_cuda.json"
    G.main(["--merge", *map(str, paths), "--out", str(out)])
    merged = json.loads(out.read_text())
    assert [(r["shape"], r["dtype"]) for r in merged["rows"]] == [("mixtral", "bfloat16"), ("fine_grained", "float32")]
    assert merged["rooflines"] == {"mixtral/bfloat16": roof(700.0), "fine_grained/float32": roof(800.0)}
    assert set(merged["shapes"]) == {"mixtral", "fine_grained"}
    table = capsys.readouterr().out
    assert "\n| mixtral | bfloat16 | 1 | fwd |" in table and "\n| fine_grained | float32 | 1 | fwd |" in table
    # --doc: the table (its checks and errors left out) between the README's GPU markers, the text around kept
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n<!-- {G.DOC_MARKER}:START -->\nold table\n<!-- {G.DOC_MARKER}:END -->\noutro\n")
    part["rows"].append(dict(row("fine_grained", "float32", 1), impl="hf_eager", median_ms=None, note="error: boom"))
    paths[1].write_text(json.dumps(part))
    G.main(["--merge", *map(str, paths), "--out", str(out), "--doc", str(doc)])
    assert "Checks and errors" in capsys.readouterr().out
    written = doc.read_text()
    assert written.startswith(f"intro\n<!-- {G.DOC_MARKER}:START -->\nMeasured on gpu (sm_90)")
    assert written.endswith(f"|\n<!-- {G.DOC_MARKER}:END -->\noutro\n")
    assert "old table" not in written and "boom" not in written and "\n| fine_grained | float32 | 1 | fwd |" in written
    with pytest.raises(SystemExit, match="exists"):
        G.main(["--merge", str(paths[2]), "--out", str(out)])
