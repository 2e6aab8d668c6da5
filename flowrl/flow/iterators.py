"""Driver-side lazy iterators: :class:`LocalIterator`, ``NotReady``, union/concurrently.

Everything here is pull-based: building a pipeline only records operators;
work happens when someone calls ``next()`` on the final iterator::

    it = (from_items([1, 2, 3, 4], name="Numbers")
          .for_each(lambda x: x * 10)
          .filter(lambda x: x > 10)
          .batch(2))
    repr(it)   # "Numbers -> <lambda> -> filter(<lambda>) -> batch(2)"
    next(it)   # [20, 30]

Non-blocking protocol: an iterator may yield the ``NotReady`` singleton,
meaning "nothing yet, ask again later". Every operator passes it through, and a
``for_each`` function that returns ``NotReady`` gets the same item again on
the next pull.

A LocalIterator is driven by one thread at a time (Python generators cannot
run concurrently); cross-thread handoff goes through queues in ``flowrl.ops``.
"""

from __future__ import annotations

import numbers
import random
import threading
import time
from collections import deque
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from flowrl.flow.generators import (_MAX_BACKOFF_S, _MIN_BACKOFF_S, NotReady, SourcedItem,
                                    _accepts_arg, _batch_gen, _combine_gen, _filter_gen,
                                    _flatten_gen, _fn_name, _for_each_gen, _guarded_source,
                                    _shuffle_gen)
from flowrl.flow.metrics import Metrics

__all__ = ["NotReady", "SourcedItem", "LocalIterator", "from_items", "concurrently"]

T = TypeVar("T")
U = TypeVar("U")

# --------------------------------------------------------------------------
# LocalIterator
# --------------------------------------------------------------------------

