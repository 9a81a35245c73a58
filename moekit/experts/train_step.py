"""A training step of a few tokens through a softmax top-k router and SwiGLU experts, on CPU, in two kernel calls.

With a handful of tokens, the arithmetic of a step is small and its time goes to writing the experts' weight
gradients (every expert's, the idle ones' zeros included) and to host work: the regular path's ~40 small ops and
kernel calls (router logits, softmax, top-k, renormalisation, the dispatch plan, one call per expert kernel and their
argument checks, and the autograd nodes of each) took ~0.64 ms of a ~1.9 ms Mixtral-like bf16 step of one token.
Here forward is one call (:func:`moekit.kernels.cpu.route_train_forward`: routing, grouping the slots by expert and
both projections, keeping the softmax, the groups and the pre-activations) and backward another
(:func:`moekit.kernels.cpu.route_train_backward`: the experts' data and weight gradients, the idle experts' zeros,
the softmax top-k's gradient and the router's weight gradient), through the same expert kernels as the regular
path; a single autograd node stands for all of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import cpu as kcpu
from ..utils import grads_by_reference


class AmbiguousRouting(Exception):
    """A token's choice is ambiguous (a NaN, or a tie among its k + 1 largest choice values): the caller routes the
    batch in PyTorch instead, which breaks ties its own way."""


class RoutedExpertsStep(torch.autograd.Function):
    """``(y_TD, tokens per expert, probs_TE, ids_TK, weights_TK, logits_TE)`` of a softmax top-k router (``router_w``,
    ``router_b``, the selection-only ``selection_bias``; ``spec = (k, renormalize, renorm_min, scale)``) into SwiGLU
    experts (``w_in [E, 2F, D]``, ``w_out [E, D, F]``, no biases), ``y`` in ``out_dtype`` (summed in float32).
    ``y``, the softmax ``probs_TE`` (a balancing loss's input) and the router's ``logits_TE`` (a z-loss's) are
    differentiable in ``x_TD``, the router's weight and bias and (``y``) the experts' weights. Raises
    :class:`AmbiguousRouting` (before recording anything) where the kernels' routing would not match PyTorch's."""

    @staticmethod
    def forward(ctx, x_TD, router_w, router_b, w_in, w_out, selection_bias, spec, out_dtype):
        k, renormalize, renorm_min, scale = spec
        res = kcpu.route_train_forward(x_TD, router_w, None if router_b is None else router_b.float().contiguous(),
                                       selection_bias.float().contiguous(), k, renormalize, renorm_min, scale, w_in,
                                       w_out)
        if res is None:
            raise AmbiguousRouting
        y, counts, weights, logits, saved = res
        ctx.save_for_backward(x_TD, router_w, router_b, w_in, w_out, saved.ids)
        ctx.saved, ctx.spec, ctx.out_dtype = saved, spec, out_dtype
        ctx.bias_dtype = None if router_b is None else router_b.dtype
        ctx.mark_non_differentiable(counts, saved.ids, weights)
        ctx.set_materialize_grads(False)  # (unused probabilities or logits, no balancing loss or z-loss: None)
        return y.to(out_dtype), counts, saved.probs, saved.ids, weights, logits

    @staticmethod
    def backward(ctx, g_TD, _counts, d_probs, _ids, _weights, d_logits):
        x_TD, router_w, router_b, w_in, w_out, ids_TK = ctx.saved_tensors
        need_x, need_wr, need_br, need_win, need_wout = ctx.needs_input_grad[:5]
        _, renormalize, renorm_min, scale = ctx.spec
        if torch.is_grad_enabled() or ctx.saved is None:  # (double backward, or a second pass through this graph,
            # retain_graph=True, after the kernels' backward overwrote what it kept: the same step in PyTorch's
            # operations, differentiated; a second pass reaching this node after a double backward's runs the kernels)
            spec, out_dtype = ctx.spec[1:], ctx.out_dtype
            grads = grads_by_reference(lambda *a: _step_reference(*a, ids_TK, spec, out_dtype),
                                       (x_TD, router_w, router_b, w_in, w_out), ctx.needs_input_grad[:5],
                                       (g_TD, d_probs, d_logits))
            return *grads, None, None, None
        saved, ctx.saved = ctx.saved, None
        if g_TD is None:  # (only the probabilities or logits were used)
            g_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
        dx, d_win, d_wout, d_logits, d_wr = kcpu.route_train_backward(
            g_TD.contiguous(), None if d_probs is None else d_probs.float(), x_TD, router_w, saved, renormalize,
            renorm_min, scale, w_in, w_out, need_x, need_win, need_wout, need_br, need_wr,
            None if d_logits is None else d_logits.float(), dx_dtype=x_TD.dtype)
        d_br = d_logits.sum(0).to(ctx.bias_dtype) if need_br else None
        return dx, d_wr, d_br, d_win, d_wout, None, None, None


def _step_reference(x_TD, router_w, router_b, w_in, w_out, ids_TK, spec, out_dtype):
    """``(y_TD, probs_TE, logits_TE)`` of :class:`RoutedExpertsStep` for its chosen ``ids_TK``, in PyTorch's
    operations (the router in fp32, SwiGLU experts in their weights' dtype)."""
    from ..routing.softmax_topk import softmax_topk_reference
    from .activations import get_activation
    from .backends import expert_rows_sum, slot_rows

    logits_TE = F.linear(x_TD.float(), router_w.float(), None if router_b is None else router_b.float())
    weights_TK, probs_TE = softmax_topk_reference(logits_TE, ids_TK, *spec)
    y_TD = expert_rows_sum(x_TD, w_in, w_out, None, None, get_activation("swiglu"), w_in.dtype,
                           slot_rows(ids_TK, weights_TK, w_in.shape[0]))
    return y_TD.to(out_dtype), probs_TE, logits_TE
