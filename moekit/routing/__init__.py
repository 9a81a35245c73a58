"""Routers: one routing family per file, all producing a :class:`RouterOutput`."""

from .base import ROUTERS, Router, RouterOutput, TopKRouter, build_router, register_router
from .sigmoid_topk import GroupLimitedTopK
from .softmax_topk import SoftmaxTopK, SwitchTop1
from .topk_softmax import TopKSoftmax

__all__ = [
    "ROUTERS", "Router", "RouterOutput", "TopKRouter", "build_router", "register_router",
    "SoftmaxTopK", "SwitchTop1", "TopKSoftmax", "GroupLimitedTopK",
]
