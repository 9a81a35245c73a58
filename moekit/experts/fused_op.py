"""The ``fused`` experts backend as custom operators, for compiled code traced whole (``torch.compile(...,
fullgraph=True)``, ``torch.export``), where the layer cannot run eagerly beside the compiled graph (see
:meth:`moekit.MoE.forward`), and wherever no kernel may be called directly (:func:`moekit.kernels.cpu.bypassed`:
Python dispatch modes, tensor subclasses; meta tensors), which see each operator as one call.

``moekit::fused_experts`` computes the experts' forward as :func:`moekit.experts.fused_function.fused_forward`
does, on the CPU kernels, and the compiler keeps it as one opaque call: the counts per expert, the chunking and the
kernels' choices stay on the host inside it. A custom operator returns tensors only, of shapes known before it
runs, so in training it also returns the pre-activations as one ``[T * K, W]`` tensor in sorted slot order (the
eager Function keeps them per chunk and expert); its backward, ``moekit::fused_experts_backward``, rebuilds the
forward's plan (host work on the counts), copies them back (its kernels overwrite them in place) and runs
:func:`moekit.experts.fused_function.fused_backward`. bf16 layers computed in fp32 (slow-bf16 CPUs) keep them in
bf16, as the eager Function does for its library-path experts.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import torch

from ..kernels import cpu as kcpu
from .activations import _PARAMETRIC, Activation, get_activation
from .fused_function import (_keep_pre, _padded, _Plan, fused_backward, fused_compute_dtype, fused_forward,
                             valid_slots)
from .op_flops import count_in_flop_counters

if TYPE_CHECKING:
    from ..dispatch.local import DispatchPlan
    from .fused import Experts

Tensor = torch.Tensor


def activation_spec(act: Activation) -> tuple[str, list[float]]:
    """``act`` as the operators take it: its name and its parameters' values (:func:`_activation` inverts it)."""
    return act.name, [float(v) for _, v in act.kwargs]


def _activation(name: str, params: list[float]) -> Activation:
    if name in _PARAMETRIC:
        return get_activation(name, **dict(zip(sorted(_PARAMETRIC[name][0]), params)))
    return get_activation(name)


def _on_kernels(impl):
    """An operator's implementation, run with the kernels allowed: it gets plain tensors (under a dispatch mode,
    which steps aside while the operator runs; from a tensor subclass, which unwraps them), also where the layer
    itself runs under :func:`moekit.kernels.cpu.bypass`."""
    @functools.wraps(impl)
    def run(*args, **kwargs):
        with kcpu.bypass(False):
            return impl(*args, **kwargs)
    return run


@torch.library.custom_op("moekit::fused_experts", mutates_args=())
@_on_kernels
def fused_experts(x_TD: Tensor, w_in: Tensor, w_out: Tensor, b_in: Optional[Tensor], b_out: Optional[Tensor],
                  weights_TK: Tensor, order_S: Tensor, token_S: Tensor, counts_E: Tensor, activation: str,
                  act_params: list[float], dtype: torch.dtype, out_dtype: torch.dtype,
                  training: bool) -> tuple[Tensor, Tensor]:
    """``(y_TD in out_dtype, saved)`` for the dispatch plan's ``order_S``, ``token_S`` and ``counts_E``; ``dtype``
    the autocast or weights' dtype, ``training`` whether a backward follows (both as the eager backend takes them).
    ``saved`` (``[S, W]`` in ``dtype``, its first ``sum(counts_E)`` rows set; ``[0, W]`` unless ``training``):
    every sorted slot's pre-activation, what the backward needs of the forward."""
    counts, slot_S, token_S = valid_slots(order_S, token_S, counts_E)
    dt = fused_compute_dtype(x_TD, w_in, counts, w_out.shape[1] * w_out.shape[2], training, dtype)
    with torch.autocast(x_TD.device.type, enabled=False):
        y_TD, plan = fused_forward(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, slot_S, counts,
                                   _activation(activation, act_params), dt, save=training,
                                   out_dtype=None if training else out_dtype)
        saved = x_TD.new_empty((order_S.shape[0] if training else 0, w_in.shape[1]), dtype=dtype)
        for c in plan.chunks:
            if c.h is not None:
                saved[c.r0:c.r1] = c.h
        for i, h in plan.pre.items():  # (library-path experts: with padding rows)
            _, s, t = plan.segments[i]
            saved[s:t] = h[:t - s]
        saved[slot_S.shape[0]:].zero_()  # (dropped slots' rows: no uninitialised memory in an output)
    return y_TD.to(out_dtype), saved


@fused_experts.register_fake
def _(x_TD, w_in, w_out, b_in, b_out, weights_TK, order_S, token_S, counts_E, activation, act_params, dtype,
      out_dtype, training):
    return (x_TD.new_empty(x_TD.shape, dtype=out_dtype),
            x_TD.new_empty((order_S.shape[0] if training else 0, w_in.shape[1]), dtype=dtype))


def _plan_from(saved: Tensor, x_TD: Tensor, w_in: Tensor, w_out: Tensor, b_in, b_out, counts: list[int],
               act: Activation, dt: torch.dtype) -> _Plan:
    """The plan :func:`fused_forward` made with ``save=True``, its pre-activations copied back from ``saved``
    (the backward overwrites them in place), through :func:`_keep_pre`."""
    x_c = x_TD if x_TD.dtype == dt else x_TD.to(dt)
    plan = _Plan.make(counts, x_c, w_in, w_out, b_in, b_out, dt, act.name == "swiglu", training=True)
    for c in plan.chunks:
        c.h = saved[c.r0:c.r1].to(dt, copy=True)
        for i in c.segs:
            if not plan.small_bwd[i]:
                _, s, t = plan.segments[i]
                plan.pre[i] = c.h[s - c.r0:t - c.r0]
    for i, (_, s, t) in enumerate(plan.segments):
        if not plan.small[i]:
            h = saved.new_zeros((_padded(t - s), saved.shape[1]), dtype=dt)
            h[:t - s] = saved[s:t]
            plan.pre[i] = h
    _keep_pre(plan, x_TD, dt)
    return plan


