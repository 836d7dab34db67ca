"""Zonal statistics at scale: ndvi_scale.zonal vs a straightforward exactextract baseline, same cube, same machine.

The cube: a synthetic multi-chunk NDVI cube (``--size`` x ``--size`` 10 m pixels, ``--periods`` periods, ``--chunk``
px chunks, ~8 % cloud holes as NaN) written once to a local Zarr. Parcels: ``n`` rectangles of 40-80 m per side,
jittered in a regular layout of 100 m cells (a few cross chunk boundaries), in EPSG:4326 like a user's file.

* ``ours``: ``ndvi_scale.zonal(cube_path, parcels, stats=mean,std,min,max,count,valid_fraction)`` (Dask threads,
  chunk by chunk).
* ``baseline``: what one writes without ndvi-scale: per period, load the whole period as numpy and call
  ``exactextract.exact_extract(..., ["mean", "stdev", "min", "max", "count"])`` on all parcels (the same exact
  coverage weights; peak memory grows with the cube's area).

Each (method, n) runs in a fresh subprocess; time is wall-clock of the call (cube opening included, parcel
generation and file writing excluded), peak RSS is the subprocess's ``ru_maxrss``. The two results are compared
(max |mean difference|) so the speed is not bought with wrong numbers.

Small run (a few minutes on 2 shared cores)::

    python benchmarks/zonal.py --parcels 1000 10000 --size 2048

Full run of the issue (10^3..10^5 parcels; 10^5 parcels of 100 m cells need >= 3200 px)::

    python benchmarks/zonal.py --parcels 1000 10000 100000 --size 3400 --periods 6
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CRS = "EPSG:32631"
LEFT, TOP, RES = 400000.0, 5400000.0, 10.0


def make_cube(path: Path, size: int, periods: int, chunk: int) -> None:
    import dask.array as da
    import pandas as pd
    import rioxarray  # noqa: F401  (ds.rio)
    import xarray as xr

    def block(t: int, y0: int, x0: int, shape: tuple[int, int]) -> np.ndarray:
        yy, xx = np.mgrid[y0 : y0 + shape[0], x0 : x0 + shape[1]].astype(np.float64)
        v = 0.45 + 0.3 * np.sin(xx / 37.0 + t) * np.cos(yy / 53.0) + 0.05 * np.sin((xx + yy) / 7.0)
        cloud = np.sin(xx / 91.0 + 2 * t) * np.sin(yy / 77.0 - t) > 0.85
        v[cloud] = np.nan
        return v.astype(np.float32)[None]

    def fill(x: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        assert block_info is not None
        (t0, _), (y0, _), (x0, _) = block_info[None]["array-location"]
        return block(t0, y0, x0, x.shape[1:])

    tmpl = da.zeros((periods, size, size), dtype=np.float32, chunks=(1, chunk, chunk))
    ndvi = tmpl.map_blocks(fill, dtype=np.float32)
    x = LEFT + (np.arange(size) + 0.5) * RES
    y = TOP - (np.arange(size) + 0.5) * RES
    time_ = pd.date_range("2024-01-01", periods=periods, freq="MS")
    ds = xr.Dataset({"ndvi": (("time", "y", "x"), ndvi)}, coords={"time": time_, "y": y, "x": x})
    ds["valid_count"] = (~np.isnan(ds.ndvi)).astype(np.uint16)
    ds = ds.rio.write_crs(CRS)
    ds.to_zarr(path, mode="w", consolidated=False)


def make_parcels(n: int, size: int, seed: int = 1) -> list:
    import shapely
    from pyproj import Transformer

    cells = int(size * RES // 100)
    if n > cells * cells:
        raise SystemExit(f"{n} parcels do not fit in {size} px; give --size >= {math.ceil(math.sqrt(n)) * 10 + 10}")
    rng = np.random.default_rng(seed)
    k = np.arange(n)
    ci, cj = k % cells, k // cells
    w, h = rng.uniform(40, 80, n), rng.uniform(40, 80, n)
    x0 = LEFT + ci * 100.0 + rng.uniform(0, 100 - w)
    y1 = TOP - cj * 100.0 - rng.uniform(0, 100 - h)
    tr = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    xs = np.stack([x0, x0 + w, x0 + w, x0], axis=1)
    ys = np.stack([y1 - h, y1 - h, y1, y1], axis=1)
    lon, lat = tr.transform(xs, ys)
    return list(shapely.polygons(np.stack([lon, lat], axis=2)))


def run_ours(cube: str, zones: str) -> dict:
    from ndvi_scale.analytics import zonal  # imports outside the timing, as for the baseline

    t = time.perf_counter()
    df = zonal(cube, zones, stats="mean,std,min,max,count,valid_fraction")
    return {"seconds": time.perf_counter() - t, "mean": df["mean"].to_numpy().tolist()}


def run_baseline(cube: str, zones: str) -> dict:
    import shapely
    import xarray as xr
    from exactextract import exact_extract
    from exactextract.raster import NumPyRasterSource

    from ndvi_scale.analytics.vectors import read_zones, to_crs

    t = time.perf_counter()
    ds = xr.open_zarr(cube, decode_coords="all", consolidated=False)
    z = read_zones(zones)
    from pyproj import CRS as PCRS

    geoms = to_crs(z.geoms, z.crs, PCRS.from_user_input(CRS))
    feats = [{"type": "Feature", "properties": {"k": k}, "geometry": shapely.geometry.mapping(g)}
             for k, g in enumerate(geoms)]
    h, w = ds.sizes["y"], ds.sizes["x"]
    bounds = (LEFT, TOP - h * RES, LEFT + w * RES, TOP)
    means = []
    for ti in range(ds.sizes["time"]):
        arr = ds.ndvi.isel(time=ti).values  # the whole period in memory
        r = NumPyRasterSource(arr, *bounds, nodata=np.nan)
        df = exact_extract(r, feats, ["mean", "stdev", "min", "max", "count"], include_cols=["k"], output="pandas")
        means.append(df.sort_values("k")["mean"].to_numpy())
    # zone-major like ndvi_scale.zonal
    mean = np.stack(means, axis=1).reshape(-1)
    return {"seconds": time.perf_counter() - t, "mean": mean.tolist()}


def child(method: str, cube: str, zones: str) -> None:
    res = run_ours(cube, zones) if method == "ours" else run_baseline(cube, zones)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parcels", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--periods", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "CUBE", "ZONES"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    import shapely

    with tempfile.TemporaryDirectory(prefix="zonal-bench-") as tmp:
        cube = str(Path(tmp) / "cube.zarr")
        t = time.perf_counter()
        make_cube(Path(cube), a.size, a.periods, a.chunk)
        took = time.perf_counter() - t
        print(f"cube {a.periods} x {a.size} x {a.size} px, chunks {a.chunk}: written in {took:.1f} s")
        head = ("parcels", "ours s", "base s", "speed-up", "ours MB", "base MB")
        print(" ".join(f"{h:>8}" for h in head) + f" {'max|dmean|':>10}")
        for n in a.parcels:
            polys = make_parcels(n, a.size)
            zones = str(Path(tmp) / f"parcels-{n}.geojson")
            feats = [{"type": "Feature", "properties": {"id": k}, "geometry": shapely.geometry.mapping(p)}
                     for k, p in enumerate(polys)]
            Path(zones).write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
            res = {}
            for method in ("ours", "baseline"):
                p = subprocess.run([sys.executable, __file__, "--child", method, cube, zones], capture_output=True,
                                   text=True)
                if p.returncode:
                    raise SystemExit(f"{method} failed for {n} parcels:\n{p.stderr[-2000:]}")
                res[method] = json.loads(p.stdout.strip().splitlines()[-1])
            dm = np.nanmax(np.abs(np.asarray(res["ours"]["mean"], float) - np.asarray(res["baseline"]["mean"], float)))
            o, b = res["ours"], res["baseline"]
            print(f"{n:>8} {o['seconds']:>8.2f} {b['seconds']:>8.2f} {b['seconds'] / o['seconds']:>7.2f}x "
                  f"{o['peak_rss_mb']:>8.0f} {b['peak_rss_mb']:>8.0f} {dm:>10.2e}", flush=True)


if __name__ == "__main__":
    main()
