"""Tests of the dataflow core (flowrl.flow) on real Ray actors."""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections import Counter

import pytest
import ray
import ray.cloudpickle


from flowrl.flow import (
    LocalIterator,
    Metrics,
    NotReady,
    ParallelIterator,
    ParallelIteratorWorker,
    SourcedItem,
    TimerStat,
    concurrently,
    from_actors,
    from_items,
)


# Ray workers cannot import this test module (tests/ is not on their path), so
# ship the actor classes and helpers defined here by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# --------------------------------------------------------------------------
# Test actors
# --------------------------------------------------------------------------

class CountingShard(ParallelIteratorWorker):
    """Yields (tag, 0), (tag, 1), ...; records how many items it produced.

    ``set_limit(n)`` makes the streams of later gathers end after n items.
    """

    def __init__(self, tag, delay=0.0, worker_index=None):
        self.tag = tag
        self.produced = 0
        self.delay = delay
        self.limit = None
        if worker_index is not None:
            self.worker_index = worker_index
        ParallelIteratorWorker.__init__(self, self._items, repeat=False)

    def _items(self):
        for i in itertools.count() if self.limit is None else range(self.limit):
            if self.delay:
                time.sleep(self.delay)
            self.produced += 1
            yield (self.tag, i)

    def set_limit(self, n):
        self.limit = n

    def get_produced(self):
        return self.produced

    def get_tag(self):
        return self.tag

    def get_pid(self):
        return os.getpid()


Shard = ray.remote(num_cpus=0)(CountingShard)


@ray.remote(num_cpus=0, max_concurrency=16)
class ConcurrencyShard(CountingShard):
    """Threaded actor that records how many par_iter_next calls are in flight at once."""

    def __init__(self, tag, delay):
        super().__init__(tag, delay=delay)
        self._active = 0
        self._max_active = 0
        self._calls_lock = threading.Lock()

    def par_iter_next(self, iter_id):
        with self._calls_lock:
            self._active += 1
            self._max_active = max(self._max_active, self._active)
        try:
            return super().par_iter_next(iter_id)
        finally:
            with self._calls_lock:
                self._active -= 1

    def max_active(self):
        return self._max_active


@ray.remote(num_cpus=0)
class NotAShard:
    def get_tag(self):
        return None


class Cluster:
    """All actors of this module, started together (each actor start costs seconds)."""

    def __init__(self):
        # Long-lived shards, tags 0..2, worker indexes 1..3, infinite streams.
        self.pool = [Shard.remote(i, worker_index=i + 1) for i in range(3)]
        self.threaded = ConcurrencyShard.remote(50, delay=0.02)
        # Fresh shards for the failure tests to kill.
        self._victims = [Shard.remote(10 + i) for i in range(2)]
        self._dead = []
        self.not_a_shard = NotAShard.remote()
        ray.get([a.get_tag.remote() for a in
                 [*self.pool, self.threaded, *self._victims, self.not_a_shard]])

    def victim(self):
        """A live shard that the caller will kill."""
        v = self._victims.pop()
        self._dead.append(v)
        return v

    def dead_actor(self):
        """A shard actor that is already dead (killed by an earlier test, or now)."""
        if not self._dead:
            _kill_and_wait(self.victim())
        return self._dead[0]

    def produced(self, actors):
        return ray.get([a.get_produced.remote() for a in actors])


@pytest.fixture(scope="module")
def cluster(ray_session):
    return Cluster()


@pytest.fixture
def shards(cluster):
    return cluster.pool


# --------------------------------------------------------------------------
# NotReady and helpers
# --------------------------------------------------------------------------

def scripted(values, name="Scripted", log=None):
    """A LocalIterator yielding ``values`` (which may contain NotReady); logs build mode."""

    def base(non_blocking):
        if log is not None:
            log.append(non_blocking)
        yield from values

    return LocalIterator(base, name=name)


def test_not_ready_singleton():
    import copy
    import pickle

    assert repr(NotReady) == "NotReady"
    assert type(NotReady)() is NotReady
    assert pickle.loads(pickle.dumps(NotReady)) is NotReady
    assert copy.deepcopy(NotReady) is NotReady


# --------------------------------------------------------------------------
# LocalIterator basics
# --------------------------------------------------------------------------

