"""Evolution strategies (Salimans et al. 2017, "Evolution Strategies as a Scalable
Alternative to Reinforcement Learning") as an imperative ``training_step``.

One iteration:

    1. one ray.put of (theta, observation-filter statistics), the ref to every ES actor
    2. each actor runs antithetic pairs theta +/- sigma * eps(idx), eps read from the
       shared noise table at random offsets idx, until its share of the episode and
       timestep quotas; plus unperturbed evaluation episodes
    3. centered ranks of all returns; gradient estimate
       g = sum_i (rank_i+ - rank_i-) * eps(idx_i) / (2 * num_pairs)
    4. Adam ascent step on the flat weights (with L2 decay)
    5. workers' observation statistics merged into the driver's filter
    6. report: the mean return of the unperturbed evaluation episodes

The noise table (``noise_size`` float32 values drawn from ``noise_seed``) is created
once and ``ray.put`` once; actors read their slices zero-copy from the object store, so
a perturbation travels as one integer. The ES actors are this module's own Ray actors:
the WorkerSet holds only the local worker (acting, checkpoints), see
:meth:`ESAgent.worker_set_num_workers`. ``num_workers: 0`` runs the perturbations in
the driver process without Ray.

Default config (tuned for CartPole-v1 on two cores, see ``DEFAULT_CONFIG``):
``noise_size`` is 25M floats (100 MB); the paper's reference code used 250M (1 GB),
which small machines cannot spare. The table only has to be much larger than the
number of parameters (2k-10k for classic-control MLPs) so that slices rarely overlap.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any, Callable

import numpy as np
import torch

from flowrl.agent import Agent
from flowrl.config import require
from flowrl.envs.compat import ensure_gymnasium_env
from flowrl.envs.registry import EnvContext
from flowrl.ops.counters import LEARN_TIMER, NUM_STEPS_SAMPLED, NUM_STEPS_TRAINED, SAMPLE_TIMER
from flowrl.policies.es import ESPolicy
from flowrl.workers.rollout_worker import worker_seed

logger = logging.getLogger(__name__)

DEFAULT_CONFIG: dict = {
    # ES actors (not RolloutWorkers); 0 = perturbations run in the driver process.
    "num_workers": 2,
    # Per iteration: at least this many perturbed episodes (pairs count as 2) ...
    "episodes_per_batch": 20,
    # ... and at least this many perturbed env steps.
    "train_batch_size": 1000,
    # sigma: std of the parameter perturbations.
    "noise_stdev": 0.02,
    # Adam step size on the flat weights (ES does not use "lr").
    "stepsize": 0.01,
    # L2 weight decay coefficient added to the gradient.
    "l2_coeff": 0.005,
    # Shared noise table: float32 values (25M = 100 MB; the paper used 250M = 1 GB).
    "noise_size": 25_000_000,
    "noise_seed": 123,
    # Probability that an episode slot runs the unperturbed policy (paper: 0.01-0.03).
    "eval_prob": 0.0,
    # Unperturbed evaluation episodes per iteration, shared among the actors.
    "num_evaluation_episodes": 4,
    # Reported episode_reward_mean: eval episodes of the last report_length iterations.
    "report_length": 3,
    "observation_filter": "MeanStdFilter",  # or "NoFilter"
    # Gaussian noise on Box actions in perturbed episodes (not in evaluation).
    "action_noise_std": 0.01,
    # "centered_rank" (ranks scaled to [-0.5, 0.5]) or "raw" returns.
    "return_proc_mode": "centered_rank",
    "model": {"fcnet_hiddens": [32, 32], "fcnet_activation": "tanh"},
}

RETURN_PROC_MODES = ("centered_rank", "raw")


# ------------------------------------------------------------------ pure functions
def compute_centered_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of all entries of ``x`` scaled to ``[-0.5, 0.5]`` (same shape, float32).

    The smallest value gets -0.5, the largest 0.5; ties are ranked in order of
    appearance (stable sort) so the result is deterministic. Rank transformation
    makes the update invariant to the scale of returns and robust to outliers.
    """
    x = np.asarray(x)
    flat = x.reshape(-1)
    if flat.size <= 1:
        return np.zeros(x.shape, dtype=np.float32)
    ranks = np.empty(flat.size, dtype=np.float64)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    return (ranks / (flat.size - 1) - 0.5).reshape(x.shape).astype(np.float32)


