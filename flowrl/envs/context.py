"""EnvContext: the ``env_config`` an env creator receives, plus where the env lives."""

from __future__ import annotations


class EnvContext(dict):
    """The ``env_config`` dict, plus where the env lives.

    Attributes:
        worker_index: 0 for the local worker, 1..N for remote workers.
        vector_index: index of this env among the worker's ``num_envs_per_worker``.
        num_workers: number of remote workers.
    """

    def __init__(self, env_config: dict | None = None, worker_index: int = 0,
                 vector_index: int = 0, num_workers: int = 0):
        super().__init__(env_config or {})
        self.worker_index = worker_index
        self.vector_index = vector_index
        self.num_workers = num_workers

    def copy_with_overrides(self, worker_index: int | None = None,
                            vector_index: int | None = None) -> "EnvContext":
        return EnvContext(
            dict(self),
            self.worker_index if worker_index is None else worker_index,
            self.vector_index if vector_index is None else vector_index,
            self.num_workers,
        )
