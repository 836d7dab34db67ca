"""FastReader: exactly stackstac's stack, pixel for pixel, without the warper where grids are aligned."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import threading
import time
from collections.abc import Iterator
from typing import Any

import dask
import numpy as np
import pytest
import rasterio.enums
import stackstac
from pyproj import Transformer
from stackstac.rio_reader import AutoParallelRioReader

import ndvi_scale.load as load
from ndvi_scale import kernel as _kernel
from ndvi_scale.config import RunConfig
from ndvi_scale.load import BANDS, GDAL_ENV
from ndvi_scale.pipeline import build, make_plan, plan_stack
from ndvi_scale.reader import TILE_CACHE, FastReader, TileCache, match_grid
from ndvi_scale.sample import SampleSpec, Truth, generate

# Crosses the processing-baseline switch (1 May): items carry two different offsets.
START, END = dt.date(2024, 4, 1), dt.date(2024, 5, 20)
#: One COG tile per granule (the tile is bigger than the granule), as in the brief.
SPEC_ONE_TILE = SampleSpec(size=96, blocksize=128, start=START, end=END)
#: 3 x 3 tiles of 32 px (SCL: 2 x 2): chunk edges cut tiles, which exercises the tile cache.
SPEC_TILED = SampleSpec(size=96, blocksize=32, start=START, end=END)


@pytest.fixture(scope="module", params=[SPEC_ONE_TILE, SPEC_TILED], ids=["one-tile", "tiled"])
def sample(request, tmp_path_factory) -> tuple[SampleSpec, Any]:
    spec = request.param
    root = tmp_path_factory.mktemp("reader-sample")
    generate(root, spec)
    return spec, root / "items.json"


def _cfg(catalog: Any, bbox: tuple[float, float, float, float], **kw: Any) -> RunConfig:
    base: dict[str, Any] = dict(bbox=bbox, start=START.isoformat(), end=END.isoformat(), catalog=str(catalog))
    base.update(kw)
    return RunConfig.create(**base)


def _lonlat_box(
    spec: SampleSpec, x0: float, x1: float, y0: float, y1: float
) -> tuple[float, float, float, float]:
    """A lon/lat bbox inside the UTM box [x0, x1] x [y0, y1] m, relative to granule A's top-left corner."""
    tr = Transformer.from_crs(spec.epsg, 4326, always_xy=True)
    xs = [spec.x0 + x0, spec.x0 + x1, spec.x0 + x1, spec.x0 + x0]
    ys = [spec.y0 - y1, spec.y0 - y1, spec.y0 - y0, spec.y0 - y0]
    lon, lat = tr.transform(xs, ys)
    return (max(lon[0], lon[3]), max(lat[0], lat[1]), min(lon[1], lon[2]), min(lat[2], lat[3]))


def _bboxes(spec: SampleSpec) -> dict[str, tuple[float, float, float, float]]:
    g = 10.0 * spec.size  # granule side, metres
    overlap_start = 10.0 * spec.shift
    return {
        "inside-A": _lonlat_box(spec, 0.1 * g, 0.6 * g, 0.1 * g, 0.9 * g),
        "across-overlap": _lonlat_box(
            spec, overlap_start - 0.3 * g, overlap_start + 0.4 * g, 0.2 * g, 0.8 * g
        ),
        # reaches ~30 % of a granule beyond both on every side
        "partly-outside": _lonlat_box(spec, -0.3 * g, overlap_start + 1.3 * g, -0.3 * g, 1.3 * g),
    }


class _Forced:
    """Replace stackstac.stack (as load.py calls it) by one that always uses ``reader``."""

    def __init__(self, reader: type) -> None:
        self.reader = reader
        self.original = stackstac.stack

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["reader"] = self.reader
        return self.original(*args, **kwargs)


class SpyReader(FastReader):
    """FastReader that records, per read, its asset and whether the fast path served it."""

    log: list[tuple[str, bool | None]] = []

    def read(self, window: Any, **kwargs: Any) -> np.ndarray:
        out = super().read(window, **kwargs)
        SpyReader.log.append((self.url, self.fast))
        return out


class UncachedReader(FastReader):
    tile_cache = None


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    TILE_CACHE.clear()
    SpyReader.log = []
    yield
    TILE_CACHE.clear()


