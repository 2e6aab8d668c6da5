"""Data that travels between operators: batches (SampleBatch, MultiAgentBatch) and the
typed items operators hand each other (flowrl.data.items)."""

from flowrl.data.sample_batch import DEFAULT_POLICY_ID, MultiAgentBatch, SampleBatch

__all__ = ["DEFAULT_POLICY_ID", "MultiAgentBatch", "SampleBatch"]
