"""Cases for the ``triton`` experts backend, each checked against the ``loop`` reference, forward and backward.

Used by ``tests/test_triton.py`` in two ways: on CPU it runs this module in a subprocess with ``TRITON_INTERPRET=1``
(the interpreter must be switched on before Triton's kernels are defined, and must stay off for the rest of the
suite); on CUDA it calls :func:`run_case` in-process. :func:`run_case` returns numbers only (errors, scales, kernel
launches); the tolerances live in the test, so a failure there names the case and the tensor.

    TRITON_INTERPRET=1 python -m tests.triton_cases [--device cpu] [--out results.json] [case ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

import moekit
from moekit.dispatch.local import LocalDispatcher
from moekit.experts import Experts
from moekit.routing.base import RouterOutput

# Experts-level cases: hand-built routing (exact control of empty experts and empty slots), a differentiable
# weights_TK so the router-weight gradient is checked directly. Shapes are tiny: the interpreter is slow.
EXPERT_CASES: dict[str, dict] = {
    "swiglu": dict(E=4, K=2, T=9, D=24, F=40),
    "swiglu_bias_odd_dims": dict(E=5, K=2, T=11, D=19, F=23, bias=True),
    "multi_tile": dict(E=2, K=1, T=45, D=70, F=66, bias=True),  # >1 row tile per expert, >1 K step, >1 N tile
    "empty_experts": dict(E=8, K=2, T=7, D=16, F=24, only_experts=(1, 5)),
    "empty_slots_dynamic_k": dict(E=4, K=3, T=10, D=16, F=20, empty_frac=0.4),
    "capacity_drops": dict(E=4, K=2, T=12, D=16, F=24, capacity_factor=0.5),
    "all_slots_empty": dict(E=4, K=2, T=5, D=16, F=24, empty_frac=1.0),
    "zero_tokens": dict(E=4, K=2, T=0, D=16, F=24),
    "gelu_bias": dict(E=4, K=2, T=9, D=20, F=28, activation="gelu", bias=True),
    "gpt_oss_gated_bias": dict(E=4, K=2, T=9, D=16, F=24, activation="gpt_oss", bias=True),
    "non_contiguous_x": dict(E=4, K=2, T=9, D=24, F=40, transposed_x=True),
    "frozen_experts": dict(E=4, K=2, T=9, D=24, F=40, frozen=True),
    "fp16": dict(E=4, K=2, T=9, D=24, F=40, dtype="float16"),
    "autocast_bf16": dict(E=4, K=2, T=9, D=24, F=40, autocast=True),
    # fp32 inputs and weights cast to bf16 once before the GEMMs (triton_backend.PRECAST_MIN_ROWS rows per expert)
    "autocast_bf16_precast": dict(E=2, K=1, T=600, D=16, F=24, autocast=True, precast=True),
    # A GPU's tile sizes (BLOCK_M 32/64/128, GROUP_M 8 swizzle, several column tiles) under the interpreter too, which
    # otherwise runs 16-row tiles only: rows per expert pick them (see triton_moe.gemm_config).
    "gpu_tiles_m32": dict(E=4, K=2, T=90, D=40, F=72, gpu_tiles=32),
    "gpu_tiles_m64_bias": dict(E=3, K=2, T=200, D=70, F=100, bias=True, gpu_tiles=64),
    "gpu_tiles_m128_gelu": dict(E=2, K=1, T=1100, D=48, F=136, activation="gelu", bias=True, gpu_tiles=128),
    "gpu_tiles_m128_swiglu": dict(E=3, K=2, T=800, D=36, F=200, only_experts=(0, 2), gpu_tiles=128),
    # few rows per expert: tiles of 1-8 rows multiplied on the CUDA cores (triton_moe._mac; fp32 up to 8 rows per
    # expert; the m1 case in bf16 too, see BF16_FMA_CASES), the GPU's narrow column tiles (several K steps and column
    # tiles here); the other fp32 cases of <= 8 rows per expert take them too, at the interpreter's sizes
    "gpu_tiles_fma_m1": dict(E=8, K=2, T=3, D=70, F=100, bias=True, gpu_tiles=1),
    "gpu_tiles_fma_m4": dict(E=4, K=2, T=7, D=40, F=72, gpu_tiles=4),
}
# The same cases in bf16 (weights and input), compared with the bf16 loop and with an fp32 loop.
BF16_CASES = ("swiglu", "swiglu_bias_odd_dims", "multi_tile", "empty_slots_dynamic_k", "gelu_bias",
              "gpu_tiles_m64_bias", "gpu_tiles_fma_m1")
# bf16 cases run with the few-row tiles allowed for bf16 (triton_moe.FMA_MAX_ROWS; off by default, the GPU
# benchmark's A/B tries them)
BF16_FMA_CASES = ("gpu_tiles_fma_m1",)
# Whole-layer cases (router, dispatcher and experts; the router weight's gradient includes the routing weights').
LAYER_CASES: dict[str, dict] = {
    # dropless top-k: the experts index the slots themselves (one align kernel, no dispatch plan)
    "layer_planless_softmax_topk": dict(num_experts=6, top_k=2),
    "layer_planless_shared_bias": dict(num_experts=5, top_k=3, shared_experts=1, router_kwargs=dict(bias=True)),
    "layer_top_p": dict(num_experts=6, top_k=3, router="top_p", router_kwargs=dict(p=0.5)),
    "layer_switch_capacity": dict(num_experts=4, top_k=1, router="switch", capacity_factor=0.5, expert_bias=True),
}
# Double backward (Hessian-vector products) of a whole layer against forward-over-reverse on the loop reference:
# the plan-free path (with the routing kernel) and the dispatcher's.
HVP_CASES: dict[str, dict] = {
    "hvp_dropless_softmax_topk": dict(num_experts=6, top_k=2, z_loss_coef=0.1),
    "hvp_capacity_gelu_bias": dict(num_experts=5, top_k=2, capacity_factor=1.0, activation="gelu", expert_bias=True),
}
# A layer's inference and training steps through the call prepared once per module state (MoE._triton_prepared:
# PreparedRouted) against the regular plan-free path on the same layer: the same output, statistics and gradients, bit for bit, as the
# parameters change in place, experts are disabled and enabled, a routing hook comes and goes, the layer is cast.
PREPARED_CASES: dict[str, dict] = {
    "prepared_inference": dict(num_experts=6, top_k=2),
    "prepared_shared_gelu_bias": dict(num_experts=5, top_k=3, shared_experts=1, activation="gelu", expert_bias=True,
                                      router_kwargs=dict(bias=True)),
}
# The plan-free index (moekit.kernels.triton_moe.align) against the dispatcher's sort and the tile schedule: one
# program, and blocks of a few slots standing in for the three-launch path of large batches.
ALIGN_CASES: dict[str, dict] = {
    "align_one_program": dict(T=33, K=8, E=64, block_m=16),
    "align_blocks": dict(T=150, K=8, E=64, block_m=16, block_slots=32),
    "align_blocks_ragged": dict(T=37, K=3, E=5, block_m=32, block_slots=16),
    # the scan over the blocks' histograms in several chunks of blocks (13 blocks, chunks of 8 at 1024 expert bins;
    # 40 blocks, chunks of 32 at 256), and the tile schedule in chunks of 8 tiles; most experts empty in the first
    "align_blocks_many_experts": dict(T=100, K=2, E=1000, block_m=16, block_slots=16),
    "align_blocks_chunks": dict(T=160, K=4, E=200, block_m=16, block_slots=16),
}
# Softmax top-k routing in one kernel (and its backward kernel) against the router's PyTorch steps: weights and
# balancing probabilities both used by the loss, with the selection bias, renorm_min clamping and a scale.
ROUTER_CASES: dict[str, dict] = {
    "router_softmax_topk": dict(T=21, E=6, K=2, bias=True),
    "router_fine_grained": dict(T=9, E=64, K=8),
    "router_switch": dict(T=13, E=5, K=1, renormalize=False),
    "router_renorm_min_scale": dict(T=11, E=7, K=3, renorm_min=0.9, scale=2.5),  # 7 of 11 rows clamped
}
# Routing and index in one launch for few tokens (moekit.kernels.triton_moe.route_and_align) against the top-k kernel
# and the align kernel launched one after the other: the same ids, weights and index, bit for bit; with a GPU's
# blocks (64 tokens a routing program) where gpu_blocks, so 40 fine-grained tokens are one program and 70 fall back
# to two launches.
ROUTE_ALIGN_CASES: dict[str, dict] = {
    "route_align_few": dict(T=9, E=6, K=2, bias=True, block_m=16, fused=True),
    "route_align_fine_grained": dict(T=40, E=64, K=8, block_m=1, gpu_blocks=True, fused=True),
    "route_align_renorm_min_scale": dict(T=11, E=7, K=3, renorm_min=0.9, scale=2.5, block_m=2, fused=True),
    "route_align_many_tokens": dict(T=70, E=8, K=2, bias=True, block_m=16, gpu_blocks=True, fused=False),
    # training's: the probabilities too (TopKSoftmaxAlignFunction)
    "route_align_probs": dict(T=12, E=16, K=4, bias=True, block_m=4, save_p=True, fused=True),
}
# Larger shapes for a GPU only (they select the big-tile configurations), too slow for the interpreter.
CUDA_ONLY_CASES: dict[str, dict] = {
    "cuda_medium": dict(E=8, K=2, T=512, D=256, F=176, bias=True),
    "cuda_large": dict(E=8, K=2, T=4096, D=512, F=352),
    "cuda_fine_grained": dict(E=64, K=8, T=1024, D=128, F=96),
}


def all_case_names(device: str = "cpu") -> list[str]:
    names = list(EXPERT_CASES) + [f"{n}@bf16" for n in BF16_CASES] + list(LAYER_CASES) + list(ALIGN_CASES) + \
        list(ROUTER_CASES) + list(HVP_CASES) + list(PREPARED_CASES) + list(ROUTE_ALIGN_CASES)
    return names + list(CUDA_ONLY_CASES) if device == "cuda" else names


def _err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return float("nan") if (a is None) != (b is None) else 0.0
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _scale(t: torch.Tensor | None) -> float:
    return t.float().abs().max().item() if t is not None and t.numel() else 0.0


@contextlib.contextmanager
def gpu_tiles(on: bool = True):
    """Under the interpreter, the tile sizes (and routing blocks) a GPU would pick (the config helpers with
    ``INTERPRET`` off while they choose; the kernels still interpret). Yields the set of ``BLOCK_M`` the grouped GEMMs
    were given."""
    from moekit.kernels import triton_moe as tm

    used: set[int] = set()
    saved = {n: getattr(tm, n) for n in ("block_m_for", "gemm_config", "xty_config", "_route_blocks")}

    def chooser(fn, record=False):
        def choose(*args, **kwargs):
            interpret, tm.INTERPRET = tm.INTERPRET, tm.INTERPRET and not on
            try:
                cfg = fn(*args, **kwargs)
            finally:
                tm.INTERPRET = interpret
            if record:
                used.add(cfg["BLOCK_M"])
            return cfg
        return choose

    for n, fn in saved.items():
        setattr(tm, n, chooser(fn, record=n == "gemm_config"))
    try:
        yield used
    finally:
        for n, fn in saved.items():
            setattr(tm, n, fn)


def _launches(kernel: str = "count") -> int:
    """Triton kernel launches so far (all of them, or of one kernel by name)."""
    mod = sys.modules.get("moekit.kernels.triton_moe")
    return mod.LAUNCHES.get(kernel, 0) if mod is not None else 0


# ------------------------------------------------------------------------------------------- experts cases
def _routing(spec: dict, device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    E, K, T = spec["E"], spec["K"], spec["T"]
    g = torch.Generator().manual_seed(7)
    pool = spec.get("only_experts", tuple(range(E)))
    if len(pool) < K:
        raise ValueError("only_experts must hold at least K experts")
    ids = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)]) \
        if T else torch.zeros(0, K, dtype=torch.int64)
    may_have_empty = False
    if spec.get("empty_frac"):
        drop = torch.rand(T, K, generator=g) < spec["empty_frac"]
        if spec["empty_frac"] >= 1.0:
            drop[:] = True
        ids = torch.where(drop, -1, ids)
        may_have_empty = True
    weights = torch.rand(T, K, generator=g) + 0.1
    return ids.to(device), weights.to(device), may_have_empty


def _expert_pass(spec: dict, backend: str, dtype: torch.dtype, device: str):
    torch.manual_seed(3)
    D, F, E = spec["D"], spec["F"], spec["E"]
    ex = Experts(E, D, F, activation=spec.get("activation", "swiglu"), bias=spec.get("bias", False),
                 backend=backend)
    with torch.no_grad():
        for name, p in ex.named_parameters():
            if "bias" in name:
                p.uniform_(-0.2, 0.2)
    wdtype = torch.float32 if spec.get("autocast") else dtype
    ex = ex.to(device=device, dtype=wdtype)
    if spec.get("frozen"):
        ex.requires_grad_(False)
    ids, weights, may_have_empty = _routing(spec, device)
    weights = weights.to(wdtype).requires_grad_(True)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(spec["T"], D, generator=g)
    if spec.get("transposed_x"):
        x = torch.randn(D, spec["T"], generator=g).T
    x = x.to(device=device, dtype=wdtype).requires_grad_(True)
    logits = torch.zeros(spec["T"], E, device=device)
    routed = RouterOutput(logits, logits.softmax(-1), ids, weights, may_have_empty=may_have_empty)
    plan = LocalDispatcher(E, capacity_factor=spec.get("capacity_factor")).plan(routed)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if spec.get("autocast") else torch.autocast(device,
                                                                                                    enabled=False)
    with ctx:
        y = ex(x, plan)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=y.dtype)
    if y.requires_grad:  # the loop returns a constant when no slot reaches an expert
        y.backward(upstream)
    leaves = {n: p for n, p in ex.named_parameters() if p.requires_grad}
    leaves.update(x=x, weights_TK=weights)
    grads = {n: t.grad if t.grad is not None else torch.zeros_like(t) for n, t in leaves.items()}
    return y.detach(), grads, plan


def run_expert_case(name: str, device: str, dtype: torch.dtype | None = None) -> dict:
    spec = EXPERT_CASES.get(name) or CUDA_ONLY_CASES[name]
    dtype = dtype or getattr(torch, spec.get("dtype", "float32"))
    ref_y, ref_g, plan = _expert_pass(spec, "loop", dtype, device)
    before = _launches()
    with gpu_tiles(bool(spec.get("gpu_tiles"))) as block_m:
        y, g, _ = _expert_pass(spec, "triton", dtype, device)
    launches = _launches() - before
    out = {"dtype": str(dtype).removeprefix("torch."), "launches": launches, "y_dtype": str(y.dtype),
           "block_m": sorted(block_m),
           "ref_y_dtype": str(ref_y.dtype), "errors": {"y": _err(y, ref_y)}, "scales": {"y": _scale(ref_y)},
           "valid_slots": int(plan.counts_E.sum()), "idle_experts": int((plan.counts_E == 0).sum())}
    if set(g) != set(ref_g):
        raise AssertionError(f"gradients {sorted(g)} != reference {sorted(ref_g)}")
    for k in ref_g:
        out["errors"][k] = _err(g[k], ref_g[k])
        out["scales"][k] = _scale(ref_g[k])
    if spec.get("precast"):  # operands cast once before the GEMMs, against the kernels casting them: the same bits
        out["precast_mismatches"] = _precast_mismatches(spec, dtype, device)
    if dtype != torch.float32:  # the same case in fp32 (loop): how far each 16-bit result is from exact
        ref32_y, ref32_g, _ = _expert_pass(spec, "loop", torch.float32, device)
        out["errors_vs_fp32"] = {"y": _err(y, ref32_y), **{k: _err(g[k], ref32_g[k]) for k in ref32_g}}
        out["loop_errors_vs_fp32"] = {"y": _err(ref_y, ref32_y), **{k: _err(ref_g[k], ref32_g[k]) for k in ref32_g}}
    return out


def _precast_mismatches(spec: dict, dtype: torch.dtype, device: str) -> dict:
    """Entries of the output and each gradient that differ between the Triton path with its operands cast to the
    compute dtype before the GEMMs (checked to happen) and with the kernels casting them (the threshold off)."""
    from moekit.experts import triton_backend as tb

    cast, real = [], tb._cast_operands

    def spy(*args):
        cast.append(real(*args))
        return cast[-1]

    tb._cast_operands, saved = spy, tb.PRECAST_MIN_ROWS
    try:
        y_p, g_p, _ = _expert_pass(spec, "triton", dtype, device)
        tb._cast_operands, tb.PRECAST_MIN_ROWS = real, float("inf")
        y_k, g_k, _ = _expert_pass(spec, "triton", dtype, device)
    finally:
        tb._cast_operands, tb.PRECAST_MIN_ROWS = real, saved
    if not cast or any(t.dtype != torch.bfloat16 for t in cast[0]):
        raise AssertionError(f"{spec}: the operands were not cast before the GEMMs: {cast}")
    return {k: float((a != b).sum()) for k, (a, b) in {"y": (y_p, y_k), **{k: (g_p[k], g_k[k]) for k in g_p}}.items()}


# --------------------------------------------------------------------------------------------- layer cases
def _layer_pass(name: str, backend: str, device: str):
    torch.manual_seed(1)
    layer = moekit.MoE(16, 24, backend=backend, **LAYER_CASES[name]).to(device)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "bias" in n:
                p.uniform_(-0.1, 0.1)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_(True)
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(device))
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    grads["x"] = x.grad
    layer.eval()  # inference: where the router is plain softmax top-k, routing runs in one Triton kernel too
    with torch.no_grad():
        grads["inference_y"] = layer(x.detach()[:, :7])
    return y.detach(), grads


def run_layer_case(name: str, device: str) -> dict:
    ref_y, ref_g = _layer_pass(name, "loop", device)
    before, align, topk = _launches(), _launches("_align_kernel"), _launches("_topk_softmax_kernel")
    route_align = _launches("_route_align_kernel")
    y, g = _layer_pass(name, "triton", device)
    out = {"dtype": "float32", "launches": _launches() - before, "align_launches": _launches("_align_kernel") - align,
           "topk_launches": _launches("_topk_softmax_kernel") - topk,
           "route_align_launches": _launches("_route_align_kernel") - route_align,
           "y_dtype": str(y.dtype),
           "ref_y_dtype": str(ref_y.dtype), "errors": {"y": _err(y, ref_y)}, "scales": {"y": _scale(ref_y)}}
    if set(g) != set(ref_g):
        raise AssertionError(f"gradients {sorted(g)} != reference {sorted(ref_g)}")
    for k in ref_g:
        out["errors"][k] = _err(g[k], ref_g[k])
        out["scales"][k] = _scale(ref_g[k])
    return out


def run_prepared_case(name: str, device: str) -> dict:
    """Each step's output and statistics (and in training, every gradient) by the prepared call and by the regular
    path (the prepared call switched off on the instance): their largest differences (0 = identical) and how often
    the prepared call ran."""
    from moekit.experts import triton_backend as tb

    torch.manual_seed(1)
    layer = moekit.MoE(16, 24, backend="triton", **PREPARED_CASES[name]).to(device).eval()
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "bias" in n:
                p.uniform_(-0.1, 0.1)
    gen = torch.Generator().manual_seed(2)
    calls, saved = [], (tb.PreparedRouted.__call__, tb.PreparedRouted.train_step)
    out = {"dtype": "float32", "y_dtype": "", "ref_y_dtype": "", "errors": {}, "scales": {}}

    def counted(fn):
        def run(self, x_TD):
            res = fn(self, x_TD)
            calls.append(res is not None)
            return res
        return run

    def forward(x: torch.Tensor, train: bool):
        if not train:
            with torch.no_grad():
                return layer(x), dict(layer.stats), {}
        xi = x.detach().requires_grad_(True)
        y = layer(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y))
        grads = {n: p.grad for n, p in layer.named_parameters()}
        grads["x"] = xi.grad
        layer.zero_grad(set_to_none=True)
        return y.detach(), dict(layer.stats), grads

    def step(label: str, x: torch.Tensor, prepared: bool, train: bool = False) -> None:
        before = sum(calls)
        got = forward(x, train)
        off = "_triton_train_step" if train else "_triton_inference"
        layer.__dict__[off] = lambda x: None
        want = forward(x, train)
        del layer.__dict__[off]
        if sum(calls) - before != prepared:
            raise AssertionError(f"{label}: the prepared call ran {sum(calls) - before} times, expected {int(prepared)}")
        if got[0].dtype != want[0].dtype or set(got[1]) != set(want[1]) or set(got[2]) != set(want[2]):
            raise AssertionError(f"{label}: {got[0].dtype} {sorted(got[1])} {sorted(got[2])} != {want[0].dtype} "
                                 f"{sorted(want[1])} {sorted(want[2])}")
        out["y_dtype"], out["ref_y_dtype"] = str(got[0].dtype), str(want[0].dtype)
        out["errors"][label] = max([_err(got[0], want[0])] + [_err(got[1][k], want[1][k]) for k in want[1]]
                                   + [_err(got[2][k], want[2][k]) for k in want[2]])
        out["scales"][label] = _scale(want[0])

    tb.PreparedRouted.__call__, tb.PreparedRouted.train_step = map(counted, saved)
    try:
        x = torch.randn(2, 9, 16, generator=gen).to(device)
        before = _launches()
        step("tokens_18", x, True)
        out["launches"] = _launches() - before
        step("one_token", x[0, :1], True)
        with torch.no_grad():
            layer.experts.w_in.mul_(1.5)  # (in place: the prepared call reads the parameter itself)
        step("updated_in_place", x, True)
        layer.disable_experts([1])
        step("expert_disabled", x, False)
        layer.enable_experts()
        step("enabled_again", x, True)
        handle = layer.register_routing_hook(lambda *args: None)  # (hooks are given a plan: the regular path)
        step("routing_hook", x, False)
        handle.remove()
        step("training_step_eval_mode", x, True, train=True)
        layer.train()
        step("training_step", x, True, train=True)
        step("train_mode_no_grad", x, False)
        layer.to(torch.bfloat16)
        step("training_step_bf16", x.bfloat16(), True, train=True)
        layer.eval()
        step("cast_bf16", x.bfloat16(), True)
    finally:
        tb.PreparedRouted.__call__, tb.PreparedRouted.train_step = saved
    out["prepared_calls"] = sum(calls)
    return out


def run_hvp_case(name: str, device: str) -> dict:
    """A layer's Hessian-vector product by double backward (``create_graph=True``) on the Triton backend against
    forward-over-reverse (``jvp(grad)``) on the loop reference."""
    spec = HVP_CASES[name]
    torch.manual_seed(1)
    ref = moekit.MoE(16, 24, backend="loop", **spec).to(device)
    layer = moekit.MoE(16, 24, backend="triton", **spec).to(device)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(2)).to(device)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    v = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(3)).to(device) for n, p in params.items()}
    want = torch.func.jvp(torch.func.grad(lambda p: torch.func.functional_call(ref, p, (x,)).pow(2).sum()),
                          (params,), (v,))[1]
    before = _launches()
    ps = dict(layer.named_parameters())
    g = torch.autograd.grad(layer(x).pow(2).sum(), list(ps.values()), create_graph=True)
    got = torch.autograd.grad(sum((gi * v[n]).sum() for gi, n in zip(g, ps)), list(ps.values()))
    return {"dtype": "float32", "launches": _launches() - before, "y_dtype": "hvp", "ref_y_dtype": "hvp",
            "errors": {n: _err(gi, want[n]) for n, gi in zip(ps, got)}, "scales": {n: _scale(want[n]) for n in ps}}


def run_align_case(name: str, device: str) -> dict:
    """Mismatching entries of each align output against LocalDispatcher.plan + tile_schedule (0 = identical)."""
    from moekit.kernels import triton_moe

    spec = ALIGN_CASES[name]
    T, K, E, block_m = spec["T"], spec["K"], spec["E"], spec["block_m"]
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
    before = _launches()
    order, token, counts, start, end, (tile_e, tile_r, n) = triton_moe.align(ids, E, block_m, spec.get("block_slots"))
    launches = _launches() - before
    w = torch.ones(T, K, device=device)
    plan = LocalDispatcher(E).plan(RouterOutput(w, w, ids, w))
    ref_e, ref_r, ref_n = triton_moe.tile_schedule(plan.counts_E, plan.offsets_E, T * K, block_m)
    if n != ref_n:
        raise AssertionError(f"{n} tiles, the schedule has {ref_n}")
    used = ref_e >= 0
    if counts.shape != (E + 1,) or counts[E].item() != 0:
        raise AssertionError(f"counts {counts.tolist()}: expected E + 1 entries, the last 0 (nothing dropped)")
    got = {"order_S": order.long(), "token_S": token.long(), "counts_E": counts[:E], "seg_end_E": end.long(),
           "seg_start_E": start.long(), "tile_expert": tile_e.long(), "tile_row": tile_r.long()[used]}
    ref = {"order_S": plan.order_S, "token_S": plan.token_S, "counts_E": plan.counts_E,
           "seg_end_E": plan.offsets_E.long(), "seg_start_E": (plan.offsets_E - plan.counts_E).long(),
           "tile_expert": ref_e.long(), "tile_row": ref_r.long()[used]}
    return {"dtype": "float32", "launches": launches, "y_dtype": "index", "ref_y_dtype": "index",
            "errors": {k: float((got[k] != ref[k].to(got[k].device)).sum()) for k in ref},
            "scales": {k: 1.0 for k in ref}}


def run_route_align_case(name: str, device: str) -> dict:
    """Mismatching entries of route_and_align's outputs against topk_softmax then align (0 = identical), and the
    launches each took."""
    from moekit.kernels import triton_moe as tm

    spec = ROUTE_ALIGN_CASES[name]
    T, E, K, block_m = spec["T"], spec["E"], spec["K"], spec["block_m"]
    g = torch.Generator().manual_seed(11)
    logits = (2 * torch.randn(T, E, generator=g)).to(device)
    bias = (0.1 * torch.randn(E, generator=g) if spec.get("bias") else torch.zeros(E)).to(device)
    route = (True, spec.get("renorm_min", 0.0), spec.get("scale", 1.0))
    with gpu_tiles(bool(spec.get("gpu_blocks"))):  # (the GPU's: the interpreter's routing programs take 16 tokens)
        save_p = bool(spec.get("save_p"))
        before = dict(tm.LAUNCHES)
        *routed, (order, token, counts, start, end, (tile_e, tile_r, n)) = tm.route_and_align(
            logits, bias, K, *route, block_m, save_p=save_p)
        fused_launches = {k: v - before.get(k, 0) for k, v in tm.LAUNCHES.items() if v != before.get(k, 0)}
        ref_routed = tm.topk_softmax(logits, bias, K, *route, save_p=save_p)
        ref = tm.align(ref_routed[0], E, block_m)
    r_order, r_token, r_counts, r_start, r_end, (r_tile_e, r_tile_r, r_n) = ref
    if n != r_n:
        raise AssertionError(f"{n} tiles, the two launches' index has {r_n}")
    used = r_tile_e >= 0
    names = ("ids", "weights", "probs")[:len(routed)]
    got = {**dict(zip(names, routed)), "order_S": order, "token_S": token, "counts_E": counts, "seg_start_E": start,
           "seg_end_E": end, "tile_expert": tile_e, "tile_row": tile_r[used]}
    want = {**dict(zip(names, ref_routed)), "order_S": r_order, "token_S": r_token, "counts_E": r_counts,
            "seg_start_E": r_start, "seg_end_E": r_end, "tile_expert": r_tile_e, "tile_row": r_tile_r[used]}
    expected = {"_route_align_kernel": 1} if spec["fused"] else {"_topk_softmax_kernel": 1, "_align_kernel": 1}
    if {k: v for k, v in fused_launches.items() if k != "count"} != expected:
        raise AssertionError(f"launches {fused_launches}, expected {expected}")
    return {"dtype": "float32", "launches": fused_launches["count"], "y_dtype": "index", "ref_y_dtype": "index",
            "errors": {k: float((got[k] != want[k]).sum()) for k in want}, "scales": {k: 1.0 for k in want}}


def run_router_case(name: str, device: str) -> dict:
    """The router's kernel route against its PyTorch steps (TopKRouter.route), forward and backward."""
    from moekit.routing.base import TopKRouter
    from moekit.routing.softmax_topk import SoftmaxTopK

    spec = ROUTER_CASES[name]
    torch.manual_seed(5)
    router = SoftmaxTopK(8, spec["E"], spec["K"], renormalize=spec.get("renormalize", True),
                         renorm_min=spec.get("renorm_min", 0.0), scale=spec.get("scale", 1.0)).to(device)
    if spec.get("bias"):
        router.expert_bias.uniform_(-0.1, 0.1)
    logits = (2 * torch.randn(spec["T"], spec["E"])).to(device)
    g_w = torch.randn(spec["T"], spec["K"]).to(device)
    g_p = torch.randn(spec["T"], spec["E"]).to(device)

    def run(route):
        x = logits.clone().requires_grad_(True)
        out = route(x)
        ((out.topk_weights_TK * g_w).sum() + (out.probs_TE * g_p).sum()).backward()
        return out, x.grad

    before = _launches("_topk_softmax_kernel")
    got, d_got = run(router.route)
    launches = _launches("_topk_softmax_kernel") - before
    ref, d_ref = run(lambda x: TopKRouter.route(router, x))
    if not torch.equal(got.topk_ids_TK, ref.topk_ids_TK):
        raise AssertionError(f"ids {got.topk_ids_TK.tolist()} != {ref.topk_ids_TK.tolist()}")
    return {"dtype": "float32", "launches": launches, "y_dtype": str(got.topk_weights_TK.dtype),
            "ref_y_dtype": str(ref.topk_weights_TK.dtype),
            "errors": {"y": _err(got.topk_weights_TK, ref.topk_weights_TK), "probs": _err(got.probs_TE, ref.probs_TE),
                       "logits": _err(d_got, d_ref)},
            "scales": {"y": _scale(ref.topk_weights_TK), "probs": 1.0, "logits": _scale(d_ref)}}