def test_basic_operators():
    assert list(from_items([1, 2, 3]).for_each(lambda x: x * 2)) == [2, 4, 6]
    assert list(from_items(range(6)).filter(lambda x: x % 2)) == [1, 3, 5]
    assert list(from_items(range(5)).batch(2)) == [[0, 1], [2, 3], [4]]
    assert list(from_items([[1, 2], [], [3]]).flatten()) == [1, 2, 3]
    assert list(from_items([1, 2, 3]).combine(lambda x: [x] * x)) == [1, 2, 2, 3, 3, 3]
    assert from_items(range(10)).take(3) == [0, 1, 2]
    assert from_items(range(2)).take(5) == [0, 1]
    assert from_items([1, 2], repeat=True).take(5) == [1, 2, 1, 2, 1]
    assert sorted(from_items(range(20)).shuffle(5, seed=1)) == list(range(20))
    assert list(from_items(range(20)).shuffle(5, seed=1)) != list(range(20))
    it = from_items([1])
    assert iter(it) is it


def test_lazy_until_next():
    calls = []
    it = from_items([1, 2]).for_each(lambda x: calls.append(x) or x)
    assert calls == []
    assert next(it) == 1 and calls == [1]


def test_base_without_argument_is_accepted():
    it = LocalIterator(lambda: iter([1, 2]), name="ZeroArg")
    assert list(it) == [1, 2]


def test_not_ready_passes_through_every_operator():
    src = [1, NotReady, 2, NotReady, 3, 4]
    assert list(scripted(src).for_each(lambda x: x * 10)) == \
        [10, NotReady, 20, NotReady, 30, 40]
    assert list(scripted(src).filter(lambda x: x > 1)) == [NotReady, 2, NotReady, 3, 4]
    assert list(scripted(src).batch(2)) == [NotReady, [1, 2], NotReady, [3, 4]]
    assert list(scripted([[1], NotReady, [2, 3]]).flatten()) == [1, NotReady, 2, 3]
    assert list(scripted(src).combine(lambda x: [x, x])) == \
        [1, 1, NotReady, 2, 2, NotReady, 3, 3, 4, 4]
    assert scripted(src).take(4) == [1, 2, 3, 4]


def test_for_each_retry_rule():
    pulled = []

    def source(non_blocking):
        for x in ["a", "b"]:
            pulled.append(x)
            yield x

    offered = []
    refusals = {"a": 2}

    def enqueue(x):
        offered.append(x)
        if refusals.get(x, 0) > 0:
            refusals[x] -= 1
            return NotReady  # "queue full": must be offered again
        return x.upper()

    it = LocalIterator(source, name="Src").for_each(enqueue)
    assert next(it) is NotReady
    assert next(it) is NotReady
    assert pulled == ["a"]  # no upstream pull while "a" is pending
    assert next(it) == "A"
    assert next(it) == "B"
    assert offered == ["a", "a", "a", "b"]
    assert pulled == ["a", "b"]

    refuse_once = {"x": 1}

    def combine_fn(x):
        if refuse_once.get(x):
            refuse_once[x] = 0
            return NotReady
        return [x, x]

    assert list(from_items(["x"]).combine(combine_fn)) == [NotReady, "x", "x"]


def test_names_and_repr():
    class ConcatBatches:
        def __init__(self, n):
            self.n = n

        def __call__(self, x):
            return [x]

        def __repr__(self):
            return f"ConcatBatches({self.n})"

    class TrainOneStep:
        def __call__(self, x):
            return x

    def to_batch(x):
        return x

    it = (from_items([1], name="ParallelRollouts(bulk_sync)")
          .combine(ConcatBatches(4000)).for_each(TrainOneStep()))
    assert repr(it) == it.name == \
        "ParallelRollouts(bulk_sync) -> ConcatBatches(4000) -> TrainOneStep"
    it2 = from_items([1], name="S").for_each(to_batch).filter(bool).batch(3).flatten()
    assert it2.name == "S -> to_batch -> filter(bool) -> batch(3) -> flatten"
    assert from_items([1], name="S").for_each(to_batch, name="Custom").name == "S -> Custom"
    a, b = from_items([1], name="S").duplicate(2)
    assert (a.name, b.name) == ("S -> Duplicate[0]", "S -> Duplicate[1]")
    m = Metrics()
    x, y = from_items([1], m, name="X"), from_items([1], m, name="Y")
    assert x.union(y).name == "Union[async](X | Y)"
    x, y = from_items([1], m, name="X"), from_items([1], m, name="Y")
    assert concurrently([x, y]).name == "Concurrently[round_robin](X | Y)"


