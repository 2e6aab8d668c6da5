"""Observation filters: mergeable running statistics and mean/std normalization.

Two users, one statistic (:class:`RunningStat`, exact parallel merging):

* ES (:class:`MeanStdFilter`, :class:`NoFilter`, :func:`make_filter`): NumPy filters
  whose statistics are frozen during an iteration; workers record what they see into
  a buffer that the driver merges after the update (see ``flowrl/policies/es.py``).
* The torch :class:`~flowrl.policies.policy.Policy` (:class:`ObservationNormalizer`,
  built by :func:`make_observation_normalizer` from ``config["observation_filter"]``)::

      normalizer = make_observation_normalizer("MeanStdFilter", obs_space)
      x = normalizer.normalize(obs)            # clip((obs - mean) / (std + 1e-8), -10, 10)
      normalizer.update(raw_train_obs)         # the learner, after its SGD
      weights.update(normalizer.get_weights()) # travels with the model weights

  ``"NoFilter"`` gives ``None``: the policy then skips normalization entirely.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

__all__ = ["FILTER_CHOICES", "FILTER_WEIGHTS_PREFIX", "RunningStat", "MeanStdFilter",
           "NoFilter", "make_filter", "check_filter_name", "ObservationNormalizer",
           "NormalizeObservations", "NormalizedInputs", "make_observation_normalizer",
           "split_filter_weights"]

#: The values of the ``observation_filter`` config key.
FILTER_CHOICES = ("MeanStdFilter", "NoFilter", "auto")

#: Prefix of the filter's entries in a policy's weights (``"_obs_filter/mean"``, ...);
#: no torch state-dict key starts with an underscore-led module name like this one.
FILTER_WEIGHTS_PREFIX = "_obs_filter/"


def _to_numpy(value: Any) -> Any:
    """Tensors (from checkpoints) -> arrays; anything else unchanged."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def check_filter_name(name: Any, key: str = "observation_filter") -> str:
    """``name`` if it is one of :data:`FILTER_CHOICES`, else a ValueError naming it."""
    if name not in FILTER_CHOICES:
        raise ValueError(f"{key}={name!r}; expected 'MeanStdFilter' (normalize "
                         "observations by a running mean and std), 'NoFilter' or 'auto' "
                         "(MeanStdFilter for flat float vectors, else NoFilter).")
    return name


# ------------------------------------------------------------------ statistics
class RunningStat:
    """Count, mean and sum of squared deviations (``m2``) of a stream of vectors.

    Mergeable: ``a.merge(b)`` gives exactly the statistics of the concatenated data
    (Chan et al.'s parallel update), so workers' partial statistics combine on the
    driver without shipping observations.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.count = 0
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self.m2 = np.zeros(self.shape, dtype=np.float64)

    @classmethod
    def of_batch(cls, batch: np.ndarray, shape: tuple[int, ...]) -> "RunningStat":
        """The statistics of the rows of ``batch`` (shape ``[k, *shape]``) alone."""
        stat = cls(shape)
        stat.push(batch)
        return stat

    def copy(self) -> "RunningStat":
        """An independent copy (merging into it leaves this one unchanged)."""
        other = RunningStat(self.shape)
        other.count, other.mean, other.m2 = self.count, self.mean.copy(), self.m2.copy()
        return other

    def push(self, batch: np.ndarray) -> None:
        """Adds the rows of ``batch`` (shape ``[k, *shape]``)."""
        batch = np.asarray(batch, dtype=np.float64).reshape((-1,) + self.shape)
        if len(batch) == 0:
            return
        other = RunningStat(self.shape)
        other.count = len(batch)
        other.mean = batch.mean(axis=0)
        other.m2 = np.square(batch - other.mean).sum(axis=0)
        self.merge(other)

    def merge(self, other: "RunningStat") -> None:
        """Adds another stream's statistics (order-independent up to rounding)."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge observation statistics of shape {other.shape} "
                             f"into statistics of shape {self.shape}")
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        """Population variance (``ddof=0``); ones before any data."""
        if self.count == 0:
            return np.ones(self.shape, dtype=np.float64)
        return self.m2 / self.count

    def to_dict(self) -> dict[str, Any]:
        """NumPy form, for shipping between processes."""
        return {"count": int(self.count), "mean": self.mean.copy(), "m2": self.m2.copy()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], shape: tuple[int, ...]) -> "RunningStat":
        stat = cls(shape)
        stat.count = int(data["count"])
        stat.mean = np.array(data["mean"], dtype=np.float64).reshape(stat.shape)
        stat.m2 = np.array(data["m2"], dtype=np.float64).reshape(stat.shape)
        return stat


