"""AssetReader: the reference stack's pixels (GDAL warping every asset whole), window by window, warp-free where
grids are aligned; the read policy; open files bounded."""

from __future__ import annotations

import errno
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import rasterio
from helpers import bboxes, items_and_grid
from rasterio.windows import Window

from ndvi_scale.engine import reader as reader_mod
from ndvi_scale.engine.grid import OutputGrid
from ndvi_scale.engine.handles import HandlePool
from ndvi_scale.engine.reader import AssetReader, match_grid, reader_for
from ndvi_scale.engine.tiles import TILE_CACHE
from ndvi_scale.errors import ReadError
from ndvi_scale.faults import AssetReadError, ReadPolicy
from ndvi_scale.testing.reference import reference_stack

BANDS = ("red", "nir", "scl")
FAST_POLICY = ReadPolicy(backoff=0.0)


def read_all(items: list, grid: OutputGrid, chunk: int) -> tuple[np.ndarray, dict[str, set[bool | None]]]:
    """The (items, 3, y, x) stack read chunk by chunk through the engine's readers (2 threads at once, as a
    task pool would), and which path each file took."""
    from concurrent.futures import ThreadPoolExecutor

    height, width = grid.shape
    out = np.full((len(items), 3, height, width), 99, dtype=np.uint16)
    jobs = [
        (i, b, sl)
        for i in range(len(items))
        for b in range(3)
        for _, _, sl in grid.windows(chunk)
    ]

    def read(job: tuple[int, int, tuple[slice, slice]]) -> None:
        i, b, (rows, cols) = job
        r = reader_for(items[i].bands[BANDS[b]].href, grid)
        window = r.read(Window.from_slices(rows, cols), FAST_POLICY)
        # the 8-bit SCL comes as uint8 on the aligned paths (half the bytes to fill and fold), the rest as uint16
        assert window.dtype == (np.uint8 if BANDS[b] == "scl" and r.fast else np.uint16), (BANDS[b], window.dtype)
        out[i, b, rows, cols] = window

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(read, jobs))
    paths: dict[str, set[bool | None]] = {}
    for it in items:
        for b in BANDS:
            href = it.bands[b].href
            paths.setdefault(href.rsplit("/", 1)[-1], set()).add(reader_for(href, grid).fast)
    return out, paths


@pytest.fixture(params=["tiles", "gdal"])
def aligned_path(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Aligned reads by the engine's own tile fetch and decode (the default for local and http(s) COGs), or by
    GDAL (s3://, gs://, files the engine does not decode itself)."""
    monkeypatch.setattr(reader_mod.owntiles, "OWN_TILES", request.param == "tiles")
    return str(request.param)


def which_path(items: list, grid: OutputGrid) -> set[str | None]:
    return {reader_for(it.bands[b].href, grid).path for it in items for b in BANDS}


@pytest.mark.parametrize("where", ["inside-A", "across-overlap", "partly-outside"])
@pytest.mark.parametrize("chunk", [16, 50, 2048])
def test_aligned_reads_equal_the_reference_stack(sample, where, chunk, aligned_path, monkeypatch):
    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)[where])
    ref = reference_stack(items, grid)
    got, paths = read_all(items, grid, chunk)
    assert np.array_equal(got, ref), f"{where}, chunk {chunk}"
    assert paths == {"B04.tif": {True}, "B08.tif": {True}, "SCL.tif": {True}}  # never the warper
    assert which_path(items, grid) == {aligned_path}
    if spec.blocksize < spec.size and chunk < spec.size:
        # tiles cut by chunk edges were decoded once, then shared: taken from the cache, or waited for while the
        # other thread decoded them (which of the two depends on timing; CI once saw only waits)
        assert TILE_CACHE.hits + TILE_CACHE.waits > 0
    assert (ref != 0).any() and (where == "inside-A" or (ref == 0).any())
    monkeypatch.setattr(TILE_CACHE, "max_bytes", 0)  # without the tile cache: the same pixels
    reader_mod.forget_readers()
    uncached, _ = read_all(items, grid, chunk)
    assert np.array_equal(uncached, ref)


