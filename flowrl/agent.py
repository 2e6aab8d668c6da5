"""Kept so that ``from flowrl.agent import Agent`` of earlier releases works; the module
is :mod:`flowrl.algorithms.agent`."""

from flowrl.algorithms.agent import Agent

__all__ = ["Agent"]
