"""ndvi_scale.analytics.aoi and ``compute --aoi``: the pieces (bbox from polygons, pixel-centre mask, provenance
digest, clear errors), then runs on a tiny sample: outside NaN, inside the bbox run's pixels bit for bit, chunks
outside not read, provenance and STAC footprint, resume and append, another AOI refused."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
import rioxarray  # noqa: F401  (the .rio accessor)
import shapely
import xarray as xr

from ndvi_scale.analytics.aoi import aoi_mask, load_aoi
from ndvi_scale.config import RunConfig
from ndvi_scale.errors import GridMismatchError, InputError
from ndvi_scale.pipeline import build, run
from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.write import write_cube
from stac_schemas import assert_valid


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


# ------------------------------------------------------------------------------------------------- compute --aoi

SPEC = SampleSpec(size=128, blocksize=128, start=dt.date(2024, 4, 1), end=dt.date(2024, 6, 10))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-aoi-sample")
    generate(root, SPEC)
    return root / "items.json"


def _two_fields(tmp_path, name="aoi.geojson", shift=0.0):
    """Two polygons in opposite corners of the tiny sample (a triangle top-left, a box bottom-right): the grid of
    their bounds has chunks (64 px) that neither reaches."""
    w, s, e, n = SPEC.bbox_lonlat()
    dx, dy = (e - w) / 10, (n - s) / 10
    tri = shapely.Polygon([(w + dx, n - dy), (w + 3.5 * dx + shift * dx, n - dy), (w + dx, n - 3.5 * dy)])
    box = shapely.box(e - 3.5 * dx, s + dy, e - dx, s + 3.5 * dy)
    return _geojson(tmp_path / name, [tri, box])


def _cfg(tiny, **kw):
    base = dict(start="2024-04-01", end="2024-05-31", catalog=str(tiny), chunk=64, method="max")
    base.update(kw)
    return RunConfig.create(**base)


def _inside(ds, cfg):
    geom = cfg.aoi.in_crs(ds.rio.crs)
    X, Y = np.meshgrid(ds.x.values, ds.y.values)
    return shapely.contains_xy(geom, X, Y)


def test_aoi_run_is_the_bbox_run_inside_and_nan_outside(tiny, tmp_path):
    cfg = _cfg(tiny, aoi=_two_fields(tmp_path))
    ref = build(_cfg(tiny, bbox=cfg.aoi.bbox)).compute()
    got = build(cfg).compute()
    assert got.ndvi.shape == ref.ndvi.shape and got.ndvi.shape[1:] == (len(got.y), len(got.x))
    np.testing.assert_array_equal(got.x.values, ref.x.values)
    np.testing.assert_array_equal(got.y.values, ref.y.values)
    inside = _inside(got, cfg)
    assert 0.1 < inside.mean() < 0.5, "the AOI covers part of its bbox only"
    for t in range(got.sizes["time"]):
        for var in ("ndvi", "valid_count", "max_date"):
            g, r = got[var].values[t], ref[var].values[t]
            assert np.array_equal(g[inside], r[inside], equal_nan=True), (var, t)  # bit for bit
        assert np.isnan(got.ndvi.values[t][~inside]).all()
        assert np.isnat(got.max_date.values[t][~inside]).all()
        assert (got.valid_count.values[t][~inside] == 0).all()
        assert np.isfinite(got.ndvi.values[t][inside]).mean() > 0.5  # real values inside, not NaN everywhere


def test_chunks_outside_the_aoi_are_not_read(tiny, tmp_path, monkeypatch):
    import ndvi_scale.engine.task as task

    cfg = _cfg(tiny, aoi=_two_fields(tmp_path))
    reads: list = []
    real = task.reader_for

    class Recording:
        def __init__(self, reader):
            self._reader = reader

        def read(self, window, policy):  # the chunk of a window: its centre (the SCL's has the mask filters' margin)
            reads.append((int(window.row_off + window.height // 2), int(window.col_off + window.width // 2)))
            return self._reader.read(window, policy)

        def start(self, window, policy):  # the engine's fetch-then-decode read
            reads.append((int(window.row_off + window.height // 2), int(window.col_off + window.width // 2)))
            return self._reader.start(window, policy)

        def __getattr__(self, name):
            return getattr(self._reader, name)

    monkeypatch.setattr(task, "reader_for", lambda href, grid: Recording(real(href, grid)))
    ds = build(cfg)
    ds.compute(scheduler="threads")
    ny, nx = (len(c) for c in ds.ndvi.data.chunks[1:])
    inside = _inside(ds, cfg)
    assert reads, "no read was recorded: the engine reads through another method now"
    read_chunks = {(r // 64, c // 64) for r, c in reads}
    with_centres = {(i, j) for i in range(ny) for j in range(nx) if inside[i * 64 : (i + 1) * 64,
                                                                          j * 64 : (j + 1) * 64].any()}
    assert read_chunks == with_centres, (read_chunks, with_centres)
    assert {(0, 0), (ny - 1, nx - 1)} <= with_centres and len(with_centres) < ny * nx  # some chunks not read


def test_written_cube_records_the_aoi_resumes_and_appends(tiny, tmp_path):
    aoi = _two_fields(tmp_path)
    url = str(tmp_path / "aoi.zarr")
    cfg = _cfg(tiny, aoi=aoi, out=url, end="2024-04-30")

    def stop(done, total):
        if done >= 2:
            raise RuntimeError("stopped on purpose")

    with pytest.raises(RuntimeError, match="stopped on purpose"):
        write_cube(build(cfg), url, progress=stop)
    report = run(cfg).write
    assert report is not None and report.resumed and 0 < report.regions_written < report.regions_total
    report = run(cfg.replace(end=dt.date(2024, 5, 31), append=True)).write  # one more month, same AOI
    assert report is not None and report.periods_written == ("2024-05-01",)

    ref = build(_cfg(tiny, aoi=aoi)).compute()
    cube = xr.open_zarr(url, decode_coords="all")
    for var in ("ndvi", "valid_count", "max_date"):
        assert np.array_equal(cube[var].values, ref[var].values, equal_nan=True), var
    prov = json.loads(cube.attrs["ndvi_scale_aoi"])
    assert prov["digest"] == cfg.aoi.digest and prov["source"] == aoi and prov["polygons"] == 2
    assert "centre" in prov["rule"]
    item = assert_valid(url + ".stac-item.json")  # stac-validator, every declared schema, on the raw file
    footprint = shapely.geometry.shape(item["geometry"])
    assert footprint.geom_type == "MultiPolygon"
    assert shapely.equals_exact(shapely.normalize(footprint), shapely.normalize(cfg.aoi.geometry), tolerance=1e-6)
    assert item["bbox"] == pytest.approx(list(cfg.aoi.bbox), abs=1e-6)

    other = _two_fields(tmp_path, "other.geojson", shift=1.0)  # another triangle, the same bbox
    assert load_aoi(other).bbox == cfg.aoi.bbox
    with pytest.raises(GridMismatchError, match=r"AOI: cube sha256:\w+… from .*aoi.geojson, this run sha256:\w+… "
                                                r"from .*other.geojson"):
        run(_cfg(tiny, aoi=other, out=url, start="2024-06-01", end="2024-06-10", append=True))
    assert xr.open_zarr(url).sizes["time"] == 2  # nothing written


def test_aoi_input_errors_name_the_file_and_the_fix(tiny, tmp_path):
    with pytest.raises(InputError, match=r"^aoi file .*missing.geojson does not exist; give a GeoJSON"):
        _cfg(tiny, aoi=str(tmp_path / "missing.geojson"))
    bad = tmp_path / "bad.gpkg"
    bad.write_text("not a geopackage")
    with pytest.raises(InputError, match=r"^aoi file .*bad.gpkg cannot be read as vector data; give a GeoJSON"):
        _cfg(tiny, aoi=str(bad))
    with pytest.raises(InputError, match=r"bbox [\d.,]+ differs from the bbox of aoi .*aoi.geojson'; give either"):
        _cfg(tiny, aoi=_two_fields(tmp_path), bbox=SPEC.bbox_lonlat())
    cfg = _cfg(tiny, aoi=_two_fields(tmp_path))
    assert _cfg(tiny, **{k: v for k, v in cfg.to_dict().items() if k in ("aoi", "bbox")}) == cfg  # as recorded
    with pytest.raises(InputError, match="bbox is missing.*or --aoi FILE"):
        _cfg(tiny)
    with pytest.raises(InputError, match=r"^aoi 123 is not a polygon file; give --aoi FILE"):
        _cfg(tiny, aoi=123)
    with pytest.raises(InputError, match=r"^aoi 'x{20}.*… is not a file path; give --aoi FILE"):
        _cfg(tiny, aoi="x" * 100_000)
    field = shapely.box(1.75, 48.32, 1.76, 48.33)  # the API also takes shapely polygons (EPSG:4326)
    assert _cfg(tiny, aoi=field).bbox.as_tuple() == pytest.approx((1.75, 48.32, 1.76, 48.33))


def test_run_file_takes_an_aoi(tiny, tmp_path):
    from ndvi_scale.runfile import run_config_from

    aoi = _two_fields(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(f"aoi: {aoi}\nstart: 2024-04-01\nend: 2024-05-31\ncatalog: {tiny}\n")
    cfg, _ = run_config_from(path)
    assert cfg.aoi is not None and cfg.aoi.digest == load_aoi(aoi).digest and cfg.bbox.as_tuple() == cfg.aoi.bbox