@pytest.mark.parametrize("chunk", [16, 50])
def test_expected_windows_retire_every_shared_tile_once_taken(sample, chunk):
    """Readers told the windows they will be read on (what the tasks of a period do, ``AssetReader.expect``):
    a tile cut by chunk edges leaves the tile cache as soon as every window that needs it has taken it, the
    pixels are the same, and nothing is left cached after the last window."""
    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)["across-overlap"])
    for it in items:
        for b in BANDS:
            reader_for(it.bands[b].href, grid).expect(
                Window.from_slices(*sl) for _, _, sl in grid.windows(chunk))
    got, _ = read_all(items, grid, chunk)
    assert np.array_equal(got, reference_stack(items, grid))
    assert which_path(items, grid) == {"tiles"}
    assert TILE_CACHE.retired > 0 and TILE_CACHE.hits + TILE_CACHE.waits > 0
    assert TILE_CACHE.nbytes == 0 and not TILE_CACHE._data  # every cached tile was taken by all its windows


def check_reads(items: list, grid: OutputGrid, chunk: int, *, red_nir_aligned: bool, scl_aligned: bool) -> np.ndarray:
    """Reads of every asset on ``grid`` equal the reference stack, each file on the path expected of it."""
    got, paths = read_all(items, grid, chunk)
    assert np.array_equal(got, reference_stack(items, grid))
    assert paths == {"B04.tif": {red_nir_aligned}, "B08.tif": {red_nir_aligned}, "SCL.tif": {scl_aligned}}
    return got


def _grid_like(grid: OutputGrid, **kw: Any) -> OutputGrid:
    return OutputGrid(kw.get("epsg", grid.epsg), kw.get("bounds", grid.bounds), kw.get("resolution", grid.resolution))


def test_other_crs_is_warped_like_the_reference(sample):
    spec, catalog = sample
    bbox = bboxes(spec)["across-overlap"]
    items, _ = items_and_grid(catalog, bbox)
    from ndvi_scale.engine.grid import output_grid

    grid = output_grid(bbox, 32632, 10.0)  # the next UTM zone: a real reprojection
    got = check_reads(items, grid, 40, red_nir_aligned=False, scl_aligned=False)
    assert (got != 0).any()


def test_fractional_shift_is_warped(sample):
    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)["across-overlap"])
    shifted = _grid_like(grid, bounds=tuple(v + 5.0 for v in grid.bounds))  # half a pixel off
    check_reads(items, shifted, 40, red_nir_aligned=False, scl_aligned=False)


def test_coarser_output_mixes_paths(sample):
    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)["partly-outside"], resolution=20)
    # 20 m output: red/nir need downsampling (warped), SCL is at home (aligned)
    check_reads(items, grid, 40, red_nir_aligned=False, scl_aligned=True)


def test_finer_output_repeats_pixels(sample, aligned_path):
    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)["across-overlap"], resolution=5)
    # 5 m output: red/nir are repeated 2 x 2, SCL 4 x 4, exactly as GDAL's nearest
    check_reads(items, grid, 56, red_nir_aligned=True, scl_aligned=True)
    assert which_path(items, grid) == {aligned_path}


def test_reader_is_made_once_per_process_and_knows_its_extent(sample):
    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)["partly-outside"])
    href = items[0].bands["red"].href
    r = reader_for(href, grid)
    assert reader_for(href, grid) is r and reader_for(href, _grid_like(grid, resolution=20.0)) is not r
    assert r.fast is None  # nothing opened yet
    extent = r.coverage()
    assert r.fast is True and extent is not None
    height, width = grid.shape
    r0, r1, c0, c1 = max(0, extent[0]), min(height, extent[1]), max(0, extent[2]), min(width, extent[3])
    assert (r1 - r0, c1 - c0) != (height, width)  # it covers part of the grid only
    whole = r.read(Window(0, 0, width, height), FAST_POLICY)
    assert (whole[r0:r1, c0:c1] != 0).any() and not whole[:r0].any() and not whole[r1:].any()
    assert not whole[:, :c0].any() and not whole[:, c1:].any()


