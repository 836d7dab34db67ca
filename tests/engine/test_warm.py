"""ndvi_scale.engine.warm: the first reads of chunks not started yet, issued early and claimed by their task."""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
from helpers import bboxes, cfg

from ndvi_scale.engine import reader as reader_mod
from ndvi_scale.engine import warm as warm_mod
from ndvi_scale.engine.fetch import POOL
from ndvi_scale.engine.warm import WARM, WarmReads
from ndvi_scale.pipeline import build
from ndvi_scale.testing.reference import stack_then_reduce


def _never() -> Future[Any]:
    raise AssertionError("a warmed read that succeeded is not made again")


def _reads(costs: list[int], log: list[int]) -> list[tuple[Any, Any, int]]:
    def read(k: int) -> int:
        log.append(k)
        return k * 10

    return [((("key", k)), (lambda k=k: read(k)), c) for k, c in enumerate(costs)]


def test_warm_submits_the_leading_reads_of_a_unit_within_its_limit() -> None:
    w = WarmReads(budget=100)
    log: list[int] = []
    assert w.warm("u1", _reads([10, 10, 10, 10], log), limit=25)
    assert w.claim(("key", 0), _never).result() == 0 and w.claim(("key", 1), _never).result() == 10
    assert w.claim(("key", 2), _never) is None  # beyond the unit's limit: not warmed
    assert w.claim(("key", 0), _never) is None  # claimed once only
    assert sorted(log) == [0, 1] and w.claimed == 2
    assert w.warm("big", _reads([500], log), limit=25)  # at least one read, whatever its cost
    assert w.claim(("key", 0), _never).result() == 0


def test_a_later_warm_with_a_larger_limit_continues_where_the_first_stopped() -> None:
    w = WarmReads(budget=1000)
    log: list[int] = []
    assert w.warm("u", _reads([10, 10, 10, 10, 10], log), limit=20)  # reads 0 and 1
    assert not w.warm("u", _reads([10, 10, 10, 10, 10], log), limit=20)  # the same total: nothing more
    assert w.warm("u", _reads([10, 10, 10, 10, 10], log), limit=40)  # 2 and 3 follow, never 0 and 1 again
    [w.claim(("key", k), _never).result() for k in range(4)]
    assert sorted(log) == [0, 1, 2, 3] and w.warmed == 4 and w.claim(("key", 4), _never) is None
    assert w.has_room("u", 40) and not w.has_room("u", 30) and w.has_room("v", 0)  # at the limit: no-cost reads
    w.started("u")
    assert not w.has_room("u", 80)
    assert not w.warm("u", _reads([10, 10, 10, 10, 10], log), limit=80)  # its task has started


def test_warm_never_twice_never_a_started_unit_never_beyond_the_budget() -> None:
    w = WarmReads(budget=30)
    log: list[int] = []
    w.started("running")
    assert not w.warm("running", _reads([1], log))  # its task has started: it makes its own reads
    assert w.has_started("running") and not w.has_started("other")
    assert w.warm("a", _reads([20], log)) and not w.warm("a", _reads([20], log))  # once per unit
    assert w.warm("b", [(("b", 0), lambda: 1, 20)])  # the budget (30) was not full yet
    assert not w.warm("c", [(("c", 0), lambda: 1, 1)])  # now it is (40 held)
    w.claim(("key", 0), _never), w.claim(("b", 0), _never)
    assert w.warm("c", [(("c", 0), lambda: 1, 1)])  # claimed reads free the budget
    assert not WarmReads(budget=0).warm("x", [(("x", 0), lambda: 1, 1)])  # 0 turns warming off


def test_unclaimed_reads_expire() -> None:
    w = WarmReads(budget=100, ttl=0.0)
    assert w.warm("a", [(("a", 0), lambda: 1, 10)])
    time.sleep(0.01)
    assert w.warm("b", [(("b", 0), lambda: 2, 10)])  # expires a's read on the way
    assert w.claim(("a", 0), _never) is None and w.claim(("b", 0), _never) is not None


def test_a_warmed_read_that_failed_is_made_again_by_its_task() -> None:
    """A warmed read makes one attempt; if it fails, the claimer gets its own read instead (the read policy's
    retries, records and skipping), and that read's error if it fails too."""
    w = WarmReads(budget=100)

    def boom() -> int:
        raise OSError("HTTP response code: 503")

    assert w.warm("a", [(("a", 0), boom, 1), (("a", 1), boom, 1)])
    assert w.claim(("a", 0), lambda: POOL.submit(lambda: 42)).result(timeout=10) == 42
    again_fails = w.claim(("a", 1), lambda: POOL.submit(boom))
    with pytest.raises(OSError, match="503"):
        again_fails.result(timeout=10)
    assert w.failed == 2


