"""Softmax → top-k routing (Shazeer et al. 2017 without noise; Mixtral, Qwen2/3-MoE, OLMoE, DBRX).

    p_TE = softmax(x W^T)                    probabilities over all E experts
    ids_TK = topk(p_TE + b_E, K)             b_E: selection-only bias (aux-loss-free balancing), 0 by default
    w_TK = p[ids] (/ max(sum_k p[ids], renorm_min) if renormalize) * scale
"""

from __future__ import annotations

import torch

from ..kernels import cpu as kcpu
from ..utils import acc_dtype, grads_by_reference
from .base import RouterOutput, TopKRouter, register_router, same_steps


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
        return not self.disabled and logits_TE.dtype == torch.float32 and same_steps(type(self), SoftmaxTopK)

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
        """``(renormalize, renorm_min, scale)`` where this router's routing is exactly the softmax top-k above,
        which a fused kernel may then run (:func:`moekit.kernels.cpu.route_decode` in inference,
        :func:`moekit.kernels.cpu.route_train_forward` in a few-token training step); None for a subclass that
        changes a step, with disabled experts, or with input jitter in training mode."""
        if not self._plainly_routed(SoftmaxTopK):
            return None
        return self.renormalize, float(self.renorm_min), float(self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, renormalize={self.renormalize}, scale={self.scale}"


def softmax_topk_reference(logits_TE: torch.Tensor, ids_TK: torch.Tensor, renormalize: bool, renorm_min: float,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights_TK, probs_TE)`` of softmax top-k routing for the chosen ``ids_TK``, in PyTorch's operations (the
    kernels' double backward differentiates these, :func:`moekit.utils.grads_by_reference`)."""
    probs_TE = torch.softmax(logits_TE.to(acc_dtype(logits_TE.dtype)), dim=-1)
    w_TK = probs_TE.gather(-1, ids_TK)
    if renormalize:
        total = w_TK.sum(dim=-1, keepdim=True)
        w_TK = w_TK / (total.clamp_min(renorm_min) if renorm_min > 0 else total)
    return w_TK * scale, probs_TE


class TopKSoftmaxFunction(torch.autograd.Function):
    """``(ids_TK, weights_TK, probs_TE)`` of softmax top-k routing by :func:`moekit.kernels.triton_moe.topk_softmax`,
    differentiable in the logits through the weights and the probabilities (the balancing losses' input)."""

    @staticmethod
    def forward(ctx, logits_TE, bias_E, k: int, renormalize: bool, renorm_min: float, scale: float):
        from ..kernels import triton_moe

        ids_TK, weights_TK, probs_TE = triton_moe.topk_softmax(logits_TE, bias_E, k, renormalize, renorm_min, scale,
                                                              save_p=True)
        TopKSoftmaxFunction._keep(ctx, logits_TE, ids_TK, probs_TE, (renormalize, renorm_min, scale))
        return ids_TK, weights_TK, probs_TE

    @staticmethod
    def _keep(ctx, logits_TE, ids_TK, probs_TE, spec: tuple, *index) -> None:
        """What backward needs; the ids (and the index tensors, if any) are not differentiable."""
        ctx.save_for_backward(probs_TE, ids_TK, logits_TE)
        ctx.spec = spec
        ctx.mark_non_differentiable(ids_TK, *index)
        ctx.set_materialize_grads(False)  # unused probabilities (no balancing loss) reach backward as None

    @staticmethod
    def backward(ctx, d_ids, d_weights_TK, d_probs_TE):
        from ..kernels import triton_moe

        probs_TE, ids_TK, logits_TE = ctx.saved_tensors
        if torch.is_grad_enabled():  # (double backward)
            d_logits, = grads_by_reference(lambda lg: softmax_topk_reference(lg, ids_TK, *ctx.spec), (logits_TE,),
                                           ctx.needs_input_grad[:1], (d_weights_TK, d_probs_TE))
            return d_logits, None, None, None, None, None
        if d_weights_TK is None:
            d_weights_TK = torch.zeros(ids_TK.shape, dtype=torch.float32, device=ids_TK.device)
        d_logits = triton_moe.topk_softmax_backward(probs_TE, ids_TK, d_weights_TK, d_probs_TE, *ctx.spec)
        return d_logits, None, None, None, None, None


class TopKSoftmaxAlignFunction(TopKSoftmaxFunction):
    """:class:`TopKSoftmaxFunction` that also returns the plan-free index of its ids for tiles of ``block_m`` rows
    (:func:`moekit.kernels.triton_moe.align`'s ``order, token, counts, start, end, tile_expert, tile_row,
    num_tiles``, not differentiable), routed and indexed in one launch for few tokens
    (:func:`moekit.kernels.triton_moe.route_and_align`)."""

    @staticmethod
    def forward(ctx, logits_TE, bias_E, k: int, renormalize: bool, renorm_min: float, scale: float, block_m: int):
        from ..kernels import triton_moe

        ids_TK, weights_TK, probs_TE, index = triton_moe.route_and_align(logits_TE, bias_E, k, renormalize,
                                                                         renorm_min, scale, block_m, save_p=True)
        order, token, counts, start, end, (tile_expert, tile_row, num_tiles) = index
        TopKSoftmaxFunction._keep(ctx, logits_TE, ids_TK, probs_TE, (renormalize, renorm_min, scale),
                                  order, token, counts, start, end, tile_expert, tile_row)
        return ids_TK, weights_TK, probs_TE, order, token, counts, start, end, tile_expert, tile_row, num_tiles

    @staticmethod
    def backward(ctx, d_ids, d_weights_TK, d_probs_TE, *d_index):
        return *TopKSoftmaxFunction.backward(ctx, d_ids, d_weights_TK, d_probs_TE), None


class CPUTopKSoftmaxFunction(torch.autograd.Function):
    """The gradient path of a softmax top-k routing the C kernel computed (:func:`moekit.kernels.cpu.softmax_topk`):
    forward passes its weights and probabilities through; backward is the softmax top-k's own, in PyTorch ops, from
    the saved probabilities (``d_logits = p * (d_p - sum(d_p * p))``, ``d_p`` collecting the weights' gradient
    through the gather, the renormalisation and the scale, and the probabilities' own, from the balancing loss)."""

    @staticmethod
    def forward(ctx, logits_TE, ids_TK, weights_TK, probs_TE, spec):
        ctx.save_for_backward(probs_TE, ids_TK, logits_TE)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return weights_TK.clone(), probs_TE.clone()

    @staticmethod
    def backward(ctx, d_weights_TK, d_probs_TE):
        probs_TE, ids_TK, logits_TE = ctx.saved_tensors
        renormalize, renorm_min, scale = ctx.spec
        if torch.is_grad_enabled():  # (double backward: the saved probabilities are constants to autograd)
            d_logits, = grads_by_reference(lambda lg: softmax_topk_reference(lg, ids_TK, *ctx.spec), (logits_TE,),
                                           ctx.needs_input_grad[:1], (d_weights_TK, d_probs_TE))
            return d_logits, None, None, None, None
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
        d_logits = probs_TE * (d_p - (d_p * probs_TE).sum(-1, keepdim=True))
        return d_logits, None, None, None, None


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
