"""Action distributions parameterised by a model's flat output (``dist_inputs``).

Plain tensor math instead of ``torch.distributions``: no argument validation,
no broadcasting bookkeeping, and intermediate results (``log_softmax``, ``std``)
are computed once and reused across ``logp`` / ``entropy`` / ``kl`` -- this is
on the learner's hot path.

Every distribution works on a batch: ``inputs`` is ``[B, num_outputs]`` and
``logp`` / ``entropy`` / ``kl`` return ``[B]``.

Which one a space gets (:func:`get_dist_class`): ``Discrete`` -> :class:`Categorical`,
``Box`` -> :class:`DiagGaussian`, ``MultiDiscrete`` / ``MultiBinary`` ->
:class:`MultiCategorical`, ``Tuple`` / ``Dict`` -> :class:`ProductDistribution`. The
last two need the space's sizes, so ``get_dist_class`` returns a subclass bound to
them; the policy builds every distribution the same way, ``dist_class(dist_inputs)``.
"""

from __future__ import annotations

import copyreg
import functools
import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flowrl.data.actions import ActionLayout

__all__ = ["ActionDistribution", "Categorical", "DiagGaussian", "Deterministic",
           "MultiCategorical", "ProductDistribution", "get_dist_class"]

_LOG_2PI = math.log(2.0 * math.pi)


class ActionDistribution:
    """Interface of a batched action distribution built from ``dist_inputs``."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def sample(self) -> torch.Tensor:
        """A random action per row."""
        raise NotImplementedError

    def deterministic_sample(self) -> torch.Tensor:
        """The most likely action (mode) per row."""
        raise NotImplementedError

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        """Log-probability (density) of ``actions``, shape ``[B]``."""
        raise NotImplementedError

    def entropy(self) -> torch.Tensor:
        """Entropy per row, shape ``[B]``."""
        raise NotImplementedError

    def kl(self, other: ActionDistribution) -> torch.Tensor:
        """``KL(self || other)`` per row, shape ``[B]``."""
        raise NotImplementedError


class Categorical(ActionDistribution):
    """Categorical over ``num_outputs`` actions; ``inputs`` are unnormalised logits."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__(inputs)
        self._log_probs: torch.Tensor | None = None
        self._probs: torch.Tensor | None = None

    @property
    def log_probs(self) -> torch.Tensor:
        """Normalised log-probabilities ``[B, n]`` (computed once)."""
        if self._log_probs is None:
            self._log_probs = torch.log_softmax(self.inputs, dim=-1)
        return self._log_probs

    @property
    def probs(self) -> torch.Tensor:
        """Probabilities ``[B, n]`` (computed once; shared by entropy and kl)."""
        if self._probs is None:
            self._probs = self.log_probs.exp()
        return self._probs

    def sample(self) -> torch.Tensor:
        # Gumbel-max: one fused elementwise pass + argmax, cheaper than multinomial.
        u = torch.rand_like(self.inputs).clamp_(min=1e-20)
        return torch.argmax(self.inputs - torch.log(-torch.log(u)), dim=-1)

    def deterministic_sample(self) -> torch.Tensor:
        return torch.argmax(self.inputs, dim=-1)

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        return self.log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        return -(self.probs * self.log_probs).sum(-1)

    def kl(self, other: Categorical) -> torch.Tensor:
        return (self.probs * (self.log_probs - other.log_probs)).sum(-1)


