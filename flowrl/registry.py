"""Kept so that ``from flowrl.registry import get_agent_class`` of earlier releases works;
the module is :mod:`flowrl.algorithms.registry`."""

from flowrl.algorithms.registry import ALGORITHMS, get_agent_class

__all__ = ["ALGORITHMS", "get_agent_class"]