def _load(items: list, reader: type, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> np.ndarray:
    """load.load_stack (the production call) with the given reader, computed with 2 threads."""
    monkeypatch.setattr(load.stackstac, "stack", _Forced(reader))
    try:
        stack = load.load_stack(items, **kw)
        with dask.config.set(scheduler="threads", num_workers=2):
            return stack.data.compute()
    finally:
        monkeypatch.undo()


def _items(catalog: Any, bbox: tuple[float, float, float, float]) -> tuple[list, int]:
    plan = make_plan(_cfg(catalog, bbox))
    return [it for p in plan.plans if p for it in p.items], plan.epsg


@pytest.mark.parametrize("where", ["inside-A", "across-overlap", "partly-outside"])
@pytest.mark.parametrize("chunk", [16, 50, 2048])
def test_same_stack_as_stackstac(sample, where, chunk, monkeypatch):
    spec, catalog = sample
    bbox = _bboxes(spec)[where]
    items, epsg = _items(catalog, bbox)
    from ndvi_scale.config import BBox

    kw: dict[str, Any] = dict(epsg=epsg, bbox=BBox(*bbox), resolution=10.0, chunk=chunk)
    n = len(items)
    for time_chunks in ([n], [1] * n) if chunk == 50 else ([3] * (n // 3) + [n % 3] * bool(n % 3),):
        TILE_CACHE.clear()
        ref = _load(items, AutoParallelRioReader, monkeypatch, time_chunks=time_chunks, **kw)
        got = _load(items, SpyReader, monkeypatch, time_chunks=time_chunks, **kw)
        assert got.dtype == ref.dtype == np.uint16 and got.shape == ref.shape
        assert np.array_equal(got, ref), f"{where}, chunk {chunk}, time chunks {time_chunks}"
        assert SpyReader.log and all(fast for _, fast in SpyReader.log), "every asset must take the fast path"
        SpyReader.log = []
        if spec.blocksize < spec.size and chunk < spec.size:
            assert TILE_CACHE.hits > 0  # tiles cut by chunk edges were decoded once, then shared
    assert (ref != 0).any() and (where == "inside-A" or (ref == 0).any())
    uncached = _load(items, UncachedReader, monkeypatch, time_chunks=[len(items)], **kw)
    assert np.array_equal(uncached, ref)


def _stackstac(items: list, epsg: int, reader: type, raw: list | None = None, **overrides: Any) -> np.ndarray:
    kw: dict[str, Any] = dict(
        assets=list(BANDS),
        epsg=epsg,
        resolution=10.0,
        resampling=rasterio.enums.Resampling.nearest,
        chunksize=(len(items), len(BANDS), 40, 40),
        dtype=np.dtype("uint16"),
        fill_value=np.uint16(0),
        rescale=False,
        sortby_date=False,
        xy_coords="center",
        properties=False,
        band_coords=False,
        gdal_env=GDAL_ENV,
    )
    kw.update(overrides)
    if "bounds" not in kw:
        kw.setdefault("bounds_latlon", None)
        kw.setdefault("snap_bounds", True)
    dicts = raw if raw is not None else [it.to_stackstac() for it in items]
    stack = stackstac.stack(dicts, reader=reader, **kw)
    with dask.config.set(scheduler="threads", num_workers=2):
        return stack.data.compute()


def _compare(items: list, epsg: int, **overrides: Any) -> tuple[dict[str, set[bool | None]], np.ndarray]:
    ref = _stackstac(items, epsg, AutoParallelRioReader, **overrides)
    got = _stackstac(items, epsg, SpyReader, **overrides)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert np.array_equal(got, ref, equal_nan=got.dtype.kind == "f")
    assert np.isfinite(ref).any() if ref.dtype.kind == "f" else (ref != 0).any()
    paths: dict[str, set[bool | None]] = {}
    for url, fast in SpyReader.log:
        paths.setdefault(url.rsplit("/", 1)[-1], set()).add(fast)
    SpyReader.log = []
    return paths, ref


def test_other_crs_falls_back(sample):
    spec, catalog = sample
    bbox = _bboxes(spec)["across-overlap"]
    items, _ = _items(catalog, bbox)
    paths, _ = _compare(items, 32632, bounds_latlon=bbox)  # the next UTM zone: a real reprojection
    assert paths == {"B04.tif": {False}, "B08.tif": {False}, "SCL.tif": {False}}


def test_fractional_shift_falls_back(sample):
    spec, catalog = sample
    items, epsg = _items(catalog, _bboxes(spec)["across-overlap"])
    bounds = (spec.x0 + 105.0, spec.y0 - 805.0, spec.x0 + 1305.0, spec.y0 - 205.0)  # half a pixel off
    paths, _ = _compare(items, epsg, bounds=bounds, snap_bounds=False)
    assert paths == {"B04.tif": {False}, "B08.tif": {False}, "SCL.tif": {False}}


def test_coarser_output_mixes_paths(sample):
    spec, catalog = sample
    bbox = _bboxes(spec)["partly-outside"]
    items, epsg = _items(catalog, bbox)
    # 20 m output: red/nir would need downsampling (stackstac's path), SCL is at home (fast path)
    paths, _ = _compare(items, epsg, bounds_latlon=bbox, resolution=20.0)
    assert paths == {"B04.tif": {False}, "B08.tif": {False}, "SCL.tif": {True}}


def test_finer_output_repeats_pixels(sample):
    spec, catalog = sample
    bbox = _bboxes(spec)["across-overlap"]
    items, epsg = _items(catalog, bbox)
    # 5 m output: red/nir are repeated 2 x 2, SCL 4 x 4, exactly as GDAL's nearest
    paths, _ = _compare(items, epsg, bounds_latlon=bbox, resolution=5.0, chunksize=(len(items), 3, 56, 56))
    assert paths == {"B04.tif": {True}, "B08.tif": {True}, "SCL.tif": {True}}


def test_other_resampling_falls_back(sample):
    spec, catalog = sample
    bbox = _bboxes(spec)["inside-A"]
    items, epsg = _items(catalog, bbox)
    paths, _ = _compare(items, epsg, bounds_latlon=bbox, resampling=rasterio.enums.Resampling.bilinear)
    assert paths == {"B04.tif": {False}, "B08.tif": {False}, "SCL.tif": {False}}


def test_rescaled_float_stack(sample):
    spec, catalog = sample
    bbox = _bboxes(spec)["partly-outside"]
    items, epsg = _items(catalog, bbox)
    # stackstac's defaults on the STAC items as published (raster:bands scale 0.0001, offset 0 or -0.1 across
    # the baseline switch): float64, NaN fill, scale/offset applied
    raw = json.loads(catalog.read_text())["features"]
    assert {f["assets"]["red"]["raster:bands"][0]["offset"] for f in raw} == {0, -0.1}
    paths, ref = _compare(
        items, epsg, raw=raw, bounds_latlon=bbox, dtype=np.dtype("float64"), fill_value=np.nan, rescale=True
    )
    assert paths == {"B04.tif": {True}, "B08.tif": {True}, "SCL.tif": {True}}
    assert np.isnan(ref).any() and np.nanmax(ref[:, :2]) < 1.5  # really reflectances (NaN outside), not DNs


def test_reader_pickles(sample):
    items, stack = _one_red(sample, "across-overlap", reader=FastReader)
    ref = stack.data.compute(scheduler="sync")[0, 0]
    reader = FastReader(**_reader_args(items[0].bands["red"].href, stack, np.uint16(0)))
    window = rasterio.windows.Window(0, 0, stack.sizes["x"], stack.sizes["y"])
    first = reader.read(window)
    assert reader.fast is True
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.fast is None  # decided again after unpickling
    np.testing.assert_array_equal(clone.read(window), first)
    np.testing.assert_array_equal(first, ref)
    reader.close()
    assert reader.fast is None
    np.testing.assert_array_equal(reader.read(window), first)  # reopens after close


def _spec_of(stack: Any) -> Any:
    return stack.attrs["spec"]  # stackstac's RasterSpec of the output grid


def _one_red(sample: Any, where: str, **kw: Any) -> tuple[list[Any], Any]:
    """The items over bbox ``where`` of the sample, and a uint16 stackstac stack of the first one's red band."""
    spec, catalog = sample
    bbox = _bboxes(spec)[where]
    items, epsg = _items(catalog, bbox)
    stack = stackstac.stack(
        [it.to_stackstac() for it in items[:1]],
        assets=["red"],
        epsg=epsg,
        resolution=10.0,
        bounds_latlon=bbox,
        dtype=np.dtype("uint16"),
        fill_value=np.uint16(0),
        rescale=False,
        **kw,
    )
    return items, stack


def _reader_args(url: str, stack: Any, fill: Any) -> dict[str, Any]:
    """Reader keyword arguments (as stackstac passes them) for ``url`` onto ``stack``'s grid, raw DNs."""
    return dict(
        url=url,
        spec=_spec_of(stack),
        resampling=rasterio.enums.Resampling.nearest,
        dtype=np.dtype("uint16"),
        fill_value=fill,
        scale_offset=(1, 0),
        gdal_env=GDAL_ENV,
    )


def test_missing_asset_fails_naming_it_or_is_nodata_as_stackstac_allows(sample, tmp_path, monkeypatch):
    from ndvi_scale.faults import AssetReadError

    monkeypatch.setenv("NDVI_SCALE_READ_BACKOFF", "0")  # the read policy's retries (ndvi_scale.faults): no wait
    _, stack = _one_red(sample, "inside-A")
    args = _reader_args(str(tmp_path / "missing.tif"), stack, np.uint16(7))
    window = rasterio.windows.Window(0, 0, 5, 4)
    # an error naming the file once the read policy (retries, then fail or skip) has given up on the asset
    with pytest.raises(AssetReadError, match="missing.tif") as err:
        FastReader(**args).read(window)
    assert err.value.fault.attempts == 3 and err.value.fault.window == (0, 0, 4, 5)
    with pytest.warns(UserWarning, match="missing.tif"):
        out = FastReader(**args, errors_as_nodata=(OSError(r".*"),)).read(window)
    np.testing.assert_array_equal(out, np.full((4, 5), 7, dtype=np.uint16))


def test_pipeline_with_fast_reader_matches_truth_and_default(sample, monkeypatch):
    spec, catalog = sample
    w, s, e, n = spec.bbox_lonlat()
    cfg = _cfg(catalog, (w, s, e, n), chunk=64, method="median")
    monkeypatch.setattr(load.stackstac, "stack", _Forced(SpyReader))
    got = build(cfg).compute()
    assert SpyReader.log and all(fast for _, fast in SpyReader.log)
    monkeypatch.setattr(load.stackstac, "stack", _Forced(AutoParallelRioReader))
    ref = build(cfg).compute()
    np.testing.assert_array_equal(got.ndvi.values, ref.ndvi.values)
    np.testing.assert_array_equal(got.valid_count.values, ref.valid_count.values)

    X, Y = np.meshgrid(got.x.values, got.y.values)
    dates = spec.dates()
    for t, (t0, t1) in enumerate(zip(got.time.values, got.time_end.values, strict=True)):
        lo, hi = np.datetime64(t0, "D"), np.datetime64(t1, "D")
        sel = [d for d in dates if lo <= np.datetime64(d.date(), "D") <= hi]
        expected, counts = Truth.expected_composite(spec, X, Y, sel, method="median")
        np.testing.assert_array_equal(got.valid_count.values[t], counts)
        seen = counts > 0
        assert np.isnan(got.ndvi.values[t][~seen]).all()
        assert np.abs(got.ndvi.values[t][seen] - expected[seen]).max() < 0.01
    assert (got.valid_count.values > 0).mean() > 0.5


# ---------------------------------------------------------------------------------------------- grid matching


def test_match_grid():
    out = (10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0)
    m = match_grid((10.0, 0.0, 960.0, 0.0, -10.0, 5020.0), (96, 96), 32631, out, 32631)
    assert m is not None and (m.col_off, m.row_off, m.factor, m.width, m.height) == (-4, -2, 1, 96, 96)
    m = match_grid((20.0, 0.0, 1100.0, 0.0, -20.0, 4900.0), (48, 40), 32631, out, 32631)
    assert m is not None and (m.col_off, m.row_off, m.factor, m.width, m.height) == (10, 10, 2, 40, 48)
    assert match_grid((10.0, 0.0, 965.0, 0.0, -10.0, 5020.0), (96, 96), 32631, out, 32631) is None  # half px
    assert match_grid((15.0, 0.0, 960.0, 0.0, -15.0, 5020.0), (96, 96), 32631, out, 32631) is None  # 1.5x
    assert match_grid((5.0, 0.0, 960.0, 0.0, -5.0, 5020.0), (96, 96), 32631, out, 32631) is None  # finer
    assert match_grid((10.0, 0.0, 960.0, 0.0, -10.0, 5020.0), (96, 96), 32632, out, 32631) is None  # CRS
    assert match_grid((10.0, 0.0, 960.0, 0.0, -10.0, 5020.0), (96, 96), None, out, 32631) is None
    assert match_grid((10.0, 0.1, 960.0, 0.0, -10.0, 5020.0), (96, 96), 32631, out, 32631) is None  # rotated
    assert match_grid((10.0, 0.0, 960.0, 0.0, 10.0, 5020.0), (96, 96), 32631, out, 32631) is None  # south-up
    # float noise in a transform is not a misalignment
    m = match_grid((10.0, 0.0, 960.0 + 1e-9, 0.0, -10.0, 5020.0 - 1e-9), (96, 96), 32631, out, 32631)
    assert m is not None and (m.col_off, m.row_off) == (-4, -2)


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


# ------------------------------------------------------------------------------------ kernel and fused pass


def _period_block(sample: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, Any, RunConfig]:
    spec, catalog = sample
    cfg = _cfg(catalog, spec.bbox_lonlat(), chunk=64)
    plan = make_plan(cfg)
    live = [p for p in plan.plans if p]
    p = max(live, key=lambda q: len(q.items))  # a period with same-day granules to mosaic
    from ndvi_scale.config import BBox

    block = _load(
        list(p.items),
        FastReader,
        monkeypatch,
        epsg=plan.epsg,
        bbox=BBox(*cfg.bbox.as_tuple()),
        resolution=10.0,
        chunk=4096,
        time_chunks=[len(p.items)],
    )
    return block, p, cfg


# numba is optional: its engine is checked where it is installed; the numpy engine always runs.
@pytest.mark.parametrize("engine", ["numpy", *(["numba"] if _kernel.NUMBA else [])])
def test_kernel_is_bit_identical_to_mask_ndvi_mosaic(sample, monkeypatch, engine):
    from ndvi_scale import kernel
    from ndvi_scale.composite import mosaic_days
    from ndvi_scale.mask import clear_mask
    from ndvi_scale.ndvi import ndvi as ndvi_index

    block, p, cfg = _period_block(sample, monkeypatch)
    assert len(set(p.day_index)) < len(p.items)  # two granules per day
    per_item = np.stack(
        [
            ndvi_index(
                block[i, 0],
                block[i, 1],
                p.red_scale[i],
                p.red_offset[i],
                clear_mask(block[i, 2], block[i, 0], block[i, 1], cfg.mask_classes),
                p.nir_scale[i],
                p.nir_offset[i],
            )
            for i in range(block.shape[0])
        ]
    )
    expected = mosaic_days(per_item, p.day_index)
    monkeypatch.setenv("NDVI_SCALE_NUMBA", "1" if engine == "numba" else "0")
    got = kernel.ndvi_days(
        block, p.day_index, p.red_scale, p.red_offset, p.nir_scale, p.nir_offset, cfg.mask_classes
    )
    assert got.dtype == np.float32
    assert np.array_equal(got, expected, equal_nan=True)
    assert np.isnan(got).any() and not np.isnan(got).all()
    # the same through ndvi_into, item by item, on a layer that starts as garbage
    days = np.full_like(got, 7.0)
    seen: set[int] = set()
    for i, d in enumerate(p.day_index):
        kernel.ndvi_into(
            days[d],
            block[i, 0],
            block[i, 1],
            block[i, 2],
            p.red_scale[i],
            p.red_offset[i],
            p.nir_scale[i],
            p.nir_offset[i],
            cfg.mask_classes,
            first=d not in seen,
        )
        seen.add(d)
    assert np.array_equal(days, expected, equal_nan=True)


def _stack_then_kernel(cfg: RunConfig) -> dict[str, np.ndarray]:
    """The reference: materialise the uint16 stack, then the stage modules (mask, ndvi, mosaic, reduce)."""
    from ndvi_scale.composite import mosaic_days, reduce_days
    from ndvi_scale.mask import clear_mask
    from ndvi_scale.ndvi import ndvi as ndvi_index

    plan = make_plan(cfg)
    stack = plan_stack(plan).values
    out: dict[str, list[np.ndarray]] = {"ndvi": [], "valid_count": [], "date": []}
    start = 0
    for p in plan.plans:
        if p is None:
            continue
        block = stack[start : start + len(p.items)]
        start += len(p.items)
        per_item = np.stack([
            ndvi_index(block[i, 0], block[i, 1], p.red_scale[i], p.red_offset[i],
                       clear_mask(block[i, 2], block[i, 0], block[i, 1], cfg.mask_classes),
                       p.nir_scale[i], p.nir_offset[i])
            for i in range(len(p.items))
        ])
        layers = reduce_days(mosaic_days(per_item, p.day_index), cfg.method, np.asarray(p.day_numbers))
        out["ndvi"].append(layers[0])
        out["valid_count"].append(layers[1].astype(np.uint16))
        if len(layers) > 2:
            out["date"].append(layers[2])
    return {k: np.stack(v) for k, v in out.items() if v}


@pytest.mark.parametrize(("method", "chunk"), [("median", 64), ("max", 80), ("mean", 4096)])
def test_fused_pass_equals_stack_then_kernel(sample, monkeypatch, method, chunk):
    from ndvi_scale.fused import cube_layer, fused_cube

    spec, catalog = sample
    cfg = _cfg(catalog, _bboxes(spec)["partly-outside"], chunk=chunk, method=method)
    monkeypatch.setattr(load.stackstac, "stack", _Forced(SpyReader))
    ref = _stack_then_kernel(cfg)
    plan = make_plan(cfg)
    assert all(plan.plans)  # every period of this sample has scenes
    stack = plan_stack(plan)
    n_out = 3 if method == "max" else 2
    cube = fused_cube(stack, plan.plans, method=method, mask_classes=cfg.mask_classes, n_out=n_out)
    got = [cube_layer(cube, k, n_out).compute() for k in range(n_out)]  # the packed layers, as build() takes them
    np.testing.assert_array_equal(got[0], ref["ndvi"])
    np.testing.assert_array_equal(got[1].astype(np.uint16), ref["valid_count"])
    if method == "max":
        np.testing.assert_array_equal(got[2], ref["date"])
    assert (ref["valid_count"] > 0).any() and (ref["valid_count"] == 0).any()
    assert SpyReader.log and all(fast for _, fast in SpyReader.log)


def test_fused_graph_is_one_task_per_period_and_chunk(sample, monkeypatch):
    from ndvi_scale.fused import fused_cube, reader_table

    spec, catalog = sample
    cfg = _cfg(catalog, spec.bbox_lonlat(), chunk=64)
    plan = make_plan(cfg)
    live = [p for p in plan.plans if p]
    items = [it for p in live for it in p.items]
    stack = plan_stack(plan, chunk=32)
    cube = fused_cube(stack, plan.plans, method="median", mask_classes=cfg.mask_classes, n_out=2)
    n_chunks = len(stack.chunks[2]) * len(stack.chunks[3])
    # packed: a block holds the 2 layers of its chunk one under the other
    assert cube.chunks == ((1,) * len(plan.plans), tuple(2 * c for c in stack.chunks[2]), stack.chunks[3])
    layers = cube.dask.layers
    assert len(layers[cube.name]) == len(plan.plans) * n_chunks
    assert len(dict(cube.dask)) == len(plan.plans) * n_chunks + len(live)  # + one reader table per period
    assert reader_table(stack).shape == (len(items), 3)
    with pytest.raises(ValueError, match="plain stackstac"):
        reader_table(stack[:, :, :10])


def test_fused_tasks_share_their_periods_readers_and_carry_none(sample):
    """A distributed worker unpickles each task's spec on its own and keeps it until the run's results are
    released: readers inside the (period, chunk) tasks would be a private copy per task, each opening its own
    datasets (a killed worker's share then paused the survivor for good). They come from the period's one
    reader-table task instead, whose result all chunks of the period share."""
    import cloudpickle

    from ndvi_scale.fused import fused_cube

    spec, catalog = sample
    cfg = _cfg(catalog, spec.bbox_lonlat(), chunk=64)
    plan = make_plan(cfg)
    live = [p for p in plan.plans if p]
    stack = plan_stack(plan, chunk=32)
    cube = fused_cube(stack, plan.plans, method="median", mask_classes=cfg.mask_classes, n_out=2)
    graph = dict(cube.dask)
    tasks = [v for k, v in graph.items() if k[0] == cube.name]
    assert len(stack.chunks[2]) * len(stack.chunks[3]) > 1 and tasks
    for task in tasks:  # as distributed sends it
        assert b"FastReader" not in cloudpickle.dumps(task)
    tables = [v for k, v in graph.items() if k[0] != cube.name]
    assert len(tables) == len(live)
    made = [dask.get(graph, k) for k in graph if k[0] != cube.name]  # each table task makes its readers
    assert [t.shape for t in made] == [(len(p.items), 3) for p in live]
    assert all(isinstance(e[0], FastReader) for t in made for e in t.ravel() if e)


def _old_kernel(
    block: np.ndarray, plans: Any, method: str, mask_classes: tuple[int, ...], block_info: Any = None
) -> np.ndarray:
    """The kernel of the stack-then-kernel build() (before ndvi_scale.fused): the stage modules on the
    (items, band, y, x) uint16 block of one period and chunk."""
    from ndvi_scale.composite import mosaic_days, reduce_days
    from ndvi_scale.mask import clear_mask
    from ndvi_scale.ndvi import ndvi as ndvi_index

    p = plans[block_info[0]["chunk-location"][0]]
    red, nir, scl = block[:, 0], block[:, 1], block[:, 2]
    per_item = np.empty(red.shape, dtype=np.float32)
    for i in range(red.shape[0]):
        clear = clear_mask(scl[i], red[i], nir[i], mask_classes)
        per_item[i] = ndvi_index(
            red[i], nir[i], p.red_scale[i], p.red_offset[i], clear, p.nir_scale[i], p.nir_offset[i]
        )
    layers = reduce_days(mosaic_days(per_item, p.day_index), method, np.asarray(p.day_numbers, dtype=np.int64))
    return np.stack(layers)[None].astype(np.float32, copy=False)


def _stack_build(cfg: RunConfig) -> Any:
    """build() as it was before ndvi_scale.fused: stackstac's stack, ``map_blocks`` of the kernel, the empty
    periods concatenated in as NaN (count 0) blocks. Same coordinates and variables as build()'s."""
    import dask.array as da
    import xarray as xr

    import ndvi_scale.pipeline as pipeline
    from ndvi_scale.composite import EXTRA_OUTPUTS

    plan = make_plan(cfg)
    live = [p for p in plan.plans if p is not None]
    stack = plan_stack(plan)
    extras = EXTRA_OUTPUTS.get(cfg.method, ())
    n_out = 2 + len(extras)
    data = stack.data
    fused = da.map_blocks(
        _old_kernel,
        data,
        plans=tuple(live),
        method=cfg.method,
        mask_classes=cfg.mask_classes,
        dtype=np.float32,
        chunks=((1,) * len(live), (n_out,), data.chunks[2], data.chunks[3]),
        meta=np.array((), dtype=np.float32),
    )
    empty = np.full((1, n_out, 1, 1), np.nan, dtype=np.float32)
    empty[:, 1] = 0
    pieces, k = [], 0
    for p in plan.plans:
        if p is None:
            pieces.append(
                da.broadcast_to(empty, (1, n_out) + data.shape[2:], chunks=((1,), (n_out,)) + data.chunks[2:])
            )
        else:
            pieces.append(fused[k : k + 1])
            k += 1
    cube = da.concatenate(pieces, axis=0)
    dims = ("time", "y", "x")
    data_vars: dict[str, Any] = {
        "ndvi": (dims, cube[:, 0]),
        "valid_count": (dims, cube[:, 1].astype(np.uint16)),
    }
    for j, name in enumerate(extras):
        data_vars[name] = (dims, da.map_blocks(pipeline._days_to_datetime, cube[:, 2 + j], dtype="datetime64[ns]"))
    return xr.Dataset(data_vars, coords={"y": stack.y.values, "x": stack.x.values}), plan


@pytest.mark.parametrize("method", ["median", "max"])
def test_fused_cube_with_empty_periods(sample, monkeypatch, method):
    spec, catalog = sample
    # March has no acquisition: an empty period between... nothing and April, at the start of the calendar
    cfg = _cfg(catalog, _bboxes(spec)["across-overlap"], chunk=64, method=method, start="2024-03-01")
    monkeypatch.setattr(load.stackstac, "stack", _Forced(FastReader))
    got = build(cfg)  # ndvi_scale.fused
    ref, plan = _stack_build(cfg)
    assert plan.plans[0] is None and sum(p is not None for p in plan.plans) >= 2
    n_cp = len(plan.periods) * len(got.ndvi.chunks[1]) * len(got.ndvi.chunks[2])
    n_live = sum(p is not None for p in plan.plans)
    tasks = len(dict(dask.optimize(got)[0].__dask_graph__()))
    # 1 + one per variable per (period, chunk) and each non-empty period's reader table: nothing else
    assert tasks <= (1 + len(got.data_vars)) * n_cp + n_live
    ref, got = ref.compute(), got.compute()
    for name in ref.data_vars:
        assert got[name].dtype == ref[name].dtype
        np.testing.assert_array_equal(got[name].values, ref[name].values)
    assert np.isnan(got.ndvi.values[0]).all() and (got.valid_count.values[0] == 0).all()


@pytest.mark.parametrize("method", ["median", "mean", "max", "min", "q25"])
def test_fast_reducers_are_bit_identical(method):
    from ndvi_scale import kernel
    from ndvi_scale.composite import reduce_days

    rng = np.random.default_rng(7)
    # 65 days: beyond kernel.MAX_NETWORK_DAYS, the median goes to bottleneck
    for n_days in (1, 2, 3, 6, 13, 31, 64, 65):
        days = (rng.random((n_days, 40, 50), dtype=np.float32) * 2 - 1).astype(np.float32)
        days[rng.random(days.shape) < 0.35] = np.nan
        days[:, 0, 0] = np.nan  # never observed
        days[:, 2, :] = np.round(days[:, 2, :], 1)  # many equal values in a row of pixels
        if n_days > 2:
            days[1, 1, 1] = days[2, 1, 1] = 0.5  # a tie: the first day wins, as argmax
            days[0, 1, 1] = np.nan
        numbers = np.arange(19800, 19800 + n_days)
        ref = reduce_days(days, method, numbers)
        got = kernel.reduce_days(days, method, numbers)
        assert len(got) == len(ref)
        for a, b in zip(ref, got, strict=True):
            assert b.dtype == np.float32
            assert np.array_equal(np.asarray(a, dtype=np.float32), b, equal_nan=True)
        out = np.full((len(ref), 40, 50), 7.0, dtype=np.float32)  # written in place, every pixel
        kernel.reduce_days(days, method, numbers, out=out)
        for a, b in zip(ref, out, strict=True):
            assert np.array_equal(np.asarray(a, dtype=np.float32), b, equal_nan=True)


def test_sorting_network_sorts_anything():
    """Knuth's 0-1 principle: a comparator network sorts every input iff it sorts every 0/1 input."""
    from ndvi_scale.kernel import sorting_pairs

    for n in range(1, 13):
        pairs = sorting_pairs(n)
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # every 0/1 input, one per row
        for i, j in pairs:
            lo, hi = np.minimum(bits[:, i], bits[:, j]), np.maximum(bits[:, i], bits[:, j])
            bits[:, i], bits[:, j] = lo, hi
        assert (np.diff(bits, axis=1) >= 0).all(), n
    rng = np.random.default_rng(3)
    for n in (13, 31, 32, 33, 64):
        vals = rng.random((200, n))
        for i, j in sorting_pairs(n):
            lo, hi = np.minimum(vals[:, i], vals[:, j]), np.maximum(vals[:, i], vals[:, j])
            vals[:, i], vals[:, j] = lo, hi
        assert (np.diff(vals, axis=1) >= 0).all(), n


def test_dataset_pool_gives_each_concurrent_read_its_own_handle_and_reuses_them(sample):
    """GDAL handles are not thread-safe: a handle is never used by two reads at once; an idle one is reused
    (an asset is opened once per process, not per thread), and closing the pool closes every handle."""
    import contextlib
    import json

    import rasterio

    from ndvi_scale.reader import _DatasetPool

    _, catalog = sample
    href = json.loads(catalog.read_text())["features"][0]["assets"]["red"]["href"]
    opened: list[Any] = []

    class Env:  # counts opens (the pool opens under the reader's ``open`` layer)
        @property
        def open(self) -> Any:
            opened.append(1)
            return contextlib.nullcontext()

    pool = _DatasetPool(href, Env(), rasterio.open(href))
    with pool.use() as a, pool.use() as b:  # two reads at the same time
        assert a is not b and not a.closed and not b.closed
        assert a.read(1, window=((0, 4), (0, 4))).shape == (4, 4)
    assert len(opened) == 1  # the plan's handle, plus one for the second concurrent read
    for _ in range(5):  # one read after the other: the free handles, no more opens
        with pool.use() as c:
            assert c in (a, b)
    assert len(opened) == 1
    with pool.use() as busy:
        pool.close()
        idle = a if busy is b else b
        assert idle.closed and not busy.closed  # a handle in use is not pulled from under its read
    assert busy.closed  # ... it is closed when the read gives it back
    with pool.use() as fresh:  # a closed pool still reads (a retry after _reset): it opens anew
        assert fresh not in (a, b) and not fresh.closed


def test_fused_pass_cuts_chunks_to_the_rasters_exact_extent_only(sample):
    """A chunk is cut to the part the red and nir rasters cover when the reader knows their exact extent
    (fast path); stackstac's asset window (from metadata, maybe only the footprint) never cuts pixels."""
    from rasterio import windows

    from ndvi_scale.fused import _covered, _materialise, reader_table

    spec, catalog = sample
    cfg = _cfg(catalog, _bboxes(spec)["partly-outside"], chunk=4096)
    stack = plan_stack(make_plan(cfg))
    table = _materialise(reader_table(stack))
    height, width = stack.shape[2:]
    whole = windows.Window(0, 0, width, height)
    red, nir = table[0, 0], table[0, 1]
    extent = red[0].coverage()
    assert extent is not None and red[0].fast  # an aligned asset: its exact extent is known
    r0, r1 = max(0, extent[0]), min(height, extent[1])
    c0, c1 = max(0, extent[2]), min(width, extent[3])
    assert (r1 - r0, c1 - c0) != (height, width)  # it covers part of the grid only
    assert _covered(red, nir, whole) == windows.Window(c0, r0, c1 - c0, r1 - r0)
    # a footprint-sized asset window smaller than the raster: still cut to the raster's extent, not to it
    small = windows.Window(c0 + 2, r0 + 2, 3, 3)
    assert _covered((red[0], small), (nir[0], small), whole) == windows.Window(c0, r0, c1 - c0, r1 - r0)

    class Warped:  # a reader without a known extent (stackstac's warped path): the whole window is read
        pass

    assert _covered((Warped(), small), (Warped(), small), whole) == whole
    assert _covered((Warped(), small), (Warped(), small), windows.Window(0, 0, 1, 1)) is None  # no overlap