def test_driver_side_exception_has_note_and_traceback():
    raised = []

    def explode(x):
        if x == 2:
            raised.append(KeyError("nope"))
            raise raised[-1]
        return x

    def consume(it):
        return [y for y in it]

    it = from_items([1, 2, 3], name="Src").for_each(explode).for_each(lambda x: x)
    with pytest.raises(KeyError) as ei:
        consume(it)
    assert ei.value is raised[-1]  # same object
    assert ei.value.__notes__ == ["flowrl: raised in operator 'explode' of chain 'Src -> explode'"]
    assert ei.traceback[-1].name == "explode"  # original traceback kept

    # Propagating through an outer operator that pulls the inner chain: still one note.
    inner = from_items([1, 2], name="Inner").for_each(explode)
    outer = from_items([0, 0], name="Outer").for_each(lambda _: next(inner), name="PullInner")
    with pytest.raises(KeyError) as ei:
        consume(outer)
    assert len([n for n in ei.value.__notes__ if n.startswith("flowrl:")]) == 1
    assert "Inner -> explode" in ei.value.__notes__[0]

    def failing_source(non_blocking):
        yield 1
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError) as ei:
        consume(LocalIterator(failing_source, name="Broken").for_each(str))
    assert ei.value.__notes__ == ["flowrl: raised in operator 'Broken' of chain 'Broken'"]


def test_zip_with_source_actor_only_on_fresh_gather():
    with pytest.raises(ValueError, match="gather_async"):
        from_items([1]).zip_with_source_actor()


# --------------------------------------------------------------------------
# duplicate
# --------------------------------------------------------------------------

def test_duplicate_children_see_all_items_in_order():
    a, b = from_items(range(10), name="S").duplicate(2)
    got_a, got_b = [], []
    for _ in range(10):  # interleave pulls
        got_a.append(next(a))
        got_b.append(next(b))
    assert got_a == got_b == list(range(10))
    with pytest.raises(StopIteration):
        next(a)


def test_duplicate_lag_is_bounded():
    pulled = []

    def source(non_blocking):
        for i in itertools.count():
            pulled.append(i)
            yield i

    a, b = LocalIterator(source, name="S").duplicate(2, max_lag=4)
    assert [next(a) for _ in range(4)] == [0, 1, 2, 3]
    assert next(a) is NotReady  # b holds max_lag items: a may not pull more
    assert next(a) is NotReady
    assert len(pulled) == 4
    assert [next(b) for _ in range(6)] == [0, 1, 2, 3, 4, 5]  # b drains, then pulls
    assert [next(a) for _ in range(2)] == [4, 5]


# --------------------------------------------------------------------------
# union / concurrently
# --------------------------------------------------------------------------

def test_union_round_robin_int_weights():
    m = Metrics()
    a = from_items(["a"] * 6, m, name="A")
    b = from_items(["b"] * 3, m, name="B")
    u = a.union(b, deterministic=True, round_robin_weights=[2, 1])
    assert list(u) == ["a", "a", "b"] * 3
    a = from_items([1, 2, 3], m)
    b = from_items([10, 20, 30, 40, 50], m)
    assert list(a.union(b, deterministic=True)) == [1, 10, 2, 20, 3, 30, 40, 50]


def test_union_star_weight_pulls_until_not_ready():
    m = Metrics()
    a = scripted([1, 2, 3, NotReady, 4, 5, NotReady, 6], name="A")
    b = from_items(["x", "y", "z"], m, name="B")
    u = a.union(b, deterministic=True, round_robin_weights=["*", 1])
    assert list(u) == [1, 2, 3, "x", 4, 5, "y", 6, "z"]
    assert a.metrics is m  # adopted the shared Metrics

    # A round where nothing is ready yields NotReady.
    c = scripted([NotReady, 1], name="C")
    d = scripted([NotReady, 2], name="D")
    assert list(c.union(d, deterministic=True)) == [NotReady, 1, 2]


