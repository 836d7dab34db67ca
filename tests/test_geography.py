"""Areas across UTM zones, and the antimeridian: the output CRS policy of :func:`ndvi_scale.load.choose_epsg`.

A synthetic catalog with granules in UTM 30N and 31N on both sides of the 0 degree meridian
(:func:`ndvi_scale.sample.straddling_specs`) is composited over a bbox straddling the zone boundary. The truth of
every output pixel is evaluated by transforming its centre into each granule's own CRS (each zone has its own
analytic truth): a perfect nearest-neighbour warp takes, from each granule, the source pixel that contains that
point. GDAL approximates the transformation (error up to 1/8 source pixel), so pixels whose source pixel is
ambiguous, within 3 m of a parcel, cloud or footprint edge in the granule that decides them, are checked with
bounds only; all others must match exactly (valid_count) or within 0.01 (NDVI).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pyproj import Transformer

from ndvi_scale.config import DEFAULT_MASK_CLASSES, BBox, RunConfig
from ndvi_scale.errors import InputError
from ndvi_scale.load import auto_epsg, choose_epsg, utm_epsg, utm_zone_shares
from ndvi_scale.pipeline import build, make_plan
from ndvi_scale.sample import SampleSpec, Truth, generate_zones, straddling_specs

# A perfect SCL and no mask filters: these tests check reprojection against the truth's clear flags point by point;
# the SCL's errors and the filters are measured in tests/test_pipeline.py and tests/engine.
WEST, EAST = straddling_specs(
    size=128, blocksize=128, start=dt.date(2024, 4, 1), end=dt.date(2024, 5, 10), scl_errors=False
)
SPECS = (WEST, EAST)
START, END = "2024-04-01", "2024-05-10"
#: Straddles 0 degrees: about 1/3 in zone 30 (reprojected when the output is in 31), 2/3 in zone 31.
BBOX = (-0.015, 48.3395, 0.0285, 48.3495)
#: How far (metres, in the granule's CRS) GDAL's nearest neighbour may land from the exact point: 0.3 of a 10 m
#: pixel, more than the warper's 1/8-pixel approximation.
DELTA = 3.0

PC_ZONES_58_60 = (
    Path(__file__).parent / "data" / "stac" / "planetary-computer" / "search_2019-01-01_33items_zones58-60.json"
)


@pytest.fixture(scope="module")
def zones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two-zones")
    generate_zones(root, SPECS)
    return root / "items.json"


def _cfg(catalog: Path | str, **kw: Any) -> RunConfig:
    base: dict[str, Any] = dict(bbox=BBOX, start=START, end=END, catalog=str(catalog), chunk=64, mask_filters=())
    base.update(kw)
    return RunConfig.create(**base)


_RUNS: dict[tuple[str, int], xr.Dataset] = {}


def _run(zones: Path, crs: str, chunk: int) -> xr.Dataset:
    """The computed composite (memoised: several tests look at the same run)."""
    key = (crs, chunk)
    if key not in _RUNS:
        _RUNS[key] = build(_cfg(zones, crs=crs, chunk=chunk)).compute()
    return _RUNS[key]


def _truth(ds: xr.Dataset, mask_classes: tuple[int, ...] = DEFAULT_MASK_CLASSES) -> dict[str, np.ndarray]:
    """Per period: expected median and count, which pixels are unambiguous, bounds for the others.

    The same-day mosaic takes the first clear granule in item order (ids sort by tile name: 30UXQ, 30UYQ, 31UBQ,
    31UCQ). For each granule and date the point is evaluated at the exact position and 3 m around it: a granule is
    *stable* there when all five agree on clear/not clear (and, if clear, on the NDVI of the source pixel holding
    them, within 0.005: one field). A pixel-date is
    unambiguous when the first granule that is not stably unclear is stable.
    """
    epsg = ds.rio.crs.to_epsg()
    X, Y = np.meshgrid(ds.x.values, ds.y.values)
    offsets = [(0.0, 0.0), (DELTA, 0.0), (-DELTA, 0.0), (0.0, DELTA), (0.0, -DELTA)]
    points = {}
    for spec in SPECS:
        xs, ys = Transformer.from_crs(epsg, spec.epsg, always_xy=True).transform(X, Y)
        # the source pixel holding each point: its value is the truth at that pixel's centre (both granules of a
        # spec share one 10 m lattice anchored at the spec's origin)
        points[spec.epsg] = [
            Truth.at(spec, spec.x0 + 10.0 * (np.floor((xs + dx - spec.x0) / 10.0) + 0.5),
                     spec.y0 - 10.0 * (np.floor((spec.y0 - ys - dy) / 10.0) + 0.5))
            for dx, dy in offsets
        ]
    granules = sorted(((s, g) for s in SPECS for g in s.granules()), key=lambda sg: sg[1].name)
    dates = WEST.dates()
    assert dates == EAST.dates()
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("value", "count", "interior", "zone", "certain", "possible")}
    for t0, t1 in zip(ds.time.values, ds.time_end.values, strict=True):
        lo, hi = np.datetime64(t0, "D"), np.datetime64(t1, "D")
        period = [d for d in dates if lo <= np.datetime64(d.date(), "D") <= hi]
        stack = np.full((len(period), *X.shape), np.nan)
        interior = np.ones(X.shape, dtype=bool)
        zone = np.zeros(X.shape, dtype=np.int64)  # bit 1: a value from zone 30, bit 2: from zone 31
        certain = np.zeros(X.shape, dtype=np.int64)  # dates with a granule clear all around the point
        possible = np.zeros(X.shape, dtype=np.int64)  # dates with a granule clear somewhere around it
        for k, d in enumerate(period):
            decided = np.zeros(X.shape, dtype=bool)
            any_certain = np.zeros(X.shape, dtype=bool)
            any_possible = np.zeros(X.shape, dtype=bool)
            for spec, g in granules:
                pts = points[spec.epsg]
                clear = np.stack([~np.isin(p.scl(d, g), mask_classes) for p in pts])
                ndvi = np.stack([p.ndvi(d) for p in pts])
                all_clear, some_clear = clear.all(axis=0), clear.any(axis=0)
                same = (np.abs(ndvi - ndvi[0]) < 0.005).all(axis=0)  # one field: pixels differ by the texture only
                stable = (all_clear | ~some_clear) & (~all_clear | same)
                any_certain |= all_clear
                any_possible |= some_clear
                todo = ~decided
                interior &= ~(todo & ~stable)
                win = todo & stable & all_clear
                stack[k][win] = ndvi[0][win]
                zone[win] |= 1 if spec is WEST else 2
                decided |= (todo & ~stable) | win
            certain += any_certain
            possible += any_possible
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: no observation
            out["value"].append(np.nanmedian(stack, axis=0))
        out["count"].append(np.sum(~np.isnan(stack), axis=0))
        out["interior"].append(interior)
        out["zone"].append(zone)
        out["certain"].append(certain)
        out["possible"].append(possible)
    return {k: np.stack(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------- the policy


def test_bbox_straddles_the_boundary_and_items_come_from_both_zones(zones: Path) -> None:
    shares = utm_zone_shares(BBox(*BBOX))
    assert set(shares) == {30, 31} and 0.3 < shares[30] < 0.4
    plan = make_plan(_cfg(zones))
    assert plan.epsg == 32631  # the zone covering most of the bbox
    assert {it.epsg for it in plan.search.items} == {32630, 32631}
    assert sum(it.epsg == 32630 for it in plan.search.items) == sum(it.epsg == 32631 for it in plan.search.items)


def _items(epsg: int, n: int) -> list[Any]:
    return [SimpleNamespace(epsg=epsg, id=f"{epsg}-{i}") for i in range(n)]


@pytest.mark.parametrize(
    ("bbox", "epsg"),
    [
        ((-0.3, 48.0, 0.7, 49.0), 32631),  # 70 % in zone 31
        ((-0.7, 48.0, 0.3, 49.0), 32630),
        ((-1.0, 48.0, 1.0, 49.0), 32630),  # exact tie: the western zone
        ((5.0, 48.0, 7.0, 49.0), 32631),  # exact tie at 6E
        ((-0.1, 48.0, 0.1, 49.0), 32630),  # exact tie, small
        ((1.706, 48.307, 1.878, 48.382), 32631),  # the default sample
        ((10.0, -1.0, 11.0, 0.5), 32732),  # mostly south of the equator
        ((10.0, -1.0, 11.0, 1.0), 32632),  # hemisphere tie: north
        ((10.0, 0.0, 11.0, 1.0), 32632),
        ((179.0, 60.0, 180.0, 61.0), 32660),  # touching the antimeridian: zone 60, not "61"
        ((-180.0, -61.0, -179.0, -60.0), 32701),  # touching it from the west: zone 1, south
        ((173.0, 57.0, 180.0, 58.0), 32660),
        ((-2.0, 48.0, 13.0, 49.0), 32631),  # three zones: 30 (2 deg), 31 (6), 32 (6 + tie -> 31 is west)
    ],
)
def test_auto_crs_is_the_zone_with_most_of_the_bbox(bbox: tuple[float, ...], epsg: int) -> None:
    b = BBox(*bbox)
    assert auto_epsg(b) == epsg
    # the items are not consulted: a search returning mostly scenes of another zone changes nothing
    other = 32600 + (epsg % 100) % 60 + 1
    assert choose_epsg(_items(other, 50) + _items(epsg, 1), b) == epsg
    assert choose_epsg([], b) == epsg


def test_forced_crs_wins_over_the_policy() -> None:
    b = BBox(-0.3, 48.0, 0.7, 49.0)
    assert choose_epsg(_items(32631, 5), b, "EPSG:32630") == 32630
    with pytest.raises(InputError, match="crs 'EPSG:4326' is geographic"):
        RunConfig.create(bbox=b, start=START, end=END, crs="EPSG:4326")
    with pytest.raises(InputError, match="crs 'EPSG:99999' is not a known EPSG code"):
        RunConfig.create(bbox=b, start=START, end=END, crs="EPSG:99999")
    with pytest.raises(InputError, match="crs 'EPSG:2263' is not a projected CRS in metres"):  # NY, US feet
        RunConfig.create(bbox=b, start=START, end=END, crs="EPSG:2263")


@settings(max_examples=200, deadline=None)
@given(
    w=st.floats(-180, 179.9),
    width=st.floats(1e-6, 40),
    s=st.floats(-89, 88.9),
    height=st.floats(1e-6, 30),
)
@example(w=-2.8744986292867722e-15, width=1.0000000000000002e-06, s=0.0, height=1.0)  # west + 180 rounds to 180
def test_auto_crs_properties(w: float, width: float, s: float, height: float) -> None:
    e, n = min(w + width, 180.0), min(s + height, 89.99)
    if not (w < e and s < n):
        return
    b = BBox(w, s, e, n)
    epsg = auto_epsg(b)
    zone, north = epsg % 100, epsg < 32700
    shares = utm_zone_shares(b)
    assert zone in shares and shares[zone] == pytest.approx(max(shares.values()), abs=1e-9)
    assert abs(sum(shares.values()) - 1) < 1e-9
    # no zone west of the chosen one has a clearly larger share
    assert all(v <= shares[zone] + 1e-9 for z, v in shares.items() if z < zone)
    if n <= 0:
        assert not north
    if s >= 0:
        assert north
    assert utm_epsg(w, 0) - 32600 <= zone <= utm_epsg(e, 0) - 32600
    assert auto_epsg(b) == epsg  # deterministic


# ------------------------------------------------------------------------------ pixels against the truth


@pytest.mark.parametrize(("crs", "epsg"), [("auto", 32631), ("EPSG:32630", 32630)])
def test_reprojected_composite_matches_truth(zones: Path, crs: str, epsg: int) -> None:
    ds = _run(zones, crs, 64)
    assert ds.rio.crs.to_epsg() == epsg
    tr = _truth(ds)
    got, count = ds.ndvi.values, ds.valid_count.values.astype(np.int64)
    inside = tr["interior"]
    assert inside.mean() > 0.9, f"only {inside.mean():.1%} of the pixels are away from edges"
    # odc-stac #133: a run in a non-native CRS is not empty
    assert np.isfinite(got).mean() > 0.9
    # away from edges: exact counts, values within 0.01, NaN exactly where nothing was clear
    np.testing.assert_array_equal(count[inside], tr["count"][inside])
    seen = inside & (tr["count"] > 0)
    err = np.abs(got[seen] - tr["value"][seen])
    assert err.max() < 0.01, f"max |composite - truth| = {err.max():.4f}"
    assert np.isnan(got[inside & (tr["count"] == 0)]).all()
    # both zones really feed the composite (one of them reprojected), and the overlap is met
    for bit in (1, 2, 3):
        assert ((tr["zone"] & bit) == bit)[inside].sum() > 100, bit
    # everywhere, edges included: no NaN hole where a granule of either zone is clear all around the pixel,
    # and never more clear days than some granule could have given
    assert not np.isnan(got[tr["certain"] > 0]).any()
    assert (count >= tr["certain"]).all() and (count <= tr["possible"]).all()


@pytest.mark.parametrize("crs", ["auto", "EPSG:32630"])
def test_chunked_and_unchunked_runs_are_identical(zones: Path, crs: str) -> None:
    """odc-stac #252: one-pixel shifts between chunked and unchunked reprojected loads. Not here."""
    chunked = _run(zones, crs, 64)
    whole = _run(zones, crs, 2048)
    plan = make_plan(_cfg(zones, crs=crs, chunk=2048))
    assert plan.chunk >= max(whole.sizes["x"], whole.sizes["y"])  # one chunk covers everything
    assert len(build(_cfg(zones, crs=crs, chunk=64)).ndvi.chunks[2]) > 3
    np.testing.assert_array_equal(chunked.x.values, whole.x.values)
    np.testing.assert_array_equal(chunked.y.values, whole.y.values)
    assert np.array_equal(chunked.ndvi.values, whole.ndvi.values, equal_nan=True)
    assert np.array_equal(chunked.valid_count.values, whole.valid_count.values)


