"""IMPALA's V-trace actor-critic (Espeholt et al. 2018): the off-policy target and policy.

Rollout workers act with a behaviour policy ``mu`` (their possibly stale weights);
the learner's current policy ``pi`` is corrected with truncated importance
weights. For one piece ``x_s .. x_{s+n-1}`` of an episode with bootstrap state
``x_{s+n}`` (paper, eq. 1 and its recursive form)::

    rho_t   = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t))
    c_t     = lambda * min(c_bar, pi(a_t|x_t) / mu(a_t|x_t))
    delta_t = rho_t * (r_t + gamma_t V(x_{t+1}) - V(x_t))
    v_t     = V(x_t) + delta_t + gamma_t c_t (v_{t+1} - V(x_{t+1})),   v_{s+n} = V(x_{s+n})
    A_t     = min(rho_pg_bar, pi/mu) * (r_t + gamma_t v_{t+1} - V(x_t))

with ``gamma_t = gamma * (1 - terminated_t)``. The loss per train batch is::

    policy_loss = -mean(log pi(a_t|x_t) * A_t)
    vf_loss     = 0.5 * mean((v_t - V(x_t))^2)
    total       = policy_loss + vf_loss_coeff * vf_loss - entropy_coeff * mean(entropy)

Means run over the valid (unpadded) steps of the train batch, as in the A2C
loss here, so ``lr`` and ``grad_clip`` do not depend on the batch size.

Pieces. A train batch is a concatenation of the sampler's one-episode pieces
(from several workers, possibly mixed with replayed ones). :func:`split_pieces`
recovers them: a new piece starts where ``eps_id`` or ``unroll_id`` changes, after
a ``terminated``/``truncated`` row, or where ``t`` does not count up by one (the
same piece replayed right after itself). Pieces are padded into ``[P, T]``
tensors for the V-trace recursion.

Bootstrap values. The paper's learner bootstraps from its own value of the
state after the piece, so :meth:`VTraceTorchPolicy.learn_on_batch` recomputes
``V(new_obs[-1])`` for every piece with the CURRENT network (in the same
forward pass as the batch's observations) instead of using the ``bootstrap_value``
column written at sampling time; that column is the fallback for batches
without ``new_obs``. Terminated pieces bootstrap with 0.

Recurrent models (``model.use_lstm`` or any
:class:`~flowrl.policies.recurrent.RecurrentModel`). The model runs on sequences
that never cross a piece: each piece is cut every ``model.max_seq_len`` rows, and
each sequence starts from its first row's ``state_in_*`` (as the behaviour policy
had it). The outputs return to rows, and V-trace runs per piece on them exactly as
above. The learner cannot recompute ``V(new_obs[-1])``: it lacks the state after
the piece. So :meth:`VTraceTorchPolicy.postprocess_trajectory` bootstraps each
open piece on the worker from its last row's ``state_out_*`` (and previous action
/ reward), drops the ``state_out_*`` columns, and the learner always uses the
``bootstrap_value`` column.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flowrl.policies.policy import SEQ_INDEX, SEQ_MASK, Policy, TensorDict, _writable
from flowrl.policies.nested import Rows, cat_rows, map_rows, num_rows, records_to_tensors
from flowrl.data.sample_batch import SampleBatch, minibatch_bounds
from flowrl.data.sequences import state_out_key

__all__ = ["BOOTSTRAP_VALUE", "split_pieces", "piece_sequences", "piece_layout", "vtrace",
           "VTraceTorchPolicy"]

#: Column added by :meth:`VTraceTorchPolicy.postprocess_trajectory`.
BOOTSTRAP_VALUE = "bootstrap_value"

# Keys of the learner's tensor dict that hold one entry per piece, or the layout,
# rather than one entry per row.
_PIECE_BOOT_OBS = "_piece_bootstrap_obs"
_PIECE_BOOT_VALUE = "_piece_bootstrap_value"
_PIECE_TERMINATED = "_piece_terminated"
_ROW_INDEX = "_row_index"
_MASK = "_mask"
_PIECE_KEYS = (_PIECE_BOOT_OBS, _PIECE_BOOT_VALUE, _PIECE_TERMINATED)
# Layout entries (pieces, and a recurrent model's sequences): rebuilt per minibatch.
_LAYOUT_KEYS = frozenset({_ROW_INDEX, _MASK, SampleBatch.SEQ_LENS, SEQ_INDEX, SEQ_MASK})


# --------------------------------------------------------------------- pieces
def split_pieces(batch: SampleBatch) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` (int64) of the one-episode pieces of a train batch.

    A piece ends after a row with ``terminateds`` or ``truncateds`` set, and a
    new one starts wherever ``eps_id`` or ``unroll_id`` changes or ``t`` is not
    the previous row's ``t + 1``. Missing columns are simply not used (a batch
    with none of them is one piece). Vectorised: one comparison per column.
    """
    n = batch.count
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    new_piece = np.zeros(n, dtype=bool)
    new_piece[0] = True
    for column in (SampleBatch.TERMINATEDS, SampleBatch.TRUNCATEDS):
        if column in batch:
            new_piece[1:] |= np.asarray(batch[column][:-1], dtype=bool)
    for column in (SampleBatch.EPS_ID, SampleBatch.UNROLL_ID):
        if column in batch:
            ids = np.asarray(batch[column])
            new_piece[1:] |= ids[1:] != ids[:-1]
    if SampleBatch.T in batch:
        # Catches a cut piece followed by itself (replay mixed into the same batch).
        ts = np.asarray(batch[SampleBatch.T])
        new_piece[1:] |= ts[1:] != ts[:-1] + 1
    starts = np.flatnonzero(new_piece).astype(np.int64)
    lengths = np.diff(np.append(starts, n)).astype(np.int64)
    return starts, lengths


