"""One benchmark contender, run in its own process: ``python contenders.py NAME PARAMS.json RESULT.json``.

Every contender reads the same items over HTTP, onto the same grid (CRS, 10 m, bounds), and writes monthly
NDVI composites to a Zarr store (``ndvi`` variable, (time, y, x)) that ``run.py`` compares. Each one runs on
dask's threaded scheduler with one thread per core, like a default dask worker. The result JSON holds the wall
time from after the imports to the data on disk, and the dask task count of the graph that produced it.

Contenders:

* ``floor``: read + inflate exactly the COG tiles under the bbox of red, nir and scl, each once (one windowed
  read per asset, two threads), nothing else. ``floor_median`` adds bottleneck's nanmedian over each period's
  (days, y, x) float32 stack (30 % NaN), timed separately: the unavoidable cost of a median composite.
* ``floor_latency``: the needed byte ranges (headers, then the tiles under the grid) fetched on 64 connections at
  once into sparse local copies, each asset decoded like ``floor`` as soon as its bytes are in: what the
  machine can do at the server's latency (``run.py --latency``).
* ``naive``: stackstac as documented: default float64 and 1024-px chunks, scale/offset applied by stackstac,
  ``.where`` on SCL, same-day mosaic with ``groupby(...).first()``, ``.resample(time="1MS").median("time")``.
* ``odc``: odc-stac tuned: ``groupby="solar_day"``, 2048-px chunks, native dtypes, ``configure_rio(
  cloud_defaults=True)``; scale/offset applied here per day (odc-stac does not), then the same xarray ops.
* ``ndvi_scale_to_zarr``: ``build(cfg).to_zarr(...)``, the composite written as the peers write theirs.
* ``ndvi_scale``: ``ndvi_scale.pipeline.run`` (search, build, write_cube) exactly as shipped, nothing patched:
  the engine (:mod:`ndvi_scale.engine`: reads in flight through its I/O pool, one task per period and chunk) and
  the table kernel (:mod:`ndvi_scale.kernel`, compiled by numba when it is installed).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

T_START = time.perf_counter()


def _features(params: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(Path(params["catalog"]).read_text())["features"]


class _TaskCounter:
    """Counts the dask tasks the local schedulers run while active (all computes, whatever the graph)."""

    def __init__(self) -> None:
        from dask.callbacks import Callback

        self.n = 0

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            self.n += 1

        self._cb = Callback(posttask=posttask)

    def __enter__(self) -> _TaskCounter:
        self._cb.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cb.__exit__(*exc)


def _graph_size(obj: Any) -> tuple[int, int]:
    """(tasks in the graph as built, tasks after dask's optimisation, i.e. what the scheduler runs)."""
    import dask

    raw = len(dict(obj.__dask_graph__()))
    (opt,) = dask.optimize(obj)
    return raw, len(dict(opt.__dask_graph__()))


def _dataset(comp: Any) -> Any:
    """``{"ndvi": comp}`` as float32 (time, y, x) with plain coordinates and no attributes."""
    import xarray as xr

    comp = comp.transpose("time", "y", "x").astype("float32")
    coords = {d: comp[d].values for d in ("time", "y", "x")}
    return xr.Dataset({"ndvi": xr.DataArray(comp.data, coords=coords, dims=("time", "y", "x"))})


def _write_timed(ds: Any, out: str, t0: float, c0: float) -> dict[str, Any]:
    """Write a peer's composite as the peers do, and its result: wall and CPU since (t0, c0), graph size."""
    import dask

    with dask.config.set(scheduler="threads"), _TaskCounter() as ran:
        ds.to_zarr(out, mode="w", consolidated=True, zarr_format=2)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall, "cpu_work": cpu, "tasks": _graph_size(ds), "tasks_run": ran.n}


# ----------------------------------------------------------------------------------------------------- floor


def _asset_window(ds: Any, params: dict[str, Any]) -> Any:
    """The asset's pixels under the output grid (a window of the asset, clipped to it)."""
    from rasterio.windows import Window

    xmin, ymin, xmax, ymax = params["bounds"]
    t = ds.transform
    c0 = int(np.floor((xmin - t.c) / t.a + 1e-9))
    c1 = int(np.ceil((xmax - t.c) / t.a - 1e-9))
    r0 = int(np.floor((t.f - ymax) / -t.e + 1e-9))
    r1 = int(np.ceil((t.f - ymin) / -t.e - 1e-9))
    c0, r0 = max(c0, 0), max(r0, 0)
    c1, r1 = min(c1, ds.width), min(r1, ds.height)
    if c0 >= c1 or r0 >= r1:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


