"""The real pipeline through the CLI onto local disk, gs:// (GCS emulator) and s3:// (SeaweedFS).

One month, then ``--append`` of the next month, must equal a single two-month run; a SIGKILLed run restarted
with the same command must finish without recomputing what was written and equal an uninterrupted run bit for bit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.storage import open_location
from ndvi_scale.write import MARKER_DIR

SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 2), end=dt.date(2024, 5, 30), field_size=160)
BIG = SampleSpec(size=384, blocksize=256, start=dt.date(2024, 3, 2), end=dt.date(2024, 6, 30), field_size=320)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cube-cli")
    generate(root, SPEC)
    return str(root / "items.json")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True, timeout=300)


def _compute(catalog: str, spec: SampleSpec, out: str, start: str, end: str, *extra: str) -> subprocess.Popen:
    args = ["compute", "--bbox", *(f"{v:.5f}" for v in spec.bbox_lonlat()), "--start", start, "--end", end,
            "--catalog", catalog, "--out", out, "--chunk", "64", *extra]
    return subprocess.Popen([sys.executable, "-m", "ndvi_scale", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(catalog: str, out: str, start: str, end: str, *extra: str, spec: SampleSpec = SPEC) -> str:
    p = _compute(catalog, spec, out, start, end, *extra)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    return stdout


def _arrays(url: str) -> dict[str, np.ndarray]:
    # Opened as a user would without consolidated metadata, which lists the cube's root: nothing there but the
    # cube's own nodes (SeaweedFS kept the emptied run-state folder, and zarr warned about it).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(open_location(url).store, decode_coords="all", consolidated=False)
    return {name: ds[name].values for name in ("ndvi", "valid_count")} | {"time": ds.time.values}


def _chunks(url: str) -> dict[str, bytes]:
    """Every stored object of the cube's data arrays, by key (metadata excluded)."""
    loc = open_location(url)
    out = {}
    for path in loc.fs.find(loc.path):
        rel = path[len(loc.path.rstrip("/")) + 1 :]
        if rel.startswith(("ndvi/", "valid_count/")) and not rel.endswith((".json", ".zarray", ".zattrs")):
            out[rel] = loc.fs.cat_file(path)
    return out


@pytest.fixture
def local_out(tmp_path):
    return str(tmp_path / "cube.zarr")


@pytest.fixture
def s3_out(s3_bucket):
    return f"s3://{s3_bucket}/ndvi/cube.zarr"


@pytest.fixture
def gs_out(gcs_bucket):
    return f"gs://{gcs_bucket}/ndvi/cube.zarr"


@pytest.mark.parametrize("where", ["local_out", "s3_out", "gs_out"])
def test_month_then_append_equals_one_run(catalog, tmp_path, where, request):
    out = request.getfixturevalue(where)
    reference = str(tmp_path / "reference.zarr")
    _run(catalog, reference, "2024-04-01", "2024-05-31")
    first = _run(catalog, out, "2024-04-01", "2024-04-30")
    assert "1 month composite(s)" in first
    april = _chunks(out)
    again = _run(catalog, out, "2024-04-01", "2024-04-30", "--append")  # already there: a no-op
    assert "1 already present, skipped" in again and _chunks(out) == april
    _run(catalog, out, "2024-05-01", "2024-05-31", "--append")
    got, ref = _arrays(out), _arrays(reference)
    for name in ("time", "ndvi", "valid_count"):
        np.testing.assert_array_equal(got[name], ref[name])
    assert {k: v for k, v in _chunks(out).items() if k in april} == april  # April's bytes untouched
    ds = xr.open_zarr(open_location(out).store, decode_coords="all", consolidated=False)
    assert ds.rio.crs.to_epsg() == 32631
    loc = open_location(out)
    item = json.loads(loc.fs.cat_file(loc.path.rstrip("/") + ".stac-item.json"))
    assert item["type"] == "Feature" and item["properties"]["proj:code"] == "EPSG:32631"