class LocalIterator(Generic[T]):
    """A lazy, pull-based chain of named operators that runs on the driver.

    ``base(non_blocking)`` builds the underlying iterator on the first
    ``next()``; ``non_blocking=True`` is passed when the iterator is an input
    of an async ``union``/``concurrently`` (a source should then yield
    ``NotReady`` instead of blocking). Example::

        metrics = Metrics()

        def source(non_blocking: bool):
            while True:
                yield read_sensor()

        it = LocalIterator(source, metrics, name="Sensor")
        it = it.for_each(normalize).batch(32)
        repr(it)            # "Sensor -> normalize -> batch(32)"
        first = it.take(3)  # three batches

    Operators return new iterators that consume this one; keep using only the
    last one (use ``duplicate`` to fan out).
    """

    def __init__(self, base: Callable[[bool], Iterable[T]], metrics: Metrics | None = None,
                 name: str = "LocalIterator") -> None:
        if not callable(base):
            raise TypeError(f"LocalIterator base must be a callable base(non_blocking) "
                            f"returning an iterator, got {base!r}")
        self._base = base if _accepts_arg(base) else (lambda _nb, _b=base: _b())
        self.metrics = metrics
        self.name = name
        self._it: Iterator[T] | None = None
        # User-supplied sources get their errors annotated; derived operators
        # annotate their own function calls instead.
        self._guard = True
        # Set only on fresh gathers: builds the SourcedItem(actor, item) variant.
        self._source_factory: Callable[[], LocalIterator[Any]] | None = None

    # -- iteration ----------------------------------------------------------
    def _build(self, non_blocking: bool = False) -> Iterator[T]:
        """Create the underlying iterator once (first builder's mode wins)."""
        if self._it is None:
            it = iter(self._base(non_blocking))
            if self._guard:
                it = _guarded_source(it, self.name)
            self._it = it
        return self._it

    def __iter__(self) -> "LocalIterator[T]":
        return self

    def __next__(self) -> T:
        it = self._it
        if it is None:
            it = self._build(False)
        return next(it)

    def __repr__(self) -> str:
        return self.name

    def _derive(self, op: str, make: Callable[[Iterator[Any], str], Iterable[Any]]
                ) -> "LocalIterator[Any]":
        chain = f"{self.name} -> {op}"
        parent = self

        def base(non_blocking: bool) -> Iterable[Any]:
            return make(parent._build(non_blocking), chain)

        child: LocalIterator[Any] = LocalIterator(base, self.metrics, chain)
        child._guard = False
        return child

    # -- transforms -----------------------------------------------------------
    def for_each(self, fn: Callable[[T], U], name: str | None = None) -> "LocalIterator[U]":
        """Apply ``fn`` to every item: ``rollouts.for_each(TrainOneStep(workers))``.

        ``NotReady`` from upstream passes through without calling ``fn``. If
        ``fn`` returns ``NotReady`` (e.g. a full queue), this pull yields
        ``NotReady`` and the next pull offers the same item to ``fn`` again.
        ``name`` defaults to ``repr(fn)`` when fn's class defines ``__repr__``,
        else to the function/class name.
        """
        op = name or _fn_name(fn)
        return self._derive(op, lambda up, chain: _for_each_gen(up, fn, op, chain))

    def filter(self, pred: Callable[[T], bool], name: str | None = None) -> "LocalIterator[T]":
        """Keep items where ``pred(item)`` is true: ``it.filter(lambda b: b.count > 0)``."""
        op = name or f"filter({_fn_name(pred)})"
        return self._derive(op, lambda up, chain: _filter_gen(up, pred, op, chain))

    def batch(self, n: int) -> "LocalIterator[list[T]]":
        """Group real items into lists of ``n``: ``replay.batch(4).for_each(learn)``.

        A finite stream ends with its last, possibly shorter, batch.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"batch size must be an int >= 1, got {n!r}")
        return self._derive(f"batch({n})", lambda up, chain: _batch_gen(up, n))

    def flatten(self) -> "LocalIterator[Any]":
        """Yield the elements of each (iterable) item: ``it.batch(2).flatten()``."""
        return self._derive("flatten", lambda up, chain: _flatten_gen(up, "flatten", chain))

    def combine(self, fn: Callable[[T], Iterable[U]], name: str | None = None
                ) -> "LocalIterator[U]":
        """``for_each(fn)`` then ``flatten()`` as one named operator.

        ``fn`` returns a list (possibly empty), e.g. a batch concatenator that
        buffers until a minimum size: ``rollouts.combine(ConcatBatches(4000))``.
        """
        op = name or _fn_name(fn)
        return self._derive(op, lambda up, chain: _combine_gen(up, fn, op, chain))

    def shuffle(self, buffer_size: int, seed: int | None = None) -> "LocalIterator[T]":
        """Shuffle locally through a buffer of ``buffer_size`` items: ``it.shuffle(100, seed=0)``.

        The buffer is drained in random order when the stream ends.
        """
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an int >= 1, got {buffer_size!r}")
        return self._derive(f"shuffle({buffer_size})",
                            lambda up, chain: _shuffle_gen(up, buffer_size, seed))

    def take(self, n: int) -> list[T]:
        """Pull ``n`` real items (fewer if the stream ends): ``results = plan.take(3)``.

        ``NotReady`` is skipped with a short, growing sleep (0.1 ms .. 5 ms).
        """
        out: list[T] = []
        delay = _MIN_BACKOFF_S
        while len(out) < n:
            try:
                item = next(self)
            except StopIteration:
                break
            if item is NotReady:
                time.sleep(delay)
                delay = min(2 * delay, _MAX_BACKOFF_S)
                continue
            delay = _MIN_BACKOFF_S
            out.append(item)
        return out

    def zip_with_source_actor(self) -> "LocalIterator[SourcedItem[T]]":
        """Yield :class:`SourcedItem` ``(actor, item)`` pairs from a fresh gather::

            replay = from_actors(replay_actors, "Replay").gather_async(num_async=4)
            for sourced in replay.zip_with_source_actor(): ...   # .actor, .item

        Same as ``gather_async(..., with_source=True)``. Only valid directly on
        the iterator returned by ``gather_async()``/``gather_sync()`` before any
        transform is added or any item pulled.
        """
        if self._source_factory is None:
            raise ValueError(
                f"zip_with_source_actor() is only valid directly on the iterator returned "
                f"by ParallelIterator.gather_async()/gather_sync(), before any transform is "
                f"added; got '{self.name}'. Use gather_async(..., with_source=True) and "
                f"transform the SourcedItem(actor, item) pairs instead.")
        if self._it is not None:
            raise ValueError(f"zip_with_source_actor() must be called before pulling from "
                             f"'{self.name}'")
        return self._source_factory()

    # -- fan-out / fan-in -------------------------------------------------------
    def duplicate(self, n: int, max_lag: int = 32) -> list["LocalIterator[T]"]:
        """Split into ``n`` children that each see every item, in order::

            train_copy, store_copy = rollouts.duplicate(2)
            op1 = train_copy.for_each(TrainOneStep(workers))
            op2 = store_copy.for_each(StoreToReplay(buffer))
            plan = concurrently([op1, op2], mode="async", output_indexes=[0])

        A child that pulls with an empty queue pulls from this iterator and
        appends the item to the other children's queues. If another child's
        queue already holds ``max_lag`` items, the puller gets ``NotReady``
        instead, so memory stays bounded (a child that is never pulled stalls
        the others: drive all children, e.g. with ``concurrently``).
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"duplicate(n) needs an int n >= 1, got {n!r}")
        if not isinstance(max_lag, int) or max_lag < 1:
            raise ValueError(f"max_lag must be an int >= 1, got {max_lag!r}")
        queues: list[deque[Any]] = [deque() for _ in range(n)]
        lock = threading.Lock()
        parent = self
        _END = object()

        def make_base(i: int) -> Callable[[bool], Iterator[Any]]:
            def base(non_blocking: bool) -> Iterator[Any]:
                up = parent._build(non_blocking)
                mine = queues[i]
                others = [q for j, q in enumerate(queues) if j != i]
                while True:
                    if mine:
                        yield mine.popleft()
                        continue
                    with lock:
                        if mine:
                            item = mine.popleft()
                        elif any(len(q) >= max_lag for q in others):
                            item = NotReady  # a sibling lags: don't buffer more
                        else:
                            try:
                                item = next(up)
                            except StopIteration:
                                item = _END
                            if item is not NotReady and item is not _END:
                                for q in others:
                                    q.append(item)
                    if item is _END:
                        return
                    yield item
            return base

        children = []
        for i in range(n):
            child: LocalIterator[T] = LocalIterator(make_base(i), self.metrics,
                                                    f"{self.name} -> Duplicate[{i}]")
            child._guard = False
            children.append(child)
        return children

    def union(self, *others: "LocalIterator[Any]", deterministic: bool = False,
              round_robin_weights: list[Any] | None = None, seed: int | None = 0
              ) -> "LocalIterator[Any]":
        """Merge this iterator with ``others``::

            merged = store_op.union(replay_op, deterministic=True,
                                    round_robin_weights=[1, "*"])

        ``deterministic=True``: round robin; per-input weight ``int w`` pulls w
        items per turn, a float pulls ``int(w)`` items plus one more with
        probability ``w - int(w)`` (so 0.25 means "one item with probability
        1/4"; the coin is a ``random.Random(seed)`` owned by the union), ``"*"``
        pulls until the input yields ``NotReady``. ``NotReady`` ends an input's
        turn; a round in which nothing was produced and some input was not
        ready yields ``NotReady``.

        ``deterministic=False``: inputs are built non-blocking and polled in
        turn; when a pass yields nothing the union sleeps briefly (0.1 ms
        doubling to 5 ms), or yields ``NotReady`` if it is itself non-blocking.

        All inputs must share one Metrics object (inputs without one adopt it).
        """
        return _make_union([self, *others], deterministic, round_robin_weights, seed,
                           output_indexes=None, label="Union")