def test_open_ahead_submits_an_open_once_until_it_is_done(sample):
    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)["partly-outside"])
    r = AssetReader(items[0].bands["red"].href, grid)
    submitted: list[Future] = []

    class Pool:  # holds the opens instead of running them: a queue of header reads not answered yet
        def submit(self, fn, *args):
            fut: Future = Future()
            fut.fn = fn  # type: ignore[attr-defined]
            submitted.append(fut)
            return fut

    r.open_ahead(Pool())
    r.open_ahead(Pool())  # the period's sources ask again (this period, then as the next one's)
    assert len(submitted) == 1 and r.fast is None
    submitted[0].set_result(None)  # an open that ended without a plan (it failed): the next call tries again
    r.open_ahead(Pool())
    assert len(submitted) == 2
    submitted[1].set_result(submitted[1].fn())  # the open itself, run
    assert r.fast is True
    r.open_ahead(Pool())
    assert len(submitted) == 2  # open: nothing to do


def test_missing_asset_fails_naming_it_or_is_skipped(sample, tmp_path):
    spec, catalog = sample
    _, grid = items_and_grid(catalog, bboxes(spec)["inside-A"])
    missing = str(tmp_path / "missing.tif")
    window = Window(0, 0, 5, 4)
    # an error naming the file once the read policy (retries, then fail or skip) has given up on the asset
    with pytest.raises(AssetReadError, match="missing.tif") as err:
        AssetReader(missing, grid).read(window, FAST_POLICY)
    assert err.value.fault.attempts == 3 and err.value.fault.window == (0, 0, 4, 5)
    reader_mod._GIVEN_UP.clear()
    with pytest.warns(UserWarning, match="missing.tif"):
        out = AssetReader(missing, grid).read(window, ReadPolicy(backoff=0.0, skip=True))
    np.testing.assert_array_equal(out, np.zeros((4, 5), dtype=np.uint16))
    reader_mod._GIVEN_UP.clear()


