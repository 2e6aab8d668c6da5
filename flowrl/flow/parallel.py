"""ParallelIterator: lazy iterators sharded over Ray actors.

Each shard is an actor whose class inherits :class:`ParallelIteratorWorker`
and exposes a generator (a rollout worker yields ``sample()`` forever).
Transforms recorded on a ParallelIterator run inside the actors; a gather
turns it into a driver-side :class:`~flowrl.flow.iterators.LocalIterator`::

    shards = from_actors(workers, "Rollouts", metrics=metrics,
                         on_actor_failure=worker_set.handle_actor_failure)
    grads = shards.for_each(lambda batch: compute_grads(batch))  # runs in the actors
    for actor, g in grads.gather_async(num_async=2, with_source=True):  # SourcedItems
        ...

Ray is imported lazily so that ``ParallelIteratorWorker`` (also used as a
plain local object) and the driver-only paths work without starting Ray.
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Iterator, TypeVar

from flowrl.flow.generators import (
    NotReady,
    SourcedItem,
    _add_note_once,
    _batch_gen,
    _combine_gen,
    _filter_gen,
    _flatten_gen,
    _fn_name,
    _for_each_gen,
    _note_operator_error,
)
from flowrl.flow.iterators import LocalIterator
from flowrl.flow.metrics import Metrics

if TYPE_CHECKING:  # pragma: no cover
    from ray.actor import ActorHandle

__all__ = ["ParallelIterator", "ParallelIteratorWorker", "from_actors"]

T = TypeVar("T")
U = TypeVar("U")

# Per worker, at most this many open shard iterators; the least recently used
# is dropped beyond that, so abandoned gathers cannot leak memory in actors.
_MAX_SHARD_ITERS = 64
# How long a par_iter_next waits for its par_iter_init (threaded actors only).
_INIT_WAIT_S = 60.0


class _ShardDoneType:
    """Returned by ``par_iter_next`` when a shard's (non-repeating) generator ends."""

    __slots__ = ()
    _instance: "_ShardDoneType | None" = None

    def __new__(cls) -> "_ShardDoneType":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ShardDone"

    def __reduce__(self) -> str:
        return "ShardDone"  # pickled by reference: stays a singleton over Ray


ShardDone = _ShardDoneType()


# --------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------

def _apply_transform(gen: Iterator[Any], transform: tuple[str, Any, str],
                     shard: Any = None) -> Iterator[Any]:
    kind, arg, op = transform
    # chain=None: shard-side errors get the worker note in par_iter_next instead.
    if kind == "for_each":
        return _for_each_gen(gen, arg, op, None)
    if kind == "for_each_with_worker":
        # The shard object is passed explicitly: no hidden "current worker" global.
        return _for_each_gen(gen, functools.partial(arg, shard), op, None)
    if kind == "filter":
        return _filter_gen(gen, arg, op, None)
    if kind == "batch":
        return _batch_gen(gen, arg)
    if kind == "flatten":
        return _flatten_gen(gen, op, None)
    if kind == "combine":
        return _combine_gen(gen, arg, op, None)
    raise ValueError(f"unknown shard transform {kind!r}")