def test_union_fractional_weights_are_seeded_and_proportional():
    def make(seed):
        m = Metrics()
        a = from_items(["a"], m, repeat=True)
        b = from_items(["b"], m, repeat=True)
        return a.union(b, deterministic=True, round_robin_weights=[1, 0.25], seed=seed)

    items = make(7).take(5000)
    counts = Counter(items)
    ratio = counts["b"] / counts["a"]
    assert 0.2 < ratio < 0.3, counts
    assert make(7).take(500) == items[:500]  # reproducible with a fixed seed
    assert make(8).take(500) != items[:500]


def test_union_rejects_bad_inputs():
    with pytest.raises(ValueError, match="share one Metrics"):
        from_items([1], Metrics()).union(from_items([2], Metrics()))
    with pytest.raises(ValueError, match="weight"):
        from_items([1]).union(from_items([2]), deterministic=True,
                              round_robin_weights=[1, 0])
    with pytest.raises(ValueError, match="2 inputs"):
        from_items([1]).union(from_items([2]), deterministic=True, round_robin_weights=[1])
    with pytest.raises(TypeError):
        from_items([1]).union([2])


def test_async_union_builds_inputs_non_blocking():
    log_a, log_b = [], []
    m = Metrics()
    a = scripted([NotReady, NotReady, 1, 2], name="A", log=log_a)
    b = scripted([10, NotReady, 20], name="B", log=log_b)
    a.metrics = b.metrics = m
    u = a.union(b)  # deterministic=False
    assert sorted(u) == [1, 2, 10, 20]
    assert log_a == [True] and log_b == [True]

    # A non-blocking async union (nested in another async union) yields NotReady.
    c = scripted([NotReady, NotReady, 5], name="C")
    d = scripted([NotReady, 6], name="D")
    inner = c.union(d)
    outer = inner.union(from_items([], name="E"))
    assert sorted(x for x in outer if x is not NotReady) == [5, 6]
    e = scripted([NotReady, NotReady, 7], name="E2")
    f = scripted([NotReady], name="F")
    nb = e.union(f)._build(True)
    assert list(nb) == [NotReady, NotReady, 7]


def test_concurrently_output_indexes():
    stored = []
    m = Metrics()
    store_op = from_items(range(6), m, name="Store").for_each(lambda x: stored.append(x) or x)
    train_op = from_items(["t1", "t2", "t3"], m, name="Train")
    out = concurrently([store_op, train_op], mode="round_robin", output_indexes=[1],
                       round_robin_weights=[2, 1])
    assert out.name == "Concurrently[round_robin](Store -> <lambda> | Train)"
    items = list(out)
    # Dropped items surface as NotReady (the consumer gets a turn), never as values.
    assert [x for x in items if x is not NotReady] == ["t1", "t2", "t3"]
    assert items.count(NotReady) == 6
    assert stored == list(range(6))  # the other branch ran for its side effects

    a = scripted([1, NotReady, 2], name="A")
    b = scripted(["x", "y"], name="B")
    a.metrics = b.metrics = m
    assert [x for x in concurrently([a, b], mode="async", output_indexes=[0])
            if x is not NotReady] == [1, 2]
    with pytest.raises(ValueError, match="mode"):
        concurrently([from_items([1])], mode="sideways")
    with pytest.raises(ValueError, match="out of range"):
        concurrently([from_items([1])], output_indexes=[3])


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

def test_metrics_counters_are_thread_safe():
    m = Metrics()

    def work():
        for _ in range(5000):
            m.inc("num_steps_sampled")
            m.inc("num_steps_trained", 2)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.get("num_steps_sampled") == 40000
    assert m.get("num_steps_trained") == 80000
    assert m.get("missing") == 0 and m.get("missing", -1) == -1


def test_metrics_save_restore_and_info():
    import json

    m = Metrics()
    m.inc("a", 3)
    m.set("last_target_update_ts", 100)
    m.set_info("learner", {"default_policy": {"loss": 1.0}})
    m.timer("sample").push(0.5)
    state = json.loads(json.dumps(m.save()))
    assert "learner" not in json.dumps(state)
    m2 = Metrics()
    m2.restore(state)
    assert m2.counters_snapshot() == {"a": 3, "last_target_update_ts": 100}
    assert m.info["learner"]["default_policy"]["loss"] == 1.0