def run_case(name: str, device: str = "cpu") -> dict:
    t0 = time.perf_counter()
    if name.endswith("@bf16"):
        from moekit.kernels import triton_moe as tm

        base = name.removesuffix("@bf16")
        with tm.fma_rows({**tm.FMA_MAX_ROWS, torch.bfloat16: 1} if base in BF16_FMA_CASES else None):
            out = run_expert_case(base, device, torch.bfloat16)
    elif name in LAYER_CASES:
        out = run_layer_case(name, device)
    elif name in ALIGN_CASES:
        out = run_align_case(name, device)
    elif name in ROUTER_CASES:
        out = run_router_case(name, device)
    elif name in HVP_CASES:
        out = run_hvp_case(name, device)
    elif name in PREPARED_CASES:
        out = run_prepared_case(name, device)
    elif name in ROUTE_ALIGN_CASES:
        out = run_route_align_case(name, device)
    else:
        out = run_expert_case(name, device)
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON here (default: print them)")
    args = ap.parse_args(argv)
    from moekit.experts.triton_backend import interpreting

    results = {"interpreting": interpreting(), "triton": __import__("triton").__version__, "cases": {}}
    for name in args.cases or all_case_names(args.device):
        try:
            results["cases"][name] = run_case(name, args.device)
        except Exception as e:  # noqa: BLE001 - reported per case, the test names it
            import traceback

            results["cases"][name] = {"exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    text = json.dumps(results, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
