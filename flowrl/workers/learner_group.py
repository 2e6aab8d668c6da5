"""Data-parallel learners: ``num_learners`` Ray actors that train copies of the policies.

    config = {"num_learners": 2}                   # two CPU learners (gloo)
    config = {"num_learners": 2, "num_gpus": 2}    # one learner per GPU (NCCL)

Plans do not change. The local RolloutWorker (worker 0) starts a :class:`LearnerGroup`
on its first ``learn_on_batch`` and hands every train batch to it; afterwards the local
worker holds learner 0's weights, so ``BroadcastWeights`` / ``sync_weights`` send them
to the rollout workers as before. ``num_learners: 0`` (the default) keeps learning in
the driver; ``num_learners: 1`` moves it into one learner actor (its own process and
GPU, no all-reduce); ``N > 1`` trains data-parallel.

One update with N learners:

1. The driver cuts each policy's train batch into N contiguous shards of about equal
   size: rows for feed-forward policies, whole sequences for recurrent ones, whole
   pieces (one-episode runs) for V-trace policies (IMPALA, APPO).
2. Every learner runs the policy's own SGD loop (``Policy.learn_on_batch``) on its shard,
   with a minibatch size chosen so that all learners take the same number of steps per
   epoch (the number the whole batch would take, or the nearest smaller one that every
   shard can reach); each shuffles its own shard with its own seeded generator.
3. After each backward pass the gradients are all-reduced (summed, divided by N, each
   learner's scaled by its share of the rows so that unequal shards weigh as in the
   whole batch), then clipped and applied: every learner takes the same step, so the
   weights stay identical, and with one step per epoch it is the step a single learner
   takes on the whole batch (up to float rounding).
4. Stats come back in the single-learner form: floats averaged over the learners
   (weighted by rows), per-row stats (``td_error``) concatenated in batch order.

Why a gradient hook and not ``DistributedDataParallel``: DDP reduces gradients that
``backward()`` accumulates through a wrapped module's ``forward``. flowrl's losses call
submodules directly (DDPG's actor and critic, target nets, the recurrent layout),
DDPG / SAC compute actor gradients with ``torch.autograd.grad`` (DDP never sees those),
one SGD step may run several optimizers over different parameters, and the clip must
see the averaged gradient. The hook covers all of these with one flat all-reduce per
step (small RL nets gain nothing from DDP's bucketed overlap):

* ``Policy.gradient_hook``: the base SGD step calls it between backward and the norm /
  clip, so the clip sees the average (PG, A2C, PPO, DQN, IMPALA, APPO);
* an optimizer step pre-hook (registered in the learner process only) averages what is
  still local right before any optimizer steps: DDPG's / SAC's optimizers, which clip in
  their own code. There the clip acts on each learner's gradient before the average.

What the driver changes on the local worker's policies reaches the learners: global
vars (timestep: lr / entropy schedules) with each call; functions run through
``foreach_policy`` (target-network updates, new hyperparameters) on every learner; plain
values of the policy state that the driver changed (PPO's ``kl_coeff`` after
``UpdateKL``) before the next call; ``set_state`` / ``set_weights`` on all of them.
Checkpoints (``get_state``) hold learner 0's state, optimizer included.

Limits: a recurrent or V-trace policy learns with one SGD step per epoch
(``sgd_minibatch_size`` 0 or the whole batch), since its minibatch count would differ
between learners; a learner that dies ends the run (no restarts); with Ray's local mode
the learners cannot form a process group.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from flowrl.data.sample_batch import SampleBatch, minibatch_bounds
from flowrl.data.sequences import sequence_lengths
from flowrl.policies.filters import RunningStat
from flowrl.policies.impala import VTraceTorchPolicy, split_pieces
from flowrl.policies.policy import Policy
from flowrl.workers.actor_start import free_resources, wait_until_started

__all__ = ["LearnerGroup", "Learner", "GradientAverager", "PolicySpec", "DriverState",
           "ShardPlan", "plan_shards", "merge_learner_stats", "check_learner_resources",
           "learner_gpus"]

#: A collective that waits longer than this fails instead of hanging (e.g. a learner
#: died mid-update).
COLLECTIVE_TIMEOUT_S = 600.0
#: Learner ``r`` seeds its policies with ``seed + LEARNER_SEED_STRIDE * (r + 1)``: its own
#: shuffles and noise, apart from the rollout workers' ``seed + 1000 * index``.
LEARNER_SEED_STRIDE = 100_003


class PolicySpec(NamedTuple):
    """What a learner needs to build its copy of one policy."""

    policy_class: type
    observation_space: Any
    action_space: Any
    config: dict


class DriverState(NamedTuple):
    """What the driver changed on its policies since the learners last heard from it.

    ``global_vars``: the latest ``{"timestep": ...}``. ``changes``: per policy id, plain
    values of ``Policy.get_state()`` (``kl_coeff``, ...) the driver set.
    """

    global_vars: dict
    changes: dict[str, dict[str, Any]]


class ShardPlan(NamedTuple):
    """How one policy's train batch is split over the learners (one entry per learner)."""

    bounds: list[tuple[int, int]]   # [start, end) rows of each shard
    minibatch_sizes: list[int]      # sgd_minibatch_size each learner uses (0: one step)
    scales: list[float]             # gradient weight: rows share x number of learners

    @property
    def rows(self) -> list[int]:
        return [end - start for start, end in self.bounds]


