"""Kept so that ``from flowrl.sample_batch import SampleBatch`` of earlier releases works;
the module is :mod:`flowrl.data.sample_batch`."""

from flowrl.data.sample_batch import DEFAULT_POLICY_ID, MultiAgentBatch, SampleBatch

__all__ = ["DEFAULT_POLICY_ID", "MultiAgentBatch", "SampleBatch"]
