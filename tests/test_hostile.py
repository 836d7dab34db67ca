"""Hostile or broken catalogs (issue K): NaN/inf or whole-world footprints and asset hrefs a catalog may not
point at are skipped with a reason before anything is opened; a whole-world --bbox is one clear error.

The href policy (:class:`ndvi_scale.search.HrefPolicy`): http(s)/s3/gs from any catalog; local paths only from a
local catalog and inside its folder tree, unless --allow-local; /vsi... and other schemes never.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ndvi_scale.config import RunConfig
from ndvi_scale.errors import InputError, NoScenesError
from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.search import HrefPolicy, filter_items, footprint_problem, search

SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 2), end=dt.date(2024, 4, 30), field_size=160)
NAN = float("nan")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    generate(root, SPEC)
    return root / "items.json"


def _features(catalog: Path) -> list[dict[str, Any]]:
    return json.loads(catalog.read_text())["features"]


def _cfg(catalog: Path | str, **kw: Any) -> RunConfig:
    return RunConfig.create(bbox=SPEC.bbox_lonlat(), start="2024-04-01", end="2024-04-30", catalog=str(catalog),
                            **kw)


def _write(path: Path, features: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


SQUARE = [[[1.6, 48.2], [2.0, 48.2], [2.0, 48.5], [1.6, 48.5], [1.6, 48.2]]]
WORLD = [[[-180, -90], [180, -90], [180, 90], [-180, 90], [-180, -90]]]


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"bbox": [1.6, 48.2, NAN, 48.5]}, "bbox [1.6, 48.2, nan, 48.5] is not 4 or 6 finite numbers"),
        ({"bbox": [1.6, float("inf"), 2.0, 48.5]}, "not 4 or 6 finite numbers"),
        ({"bbox": ["1.6", 48.2, 2.0, 48.5]}, "not 4 or 6 finite numbers"),
        ({"bbox": [1.6, 48.2, 2.0]}, "not 4 or 6 finite numbers"),
        ({"bbox": [-180, -90, 180, 90]}, "spans 360 x 180 degrees, not one granule"),
        ({"bbox": [179.5, 60, -179.5, 61]}, "crosses the antimeridian"),
        ({"bbox": [1.6, 48.2, 200, 48.5]}, "out of range"),
        ({"geometry": {"type": "Polygon", "coordinates": [[[1.6, NAN], [2.0, 48.2], [1.6, 48.2]]]}},
         "geometry position [1.6, nan] is not finite numbers"),
        ({"geometry": {"type": "Polygon", "coordinates": WORLD}}, "geometry spans 360 x 180 degrees"),
        ({"geometry": {"type": "Polygon"}}, "has no coordinates"),
        ({"geometry": {"type": "Polygon", "coordinates": [[["a", "b"]]]}}, "not finite numbers"),
    ],
)
def test_bad_footprints_are_named(item: dict[str, Any], reason: str) -> None:
    problem = footprint_problem(item)
    assert problem is not None and problem.startswith("invalid footprint (") and reason in problem, problem
    assert len(problem) < 200


def test_good_footprints_pass() -> None:
    assert footprint_problem({}) is None
    assert footprint_problem({"bbox": [1.6, 48.2, 2.0, 48.5], "geometry": {"type": "Polygon",
                                                                          "coordinates": SQUARE}}) is None
    assert footprint_problem({"bbox": [1.6, 48.2, 0, 2.0, 48.5, 10]}) is None  # 3D bbox
    multi = {"type": "MultiPolygon", "coordinates": [SQUARE, SQUARE]}
    assert footprint_problem({"geometry": multi}) is None


def test_href_policy() -> None:
    local = HrefPolicy(remote=False, root="/data/catalog")
    remote = HrefPolicy(remote=True)
    for ok in ("https://h/x.tif", "http://h/x.tif?sig=1", "s3://b/x.tif", "gs://b/x.tif"):
        assert local.problem(ok) is None and remote.problem(ok) is None
    assert local.problem("/data/catalog/S2/B04.tif") is None
    assert local.problem("file:///data/catalog/S2/B04.tif") is None
    for bad, why in [("/etc/passwd", "outside the catalog's folder"),
                     ("/data/catalog/../../etc/passwd", "outside the catalog's folder"),
                     ("file:///etc/passwd", "outside the catalog's folder"),
                     ("/data/catalog-evil/B04.tif", "outside the catalog's folder"),
                     ("/vsicurl/http://169.254.169.254/latest", "GDAL virtual file systems"),
                     ("/vsizip//data/catalog/a.zip/B04.tif", "GDAL virtual file systems"),
                     ("ftp://h/B04.tif", "expected http(s)://, s3:// or gs://")]:
        problem = local.problem(bad)
        assert problem is not None and why in problem, (bad, problem)
    assert "a local file in a remote catalog" in (remote.problem("/data/catalog/S2/B04.tif") or "")
    opened = HrefPolicy(remote=True, allow_local=True)
    assert opened.problem("/etc/hosts") is None and opened.problem("/vsicurl/http://h/x") is not None


def test_hostile_items_are_skipped_with_a_reason_and_the_rest_is_used(sample: Path, tmp_path: Path) -> None:
    features = _features(sample)
    assert len(features) >= 8
    hostile = copy.deepcopy(features)
    edits = {
        0: ("bbox", lambda f: f.update(bbox=[NAN, 48.2, 2.0, 48.5])),
        1: ("geometry", lambda f: f["geometry"]["coordinates"][0][0].__setitem__(1, float("inf"))),
        2: ("whole world", lambda f: f.update(bbox=[-180, -90, 180, 90],
                                              geometry={"type": "Polygon", "coordinates": WORLD})),
        3: ("file://", lambda f: f["assets"]["red"].update(href="file:///etc/passwd")),
        4: ("../", lambda f: f["assets"]["nir"].update(href="../../../../../../etc/passwd")),
        5: ("/vsi", lambda f: f["assets"]["scl"].update(href="/vsicurl/http://169.254.169.254/latest/x.tif")),
        6: ("outside", lambda f: f["assets"]["red"].update(href=str(tmp_path / "elsewhere" / "B04.tif"))),
    }
    for i, (_, edit) in edits.items():
        edit(hostile[i])
    catalog = _write(sample.parent / "hostile.json", hostile)  # beside the COGs: their hrefs are inside
    result = search(_cfg(catalog))
    reasons = {s.id: s.reason for s in result.skipped}
    assert set(reasons) == {hostile[i]["id"] for i in edits}, reasons
    assert "invalid footprint (bbox" in reasons[hostile[0]["id"]]
    assert "invalid footprint (geometry" in reasons[hostile[1]["id"]]
    assert "not one granule" in reasons[hostile[2]["id"]]
    for i in (3, 4, 6):
        assert "outside the catalog's folder" in reasons[hostile[i]["id"]]
    assert "GDAL virtual file systems" in reasons[hostile[5]["id"]]
    assert {it.id for it in result.items} == {f["id"] for f in features[len(edits):]}
    assert "asset href not allowed x4" in result.summary() and "invalid footprint x3" in result.summary()

    # --allow-local lifts the folder rule only
    opened = search(_cfg(catalog, allow_local=True))
    still = {s.id for s in opened.skipped}
    assert hostile[3]["id"] not in still and hostile[6]["id"] not in still
    assert hostile[5]["id"] in still and hostile[0]["id"] in still

    # nothing usable left: one error listing why
    only_bad = _write(sample.parent / "only-bad.json", [hostile[i] for i in edits])
    with pytest.raises(NoScenesError) as e:
        search(_cfg(only_bad))
    assert "7 skipped" in str(e.value) and "asset href not allowed x4" in str(e.value)


def test_filter_items_without_a_policy_is_unchanged(sample: Path) -> None:
    """Callers that pass no policy (tests, notebooks filtering their own items) keep the old behaviour."""
    raw = _features(sample)
    raw[0]["assets"]["red"]["href"] = "/elsewhere/B04.tif"
    items, skipped = filter_items(raw, _cfg(sample))
    assert raw[0]["id"] in {it.id for it in items} and not skipped


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def test_cli_records_skipped_hostile_items_and_a_remote_catalog_may_not_point_at_local_files(
    sample: Path, tmp_path: Path
) -> None:
    hostile = _features(sample)
    hostile[0]["assets"]["red"]["href"] = "/vsicurl/http://169.254.169.254/latest/meta-data"
    hostile[1]["bbox"] = [NAN, NAN, NAN, NAN]
    catalog = _write(sample.parent / "cli-hostile.json", hostile)
    out = tmp_path / "cube.zarr"
    bbox = [f"{v:.5f}" for v in SPEC.bbox_lonlat()]
    r = _cli("compute", "--bbox", *bbox, "--start", "2024-04-01", "--end", "2024-04-30", "--catalog",
             str(catalog), "--out", str(out), "--chunk", "64")
    assert r.returncode == 0, r.stderr
    assert "2 skipped (" in r.stderr and "asset href not allowed x1" in r.stderr, r.stderr
    import xarray as xr

    with xr.open_zarr(out) as cube:
        recorded = {s["id"]: s["reason"] for s in json.loads(cube.attrs["ndvi_scale_skipped"])}
    assert "GDAL virtual file systems" in recorded[hostile[0]["id"]]
    assert "invalid footprint" in recorded[hostile[1]["id"]]


@pytest.mark.parametrize("bbox", [["-180", "-80", "180", "80"], ["-100", "0", "0", "10"]])
def test_whole_world_bbox_is_one_clear_error(bbox: list[str], tmp_path: Path) -> None:
    r = _cli("compute", "--bbox", *bbox, "--start", "2024-01-01", "--end", "2024-01-31", "--catalog", "sample",
             "--out", str(tmp_path / "w.zarr"), cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "degrees of longitude" in lines[0] and "split the area" in lines[0]
    assert "Chunks do not add up" not in r.stderr and not (tmp_path / "w.zarr").exists()


def test_grid_extent_check() -> None:
    from ndvi_scale.config import check_grid_extent, format_bbox

    check_grid_extent(format_bbox([1.7, 48.3, 1.9, 48.4]), 32631, 10)
    with pytest.raises(InputError, match="px grid in EPSG:32626 at 10 m"):
        check_grid_extent(format_bbox([-30, -80, 30, 80]), 32626, 10)
