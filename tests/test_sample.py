"""Tests of the synthetic Sentinel-2 L2A sample: files, STAC items and the analytic truth agree."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rio_cogeo.cogeo import cog_validate

from ndvi_scale.errors import CatalogError, InputError
from ndvi_scale.landscape import CROPS, parcel_polygons, union_bounds
from ndvi_scale.sample import (
    BARE_SOIL_NDVI,
    CLOUDY_CLASSES,
    COG_MEDIA_TYPE,
    CONTAMINATION_TOLERANCE,
    PARCELS_FILE,
    SAMPLE_BBOX,
    LandCover,
    SampleSpec,
    Truth,
    generate,
    pixel_centres,
    sample_catalog,
)

# 128 px granules (64 px SCL), a 160 m field scale (so each granule holds several road blocks of fields), 15 dates
# on both sides of the baseline switch (2024-05-01) covering every sky kind of the 7-step schedule.
TINY = SampleSpec(
    size=128, blocksize=128, start=dt.date(2024, 4, 1), end=dt.date(2024, 6, 10), field_size=160.0
)
MASKED = (0, 1, 2, 3, 8, 9, 10)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[pystac.Item]]:
    root = tmp_path_factory.mktemp("tiny")
    return root, generate(root, TINY)


def _read(href: str) -> tuple[np.ndarray, dict[str, Any]]:
    with rasterio.open(href) as src:
        return src.read(1), dict(src.profile) | {"overviews": src.overviews(1)}


def _granule(item: pystac.Item) -> str:
    return item.id.split("_")[1]


def _reflectance(item: pystac.Item, key: str) -> np.ndarray:
    dn, _ = _read(item.assets[key].href)
    band = item.assets[key].extra_fields["raster:bands"][0]
    refl = dn * band["scale"] + band["offset"]
    return np.where(dn == band["nodata"], np.nan, refl)


def _file_ndvi(item: pystac.Item) -> np.ndarray:
    red, nir = _reflectance(item, "red"), _reflectance(item, "nir")
    return (nir - red) / (nir + red)


def _scl10(item: pystac.Item) -> np.ndarray:
    scl, _ = _read(item.assets["scl"].href)
    return np.repeat(np.repeat(scl, 2, axis=0), 2, axis=1)


# --------------------------------------------------------------------------------------------------- the spec


def test_dates_baselines_and_granules() -> None:
    dates = TINY.dates()
    assert len(dates) == 15
    assert dates[0] == dt.datetime(2024, 4, 1, 10, 56, 19, tzinfo=dt.UTC)
    assert all((b - a).days == 5 for a, b in zip(dates, dates[1:], strict=False))
    assert TINY.baseline("2024-04-30") == "03.01" and TINY.baseline(dt.date(2024, 5, 1)) == "05.10"
    default = SampleSpec().dates()
    assert (
        len(default) == 73
        and default[0].date() == dt.date(2024, 1, 2)
        and default[-1].date() <= dt.date(2024, 12, 31)
    )
    for month in range(1, 13):  # at least 3 acquisitions every month
        assert sum(d.month == month for d in default) >= 3

    a, b = TINY.granules()
    assert (a.name, b.name) == ("31UCQ", "31UDQ")
    assert a.transform10.c == 399960.0 and a.transform10.f == 5360040.0
    assert b.x0 - a.x0 == 10 * TINY.shift and TINY.shift % 2 == 0
    overlap = a.bounds[2] - b.bounds[0]
    assert overlap > 0 and abs(overlap / (10 * TINY.size) - 0.2) < 0.02
    assert b.col20 * 20 == b.x0 - a.x0  # the 20 m grids coincide


def test_spec_validation() -> None:
    with pytest.raises(InputError, match="size"):
        SampleSpec(size=127)
    with pytest.raises(InputError, match="start"):
        SampleSpec(start=dt.date(2024, 2, 1), end=dt.date(2024, 1, 1))
    with pytest.raises(InputError, match="blocksize"):
        SampleSpec(blocksize=100)
    with pytest.raises(InputError, match="granule"):
        TINY.granule("31XXX")


def test_every_land_cover_in_each_default_granule() -> None:
    spec = SampleSpec()
    for g in spec.granules():
        x, y = pixel_centres(g.transform10 * Affine.scale(4), (g.size // 4, g.size // 4))  # every 40 m
        assert set(np.unique(Truth.land_cover(spec, x, y))) == set(LandCover)
    # a tiny test granule holds the same landscape, scaled: river, village, woods, roads and fields
    x, y = _union_centres(TINY, 10.0)
    assert set(np.unique(Truth.land_cover(TINY, x, y))) == set(LandCover)


def _union_centres(spec: SampleSpec, step: float) -> tuple[np.ndarray, np.ndarray]:
    a, b = spec.granules()
    x = np.arange(a.bounds[0] + step / 2, b.bounds[2], step)[np.newaxis, :]
    y = np.arange(a.bounds[3] - step / 2, a.bounds[1], -step)[:, np.newaxis]
    return x, y


def test_landscape_shares_are_those_of_a_farmed_plain() -> None:
    """The default sample, like the Beauce near Chartres: mostly arable fields, some woods, a village, a thin
    river (not 1/6 of the plain), a road network; winter cereals the main crop."""
    spec = SampleSpec()
    x, y = _union_centres(spec, 20.0)
    cover = Truth.land_cover(spec, x, y)
    share = {c: float(np.mean(cover == c)) for c in LandCover}
    fields = sum(share[c] for c in CROPS) + share[LandCover.GRASSLAND]
    forest = share[LandCover.DECIDUOUS_FOREST] + share[LandCover.CONIFEROUS_FOREST]
    assert 0.75 < fields < 0.95
    assert 0.04 < forest < 0.15
    assert 0.002 < share[LandCover.WATER] < 0.015
    assert 0.003 < share[LandCover.BUILT_UP] < 0.03
    assert 0.01 < share[LandCover.ROAD] < 0.05
    assert share[LandCover.WINTER_WHEAT] == max(share[c] for c in CROPS)
    assert all(share[c] > 0.04 for c in (*CROPS, LandCover.GRASSLAND))


@pytest.mark.parametrize("spec, step", [(SampleSpec(), 20.0), (TINY, 10.0)], ids=["default-20m", "tiny-10m"])
def test_the_river_crosses_the_sample(spec: SampleSpec, step: float) -> None:
    """One connected stream from the west edge to the east edge of the union of the granules, a few pixels wide."""
    from scipy import ndimage

    x, y = _union_centres(spec, step)
    water = Truth.land_cover(spec, x, y) == LandCover.WATER
    labels, n = ndimage.label(water, structure=np.ones((3, 3)))
    assert n == 1
    assert water[:, 0].any() and water[:, -1].any()
    widths = water.sum(axis=0) * step  # north-south extent per column: >= the width, more where it bends
    assert 30.0 <= np.median(widths) <= 80.0


def test_crop_calendars() -> None:
    """Each crop's NDVI through the year, on the mean of its pixels: winter cereals peak in spring and are bare
    soil after the July harvest, maize peaks in August, sunflower in early July, rapeseed is green all winter,
    deciduous woods are bare in winter; water, roads and the village stay low."""
    spec = SampleSpec()
    x, y = _union_centres(spec, 80.0)
    cover = Truth.land_cover(spec, x, y)
    days = [dt.date(2024, 1, 1) + dt.timedelta(days=k) for k in range(0, 366, 7)]
    ndvi = np.stack([Truth.ndvi(spec, x, y, d) for d in days])
    mean = {c: ndvi[:, cover == c].mean(axis=1) for c in LandCover}

    def peak(c: LandCover) -> dt.date:
        return days[int(np.argmax(mean[c]))]

    def on(c: LandCover, month: int, day: int) -> float:
        return float(mean[c][days.index(min(days, key=lambda d: abs((d - dt.date(2024, month, day)).days)))])

    assert dt.date(2024, 4, 15) <= peak(LandCover.WINTER_WHEAT) <= dt.date(2024, 6, 5)
    assert dt.date(2024, 4, 1) <= peak(LandCover.WINTER_BARLEY) < peak(LandCover.WINTER_WHEAT)
    assert dt.date(2024, 7, 25) <= peak(LandCover.MAIZE) <= dt.date(2024, 8, 25)
    assert dt.date(2024, 6, 20) <= peak(LandCover.SUNFLOWER) <= dt.date(2024, 7, 20)
    for crop in (LandCover.WINTER_WHEAT, LandCover.WINTER_BARLEY, LandCover.RAPESEED):
        assert on(crop, 8, 15) < BARE_SOIL_NDVI < on(crop, 4, 20) - 0.4  # harvested: stubble, ploughed soil
    for crop in (LandCover.MAIZE, LandCover.SUNFLOWER):
        assert on(crop, 4, 10) < BARE_SOIL_NDVI and on(crop, 11, 30) < BARE_SOIL_NDVI  # sown in spring
    assert on(LandCover.RAPESEED, 1, 15) > 0.5 and on(LandCover.WINTER_WHEAT, 1, 15) < 0.45
    assert mean[LandCover.GRASSLAND].min() > 0.45
    assert on(LandCover.DECIDUOUS_FOREST, 1, 15) < 0.5 < 0.8 < on(LandCover.DECIDUOUS_FOREST, 7, 15)
    assert mean[LandCover.CONIFEROUS_FOREST].min() > 0.7
    assert np.allclose(ndvi[:, cover == LandCover.WATER], -0.35, rtol=0, atol=1e-12)
    assert mean[LandCover.ROAD].max() < 0.2 and mean[LandCover.BUILT_UP].max() < 0.25


def _parcels_utm(path: Path, spec: SampleSpec) -> list[tuple[dict[str, Any], Any]]:
    import shapely

    to_utm = Transformer.from_crs(4326, spec.epsg, always_xy=True)
    out = []
    for f in json.loads(path.read_text())["features"]:
        geom = shapely.geometry.shape(f["geometry"])
        out.append((f["properties"], shapely.transform(geom, lambda c: np.column_stack(to_utm.transform(*c.T)))))
    return out


def _check_parcels_against_truth(spec: SampleSpec, parcels: list[tuple[dict[str, Any], Any]]) -> int:
    """Every 10 m pixel centre inside a parcel has the parcel's cover in Truth; returns how many were checked."""
    import shapely

    checked = 0
    for props, geom in parcels:
        xmin, ymin, xmax, ymax = geom.bounds
        x = spec.x0 + 10.0 * np.arange(np.floor((xmin - spec.x0) / 10), np.ceil((xmax - spec.x0) / 10)) + 5.0
        y = spec.y0 - 10.0 * np.arange(np.floor((spec.y0 - ymax) / 10), np.ceil((spec.y0 - ymin) / 10)) - 5.0
        gx, gy = np.meshgrid(x, y)
        inside = shapely.contains_xy(geom, gx, gy)
        cover = Truth.land_cover(spec, gx[inside], gy[inside])
        assert np.all(cover == LandCover[props["cover"].upper()]), props["id"]
        checked += int(inside.sum())
    return checked


