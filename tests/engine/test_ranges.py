"""engine.ranges: byte ranges of local files and of a real HTTP server on 127.0.0.1 (merged requests, retries of
transient statuses, GDAL's wording for errors, no signature in messages)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ndvi_scale.engine import ranges
from servers import Server, start_fault_server

DATA = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ranges-root")
    (root / "f.tif").write_bytes(DATA)
    srv = start_fault_server(root, tmp_path_factory.mktemp("ranges-server"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh connection pool per test, built from these settings (as in production, from the environment)."""
    for key, value in {"GDAL_HTTP_MAX_RETRY": "2", "GDAL_HTTP_RETRY_DELAY": "0.01", "GDAL_HTTP_TIMEOUT": "2",
                       "GDAL_HTTP_CONNECTTIMEOUT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ranges, "_http", None)
    yield
    ranges._http = None


def rules(server: Server, value: list[dict[str, object]]) -> None:
    path = Path(server.extra["rules"])
    path.with_suffix(".tmp").write_text(json.dumps(value))
    os.replace(path.with_suffix(".tmp"), path)
    time.sleep(0.02)


def log(server: Server) -> list[dict[str, object]]:
    return [json.loads(x) for x in Path(server.extra["requests"]).read_text().splitlines() if x]


WANT = [(10, 5), (20, 100), (300_000, 1000), (5, 3), (1_048_570, 100)]  # unsorted, overlapping, past the end


def expected() -> list[bytes]:
    return [DATA[a : a + n] for a, n in WANT]


def test_local_file_ranges(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    path.write_bytes(DATA)
    assert [bytes(b) for b in ranges.fetch(str(path), WANT)] == expected()
    assert [bytes(b) for b in ranges.fetch(path.as_uri(), WANT)] == expected()


def test_merge_joins_near_ranges_only() -> None:
    assert ranges._merge([(0, 10), (18, 10), (10_000_000, 5)]) == [(0, 28), (10_000_000, 5)]
    assert ranges._merge([(100, 10), (0, 10)]) == [(0, 110)]  # the gap of 90 bytes is fetched
    assert ranges._merge([(0, 10), (10 + ranges.MERGE_GAP + 1, 10)]) == [(0, 10), (ranges.MERGE_GAP + 11, 10)]


def test_http_ranges_are_merged_into_few_requests(server: Server) -> None:
    rules(server, [])
    start = len(log(server))
    got = ranges.fetch(f"{server.endpoint}/f.tif", WANT)
    assert [bytes(b) for b in got] == expected()
    deadline = time.monotonic() + 5  # the server logs a request after answering it
    while len(log(server)) - start < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    assert len(log(server)) - start == 3  # [5, 120) + [300000, 301000) + [1048570, end): three GETs


def test_transient_status_is_retried(server: Server) -> None:
    rules(server, [{"match": "/f.tif", "fault": "status", "code": 503, "times": 2}])
    assert bytes(ranges.fetch(f"{server.endpoint}/f.tif", [(0, 64)])[0]) == DATA[:64]


@pytest.mark.parametrize("userinfo", ["", "reader:secret@"])  # credentials in the URL: read through urllib3
def test_a_long_retry_after_is_capped_on_both_paths(server: Server, monkeypatch: pytest.MonkeyPatch,
                                                   userinfo: str) -> None:
    from ndvi_scale import http

    monkeypatch.setattr(ranges, "RETRY_AFTER_MAX", 0.2)  # the lean path's cap
    monkeypatch.setattr(http, "RETRY_AFTER_MAX", 0.2)  # urllib3's (CappedRetry reads it when it waits)
    rules(server, [{"match": "/f.tif", "fault": "status", "code": 503, "times": 1, "retry_after": 30}])
    t0 = time.monotonic()
    url = server.endpoint.replace("http://", f"http://{userinfo}") + "/f.tif"
    assert bytes(ranges.fetch(url, [(0, 64)])[0]) == DATA[:64]
    assert time.monotonic() - t0 < 10  # asked again after the cap, not after the server's 30 s
    time.sleep(0.1)  # the server logs a request after answering it
    assert sorted(e["status"] for e in log(server)[-2:]) == [206, 503]


def test_error_status_uses_gdal_wording(server: Server) -> None:
    rules(server, [{"match": "/f.tif", "fault": "status", "code": 500, "times": -1}])
    with pytest.raises(OSError, match="HTTP response code: 500"):
        ranges.fetch(f"{server.endpoint}/f.tif", [(0, 64)])
    rules(server, [])
    with pytest.raises(OSError, match="HTTP response code: 404"):
        ranges.fetch(f"{server.endpoint}/missing.tif", [(0, 64)])


def test_connection_errors_keep_no_signature() -> None:
    with pytest.raises(OSError) as err:
        ranges.fetch("http://127.0.0.1:9/f.tif?sig=SECRET", [(0, 64)])  # discard port: refused
    assert "SECRET" not in str(err.value) and "failed" in str(err.value)


def test_supported_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ranges.GDAL_ONLY_HTTP_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    assert ranges.supported("https://h/a.tif") and ranges.supported("/data/a.tif")
    assert ranges.supported("file:///data/a.tif")
    assert not ranges.supported("s3://b/a.tif") and not ranges.supported("/vsicurl/http://h/a.tif")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # GDAL (curl) honours it: GDAL reads these files
    assert not ranges.supported("https://h/a.tif") and ranges.supported("/data/a.tif")
