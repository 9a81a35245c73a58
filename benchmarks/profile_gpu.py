"""Where a moekit layer step's time goes on a GPU: torch.profiler over a few steps of one configuration, split into
host time (Python + launches) and device time (the kernels), with the kernels ranked by their device time.

On the device machine, from the repository root:
    python benchmarks/profile_gpu.py --shape mixtral --dtype bfloat16 --tokens 1 8192 --mode fwd
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import moekit
from moekit.benchmark import SHAPES, hf_block, make_step


def profile_one(shape_name: str, dtype: torch.dtype, T: int, mode: str, backend: str, steps: int) -> str:
    shape = SHAPES[shape_name]
    layer = moekit.from_hf(hf_block(shape, dtype), backend=backend).to("cuda", dtype)
    x = torch.randn(1, T, shape["d_model"], device="cuda").to(dtype)
    step = make_step(layer, x, mode)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host_ms = (time.perf_counter() - t0) * 1e3 / steps  # the host's own pace (launches are asynchronous)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / steps
    head = (f"## {shape_name} {dtype} T={T} {mode} backend={backend}: wall {wall_ms:.3f} ms/step, host issue "
            f"{host_ms:.3f} ms/step, device busy {device_us / steps / 1e3:.3f} ms/step in {kernels:.0f} kernels")
    table = events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60)
    cpu = events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60)
    return f"{head}\n\nby device time:\n{table}\nby host time:\n{cpu}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral", choices=list(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 8192])
    ap.add_argument("--mode", default="fwd", choices=["fwd", "fwd+bwd"])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_gpu.py needs a CUDA GPU; on CPU see benchmarks/bench_layer.py")
    for T in args.tokens:
        print(profile_one(args.shape, getattr(torch, args.dtype), T, args.mode, args.backend, args.steps), flush=True)


if __name__ == "__main__":
    main()
