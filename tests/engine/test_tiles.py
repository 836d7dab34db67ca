"""The tile cache shared by the reads of one process."""

from __future__ import annotations

import sys
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




# ------------------------------------------------------------------------------------------ reused buffers


def test_scratch_pool_lends_and_takes_back_only_its_own_buffers_once():
    from ndvi_scale.engine.tiles import ScratchPool

    pool = ScratchPool(keep=2)
    a = pool.get((4, 6), np.uint16)
    assert a.shape == (4, 6) and a.dtype == np.uint16 and a.flags.writeable
    base = a.base
    pool.give(a[1:, 2:])  # a view of a lent buffer gives the whole buffer back
    pool.give(a)  # a second give of the same buffer is ignored (else two later gets would share it)
    pool.give(np.empty((4, 6), np.uint16))  # not lent by this pool: ignored
    assert len(pool._free) == 1
    b = pool.get((2, 3), np.float32)  # 24 bytes fit in the 48 kept: reused, not allocated
    assert b.base is base and b.shape == (2, 3) and b.dtype == np.float32
    c = pool.get((4, 6), np.uint16)  # nothing free: a new buffer
    assert c.base is not base
    big, small, mid = pool.get((100,), np.uint8), pool.get((10,), np.uint8), pool.get((50,), np.uint8)
    for arr in (big, small, mid):
        pool.give(arr)
    assert sorted(buf.nbytes for buf in pool._free) == [50, 100]  # at most ``keep``, the larger ones
    pool.clear()
    assert pool._free == []


def test_scratch_pool_take_is_reused_between_with_blocks():
    from ndvi_scale.engine.tiles import ScratchPool

    pool = ScratchPool(keep=1)
    with pool.take((8, 8), np.uint16) as first:
        first[:] = 7
        base = first.base
    with pool.take((8, 8), np.uint16) as second:
        assert second.base is base


def test_result_pool_lends_a_buffer_again_once_nothing_refers_to_it():
    """A task's result block is handed to dask, which drops it once the region is written: its buffer is lent
    to a later result only when no array or view of it is alive any more."""
    from ndvi_scale.engine.tiles import ResultPool

    def address(arr: np.ndarray) -> int:
        return int(arr.__array_interface__["data"][0])

    pool = ResultPool(keep=2)
    a = pool.get((4, 6), np.float32)
    first = address(a)
    a[:] = 1
    view = a.reshape(1, 24)[:, 3:]  # what dask's layer slicing makes of a block
    del a
    b = pool.get((4, 6), np.float32)
    assert address(b) != first  # the block's view is alive: not lent
    del view
    c = pool.get((2, 3), np.uint16)  # fits in the first buffer, now free: lent again
    assert address(c) == first and c.shape == (2, 3) and c.dtype == np.uint16 and c.flags.writeable
    d = pool.get((4, 6), np.float32)  # both in use and the pool full: a new array, not kept
    assert address(d) not in (first, address(b)) and len(pool._bufs) == 2
    del b, c, d
    big = pool.get((10, 10), np.float32)  # larger than every free buffer: replaces one
    assert len(pool._bufs) == 2 and any(buf.nbytes == 400 for buf in pool._bufs)
    del big
    pool.clear()
    assert pool._bufs == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE) is Linux's")
def test_populate_maps_the_pages_without_changing_a_byte():
    """populate() maps an array's pages ahead of its first writes (no page fault then), leaving its contents."""
    import resource

    from ndvi_scale.engine.tiles import populate

    # 16k pages of 4 KiB, none mapped yet; mapped in 4 MiB pieces, the last one short
    fresh = np.empty(64 * 2**20 + 3 * 4096 + 100, dtype=np.uint8)
    assert populate(fresh)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    fresh[::4096] = 1  # one write per page
    assert resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before < 100
    data = np.arange(10**6, dtype=np.float32)
    assert populate(data) and np.array_equal(data, np.arange(10**6, dtype=np.float32))
    assert not populate(data[::2])  # not one block of memory: nothing done


