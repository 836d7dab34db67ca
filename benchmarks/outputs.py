"""Codecs and readers of the written cube: size and write time per codec, and which reader opens what.

    python benchmarks/outputs.py [--months 12] [--repeat 3] [--out DIR]

1. Computes the median monthly NDVI composite of the README's sample bbox once (in memory), then writes it with
   every codec (zstd, zlib, lz4 = blosc-lz4, none) in Zarr v2 and v3 through ``write_cube`` (what the CLI runs),
   ``--repeat`` times each; prints the store size and the best write time.
2. Opens every store with each reader found here: GDAL inside rasterio's wheel, Debian's ``gdalinfo`` /
   ``gdal_translate`` (if installed), xarray; prints whether it opens, sees the CRS, and decodes pixels equal to
   xarray's.

Prints two Markdown tables (pasted into the README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

import ndvi_scale
from ndvi_scale.sample import SAMPLE_BBOX
from ndvi_scale.write import CODECS, write_cube


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _gdal_bin(store: Path, ref: np.ndarray) -> str:
    exe = shutil.which("gdalinfo")
    if exe is None:
        return "n/a"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split(",")[0]
    name = f'ZARR:"{store}":/ndvi:0'
    r = subprocess.run([exe, "-json", name], capture_output=True, text=True)
    if r.returncode:
        errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")] or ["?"]
        return f"no ({errors[0].split(':', 1)[-1].replace(str(store), 'store').strip()[:70]})"
    info = json.loads(r.stdout)
    crs = "EPSG\",32631" in info.get("coordinateSystem", {}).get("wkt", "")
    with tempfile.TemporaryDirectory() as tmp:
        tif = Path(tmp, "b.tif")
        t = subprocess.run([Path(exe).with_name("gdal_translate"), "-q", name, str(tif)], capture_output=True,
                           text=True)
        if t.returncode:
            return f"opens, pixels no ({(t.stderr.strip().splitlines() or ['?'])[-1][:60]})"
        import rasterio

        with rasterio.open(tif) as src:
            same = np.array_equal(src.read(1), ref, equal_nan=True)
    return f"{'yes' if same else 'WRONG pixels'}, CRS {'yes' if crs else 'no'} ({version})"


def _rasterio(store: Path, ref: np.ndarray) -> str:
    import rasterio

    try:
        with rasterio.open(f'ZARR:"{store}":/ndvi') as src:
            same = np.array_equal(src.read(1), ref, equal_nan=True)
            crs = src.crs is not None and src.crs.to_epsg() == 32631
    except Exception as exc:
        return f"no ({str(exc)[:60]})"
    return f"{'yes' if same else 'WRONG pixels'}, CRS {'yes' if crs else 'no'}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--months", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    root = Path(a.out or tempfile.mkdtemp(prefix="ndvi-outputs-"))
    root.mkdir(parents=True, exist_ok=True)
    end = f"2024-{a.months:02d}-28"
    t0 = time.perf_counter()
    ds = ndvi_scale.compute(bbox=SAMPLE_BBOX, start="2024-01-01", end=end, catalog="sample", period="month",
                            method="median").compute()
    print(f"composite computed in {time.perf_counter() - t0:.1f} s: {dict(ds.sizes)}")
    ds = ds.chunk({"time": 1, "y": 2048, "x": 2048})
    rows = []
    readers = []
    for fmt in (2, 3):
        for codec in CODECS:
            best = float("inf")
            store = root / f"v{fmt}-{codec}.zarr"
            for _ in range(a.repeat):
                shutil.rmtree(store, ignore_errors=True)
                Path(str(store) + ".stac-item.json").unlink(missing_ok=True)
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    write_cube(ds, str(store), zarr_format=fmt, codec=codec)
                best = min(best, time.perf_counter() - t)
            size = _size(store)
            rows.append((fmt, codec, size, best))
            ref = xr.open_zarr(store, decode_coords="all")["ndvi"].values[0]
            readers.append((fmt, codec, _rasterio(store, ref), _gdal_bin(store, ref)))
            print(fmt, codec, size, f"{best:.2f}s", readers[-1][2:], flush=True)
    import rasterio

    raw = ds["ndvi"].nbytes + ds["valid_count"].nbytes
    print(f"\n{ds.sizes['time']} monthly periods x {ds.sizes['y']} x {ds.sizes['x']} px "
          f"(ndvi float32 + valid_count uint16 = {raw / 2**20:.1f} MiB raw), best of {a.repeat} writes, "
          f"{os.cpu_count()} cores\n")
    print("| Zarr | codec | size (MiB) | vs raw | write (s) |\n|---|---|---:|---:|---:|")
    for fmt, codec, size, best in rows:
        print(f"| v{fmt} | {codec} | {size / 2**20:.2f} | {size / raw:.0%} | {best:.2f} |")
    print(f"\n| Zarr | codec | GDAL {rasterio.__gdal_version__} (rasterio wheel) | Debian gdal-bin |")
    print("|---|---|---|---|")
    for fmt, codec, rio, gb in readers:
        print(f"| v{fmt} | {codec} | {rio} | {gb} |")


if __name__ == "__main__":
    main()