class DiagGaussian(ActionDistribution):
    """Diagonal Gaussian; ``inputs = concat([mean, log_std], -1)``, actions ``[B, k]``."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__(inputs)
        self.mean, self.log_std = torch.chunk(inputs, 2, dim=-1)
        self.std = self.log_std.exp()

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def deterministic_sample(self) -> torch.Tensor:
        return self.mean

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        actions = actions.reshape(self.mean.shape)
        z = (actions - self.mean) / self.std
        k = self.mean.shape[-1]
        return -0.5 * (z * z).sum(-1) - self.log_std.sum(-1) - 0.5 * k * _LOG_2PI

    def entropy(self) -> torch.Tensor:
        return (self.log_std + 0.5 * (_LOG_2PI + 1.0)).sum(-1)

    def kl(self, other: DiagGaussian) -> torch.Tensor:
        var_ratio_term = (self.std.pow(2) + (self.mean - other.mean).pow(2)) / (
            2.0 * other.std.pow(2)
        )
        return (other.log_std - self.log_std + var_ratio_term - 0.5).sum(-1)


class Deterministic(ActionDistribution):
    """A point mass at ``inputs`` (DDPG-style actors); ``sample()`` returns the inputs."""

    def sample(self) -> torch.Tensor:
        return self.inputs

    def deterministic_sample(self) -> torch.Tensor:
        return self.inputs

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.inputs.shape[0], device=self.inputs.device)

    def entropy(self) -> torch.Tensor:
        return torch.zeros(self.inputs.shape[0], device=self.inputs.device)

    def kl(self, other: ActionDistribution) -> torch.Tensor:
        return torch.zeros(self.inputs.shape[0], device=self.inputs.device)


class _Columns:
    """A fixed set of positions on the last dimension: a ``narrow`` view when they are
    contiguous, else ``index_select`` with an index tensor kept per device."""

    def __init__(self, index: np.ndarray) -> None:
        self.index = np.asarray(index, dtype=np.int64)
        self.length = len(self.index)
        contiguous = self.length > 0 and np.array_equal(
            self.index, np.arange(self.index[0], self.index[0] + self.length))
        self.start = int(self.index[0]) if contiguous else -1
        self._tensors: dict[torch.device, torch.Tensor] = {}

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if self.start >= 0:
            return x.narrow(-1, self.start, self.length)
        index = self._tensors.get(x.device)
        if index is None:
            # Made outside inference mode: the first call may come from acting, and
            # an inference tensor could not be used by the learner's autograd later.
            with torch.inference_mode(False):
                index = torch.as_tensor(self.index, device=x.device)
            self._tensors[x.device] = index
        return x.index_select(-1, index)


class _BoundDistribution(type):
    """Metaclass of the distribution classes made for one space's sizes.

    Such a class is made at run time, so plain ``pickle`` could not find it by name;
    it pickles as the (cached) call that makes it instead.
    """


def _pickle_bound(cls: _BoundDistribution) -> tuple[Any, tuple[Any, ...]]:
    return cls._make, (cls._bind_key,)


copyreg.pickle(_BoundDistribution, _pickle_bound)


class MultiCategorical(ActionDistribution):
    """Independent categoricals of sizes ``nvec`` (``MultiDiscrete`` / ``MultiBinary``).

    ``inputs`` are the components' logits side by side, ``[B, sum(nvec)]``; actions
    are int ``[B, k]`` (or any shape with ``k`` elements per row, e.g. a
    ``MultiDiscrete`` space's own shape), one index per component. ``logp``,
    ``entropy`` and ``kl`` sum over the components.

    The sizes live on the class: use ``MultiCategorical.bind(nvec)`` (what
    :func:`get_dist_class` returns) and build it as ``cls(inputs)``. When all sizes
    are equal the logits are one ``[B, k, n]`` view; otherwise they are padded to the
    largest size with ``-inf`` once, so every method is a handful of batched kernels
    whatever ``k`` is.
    """

    #: Component sizes (set on a bound class).
    nvec: tuple[int, ...] = ()
    #: ``sum(nvec)``: the model outputs the distribution needs.
    num_inputs: int = 0
    num_components: int = 0
    max_n: int = 0
    uniform: bool = True
    _pad: _Columns      # [x, -inf] columns -> padded [k * max_n]
    _real: _Columns     # padded positions of the real logits, [sum(nvec)]

    @classmethod
    def bind(cls, nvec: Any) -> type[MultiCategorical]:
        """The ``MultiCategorical`` class for component sizes ``nvec`` (cached)."""
        return _multi_categorical_class(tuple(int(n) for n in np.asarray(nvec).reshape(-1)))

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__(inputs)
        if not self.nvec:
            raise TypeError("MultiCategorical needs its sizes: build it from "
                            "MultiCategorical.bind(nvec) or get_dist_class(space)")
        self._lead = inputs.shape[:-1]
        shape = (*self._lead, self.num_components, self.max_n)
        if self.uniform:
            self.logits = inputs.reshape(shape)
        else:
            pad = inputs.new_full((*self._lead, 1), -math.inf)
            self.logits = self._pad.take(torch.cat([inputs, pad], dim=-1)).reshape(shape)
        self._log_probs: torch.Tensor | None = None
        self._real_log_probs: torch.Tensor | None = None
        self._probs: torch.Tensor | None = None

    @property
    def log_probs(self) -> torch.Tensor:
        """Per-component log-probabilities ``[B, k, max_n]`` (``-inf`` on padding)."""
        if self._log_probs is None:
            # log_softmax by hand: torch's CPU kernel is 2-3x slower on short last
            # dims like these. The max only shifts for stability, so no grad through it.
            z = self.logits - self.logits.detach().amax(dim=-1, keepdim=True)
            self._log_probs = z - z.exp().sum(dim=-1, keepdim=True).log()
        return self._log_probs

    @property
    def real_log_probs(self) -> torch.Tensor:
        """Log-probabilities of the real entries only, ``[B, sum(nvec)]`` (no padding,
        so ``p * log p`` sums need no masking)."""
        if self._real_log_probs is None:
            flat = self.log_probs.reshape(*self._lead, self.num_components * self.max_n)
            self._real_log_probs = flat if self.uniform else self._real.take(flat)
        return self._real_log_probs

    @property
    def probs(self) -> torch.Tensor:
        """Probabilities ``[B, sum(nvec)]`` (computed once; shared by entropy and kl)."""
        if self._probs is None:
            self._probs = self.real_log_probs.exp()
        return self._probs

    def sample(self) -> torch.Tensor:
        # Gumbel-max per component; padding stays at -inf and is never picked.
        u = torch.rand_like(self.logits).clamp_(min=1e-20)
        return torch.argmax(self.logits - torch.log(-torch.log(u)), dim=-1)

    def deterministic_sample(self) -> torch.Tensor:
        return torch.argmax(self.logits, dim=-1)

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        index = actions.reshape(*self._lead, self.num_components, 1).long()
        return self.log_probs.gather(-1, index).squeeze(-1).sum(-1)

    def entropy(self) -> torch.Tensor:
        # Sum of the components' entropies = one sum over all real entries.
        return -(self.probs * self.real_log_probs).sum(-1)

    def kl(self, other: MultiCategorical) -> torch.Tensor:
        return (self.probs * (self.real_log_probs - other.real_log_probs)).sum(-1)


@functools.lru_cache(maxsize=None)
def _multi_categorical_class(nvec: tuple[int, ...]) -> type[MultiCategorical]:
    if not nvec or min(nvec) < 1:
        raise ValueError(f"MultiCategorical needs at least one component and sizes >= 1, "
                         f"got nvec={list(nvec)}")
    k, max_n, total = len(nvec), max(nvec), sum(nvec)
    # Padded position j of component c reads input column offset_c + j, or the extra
    # -inf column (index ``total``) past the component's size.
    offsets = np.concatenate([[0], np.cumsum(nvec)[:-1]]).astype(np.int64)
    pad = np.full((k, max_n), total, dtype=np.int64)
    real = []
    for c, (offset, n) in enumerate(zip(offsets, nvec)):
        pad[c, :n] = np.arange(offset, offset + n)
        real.extend(range(c * max_n, c * max_n + n))
    attrs = {
        "nvec": nvec, "num_inputs": total, "num_components": k, "max_n": max_n,
        "uniform": len(set(nvec)) == 1, "_pad": _Columns(pad.reshape(-1)),
        "_real": _Columns(np.asarray(real)), "_bind_key": nvec,
        "_make": staticmethod(_multi_categorical_class),
        "__qualname__": f"MultiCategorical{list(nvec)}", "__module__": __name__,
    }
    return _BoundDistribution("MultiCategorical", (MultiCategorical,), attrs)


#: One leaf of a product distribution: ("discrete", n), ("multi", nvec) or ("box", size).
LeafSpec = tuple[str, Any]


class ProductDistribution(ActionDistribution):
    """Independent leaves of a ``Tuple`` / ``Dict`` action space (nested ones too).

    ``inputs`` are the leaves' inputs side by side in leaf order (``Discrete(n)``:
    ``n`` logits; ``MultiDiscrete`` / ``MultiBinary``: ``sum(nvec)`` logits with
    ``nvec = [2] * n`` for ``MultiBinary``; ``Box``: mean and log-std,
    ``2 * prod(shape)``). Actions are one float32 row ``[B, D]`` laid out as
    :class:`~flowrl.data.actions.ActionLayout` does: 1 slot per ``Discrete`` leaf
    (its index), one per component of a ``MultiDiscrete`` / ``MultiBinary`` leaf,
    ``prod(shape)`` per ``Box`` leaf. ``logp``, ``entropy`` and ``kl`` sum over the
    leaves.

    All discrete leaves are gathered into one :class:`MultiCategorical` and all
    ``Box`` leaves into one :class:`DiagGaussian`, so the cost does not grow with the
    number of leaves. The layout lives on the class: use :func:`get_dist_class` (or
    ``ProductDistribution.bind(leaf_specs)``) and build it as ``cls(inputs)``.
    """

    #: The leaves, ("discrete", n) | ("multi", nvec) | ("box", size), in row order.
    leaves: tuple[LeafSpec, ...] = ()
    num_inputs: int = 0
    #: ``D``: values per action row.
    num_slots: int = 0
    categorical_class: type[MultiCategorical] | None = None
    has_gaussian: bool = False
    #: Input columns of the discrete leaves' logits (in leaf order) and their row slots.
    categorical_inputs: np.ndarray = np.zeros(0, np.int64)
    categorical_slots: np.ndarray = np.zeros(0, np.int64)
    #: Input columns of the Box leaves' means and log-stds, and their row slots.
    mean_inputs: np.ndarray = np.zeros(0, np.int64)
    log_std_inputs: np.ndarray = np.zeros(0, np.int64)
    gaussian_slots: np.ndarray = np.zeros(0, np.int64)
    _cat_inputs: _Columns
    _gauss_inputs: _Columns     # all means, then all log-stds
    _cat_slots: _Columns
    _gauss_slots: _Columns
    _order: _Columns            # [categorical values, gaussian values] -> row order

    @classmethod
    def bind(cls, leaves: Any) -> type[ProductDistribution]:
        """The ``ProductDistribution`` class for ``leaves`` (cached; see :data:`LeafSpec`)."""
        return _product_class(tuple(
            (kind, tuple(int(n) for n in size) if kind == "multi" else int(size))
            for kind, size in leaves))

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__(inputs)
        if not self.leaves:
            raise TypeError("ProductDistribution needs its leaves: build it from "
                            "get_dist_class(space)")
        self.categorical: MultiCategorical | None = (
            None if self.categorical_class is None
            else self.categorical_class(self._cat_inputs.take(inputs)))
        self.gaussian: DiagGaussian | None = (
            DiagGaussian(self._gauss_inputs.take(inputs)) if self.has_gaussian else None)

    def _row(self, categorical: torch.Tensor | None, gaussian: torch.Tensor | None
             ) -> torch.Tensor:
        """The float32 action rows from the two parts' values."""
        parts = [part.to(torch.float32) for part in (categorical, gaussian)
                 if part is not None]
        values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return self._order.take(values)

    def sample(self) -> torch.Tensor:
        return self._row(None if self.categorical is None else self.categorical.sample(),
                         None if self.gaussian is None else self.gaussian.sample())

    def deterministic_sample(self) -> torch.Tensor:
        return self._row(
            None if self.categorical is None else self.categorical.deterministic_sample(),
            None if self.gaussian is None else self.gaussian.deterministic_sample())

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        total = None
        if self.categorical is not None:
            total = self.categorical.logp(self._cat_slots.take(actions))
        if self.gaussian is not None:
            part = self.gaussian.logp(self._gauss_slots.take(actions).to(self.gaussian.mean.dtype))
            total = part if total is None else total + part
        return total

    def entropy(self) -> torch.Tensor:
        total = None
        if self.categorical is not None:
            total = self.categorical.entropy()
        if self.gaussian is not None:
            part = self.gaussian.entropy()
            total = part if total is None else total + part
        return total

    def kl(self, other: ProductDistribution) -> torch.Tensor:
        total = None
        if self.categorical is not None:
            total = self.categorical.kl(other.categorical)
        if self.gaussian is not None:
            part = self.gaussian.kl(other.gaussian)
            total = part if total is None else total + part
        return total


