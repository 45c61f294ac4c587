"""Dispatch: routing records into rows grouped by expert, and back (see ``dispatch.base``)."""

from .base import DROPLESS, Capacity, Dispatched, Dispatcher
from .local import LocalDispatcher
from .plans import (
           ExpertChoicePlan,
           SoftPlan,
           TokenChoicePlan,
           make_plan,
           register_planner,
           sorted_plan,
)

__all__ = ["DROPLESS", "Capacity", "Dispatched", "Dispatcher", "ExpertChoicePlan", "LocalDispatcher", "SoftPlan",
           "TokenChoicePlan", "make_plan", "register_planner", "sorted_plan"]