def learner_gpus(config: dict) -> float:
    """GPUs of one learner actor: 1 when ``num_gpus`` is set (then it equals
    ``num_learners``, see the config checks), else 0."""
    return 1.0 if config.get("num_gpus", 0) > 0 else 0.0


def check_learner_resources(config: dict) -> None:
    """Raises ``ValueError`` when the GPU learners asked for cannot exist: more GPUs than
    the Ray cluster (or, without Ray running yet, this machine) has."""
    gpus = float(config.get("num_gpus", 0))
    if config.get("num_learners", 0) <= 0 or gpus <= 0:
        return
    import ray
    if ray.is_initialized():
        have, where = ray.cluster_resources().get("GPU", 0.0), "the Ray cluster"
    else:
        have, where = float(torch.cuda.device_count()), "this machine"
    if have < gpus:
        raise ValueError(
            f"num_learners={config['num_learners']} with num_gpus={gpus:g} needs {gpus:g} "
            f"GPUs (one per learner), but {where} has {have:g}. Set num_gpus: 0 to train "
            "the learners on CPUs (gloo), or run where the GPUs are.")


# ------------------------------------------------------------------ sharding
def _cut_positions(policy: Policy, batch: SampleBatch) -> np.ndarray | None:
    """Rows where a shard may start (sorted, with 0), or None when any row may."""
    if isinstance(policy, VTraceTorchPolicy):
        # V-trace runs over whole pieces; a recurrent model's sequences lie within them.
        starts, _ = split_pieces(batch)
        return starts
    if policy.recurrent:
        lengths = sequence_lengths(batch, policy.max_seq_len)
        return np.cumsum(lengths) - lengths
    return None