def test_timers():
    m = Metrics()
    t = m.timer("sample")
    assert m.timer("sample") is t
    for _ in range(3):
        with t:
            time.sleep(0.01)
        t.push_units_processed(100)
    assert t.count == 3
    assert 0.009 < t.mean < 0.1
    assert 1000 < t.mean_throughput < 11000
    snap = m.timers_snapshot()
    assert set(snap) == {"sample_time_ms", "sample_throughput"}
    assert snap["sample_time_ms"] == pytest.approx(1000 * t.mean, abs=0.01)
    m.timer("learn").push(0.002)
    assert "learn_throughput" not in m.timers_snapshot()
    w = TimerStat(window_size=2)
    for s in (10.0, 1.0, 3.0):
        w.push(s)
    assert w.mean == 2.0 and w.count == 3


def test_timer_used_from_several_threads():
    t = TimerStat()

    def work():
        for _ in range(20):
            with t:
                time.sleep(0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.count == 80 and 0.0009 < t.mean < 0.05


# --------------------------------------------------------------------------
# ParallelIteratorWorker without Ray
# --------------------------------------------------------------------------

def test_worker_mixin_works_locally():
    w = CountingShard("local")
    w.set_limit(2)
    w.par_iter_init("it1", [("for_each", lambda x: x[1] * 10, "times10")], "Local -> times10")
    assert [w.par_iter_next("it1") for _ in range(2)] == [0, 10]
    done = w.par_iter_next("it1")
    assert repr(done) == "ShardDone"

    w.par_iter_init("it2", [("for_each", lambda x: 1 / 0, "div0")], "Local -> div0")
    with pytest.raises(ZeroDivisionError) as ei:
        w.par_iter_next("it2")
    assert ei.value.__notes__ == [f"flowrl: raised in operator chain 'Local -> div0' on "
                                  f"worker index ? (pid {os.getpid()})"]

    r = CountingShard("r")
    r._flowrl_item_generator, r._flowrl_repeat = [1, 2], True
    r.par_iter_init("rep", [], "Rep")
    assert [r.par_iter_next("rep") for _ in range(5)] == [1, 2, 1, 2, 1]


# --------------------------------------------------------------------------
# ParallelIterator
# --------------------------------------------------------------------------

def test_parallel_iterator_basics(shards):
    par = from_actors(shards, "Shards")
    assert par.num_shards() == 3 and par.actors == shards
    assert isinstance(par, ParallelIterator)
    with pytest.raises(TypeError, match="gather_sync"):
        iter(par)
    with pytest.raises(TypeError, match="gather_async"):
        next(par)
    with pytest.raises(ValueError, match="0"):
        par.gather_async(num_async=0)
    assert par.for_each(str).filter(bool).batch(2).flatten().name == \
        "Shards -> str -> filter(bool) -> batch(2) -> flatten"
    assert par.gather_sync().name == "Shards -> gather_sync"
    assert par.gather_async(2).name == "Shards -> gather_async(num_async=2)"
    assert par.gather_sync(name="ParallelRollouts(bulk_sync)").for_each(str).name == \
        "ParallelRollouts(bulk_sync) -> str"


def test_from_actors_validates(cluster):
    with pytest.raises(TypeError, match="ParallelIteratorWorker"):
        from_actors([cluster.not_a_shard], "Bad")
    with pytest.raises(TypeError, match="not a Ray actor"):
        from_actors([object()], "Bad")
    with pytest.raises(ValueError, match="at least one"):
        from_actors([], "Empty")


def slow_first_shard(item):
    if item[0] == 0:
        time.sleep(0.05)
    return item


def test_gather_sync_is_lock_step(cluster):
    actors = cluster.pool
    # Shard 0 is slow: the barrier still yields shard order within each round.
    it = from_actors(actors, "Sync").for_each(slow_first_shard).gather_sync()
    before = cluster.produced(actors)

    def produced():
        return [n - b for n, b in zip(cluster.produced(actors), before)]

    assert next(it) == (0, 0)
    assert produced() == [1, 1, 1]  # one request to every shard per round
    assert [next(it), next(it)] == [(1, 0), (2, 0)]
    # No prefetch: the next round is requested only when pulled.
    assert produced() == [1, 1, 1]
    assert it.take(6) == [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]
    assert produced() == [3, 3, 3]


def test_gather_sync_ends_when_all_shards_end(cluster):
    actors = cluster.pool[:2]
    ray.get([actors[0].set_limit.remote(1), actors[1].set_limit.remote(3)])
    try:
        assert list(from_actors(actors, "Finite").gather_sync()) == \
            [(0, 0), (1, 0), (1, 1), (1, 2)]
        assert sorted(from_actors(actors, "Finite").gather_async(num_async=2)) == \
            [(0, 0), (1, 0), (1, 1), (1, 2)]
    finally:
        ray.get([a.set_limit.remote(None) for a in actors])


def test_gather_async_yields_from_all_shards(shards):
    it = from_actors(shards, "Async").gather_async(num_async=2)
    items = it.take(30)
    per_tag = Counter(tag for tag, _ in items)
    assert set(per_tag) == {0, 1, 2}
    for tag in range(3):  # each shard's own items come in order
        seq = [i for t, i in items if t == tag]
        assert seq == list(range(len(seq)))


def test_gather_async_with_source_gives_the_right_actor(shards):
    pairs = from_actors(shards, "Src").gather_async(with_source=True).take(12)
    tags = ray.get([a.get_tag.remote() for a in shards])
    assert all(isinstance(pair, SourcedItem) for pair in pairs)
    for pair in pairs:
        assert tags[shards.index(pair.actor)] == pair.item[0]
    for actor, (tag, _) in pairs:  # a NamedTuple: unpacks as (actor, item) too
        assert tags[shards.index(actor)] == tag
    gather = from_actors(shards, "Src").gather_async(num_async=2)
    zipped = gather.zip_with_source_actor()
    for actor, (tag, _) in zipped.take(6):
        assert tags[shards.index(actor)] == tag
    with pytest.raises(ValueError, match="zip_with_source_actor"):
        from_actors(shards, "Src").gather_async().for_each(str).zip_with_source_actor()
    sync_pairs = from_actors(shards, "Src").gather_sync().zip_with_source_actor().take(3)
    assert all(isinstance(pair, SourcedItem) for pair in sync_pairs)
    assert [pair.actor for pair in sync_pairs] == shards


def test_gather_async_respects_num_async(cluster):
    actor = cluster.threaded  # a threaded actor: queued calls are counted as active
    it = from_actors([actor], "Slow").gather_async(num_async=3)
    assert len(it.take(15)) == 15
    assert ray.get(actor.max_active.remote()) == 3


def test_several_gathers_do_not_interfere(shards):
    par = from_actors(shards, "Multi")
    g1, g2 = par.gather_sync(), par.gather_sync()
    assert g1.take(3) == [(0, 0), (1, 0), (2, 0)]
    assert g2.take(3) == [(0, 0), (1, 0), (2, 0)]
    assert g1.take(3) == [(0, 1), (1, 1), (2, 1)]
    other = par.for_each(lambda x: ("mapped", x[1])).gather_sync()
    assert other.take(3) == [("mapped", 0)] * 3


def test_shard_transforms_run_inside_actors(shards):
    par = from_actors(shards, "Pids")
    pids = set(par.for_each(lambda _: os.getpid()).gather_sync().take(3))
    actor_pids = set(ray.get([a.get_pid.remote() for a in shards]))
    assert pids == actor_pids and os.getpid() not in pids

    evens = par.filter(lambda x: x[1] % 2 == 0).for_each(lambda x: x[1]).gather_sync()
    assert evens.take(6) == [0, 0, 0, 2, 2, 2]
    batched = par.for_each(lambda x: x[1]).batch(2).gather_sync()
    assert batched.take(3) == [[0, 1]] * 3
    flat = par.for_each(lambda x: x[1]).batch(2).flatten().gather_sync()
    assert flat.take(6) == [0, 0, 0, 1, 1, 1]
    comb = par.combine(lambda x: [x[1]] * 2).gather_sync()
    assert comb.take(6) == [0, 0, 0, 0, 0, 0]


def test_shard_side_not_ready_and_retry(shards):
    def refuse_first_offer(item, _refused=set()):  # state lives in each actor's copy
        if item[1] == 0 and item not in _refused:
            _refused.add(item)
            return NotReady
        return item

    it = from_actors(shards, "Retry").for_each(refuse_first_offer).gather_sync()
    first = [next(it) for _ in range(6)]
    assert first == [NotReady] * 3 + [(0, 0), (1, 0), (2, 0)]  # same item offered again
    assert it.take(3) == [(0, 1), (1, 1), (2, 1)]


def test_remote_exception_names_chain_worker_and_pid(shards):
    def boom(x):
        if x[1] == 1:
            raise ValueError(f"bad item {x}")
        return x

    par = from_actors(shards, "Shards").for_each(boom)
    it = par.gather_sync()
    assert len(it.take(3)) == 3
    with pytest.raises(ValueError) as ei:
        next(it)
    text = str(ei.value) + "\n".join(getattr(ei.value, "__notes__", []))
    pid = ray.get(shards[0].get_pid.remote())
    assert "bad item (0, 1)" in text
    assert f"flowrl: raised in operator chain 'Shards -> boom' on worker index 1 (pid {pid})" \
        in text
    assert "flowrl: raised in operator 'gather_sync' of chain 'Shards -> boom -> gather_sync'" \
        in ei.value.__notes__
    assert "in boom" in text  # the remote traceback

    it = par.gather_async()
    with pytest.raises(ValueError, match="bad item"):
        it.take(10)


def test_gather_in_async_union_does_not_block(shards):
    m = Metrics()
    log = []
    par = from_actors(shards[:2], "Net", metrics=m)
    local = scripted([NotReady, "local"], name="Local", log=log)
    u = par.gather_async().union(local)
    items = u.take(10)
    assert "local" in items and log == [True]
    u2 = from_actors(shards, "NetSync", metrics=m).gather_sync().union(
        from_items(["x"], m, name="X"))
    assert sorted(map(str, u2.take(7)))[-1] == "x"


# --------------------------------------------------------------------------
# Actor failures
# --------------------------------------------------------------------------

def _kill_and_wait(actor):
    ray.kill(actor, no_restart=True)
    # ray.kill is asynchronous: wait until a call on the actor fails (at most 30 s).
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)


