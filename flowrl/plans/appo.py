"""APPO: IMPALA's asynchronous plan; the loss is PPO's clip against a target network.

    (1) rollouts(async, with source) -> UpdateWorkerWeights -> MixInReplay
            -> ConcatBatches(train_batch_size) -> Enqueue(learner.inqueue)     (as IMPALA)
    (2) Dequeue(learner.outqueue) -> CountTrainedSteps -> UpdateTargetNetwork(every
            target_update_frequency trained steps: num_target_updates, last_target_update_ts)
            -> UpdateKL (moves kl_coeff only with use_kl_loss)
    Concurrently([1, 2], async, output_indexes=[1]) -> report (+ learner queue stats)
"""
from flowrl.algorithms.config import require
from flowrl.flow import Metrics, Plan
from flowrl.ops import (ConcatBatches, Concurrently, CountTrainedSteps, Dequeue, Enqueue,
                        LearnerThread, MixInReplay, ParallelRollouts, StandardMetricsReporting,
                        UpdateTargetNetwork, UpdateWorkerWeights)
from flowrl.plans.impala import DEFAULT_CONFIG as IMPALA_CONFIG, ImpalaAgent
from flowrl.plans.ppo import UpdateKL
from flowrl.policies.appo import APPOTorchPolicy
from flowrl.workers.worker_set import WorkerSet

DEFAULT_CONFIG: dict = {**IMPALA_CONFIG, "lr": 1e-3, "clip_param": 0.4, "use_kl_loss": False,
                        "kl_coeff": 1.0, "kl_target": 0.01, "target_update_frequency": 1000}


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
                  .combine(MixInReplay(config["replay_buffer_num_slots"], config["replay_proportion"],
                                       seed=config["seed"]))
                  .combine(ConcatBatches(config["train_batch_size"], metrics))
                  .for_each(Enqueue(learner.inqueue)))
    # (2) learner results; pi_target (and kl_coeff with use_kl_loss) move between updates
    dequeue_op = (Dequeue(learner.outqueue, learner.check_alive, metrics)
                  .for_each(CountTrainedSteps(metrics))
                  .for_each(UpdateTargetNetwork(workers, metrics, config["target_update_frequency"],
                                                by_steps_trained=True))
                  .for_each(UpdateKL(workers)))
    merged = Concurrently([enqueue_op, dequeue_op], mode="async", output_indexes=[1])
    plan = StandardMetricsReporting(merged, workers, config, metrics, extra_stats=lambda: {
        "learner_queue": {"size": learner.inqueue.qsize(), "capacity": learner.inqueue.maxsize}})
    return plan.owning(learner)


class APPOAgent(ImpalaAgent):
    """APPO; the plan above, the loss in flowrl.policies.appo. IMPALA's config checks."""

    _name, _default_config, _policy_class = "APPO", DEFAULT_CONFIG, APPOTorchPolicy
    execution_plan = staticmethod(execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        super().validate_config(config)
        require(config["clip_param"] > 0, f"clip_param={config['clip_param']!r} must be > 0.")