def test_out_of_file_descriptors_is_not_blamed_on_the_asset(sample, aligned_path, monkeypatch):
    """EMFILE is the process's limit, not the asset's fault: no retries, no skip record, a ReadError that says
    how to fix it."""
    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)["inside-A"])
    calls: list[str] = []

    def no_fds(url: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(url)
        raise OSError(errno.EMFILE, "Too many open files")

    if aligned_path == "tiles":
        monkeypatch.setattr(reader_mod.ranges, "fetch", no_fds)
    else:
        monkeypatch.setattr(rasterio, "open", no_fds)
    policy = ReadPolicy(backoff=0.0, skip=True)
    with pytest.raises(ReadError, match="file descriptors.*NDVI_SCALE_MAX_OPEN_FILES") as err:
        reader_for(items[0].bands["red"].href, grid).read(Window(0, 0, 4, 4), policy)
    assert not isinstance(err.value, AssetReadError) and len(calls) == 1


def test_match_grid():
    out = (10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0)
    m = match_grid((10.0, 0.0, 960.0, 0.0, -10.0, 5020.0), (96, 96), 32631, out, 32631)
    assert m is not None and (m.col_off, m.row_off, m.factor) == (-4, -2, 1)
    m20 = match_grid((20.0, 0.0, 960.0, 0.0, -20.0, 5020.0), (48, 48), 32631, out, 32631)
    assert m20 is not None and m20.factor == 2 and m20.extent == (-2, 94, -4, 92)
    assert match_grid((10.0, 0.0, 965.0, 0.0, -10.0, 5020.0), (96, 96), 32631, out, 32631) is None  # half px
    assert match_grid((10.0, 0.0, 960.0, 0.0, -10.0, 5020.0), (96, 96), 32632, out, 32631) is None  # CRS
    assert match_grid((15.0, 0.0, 960.0, 0.0, -15.0, 5020.0), (96, 96), 32631, out, 32631) is None  # 1.5x
    assert match_grid((10.0, 1.0, 960.0, 0.0, -10.0, 5020.0), (96, 96), 32631, out, 32631) is None  # rotated


# ------------------------------------------------------------------------------------------------ handles


class Handle:
    opened = 0

    def __init__(self) -> None:
        Handle.opened += 1
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_handle_pool_gives_each_concurrent_user_its_own_handle_and_reuses_them():
    pool = HandlePool(max_open=16)
    Handle.opened = 0
    with pool.use("a", Handle) as x, pool.use("a", Handle) as y:  # two reads of one file at the same time
        assert x is not y
    assert Handle.opened == 2
    for _ in range(5):  # one read after the other: the free handles, no more opens
        with pool.use("a", Handle) as z:
            assert z in (x, y)
    assert Handle.opened == 2 and pool.open_count == 2
    with pool.use("a", Handle) as busy:
        pool.reset("a")
        idle = x if busy is y else y
        assert idle.closed and not busy.closed  # a handle in use is not pulled from under its read
    assert busy.closed and pool.open_count == 0  # ... it is closed when the read gives it back
    with pool.use("a", Handle) as fresh:  # after a reset (a retry): opens anew
        assert fresh not in (x, y) and not fresh.closed


def test_handle_pool_caps_open_files_whatever_the_number_of_files():
    pool = HandlePool(max_open=8)
    handles = []
    for k in range(100):
        with pool.use(f"file-{k}", Handle) as h:
            handles.append(h)
        assert pool.open_count <= 8
    assert sum(not h.closed for h in handles) == 8 and all(h.closed for h in handles[:-8])  # LRU closed first


def test_handle_pool_is_thread_safe():
    pool = HandlePool(max_open=4)
    in_use: set[int] = set()
    clash = threading.Event()
    lock = threading.Lock()

    def work(k: int) -> None:
        for n in range(200):
            with pool.use(f"f{(k + n) % 6}", Handle) as h:
                with lock:
                    if id(h) in in_use:
                        clash.set()
                    in_use.add(id(h))
                with lock:
                    in_use.discard(id(h))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clash.is_set() and pool.open_count <= 4 + 8  # in-use handles may exceed the cap briefly


def test_tiles_that_do_not_decode_are_read_again_under_the_policy(sample, monkeypatch):
    """The engine's own path decodes in the task's thread, after the fetch: bytes that fail to decode there (a file
    replaced or corrupted meanwhile) are read again under the read policy, with the same pixels."""
    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)["across-overlap"])
    ref = reference_stack(items, grid)
    from ndvi_scale.engine import owntiles

    real, failures = owntiles.decode_tile, []

    def flaky(layout: Any, data: Any, out: Any = None) -> Any:
        if not failures:
            failures.append(1)
            raise ValueError("a tile decoded to 12 bytes, 524288 expected (corrupt or truncated data)")
        return real(layout, data, out=out)

    monkeypatch.setattr(owntiles, "decode_tile", flaky)
    monkeypatch.setattr(TILE_CACHE, "max_bytes", 0)  # every tile decoded by the finisher
    height, width = grid.shape
    red = reader_for(items[0].bands["red"].href, grid)
    finish = red.start(Window(0, 0, width, height), FAST_POLICY)
    assert failures == []  # nothing decoded yet: the fetch only
    np.testing.assert_array_equal(finish(), ref[0, 0])
    assert failures == [1] and red.path == "tiles"


def test_reads_cut_by_the_process_exiting_are_not_blamed_on_the_asset(sample, monkeypatch):
    """A run that failed exits while other reads are in flight: their pools refuse work (PoolClosed). That is not
    the asset's fault: no retries, no skip, no fault record."""
    from ndvi_scale.engine import fetch, owntiles

    spec, catalog = sample
    items, grid = items_and_grid(catalog, bboxes(spec)["across-overlap"])

    class Closed:
        def submit(self, *args: Any) -> Any:
            raise fetch.PoolClosed("cannot schedule new futures after shutdown")

    monkeypatch.setattr(owntiles, "DECODE_POOL", Closed())
    monkeypatch.setattr(TILE_CACHE, "max_bytes", 0)
    records: list[Any] = []

    class Log:
        def record(self, fault: Any) -> None:
            records.append(fault)

    policy = ReadPolicy(backoff=0.0, skip=True, log=Log())  # type: ignore[arg-type]
    finish = reader_for(items[0].bands["red"].href, grid).start(Window(0, 0, 8, 8), policy)
    with pytest.raises(fetch.PoolClosed):
        finish()
    assert records == [] and not reader_mod._GIVEN_UP
