"""Serving trained checkpoints: a checkpoint's policy behind a PolicyServer, inference only.

    from flowrl.serving import serve_checkpoint
    server = serve_checkpoint("~/ray_results/PPO_.../checkpoint_000010", port=9900)

The env side of serving (ExternalEnv, PolicyServer, PolicyClient, the wire format) is
:mod:`flowrl.envs.serving`; this layer sits above the algorithms because it rebuilds an
algorithm's policy from a checkpoint.
"""

from flowrl.serving.inference import InferenceServer, load_policy, serve_checkpoint

__all__ = ["InferenceServer", "load_policy", "serve_checkpoint"]
