"""ndvi_scale.analytics.aoi: the pieces of ``compute --aoi`` (bbox from polygons, pixel-centre mask, provenance
digest, clear errors). The hook into compute is the engine's; these are checked on their own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from ndvi_scale.analytics.aoi import aoi_mask, load_aoi
from ndvi_scale.errors import InputError


def _geojson(path, polys) -> str:
    feats = [{"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(p)} for p in polys]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return str(path)


def test_mask_is_the_pixel_centre_rule():
    rng = np.random.default_rng(5)
    left, top, res, shape = 400000.0, 5360000.0, 10.0, (120, 150)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    cx, cy = left + (xs + 0.5) * res, top - (ys + 0.5) * res
    for _ in range(6):
        ang = np.sort(rng.uniform(0, 2 * np.pi, 11))
        rad = rng.uniform(150, 600, 11)
        poly = shapely.make_valid(shapely.Polygon(np.c_[left + 750 + rad * np.cos(ang),
                                                        top - 600 + rad * np.sin(ang)]))
        got = aoi_mask(poly, left, top, res, shape)
        want = shapely.contains_xy(poly, cx, cy)
        near = shapely.distance(poly.boundary, shapely.points(cx, cy)) < 1e-6  # centres on the edge: GDAL decides
        assert got.sum() > 0
        assert (got == want)[~near].all()


def test_load_aoi_bbox_digest_and_multi_polygons(tmp_path):
    a = shapely.box(1.75, 48.32, 1.78, 48.34)
    b = shapely.box(1.80, 48.35, 1.81, 48.36)
    one = load_aoi(_geojson(tmp_path / "a.geojson", [a, b]))
    assert one.bbox == pytest.approx((1.75, 48.32, 1.81, 48.36))
    assert one.n_polygons == 2 and one.digest.startswith("sha256:")
    assert load_aoi(_geojson(tmp_path / "b.geojson", [b, a])).digest == one.digest  # order does not matter
    assert load_aoi(_geojson(tmp_path / "c.geojson", [a])).digest != one.digest
    utm = one.in_crs("EPSG:32631")
    from pyproj import Geod

    geodesic = abs(Geod(ellps="WGS84").geometry_area_perimeter(one.geometry)[0])
    assert utm.area == pytest.approx(geodesic, rel=2e-3)  # UTM's scale error near the central meridian: < 0.1 %
    assert 300000 < utm.bounds[0] < 500000


def test_tiny_and_invalid_aoi_are_refused(tmp_path):
    tiny = _geojson(tmp_path / "tiny.geojson", [shapely.box(1.75, 48.32, 1.75003, 48.32003)])  # ~2 m x 3 m
    with pytest.raises(InputError, match=r"tiny.geojson covers .* less than one 10 m pixel"):
        load_aoi(tiny)
    bow = _geojson(tmp_path / "bow.geojson", [shapely.Polygon([(1.70, 48.30), (1.71, 48.31), (1.71, 48.30),
                                                               (1.70, 48.31)])])
    with pytest.raises(InputError, match="invalid polygons"):
        load_aoi(bow)
