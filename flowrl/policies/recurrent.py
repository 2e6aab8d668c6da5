"""Recurrent models: the interface a stateful model implements, and the LSTM wrapper.

A recurrent model carries a state from step to step. flowrl's policies call it on
sequences: ``obs`` holds ``[S, L, ...]`` (``S`` sequences of at most ``L`` steps,
zero-padded after each sequence's ``seq_lens[s]`` steps), ``state`` one ``[S, size]``
tensor per state part (the state before each sequence's first step), and it returns
the distribution inputs ``[S, L, num_outputs]``, the values ``[S, L]`` and the state
after each sequence's last valid step. Acting is the same call with ``L = 1``::

    class MyMemory(RecurrentModel):
        def get_initial_state(self):
            return [torch.zeros(64)]
        def forward(self, obs, state, seq_lens, prev_actions=None, prev_rewards=None):
            ...
            return dist_inputs, values, [h_last]

    config = {"model": {"custom_model": MyMemory}}        # or {"use_lstm": True}

``prev_actions`` (``[S, L, ...]`` action rows) and ``prev_rewards`` (``[S, L]``) are
the previous step's action and reward (zeros at an episode's first step); the policy
passes them when the model config sets ``lstm_use_prev_action`` /
``lstm_use_prev_reward``. Observations keep their structure (nested dicts / tuples of
tensors for Dict / Tuple spaces), each leaf with the two leading dimensions.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.data.actions import ActionLayout
from flowrl.policies.models import ObservationEncoder, TorchModel, _activation, _linear, _mlp
from flowrl.policies.nested import map_rows

__all__ = ["RecurrentModel", "LSTMWrapper"]


class RecurrentModel(TorchModel):
    """Base class of stateful models (see the module docstring for the contract)."""

    def get_initial_state(self) -> list[torch.Tensor]:
        """The state before an episode's first step: one unbatched tensor per part."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_initial_state()")

    def forward(self, obs: Any, state: list[torch.Tensor], seq_lens: torch.Tensor,
                prev_actions: torch.Tensor | None = None,
                prev_rewards: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(dist_inputs [S, L, n], values [S, L], state_out)`` for padded sequences."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")


class LSTMWrapper(RecurrentModel):
    """``model.use_lstm``: the catalog's encoder and MLP, then an LSTM, then the heads.

    Each step: :class:`~flowrl.policies.models.ObservationEncoder` features (any space,
    images through a conv stack) -> ``fcnet_hiddens`` MLP -> concatenated with the
    previous action (one-hot for discrete parts) and reward when
    ``lstm_use_prev_action`` / ``lstm_use_prev_reward`` -> ``nn.LSTM`` of
    ``lstm_cell_size`` -> a policy head (gain 0.01) and a value head. The state is
    ``[h, c]``, zeros at an episode's start. Padded steps are computed but never read:
    the state returned is the one after each sequence's last valid step.
    """

    def __init__(self, obs_space: gym.Space, action_space: gym.Space, num_outputs: int,
                 model_config: dict[str, Any]) -> None:
        super().__init__(obs_space, action_space, num_outputs, model_config)
        self.cell_size = int(model_config.get("lstm_cell_size", 256))
        if self.cell_size < 1:
            raise ValueError(f"lstm_cell_size must be >= 1, got {self.cell_size}")
        self.encoder = ObservationEncoder(obs_space, model_config)
        hiddens = [int(h) for h in (model_config.get("fcnet_hiddens") or [])]
        self.mlp, features = _mlp(self.encoder.size, hiddens,
                                  _activation(model_config.get("fcnet_activation", "tanh")))
        self.use_prev_action = bool(model_config.get("lstm_use_prev_action", False))
        self.use_prev_reward = bool(model_config.get("lstm_use_prev_reward", False))
        # Previous actions as model inputs: one-hot for discrete parts, floats otherwise
        # (Tuple / Dict actions arrive as their flat float rows).
        self.action_encoder: ObservationEncoder | None = None
        extra = 0
        if self.use_prev_action:
            if isinstance(action_space, (gym.spaces.Tuple, gym.spaces.Dict)):
                extra += int(np.prod(ActionLayout(action_space).shape))
            else:
                self.action_encoder = ObservationEncoder(action_space, {})
                extra += self.action_encoder.size
        extra += int(self.use_prev_reward)
        self.lstm = nn.LSTM(features + extra, self.cell_size, batch_first=True)
        self.policy_head = self._make_policy_head(self.cell_size)
        self.value_head = _linear(self.cell_size, 1, gain=1.0)

    def get_initial_state(self) -> list[torch.Tensor]:
        return [torch.zeros(self.cell_size), torch.zeros(self.cell_size)]

    def forward(self, obs: Any, state: list[torch.Tensor], seq_lens: torch.Tensor,
                prev_actions: torch.Tensor | None = None,
                prev_rewards: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        leading = _leading_dims(obs)
        flat = map_rows(lambda t: t.reshape(-1, *t.shape[2:]), obs)
        features = self.mlp(self.encoder(flat))
        parts = [features.reshape(*leading, -1)]
        if self.use_prev_action:
            if prev_actions is None:
                raise ValueError("lstm_use_prev_action is set but no prev_actions were given")
            flat_actions = prev_actions.reshape(-1, *prev_actions.shape[2:])
            encoded = (flat_actions.reshape(flat_actions.shape[0], -1).float()
                       if self.action_encoder is None else self.action_encoder(flat_actions))
            parts.append(encoded.reshape(*leading, -1))
        if self.use_prev_reward:
            if prev_rewards is None:
                raise ValueError("lstm_use_prev_reward is set but no prev_rewards were given")
            parts.append(prev_rewards.reshape(*leading, 1).float())
        inputs = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        h0, c0 = state[0].unsqueeze(0), state[1].unsqueeze(0)
        if inputs.shape[1] == 1:  # acting: one step, no padding
            out, (h, c) = self.lstm(inputs, (h0, c0))
            state_out = [h[0], c[0]]
        else:
            packed = nn.utils.rnn.pack_padded_sequence(
                inputs, seq_lens.cpu(), batch_first=True, enforce_sorted=False)
            packed_out, (h, c) = self.lstm(packed, (h0, c0))
            out, _ = nn.utils.rnn.pad_packed_sequence(
                packed_out, batch_first=True, total_length=inputs.shape[1])
            state_out = [h[0], c[0]]
        dist_inputs = self._policy_output(self.policy_head(out))
        return dist_inputs, self.value_head(out).squeeze(-1), state_out


def _leading_dims(obs: Any) -> tuple[int, int]:
    """``(S, L)`` of a padded observation batch (a tensor or nested tensors)."""
    while not isinstance(obs, torch.Tensor):
        obs = next(iter(obs.values())) if isinstance(obs, dict) else obs[0]
    return obs.shape[0], obs.shape[1]  # not int(): traced exports keep the batch size free