# ------------------------------------------------------------------ ES filters
class MeanStdFilter:
    """``clip((obs - mean) / std, -clip, clip)`` with frozen statistics plus a buffer.

    ES's filter. ``record(obs)`` only adds to :attr:`buffer`; the statistics used for
    normalization change only through :meth:`merge_buffer` (on the driver) or
    :meth:`set_state` (a broadcast). The variance floor (1e-2) and the clip (5)
    are those of the paper's reference code.
    """

    VAR_FLOOR = 1e-2

    def __init__(self, shape: tuple[int, ...], clip: float = 5.0):
        self.shape = tuple(shape)
        self.clip = float(clip)
        self.stats = RunningStat(self.shape)
        self.buffer = RunningStat(self.shape)
        self._refresh()

    def _refresh(self) -> None:
        # Cached so that the per-step call is two vector ops and a clip.
        self._mean = self.stats.mean.astype(np.float32)
        self._inv_std = (1.0 / np.sqrt(np.maximum(self.stats.var, self.VAR_FLOOR))
                         ).astype(np.float32)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return np.clip((obs - self._mean) * self._inv_std, -self.clip, self.clip)

    def record(self, obs_batch: np.ndarray) -> None:
        """Adds observations to the buffer (not to the statistics in use)."""
        self.buffer.push(obs_batch)

    def pop_buffer(self) -> dict[str, Any]:
        """The buffer's statistics since the last call (NumPy dict); clears it."""
        out = self.buffer.to_dict()
        self.buffer = RunningStat(self.shape)
        return out

    def merge_buffer(self, buffer: dict[str, Any]) -> None:
        """Merges a worker's :meth:`pop_buffer` result into the statistics."""
        self.stats.merge(RunningStat.from_dict(buffer, self.shape))
        self._refresh()

    def get_state(self) -> dict[str, Any]:
        """The statistics as tensors and ints (``torch.load(weights_only=True)`` safe)."""
        return {"count": int(self.stats.count), "mean": torch.from_numpy(self.stats.mean.copy()),
                "m2": torch.from_numpy(self.stats.m2.copy())}

    def set_state(self, state: dict[str, Any]) -> None:
        """Loads statistics (tensors or arrays); the buffer is cleared."""
        self.stats = RunningStat.from_dict({k: _to_numpy(v) for k, v in state.items()},
                                           self.shape)
        self.buffer = RunningStat(self.shape)
        self._refresh()


class NoFilter(MeanStdFilter):
    """Identity observation filter with the same interface (records nothing)."""

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return obs

    def record(self, obs_batch: np.ndarray) -> None:
        """NoFilter keeps no statistics."""


def make_filter(name: str, shape: tuple[int, ...]) -> MeanStdFilter:
    """ES's filter: ``"MeanStdFilter"`` or ``"NoFilter"``."""
    if check_filter_name(name) == "MeanStdFilter":
        return MeanStdFilter(shape)
    return NoFilter(shape)


# ------------------------------------------------------- torch policies' filter
class NormalizeObservations(nn.Module):
    """``clip((obs - mean) / denom, -clip, clip)`` in float32, with constant buffers.

    ``denom`` is ``std + epsilon``. The exported (TorchScript) form of an
    :class:`ObservationNormalizer` at one moment.
    """

    def __init__(self, mean: torch.Tensor, denom: torch.Tensor, clip: float) -> None:
        super().__init__()
        self.clip = float(clip)
        self.register_buffer("mean", mean.detach().cpu().clone())
        self.register_buffer("denom", denom.detach().cpu().clone())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.clamp((obs.to(torch.float32) - self.mean) / self.denom,
                           -self.clip, self.clip)