def _subset(zones: Path, tmp_path: Path, epsg: int) -> Path:
    doc = json.loads(zones.read_text())
    doc["features"] = [f for f in doc["features"] if f["properties"]["proj:epsg"] == epsg]
    # beside the full catalog: a local catalog's local hrefs must stay inside its folder (href policy)
    path = zones.parent / f"only-{epsg}-{tmp_path.name}.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("resolution", [10, 20, 30])
def test_grid_depends_on_the_bbox_only(zones: Path, tmp_path: Path, resolution: int) -> None:
    """Same bbox and resolution, whatever scenes the search returned: same CRS, same snapped grid."""
    grids = []
    for catalog in (zones, _subset(zones, tmp_path, 32630), _subset(zones, tmp_path, 32631)):
        for chunk in (64, 2048):
            ds = build(_cfg(catalog, resolution=resolution, chunk=chunk))  # lazy: no pixel read
            assert ds.rio.crs.to_epsg() == 32631
            grids.append((ds.x.values, ds.y.values))
    for x, y in grids[1:]:
        np.testing.assert_array_equal(x, grids[0][0])
        np.testing.assert_array_equal(y, grids[0][1])
    x, y = grids[0]
    half = resolution / 2
    assert np.all((x - half) % resolution == 0) and np.all((y - half) % resolution == 0)
    assert np.all(np.diff(x) == resolution) and np.all(np.diff(y) == -resolution)
    # the snapped envelope of the bbox corners (stackstac's snap_bounds): outward to multiples of the resolution
    xs, ys = Transformer.from_crs(4326, 32631, always_xy=True).transform(
        [BBOX[0], BBOX[0], BBOX[2], BBOX[2]], [BBOX[1], BBOX[3], BBOX[1], BBOX[3]]
    )
    assert x[0] - half == np.floor(min(xs) / resolution) * resolution
    assert x[-1] + half == np.ceil(max(xs) / resolution) * resolution
    assert y[0] + half == np.ceil(max(ys) / resolution) * resolution
    assert y[-1] - half == np.floor(min(ys) / resolution) * resolution


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def test_cli_forced_to_the_minority_zone_writes_that_grid(zones: Path, tmp_path: Path) -> None:
    out = tmp_path / "z30.zarr"
    r = _cli("compute", "--bbox", *map(str, BBOX), "--start", START, "--end", END, "--catalog", str(zones),
             "--out", str(out), "--crs", "EPSG:32630", "--chunk", "64", "--mask-filters", "none")
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(out, decode_coords="all", consolidated=None)
    assert ds.rio.crs.to_epsg() == 32630
    ref = _run(zones, "EPSG:32630", 64)
    np.testing.assert_array_equal(ds.x.values, ref.x.values)
    assert np.array_equal(ds.ndvi.values, ref.ndvi.values, equal_nan=True)
    np.testing.assert_array_equal(ds.valid_count.values, ref.valid_count.values)


