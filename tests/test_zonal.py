"""ndvi_scale.zonal / ``ndvi-scale zonal``: exact coverage weights checked against an independent computation,
parcel means against the sample's analytic truth, chunked == unchunked, zones in any CRS, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import xarray as xr
from pyproj import Transformer

import ndvi_scale
from analytics_cube import SPEC, cube_path
from ndvi_scale.analytics.grid import cube_grid
from ndvi_scale.errors import InputError
from ndvi_scale.sample import Truth

ALL = "mean,median,std,min,max,count,valid_fraction"
TO_LL = Transformer.from_crs(SPEC.epsg, 4326, always_xy=True)


@pytest.fixture(scope="module")
def cube(tmp_path_factory) -> str:
    return cube_path(tmp_path_factory)


@pytest.fixture(scope="module")
def ds(cube) -> xr.Dataset:
    return xr.open_zarr(cube, decode_coords="all", consolidated=False)


def _rect_ll(xmin: float, ymin: float, xmax: float, ymax: float) -> shapely.Polygon:
    """A UTM rectangle as a lon/lat polygon (its 4 corners transformed: back in UTM it is the same rectangle)."""
    xs = [xmin, xmax, xmax, xmin]
    ys = [ymin, ymin, ymax, ymax]
    lon, lat = TO_LL.transform(xs, ys)
    return shapely.Polygon(list(zip(lon, lat, strict=True)))


def _write_geojson(path: Path, polys: list[shapely.Polygon], ids: list[str] | None = None) -> str:
    feats = [{"type": "Feature", "properties": {"name": ids[k] if ids else f"z{k}"},
              "geometry": shapely.geometry.mapping(p)} for k, p in enumerate(polys)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return str(path)


def _overlap_weights(rect: tuple[float, float, float, float], grid) -> np.ndarray:
    """Coverage fraction of every pixel by an axis-aligned rectangle: a product of interval overlaps (no
    exactextract, no shapely)."""
    xmin, ymin, xmax, ymax = rect
    cx0 = grid.left + np.arange(grid.width) * grid.res
    ry1 = grid.top - np.arange(grid.height) * grid.res
    fx = np.clip(np.minimum(cx0 + grid.res, xmax) - np.maximum(cx0, xmin), 0, None) / grid.res
    fy = np.clip(np.minimum(ry1, ymax) - np.maximum(ry1 - grid.res, ymin), 0, None) / grid.res
    return fy[:, None] * fx[None, :]


def _reference(values: np.ndarray, w: np.ndarray, area_px: float) -> dict[str, float]:
    """Statistics of one period by brute force over the whole grid (the documented rule)."""
    ok = (w > 0) & ~np.isnan(values)
    v, ww = values[ok].astype(np.float64), w[ok]
    if ok.sum() == 0:
        return {"count": 0, "valid_fraction": 0.0, "mean": np.nan}
    mean = float(np.sum(ww * v) / np.sum(ww))
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(ww[order])
    median = float(v[order][np.searchsorted(cum, 0.5 * cum[-1] * (1 - 1e-12))])
    return {
        "mean": mean,
        "std": float(np.sqrt(np.sum(ww * (v - mean) ** 2) / np.sum(ww))),
        "min": float(v.min()),
        "max": float(v.max()),
        "median": median,
        "count": int(ok.sum()),
        "valid_fraction": float(min(np.sum(ww) / area_px, 1.0)),
    }


def test_matches_independent_weights(ds, tmp_path):
    """Random rectangles (crossing chunks, partly outside the cube, sub-pixel) against brute-force weights."""
    grid = cube_grid(ds)
    rng = np.random.default_rng(7)
    xmin0, ymin0, xmax0, ymax0 = grid.bounds(0, grid.height, 0, grid.width)
    rects = []
    for _ in range(25):
        w, h = rng.uniform(3, 900), rng.uniform(3, 700)
        x = rng.uniform(xmin0 - 200, xmax0 - w + 200)
        y = rng.uniform(ymin0 - 200, ymax0 - h + 200)
        rects.append((x, y, x + w, y + h))
    rects.append((grid.left + 630.0, grid.top - 645.0, grid.left + 655.0, grid.top - 635.0))  # across a chunk corner
    zones = _write_geojson(tmp_path / "rects.geojson", [_rect_ll(*r) for r in rects])
    got = ndvi_scale.zonal(ds, zones, id_field="name", stats=ALL)
    assert len(got) == len(rects) * ds.sizes["time"]
    values = ds.ndvi.values
    for k, r in enumerate(rects):
        w = _overlap_weights(r, grid)
        area_px = (r[2] - r[0]) * (r[3] - r[1]) / grid.res**2
        for t in range(ds.sizes["time"]):
            row = got[(got.zone == f"z{k}") & (got.time == ds.time.values[t])].iloc[0]
            ref = _reference(values[t], w, area_px)
            assert row["count"] == ref["count"], (k, t)
            assert row["valid_fraction"] == pytest.approx(ref["valid_fraction"], abs=1e-6), (k, t)
            if ref["count"] == 0:
                assert np.isnan(row["mean"])
                continue
            for name in ("mean", "std", "min", "max", "median"):
                assert row[name] == pytest.approx(ref[name], abs=1e-6), (k, t, name)


def _parcel_rects() -> list[tuple[int, int, tuple[float, float, float, float]]]:
    """Every parcel of SPEC fully inside the cube, inset by odd, non-pixel-aligned margins."""
    out = []
    fs = SPEC.field_size
    for i in range(10):
        for j in range(6):
            x0, y1 = SPEC.x0 + i * fs, SPEC.y0 - j * fs
            out.append((i, j, (x0 + 23.7, y1 - fs + 31.3, x0 + fs - 17.9, y1 - 26.1)))
    return out


def test_parcel_means_match_the_analytic_truth(ds, tmp_path):
    """Zonal means within 0.01 of the truth's composite integrated over the polygon (2.5 m supersampling, no
    weights from the code under test); clear-pixel counts exactly as the rule says, from the truth's own clear
    flags at the pixel centres."""
    parcels = _parcel_rects()
    zones = _write_geojson(tmp_path / "parcels.geojson", [_rect_ll(*r) for _, _, r in parcels],
                           [f"{i}-{j}" for i, j, _ in parcels])
    got = ndvi_scale.zonal(ds, zones, id_field="name", stats=ALL)
    grid = cube_grid(ds)
    dates = [d.date() for d in SPEC.dates()]
    xs_pix = grid.left + (np.arange(grid.width) + 0.5) * grid.res
    ys_pix = grid.top - (np.arange(grid.height) + 0.5) * grid.res
    checked = 0
    for t, start in enumerate(pd.DatetimeIndex(ds.time.values)):
        period = [d for d in dates if d.year == start.year and d.month == start.month]
        _, pix_counts = Truth.expected_composite(SPEC, xs_pix[None, :], ys_pix[:, None], period, "median")
        for (i, j, (xmin, ymin, xmax, ymax)) in parcels:
            row = got[(got.zone == f"{i}-{j}") & (got.time == ds.time.values[t])].iloc[0]
            sx = np.arange(xmin + 1.25, xmax, 2.5)
            sy = np.arange(ymin + 1.25, ymax, 2.5)
            truth, n = Truth.expected_composite(SPEC, sx[None, :], sy[:, None], period, "median")
            w = _overlap_weights((xmin, ymin, xmax, ymax), grid)
            assert row["count"] == int(np.sum((w > 0) & (pix_counts > 0))), (i, j, t)
            clear = n > 0
            assert row["valid_fraction"] == pytest.approx(clear.mean(), abs=0.03)
            if clear.mean() < 0.5:
                continue
            assert abs(row["mean"] - float(np.mean(truth[clear]))) < 0.01, (i, j, t, row["mean"])
            checked += 1
    assert checked > 0.8 * len(parcels) * ds.sizes["time"]


def test_chunked_equals_unchunked(ds, tmp_path):
    parcels = _parcel_rects()
    big = [(SPEC.x0 + 250.0, SPEC.y0 - 1700.0, SPEC.x0 + 2900.3, SPEC.y0 - 333.3)]  # across many chunks
    polys = [_rect_ll(*r) for _, _, r in parcels] + [_rect_ll(*r) for r in big]
    polys.append(shapely.Point(TO_LL.transform(SPEC.x0 + 1400, SPEC.y0 - 900)).buffer(0.004))  # a disc
    ref = ndvi_scale.zonal(ds.load().chunk({"time": -1, "y": -1, "x": -1}), polys, stats=ALL)
    for chunks in ({"time": 1, "y": 37, "x": 53}, {"time": 2, "y": 64, "x": 64}):
        got = ndvi_scale.zonal(ds.chunk(chunks), polys, stats=ALL)
        assert (got["count"].to_numpy() == ref["count"].to_numpy()).all()
        for name in ("mean", "std", "valid_fraction", "min", "max", "median"):
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    in_memory = ndvi_scale.zonal(ds.load(), polys, stats=ALL)  # numpy-backed Dataset: one block
    pd.testing.assert_frame_equal(in_memory, ref, check_exact=False, rtol=1e-10)


def test_zones_in_any_crs_and_format(ds, tmp_path):
    import pyogrio.raw

    rects = [r for _, _, r in _parcel_rects()[:12]]
    ll = _write_geojson(tmp_path / "z.geojson", [_rect_ll(*r) for r in rects])
    to_merc = Transformer.from_crs(SPEC.epsg, 3857, always_xy=True)
    merc = []
    for xmin, ymin, xmax, ymax in rects:
        x, y = to_merc.transform([xmin, xmax, xmax, xmin], [ymin, ymin, ymax, ymax])
        merc.append(shapely.Polygon(list(zip(x, y, strict=True))))
    gpkg = str(tmp_path / "z.gpkg")
    pyogrio.raw.write(gpkg, shapely.to_wkb(np.asarray(merc, dtype=object)), [np.asarray([f"z{k}" for k in range(12)],
                      dtype=object)], ["name"], geometry_type="Polygon", crs="EPSG:3857", driver="GPKG")
    a = ndvi_scale.zonal(ds, ll, id_field="name", stats="mean,count")
    b = ndvi_scale.zonal(ds, gpkg, id_field="name", stats="mean,count")
    assert list(a.zone) == list(b.zone)
    assert (a["count"].to_numpy() == b["count"].to_numpy()).all()
    np.testing.assert_allclose(a["mean"], b["mean"], atol=1e-6)


def test_cli_zonal_parquet_and_csv(cube, ds, tmp_path):
    rects = [r for _, _, r in _parcel_rects()[:5]]
    zones = _write_geojson(tmp_path / "z.geojson", [_rect_ll(*r) for r in rects])
    api = ndvi_scale.zonal(cube, zones, id_field="name", stats=ALL)
    for ext in ("parquet", "csv"):
        out = tmp_path / f"stats.{ext}"
        p = subprocess.run([sys.executable, "-m", "ndvi_scale", "zonal", cube, "--zones", zones, "--id", "name",
                            "--stats", ALL, "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        got = pd.read_parquet(out) if ext == "parquet" else pd.read_csv(out, parse_dates=["time"])
        assert len(got) == 5 * ds.sizes["time"]
        np.testing.assert_allclose(got["mean"], api["mean"], rtol=1e-12)
        assert (got["count"].to_numpy() == api["count"].to_numpy()).all()
    again = subprocess.run([sys.executable, "-m", "ndvi_scale", "zonal", cube, "--zones", zones,
                            "--out", str(tmp_path / "stats.csv")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 7 and "--overwrite" in again.stderr


@pytest.mark.parametrize(
    "content, expect",
    [
        (None, "does not exist"),
        ("this is not json {", "cannot be read as vector data"),
        ('{"type":"FeatureCollection","features":[{"type":"Feature","properties":{},'
         '"geometry":{"type":"Point","coordinates":[1.7,48.3]}}]}', "are not polygons"),
        ('{"type":"FeatureCollection","features":[{"type":"Feature","properties":{},"geometry":{"type":"Polygon",'
         '"coordinates":[[[1.70,48.30],[1.71,48.31],[1.71,48.30],[1.70,48.31],[1.70,48.30]]]}}]}', "invalid polygons"),
    ],
)
def test_bad_vector_files_one_line_error(cube, tmp_path, content, expect):
    path = tmp_path / "bad.geojson"
    if content is not None:
        path.write_text(content)
    p = subprocess.run([sys.executable, "-m", "ndvi_scale", "zonal", cube, "--zones", str(path), "--out",
                        str(tmp_path / "s.csv")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0] and expect in lines[0], lines
    assert "Traceback" not in p.stderr


def test_bad_id_field_and_stats(ds, tmp_path):
    zones = _write_geojson(tmp_path / "z.geojson", [_rect_ll(*_parcel_rects()[0][2])])
    with pytest.raises(InputError, match=r"no field 'nope' \(fields: name\)"):
        ndvi_scale.zonal(ds, zones, id_field="nope")
    with pytest.raises(InputError, match="not known"):
        ndvi_scale.zonal(ds, zones, stats="mean,mode")


def test_geoparquet_zones_and_zone_outside(ds, tmp_path):
    """GeoParquet (WKB + 'geo' metadata, CRS84 by default) reads like GeoJSON; a zone outside the cube gets
    count 0, NaN mean and valid_fraction 0 rather than an error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rects = [r for _, _, r in _parcel_rects()[:4]]
    polys = [_rect_ll(*r) for r in rects] + [shapely.box(10.0, 50.0, 10.01, 50.01)]
    table = pa.table({"pid": [f"a{k}" for k in range(5)],
                      "geometry": [shapely.to_wkb(p) for p in polys]})
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"]}}}
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    path = tmp_path / "z.parquet"
    pq.write_table(table, path)
    got = ndvi_scale.zonal(ds, str(path), id_field="pid", stats="mean,count,valid_fraction")
    ref = ndvi_scale.zonal(ds, polys, stats="mean,count,valid_fraction")
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-12)
    out = got[got.zone == "a4"]
    assert (out["count"] == 0).all() and out["mean"].isna().all() and (out["valid_fraction"] == 0).all()


