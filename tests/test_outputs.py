"""The written cube opened by tools nobody here wrote: stac-validator (raw JSON, offline schemas), cfchecker (netCDF
export, offline CF tables), GDAL through rasterio (3.10 in its wheel) and Debian's gdal-bin (3.6), odc-geo.

Cubes of every kind are computed once by the real pipeline on the embedded sample (a small bbox near Chartres):
median (v3, month), mean (v2, month), max (v2, month), min (v3, dekad), 25th percentile per season (v2, Dec-Feb
and Mar-May).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

import ndvi_scale
from stac_schemas import assert_valid, validate_raw

TESTS = Path(__file__).resolve().parent
CF_TABLES = TESTS / "data" / "cf"
BBOX = (1.76, 48.34, 1.785, 48.355)  # ~190 x 170 px of the sample, UTM 31N
FILL_DAYS = -2147483647

KINDS: dict[str, dict[str, Any]] = {
    "median": dict(method="median", period="month", zarr_format=3, start="2024-04-01", end="2024-05-31"),
    "mean": dict(method="mean", period="month", zarr_format=2, start="2024-04-01", end="2024-05-31"),
    "max": dict(method="max", period="month", zarr_format=2, start="2024-04-01", end="2024-05-31"),
    "min": dict(method="min", period="dekad", zarr_format=3, start="2024-05-01", end="2024-05-31"),
    "q25-season": dict(method="q25", period="season", zarr_format=2, start="2024-01-01", end="2024-05-31"),
}
CELL_METHODS = {"median": "time: median", "mean": "time: mean", "max": "time: maximum", "min": "time: minimum"}
V2 = [k for k, v in KINDS.items() if v["zarr_format"] == 2]


@pytest.fixture(scope="module")
def cubes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    out = {}
    for kind, kw in KINDS.items():
        path = root / f"{kind}.zarr"
        ndvi_scale.compute(bbox=BBOX, catalog="sample", out=str(path), chunk=128, **kw)
        out[kind] = path
    return out


def _open(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, decode_coords="all")


# ------------------------------------------------------------------------------------------------ STAC


def test_prepare_stac_item_loads_what_checking_the_item_needs() -> None:
    # a fresh process: pystac's extension modules are imported by the first Item.from_dict, not by import
    code = ("import sys; from ndvi_scale.write import prepare_stac_item; "
            "mods = ('pystac.extensions.projection', 'pystac.extensions.datacube'); "
            "print(any(m in sys.modules for m in mods)); prepare_stac_item().join(); "
            "print(all(m in sys.modules for m in mods))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_stac_item_is_valid_raw_json(cubes: dict[str, Path], kind: str, tmp_path: Path) -> None:
    item_path = Path(str(cubes[kind]) + ".stac-item.json")
    raw = assert_valid(item_path)  # stac-validator, core + every declared extension, on the file as written
    props = raw["properties"]
    assert "https://stac-extensions.github.io/projection/v2.0.0/schema.json" in raw["stac_extensions"]
    assert "https://stac-extensions.github.io/datacube/v2.3.0/schema.json" in raw["stac_extensions"]
    assert props["proj:code"] == "EPSG:32631" and "proj:epsg" not in props
    asset = raw["assets"]["zarr"]
    assert asset["type"] == f"application/vnd.zarr; version={KINDS[kind]['zarr_format']}"
    assert asset["href"] == f"./{kind}.zarr"
    (self_link,) = [link for link in raw["links"] if link["rel"] == "self"]
    assert Path(self_link["href"]) == item_path
    assert props["processing:level"] == "L3" and "ndvi-scale" in props["processing:software"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", props["processing:datetime"])
    variables = props["cube:variables"]
    assert variables["ndvi"]["nodata"] == "nan" and variables["ndvi"]["data_type"] == "float32"
    assert "nodata" not in variables["valid_count"], "0 observations is a count, not no-data"
    date = {"max": "max_date", "min": "min_date"}.get(kind)
    if date:
        assert variables[date]["nodata"] == FILL_DAYS and variables[date]["data_type"] == "int32"
        assert variables[date]["unit"] == "days since 1970-01-01"
    # pystac resolves the relative asset href against the self link: the cube itself
    import pystac

    item = pystac.Item.from_file(str(item_path))
    assert Path(item.assets["zarr"].get_absolute_href() or "") == cubes[kind]
    # The validator is not vacuous: the field projection v2 removed makes the same item invalid.
    bad = json.loads(item_path.read_text())
    bad["properties"]["proj:epsg"] = 32631
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    verdict = validate_raw(tmp_path / "bad.json")
    assert verdict["valid_stac"] is False and "proj:epsg" in verdict.get("error_message", ""), verdict


# ------------------------------------------------------------------------------------------------ CF


#: Warnings cfchecker 4.1 still gives, each justified in the README ("CF conformance").
JUSTIFIED_WARNINGS = {
    "spatial_ref": "(3.1): units attribute should be present",
    "time_bnds": "(7.1): Boundary Variable time_bnds should not have _FillValue attribute",
}


def _netcdf_export(cube: Path, target: Path) -> Path:
    """The cube as netCDF, as a user would export it (GDAL's ``_CRS`` object attribute has no netCDF type)."""
    ds = _open(cube)
    for var in ds.variables.values():
        var.attrs.pop("_CRS", None)
    ds.to_netcdf(target)
    return target


def _cfchecks(nc: Path, tables: Path) -> tuple[str, dict[str, list[str]]]:
    """cfchecker's output and its ERROR/WARN messages per variable (offline: local CF tables)."""
    try:
        import cfchecker  # noqa: F401  (imports cfunits, which needs udunits2)
    except Exception as exc:  # pragma: no cover - a machine set up without --test-tools
        pytest.fail(f"cfchecker cannot run ({exc}); install udunits2: python3 dev/bootstrap.py --test-tools "
                    "(apt-get install libudunits2-0)")
    exe = Path(sys.executable).with_name("cfchecks")
    r = subprocess.run(
        [str(exe), "-s", str(tables / "cf-standard-name-table.xml"), "-a", str(CF_TABLES / "area-type-table.xml"),
         "-r", str(CF_TABLES / "standardized-region-list.xml"), str(nc)],
        capture_output=True, text=True, timeout=300,
    )
    messages: dict[str, list[str]] = {"ERROR": [], "WARN": []}
    where = "global"
    for line in r.stdout.splitlines():
        if line.startswith("Checking variable:"):
            where = line.split(":", 1)[1].strip()
        for level in messages:
            if line.startswith(level + ":"):
                messages[level].append(f"{where}: {line[len(level) + 1:].strip()}")
    return r.stdout, messages


@pytest.fixture(scope="module")
def cf_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cf-tables")
    with gzip.open(CF_TABLES / "cf-standard-name-table.xml.gz", "rb") as src:
        (root / "cf-standard-name-table.xml").write_bytes(src.read())
    return root


@pytest.mark.parametrize("kind", list(KINDS))
def test_cfchecker_finds_no_error(cubes: dict[str, Path], kind: str, cf_tables: Path, tmp_path: Path) -> None:
    nc = _netcdf_export(cubes[kind], tmp_path / f"{kind}.nc")
    out, messages = _cfchecks(nc, cf_tables)
    assert "Checking against CF Version CF-1.8" in out, out
    assert "ERRORS detected: 0" in out and not messages["ERROR"], out
    justified = {f"{var}: {text}" for var, text in JUSTIFIED_WARNINGS.items()}
    assert set(messages["WARN"]) <= justified, messages["WARN"]
    ds = _open(cubes[kind])
    method = KINDS[kind]["method"]
    if method in CELL_METHODS:
        assert ds["ndvi"].attrs["cell_methods"] == CELL_METHODS[method]
    else:  # a percentile has no CF cell method: said in words
        assert "cell_methods" not in ds["ndvi"].attrs
        assert "25th percentile" in ds["ndvi"].attrs["long_name"] and "percentile" in ds["ndvi"].attrs["comment"]
    assert ds.attrs["Conventions"] == "CF-1.8"
    assert not [k for k in ds.attrs if ":" in k], "CF attribute names: letters, digits, underscores"
    assert json.loads(ds.attrs["ndvi_scale_config"])["method"] == method


def test_time_bounds_and_dates_of_extremes(cubes: dict[str, Path]) -> None:
    season = _open(cubes["q25-season"])
    assert json.loads((cubes["q25-season"] / "time" / ".zattrs").read_text())["bounds"] == "time_bnds"
    np.testing.assert_array_equal(
        season["time_bnds"].values,
        np.array([["2023-12-01", "2024-03-01"], ["2024-03-01", "2024-06-01"]], "datetime64[ns]"),
    )
    month = _open(cubes["max"])
    np.testing.assert_array_equal(month["time_bnds"].values[:, 1] - np.timedelta64(1, "D"), month["time_end"].values)
    raw = json.loads((cubes["max"] / "max_date" / ".zattrs").read_text())
    meta = json.loads((cubes["max"] / "max_date" / ".zarray").read_text())
    assert raw["units"] == "days since 1970-01-01" and meta["dtype"] == "<i4" and meta["fill_value"] == FILL_DAYS
    dates = month["max_date"].values
    assert dates.dtype == np.dtype("datetime64[ns]")  # xarray still decodes dates
    observed = month["valid_count"].values > 0
    assert np.isnat(dates[~observed]).all() and not np.isnat(dates[observed]).any()
    in_period = (dates >= month["time"].values[:, None, None]) & (dates <= month["time_end"].values[:, None, None])
    assert in_period[observed].all()
    v3 = json.loads((cubes["median"] / "valid_count" / "zarr.json").read_text())
    assert v3["fill_value"] == 65535 and "_FillValue" not in v3["attributes"], "0 observations stays data"
    assert _open(cubes["median"])["valid_count"].dtype == np.uint16


def test_history_has_utc_time_and_the_call(cubes: dict[str, Path]) -> None:
    history = _open(cubes["median"]).attrs["history"]
    (line,) = history.splitlines()
    when, rest = line.split(" ", 1)
    stamp = dt.datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 3600
    assert rest.startswith(f"ndvi-scale {ndvi_scale.__version__}: ndvi_scale.compute(")
    assert "method='median'" in rest and "period='month'" in rest


# ------------------------------------------------------------------------------------------------ GDAL


@pytest.mark.parametrize("kind", V2)
def test_rasterio_gdal_reads_v2_cube(cubes: dict[str, Path], kind: str) -> None:
    import rasterio
    from affine import Affine

    ds = _open(cubes[kind])
    x, y = ds["x"].values, ds["y"].values
    want = Affine(x[1] - x[0], 0, x[0] - (x[1] - x[0]) / 2, 0, y[1] - y[0], y[0] - (y[1] - y[0]) / 2)
    with rasterio.open(f'ZARR:"{cubes[kind]}":/ndvi') as src:
        assert src.crs.to_epsg() == 32631
        assert src.transform.almost_equals(want, precision=1e-6), (src.transform, want)
        assert src.count == ds.sizes["time"] and (src.height, src.width) == (y.size, x.size)
        assert np.isnan(src.nodata) and src.dtypes[0] == "float32"
        band = src.count  # the last period
        np.testing.assert_array_equal(src.read(band), ds["ndvi"].values[band - 1])  # NaN == NaN here
    with rasterio.open(f'ZARR:"{cubes[kind]}":/valid_count') as src:
        assert src.nodata is None, "0 clear observations is a count"
        np.testing.assert_array_equal(src.read(1), ds["valid_count"].values[0])
    if kind == "max":
        with rasterio.open(f'ZARR:"{cubes[kind]}":/max_date') as src:
            assert src.nodata == FILL_DAYS and src.dtypes[0] == "int32"
            got = src.read(1)
        days = ds["max_date"].values[0]
        expect = np.where(np.isnat(days), FILL_DAYS, days.astype("datetime64[D]").astype(np.int64))
        np.testing.assert_array_equal(got, expect)


def _gdalinfo() -> str:
    exe = shutil.which("gdalinfo")
    if exe is None:  # README command 2 installs it: no skip
        pytest.fail("gdalinfo (Debian gdal-bin) is missing: python3 dev/bootstrap.py --test-tools installs it")
    return exe


@pytest.mark.parametrize("kind", ["max", "q25-season"])
def test_debian_gdal_sees_crs_of_v2_cube(cubes: dict[str, Path], kind: str, tmp_path: Path) -> None:
    exe = _gdalinfo()
    r = subprocess.run([exe, "-json", f'ZARR:"{cubes[kind]}":/ndvi:0'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert 'ID["EPSG",32631]' in info["coordinateSystem"]["wkt"], info.get("coordinateSystem")
    ds = _open(cubes[kind])
    x0, y0 = float(ds["x"][0]) - 5.0, float(ds["y"][0]) + 5.0
    assert info["geoTransform"] == pytest.approx([x0, 10.0, 0.0, y0, 0.0, -10.0])
    # and a GeoTIFF exported by that GDAL keeps the CRS (what QGIS users do with it)
    tif = tmp_path / "ndvi.tif"
    exe_translate = Path(exe).with_name("gdal_translate")
    r = subprocess.run([str(exe_translate), "-q", f'ZARR:"{cubes[kind]}":/ndvi:0', str(tif)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import rasterio

    with rasterio.open(tif) as src:
        assert src.crs.to_epsg() == 32631
        np.testing.assert_array_equal(src.read(1), ds["ndvi"].values[0])


@pytest.mark.parametrize("kind", ["median", "max", "q25-season"])
def test_odc_geo_geobox(cubes: dict[str, Path], kind: str) -> None:
    import odc.geo.xr  # noqa: F401  (registers the .odc accessor)

    ds = _open(cubes[kind])
    gbox = ds.odc.geobox
    assert gbox is not None and gbox.crs.epsg == 32631
    assert gbox.shape == (ds.sizes["y"], ds.sizes["x"]) and gbox.resolution.x == 10 and gbox.resolution.y == -10
    assert ds["ndvi"].odc.geobox == gbox


# ------------------------------------------------------------------------------------------------ old cubes, codec


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_append_to_a_cube_with_legacy_attribute_names(tmp_path: Path, zarr_format: int) -> None:
    """A cube written before the CF-legal names (``ndvi_scale:*``, no time_bnds, no _CRS) still takes monthly
    appends, and comes out of the next one with today's names (and GDAL's _CRS in v2)."""
    import zarr

    out = tmp_path / "old.zarr"
    kw = dict(bbox=BBOX, catalog="sample", chunk=128, method="max", zarr_format=zarr_format)
    ndvi_scale.compute(start="2024-04-01", end="2024-04-30", out=str(out), **kw)
    group = zarr.open_group(out, mode="r+")
    for name in ("ndvi", "valid_count", "max_date"):
        attrs = dict(group[name].attrs)
        attrs.pop("_CRS", None)
        group[name].attrs.put(attrs)
    legacy = {(k.replace("ndvi_scale_", "ndvi_scale:", 1) if k.startswith("ndvi_scale_") else k): v
              for k, v in group.attrs.items()}
    legacy["history"] = "ndvi-scale 0.1.0"
    group.attrs.put(legacy)
    del group["time_bnds"]
    time_attrs = dict(group["time"].attrs)
    del time_attrs["bounds"]
    group["time"].attrs.put(time_attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zarr: consolidated metadata is not in the v3 spec
        zarr.consolidate_metadata(out)
    assert "ndvi_scale:write" in _open(out).attrs

    ds = ndvi_scale.compute(start="2024-05-01", end="2024-05-31", out=str(out), append=True, **kw)
    assert [str(t)[:10] for t in ds["time"].values] == ["2024-04-01", "2024-05-01"]
    assert not [k for k in ds.attrs if k.startswith("ndvi_scale:")], "legacy names renamed"
    assert json.loads(ds.attrs["ndvi_scale_write"])["state"] == "complete"
    assert len(json.loads(ds.attrs["ndvi_scale_runs"])) == 2
    lines = ds.attrs["history"].splitlines()
    assert len(lines) == 2 and lines[1] == "ndvi-scale 0.1.0" and "2024-05-01" in lines[0], "newest first"
    assert "time_bnds" not in ds.variables  # an old cube keeps its layout: time_end says where periods end
    reference = tmp_path / "ref.zarr"
    ref = ndvi_scale.compute(start="2024-04-01", end="2024-05-31", out=str(reference), **kw)
    for name in ("ndvi", "valid_count", "max_date"):
        np.testing.assert_array_equal(ds[name].values, ref[name].values)
    assert_valid(str(out) + ".stac-item.json")
    if zarr_format == 2:
        for name in ("ndvi", "valid_count", "max_date"):
            assert "EPSG/0/32631" in zarr.open_array(out / name, mode="r").attrs["_CRS"]["url"]


def test_append_extends_time_bounds_and_history(tmp_path: Path) -> None:
    out = tmp_path / "season.zarr"
    kw = dict(bbox=BBOX, catalog="sample", chunk=128, method="q25", period="season", zarr_format=2)
    ndvi_scale.compute(start="2024-01-01", end="2024-02-29", out=str(out), **kw)
    ds = ndvi_scale.compute(start="2024-03-01", end="2024-05-31", out=str(out), append=True, **kw)
    np.testing.assert_array_equal(
        ds["time_bnds"].values,
        np.array([["2023-12-01", "2024-03-01"], ["2024-03-01", "2024-06-01"]], "datetime64[ns]"),
    )
    assert len(ds.attrs["history"].splitlines()) == 2
    assert_valid(str(out) + ".stac-item.json")


def test_cli_codec_and_history(tmp_path: Path) -> None:
    out = tmp_path / "zlib.zarr"
    args = ["compute", "--bbox", *map(str, BBOX), "--start", "2024-04-01", "--end", "2024-04-30",
            "--catalog", "sample", "--out", str(out), "--zarr-format", "2", "--codec", "zlib", "--chunk", "128"]
    r = subprocess.run([sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ids = {json.loads(p.read_text())["compressor"]["id"] for p in out.glob("*/.zarray")}
    assert ids == {"zlib"}, "every array (x and y too: GDAL reads them) in the chosen codec"
    ds = _open(out)
    (line,) = ds.attrs["history"].splitlines()
    assert line.endswith("ndvi-scale " + " ".join(args)), line
    import rasterio

    with rasterio.open(f'ZARR:"{out}":/ndvi') as src:
        assert src.crs.to_epsg() == 32631
        np.testing.assert_array_equal(src.read(1), ds["ndvi"].values[0])
    bad = subprocess.run([sys.executable, "-m", "ndvi_scale", *args[:-4], "--codec", "brotli"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "codec 'brotli' is unknown" in bad.stderr and "Traceback" not in bad.stderr


def test_fast_date_encoding_equals_xarrays() -> None:
    from ndvi_scale.cf import date_encoding
    from ndvi_scale.write import _encode_epoch_dates

    days = np.array([[[19814, -1], [0, 20000]]], dtype="datetime64[D]").astype("datetime64[ns]")
    days[0, 0, 1] = np.datetime64("NaT")
    enc = date_encoding()
    fast = _encode_epoch_dates(days, enc)
    slow = xr.conventions.encode_cf_variable(xr.Variable(("time", "y", "x"), days, encoding=dict(enc))).values
    assert fast is not None and fast.dtype == np.int32 and slow.dtype == np.int32
    np.testing.assert_array_equal(fast, slow)
    assert fast[0, 0, 1] == FILL_DAYS