def test_tile_cache_lends_the_buffers_of_evicted_tiles():
    cache = TileCache(max_bytes=2 * 800)
    for key in "ab":
        arr = cache.buffer((100,), np.float64)
        arr[:] = 1
        cache.put(key, arr)
    del arr
    evicted = cache.peek("a")
    assert evicted is not None
    address = evicted.__array_interface__["data"][0]
    del evicted
    c = cache.buffer((100,), np.float64)
    assert c.__array_interface__["data"][0] != address  # nothing evicted yet: a new buffer
    cache.put("c", c)  # evicts a: nobody holds it, so its buffer is kept for the next tile
    del c
    again = cache.buffer((100,), np.float64)
    assert again.__array_interface__["data"][0] == address and again.flags.writeable
    held = cache.peek("b")
    cache.put("d", again)  # evicts b, which this test still holds: not recycled
    assert cache.buffer((100,), np.float64).__array_interface__["data"][0] != held.__array_interface__["data"][0]


def test_tile_cache_retires_a_tile_once_every_read_that_needs_it_has_taken_it():
    """put(..., uses=n): the tile leaves the cache after n more claims (hits, or takes by reads that waited for
    it); its buffer is lent again only once nothing refers to it."""
    cache = TileCache(max_bytes=2**20)
    have, mine, pending = cache.claim(["t"])
    assert mine == ["t"]
    _, _, waiting = cache.claim(["t"])  # another read finds it loading
    arr = cache.buffer((100,), np.float64)
    arr[:] = 1
    cache.put("t", arr, uses=2)
    del arr
    assert cache.take("t") is not None and cache.nbytes == 800  # the waiter's use: one left
    have, _, _ = cache.claim(["t"])  # the last use: retired, but this read still holds it
    assert cache.nbytes == 0 and cache.retired == 1 and cache.peek("t") is None
    held = have.pop("t")
    address = held.__array_interface__["data"][0]
    assert cache.buffer((100,), np.float64).__array_interface__["data"][0] != address  # still read: not lent
    view = held[10:20]
    del held
    assert cache.buffer((100,), np.float64).__array_interface__["data"][0] != address  # a view holds it too
    del view
    again = cache.buffer((100,), np.float64)
    assert again.__array_interface__["data"][0] == address and again.flags.writeable
    # a tile no other read needs is not kept; one whose uses are unknown stays until evicted
    cache.claim(["solo", "lru"])
    cache.put("solo", np.zeros(10), uses=0)
    cache.put("lru", np.zeros(10))
    assert cache.peek("solo") is None and cache.peek("lru") is not None
    for _ in range(5):
        cache.claim(["lru"])
    assert cache.peek("lru") is not None


def test_tile_cache_keeps_spares_within_its_budget():
    """Retired tiles still read count against the budget (all but the newest few, the next tiles' buffers): a
    run whose reads keep many of them cannot grow the cache's memory past its budget."""
    from ndvi_scale.engine.tiles import EVICTED_SPARES

    cache = TileCache(max_bytes=20 * 800)
    held = []
    for k in range(40):
        key = f"t{k}"
        cache.claim([key])
        cache.put(key, np.zeros(100), uses=1)
        have, _, _ = cache.claim([key])  # its one other use: retired, and held by this "read"
        held.append(have[key])
    assert cache.nbytes == 0 and cache.retired == 40
    assert cache._spare_bytes <= cache.max_bytes + EVICTED_SPARES * 800
    assert len(cache._spare) == 20 + EVICTED_SPARES


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_upsample_into_is_nearest_for_every_shift_and_shape(dtype, k):
    """``dst[i, j] = src[(i + dr) // k, (j + dc) // k]``: the doubling fast path (uint8/uint16 by 2, the 20 m SCL)
    and the gathers give the same, including the full range of the type, odd sizes and a source wider than
    needed."""
    from ndvi_scale.engine.tiles import upsample_into

    rng = np.random.default_rng(k)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    for height, width in ((1, 1), (5, 7), (64, 33), (257, 300)):
        for dr in range(k):
            for dc in range(k):
                rows, cols = (dr + height - 1) // k + 1, (dc + width - 1) // k + 1 + (width % 3 == 0)
                if info is not None:
                    src = rng.integers(info.min, info.max, size=(rows, cols), endpoint=True).astype(dtype)
                else:
                    src = rng.standard_normal((rows, cols)).astype(dtype)
                want = src[(np.arange(height) + dr) // k][:, (np.arange(width) + dc) // k]
                dst = np.zeros((height, width), dtype=dtype)
                upsample_into(dst, src, k, dr, dc)
                np.testing.assert_array_equal(dst, want)
