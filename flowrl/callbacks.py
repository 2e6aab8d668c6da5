"""Kept so that ``from flowrl.callbacks import DefaultCallbacks`` of earlier releases
works; the module is :mod:`flowrl.workers.callbacks`."""

from flowrl.workers.callbacks import DefaultCallbacks, Episode

__all__ = ["DefaultCallbacks", "Episode"]