@functools.lru_cache(maxsize=None)
def _product_class(leaves: tuple[LeafSpec, ...]) -> type[ProductDistribution]:
    if not leaves:
        raise ValueError("ProductDistribution needs at least one leaf")
    nvec: list[int] = []
    cat_inputs: list[int] = []
    cat_slots: list[int] = []
    means: list[int] = []
    log_stds: list[int] = []
    gauss_slots: list[int] = []
    inputs = slots = 0
    for kind, size in leaves:
        if kind == "box":
            means.extend(range(inputs, inputs + size))
            log_stds.extend(range(inputs + size, inputs + 2 * size))
            gauss_slots.extend(range(slots, slots + size))
            inputs, slots = inputs + 2 * size, slots + size
            continue
        sizes = (size,) if kind == "discrete" else tuple(size)
        if kind not in ("discrete", "multi") or not sizes or min(sizes) < 1:
            raise ValueError(f"bad product distribution leaf {(kind, size)}")
        nvec.extend(sizes)
        cat_inputs.extend(range(inputs, inputs + sum(sizes)))
        cat_slots.extend(range(slots, slots + len(sizes)))
        inputs, slots = inputs + sum(sizes), slots + len(sizes)
    # Column j of [categorical values, gaussian values] belongs to row slot order[j];
    # the inverse permutation puts them back in row order.
    order = np.asarray(cat_slots + gauss_slots, dtype=np.int64)
    attrs = {
        "leaves": leaves, "num_inputs": inputs, "num_slots": slots,
        "categorical_class": _multi_categorical_class(tuple(nvec)) if nvec else None,
        "has_gaussian": bool(means),
        "categorical_inputs": np.asarray(cat_inputs, np.int64),
        "categorical_slots": np.asarray(cat_slots, np.int64),
        "mean_inputs": np.asarray(means, np.int64),
        "log_std_inputs": np.asarray(log_stds, np.int64),
        "gaussian_slots": np.asarray(gauss_slots, np.int64),
        "_cat_inputs": _Columns(np.asarray(cat_inputs)),
        "_gauss_inputs": _Columns(np.asarray(means + log_stds)),
        "_cat_slots": _Columns(np.asarray(cat_slots)),
        "_gauss_slots": _Columns(np.asarray(gauss_slots)),
        "_order": _Columns(np.argsort(order)),
        "_bind_key": leaves, "_make": staticmethod(_product_class),
        "__qualname__": f"ProductDistribution{list(leaves)}", "__module__": __name__,
    }
    return _BoundDistribution("ProductDistribution", (ProductDistribution,), attrs)


