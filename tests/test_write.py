"""Tests of ndvi_scale.write against a local folder, a GCS emulator and a SeaweedFS S3 server.

The cubes are small synthetic composites built lazily with dask (values depend on the period date and pixel
position only, so any subset of periods computes the same bytes). ``python tests/test_write.py writer ...`` is
the subprocess that the kill-and-resume test SIGKILLs in the middle of a write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

# ---------------------------------------------------------------------------------- synthetic cubes


def _period_days(periods: Iterable[str]) -> np.ndarray:
    return (pd.to_datetime(list(periods)) - pd.Timestamp("2024-01-01")).days.to_numpy()


def _grid(block_info: dict[Any, Any], days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    (t0, t1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    return np.meshgrid(days[t0:t1], np.arange(y0, y1), np.arange(x0, x1), indexing="ij")


def _ndvi_block(
    *, days: np.ndarray, sleep: float, count_dir: str | None, block_info: dict[Any, Any] | None = None
) -> np.ndarray:
    assert block_info is not None
    if sleep:
        time.sleep(sleep)
    if count_dir:  # side channel: one file per computed block
        (t0, _), (y0, _), (x0, _) = block_info[None]["array-location"]
        Path(count_dir, f"{days[t0]}-{y0}-{x0}-{uuid.uuid4().hex}").touch()
    tt, yy, xx = _grid(block_info, days)
    v = np.sin(0.05 * xx + 0.02 * tt) * np.cos(0.07 * yy + 0.01 * tt)
    v[(xx + 2 * yy + tt) % 11 == 0] = np.nan  # "no valid observation"
    return v.astype(np.float32)


def _count_block(*, days: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    assert block_info is not None
    tt, yy, xx = _grid(block_info, days)
    return ((3 * xx + yy + tt) % 7).astype(np.uint16)


def _max_date_block(
    *, starts: np.ndarray, days: np.ndarray, block_info: dict[Any, Any] | None = None
) -> np.ndarray:
    assert block_info is not None
    tt, yy, xx = _grid(block_info, days)
    t0 = block_info[None]["array-location"][0][0]
    base = starts[t0 : t0 + 1].astype("datetime64[ns]")[:, None, None]
    out = base + ((xx + yy) % 28).astype("timedelta64[D]")
    out[(xx + 2 * yy + tt) % 11 == 0] = np.datetime64("NaT")
    return out


def make_cube(
    periods: Iterable[str] = ("2024-01-01",),
    *,
    ny: int = 70,
    nx: int = 80,
    chunk: int = 32,
    res: float = 10.0,
    x0: float = 300000.0,
    y0: float = 5000000.0,
    crs: str = "EPSG:32631",
    with_max_date: bool = False,
    sleep: float = 0.0,
    count_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> xr.Dataset:
    """A lazy monthly NDVI composite shaped like the pipeline's output (dims time, y, x; chunks (1, C, C))."""
    periods = list(periods)
    starts = pd.to_datetime(periods).to_numpy().astype("datetime64[ns]")
    ends = np.array(
        [(pd.Timestamp(p) + pd.offsets.MonthEnd(0)).to_datetime64() for p in periods], "datetime64[ns]"
    )
    days = _period_days(periods)
    chunks = (
        (1,) * len(periods),
        da.core.normalize_chunks(chunk, (ny,))[0],
        da.core.normalize_chunks(chunk, (nx,))[0],
    )
    ndvi = da.map_blocks(
        _ndvi_block,
        days=days,
        sleep=sleep,
        count_dir=str(count_dir) if count_dir else None,
        chunks=chunks,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )
    count = da.map_blocks(
        _count_block, days=days, chunks=chunks, dtype=np.uint16, meta=np.empty((0, 0, 0), np.uint16)
    )
    data_vars: dict[str, Any] = {
        "ndvi": (
            ("time", "y", "x"),
            ndvi,
            {"long_name": "normalized difference vegetation index", "units": "1"},
        ),
        "valid_count": (
            ("time", "y", "x"),
            count,
            {"long_name": "number of valid observations", "units": "1"},
        ),
    }
    if with_max_date:
        md = da.map_blocks(
            _max_date_block,
            starts=starts,
            days=days,
            chunks=chunks,
            dtype="datetime64[ns]",
            meta=np.empty((0, 0, 0), "datetime64[ns]"),
        )
        data_vars["max_date"] = (("time", "y", "x"), md, {"long_name": "date of the maximum NDVI"})
    cfg = {
        "bbox": [1.0, 45.0, 1.1, 45.1],
        "period": "month",
        "method": "median",
        "chunk": chunk,
        "out": "ignored",
    }
    cfg.update(config or {})
    ds = xr.Dataset(
        data_vars,
        coords={
            "time": ("time", starts, {"long_name": "period start"}),
            "time_end": ("time", ends, {"long_name": "period end (inclusive)"}),
            "y": (
                "y",
                y0 - res * (np.arange(ny) + 0.5),
                {"units": "m", "standard_name": "projection_y_coordinate"},
            ),
            "x": (
                "x",
                x0 + res * (np.arange(nx) + 0.5),
                {"units": "m", "standard_name": "projection_x_coordinate"},
            ),
        },
        attrs={
            "Conventions": "CF-1.10",
            "title": "NDVI median composite (test)",
            "ndvi_scale_config": json.dumps(cfg),
            "ndvi_scale_items": json.dumps(["S2A_TEST_1", "S2B_TEST_2"]),
        },
    )
    return ds.rio.write_crs(crs)


