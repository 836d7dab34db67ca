"""Secrets in URLs (issue K): credentials (``user:password@``) and query strings (API keys, signatures) never
reach stdout, stderr, the cube's attributes, its STAC item or the fault records.

A real STAC API (rustac) is searched through ``--catalog "http://USER:PASS@127.0.0.1:PORT/?subscription-key=..."``;
its items point at COGs on a real HTTP server (tests/faultserver.py) through hrefs with credentials and a
signature; one asset answers 500 forever. Every secret is a marker string looked for, as bytes, in every stream
and every object the runs leave (local disk and SeaweedFS S3).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ndvi_scale.faults import AssetFault, clean_href, error_text, scrub, scrub_value
from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.storage import open_location
from servers import Server, ServerError, start_fault_server
from stac_server import start_rustac

SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 2), end=dt.date(2024, 4, 30), field_size=160)
MARKERS = ("CATUSERx7", "CATPASSx7", "CATKEYx7", "HREFUSERx7", "HREFPASSx7", "HREFSIGx7")
FAST = {"NDVI_SCALE_READ_BACKOFF": "0.05", "GDAL_HTTP_MAX_RETRY": "1", "GDAL_HTTP_RETRY_DELAY": "0.05",
        "GDAL_HTTP_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def cog_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("secret-catalog")
    srv = start_fault_server(root, tmp_path_factory.mktemp("secret-server"))
    try:
        user_base = srv.endpoint.replace("http://", "http://HREFUSERx7:HREFPASSx7@")
        generate(root, SPEC, href_base=user_base)
        doc = json.loads((root / "items.json").read_text())
        for feat in doc["features"]:
            for asset in feat["assets"].values():
                asset["href"] += "?sig=HREFSIGx7&se=2030"
        (root / "items.json").write_text(json.dumps(doc))
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def api(cog_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        server = start_rustac([cog_server.data_dir / "items.json"], tmp_path_factory.mktemp("secret-rustac"))
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server.endpoint.replace("http://", "http://CATUSERx7:CATPASSx7@") + "/?subscription-key=CATKEYx7"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def broken(cog_server: Server) -> str:
    """The href of one asset that answers 500 forever (as stored in the items: with its secrets)."""
    doc = json.loads((cog_server.data_dir / "items.json").read_text())
    href = str(doc["features"][0]["assets"]["red"]["href"])
    path = "/" + href.split("/", 3)[3].split("?")[0]
    Path(cog_server.extra["rules"]).write_text(json.dumps([{"match": path, "fault": "status", "code": 500,
                                                             "times": -1}]))
    return href


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"} | FAST
    return subprocess.run([sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _compute(catalog: str, out: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return _cli("compute", "--bbox", *(f"{v:.5f}" for v in SPEC.bbox_lonlat()), "--start", "2024-04-01",
                "--end", "2024-04-30", "--catalog", catalog, "--out", out, "--chunk", "64", *extra)


def _leaks(name: str, data: bytes | str) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    return [f"{m} in {name}" for m in MARKERS if m.encode() in raw]


def _store_leaks(out: str) -> list[str]:
    """Markers found in any object of the store or beside it (STAC item), fault records included."""
    loc = open_location(out)
    found: list[str] = []
    paths = list(loc.fs.find(loc.path)) + [loc.path.rstrip("/") + ".stac-item.json"]
    for p in paths:
        try:
            found += _leaks(p, bytes(loc.fs.cat_file(p)))
        except FileNotFoundError:
            continue
    return found


@pytest.fixture
def local_out(tmp_path: Path) -> str:
    return str(tmp_path / "cube.zarr")


@pytest.fixture
def s3_out(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/secrets/cube.zarr"


@pytest.mark.parametrize("where", ["local_out", "s3_out"])
def test_no_secret_in_streams_attributes_stac_item_or_records(
    api: str, broken: str, where: str, request: pytest.FixtureRequest
) -> None:
    out = request.getfixturevalue(where)
    # 1. The read fails: one error line naming the asset, the failure records stay in the store.
    failed = _compute(api, out)
    assert failed.returncode == 10, failed.stderr
    assert clean_href(broken) in failed.stderr  # named, without its secrets
    loc = open_location(out)
    records = [p for p in loc.fs.find(loc.join(".ndvi-scale", "failed")) if p.endswith(".json")]
    assert records, "no failure record to check"
    record = json.loads(loc.fs.cat_file(records[0]))
    assert record["href"] == clean_href(broken)
    leaks = _leaks("stdout", failed.stdout) + _leaks("stderr", failed.stderr) + _store_leaks(out)

    # 2. The same run finished with --skip-bad-assets: the asset is recorded in the cube, STAC item, summary.
    done = _compute(api, out, "--skip-bad-assets")
    assert done.returncode == 0, done.stderr
    assert "skipped 1 unreadable asset(s)" in done.stdout and clean_href(broken) in done.stdout
    leaks += _leaks("stdout", done.stdout) + _leaks("stderr", done.stderr) + _store_leaks(out)
    item = json.loads(loc.fs.cat_file(loc.path.rstrip("/") + ".stac-item.json"))
    assert item["properties"]["ndvi_scale:skipped_assets"][0]["href"] == clean_href(broken)
    assert item["properties"]["ndvi_scale:config"]["catalog"] == scrub(api)
    import zarr

    attrs = dict(zarr.open_group(loc.store, mode="r").attrs)
    assert json.loads(attrs["ndvi_scale_config"])["catalog"] == scrub(api) == scrub(api).split("?")[0]
    assert "127.0.0.1" in attrs["source"] and "subscription-key" not in json.dumps(attrs)
    assert leaks == []


def test_no_secret_from_local_cluster_workers(api: str, broken: str, tmp_path: Path) -> None:
    """The reads run in LocalCluster worker processes (their own logging, GDAL messages, fault records)."""
    out = str(tmp_path / "cluster.zarr")
    failed = _compute(api, out, "--cluster", "local")
    assert failed.returncode == 10, failed.stderr
    leaks = _leaks("stdout", failed.stdout) + _leaks("stderr", failed.stderr) + _store_leaks(out)
    done = _compute(api, out, "--cluster", "local", "--skip-bad-assets")
    assert done.returncode == 0, done.stderr
    assert clean_href(broken) in done.stdout
    leaks += _leaks("stdout", done.stdout) + _leaks("stderr", done.stderr) + _store_leaks(out)
    assert leaks == []


def test_errors_and_inspect_output_carry_no_secret(api: str, cog_server: Server, tmp_path: Path) -> None:
    bad_api = api.replace("/?subscription", "/nothing-here/?subscription")
    r = _compute(bad_api, str(tmp_path / "x.zarr"))
    assert r.returncode == 3 and r.stderr.startswith("error: "), r.stderr
    assert _leaks("stderr", r.stderr) == [] and "127.0.0.1" in r.stderr
    ins = _cli("inspect", str(cog_server.data_dir / "items.json"))
    assert ins.returncode == 0, ins.stderr
    assert '"href": "http://127.0.0.1:' in ins.stdout
    assert _leaks("inspect stdout", ins.stdout) == []


def test_the_one_cleaning_function() -> None:
    assert clean_href("https://u:p@host:9/a/b.tif?sig=1&x=2#frag") == "https://host:9/a/b.tif"
    assert clean_href("/vsicurl/https://u:p@h/x.tif?k=1") == "/vsicurl/https://h/x.tif"
    assert clean_href("/data/S2/B04.tif") == "/data/S2/B04.tif"
    text = "cannot open 'https://u:p@api.example/x?subscription-key=SECRET' (s3://AK:SK@b/k?X-Amz-Signature=S)"
    # a query string ends at whitespace, a quote or an angle bracket only: a ")" may be part of it
    assert scrub(text) == "cannot open 'https://api.example/x' (s3://b/k"
    value: dict[str, Any] = {"a": ["http://u:p@h/?k=SECRET"], "n": 3, "s": '{"c": "https://h/s?key=SECRET"}'}
    assert "SECRET" not in json.dumps(scrub_value(value)) and scrub_value(value)["n"] == 3
    err = error_text(RuntimeError("HTTP 500 on https://user:pw@h/B04.tif?sig=SECRET"))
    assert "SECRET" not in err and "pw" not in err and "https://h/B04.tif" in err
    fault = AssetFault("https://user:pw@h/B04.tif?sig=SECRET", (0, 0, 1, 1), "x https://h/?t=SECRET", 1, True)
    assert "SECRET" not in json.dumps(fault.to_dict()) and "pw" not in fault.describe()