# --------------------------------------------------------------------------
# union / concurrently
# --------------------------------------------------------------------------

def _check_weights(weights: list[Any], n: int) -> list[Any]:
    if len(weights) != n:
        raise ValueError(f"round_robin_weights has {len(weights)} entries for {n} inputs: "
                         f"{weights!r}")
    out: list[Any] = []
    for w in weights:
        if isinstance(w, str) and w == "*":
            out.append("*")
        elif isinstance(w, bool) or not isinstance(w, numbers.Real) or not w > 0:
            raise ValueError(f"each round robin weight must be an int >= 1, a float > 0 "
                             f"(fractional part = probability of one more pull) or '*'; "
                             f"got {w!r} in {weights!r}")
        else:
            # numpy scalars from config arithmetic are fine too.
            out.append(int(w) if isinstance(w, numbers.Integral) else float(w))
    return out


def _round_robin_gen(its: list[Iterator[Any]], weights: list[Any], rng: random.Random,
                     out_mask: list[bool] | None) -> Iterator[Any]:
    nexts = [it.__next__ for it in its]
    active = list(range(len(its)))
    while active:
        produced = False
        saw_not_ready = False
        for idx in list(active):
            w = weights[idx]
            if w == "*":
                quota = -1
            else:
                whole = int(w)
                frac = w - whole
                quota = whole + (1 if frac > 0 and rng.random() < frac else 0)
            pulled = 0
            nxt = nexts[idx]
            while quota < 0 or pulled < quota:
                try:
                    item = nxt()
                except StopIteration:
                    active.remove(idx)
                    break
                if item is NotReady:
                    saw_not_ready = True
                    break
                pulled += 1
                produced = True
                if out_mask is None or out_mask[idx]:
                    yield item
                else:
                    # A dropped item still hands the consumer a turn (NotReady), so it
                    # can end an iteration while only side-effect branches progress.
                    yield NotReady
        if not produced and saw_not_ready:
            yield NotReady


def _async_union_gen(its: list[Iterator[Any]], non_blocking: bool,
                     out_mask: list[bool] | None) -> Iterator[Any]:
    nexts = [it.__next__ for it in its]
    active = list(range(len(its)))
    delay = _MIN_BACKOFF_S
    while active:
        produced = False
        for idx in list(active):
            try:
                item = nexts[idx]()
            except StopIteration:
                active.remove(idx)
                continue
            if item is NotReady:
                continue
            produced = True
            if out_mask is None or out_mask[idx]:
                yield item
            else:
                yield NotReady  # dropped: the consumer still gets a turn
        if produced:
            delay = _MIN_BACKOFF_S
        elif active:
            if non_blocking:
                yield NotReady
            else:
                time.sleep(delay)
                delay = min(2 * delay, _MAX_BACKOFF_S)