# --------------------------------------------------------------------------------------------- store helpers


def store_bytes(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Every object of a store, by key relative to the store root."""
    from ndvi_scale.storage import open_location

    loc = open_location(url, storage_options)
    root = loc.path.rstrip("/") + "/"
    return {p[len(root) :]: bytes(loc.fs.cat_file(p)) for p in loc.fs.find(loc.path) if p.startswith(root)}


def markers(url: str) -> list[str]:
    from ndvi_scale.storage import open_location
    from ndvi_scale.write import MARKER_DIR

    loc = open_location(url)
    return loc.fs.find(loc.join(MARKER_DIR))


def open_cube(url: str) -> xr.Dataset:
    from ndvi_scale.storage import open_location

    return xr.open_zarr(open_location(url).store, decode_coords="all")


# ============================================================================================ tests

from ndvi_scale.errors import GridMismatchError, OutputError, OutputExistsError  # noqa: E402
from ndvi_scale.write import WRITE_ATTR, check_output, write_cube, write_zarr  # noqa: E402
from stac_schemas import assert_valid  # noqa: E402

pytestmark = pytest.mark.usefixtures("clean_cloud_env")


@pytest.fixture(params=["local", "gs", "s3"])
def out_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An output URL on each backend (credentials/endpoint in the environment, as a user would have them)."""
    if request.param == "local":
        return str(tmp_path / "out" / "ndvi.zarr")
    bucket = request.getfixturevalue("gcs_bucket" if request.param == "gs" else "s3_bucket")
    return f"{request.param}://{bucket}/cubes/ndvi.zarr"


def test_round_trip(out_url: str) -> None:
    ds = make_cube(["2024-01-01", "2024-02-01"], with_max_date=True)
    calls: list[tuple[int, int]] = []
    report = write_cube(ds, out_url, progress=lambda d, t: calls.append((d, t)))

    assert report.regions_total == report.regions_written == 2 * 3 * 3
    assert report.regions_skipped == 0 and not report.resumed
    assert report.periods_written == ("2024-01-01", "2024-02-01")
    assert calls[0] == (0, 18) and calls[-1] == (18, 18)
    keys = store_bytes(out_url)
    assert "zarr.json" in keys and "ndvi/zarr.json" in keys, "Zarr v3 by default"
    assert not [k for k in keys if k.startswith(".ndvi-scale")], "progress markers are removed at the end"

    back = open_cube(out_url)
    expected = ds.compute()
    np.testing.assert_array_equal(back["ndvi"].values, expected["ndvi"].values)  # NaN == NaN here
    assert back["ndvi"].dtype == np.float32 and back["valid_count"].dtype == np.uint16
    np.testing.assert_array_equal(back["valid_count"].values, expected["valid_count"].values)
    np.testing.assert_array_equal(back["max_date"].values, expected["max_date"].values)
    for name in ("time", "time_end", "x", "y"):
        np.testing.assert_array_equal(back[name].values, expected[name].values)
    assert back["ndvi"].encoding["chunks"] == (1, 32, 32)
    assert back.rio.crs == expected.rio.crs and back.rio.crs.to_epsg() == 32631
    assert back["ndvi"].attrs["long_name"] == expected["ndvi"].attrs["long_name"]
    assert back["ndvi"].encoding.get("grid_mapping", back["ndvi"].attrs.get("grid_mapping")) == "spatial_ref"
    for key in ("Conventions", "title", "ndvi_scale_config", "ndvi_scale_items"):
        assert back.attrs[key] == ds.attrs[key]
    assert json.loads(back.attrs[WRITE_ATTR])["state"] == "complete"

    _check_stac(out_url, report.stac_item_url)


def _check_stac(out_url: str, item_url: str | None) -> None:
    import pystac

    from ndvi_scale.storage import open_location

    assert item_url == out_url + ".stac-item.json"
    loc = open_location(item_url)
    raw = loc.fs.cat_file(loc.path)
    with tempfile.TemporaryDirectory() as tmp:  # stac-validator reads a file: the raw bytes as written
        Path(tmp, "item.json").write_bytes(raw)
        assert_valid(Path(tmp, "item.json"))
    item = pystac.Item.from_dict(json.loads(raw))
    assert item.id == "ndvi"
    assert item.properties["start_datetime"] == "2024-01-01T00:00:00Z"
    assert item.properties["end_datetime"] == "2024-02-29T23:59:59Z"
    assert item.properties["proj:code"] == "EPSG:32631"
    assert "proj:epsg" not in json.loads(raw)["properties"], "projection v2 has no proj:epsg"
    assert item.properties["proj:shape"] == [70, 80]
    assert item.properties["proj:transform"] == [10.0, 0.0, 300000.0, 0.0, -10.0, 5000000.0]
    assert "ndvi-scale" in item.properties["processing:software"]
    west, south, east, north = item.bbox
    # (300000, 5000000) in UTM 31N is near (0.46E, 45.12N); the grid is 800 m x 700 m.
    assert 0.45 < west < east < 0.48 and 45.11 < south < north < 45.13, item.bbox
    assert 0.009 < east - west < 0.011 and 0.005 < north - south < 0.007
    asset = item.assets["zarr"]
    assert asset.href == "./ndvi.zarr" and asset.roles == ["data"]
    assert asset.media_type == "application/vnd.zarr; version=3"
    assert item.get_self_href() == item_url and asset.get_absolute_href() == out_url
    assert asset.extra_fields["xarray:open_kwargs"]["engine"] == "zarr"
    text = json.dumps(item.to_dict())
    assert "test-secret" not in text and "ndvi-scale-tests" not in text, "no credentials in the STAC item"


def test_append_second_month(out_url: str) -> None:
    write_cube(make_cube(["2024-01-01"]), out_url)
    before = store_bytes(out_url)
    jan_chunks = {k: v for k, v in before.items() if k.startswith(("ndvi/c/0/", "valid_count/c/0/"))}
    assert len(jan_chunks) == 2 * 9

    report = write_cube(make_cube(["2024-02-01"]), out_url, append=True)
    assert report.periods_written == ("2024-02-01",) and report.regions_written == 9

    after = store_bytes(out_url)
    assert {k: after[k] for k in jan_chunks} == jan_chunks, "January's chunks are untouched"
    back = open_cube(out_url)
    assert [str(t)[:10] for t in back["time"].values] == ["2024-01-01", "2024-02-01"]
    full = make_cube(["2024-01-01", "2024-02-01"]).compute()
    np.testing.assert_array_equal(back["ndvi"].values, full["ndvi"].values)
    np.testing.assert_array_equal(back["time_end"].values, full["time_end"].values)
    assert back.rio.crs.to_epsg() == 32631


def test_rerun_of_written_periods_is_a_noop(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(["2024-01-01", "2024-02-01"]), url)
    before = store_bytes(url)
    report = write_cube(make_cube(["2024-01-01", "2024-02-01"], sleep=5), url, append=True)
    assert report.regions_written == 0 and report.periods_skipped == ("2024-01-01", "2024-02-01")
    assert store_bytes(url) == before

    # A run covering an old and a new period only computes the new one.
    count_dir = tmp_path / "count"
    count_dir.mkdir()
    report = write_cube(make_cube(["2024-02-01", "2024-03-01"], count_dir=count_dir), url, append=True)
    assert report.periods_skipped == ("2024-02-01",) and report.periods_written == ("2024-03-01",)
    assert len(list(count_dir.iterdir())) == 9 == report.regions_written
    assert {k: v for k, v in store_bytes(url).items() if "/c/0/" in k or "/c/1/" in k} == {
        k: v for k, v in before.items() if "/c/0/" in k or "/c/1/" in k
    }


def test_append_overwrite_recomputes_in_place(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(["2024-01-01", "2024-02-01"]), url)
    before = store_bytes(url)
    report = write_cube(make_cube(["2024-02-01"]), url, append=True, overwrite=True)
    assert report.periods_written == ("2024-02-01",) and report.regions_written == 9
    after = store_bytes(url)
    chunks = {k for k in before if k.startswith(("ndvi/c/", "valid_count/c/"))}
    assert {k: after[k] for k in chunks} == {k: before[k] for k in chunks}  # deterministic recompute
    assert len(open_cube(url)["time"]) == 2


def test_existing_output_is_never_overwritten(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(["2024-01-01"]), url)
    before = store_bytes(url)
    item_before = Path(url + ".stac-item.json").read_bytes()
    with pytest.raises(
        OutputExistsError, match=r"already exists; pass --append .* --overwrite .* another --out"
    ):
        write_cube(make_cube(["2024-02-01"]), url)
    with pytest.raises(OutputExistsError):
        check_output(url)
    with pytest.raises(OutputExistsError):
        write_zarr(make_cube(["2024-01-01"]), url)
    assert store_bytes(url) == before and Path(url + ".stac-item.json").read_bytes() == item_before

    report = write_cube(make_cube(["2024-03-01"]), url, overwrite=True)
    assert [str(t)[:10] for t in open_cube(url)["time"].values] == ["2024-03-01"]
    assert report.regions_written == 9


@pytest.mark.parametrize("kind", ["file", "folder", "zarr"])
def test_foreign_path_is_refused_then_replaced_with_overwrite(tmp_path: Path, kind: str) -> None:
    url = tmp_path / "thing"
    if kind == "file":
        url.write_text("precious")
    elif kind == "folder":
        url.mkdir()
        (url / "notes.txt").write_text("precious")
    else:
        xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(url, zarr_format=3, consolidated=False)
    snapshot = sorted(
        (p.relative_to(tmp_path), p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*")
    )
    with pytest.raises(OutputExistsError, match="not an ndvi-scale cube"):
        write_cube(make_cube(), str(url))
    with pytest.raises(OutputExistsError, match="not an ndvi-scale cube"):
        write_cube(make_cube(), str(url), append=True)
    with pytest.raises(OutputExistsError):
        check_output(str(url))
    assert sorted(
        (p.relative_to(tmp_path), p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*")
    ) == (snapshot)
    write_cube(make_cube(), str(url), overwrite=True)
    assert open_cube(str(url))["ndvi"].shape == (1, 70, 80)


def test_empty_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert write_cube(make_cube(), str(tmp_path / "empty")).regions_written == 9


def test_overwrite_on_s3_deletes_only_the_cube(s3_bucket: str) -> None:
    from ndvi_scale.storage import open_location

    url = f"s3://{s3_bucket}/run/ndvi.zarr"
    loc = open_location(url)
    neighbours = {f"{s3_bucket}/run/ndvi.zarr2/keep": b"a", f"{s3_bucket}/run/ndvi.zarrx": b"b"}
    for path, data in neighbours.items():
        loc.fs.pipe_file(path, data)
    write_cube(make_cube(["2024-01-01"]), url)
    write_cube(make_cube(["2024-02-01"]), url, overwrite=True)
    assert [str(t)[:10] for t in open_cube(url)["time"].values] == ["2024-02-01"]
    for path, data in neighbours.items():
        assert loc.fs.cat_file(path) == data


def test_grid_mismatch_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(["2024-01-01"]), url)
    before = store_bytes(url)
    cases = {
        "resolution along x": make_cube(["2024-02-01"], res=20.0),
        "x coordinates": make_cube(["2024-02-01"], x0=300320.0),
        "CRS": make_cube(["2024-02-01"], crs="EPSG:32632"),
        "chunking": make_cube(["2024-02-01"], chunk=16),
        "variables": make_cube(["2024-02-01"], with_max_date=True),
    }
    for what, ds in cases.items():
        with pytest.raises(GridMismatchError, match=what):
            write_cube(ds, url, append=True)
    assert store_bytes(url) == before


def test_append_must_keep_time_sorted(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(["2024-03-01"]), url)
    with pytest.raises(OutputError, match="2024-01-01 is earlier than the last period 2024-03-01"):
        write_cube(make_cube(["2024-01-01"]), url, append=True)


def test_zarr_format_2(tmp_path: Path) -> None:
    url = str(tmp_path / "c2.zarr")
    write_cube(make_cube(["2024-01-01"], with_max_date=True), url, zarr_format=2)
    write_cube(make_cube(["2024-02-01"], with_max_date=True), url, append=True)  # keeps the cube's format
    keys = store_bytes(url)
    assert ".zgroup" in keys and ".zmetadata" in keys and "zarr.json" not in keys
    back = open_cube(url)
    full = make_cube(["2024-01-01", "2024-02-01"], with_max_date=True).compute()
    for name in ("ndvi", "valid_count", "max_date", "time", "time_end"):
        np.testing.assert_array_equal(back[name].values, full[name].values)
    assert back["valid_count"].dtype == np.uint16 and back.rio.crs.to_epsg() == 32631


@pytest.mark.parametrize(("first", "asked"), [(2, 3), (3, 2)])
def test_resume_or_append_in_another_zarr_format_is_refused_untouched(
    first: int, asked: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ndvi_scale import write as write_module

    url = str(tmp_path / "c.zarr")

    def die(self: Any, *args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:  # an unfinished write: template done, no region
        patched.setattr(write_module._Writer, "_regions_and_finish", die)
        with pytest.raises(KeyboardInterrupt):
            write_cube(make_cube(PERIODS), url, zarr_format=first)
    before = store_bytes(url)
    for call in (lambda: check_output(url, zarr_format=asked),
                 lambda: write_cube(make_cube(PERIODS), url, zarr_format=asked),
                 lambda: write_cube(make_cube(PERIODS), url, zarr_format=asked, append=True)):
        with pytest.raises(GridMismatchError) as err:
            call()
        msg = str(err.value)
        assert f"Zarr v{first} cube but --zarr-format {asked}" in msg and "\n" not in msg and len(msg) < 300
    assert "finish its unfinished write" in msg
    assert store_bytes(url) == before, "a refused resume wrote something"

    report = write_cube(make_cube(PERIODS), url, zarr_format=first)  # the same format: resumed
    assert report.resumed and report.zarr_format == first
    with pytest.raises(GridMismatchError, match="append to it"):
        write_cube(make_cube(APPENDED), url, zarr_format=asked, append=True)
    report = write_cube(make_cube(APPENDED), url, append=True)  # no format asked: the cube's own
    assert report.zarr_format == first and report.periods_written == tuple(APPENDED)
    report = write_cube(make_cube(PERIODS), url, zarr_format=asked, overwrite=True)  # replaced: may change
    assert report.zarr_format == asked
    assert ("zarr.json" if asked == 3 else ".zgroup") in store_bytes(url)


def test_unfinished_write_of_another_run_is_refused(tmp_path: Path) -> None:
    import zarr

    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(["2024-01-01"]), url)
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    state = json.loads(group.attrs[WRITE_ATTR])
    group.attrs[WRITE_ATTR] = json.dumps({**state, "state": "regions", "fingerprint": "someone-else"})
    with pytest.raises(OutputError, match="unfinished write of another run"):
        write_cube(make_cube(["2024-01-01"]), url, append=True)
    report = write_cube(make_cube(["2024-01-01"]), url, overwrite=True)
    assert report.regions_written == 9


def test_bucket_root_is_refused() -> None:
    from ndvi_scale.errors import InputError

    with pytest.raises(InputError, match="bucket root"):
        write_cube(make_cube(), "s3://some-bucket")


def test_period_length_mismatch_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(["2024-01-01"]), url)
    weekly = make_cube(["2024-01-01"]).assign_coords(time_end=("time", np.array(["2024-01-07"], "M8[ns]")))
    with pytest.raises(
        GridMismatchError, match="period 2024-01-01 ends 2024-01-31 in the cube but 2024-01-07"
    ):
        write_cube(weekly, url, append=True)


def test_distributed_client(tmp_path: Path) -> None:
    from distributed import Client

    url = str(tmp_path / "c.zarr")
    calls: list[tuple[int, int]] = []
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None):
        report = write_cube(
            make_cube(["2024-01-01", "2024-02-01"]), url, progress=lambda d, t: calls.append((d, t))
        )
    assert report.regions_written == 18 and calls[-1] == (18, 18)
    np.testing.assert_array_equal(
        open_cube(url)["ndvi"].values, make_cube(["2024-01-01", "2024-02-01"])["ndvi"].values
    )


# ---------------------------------------------------------------------------------- kill and resume

PERIODS = ["2024-01-01", "2024-02-01"]
APPENDED = ["2024-03-01", "2024-04-01"]
TOTAL_REGIONS = 2 * 3 * 3  # both the fresh write and the append write 2 periods of 3 x 3 blocks


def _spawn_writer(url: str, mode: str, sleep: float, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    env["DASK_NUM_WORKERS"] = "2"
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "writer", url, mode, str(sleep), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _kill_midway(url: str, mode: str, at_least: int, timeout: float = 60.0) -> int:
    """Start a slow writer, SIGKILL it once ``at_least`` regions are marked done; return the regions done."""
    proc = _spawn_writer(url, mode, sleep=0.3)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"the writer ended (rc {proc.returncode}) before it could be killed:\n{out}")
            try:
                if len(markers(url)) >= at_least:
                    break
            except Exception:  # the store may not exist yet
                pass
            time.sleep(0.05)
        else:
            pytest.fail("the writer wrote no progress marker in time")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return len(markers(url))


def _write_run(url: str, mode: str, **kwargs: Any) -> Any:
    """The run that the subprocess performs (and the test repeats to resume it)."""
    if mode == "new":
        return write_cube(make_cube(PERIODS, **kwargs), url)
    return write_cube(make_cube(APPENDED, **kwargs), url, append=True)


@pytest.mark.parametrize(("backend", "mode"), [("local", "new"), ("s3", "new"), ("local", "append")])
def test_kill_and_resume_is_bit_for_bit(
    backend: str, mode: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "local":
        url = str(tmp_path / "killed.zarr")
    else:
        url = f"s3://{request.getfixturevalue('s3_bucket')}/killed.zarr"
    reference = str(tmp_path / "reference.zarr")
    if mode == "append":  # both cubes start from the same finished two-period cube
        write_cube(make_cube(PERIODS), url)
        write_cube(make_cube(PERIODS), reference)
    _write_run(reference, mode)

    done = _kill_midway(url, mode, at_least=4)
    assert 0 < done < TOTAL_REGIONS
    check_output(url, append=mode == "append")  # an unfinished write passes the pre-flight check...
    with pytest.raises(OutputExistsError, match="unfinished write of another run"):
        write_cube(make_cube(["2024-06-01"]), url, append=True)  # ...but only the same run may finish it

    count_dir = tmp_path / "computed"
    count_dir.mkdir()
    report = _write_run(url, mode, count_dir=count_dir)
    missing = TOTAL_REGIONS - done
    assert report.resumed and report.regions_written == missing
    assert len(list(count_dir.iterdir())) == missing, "only the missing regions were computed"
    assert store_bytes(url) == store_bytes(reference), "resumed store differs from an uninterrupted run"


@pytest.mark.parametrize("mode", ["new", "append"])
def test_crash_while_writing_metadata_is_resumed(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ndvi_scale import write as write_module

    url, reference = str(tmp_path / "c.zarr"), str(tmp_path / "ref.zarr")
    if mode == "append":
        write_cube(make_cube(PERIODS), url)
        write_cube(make_cube(PERIODS), reference)
    _write_run(reference, mode)

    phase = "_write_template" if mode == "new" else "_extend"
    original = getattr(write_module._Writer, phase)

    def crash_after(self: Any, *args: Any) -> None:
        original(self, *args)
        raise KeyboardInterrupt  # the process dies right after the metadata phase, before its state is saved

    with monkeypatch.context() as patched:
        patched.setattr(write_module._Writer, phase, crash_after)
        with pytest.raises(KeyboardInterrupt):
            _write_run(url, mode)

    report = _write_run(url, mode)
    assert report.regions_written == TOTAL_REGIONS
    assert store_bytes(url) == store_bytes(reference)



def test_metadata_written_beside_the_first_regions_gives_the_same_cube(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``start_reading`` (the pipeline on a local scheduler) a new cube's metadata is written in a thread
    while the regions compute: the regions start before it is done, write nothing until it is, and the cube is
    byte for byte the one written the plain way."""
    import time

    from ndvi_scale import write as write_module
    from ndvi_scale.storage import open_location

    url, reference = str(tmp_path / "c.zarr"), str(tmp_path / "ref.zarr")
    write_cube(make_cube(PERIODS), reference)
    events: dict[str, Any] = {"entered": []}
    original_metadata = write_module._Writer._write_metadata
    original_region = write_module._write_region

    def slow_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # slower than composing a few tiny regions
        got = original_metadata(self, *args, **kwargs)
        loc = open_location(url)
        found = loc.fs.find(loc.path)
        events["chunks_at_metadata_end"] = [p for p in found if "/ndvi/c/" in p or "/valid_count/c/" in p]
        events["metadata_end"] = time.perf_counter()
        return got

    def region(*args: Any, block_info: Any = None, **kwargs: Any) -> Any:  # dask hands block_info by name
        events["entered"].append(time.perf_counter())
        return original_region(*args, block_info=block_info, **kwargs)

    monkeypatch.setattr(write_module._Writer, "_write_metadata", slow_metadata)
    monkeypatch.setattr(write_module, "_write_region", region)
    started: list[bool] = []
    report = write_cube(make_cube(PERIODS), url, start_reading=lambda: started.append(True))

    assert started == [True] and report.regions_written == TOTAL_REGIONS
    assert min(events["entered"]) < events["metadata_end"], "the regions did not start before the metadata ended"
    assert events["chunks_at_metadata_end"] == [], "a region wrote a chunk before the metadata was complete"
    assert store_bytes(url) == store_bytes(reference)


def test_metadata_failure_beside_the_regions_is_raised_and_no_chunk_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ndvi_scale import faults as fault_module
    from ndvi_scale import write as write_module
    from ndvi_scale.errors import StorageError
    from ndvi_scale.faults import FaultLog
    from ndvi_scale.storage import open_location

    url = str(tmp_path / "c.zarr")

    def refused(self: Any, *args: Any) -> None:
        raise StorageError(f"output {url}: the bucket refused the write (test)")

    monkeypatch.setattr(write_module._Writer, "_write_template", refused)
    faults = FaultLog(open_location(url).spec())
    with pytest.raises(StorageError, match="refused the write"):
        write_cube(make_cube(PERIODS), url, faults=faults, start_reading=lambda: None)
    assert fault_module._HELD == {}, "the fault log holds nothing after the failed write"
    loc = open_location(url)
    found = loc.fs.find(loc.path) if loc.fs.exists(loc.path) else []
    assert not [p for p in found if "/ndvi/c/" in p or "/valid_count/c/" in p]
    assert write_module._MetadataGate._open == {}, "the gate of the failed write is closed"



def test_a_fault_recorded_while_the_metadata_is_written_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that fails in the first regions, while the template is written beside them (which replaces what is
    at the location), is not lost: the fault log holds it until the template is written."""
    import threading
    import time

    from ndvi_scale import write as write_module
    from ndvi_scale.faults import AssetFault, FaultLog
    from ndvi_scale.storage import open_location
    from ndvi_scale.write import SKIPPED_ATTR

    url = str(tmp_path / "c.zarr")
    faults = FaultLog(open_location(url).spec())
    fault = AssetFault(href="https://example.test/B04.tif", window=(0, 0, 32, 32), error="HTTP response code: 404",
                       attempts=3, skipped=True)
    original = write_module._Writer._write_template

    def slow_template(self: Any, *args: Any) -> None:
        time.sleep(0.4)
        original(self, *args)

    monkeypatch.setattr(write_module._Writer, "_write_template", slow_template)
    early = threading.Timer(0.1, faults.record, args=(fault,))  # a region's read gives up during the template
    report = write_cube(make_cube(PERIODS), url, faults=faults, start_reading=early.start)
    early.join()
    assert [e["href"] for e in report.skipped_assets] == [fault.href]
    with xr.open_zarr(url) as cube:
        assert [e["href"] for e in json.loads(cube.attrs[SKIPPED_ATTR])] == [fault.href]


def _die_inside_chunk_writes(after: int) -> None:
    """Make this process SIGKILL itself in the middle of writing its ``after + 1``-th ndvi chunk file: half the
    bytes are in zarr's temporary ``<chunk>.<uuid>.partial`` file, exactly what an OOM kill can leave."""
    import contextlib
    import threading

    import zarr.storage._local as zlocal

    original = zlocal._atomic_write
    lock = threading.Lock()
    seen = [0]
    chunk_dir = f"{os.sep}ndvi{os.sep}c{os.sep}"

    class _HalfThenDie:
        def __init__(self, f: Any) -> None:
            self._f = f

        def write(self, view: Any) -> int:
            data = bytes(view)
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
            return len(data)  # pragma: no cover

    @contextlib.contextmanager
    def atomic_write(path: Path, mode: Any, exclusive: bool = False) -> Any:
        with original(path, mode, exclusive=exclusive) as f:
            with lock:
                seen[0] += chunk_dir in str(path)
                die = chunk_dir in str(path) and seen[0] > after
            yield _HalfThenDie(f) if die else f

    zlocal._atomic_write = atomic_write


@pytest.mark.parametrize("mode", ["new", "append"])
def test_sigkill_inside_a_chunk_write_leaves_a_partial_file_that_the_resume_removes(
    mode: str, tmp_path: Path
) -> None:
    """The flaky SIGKILL resume: a kill while zarr writes a chunk leaves ``<chunk>.<uuid>.partial``; the resume
    must remove it (else the store differs from a clean run's and keeps the garbage forever)."""
    url, reference = str(tmp_path / "killed.zarr"), str(tmp_path / "reference.zarr")
    if mode == "append":
        write_cube(make_cube(PERIODS), url)
        write_cube(make_cube(PERIODS), reference)
    _write_run(reference, mode)
    proc = _spawn_writer(url, mode, 0.0, "kill-in-chunk", "3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out.decode(errors="replace")
    leftovers = sorted(Path(url).rglob("*.partial"))
    assert leftovers, "the kill inside a chunk write left no temporary file: the test no longer reproduces"
    # The hook's own half-written ndvi chunk is among them; a write another thread had under way at the kill (a
    # valid_count chunk of the other region, a metadata file) may have left its own: the resume removes them all.
    where = [p.relative_to(url).parts for p in leftovers]
    assert any(parts[:2] == ("ndvi", "c") for parts in where), where

    report = _write_run(url, mode)
    assert report.resumed and 0 < report.regions_written < TOTAL_REGIONS
    assert not list(Path(url).rglob("*.partial"))
    assert store_bytes(url) == store_bytes(reference)


def test_folder_holding_only_temporary_files_is_a_new_output(tmp_path: Path) -> None:
    """A new cube killed while its very first metadata file was written: nothing but a temporary file."""
    url = tmp_path / "c.zarr"
    url.mkdir()
    (url / f"zarr.{uuid.uuid4().hex}.partial").write_bytes(b'{"zarr_fo')
    check_output(str(url))
    write_cube(make_cube(PERIODS), str(url))
    assert not list(url.rglob("*.partial"))
    other = tmp_path / "other"
    other.mkdir()
    (other / f"zarr.{uuid.uuid4().hex}.partial").write_bytes(b"x")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="non-empty folder"):
        write_cube(make_cube(PERIODS), str(other))
    assert (other / "notes.txt").exists()


@pytest.mark.parametrize("phase", ["_consolidate", "_write_stac"])
@pytest.mark.parametrize("mode", ["new", "append"])
def test_run_stopped_after_marking_complete_is_finished_by_the_same_command(
    mode: str, phase: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between "complete" and the end (consolidation, STAC item): the same command finishes the cube
    (consolidated, STAC item, no markers) instead of refusing it as existing forever."""
    from ndvi_scale import write as write_module
    from ndvi_scale.storage import open_location

    url, reference = str(tmp_path / "c.zarr"), str(tmp_path / "ref.zarr")
    if mode == "append":
        write_cube(make_cube(PERIODS), url)
        write_cube(make_cube(PERIODS), reference)
    _write_run(reference, mode)

    def die(self: Any, *args: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(write_module._Writer, phase, die)
        with pytest.raises(KeyboardInterrupt):
            _write_run(url, mode)
    assert json.loads(json.loads((Path(url) / "zarr.json").read_text())["attributes"][WRITE_ATTR])[
        "state"] == "complete"
    item_path = Path(url + ".stac-item.json")
    if mode == "new":
        assert not item_path.exists()
    else:  # the item of the cube before the append: stale
        assert json.loads(item_path.read_text())["properties"]["ndvi_scale:periods"] == len(PERIODS)
    check_output(url, append=mode == "append")  # passes: the same command may finish it

    report = _write_run(url, mode)
    assert report.resumed and report.regions_written == 0 and report.stac_item_url
    item = json.loads(item_path.read_text())
    assert item["type"] == "Feature"
    assert item["properties"]["ndvi_scale:periods"] == len(PERIODS) + (len(APPENDED) if mode == "append" else 0)
    assert json.loads((Path(url) / "zarr.json").read_text()).get("consolidated_metadata")
    assert store_bytes(url) == store_bytes(reference)
    xr.open_zarr(open_location(url).store, consolidated=True)
    with pytest.raises(OutputExistsError, match="already exists"):  # finished: refused again as before
        write_cube(make_cube(PERIODS if mode == "new" else APPENDED), url)
    other = make_cube(["2024-09-01"])
    write_module.check_output(url, append=True)
    write_cube(other, url, append=True)


def _writer_main(argv: list[str]) -> None:
    """Subprocess entry point: the slow run of argv[1] ("new" or "append") to argv[0], killed by the test
    (``kill-in-chunk N`` after them: killed by itself inside its N+1-th chunk write)."""
    url, mode, sleep = argv[0], argv[1], float(argv[2])
    if argv[3:4] == ["kill-in-chunk"]:
        _die_inside_chunk_writes(int(argv[4]))
    _write_run(url, mode, sleep=sleep)
    print("finished", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["writer"]:
        _writer_main(sys.argv[2:])


@pytest.mark.parametrize(
    "encoding",
    [
        {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": np.dtype("int64")},
        {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian"},
        {"units": "days since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": np.dtype("int64")},
        {"units": "seconds since 1970-01-01 00:00:00", "calendar": "proleptic_gregorian"},
        # not taken by the shortcut (fill value, another epoch, not whole units): xarray's own encoding
        {"units": "days since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int32", "_FillValue": -1},
        {"units": "days since 2024-01-01", "calendar": "proleptic_gregorian"},
        {"units": "hours since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": np.dtype("int64")},
    ],
)
def test_region_encoding_of_dates_is_xarrays(encoding, monkeypatch):
    """max_date blocks are encoded without xarray's per-block unit inference, to the very same integers."""
    import warnings

    from ndvi_scale.pipeline import _days_to_datetime
    from ndvi_scale.write import _CUBE_DIMS, _encode_block

    days = np.full((1, 40, 30), np.nan, dtype=np.float32)
    days[0, ::3] = 19800 + np.arange(30) % 7
    block = _days_to_datetime(days)
    assert np.isnat(block[0, 1]).all() and block[0, 0, 2] == np.datetime64(19802, "D")
    if encoding["units"].startswith("hours"):
        block[0, 0, 0] += np.timedelta64(90, "m")  # 1.5 h: not a whole unit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xarray warns when it changes the units of the last case
        ref = xr.conventions.encode_cf_variable(xr.Variable(_CUBE_DIMS, block, encoding=dict(encoding)))
        shortcut = "1970" in encoding["units"] and "_FillValue" not in encoding and "hours" not in encoding["units"]
        if shortcut:  # the shortcut must not call xarray's encoder at all
            monkeypatch.setattr(xr.conventions, "encode_cf_variable", None)
        got = _encode_block("max_date", block, encoding)
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref.values)


def test_dates_of_a_block_larger_than_one_conversion_step_are_xarrays():
    """A block of more dates than cf.DATE_STEP is converted piece by piece (no block-sized temporaries), to the
    very same datetimes and stored integers as whole: NaN/NaT across piece boundaries, a size that is not a
    multiple of the step."""
    from ndvi_scale.cf import DATE_STEP, date_encoding
    from ndvi_scale.pipeline import _days_to_datetime
    from ndvi_scale.write import _CUBE_DIMS, _encode_block

    rng = np.random.default_rng(7)
    days = (19700 + rng.integers(0, 400, (1, 701, 777))).astype(np.float32)
    assert days.size > 2 * DATE_STEP and days.size % DATE_STEP
    days[rng.random(days.shape) < 0.1] = np.nan
    days.reshape(-1)[DATE_STEP - 2 : DATE_STEP + 2] = np.nan  # a run of NaN across the first boundary
    block = _days_to_datetime(days)
    whole = np.nan_to_num(days).astype("int64").astype("datetime64[D]")
    expected = np.where(np.isnan(days), np.datetime64("NaT"), whole)
    np.testing.assert_array_equal(block, expected.astype("datetime64[ns]"))
    enc = date_encoding()
    ref = xr.conventions.encode_cf_variable(xr.Variable(_CUBE_DIMS, block, encoding=dict(enc)))
    got = _encode_block("max_date", block, enc)
    assert got.dtype == ref.dtype == np.int32 and got.shape == days.shape
    np.testing.assert_array_equal(got, ref.values)


@pytest.mark.parametrize("fmt", [3, 2])
@pytest.mark.parametrize("mode", ["new", "append"])
def test_unfinished_cube_opens_with_plain_open_zarr(
    mode: str, fmt: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue K case 3: the metadata is consolidated when the template is written (and when an append grows the
    time axis), so a cube stopped in the middle of its regions opens with plain ``xr.open_zarr`` (no warning,
    no "consolidated metadata not found"): finished periods hold their values, the rest reads as fill."""
    import warnings

    from ndvi_scale import write as write_module

    url = str(tmp_path / "c.zarr")
    if mode == "append":
        write_cube(make_cube(PERIODS), url, zarr_format=fmt)
    periods = APPENDED if mode == "append" else PERIODS
    original = write_module._Writer._compute

    def first_period_only(self: Any, groups: list[list[Any]]) -> None:
        original(self, groups[:1])
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(write_module._Writer, "_compute", first_period_only)
        with pytest.raises(KeyboardInterrupt):
            write_cube(make_cube(periods), url, append=mode == "append", zarr_format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cube = xr.open_zarr(url)
        consolidated = xr.open_zarr(url, consolidated=True)
    every = PERIODS + (APPENDED if mode == "append" else [])
    assert [str(t)[:10] for t in cube.time.values] == every
    assert consolidated.sizes == cube.sizes
    want = make_cube(every)["ndvi"].values
    done = len(every) - 1  # the last period of the write was never computed
    np.testing.assert_array_equal(cube["ndvi"].values[:done], want[:done])
    assert np.isnan(cube["ndvi"].values[done]).all()


def test_holds_data_says_true_only_when_the_chunk_cannot_be_all_fill():
    """The sample test that spares zarr's whole-chunk "all fill?" pass: True only when a sampled value differs
    from the fill value, so zarr's choice (store the chunk or not) is the one it would have made."""
    from ndvi_scale.write import _holds_data

    nan = np.full((1, 300, 300), np.nan, dtype=np.float32)
    assert not _holds_data(nan, np.float32(np.nan))  # all fill: zarr decides (stores none)
    one = nan.copy()
    one[0, 122, 61] = 0.5  # on the sample grid
    assert _holds_data(one, np.float32(np.nan))
    off = nan.copy()
    off[0, 1, 1] = 0.5  # not sampled: "not known", zarr checks the whole chunk
    assert not _holds_data(off, np.float32(np.nan))
    counts = np.zeros((1, 300, 300), dtype=np.uint16)
    assert _holds_data(counts, 65535) and not _holds_data(counts, 0)
    assert _holds_data(counts, None)  # zarr v2 without a fill value never skips a chunk
    zeros = np.zeros((1, 300, 300), dtype=np.float32)
    assert not _holds_data(zeros, 0.0) and not _holds_data(-zeros, 0.0)  # -0.0: zarr compares bits, we do not
    assert not _holds_data(counts, np.float64(np.nan))  # a NaN fill on integers: left to zarr
