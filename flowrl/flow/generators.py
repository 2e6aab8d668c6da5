"""The pieces every iterator of the flow layer shares: the ``NotReady`` sentinel, the
``SourcedItem`` provenance pair, operator naming and error notes, and the generator
functions behind LocalIterator's operators (``for_each``, ``filter``, ``batch``, ...),
which ParallelIterator also runs inside its actors.
"""

from __future__ import annotations

import functools
import inspect
import random
import types
from typing import Any, Callable, Generic, Iterable, Iterator, NamedTuple, TypeVar

T = TypeVar("T")

# Backoff while nothing is ready: start at 0.1 ms, double up to 5 ms, so an idle
# loop neither spins a core nor adds noticeable latency.
_MIN_BACKOFF_S = 1e-4
_MAX_BACKOFF_S = 5e-3


class _NotReadyType:
    """Type of the ``NotReady`` sentinel; there is exactly one instance."""

    __slots__ = ()
    _instance: "_NotReadyType | None" = None

    def __new__(cls) -> "_NotReadyType":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NotReady"

    def __reduce__(self) -> str:
        # Pickled by reference, so it is still the singleton after crossing
        # a Ray actor boundary (shards may yield NotReady too).
        return "NotReady"


#: "Nothing yet": yielded by non-blocking sources and passed through by every
#: operator. Test with ``item is NotReady``.
NotReady = _NotReadyType()


class SourcedItem(NamedTuple, Generic[T]):
    """An item together with the shard actor that produced it.

    What ``gather_async(..., with_source=True)``, ``gather_sync`` +
    ``zip_with_source_actor()`` yield, so an operator can answer the very actor an
    item came from (send it new weights, send priorities back to a replay shard)::

        for sourced in par.gather_async(num_async=2, with_source=True):
            sourced.actor.set_weights.remote(...)   # sourced.item is the shard's item

    Operators test ``isinstance(item, SourcedItem)``, never the tuple length. It is a
    NamedTuple, so ``for actor, item in ...`` unpacking works too. ``NotReady`` is
    never wrapped.
    """

    actor: Any
    item: T


# --------------------------------------------------------------------------
# Naming and error notes
# --------------------------------------------------------------------------

def _fn_name(fn: Any) -> str:
    """Operator name for ``fn``: its own ``repr`` if its class defines one, else its name."""
    if isinstance(fn, functools.partial):
        return _fn_name(fn.func)
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType,
                       types.MethodType, type)):
        return getattr(fn, "__name__", type(fn).__name__)
    if type(fn).__repr__ is not object.__repr__:
        return repr(fn)
    return type(fn).__name__


def _add_note_once(exc: BaseException, flag: str, text: str) -> None:
    # The flag keeps outer operators (which see the same exception object
    # propagate through them) from stacking more notes.
    if getattr(exc, flag, False):
        return
    try:
        setattr(exc, flag, True)
    except Exception:  # exotic exception types without a __dict__
        if text in getattr(exc, "__notes__", ()):
            return
    exc.add_note(text)


def _note_operator_error(exc: BaseException, op: str, chain: str | None) -> None:
    """Attach the driver-side operator/chain note (once per exception object)."""
    if chain is None:  # shard-side use: the worker adds its own note
        return
    _add_note_once(exc, "_flowrl_noted",
                   f"flowrl: raised in operator '{op}' of chain '{chain}'")


def _accepts_arg(base: Callable[..., Any]) -> bool:
    """Whether ``base`` takes the ``non_blocking`` argument (lenient for 0-arg bases)."""
    try:
        sig = inspect.signature(base)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(False)
        return True
    except TypeError:
        return False


# --------------------------------------------------------------------------
# Operator generators (shared with the shard side in parallel.py; there the
# chain is None and the worker adds its own note)
# --------------------------------------------------------------------------

def _iter_with_note(value: Any, op: str, chain: str | None) -> Iterator[Any]:
    try:
        return iter(value)
    except TypeError as e:
        _note_operator_error(e, op, chain)
        raise


def _for_each_gen(up: Iterator[Any], fn: Callable[[Any], Any], op: str,
                  chain: str | None) -> Iterator[Any]:
    for item in up:
        if item is NotReady:
            yield item
            continue
        while True:
            try:
                out = fn(item)
            except Exception as e:
                _note_operator_error(e, op, chain)
                raise
            if out is not NotReady:
                break
            # Retry rule: the next pull offers the same item to fn again.
            yield NotReady
        yield out


def _filter_gen(up: Iterator[Any], pred: Callable[[Any], bool], op: str,
                chain: str | None) -> Iterator[Any]:
    for item in up:
        if item is NotReady:
            yield item
            continue
        try:
            keep = pred(item)
        except Exception as e:
            _note_operator_error(e, op, chain)
            raise
        if keep:
            yield item


def _batch_gen(up: Iterator[Any], n: int) -> Iterator[Any]:
    buf: list[Any] = []
    for item in up:
        if item is NotReady:
            yield item
            continue
        buf.append(item)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:  # a finite stream ends with its partial batch
        yield buf


def _flatten_gen(up: Iterator[Any], op: str, chain: str | None) -> Iterator[Any]:
    for item in up:
        if item is NotReady:
            yield item
            continue
        yield from _iter_with_note(item, op, chain)


def _combine_gen(up: Iterator[Any], fn: Callable[[Any], Iterable[Any]], op: str,
                 chain: str | None) -> Iterator[Any]:
    for item in up:
        if item is NotReady:
            yield item
            continue
        while True:
            try:
                out = fn(item)
            except Exception as e:
                _note_operator_error(e, op, chain)
                raise
            if out is not NotReady:
                break
            yield NotReady
        yield from _iter_with_note(out, op, chain)


def _shuffle_gen(up: Iterator[Any], buffer_size: int, seed: int | None) -> Iterator[Any]:
    rng = random.Random(seed)
    buf: list[Any] = []
    for item in up:
        if item is NotReady:
            yield item
            continue
        buf.append(item)
        if len(buf) >= buffer_size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _guarded_source(it: Iterator[Any], name: str) -> Iterator[Any]:
    """Wrap a user-supplied base so its errors name the source operator."""
    nxt = it.__next__
    while True:
        try:
            item = nxt()
        except StopIteration:
            return
        except Exception as e:
            _note_operator_error(e, name, name)
            raise
        yield item
