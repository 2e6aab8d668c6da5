"""IMPALA (Espeholt et al. 2018): asynchronous actors, a learner thread, V-trace.

    (1) rollouts(async, max_sample_requests_in_flight_per_worker, with source)
            -> UpdateWorkerWeights(source worker, every broadcast_interval learner updates)
            -> MixInReplay -> ConcatBatches(train_batch_size) -> Enqueue(learner.inqueue)
    (2) Dequeue(learner.outqueue) -> CountTrainedSteps
    Concurrently([1, 2], async, output_indexes=[1] (0-based: results of 2)) -> report
        (+ learner queue stats)
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import require, with_common_config
from flowrl.flow import Metrics, Plan
from flowrl.ops import (ConcatBatches, Concurrently, CountTrainedSteps, Dequeue, Enqueue,
                        LearnerThread, MixInReplay, ParallelRollouts,
                        StandardMetricsReporting, UpdateWorkerWeights)
from flowrl.policies.impala import VTraceTorchPolicy
from flowrl.workers.worker_set import WorkerSet

DEFAULT_CONFIG: dict = with_common_config({
    "num_workers": 2,
    "num_envs_per_worker": 4,
    "rollout_fragment_length": 50,
    "train_batch_size": 500,
    "max_sample_requests_in_flight_per_worker": 2,
    "broadcast_interval": 1,          # learner updates between weight syncs to a worker
    "learner_queue_size": 16,
    "learner_stall_warning_s": 60.0,  # warn when queued work sees no update this long
    "replay_proportion": 0.0,         # replayed batches mixed in per new batch
    "replay_buffer_num_slots": 0,
    "lr": 5e-4,
    "gamma": 0.99,
    # Divide rewards by the running std of the discounted return (per sampling worker);
    # for tasks whose rewards are far from unit scale. Metrics report raw rewards.
    "normalize_rewards": False,
    "vf_loss_coeff": 0.5,
    "entropy_coeff": 0.01,
    "grad_clip": 40.0,
    "vtrace_clip_rho_threshold": 1.0,
    "vtrace_clip_pg_rho_threshold": 1.0,
    "vtrace_clip_c_threshold": 1.0,
    "vtrace_lambda": 1.0,
    "opt_type": "adam",               # or "rmsprop" (with decay, momentum, epsilon)
    "decay": 0.99,
    "momentum": 0.0,
    "epsilon": 0.1,
    "min_iter_time_s": 1,
})


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    learner = LearnerThread(workers.local_worker(), metrics, config["learner_queue_size"],
                            config["learner_stall_warning_s"])
    learner.start()
    # (1) sample asynchronously, refresh the sender's weights, batch, hand to the learner
    enqueue_op = (ParallelRollouts(workers, metrics, mode="async", with_source=True,
                                   num_async=config["max_sample_requests_in_flight_per_worker"])
                  .for_each(UpdateWorkerWeights(learner, workers, metrics, 0,
                                                min_learner_updates=config["broadcast_interval"]))
                  .for_each(lambda sourced: sourced.item, name="DropSource")
                  .combine(MixInReplay(config["replay_buffer_num_slots"],
                                       config["replay_proportion"], seed=config["seed"]))
                  .combine(ConcatBatches(config["train_batch_size"], metrics))
                  .for_each(Enqueue(learner.inqueue)))
    # (2) learner results
    dequeue_op = (Dequeue(learner.outqueue, learner.check_alive, metrics)
                  .for_each(CountTrainedSteps(metrics)))
    merged = Concurrently([enqueue_op, dequeue_op], mode="async", output_indexes=[1])
    plan = StandardMetricsReporting(merged, workers, config, metrics, extra_stats=lambda: {
        "learner_queue": {"size": learner.inqueue.qsize(),
                          "capacity": learner.inqueue.maxsize}})
    return plan.owning(learner)


class ImpalaAgent(Agent):
    """IMPALA; see the module docstring for the plan."""

    _name = "IMPALA"
    _default_config = DEFAULT_CONFIG
    _policy_class = VTraceTorchPolicy
    execution_plan = staticmethod(execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        require(config["num_workers"] >= 1,
                f"num_workers={config['num_workers']!r}: IMPALA needs remote workers (>= 1).")
        require(config["max_sample_requests_in_flight_per_worker"] >= 1,
                "max_sample_requests_in_flight_per_worker="
                f"{config['max_sample_requests_in_flight_per_worker']!r} must be >= 1.")
        require(config["opt_type"] in ("adam", "rmsprop"),
                f"opt_type={config['opt_type']!r}; expected 'adam' or 'rmsprop'.")
