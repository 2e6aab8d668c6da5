"""Learning tests: each algorithm reaches a return within a step budget, on 2 of 3 seeds.

``typical`` is the median steps of seeds 0-2, measured with ``FLOWRL_LEARNING_LOG`` (see
``learning_bars``) on this project's 2-core machine while other work kept it busy; the
budget is twice that. Every test here is marked ``learning``.
"""

import os
import re

import pytest
import yaml

from learning_bars import assert_learns

TUNED_DIR = os.path.join(os.path.dirname(__file__), "..", "flowrl", "tuned_examples")
# The sentence every CartPole/Pendulum example states its learning speed with.
REACHES = re.compile(r"Reaches (?:a mean return of )?(-?\d+) in ~(\d+)k steps")


def tuned_config(name: str) -> dict:
    (spec,) = yaml.safe_load(open(os.path.join(TUNED_DIR, name))).values()
    return spec["config"]


def stated_bar(name: str) -> tuple[float, int]:
    """(return, typical steps) from the example's "Reaches X in ~Nk steps" comment."""
    comment = " ".join(line.lstrip("# ").rstrip() for line in open(os.path.join(TUNED_DIR, name))
                       if line.startswith("#"))
    match = REACHES.search(comment)
    if match is None:
        raise ValueError(f"{name}: no 'Reaches X in ~Nk steps' sentence in its comment")
    return float(match.group(1)), int(match.group(2)) * 1000


TUNED_EXAMPLES = sorted(name for name in os.listdir(TUNED_DIR)
                        if name.startswith(("cartpole-", "pendulum-")))


def test_every_small_example_states_its_bar():
    assert len(TUNED_EXAMPLES) >= 12
    for name in TUNED_EXAMPLES:
        threshold, typical = stated_bar(name)
        (spec,) = yaml.safe_load(open(os.path.join(TUNED_DIR, name))).values()
        assert spec["stop"]["episode_reward_mean"] == threshold, name
        assert spec["stop"]["timesteps_total"] >= typical, name


@pytest.mark.learning
@pytest.mark.parametrize("name", TUNED_EXAMPLES)
def test_tuned_example_reaches_what_its_comment_states(name, ray_session):
    """Budget: twice the typical steps the example's comment states."""
    threshold, typical = stated_bar(name)
    (spec,) = yaml.safe_load(open(os.path.join(TUNED_DIR, name))).values()
    assert_learns(spec["run"], spec["config"], threshold, 2 * typical, typical=typical,
                  env=spec["env"])


@pytest.mark.learning
def test_ppo_cartpole_two_workers(ray_session):
    assert_learns("PPO", {"num_workers": 2, "num_cpus_per_worker": 0.5}, 150, 66_000,
                  typical=33_000)


# -- defaults beyond CartPole: no config at all, as `train.py --run ALGO --env ENV` ----------

@pytest.mark.learning
def test_ppo_default_config_pendulum():
    """Continuous control with the defaults: rewards of -16..0 per step, returns near
    -1200 at the start."""
    assert_learns("PPO", {}, -400, 136_000, typical=68_000, env="Pendulum-v1")


@pytest.mark.learning
def test_ppo_default_config_acrobot():
    """A discrete task that is not CartPole (returns -500..0). Random play: -500."""
    assert_learns("PPO", {}, -120, 70_000, typical=35_000, env="Acrobot-v1")


@pytest.mark.learning
def test_dqn_default_config_acrobot():
    """DQN's defaults on the same non-CartPole task."""
    assert_learns("DQN", {}, -120, 200_000, typical=100_000, env="Acrobot-v1")


@pytest.mark.learning
def test_ppo_default_config_hopper_smoke():
    """MuJoCo: a random Hopper policy falls within ~20 steps (return 16.5 over 20
    episodes here)."""
    assert_learns("PPO", {}, 250, 74_000, typical=37_000, env="Hopper-v5")