#: GDAL settings of the decode floor: ndvi-scale's HTTP reading options as of session 11 (``ndvi_scale.load.
#: GDAL_ENV``), copied so that the floor does not depend on the engine's internals (``always`` on every open and
#: read, then the ``open``/``read`` layer).
FLOOR_GDAL = dict(
    GDAL_HTTP_MERGE_CONSECUTIVE_RANGES="YES",
    GDAL_HTTP_MULTIRANGE="YES",
    GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
    CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.tiff,.TIF,.jp2,.JP2",
    GDAL_INGESTED_BYTES_AT_OPEN="65536",
    GDAL_NUM_THREADS="1",
    GDAL_HTTP_MAX_RETRY="5",
    GDAL_HTTP_RETRY_DELAY="1",
    GDAL_HTTP_RETRY_CODES="408,429,500,502,503,504",
    GDAL_HTTP_TIMEOUT="60",
    GDAL_HTTP_CONNECTTIMEOUT="10",
)
FLOOR_GDAL_OPEN = dict(FLOOR_GDAL, VSI_CACHE=True)
FLOOR_GDAL_READ = dict(FLOOR_GDAL, VSI_CACHE=False)
#: GDAL's block cache (MB), in the process environment as ndvi-scale sets it (read once by GDAL).
FLOOR_GDAL_CACHEMAX = "128"


def floor(params: dict[str, Any]) -> dict[str, Any]:
    import os
    import threading

    os.environ.setdefault("GDAL_CACHEMAX", FLOOR_GDAL_CACHEMAX)
    import rasterio

    urls = [f["assets"][b]["href"] for f in _features(params) for b in ("red", "nir", "scl")]
    local = threading.local()

    def read(url: str) -> int:
        with rasterio.Env(**FLOOR_GDAL_OPEN):
            ds = rasterio.open(url)
        try:
            w = _asset_window(ds, params)
            if w is None:
                return 0
            with rasterio.Env(**FLOOR_GDAL_READ):
                return int(ds.read(1, window=w).size)
        finally:
            ds.close()
            local.n = getattr(local, "n", 0) + 1

    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=params["threads"]) as pool:
        pixels = sum(pool.map(read, urls))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall, "cpu_work": cpu, "pixels_decoded": pixels, "tasks": [len(urls), len(urls)],
            "tasks_run": len(urls)}


