"""Read faults (issue G): a real HTTP server on 127.0.0.1 that answers 500, hangs, drops connections, serves
truncated COGs and refuses expired signatures, for chosen files of a synthetic catalog.

Policy under test (ndvi_scale.faults): GDAL retries each request, the reader retries each asset read from scratch
(clearing GDAL's cached state of the file, re-signing the href), then the run either fails with a report naming
the assets (finished regions kept, resumable), or with ``--skip-bad-assets`` goes on and records every skipped
asset in the cube, its STAC item and the CLI summary. The runs are the real CLI in a subprocess; the server is
started by the fixture and stopped by PID.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from ndvi_scale.config import RunConfig
from ndvi_scale.faults import (
    AssetFault,
    AssetReadError,
    ReadPolicy,
    clean_href,
    error_text,
    merge_summaries,
    summarise,
)
from ndvi_scale.pipeline import build, make_plan
from ndvi_scale.profiles import resign_href
from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.write import MARKER_DIR, SKIPPED_ATTR, STAC_SKIPPED_PROP, STAC_SUFFIX
from servers import Server, start_fault_server

SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 2), end=dt.date(2024, 5, 30), field_size=160)
START, END, CHUNK = "2024-04-01", "2024-05-31", "64"

# Fast retries for the tests; the policy (how many, what is retried) is the production one.
FAST = {
    "NDVI_SCALE_READ_BACKOFF": "0.1",  # reader-level attempts: 3, 0.1 s then 0.2 s apart
    "GDAL_HTTP_MAX_RETRY": "2",  # GDAL: 3 requests in all per range read
    "GDAL_HTTP_RETRY_DELAY": "0.1",
    "GDAL_HTTP_TIMEOUT": "2",  # a hung request is given up after 2 s
}


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fault-catalog")
    srv = start_fault_server(root, tmp_path_factory.mktemp("fault-server"))
    try:
        generate(root, SPEC, href_base=srv.endpoint)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def catalog(server: Server) -> Path:
    return server.data_dir / "items.json"


@pytest.fixture(scope="module")
def items(catalog: Path) -> list[dict[str, Any]]:
    return json.loads(catalog.read_text())["features"]


@pytest.fixture(scope="module")
def reference(catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cube of a run without faults."""
    out = tmp_path_factory.mktemp("reference") / "ref.zarr"
    ok(cli(*compute_args(catalog, out)))
    return out


@pytest.fixture(autouse=True)
def no_faults(server: Server) -> Iterator[None]:
    set_rules(server, [])
    yield
    set_rules(server, [])


# ------------------------------------------------------------------------------------------------- helpers
def compute_args(catalog: Path, out: Path, *extra: str) -> list[str]:
    bbox = [f"{v:.5f}" for v in SPEC.bbox_lonlat()]
    return ["compute", "--bbox", *bbox, "--start", START, "--end", END, "--catalog", str(catalog),
            "--out", str(out), "--chunk", CHUNK, *extra]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"} | FAST
    return subprocess.run([sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr and "error:" not in r.stderr, r.stderr
    return r


def set_rules(server: Server, rules: list[dict[str, Any]]) -> None:
    path = Path(server.extra["rules"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rules))
    os.replace(tmp, path)
    time.sleep(0.02)  # a new mtime for the next change


def requests_log(server: Server) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(server.extra["requests"]).read_text().splitlines() if line]


def href(items: list[dict[str, Any]], item_id: str, band: str) -> str:
    return next(f["assets"][band]["href"] for f in items if f["id"] == item_id)


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3].split("?")[0]


def data_chunks(path: Path) -> dict[str, bytes]:
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in path.rglob("*")
            if f.is_file() and f.relative_to(path).as_posix().startswith(("ndvi/c/", "valid_count/c/"))}


def assert_same_data(got: Path, ref: Path) -> None:
    a, b = data_chunks(got), data_chunks(ref)
    assert a and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    with xr.open_zarr(got) as x, xr.open_zarr(ref) as y:
        for name in ("ndvi", "valid_count"):
            xr.testing.assert_identical(x[name].load(), y[name].load())


