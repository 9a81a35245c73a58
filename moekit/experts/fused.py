"""Routed experts stored as fused 3D weights in the Hugging Face v5 layout.

    gated (SwiGLU, ...):  gate_up_proj [E, 2F, D]  ([gate; up] concatenated on dim 1),  down_proj [E, D, F]
    plain (GELU MLP...):  up_proj      [E, F, D],                                      down_proj [E, D, F]
    optional biases:      gate_up_proj_bias / up_proj_bias [E, 2F or F],  down_proj_bias [E, D]

Expert e computes ``down_e(act(gate_up_e(x)))``; the backend decides how the E GEMMs are run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..dispatch.local import DispatchPlan
from ..kernels import cpu as kcpu
from ..utils import acc_dtype
from .activations import Activation, get_activation
from .backends import BACKENDS, compute_dtype, dense_weights


class Experts(nn.Module):
    """``E`` feed-forward experts with shared shapes, computed by a pluggable backend.

    Args:
        num_experts, d_model, d_ff: ``E``, ``D`` and ``F`` (the hidden width of one expert).
        activation: a name from :data:`moekit.experts.activations.ACTIVATIONS` or an :class:`Activation`.
        activation_kwargs: options of the activation (``gpt_oss``: ``alpha``, ``limit``).
        bias: add per-expert biases to both projections (GPT-OSS).
        backend: ``auto``, ``loop``, ``segment``, ``grouped_mm``, ``fused`` or ``triton``.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, activation: str | Activation = "swiglu",
                 activation_kwargs: dict | None = None, bias: bool = False, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = get_activation(activation, **(activation_kwargs or {}))
        self.backend = backend
        width = 2 * d_ff if self.activation.gated else d_ff
        self.in_name = "gate_up_proj" if self.activation.gated else "up_proj"
        self.register_parameter(self.in_name, nn.Parameter(torch.empty(num_experts, width, d_model)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        if bias:
            self.register_parameter(self.in_name + "_bias", nn.Parameter(torch.empty(num_experts, width)))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, d_model))
        else:
            self.register_parameter(self.in_name + "_bias", None)
            self.down_proj_bias = None
        self.reset_parameters()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown experts backend {name!r}; choose one of {', '.join(BACKENDS)}")
        self._backend = name

    @property
    def w_in(self) -> torch.Tensor:
        return getattr(self, self.in_name)

    @property
    def b_in(self) -> torch.Tensor | None:
        return getattr(self, self.in_name + "_bias")

    @property
    def w_out(self) -> torch.Tensor:
        return self.down_proj

    @property
    def b_out(self) -> torch.Tensor | None:
        return self.down_proj_bias

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear, so a dense FFN and an expert start alike.
        for w, fan_in in ((self.w_in, self.d_model), (self.w_out, self.d_ff)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``y_TD = sum_k w_TK * expert_{id_TK}(x_TD)`` for the slots in ``plan``, summed in fp32 (float64 for float64
        tensors) and returned in ``out_dtype``, by default the sums' (the CPU backends round once at the end, and
        then keep the gradient in that dtype too)."""
        out_dtype = out_dtype or acc_dtype(x_TD.dtype, self.w_in.dtype)
        if not kcpu.plain(x_TD, self.w_in, self.w_out) and not kcpu.bypassed():
            with kcpu.bypass():  # (a tensor subclass: no kernel goes around its dispatch)
                return self.forward(x_TD, plan, out_dtype)
        if kcpu.plain_ops_only():  # (torch.func, forward-mode AD: PyTorch's own operations, which they follow;
            # under vmap every expert on every token, as the routing picks a different set per sample)
            return BACKENDS["dense" if kcpu.vmapping() else "loop"](self, x_TD, plan).to(out_dtype)
        backend = BACKENDS[self._backend]
        if backend in (BACKENDS["fused"], BACKENDS["auto"]):
            return backend(self, x_TD, plan, out_dtype)
        return backend(self, x_TD, plan).to(out_dtype)

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x_ND`` (autograd-friendly; used by the failure-tolerant path)."""
        dtype = compute_dtype(x_ND, self.w_in)
        x_ND = x_ND.to(dtype)
        b_in, b_out = self.b_in, self.b_out
        h = F.linear(x_ND, self.w_in[e].to(dtype), None if b_in is None else b_in[e].to(dtype))
        return F.linear(self.activation(h), self.w_out[e].to(dtype), None if b_out is None else b_out[e].to(dtype))

    def planless_usable(self, x_TD: torch.Tensor, num_slots: int) -> bool:
        """Whether :meth:`planless` runs ``num_slots`` dropless slots of these rows (the Triton backend on a GPU)."""
        from .triton_backend import routed_usable

        return routed_usable(self, x_TD, num_slots)

    def planless(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``y_TD`` (in ``out_dtype``), the slots per expert and the dropped slots (a 0-dim 0) for a dropless top-k
        routing, with no dispatch plan:
        the Triton backend sorts the slots and schedules its tiles in one kernel (see
        :func:`moekit.experts.triton_backend.routed_forward`). Differentiable like :meth:`forward`."""
        from .triton_backend import routed_forward

        return routed_forward(self, x_TD, ids_TK, weights_TK, out_dtype)

    def planless_routed(self, x_TD: torch.Tensor, logits_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int,
                        spec: tuple, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`planless` of the softmax top-k routing of fp32 ``logits_TE`` (``spec``: renormalise, its minimum,
        scale), routed and indexed together (one kernel for few tokens:
        :func:`moekit.experts.triton_backend.routed_inference`). Inference: no gradient."""
        from .triton_backend import routed_inference

        return routed_inference(self, x_TD, logits_TE, bias_E, top_k, spec, out_dtype)

    def decode_kernel_usable(self, x_TD: torch.Tensor) -> bool:
        """Whether :meth:`decode` runs these rows in the single small-M kernel call (an activation of
        :data:`moekit.kernels.cpu.DECODE_ACTIVATIONS`, CPU kernels built, contiguous rows, weights in the compute
        dtype) rather than one library call per chosen expert."""
        if self.activation.name not in kcpu.DECODE_ACTIVATIONS or x_TD.device.type != "cpu" or x_TD.dim() != 2 or \
                not x_TD.is_contiguous() or not kcpu.available():
            return False
        dtype = compute_dtype(x_TD, self.w_in)  # (cheap checks: this runs on every decode step)
        return dtype in (torch.float32, torch.bfloat16) and all(
            w is None or (w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous())
            for w in (self.w_in, self.w_out, self.b_in, self.b_out))

    def decode(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference for a few tokens, with no sort, no permutation buffers and no autograd bookkeeping: the
        experts run in one small-M kernel call that groups the slots by expert itself
        (:func:`moekit.kernels.cpu.small_experts_decode`) where :meth:`decode_kernel_usable`; otherwise the slots
        are grouped on the host and each chosen expert runs once on its rows. Returns fp32 ``y_TD`` and the slots
        per expert (int64 ``[E]``, or None where not counted)."""
        dtype = compute_dtype(x_TD, self.w_in)
        x_TD = x_TD.to(dtype)
        if self.decode_kernel_usable(x_TD):
            args = (x_TD, ids_TK.contiguous(), weights_TK.float().contiguous(), self.w_in, self.b_in, self.w_out,
                    self.b_out)
            if kcpu.bypassed():  # (traced whole, or under a dispatch mode: the kernel call as an operator)
                from .fused_op import activation_spec, experts_decode
                from .op_flops import count_in_flop_counters

                count_in_flop_counters()
                return experts_decode(*args, *activation_spec(self.activation))
            return kcpu.small_experts_decode(*args, check=False, activation=self.activation)
        rows: dict[int, list[tuple[int, int]]] = {}
        for t, experts in enumerate(ids_TK.tolist()):
            for k, e in enumerate(experts):
                rows.setdefault(e, []).append((t, k))
        acc = acc_dtype(dtype)
        y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
        b_in, b_out = self.b_in, self.b_out
        for e, tk in rows.items():
            if len(tk) == 1:
                t, k = tk[0]
                x_ND = x_TD[t:t + 1]
            else:
                tok = torch.tensor([t for t, _ in tk], device=x_TD.device)
                x_ND = x_TD.index_select(0, tok)
            h = F.linear(x_ND, self.w_in[e].to(dtype), None if b_in is None else b_in[e].to(dtype))
            out = F.linear(self.activation(h), self.w_out[e].to(dtype), None if b_out is None else b_out[e].to(dtype))
            if len(tk) == 1:
                y_TD[t].add_(out[0].to(acc) * weights_TK[t, k])
            else:
                slot = torch.tensor([k for _, k in tk], device=x_TD.device)
                y_TD.index_add_(0, tok, out.to(acc) * weights_TK[tok, slot, None].to(acc))
        return y_TD, None

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation.name}, bias={self.b_in is not None}, backend={self.backend}")


class ModuleListExperts(nn.Module):
    """Arbitrary expert modules (each ``[N, D] -> [N, D]``), run one after another: flexible, not fast."""

    def __init__(self, experts: list[nn.Module] | nn.ModuleList):
        super().__init__()
        if len(experts) < 1:
            raise ValueError("ModuleListExperts needs at least one expert module")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        out = self.experts[e](x_ND)
        if out.shape != x_ND.shape:
            raise ValueError(f"expert {e} returned shape {tuple(out.shape)}; experts must map [N, D] to [N, D]")
        return out

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if kcpu.vmapping():  # (the routing picks a different set of rows per sample: every expert on every row)
            return self._dense(x_TD, plan)
        acc = acc_dtype(x_TD.dtype)
        y_TD = x_TD.new_zeros(x_TD.shape, dtype=acc)
        for e, expert in enumerate(self.experts):
            tok_N, slot_N = torch.where(plan.ids_TK == e)
            if tok_N.numel() == 0:
                continue
            out = expert(x_TD[tok_N])
            if out.shape != (tok_N.numel(), x_TD.shape[-1]):
                raise ValueError(f"expert {e} returned shape {tuple(out.shape)}; experts must map [N, D] to [N, D]")
            y_TD = y_TD.index_add(0, tok_N, out.to(acc) * plan.weights_TK[tok_N, slot_N, None].to(acc))
        return y_TD

    def _dense(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Every expert on every token, weighted by the routing (nothing where a token did not choose it), as the
        ``dense`` backend does: shapes that do not depend on the routing."""
        acc = acc_dtype(x_TD.dtype)
        w_TE, chosen_TE = dense_weights(plan.ids_TK, plan.weights_TK, self.num_experts, acc)
        y_TD = x_TD.new_zeros(x_TD.shape, dtype=acc)
        for e in range(self.num_experts):
            out = self.expert_forward(e, x_TD).to(acc)
            y_TD = y_TD + w_TE[:, e, None] * torch.where(chosen_TE[:, e, None], out, 0.0)
        return y_TD