def test_warmed_reads_are_claimed_once_each_and_change_no_pixel(sample, monkeypatch) -> None:
    """A run whose tasks warm the chunks after them: every (asset, window) read exactly once (warmed or made by
    the task itself), some of them warmed, and the cube equal to the reference and to a run without warming."""
    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["partly-outside"], chunk=64)
    ref = stack_then_reduce(c)
    starts: collections.Counter[Any] = collections.Counter()
    lock = threading.Lock()
    real = reader_mod.AssetReader.start

    def counting(self: Any, window: Any, policy: Any) -> Any:
        with lock:
            starts[(self.url, int(window.row_off), int(window.col_off), int(window.height), int(window.width))] += 1
        return real(self, window, policy)

    monkeypatch.setattr(reader_mod.AssetReader, "start", counting)
    got = build(c).compute(scheduler="threads", num_workers=1)  # one task at a time: the others always warmed
    assert WARM.claimed > 0 and WARM.claimed == WARM.warmed  # warmed, and nothing warmed for nothing
    assert starts and max(starts.values()) == 1  # no read twice
    np.testing.assert_array_equal(got.ndvi.values, ref["ndvi"])
    np.testing.assert_array_equal(got.valid_count.values, ref["valid_count"])
    monkeypatch.setattr(warm_mod.WARM, "budget", 0)
    WARM.clear()
    cold = build(c).compute(scheduler="threads", num_workers=2)
    np.testing.assert_array_equal(cold.ndvi.values, got.ndvi.values)


def test_start_reading_warms_the_first_period_before_any_task_runs(sample, monkeypatch) -> None:
    """What the write stage calls before the template: the first period's first chunks are warmed, their tasks
    claim every warmed read, and the cube is the reference's."""
    from ndvi_scale.engine.graph import start_reading
    from ndvi_scale.engine.task import DAY_LAYERS, release_buffers

    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["across-overlap"], chunk=64)
    lazy = build(c)
    release_buffers()
    assert start_reading(lazy.ndvi.data) and WARM.warmed > 0 and WARM.claimed == 0
    # the first tasks' day layers are in the pool already (their pages being mapped), one per region thread
    prepared = {id(buf) for buf in DAY_LAYERS._free}
    assert len(prepared) == 2
    taken: list[int] = []
    get = DAY_LAYERS.get

    def recording_get(shape: Any, dtype: Any) -> Any:
        arr = get(shape, dtype)
        taken.append(id(arr.base))
        return arr

    monkeypatch.setattr(DAY_LAYERS, "get", recording_get)
    got = lazy.compute(scheduler="threads", num_workers=2)
    assert WARM.claimed == WARM.warmed
    assert set(taken[:2]) == prepared  # the first two tasks folded into them
    ref = stack_then_reduce(c)
    np.testing.assert_array_equal(got.ndvi.values, ref["ndvi"])


def test_start_reading_decodes_what_it_warms_and_a_failed_decode_is_read_again(sample, monkeypatch) -> None:
    """Before any task runs, the warmed reads are decoded too (idle cores): their futures hold the finished
    windows. A warmed read whose one attempt fails (here: the decode) is read again by its task, under the
    policy, and the cube is still the reference's."""
    from concurrent.futures import wait

    from ndvi_scale.engine import owntiles
    from ndvi_scale.engine.graph import start_reading

    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["across-overlap"], chunk=64)
    decoded = []
    real_decode = owntiles.decode_tile

    def counting(*a: Any, **k: Any) -> Any:
        decoded.append(1)
        return real_decode(*a, **k)

    monkeypatch.setattr(owntiles, "decode_tile", counting)
    lazy = build(c)
    assert start_reading(lazy.ndvi.data)
    futures = [f for f, _, _ in WARM._reads.values()]
    wait(futures)
    assert futures and decoded  # decoded before any task ran
    windows = [f.result()() for f in futures]
    assert all(isinstance(w, np.ndarray) and w.dtype in (np.uint8, np.uint16) for w in windows)  # SCL: uint8
    ref = stack_then_reduce(c)
    np.testing.assert_array_equal(lazy.compute(scheduler="threads", num_workers=2).ndvi.values, ref["ndvi"])

    WARM.clear()
    real_try_read = reader_mod.AssetReader.try_read
    failures = []

    def failing_once(self: Any, window: Any) -> Any:
        if not failures:
            failures.append(self.url)
            raise ValueError("a tile decoded to 12 bytes, 2097152 expected (corrupt or truncated data)")
        return real_try_read(self, window)

    monkeypatch.setattr(reader_mod.AssetReader, "try_read", failing_once)
    lazy = build(c)
    assert start_reading(lazy.ndvi.data)
    got = lazy.compute(scheduler="threads", num_workers=2)
    assert failures and WARM.failed == 1
    np.testing.assert_array_equal(got.ndvi.values, ref["ndvi"])
    np.testing.assert_array_equal(got.valid_count.values, ref["valid_count"])
