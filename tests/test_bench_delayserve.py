"""benchmarks/delayserve.py: the delaying range server of ``benchmarks/run.py --latency`` (127.0.0.1 only)."""

from __future__ import annotations

import http.client
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import delayserve  # noqa: E402

LATENCY_MS = 100


@pytest.fixture()
def served(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    data = bytes(range(256)) * 4096  # 1 MiB
    (root / "a.tif").write_bytes(data)
    log = tmp_path / "access.log"
    srv = delayserve.make_server(root, 0, log, LATENCY_MS)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], data, log
    srv.shutdown()
    srv.server_close()


def _get(port, path, headers=None, method="GET", conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    return r.status, dict(r.getheaders()), r.read()


def test_ranges_head_and_log(served):
    port, data, log = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # one keep-alive connection throughout
    t0 = time.perf_counter()
    assert _get(port, "/a.tif", {"Range": "bytes=10-19"}, conn=conn)[::2] == (206, data[10:20])
    status, headers, body = _get(port, "/a.tif", {"Range": "bytes=-5"}, conn=conn)
    assert (status, body, headers["Content-Range"]) == (
        206,
        data[-5:],
        f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}",
    )
    status, headers, body = _get(port, "/a.tif", method="HEAD", conn=conn)
    assert (status, body, int(headers["Content-Length"])) == (200, b"", len(data))
    status, headers, body = _get(port, "/a.tif", conn=conn)
    assert (status, body) == (200, data)
    status, headers, body = _get(port, "/a.tif", {"Range": "bytes=0-3,100-103"}, conn=conn)
    assert status == 206 and headers["Content-Type"].startswith("multipart/byteranges")
    assert int(headers["Content-Length"]) == len(body)
    assert data[0:4] in body and data[100:104] in body and b"Content-Range: bytes 100-103/" in body
    assert _get(port, "/a.tif", {"Range": f"bytes={len(data)}-"}, conn=conn)[0] == 416
    assert _get(port, "/missing.tif", conn=conn)[0] == 404
    assert time.perf_counter() - t0 >= 7 * LATENCY_MS / 1000  # every request waited
    deadline = time.monotonic() + 5  # the server logs a request after answering it: the last line may follow
    while len(log.read_text().splitlines()) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = log.read_text().splitlines()
    assert lines[0] == 'GET /a.tif 206 10 "bytes=10-19"'
    assert lines[2] == 'HEAD /a.tif 200 0 "-"'
    assert lines[3] == f'GET /a.tif 200 {len(data)} "-"'
    assert len(lines) == 7


def test_requests_wait_together(served):
    port, data, _ = served
    n = 32
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(lambda i: _get(port, "/a.tif", {"Range": f"bytes={i}-{i + 99}"})[2], range(n)))
    wall = time.perf_counter() - t0
    assert got == [data[i : i + 100] for i in range(n)]
    assert wall < 4 * LATENCY_MS / 1000, wall  # 32 requests in flight at once, not one after another


def test_latency_floor_fetches_exactly_the_needed_ranges(tmp_path):
    """benchmarks/contenders.py floor_latency on three small COGs: every needed tile fetched once and decoded."""
    import json

    import contenders
    import numpy as np
    import rasterio
    import run
    from rasterio.transform import from_origin

    root = tmp_path / "root"
    (root / "item").mkdir(parents=True)
    rng = np.random.default_rng(0)
    profile = dict(driver="COG", width=1024, height=1024, count=1, dtype="uint16", crs="EPSG:32631",
                   transform=from_origin(500000, 5000000, 10, 10), blocksize=256, compress="DEFLATE")  # fmt: skip
    for band in ("red", "nir", "scl"):
        with rasterio.open(root / "item" / f"{band}.tif", "w", **profile) as ds:
            ds.write(rng.integers(1, 10000, (1, 1024, 1024), dtype="uint16"))
    srv = delayserve.make_server(root, 0, tmp_path / "access.log", 20)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        items = tmp_path / "items.json"
        assets = {b: {"href": f"{url}/item/{b}.tif"} for b in ("red", "nir", "scl")}
        items.write_text(json.dumps({"features": [{"assets": assets}]}))
        bounds = (500000 + 3000, 5000000 - 7000, 500000 + 7000, 5000000 - 3000)  # px 300..700: tiles 1-2 x 1-2
        needed, tiles, ranges = run._bytes_needed(items, root, url, bounds)
        assert tiles == 3 * 4 and all(len(a["tiles"]) == 4 for a in ranges)
        params = {"ranges": ranges, "url": url, "threads": 2, "bounds": bounds, "inflight": 8}
        res = contenders.floor_latency(params)
    finally:
        srv.shutdown()
        srv.server_close()
    assert res["pixels_decoded"] == 3 * 400 * 400
    assert needed <= res["bytes"] <= needed + 16 * tiles  # the COG's ghost bytes between merged tiles at most
    assert res["gets"] == 3 * (1 + 2)  # a header and one request per row of 2 adjacent tiles, per asset
