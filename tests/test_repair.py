"""ndvi_scale.repair (issue K, "recovery, never deletion"): a cube whose write was stopped is rolled back to its
last complete state or finished, on local disk and S3 (SeaweedFS); complete periods stay; refused cases change
nothing; the repaired cube, appended to, is bit-for-bit the cube of a run that never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import xarray as xr

from ndvi_scale import write as write_module
from ndvi_scale.errors import OutputError, OutputExistsError
from ndvi_scale.repair import repair_cube
from ndvi_scale.storage import open_location
from ndvi_scale.write import LEASE_SUFFIX, WRITE_ATTR, write_cube
from test_write import APPENDED, PERIODS, make_cube, store_bytes

pytestmark = pytest.mark.usefixtures("clean_cloud_env")
TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
META = ("zarr.json", ".zattrs", ".zarray", ".zgroup", ".zmetadata")


def data_bytes(url: str) -> dict[str, bytes]:
    """Every object of the store but metadata documents (attributes hold run history and times)."""
    return {k: v for k, v in store_bytes(url).items() if not k.endswith(META)}


@pytest.fixture(params=["local", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "cube.zarr")
    return f"s3://{request.getfixturevalue('s3_bucket')}/repair/cube.zarr"


def _stop_after(monkeypatch: pytest.MonkeyPatch, periods_done: int, extra_regions: int) -> None:
    """The next write computes ``periods_done`` whole periods and ``extra_regions`` regions of the next, then
    dies (KeyboardInterrupt: what an OOM kill leaves, minus the process)."""
    original = write_module._Writer._compute

    def partial(self: Any, groups: list[list[Any]]) -> None:
        original(self, [*groups[:periods_done], *([groups[periods_done][:extra_regions]] if extra_regions else [])])
        raise KeyboardInterrupt

    monkeypatch.setattr(write_module._Writer, "_compute", partial)


def _state(url: str) -> dict[str, Any]:
    loc = open_location(url)
    return json.loads(json.loads(loc.fs.cat_file(loc.join("zarr.json")))["attributes"][WRITE_ATTR])


def test_killed_append_with_a_changed_catalog_is_rolled_back_then_appended(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue K case 2: an append killed mid-way (March complete, April half written), then the catalog changed
    (another fingerprint): refused until repaired, never by deleting history. The repair keeps March, cuts April;
    the next append writes April; the cube equals an uninterrupted one's."""
    reference = str(tmp_path / "reference.zarr")
    write_cube(make_cube(PERIODS + APPENDED), reference)
    write_cube(make_cube(PERIODS), url)
    with monkeypatch.context() as patched:
        _stop_after(patched, 1, 4)
        with pytest.raises(KeyboardInterrupt):
            write_cube(make_cube(APPENDED), url, append=True)
    assert _state(url)["state"] == "regions"
    with pytest.raises(OutputExistsError, match=r"ndvi-scale repair .*complete periods stay"):
        write_cube(make_cube(APPENDED), url, append=True, fingerprint="catalog-changed")

    report = repair_cube(url)
    assert report.action == "rolled back"
    assert report.kept == (APPENDED[0],) and report.dropped == (APPENDED[1],)
    assert report.periods == (*PERIODS, APPENDED[0])
    state = _state(url)
    assert state["state"] == "complete"
    with xr.open_zarr(open_location(url).store) as cube:  # consolidated: plain open
        assert [str(t)[:10] for t in cube.time.values] == [*PERIODS, APPENDED[0]]
        runs = json.loads(cube.attrs["ndvi_scale_runs"])
        assert sorted(p for r in runs for p in r["periods"]) == [*PERIODS, APPENDED[0]]
    assert not [k for k in store_bytes(url) if k.startswith(".ndvi-scale")]
    loc = open_location(url)
    item = json.loads(loc.fs.cat_file(loc.path + ".stac-item.json"))
    assert item["properties"]["ndvi_scale:fingerprint"] == state["fingerprint"]
    assert item["properties"]["ndvi_scale:periods"] == 3
    assert not loc.fs.exists(loc.path + LEASE_SUFFIX)
    # March is the reference's, byte for byte; nothing of April is left
    got, want = data_bytes(url), data_bytes(reference)
    march = {k: v for k, v in want.items() if "/c/2/" in k}
    assert march and all(got[k] == v for k, v in march.items())
    assert not [k for k in got if "/c/3/" in k]

    report2 = write_cube(make_cube(APPENDED), url, append=True, fingerprint="catalog-changed")
    assert report2.periods_written == (APPENDED[1],) and report2.periods_skipped == (APPENDED[0],)
    assert data_bytes(url) == data_bytes(reference)
    assert repair_cube(url).action == "nothing"


