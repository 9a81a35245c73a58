"""The MoE layer: router → dispatch plan → experts → combine, plus shared experts and balancing.

    x [..., D] ──► Router ──► RouterOutput ──► LocalDispatcher.plan ──► Experts(x, plan) ──► y [..., D]
                                                                                 + SharedExperts(x)

Notation: ``T`` tokens (all leading dims flattened), ``D`` model dim, ``E`` experts, ``K`` slots per token.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .balance import (AttachAuxLoss, AttachSwitchLoss, expert_load, load_balancing_loss,
                      load_balancing_loss_and_gradient, router_z_loss, sequence_balancing_loss, update_expert_bias)
from .config import MoEConfig
from .dispatch.local import DispatchPlan, LocalDispatcher
from .experts.fused import Experts, ModuleListExperts
from .experts.shared import SharedExperts
from .experts.train_step import AmbiguousRouting, RoutedExpertsStep
from .kernels import cpu as kcpu
from .utils import acc_dtype, autocast_enabled, in_backward_pass, state_frozen
from .routing.base import ROUTERS, Router, RouterOutput, RoutingContext, SoftRouting, build_router

log = logging.getLogger(__name__)

#: Largest number of token slots (tokens x top_k) that takes the sort-free decode path in inference: up to
#: DECODE_KERNEL_MAX_SLOTS where one small-M kernel call runs them all (SwiGLU experts; it groups the slots by expert
#: itself, ~0.2-0.6 ms faster than sorting on the host at 32-128 slots), else DECODE_MAX_SLOTS (one library call
#: per chosen expert). Forward against the regular path (sort on the host, plan), 2 Zen 3 cores, paired round-robin:
#: fine-grained (k = 8) T = 128, 1024 slots, fp32 0.923-0.925x, bf16 0.902x, T = 256 0.955x; Mixtral-like fp32
#: T = 512 0.972x, T = 1024 0.976x; at 4096-8192 slots 1.016-1.021x. Hence up to 2048 (256 before).
DECODE_MAX_SLOTS = 16
DECODE_KERNEL_MAX_SLOTS = 2048
#: Largest number of token slots that takes the few-token training step (routing and experts in one kernel call
#: each way, see moekit.experts.train_step) where autograd is on. Forward+backward against the regular path, same
#: process, 2 Emerald Rapids cores: Mixtral-like bf16 T = 1 0.66x, 16 0.81x, 128 (256 slots) 0.84x, 512 (1024
#: slots) 0.95x; fp32 T = 1 0.78x, 128 0.93x, 512 0.98x; fine-grained (k = 8) similar. 2 Zen 3 cores (AVX2), paired
#: round-robin: fine-grained T = 128 (1024 slots, ~16 rows per expert) fp32 0.949x, bf16 0.955x; Mixtral-like fp32
#: T = 512 0.958x; beyond, at 2048 slots fine-grained T = 256 0.963x but Mixtral-like T = 1024 (256 rows per
#: expert) 0.998x, and at 4096 fine-grained T = 512 1.038x. Hence up to 1024 slots (the step's peak memory the
#: regular path's within 0.05 MiB at T = 128-1024 in both shapes).
TRAIN_STEP_MAX_SLOTS = 1024

RoutingHook = Callable[["MoE", torch.Tensor, RouterOutput, DispatchPlan], None]


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer: input ``[..., d_model]`` → output of the same shape and dtype.

    Example::

        layer = moekit.MoE(d_model=512, d_ff=1408, num_experts=8, top_k=2)
        y = layer(x)                      # x: [batch, seq, 512]
        y.sum().backward()                # the auxiliary loss trains the router too
        layer.stats["aux_loss"]           # ...and is there for logging

    Args:
        d_model, d_ff, num_experts, top_k: sizes (see :class:`MoEConfig`).
        router: a registered router name, or a :class:`moekit.routing.Router` instance.
        experts: optional list of arbitrary expert modules (``[N, D] -> [N, D]``) instead of fused experts.
        config: a ready :class:`MoEConfig` (then no other arguments).
        **options: any other :class:`MoEConfig` field (``shared_experts``, ``capacity_factor``, ``backend``...).

    Attributes:
        stats: detached tensors from the last forward: ``tokens_per_expert``, ``dropped``, and each active loss.
        aux_loss_scale: multiplies the gradient of the auxiliary losses (set it to your loss scale or
            ``1 / grad_accum_steps`` if you scale the main loss).
    """

    def __init__(self, d_model: int | None = None, d_ff: int | None = None, num_experts: int | None = None,
                 top_k: int | None = None, *, router: str | Router = "softmax_topk",
                 experts: list[nn.Module] | None = None, config: MoEConfig | None = None, **options):
        super().__init__()
        if config is not None:
            if any(v is not None for v in (d_model, d_ff, num_experts, top_k)) or options or experts:
                raise ValueError("pass either config= or the layer's sizes and options, not both")
        else:
            missing = [n for n, v in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts),
                                      ("top_k", top_k)) if v is None]
            if missing:
                raise ValueError(f"MoE needs {', '.join(missing)} (or config=MoEConfig(...))")
            name = router if isinstance(router, str) else _router_name(router)
            config = MoEConfig(d_model, d_ff, num_experts, top_k, router=name, **options)
        self.config = config
        cfg = config

        if isinstance(router, Router):
            if (router.d_model, router.num_experts, router.top_k) != (cfg.d_model, cfg.num_experts, cfg.top_k):
                raise ValueError(f"router instance has (d_model, num_experts, top_k)="
                                 f"{(router.d_model, router.num_experts, router.top_k)} but the layer has "
                                 f"{(cfg.d_model, cfg.num_experts, cfg.top_k)}")
            self.router = router
        else:
            self.router = build_router(cfg.router, cfg.d_model, cfg.num_experts, cfg.top_k, **cfg.router_kwargs)
        if self.router.non_causal and cfg.causal and not cfg.allow_non_causal:
            raise ValueError(f"router {cfg.router!r} is not causal: a token's routing depends on later tokens of its "
                             "sequence, which a causal language model must not see. Use a tokens-choose router, or "
                             "pass allow_non_causal=True if you accept the leak (e.g. for an encoder)")
        self.dispatcher = LocalDispatcher(cfg.num_experts, cfg.capacity_factor, cfg.drop_policy)
        self._slot_dispatcher = LocalDispatcher(cfg.num_experts)
        if experts is not None:
            if len(experts) != cfg.num_experts:
                raise ValueError(f"got {len(experts)} expert modules for num_experts={cfg.num_experts}")
            self.experts: nn.Module = ModuleListExperts(experts)
        else:
            self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_ff, activation=cfg.activation,
                                   activation_kwargs=cfg.activation_kwargs, bias=cfg.expert_bias,
                                   backend=cfg.backend)
        shared_act, shared_act_kwargs = cfg.shared_act
        self.shared_experts = (SharedExperts(cfg.d_model, cfg.shared_width, activation=shared_act,
                                             activation_kwargs=shared_act_kwargs, gate=cfg.shared_expert_gate,
                                             bias=cfg.shared_bias)
                               if cfg.shared_experts else None)
        self.register_buffer("load_accum", torch.zeros(cfg.num_experts))
        self.register_buffer("failure_counts", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False)
        self._warned_failures: set[int] = set()
        self.aux_loss_scale = 1.0
        self.stats: dict[str, torch.Tensor] = {}
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()

    @classmethod
    def from_config(cls, config: MoEConfig) -> "MoE":
        return cls(config=config)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., d_model]`` → same shape and dtype. ``token_ids [...]`` (same leading shape) feeds routers that
        route by token id (``router.needs_token_ids``).

        Inside ``torch.compile`` on CPU the layer runs as it does eagerly, on all of its fast paths, as one region
        the compiler leaves alone (a graph break before and after it). Where graph breaks are errors
        (``fullgraph=True``, ``torch.export``, ``error_on_graph_break``) it is traced whole: router, sort and
        losses as PyTorch ops, the experts in custom operators on the same kernels (:mod:`moekit.experts.fused_op`;
        ``benchmarks/bench_compile.py`` compares both with the eager layer)."""
        if torch.compiler.is_compiling() and isinstance(x, torch.Tensor) and x.is_cpu and _opaque_under_compile():
            return _EAGER_FORWARD(self, x, token_ids)
        if type(x) is not torch.Tensor or not self._plain_weights():
            with kcpu.bypass():  # (a tensor subclass: PyTorch's operations and moekit's operators, which it sees)
                return self._forward(x, token_ids)
        return self._forward(x, token_ids)

    def _plain_weights(self) -> bool:
        """Whether the router's and the experts' parameters are plain (no tensor subclass, :func:`kcpu.plain`),
        checked on every call (~1 us): FSDP, for one, swaps sharded and gathered parameters around a forward."""
        for mod in (self._modules["experts"], self._modules["router"]):
            for t in mod._parameters.values():
                if t is not None and type(t) not in kcpu.PLAIN:
                    return False
        return True

    def _forward(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
        if self.config.bias_update_rate > 0 and self.config.bias_update == "auto":
            self._step_bias()
        if token_ids is None and not torch.is_grad_enabled() and ((y := self._fused_decode(x)) is not None
                                                                   or (y := self._triton_inference(x)) is not None):
            return y  # (inference in one CPU kernel call, or on the Triton path as prepared; x checked there)
        self._check_input(x, token_ids)
        shape, D = x.shape, self.config.d_model
        x_TD = x.reshape(-1, D)
        fused = None if torch.is_grad_enabled() else self._planless_inference(x_TD)
        if fused is not None:  # (y in x's dtype, or fp32 where shared experts are added below)
            return self._inference_output(x, x_TD, *fused)
        seq_len = shape[-2] if x.dim() >= 3 else x_TD.shape[0]
        ctx = RoutingContext(seq_len, None if token_ids is None else token_ids.reshape(-1))
        plan = dropped = None
        if (step := self._fused_train_step(x_TD) if torch.is_grad_enabled() else None) is not None:
            y_TD, counts_E, routed = step
            dropped = counts_E.new_zeros(())
        elif token_ids is None and torch.is_grad_enabled() and (step := self._triton_train_step(x_TD)) is not None:
            y_TD, counts_E, dropped, routed = step  # (the Triton path's checks and configurations prepared once)
        elif (routed := self.router(x_TD, ctx)).soft is not None:
            y_TD, counts_E = self._soft_experts(x_TD, routed.soft)
        elif self._decode_path(x_TD, routed):
            y_TD, counts_E = self.experts.decode(x_TD, routed.topk_ids_TK, routed.topk_weights_TK)
            if counts_E is None:
                counts_E = expert_load(routed.topk_ids_TK, self.config.num_experts).long()
        elif self._planless_path(x_TD, routed):
            y_TD, counts_E, dropped = self.experts.planless(x_TD, routed.topk_ids_TK, routed.topk_weights_TK,
                                                            self._routed_dtype(x.dtype))
        else:
            plan = self.dispatcher.plan(routed)
            if self.config.on_expert_failure == "skip":
                if kcpu.vmapping():
                    raise RuntimeError("on_expert_failure='skip' checks each expert's output on the host, which "
                                       "torch.func.vmap cannot batch; use on_expert_failure='raise' under vmap")
                y_TD = self._experts_skipping_failures(x_TD, plan)
            else:
                if isinstance(self.experts, Experts):  # without shared experts to add in fp32: the input's dtype
                    y_TD = self.experts(x_TD, plan, self._routed_dtype(x.dtype))
                else:
                    y_TD = self.experts(x_TD, plan)
            counts_E, dropped = plan.counts_E, plan.num_dropped
        y = self._add_shared(x_TD, y_TD).to(x.dtype).view(shape)
        if (attach := self._balance(routed, counts_E, dropped, seq_len)) is not None:
            y = attach[0].apply(y, *attach[1:])
        for hook in self._routing_hooks.values():
            hook(self, x_TD, routed, plan)
        return y

    def _routed_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the routed experts return their sums in: the input's, or, with shared experts to add to them,
        the sums' own (fp32; float64 for float64)."""
        return dtype if self.shared_experts is None else acc_dtype(dtype)

    def _add_shared(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """The routed experts' output plus the shared experts' (in fp32; float64 for float64), if any."""
        if self.shared_experts is None:
            return y_TD
        shared_TD = self.shared_experts(x_TD).to(acc_dtype(y_TD.dtype, x_TD.dtype))
        return y_TD + (shared_TD if self.config.shared_scale == 1.0 else self.config.shared_scale * shared_TD)

    def _soft_experts(self, x_TD: torch.Tensor, soft: SoftRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft MoE: mix each sequence's tokens into slots, run every expert on its slots, mix the results back."""
        (B, L, X), D = soft.dispatch_BLX.shape, x_TD.shape[1]  # (sizes given: -1 cannot be inferred with no tokens)
        # slots_BXD = sum_l dispatch_BLX * x_BLD
        slots_BXD = torch.einsum("blx,bld->bxd", soft.dispatch_BLX, x_TD.to(soft.dispatch_BLX.dtype).view(B, L, D)
                                 ).to(x_TD.dtype)
        expert_X = torch.arange(X, device=x_TD.device) // soft.slots
        ids = expert_X.repeat(B)[:, None]
        ones = torch.ones(ids.shape, device=x_TD.device)
        plan = self._slot_dispatcher.plan(RouterOutput(ones, ones, ids, ones))
        acc = soft.combine_BLX.dtype  # (fp32; float64 for a float64 layer)
        slots_SD = slots_BXD.reshape(B * X, D)
        y_SD = self.experts(slots_SD, plan, acc) if isinstance(self.experts, Experts) else self.experts(slots_SD, plan)
        y_BXD = y_SD.view(B, X, D).to(acc)
        # y_BLD = sum_x combine_BLX * y_BXD
        y_TD = torch.einsum("blx,bxd->bld", soft.combine_BLX, y_BXD).reshape(B * L, D)
        return y_TD, plan.counts_E

    def _experts_skipping_failures(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``on_expert_failure="skip"``: run experts one by one; one that raises or returns non-finite values is
        dropped for this call and its tokens' weights are renormalised over their surviving choices."""
        acc = acc_dtype(x_TD.dtype)
        ids_TK, w_TK = plan.ids_TK, plan.weights_TK.to(acc)
        outputs, failed = [], []
        for e in range(self.config.num_experts):
            tok_N, slot_N = torch.where(ids_TK == e)
            if tok_N.numel() == 0:
                continue
            try:
                out = self.experts.expert_forward(e, x_TD[tok_N]).to(acc)
                if not bool(torch.isfinite(out).all()):
                    raise FloatingPointError("non-finite output")
            except Exception as err:  # noqa: BLE001 - any failure of one expert is survivable in "skip" mode
                failed.append(e)
                self._report_failure(e, err)
                continue
            outputs.append((tok_N, slot_N, out))
        valid_TK = ids_TK >= 0
        alive_TK = valid_TK & ~torch.isin(ids_TK, torch.tensor(failed, device=ids_TK.device, dtype=ids_TK.dtype))
        total_T = (w_TK * valid_TK).sum(-1)
        alive_T = (w_TK * alive_TK).sum(-1)
        scale_T = torch.where(alive_T > 0, total_T / alive_T.clamp_min(1e-30), 0.0)
        y_TD = x_TD.new_zeros(x_TD.shape, dtype=acc)
        for tok_N, slot_N, out in outputs:
            y_TD = y_TD.index_add(0, tok_N, out * (w_TK[tok_N, slot_N] * scale_T[tok_N])[:, None])
        return y_TD

    def _report_failure(self, expert: int, err: Exception) -> None:
        if in_backward_pass():  # (a forward recomputed in backward: counted already)
            return
        with torch.no_grad():
            self.failure_counts[expert] += 1
        if expert not in self._warned_failures:
            self._warned_failures.add(expert)
            log.warning("MoE expert %d failed (%s: %s); skipping it for the calls where it fails "
                        "(on_expert_failure='skip')", expert, type(err).__name__, err)

    # ------------------------------------------------------------------------------------ robust routing
    def disable_experts(self, ids) -> None:
        """Routers never select these experts until :meth:`enable_experts`; tokens go to the best remaining ones."""
        self.router.disable_experts(ids)

    def enable_experts(self, ids=None) -> None:
        """Re-enable experts (all if ``ids`` is None)."""
        self.router.enable_experts(ids)

    def _fused_decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inference of a few tokens with a router the kernel can route as (plain softmax top-k; group-limited
        sigmoid top-k and top-k softmax: :class:`moekit.kernels.cpu.RouteMode`) and fused experts on CPU: routing
        and experts in one kernel call (:class:`moekit.kernels.cpu.RouteDecode`), without the ~20 small host ops of
        routing (~0.25 ms of a one-token step; 0.3-0.45 ms for the other two). Returns the output (``x``'s shape
        and dtype; ``stats`` set), or None where it does not apply (or a token's choice is a tie, which PyTorch's
        top-k then breaks as on the regular path). It runs before the layer's other checks and reshapes, each
        worth microseconds of a decode step's host time (more with the caches cold), and checks ``x`` itself:
        anything unusual takes the regular path."""
        if self._routing_hooks or not isinstance(x, torch.Tensor) or not x.is_cpu or torch.is_autocast_enabled("cpu") \
                or kcpu.bypassed():
            return None
        prep = self._decode_prepared()  # (the checks and arguments that depend on the module only, cached)
        if prep is None:
            return None
        dtype, k, call, plain = prep
        D = call.d_model
        if x.dtype != dtype or x.dim() == 0 or x.shape[-1] != D or x.numel() // D * k > DECODE_KERNEL_MAX_SLOTS \
                or not x.is_contiguous():
            return None
        fused = call(x)  # (y in x's shape: in x's dtype, or fp32 where shared experts are added below)
        if fused is None:
            return None
        y, counts_E = fused
        # (inference, where _balance would only record these; a plain attribute, set without Module.__setattr__)
        self.__dict__["stats"] = {"tokens_per_expert": counts_E, "dropped": counts_E.new_zeros(())}
        if plain:
            return y
        return self._add_shared(x.view(-1, D), y.view(-1, D)).to(x.dtype).view_as(x)

    def _inference_output(self, x: torch.Tensor, x_TD: torch.Tensor, y_TD: torch.Tensor, counts_E: torch.Tensor,
                          dropped: torch.Tensor) -> torch.Tensor:
        """The end of an inference forward that skipped :meth:`_balance`: its statistics recorded, the shared
        experts added where there are some, in ``x``'s shape and dtype (``y_TD``: in ``x``'s dtype, or fp32 where
        shared experts are to be added)."""
        # (inference, where _balance would only record these; a plain attribute, set without Module.__setattr__)
        self.__dict__["stats"] = {"tokens_per_expert": counts_E, "dropped": dropped}
        if self.shared_experts is None and y_TD.dtype == x.dtype:
            return y_TD.view(x.shape)
        return self._add_shared(x_TD, y_TD).to(x.dtype).view(x.shape)

    def _triton_inference(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inference on the Triton path (a GPU) as :meth:`_planless_inference` runs it, but through a call prepared
        once per module state (:meth:`_triton_prepared`), as :meth:`_fused_decode` is on CPU: the checks that depend
        on the module alone are not repeated in every forward. Returns the output (``stats`` set) or None where it
        does not apply (then the regular path decides)."""
        if self.training or type(x) is not torch.Tensor or x.dim() == 0:
            return None
        call = self._triton_prepared(x)
        if call is None or x.shape[-1] != call.D:
            return None
        x_TD = x.reshape(-1, call.D)
        out = call(x_TD)
        return None if out is None else self._inference_output(x, x_TD, *out)

    def _triton_train_step(self, x_TD: torch.Tensor) -> tuple | None:
        """A training forward on the Triton path through the call :meth:`_triton_inference` uses
        (``PreparedRouted.train_step``): ``(y_TD, tokens per expert, dropped, the routing)`` or None."""
        call = self._triton_prepared(x_TD)
        return None if call is None else call.train_step(x_TD)

    def _triton_prepared(self, x: torch.Tensor):
        """The Triton path's prepared call (:class:`moekit.experts.triton_backend.PreparedRouted`) for input ``x``,
        or None where it does not apply: rebuilt whenever :meth:`_prep_key` changes (mode, backend, disabled
        experts, any parameter replaced, moved or cast); not with routing hooks, where PyTorch must see every
        operation, under autocast, for no tokens or an input of another dtype than the weights'."""
        if self._routing_hooks or kcpu.bypassed():
            return None
        call = self._cached_prep("_triton_cache", False, self._prepare_triton)
        if call is None or x.dtype != call.dtype or x.numel() == 0 or autocast_enabled(x.device.type):
            return None
        return call

    def _prepare_triton(self):
        from .experts.triton_backend import PreparedRouted, selects_triton

        cfg, router, experts = self.config, self.router, self.experts
        if not self._planless_allowed() or router.disabled or router.needs_token_ids:
            return None
        spec = router.decode_routing()
        w = experts.w_in
        if spec is None or not selects_triton(experts.backend, w.device, w.dtype) or router.weight.device != w.device:
            return None
        return PreparedRouted(router, experts, cfg.top_k, spec, self._routed_dtype(w.dtype))

    def _decode_prepared(self) -> tuple | None:
        """``(dtype, top_k, the bound kernel call: kcpu.RouteDecode, whether it has no shared experts to add)`` where
        this module can run the fused CPU decode, or None; rebuilt whenever :meth:`_prep_key` changes (mode, hooks,
        backend, disabled experts, any parameter or the selection bias replaced, moved, cast or updated), so a
        one-token step pays for none of the ~20 checks it stands for."""
        return self._cached_prep("_decode_cache", True, self._prepare_decode)

    def _train_step_prepared(self) -> tuple | None:
        """``(dtype, top_k, RoutedExpertsStep's arguments after x)`` where this module can run the few-token training
        step, or None; cached as :meth:`_decode_prepared` is, but kept while the parameters are updated in place (its
        arguments are the parameters themselves, not copies)."""
        return self._cached_prep("_train_cache", False, self._prepare_train_step)

    def _cached_prep(self, name: str, versions: bool, prepare: Callable[[], tuple | None]) -> tuple | None:
        key = self._prep_key(versions)
        cached = self.__dict__.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        prep = prepare()
        self.__dict__[name] = (key, prep)
        return prep

    def _prep_key(self, versions: bool) -> tuple:
        ex, router = self._modules["experts"], self._modules["router"]
        key = [self.training, id(ex), id(router), id(self._modules.get("shared_experts")), router.training,
               router.disabled, getattr(ex, "_backend", None), id(kcpu.library())]
        for mod in (ex, router):
            for t in (*mod._parameters.values(), *mod._buffers.values()):
                key.append(None if t is None else (id(t), t.data_ptr(), t.dtype, t.is_contiguous(),
                                                   t._version if versions else None))
        return tuple(key)

    def _fused_routing(self, decode: bool = False) -> tuple | None:
        """The router's ``decode_routing()`` spec (``decode``: its ``fused_decode_routing()`` spec, which also covers
        the routings of :class:`moekit.kernels.cpu.RouteMode`) where routing and experts can run in one fused CPU
        kernel call (the few-token training step; the fused decode): plain softmax top-k into experts of the
        fused backend that the decode kernels run (the training step then checks for SwiGLU), no capacity, no
        token ids, no expert-failure skipping, a router weight the kernels read as it is; else None."""
        cfg, experts, router = self.config, self.experts, self.router
        if cfg.capacity_factor is not None or not isinstance(experts, Experts) \
                or experts.backend not in ("auto", "fused") or cfg.on_expert_failure == "skip" \
                or cfg.top_k > kcpu.ROUTE_DECODE_MAX_K or router.needs_token_ids:
            return None
        spec = router.fused_decode_routing() if decode else router.decode_routing()
        probe = torch.empty(1, cfg.d_model, dtype=experts.w_in.dtype)
        if spec is None or not experts.decode_kernel_usable(probe):
            return None
        w_r = router.weight
        if w_r.dtype not in (torch.float32, torch.bfloat16) or w_r.device.type != "cpu" or not w_r.is_contiguous():
            return None
        return spec

    def _prepare_decode(self) -> tuple | None:
        cfg, experts, router = self.config, self.experts, self.router
        spec = None if self.training else self._fused_routing(decode=True)
        if spec is None:
            return None
        dtype, b_r = experts.w_in.dtype, router.bias
        *weights_spec, mode = spec  # (renormalize, renorm_min, scale; the RouteMode or None)
        call = kcpu.RouteDecode(router.weight, None if b_r is None else b_r.float().contiguous(),
                                router.expert_bias.float().contiguous(), cfg.top_k, *weights_spec, experts.w_in,
                                experts.b_in, experts.w_out, experts.b_out,
                                self._routed_dtype(dtype), mode, experts.activation)
        return dtype, cfg.top_k, call, self.shared_experts is None

    def _fused_train_step(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RouterOutput] | None:
        """A few tokens with autograd on, a plain softmax top-k router and SwiGLU experts on CPU: routing and experts
        forward in one kernel call, and backward in another (:class:`moekit.experts.train_step.RoutedExpertsStep`;
        the balancing losses, z-loss and selection-bias update run on the routing it returns).
        Returns ``(y_TD, tokens per expert, the routing)``, ``y_TD`` in ``x_TD``'s dtype (fp32 where shared experts
        are to be added), or None where it does not apply (or a token's choice is a tie)."""
        if x_TD.device.type != "cpu" or self._routing_hooks or torch.is_autocast_enabled("cpu") or kcpu.bypassed():
            return None
        prep = self._train_step_prepared()
        if prep is None or x_TD.dtype != prep[0] or not 0 < x_TD.shape[0] * prep[1] <= TRAIN_STEP_MAX_SLOTS \
                or not x_TD.is_contiguous():
            return None
        try:
            y_TD, counts_E, probs_TE, ids_TK, weights_TK, logits_TE = RoutedExpertsStep.apply(x_TD, *prep[2])
        except AmbiguousRouting:
            return None
        return y_TD, counts_E, RouterOutput(logits_TE, probs_TE, ids_TK, weights_TK)

    def _prepare_train_step(self) -> tuple | None:
        cfg, experts, router = self.config, self.experts, self.router
        spec = self._fused_routing()
        if spec is None or experts.b_in is not None or experts.b_out is not None \
                or experts.activation.name != "swiglu":  # (its kernels' activation; the decode kernels have more)
            return None
        dtype = experts.w_in.dtype
        args = (router.weight, router.bias, experts.w_in, experts.w_out, router.expert_bias, (cfg.top_k, *spec),
                self._routed_dtype(dtype))
        return dtype, cfg.top_k, args

    def _planless_inference(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Inference with a plain softmax top-k router into experts that index their slots themselves (Triton, on a
        GPU): the router's logits, the routing and the index in one kernel for few tokens
        (:func:`moekit.kernels.triton_moe.route_and_align`) and the experts' kernels. Returns ``(y_TD, tokens per
        expert, dropped)`` or None where it does not apply."""
        cfg, router = self.config, self.router
        if self.training or x_TD.shape[0] == 0 or not self._planless_allowed():
            return None
        spec = router.decode_routing()
        if spec is None or not self.experts.planless_usable(x_TD, x_TD.shape[0] * cfg.top_k):
            return None
        return self.experts.planless_routed(x_TD, router.logits(x_TD).contiguous(), router.expert_bias, cfg.top_k,
                                            spec, self._routed_dtype(x_TD.dtype))

    def _decode_path(self, x_TD: torch.Tensor, routed: RouterOutput) -> bool:
        """Few tokens, no autograd, on CPU: skip the sort and run each chosen expert directly (see Experts.decode)."""
        if not (x_TD.device.type == "cpu" and not torch.is_grad_enabled() and not self._routing_hooks
                and not routed.may_have_empty and self.config.capacity_factor is None
                and isinstance(self.experts, Experts) and self.experts.backend in ("auto", "fused")):
            return False
        slots = x_TD.shape[0] * self.config.top_k
        if kcpu.plain_ops_only(batching_ok=True):  # (forward-mode AD, grad or jvp transforms: no derivative there)
            return False
        if kcpu.bypassed():  # (traced, or under a dispatch mode: the kernel call's operator, which groups the slots)
            return slots <= DECODE_KERNEL_MAX_SLOTS and self.experts.decode_kernel_usable(x_TD)
        return slots <= DECODE_MAX_SLOTS or (slots <= DECODE_KERNEL_MAX_SLOTS
                                             and self.experts.decode_kernel_usable(x_TD))

    def _planless_path(self, x_TD: torch.Tensor, routed: RouterOutput) -> bool:
        """Dropless top-k routing into fused experts whose backend indexes the slots itself (Triton, on a GPU): no
        dispatch plan, so none of the dispatcher's small ops (see Experts.planless)."""
        return (not routed.may_have_empty and self._planless_allowed()
                and self.experts.planless_usable(x_TD, routed.topk_ids_TK.numel()))

    def _planless_allowed(self) -> bool:
        """What the plan-free paths need of the layer: the local dropless dispatcher, fused experts that stop on a
        failure, and no routing hook (hooks are given a plan, so they keep the regular path)."""
        return (type(self.dispatcher) is LocalDispatcher and not self._routing_hooks
                and self.config.capacity_factor is None and self.config.on_expert_failure != "skip"
                and isinstance(self.experts, Experts))

    def _check_input(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"MoE input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"MoE input must be floating point, got dtype {x.dtype}; "
                             "embed token ids first (e.g. nn.Embedding) or cast with x.float()")
        if x.dim() < 1 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"MoE input's last dimension must be d_model={self.config.d_model}, "
                             f"got shape {tuple(x.shape)}")
        if token_ids is None:
            if self.router.needs_token_ids:
                raise ValueError(f"router {type(self.router).__name__} routes by token id: call layer(x, token_ids=ids)"
                                 " with ids shaped like x without its last dimension")
        elif (not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point()
              or token_ids.shape != x.shape[:-1]):
            raise ValueError(f"token_ids must be an integer tensor of shape {tuple(x.shape[:-1])} (x without its "
                             f"last dimension), got {getattr(token_ids, 'shape', type(token_ids).__name__)}")

    def _balance(self, routed: RouterOutput, counts_E: torch.Tensor, dropped: torch.Tensor | None,
                 seq_len: int) -> tuple | None:
        """Compute the configured balancing losses and statistics; update the selection bias if asked. Returns the
        Function that attaches the losses to the output and its arguments after the output, or None (no loss to
        train: pure inference, eval mode without autograd, skips them)."""
        cfg = self.config
        stats = {"tokens_per_expert": counts_E.detach(),
                 "dropped": dropped.detach() if dropped is not None else counts_E.new_zeros(())}
        if cfg.on_expert_failure == "skip":
            stats["expert_failures"] = self.failure_counts.clone()  # cumulative, per expert
        stats.update(routed.metrics)
        total = None
        losses = dict(routed.aux_losses)
        if not (self.training or torch.is_grad_enabled()):
            self._record(stats)
            return None
        soft = routed.soft is not None  # Soft MoE is balanced by construction: no load or z-loss
        # (the slots each expert was sent: a dropless dispatch's counts, else counted from the routing)
        demand_E = counts_E if cfg.capacity_factor is None else None
        attach = None
        probs_TE = routed.probs_TE
        if (cfg.aux_loss == "switch" and cfg.aux_loss_coef > 0 and cfg.z_loss_coef == 0 and not soft and not losses
                and probs_TE.shape[0] and torch.is_grad_enabled() and probs_TE.requires_grad
                and AttachAuxLoss.plain()):
            # (the Switch loss alone: its value for the statistics and its gradient, attached in one node)
            # (every slot routed, none empty: the counts sum to T * K, known here without a kernel)
            aux, g_E = load_balancing_loss_and_gradient(
                probs_TE, expert_load(routed.topk_ids_TK, cfg.num_experts) if demand_E is None else demand_E,
                None if routed.may_have_empty else routed.topk_ids_TK.numel())
            stats["aux_loss"] = aux
            attach = AttachSwitchLoss, probs_TE, g_E, float(cfg.aux_loss_coef), float(self.aux_loss_scale)
        elif cfg.aux_loss and cfg.aux_loss_coef > 0 and not soft:
            if cfg.aux_loss == "seq":
                aux = sequence_balancing_loss(routed.probs_TE, routed.topk_ids_TK, seq_len)
            else:
                aux = load_balancing_loss(routed.probs_TE, routed.topk_ids_TK, demand_E)
            stats["aux_loss"] = aux.detach()
            losses["aux_loss"] = cfg.aux_loss_coef * aux
        if cfg.z_loss_coef > 0 and not soft:
            z = router_z_loss(routed.logits_TE)
            stats["z_loss"] = z.detach()
            losses["z_loss"] = cfg.z_loss_coef * z
        for name, value in losses.items():
            total = value if total is None else total + value
            stats.setdefault(name, value.detach())
        if self.training and cfg.bias_update_rate > 0 and not state_frozen("the auxiliary-loss-free bias and its load"):
            with torch.no_grad():
                self.load_accum += expert_load(routed.topk_ids_TK, cfg.num_experts) if demand_E is None \
                    else demand_E.to(self.load_accum.dtype)
        self._record(stats)
        if total is not None and torch.is_grad_enabled() and total.requires_grad:
            # (the class for the AD mode or torch.func transform running: AttachAuxLoss.pick)
            attach = AttachAuxLoss.pick(), total, float(self.aux_loss_scale)
        return attach

    def _record(self, stats: dict[str, torch.Tensor]) -> None:
        """``stats`` of this forward, except under ``torch.export``, whose program has no place for them (it warns
        of tensors assigned to a module's attributes)."""
        if kcpu.vmapping():  # (per-sample values, which cannot leave the transform)
            self.__dict__["stats"] = {}
        elif not torch.compiler.is_exporting():
            self.__dict__["stats"] = stats

    # ---------------------------------------------------------------------------------------- balancing
    def _step_bias(self) -> None:
        """``bias_update="auto"``: the bias step of the load the training forwards since the last step saw, taken
        before this forward routes (not at the end of the forward that saw it: a forward recomputed in backward,
        under activation checkpointing, must route with the bias the original forward used). Not inside a
        backward pass or a torch.func transform (:func:`moekit.utils.state_frozen`)."""
        if not state_frozen("the auxiliary-loss-free bias and its load"):
            self.update_bias()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply one auxiliary-loss-free bias step from the load seen since the last call, then reset it."""
        rate = self.config.bias_update_rate
        if rate <= 0:
            raise ValueError("update_bias() needs bias_update_rate > 0 in the layer's config")
        if self.load_accum.sum() > 0:
            update_expert_bias(self.router.expert_bias, self.load_accum, rate)
        self.load_accum.zero_()

    # -------------------------------------------------------------------------------------------- hooks
    def register_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Call ``hook(layer, x_TD, router_output, plan)`` after every forward; returns a removable handle."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def extra_repr(self) -> str:
        c = self.config
        cap = "dropless" if c.capacity_factor is None else f"capacity_factor={c.capacity_factor}, {c.drop_policy}"
        return f"d_model={c.d_model}, num_experts={c.num_experts}, top_k={c.top_k}, {cap}"


#: ``MoE._forward`` behind ``torch.compiler.disable`` (the region a compiled model runs eagerly), made by
#: :func:`_opaque_under_compile` when first needed: ``torch._dynamo`` is imported by then anyway, and importing it
#: with moekit would double the time ``import moekit`` takes.
_EAGER_FORWARD: Callable[[MoE, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None


def _opaque_under_compile() -> bool:
    """Whether the layer being traced by ``torch.compile`` should run eagerly instead (:meth:`MoE.forward`): where
    the CPU kernels are built and a graph break is allowed. Dynamo's current trace tells whether breaks are errors
    there; where it cannot be asked (``torch.export``'s non-strict mode has no such trace, or a PyTorch version
    without it), the layer is traced. Runs once per trace, its answer a constant of the compiled code."""
    if not kcpu.available():
        return False
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        if tx.one_graph or tx.error_on_graph_break or tx.export:
            return False
    except Exception:  # noqa: BLE001 - no trace to ask: trace the layer, which works everywhere
        return False
    global _EAGER_FORWARD
    if _EAGER_FORWARD is None:  # (calls _forward through the instance: a patched method is honoured)
        _EAGER_FORWARD = torch.compiler.disable(lambda layer, x, token_ids: layer._forward(x, token_ids))
    return True


# (what torch._dynamo.assume_constant_result marks, set by hand: see _EAGER_FORWARD)
_opaque_under_compile._dynamo_marked_constant = True


def _router_name(router: Router) -> str:
    for name, cls in ROUTERS.items():
        if type(router) is cls:
            return name
    return type(router).__name__
