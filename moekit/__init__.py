"""moekit: the Mixture-of-Experts toolkit for PyTorch."""

from .balance import load_balancing_loss, router_z_loss, sequence_balancing_loss
from .config import MoEConfig
from .dispatch import DispatchPlan, LocalDispatcher
from .experts import Experts, SharedExperts
from .graphs import CUDAGraphed, cuda_graphed
from .layer import MoE
from .routing import Router, RouterOutput, build_router, register_router

__version__ = "0.1.0"

__all__ = [
    "MoE", "MoEConfig", "Router", "RouterOutput", "build_router", "register_router", "DispatchPlan",
    "LocalDispatcher", "Experts", "SharedExperts", "load_balancing_loss", "sequence_balancing_loss",
    "router_z_loss", "cuda_graphed", "CUDAGraphed", "from_hf", "patch_hf", "unpatch_hf", "__version__",
]


def from_hf(block, **options):
    """Convert a transformers sparse-MoE block into an equivalent :class:`MoE` (see :mod:`moekit.interop.hf`)."""
    from .interop.hf import from_hf as _from_hf

    return _from_hf(block, **options)


def patch_hf(model, **options):
    """Run every sparse-MoE block of a transformers model on moekit, in place (see :mod:`moekit.interop.patch`)."""
    from .interop.patch import patch_hf as _patch_hf

    return _patch_hf(model, **options)


def unpatch_hf(model):
    """Restore the transformers blocks that :func:`patch_hf` replaced, with their current weights."""
    from .interop.patch import unpatch_hf as _unpatch_hf

    return _unpatch_hf(model)