def _check_start(space: gym.Space, root: gym.Space) -> None:
    # Batches hold the env's values and the distributions index from 0.
    if np.any(np.asarray(space.start) != 0):
        where = "" if space is root else f" in {root}"
        raise ValueError(f"Discrete and MultiDiscrete action spaces must start at 0, got "
                         f"{space}{where} (start={np.asarray(space.start).tolist()})")


def _leaf_spec(space: gym.Space, root: gym.Space) -> LeafSpec:
    if isinstance(space, gym.spaces.Discrete):
        _check_start(space, root)
        return "discrete", int(space.n)
    if isinstance(space, gym.spaces.Box):
        return "box", int(np.prod(space.shape, dtype=np.int64))
    if isinstance(space, gym.spaces.MultiDiscrete):
        _check_start(space, root)
        return "multi", tuple(int(n) for n in space.nvec.reshape(-1))
    # MultiBinary: a categorical of size 2 per bit
    return "multi", (2,) * int(np.prod(space.shape, dtype=np.int64))


def get_dist_class(action_space: gym.Space) -> tuple[type[ActionDistribution], int]:
    """The distribution class for ``action_space`` and the model outputs it needs.

    * ``Discrete(n)`` -> ``(Categorical, n)``;
    * ``Box`` of shape ``s`` -> ``(DiagGaussian, 2 * prod(s))`` (mean and log-std per
      dimension; actions are unbounded samples, clipping to the bounds is the env
      runner's job);
    * ``MultiDiscrete(nvec)`` -> a :class:`MultiCategorical` bound to ``nvec``
      (flattened), ``sum(nvec)`` outputs; ``MultiBinary(n)`` -> one bound to
      ``[2] * n``, ``2 * n`` outputs;
    * ``Tuple`` / ``Dict`` (nested too) of those -> a :class:`ProductDistribution`
      bound to the leaves, the sum of the leaves' outputs.

    Bound classes are built as ``cls(dist_inputs)`` like the others, keep their base
    class's ``__name__``, are cached (the same sizes give the same class) and pickle.
    Discrete and MultiDiscrete spaces must start at 0. Any other space raises
    ``ValueError`` naming it and listing the supported ones.
    """
    if isinstance(action_space, gym.spaces.Discrete):
        if int(action_space.start) != 0:
            raise ValueError(
                f"Discrete action spaces must start at 0, got {action_space} (start={action_space.start})"
            )
        return Categorical, int(action_space.n)
    if isinstance(action_space, gym.spaces.Box):
        return DiagGaussian, 2 * int(np.prod(action_space.shape))
    layout = ActionLayout(action_space)  # ValueError for unsupported spaces
    specs = tuple(_leaf_spec(leaf.space, action_space) for leaf in layout.leaves)
    if not layout.nested:
        multi = MultiCategorical.bind(specs[0][1])
        return multi, multi.num_inputs
    product = _product_class(specs)
    return product, product.num_inputs