class NormalizedInputs(nn.Module):
    """``model(normalize(obs))``: a model that takes raw observations (for export)."""

    def __init__(self, normalize: NormalizeObservations, model: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.model = model

    # No return annotation: TorchScript infers it (a tensor of actions for an export
    # module, the model's tuple for Policy.export's traced model).
    def forward(self, obs: torch.Tensor):  # noqa: ANN201
        return self.model(self.normalize(obs))


class ObservationNormalizer:
    """The torch policies' ``MeanStdFilter``: running mean/std of raw vector observations.

    ``normalize(x) = clip((x - mean) / (std + 1e-8), -10, 10)`` in float32 NumPy,
    before the batch becomes a tensor (population std; mean 0 and std 1 before any
    data). NumPy because the usual inputs are small (a few observations per action):
    there it is several times cheaper than torch ops, and float32 subtraction,
    division and clipping give the same bits as the exported torch module. The
    statistics change only through :meth:`update` / :meth:`merge` (the learner, once
    per training batch) and :meth:`set_weights` (a broadcast or a checkpoint), so
    everything acting between two updates normalizes the same way.

    Updates swap whole objects (never write into arrays in place), so a thread that
    reads the weights while a learner thread updates sees the old or the new
    statistics, not a mix.
    """

    EPSILON = 1e-8
    CLIP = 10.0

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.stats = RunningStat(self.shape)
        self._refresh()

    def _refresh(self) -> None:
        mean = self.stats.mean.astype(np.float32)
        denom = (np.sqrt(self.stats.var) + self.EPSILON).astype(np.float32)
        # One assignment: normalize() never pairs a new mean with an old std.
        self._arrays = (mean, denom)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """A normalized float32 copy of a ``[B, *shape]`` batch of raw observations."""
        mean, denom = self._arrays
        out = np.subtract(obs, mean, dtype=np.float32)
        np.divide(out, denom, out=out)
        return np.clip(out, -self.CLIP, self.CLIP, out=out)

    def batch_stats(self, raw_obs: np.ndarray) -> RunningStat:
        """Statistics of ``raw_obs`` alone (what :meth:`update` would add)."""
        return RunningStat.of_batch(raw_obs, self.shape)

    def update(self, raw_obs: np.ndarray) -> None:
        """Adds the rows of ``raw_obs`` (``[k, *shape]``) to the statistics."""
        self.merge(self.batch_stats(raw_obs))

    def merge(self, other: RunningStat) -> None:
        """Adds statistics computed elsewhere (an A3C worker's batch)."""
        merged = self.stats.copy()
        merged.merge(other)
        self.stats = merged
        self._refresh()

    def module(self) -> NormalizeObservations:
        """The current normalization as a CPU module with constant buffers (export)."""
        mean, denom = self._arrays
        return NormalizeObservations(torch.from_numpy(mean), torch.from_numpy(denom), self.CLIP)

    def get_weights(self) -> dict[str, np.ndarray]:
        """``{"_obs_filter/count"|"mean"|"m2": array}`` (copies), to add to the weights."""
        stats = self.stats
        return {f"{FILTER_WEIGHTS_PREFIX}count": np.array(stats.count, dtype=np.int64),
                f"{FILTER_WEIGHTS_PREFIX}mean": stats.mean.copy(),
                f"{FILTER_WEIGHTS_PREFIX}m2": stats.m2.copy()}

    def set_weights(self, weights: dict[str, Any]) -> None:
        """Loads what :meth:`get_weights` returned (arrays or tensors, prefixed keys)."""
        names = {f"{FILTER_WEIGHTS_PREFIX}{k}" for k in ("count", "mean", "m2")}
        if set(weights) != names:
            raise ValueError(f"observation-filter weights need exactly the keys "
                             f"{sorted(names)}, got {sorted(weights)}")
        data = {k[len(FILTER_WEIGHTS_PREFIX):]: np.asarray(_to_numpy(v))
                for k, v in weights.items()}
        if data["count"].size != 1:
            raise ValueError(f"observation-filter count must be one number, got shape "
                             f"{data['count'].shape}")
        # A 0-d count may arrive as shape (1,) (e.g. through the serving wire format).
        data["count"] = int(data["count"].reshape(-1)[0])
        mean = data["mean"]
        if mean.shape != self.shape:
            raise ValueError(f"observation-filter statistics of shape {mean.shape} do not "
                             f"fit observations of shape {self.shape}")
        self.stats = RunningStat.from_dict(data, self.shape)
        self._refresh()


def make_observation_normalizer(name: Any, observation_space: gym.Space
                                ) -> ObservationNormalizer | None:
    """An :class:`ObservationNormalizer` for ``"MeanStdFilter"``, None for ``"NoFilter"``;
    ``"auto"`` is ``"MeanStdFilter"`` for a 1-D float ``Box`` and ``"NoFilter"`` otherwise.

    ``MeanStdFilter`` normalizes vector observations: it needs a ``Box`` space of a
    non-``uint8`` dtype and raises a ValueError naming the space otherwise (images and
    ``Discrete`` / ``Dict`` observations are left to the model's own preprocessing).
    """
    if check_filter_name(name) == "NoFilter":
        return None
    if name == "auto":  # MeanStdFilter where it applies: flat float vectors
        vector = isinstance(observation_space, gym.spaces.Box) and \
            np.dtype(observation_space.dtype).kind == "f" and len(observation_space.shape) == 1
        return ObservationNormalizer(observation_space.shape) if vector else None
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(f"observation_filter='MeanStdFilter' normalizes vector (Box) "
                         f"observations; this env's observation space is "
                         f"{observation_space!r}. Use observation_filter='NoFilter'.")
    if np.dtype(observation_space.dtype) == np.uint8:
        raise ValueError(f"observation_filter='MeanStdFilter' is for vector observations, "
                         f"not uint8 images like {observation_space!r} (the image models "
                         f"scale pixels themselves). Use observation_filter='NoFilter'.")
    return ObservationNormalizer(observation_space.shape)


def split_filter_weights(weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model weights, observation-filter weights)`` of a policy's weights dict."""
    model, stats = {}, {}
    for key, value in weights.items():
        (stats if key.startswith(FILTER_WEIGHTS_PREFIX) else model)[key] = value
    return model, stats