class ParallelIteratorWorker:
    """Mixin that makes an actor class usable as a ParallelIterator shard.

    Works without Ray (it is plain Python); as an actor, the driver calls
    ``par_iter_init``/``par_iter_next`` remotely::

        @ray.remote
        class ReplayActor(ParallelIteratorWorker):
            def __init__(self, capacity):
                self.buffer = Buffer(capacity)
                ParallelIteratorWorker.__init__(self, lambda: iter(self.replay, None),
                                                repeat=True)

        replay = from_actors([ReplayActor.remote(10_000)], "Replay").gather_async(4)

    ``item_generator`` is a zero-arg callable returning an iterator (called
    anew for every gather, and again when it ends if ``repeat``) or an
    iterable. Each gather gets its own iterator id, so gathers don't interfere.
    ``par_iter_next`` is thread-safe, so threaded actors work too.
    """

    def __init__(self, item_generator: Callable[[], Iterator[Any]] | Iterable[Any],
                 repeat: bool) -> None:
        self._flowrl_item_generator = item_generator
        self._flowrl_repeat = repeat
        self._flowrl_iters: OrderedDict[str, tuple[Iterator[Any], str, threading.Lock]] = \
            OrderedDict()
        # A Condition, because threaded actors (max_concurrency > 1) may run a
        # par_iter_next before the par_iter_init that was submitted first.
        self._flowrl_iters_cond = threading.Condition(threading.Lock())
        self._flowrl_closed: deque[str] = deque(maxlen=4 * _MAX_SHARD_ITERS)

    def _flowrl_source(self) -> Iterator[Any]:
        src = self._flowrl_item_generator
        while True:
            produced = False
            for item in (src() if callable(src) else src):
                produced = True
                yield item
            # A one-shot iterator produces nothing on restart: stop, don't spin.
            if not self._flowrl_repeat or not produced:
                return

    def _flowrl_note(self, exc: BaseException, chain: str) -> None:
        index = getattr(self, "worker_index", "?")
        _add_note_once(exc, "_flowrl_worker_noted",
                       f"flowrl: raised in operator chain '{chain}' on worker index "
                       f"{index} (pid {os.getpid()})")

    def par_iter_init(self, iter_id: str, transforms: list[tuple[str, Any, str]],
                      chain_name: str) -> None:
        """Create the shard iterator ``iter_id``: the item generator plus ``transforms``."""
        gen: Iterator[Any] = self._flowrl_source()
        for t in transforms:
            gen = _apply_transform(gen, t, self)
        evicted = []
        with self._flowrl_iters_cond:
            old = self._flowrl_iters.pop(iter_id, None)
            if old is not None:
                evicted.append(old[0])
            self._flowrl_iters[iter_id] = (gen, chain_name, threading.Lock())
            while len(self._flowrl_iters) > _MAX_SHARD_ITERS:
                old_id, old_entry = self._flowrl_iters.popitem(last=False)
                self._flowrl_closed.append(old_id)
                evicted.append(old_entry[0])
            self._flowrl_iters_cond.notify_all()
        for g in evicted:
            _close_quietly(g)

    def par_iter_next(self, iter_id: str) -> Any:
        """Next item of shard iterator ``iter_id`` (``NotReady`` passes; ``ShardDone`` at end)."""
        with self._flowrl_iters_cond:
            entry = self._flowrl_iters.get(iter_id)
            if entry is None and iter_id not in self._flowrl_closed:
                self._flowrl_iters_cond.wait_for(
                    lambda: iter_id in self._flowrl_iters or iter_id in self._flowrl_closed,
                    timeout=_INIT_WAIT_S)
                entry = self._flowrl_iters.get(iter_id)
            if entry is None:
                raise KeyError(f"flowrl: no parallel iterator {iter_id!r} on this worker "
                               f"(not initialised within {_INIT_WAIT_S}s, closed, or "
                               f"evicted after {_MAX_SHARD_ITERS} newer ones)")
            self._flowrl_iters.move_to_end(iter_id)
        gen, chain, lock = entry
        with lock:
            try:
                return next(gen)
            except StopIteration:
                # Keep the (finished) entry: requests still queued for it must
                # also get ShardDone, not an unknown-id error.
                return ShardDone
            except Exception as e:
                self._flowrl_note(e, chain)
                raise

    def par_iter_close(self, iter_id: str) -> None:
        """Drop shard iterator ``iter_id`` (called when a gather is closed)."""
        with self._flowrl_iters_cond:
            entry = self._flowrl_iters.pop(iter_id, None)
            self._flowrl_closed.append(iter_id)
            self._flowrl_iters_cond.notify_all()
        if entry is not None:
            _close_quietly(entry[0])


