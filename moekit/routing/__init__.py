"""Routers: one routing family per file, all producing a :class:`RouterOutput`."""

from .base_layer import BaseLayerRouter
from .base import (ROUTERS, Router, RouterOutput, RoutingContext, SoftRouting, TopKRouter, build_router,
                   register_router)
from .expert_choice import ExpertChoice
from .gshard_top2 import GShardTop2
from .hash_router import HashRouter
from .hierarchical import HierarchicalRouter
from .noisy_topk import NoisyTopK
from .relu_router import ReLURouter
from .sigmoid_topk import GroupLimitedTopK
from .sinkhorn import SinkhornRouter
from .soft_moe import SoftMoE
from .softmax_topk import SoftmaxTopK, SwitchTop1
from .top_p import TopPRouter
from .topk_softmax import TopKSoftmax

__all__ = [
    "ROUTERS", "Router", "RouterOutput", "RoutingContext", "SoftRouting", "TopKRouter", "build_router",
    "register_router", "SoftmaxTopK", "SwitchTop1", "TopKSoftmax", "GroupLimitedTopK", "NoisyTopK", "GShardTop2",
    "ExpertChoice", "SoftMoE", "HashRouter", "BaseLayerRouter", "SinkhornRouter", "TopPRouter", "ReLURouter",
    "HierarchicalRouter",
]
