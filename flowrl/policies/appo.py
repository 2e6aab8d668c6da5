"""APPO: PPO's clipped surrogate on IMPALA's V-trace learner, with a target network.

Three policies meet in one train batch: the behaviour policy ``mu`` that the
rollout workers acted with (its ``action_logp`` column), the learner's current
policy ``pi`` (being trained), and ``pi_target``, a frozen copy of the learner's
network that :meth:`APPOTorchPolicy.update_target` refreshes (the plan calls it
every ``target_update_frequency`` trained steps). ``pi_target`` plays PPO's "old
policy": it stays put over several asynchronous learner updates, so the clipped
ratio ``pi / pi_target`` bounds how far those updates move the policy, however
stale the behaviour data is.

For every piece of the batch (see :mod:`flowrl.policies.impala`), V-trace runs with
``pi_target`` as its target policy and the CURRENT network's values (bootstrapped
from ``V(new_obs[-1])`` as IMPALA does)::

    w_t     = pi_target(a_t|x_t) / mu(a_t|x_t)
    vs_t, A_t = vtrace(rho = min(rho_bar, w), c = lambda min(c_bar, w), V)
    # so A_t = min(rho_pg_bar, w_t) * (r_t + gamma_t vs_{t+1} - V(x_t)):
    # the advantage is importance-weighted by pi_target / mu, clipped as in V-trace

and the loss per train batch (means over its rows) is::

    r_t         = pi(a_t|x_t) / pi_target(a_t|x_t)
    policy_loss = -mean(min(r_t A_t, clip(r_t, 1 - clip_param, 1 + clip_param) A_t))
    vf_loss     = 0.5 * mean((vs_t - V(x_t))^2)
    kl          = mean(KL(pi_target(.|x_t) || pi(.|x_t)))
    total       = policy_loss + vf_loss_coeff * vf_loss - entropy_coeff * mean(entropy)
                  [+ kl_coeff * kl   with use_kl_loss]

``A_t`` and ``vs_t`` are targets (no gradient); ``entropy_coeff`` follows
``entropy_coeff_schedule`` where one is set. With ``use_kl_loss`` the plan adapts
``kl_coeff`` toward ``kl_target`` after every learner update as PPO does
(x1.5 above ``2 kl_target``, x0.5 below ``kl_target / 2``).

The learner makes one SGD step per train batch, as IMPALA's learner thread does, so
right after a target update ``r_t = 1`` and the step equals IMPALA's; the clip acts
on the updates that follow, until the next target update.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.data.sample_batch import SampleBatch
from flowrl.policies.impala import (_MASK, _PIECE_BOOT_OBS, _PIECE_BOOT_VALUE,
                                    _PIECE_TERMINATED, _ROW_INDEX, VTraceTorchPolicy, vtrace)
from flowrl.policies.nested import cat_rows, num_rows
from flowrl.policies.policy import TensorDict
from flowrl.policies.ppo import ppo_surrogate_loss

__all__ = ["APPOTorchPolicy"]


class APPOTorchPolicy(VTraceTorchPolicy):
    """The APPO policy: V-trace against a target network, PPO's clip on ``pi / pi_target``.

    Reads IMPALA's keys (see :class:`~flowrl.policies.impala.VTraceTorchPolicy`) plus
    ``clip_param`` (0.4), ``use_kl_loss`` (False), ``kl_coeff`` (1.0, initial),
    ``kl_target`` (0.01). Feed-forward models only: ``model.use_lstm`` is a
    ValueError (use IMPALA for recurrent models).

    The target network lives only in this policy (workers never need it); it is
    part of :meth:`get_state`, together with the current ``kl_coeff``. The plan's
    driver thread calls :meth:`update_target` while the learner thread runs
    :meth:`learn_on_batch`; a lock keeps the copy (and :meth:`get_state` /
    :meth:`set_state`) from seeing a half-applied optimizer step.
    """

    DEFAULT_CONFIG: dict[str, Any] = {
        **VTraceTorchPolicy.DEFAULT_CONFIG,
        "clip_param": 0.4,
        "use_kl_loss": False,
        "kl_coeff": 1.0,
        "kl_target": 0.01,
    }

    def __init__(
        self, observation_space: gym.Space, action_space: gym.Space, config: dict[str, Any]
    ) -> None:
        super().__init__(observation_space, action_space, config)
        if self.recurrent:
            raise ValueError("APPO supports feed-forward models only; for model.use_lstm "
                             "(or a recurrent custom model) use IMPALA")
        clip = float(self.config["clip_param"])
        if clip <= 0:
            raise ValueError(f"clip_param={clip!r} must be > 0")
        #: ``pi_target``: a frozen copy of :attr:`model`, refreshed by :meth:`update_target`.
        self.target_model: nn.Module = copy.deepcopy(self.model)
        self.target_model.requires_grad_(False)
        self.target_model.eval()
        self.use_kl_loss: bool = bool(self.config["use_kl_loss"])
        self.kl_coeff: float = float(self.config["kl_coeff"])
        self.kl_target: float = float(self.config["kl_target"])
        #: How often :meth:`update_target` ran (reported as ``num_target_syncs``).
        self.num_target_syncs = 0
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- target
    def update_target(self) -> None:
        """Copy the current network into ``pi_target`` (between two learner updates)."""
        with self._lock:
            self.target_model.load_state_dict(self.model.state_dict())
            self.num_target_syncs += 1

    def update_kl(self, sampled_kl: float) -> float:
        """PPO's rule: ``kl_coeff`` x1.5 if ``kl > 2 kl_target``, x0.5 if ``kl < kl_target / 2``.

        Returns the new coefficient; without ``use_kl_loss`` the coefficient stays put
        (the plan calls this after every learner update either way).
        """
        if not self.use_kl_loss:
            return self.kl_coeff
        if sampled_kl > 2.0 * self.kl_target:
            self.kl_coeff *= 1.5
        elif sampled_kl < 0.5 * self.kl_target:
            self.kl_coeff *= 0.5
        return self.kl_coeff

    # ------------------------------------------------------------------ loss
    def _outputs(self, train_batch: TensorDict
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dist_inputs, values, target_dist_inputs, bootstrap_values [P])``.

        The current network sees the rows and each piece's last ``new_obs`` in one
        forward (as IMPALA's loss); without ``new_obs`` the sampled
        ``bootstrap_value`` column stands in. Terminated pieces bootstrap with 0.
        """
        obs = train_batch[SampleBatch.OBS]
        boot_obs = train_batch.get(_PIECE_BOOT_OBS)
        if boot_obs is not None:
            n = num_rows(obs)
            dist_inputs, values_all = self.model(cat_rows(obs, boot_obs))
            dist_inputs, values = dist_inputs[:n], values_all[:n]
            boot_values = values_all[n:].detach()
        else:
            dist_inputs, values = self.model_outputs(train_batch)
            boot_values = train_batch.get(_PIECE_BOOT_VALUE)
            if boot_values is None:  # every piece terminated
                boot_values = torch.zeros_like(train_batch[_PIECE_TERMINATED])
        with torch.no_grad():
            target_dist_inputs, _ = self.target_model(obs)
        return (dist_inputs, values, target_dist_inputs,
                boot_values * (1.0 - train_batch[_PIECE_TERMINATED]))

    def loss(self, train_batch: TensorDict) -> tuple[torch.Tensor, TensorDict]:
        """The APPO loss of the module docstring over whole pieces.

        Stats: ``policy_loss``, ``vf_loss``, ``entropy``, ``kl`` (to ``pi_target``),
        ``clip_frac`` (rows whose ratio left the clip range), ``mean_ratio``
        (``pi / pi_target``), ``mean_is_ratio`` (``pi_target / mu``), ``mean_rho``
        (its V-trace clip), ``vf_explained_var``.
        """
        dist_inputs, values, target_dist_inputs, boot_values = self._outputs(train_batch)
        actions = train_batch[SampleBatch.ACTIONS]
        dist = self.dist_class(dist_inputs)
        target_dist = self.dist_class(target_dist_inputs)
        logp = dist.logp(actions)
        target_logp = target_dist.logp(actions)
        # Entropy before the KL: the distribution caches its probabilities with grad.
        entropy = dist.entropy().mean()
        behaviour_logp = train_batch[SampleBatch.ACTION_LOGP]

        row_index, mask = train_batch[_ROW_INDEX], train_batch[_MASK]
        rho_bar = self._threshold("vtrace_clip_rho_threshold")
        with torch.no_grad():
            discounts = float(self.config["gamma"]) * (1.0 - train_batch[SampleBatch.TERMINATEDS])
            vs, pg_adv = vtrace(
                behaviour_logp=behaviour_logp[row_index],
                target_logp=target_logp[row_index],
                rewards=train_batch[SampleBatch.REWARDS][row_index],
                values=values.detach()[row_index],
                bootstrap_value=boot_values,
                discounts=discounts[row_index],
                clip_rho=rho_bar,
                clip_pg_rho=self._threshold("vtrace_clip_pg_rho_threshold"),
                clip_c=self._threshold("vtrace_clip_c_threshold"),
                lambda_=float(self.config["vtrace_lambda"]),
                mask=mask,
            )
            # Pieces are stored contiguously in order, so mask order == row order.
            vs_flat, adv_flat = vs[mask], pg_adv[mask]

        clip = float(self.config["clip_param"])
        policy_loss = ppo_surrogate_loss(logp, target_logp, adv_flat, clip)
        vf_loss = 0.5 * (vs_flat - values).pow(2).mean()
        if self.use_kl_loss:
            kl = target_dist.kl(dist).mean()
        else:
            with torch.no_grad():  # reported only
                kl = target_dist.kl(dist).mean()
        total = (policy_loss
                 + float(self.config["vf_loss_coeff"]) * vf_loss
                 - self.entropy_coeff * entropy)  # the scheduled value, if any
        if self.use_kl_loss and self.kl_coeff:
            total = total + self.kl_coeff * kl

        with torch.no_grad():
            ratio = torch.exp(logp - target_logp)
            is_ratio = torch.exp(target_logp - behaviour_logp)
            mean_rho = (is_ratio if rho_bar is None else is_ratio.clamp(max=rho_bar)).mean()
            explained_var = 1.0 - torch.var(vs_flat - values, correction=0) / torch.var(
                vs_flat, correction=0).clamp(min=1e-8)
            stats: TensorDict = {
                "policy_loss": policy_loss.detach(),
                "vf_loss": vf_loss.detach(),
                "entropy": entropy.detach(),
                "kl": kl.detach(),
                "clip_frac": ((ratio - 1.0).abs() > clip).float().mean(),
                "mean_ratio": ratio.mean(),
                "mean_is_ratio": is_ratio.mean(),
                "mean_rho": mean_rho,
                "vf_explained_var": explained_var,
            }
        return total, stats

    def learn_on_batch(
        self, batch: SampleBatch, num_sgd_iter: int = 1, sgd_minibatch_size: int = 0
    ) -> dict[str, float]:
        """IMPALA's :meth:`~VTraceTorchPolicy.learn_on_batch` (whole pieces, one step per
        minibatch) with the APPO loss, under the lock that :meth:`update_target` takes."""
        with self._lock:
            return super().learn_on_batch(batch, num_sgd_iter, sgd_minibatch_size)

    def _extra_learn_stats(self) -> dict[str, Any]:
        return {"cur_kl_coeff": self.kl_coeff, "num_target_syncs": self.num_target_syncs}

    # ------------------------------------------------------- weights and state
    def get_state(self) -> dict[str, Any]:
        """IMPALA's state plus ``target_weights`` (CPU tensors), ``kl_coeff`` and
        ``num_target_syncs``."""
        with self._lock:
            state = super().get_state()
            state["target_weights"] = {
                k: v.detach().cpu().clone() for k, v in self.target_model.state_dict().items()}
            state["kl_coeff"] = float(self.kl_coeff)
            state["num_target_syncs"] = int(self.num_target_syncs)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`; a state without ``target_weights`` (e.g. an IMPALA
        checkpoint) starts the target from the restored network."""
        with self._lock:
            super().set_state(state)
            target = state.get("target_weights")
            if target is None:
                target = self.model.state_dict()
            self.target_model.load_state_dict({
                k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v, copy=True))
                for k, v in target.items()})
            if "kl_coeff" in state:
                self.kl_coeff = float(state["kl_coeff"])
            self.num_target_syncs = int(state.get("num_target_syncs", 0))