def process_returns(returns: np.ndarray, mode: str) -> np.ndarray:
    """``returns [num_pairs, 2]`` -> fitness values per ``return_proc_mode``."""
    if mode == "centered_rank":
        return compute_centered_ranks(returns)
    if mode == "raw":
        return np.asarray(returns, dtype=np.float32)
    raise ValueError(f"return_proc_mode={mode!r}; expected one of {RETURN_PROC_MODES}")


def perturb(theta: np.ndarray, eps: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The antithetic pair ``(theta + sigma * eps, theta - sigma * eps)``."""
    delta = sigma * eps
    return theta + delta, theta - delta


def batched_weighted_sum(weights: np.ndarray, noise: np.ndarray, indices: np.ndarray,
                         num_params: int, batch_size: int = 500) -> np.ndarray:
    """``sum_i weights[i] * noise[indices[i] : indices[i] + num_params]`` (float32).

    Slices are stacked ``batch_size`` at a time into one matrix-vector product, so
    memory stays bounded for large populations.
    """
    total = np.zeros(num_params, dtype=np.float64)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        block = np.stack([noise[i:i + num_params] for i in idx])
        total += np.asarray(weights[start:start + batch_size], dtype=np.float64) @ block
    return total.astype(np.float32)


def es_gradient(returns: np.ndarray, noise: np.ndarray, indices: np.ndarray,
                num_params: int, mode: str = "centered_rank") -> np.ndarray:
    """The ascent direction from antithetic ``returns [num_pairs, 2]`` (pos, neg).

    Like the paper's code, sigma is folded into the step size and the sum is divided
    by the number of returns (2 per pair).
    """
    fitness = process_returns(returns, mode)
    grad = batched_weighted_sum(fitness[:, 0] - fitness[:, 1], noise, indices, num_params)
    return grad / max(fitness.size, 1)


def create_noise_table(size: int, seed: int) -> np.ndarray:
    """``size`` standard-normal float32 values, deterministic in ``seed``."""
    return np.random.default_rng(seed).standard_normal(size, dtype=np.float32)


# ------------------------------------------------------------------------- workers
class ESWorker:
    """Runs perturbed and evaluation episodes; a Ray actor or a local object.

    Args:
        env_creator: ``fn(EnvContext) -> env`` (the Agent's creator).
        config: the full ES config.
        noise: the noise table, or ``[ref]`` holding the object-store ref to it (a ref
            nested in a list reaches the actor unresolved, so it can report which
            object it reads; the array itself is a zero-copy view of shared memory).
        worker_index: 1..N; seeds ``seed + 1000 * worker_index``.
        num_workers: number of ES actors (for the EnvContext).
    """

    def __init__(self, env_creator: Callable[[EnvContext], Any], config: dict,
                 noise: np.ndarray | list, worker_index: int = 1, num_workers: int = 0):
        if worker_index > 0 and num_workers > 0:
            torch.set_num_threads(1)  # one core per actor; small-net torch hates sharing
        self.worker_index = worker_index
        self.noise_ref = None
        if isinstance(noise, list):
            import ray
            self.noise_ref = noise[0]
            noise = ray.get(self.noise_ref)
        self.noise = noise
        seed = worker_seed(config.get("seed"), worker_index)
        self.env = ensure_gymnasium_env(env_creator(
            EnvContext(config.get("env_config", {}), worker_index, 0, num_workers)))
        self.policy = ESPolicy(self.env.observation_space, self.env.action_space,
                               {**config, "seed": seed})
        if self.policy.num_params > len(self.noise):
            raise ValueError(f"noise_size={len(self.noise)} is smaller than the policy's "
                             f"{self.policy.num_params} parameters.")
        self.rng = np.random.default_rng(seed)
        self.sigma = float(config["noise_stdev"])
        self.eval_prob = float(config["eval_prob"])
        self._discrete = self.policy._discrete
        self._action_shape = getattr(self.policy, "_action_shape", ())

    def rollout(self, add_noise: bool, env_seed: int | None = None,
                record: bool = False) -> tuple[float, int]:
        """One episode with the current weights; returns ``(return, length)``.

        ``record`` adds the episode's observations to the filter buffer.
        """
        policy, filt, env = self.policy, self.policy.filter, self.env
        obs, _ = env.reset(seed=env_seed)
        total, length, seen = 0.0, 0, []
        while True:
            x = policy.preprocess(np.asarray(obs)[None])
            if record:
                seen.append(x[0])
            action = policy.act_filtered(filt(x), add_noise)[0]
            action = int(action) if self._discrete else action.reshape(self._action_shape)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            length += 1
            if terminated or truncated:
                break
        if record:
            filt.record(np.stack(seen))
        return total, length

    def do_rollouts(self, params: dict, min_episodes: int, min_timesteps: int,
                    num_eval: int = 0) -> dict[str, Any]:
        """Evaluation episodes, then antithetic pairs until both minimums are met.

        ``params``: ``{"weights": theta, "filter": filter statistics}``. Returns
        ``noise_indices [k]``, ``returns``/``lengths [k, 2]`` (pos, neg),
        ``env_seeds [k]``, ``eval_returns``/``eval_lengths``, ``filter_buffer``.
        """
        policy = self.policy
        theta = np.asarray(params["weights"], dtype=np.float32)
        policy.filter.set_state(params["filter"])  # frozen for this call; clears the buffer
        n = policy.num_params
        eval_returns, eval_lengths = [], []

        def evaluate() -> None:
            policy.set_flat_weights(theta)
            r, length = self.rollout(add_noise=False,
                                     env_seed=int(self.rng.integers(2**31 - 1)))
            eval_returns.append(r)
            eval_lengths.append(length)

        for _ in range(num_eval):
            evaluate()
        indices, returns, lengths, seeds = [], [], [], []
        episodes = steps = 0
        while episodes < min_episodes or steps < min_timesteps:
            if self.eval_prob > 0 and self.rng.random() < self.eval_prob:
                evaluate()
                continue
            idx = int(self.rng.integers(0, len(self.noise) - n + 1))
            pos, neg = perturb(theta, self.noise[idx:idx + n], self.sigma)
            # Both members start from the same env state (common random numbers), so
            # their return difference measures the perturbation, not the start state.
            env_seed = int(self.rng.integers(2**31 - 1))
            policy.set_flat_weights(pos)
            r_pos, l_pos = self.rollout(add_noise=True, env_seed=env_seed, record=True)
            policy.set_flat_weights(neg)
            r_neg, l_neg = self.rollout(add_noise=True, env_seed=env_seed, record=True)
            indices.append(idx)
            seeds.append(env_seed)
            returns.append((r_pos, r_neg))
            lengths.append((l_pos, l_neg))
            episodes += 2
            steps += l_pos + l_neg
        return {"noise_indices": np.asarray(indices, dtype=np.int64),
                "returns": np.asarray(returns, dtype=np.float64).reshape(-1, 2),
                "lengths": np.asarray(lengths, dtype=np.int64).reshape(-1, 2),
                "env_seeds": np.asarray(seeds, dtype=np.int64),
                "eval_returns": eval_returns, "eval_lengths": eval_lengths,
                "filter_buffer": policy.filter.pop_buffer(),
                "worker_index": self.worker_index}

    def noise_table_info(self) -> dict[str, Any]:
        """Which table this worker reads: ref hex (None locally), size, writability."""
        return {"ref": None if self.noise_ref is None else self.noise_ref.hex(),
                "size": int(len(self.noise)),
                "writeable": bool(self.noise.flags.writeable)}

    def ping(self) -> str:
        return "ok"

    def stop(self) -> None:
        self.env.close()


# --------------------------------------------------------------------------- agent
class ESAgent(Agent):
    """Evolution strategies; see the module docstring for one iteration.

        agent = ESAgent(env="CartPole-v1")
        result = agent.train()   # episode_reward_mean: unperturbed evaluation episodes

    Reads counters: num_steps_sampled (all env steps, evaluation included),
    num_steps_trained (perturbed steps).
    """

    _name = "ES"
    _default_config = DEFAULT_CONFIG
    _policy_class = ESPolicy

    @classmethod
    def worker_set_num_workers(cls, config: dict) -> int:
        # ES runs its own actors; the WorkerSet keeps only the local worker.
        return 0

    @classmethod
    def validate_config(cls, config: dict) -> None:
        require(config["noise_stdev"] > 0, f"noise_stdev={config['noise_stdev']!r} must be > 0.")
        require(config["stepsize"] > 0, f"stepsize={config['stepsize']!r} must be > 0.")
        require(config["l2_coeff"] >= 0, f"l2_coeff={config['l2_coeff']!r} must be >= 0.")
        require(config["noise_size"] >= 1, f"noise_size={config['noise_size']!r} must be >= 1.")
        require(config["episodes_per_batch"] >= 2,
                f"episodes_per_batch={config['episodes_per_batch']!r} must be >= 2 "
                "(one antithetic pair).")
        require(0.0 <= config["eval_prob"] < 1.0,
                f"eval_prob={config['eval_prob']!r} must be in [0, 1).")
        require(config["num_evaluation_episodes"] >= 0,
                f"num_evaluation_episodes={config['num_evaluation_episodes']!r} must be >= 0.")
        require(config["report_length"] >= 1,
                f"report_length={config['report_length']!r} must be >= 1.")
        require(config["action_noise_std"] >= 0,
                f"action_noise_std={config['action_noise_std']!r} must be >= 0.")
        require(config["observation_filter"] in ("MeanStdFilter", "NoFilter"),
                f"observation_filter={config['observation_filter']!r}; expected "
                "'MeanStdFilter' or 'NoFilter'.")
        require(config["return_proc_mode"] in RETURN_PROC_MODES,
                f"return_proc_mode={config['return_proc_mode']!r}; expected one of "
                f"{RETURN_PROC_MODES}.")
        require(config["num_evaluation_episodes"] > 0 or config["eval_prob"] > 0,
                "ES reports the return of unperturbed episodes: set "
                "num_evaluation_episodes > 0 or eval_prob > 0.")
        require(not config["multiagent"]["policies"],
                "ES runs single-agent envs only: remove multiagent.policies.")

    def __init__(self, config: dict | None = None, env: Any = None, **kwargs: Any):
        super().__init__(config, env, **kwargs)
        num_params = self.get_policy().num_params
        if self.config["noise_size"] < num_params:
            raise ValueError(f"noise_size={self.config['noise_size']} must be at least the "
                             f"policy's {num_params} parameters (use >= 1000x that).")
        self._es_workers: list = []
        self._local_mode = self.config["num_workers"] == 0
        self._noise: np.ndarray | None = None
        self._noise_ref = None
        self._eval_history: collections.deque = collections.deque(
            maxlen=self.config["report_length"])
        self._episodes_total = 0
        self._num_worker_restarts = 0
        self._index_of: dict = {}  # ES actor handle -> worker index (1..N)

    # -- ES actors ---------------------------------------------------------------------
    def _ensure_es_workers(self) -> None:
        """Creates the noise table (one ray.put) and the ES actors on first use, so an
        agent built only to act (rollout.py, from_checkpoint) costs neither."""
        if self._es_workers:
            return
        c = self.config
        noise = create_noise_table(c["noise_size"], c["noise_seed"])
        if self._local_mode:
            self._noise = noise
            self._es_workers = [ESWorker(self.env_creator, c, noise, 1, 0)]
            return
        import ray
        self._noise_ref = ray.put(noise)
        del noise
        self._noise = ray.get(self._noise_ref)  # zero-copy view: one copy in the node
        self._actor_cls = ray.remote(ESWorker).options(
            num_cpus=c["num_cpus_per_worker"], num_gpus=c["num_gpus_per_worker"])
        self._es_workers = [self._start_actor(i) for i in range(1, c["num_workers"] + 1)]
        # Surface env/policy construction errors now, with the actor's traceback.
        ray.get([w.ping.remote() for w in self._es_workers])

    def _start_actor(self, index: int):
        actor = self._actor_cls.remote(self.env_creator, self.config, [self._noise_ref],
                                       index, self.config["num_workers"])
        self._index_of[actor] = index
        return actor

    def _replace_actor(self, actor, error: Exception):
        """A replacement for a dead actor, or None (then the error is raised)."""
        c = self.config
        if not c["recreate_failed_workers"] or \
                self._num_worker_restarts >= c["max_worker_restarts"]:
            return None
        index = self._index_of.pop(actor)
        logger.warning("ES worker %d died (%s); starting a replacement.",
                       index, type(error).__name__)
        self._num_worker_restarts += 1
        new = self._start_actor(index)
        self._es_workers = [new if w is actor else w for w in self._es_workers]
        return new

    def es_workers(self) -> list:
        """The ES actors (or the one local ESWorker with ``num_workers: 0``)."""
        return list(self._es_workers)

    def _collect(self, params: dict) -> list[dict]:
        """Runs calls on the workers until the iteration's quotas are met.

        The quotas are split among the workers up front, one call each (every call
        runs many episodes, so there is one round trip per worker and iteration). A
        call always delivers at least its share, so more calls are made only when a
        worker died and its share is missing.
        """
        c = self.config
        want_eps, want_steps = c["episodes_per_batch"], c["train_batch_size"]
        results: list[dict] = []
        got_eps = got_steps = 0

        def add(result: dict) -> None:
            nonlocal got_eps, got_steps
            results.append(result)
            got_eps += result["lengths"].size
            got_steps += int(result["lengths"].sum())

        if self._local_mode:
            (worker,) = self._es_workers
            add(worker.do_rollouts(params, want_eps, want_steps,
                                   c["num_evaluation_episodes"]))
            return results

        import ray
        params_ref = ray.put(params)  # the one broadcast of this iteration
        workers = list(self._es_workers)
        n = len(workers)
        num_eval, rem = divmod(c["num_evaluation_episodes"], n)
        # ref -> (actor, promised episodes, promised steps)
        pending: dict = {}
        for i, w in enumerate(workers):
            eps, steps = math.ceil(want_eps / n), math.ceil(want_steps / n)
            pending[w.do_rollouts.remote(params_ref, eps, steps, num_eval + (i < rem))] = \
                (w, eps, steps)
        while pending:
            # Take every finished call at once; block on one only if none is ready.
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            if not ready:
                ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                actor, _, _ = pending.pop(ref)
                try:
                    add(ray.get(ref))
                    continue
                except ray.exceptions.RayActorError as error:
                    actor = self._replace_actor(actor, error)
                    if actor is None:
                        raise
                # A share went missing: give what is still uncovered to the new actor.
                missing_eps = want_eps - got_eps - sum(p[1] for p in pending.values())
                missing_steps = want_steps - got_steps - sum(p[2] for p in pending.values())
                if missing_eps > 0 or missing_steps > 0:
                    eps, steps = max(2, missing_eps), max(0, missing_steps)
                    pending[actor.do_rollouts.remote(params_ref, eps, steps, 0)] = \
                        (actor, eps, steps)
        return results

    # -- one iteration -----------------------------------------------------------------
    def training_step(self) -> dict:
        """Perturbed rollouts -> centered ranks -> Adam step -> filter sync -> report."""
        self._ensure_es_workers()
        c = self.config
        policy = self.get_policy()
        theta = policy.get_flat_weights()
        params = {"weights": theta, "filter": policy.filter.stats.to_dict()}
        with self.metrics.timer(SAMPLE_TIMER) as timer:
            results = self._collect(params)
        indices = np.concatenate([r["noise_indices"] for r in results])
        returns = np.concatenate([r["returns"] for r in results])
        lengths = np.concatenate([r["lengths"] for r in results])
        eval_returns = [x for r in results for x in r["eval_returns"]]
        eval_lengths = [x for r in results for x in r["eval_lengths"]]
        perturbed_steps = int(lengths.sum())
        steps = perturbed_steps + int(sum(eval_lengths))
        timer.push_units_processed(steps)

        with self.metrics.timer(LEARN_TIMER):
            grad = es_gradient(returns, self._noise, indices, policy.num_params,
                               c["return_proc_mode"])
            stats = policy.apply_es_gradient(grad, c["l2_coeff"])
            # Statistics gathered under the old filter feed the next iteration's one.
            for r in results:
                policy.filter.merge_buffer(r["filter_buffer"])

        self.metrics.inc(NUM_STEPS_SAMPLED, steps)
        self.metrics.inc(NUM_STEPS_TRAINED, perturbed_steps)
        episodes = lengths.size + len(eval_returns)
        self._episodes_total += episodes
        self._eval_history.append(list(zip(eval_returns, eval_lengths)))
        window = [e for it in self._eval_history for e in it]
        rets = np.array([r for r, _ in window], dtype=np.float64)
        lens = np.array([n for _, n in window], dtype=np.float64)
        nan = float("nan")
        return {
            "episode_reward_mean": float(rets.mean()) if rets.size else nan,
            "episode_reward_min": float(rets.min()) if rets.size else nan,
            "episode_reward_max": float(rets.max()) if rets.size else nan,
            "episode_len_mean": float(lens.mean()) if lens.size else nan,
            "episodes_this_iter": episodes,
            "episodes_total": self._episodes_total,
            "timesteps_this_iter": steps,
            "timesteps_total": self.metrics.get(NUM_STEPS_SAMPLED),
            "num_healthy_workers": len(self._es_workers),
            "info": {
                **self.metrics.counters_snapshot(),
                **stats,
                "num_pairs": int(len(indices)),
                "episodes_so_far": self._episodes_total,
                "eval_episodes_this_iter": len(eval_returns),
                "perturbed_reward_mean": float(returns.mean()),
                "perturbed_reward_max": float(returns.max()),
                "perturbed_len_mean": float(lengths.mean()),
                "num_worker_restarts": self._num_worker_restarts,
            },
            "timers": self.metrics.timers_snapshot(),
        }

    # -- checkpoints and lifecycle -----------------------------------------------------
    def _reporting_state(self, save: bool = False, restore: dict | None = None) -> dict:
        # Saved in the manifest (JSON): the report window and the episode count.
        if restore is not None:
            self._episodes_total = int(restore.get("episodes_total", 0))
            self._eval_history.clear()
            for it in restore.get("eval_history", []):
                self._eval_history.append([(float(r), int(n)) for r, n in it])
            return {}
        return {"episodes_total": self._episodes_total,
                "eval_history": [[[r, n] for r, n in it] for it in self._eval_history]}

    def stop(self) -> None:
        """Kills the ES actors, then stops what the Agent owns."""
        workers, self._es_workers = self._es_workers, []
        if self._local_mode:
            for w in workers:
                w.stop()
        elif workers:
            import ray
            for w in workers:
                ray.kill(w)
        self._noise = None
        self._noise_ref = None
        super().stop()