def _balanced_bounds(count: int, num_shards: int, cuts: np.ndarray | None,
                     unit: str) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` shards of about ``count / num_shards`` rows each,
    starting only at ``cuts`` (None: anywhere); every shard gets at least one unit."""
    if cuts is None:
        if count < num_shards:
            raise ValueError(f"a train batch of {count} rows cannot feed {num_shards} "
                             "learners; raise the batch size or lower num_learners")
        starts = [i * count // num_shards for i in range(num_shards)]
    else:
        if len(cuts) < num_shards:
            raise ValueError(f"a train batch of {len(cuts)} {unit} ({count} rows) cannot "
                             f"feed {num_shards} learners whole {unit}; raise the batch "
                             "size or lower num_learners")
        chosen, previous = [0], 0
        for i in range(1, num_shards):
            target = i * count / num_shards
            k = int(np.searchsorted(cuts, target))
            if k > 0 and (k == len(cuts) or target - cuts[k - 1] <= cuts[k] - target):
                k -= 1
            # Strictly after the previous shard's start, with a unit left for each later one.
            k = min(max(k, previous + 1), len(cuts) - (num_shards - i))
            chosen.append(k)
            previous = k
        starts = [int(cuts[k]) for k in chosen]
    ends = starts[1:] + [count]
    return list(zip(starts, ends))


def _steps_per_epoch(policy: Policy, count: int, sgd_minibatch_size: int) -> int:
    """SGD steps per epoch that ``policy`` takes on ``count`` rows with one learner."""
    if sgd_minibatch_size <= 0 or sgd_minibatch_size >= count:
        return 1
    if policy.recurrent or type(policy).learn_on_batch is not Policy.learn_on_batch:
        raise ValueError(
            f"{type(policy).__name__} with num_learners > 1 learns with one SGD step per "
            f"epoch: its minibatches of whole sequences / pieces would differ in number "
            f"between learners. Set sgd_minibatch_size: 0 (got {sgd_minibatch_size} for "
            f"a batch of {count} rows).")
    return len(minibatch_bounds(count, sgd_minibatch_size))


def _size_for_steps(rows: int, steps: int, guess: float) -> int | None:
    """A minibatch size that splits ``rows`` into exactly ``steps`` minibatches
    (:func:`minibatch_bounds`), nearest to ``guess``; None when there is none."""
    if steps == 1:
        return 0
    if rows < steps:
        return None
    # Size s gives ceil(rows / s) or one fewer minibatches: only this range can work.
    low = max(1, rows // (steps + 1))
    high = min(rows, rows // (steps - 1) + 1)
    for size in sorted(range(low, high + 1), key=lambda s: (abs(s - guess), s)):
        if len(minibatch_bounds(rows, size)) == steps:
            return size
    return None


def plan_shards(policy: Policy, batch: SampleBatch, num_shards: int,
                sgd_minibatch_size: int) -> ShardPlan:
    """How to split ``batch`` (one policy's train batch) over ``num_shards`` learners.

    Every learner takes the same number of SGD steps per epoch (else the all-reduce
    would wait forever): the number one learner takes on the whole batch when every
    shard can reach it, else the nearest smaller one that all can.
    """
    count = batch.count
    unit = "pieces" if isinstance(policy, VTraceTorchPolicy) else "sequences"
    bounds = _balanced_bounds(count, num_shards, _cut_positions(policy, batch), unit)
    rows = [end - start for start, end in bounds]
    steps = _steps_per_epoch(policy, count, sgd_minibatch_size)
    while True:
        sizes = [_size_for_steps(n, steps, sgd_minibatch_size * n / count) for n in rows]
        if all(size is not None for size in sizes):
            break
        steps -= 1  # steps == 1 always fits (size 0)
    scales = [n * num_shards / count for n in rows]
    return ShardPlan(bounds, [int(size) for size in sizes], scales)


def merge_learner_stats(stats: list[dict[str, Any]], rows: list[int],
                        per_row_stats: tuple[str, ...]) -> dict[str, Any]:
    """One learner-stats dict from each learner's: per-row arrays concatenated in shard
    (= batch) order, floats averaged weighted by rows, anything else (equal on all
    learners: counters, lrs) from learner 0."""
    total = float(sum(rows))
    merged: dict[str, Any] = {}
    for key, first in stats[0].items():
        values = [s[key] for s in stats]
        if key in per_row_stats:
            merged[key] = np.concatenate(values)
        elif isinstance(first, float) and any(v != first for v in values):
            merged[key] = float(sum(v * n for v, n in zip(values, rows)) / total)
        else:
            merged[key] = first
    return merged


# ------------------------------------------------------------------ learner side
class GradientAverager:
    """Averages gradients over the learners' process group, once per SGD step.

    Every learner calls it in the same order (it runs collectives): through
    ``Policy.gradient_hook`` (before the clip) and through :meth:`before_step`, an
    optimizer step pre-hook that averages the parameters the hook did not cover.
    A gradient missing on some learners counts as zero there; one missing on all stays
    None (so the optimizer skips the parameter, as it would alone).
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        #: This learner's rows share times the world size (1.0 for equal shards).
        self.scale = 1.0
        self._averaged: set[int] = set()

    def average(self, params: list[torch.Tensor]) -> None:
        """Replaces the ``.grad`` of ``params`` with the learners' weighted mean."""
        if not params:
            return
        grads = [p.grad for p in params]
        flat_parts = [(torch.zeros_like(p) if g is None else g).detach().reshape(-1).float()
                      for p, g in zip(params, grads)]
        # One more entry per parameter: how many learners had a gradient for it.
        present = torch.tensor([g is not None for g in grads], dtype=torch.float32,
                               device=params[0].device)
        flat = torch.cat([*flat_parts, present])
        size = flat.numel() - len(params)
        if self.scale != 1.0:
            flat[:size].mul_(self.scale)
        dist.all_reduce(flat)
        flat[:size].div_(self.world_size)
        # Reading the counts syncs the device: only needed where a gradient is missing here.
        counts = flat[size:].tolist() if any(g is None for g in grads) else None
        offset = 0
        for index, (param, grad) in enumerate(zip(params, grads)):
            value = flat[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
            if grad is not None:
                grad.copy_(value)
            elif counts[index] > 0:
                param.grad = value.to(param.dtype).clone()
        self._averaged.update(id(p) for p in params)

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: averages the optimizer's gradients that are still
        local (DDPG, SAC and other policies that clip in their own code)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        pending = [p for p in params if id(p) not in self._averaged]
        if pending:
            self.average(pending)
        self._averaged.difference_update(id(p) for p in params)


class Learner:
    """One learner process: copies of the trained policies, one rank of the group.

    Built by :class:`LearnerGroup` as a Ray actor; usable in-process for tests.
    """

    def __init__(self, specs: dict[str, PolicySpec], rank: int, world_size: int,
                 num_gpus: float = 0.0, num_threads: int = 1) -> None:
        # The CPUs reserved for this actor; oversubscribed cores slow small nets down.
        torch.set_num_threads(max(1, int(num_threads)))
        self.rank = rank
        self.world_size = world_size
        self.policies: dict[str, Policy] = {}
        for pid, spec in specs.items():
            config = {**spec.config, "num_gpus": num_gpus}
            if config.get("seed") is not None:
                config["seed"] = int(config["seed"]) + LEARNER_SEED_STRIDE * (rank + 1)
            self.policies[pid] = spec.policy_class(spec.observation_space,
                                                   spec.action_space, config)
        self.averager: GradientAverager | None = None
        self._step_hook = None
        if num_gpus > 0 and any(p.device.type != "cuda" for p in self.policies.values()):
            raise RuntimeError(f"learner {rank} was given a GPU, but torch sees no CUDA "
                               "device in its process")

    def ping(self) -> str:
        return "ok"

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port for the process group (learner 0 hosts it)."""
        import ray
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int, backend: str,
             timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
        """Joins the process group and installs the gradient averaging."""
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.averager = GradientAverager(self.world_size)
        for policy in self.policies.values():
            policy.gradient_hook = self.averager.average
        # Process-wide, which is right here: this process only steps these policies.
        self._step_hook = register_optimizer_step_pre_hook(self.averager.before_step)

    def _apply_driver_state(self, state: DriverState) -> None:
        if state.global_vars:
            for policy in self.policies.values():
                policy.on_global_var_update(state.global_vars)
        for pid, changes in state.changes.items():
            policy = self.policies[pid]
            current = policy.get_state()
            if any(current.get(key) != value for key, value in changes.items()):
                policy.set_state({**current, **changes})

    def learn(self, batches: dict[str, SampleBatch], num_sgd_iter: int,
              minibatch_sizes: dict[str, int], scales: dict[str, float],
              obs_stats: dict[str, RunningStat], state: DriverState
              ) -> tuple[dict[str, dict], dict[str, dict] | None]:
        """Trains each policy on its shard; returns ``(stats, weights)``, the weights of
        the trained policies from learner 0 only (None on the others)."""
        self._apply_driver_state(state)
        stats = {}
        for pid, batch in batches.items():
            policy = self.policies[pid]
            if self.averager is not None:
                self.averager.scale = scales[pid]
            # The filter takes the whole batch's statistics (as one learner would), not
            # this shard's: saved here, then merged below.
            saved = policy.obs_filter.get_weights() if policy.obs_filter is not None else None
            stats[pid] = policy.learn_on_batch(batch, num_sgd_iter, minibatch_sizes[pid])
            if saved is not None:
                policy.obs_filter.set_weights(saved)
                policy.merge_observation_stats(obs_stats.get(pid))
        return stats, (self.get_weights(list(batches)) if self.rank == 0 else None)

    def apply_gradients(self, grads: dict[str, list[np.ndarray]],
                        obs_stats: dict[str, RunningStat], state: DriverState
                        ) -> dict[str, dict] | None:
        """Every learner applies the same gradients (A3C, A2C microbatches)."""
        self._apply_driver_state(state)
        if self.averager is not None:
            self.averager.scale = 1.0
        for pid, policy_grads in grads.items():
            self.policies[pid].apply_gradients(policy_grads, obs_stats.get(pid))
        return self.get_weights(list(grads)) if self.rank == 0 else None

    def get_weights(self, policy_ids: list[str] | None = None) -> dict[str, dict]:
        ids = list(self.policies) if policy_ids is None else policy_ids
        return {pid: self.policies[pid].get_weights() for pid in ids}

    def set_weights(self, weights: dict[str, dict]) -> None:
        for pid, w in weights.items():
            if pid in self.policies:
                self.policies[pid].set_weights(w)

    def update(self, state: DriverState) -> None:
        """Takes what the driver changed (see :class:`DriverState`)."""
        self._apply_driver_state(state)

    def get_state(self, state: DriverState) -> dict[str, dict]:
        """The policies' states after taking ``state``."""
        self._apply_driver_state(state)
        return {pid: p.get_state() for pid, p in self.policies.items()}

    def set_state(self, states: dict[str, dict]) -> None:
        for pid, s in states.items():
            if pid in self.policies:
                self.policies[pid].set_state(s)

    def foreach_policy(self, fn: Callable[[Any, str], Any]) -> None:
        """Runs ``fn(policy, policy_id)`` on each policy; results stay here."""
        for pid, policy in self.policies.items():
            fn(policy, pid)

    def stop(self) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if dist.is_initialized():
            dist.destroy_process_group()


class LearnerGroup:
    """``num_learners`` :class:`Learner` actors behind the local learner's interface.

    ``policies``: the local worker's trained policies (the group copies their classes,
    spaces, configs and states; they stay the driver's copies). ``config``: the
    algorithm config (``num_learners``, ``num_gpus``, ``num_cpus_per_learner``).
    Starts Ray when it is not running. Not thread-safe: the local worker serializes
    calls.
    """

    def __init__(self, policies: dict[str, Policy], config: dict,
                 states: dict[str, dict] | None = None) -> None:
        import ray
        if not ray.is_initialized():
            ray.init(include_dashboard=False, ignore_reinit_error=True)
        check_learner_resources(config)
        self.num_learners = int(config["num_learners"])
        if self.num_learners < 1:
            raise ValueError(f"num_learners={self.num_learners}: a LearnerGroup needs >= 1")
        self.policies = dict(policies)
        gpus = learner_gpus(config)
        cpus = config.get("num_cpus_per_learner", 1)
        specs = {pid: PolicySpec(type(p), p.observation_space, p.action_space, p.config)
                 for pid, p in self.policies.items()}
        actor_cls = ray.remote(Learner).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
        free_before = free_resources()
        self._learners = [actor_cls.remote(specs, rank, self.num_learners, gpus,
                                           max(1, int(cpus)))
                          for rank in range(self.num_learners)]
        try:
            wait_until_started(self._learners, "learners", {"CPU": cpus, "GPU": gpus},
                               free_before,
                               remedy="lower num_learners / num_cpus_per_learner")
            if self.num_learners > 1:
                host, port = ray.get(self._learners[0].rendezvous_address.remote())
                backend = "nccl" if gpus > 0 else "gloo"
                ray.get([learner.join.remote(host, port, backend)
                         for learner in self._learners])
            if states is None:
                states = {pid: p.get_state() for pid, p in self.policies.items()}
            self.set_state(states)
        except BaseException:
            self.stop()
            raise

    def learn_on_batch(self, batches: dict[str, SampleBatch], num_sgd_iter: int,
                       sgd_minibatch_size: int, obs_stats: dict[str, RunningStat],
                       state: DriverState) -> tuple[dict[str, dict], dict[str, dict]]:
        """Trains on ``{policy_id: batch}``; returns ``(stats per policy, learner 0's
        weights per policy)``."""
        import ray
        plans = {pid: plan_shards(self.policies[pid], batch, self.num_learners,
                                  int(sgd_minibatch_size))
                 for pid, batch in batches.items()}
        calls = []
        for rank, learner in enumerate(self._learners):
            shards = {pid: batch.slice(*plans[pid].bounds[rank])
                      for pid, batch in batches.items()}
            calls.append(learner.learn.remote(
                shards, num_sgd_iter,
                {pid: plan.minibatch_sizes[rank] for pid, plan in plans.items()},
                {pid: plan.scales[rank] for pid, plan in plans.items()},
                obs_stats, state))
        results = ray.get(calls)
        stats = {pid: merge_learner_stats([r[0][pid] for r in results], plans[pid].rows,
                                          self.policies[pid].per_row_stats)
                 for pid in batches}
        return stats, results[0][1]

    def apply_gradients(self, grads: dict[str, list[np.ndarray]],
                        obs_stats: dict[str, RunningStat], state: DriverState
                        ) -> dict[str, dict]:
        """Applies the same gradients on every learner; returns learner 0's weights."""
        import ray
        results = ray.get([learner.apply_gradients.remote(grads, obs_stats, state)
                           for learner in self._learners])
        return results[0]

    def get_state(self, state: DriverState) -> dict[str, dict]:
        """Learner 0's policy states (weights, optimizers, counters) after ``state``
        reached every learner."""
        import ray
        first, *others = self._learners
        results = ray.get([first.get_state.remote(state),
                           *[learner.update.remote(state) for learner in others]])
        return results[0]

    def set_state(self, states: dict[str, dict]) -> None:
        import ray
        ref = ray.put(states)
        ray.get([learner.set_state.remote(ref) for learner in self._learners])

    def set_weights(self, weights: dict[str, dict]) -> None:
        import ray
        ref = ray.put(weights)
        ray.get([learner.set_weights.remote(ref) for learner in self._learners])

    def foreach_policy(self, fn: Callable[[Any, str], Any]) -> None:
        import ray
        ray.get([learner.foreach_policy.remote(fn) for learner in self._learners])

    def learner_weights(self) -> list[dict[str, dict]]:
        """Every learner's weights, by rank (for checks: they should be equal)."""
        import ray
        return ray.get([learner.get_weights.remote() for learner in self._learners])

    def stop(self) -> None:
        """Kills the learner actors (their process group goes with them)."""
        import ray
        for learner in self._learners:
            ray.kill(learner)
        self._learners = []

    def __repr__(self) -> str:
        return f"LearnerGroup(num_learners={self.num_learners})"