def test_sample_catalog_publishes_its_parcels(tmp_path: Path) -> None:
    """parcels.geojson beside items.json: irregular fields and woods in EPSG:4326; every pixel centre inside a
    polygon has its cover in Truth; they cover most of the plain; fields of one crop are sown and harvested on
    different days, in the order of their published shift."""
    spec = SampleSpec(size=128, blocksize=128, start=dt.date(2024, 6, 1), end=dt.date(2024, 6, 1), field_size=160.0)
    items = sample_catalog(tmp_path, spec=spec)
    path = items.parent / PARCELS_FILE
    parcels = _parcels_utm(path, spec)
    assert {p["cover"] for p, _ in parcels} >= {c.name.lower() for c in CROPS}
    assert len({p["id"] for p, _ in parcels}) == len(parcels)
    checked = _check_parcels_against_truth(spec, parcels)
    a, b = spec.granules()
    union = (b.bounds[2] - a.bounds[0]) * (a.bounds[3] - a.bounds[1])
    assert 0.6 < checked * 100.0 / union < 0.95  # fields and woods, without roads, river banks and villages
    # irregular: no two parcels alike, sides not all north-south / east-west
    areas = sorted(g.area for _, g in parcels)
    assert areas[-1] > 4 * areas[len(areas) // 10]

    # the default sample's parcels, a sample of them (all: ~5 s)
    default = SampleSpec()
    every = parcel_polygons(default, union_bounds(default))
    assert 500 < len(every) < 1500
    _check_parcels_against_truth(default, [({"id": p["id"], "cover": p["cover"].name}, p["geometry"])
                                           for p in every[::7]])
    # per-parcel calendars: a wheat field ripens (its NDVI falls fastest) exactly its published shift later
    wheat = [p for p in every if p["cover"] == LandCover.WINTER_WHEAT][:40]
    ripening = []
    for p in wheat:
        c = p["geometry"].representative_point()
        at = Truth.at(default, c.x, c.y)
        v = [float(at.ndvi(dt.date(2024, 6, 1) + dt.timedelta(days=k))) for k in range(60)]
        ripening.append(int(np.argmin(np.round(np.diff(v), 9))))  # first day of the steepest fall
    shifts = np.asarray([p["shift"] for p in wheat])
    assert np.ptp(shifts) >= 15
    assert len(set(np.asarray(ripening) - shifts)) == 1


def test_truth_accepts_scalars_and_date_forms() -> None:
    x, y = 400500.0, 5359500.0
    ref = Truth.ndvi(TINY, x, y, dt.date(2024, 5, 6))
    assert np.ndim(ref) == 0 and -0.9 <= ref <= 0.95
    for when in (
        "2024-05-06",
        "2024-05-06T10:56:19Z",
        np.datetime64("2024-05-06"),
        dt.datetime(2024, 5, 6, 11),
    ):
        assert Truth.ndvi(TINY, x, y, when) == ref
    paris = dt.timezone(dt.timedelta(hours=2))
    assert Truth.ndvi(TINY, x, y, dt.datetime(2024, 5, 7, 1, 0, tzinfo=paris)) == ref  # 2024-05-06 23:00 UTC
    assert Truth.scl(TINY, x, y, "2024-05-06").dtype == np.uint8
    assert Truth.scl(TINY, 0.0, 0.0, "2024-05-06") == 0  # far outside both granules
    red, nir = Truth.dn(TINY, x, y, "2024-05-06")
    assert red.shape == () and red.dtype == np.uint16 and 0 < red < nir


def test_truth_at_fixed_points_equals_truth() -> None:
    """One Truth.at object asked about several dates and granules (its land surface computed once) gives the very
    arrays of a fresh Truth call for each: nothing of one question leaks into the next."""
    x, y = _union_centres(TINY, 30.0)
    at = Truth.at(TINY, x, y)
    for when in ("2024-04-06", "2024-04-16", "2024-05-26"):  # scattered, broken, mostly cloudy skies
        np.testing.assert_array_equal(at.ndvi(when), Truth.ndvi(TINY, x, y, when))
        for granule in (None, 0, "31UDQ"):
            np.testing.assert_array_equal(at.scl(when, granule), Truth.scl(TINY, x, y, when, granule))
            np.testing.assert_array_equal(
                at.apparent_ndvi(when, granule), Truth.apparent_ndvi(TINY, x, y, when, granule)
            )
            np.testing.assert_array_equal(at.contaminated(when, granule), Truth.contaminated(TINY, x, y, when, granule))
    assert Truth.scl(TINY, x, y, "2024-05-26").max() >= 8  # a cloudy date was among them


def test_phenology() -> None:
    x, y = _union_centres(TINY, 10.0)
    cover = Truth.land_cover(TINY, x, y)
    early, peak = Truth.ndvi(TINY, x, y, "2024-01-15"), Truth.ndvi(TINY, x, y, "2024-05-10")
    wheat, water, conifers = (
        cover == LandCover.WINTER_WHEAT,
        cover == LandCover.WATER,
        cover == LandCover.CONIFEROUS_FOREST,
    )
    assert peak[wheat].mean() > early[wheat].mean() + 0.4
    assert np.all(early[water] == -0.35) and abs(early[conifers].mean() - 0.747) < 0.01
    # within one parcel the NDVI varies only by the small smooth texture (+-0.02)
    one = cover == cover[0, 0]
    same = one & (np.abs(x - x[0, 0]) < 30) & (np.abs(y - y[0, 0]) < 30)
    assert np.ptp(early[same]) <= 0.04


# -------------------------------------------------------------------------------------------------- the files


def test_determinism(catalog: tuple[Path, list[pystac.Item]], tmp_path: Path) -> None:
    root, items = catalog
    again = generate(tmp_path, TINY)
    assert [i.id for i in again] == [i.id for i in items]
    for a, b in zip(items, again, strict=True):
        for key in ("red", "nir", "scl"):
            assert Path(a.assets[key].href).read_bytes() == Path(b.assets[key].href).read_bytes()
    first = json.loads((root / "items.json").read_text())
    second = json.loads((tmp_path / "items.json").read_text())
    assert json.dumps(first).replace(str(root.resolve()), "ROOT") == json.dumps(second).replace(
        str(tmp_path.resolve()), "ROOT"
    )


def test_files_are_valid_cogs(catalog: tuple[Path, list[pystac.Item]]) -> None:
    _, items = catalog
    for item in items[:4]:
        for key in ("red", "nir", "scl"):
            valid, errors, _ = cog_validate(item.assets[key].href, quiet=True)
            assert valid, errors


def test_file_profiles_match_items(catalog: tuple[Path, list[pystac.Item]]) -> None:
    _, items = catalog
    for item in items:
        g = TINY.granule(_granule(item))
        for key, dtype, transform, shape in (
            ("red", "uint16", g.transform10, g.shape10),
            ("nir", "uint16", g.transform10, g.shape10),
            ("scl", "uint8", g.transform20, g.shape20),
        ):
            asset = item.assets[key]
            _, prof = _read(asset.href)
            assert prof["dtype"] == dtype and prof["nodata"] == 0
            assert prof["crs"].to_epsg() == 32631
            assert prof["transform"] == transform
            assert (prof["height"], prof["width"]) == shape == tuple(asset.extra_fields["proj:shape"])
            assert list(transform)[:6] == asset.extra_fields["proj:transform"]
            assert prof["blockxsize"] == TINY.blocksize and prof["compress"] == "deflate"
            assert len(prof["overviews"]) == 4
            assert asset.media_type == COG_MEDIA_TYPE and asset.roles == ["data"]
            assert asset.extra_fields["raster:bands"][0]["data_type"] == dtype


def test_files_equal_truth(catalog: tuple[Path, list[pystac.Item]]) -> None:
    _, items = catalog
    clear_pixels = leaks = false_alarms = 0
    for item in items:
        g, when = _granule(item), item.datetime
        assert when is not None
        x20, y20 = TINY.granule(g).centres(20)
        scl, _ = _read(item.assets["scl"].href)
        np.testing.assert_array_equal(scl, Truth.scl(TINY, x20, y20, when, granule=g))

        x, y = TINY.granule(g).centres(10)
        red_dn, nir_dn = Truth.dn(TINY, x, y, when, granule=g)
        np.testing.assert_array_equal(_read(item.assets["red"].href)[0], red_dn)
        np.testing.assert_array_equal(_read(item.assets["nir"].href)[0], nir_dn)

        ndvi, truth, scl10 = _file_ndvi(item), Truth.ndvi(TINY, x, y, when), _scl10(item)
        has = scl10 != 0
        # the files hold the apparent NDVI (DN rounding aside); it is the truth's wherever the sky is clean
        apparent = Truth.apparent_ndvi(TINY, x, y, when, granule=g)
        assert np.abs(ndvi[has] - apparent[has]).max() < 0.005
        dirty = Truth.contaminated(TINY, x, y, when, granule=g)
        off = np.abs(ndvi - truth)
        assert np.all(off[has & ~dirty] < CONTAMINATION_TOLERANCE + 0.005)
        # a contaminated pixel leaking into a composite is detectable: its NDVI is off by more than 0.02
        assert np.all(off[has & dirty] > CONTAMINATION_TOLERANCE - 0.005)
        # every labelled cloud, cirrus and shadow pixel is contaminated, but bright soil flagged as cloud (8)
        masked = np.isin(scl10, CLOUDY_CLASSES)
        bare = np.repeat(np.repeat(Truth.bare_soil(TINY, x20, y20, when), 2, axis=0), 2, axis=1)
        flagged_soil = (scl10 == 8) & bare
        assert np.all(dirty[masked & ~flagged_soil])
        assert np.all(np.isnan(ndvi[scl10 == 0])) and not dirty[~has].any()
        clear = has & ~np.isin(scl10, MASKED)
        clear_pixels += int(clear.sum())
        leaks += int((clear & dirty).sum())  # what SCL calls clear and is not: the SCL's errors
        false_alarms += int((masked & ~dirty).sum())
    assert clear_pixels > 0
    assert 0 < leaks < 0.1 * clear_pixels and false_alarms > 0


def test_clear_classes_follow_truth(catalog: tuple[Path, list[pystac.Item]]) -> None:
    _, items = catalog
    item = next(
        i
        for i in items
        if TINY.sky_kind(i.datetime) == "clear" and i.properties["s2:nodata_pixel_percentage"] == 0  # type: ignore[arg-type]
    )
    g = TINY.granule(_granule(item))
    scl, _ = _read(item.assets["scl"].href)
    # a clear sky: the surface classes, plus the SCL's errors of any date (defective pixels, soil flagged as cloud)
    assert {4, 5, 6} <= set(np.unique(scl)) <= {1, 4, 5, 6, 8}
    x, y = g.centres(20)
    cover, ndvi = Truth.land_cover(TINY, x, y), Truth.ndvi(TINY, x, y, item.datetime)  # type: ignore[arg-type]
    surface = np.isin(scl, (4, 5, 6))
    assert surface.mean() > 0.95
    assert np.all(((scl == 6) == (cover == LandCover.WATER))[surface])
    assert np.all(((scl == 4) == (ndvi > 0.4))[surface])
    bare = Truth.bare_soil(TINY, x, y, item.datetime)  # type: ignore[arg-type]
    assert np.all(bare[scl == 8]) and np.all(np.isin(cover[bare], CROPS))  # commission: bright bare soil only
    dirty = Truth.contaminated(TINY, x, y, item.datetime)  # type: ignore[arg-type]
    np.testing.assert_array_equal(dirty, scl == 1)  # on a clear date only the defective pixels are


def test_baseline_offset(catalog: tuple[Path, list[pystac.Item]]) -> None:
    _, items = catalog
    seen = set()
    for item in items:
        baseline = item.properties["s2:processing_baseline"]
        assert f"_N{baseline.replace('.', '')}_" in item.properties["s2:product_uri"]
        red = _read(item.assets["red"].href)[0]
        nir = _read(item.assets["nir"].href)[0]
        valid = np.concatenate([red[red > 0], nir[nir > 0]])
        offsets = {item.assets[k].extra_fields["raster:bands"][0]["offset"] for k in ("red", "nir")}
        if item.datetime.date() >= dt.date(2024, 5, 1):  # type: ignore[union-attr]
            assert baseline == "05.10" and offsets == {-0.1}
            assert valid.min() > 1000
        else:
            assert baseline == "03.01" and offsets == {0}
            assert valid.min() < 1000  # dark water NIR (~195 DN) shows there is no offset
        seen.add(baseline)
    assert seen == {"03.01", "05.10"}


def test_swath_edges_and_overlap(catalog: tuple[Path, list[pystac.Item]]) -> None:
    _, items = catalog
    by_date: dict[dt.date, dict[str, pystac.Item]] = {}
    for item in items:
        by_date.setdefault(item.datetime.date(), {})[_granule(item)] = item  # type: ignore[union-attr]
    a_g, b_g = TINY.granules()
    ov = b_g.col20  # first column of B within A's 20 m grid
    m = TINY.size20
    edges = []
    for day, pair in sorted(by_date.items()):
        a, b = _read(pair["31UCQ"].assets["scl"].href)[0], _read(pair["31UDQ"].assets["scl"].href)[0]
        # the overlap holds the very same pixels in both granules wherever both have data
        a_ov, b_ov = a[:, ov:], b[:, : m - ov]
        both = (a_ov > 0) & (b_ov > 0)
        np.testing.assert_array_equal(a_ov[both], b_ov[both])
        edge = TINY.has_swath_edge(day)
        edges.append(edge)
        assert ((a == 0).any() or (b == 0).any()) == edge
        if edge:
            assert not (a[:, :ov] == 0).any()  # A's edge lies inside the overlap...
            assert np.all(b_ov[a_ov == 0] > 0)  # ...where B still has data
            assert (b == 0).any()  # B's north-east corner is a real hole
            hole = Truth.scl(TINY, *b_g.centres(20), day) == 0
            np.testing.assert_array_equal(hole, b == 0)
            assert pair["31UCQ"].properties["s2:nodata_pixel_percentage"] > 0
    assert all(e1 != e2 for e1, e2 in zip(edges, edges[1:], strict=False))  # strictly alternating
    assert any(edges) and not all(edges)


def test_cloud_cover_property(catalog: tuple[Path, list[pystac.Item]]) -> None:
    _, items = catalog
    covers = []
    for item in items:
        scl = _read(item.assets["scl"].href)[0]
        valid = scl > 0
        expected = round(100.0 * np.isin(scl[valid], CLOUDY_CLASSES).mean(), 4)
        assert item.properties["eo:cloud_cover"] == pytest.approx(expected, abs=1e-9)
        covers.append(item.properties["eo:cloud_cover"])
    assert min(covers) < 1.0  # clear dates: only bare soil flagged as cloud (SCL commission errors)
    assert max(covers) > 95.0
    assert len({round(c) for c in covers}) > 6  # a spread of cloudiness, not just clear/overcast
    classes = set().union(*(np.unique(_read(i.assets["scl"].href)[0]).tolist() for i in items))
    assert {0, 1, 2, 3, 4, 5, 6, 8, 9, 10} <= classes


def test_stac_items(catalog: tuple[Path, list[pystac.Item]]) -> None:
    root, items = catalog
    fc = json.loads((root / "items.json").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2 * len(TINY.dates())
    keys = [(f["properties"]["datetime"], f["id"]) for f in fc["features"]]
    assert keys == sorted(keys)
    f = fc["features"][0]
    assert f["id"] == "S2B_31UCQ_20240401_0_L2A"
    assert f["stac_version"] == "1.0.0" and f["collection"] == "sentinel-2-l2a"
    assert "https://stac-extensions.github.io/raster/v1.1.0/schema.json" in f["stac_extensions"]
    p = f["properties"]
    assert p["datetime"] == "2024-04-01T10:56:19Z" and p["platform"] == "sentinel-2b"
    assert p["constellation"] == "sentinel-2" and p["instruments"] == ["msi"]
    assert (p["mgrs:utm_zone"], p["mgrs:latitude_band"], p["mgrs:grid_square"]) == (31, "U", "CQ")
    assert p["grid:code"] == "MGRS-31UCQ" and p["proj:epsg"] == 32631
    assert p["earthsearch:boa_offset_applied"] is False
    assert p["s2:product_uri"].startswith("S2B_MSIL2A_20240401T105619_N0301_R")
    assert Path(f["assets"]["red"]["href"]).is_absolute() and Path(f["assets"]["red"]["href"]).is_file()
    assert f["assets"]["red"]["eo:bands"][0]["common_name"] == "red"
    assert f["assets"]["nir"]["eo:bands"][0]["common_name"] == "nir"
    assert f["assets"]["scl"]["raster:bands"] == [
        {"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}
    ]
    assert {i.properties["platform"] for i in items} == {"sentinel-2a", "sentinel-2b"}
    # the footprint is the granule, reprojected to WGS84
    to_utm = Transformer.from_crs(4326, 32631, always_xy=True)
    for item in items[:2]:
        g = TINY.granule(_granule(item))
        ring = np.array(item.geometry["coordinates"][0])  # type: ignore[index]
        x, y = to_utm.transform(ring[:, 0], ring[:, 1])
        assert np.allclose(x[:4], [g.bounds[0], g.bounds[2], g.bounds[2], g.bounds[0]], atol=0.01)
        assert np.allclose(y[:4], [g.bounds[1], g.bounds[1], g.bounds[3], g.bounds[3]], atol=0.01)
        w, s, e, n = item.bbox  # type: ignore[misc]
        assert (
            w <= ring[:, 0].min()
            and e >= ring[:, 0].max()
            and s <= ring[:, 1].min()
            and n >= ring[:, 1].max()
        )
    # readable as an ItemCollection (as a pipeline would open it)
    assert len(pystac.ItemCollection.from_file(str(root / "items.json"))) == len(items)


def test_href_base(tmp_path: Path) -> None:
    spec = SampleSpec(size=64, blocksize=64, start=dt.date(2024, 6, 1), end=dt.date(2024, 6, 1))
    items = generate(tmp_path, spec, href_base="http://127.0.0.1:8000/cat/")
    assert items[0].assets["red"].href == f"http://127.0.0.1:8000/cat/{items[0].id}/B04.tif"
    assert (tmp_path / items[0].id / "SCL.tif").is_file()


# ---------------------------------------------------------------------------------------------- the truth API


@pytest.mark.parametrize("max_cloud", [100.0, 10.0])  # 10 % keeps B but drops A on 2024-05-26
def test_expected_composite_matches_a_reference_pipeline(
    catalog: tuple[Path, list[pystac.Item]], max_cloud: float
) -> None:
    """Filter, mosaic (A first), mask and median the files on the union grid: ``expected_composite``."""
    _, items = catalog
    a_g, b_g = TINY.granules()
    union = (TINY.size20 + b_g.col20) * 2
    kept = [
        i
        for i in items
        if i.datetime is not None and i.datetime.month == 5 and i.properties["eo:cloud_cover"] <= max_cloud
    ]
    by_day: dict[dt.date, list[pystac.Item]] = {}
    for item in sorted(kept, key=lambda i: TINY.granule(_granule(i)).index):
        by_day.setdefault(item.datetime.date(), []).append(item)  # type: ignore[union-attr]
    stack = np.full((len(by_day), TINY.size, union), np.nan)
    for k, (_, day_items) in enumerate(sorted(by_day.items())):
        filled = np.zeros((TINY.size, union), dtype=bool)
        for item in day_items:
            c0 = 2 * TINY.granule(_granule(item)).col20
            ndvi, scl10 = _file_ndvi(item), _scl10(item)
            take = (scl10 != 0) & ~filled[:, c0 : c0 + TINY.size]
            use = take & ~np.isin(scl10, MASKED)
            stack[k, :, c0 : c0 + TINY.size][use] = ndvi[use]
            filled[:, c0 : c0 + TINY.size] |= take
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
        median = np.nanmedian(stack, axis=0)
    x, y = pixel_centres(a_g.transform10, (TINY.size, union))
    # with no filter, the dates are enough; after a per-item filter, pass the surviving items
    observations = sorted(by_day) if max_cloud == 100 else kept
    if max_cloud < 100:
        assert len(kept) < 2 * len(by_day)  # the filter dropped one granule of some date
    expected, counts = Truth.expected_composite(TINY, x, y, observations, "median")
    np.testing.assert_array_equal(np.isnan(expected), np.isnan(median))
    np.testing.assert_array_equal(counts, np.sum(~np.isnan(stack), axis=0))
    ok = ~np.isnan(expected)
    assert ok.mean() > 0.5 and np.abs(expected[ok] - median[ok]).max() < 0.005
    if max_cloud < 100:  # the same call with bare dates would wrongly count the dropped granules
        _, all_counts = Truth.expected_composite(TINY, x, y, sorted(by_day), "median")
        assert (all_counts > counts).any()


def test_expected_composite_reducers() -> None:
    x, y = np.array([[400005.0, 409005.0]]), np.array([[5359995.0], [5359005.0]])
    days = TINY.dates()[:7]
    clear = np.stack([Truth.is_clear(TINY, x, y, d) for d in days])
    vals = np.stack([Truth.ndvi(TINY, x, y, d) for d in days])
    for method, fn in (("mean", np.mean), ("max", np.max), ("min", np.min), ("median", np.median)):
        got, counts = Truth.expected_composite(TINY, x, y, days, method)
        np.testing.assert_array_equal(counts, clear.sum(axis=0))
        for idx in np.ndindex(counts.shape):
            want = fn(vals[(slice(None), *idx)][clear[(slice(None), *idx)]]) if counts[idx] else np.nan
            np.testing.assert_allclose(got[idx], want, equal_nan=True)
    q, _ = Truth.expected_composite(TINY, x, y, days, "q50")
    np.testing.assert_allclose(q, Truth.expected_composite(TINY, x, y, days, "median")[0], equal_nan=True)
    overcast = [d for d in TINY.dates() if TINY.sky_kind(d) == "overcast"]
    _, counts = Truth.expected_composite(TINY, *TINY.granules()[0].centres(10), overcast)
    assert counts.max() <= 1 and (counts == 0).mean() > 0.9


def test_sample_bbox_inside_union() -> None:
    spec = SampleSpec()
    a, b = spec.granules()
    w, s, e, n = SAMPLE_BBOX
    assert all(round(v, 3) == v for v in SAMPLE_BBOX)
    lon = np.concatenate([np.linspace(w, e, 50), np.full(50, e), np.linspace(e, w, 50), np.full(50, w)])
    lat = np.concatenate([np.full(50, s), np.linspace(s, n, 50), np.full(50, n), np.linspace(n, s, 50)])
    x, y = Transformer.from_crs(4326, 32631, always_xy=True).transform(lon, lat)
    margin = 300.0  # "well inside": at least 300 m from the union's edges
    assert x.min() > a.bounds[0] + margin and x.max() < b.bounds[2] - margin
    assert y.min() > a.bounds[1] + margin and y.max() < a.bounds[3] - margin
    assert x.min() < b.bounds[0] and x.max() > a.bounds[2]  # covers the whole overlap
    uw, us, ue, un = spec.bbox_lonlat()
    assert uw < w < e < ue and us < s < n < un


def test_sample_catalog_caches(tmp_path: Path) -> None:
    spec = SampleSpec(size=64, blocksize=64, start=dt.date(2024, 6, 1), end=dt.date(2024, 6, 11))
    first = sample_catalog(tmp_path, spec=spec)
    assert first.name == "items.json" and first.parent.parent == tmp_path.resolve()
    assert first.parent.name.startswith("sample-v3-64-")
    t0 = time.perf_counter()
    assert sample_catalog(tmp_path, spec=spec) == first
    assert time.perf_counter() - t0 < 0.1
    # hrefs point at the final folder, not at the temporary one it was written in
    item = pystac.ItemCollection.from_file(str(first)).items[0]
    assert (
        Path(item.assets["scl"].href).parent.parent == first.parent
        and Path(item.assets["scl"].href).is_file()
    )
    assert [p.name for p in tmp_path.iterdir()] == [first.parent.name]


def test_sample_catalog_concurrent_callers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SampleSpec(size=64, blocksize=64, start=dt.date(2024, 6, 1), end=dt.date(2024, 6, 6))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(sample_catalog(tmp_path, spec=spec))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and results[0].is_file()
    assert len(list(tmp_path.iterdir())) == 1  # losers cleaned their temporary folders
    # the default location honours NDVI_SCALE_CACHE
    monkeypatch.setenv("NDVI_SCALE_CACHE", str(tmp_path))
    assert sample_catalog(spec=spec) == results[0]


def test_sample_catalog_lost_race_uses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process renames its sample into place while we generate: we keep theirs and drop ours."""
    from ndvi_scale import sample as sample_module

    spec = SampleSpec(size=64, blocksize=64, start=dt.date(2024, 6, 1), end=dt.date(2024, 6, 1))
    final = tmp_path / f"sample-v3-64-{spec.fingerprint()}"
    real_generate = sample_module.generate

    def racing_generate(root: Path, spec: SampleSpec, href_base: str | None = None) -> list[pystac.Item]:
        real_generate(final, spec)  # the winner finishes first
        (final / "winner").touch()
        return real_generate(root, spec, href_base=href_base)

    monkeypatch.setattr(sample_module, "generate", racing_generate)
    items = sample_catalog(tmp_path, spec=spec)
    assert items == final / "items.json" and (final / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # our temporary folder is gone


def test_sample_catalog_refuses_a_broken_cache(tmp_path: Path) -> None:
    spec = SampleSpec(size=64, blocksize=64, start=dt.date(2024, 6, 1), end=dt.date(2024, 6, 1))
    final = tmp_path / f"sample-v3-64-{spec.fingerprint()}"
    final.mkdir()
    (final / "stray.txt").write_text("not a sample")
    with pytest.raises(CatalogError, match="delete it"):
        sample_catalog(tmp_path, spec=spec)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