def fast_gdal(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process: request retries as :data:`FAST` says, through GDAL (the engine's GDAL options are made at
    import) and the engine's own range requests (their settings are read from the environment once per
    process: made again here). Else a file that answers 500 forever costs 30 s of production backoff per
    request."""
    from ndvi_scale.engine import handles, ranges

    for k, v in FAST.items():
        if k.startswith("GDAL_"):
            monkeypatch.setenv(k, v)
            for options in (handles.GDAL_OPEN_OPTIONS, handles.GDAL_READ_OPTIONS):
                monkeypatch.setitem(options, k, v)
    monkeypatch.setattr(ranges, "_http", None)


def without(catalog: Path, drop: set[str], dest: Path) -> Path:
    """A copy of the items file without the items ``drop`` (same hrefs)."""
    doc = json.loads(catalog.read_text())
    doc["features"] = [f for f in doc["features"] if f["id"] not in drop]
    dest.write_text(json.dumps(doc))
    return dest


def assert_composed_without(out: Path, catalog: Path, tmp_path: Path, skipped: list[tuple[str, str]]) -> None:
    """``out`` records exactly these (item, band) as skipped, and equals a run without those items, bit for bit."""
    with xr.open_zarr(out) as cube:
        assert [(e["item"], e["band"]) for e in json.loads(cube.attrs[SKIPPED_ATTR])] == skipped
    fewer = tmp_path / "fewer.zarr"
    ok(cli(*compute_args(without(catalog, {i for i, _ in skipped}, tmp_path / "fewer.json"), fewer)))
    assert_same_data(out, fewer)


# The items whose files are broken in the tests below (one per granule and month, so each test breaks its own
# files: GDAL's cache in a test process never sees another test's faults).
A_APRIL, B_APRIL = "S2B_31UCQ_20240412_0_L2A", "S2A_31UDQ_20240417_0_L2A"
A_MAY, B_MAY = "S2A_31UCQ_20240507_0_L2A", "S2B_31UDQ_20240512_0_L2A"


# ------------------------------------------------------------------------------------------------- transient
@pytest.mark.parametrize(
    ("item", "band", "rule"),
    [
        # more than GDAL's 3 requests: the reader's own retry must finish the job
        (A_APRIL, "red", {"fault": "status", "code": 500, "times": 4}),
        (B_APRIL, "nir", {"fault": "status", "code": 503, "times": 1}),  # GDAL's own retry is enough
        (A_MAY, "red", {"fault": "hang", "seconds": 8, "times": 1}),  # times out after 2 s, asked again
        (B_MAY, "nir", {"fault": "drop", "times": 3}),  # half a body, then the connection is closed
        # GDAL caches the short size: only a cleared cache reads the whole file again
        (A_APRIL, "scl", {"fault": "truncate", "fraction": 0.4, "times": 2}),
    ],
    ids=["500x4", "503x1", "hang", "drop", "truncated"],
)
def test_transient_faults_are_retried_and_the_cube_equals_a_clean_run(
    server: Server, catalog: Path, items: list[dict[str, Any]], reference: Path, tmp_path: Path,
    item: str, band: str, rule: dict[str, Any],
) -> None:
    target = path_of(href(items, item, band))
    set_rules(server, [{"match": target, **rule}])
    start = len(requests_log(server))

    out = tmp_path / "cube.zarr"
    r = ok(cli(*compute_args(catalog, out)))

    assert_same_data(out, reference)
    with xr.open_zarr(out) as cube:
        assert SKIPPED_ATTR not in cube.attrs
    assert "skipped" not in r.stdout
    log = [e for e in requests_log(server)[start:] if e["path"] == target and e["fault"] != "late answer"]
    assert sum(e["fault"] == rule["fault"] for e in log) == rule["times"], log  # the faults really happened ...
    assert log[-1]["status"] in (200, 206) and log[-1]["fault"] is None, log  # ... and a clean read followed


# ------------------------------------------------------------------------------------------------- persistent
def test_unreadable_asset_fails_the_run_naming_it_then_resumes_once_repaired(
    server: Server, catalog: Path, items: list[dict[str, Any]], reference: Path, tmp_path: Path
) -> None:
    target = href(items, B_APRIL, "red")
    set_rules(server, [{"match": path_of(target), "fault": "status", "code": 500, "times": -1}])
    out = tmp_path / "cube.zarr"

    r = cli(*compute_args(catalog, out))

    assert r.returncode == 10, r.stderr
    assert "Traceback" not in r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, r.stderr
    msg = error[0]
    assert f"{B_APRIL} red ({target})" in msg
    assert "HTTP response code: 500" in msg and "after 3 attempt(s)" in msg
    assert "--skip-bad-assets" in msg and "re-run the same command to resume" in msg
    with xr.open_zarr(out, consolidated=False) as cube:  # an unfinished cube, not a complete one with a hole
        assert json.loads(cube.attrs["ndvi_scale_write"])["state"] != "complete"
    attempts = [e for e in requests_log(server) if e["path"] == path_of(target)]
    assert len(attempts) >= 3 * 3  # 3 reader attempts x 3 GDAL requests, all refused

    set_rules(server, [])  # the provider repaired the file: the same command finishes the cube
    r2 = ok(cli(*compute_args(catalog, out)))
    assert "resumed" in r2.stdout
    assert_same_data(out, reference)
    assert not (out / MARKER_DIR).exists()


def test_skip_bad_assets_goes_on_and_records_every_skipped_asset(
    server: Server, catalog: Path, items: list[dict[str, Any]], tmp_path: Path
) -> None:
    bad = {(A_MAY, "red"): {"fault": "status", "code": 500},
           (B_MAY, "nir"): {"fault": "truncate", "fraction": 0.3},
           (B_APRIL, "scl"): {"fault": "status", "code": 404}}  # a file removed by the provider
    set_rules(server, [{"match": path_of(href(items, i, b)), "times": -1, **f} for (i, b), f in bad.items()])
    out = tmp_path / "cube.zarr"

    r = ok(cli(*compute_args(catalog, out, "--skip-bad-assets")))

    # CLI summary: one line per skipped asset, with item, band and href
    assert "skipped 3 unreadable asset(s)" in r.stdout
    for item, band in bad:
        line = next(ln for ln in r.stdout.splitlines() if item in ln)
        assert f"{item} {band} ({href(items, item, band)})" in line
    assert "Warning" not in r.stderr  # listed once in the summary, not once per chunk
    # provenance in the cube and its STAC item
    with xr.open_zarr(out) as cube:
        recorded = json.loads(cube.attrs[SKIPPED_ATTR])
    assert {(e["item"], e["band"]) for e in recorded} == set(bad)
    for e in recorded:
        assert e["href"] == href(items, e["item"], e["band"]) and e["attempts"] == 3
        assert e["windows"] and all(len(w) == 4 for w in e["windows"])
    assert "HTTP response code: 500" in next(e["error"] for e in recorded if e["band"] == "red")
    stac = json.loads(out.with_name(out.name + STAC_SUFFIX).read_text())
    assert {(e["item"], e["band"]) for e in stac["properties"][STAC_SKIPPED_PROP]} == set(bad)
    assert not (out / ".ndvi-scale").exists()  # fault records folded into the attributes, then removed

    # The holes are exactly "those items were not observed": the same as a run without them, bit for bit.
    fewer = tmp_path / "fewer.zarr"
    ok(cli(*compute_args(without(catalog, {i for i, _ in bad}, tmp_path / "fewer.json"), fewer)))
    assert_same_data(out, fewer)
    with xr.open_zarr(out) as cube, xr.open_zarr(fewer) as ref:
        assert int(cube["valid_count"].sum()) == int(ref["valid_count"].sum())


def test_failed_run_finished_with_skip_bad_assets_keeps_its_regions(
    server: Server, catalog: Path, items: list[dict[str, Any]], tmp_path: Path
) -> None:
    target = href(items, A_APRIL, "nir")
    set_rules(server, [{"match": path_of(target), "fault": "drop", "times": -1}])
    out = tmp_path / "cube.zarr"
    first = cli(*compute_args(catalog, out))
    assert first.returncode == 10 and f"{A_APRIL} nir" in first.stderr, first.stderr
    kept = [p for p in (out / MARKER_DIR).rglob("*") if p.is_file()]

    r = ok(cli(*compute_args(catalog, out, "--skip-bad-assets")))  # the flag does not make it another run

    assert f"{A_APRIL} nir ({target})" in r.stdout
    # regions finished before the failure were kept, not recomputed
    assert re.search(rf"resumed: \d+ region\(s\) computed, {len(kept)} kept", r.stdout), (kept, r.stdout)
    assert_composed_without(out, catalog, tmp_path, [(A_APRIL, "nir")])


def test_faults_on_a_local_cluster_are_reported_from_the_worker_processes(
    server: Server, catalog: Path, items: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Reads run in other processes: the error crosses back pickled, the skip records go through the store."""
    target = href(items, B_MAY, "red")
    set_rules(server, [{"match": path_of(target), "fault": "status", "code": 500, "times": -1}])
    out = tmp_path / "cube.zarr"

    failed = cli(*compute_args(catalog, out, "--cluster", "local"))
    assert failed.returncode == 10 and f"{B_MAY} red ({target})" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr

    r = ok(cli(*compute_args(catalog, out, "--cluster", "local", "--skip-bad-assets")))
    assert f"{B_MAY} red ({target})" in r.stdout
    assert_composed_without(out, catalog, tmp_path, [(B_MAY, "red")])


