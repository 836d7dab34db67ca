"""ndvi_scale.viz: the NDVI colours, PNG quicklooks (real PNGs, right size, right colours), show() on a
written cube with clear errors, and the hvplot views rendered for real (matplotlib and bokeh)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import xarray as xr
from matplotlib.colors import to_hex
from PIL import Image

import ndvi_scale
from ndvi_scale import viz
from ndvi_scale.errors import InputError, OutputError
from ndvi_scale.sample import SampleSpec, generate

SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 20), end=dt.date(2024, 6, 15))
START, END = "2024-04-20", "2024-06-15"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz-sample")
    generate(root, SPEC)
    return str(root / "items.json")


@pytest.fixture(scope="module")
def lazy(catalog):
    """The lazy monthly median cube of the tiny sample (3 months: April, May, June)."""
    return ndvi_scale.compute(bbox=SPEC.bbox_lonlat(), start=START, end=END, catalog=catalog, chunk=64)


@pytest.fixture(scope="module")
def cube(lazy):
    return lazy.load()


@pytest.fixture(scope="module")
def zarr_path(catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("viz-zarr") / "ndvi.zarr"
    ndvi_scale.compute(
        bbox=SPEC.bbox_lonlat(), start=START, end=END, catalog=catalog, chunk=64, out=str(out), method="max"
    )
    return out


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)


def _read_png(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"), dtype=float)


# ------------------------------------------------------------------------------------------------- colours


def test_palette_is_brown_yellow_green_with_distinct_water():
    pal = viz.ndvi_palette()
    assert len(pal) == viz.NDVI_NCOLORS and all(c.startswith("#") and len(c) == 7 for c in pal)
    lo, hi = viz.NDVI_RANGE
    assert (lo, hi) == (-0.2, 0.9)

    def at(v):
        return _rgb(pal[int((v - lo) / (hi - lo) * len(pal))])

    r, g, b = at(0.85)
    assert g > r + 40 and g > b + 40  # dense vegetation: green
    r, g, b = at(0.7)
    assert g > r and g > b
    r, g, b = at(0.1)
    assert r > g > b and r - b > 60  # bare soil: brown
    r, g, b = at(0.4)
    assert r > 200 and g > 200 and b < 150  # sparse vegetation: yellow
    r, g, b = at(-0.1)
    assert b > r + 40  # negative: blue, never brown
    # the break at 0 is sharp: the last negative step is blue, the first positive one brown
    step = (hi - lo) / len(pal)
    assert _rgb(pal[int(-lo / step) - 1])[2] > _rgb(pal[int(-lo / step) - 1])[0]
    assert _rgb(pal[int(-lo / step)])[0] > _rgb(pal[int(-lo / step)])[2]


def test_matplotlib_colormap_under_over_and_nan():
    cmap = viz.ndvi_cmap()
    assert to_hex(cmap.get_under()) == viz.WATER_COLOR
    assert to_hex(cmap.get_bad()) == viz.NODATA_COLOR
    assert cmap.get_bad()[3] == 1.0
    assert viz.ndvi_cmap(nan_color=None).get_bad()[3] == 0.0  # transparent
    assert to_hex(cmap.get_over()) == viz.NDVI_STOPS[-1][1]


def test_period_labels_and_selection(cube):
    arr = cube.ndvi
    assert [
        viz.period_label(t0, t1) for t0, t1 in zip(cube.time.values, cube.time_end.values, strict=True)
    ] == ["2024-04", "2024-05", "2024-06"]
    assert viz.period_label("2024-01-01", "2024-12-31") == "2024"
    assert viz.period_label("2024-05-11", "2024-05-20") == "2024-05-11..05-20"
    assert viz.period_label("2024-05-11", "2024-05-11") == "2024-05-11"
    assert viz.select_periods(arr) == [0, 1, 2]
    assert viz.select_periods(arr, "all") == [0, 1, 2]
    assert viz.select_periods(arr, -1) == [2]
    assert viz.select_periods(arr, "1") == [1]
    assert viz.select_periods(arr, "last") == [2]
    assert viz.select_periods(arr, "2024-05-31") == [1]
    assert viz.select_periods(arr, dt.date(2024, 6, 1)) == [2]
    assert viz.select_periods(arr, np.datetime64("2024-04-30T23:00")) == [0]
    assert viz.select_periods(arr, ["2024-06-02", 0]) == [2, 0]
    with pytest.raises(
        InputError, match=r"time index 3 is out of range; the cube has 3 period\(s\) \(2024-04"
    ):
        viz.select_periods(arr, 3)
    with pytest.raises(InputError, match="is in no period of the cube"):
        viz.select_periods(arr, "2023-12-31")
    with pytest.raises(InputError, match="is not a period index, 'last' or a date"):
        viz.select_periods(arr, "yesterday")


# ----------------------------------------------------------------------------------------------- quicklook


@pytest.mark.parametrize(("width", "dpi"), [(800, 100), (437, 150), (1500, 72)])
def test_quicklook_png_size_matches_the_request(cube, tmp_path, width, dpi):
    png = tmp_path / "q.png"
    size = viz.quicklook_png(cube, png, width=width, dpi=dpi)
    img = _read_png(png)
    assert size == (width, img.shape[0]) and img.shape[1] == width
    with Image.open(png) as im:
        assert im.size == size
    # text scales with dpi: at the same width a higher dpi makes a taller image (bigger titles and colour bar)
    if dpi == 150:
        assert viz.quicklook_png(cube, tmp_path / "lo.png", width=width, dpi=75)[1] < size[1]


def test_quicklook_colours_follow_the_ndvi(cube, tmp_path):
    """Map colours, decoded back to NDVI through the palette, have the distribution of the data."""
    png = tmp_path / "june.png"
    viz.quicklook_png(cube, png, time=-1, width=900, dpi=100)
    img = _read_png(png).reshape(-1, 3)
    pal = np.stack([_rgb(c) for c in viz.ndvi_palette()])
    lo, hi = viz.NDVI_RANGE
    centres = lo + (np.arange(len(pal)) + 0.5) * (hi - lo) / len(pal)
    colours, inverse = np.unique(img, axis=0, return_inverse=True)
    dist = np.linalg.norm(colours[:, None, :] - pal[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)[inverse.ravel()]
    on_palette = dist.min(axis=1)[inverse.ravel()] < 3  # map pixels (and the thin colour bar), not text
    decoded = centres[nearest[on_palette]]
    water = np.linalg.norm(img - _rgb(viz.WATER_COLOR), axis=1) < 3
    nodata = np.linalg.norm(img - _rgb(viz.NODATA_COLOR), axis=1) < 3

    v = cube.ndvi.isel(time=-1).values
    finite = v[np.isfinite(v)]
    data_share = {
        "green (> 0.5)": np.mean(finite > 0.5),
        "brown (0 .. 0.3)": np.mean((finite >= 0) & (finite < 0.3)),
    }
    n_map = on_palette.sum() + water.sum()
    png_share = {
        "green (> 0.5)": np.sum(decoded > 0.5) / n_map,
        "brown (0 .. 0.3)": np.sum((decoded >= 0) & (decoded < 0.3)) / n_map,
    }
    for key, share in data_share.items():
        assert png_share[key] == pytest.approx(share, abs=0.04), (key, png_share, data_share)
    assert water.sum() / n_map == pytest.approx(np.mean(finite < lo), abs=0.04)
    assert np.isnan(v).any() and nodata.sum() > 0  # no-data pixels are grey, not a palette colour

    # decoded colours agree with the data: high-NDVI pixels are green-dominant, low ones brownish
    rgb = img[on_palette]
    green, brown = decoded > 0.6, (decoded > 0.02) & (decoded < 0.25)
    assert green.sum() > 1000 and brown.sum() > 1000
    assert np.all(rgb[green, 1] > rgb[green, 0]) and np.all(rgb[green, 1] > rgb[green, 2])
    assert np.all(rgb[brown, 0] > rgb[brown, 1]) and np.all(rgb[brown, 1] > rgb[brown, 2])


def test_quicklook_places_high_and_low_ndvi_where_they_are(tmp_path):
    """West half 0.85, east half 0.1: green on the left of the map, brown on the right, north up."""
    y = 5_000_000.0 - 10 * (np.arange(60) + 0.5)
    x = 400_000.0 + 10 * (np.arange(120) + 0.5)
    v = np.where(x[None, :] < 400_600, 0.85, 0.1) * np.ones((60, 1))
    v[:10] = np.nan  # northern strip without data
    da = xr.DataArray(
        v[None].astype(np.float32),
        dims=("time", "y", "x"),
        coords={"time": [np.datetime64("2024-05-01")], "y": y, "x": x},
        name="ndvi",
    )
    png = tmp_path / "halves.png"
    w, h = viz.quicklook_png(da, png, width=600, dpi=100, title="halves")
    img = _read_png(png)
    green = np.linalg.norm(img - _rgb(viz.ndvi_palette()[int((0.85 + 0.2) / 1.1 * 220)]), axis=2) < 3
    brown = np.linalg.norm(img - _rgb(viz.ndvi_palette()[int((0.1 + 0.2) / 1.1 * 220)]), axis=2) < 3
    grey = np.linalg.norm(img - _rgb(viz.NODATA_COLOR), axis=2) < 3
    gy, gx = np.nonzero(green)
    by, bx = np.nonzero(brown)
    ny, _ = np.nonzero(grey)
    assert green.sum() > 20000 and brown.sum() > 20000
    assert np.median(gx) < w / 2 < np.median(bx)
    assert np.median(ny) < np.median(gy)  # the no-data strip is on top (north up)


def test_quicklook_of_a_lazy_cube_and_of_one_period(lazy, tmp_path):
    png = tmp_path / "may.png"
    w, h = viz.quicklook_png(lazy, png, time="2024-05-15", width=500)
    assert (w, h) == Image.open(png).size and w == 500
    # one period is one panel: a single panel at the same width is taller than a 3-panel grid row
    w3, h3 = viz.quicklook_png(lazy, tmp_path / "all.png", width=500)
    assert h3 != h


def test_quicklook_refuses_bad_paths_and_sizes(cube, tmp_path):
    with pytest.raises(InputError, match="does not end in .png"):
        viz.quicklook_png(cube, tmp_path / "q.jpg")
    with pytest.raises(OutputError, match="folder .* does not exist"):
        viz.quicklook_png(cube, tmp_path / "missing" / "q.png")
    with pytest.raises(OutputError, match="it is a folder"):
        (tmp_path / "dir.png").mkdir()
        viz.quicklook_png(cube, tmp_path / "dir.png")
    with pytest.raises(InputError, match="width 10 px is out of range"):
        viz.quicklook_png(cube, tmp_path / "q.png", width=10)
    with pytest.raises(InputError, match="no 'ndvi' variable"):
        viz.quicklook_png(cube[["valid_count"]], tmp_path / "q.png")
    assert not list(tmp_path.glob("*.png"))[1:]  # nothing half-written left behind (dir.png only)


# ------------------------------------------------------------------------------------------------------ show


def test_show_writes_the_quicklook_of_a_written_cube(zarr_path, tmp_path):
    png = tmp_path / "show.png"
    msg = viz.show(str(zarr_path), str(png))
    w, h = Image.open(png).size
    dates = tmp_path / "show-max_date.png"  # a max cube: the day of the maximum beside the NDVI
    # the first and last periods are labelled with the requested dates (2024-04-20 .. 2024-06-15)
    assert msg.startswith(
        f"wrote {png}, {dates} ({w}x{h} px): NDVI 3 periods 2024-04-20..04-30 .. 2024-06-01..06-15 of "
    )
    assert w == viz.DEFAULT_WIDTH
    _read_png(png)
    _read_png(dates)
    msg = viz.show(zarr_path, png, time="last", width=400, dpi=80)
    assert "NDVI 2024-06-01..06-15 of" in msg and Image.open(png).size[0] == 400


def test_show_reads_a_cube_on_s3(catalog, s3_bucket, tmp_path):
    """Credentials and endpoint come from the environment (AWS_*), as for writing."""
    url = f"s3://{s3_bucket}/viz/ndvi.zarr"
    ndvi_scale.compute(
        bbox=SPEC.bbox_lonlat(), start="2024-05-01", end="2024-06-15", catalog=catalog, chunk=64, out=url
    )
    png = tmp_path / "s3.png"
    msg = viz.show(url, png, width=500)
    height = Image.open(png).size[1]
    assert msg == f"wrote {png} (500x{height} px): NDVI 2 periods 2024-05 .. 2024-06-01..06-15 of {url}"
    with pytest.raises(InputError, match=rf"zarr store s3://{s3_bucket}/viz/other.zarr does not exist"):
        viz.show(f"s3://{s3_bucket}/viz/other.zarr", png)


def test_show_errors_are_clear(zarr_path, tmp_path):
    png = tmp_path / "x.png"
    with pytest.raises(InputError, match=r"zarr store .*nope\.zarr does not exist; give the --out"):
        viz.show(tmp_path / "nope.zarr", png)
    other = tmp_path / "other.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(other, consolidated=False)
    with pytest.raises(
        InputError, match=r"is a Zarr store but not an ndvi-scale cube: it has no 'ndvi' variable \(a\)"
    ):
        viz.show(other, png)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="is a file, not a Zarr store"):
        viz.show(tmp_path / "notes.txt", png)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="is not a Zarr store"):
        viz.show(tmp_path / "folder", png)
    with pytest.raises(
        InputError, match=r"time '2023-01-05' is in no period of the cube \(2024-04, 2024-05, 2024-06\)"
    ):
        viz.show(zarr_path, png, time="2023-01-05")
    with pytest.raises(InputError, match="time index -4 is out of range"):
        viz.show(zarr_path, png, time="-4")
    with pytest.raises(OutputError, match="does not exist; create it first"):
        viz.show(zarr_path, tmp_path / "no" / "x.png")
    with pytest.raises(InputError, match="scheme 'ftp://' is not supported"):
        viz.show("ftp://host/cube.zarr", png)
    assert not png.exists()


# ----------------------------------------------------------------------------------------------- hvplot views


@pytest.fixture
def matplotlib_backend():
    import holoviews as hv
    import hvplot

    before = hv.Store.current_backend
    hvplot.extension("matplotlib")
    yield hv
    hv.Store.set_current_backend(before)


def test_ndvi_map_renders_with_a_time_slider(cube, lazy, matplotlib_backend, tmp_path):
    hv = matplotlib_backend
    m = viz.ndvi_map(lazy)
    assert isinstance(m, hv.DynamicMap) and m.kdims[0].name == "time"
    frame = m[cube.time.values[1]]
    assert isinstance(frame, hv.Image)
    np.testing.assert_allclose(frame.dimension_values(2, flat=False)[::-1], cube.ndvi.isel(time=1).values)
    assert hv.Store.current_backend == "matplotlib"  # ndvi_map kept the user's backend
    fig = hv.render(m, backend="matplotlib")
    image = fig.axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == viz.NDVI_RANGE
    assert (
        to_hex(image.cmap.get_under()) == viz.WATER_COLOR and image.cmap.get_bad()[3] == 0
    )  # NaN transparent
    for where, expected in ((0.0, viz.ndvi_palette()[0]), (1.0, viz.ndvi_palette()[-1])):
        assert np.abs(np.array(image.cmap(where)[:3]) * 255 - _rgb(expected)).max() < 8
    fig.savefig(tmp_path / "map.png")
    _read_png(tmp_path / "map.png")
    one = viz.ndvi_map(cube, time="2024-06-10", max_pixels=50)
    assert (
        isinstance(one, hv.Image) and one.label == "" and max(one.dimension_values(2, flat=False).shape) <= 50
    )
    import hvplot

    hvplot.save(one, tmp_path / "one.png")
    assert _read_png(tmp_path / "one.png").shape[1] > 100


def test_ndvi_timeseries_renders_with_counts(cube, matplotlib_backend, tmp_path):
    hv = matplotlib_backend
    import hvplot

    w, s, e, n = SPEC.bbox_lonlat()
    lon, lat = (w + e) / 2, (s + n) / 2
    frame = viz.point_series(cube, lon=lon, lat=lat)
    assert list(frame.columns) == ["time", "time_end", "period", "ndvi", "valid_count", "x", "y"]
    px, py = frame["x"].iloc[0], frame["y"].iloc[0]
    at = cube.sel(x=px, y=py)
    np.testing.assert_allclose(frame["ndvi"], at.ndvi.values)
    np.testing.assert_array_equal(frame["valid_count"], at.valid_count.values)
    assert viz.point_series(cube, px + 3, py - 3)[["x", "y"]].iloc[0].tolist() == [px, py]

    plot = viz.ndvi_timeseries(cube, lon=lon, lat=lat)
    assert isinstance(plot, hv.Overlay)
    points = plot.get(1)
    assert isinstance(points, hv.Scatter) and "valid_count" in [d.name for d in points.vdims]
    hvplot.save(plot, tmp_path / "ts.png")
    _read_png(tmp_path / "ts.png")
    # bokeh builds too (what notebooks show)
    import bokeh.models

    fig = hv.render(viz.ndvi_timeseries(cube, x=px, y=py), backend="bokeh")
    assert isinstance(fig, bokeh.models.Plot)

    with pytest.raises(InputError, match="is outside the cube"):
        viz.point_series(cube, lon=10.0, lat=45.0)
    with pytest.raises(InputError, match="not both"):
        viz.point_series(cube, x=px, y=py, lon=lon, lat=lat)


def test_an_empty_period_is_grey_and_a_gap(cube, matplotlib_backend, tmp_path):
    hv = matplotlib_backend
    holey = cube.copy()
    holey["ndvi"] = cube.ndvi.where(cube.time != cube.time[1])
    holey["valid_count"] = cube.valid_count.where(cube.time != cube.time[1], 0)
    png = tmp_path / "holey.png"
    viz.quicklook_png(holey, png, time=1, width=400)
    img = _read_png(png)
    grey = np.linalg.norm(img - _rgb(viz.NODATA_COLOR), axis=2) < 3
    assert grey.mean() > 0.3  # the whole panel is "no data"
    w, s, e, n = SPEC.bbox_lonlat()
    plot = viz.ndvi_timeseries(holey, lon=(w + e) / 2, lat=(s + n) / 2)
    crosses = plot.get(2)
    assert isinstance(crosses, hv.Scatter) and crosses.label == "no clear observation"
    assert len(crosses) == 1 and len(plot.get(1)) == 2
    assert viz.select_periods(holey.ndvi, "last") == [2]
    assert viz.select_periods(holey.ndvi.isel(time=[0, 1]), "last") == [0]


def test_bokeh_map_builds(lazy):
    import holoviews as hv
    import hvplot.xarray  # noqa: F401

    fig = hv.render(viz.ndvi_map(lazy), backend="bokeh")
    mapper = fig.select_one(
        {"type": __import__("bokeh.models", fromlist=["LinearColorMapper"]).LinearColorMapper}
    )
    assert (mapper.low, mapper.high) == viz.NDVI_RANGE
    assert len(mapper.palette) == viz.NDVI_NCOLORS


# --------------------------------------------------------------------- pages, labels, dates, modes, axes


def test_pictures_get_the_umask_permissions(zarr_path, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        viz.show(zarr_path, tmp_path / "a.png", time=0, html=tmp_path / "a.html")
        os.umask(0o027)
        viz.show(zarr_path, tmp_path / "b.png", time=0)
    finally:
        os.umask(old)
    for name, mode in (("a.png", 0o644), ("a-max_date.png", 0o644), ("a.html", 0o644), ("b.png", 0o640)):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_many_periods_go_to_pages_with_labels_inside_the_requested_dates(catalog, tmp_path):
    out = tmp_path / "weekly.zarr"
    ndvi_scale.compute(bbox=SPEC.bbox_lonlat(), start=START, end=END, catalog=catalog, chunk=64, out=str(out),
                       period="week")
    ds = viz.open_cube(out)
    n = ds.sizes["time"]
    assert n == 9 and str(ds.time_end.values[-1])[:10] == "2024-06-16"  # the last week runs past END
    msg = viz.show(out, tmp_path / "w.png", per_page=4)
    pages = [tmp_path / "w.png", tmp_path / "w-2.png", tmp_path / "w-3.png"]
    assert msg.startswith(f"wrote {', '.join(map(str, pages))} (")
    assert "9 periods 2024-04-20..04-21 .. 2024-06-10..06-15 of" in msg
    heights = [Image.open(p).size[1] for p in pages]
    assert heights[0] == heights[1] > heights[2]  # 4 + 4 + 1 panels
    assert not (tmp_path / "w-4.png").exists()
    with pytest.raises(InputError, match="nothing to write"):
        viz.show(out)


def test_max_date_picture_is_the_day_of_the_maximum(zarr_path):
    ds = viz.open_cube(zarr_path)
    days = viz._day_of_period(ds["max_date"].isel(time=[1]), 1)[0]
    ndvi = ds["ndvi"].isel(time=1).values
    expected = (ds["max_date"].isel(time=1).values.astype("datetime64[D]")
                - ds["time"].values[1].astype("datetime64[D]")).astype(float) + 1
    ok = np.isfinite(ndvi)
    assert ok.any() and np.array_equal(np.isnan(days), ~ok)
    np.testing.assert_array_equal(days[ok], expected[ok])
    assert days[ok].min() >= 1 and days[ok].max() <= 31


def test_scale_bar_length_is_a_round_share_of_the_panel():
    assert viz._nice_length(3900.0) == 2000.0
    assert viz._nice_length(740.0) == 500.0
    assert viz._nice_length(100.0) == 100.0


def test_compute_quicklook_of_a_max_cube_shows_the_date_too(catalog, tmp_path):
    import subprocess
    import sys

    out, png = tmp_path / "m.zarr", tmp_path / "q.png"
    bbox = [f"{v:.5f}" for v in SPEC.bbox_lonlat()]
    r = subprocess.run([sys.executable, "-m", "ndvi_scale", "compute", "--bbox", *bbox, "--start", "2024-05-01",
                        "--end", "2024-05-31", "--catalog", catalog, "--out", str(out), "--method", "max",
                        "--chunk", "64", "--quicklook", str(png)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    dates = tmp_path / "q-max_date.png"
    assert f"wrote {png}, {dates} (" in r.stdout
    _read_png(png)
    _read_png(dates)