def piece_sequences(lengths: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Lengths (int64) of a recurrent model's sequences over contiguous pieces.

    Each piece is cut into runs of ``max_seq_len`` rows plus its remainder, so no
    sequence crosses a piece, e.g. pieces ``[5, 2]`` with ``max_seq_len=3`` give
    ``[3, 2, 2]``.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    lengths = np.asarray(lengths, dtype=np.int64)
    full, rest = np.divmod(lengths, max_seq_len)
    per_piece = full + (rest > 0)
    seq_lens = np.full(int(per_piece.sum()), max_seq_len, dtype=np.int64)
    has_rest = rest > 0
    seq_lens[(np.cumsum(per_piece) - 1)[has_rest]] = rest[has_rest]
    return seq_lens


def piece_layout(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Padding layout for contiguous pieces of the given lengths, stored in order.

    Returns ``(row_index [P, T], mask [P, T])`` with ``T = max(lengths)``:
    ``row_index[p, i]`` is the flat row of step ``i`` of piece ``p`` (0 where
    padded) and ``mask`` marks the valid steps, so ``x[row_index]`` pads a flat
    column and ``padded[mask]`` flattens it back in row order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=bool)
    starts = np.cumsum(lengths) - lengths
    steps = np.arange(int(lengths.max()), dtype=np.int64)
    mask = steps[None, :] < lengths[:, None]
    row_index = np.where(mask, starts[:, None] + steps[None, :], 0)
    return row_index, mask


# --------------------------------------------------------------------- V-trace
def _shift_left(x: torch.Tensor, last: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``x[:, t + 1]``, with ``fill[p]`` at each row's last valid step (and past it)."""
    shifted = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
    return torch.where(last, fill.unsqueeze(1).expand_as(x), shifted)


def vtrace(
    behaviour_logp: torch.Tensor,
    target_logp: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    discounts: torch.Tensor,
    clip_rho: float | None = 1.0,
    clip_pg_rho: float | None = 1.0,
    clip_c: float | None = 1.0,
    lambda_: float = 1.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace targets ``v_s`` and policy-gradient advantages over padded pieces.

    All step inputs are ``[P, T]`` (one piece per row, valid steps first, then
    padding); ``bootstrap_value`` is ``[P]``, the value of the state after each
    piece's last valid step; ``discounts`` is ``gamma * (1 - terminated)`` per
    step; ``mask`` (bool ``[P, T]``, a prefix per row; None = all valid) marks
    the valid steps. ``clip_*=None`` disables that clip; ``lambda_`` scales the
    traces ``c``. Inputs are detached: the results are targets, not
    differentiable. Returns ``(vs, pg_advantages)``, both ``[P, T]``, 0 where
    padded. The backward recursion is one vectorised step over all pieces per
    time index (``T`` iterations, no per-row work).
    """
    behaviour_logp, target_logp, rewards, values, bootstrap_value, discounts = (
        x.detach() for x in (behaviour_logp, target_logp, rewards, values, bootstrap_value, discounts)
    )
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # Padding gets ratio 1 and zero rewards/values so nothing non-finite leaks in.
    rhos = torch.exp(torch.where(mask, target_logp - behaviour_logp, zero))
    clipped_rhos = rhos if clip_rho is None else rhos.clamp(max=float(clip_rho))
    cs = rhos if clip_c is None else rhos.clamp(max=float(clip_c))
    cs = float(lambda_) * cs
    rewards = torch.where(mask, rewards, zero)
    values = torch.where(mask, values, zero)
    discounts = torch.where(mask, discounts, zero)
    bootstrap_value = bootstrap_value.to(values.dtype)

    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    last = mask & ~next_mask  # each piece's last valid step bootstraps
    values_next = _shift_left(values, last, bootstrap_value)
    deltas = clipped_rhos * (rewards + discounts * values_next - values)
    deltas = torch.where(mask, deltas, zero)
    decays = discounts * cs  # 0 on padding, so padding never feeds back

    # v_t - V(x_t) = delta_t + gamma_t c_t (v_{t+1} - V(x_{t+1})); time-major for
    # contiguous per-step slices. Padding after a piece keeps the carry at 0.
    deltas_tm = deltas.t().contiguous()
    decays_tm = decays.t().contiguous()
    corrections_tm = torch.empty_like(deltas_tm)
    carry = torch.zeros_like(deltas_tm[0]) if deltas_tm.shape[0] else None
    for t in range(deltas_tm.shape[0] - 1, -1, -1):
        carry = torch.addcmul(deltas_tm[t], decays_tm[t], carry)
        corrections_tm[t] = carry
    vs = torch.where(mask, values + corrections_tm.t(), zero)

    vs_next = _shift_left(vs, last, bootstrap_value)
    pg_rhos = rhos if clip_pg_rho is None else rhos.clamp(max=float(clip_pg_rho))
    pg_advantages = torch.where(mask, pg_rhos * (rewards + discounts * vs_next - values), zero)
    return vs, pg_advantages


# ---------------------------------------------------------------------- policy
class VTraceTorchPolicy(Policy):
    """IMPALA policy: V-trace actor-critic for Discrete and Box action spaces.

    Config keys read (fallbacks in :attr:`DEFAULT_CONFIG`; the algorithm config
    wins): ``gamma`` (0.99), ``lr`` (5e-4), ``model``, ``grad_clip`` (40.0, global
    norm), ``vf_loss_coeff`` (0.5), ``entropy_coeff`` (0.01),
    ``vtrace_clip_rho_threshold`` (1.0, rho_bar), ``vtrace_clip_pg_rho_threshold``
    (1.0, the policy gradient's rho), ``vtrace_clip_c_threshold`` (1.0, c_bar),
    ``vtrace_lambda`` (1.0, scales the traces c), ``opt_type`` ("adam" |
    "rmsprop"), ``decay`` (0.99, RMSProp's smoothing constant), ``momentum``
    (0.0, RMSProp), ``epsilon`` (0.1, RMSProp; Adam keeps torch's 1e-8),
    ``num_gpus`` (0), ``seed`` (None). A ``None`` clip threshold turns that
    clip off.

    Workers: :meth:`compute_actions` is the base one (``action_logp`` and
    ``action_dist_inputs`` of the behaviour policy, ``vf_preds``);
    :meth:`postprocess_trajectory` adds only ``bootstrap_value``. Learner:
    :meth:`learn_on_batch` (and :meth:`compute_gradients`, :meth:`evaluate_loss`)
    split the batch into pieces with :func:`split_pieces` and run V-trace with
    the current network.

    Recurrent models work too (``model.use_lstm``): sequences of at most
    ``model.max_seq_len`` rows within pieces, bootstrap values from the workers
    (see the module docstring).
    """

    DEFAULT_CONFIG: dict[str, Any] = {
        **Policy.DEFAULT_CONFIG,
        "gamma": 0.99,
        "lr": 5e-4,
        "grad_clip": 40.0,
        "vf_loss_coeff": 0.5,
        "entropy_coeff": 0.01,
        "vtrace_clip_rho_threshold": 1.0,
        "vtrace_clip_pg_rho_threshold": 1.0,
        "vtrace_clip_c_threshold": 1.0,
        "vtrace_lambda": 1.0,
        "opt_type": "adam",
        "decay": 0.99,
        "momentum": 0.0,
        "epsilon": 0.1,
    }

    #: Flat per-row columns the loss reads (``new_obs`` only at piece ends).
    loss_columns: tuple[str, ...] = (
        SampleBatch.OBS,
        SampleBatch.ACTIONS,
        SampleBatch.REWARDS,
        SampleBatch.ACTION_LOGP,
    )

    def __init__(
        self, observation_space: gym.Space, action_space: gym.Space, config: dict[str, Any]
    ) -> None:
        opt_type = str((config or {}).get("opt_type", self.DEFAULT_CONFIG["opt_type"])).lower()
        if opt_type not in ("adam", "rmsprop"):
            raise ValueError(f"opt_type={opt_type!r}; expected 'adam' or 'rmsprop'")
        super().__init__(observation_space, action_space, config)
        if not self.has_critic:
            raise ValueError("V-trace needs a value function; use_critic=False is not supported")

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam (``lr``) or RMSProp (``lr``, ``decay`` as alpha, ``momentum``, ``epsilon``)."""
        lr = float(self.config["lr"])
        if str(self.config.get("opt_type", "adam")).lower() == "rmsprop":
            return torch.optim.RMSprop(
                self._params,
                lr=lr,
                alpha=float(self.config["decay"]),
                momentum=float(self.config["momentum"]),
                eps=float(self.config["epsilon"]),
            )
        return super().make_optimizer()

    # ---------------------------------------------------------- postprocessing
    def postprocess_trajectory(self, batch: SampleBatch) -> SampleBatch:
        """Add the float32 column ``bootstrap_value``; no advantages.

        Per piece (see :func:`split_pieces`; normally the sampler passes one):
        0 if its last row is terminated, else ``V(new_obs[-1])``, repeated on
        every row of the piece. All piece ends go through one forward pass.
        A recurrent policy evaluates ``new_obs[-1]`` from the last row's
        ``state_out_*`` with its action / reward as the previous ones, then drops
        the ``state_out_*`` columns.
        """
        if batch.count == 0:
            batch[BOOTSTRAP_VALUE] = np.zeros(0, dtype=np.float32)
            return self.drop_state_out(batch) if self.recurrent else batch
        starts, lengths = split_pieces(batch)
        ends = starts + lengths - 1
        if SampleBatch.TERMINATEDS in batch:
            terminated = np.asarray(batch[SampleBatch.TERMINATEDS], dtype=bool)[ends]
        else:
            terminated = np.zeros(len(ends), dtype=bool)
        boot = np.zeros(len(ends), dtype=np.float32)
        open_ends = ends[~terminated]
        if open_ends.size:
            if SampleBatch.NEW_OBS not in batch:
                raise ValueError(
                    "postprocess_trajectory needs 'new_obs' to bootstrap a piece that did not terminate"
                )
            new_obs = np.asarray(batch[SampleBatch.NEW_OBS])[open_ends]
            if self.recurrent:
                state = [np.asarray(batch[state_out_key(i)])[open_ends]
                         for i in range(len(self.get_initial_state()))]
                boot[~terminated] = self.value(
                    new_obs, state, np.asarray(batch[SampleBatch.ACTIONS])[open_ends],
                    np.asarray(batch[SampleBatch.REWARDS])[open_ends])
            else:
                boot[~terminated] = self.value(new_obs)
        batch[BOOTSTRAP_VALUE] = np.repeat(boot, lengths)
        return self.drop_state_out(batch) if self.recurrent else batch

    # ---------------------------------------------------------------- learning
    def _to_tensor(self, arr: Any, column: str = "") -> Rows:
        arr = np.asarray(arr)
        if arr.dtype.names is not None:  # nested observations
            return records_to_tensors(arr, self.obs_packer, self.device)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        elif column == SampleBatch.ACTIONS and self._discrete_actions and arr.dtype != np.int64:
            arr = arr.astype(np.int64)
        return torch.from_numpy(_writable(arr)).to(self.device)

    def _batch_to_tensors(self, batch: SampleBatch) -> TensorDict:
        """Row columns, per-piece bootstrap inputs and the ``[P, T]`` layout as tensors.

        Only ``new_obs`` of each piece's last row is moved to the device. A
        recurrent policy's also hold its state / previous-step columns, the
        sequence layout within pieces, and the sampled bootstrap values.
        """
        columns = (*self.loss_columns, *self.recurrent_columns())
        for column in columns:
            if column not in batch:
                raise KeyError(
                    f"{type(self).__name__}.learn_on_batch needs column {column!r}; "
                    f"the batch has {sorted(batch.keys())}"
                )
        starts, lengths = split_pieces(batch)
        ends = starts + lengths - 1
        tensors: TensorDict = {
            c: self._to_tensor(self._normalize_column(c, np.asarray(batch[c])), c)
            for c in columns
        }
        n = batch.count
        terminated = (
            np.asarray(batch[SampleBatch.TERMINATEDS], dtype=bool)
            if SampleBatch.TERMINATEDS in batch
            else np.zeros(n, dtype=bool)
        )
        tensors[SampleBatch.TERMINATEDS] = self._to_tensor(terminated.astype(np.float32))
        tensors[_PIECE_TERMINATED] = self._to_tensor(terminated[ends].astype(np.float32))
        if SampleBatch.NEW_OBS in batch and not self.recurrent:
            tensors[_PIECE_BOOT_OBS] = self._to_tensor(self._normalize_column(
                SampleBatch.NEW_OBS, np.asarray(batch[SampleBatch.NEW_OBS])[ends]))
        elif BOOTSTRAP_VALUE in batch:
            tensors[_PIECE_BOOT_VALUE] = self._to_tensor(
                np.asarray(batch[BOOTSTRAP_VALUE], dtype=np.float32)[ends]
            )
        elif not terminated[ends].all():
            needs = (f"'{BOOTSTRAP_VALUE}' (from postprocess_trajectory: a recurrent model "
                     "needs the state after each piece)" if self.recurrent
                     else f"'new_obs' (or '{BOOTSTRAP_VALUE}')")
            raise KeyError(f"{type(self).__name__}.learn_on_batch needs {needs} to "
                           "bootstrap pieces that did not terminate")
        self._add_layout(tensors, lengths)
        return tensors

    def _add_layout(self, tensors: TensorDict, lengths: np.ndarray) -> None:
        """The ``[P, T]`` piece layout, plus a recurrent model's sequences in the pieces."""
        row_index, mask = piece_layout(lengths)
        tensors[_ROW_INDEX] = torch.from_numpy(row_index).to(self.device)
        tensors[_MASK] = torch.from_numpy(mask).to(self.device)
        if self.recurrent:
            self._add_sequences(tensors, piece_sequences(lengths, self.max_seq_len))

    def loss(self, train_batch: TensorDict) -> tuple[torch.Tensor, TensorDict]:
        """V-trace loss over whole pieces (a tensor dict from :meth:`_batch_to_tensors`)."""
        obs = train_batch[SampleBatch.OBS]
        n = num_rows(obs)
        boot_obs = train_batch.get(_PIECE_BOOT_OBS)
        if boot_obs is not None:
            # One forward for the batch and the states after its pieces.
            dist_inputs, values_all = self.model(cat_rows(obs, boot_obs))
            dist_inputs, values = dist_inputs[:n], values_all[:n]
            boot_values = values_all[n:].detach()
        else:
            # A recurrent model runs on its sequences; outputs come back per row.
            dist_inputs, values = self.model_outputs(train_batch)
            boot_values = train_batch.get(_PIECE_BOOT_VALUE)
            if boot_values is None:  # every piece terminated
                boot_values = torch.zeros_like(train_batch[_PIECE_TERMINATED])
        boot_values = boot_values * (1.0 - train_batch[_PIECE_TERMINATED])

        dist = self.dist_class(dist_inputs)
        logp = dist.logp(train_batch[SampleBatch.ACTIONS])
        entropy = dist.entropy().mean()

        row_index, mask = train_batch[_ROW_INDEX], train_batch[_MASK]
        gamma = float(self.config["gamma"])
        discounts = gamma * (1.0 - train_batch[SampleBatch.TERMINATEDS])
        with torch.no_grad():
            vs, pg_adv = vtrace(
                behaviour_logp=train_batch[SampleBatch.ACTION_LOGP][row_index],
                target_logp=logp.detach()[row_index],
                rewards=train_batch[SampleBatch.REWARDS][row_index],
                values=values.detach()[row_index],
                bootstrap_value=boot_values,
                discounts=discounts[row_index],
                clip_rho=self._threshold("vtrace_clip_rho_threshold"),
                clip_pg_rho=self._threshold("vtrace_clip_pg_rho_threshold"),
                clip_c=self._threshold("vtrace_clip_c_threshold"),
                lambda_=float(self.config.get("vtrace_lambda", 1.0)),
                mask=mask,
            )
            # Pieces are stored contiguously in order, so mask order == row order.
            vs_flat, pg_adv_flat = vs[mask], pg_adv[mask]
            is_ratio = torch.exp(logp.detach() - train_batch[SampleBatch.ACTION_LOGP])
            rho_bar = self._threshold("vtrace_clip_rho_threshold")
            mean_rho = (is_ratio if rho_bar is None else is_ratio.clamp(max=rho_bar)).mean()

        policy_loss = -(logp * pg_adv_flat).mean()
        vf_loss = 0.5 * (vs_flat - values).pow(2).mean()
        total = (
            policy_loss
            + float(self.config["vf_loss_coeff"]) * vf_loss
            - self.entropy_coeff * entropy
        )
        with torch.no_grad():
            explained_var = 1.0 - torch.var(vs_flat - values, correction=0) / torch.var(
                vs_flat, correction=0
            ).clamp(min=1e-8)
        stats: TensorDict = {
            "policy_loss": policy_loss.detach(),
            "vf_loss": vf_loss.detach(),
            "entropy": entropy.detach(),
            "mean_rho": mean_rho,
            "mean_is_ratio": is_ratio.mean(),
            "vf_explained_var": explained_var.detach(),
        }
        return total, stats

    def _threshold(self, key: str) -> float | None:
        value = self.config.get(key, self.DEFAULT_CONFIG.get(key))
        return None if value is None else float(value)

    def _piece_minibatch(
        self, tensors: TensorDict, lengths: np.ndarray, starts: np.ndarray, pieces: np.ndarray
    ) -> TensorDict:
        """The tensor dict restricted to ``pieces`` (indices, in the given order)."""
        sub_lengths = lengths[pieces]
        offsets = np.cumsum(sub_lengths) - sub_lengths
        # Flat rows of the chosen pieces: start of each piece + step within it.
        rows = np.repeat(starts[pieces] - offsets, sub_lengths) + np.arange(int(sub_lengths.sum()))
        rows_t = torch.from_numpy(rows).to(self.device)
        pieces_t = torch.from_numpy(pieces).to(self.device)
        sub: TensorDict = {}
        for key, value in tensors.items():
            if key in _PIECE_KEYS:
                sub[key] = map_rows(lambda t: t.index_select(0, pieces_t), value)
            elif key not in _LAYOUT_KEYS:
                sub[key] = map_rows(lambda t: t.index_select(0, rows_t), value)
        self._add_layout(sub, sub_lengths)
        return sub

    def learn_on_batch(
        self, batch: SampleBatch, num_sgd_iter: int = 1, sgd_minibatch_size: int = 0
    ) -> dict[str, float]:
        """``num_sgd_iter`` epochs of V-trace SGD on ``batch``; returns float stats.

        ``sgd_minibatch_size`` 0 (IMPALA's usual single step) uses the whole batch;
        otherwise each epoch shuffles whole pieces and groups them into
        minibatches of about that many rows (pieces are never split, so a
        minibatch may run over by up to one piece; a recurrent model's sequences,
        which lie within pieces, stay whole with them). Each step recomputes the
        V-trace targets with the current network. Stats (``policy_loss``,
        ``vf_loss``, ``entropy``, ``total_loss``, ``mean_rho``, ``mean_is_ratio``,
        ``vf_explained_var``, ``grad_gnorm``) are averaged over the last epoch's
        steps, plus ``cur_lr``. Afterwards the batch's raw ``obs`` join the
        observation filter's statistics.
        """
        if batch.count == 0:
            raise ValueError(f"{type(self).__name__}.learn_on_batch got an empty batch")
        tensors = self._batch_to_tensors(batch)
        starts, lengths = split_pieces(batch)
        self.model.train()
        last_epoch: list[TensorDict] = []
        single = sgd_minibatch_size <= 0 or sgd_minibatch_size >= batch.count
        for _ in range(max(1, int(num_sgd_iter))):
            last_epoch = []
            if single:
                groups = [tensors]
            else:
                order = self._rng.permutation(len(lengths))
                # Piece k joins the minibatch in which its first row falls.
                first_rows = np.cumsum(lengths[order]) - lengths[order]
                bounds = minibatch_bounds(int(lengths.sum()), int(sgd_minibatch_size))
                group_of = np.searchsorted([s for s, _ in bounds], first_rows, side="right") - 1
                groups = [
                    self._piece_minibatch(tensors, lengths, starts, order[group_of == g])
                    for g in range(len(bounds))
                    if np.any(group_of == g)
                ]
            for minibatch in groups:
                stats = self._backward(minibatch)
                self.optimizer.step()
                last_epoch.append(stats)
        summary = self._summarize(last_epoch)
        self._update_obs_filter(batch)  # after the SGD, as in Policy.learn_on_batch
        return summary
