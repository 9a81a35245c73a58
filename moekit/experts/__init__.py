"""Experts: the math of the routed and shared feed-forward networks, and the backends that compute them."""

from .activations import ACTIVATIONS, Activation, get_activation
from .backends import BACKENDS, grouped_mm_supported
from .fused import Experts, ModuleListExperts
from .shared import SharedExperts
from . import fused_op  # noqa: F401 - registers moekit's operators (a saved torch.export program needs them)

__all__ = ["ACTIVATIONS", "Activation", "get_activation", "BACKENDS", "grouped_mm_supported", "Experts",
           "ModuleListExperts", "SharedExperts"]
