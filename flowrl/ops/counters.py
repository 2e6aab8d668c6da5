"""Names of the counters, timers and info keys that operators share through Metrics."""

NUM_STEPS_SAMPLED = "num_steps_sampled"
NUM_STEPS_TRAINED = "num_steps_trained"
NUM_WEIGHT_BROADCASTS = "num_weight_broadcasts"
NUM_TARGET_UPDATES = "num_target_updates"
LAST_TARGET_UPDATE_TS = "last_target_update_ts"
NUM_WORKER_RESTARTS = "num_worker_restarts"
NUM_STEPS_REPLAYED = "num_steps_replayed"
NUM_PRIORITY_UPDATES = "num_priority_updates"
NUM_WEIGHT_SYNCS = "num_weight_syncs"          # per-worker weight updates (Ape-X, IMPALA)
LEARNER_QUEUE_SIZE = "learner_queue_size"      # latest length of the learner's in-queue

SAMPLE_TIMER = "sample"
LEARN_TIMER = "learn"
GRAD_TIMER = "grad"
APPLY_GRADS_TIMER = "apply_grad"
WEIGHT_SYNC_TIMER = "synch_weights"

LEARNER_INFO = "learner"