def test_general_polygons_weights_equal_shapely_intersections(ds):
    """Rotated, concave and holed polygons in the cube's CRS: every zone's mean and clear weight equal a
    computation from shapely's pixel-by-pixel intersection areas (no exactextract)."""
    grid = cube_grid(ds)
    rng = np.random.default_rng(11)
    polys = []
    for _ in range(8):
        cx = grid.left + rng.uniform(300, grid.width * grid.res - 300)
        cy = grid.top - rng.uniform(300, grid.height * grid.res - 300)
        ang = np.sort(rng.uniform(0, 2 * np.pi, 9))
        rad = rng.uniform(60, 250, 9)
        star = shapely.Polygon(np.c_[cx + rad * np.cos(ang), cy + rad * np.sin(ang)])
        polys.append(shapely.make_valid(star).buffer(0))
    polys.append(shapely.Point(grid.left + 1290.5, grid.top - 1270.25).buffer(150).difference(
        shapely.Point(grid.left + 1290.5, grid.top - 1270.25).buffer(60)))  # a ring across chunk corners
    polys = [p for p in polys if p.geom_type == "Polygon"]
    got = ndvi_scale.zonal(ds, polys, crs=f"EPSG:{SPEC.epsg}", stats="mean,count,valid_fraction")
    values = ds.ndvi.values
    for k, poly in enumerate(polys):
        xmin, ymin, xmax, ymax = poly.bounds
        c0, c1 = int((xmin - grid.left) // grid.res), int((xmax - grid.left) // grid.res) + 1
        r0, r1 = int((grid.top - ymax) // grid.res), int((grid.top - ymin) // grid.res) + 1
        rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        boxes = shapely.box(grid.left + cc * grid.res, grid.top - (rr + 1) * grid.res,
                            grid.left + (cc + 1) * grid.res, grid.top - rr * grid.res)
        w = shapely.area(shapely.intersection(boxes, poly)) / grid.res**2
        for t in range(ds.sizes["time"]):
            v = values[t, rr, cc].astype(np.float64)
            ok = (w > 0) & ~np.isnan(v)
            row = got[(got.zone == k) & (got.time == ds.time.values[t])].iloc[0]
            assert row["count"] == int(ok.sum())
            assert row["mean"] == pytest.approx(np.sum(w[ok] * v[ok]) / np.sum(w[ok]), abs=1e-9)
            assert row["valid_fraction"] == pytest.approx(np.sum(w[ok]) / (poly.area / grid.res**2), abs=1e-9)


def test_sample_parcels_file_and_constant_covers(ds, tmp_path):
    """The published sample parcels: irregular fields, each polygon holds one land cover (Truth at every 10 m pixel
    centre inside it), and through the file path (GeoJSON in EPSG:4326, id field ``id``) each parcel's zonal mean is
    the truth's composite over it: inset by 15 m, every pixel touching a parcel lies in its field, so the mean
    differs from the plain mean of the truth at the pixel centres inside only by the smooth texture (< 0.01)."""
    from ndvi_scale.analytics.parcels import sample_parcels, write_sample_parcels

    parcels = sample_parcels(SPEC, inset=15.0)
    assert len(parcels) >= 8 and len({p["cover"] for p in parcels}) >= 3
    for p in parcels:
        xmin, ymin, xmax, ymax = p["geometry"].bounds
        gx, gy = np.meshgrid(np.arange(xmin - xmin % 10 + 5, xmax, 10.0), np.arange(ymin - ymin % 10 + 5, ymax, 10.0))
        inside = shapely.contains_xy(p["geometry"], gx, gy)
        assert inside.sum() > 20
        covers = np.unique(Truth.land_cover(SPEC, gx[inside], gy[inside]))
        assert len(covers) == 1 and Truth.land_cover(SPEC, gx[inside][0], gy[inside][0]) == covers[0]
    path = write_sample_parcels(tmp_path / "parcels.geojson", SPEC, inset=15.0)
    got = ndvi_scale.zonal(ds, path, id_field="id", stats="mean,count,valid_fraction")
    assert set(got.zone) == {p["id"] for p in parcels}
    gx, gy = np.meshgrid(ds.x.values, ds.y.values)
    dates = SPEC.dates()
    checked = 0
    for t0, t1 in zip(ds.time.values, ds.time_end.values, strict=True):
        lo, hi = np.datetime64(t0, "D"), np.datetime64(t1, "D")
        period = [d for d in dates if lo <= np.datetime64(d.date(), "D") <= hi]
        expected, _ = Truth.expected_composite(SPEC, gx, gy, period, "median")
        for p in parcels:
            row = got[(got.zone == p["id"]) & (got.time == t0)].iloc[0]
            inside = shapely.contains_xy(p["geometry"], gx, gy)
            if row["valid_fraction"] < 1.0:
                continue
            assert row["mean"] == pytest.approx(float(np.mean(expected[inside])), abs=0.01), (p["id"], t0)
            checked += 1
    assert checked >= len(parcels)
