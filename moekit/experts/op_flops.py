"""FLOP counts of moekit's operators for ``torch.utils.flop_counter.FlopCounterMode``.

Under a Python dispatch mode (FlopCounterMode, FakeTensorMode, DebugMode...) the layer runs its experts in moekit's
operators rather than calling the CPU kernels directly (see :func:`moekit.kernels.cpu.bypassed`), so the mode sees
them; FlopCounterMode counts only operators it has a formula for, and these are moekit's: ``2 m n k`` per matrix
product, as PyTorch counts ``mm``, over the slots the experts compute (the routed slots' count per expert where the
operator's counts can be read, every slot of the plan under fake tensors, whose values cannot). The activation,
gather and combine count nothing, as elementwise work counts nothing there.

The formulas are registered in PyTorch's table the first time a layer runs under a dispatch mode (importing
``torch.utils.flop_counter`` with moekit would add ~0.25 s to ``import moekit``), and added to the FlopCounterModes
active then, which copied that table when they were made.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_FORMULAS: dict[str, Callable[..., int]] = {}
_REGISTERED = False


def _formula(name: str):
    def add(f: Callable[..., int]) -> Callable[..., int]:
        _FORMULAS[name] = f
        return f
    return add


def _rows(total: torch.Tensor, upper: int) -> int:
    """``int(total)`` where it has a value to read, else ``upper`` (a fake tensor's bound: every slot)."""
    try:
        return int(total)
    except Exception:  # noqa: BLE001 - fake tensors raise when read (DataDependentOutputException and kin)
        return upper


def _expert_flops(rows: int, w_in: torch.Tensor, w_out: torch.Tensor) -> tuple[int, int]:
    """``(input projection, output projection)`` FLOPs of ``rows`` rows: ``w_in [E, W, D]``, ``w_out [E, D, F]``."""
    _, W, D = w_in.shape
    return 2 * rows * W * D, 2 * rows * D * w_out.shape[2]


@_formula("fused_experts")
def _fused_experts(x_TD, w_in, w_out, b_in, b_out, weights_TK, order_S, token_S, counts_E, *_, out_val=None) -> int:
    return sum(_expert_flops(_rows(counts_E.sum(), order_S.shape[0]), w_in, w_out))


@_formula("fused_experts_backward")
def _fused_experts_backward(g_TD, x_TD, w_in, w_out, b_in, b_out, weights_TK, order_S, token_S, counts_E, saved,
                            activation, act_params, dtype, needs, out_val=None) -> int:
    need_x, need_win, need_wout = needs[:3]
    up, down = _expert_flops(_rows(counts_E.sum(), order_S.shape[0]), w_in, w_out)
    # g @ W_out (for dH and the router weights' gradient) wherever anything is needed, then dW_out, dx, dW_in
    return (down if any(needs) else 0) + down * need_wout + up * need_x + up * need_win


@_formula("experts_decode")
def _experts_decode(x_TD, ids_TK, weights_TK, w_in, b_in, w_out, *_, out_val=None) -> int:
    return sum(_expert_flops(ids_TK.numel(), w_in, w_out))


@_formula("segment_linear")
def _segment_linear(x_SI, w_EOI, offsets_E, out_val=None) -> int:
    rows = _rows(offsets_E[-1], x_SI.shape[0]) if offsets_E.numel() else 0
    return 2 * rows * w_EOI.shape[1] * w_EOI.shape[2]


@_formula("segment_linear_backward")
def _segment_linear_backward(grad_SO, x_SI, w_EOI, offsets_E, out_val=None) -> int:
    return 2 * _segment_linear(x_SI, w_EOI, offsets_E)


def _grouped_mm(a, b, offs=None, bias=None, out_dtype=None, out_val=None) -> int:
    """``torch._grouped_mm`` (the ``grouped_mm`` backend's and transformers' experts; PyTorch counts it as nothing):
    ``2 m n k`` per group, the groups' extent along the dimension ``offs`` cuts (its last offset) where it can be
    read, else the whole dimension."""
    if a.dim() == 3 and b.dim() == 3:  # a batch of equal groups
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if a.dim() == 2 and b.dim() == 3:  # a's rows cut into groups, one matrix of b each
        return 2 * _cut(offs, a.shape[0]) * a.shape[1] * b.shape[2]
    if a.dim() == 3:  # b's columns cut into groups (a [G, M, K], b [K, N])
        return 2 * a.shape[1] * a.shape[2] * _cut(offs, b.shape[1])
    return 2 * a.shape[0] * _cut(offs, a.shape[1]) * b.shape[1]  # the reduction cut into groups (weight gradients)


def _cut(offs, whole: int) -> int:
    return whole if offs is None or not offs.numel() else _rows(offs[-1], whole)


def count_in_flop_counters() -> None:
    """Make FlopCounterMode count moekit's operators, where a Python dispatch mode is active (a no-op otherwise):
    their formulas registered in PyTorch's table once, and added to every FlopCounterMode active now."""
    if torch.compiler.is_compiling() or not torch._C._len_torch_dispatch_stack():
        return
    global _REGISTERED
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    ops = {getattr(torch.ops.moekit, name): f for name, f in _FORMULAS.items()}
    ops[torch.ops.aten._grouped_mm] = _grouped_mm
    if not _REGISTERED:
        for op, f in ops.items():
            if op not in flop_counter.flop_registry:
                flop_counter.register_flop_formula(op, get_raw=True)(f)
        _REGISTERED = True
    for mode in _get_current_dispatch_mode_stack():  # (FlopCounterMode's own mode holds the counter)
        table = getattr(getattr(mode, "counter", None), "flop_registry", None)
        if isinstance(table, dict):
            for op, f in ops.items():
                table.setdefault(op, f)