def _make_union(inputs: list[Any], deterministic: bool, weights: list[Any] | None,
                seed: int | None, output_indexes: list[int] | None, label: str
                ) -> LocalIterator[Any]:
    for it in inputs:
        if not isinstance(it, LocalIterator):
            hint = (" (turn a ParallelIterator into a LocalIterator with gather_sync() or "
                    "gather_async() first)" if hasattr(it, "gather_async") else "")
            raise TypeError(f"{label.lower()} inputs must be LocalIterators, got {it!r}{hint}")
    if len({id(it) for it in inputs}) != len(inputs):
        raise ValueError(f"the same iterator appears twice in {label.lower()} inputs; "
                         f"use duplicate() to consume one stream twice")
    found = {id(it.metrics): it.metrics for it in inputs if it.metrics is not None}
    if len(found) > 1:
        names = [f"'{it.name}'" for it in inputs if it.metrics is not None]
        raise ValueError(f"all {label.lower()} inputs must share one Metrics object; "
                         f"{', '.join(names)} use {len(found)} different ones")
    metrics = next(iter(found.values())) if found else Metrics()
    for it in inputs:
        if it.metrics is None:
            it.metrics = metrics

    if deterministic:
        rr_weights = _check_weights(list(weights), len(inputs)) if weights is not None \
            else [1] * len(inputs)
    elif weights is not None:
        raise ValueError("round_robin_weights only apply to deterministic (round robin) "
                         f"mode, got {weights!r} with deterministic=False")
    out_mask = None
    if output_indexes is not None:
        out_mask = [False] * len(inputs)
        for i in output_indexes:
            out_mask[i] = True

    mode = "round_robin" if deterministic else "async"
    name = f"{label}[{mode}]({' | '.join(it.name for it in inputs)})"

    def base(non_blocking: bool) -> Iterator[Any]:
        if deterministic:
            its = [it._build(non_blocking) for it in inputs]
            return _round_robin_gen(its, rr_weights, random.Random(seed), out_mask)
        its = [it._build(True) for it in inputs]
        return _async_union_gen(its, non_blocking, out_mask)

    out: LocalIterator[Any] = LocalIterator(base, metrics, name)
    out._guard = False
    return out


def concurrently(ops: list[LocalIterator[Any]], mode: str = "round_robin",
                 output_indexes: list[int] | None = None,
                 round_robin_weights: list[Any] | None = None,
                 seed: int | None = 0) -> LocalIterator[Any]:
    """Run several operator branches together, yielding only some of them::

        store_op = rollouts.for_each(StoreToReplay(buffer))          # (1)
        replay_op = Replay(buffer).for_each(TrainOneStep(workers))   # (2)
        train_op = concurrently([store_op, replay_op], mode="round_robin",
                                output_indexes=[1], round_robin_weights=[1, 4])

    ``mode`` is ``"round_robin"`` (deterministic union, optional weights as in
    ``LocalIterator.union``) or ``"async"``. Branches not in
    ``output_indexes`` (default: all) run for their side effects; each of their
    items surfaces as ``NotReady``, so the consumer keeps control (e.g. a report can
    end an iteration while only a sampling branch makes progress). The name reads ``Concurrently[round_robin](a | b)``.
    """
    if mode not in ("round_robin", "async"):
        raise ValueError(f"concurrently mode must be 'round_robin' or 'async', got {mode!r}")
    ops = list(ops)
    if not ops:
        raise ValueError("concurrently needs at least one operator")
    if output_indexes is not None:
        output_indexes = list(output_indexes)
        if not output_indexes:
            raise ValueError("output_indexes must name at least one op (or be None for all)")
        for i in output_indexes:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(ops):
                raise ValueError(f"output index {i!r} out of range for {len(ops)} ops")
    return _make_union(ops, mode == "round_robin", round_robin_weights, seed,
                       output_indexes=output_indexes, label="Concurrently")


def from_items(items: Iterable[T], metrics: Metrics | None = None, name: str = "from_items",
               repeat: bool = False) -> LocalIterator[T]:
    """A LocalIterator over a fixed list (copied), optionally cycling forever::

        it = from_items([b1, b2], name="Batches", repeat=True).for_each(learn)
        it.take(10)
    """
    items = list(items)

    def base(non_blocking: bool) -> Iterator[T]:
        while True:
            yield from items
            if not repeat or not items:
                return

    it: LocalIterator[T] = LocalIterator(base, metrics, name)
    it._guard = False  # a list cannot raise; skip the error-annotating wrapper
    return it
