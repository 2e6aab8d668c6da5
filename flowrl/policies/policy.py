"""The torch :class:`Policy` base class: model + action distribution + optimizer + loss.

Subclasses (PG, A2C, PPO, DQN, DDPG, ...) set :attr:`Policy.loss_columns`,
implement :meth:`Policy.loss` and, where needed, extra state (``kl_coeff``).
Everything else -- acting, GAE postprocessing, the one minibatch SGD loop,
gradients as numpy, weights, checkpoints and TorchScript export -- lives here.

The SGD loop (:meth:`Policy.learn_on_batch`) has three hooks:

* :meth:`Policy.sgd_step` -- one update on one minibatch (default: loss, backward,
  clip, one optimizer step; DDPG: a critic step plus the delayed actor step);
* :attr:`Policy.per_row_stats` -- names of loss stats that hold one value per row
  (DQN's and DDPG's ``td_error``); the loop puts each minibatch's values back at
  the rows' positions in the batch, undoing the epoch's shuffle;
* :meth:`Policy._latest_learn_stats` / :meth:`Policy._extra_learn_stats` -- stats
  reported as they are at the end of the call, not averaged over minibatches.

Hot-path notes: ``compute_actions`` runs one batched forward pass under
``torch.inference_mode``; ``learn_on_batch`` converts the train batch to
tensors once, shuffles it once per epoch with one gather per column, and takes
minibatches as views. Learner statistics stay tensors until the end of the
call, so a GPU learner syncs once per ``learn_on_batch``, not once per step.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.data.actions import ActionLayout
from flowrl.data.spaces import ObservationPacker, action_mask_keys
from flowrl.policies.distributions import get_dist_class
from flowrl.policies.export import (DistInputsGreedy, LeafInputs, RecurrentGreedy, RecurrentStep,
                                    example_batches, greedy_head, to_torchscript)
from flowrl.policies.filters import (NormalizedInputs, ObservationNormalizer, RunningStat,
                                     make_observation_normalizer, split_filter_weights)
from flowrl.policies.models import ActionMaskedModel, get_model, merge_model_config
from flowrl.policies.nested import Rows, map_rows, num_rows, records_to_tensors
from flowrl.policies.recurrent import LSTMWrapper, RecurrentModel
from flowrl.policies.schedules import make_schedule
from flowrl.data.sequences import (PREV_ACTIONS, PREV_REWARDS, STATE_OUT, padded_layout,
                                   sequence_lengths, state_in_key, state_out_key)
from flowrl.policies.postprocessing import compute_advantages
from flowrl.data.sample_batch import SampleBatch, minibatch_bounds

__all__ = ["Policy"]

TensorDict = dict[str, torch.Tensor]

#: Batch columns holding observations: normalized on their way to tensors (the batch
#: itself keeps the raw values).
OBS_COLUMNS = frozenset({SampleBatch.OBS, SampleBatch.NEW_OBS})

#: Tensor-batch entries that describe sequences, not rows (recurrent policies).
SEQ_INDEX = "_seq_index"
SEQ_MASK = "_seq_mask"
_SEQUENCE_KEYS = frozenset({SampleBatch.SEQ_LENS, SEQ_INDEX, SEQ_MASK})

#: Where a minibatch's rows sit in the whole batch: a contiguous slice, or the
#: shuffle permutation's entries for that minibatch.
RowPositions = slice | torch.Tensor


def _to_cpu_copy(value: Any) -> Any:
    """Deep copy of a nested state structure with every tensor moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu_copy(v) for v in value)
    return value


class _PerRowStats:
    """Collects per-row loss outputs of one learning call in the batch's row order.

    Each minibatch's ``[rows, ...]`` values are written at the batch positions of its
    rows, so after a shuffled epoch every row holds the value computed for it.
    """

    def __init__(self, policy_name: str, names: tuple[str, ...], count: int) -> None:
        self.policy_name = policy_name
        self.names = names
        self.count = count
        self.values: TensorDict = {}

    def take(self, stats: TensorDict, positions: RowPositions) -> None:
        """Moves the per-row entries of one minibatch's ``stats`` to ``positions``."""
        for name in self.names:
            if name not in stats:
                raise KeyError(f"{self.policy_name}.loss() returned no {name!r} stat, "
                               f"which per_row_stats lists")
            rows = stats.pop(name)
            expected = (positions.stop - positions.start if isinstance(positions, slice)
                        else positions.shape[0])
            if rows.dim() == 0 or rows.shape[0] != expected:
                raise ValueError(f"{self.policy_name}.loss() stat {name!r} has shape "
                                 f"{tuple(rows.shape)}; per_row_stats need one value per "
                                 f"minibatch row ({expected})")
            if isinstance(positions, slice) and expected == self.count:
                self.values[name] = rows  # the whole batch: no copy needed
                continue
            out = self.values.get(name)
            if out is None:
                out = rows.new_empty((self.count, *rows.shape[1:]))
                self.values[name] = out
            out[positions] = rows


