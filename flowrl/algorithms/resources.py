"""Fail fast when a request can never be scheduled on the running Ray cluster."""

from __future__ import annotations


def check_cluster_fits(asked: dict[str, float], what: str, how_to_fix: str) -> None:
    """Raises ``ValueError`` if ``asked`` (e.g. ``{"CPU": 3, "GPU": 0}``) exceeds the
    cluster's total resources. No-op when Ray is not running.

        check_cluster_fits({"CPU": 5}, "The PPO trial", "Lower num_workers ...")
    """
    import ray
    if not ray.is_initialized():
        return
    cluster = ray.cluster_resources()
    for resource, amount in asked.items():
        have = cluster.get(resource, 0)
        if amount > have:
            raise ValueError(f"{what} asks for {amount:g} {resource}s, but the Ray cluster "
                             f"has {have:g}. {how_to_fix}")