def _close_quietly(gen: Iterator[Any]) -> None:
    close = getattr(gen, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # closing a generator mid-flight from another thread
            pass


# --------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------

class _ShardSet:
    """The actor list shared by a ParallelIterator and everything derived from it.

    Failures are resolved once per dead actor, so several gathers over the same
    shards agree on the replacement and the handler is not called twice.
    """

    def __init__(self, actors: list[Any],
                 on_actor_failure: Callable[[Any, Exception], Any] | None) -> None:
        self.actors = list(actors)
        self.on_actor_failure = on_actor_failure
        self._lock = threading.RLock()
        self._resolved: dict[Any, Any] = {}

    def healthy(self) -> list[Any]:
        with self._lock:
            return list(self.actors)

    def resolve_failure(self, actor: Any, error: Exception) -> tuple[bool, Any]:
        """(handled, replacement-or-None); handled=False means: no handler, raise."""
        with self._lock:
            if actor in self._resolved:
                return True, self._resolved[actor]
            if self.on_actor_failure is None:
                return False, None
            new = self.on_actor_failure(actor, error)
            if new is not None:
                _check_actor(new, "on_actor_failure returned")
            self._resolved[actor] = new
            if actor in self.actors:
                i = self.actors.index(actor)
                if new is None:
                    del self.actors[i]
                else:
                    self.actors[i] = new
            return True, new


def _check_actor(actor: Any, what: str) -> None:
    from ray.actor import ActorHandle

    if not isinstance(actor, ActorHandle):
        raise TypeError(f"{what} {actor!r}, which is not a Ray actor handle")
    if not (hasattr(actor, "par_iter_init") and hasattr(actor, "par_iter_next")):
        cls = getattr(getattr(actor, "_ray_actor_creation_function_descriptor", None),
                      "class_name", "?")
        raise TypeError(f"{what} an actor of class {cls} which does not inherit "
                        f"flowrl.flow.ParallelIteratorWorker")


def _get_each(refs: list[Any]) -> list[tuple[bool, Any]]:
    """ray.get many refs in one call; per-ref only when something failed."""
    import ray

    try:
        return [(True, v) for v in ray.get(refs)]
    except Exception:
        out: list[tuple[bool, Any]] = []
        for r in refs:
            try:
                out.append((True, ray.get(r)))
            except Exception as e:
                out.append((False, e))
        return out


def _is_actor_death(exc: Exception) -> bool:
    from ray.exceptions import RayActorError, RayTaskError

    # User code that itself hit a dead actor arrives as RayTaskError(RayActorError):
    # that is the task's error, not this shard dying.
    return isinstance(exc, RayActorError) and not isinstance(exc, RayTaskError)


class ParallelIterator(Generic[T]):
    """Lazy iterator over Ray actor shards; transforms run inside the actors.

    Build with :func:`from_actors`; it cannot be iterated directly::

        shards = from_actors(replay_actors, "Replay")
        sized = shards.filter(lambda b: b is not None).for_each(lambda b: (b, b.count))
        it = sized.gather_async(num_async=4)          # LocalIterator on the driver
        it = shards.gather_sync().for_each(learn)     # one item per shard per round
    """

    def __init__(self, shards: _ShardSet, name: str,
                 transforms: tuple[tuple[str, Any, str], ...] = (),
                 metrics: Metrics | None = None) -> None:
        self._shards = shards
        self.name = name
        self._transforms = transforms
        self.metrics = metrics

    # -- info -----------------------------------------------------------------
    @property
    def actors(self) -> list[Any]:
        """The current healthy shard actors (replacements included)."""
        return self._shards.healthy()

    def num_shards(self) -> int:
        """Number of current healthy shards."""
        return len(self._shards.healthy())

    def __repr__(self) -> str:
        return f"ParallelIterator[{self.name}]"

    def __iter__(self) -> Any:
        raise TypeError(f"ParallelIterator '{self.name}' cannot be iterated directly; "
                        f"use gather_sync() or gather_async() to get a LocalIterator")

    def __next__(self) -> Any:
        raise TypeError(f"ParallelIterator '{self.name}' cannot be iterated directly; "
                        f"use gather_sync() or gather_async() to get a LocalIterator")

    # -- shard-side transforms ----------------------------------------------------
    def _with(self, kind: str, arg: Any, op: str) -> "ParallelIterator[Any]":
        return ParallelIterator(self._shards, f"{self.name} -> {op}",
                                self._transforms + ((kind, arg, op),), self.metrics)

    def for_each(self, fn: Callable[[T], U], name: str | None = None) -> "ParallelIterator[U]":
        """Apply ``fn`` inside each actor: ``shards.for_each(lambda b: compute_grads(b))``.

        ``fn`` is shipped with Ray's serializer; the ``NotReady`` retry rule
        holds shard-side too.
        """
        return self._with("for_each", fn, name or _fn_name(fn))

    def for_each_with_worker(self, fn: Callable[[Any, T], U], name: str | None = None
                             ) -> "ParallelIterator[U]":
        """Apply ``fn(shard, item)`` inside each actor, with the actor's own object::

            grads = from_actors(workers, "Rollouts").for_each_with_worker(
                lambda worker, batch: worker.compute_gradients(batch))

        The explicit argument replaces any "current worker" global.
        """
        return self._with("for_each_with_worker", fn, name or _fn_name(fn))

    def filter(self, pred: Callable[[T], bool], name: str | None = None
               ) -> "ParallelIterator[T]":
        """Drop items inside the actors: ``shards.filter(lambda b: b.count > 0)``."""
        return self._with("filter", pred, name or f"filter({_fn_name(pred)})")

    def batch(self, n: int) -> "ParallelIterator[list[T]]":
        """Group ``n`` items per shard before sending: ``shards.batch(4).gather_async()``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"batch size must be an int >= 1, got {n!r}")
        return self._with("batch", n, f"batch({n})")

    def flatten(self) -> "ParallelIterator[Any]":
        """Yield the elements of list items, shard-side: ``shards.batch(4).flatten()``."""
        return self._with("flatten", None, "flatten")

    def combine(self, fn: Callable[[T], Iterable[U]], name: str | None = None
                ) -> "ParallelIterator[U]":
        """``for_each(fn)`` then ``flatten()`` inside the actors, as one operator."""
        return self._with("combine", fn, name or _fn_name(fn))

    # -- gathers ------------------------------------------------------------------
    def gather_sync(self, name: str | None = None) -> LocalIterator[T]:
        """Lock-step gather: each round asks every shard for one item, waits for
        all (a barrier), then yields them one at a time in shard order::

            rollouts = from_actors(workers, "Rollouts").gather_sync()
            train_op = rollouts.batch(num_workers).for_each(concat_and_train)

        The next round is requested only when the previous one was consumed,
        so e.g. weights broadcast in between are used by every shard.
        ``name`` replaces the default chain name ``"<chain> -> gather_sync"``.
        """
        return self._gather(sync=True, num_async=1, with_source=False,
                            name=name or f"{self.name} -> gather_sync")

    def gather_async(self, num_async: int = 1, with_source: bool = False,
                     name: str | None = None) -> LocalIterator[Any]:
        """Keep ``num_async`` requests in flight per shard; yield items as they finish::

            grads = from_actors(workers, "Grads").for_each(compute_grads)
            for actor, g in grads.gather_async(num_async=2, with_source=True):
                apply_and_send_weights(actor, g)

        ``with_source=True`` yields :class:`~flowrl.flow.iterators.SourcedItem`
        ``(actor, item)`` pairs (``NotReady`` stays bare). Inside an async
        union the gather never blocks (it yields ``NotReady``).
        ``name`` replaces the default ``"<chain> -> gather_async(num_async=k)"``.
        """
        if isinstance(num_async, bool) or not isinstance(num_async, int) or num_async < 1:
            raise ValueError(f"num_async must be an int >= 1, got {num_async!r}")
        return self._gather(sync=False, num_async=num_async, with_source=with_source,
                            name=name or f"{self.name} -> gather_async(num_async={num_async})")

    def _gather(self, sync: bool, num_async: int, with_source: bool, name: str
                ) -> LocalIterator[Any]:
        par = self
        gen = _gather_sync_gen if sync else _gather_async_gen

        def base(non_blocking: bool) -> Iterator[Any]:
            return gen(par, non_blocking, num_async, with_source, name)

        it: LocalIterator[Any] = LocalIterator(base, self.metrics, name)
        it._guard = False  # the gather annotates its own errors
        if not with_source:
            it._source_factory = lambda: par._gather(
                sync, num_async, True, f"{name} -> zip_with_source_actor")
        return it


class _Gather:
    """State shared by both gather generators: shards, iterator id, failures."""

    def __init__(self, par: ParallelIterator[Any], chain: str, op: str) -> None:
        self.par = par
        self.chain = chain
        self.op = op
        self.iter_id = f"{par.name}#{uuid.uuid4().hex}"
        self.live: list[Any] = par._shards.healthy()
        self.inited: list[Any] = []  # every actor to send par_iter_close to
        for a in self.live:
            self.init(a)

    def init(self, actor: Any) -> None:
        self.inited.append(actor)
        actor.par_iter_init.remote(self.iter_id, list(self.par._transforms), self.par.name)

    def fail(self, exc: Exception) -> Exception:
        _note_operator_error(exc, self.op, self.chain)
        return exc

    def on_error(self, actor: Any, exc: Exception) -> Any:
        """Handle a failed request of ``actor``: return a replacement, None, or raise."""
        if not _is_actor_death(exc):
            raise self.fail(exc)
        handled, new = self.par._shards.resolve_failure(actor, exc)
        if not handled:
            raise self.fail(exc)
        if actor in self.live:
            i = self.live.index(actor)
            if new is None:
                del self.live[i]
            else:
                self.live[i] = new
                self.init(new)
        if not self.live:
            exc.add_note(f"flowrl: no healthy shard left in '{self.par.name}'")
            raise self.fail(exc)
        return new

    def close(self) -> None:
        for a in self.inited:
            try:
                a.par_iter_close.remote(self.iter_id)
            except Exception:  # Ray may already be shut down at interpreter exit
                pass


def _gather_sync_gen(par: ParallelIterator[Any], non_blocking: bool, num_async: int,
                     with_source: bool, chain: str) -> Iterator[Any]:
    import ray

    g = _Gather(par, chain, "gather_sync")
    try:
        while g.live:
            shards = list(g.live)
            refs = [a.par_iter_next.remote(g.iter_id) for a in shards]
            if non_blocking:
                while len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
                    yield NotReady
            results = _get_each(refs)
            round_items = []
            for a, (ok, value) in zip(shards, results):
                if not ok:
                    # A replacement joins from the next round on.
                    g.on_error(a, value)
                elif value is ShardDone:
                    g.live.remove(a)
                else:
                    # NotReady stays bare: every operator downstream passes it through.
                    round_items.append(SourcedItem(a, value)
                                       if with_source and value is not NotReady else value)
            yield from round_items
    finally:
        g.close()


def _gather_async_gen(par: ParallelIterator[Any], non_blocking: bool, num_async: int,
                      with_source: bool, chain: str) -> Iterator[Any]:
    import ray

    g = _Gather(par, chain, f"gather_async(num_async={num_async})")
    pending: dict[Any, Any] = {}  # in-flight ref -> actor; at most num_async per shard

    def submit(actor: Any, k: int) -> None:
        for _ in range(k):
            pending[actor.par_iter_next.remote(g.iter_id)] = actor

    for a in g.live:
        submit(a, num_async)
    done: deque[Any] = deque()  # completed items not yet yielded (bounded by pending)
    try:
        while pending or done:
            if not done:
                refs = list(pending)
                # Collect everything already finished before blocking on one.
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                if not ready:
                    if non_blocking:
                        yield NotReady
                        continue
                    ready, _ = ray.wait(refs, num_returns=1)
                for ref, (ok, value) in zip(ready, _get_each(ready)):
                    actor = pending.pop(ref, None)
                    if actor is None:
                        continue  # belonged to a shard that already failed
                    if not ok:
                        for r in [r for r, a in pending.items() if a == actor]:
                            del pending[r]  # its other requests fail too
                        new = g.on_error(actor, value)
                        if new is not None:
                            submit(new, num_async)
                        continue
                    if value is ShardDone:
                        if actor in g.live:
                            g.live.remove(actor)
                        continue
                    submit(actor, 1)  # keep the shard busy while we yield
                    done.append(SourcedItem(actor, value)
                                if with_source and value is not NotReady else value)
                continue
            yield done.popleft()
    finally:
        g.close()


def from_actors(actors: list["ActorHandle"], name: str, metrics: Metrics | None = None,
                on_actor_failure: Callable[["ActorHandle", Exception], "ActorHandle | None"]
                | None = None) -> ParallelIterator[Any]:
    """A ParallelIterator over actors whose class inherits ParallelIteratorWorker::

        rollouts = from_actors(worker_set.remote_workers(), "ParallelRollouts(async)",
                               metrics=metrics, on_actor_failure=worker_set.handle_actor_failure)
        train_op = rollouts.gather_async(num_async=2).for_each(TrainOneStep(worker_set))

    ``on_actor_failure(actor, error)`` is called once per dead actor
    (``RayActorError``); it returns a replacement actor (initialised and used
    by every gather) or None (gathers continue with the remaining shards).
    Without a handler, or when no shard is left, the error is raised.
    """
    actors = list(actors)
    if not actors:
        raise ValueError(f"from_actors('{name}') needs at least one actor")
    for a in actors:
        _check_actor(a, f"from_actors('{name}') got")
    return ParallelIterator(_ShardSet(actors, on_actor_failure), name, (), metrics)
