"""Dispatchers: the mechanics of moving token slots to experts and back."""

from .local import DROP_POLICIES, DispatchPlan, LocalDispatcher

__all__ = ["DROP_POLICIES", "DispatchPlan", "LocalDispatcher"]
