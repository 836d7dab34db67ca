"""ndvi_scale.series / ``ndvi-scale series``: the values are the cube's own pixels (the pixel containing each
lon/lat point), window means equal a numpy computation, points outside fail with one line naming them; the same
on a cube in s3:// (SeaweedFS) and gs:// (GCS emulator), both on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from pyproj import Transformer

import ndvi_scale
from analytics_cube import SPEC, cube_path
from ndvi_scale.analytics.grid import cube_grid
from ndvi_scale.errors import InputError

TO_LL = Transformer.from_crs(SPEC.epsg, 4326, always_xy=True)


@pytest.fixture(scope="module")
def cube(tmp_path_factory) -> str:
    return cube_path(tmp_path_factory)


@pytest.fixture(scope="module")
def ds(cube) -> xr.Dataset:
    return xr.open_zarr(cube, decode_coords="all", consolidated=False)


def _points(ds: xr.Dataset, n: int = 40, seed: int = 3) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """Random pixels, each with a point placed anywhere inside it (0.05 px from the edges), in lon/lat."""
    grid = cube_grid(ds)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, grid.height, n)
    cols = rng.integers(0, grid.width, n)
    fx, fy = rng.uniform(0.05, 0.95, n), rng.uniform(0.05, 0.95, n)
    x = grid.left + (cols + fx) * grid.res
    y = grid.top - (rows + fy) * grid.res
    lon, lat = TO_LL.transform(x, y)
    return rows, cols, list(zip(lon, lat, strict=True))


def test_values_equal_the_cube_pixels(ds):
    rows, cols, pts = _points(ds)
    got = ndvi_scale.series(ds, pts)
    nd, vc = ds.ndvi.values, ds.valid_count.values
    assert len(got) == len(pts) * ds.sizes["time"]
    for k in range(len(pts)):
        one = got[got.point == f"p{k}"]
        assert list(one.time) == list(pd.DatetimeIndex(ds.time.values))
        np.testing.assert_array_equal(one.ndvi.to_numpy(), nd[:, rows[k], cols[k]].astype(np.float64))
        np.testing.assert_array_equal(one.valid_count.to_numpy(), vc[:, rows[k], cols[k]])
        assert (one.row == rows[k]).all() and (one.col == cols[k]).all()


def test_window_mean(ds):
    rows, cols, pts = _points(ds, n=15, seed=5)
    pts.append(TO_LL.transform(cube_grid(ds).left + 1.0, cube_grid(ds).top - 1.0))  # corner pixel: window clipped
    rows, cols = np.r_[rows, 0], np.r_[cols, 0]
    got = ndvi_scale.series(ds, pts, window=5)
    nd = ds.ndvi.values.astype(np.float64)
    for k in range(len(pts)):
        one = got[got.point == f"p{k}"]
        block = nd[:, max(rows[k] - 2, 0) : rows[k] + 3, max(cols[k] - 2, 0) : cols[k] + 3]
        n = np.sum(~np.isnan(block), axis=(1, 2))
        with np.errstate(all="ignore"):
            want = np.nansum(block, axis=(1, 2)) / n
        np.testing.assert_allclose(one.ndvi.to_numpy(), np.where(n > 0, want, np.nan), rtol=1e-12)
        np.testing.assert_array_equal(one.window_pixels.to_numpy(), n)
    with pytest.raises(InputError, match="odd"):
        ndvi_scale.series(ds, pts, window=2)


def test_points_outside_are_named(ds, cube):
    _, _, pts = _points(ds, n=2)
    with pytest.raises(InputError, match=r"points outside the cube: p1 \(2\.500000,45\.000000\)"):
        ndvi_scale.series(ds, [pts[0], (2.5, 45.0)])
    p = subprocess.run([sys.executable, "-m", "ndvi_scale", "series", cube, "--points", "2.5,45", "--out", "x.csv"],
                       capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "p0 (2.500000,45.000000)" in lines[0], p.stderr
    bad = subprocess.run([sys.executable, "-m", "ndvi_scale", "series", cube, "--points", "east,north", "--out",
                          "x.csv"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "'east,north'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cli_points_file(ds, cube, tmp_path):
    rows, cols, pts = _points(ds, n=6, seed=11)
    csv = tmp_path / "pts.csv"
    pd.DataFrame({"id": [f"field-{k}" for k in range(6)], "lon": [p[0] for p in pts],
                  "lat": [p[1] for p in pts]}).to_csv(csv, index=False)
    out = tmp_path / "series.parquet"
    p = subprocess.run([sys.executable, "-m", "ndvi_scale", "series", cube, "--points", str(csv), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = pd.read_parquet(out)
    nd = ds.ndvi.values
    for k in range(6):
        one = got[got.point == f"field-{k}"]
        np.testing.assert_array_equal(one.ndvi.to_numpy(), nd[:, rows[k], cols[k]].astype(np.float64))


@pytest.fixture
def remote_cube(request, cube) -> str:
    """The test cube copied into a fresh bucket of a real S3 (SeaweedFS) or GCS (emulator) server."""
    if request.param == "s3":
        import s3fs

        from servers import S3_ACCESS_KEY, S3_SECRET_KEY

        env, bucket = request.getfixturevalue("s3_env"), request.getfixturevalue("s3_bucket")
        fs = s3fs.S3FileSystem(key=S3_ACCESS_KEY, secret=S3_SECRET_KEY, endpoint_url=env.endpoint,
                               skip_instance_cache=True)
    else:
        import gcsfs

        env, bucket = request.getfixturevalue("gcs_env"), request.getfixturevalue("gcs_bucket")
        fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=env.endpoint, skip_instance_cache=True)
    fs.put(cube, f"{bucket}/c/cube.zarr", recursive=True)
    return f"{request.param}://{bucket}/c/cube.zarr"


@pytest.mark.parametrize("remote_cube", ["s3", "gs"], indirect=True)
def test_series_and_zonal_on_object_storage(ds, remote_cube):
    import shapely

    rows, cols, pts = _points(ds, n=5, seed=13)
    got = ndvi_scale.series(remote_cube, pts)
    for k in range(5):
        np.testing.assert_array_equal(got[got.point == f"p{k}"].ndvi.to_numpy(),
                                      ds.ndvi.values[:, rows[k], cols[k]].astype(np.float64))
    poly = shapely.Point(TO_LL.transform(SPEC.x0 + 1300, SPEC.y0 - 900)).buffer(0.003)
    remote = ndvi_scale.zonal(remote_cube, [poly], stats="mean,count,valid_fraction")
    local = ndvi_scale.zonal(ds, [poly], stats="mean,count,valid_fraction")
    pd.testing.assert_frame_equal(remote, local)
