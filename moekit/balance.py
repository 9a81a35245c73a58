"""Load-balancing: auxiliary losses, router z-loss, and auxiliary-loss-free bias updates.

Notation: ``T`` tokens, ``E`` experts, ``K`` slots per token, ``B`` sequences of ``L`` tokens.

All auxiliary losses are normalised so that perfectly uniform routing scores exactly 1 (z-loss excepted), whatever
``E`` and ``K``; Hugging Face's ``load_balancing_loss_func`` equals ``K`` times :func:`load_balancing_loss`.
"""

from __future__ import annotations

import torch

from .kernels import cpu as kcpu
from .utils import acc_dtype

AUX_LOSSES = ("switch", "seq")


def _counts(ids_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert along the last axes: ``[..., K]`` ids → ``[..., E]`` float counts (empty slots skipped)."""
    key = torch.where(ids_NK >= 0, ids_NK, num_experts)
    out = torch.zeros(*ids_NK.shape[:-1], num_experts + 1, device=ids_NK.device, dtype=torch.float32)
    # (out of place: under torch.func.vmap the ids are batched, the fresh zeros are not)
    return out.scatter_add(-1, key, torch.ones_like(key, dtype=torch.float32))[..., :num_experts]


def expert_load(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots the router sent to each expert (its demand, before any capacity limit), as float ``[E]``."""
    return _counts(ids_TK, num_experts).sum(dim=0)


def load_balancing_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor,
                        counts_E: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/GShard auxiliary loss (Fedus et al. 2021, eq. 4): ``E * sum_i f_i * P_i``.

    ``f_i``: fraction of routed slots that chose expert ``i``; ``P_i``: mean router probability of ``i``.
    ``counts_E``: the slots each expert was sent (its demand), where the caller has them already (a dropless
    dispatch's own counts), so ``ids_TK`` is not counted again.
    """
    E = probs_TE.shape[-1]
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    acc = acc_dtype(probs_TE.dtype)
    with torch.no_grad():
        counts_E = (expert_load(ids_TK, E) if counts_E is None else counts_E).to(acc)
        f_E = counts_E / counts_E.sum().clamp_min(1.0)
    return E * (f_E * probs_TE.to(acc).mean(dim=0)).sum()


def load_balancing_loss_and_gradient(probs_TE: torch.Tensor, counts_E: torch.Tensor,
                                     total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`load_balancing_loss` of ``T > 0`` tokens from the experts' slot counts, and its gradient in
    ``probs_TE``, the same on every token (``f`` is no function of the probabilities): ``(loss, g_E)`` with
    ``d loss / d probs[t, e] = g_E[e] = E * f_e / T``, in the loss's dtype; neither records a graph. ``total``: the
    counts' sum where the caller knows it (``T * K`` for a routing without empty slots), so it is not summed again."""
    T, E = probs_TE.shape
    acc = acc_dtype(probs_TE.dtype)
    g_E = counts_E.detach().to(acc)  # (detached rather than under torch.no_grad(): ~10 us less host time a call)
    if total is not None:
        g_E = g_E * (E / (T * max(total, 1)))
    else:
        g_E = g_E / (g_E.sum().clamp_min(1.0) * (T / E))
    return torch.dot(g_E, probs_TE.detach().to(acc).sum(dim=0)), g_E


def sequence_balancing_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (arXiv:2412.19437 eq. 17-20), averaged over sequences.

    Same as :func:`load_balancing_loss` but ``f`` and ``P`` are computed within each sequence of ``seq_len`` tokens.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    if seq_len < 1 or T % seq_len:
        raise ValueError(f"sequence balancing loss: {T} tokens do not split into sequences of {seq_len}")
    B = T // seq_len
    with torch.no_grad():
        counts_BE = _counts(ids_TK.view(B, seq_len, -1).reshape(B, -1), E)
        f_BE = counts_BE / counts_BE.sum(dim=-1, keepdim=True).clamp_min(1.0)
    P_BE = probs_TE.to(acc_dtype(probs_TE.dtype)).view(B, seq_len, E).mean(dim=1)
    return E * (f_BE * P_BE).sum(dim=-1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of ``logsumexp(logits)^2``."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.to(acc_dtype(logits_TE.dtype)), dim=-1).square().mean()


def _nested_reverse_transforms() -> bool:
    """Whether two reverse-mode ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``) are nested here."""
    if torch.compiler.is_compiling():
        return False
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return sum(i.key() == torch._C._functorch.TransformType.Grad for i in stack) >= 2


class AttachAuxLoss(torch.autograd.Function):
    """Return ``output`` unchanged; in backward also send gradient ``scale`` into ``aux_loss``.

    This makes auxiliary losses train the router whenever anything downstream of the layer is back-propagated,
    without the training loop adding them to its loss. Under torch.func transforms use :meth:`pick`'s class.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        AttachAuxLoss._keep(ctx, aux_loss, scale)
        return output.view_as(output)

    @staticmethod
    def _keep(ctx, aux_loss: torch.Tensor, scale: float) -> None:
        ctx.scale, ctx.aux_shape, ctx.aux_dtype = scale, aux_loss.shape, aux_loss.dtype
        ctx.graphed = False

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # The losses' gradient is no function of grad_output: every pass through here would add it. Once a pass has
        # built a graph of its gradients (create_graph=True: double backward, torch.func.grad), a later pass through
        # this node differentiates that graph, whose losses' part is differentiated on its own: it adds nothing
        # (reverse-over-reverse Hessian-vector products had the losses' gradient added once more).
        if not AttachAuxLoss._first_pass(ctx):
            return grad_output, None, None
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, grad_aux, None

    @staticmethod
    def _first_pass(ctx) -> bool:
        """Whether this backward pass through an attaching node sends the losses their gradient: the first only."""
        if ctx.graphed:
            return False
        ctx.graphed = torch.is_grad_enabled()
        if ctx.graphed and _nested_reverse_transforms():
            raise RuntimeError(
                "reverse-over-reverse torch.func transforms (vjp or jacrev of grad, jacrev(jacrev(...))) through a "
                "layer whose balancing losses are attached to its output would count their gradient wrongly. Use "
                "forward-over-reverse, which is exact: torch.func.jvp(torch.func.grad(loss), ...) for Hessian-vector "
                "products, torch.func.hessian (jacfwd of jacrev); or double backward with torch.autograd "
                "(create_graph=True); or set aux_loss_coef and z_loss_coef to 0")
        return True

    @staticmethod
    def pick() -> type["AttachAuxLoss"]:
        """The class to apply here: under forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``)
        :class:`AttachAuxLossJvp`, under any other torch.func transform :class:`AttachAuxLossFunc`, else this one
        (whose ``apply`` costs ~10 us on the host against ~60 for a Function with ``setup_context``, which
        ``apply`` binds through ``inspect.signature`` on every call)."""
        if kcpu.forward_ad():
            return AttachAuxLossJvp
        return AttachAuxLoss if AttachAuxLoss.plain() else AttachAuxLossFunc

    @staticmethod
    def plain() -> bool:
        """Whether :meth:`pick` gives this class (and :class:`AttachSwitchLoss` applies): no forward-mode AD, no
        torch.func transform."""
        return not kcpu.forward_ad() and (torch.compiler.is_compiling()
                                          or not torch._C._are_functorch_transforms_active())


class AttachSwitchLoss(torch.autograd.Function):
    """:class:`AttachAuxLoss` of ``coef *`` :func:`load_balancing_loss` alone, in one autograd node and no graph of
    its own: ``output`` unchanged; backward sends ``scale * coef * g_E`` (the loss's gradient, the same on every
    token: :func:`load_balancing_loss_and_gradient`) into ``probs_TE``. Where the Switch loss is a layer's only
    balancing loss (the default), outside torch.func transforms and forward-mode AD (:meth:`AttachAuxLoss.plain`):
    the losses' graph and :class:`AttachAuxLoss` took 14 PyTorch ops forward and 9 backward (in 8 autograd nodes),
    against 10 and 1 (in 1 node) here, a small training step's host time on a GPU being mostly such ops."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, probs_TE: torch.Tensor, g_E: torch.Tensor, coef: float,
                scale: float) -> torch.Tensor:
        ctx.g_E, ctx.probs_shape = (g_E * (coef * scale)).to(probs_TE.dtype), probs_TE.shape
        ctx.graphed = False
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if not AttachAuxLoss._first_pass(ctx):
            return grad_output, None, None, None, None
        return grad_output, ctx.g_E.expand(ctx.probs_shape), None, None, None


class AttachAuxLossFunc(AttachAuxLoss):
    """:class:`AttachAuxLoss` for torch.func transforms (``vmap``, ``grad``, ``jacrev``...), which need ``forward``
    and ``setup_context`` apart."""

    generate_vmap_rule = True

    @staticmethod
    def forward(output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        AttachAuxLoss._keep(ctx, inputs[1], inputs[2])


class AttachAuxLossJvp(AttachAuxLossFunc):
    """:class:`AttachAuxLoss` for forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``), which needs a
    ``jvp`` (the output's tangent, unchanged): a reverse pass inside it (``jvp(grad(loss))``, forward-over-reverse
    Hessian-vector products) still reaches the losses. Apart, since ``torch.compile`` cannot trace a Function with a
    ``jvp``."""

    @staticmethod
    def jvp(ctx, d_output: torch.Tensor, d_aux_loss, d_scale) -> torch.Tensor:
        return d_output.view_as(d_output)


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): ``b_i += rate * sign(mean(load) - load_i)``.

    Under-loaded experts become more attractive to the selection step; the combine weights are untouched.
    """
    load_E = load_E.float()
    expert_bias_E += rate * torch.sign(load_E.mean() - load_E).to(expert_bias_E.dtype)