# ------------------------------------------------------------------------------------------- antimeridian


ANTIMERIDIAN = (
    "bbox crosses the antimeridian (west 179.5 > east -179.5); split it into two runs: 179.5..180 and -180..-179.5"
)


def test_antimeridian_bbox_is_refused_with_the_fix() -> None:
    with pytest.raises(InputError) as e:
        RunConfig.create(bbox=(179.5, 60, -179.5, 61), start=START, end=END)
    assert ANTIMERIDIAN in str(e.value)
    assert "--bbox 179.5 60 180 61 and --bbox -180 60 -179.5 61" in str(e.value)
    with pytest.raises(InputError, match=r"west 180 > east -179.5\); .*--bbox -180 60 -179.5 61"):
        RunConfig.create(bbox=(180, 60, -179.5, 61), start=START, end=END)
    # a swapped small box is not taken for an antimeridian one
    with pytest.raises(InputError, match=r"bbox west 10 >= east -10; .*swapped"):
        RunConfig.create(bbox=(10, 0, -10, 1), start=START, end=END)


def test_cli_refuses_an_antimeridian_bbox_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "never.zarr"
    r = _cli("compute", "--bbox", "179.5", "60", "-179.5", "61", "--start", START, "--end", END,
             "--catalog", str(PC_ZONES_58_60), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and ANTIMERIDIAN in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(("crs", "epsg"), [("auto", 32660), ("EPSG:32659", 32659)])
def test_bbox_touching_180_plans_with_real_items(crs: str, epsg: int) -> None:
    """Real Planetary Computer items of one datatake over zones 58-60; a bbox ending exactly at 180."""
    cfg = RunConfig.create(bbox=(173.5, 57.0, 180.0, 58.0), start="2019-01-01", end="2019-01-01",
                           catalog=str(PC_ZONES_58_60), crs=crs)
    plan = make_plan(cfg)  # search + CRS + periods: no pixel read (the hrefs are remote)
    assert plan.epsg == epsg
    assert {it.epsg for it in plan.search.items} == {32659, 32660}
    assert {it.tile for it in plan.search.items} >= {"60VUK", "59VPE"}
    assert all(it.bbox is not None and it.bbox[0] < 180.0 and it.bbox[2] > 173.5 for it in plan.search.items)


def test_sample_default_is_not_changed_by_the_zone_helpers() -> None:
    assert SampleSpec().epsg == 32631 and SampleSpec().tiles == ("31UCQ", "31UDQ")
    assert {s.epsg for s in SPECS} == {32630, 32631}
    assert WEST.size == EAST.size == 128 and WEST.seed + 1 == EAST.seed
    # the two unions overlap across the meridian, on both sides of it
    assert WEST.bbox_lonlat()[2] > 0 > EAST.bbox_lonlat()[0]
