"""Softmax → top-k routing (Shazeer et al. 2017 without noise; Mixtral, Qwen2/3-MoE, OLMoE, DBRX).

    p_TE = softmax(x W^T)                    probabilities over all E experts
    ids_TK = topk(p_TE + b_E, K)             b_E: selection-only bias (aux-loss-free balancing), 0 by default
    w_TK = p[ids] (/ max(sum_k p[ids], renorm_min) if renormalize) * scale
"""

from __future__ import annotations

import functools

import torch

from ..kernels import cpu as kcpu
from ..kernels.cpu_gemm import _linear_cast, linear_backward
from .base import RouterOutput, RoutingContext, TopKRouter, register_router

_ROUTER_DTYPES = (torch.float32, torch.bfloat16)


@register_router("softmax_topk")
class SoftmaxTopK(TopKRouter):
    """Softmax over all experts, then the top-k probabilities as weights.

    Args:
        renormalize: divide the k weights by their sum (Mixtral always; Qwen/OLMoE ``norm_topk_prob``).
        renorm_min: lower clamp of that sum (ERNIE-4.5 ``moe_norm_min``); 0 = no clamp.
        scale: multiply the final weights by this factor.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, renormalize: bool = True,
                 renorm_min: float = 0.0, scale: float = 1.0, bias: bool = False, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter=jitter)
        self.renormalize, self.renorm_min, self.scale = renormalize, renorm_min, scale

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_TE, dim=-1)

    def balance_probs(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        return scores_TE

    def combine_weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        w_TK = scores_TE.gather(-1, ids_TK)
        if self.renormalize:
            total = w_TK.sum(dim=-1, keepdim=True)
            w_TK = w_TK / (total.clamp_min(self.renorm_min) if self.renorm_min > 0 else total)
        return w_TK * self.scale if self.scale != 1.0 else w_TK

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> RouterOutput:
        if self._cpu_graph_ok(x_TD):  # training on CPU: logits, routing and their backward as one autograd node
            if self.training and self.jitter > 0:
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits_TE, probs_TE, ids_TK, weights_TK = CPURouterFunction.apply(x_TD, self.weight, self.bias, self)
            return RouterOutput(logits_TE, probs_TE, ids_TK, weights_TK)
        return super().forward(x_TD, ctx)

    def _cpu_graph_ok(self, x_TD: torch.Tensor) -> bool:
        """Where :class:`CPURouterFunction` runs: a graph to record (training), on CPU without autocast, these exact
        steps and no disabled experts, float32 or bfloat16 input and weight (and not under Triton's interpreter,
        where :meth:`route` runs the Triton kernel on CPU tensors)."""
        w = self.weight
        if not (torch.is_grad_enabled() and x_TD.device.type == "cpu" and x_TD.dim() == 2 and w is not None
                and (x_TD.requires_grad or w.requires_grad or (self.bias is not None and self.bias.requires_grad))
                and not self.disabled and _plain_steps(type(self)) and w.device.type == "cpu"
                and x_TD.dtype in _ROUTER_DTYPES and w.dtype in _ROUTER_DTYPES
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return False
        from ..experts.triton_backend import interpreting

        return not interpreting()

    def _route_detached(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids_TK, weights_TK, probs_TE)`` of :meth:`route`, without a graph (the C kernel, or these steps in
        PyTorch where it declines)."""
        routed = kcpu.softmax_topk(logits_TE, self.expert_bias.float(), self.top_k, self.renormalize,
                                   float(self.renorm_min), float(self.scale))
        if routed is not None:
            return routed
        scores_TE = self.scores(logits_TE)
        ids_TK = self.select(scores_TE)
        return ids_TK, self.combine_weights(scores_TE, ids_TK), self.balance_probs(logits_TE, scores_TE)

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        if self._kernel_route_ok(logits_TE):  # softmax, top-k and weights in one Triton kernel (one more backward)
            ids_TK, weights_TK, probs_TE = TopKSoftmaxFunction.apply(
                logits_TE.contiguous(), self.expert_bias, self.top_k, self.renormalize, self.renorm_min, self.scale)
            return RouterOutput(logits_TE, probs_TE, ids_TK, weights_TK)
        if self._cpu_route_ok(logits_TE):  # ... or one C kernel call (None: a tie or NaN, routed below instead)
            spec = (self.renormalize, float(self.renorm_min), float(self.scale))
            routed = kcpu.softmax_topk(logits_TE.detach(), self.expert_bias.float(), self.top_k, *spec)
            if routed is not None:
                ids_TK, weights_TK, probs_TE = routed
                if logits_TE.requires_grad and torch.is_grad_enabled():
                    weights_TK, probs_TE = CPUTopKSoftmaxFunction.apply(logits_TE, ids_TK, weights_TK, probs_TE, spec)
                return RouterOutput(logits_TE, probs_TE, ids_TK, weights_TK)
        return super().route(logits_TE)

    def _fused_steps_ok(self, logits_TE: torch.Tensor) -> bool:
        """What a fused routing kernel needs: these exact steps, no disabled experts, fp32 logits."""
        return not self.disabled and logits_TE.dtype == torch.float32 and _plain_steps(type(self))

    def _cpu_route_ok(self, logits_TE: torch.Tensor) -> bool:
        """On CPU with the C kernels (the kernel itself declines small batches,
        :data:`moekit.kernels.cpu.ROUTE_MIN_SCORES`)."""
        return logits_TE.device.type == "cpu" and self._fused_steps_ok(logits_TE)

    def _kernel_route_ok(self, logits_TE: torch.Tensor) -> bool:
        """On a GPU with Triton (or under its interpreter)."""
        if not self._fused_steps_ok(logits_TE):
            return False
        from ..experts.triton_backend import triton_usable

        return triton_usable(logits_TE.device, torch.float32) is None

    def decode_routing(self) -> tuple[bool, float, float] | None:
        """``(renormalize, renorm_min, scale)`` where this router's inference is exactly the softmax top-k above,
        which a fused decode kernel may then run (:func:`moekit.kernels.cpu.route_decode`); None for a subclass
        that changes a step, with disabled experts, or in training mode (input jitter)."""
        if self.training or self.disabled or self.weight is None or not _plain_steps(type(self)):
            return None
        return self.renormalize, float(self.renorm_min), float(self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, renormalize={self.renormalize}, scale={self.scale}"


class TopKSoftmaxFunction(torch.autograd.Function):
    """``(ids_TK, weights_TK, probs_TE)`` of softmax top-k routing by :func:`moekit.kernels.triton_moe.topk_softmax`,
    differentiable in the logits through the weights and the probabilities (the balancing losses' input)."""

    @staticmethod
    def forward(ctx, logits_TE, bias_E, k: int, renormalize: bool, renorm_min: float, scale: float):
        from ..kernels import triton_moe

        ids_TK, weights_TK, probs_TE = triton_moe.topk_softmax(logits_TE, bias_E, k, renormalize, renorm_min, scale,
                                                              save_p=True)
        ctx.save_for_backward(probs_TE, ids_TK)
        ctx.spec = (renormalize, renorm_min, scale)
        ctx.mark_non_differentiable(ids_TK)
        ctx.set_materialize_grads(False)  # unused probabilities (no balancing loss) reach backward as None
        return ids_TK, weights_TK, probs_TE

    @staticmethod
    def backward(ctx, d_ids, d_weights_TK, d_probs_TE):
        from ..kernels import triton_moe

        probs_TE, ids_TK = ctx.saved_tensors
        if d_weights_TK is None:
            d_weights_TK = torch.zeros(ids_TK.shape, dtype=torch.float32, device=ids_TK.device)
        d_logits = triton_moe.topk_softmax_backward(probs_TE, ids_TK, d_weights_TK, d_probs_TE, *ctx.spec)
        return d_logits, None, None, None, None, None


class CPUTopKSoftmaxFunction(torch.autograd.Function):
    """The gradient path of a softmax top-k routing the C kernel computed (:func:`moekit.kernels.cpu.softmax_topk`):
    forward passes its weights and probabilities through; backward is the softmax top-k's own, in PyTorch ops, from
    the saved probabilities (``d_logits = p * (d_p - sum(d_p * p))``, ``d_p`` collecting the weights' gradient
    through the gather, the renormalisation and the scale, and the probabilities' own, from the balancing loss)."""

    @staticmethod
    def forward(ctx, logits_TE, ids_TK, weights_TK, probs_TE, spec):
        ctx.save_for_backward(probs_TE, ids_TK)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return weights_TK.clone(), probs_TE.clone()

    @staticmethod
    def backward(ctx, d_weights_TK, d_probs_TE):
        probs_TE, ids_TK = ctx.saved_tensors
        return _logits_grad(probs_TE, ids_TK, d_weights_TK, d_probs_TE, ctx.spec), None, None, None, None


class CPURouterFunction(torch.autograd.Function):
    """``(logits_TE, probs_TE, ids_TK, weights_TK)`` of a :class:`SoftmaxTopK` router on CPU as one autograd node:
    forward is :meth:`SoftmaxTopK.logits` and :meth:`SoftmaxTopK.route` without a graph (the router GEMM and the
    softmax top-k C kernels where they apply), backward the gradient of the logits from those of the weights, the
    probabilities (balancing losses) and the logits (z-loss), then the router GEMM's. The ~7 nodes of the recorded
    steps (each a few host ops in forward and backward) cost a training step of a few tokens more than its math."""

    @staticmethod
    def forward(ctx, x_TD, weight, bias, router: SoftmaxTopK):
        logits_TE = _linear_cast(x_TD, weight, None if bias is None else bias.float(), torch.float32)
        ids_TK, weights_TK, probs_TE = router._route_detached(logits_TE)
        ctx.save_for_backward(x_TD, weight, probs_TE, ids_TK)
        ctx.spec = (router.renormalize, float(router.renorm_min), float(router.scale))
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(ids_TK)
        ctx.set_materialize_grads(False)  # outputs nothing uses (probabilities, logits) reach backward as None
        return logits_TE, probs_TE, ids_TK, weights_TK

    @staticmethod
    def backward(ctx, d_logits_TE, d_probs_TE, d_ids, d_weights_TK):
        x_TD, weight, probs_TE, ids_TK = ctx.saved_tensors
        g = None
        if d_weights_TK is not None or d_probs_TE is not None:
            g = _logits_grad(probs_TE, ids_TK, d_weights_TK, d_probs_TE, ctx.spec)
        if d_logits_TE is not None:
            g = d_logits_TE.float() if g is None else g + d_logits_TE
        if g is None:
            return None, None, None, None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = linear_backward(g, x_TD, weight, torch.float32, need_x, need_w, need_b)
        return dx, dw, None if db is None else db.to(ctx.bias_dtype), None


def _logits_grad(probs_TE: torch.Tensor, ids_TK: torch.Tensor, d_weights_TK: torch.Tensor | None,
                 d_probs_TE: torch.Tensor | None, spec: tuple[bool, float, float]) -> torch.Tensor:
    """Gradient of softmax top-k's logits from those of its weights and probabilities (either may be None):
    ``d_logits = p * (d_p - sum(d_p * p))``, ``d_p`` collecting the weights' gradient through the gather, the
    renormalisation and the scale, and the probabilities' own."""
    renormalize, renorm_min, scale = spec
    d_p = torch.zeros_like(probs_TE) if d_probs_TE is None else d_probs_TE.float().clone()
    if d_weights_TK is not None:
        dw = d_weights_TK.float() * scale
        p_k = probs_TE.gather(-1, ids_TK)
        if renormalize:
            total = p_k.sum(-1, keepdim=True)
            clamped = total < renorm_min if renorm_min > 0 else torch.zeros_like(total, dtype=torch.bool)
            denom = torch.where(clamped, renorm_min, total)
            # w_k = p_k / denom: d p_j += dw_j / denom - [not clamped] sum_k dw_k p_k / denom^2
            d_pk = dw / denom - torch.where(clamped, 0.0, (dw * p_k).sum(-1, keepdim=True) / denom ** 2)
        else:
            d_pk = dw
        d_p.scatter_add_(-1, ids_TK, d_pk)
    return probs_TE * (d_p - (d_p * probs_TE).sum(-1, keepdim=True))


_STEPS = ("forward", "logits", "route", "scores", "select", "combine_weights", "mask_disabled", "decode_routing")


@functools.cache
def _plain_steps(cls: type) -> bool:
    """Whether router class ``cls`` routes with SoftmaxTopK's own steps (a subclass may change any of them)."""
    return all(getattr(cls, name) is getattr(SoftmaxTopK, name) for name in _STEPS)


@register_router("switch")
class SwitchTop1(SoftmaxTopK):
    """Switch Transformer top-1 routing (Fedus et al. 2021, eq. 1-2): ``w = p_i(x)`` for ``i = argmax p(x)``.

    The single weight is the un-renormalised probability, so the router still gets a gradient. ``jitter`` is the
    paper's multiplicative input noise (they use 1e-2 in training).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, bias: bool = False, jitter: float = 0.0):
        if top_k != 1:
            raise ValueError(f"the switch router sends each token to exactly one expert; got top_k={top_k}, use top_k=1")
        super().__init__(d_model, num_experts, 1, renormalize=False, bias=bias, jitter=jitter)
