"""Real Sentinel-2 pixels end to end: Earth Search COGs of S2A_29RKH_20200219 (decimated 10x, EPSG:32629).

The NDVI composite of the pipeline is compared with a reference computed here with rasterio + numpy straight
from the files: reflectance = DN * 0.0001 + 0 (processing baseline 02.14 < 04.00), SCL (200 m) repeated 2x
onto the 100 m grid, SCL classes 0, 1, 2, 3, 8, 9, 10 masked. The item's ``proj:shape``/``proj:transform``
describe the full-resolution originals (10980 px at 10 m), not these files (1098 px at 100 m): the pixels must
come from the files' own grid.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr

from ndvi_scale.pipeline import compute

RASTER = Path(__file__).parent / "data" / "raster" / "earth-search_S2A_29RKH_20200219_decimated"
ITEM = RASTER / "S2A_29RKH_20200219_0_L2A.json"
FILES = {"red": "B04.tif", "nir": "B08.tif", "scl": "SCL.tif"}
MASKED = (0, 1, 2, 3, 8, 9, 10)
#: sha256 prefixes from the fixture README: the copies must stay byte-for-byte the published files.
SHA256 = {"B04.tif": "03d15e21", "B08.tif": "87949add", "SCL.tif": "12a5f0c7"}
START, END = "2020-02-01", "2020-02-29"


def _item(base: str) -> dict:
    """The real item with red/nir/scl hrefs pointing at ``base`` + file name (everything else untouched)."""
    item = json.loads(ITEM.read_text())
    for band, name in FILES.items():
        item["assets"][band]["href"] = f"{base}/{name}"
    return item


def _write_items(tmp_path: Path, item: dict) -> Path:
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    return path


@pytest.fixture(scope="module")
def reference():
    """(ndvi float64 with NaN where masked, geotransform) on the 100 m grid of the red/nir files."""
    with rasterio.open(RASTER / "B04.tif") as src:
        red, transform = src.read(1), src.transform
    with rasterio.open(RASTER / "B08.tif") as src:
        nir = src.read(1)
    with rasterio.open(RASTER / "SCL.tif") as src:
        scl = src.read(1)
    scl100 = np.repeat(np.repeat(scl, 2, axis=0), 2, axis=1)
    assert scl100.shape == red.shape == nir.shape == (1098, 1098)
    r = red.astype(np.float64) * 0.0001 + 0.0
    n = nir.astype(np.float64) * 0.0001 + 0.0
    ndvi = (n - r) / (n + r)
    ndvi[np.isin(scl100, MASKED) | (red == 0) | (nir == 0)] = np.nan
    return ndvi, transform


def _expected_on(ds: xr.Dataset, reference) -> np.ndarray:
    """The reference sampled at the output pixel centres (nearest = the file pixel containing the centre).

    The output grid is snapped to multiples of 100 m while the files start at x=199980: the grids are offset
    by 20 m, each output pixel centre falls inside exactly one file pixel; outside the files it is NaN.
    """
    ndvi, tf = reference
    x, y = np.meshgrid(ds.x.values, ds.y.values)
    col = np.floor((x - tf.c) / tf.a).astype(int)
    row = np.floor((y - tf.f) / tf.e).astype(int)
    inside = (col >= 0) & (col < ndvi.shape[1]) & (row >= 0) & (row < ndvi.shape[0])
    out = np.full(x.shape, np.nan)
    out[inside] = ndvi[row[inside], col[inside]]
    return out


def _assert_matches(ds: xr.Dataset, reference) -> None:
    assert ds.rio.crs.to_epsg() == 32629 and ds.sizes["time"] == 1
    assert float(ds.x[1] - ds.x[0]) == 100.0 and float(ds.y[0] - ds.y[1]) == 100.0
    want = _expected_on(ds, reference)
    got = ds.ndvi.values[0]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # same NaN pattern
    clear = ~np.isnan(want)
    assert clear.sum() > 900_000 and (~clear).sum() > 10_000  # real data and real holes (clouds, outside)
    assert np.abs(got[clear] - want[clear]).max() <= 1e-6
    np.testing.assert_array_equal(ds.valid_count.values[0], clear.astype(np.uint16))


def test_fixture_is_the_published_data_and_its_metadata_grid_is_not_the_files():
    for name, prefix in SHA256.items():
        assert hashlib.sha256((RASTER / name).read_bytes()).hexdigest().startswith(prefix), name
    item = json.loads(ITEM.read_text())
    assert item["properties"]["s2:processing_baseline"] == "02.14"
    for band, name in FILES.items():
        with rasterio.open(RASTER / name) as src:
            meta = item["assets"][band]
            assert tuple(meta["proj:shape"]) != src.shape  # 10980 vs 1098, 5490 vs 549
            assert meta["proj:transform"][0] != src.transform.a  # 10 m vs 100 m, 20 m vs 200 m
            assert src.crs.to_epsg() == item["properties"]["proj:epsg"] == 32629


def test_cli_end_to_end_equals_numpy_reference(tmp_path, reference):
    items = _write_items(tmp_path, _item(str(RASTER.resolve())))
    bbox = json.loads(ITEM.read_text())["bbox"]  # the whole tile, and a margin outside it
    out = tmp_path / "ndvi.zarr"
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"}
    r = subprocess.run(
        [sys.executable, "-m", "ndvi_scale", "compute", "--bbox", *map(str, bbox), "--start", START,
         "--end", END, "--catalog", str(items), "--resolution", "100", "--out", str(out),
         "--allow-local"],  # the items file (tmp_path) points at the fixture's COGs outside its folder
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "1 scenes on 1 dates (2020-02-19), tiles 29RKH, CRS EPSG:32629; 0 skipped" in r.stderr
    ds = xr.open_zarr(out, decode_coords="all", consolidated=False)
    _assert_matches(ds, reference)
    (rec,) = json.loads(ds.attrs["ndvi_scale_items"])
    assert rec["processing_baseline"] == "02.14" and rec["red"] == {"scale": 0.0001, "offset": 0.0}


def test_wrong_footprint_metadata_loses_no_pixel(tmp_path, reference, caplog):
    """A ``proj:shape`` covering only the north-west quarter must not make the loader skip the rest."""
    item = _item(str(RASTER.resolve()))
    for band in ("red", "nir"):
        item["assets"][band]["proj:shape"] = [5490, 5490]
    item["assets"]["scl"]["proj:shape"] = [2745, 2745]
    items = _write_items(tmp_path, item)
    with caplog.at_level(logging.WARNING, logger="ndvi_scale.load"):
        ds = compute(item["bbox"], START, END, catalog=str(items), resolution=100, chunk=256,
                     allow_local=True).compute()  # the items file (tmp_path) points at the fixture COGs
    _assert_matches(ds, reference)
    assert "does not contain the item bbox" in caplog.text


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range GETs (what GDAL's /vsicurl/ sends), requests recorded."""

    log: list[tuple[str, str, str | None]] = []

    def log_message(self, *args):
        pass

    def do_HEAD(self):  # noqa: N802 (http.server API)
        self.log.append(("HEAD", self.path, None))
        super().do_HEAD()

    def do_GET(self):  # noqa: N802 (http.server API)
        rng = self.headers.get("Range")
        self.log.append(("GET", self.path, rng))
        if not rng:
            return super().do_GET()
        path = Path(self.translate_path(urllib.parse.urlsplit(self.path).path))
        if not path.is_file():
            return self.send_error(404)
        size = path.stat().st_size
        first, _, last = rng.removeprefix("bytes=").partition("-")
        if "," in rng or not first.isdigit():
            return self.send_error(416)
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def cog_server():
    log: list[tuple[str, str, str | None]] = []
    handler = type("Handler", (_RangeHandler,), {"log": log})
    serve = functools.partial(handler, directory=str(RASTER))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), serve)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def test_read_over_http_range_requests(tmp_path, reference, cog_server):
    url, log = cog_server
    item = _item(url)
    items = _write_items(tmp_path, item)
    ds = compute(item["bbox"], START, END, catalog=str(items), resolution=100).compute()
    _assert_matches(ds, reference)
    paths = {urllib.parse.urlsplit(p).path for _, p, _ in log}
    assert paths == {"/B04.tif", "/B08.tif", "/SCL.tif"}  # no sidecar or directory lookups (EMPTY_DIR)
    gets = [rng for method, _, rng in log if method == "GET"]
    assert gets and all(rng and rng.startswith("bytes=") for rng in gets)  # range reads only
    for name in FILES.values():  # HEAD, header, merged tile ranges: a regression guard (cf. OSGeo/gdal#9682)
        assert sum(1 for _, p, _ in log if p == f"/{name}") <= 4, log
