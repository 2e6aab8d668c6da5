"""The evolution-strategies policy: a deterministic MLP over flat weights, an
observation filter with mergeable statistics (``flowrl/policies/filters.py``), and a
flat-vector Adam.

    policy = ESPolicy(env.observation_space, env.action_space, config)
    theta = policy.get_flat_weights()              # float32 [num_params]
    policy.set_flat_weights(theta + 0.02 * eps)    # a perturbed copy (ES workers)
    action = policy.compute_single_action(obs)     # argmax (Discrete) / clipped mean (Box)
    stats = policy.apply_es_gradient(g, l2_coeff)  # Adam ascent step on the flat weights

ES (Salimans et al. 2017) needs no loss and no backward pass: the policy is only
evaluated, so acting runs a NumPy forward pass over views of the torch parameters
(tens of times cheaper than a torch call for one CartPole observation). The torch
module stays the source of truth (state dicts, custom models, export).

Observations are normalized with a running mean/std that is *frozen* during an
iteration: workers record the observations they see into a separate buffer, the
driver merges all buffers into its statistics after the update and broadcasts them
with the next weights (as in the paper's reference implementation, so both members
of an antithetic pair see the same normalization).
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

# The filters live in filters.py (shared with the torch policies); re-exported here.
from flowrl.data.actions import ActionLayout
from flowrl.policies.distributions import get_dist_class
from flowrl.policies.export import greedy_head
from flowrl.policies.filters import MeanStdFilter, NoFilter, RunningStat, make_filter
from flowrl.policies.models import get_model, merge_model_config
from flowrl.data.sample_batch import SampleBatch

__all__ = ["RunningStat", "MeanStdFilter", "NoFilter", "make_filter", "FlatAdam",
           "ESModel", "ESPolicy"]


def _to_numpy(value: Any) -> Any:
    """Tensors (from checkpoints) -> arrays; anything else unchanged."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


# ---------------------------------------------------------------------- optimizer
class FlatAdam:
    """Adam on one flat parameter vector (the ES reference code's optimizer).

    ``step(g)`` returns the update to *add* to the parameters for a gradient ``g``
    of a loss to minimize (the ES driver passes ``-grad_estimate + l2 * theta``).
    """

    def __init__(self, num_params: int, stepsize: float, beta1: float = 0.9,
                 beta2: float = 0.999, epsilon: float = 1e-8):
        self.stepsize, self.beta1, self.beta2, self.epsilon = stepsize, beta1, beta2, epsilon
        self.m = np.zeros(num_params, dtype=np.float32)
        self.v = np.zeros(num_params, dtype=np.float32)
        self.t = 0

    def step(self, grad: np.ndarray) -> np.ndarray:
        self.t += 1
        a = self.stepsize * np.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * (grad * grad)
        return (-a * self.m / (np.sqrt(self.v) + self.epsilon)).astype(np.float32)

    def get_state(self) -> dict[str, Any]:
        return {"m": torch.from_numpy(self.m.copy()), "v": torch.from_numpy(self.v.copy()),
                "t": int(self.t)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.m = _to_numpy(state["m"]).astype(np.float32)  # copies
        self.v = _to_numpy(state["v"]).astype(np.float32)
        self.t = int(state["t"])


# --------------------------------------------------------------------------- model
_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0), "linear": None,
                "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))}


class ESModel(nn.Module):
    """A plain MLP ``obs -> action outputs`` (no value head: ES has no critic).

    Weights use the paper's normc init (each unit's input weights scaled to norm 1,
    0.01 for the output layer, so the first policy is nearly uniform in its outputs).
    ``forward`` returns ``(outputs, zeros)`` to match the catalog's model signature.
    """

    def __init__(self, in_size: int, hiddens: list[int], num_outputs: int,
                 activation: str = "tanh", seed: int | None = None):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ES model activation {activation!r}; choose one of "
                             f"{sorted(_ACTIVATIONS)}")
        self.activation = activation
        rng = np.random.default_rng(seed)
        sizes = [int(in_size), *(int(h) for h in hiddens), int(num_outputs)]
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layer = nn.Linear(fan_in, fan_out)
            std = 0.01 if i == len(sizes) - 2 else 1.0
            w = rng.standard_normal((fan_out, fan_in))
            w *= std / np.sqrt(np.square(w).sum(axis=1, keepdims=True))
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(w.astype(np.float32)))
                layer.bias.zero_()
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        act = {"tanh": torch.tanh, "relu": torch.relu, "elu": nn.functional.elu,
               "linear": None}[self.activation]
        h = x.float()
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if act is not None and i < len(self.layers) - 1:
                h = act(h)
        return h, torch.zeros(h.shape[0], device=h.device)