def _total_norm_and_clip(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of ``grads``; with ``max_norm``, the grads are then scaled in
    place by ``min(1, max_norm / (norm + 1e-6))``.

    The same kernels, in the same order, as ``nn.utils.clip_grad_norm_(..., foreach=True)``
    (``get_total_norm`` without ``max_norm``), so the results are identical; but when all
    grads share one device and dtype (a policy's usually do) it skips torch's grouping of
    the tensors by device and dtype, which costs more than the arithmetic for a small net
    (a clip of DQN's 64x64 MLP: 21 instead of 35 us on CPU, once per SGD step).
    """
    device, dtype = grads[0].device, grads[0].dtype
    if any(g.device != device or g.dtype != dtype for g in grads):
        if max_norm is None:
            return nn.utils.get_total_norm(grads, foreach=True)
        total = nn.utils.get_total_norm(grads, foreach=True)
        nn.utils.clip_grads_with_norm_(grads, max_norm, total, foreach=True)
        return total
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    if max_norm is not None:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def _float_vector(scalars: list[torch.Tensor]) -> torch.Tensor:
    """One-element tensors as one float32 vector: a single stack when all are float32
    scalars (the usual case), else one cast and reshape each."""
    if all(s.dim() == 0 and s.dtype == torch.float32 for s in scalars):
        return torch.stack(scalars)
    return torch.cat([s.float().reshape(1) for s in scalars])


def _writable(arr: np.ndarray) -> np.ndarray:
    # Arrays read zero-copy from Ray's object store are read-only; torch.from_numpy
    # warns on those (and a later in-place op would be undefined), so copy them.
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()


class _StepInputs(NamedTuple):
    """A recurrent model's previous actions / rewards for one step: the tensors it
    takes (None where unused) and the batch columns they become."""

    tensors: list[torch.Tensor | None]
    columns: dict[str, np.ndarray]


def sequence_groups(seq_lens: np.ndarray, size: int) -> list[np.ndarray]:
    """Positions of ``seq_lens`` grouped into minibatches of about ``size`` rows.

    Sequences stay whole and in the given order; a group closes once it holds ``size``
    rows or more, and a last group under half of ``size`` joins the one before.
    """
    groups: list[list[int]] = [[]]
    rows = 0
    for position, length in enumerate(seq_lens.tolist()):
        if rows >= size:
            groups.append([])
            rows = 0
        groups[-1].append(position)
        rows += length
    if len(groups) > 1 and rows * 2 < size:
        groups[-2].extend(groups.pop())
    return [np.asarray(group, dtype=np.int64) for group in groups]


class Policy:
    """A torch policy for one (observation space, action space) pair.

    ``config`` is the full algorithm config; keys read here (with these
    fallbacks when absent): ``gamma`` (0.99), ``lr`` (5e-4), ``model`` (merged
    over ``MODEL_DEFAULTS``), ``num_gpus`` (0; the learner uses ``cuda`` when
    > 0 and a GPU exists), ``seed`` (None), ``grad_clip`` (None = off, else max
    global grad norm), ``use_gae`` (True), ``lambda`` (1.0), ``use_critic``
    (True), ``observation_filter`` ("NoFilter"). Subclasses add their loss
    coefficients to :attr:`DEFAULT_CONFIG`.

    Observation filter: with ``observation_filter="MeanStdFilter"`` (Box observations
    only) :attr:`obs_filter` normalizes every observation on its way into a tensor
    (acting, values, and the ``obs`` / ``new_obs`` loss columns) as
    ``clip((obs - mean) / (std + 1e-8), -10, 10)``. Batches keep raw observations.
    The learner adds each train batch's raw ``obs`` to the statistics once per
    :meth:`learn_on_batch` call, after its SGD (so the whole call normalizes as the
    sampling workers did); :meth:`apply_gradients` merges the statistics that came
    with the gradients. The statistics travel inside :meth:`get_weights` (keys
    ``"_obs_filter/..."``) and :meth:`get_state`, and are baked into exports.
    """

    #: Fallbacks for config keys this class reads; the algorithm config wins.
    DEFAULT_CONFIG: dict[str, Any] = {
        "gamma": 0.99,
        "lr": 5e-4,
        "model": {},
        "num_gpus": 0,
        "seed": None,
        "grad_clip": None,
        "use_gae": True,
        "lambda": 1.0,
        "use_critic": True,
        "observation_filter": "NoFilter",
    }

    #: Train-batch columns the loss reads; only these are converted to tensors.
    loss_columns: tuple[str, ...] = (SampleBatch.OBS, SampleBatch.ACTIONS, SampleBatch.ADVANTAGES)
    #: Columns the loss reads when the batch has them (e.g. replay's importance
    #: ``weights``); converted like :attr:`loss_columns`, skipped when absent.
    optional_loss_columns: tuple[str, ...] = ()

    #: Names of :meth:`loss` stats that hold one value per minibatch row (a
    #: ``[rows, ...]`` tensor) instead of a scalar, e.g. DQN's ``td_error``. The SGD
    #: loop writes each minibatch's values back to the rows' positions in the whole
    #: batch (undoing the shuffle), and :meth:`learn_on_batch` /
    #: :meth:`compute_gradients` return each as a float32 ``np.ndarray [B, ...]`` in
    #: batch order: the values of the last epoch, computed right before the update
    #: that used the row.
    per_row_stats: tuple[str, ...] = ()

    def __init__(
        self, observation_space: gym.Space, action_space: gym.Space, config: dict[str, Any]
    ) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        merged = {**self.DEFAULT_CONFIG, **(config or {})}
        merged["model"] = merge_model_config(merged.get("model"))
        self.config: dict[str, Any] = merged
        #: Whether a value head is trained and used (``vf_preds``, bootstrapping).
        self.has_critic: bool = bool(merged.get("use_critic", True))
        self.device = self._choose_device(merged.get("num_gpus", 0))
        #: Stacks per-env observations into batches (record arrays for Dict / Tuple).
        self.obs_packer = ObservationPacker(observation_space)
        #: How actions sit in batches and how they go to the env.
        self.action_layout = ActionLayout(action_space)
        #: Running mean/std normalization of observations; None with ``NoFilter``.
        self.obs_filter: ObservationNormalizer | None = make_observation_normalizer(
            merged["observation_filter"], observation_space)

        seed = merged.get("seed")
        if seed is not None:
            torch.manual_seed(int(seed))  # deterministic init and action sampling
        self._rng = np.random.default_rng(seed)

        self.dist_class, self.num_outputs = get_dist_class(action_space)
        self.model: nn.Module = self.make_model().to(self.device)
        #: Whether the model carries a state from step to step (flowrl.policies.recurrent).
        self.recurrent: bool = isinstance(self.model, RecurrentModel)
        model_config = self.config["model"]
        self.max_seq_len = int(model_config.get("max_seq_len", 20))
        if self.recurrent and self.max_seq_len < 1:
            raise ValueError(f"model.max_seq_len must be >= 1, got {self.max_seq_len}")
        #: Extra per-row inputs of a recurrent model: the previous action / reward.
        self.uses_prev_actions = self.recurrent and bool(model_config.get("lstm_use_prev_action"))
        self.uses_prev_rewards = self.recurrent and bool(model_config.get("lstm_use_prev_reward"))
        self._params: list[nn.Parameter] = list(self.model.parameters())
        self.optimizer: torch.optim.Optimizer = self.make_optimizer()
        #: Called as ``gradient_hook(params)`` after each backward pass of the SGD loop,
        #: before the gradient norm and clip (:meth:`_grad_norm_and_clip`). A
        #: data-parallel learner (``flowrl.workers.learner_group``) sets it to average
        #: the gradients over all learners, so that the clip sees the average. None: off.
        self.gradient_hook: Callable[[list[nn.Parameter]], None] | None = None
        self.global_timestep = 0
        #: ``lr_schedule`` / ``entropy_coeff_schedule`` (None: the constant config value).
        self.lr_schedule = make_schedule(merged.get("lr_schedule"), "lr_schedule")
        self.entropy_coeff_schedule = make_schedule(merged.get("entropy_coeff_schedule"),
                                                    "entropy_coeff_schedule")
        if self.entropy_coeff_schedule is not None and "entropy_coeff" not in merged:
            raise ValueError(f"entropy_coeff_schedule is set, but {type(self).__name__} has "
                             "no entropy term (no entropy_coeff)")
        #: The entropy coefficient the loss uses now (scheduled or ``entropy_coeff``).
        self.entropy_coeff = float(merged.get("entropy_coeff", 0.0))
        self.apply_hyperparameters()

        self._discrete_actions = isinstance(action_space, gym.spaces.Discrete)
        self._action_shape = tuple(self.action_layout.shape)
        self._action_dtype = np.dtype(self.action_layout.dtype)

    # ------------------------------------------------------------ construction
    @staticmethod
    def _choose_device(num_gpus: float) -> torch.device:
        if num_gpus and num_gpus > 0 and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")

    def make_model(self) -> nn.Module:
        """Build the model from the catalog (override for a different architecture).

        A masked observation space (a Dict of ``action_mask`` and ``observations``)
        gets the model for its ``observations`` part, wrapped in an
        :class:`~flowrl.policies.models.ActionMaskedModel` that masks the logits.
        """
        space = self.obs_packer.kept_space
        mask_keys = action_mask_keys(space)
        model_config = self.config["model"]
        if model_config.get("use_lstm"):
            if mask_keys is not None:
                raise ValueError("model.use_lstm with an action_mask observation is not "
                                 "supported; drop the mask or use_lstm")
            if model_config.get("custom_model") is not None:
                raise ValueError(
                    "model.use_lstm wraps the built-in encoder; for a custom recurrent "
                    "model, subclass flowrl.policies.recurrent.RecurrentModel and set "
                    "custom_model without use_lstm")
            return LSTMWrapper(space, self.action_space, self.num_outputs, model_config)
        if mask_keys is None:
            return get_model(space, self.action_space, self.num_outputs, model_config)
        mask_key, obs_key = mask_keys
        inner = get_model(space[obs_key], self.action_space, self.num_outputs,
                          self.config["model"])
        return ActionMaskedModel(inner, obs_key, space[mask_key], self.num_outputs)

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam over all model parameters with ``config["lr"]``.

        Uses the fused Adam kernel where torch has one for the device (several
        times faster than the per-parameter loop for small nets on CPU).
        """
        lr = float(self.config["lr"])
        try:
            return torch.optim.Adam(self._params, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.Adam(self._params, lr=lr)

    # ------------------------------------------------------------------ acting
    def _obs_to_tensor(self, obs_batch: Any) -> Rows:
        if self.obs_packer.nested:  # records (or a list of dicts) -> nested tensors
            return records_to_tensors(self.obs_packer.as_batch(obs_batch), self.obs_packer,
                                      self.device)
        arr = np.asarray(obs_batch)
        if self.obs_filter is not None:
            arr = self.obs_filter.normalize(arr)  # float32
        elif arr.dtype == np.float64:
            arr = arr.astype(np.float32)  # models compute in float32 anyway
        return torch.from_numpy(_writable(arr)).to(self.device)

    def _actions_to_numpy(self, actions: torch.Tensor) -> np.ndarray:
        out = actions.cpu().numpy()
        if self._discrete_actions:
            return out.astype(np.int64, copy=False)
        return out.reshape((out.shape[0], *self._action_shape)).astype(self._action_dtype, copy=False)

    def _obs_batch_of_one(self, obs: Any) -> np.ndarray:
        return self.obs_packer.pack_one(obs) if self.obs_packer.nested else np.asarray(obs)[None]

    def compute_actions(
        self, obs_batch: np.ndarray, explore: bool = True,
        state: list[np.ndarray] | None = None, prev_actions: np.ndarray | None = None,
        prev_rewards: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Actions for a batch of observations, plus extra columns for the sample batch.

        Returns ``(actions [B, ...], {"action_logp": [B], "action_dist_inputs":
        [B, num_outputs], "vf_preds": [B]})`` (``vf_preds`` only with a critic).
        ``explore=False`` gives the deterministic (greedy / mean) action. Box
        actions are raw samples, not clipped to the space bounds.

        A recurrent policy also takes ``state`` (one ``[B, size]`` array per part; None:
        the initial state) and, when its model uses them, ``prev_actions`` /
        ``prev_rewards`` (None: zeros); its extras add ``state_in_<i>`` (the state
        given), ``state_out_<i>`` (the state after this step) and the previous
        actions / rewards given, so that a sampler stores them as columns.
        """
        if self.recurrent:
            return self._compute_recurrent_actions(obs_batch, explore, state, prev_actions,
                                                   prev_rewards)
        obs = self._obs_to_tensor(obs_batch)
        with torch.inference_mode():
            dist_inputs, values = self.model(obs)
            dist = self.dist_class(dist_inputs)
            actions = dist.sample() if explore else dist.deterministic_sample()
            logp = dist.logp(actions)
        extra = {
            SampleBatch.ACTION_LOGP: logp.cpu().numpy(),
            SampleBatch.ACTION_DIST_INPUTS: dist_inputs.cpu().numpy(),
        }
        if self.has_critic:
            extra[SampleBatch.VF_PREDS] = values.cpu().numpy()
        return self._actions_to_numpy(actions), extra

    def _compute_recurrent_actions(
        self, obs_batch: Any, explore: bool, state: list[np.ndarray] | None,
        prev_actions: np.ndarray | None, prev_rewards: np.ndarray | None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """:meth:`compute_actions` of a recurrent policy: one step of each row's sequence."""
        obs = self._obs_to_tensor(obs_batch)
        batch_size = num_rows(obs)
        state_np = self._state_batch(state, batch_size)
        inputs = self._step_inputs(batch_size, prev_actions, prev_rewards)
        with torch.inference_mode():
            dist_inputs, values, state_out = self.model(
                map_rows(lambda t: t.unsqueeze(1), obs),
                [torch.from_numpy(part).to(self.device) for part in state_np],
                torch.ones(batch_size, dtype=torch.int64), *inputs.tensors)
            dist_inputs, values = dist_inputs[:, 0], values[:, 0]
            dist = self.dist_class(dist_inputs)
            actions = dist.sample() if explore else dist.deterministic_sample()
            logp = dist.logp(actions)
        extra = {
            SampleBatch.ACTION_LOGP: logp.cpu().numpy(),
            SampleBatch.ACTION_DIST_INPUTS: dist_inputs.cpu().numpy(),
            **inputs.columns,
        }
        if self.has_critic:
            extra[SampleBatch.VF_PREDS] = values.cpu().numpy()
        for index, (before, after) in enumerate(zip(state_np, state_out)):
            extra[state_in_key(index)] = before
            extra[state_out_key(index)] = after.cpu().numpy()
        return self._actions_to_numpy(actions), extra

    def get_initial_state(self) -> list[np.ndarray]:
        """The state before an episode's first step, one float32 array per part
        (empty for a policy that is not recurrent)."""
        if not self.recurrent:
            return []
        return [part.detach().cpu().numpy().astype(np.float32)
                for part in self.model.get_initial_state()]

    def _state_batch(self, state: list[np.ndarray] | None, batch_size: int
                     ) -> list[np.ndarray]:
        """``state`` as float32 ``[B, size]`` arrays; None: the initial state per row."""
        if state is None:
            return [np.repeat(part[None], batch_size, axis=0)
                    for part in self.get_initial_state()]
        initial = self.get_initial_state()
        if len(state) != len(initial):
            raise ValueError(f"{type(self).__name__} has {len(initial)} state parts, got "
                             f"{len(state)}")
        parts = []
        for part, init in zip(state, initial):
            arr = np.asarray(part, dtype=np.float32)
            if arr.shape == init.shape:  # one unbatched state
                arr = arr[None]
            if arr.shape != (batch_size, *init.shape):
                raise ValueError(f"state part of shape {arr.shape}; expected "
                                 f"{(batch_size, *init.shape)} for {batch_size} observations")
            parts.append(np.ascontiguousarray(arr))
        return parts

    def _step_inputs(self, batch_size: int, prev_actions: np.ndarray | None,
                     prev_rewards: np.ndarray | None) -> "_StepInputs":
        """The previous actions / rewards a recurrent model takes, as ``[B, 1, ...]``
        tensors and as batch columns (zeros where not given)."""
        tensors: list[torch.Tensor | None] = [None, None]
        columns: dict[str, np.ndarray] = {}
        if self.uses_prev_actions:
            if prev_actions is None:
                prev_actions = np.zeros((batch_size, *self._action_shape), self._action_dtype)
            prev_actions = np.asarray(prev_actions, dtype=self._action_dtype).reshape(
                (batch_size, *self._action_shape))
            columns[PREV_ACTIONS] = prev_actions
            tensors[0] = torch.from_numpy(np.ascontiguousarray(prev_actions)).to(
                self.device).unsqueeze(1)
        if self.uses_prev_rewards:
            if prev_rewards is None:
                prev_rewards = np.zeros(batch_size, np.float32)
            prev_rewards = np.asarray(prev_rewards, dtype=np.float32).reshape(batch_size)
            columns[PREV_REWARDS] = prev_rewards
            tensors[1] = torch.from_numpy(prev_rewards.copy()).to(self.device).unsqueeze(1)
        return _StepInputs(tensors, columns)

    def compute_single_action(self, obs: Any, explore: bool = False) -> Any:
        """The action for one unbatched observation, as the env takes it (an ``int`` for
        Discrete spaces, nested for Dict / Tuple spaces; Box parts are not clipped)."""
        actions, _ = self.compute_actions(self._obs_batch_of_one(obs), explore=explore)
        return self.action_layout.to_env(actions[0], clip=False)

    def value(self, obs_batch: np.ndarray, state: list[np.ndarray] | None = None,
              prev_actions: np.ndarray | None = None,
              prev_rewards: np.ndarray | None = None) -> np.ndarray:
        """Value estimates ``V(obs)``, shape ``[B]`` float32 (a recurrent policy's from
        ``state`` and the previous actions / rewards, as in :meth:`compute_actions`)."""
        if self.recurrent:
            _, extra = self._compute_recurrent_actions(obs_batch, False, state,
                                                       prev_actions, prev_rewards)
            return extra[SampleBatch.VF_PREDS]
        obs = self._obs_to_tensor(obs_batch)
        with torch.inference_mode():
            _, values = self.model(obs)
        return values.cpu().numpy()

    # ---------------------------------------------------------- postprocessing
    def postprocess_trajectory(self, batch: SampleBatch) -> SampleBatch:
        """Add ``advantages`` / ``value_targets`` to a trajectory fragment.

        Bootstrap rule: if the fragment's last step has ``terminateds=True`` the
        value after it is 0; otherwise (time-limit truncation, or the fragment
        was cut by the sampler) it is ``V(new_obs[-1])`` from the value head --
        so ``new_obs[-1]`` must be the real final observation, not the reset one.
        Without a critic (PG) the bootstrap value is always 0.

        A fragment is expected to hold one episode; if its ``eps_id`` column
        shows several, each episode is processed on its own and the results are
        concatenated. Missing ``vf_preds`` are computed from ``obs``.
        """
        if batch.count == 0:
            batch[SampleBatch.ADVANTAGES] = np.zeros(0, dtype=np.float32)
            batch[SampleBatch.VALUE_TARGETS] = np.zeros(0, dtype=np.float32)
            return batch
        if SampleBatch.EPS_ID in batch:
            eps_ids = batch[SampleBatch.EPS_ID]
            if np.any(eps_ids[1:] != eps_ids[:-1]):
                return SampleBatch.concat_samples(
                    [self.postprocess_trajectory(piece) for piece in batch.split_by_episode()]
                )
        if self.has_critic and SampleBatch.VF_PREDS not in batch:
            batch[SampleBatch.VF_PREDS] = self.value(batch[SampleBatch.OBS])
        batch = compute_advantages(
            batch,
            last_r=self._bootstrap_value(batch),
            gamma=float(self.config["gamma"]),
            lambda_=float(self.config["lambda"]),
            use_gae=bool(self.config["use_gae"]) and self.has_critic,
            use_critic=self.has_critic,
        )
        return self.drop_state_out(batch)

    def drop_state_out(self, batch: SampleBatch) -> SampleBatch:
        """``batch`` without its ``state_out_*`` columns: a recurrent policy needs the
        state after a fragment's last step only to bootstrap it, and learns from the
        ``state_in_*`` columns alone."""
        for key in [k for k in batch if k.startswith(STATE_OUT)]:
            del batch[key]
        return batch

    def _bootstrap_value(self, batch: SampleBatch) -> float:
        terminated = SampleBatch.TERMINATEDS in batch and bool(batch[SampleBatch.TERMINATEDS][-1])
        if terminated or not self.has_critic:
            return 0.0
        if SampleBatch.NEW_OBS not in batch:
            raise ValueError(
                "postprocess_trajectory needs 'new_obs' to bootstrap a fragment that did not terminate"
            )
        if self.recurrent:  # from the state after the last step, which it then fed
            state = [np.asarray(batch[state_out_key(i)][-1:])
                     for i in range(len(self.get_initial_state()))]
            return float(self.value(
                batch[SampleBatch.NEW_OBS][-1:], state,
                np.asarray(batch[SampleBatch.ACTIONS][-1:]),
                np.asarray(batch[SampleBatch.REWARDS][-1:]))[0])
        return float(self.value(batch[SampleBatch.NEW_OBS][-1:])[0])

    # ---------------------------------------------------------------- learning
    def loss(self, train_batch: TensorDict) -> tuple[torch.Tensor, TensorDict]:
        """Scalar loss and detached stats for one minibatch of tensors.

        Stats are scalars, plus one ``[rows, ...]`` tensor per name in
        :attr:`per_row_stats`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def recurrent_columns(self) -> tuple[str, ...]:
        """The per-row inputs a recurrent model learns from besides ``obs``: the state
        each step started with, and the previous actions / rewards it uses."""
        if not self.recurrent:
            return ()
        columns = [state_in_key(i) for i in range(len(self.get_initial_state()))]
        if self.uses_prev_actions:
            columns.append(PREV_ACTIONS)
        if self.uses_prev_rewards:
            columns.append(PREV_REWARDS)
        return tuple(columns)

    def model_outputs(self, train_batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dist_inputs [N, num_outputs], values [N])`` for the rows of a tensor batch.

        A recurrent model runs on the batch's sequences (``seq_lens``: contiguous rows,
        each sequence starting from its first row's ``state_in_*``), padded to the
        longest; the outputs of the valid steps come back in row order, so losses never
        see the padding.
        """
        obs = train_batch[SampleBatch.OBS]
        if not self.recurrent:
            return self.model(obs)
        index, mask = train_batch[SEQ_INDEX], train_batch[SEQ_MASK]
        starts = index[:, 0]
        state = [train_batch[state_in_key(i)].index_select(0, starts)
                 for i in range(len(self.get_initial_state()))]
        prev_actions = train_batch[PREV_ACTIONS][index] if self.uses_prev_actions else None
        prev_rewards = train_batch[PREV_REWARDS][index] if self.uses_prev_rewards else None
        dist_inputs, values, _ = self.model(map_rows(lambda t: t[index], obs), state,
                                            train_batch[SampleBatch.SEQ_LENS],
                                            prev_actions, prev_rewards)
        return dist_inputs[mask], values[mask]

    def _add_sequences(self, tensors: TensorDict, seq_lens: np.ndarray) -> TensorDict:
        """``tensors`` (rows of whole sequences of ``seq_lens``, in order) plus the
        padded layout :meth:`model_outputs` reads."""
        index, mask = padded_layout(seq_lens)
        tensors[SampleBatch.SEQ_LENS] = torch.from_numpy(seq_lens)  # CPU, for packing
        tensors[SEQ_INDEX] = torch.from_numpy(index).to(self.device)
        tensors[SEQ_MASK] = torch.from_numpy(mask).to(self.device)
        return tensors

    def _batch_to_tensors(self, batch: SampleBatch) -> TensorDict:
        """The loss columns of ``batch`` (and the optional ones it has) as tensors on the
        learner device, one copy each, in the dtypes of :meth:`_loss_array`; a recurrent
        policy's also hold the whole batch's sequence layout."""
        tensors: TensorDict = {}
        for column in (*self.loss_columns, *self.recurrent_columns(),
                       *self.optional_loss_columns):
            if column not in batch:
                if column in self.optional_loss_columns:
                    continue
                raise KeyError(
                    f"{type(self).__name__}.learn_on_batch needs column {column!r}; "
                    f"the batch has {sorted(batch.keys())}"
                )
            arr = self._normalize_column(column, np.asarray(batch[column]))
            if arr.dtype.names is not None:  # nested observations
                tensors[column] = records_to_tensors(arr, self.obs_packer, self.device)
                continue
            arr = self._loss_array(column, arr)
            tensors[column] = torch.from_numpy(_writable(arr)).to(self.device)
        if self.recurrent:
            self._add_sequences(tensors, sequence_lengths(batch, self.max_seq_len))
        return tensors

    def _loss_array(self, column: str, arr: np.ndarray) -> np.ndarray:
        """``arr`` in the dtype the loss computes with: float32 for float64 columns and
        for ``terminateds``, int64 for Discrete actions. Subclasses that keep actions in
        other units (DDPG's normalized ones) convert them here."""
        if column == SampleBatch.ACTIONS and self._discrete_actions:
            return arr.astype(np.int64, copy=False)
        if column == SampleBatch.TERMINATEDS or arr.dtype == np.float64:
            return arr.astype(np.float32, copy=False)
        return arr

    def _normalize_column(self, column: str, arr: np.ndarray) -> np.ndarray:
        """``arr`` normalized by :attr:`obs_filter` (a float32 copy) if ``column``
        holds observations; else ``arr`` itself."""
        if self.obs_filter is None or column not in OBS_COLUMNS:
            return arr
        return self.obs_filter.normalize(arr)

    # ----------------------------------------------------- observation filter
    def observation_stats(self, batch: SampleBatch) -> RunningStat | None:
        """Statistics of ``batch``'s raw ``obs`` (None without a filter); nothing changes.

        A3C workers send them with their gradients; :meth:`apply_gradients` merges them.
        """
        if self.obs_filter is None:
            return None
        return self.obs_filter.batch_stats(np.asarray(batch[SampleBatch.OBS]))

    def merge_observation_stats(self, stats: RunningStat | None) -> None:
        """Adds statistics from :meth:`observation_stats` to the filter (None: nothing)."""
        if stats is not None and self.obs_filter is not None:
            self.obs_filter.merge(stats)

    def _update_obs_filter(self, batch: SampleBatch) -> None:
        """The learner's one filter update per training call, after the SGD on ``batch``."""
        if self.obs_filter is not None:
            self.obs_filter.update(np.asarray(batch[SampleBatch.OBS]))

    def _grad_norm_and_clip(self) -> torch.Tensor:
        if self.gradient_hook is not None:
            self.gradient_hook(self._params)
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        clip = self.config.get("grad_clip")
        return _total_norm_and_clip(grads, None if clip is None else float(clip))

    def _backward(self, minibatch: TensorDict) -> TensorDict:
        """Loss, backward and grad clipping on one minibatch; returns stats tensors."""
        loss, stats = self.loss(minibatch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["total_loss"] = loss.detach()
        stats["grad_gnorm"] = self._grad_norm_and_clip().detach()
        return stats

    def sgd_step(self, minibatch: TensorDict) -> TensorDict:
        """One update on one minibatch; returns its stats (scalars and per-row tensors).

        The default: loss, backward, grad clipping, one optimizer step. Override
        for other update schemes (DDPG: a critic step plus a delayed actor step).
        """
        stats = self._backward(minibatch)
        self.optimizer.step()
        return stats

    def learn_on_batch(
        self, batch: SampleBatch, num_sgd_iter: int = 1, sgd_minibatch_size: int = 0
    ) -> dict[str, Any]:
        """Run ``num_sgd_iter`` epochs of minibatch SGD on ``batch``.

        Each epoch shuffles the rows (one permutation from the policy's RNG; no
        shuffle when one minibatch holds the whole batch) and calls
        :meth:`sgd_step` once per minibatch of ``sgd_minibatch_size`` rows (0 =
        the whole batch in one step; the last minibatch follows
        :func:`flowrl.data.sample_batch.minibatch_bounds`). Advantages are used as
        given (standardize them beforehand). Afterwards the batch's raw ``obs`` join
        the observation filter's statistics. Returns float stats averaged over the
        last epoch's minibatches, :meth:`_latest_learn_stats`, ``cur_lr``,
        :meth:`_extra_learn_stats`, and one ``np.ndarray [B, ...]`` per name in
        :attr:`per_row_stats`, in batch order. An empty batch is a ValueError.
        """
        count = batch.count
        if count == 0:
            raise ValueError(f"{type(self).__name__}.learn_on_batch got an empty batch")
        tensors = self._batch_to_tensors(batch)
        bounds = minibatch_bounds(count, sgd_minibatch_size)
        if not self.model.training:  # Module.train() walks every submodule: ~0.1 ms
            self.model.train()
        per_row = _PerRowStats(type(self).__name__, self.per_row_stats, count)
        if self.recurrent:
            return self._learn_on_sequences(batch, tensors, num_sgd_iter,
                                            sgd_minibatch_size, per_row)
        last_epoch: list[TensorDict] = []
        for _ in range(max(1, int(num_sgd_iter))):
            last_epoch = []
            perm = None  # one full-batch step: order doesn't matter
            epoch_data = tensors
            if len(bounds) > 1:
                perm = torch.from_numpy(self._rng.permutation(count)).to(self.device)
                epoch_data = {k: v.index_select(0, perm) if isinstance(v, torch.Tensor)
                              else map_rows(lambda t: t.index_select(0, perm), v)
                              for k, v in tensors.items()}
            for start, end in bounds:
                # One minibatch of all rows (off-policy steps): the tensors as they are.
                minibatch = (dict(epoch_data) if len(bounds) == 1
                             else {k: v[start:end] if isinstance(v, torch.Tensor)
                                   else map_rows(lambda t: t[start:end], v)
                                   for k, v in epoch_data.items()})
                stats = self.sgd_step(minibatch)
                # Later epochs overwrite earlier ones: the last epoch's values remain.
                per_row.take(stats, slice(start, end) if perm is None else perm[start:end])
                last_epoch.append(stats)
        summary = self._summarize(last_epoch, per_row.values)
        self._update_obs_filter(batch)
        return summary

    def _learn_on_sequences(self, batch: SampleBatch, tensors: TensorDict, num_sgd_iter: int,
                            sgd_minibatch_size: int, per_row: _PerRowStats) -> dict[str, Any]:
        """:meth:`learn_on_batch` of a recurrent policy: minibatches of whole sequences.

        Each epoch shuffles the sequences (not the rows) and fills minibatches of about
        ``sgd_minibatch_size`` rows with whole sequences (a minibatch may run over by
        less than one sequence; a last one under half the size joins the one before).
        """
        seq_lens = tensors[SampleBatch.SEQ_LENS].numpy()
        starts = np.cumsum(seq_lens) - seq_lens
        rows_only = {k: v for k, v in tensors.items() if k not in _SEQUENCE_KEYS}
        count = batch.count
        last_epoch: list[TensorDict] = []
        for _ in range(max(1, int(num_sgd_iter))):
            last_epoch = []
            if sgd_minibatch_size <= 0 or sgd_minibatch_size >= count:
                groups = [None]  # the whole batch in order: the tensors as they are
            else:
                order = self._rng.permutation(len(seq_lens))
                groups = sequence_groups(seq_lens[order], int(sgd_minibatch_size))
                groups = [order[group] for group in groups]
            for group in groups:
                if group is None:
                    minibatch, positions = dict(tensors), slice(0, count)
                else:
                    lens = seq_lens[group]
                    offsets = np.cumsum(lens) - lens
                    rows = np.repeat(starts[group] - offsets, lens) + np.arange(int(lens.sum()))
                    positions = torch.from_numpy(rows).to(self.device)
                    minibatch = self._add_sequences(
                        {k: map_rows(lambda t: t.index_select(0, positions), v)
                         for k, v in rows_only.items()}, lens)
                stats = self.sgd_step(minibatch)
                per_row.take(stats, positions)
                last_epoch.append(stats)
        summary = self._summarize(last_epoch, per_row.values)
        self._update_obs_filter(batch)
        return summary

    def _summarize(
        self, stats_list: list[TensorDict], per_row: TensorDict | None = None
    ) -> dict[str, Any]:
        """Means of the minibatch stats, then the latest stats, ``cur_lr``, the extra
        stats and the per-row arrays; every tensor reaches the host in one transfer
        (one device sync per call)."""
        keys = list(stats_list[0].keys()) if stats_list else []
        latest = self._latest_learn_stats()
        per_row = per_row or {}
        if len(stats_list) == 1:  # the usual off-policy step: nothing to average
            scalars = [stats_list[0][k] for k in keys]
        else:
            scalars = [torch.stack([s[k].float() for s in stats_list]).mean() for k in keys]
        scalars += latest.values()
        parts = [_float_vector(scalars)] if scalars else []
        parts += [rows.float().reshape(-1) for rows in per_row.values()]
        if not parts:
            host = np.zeros(0, np.float32)
        else:
            host = (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu().numpy()

        num_scalars = len(keys) + len(latest)
        summary: dict[str, Any] = dict(zip([*keys, *latest], host[:num_scalars].tolist()))
        summary["cur_lr"] = float(self.optimizer.param_groups[0]["lr"])
        if "entropy_coeff" in self.config:
            summary["cur_entropy_coeff"] = float(self.entropy_coeff)
        summary.update(self._extra_learn_stats())
        offset = num_scalars
        for name, rows in per_row.items():
            size = rows.numel()
            summary[name] = host[offset : offset + size].reshape(tuple(rows.shape)).copy()
            offset += size
        return summary

    def _whole_batch_per_row(self, stats: TensorDict, count: int) -> TensorDict:
        """Moves the :attr:`per_row_stats` of one whole-batch (unshuffled) step out of
        ``stats``; for :meth:`_summarize`."""
        per_row = _PerRowStats(type(self).__name__, self.per_row_stats, count)
        per_row.take(stats, slice(0, count))
        return per_row.values

    def _latest_learn_stats(self) -> TensorDict:
        """Scalar tensors reported as they are at the end of the call, not averaged
        (e.g. DDPG's most recent actor loss); they share the summary's device sync."""
        return {}

    def _extra_learn_stats(self) -> dict[str, Any]:
        """Python scalars appended to every learn_on_batch / compute_gradients result."""
        return {}

    def evaluate_loss(self, batch: SampleBatch) -> dict[str, float]:
        """Scalar loss stats on the whole ``batch`` without updating anything
        (:attr:`per_row_stats` are left out)."""
        tensors = self._batch_to_tensors(batch)
        with torch.no_grad():
            loss, stats = self.loss(tensors)
        stats["total_loss"] = loss
        return {k: float(v) for k, v in stats.items() if k not in self.per_row_stats}

    def compute_gradients(self, batch: SampleBatch) -> tuple[list[np.ndarray], dict[str, float]]:
        """Gradients of the loss on the whole ``batch`` (after ``grad_clip``), as numpy.

        The list is ordered like ``model.parameters()``; parameters the loss
        does not touch get zeros. Nothing is updated (the observation filter neither:
        send :meth:`observation_stats` along to :meth:`apply_gradients`). Stats as in
        :meth:`learn_on_batch` (:attr:`per_row_stats` included).
        """
        self.model.train()
        stats = self._backward(self._batch_to_tensors(batch))
        per_row = self._whole_batch_per_row(stats, batch.count)
        grads = [
            p.grad.detach().cpu().numpy().copy()
            if p.grad is not None
            else np.zeros(tuple(p.shape), dtype=np.float32)
            for p in self._params
        ]
        return grads, self._summarize([stats], per_row)

    def _set_grads(self, params: list[torch.Tensor], grads: list[np.ndarray]) -> None:
        """Writes numpy ``grads`` into ``params[i].grad``, checking count and shapes."""
        if len(grads) != len(params):
            raise ValueError(f"expected {len(params)} gradient arrays, got {len(grads)}")
        for param, grad in zip(params, grads):
            grad_t = torch.as_tensor(np.array(grad, dtype=np.float32, copy=True))
            if tuple(grad_t.shape) != tuple(param.shape):
                raise ValueError(
                    f"gradient of shape {tuple(grad_t.shape)} for a parameter "
                    f"of shape {tuple(param.shape)}"
                )
            param.grad = grad_t.to(device=self.device, dtype=param.dtype)

    def apply_gradients(self, grads: list[np.ndarray],
                        obs_stats: RunningStat | None = None) -> None:
        """One optimizer step with ``grads`` (as from :meth:`compute_gradients`), then
        ``obs_stats`` (:meth:`observation_stats` of the same batch) into the filter."""
        self._set_grads(self._params, grads)
        self.optimizer.step()
        self.merge_observation_stats(obs_stats)

    # ------------------------------------------------------- weights and state
    def get_weights(self) -> dict[str, np.ndarray]:
        """The model's state dict as numpy arrays (copies), plus the observation
        filter's statistics under ``"_obs_filter/..."`` keys when there is a filter."""
        weights = {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}
        if self.obs_filter is not None:
            weights.update(self.obs_filter.get_weights())
        return weights

    def set_weights(self, weights: dict[str, Any]) -> None:
        """Load a state dict of numpy arrays or tensors into the model.

        ``"_obs_filter/..."`` entries go to the observation filter; weights without
        them (older checkpoints) leave its statistics as they are.
        """
        model_weights, filter_weights = split_filter_weights(weights)
        if filter_weights and self.obs_filter is None:
            raise ValueError(
                f"{type(self).__name__}.set_weights got observation-filter statistics "
                "but this policy has observation_filter='NoFilter'; build it with "
                "observation_filter='MeanStdFilter' (the config it was trained with)")
        state = {
            k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v, copy=True))
            for k, v in model_weights.items()
        }
        self.model.load_state_dict(state)
        if filter_weights:
            self.obs_filter.set_weights(filter_weights)

    def _weights_state(self) -> dict[str, torch.Tensor]:
        """:meth:`get_weights` as CPU tensors (copies), for :meth:`get_state`."""
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.obs_filter is not None:
            state.update({k: torch.from_numpy(v) for k, v in self.obs_filter.get_weights().items()})
        return state

    def get_state(self) -> dict[str, Any]:
        """Weights, optimizer state and counters as CPU tensors and plain Python values.

        Safe for ``torch.save`` and ``torch.load(..., weights_only=True)`` (no
        numpy arrays or custom classes inside).
        """
        return {
            "weights": self._weights_state(),
            "optimizer": _to_cpu_copy(self.optimizer.state_dict()),
            "global_timestep": int(self.global_timestep),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""
        self.set_weights(state["weights"])
        if state.get("optimizer") is not None:
            # load_state_dict moves the optimizer state onto the parameters' device.
            self.optimizer.load_state_dict(state["optimizer"])
        self.global_timestep = int(state.get("global_timestep", 0))
        self.apply_hyperparameters()  # this policy's lr, not the one saved in the state

    def on_global_var_update(self, global_vars: dict[str, Any]) -> None:
        """Receive global variables (``{"timestep": int}``) from the driver; the
        schedules move to the new timestep."""
        if "timestep" in global_vars:
            self.global_timestep = int(global_vars["timestep"])
            self.apply_hyperparameters()

    def on_episode_start(self, rows: list[int]) -> None:
        """The sampler's batch ``rows`` (env indices) have just started a new episode.

        Called after each auto-reset, before the new episode's first action. The
        default does nothing; a policy with per-row exploration state (DDPG's OU
        noise) restarts those rows here so one episode's noise does not leak into
        the next.
        """

    def optimizer_lrs(self) -> list[tuple[torch.optim.Optimizer, float]]:
        """Each optimizer with the learning rate its config gives it (DDPG: two)."""
        return [(self.optimizer, float(self.config["lr"]))]

    def apply_hyperparameters(self) -> None:
        """Sets every optimizer's lr and :attr:`entropy_coeff` from this policy's config
        and schedules at :attr:`global_timestep`.

        Called after construction, on each timestep update, after :meth:`set_state`
        (an optimizer state loaded from a checkpoint carries the lr it was saved with,
        e.g. a PBT donor's; the policy's own config must win) and after
        :meth:`update_hyperparameters`.
        """
        t = self.global_timestep
        for optimizer, lr in self.optimizer_lrs():
            value = lr if self.lr_schedule is None else self.lr_schedule.value(t)
            for group in optimizer.param_groups:
                group["lr"] = value
        if self.entropy_coeff_schedule is not None:
            self.entropy_coeff = self.entropy_coeff_schedule.value(t)
        elif "entropy_coeff" in self.config:
            self.entropy_coeff = float(self.config["entropy_coeff"])

    #: Config keys :meth:`update_hyperparameters` changes in place (each read by the loss
    #: or by :meth:`apply_hyperparameters` whenever it is used).
    IN_PLACE_KEYS = frozenset({
        "lr", "lr_schedule", "entropy_coeff", "entropy_coeff_schedule", "grad_clip",
        "clip_param", "vf_clip_param", "vf_loss_coeff", "kl_target", "actor_lr", "critic_lr",
        "tau", "gamma", "lambda"})

    def update_hyperparameters(self, changes: dict[str, Any]) -> None:
        """Applies new values of :attr:`IN_PLACE_KEYS` (Tune's ``reset_config``)."""
        unknown = sorted(set(changes) - self.IN_PLACE_KEYS)
        if unknown:
            raise ValueError(f"{type(self).__name__} cannot change {unknown} in place; "
                             f"it can change {sorted(self.IN_PLACE_KEYS)}")
        self.config.update(changes)
        if "lr_schedule" in changes:
            self.lr_schedule = make_schedule(changes["lr_schedule"], "lr_schedule")
        if "entropy_coeff_schedule" in changes:
            self.entropy_coeff_schedule = make_schedule(changes["entropy_coeff_schedule"],
                                                        "entropy_coeff_schedule")
        self.apply_hyperparameters()

    def export(self, export_dir: str) -> str:
        """Write the model as TorchScript (``torch.jit.trace``) to ``export_dir/model.pt``.

        The traced CPU module takes a batch of raw observations (the observation
        filter's current normalization is baked in) and returns ``(dist_inputs,
        value)``. A recurrent policy's takes one step with the state,
        ``(obs, *state_in[, prev_actions][, prev_rewards])``, and returns
        ``(dist_inputs, value, *state_out)`` (see :mod:`flowrl.policies.export`).
        Returns the file path.
        """
        os.makedirs(export_dir, exist_ok=True)
        path = os.path.join(export_dir, "model.pt")
        if self.recurrent:
            traced = to_torchscript(self.with_obs_normalization(
                copy.deepcopy(self.model).cpu().eval()), self.observation_space)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # see below
                traced.save(path)
            return path
        example = example_batches(self.observation_space)[-1]
        if isinstance(example, torch.Tensor) and example.dtype == torch.float64:
            example = example.float()
        model = self.with_obs_normalization(copy.deepcopy(self.model).cpu().eval())
        with warnings.catch_warnings():
            # torch marks jit.trace deprecated, but TorchScript is still the format
            # that loads without Python model code (torch.jit.load, libtorch).
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(model, example)
            traced.save(path)
        return path

    def export_module(self) -> nn.Module:
        """An eager CPU module ``raw obs batch -> greedy actions`` (a copy of the model).

        ``Discrete`` actions: argmax of the logits, int64 ``[B]``. ``Box`` actions: the
        distribution's mean, clipped to the space bounds when ``clip_actions`` is on
        (as the sampler does before stepping the env), ``[B, *action_shape]``. The
        observation filter's current normalization is part of it. This is what
        ``Agent.export_policy`` converts to TorchScript.

        A recurrent policy's module takes and returns the state:
        ``(obs, *state_in[, prev_actions][, prev_rewards]) -> (actions, *state_out)``
        (:class:`~flowrl.policies.export.RecurrentGreedy`).
        """
        model = copy.deepcopy(self.model).cpu().eval()
        clip = bool(self.config.get("clip_actions", True))
        if self.recurrent:
            return RecurrentGreedy(self.with_obs_normalization(model),
                                   greedy_head(self.action_space, self.dist_class.__name__,
                                               clip))
        return self.with_obs_normalization(DistInputsGreedy(
            model, self.action_space, self.dist_class.__name__, clip))

    def with_obs_normalization(self, module: nn.Module) -> nn.Module:
        """``module`` (raw obs in) behind a constant copy of the current observation
        normalization; ``module`` itself without a filter. For exports. A nested
        observation space's module takes one tensor per leaf instead
        (:class:`~flowrl.policies.export.LeafInputs`).

        A recurrent policy's model (given as ``module``) becomes a
        :class:`~flowrl.policies.export.RecurrentStep`: one step on raw observations
        (leaves for a nested space, normalized by the filter) with the state and the
        previous action / reward the model uses.
        """
        if self.recurrent:
            return RecurrentStep(
                module, self.observation_space, self.action_space,
                [torch.as_tensor(part) for part in self.get_initial_state()],
                self.uses_prev_actions, self.uses_prev_rewards,
                normalize=None if self.obs_filter is None else self.obs_filter.module())
        if self.obs_packer.nested:
            return LeafInputs(module, self.observation_space)
        if self.obs_filter is None:
            return module
        return NormalizedInputs(self.obs_filter.module(), module)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(obs={self.observation_space}, actions={self.action_space}, "
            f"device={self.device})"
        )
