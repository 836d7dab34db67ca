"""ndvi_scale.sizing: what `ndvi-scale plan` says a run costs, and the size guard that stops a huge run before it
writes anything. Synthetic items without pixels (ndvi_scale.testing.scale) except for the tiny sample run."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys

import pytest
from pyproj import Transformer

import ndvi_scale
from ndvi_scale import pipeline, sizing
from ndvi_scale.config import RunConfig
from ndvi_scale.engine.grid import output_grid
from ndvi_scale.errors import RunTooLargeError
from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.testing.scale import TILE_M, bbox_items, revisit_dates, tile_grid_items, write_items

EUROPE = ("-10", "35", "30", "60")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def _utm_box_lonlat(x0: float, y0: float, x1: float, y1: float, epsg: int = 32631) -> tuple[float, ...]:
    lons, lats = Transformer.from_crs(epsg, 4326, always_xy=True).transform([x0, x1, x0, x1], [y0, y0, y1, y1])
    return min(lons), min(lats), max(lons), max(lats)


@pytest.fixture(scope="module")
def one_tile(tmp_path_factory):
    """One granule (top-left 450 km E, 5500 km N in UTM 31N), seen in January and March, never in February."""
    dates = [d for d in revisit_dates(2024) if d.month in (1, 3)]
    items = list(tile_grid_items(1, dates, origin=(450_000.0, 5_500_000.0)))
    return write_items(items, tmp_path_factory.mktemp("one-tile") / "items.json"), len(items)


def test_plan_json_fields_equal_the_grid_graph_and_tile_rule(one_tile):
    path, n_items = one_tile
    # 12 km x 9 km inside the granule, 2.5 km from its west edge: columns 250.. of the 10 m band
    bbox = _utm_box_lonlat(452_500, 5_480_000, 464_500, 5_489_000)
    args = ["--bbox", *(f"{v:.6f}" for v in bbox), "--start", "2024-01-01", "--end", "2024-03-31",
            "--catalog", str(path), "--chunk", "512"]
    r = cli("plan", *args, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)

    grid = output_grid(bbox, 32631, 10.0)
    h, w = grid.shape
    ny, nx = math.ceil(h / 512), math.ceil(w / 512)
    assert got["crs"] == "EPSG:32631" and got["grid_shape"] == [h, w] and got["chunk"] == 512
    assert got["chunks"] == [ny, nx]
    assert got["items_found"] == got["items_used"] == n_items and got["items_skipped"] == 0
    assert got["periods"] == 3 and got["periods_with_scenes"] == 2
    assert got["regions"] == 3 * ny * nx
    assert got["output_bytes"] == h * w * 3 * (4 + 2)  # float32 ndvi + uint16 count, median
    assert got["output_bytes_compressed"] == int(got["output_bytes"] * sizing.COMPRESSION["zstd"])

    # tasks: the very graph compute builds (composite + layer per region, one sources task per live period)
    cfg = RunConfig.create(bbox=bbox, start="2024-01-01", end="2024-03-31", catalog=str(path), chunk=512)
    ds = pipeline.build(cfg)
    assert got["tasks"] == len(dict(ds.ndvi.data.__dask_graph__())) == 2 * 3 * ny * nx + 2

    # input: whole 1024-px internal tiles of each band's own grid over the output grid, by hand
    minx, miny, maxx, maxy = grid.bounds
    def tiles(res: float) -> float:
        side = TILE_M / res
        c0, c1 = (minx - 450_000) / res, (maxx - 450_000) / res
        r0, r1 = (5_500_000 - maxy) / res, (5_500_000 - miny) / res
        cols = min(math.ceil(c1 / 1024) * 1024, side) - math.floor(c0 / 1024) * 1024
        rows = min(math.ceil(r1 / 1024) * 1024, side) - math.floor(r0 / 1024) * 1024
        return cols * rows
    per_item = tiles(10) * (sizing.BYTES_PER_PIXEL["red"] + sizing.BYTES_PER_PIXEL["nir"])
    per_item += tiles(20) * sizing.BYTES_PER_PIXEL["scl"]
    assert got["input_bytes"] == pytest.approx(n_items * per_item, abs=1)  # int() of the sum
    assert got["px_obs"] == pytest.approx(n_items * h * w, rel=1e-6)  # the granule covers the whole grid
    assert got["cpu_hours"] == pytest.approx(got["px_obs"] / sizing.PX_OBS_PER_CORE_SECOND / 3600)

    assert got["over_limit"] is False
    assert got["warnings"] == ["1 period(s) without scenes (NaN, count 0): 2024-02-01"]
    assert "scenes on" in r.stderr  # the search summary, on stderr

    line = cli("plan", *args)
    assert line.returncode == 0 and line.stdout.startswith("plan: ") and len(line.stdout.splitlines()) == 1
    assert f"grid {h:,} x {w:,} px EPSG:32631" in line.stdout and f"{3 * ny * nx:,} regions" in line.stdout


def test_plan_warns_about_utm_zones_and_reprojected_scenes(tmp_path):
    bbox = (5.5, 46.0, 6.5, 46.5)  # across the 31/32 boundary at 6 E, mostly west: EPSG:32631
    items = list(bbox_items(bbox, revisit_dates(2024)[:3]))
    path = write_items(items, tmp_path / "items.json")
    est = ndvi_scale.plan(bbox, "2024-01-01", "2024-01-31", catalog=str(path))
    east = sum(1 for it in items if it["properties"]["proj:epsg"] == 32632)
    assert est.crs == "EPSG:32631" and 0 < east < len(items)
    assert est.warnings == ("area across UTM zones: scenes in EPSG:32631, EPSG:32632",
                            f"{east:,} scene(s) reprojected to EPSG:32631 (nearest)")


def test_europe_bbox_stops_before_writing_with_the_size_and_the_way_on(tmp_path):
    catalog = write_items(bbox_items(tuple(float(v) for v in EUROPE), revisit_dates(2024)[:1]),  # type: ignore[arg-type]
                          tmp_path / "europe.json")
    out = tmp_path / "out" / "europe.zarr"
    r = cli("compute", "--bbox", *EUROPE, "--start", "2024-01-01", "--end", "2024-12-31", "--catalog", str(catalog),
            "--out", str(out))
    assert r.returncode == RunTooLargeError.exit_code == 12, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) <= 300 and "Traceback" not in r.stderr
    assert "TB of output" in errors[0] and "343,176 regions" in errors[0] and "--yes" in errors[0]
    plan_line = [ln for ln in r.stderr.splitlines() if ln.startswith("plan: ")]
    assert plan_line and r.stderr.index(plan_line[0]) < r.stderr.index(errors[0])  # the summary came first
    assert not out.exists() and not out.parent.exists()  # nothing written, not even a folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["europe.json"]
    # the API raises too, before building anything
    with pytest.raises(RunTooLargeError, match="--yes"):
        ndvi_scale.compute(tuple(float(v) for v in EUROPE), "2024-01-01", "2024-12-31", catalog=str(catalog))


SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 20), end=dt.date(2024, 5, 15))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizing-sample")
    generate(root, SPEC)
    return str(root / "items.json")


def test_guard_needs_allow_large_and_then_writes(sample, tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "MAX_REGIONS", 1)  # the sample's 2 monthly regions are now "too large"
    out = tmp_path / "ndvi.zarr"
    kw = dict(catalog=sample, out=str(out), chunk=64)
    with pytest.raises(RunTooLargeError, match="2 regions"):
        ndvi_scale.compute(SPEC.bbox_lonlat(), "2024-04-20", "2024-05-15", **kw)
    assert not out.exists()
    ds = ndvi_scale.compute(SPEC.bbox_lonlat(), "2024-04-20", "2024-05-15", allow_large=True, **kw)
    assert ds.sizes["time"] == 2 and out.exists()


def test_compute_prints_the_plan_line_before_starting(sample, tmp_path):
    out = tmp_path / "ndvi.zarr"
    bbox = [f"{v:.5f}" for v in SPEC.bbox_lonlat()]
    r = cli("compute", "--bbox", *bbox, "--start", "2024-04-20", "--end", "2024-05-15", "--catalog", sample,
            "--out", str(out), "--chunk", "64")
    assert r.returncode == 0, r.stderr
    plan = cli("plan", "--bbox", *bbox, "--start", "2024-04-20", "--end", "2024-05-15", "--catalog", sample,
               "--out", str(out), "--chunk", "64")
    lines = r.stderr.splitlines()
    assert plan.stdout.strip() in lines  # the very line `plan` prints
    assert lines.index(plan.stdout.strip()) <= 1 and "wrote" in r.stdout


def test_country_size_plans_keep_the_chunk_and_three_tasks_per_chunk_period(tmp_path):
    items = list(tile_grid_items(4, revisit_dates(2024)))  # 4 x 4 granules x 73 dates, no pixels
    first = [it["bbox"] for it in items[:16]]
    bbox = (min(b[0] for b in first), min(b[1] for b in first), max(b[2] for b in first), max(b[3] for b in first))
    path = write_items(items, tmp_path / "items.json")
    est = ndvi_scale.plan(bbox, "2024-01-01", "2024-12-31", catalog=str(path))
    ny, nx = est.chunks
    assert est.items_used == 16 * 73 and est.chunk == 2048 and ny * nx > 400
    assert est.tasks <= 3 * ny * nx * est.periods
    # a single tile, --period year, median: 73 days reach every chunk, and the chunk is still the user's
    inside = _utm_box_lonlat(410_000, 5_405_000, 499_000, 5_495_000)  # granule (row 0, col 1) only
    year = ndvi_scale.plan(inside, "2024-01-01", "2024-12-31", catalog=str(path), period="year", method="median")
    assert year.chunk == 2048 and year.periods == 1 and year.items_used >= 73  # + neighbours whose bbox touches