def floor_latency(params: dict[str, Any]) -> dict[str, Any]:
    """The latency floor: every needed byte range fetched with many requests in flight, then decoded.

    ``params["ranges"]`` (from ``run.py``, untimed) lists per asset its header (bytes up to the first tile: IFDs
    and tile offsets) and the full-resolution tiles under the grid, i.e. the ``needed`` bytes. Each asset's
    header is fetched first and its tiles after it (a reader learns the tile offsets from the header: two round
    trips per asset, as a real reader needs at least), all assets at once, on ``params["inflight"]`` (64)
    keep-alive connections; tiles of a file that follow each other (COG ghost leader/trailer bytes between them,
    <= 16 bytes) go in one request. The bytes are written at their offsets into a sparse copy of the file in
    /dev/shm, and as soon as an asset is complete it is decoded exactly as the decode floor does (one windowed
    ``rasterio`` read of the pixels under the grid, GDAL inflating each tile once; ``threads`` decoding at a
    time) while other assets are still in flight. No engine code: the physical limit of the machine at that
    latency.
    """
    import http.client
    import os
    import shutil
    import tempfile
    import threading
    import urllib.parse

    import rasterio

    os.environ.setdefault("GDAL_CACHEMAX", FLOOR_GDAL_CACHEMAX)  # as ndvi-scale and the decode floor run
    inflight = int(params.get("inflight", 64))
    assets = params["ranges"]
    base = urllib.parse.urlsplit(params["url"])
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="ndvi-bench-latency-floor-", dir=shm)
    local = threading.local()
    lock = threading.Lock()
    errors: list[BaseException] = []
    done = threading.Event()
    state = {"assets_left": len(assets), "gets": 0, "bytes": 0, "pixels": 0, "fetch_end": 0.0}

    def fetch(path: str, a: int, n: int, fd: int) -> None:
        for attempt in range(3):
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(base.hostname, base.port, timeout=300)
            try:
                conn.request("GET", path, headers={"Range": f"bytes={a}-{a + n - 1}"})
                r = conn.getresponse()
                body = memoryview(bytearray(n))  # read straight into one buffer: no chunk joining
                got = 0
                while got < n:
                    k = r.readinto(body[got:])
                    if not k:
                        break
                    got += k
                if r.status != 206 or got != n or r.read(1):
                    raise OSError(f"GET {path} bytes={a}-{a + n - 1}: {r.status}, {got} bytes")
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                local.conn = None
                if attempt == 2:
                    raise
        os.pwrite(fd, body, a)
        with lock:
            state["gets"] += 1
            state["bytes"] += n

    def guarded(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 (reported after the run)
            with lock:
                errors.append(e)
            done.set()

    def decode(asset: dict[str, Any], local_path: str, fd: int) -> None:
        os.close(fd)
        try:
            with rasterio.open(local_path) as ds:
                w = _asset_window(ds, params)
                n = 0 if w is None else int(ds.read(1, window=w).size)
        finally:
            os.unlink(local_path)
        with lock:
            state["pixels"] += n
            state["assets_left"] -= 1
            if state["assets_left"] == 0:
                done.set()

    def start(k: int, asset: dict[str, Any]) -> None:
        path = urllib.parse.urlsplit(asset["href"]).path
        local_path = os.path.join(tmp, f"{k}.tif")
        fd = os.open(local_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, asset["size"])  # sparse: only the fetched bytes take memory
        fetch(path, 0, asset["header"], fd)
        merged: list[list[int]] = []
        for a, n in asset["tiles"]:
            if merged and 0 <= a - (merged[-1][0] + merged[-1][1]) <= 16:
                merged[-1][1] = a + n - merged[-1][0]
            else:
                merged.append([a, n])
        left = [len(merged)]

        def one(a: int, n: int) -> None:
            fetch(path, a, n, fd)
            with lock:
                left[0] -= 1
                last = left[0] == 0
                if last:
                    state["fetch_end"] = max(state["fetch_end"], time.perf_counter())
            if last:
                decoders.submit(guarded, decode, asset, local_path, fd)

        if not merged:  # no pixel under the grid: the header was all (the decode floor opens it too)
            with lock:
                state["fetch_end"] = max(state["fetch_end"], time.perf_counter())
            decoders.submit(guarded, decode, asset, local_path, fd)
        for a, n in merged:
            fetchers.submit(guarded, one, a, n)

    t0, c0 = time.perf_counter(), time.process_time()
    fetchers = ThreadPoolExecutor(max_workers=inflight)
    decoders = ThreadPoolExecutor(max_workers=params["threads"])
    try:
        for k, asset in enumerate(assets):  # every header first, the tiles queue behind them as they arrive
            fetchers.submit(guarded, start, k, asset)
        done.wait()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        fetchers.shutdown(wait=True, cancel_futures=True)
        decoders.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise errors[0]
    return {
        "wall": wall,
        "cpu_work": cpu,
        "pixels_decoded": state["pixels"],
        "fetch_wall": state["fetch_end"] - t0,
        "gets": state["gets"],
        "bytes": state["bytes"],
        "inflight": inflight,
        "tasks": [len(assets), len(assets)],
        "tasks_run": len(assets),
    }


def floor_median(params: dict[str, Any]) -> dict[str, Any]:
    """The decode floor plus bottleneck's nanmedian over the real (days, y, x) NDVI of each period and chunk.

    The NDVI days are made (untimed, from the local files) by ndvi-scale's own reader and kernel, so the
    median is timed on exactly the data a composite has to reduce; two threads split the rows (bottleneck
    releases the GIL).
    """
    import bottleneck as bn

    from ndvi_scale.config import RunConfig
    from ndvi_scale.pipeline import make_plan, plan_grid
    from ndvi_scale.testing.reference import ndvi_days, reference_stack

    res = floor(params)
    local = Path(params["out"]).with_suffix(".local-items.json")
    feats = _features(params)
    for f in feats:
        for a in f["assets"].values():
            a["href"] = a["href"].replace(params["url"], params["root"])
    local.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    cfg = RunConfig.create(
        bbox=tuple(params["bbox"]),
        start=params["start"],
        end=params["end"],
        catalog=str(local),
        chunk=params["chunk"],
        mask_classes=params["mask_classes"],
        allow_local=True,  # the items file lies in the work folder, the COGs in the data cache
    )
    plan = make_plan(cfg)
    live = [p for p in plan.plans if p]
    grid = plan_grid(plan)
    t_med = c_med = 0.0
    cy, cx = grid.chunks(plan.chunk)
    ys, xs = np.cumsum((0, *cy)), np.cumsum((0, *cx))
    for p in live:
        period = reference_stack(p.items, grid)  # untimed: the days' NDVI is input data here
        for i in range(len(ys) - 1):
            for j in range(len(xs) - 1):
                block = period[:, :, ys[i] : ys[i + 1], xs[j] : xs[j + 1]]
                days = ndvi_days(
                    block,
                    p.day_index,
                    p.red_scale,
                    p.red_offset,
                    p.nir_scale,
                    p.nir_offset,
                    cfg.mask_classes,
                    n_days=len(p.day_numbers),
                )
                del block
                parts = np.array_split(np.arange(days.shape[1]), params["threads"])
                t0, c0 = time.perf_counter(), time.process_time()
                with ThreadPoolExecutor(max_workers=params["threads"]) as pool:
                    list(pool.map(lambda r, d=days: bn.nanmedian(d[:, r[0] : r[-1] + 1], axis=0), parts))
                t_med += time.perf_counter() - t0
                c_med += time.process_time() - c0
        del period
    res["decode_wall"] = res["wall"]
    res["median_wall"] = t_med
    res["wall"] = res["wall"] + t_med
    res["cpu_work"] = res["cpu_work"] + c_med
    return res


# ---------------------------------------------------------------------------------------------------- peers


def _common_ndvi(red: Any, nir: Any, scl: Any, mask_classes: list[int]) -> Any:
    """NDVI from reflectances; NaN where SCL is masked or a band has no data."""
    ndvi = (nir - red) / (nir + red)
    return ndvi.where(~scl.isin(mask_classes))


def naive(params: dict[str, Any]) -> dict[str, Any]:
    import stackstac

    t0, c0 = time.perf_counter(), time.process_time()
    feats = _features(params)
    stack = stackstac.stack(
        feats,
        assets=["red", "nir", "scl"],
        epsg=params["epsg"],
        resolution=params["resolution"],
        bounds=tuple(params["bounds"]),
    )  # defaults: float64, NaN fill, 1024-px chunks, scale/offset applied
    red, nir, scl = (stack.sel(band=b) for b in ("red", "nir", "scl"))
    ndvi = _common_ndvi(red, nir, scl, params["mask_classes"])
    ndvi = ndvi.drop_vars([c for c in ndvi.coords if c not in ("time", "y", "x")])
    # one observation per day: the overlapping granules of a pass, first valid value wins
    ndvi = ndvi.assign_coords(time=ndvi.time.dt.floor("D")).groupby("time").first(skipna=True)
    comp = ndvi.resample(time="1MS").median("time")
    ds = _dataset(comp)
    return _write_timed(ds, params["out"], t0, c0)


def odc(params: dict[str, Any]) -> dict[str, Any]:
    import odc.stac
    import pystac
    import xarray as xr
    from affine import Affine
    from odc.geo.geobox import GeoBox

    t0, c0 = time.perf_counter(), time.process_time()
    odc.stac.configure_rio(cloud_defaults=True)
    feats = _features(params)
    items = [pystac.Item.from_dict(f) for f in feats]
    xmin, ymin, xmax, ymax = params["bounds"]
    res = params["resolution"]
    gbox = GeoBox(tuple(params["shape"]), Affine(res, 0.0, xmin, 0.0, -res, ymax), f"EPSG:{params['epsg']}")
    chunk = params["chunk"]
    ds = odc.stac.load(
        items,
        bands=["red", "nir", "scl"],
        geobox=gbox,
        chunks={"x": chunk, "y": chunk},
        groupby="solar_day",
        resampling="nearest",
    )
    # odc-stac returns raw DN (it does not apply raster:bands scale/offset): do it per solar day here.
    by_day: dict[str, tuple[float, float]] = {}
    for f in feats:
        rb = f["assets"]["red"]["raster:bands"][0]
        by_day.setdefault(f["properties"]["datetime"][:10], (rb.get("scale", 1.0), rb.get("offset", 0.0)))
    days = [str(t)[:10] for t in ds.time.values]
    scale = xr.DataArray(np.array([by_day[d][0] for d in days], dtype=np.float32), dims="time")
    offset = xr.DataArray(np.array([by_day[d][1] for d in days], dtype=np.float32), dims="time")

    def refl(dn: Any) -> Any:
        return (dn.astype("float32") * scale + offset).clip(min=0).where(dn != 0)

    ndvi = _common_ndvi(refl(ds.red), refl(ds.nir), ds.scl, params["mask_classes"])
    comp = ndvi.resample(time="1MS").median("time")
    out = _dataset(comp)
    return _write_timed(out, params["out"], t0, c0)


# ----------------------------------------------------------------------------------------------- ndvi-scale


def _ndvi_scale(params: dict[str, Any]) -> dict[str, Any]:
    import dask

    # Modules the run imports on first use (the write stage, Zarr and its codecs, STAC, the cluster helpers, the
    # tile codecs): imported here, untimed, as the floors and peers import theirs before their clock starts.
    import imagecodecs  # noqa: F401
    import numcodecs  # noqa: F401
    import pystac  # noqa: F401
    import zarr  # noqa: F401

    import ndvi_scale.cluster  # noqa: F401
    import ndvi_scale.write  # noqa: F401
    from ndvi_scale.config import RunConfig
    from ndvi_scale.pipeline import build, make_plan, run

    try:  # like the imports, loading numba's cached machine code is not timed (~0.2 s per process)
        from ndvi_scale import kernel

        kernel.warm_up()
    except (ImportError, AttributeError):  # an engine without it (issue H rewrites the engine)
        pass
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = RunConfig.create(
        bbox=tuple(params["bbox"]),
        start=params["start"],
        end=params["end"],
        catalog=params["catalog"],
        out=params["out"],
        period="month",
        method=params["method"],
        chunk=params["chunk"],
        mask_classes=params["mask_classes"],
        # The peers mask exactly the SCL classes: compare the same work (the default mask filters, issue N, open
        # then dilate the mask on top; their cost is measured in benchmarks/quality.py's runs, not here).
        mask_filters=(),
    )
    with dask.config.set(scheduler="threads"), _TaskCounter() as ran:
        if params.get("write") == "to_zarr":  # the composite alone, written like the peers write theirs
            build(cfg).to_zarr(params["out"], mode="w", consolidated=True, zarr_format=2)
        else:  # the product: resumable regions, markers, provenance, STAC item (ndvi_scale.write.write_cube)
            run(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    plan = make_plan(cfg)
    ds = build(cfg, plan)
    n_chunks = len(ds.ndvi.chunks[1]) * len(ds.ndvi.chunks[2])
    from ndvi_scale.engine.tiles import TILE_CACHE

    tile_cache = {"hits": TILE_CACHE.hits, "waits": TILE_CACHE.waits, "misses": TILE_CACHE.misses}

    return {
        "wall": wall,
        "cpu_work": cpu,
        "tasks": _graph_size(ds),
        "tasks_run": ran.n,
        "spatial_chunks": n_chunks,
        "periods": len(plan.periods),
        "chunk": plan.chunk,
        "tile_cache": tile_cache,
    }


def ndvi_scale(params: dict[str, Any]) -> dict[str, Any]:
    return _ndvi_scale(params)


def ndvi_scale_to_zarr(params: dict[str, Any]) -> dict[str, Any]:
    return _ndvi_scale(dict(params, write="to_zarr"))


CONTENDERS = {
    "floor": floor,
    "floor_median": floor_median,
    "floor_latency": floor_latency,
    "naive": naive,
    "odc": odc,
    "ndvi_scale": ndvi_scale,
    "ndvi_scale_to_zarr": ndvi_scale_to_zarr,
}


def _vm_hwm_mb() -> float | None:
    """This process's peak RSS (``VmHWM``: reset by exec, unlike ``ru_maxrss``, which a child inherits from the
    harness that forked it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main() -> None:
    name, params_path, result_path = sys.argv[1:4]
    params = json.loads(Path(params_path).read_text())
    t_imports = time.perf_counter() - T_START
    res = CONTENDERS[name](params)
    res["imports"] = t_imports
    res["vm_hwm_mb"] = _vm_hwm_mb()
    Path(result_path).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
