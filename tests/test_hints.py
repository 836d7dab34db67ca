"""Hints that lead to the fix (ndvi_scale.hints and where they are used): what a catalog covers and swapped
lat/lon on a search without scenes, the settings that differ on a refused re-run, the output checked before the
search, the note while the sample is generated, and no zarr warning on an unfinished cube."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import xarray as xr

import ndvi_scale
from ndvi_scale.errors import NoScenesError, OutputExistsError
from ndvi_scale.hints import config_changes, coverage_hint, describe_changes, swapped_matches
from ndvi_scale.sample import SampleSpec, generate

SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 20), end=dt.date(2024, 6, 15))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("hints-sample")
    generate(root, SPEC)
    return str(root / "items.json")


def _bbox() -> tuple[float, float, float, float]:
    w, s, e, n = SPEC.bbox_lonlat()
    return (w, s, e, n)


def test_swapped_bbox_is_named_with_the_fix(catalog: str) -> None:
    w, s, e, n = _bbox()
    with pytest.raises(NoScenesError) as err:
        ndvi_scale.compute(bbox=(s, w, n, e), start="2024-04-20", end="2024-06-15", catalog=catalog)
    msg = str(err.value)
    assert "the catalog covers bbox" in msg and "\n" not in msg
    assert "longitude and latitude swapped" in msg
    fix = msg.split("swapped: --bbox ", 1)[1].split(" (W S E N)")[0]
    fixed = tuple(float(v) for v in fix.split())
    assert fixed == pytest.approx((w, s, e, n), abs=1e-4)
    ds = ndvi_scale.compute(bbox=fixed, start="2024-04-20", end="2024-06-15", catalog=catalog)  # the fix works
    assert ds.sizes["time"] == 3


def test_dates_outside_the_catalog_are_named(catalog: str) -> None:
    with pytest.raises(NoScenesError) as err:
        ndvi_scale.compute(bbox=_bbox(), start="2023-01-01", end="2023-03-31", catalog=catalog)
    msg = str(err.value)
    assert "from 2024-04-20 to 2024-06-1" in msg and "your dates 2023-01-01..2023-03-31 lie outside it" in msg
    assert "swapped" not in msg


def test_hint_helpers() -> None:
    sample = (1.706, 48.307, 1.878, 48.382)
    assert swapped_matches((48.307, 1.706, 48.382, 1.878), sample)
    assert not swapped_matches(sample, sample) and not swapped_matches((10, 10, 11, 11), sample)
    text = coverage_hint((5, 40, 6, 41), dt.date(2024, 1, 1), dt.date(2024, 2, 1), sample,
                         dt.date(2024, 1, 2), dt.date(2024, 12, 31), "the sample catalog")
    assert text == "the sample catalog covers bbox 1.706 48.307 1.878 48.382 in 2024; your bbox lies outside it"
    changes = config_changes({"method": "median", "period": "week", "resolution": 10.0, "out": "a"},
                             {"method": "max", "period": "week", "resolution": 10, "out": "b"})
    assert changes == [("method", "median", "max")]
    assert describe_changes(changes) == "method 'median' -> 'max'"


def test_refused_rerun_names_the_settings_that_differ(catalog: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from ndvi_scale import write as write_module

    out = str(tmp_path / "c.zarr")
    args: dict[str, Any] = dict(bbox=_bbox(), start="2024-04-20", end="2024-06-15", catalog=catalog, out=out)

    def die(self: Any, *a: Any, **k: Any) -> None:
        raise KeyboardInterrupt  # killed once the template is written: an unfinished cube

    with monkeypatch.context() as patched:
        patched.setattr(write_module._Writer, "_regions_and_finish", die)
        with pytest.raises(KeyboardInterrupt):
            ndvi_scale.compute(**args, method="median")
    # the unfinished cube opens without zarr's "not recognized as a component of a Zarr hierarchy" warning
    assert (tmp_path / "c.zarr" / ".ndvi-scale" / "zarr.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xr.open_zarr(out, consolidated=False).close()
    with pytest.raises(OutputExistsError) as err:
        ndvi_scale.compute(**args, method="max", resolution=20)
    msg = str(err.value)
    assert "method 'median' -> 'max'" in msg and "resolution 10 -> 20" in msg, msg
    assert "3 periods 2024-04-01..2024-06-01" in msg and "\n" not in msg
    ds = ndvi_scale.compute(**args, method="median")  # the same command resumes it
    assert ds.sizes["time"] == 3 and not (tmp_path / "c.zarr" / ".ndvi-scale").exists()


def test_old_unfinished_cube_without_group_doc_resumes(catalog: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A cube interrupted by a version without the group doc (a bare .ndvi-scale folder) still resumes."""
    from ndvi_scale import write as write_module

    out = tmp_path / "c.zarr"
    args: dict[str, Any] = dict(bbox=_bbox(), start="2024-04-20", end="2024-06-15", catalog=catalog, out=str(out),
                                chunk=64)
    calls = {"n": 0}
    real = write_module._write_region

    def some(*a: Any, block_info: Any = None, **k: Any) -> Any:  # dask passes block_info by name
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*a, block_info=block_info, **k)

    with monkeypatch.context() as patched:
        patched.setattr(write_module, "_write_region", some)
        with pytest.raises(KeyboardInterrupt):
            ndvi_scale.compute(**args)
    done = list((out / ".ndvi-scale" / "done").rglob("*-*"))
    assert done, "no region was written before the interruption"
    (out / ".ndvi-scale" / "zarr.json").unlink()  # as an older version left it
    ds = ndvi_scale.compute(**args)
    assert ds.sizes["time"] == 3 and not (out / ".ndvi-scale").exists()
    whole = ndvi_scale.compute(**{**args, "out": None}).compute()
    xr.testing.assert_equal(ds.ndvi.load(), whole.ndvi)


def test_unwritable_out_is_refused_before_the_search(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"}
    missing_catalog = str(tmp_path / "no-such-items.json")  # a search would fail with another message
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "ndvi_scale", "compute", "--bbox", "1.7", "48.3", "1.8", "48.4", "--start",
         "2024-01-01", "--end", "2024-01-31", "--catalog", missing_catalog, "--out", "/proc/x.zarr"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert r.returncode == 9, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: cannot write to /proc/x.zarr") and "choose a writable --out" in line
    assert "no-such-items" not in line and time.monotonic() - t0 < 60
    assert not os.path.exists("/proc/x.zarr")


def test_sample_generation_is_announced_once(tmp_path: Path) -> None:
    from ndvi_scale.search import prepare_sample

    lines: list[str] = []
    spec = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 5, 1), end=dt.date(2024, 5, 20))
    path = prepare_sample(lines.append, after=0.0, cache_dir=tmp_path, spec=spec)
    assert Path(path).is_file() and Path(path).parent.parent == tmp_path.resolve()
    assert len(lines) == 2 and lines[0].startswith("generating the embedded sample catalog")
    assert lines[1].startswith("sample catalog generated in ") and str(Path(path).parent) in lines[1]
    again: list[str] = []
    assert prepare_sample(again.append, cache_dir=tmp_path, spec=spec) == path
    assert again == [], "a cached sample is used silently"