@torch.library.custom_op("moekit::fused_experts_backward", mutates_args=())
@_on_kernels
def fused_experts_backward(g_TD: Tensor, x_TD: Tensor, w_in: Tensor, w_out: Tensor, b_in: Optional[Tensor],
                           b_out: Optional[Tensor], weights_TK: Tensor, order_S: Tensor, token_S: Tensor,
                           counts_E: Tensor, saved: Tensor, activation: str, act_params: list[float],
                           dtype: torch.dtype, needs: list[bool]) -> list[Tensor]:
    """The gradients of :func:`fused_experts` for ``x_TD, w_in, w_out, b_in, b_out, weights_TK`` (an empty tensor
    where ``needs`` says not needed)."""
    counts, slot_S, token_S = valid_slots(order_S, token_S, counts_E)
    act = _activation(activation, act_params)
    dt = fused_compute_dtype(x_TD, w_in, counts, w_out.shape[1] * w_out.shape[2], True, dtype)
    plan = _plan_from(saved, x_TD, w_in, w_out, b_in, b_out, counts, act, dt)
    bias_dtypes = (None if b_in is None else b_in.dtype, None if b_out is None else b_out.dtype)
    grads = fused_backward(plan, g_TD, x_TD, w_in, w_out, b_out, weights_TK, token_S, slot_S, counts, act, dt,
                           bias_dtypes, tuple(needs))
    return [x_TD.new_empty(0) if g is None else g for g in grads]


@fused_experts_backward.register_fake
def _(g_TD, x_TD, w_in, w_out, b_in, b_out, weights_TK, order_S, token_S, counts_E, saved, activation, act_params,
      dtype, needs):
    like = (x_TD, w_in, w_out, b_in, b_out, weights_TK)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if need else x_TD.new_empty(0)
            for t, need in zip(like, needs)]


def _setup_context(ctx, inputs, output) -> None:
    x_TD, w_in, w_out, b_in, b_out, weights_TK, order_S, token_S, counts_E, activation, act_params, dtype = inputs[:12]
    ctx.save_for_backward(x_TD, w_in, w_out, b_in, b_out, weights_TK, order_S, token_S, counts_E, output[1])
    ctx.meta = (activation, act_params, dtype)


def _backward(ctx, g_TD, _g_saved):
    needs = list(ctx.needs_input_grad[:6])
    grads = fused_experts_backward(g_TD, *ctx.saved_tensors, *ctx.meta, needs)
    return (*(g if need else None for g, need in zip(grads, needs)),) + (None,) * 8


fused_experts.register_autograd(_backward, setup_context=_setup_context)


@_on_kernels
def _experts_decode(x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, w_in: Tensor, b_in: Optional[Tensor],
                    w_out: Tensor, b_out: Optional[Tensor], activation: str,
                    act_params: list[float]) -> tuple[Tensor, Tensor]:
    return kcpu.small_experts_decode(x_TD, ids_TK, weights_TK, w_in, b_in, w_out, b_out, check=False,
                                     activation=_activation(activation, act_params))


# Inference only, so registered for CPU at the dispatcher's level rather than through torch.library.custom_op, whose
# autograd and tracing wrappers cost ~45 us a call (a one-token step's kernel takes ~200): 1.11x the bare kernel
# call against 1.29x, paired, fine-grained fp32 on 2 Zen 3 cores.
_LIB = torch.library.Library("moekit", "FRAGMENT")
_LIB.define("experts_decode(Tensor x_TD, Tensor ids_TK, Tensor weights_TK, Tensor w_in, Tensor? b_in, Tensor w_out, "
            "Tensor? b_out, str activation, float[] act_params) -> (Tensor, Tensor)")
_LIB.impl("experts_decode", _experts_decode, "CPU")


@torch.library.register_fake("moekit::experts_decode")
def _(x_TD, ids_TK, weights_TK, w_in, b_in, w_out, b_out, activation, act_params):
    return (x_TD.new_empty(x_TD.shape, dtype=torch.float32),
            x_TD.new_empty(w_in.shape[0], dtype=torch.int64))


#: :func:`moekit.kernels.cpu.small_experts_decode` (``Experts.decode``'s kernel: a few tokens' inference straight
#: from the router's choices, no sort) as an operator, ``moekit::experts_decode``: ``(y_TD fp32, slots per expert
#: [E] int64)`` (no autograd: inference only).
experts_decode = torch.ops.moekit.experts_decode.default


def fused_op_backend(experts: "Experts", x_TD: Tensor, plan: "DispatchPlan", out_dtype: torch.dtype,
                     training: bool) -> Tensor:
    """The fused backend through :func:`fused_experts`: what compiled code traced whole runs on CPU, and what runs
    under a Python dispatch mode (``training``: whether a backward follows)."""
    from .backends import compute_dtype

    count_in_flop_counters()
    return fused_experts(x_TD, experts.w_in, experts.w_out, experts.b_in, experts.b_out, plan.weights_TK,
                         plan.order_S, plan.token_S, plan.counts_E, *activation_spec(experts.activation),
                         compute_dtype(x_TD, experts.w_in), out_dtype, training)[0]