def test_existing_cube_without_flags_is_refused_untouched(catalog, local_out):
    _run(catalog, local_out, "2024-04-01", "2024-04-30")
    before = _chunks(local_out)
    r = _cli("compute", "--bbox", *(f"{v:.5f}" for v in SPEC.bbox_lonlat()), "--start", "2024-05-01",
             "--end", "2024-05-31", "--catalog", catalog, "--out", local_out, "--chunk", "64")
    assert r.returncode != 0 and "already exists" in r.stderr and "--append" in r.stderr
    assert "Traceback" not in r.stderr
    assert _chunks(local_out) == before


def test_append_asking_another_zarr_format_is_refused_in_one_line(catalog, local_out):
    _run(catalog, local_out, "2024-04-01", "2024-04-30")
    before = _chunks(local_out)
    meta = open_location(local_out).fs.cat_file(os.path.join(local_out, "zarr.json"))
    r = _cli("compute", "--bbox", *(f"{v:.5f}" for v in SPEC.bbox_lonlat()), "--start", "2024-05-01",
             "--end", "2024-05-31", "--catalog", catalog, "--out", local_out, "--chunk", "64", "--append",
             "--zarr-format", "2")
    assert r.returncode == 8, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Zarr v3 cube but --zarr-format 2" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert _chunks(local_out) == before
    assert open_location(local_out).fs.cat_file(os.path.join(local_out, "zarr.json")) == meta
    _run(catalog, local_out, "2024-05-01", "2024-05-31", "--append", "--zarr-format", "3")  # its own: fine


def test_grid_mismatch_on_append_is_a_clear_error(catalog, local_out):
    _run(catalog, local_out, "2024-04-01", "2024-04-30")
    r = _cli("compute", "--bbox", *(f"{v:.5f}" for v in SPEC.bbox_lonlat()), "--start", "2024-05-01",
             "--end", "2024-05-31", "--catalog", catalog, "--out", local_out, "--chunk", "64", "--append",
             "--resolution", "20")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert re.search(r"grid|resolution|coordinates", r.stderr), r.stderr


@pytest.fixture(scope="module")
def big_catalog(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cube-cli-big")
    generate(root, BIG)
    return str(root / "items.json")


def _markers(url: str) -> int:
    loc = open_location(url)
    try:
        return len(loc.fs.find(loc.join(MARKER_DIR)))
    except FileNotFoundError:
        return 0


def test_sigkilled_run_resumes_without_recomputing_and_equals_a_clean_run(big_catalog, tmp_path):
    clean, killed = str(tmp_path / "clean.zarr"), str(tmp_path / "killed.zarr")
    _run(big_catalog, clean, "2024-03-01", "2024-06-30", spec=BIG)
    proc = _compute(big_catalog, BIG, killed, "2024-03-01", "2024-06-30")
    deadline = time.monotonic() + 120
    try:
        while _markers(killed) < 8:
            assert proc.poll() is None, "the run finished before it could be killed; make the sample bigger"
            assert time.monotonic() < deadline, "no progress marker appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    done = _markers(killed)
    assert done >= 8
    g = zarr.open_group(killed, mode="r")
    assert json.loads(g.attrs["ndvi_scale_write"])["state"] != "complete"
    stdout = _run(big_catalog, killed, "2024-03-01", "2024-06-30", spec=BIG)  # the same command again
    m = re.search(r"resumed: (\d+) region\(s\) computed, (\d+) kept", stdout)
    assert m, stdout
    computed, kept = int(m.group(1)), int(m.group(2))
    ds = xr.open_zarr(clean, consolidated=False)
    regions = ds.sizes["time"] * -(-ds.sizes["y"] // 64) * -(-ds.sizes["x"] // 64)  # one region per output chunk
    assert kept >= done and computed + kept == regions and computed < regions
    assert _chunks(killed) == _chunks(clean)  # bit for bit
