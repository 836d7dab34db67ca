"""The tile cache shared by the reads of one process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ndvi_scale.engine.tiles import TileCache

# --------------------------------------------------------------------------------------------------- cache


def test_tile_cache_lru_budget():
    cache = TileCache(max_bytes=3 * 800)
    loads: list[str] = []

    def loader(key: str):
        def load() -> np.ndarray:
            loads.append(key)
            return np.zeros(100, dtype=np.float64)  # 800 bytes

        return load

    for key in "abcab":
        cache.get(key, loader(key))
    assert loads == ["a", "b", "c"] and cache.hits == 2 and cache.nbytes == 2400
    cache.get("d", loader("d"))  # evicts the least recently used: c
    cache.get("c", loader("c"))
    assert loads == ["a", "b", "c", "d", "c"] and cache.nbytes <= cache.max_bytes
    with pytest.raises(ValueError, match="read-only"):
        cache.get("c", loader("c"))[0] = 1
    big = TileCache(max_bytes=100)
    big.get("x", loader("x"))  # larger than the budget: returned, not kept
    assert big.nbytes == 0


def test_tile_cache_loads_once_across_threads():
    cache = TileCache(max_bytes=2**20)
    calls = []
    start = threading.Barrier(4)

    def load() -> np.ndarray:
        calls.append(1)
        time.sleep(0.2)
        return np.arange(10)

    results = []

    def worker() -> None:
        start.wait()
        results.append(cache.get("k", load))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    assert all(np.array_equal(r, np.arange(10)) for r in results)


def test_tile_cache_failed_load_is_retried_by_waiters():
    cache = TileCache(max_bytes=2**20)
    attempts = []
    gate = threading.Event()

    def failing() -> np.ndarray:
        attempts.append("fail")
        gate.wait(2)
        raise OSError("transient")

    def working() -> np.ndarray:
        attempts.append("ok")
        return np.ones(3)

    errors = []

    def first() -> None:
        try:
            cache.get("k", failing)
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    while not attempts:
        time.sleep(0.01)
    got = []
    t2 = threading.Thread(target=lambda: got.append(cache.get("k", working)))
    t2.start()
    time.sleep(0.05)
    gate.set()
    t.join()
    t2.join()
    assert errors and attempts == ["fail", "ok"] and np.array_equal(got[0], np.ones(3))