def test_failed_shard_is_dropped_when_handler_returns_none(cluster):
    victim = cluster.victim()
    actors = [cluster.pool[0], victim, cluster.pool[2]]
    failures = []

    def on_failure(actor, error):
        failures.append((actor, error))
        return None

    par = from_actors(actors, "Flaky", on_actor_failure=on_failure)
    it = par.gather_async(num_async=2, with_source=True)
    assert {a for a, _ in it.take(30)} == set(actors)
    _kill_and_wait(victim)
    later = it.take(40)
    assert len(later) == 40
    assert len(failures) == 1 and failures[0][0] == victim
    assert isinstance(failures[0][1], ray.exceptions.RayActorError)
    assert {a for a, _ in later[-30:]} == {actors[0], actors[2]}
    assert par.num_shards() == 2 and par.actors == [actors[0], actors[2]]

    sync = par.gather_sync()  # a new gather uses the remaining shards
    assert [tag for tag, _ in sync.take(4)] == [0, 2, 0, 2]


def test_failed_shard_is_replaced_by_handler(cluster):
    victim = cluster.victim()
    spare = cluster.pool[2]
    actors = [victim, cluster.pool[1]]
    calls = []

    def on_failure(actor, error):
        calls.append(actor)
        return spare

    par = from_actors(actors, "Restart", on_actor_failure=on_failure)
    it = par.gather_sync()
    victim_tag = ray.get(victim.get_tag.remote())
    assert [t for t, _ in it.take(2)] == [victim_tag, 1]
    async_it = par.gather_async()  # a second gather over the same shards
    async_it.take(2)
    _kill_and_wait(victim)
    tags = [t for t, _ in it.take(6)]
    # The round in which the shard died has one item; the replacement joins the next.
    assert tags == [1, 2, 1, 2, 1, 2]
    assert par.actors == [spare, actors[1]]
    # The other gather uses the same replacement; the handler ran once.
    assert {t for t, _ in async_it.take(20)[-10:]} == {2, 1}
    assert calls == [victim]


def test_failed_shard_without_handler_raises(cluster):
    it = from_actors([cluster.pool[0], cluster.dead_actor()], "NoHandler").gather_async()
    with pytest.raises(ray.exceptions.RayActorError) as ei:
        it.take(50)
    assert any("NoHandler" in n for n in ei.value.__notes__)


def test_error_when_no_shard_left(cluster):
    dead = cluster.dead_actor()
    it = from_actors([dead], "Lonely", on_actor_failure=lambda a, e: None).gather_sync()
    with pytest.raises(ray.exceptions.RayActorError) as ei:
        it.take(1)
    assert any("no healthy shard left" in n for n in ei.value.__notes__)