@pytest.mark.parametrize("fmt", [3, 2])
def test_killed_first_write_keeps_its_complete_periods(
    fmt: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, reference = str(tmp_path / "c.zarr"), str(tmp_path / "ref.zarr")
    write_cube(make_cube(PERIODS), reference, zarr_format=fmt)
    with monkeypatch.context() as patched:
        _stop_after(patched, 1, 2)
        with pytest.raises(KeyboardInterrupt):
            write_cube(make_cube(PERIODS), url, zarr_format=fmt)
    report = repair_cube(url)
    assert report.kept == (PERIODS[0],) and report.dropped == (PERIODS[1],) and report.periods == (PERIODS[0],)
    write_cube(make_cube(PERIODS), url, append=True)
    assert data_bytes(url) == data_bytes(reference)  # coordinates included: the cut time chunk was rewritten


def test_killed_in_template_phase_goes_back_to_the_cube_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(PERIODS), url)
    before = data_bytes(url)
    item_before = json.loads(Path(url + ".stac-item.json").read_text())

    def die(self: Any, *args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(write_module._Writer, "_regions_and_finish", die)
        with pytest.raises(KeyboardInterrupt):
            write_cube(make_cube(APPENDED), url, append=True)
    assert _state(url)["state"] == "regions" and len(xr.open_zarr(url).time) == 4
    report = repair_cube(url)
    assert report.kept == () and report.dropped == tuple(APPENDED) and report.periods == tuple(PERIODS)
    assert data_bytes(url) == before
    state = _state(url)
    assert state["state"] == "complete" and state["fingerprint"] == item_before["properties"][
        "ndvi_scale:fingerprint"]


def test_nothing_complete_or_half_recomputed_is_refused_and_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = str(tmp_path / "first.zarr")
    with monkeypatch.context() as patched:
        _stop_after(patched, 0, 3)
        with pytest.raises(KeyboardInterrupt):
            write_cube(make_cube(PERIODS), first)
    held = store_bytes(first)
    with pytest.raises(OutputError, match="nothing to roll back to") as err:
        repair_cube(first)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    assert store_bytes(first) == held

    recomputed = str(tmp_path / "recomputed.zarr")
    write_cube(make_cube(PERIODS), recomputed)
    with monkeypatch.context() as patched:
        _stop_after(patched, 0, 3)
        with pytest.raises(KeyboardInterrupt):
            write_cube(make_cube(PERIODS), recomputed, append=True, overwrite=True, fingerprint="again")
    held = store_bytes(recomputed)
    with pytest.raises(OutputError, match=r"period\(s\) 2024-01-01, 2024-02-01 were being recomputed in place"):
        repair_cube(recomputed)
    assert store_bytes(recomputed) == held
    write_cube(make_cube(PERIODS), recomputed, append=True, overwrite=True, fingerprint="again")  # finished


@pytest.mark.parametrize("phase", ["_consolidate", "_write_stac"])
def test_complete_cube_stopped_before_its_last_steps_is_finished(
    phase: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full while consolidating (issue K case 3): the repair consolidates and writes the STAC item, whatever
    the catalog says now (no inputs needed)."""
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(PERIODS), url)

    def die(self: Any, *args: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(write_module._Writer, phase, die)
        with pytest.raises(OSError):
            write_cube(make_cube(APPENDED), url, append=True)
    assert _state(url)["state"] == "complete"
    report = repair_cube(url)
    assert report.action == "finished" and report.periods == (*PERIODS, *APPENDED)
    item = json.loads(Path(url + ".stac-item.json").read_text())
    assert item["properties"]["ndvi_scale:fingerprint"] == _state(url)["fingerprint"]
    assert json.loads((Path(url) / "zarr.json").read_text())["consolidated_metadata"]["metadata"]["ndvi"][
        "shape"][0] == 4
    assert not (Path(url) / ".ndvi-scale").exists()
    assert repair_cube(url).action == "nothing"


def test_repair_waits_for_the_writer_lease(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(PERIODS), url)
    loc = open_location(url)
    loc.fs.pipe_file(loc.path + LEASE_SUFFIX, json.dumps({
        "owner": "cron", "host": "elsewhere.example", "pid": 7, "token": "t", "started": "s", "heartbeat": "h",
        "expires": 4e9, "expires_at": "later"}).encode())
    with pytest.raises(OutputError, match=r"being written by cron@elsewhere.example pid 7"):
        repair_cube(url)


def test_cli_repair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "c.zarr")
    write_cube(make_cube(PERIODS), url)
    with monkeypatch.context() as patched:
        _stop_after(patched, 0, 0)
        with pytest.raises(KeyboardInterrupt):
            write_cube(make_cube(APPENDED), url, append=True)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    run = [sys.executable, "-m", "ndvi_scale", "repair"]
    p = subprocess.run([*run, url], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "rolled back the unfinished write" in p.stdout and "cut off 2 unfinished period(s)" in p.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_zarr(url).sizes["time"] == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    for target, code in ((tmp_path / "notes", 6), (tmp_path / "missing.zarr", 6)):
        p = subprocess.run([*run, str(target)], capture_output=True, text=True, env=env, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"
