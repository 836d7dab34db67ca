"""The command line as a user meets it: real processes, real files, one-line errors, nothing clobbered."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import numpy as np
import pytest
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr

from ndvi_scale.sample import SampleSpec, generate

SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 20), end=dt.date(2024, 5, 15))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-sample")
    generate(root, SPEC)
    return str(root / "items.json")


def bbox_args():
    return [f"{v:.5f}" for v in SPEC.bbox_lonlat()]


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def test_compute_writes_a_zarr_with_crs(catalog, tmp_path):
    out = tmp_path / "ndvi.zarr"
    r = cli("compute", "--bbox", *bbox_args(), "--start", "2024-04-20", "--end", "2024-05-15",
            "--catalog", catalog, "--out", str(out), "--chunk", "64")
    assert r.returncode == 0, r.stderr
    assert "scenes on" in r.stderr and "wrote" in r.stdout
    ds = xr.open_zarr(out, decode_coords="all", consolidated=False)
    assert ds.rio.crs.to_epsg() == 32631
    assert ds.sizes["time"] == 2 and np.isfinite(ds.ndvi.values).any()


def test_compute_records_the_mask_filters(catalog, tmp_path):
    """The filters a cube was made with are in its attributes, its configuration and its STAC item."""
    import json

    out = tmp_path / "ndvi.zarr"
    r = cli("compute", "--bbox", *bbox_args(), "--start", "2024-04-20", "--end", "2024-05-15", "--catalog", catalog,
            "--out", str(out), "--chunk", "64", "--mask-opening", "0", "--mask-dilation", "40")
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(out, decode_coords="all", consolidated=False)
    want = [{"op": "dilation", "metres": 40.0, "pixels": 4.0, "classes": [3, 8, 9, 10]}]
    assert json.loads(ds.attrs["ndvi_scale_mask_filters"]) == want
    assert json.loads(ds.attrs["ndvi_scale_config"])["mask_filters"] == [["dilation", 40.0]]
    item = json.loads((tmp_path / "ndvi.zarr.stac-item.json").read_text())
    assert item["properties"]["ndvi_scale:mask_filters"] == want


def _assert_one_line_error(r, *needles):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--bbox", "1.9", "48.3", "1.7", "48.4"], ["bbox west 1.9 >= east 1.7", "W S E N"]),
        (["--bbox", "1.7", "95", "1.9", "96"], ["bbox south 95 is out of range"]),
        (["--start", "2024-06-01", "--end", "2024-05-01"], ["start 2024-06-01 is after end 2024-05-01"]),
        (["--catalog", "nowhere-provider"], ["catalog 'nowhere-provider' is unknown", "sample"]),
        (["--catalog", "/no/such/items.json"], ["/no/such/items.json", "does not exist"]),
        (["--start", "2023-01-01", "--end", "2023-01-31"], ["no Sentinel-2 L2A scenes found", "widen"]),
        (["--method", "mode"], ["method 'mode' is unknown"]),
        (["--period", "fortnight"], ["period 'fortnight' is unknown"]),
        (["--mask-dilation", "wide"], ["mask filters dilation radius 'wide' is not a number"]),
        (["--mask-filters", "blur:20"], ["mask filters op 'blur' is unknown", "opening:20,dilation:60"]),
        (["--mask-filters", "dilation:20", "--mask-opening", "10"], ["--mask-filters or --mask-opening"]),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(catalog, tmp_path, args, needles):
    out = tmp_path / "never.zarr"
    base = {"--bbox": bbox_args(), "--start": ["2024-04-20"], "--end": ["2024-05-15"], "--catalog": [catalog],
            "--out": [str(out)]}
    i = 0
    while i < len(args):  # override defaults with the bad values
        n = 4 if args[i] == "--bbox" else 1
        base[args[i]] = args[i + 1 : i + 1 + n]
        i += 1 + n
    argv = [a for k, v in base.items() for a in (k, *v)]
    r = cli("compute", *argv)
    _assert_one_line_error(r, *needles)
    assert not out.exists()


def test_existing_output_is_not_overwritten(catalog, tmp_path):
    out = tmp_path / "ndvi.zarr"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["compute", "--bbox", *bbox_args(), "--start", "2024-04-20", "--end", "2024-05-15", "--catalog", catalog,
            "--out", str(out), "--chunk", "64"]
    r = cli(*args)
    _assert_one_line_error(r, str(out), "already exists", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    r = cli(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "precious.txt").exists()
    assert xr.open_zarr(out, consolidated=False).sizes["time"] == 2


def test_negative_coordinates_parse(catalog, tmp_path):
    # west of Greenwich: negative numbers after --bbox must not be taken for options
    r = cli("compute", "--bbox", "-1.9", "48.3", "-1.7", "48.4", "--start", "2024-04-20", "--end", "2024-05-15",
            "--catalog", catalog, "--out", str(tmp_path / "x.zarr"))
    _assert_one_line_error(r, "no Sentinel-2 L2A scenes found")


def test_catalogs_lists_profiles():
    r = cli("catalogs")
    assert r.returncode == 0, r.stderr
    for name in ("sample", "earth-search", "planetary-computer", "cdse"):
        assert name in r.stdout


def test_missing_required_option_is_not_a_traceback(tmp_path):
    r = cli("compute", "--start", "2024-01-01", "--end", "2024-01-31", "--out", str(tmp_path / "o.zarr"))
    _assert_one_line_error(r, "bbox is missing")


def test_compute_with_an_aoi_file_in_another_crs(catalog, tmp_path):
    """--aoi FILE instead of --bbox: a GeoPackage in UTM 31N; outside pixels NaN with count 0."""
    import pyogrio.raw
    import shapely
    from pyproj import Transformer

    w, s, e, n = SPEC.bbox_lonlat()
    lon, lat = (w + e) / 2, (s + n) / 2
    x, y = Transformer.from_crs(4326, 32631, always_xy=True).transform(lon, lat)
    disc = shapely.Point(x, y).buffer(300)  # a round field, 60 px across
    gpkg = tmp_path / "field.gpkg"
    pyogrio.raw.write(str(gpkg), np.array([shapely.to_wkb(disc)], dtype=object), [], [],
                      geometry_type="Polygon", crs="EPSG:32631", driver="GPKG")
    out = tmp_path / "aoi.zarr"
    r = cli("compute", "--aoi", str(gpkg), "--start", "2024-04-20", "--end", "2024-05-15", "--catalog", catalog,
            "--out", str(out), "--chunk", "64")
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(out, decode_coords="all")
    X, Y = np.meshgrid(ds.x.values, ds.y.values)
    inside = shapely.contains_xy(disc, X, Y)
    assert 0.5 < inside.mean() < 0.9  # a disc in its bbox: pi / 4
    assert np.isnan(ds.ndvi.values[:, ~inside]).all() and (ds.valid_count.values[:, ~inside] == 0).all()
    assert np.isfinite(ds.ndvi.values[:, inside]).mean() > 0.5
    assert "field.gpkg" in ds.attrs["ndvi_scale_aoi"]

    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    for path, needles in ((tmp_path / "nope.gpkg", ["aoi file", "nope.gpkg", "does not exist", "give a GeoJSON"]),
                          (bad, ["aoi file", "bad.geojson", "cannot be read as vector data", "give a GeoJSON"])):
        r = cli("compute", "--aoi", str(path), "--start", "2024-04-20", "--end", "2024-05-15", "--catalog",
                catalog, "--out", str(tmp_path / "never.zarr"))
        _assert_one_line_error(r, *needles)
        assert r.returncode == 2 and not (tmp_path / "never.zarr").exists()