class _ESActions(nn.Module):
    """Torch twin of :meth:`ESPolicy.compute_actions` with ``explore=False``.

    Raw obs -> one-hot / flatten (float32) -> ``clip((x - mean) * inv_std, -clip, clip)``
    with the frozen filter statistics -> network -> argmax (Discrete) or clip to the
    bounds (Box). ``NoFilter`` is mean 0, inv_std 1, clip inf: exactly the identity.
    """

    def __init__(self, net: nn.Module, one_hot: int | None, obs_start: int,
                 mean: np.ndarray, inv_std: np.ndarray, clip: float,
                 action_space: gym.Space, product_head: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        # MultiDiscrete, MultiBinary, Tuple, Dict: the product distribution's mode.
        self.product_head = product_head
        self.one_hot = 0 if one_hot is None else int(one_hot)
        self.obs_start = int(obs_start)
        self.clip = float(clip)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.as_tensor(inv_std, dtype=torch.float32))
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.action_shape = [int(d) for d in (action_space.shape or ())]
        box = isinstance(action_space, gym.spaces.Box)
        low = action_space.low if box else np.zeros(1)
        high = action_space.high if box else np.zeros(1)
        self.register_buffer("low", torch.as_tensor(low.reshape(-1), dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high.reshape(-1), dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.one_hot > 0:
            x = nn.functional.one_hot(obs.long().reshape(-1) - self.obs_start,
                                      self.one_hot).float()
        else:
            x = obs.reshape(obs.shape[0], -1).float()
        x = torch.clamp((x - self.mean) * self.inv_std, -self.clip, self.clip)
        out = self.net(x)
        if self.product_head is not None:
            return self.product_head(out)
        if self.discrete:
            return torch.argmax(out, dim=-1)
        out = torch.minimum(torch.maximum(out, self.low), self.high)
        return out.reshape([-1] + self.action_shape)


class _FirstOutput(nn.Module):
    """A catalog model's ``(dist_inputs, value)`` -> ``dist_inputs``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


# -------------------------------------------------------------------------- policy
class ESPolicy:
    """Deterministic policy over flat weights, for evolution strategies.

    Discrete actions: argmax of the logits. Box actions: the network output (the
    mean), plus ``action_noise_std`` Gaussian noise when ``explore`` is set, clipped
    to the bounds. MultiDiscrete, MultiBinary, Tuple and Dict actions: the mode of
    their product distribution (argmax per discrete part, mean per Box part, no
    noise). Observations: Box or Discrete (ES normalizes one flat vector). Reads config keys ``model`` (``fcnet_hiddens``,
    ``fcnet_activation``, ``custom_model``), ``observation_filter``, ``stepsize``,
    ``action_noise_std``, ``seed``.

    Implements the part of the Policy interface the RolloutWorker and the Agent use
    (acting, weights, state); it has no loss, so ``learn_on_batch`` raises.
    """

    #: ES policies carry no state from step to step.
    recurrent = False


    def __init__(self, observation_space: gym.Space, action_space: gym.Space,
                 config: dict[str, Any]):
        self.observation_space = observation_space
        self.action_space = action_space
        self.config = config
        self.device = torch.device("cpu")  # evaluation only: small nets, batch size 1
        self.global_timestep = 0
        model_config = merge_model_config(config.get("model"))
        if model_config.get("use_lstm"):
            raise ValueError("ES evolves stateless policies; model.use_lstm is for PG, A2C, "
                             "A3C, PPO and IMPALA")
        seed = config.get("seed")
        self._rng = np.random.default_rng(seed)
        self.action_noise_std = float(config.get("action_noise_std", 0.0))

        if isinstance(observation_space, gym.spaces.Discrete):
            self._one_hot: int | None = int(observation_space.n)
            self._obs_start = int(observation_space.start)
            self.obs_size = self._one_hot
        elif isinstance(observation_space, gym.spaces.Box):
            self._one_hot, self._obs_start = None, 0
            self.obs_size = int(np.prod(observation_space.shape))
        else:
            raise ValueError(f"ES takes Box or Discrete observations (it normalizes one "
                             f"flat vector), got {observation_space!r}; for Dict, Tuple, "
                             "MultiDiscrete or MultiBinary observations use PPO, A2C, "
                             "IMPALA or DQN")
        #: MultiDiscrete / MultiBinary / Tuple / Dict actions: the product distribution.
        self._product_dist: type | None = None
        self._layout = ActionLayout(action_space)
        if isinstance(action_space, gym.spaces.Discrete):
            self._discrete = True
            self.num_outputs = int(action_space.n)
        elif not isinstance(action_space, gym.spaces.Box):
            self._discrete = False
            # Raises for spaces without a distribution, naming the space.
            self._product_dist, self.num_outputs = get_dist_class(action_space)
        else:
            self._discrete = False
            self._action_shape = tuple(action_space.shape)
            self.num_outputs = int(np.prod(action_space.shape))
            self._low = action_space.low.reshape(-1).astype(np.float32)
            self._high = action_space.high.reshape(-1).astype(np.float32)

        model_config = merge_model_config(config.get("model"))
        if model_config.get("custom_model") is not None:
            # Catalog path: any model; only its first output (dist inputs) is used.
            self.model: nn.Module = get_model(observation_space, action_space,
                                              self.num_outputs, model_config)
        else:
            self.model = ESModel(self.obs_size, list(model_config["fcnet_hiddens"] or []),
                                 self.num_outputs, model_config["fcnet_activation"], seed)
        self.model.requires_grad_(False)
        self._params = list(self.model.parameters())
        self.num_params = int(sum(p.numel() for p in self._params))
        # NumPy views share memory with the torch parameters (updates are in place).
        self._np_layers = None
        if isinstance(self.model, ESModel):
            self._np_layers = [(layer.weight.detach().numpy().T, layer.bias.detach().numpy())
                               for layer in self.model.layers]
            self._np_act = _ACTIVATIONS[self.model.activation]
        self.filter = make_filter(config.get("observation_filter", "MeanStdFilter"),
                                  (self.obs_size,))
        self.optimizer = FlatAdam(self.num_params, float(config.get("stepsize", 0.01)))

    # ---------------------------------------------------------------- acting
    def preprocess(self, obs_batch: Any) -> np.ndarray:
        """Raw observations -> float32 ``[B, obs_size]`` (one-hot for Discrete)."""
        arr = np.asarray(obs_batch)
        if self._one_hot is not None:
            return np.eye(self._one_hot, dtype=np.float32)[arr.reshape(-1) - self._obs_start]
        return arr.reshape(arr.shape[0], -1).astype(np.float32, copy=False)

    def _outputs(self, x: np.ndarray) -> np.ndarray:
        """Network outputs for filtered inputs ``x [B, obs_size]``."""
        if self._np_layers is None:
            with torch.inference_mode():
                return self.model(torch.from_numpy(np.ascontiguousarray(x)))[0].numpy()
        h = x
        last = len(self._np_layers) - 1
        for i, (w, b) in enumerate(self._np_layers):
            h = h @ w + b
            if i < last and self._np_act is not None:
                h = self._np_act(h)
        return h

    def act_filtered(self, x: np.ndarray, add_noise: bool = False) -> np.ndarray:
        """Actions for already preprocessed and filtered inputs (the rollout hot path)."""
        out = self._outputs(x)
        if self._product_dist is not None:
            with torch.inference_mode():
                mode = self._product_dist(torch.from_numpy(np.asarray(out, np.float32)))
                return mode.deterministic_sample().numpy()
        if self._discrete:
            return out.argmax(axis=-1)
        if add_noise and self.action_noise_std > 0:
            out = out + self.action_noise_std * self._rng.standard_normal(out.shape)
        return np.clip(out, self._low, self._high).astype(np.float32)

    def compute_actions(self, obs_batch: np.ndarray, explore: bool = True
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Actions for a batch of raw observations; no extra columns.

        ``explore`` adds ``action_noise_std`` noise to Box actions; Discrete
        actions are always the argmax (ES explores in parameter space).
        """
        actions = self.act_filtered(self.filter(self.preprocess(obs_batch)), add_noise=explore)
        if self._product_dist is not None:
            rows = actions.reshape((len(actions), *self._layout.shape))
            return rows.astype(self._layout.dtype, copy=False), {}
        if self._discrete:
            return actions.astype(np.int64), {}
        return actions.reshape((len(actions), *self._action_shape)), {}

    def compute_single_action(self, obs: Any, explore: bool = False) -> Any:
        """The action for one observation (an ``int`` for Discrete spaces).

        The ES workers' per-step path: no batch-level conversions."""
        x = self.filter(self.preprocess(np.asarray(obs)[None]))
        action = self.act_filtered(x, add_noise=explore)[0]
        if self._product_dist is not None:
            return self._layout.to_env(
                action.reshape(self._layout.shape).astype(self._layout.dtype), clip=True)
        return int(action) if self._discrete else action.reshape(self._action_shape)

    def postprocess_trajectory(self, batch: SampleBatch) -> SampleBatch:
        """Unchanged (ES needs no advantages); lets a RolloutWorker sample with it."""
        return batch

    def learn_on_batch(self, *args: Any, **kwargs: Any) -> dict:
        raise TypeError("ESPolicy has no loss: ES updates it through "
                                  "apply_es_gradient() from perturbed returns.")

    # ---------------------------------------------------------- flat weights
    def get_flat_weights(self) -> np.ndarray:
        """All parameters as one float32 vector (a copy)."""
        return np.concatenate([p.detach().reshape(-1).numpy() for p in self._params]
                              ).astype(np.float32)

    def set_flat_weights(self, flat: np.ndarray) -> None:
        """Loads a vector from :meth:`get_flat_weights` (in place: NumPy views stay valid)."""
        flat = np.asarray(flat, dtype=np.float32)
        if not flat.flags.writeable:
            flat = flat.copy()  # object-store arrays are read-only; torch warns on those
        if flat.shape != (self.num_params,):
            raise ValueError(f"expected a flat weight vector of {self.num_params} values, "
                             f"got shape {flat.shape}")
        offset = 0
        with torch.no_grad():
            for p in self._params:
                n = p.numel()
                p.copy_(torch.from_numpy(flat[offset:offset + n]).view_as(p))
                offset += n

    def apply_es_gradient(self, grad: np.ndarray, l2_coeff: float) -> dict[str, float]:
        """One Adam ascent step along ``grad`` (an estimate of d return / d theta),
        with L2 weight decay ``l2_coeff``. Returns norms and the update ratio."""
        theta = self.get_flat_weights()
        step = self.optimizer.step(-grad + l2_coeff * theta)
        self.set_flat_weights(theta + step)
        theta_norm = float(np.linalg.norm(theta))
        return {"weights_norm": float(np.linalg.norm(theta + step)),
                "grad_norm": float(np.linalg.norm(grad)),
                "update_ratio": float(np.linalg.norm(step)) / max(theta_norm, 1e-12)}

    # ------------------------------------------------------- weights / state
    def get_weights(self) -> dict[str, np.ndarray]:
        """The model's state dict as NumPy arrays (without the observation filter)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def set_weights(self, weights: dict[str, Any]) -> None:
        self.model.load_state_dict({k: v if isinstance(v, torch.Tensor)
                                    else torch.as_tensor(np.array(v, copy=True))
                                    for k, v in weights.items()})

    def get_state(self) -> dict[str, Any]:
        """Weights, filter statistics, Adam state: tensors and plain values only."""
        return {"weights": {k: v.detach().cpu().clone()
                            for k, v in self.model.state_dict().items()},
                "filter": self.filter.get_state(),
                "optimizer": self.optimizer.get_state(),
                "global_timestep": int(self.global_timestep)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.set_weights(state["weights"])
        self.filter.set_state(state["filter"])
        self.optimizer.set_state(state["optimizer"])
        self.global_timestep = int(state.get("global_timestep", 0))

    def on_global_var_update(self, global_vars: dict[str, Any]) -> None:
        if "timestep" in global_vars:
            self.global_timestep = int(global_vars["timestep"])

    def export_module(self) -> nn.Module:
        """An eager CPU module ``raw obs batch -> greedy actions`` (see ``Policy``).

        Acting runs in NumPy; this rebuilds the same computation in torch from a copy
        of the weights and the current (frozen) observation filter statistics.
        """
        if isinstance(self.model, ESModel):
            act = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU,
                   "linear": None}[self.model.activation]
            layers: list[nn.Module] = []
            for i, layer in enumerate(self.model.layers):
                layers.append(copy.deepcopy(layer))
                if act is not None and i < len(self.model.layers) - 1:
                    layers.append(act())
            net: nn.Module = nn.Sequential(*layers)
        else:
            net = _FirstOutput(copy.deepcopy(self.model))
        if isinstance(self.filter, NoFilter):
            mean = np.zeros(self.obs_size, dtype=np.float32)
            inv_std = np.ones(self.obs_size, dtype=np.float32)
            clip = float("inf")
        else:
            mean, inv_std, clip = self.filter._mean, self.filter._inv_std, self.filter.clip
        product_head = None if self._product_dist is None else greedy_head(
            self.action_space, self._product_dist.__name__, clip_actions=True)
        return _ESActions(net.cpu().eval(), self._one_hot, self._obs_start, mean, inv_std,
                          clip, self.action_space, product_head)

    def __repr__(self) -> str:
        return (f"ESPolicy(obs={self.observation_space}, actions={self.action_space}, "
                f"num_params={self.num_params})")
