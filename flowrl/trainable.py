"""Ray Tune integration: every Agent class as a ``Trainable`` under its short name.

    import flowrl, ray.tune as tune
    tune.run_experiments({"sweep": {"run": "PPO", "env": "CartPole-v1",
                                    "stop": {"episode_reward_mean": 150},
                                    "config": {"lr": tune.grid_search([1e-3, 3e-4])}}})

The Agent stays a plain class (usable with no Ray at all); this adapter gives Tune
``setup`` / ``step`` / ``save_checkpoint`` / ``load_checkpoint`` and the trial's
resource request (driver CPU/GPU + one bundle per rollout worker). A request that
the cluster can never satisfy fails at once instead of leaving the trial pending.
"""

from __future__ import annotations

from ray import tune
from ray.tune import PlacementGroupFactory, Trainable

from flowrl.registry import ALGORITHMS, get_agent_class
from flowrl.resources import check_cluster_fits

_TRAINABLES: dict[str, type] = {}


def make_trainable(agent_cls: type) -> type:
    """A Tune ``Trainable`` class that runs ``agent_cls``."""

    class AgentTrainable(Trainable):
        _agent_class = agent_cls

        @classmethod
        def default_resource_request(cls, config: dict) -> PlacementGroupFactory:
            c = agent_cls.merge_config(config)
            bundles = [{"CPU": c["num_cpus_for_driver"], "GPU": c["num_gpus"]}] + [
                {"CPU": c["num_cpus_per_worker"], "GPU": c["num_gpus_per_worker"]}
                for _ in range(c["num_workers"])]
            check_cluster_fits(
                {r: sum(b[r] for b in bundles) for r in ("CPU", "GPU")},
                f"The {agent_cls._name} trial (num_cpus_for_driver / num_gpus + "
                "num_workers x per-worker resources)",
                "Lower num_workers or the per-worker resources (fractions are allowed), "
                "or start Ray with more resources.")
            return PlacementGroupFactory(bundles)

        def setup(self, config: dict) -> None:
            self.agent = agent_cls(config=config, log_to_disk=False)
            # Checkpoints and results belong in Tune's trial directory.
            self.agent._logdir = self.logdir

        def step(self) -> dict:
            return self.agent.step()

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            self.agent.save(checkpoint_dir)

        def load_checkpoint(self, checkpoint: str) -> None:
            self.agent.restore(checkpoint)

        def cleanup(self) -> None:
            self.agent.stop()

    AgentTrainable.__name__ = AgentTrainable.__qualname__ = agent_cls._name
    return AgentTrainable


def get_trainable_class(name: str) -> type:
    """The registered Tune Trainable of algorithm ``name``."""
    if name not in _TRAINABLES:
        _TRAINABLES[name] = make_trainable(get_agent_class(name))
    return _TRAINABLES[name]


def register_trainables() -> None:
    """Registers every algorithm with Tune under its short name ("PPO", ...)."""
    for name in ALGORITHMS:
        tune.register_trainable(name, get_trainable_class(name))