def test_an_asset_given_up_on_gets_one_attempt_in_the_other_chunks(
    server: Server, catalog: Path, items: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A file that is gone is gone for every chunk: only the first chunks to meet it pay the full retries."""
    from ndvi_scale.engine import reader

    monkeypatch.setattr(reader, "_GIVEN_UP", {})
    target = href(items, A_MAY, "nir") + "?fresh=1"  # a URL this process has not cached
    doc = json.loads(catalog.read_text())
    for f in doc["features"]:
        if f["id"] == A_MAY:
            f["assets"]["nir"]["href"] = target
    set_rules(server, [{"match": path_of(target), "fault": "status", "code": 500, "times": -1}])
    given_up: list[int] = []
    original = reader.AssetReader._give_up

    def spy(self: Any, window: Any, exc: Exception, attempts: int, policy: Any) -> Any:
        given_up.append(attempts)
        return original(self, window, exc, attempts, policy)

    monkeypatch.setattr(reader.AssetReader, "_give_up", spy)
    fast_gdal(monkeypatch)
    path = tmp_path / "given-up.json"
    path.write_text(json.dumps(doc))
    cfg = RunConfig.create(bbox=SPEC.bbox_lonlat(), start="2024-05-01", end="2024-05-31", catalog=str(path),
                           chunk=int(CHUNK), skip_bad_assets=True)
    with pytest.warns(UserWarning, match="skipped unreadable asset"):
        build(cfg, make_plan(cfg), ReadPolicy(backoff=0.05, skip=True)).compute(scheduler="threads", num_workers=2)

    # 4 chunks, 2 threads: the third and fourth chunk start after one of the first two gave up
    assert len(given_up) == 4 and sorted(given_up)[:2] == [1, 1] and max(given_up) == 3, given_up


# ------------------------------------------------------------------------------------------------- signing
def _resign(url: str) -> str:
    return clean_href(url) + "?sig=fresh"


def test_expired_signature_is_renewed_before_the_retry(
    server: Server, catalog: Path, items: list[dict[str, Any]], reference: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token expiring mid-run (HTTP 403) is re-signed inside the read retry, not by re-running the job."""
    doc = json.loads(catalog.read_text())
    for f in doc["features"]:
        for band in ("red", "nir", "scl"):
            f["assets"][band]["href"] += "?sig=stale"
    signed = tmp_path / "signed.json"
    signed.write_text(json.dumps(doc))
    target = path_of(href(items, B_MAY, "red"))
    set_rules(server, [{"match": target, "fault": "require", "param": "sig=fresh"}])
    cfg = RunConfig.create(bbox=SPEC.bbox_lonlat(), start=START, end=END, catalog=str(signed), chunk=int(CHUNK))
    start = len(requests_log(server))

    fast_gdal(monkeypatch)
    policy = ReadPolicy(backoff=0.05, resign=_resign)
    got = build(cfg, make_plan(cfg), policy).compute(scheduler="threads")

    with xr.open_zarr(reference) as ref:
        xr.testing.assert_equal(got["ndvi"], ref["ndvi"].load())
        np.testing.assert_array_equal(got["valid_count"].values, ref["valid_count"].values)
    log = [e for e in requests_log(server)[start:] if e["path"] == target]
    assert log[0]["status"] == 403 and log[0]["query"] == "sig=stale"
    assert log[-1]["status"] in (200, 206) and log[-1]["query"] == "sig=fresh"


def test_resign_href_drops_the_old_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    import planetary_computer

    seen: list[str] = []
    monkeypatch.setattr(planetary_computer, "sign", lambda h: seen.append(h) or h + "?se=new&sig=abc")
    url = "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/B04.tif"
    assert resign_href("planetary-computer", url + "?se=old&sig=xyz") == url + "?se=new&sig=abc"
    assert seen == [url]


# ------------------------------------------------------------------------------------------------- units
def test_fault_records_and_errors_keep_no_secrets_and_pickle() -> None:
    try:
        try:
            raise OSError("HTTP 403 for /vsicurl/https://a.blob.core.windows.net/c/B04.tif?sv=1&sig=SECRET")
        except OSError as inner:
            raise RuntimeError("Error reading window") from inner
    except RuntimeError as exc:
        text = error_text(exc)
    assert "SECRET" not in text and text.startswith("OSError: HTTP 403")
    fault = AssetFault(clean_href("https://x/B04.tif?sig=SECRET"), (0, 64, 64, 32), text, 3, False)
    assert "SECRET" not in json.dumps(fault.to_dict())
    err = pickle.loads(pickle.dumps(AssetReadError(fault)))  # crosses process boundaries on a cluster
    assert isinstance(err, AssetReadError) and err.fault == fault and "--skip-bad-assets" in str(err)
    assert AssetFault.from_dict(fault.to_dict()) == fault


def test_read_policy_backoff_doubles_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NDVI_SCALE_READ_ATTEMPTS", "5")
    monkeypatch.setenv("NDVI_SCALE_READ_BACKOFF", "3")
    p = ReadPolicy()
    assert p.attempts == 5 and [p.delay(n) for n in (1, 2, 3, 4, 5)] == [3, 6, 12, 24, 30]
    monkeypatch.setenv("NDVI_SCALE_READ_ATTEMPTS", "zero")  # unparsable: the documented default
    assert ReadPolicy().attempts == 3


def test_summaries_group_per_asset_and_merge_across_appends() -> None:
    a1 = AssetFault("http://h/A/B04.tif", (0, 0, 64, 64), "HTTP 500", 3, True)
    a2 = AssetFault("http://h/A/B04.tif", (0, 64, 64, 32), "HTTP 500", 1, True)  # given up on: one attempt
    b = AssetFault("http://h/B/SCL.tif", (64, 0, 32, 64), "truncated", 3, True)
    labels = {"http://h/A/B04.tif": ("A", "red"), "http://h/B/SCL.tif": ("B", "scl")}
    first = summarise([a2, b, a1], labels)
    assert first == [
        {"item": "A", "band": "red", "href": "http://h/A/B04.tif", "windows": [[0, 0, 64, 64], [0, 64, 64, 32]],
         "error": "HTTP 500", "attempts": 3},
        {"item": "B", "band": "scl", "href": "http://h/B/SCL.tif", "windows": [[64, 0, 32, 64]],
         "error": "truncated", "attempts": 3},
    ]
    c = AssetFault("http://h/C/B08.tif", (0, 0, 64, 64), "HTTP 404", 3, True)
    later = summarise([c, a1], {**labels, "http://h/C/B08.tif": ("C", "nir")})  # the next month's append
    merged = merge_summaries(first, later)
    assert [(e["item"], e["band"]) for e in merged] == [("A", "red"), ("B", "scl"), ("C", "nir")]
    assert merged[0]["windows"] == [[0, 0, 64, 64], [0, 64, 64, 32]]  # no duplicate windows
