"""Search against real local STAC APIs: rustac (POST paging), a GET ``?token=`` API, retries, signing.

Expected results are derived from the fixture files with plain Python, never from ndvi-scale's own code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import ndvi_scale.http as nhttp
from ndvi_scale import load, profiles
from ndvi_scale.config import RunConfig
from ndvi_scale.errors import CatalogError, ItemError, NoScenesError
from ndvi_scale.items import normalize_item, read_items
from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.search import SearchResult, _api_items, search
from servers import ServerError
from stac_server import Failure, TokenPagingAPI, get_json, start_rustac

DATA = Path(__file__).parent / "data"
ES_C1 = DATA / "stac" / "earth-search-v1" / "c1-l2a_item-collection_13TDE_2024-04.json"
PC = DATA / "stac" / "planetary-computer"
PC_PAGES = [PC / "search-page-1_04.00.json", PC / "search-page-2_04.00.json"]
PC_ITEM = PC / "S2B_MSIL2A_20190629T212529_R043_T06VVN_20201006T080531.json"


def _start(*args, **kwargs):
    try:
        return start_rustac(*args, **kwargs)
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def c1_api(tmp_path_factory):
    """rustac serving the 10 Earth Search c1-l2a items of tile 13TDE (2024-03-31 .. 2024-04-22)."""
    server = _start([ES_C1], tmp_path_factory.mktemp("rustac-c1"))
    yield server.endpoint
    server.stop()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    """Same policy, shorter waits: the tests check what is retried and how often, not the seconds."""
    monkeypatch.setattr(nhttp, "BACKOFF_FACTOR", 0.01)
    monkeypatch.setattr(nhttp, "BACKOFF_JITTER", 0.0)


def _fixture_items(path=ES_C1):
    return json.loads(Path(path).read_text())["features"]


def _expected(features, bbox, start, end, max_cloud):
    """(kept ids, cloud-skipped ids) by plain Python: bbox overlap, UTC day in [start, end], cloud limit."""
    w, s, e, n = bbox
    kept, cloudy = [], []
    for f in features:
        fw, fs, fe, fn = f["bbox"]
        day = f["properties"]["datetime"][:10]
        if not (fw < e and fe > w and fs < n and fn > s) or not (start <= day <= end):
            continue
        (kept if f["properties"]["eo:cloud_cover"] <= max_cloud else cloudy).append(f)
    kept.sort(key=lambda f: (f["properties"]["datetime"], f["id"]))
    return [f["id"] for f in kept], sorted(f["id"] for f in cloudy)


def _cfg(catalog, bbox, start, end, **kw):
    return RunConfig.create(bbox=bbox, start=start, end=end, catalog=catalog, **kw)


_REAL_PROFILES = profiles._load_profiles


def _fake_profile(monkeypatch, url, **changes):
    """Register a profile for ``url`` (as if it were a known provider's API)."""
    base = profiles.get_profile("earth-search-c1")
    fake = dataclasses.replace(base, name="test-api", title="Test API", url=url.rstrip("/"), **changes)
    monkeypatch.setattr(profiles, "_load_profiles", lambda: (*_REAL_PROFILES(), fake))
    return fake


# --------------------------------------------------------------------------------------- rustac: POST paging

WHOLE = (-105.2, 40.0, -105.0, 40.3)  # inside every footprint of the fixture
WEST = (-106.1, 40.0, -105.8, 40.3)  # only the full-tile footprints (swath-edge ones: west >= -105.38)
OUTSIDE = (-100.0, 40.0, -99.0, 41.0)


@pytest.mark.parametrize(
    ("bbox", "start", "end", "max_cloud"),
    [
        (WHOLE, "2024-04-01", "2024-04-30", 50),
        (WEST, "2024-03-31", "2024-04-16", 100),
        (WHOLE, "2024-04-08", "2024-04-12", 100),  # the end day is inclusive (2024-04-12T17:53)
        (WEST, "2024-04-01", "2024-04-22", 20),
    ],
)
def test_rustac_search_by_bbox_dates_cloud(c1_api, bbox, start, end, max_cloud):
    want, cloudy = _expected(_fixture_items(), bbox, start, end, max_cloud)
    assert want  # the case is meaningful
    res = search(_cfg(c1_api, bbox, start, end, max_cloud=max_cloud))
    assert [it.id for it in res.items] == want
    assert sorted(s.id for s in res.skipped) == cloudy
    assert all(s.reason.startswith(f"cloud cover above max_cloud {max_cloud:g}%") for s in res.skipped)
    assert res.profile is None and res.source == f"STAC API {c1_api}"
    # a bare URL gets no server-side query (rustac's memory backend would silently answer 0 items)
    assert any("client-side only" in n for n in res.notes) or max_cloud == 100


def test_rustac_pages_post_body_links_all_items_once(c1_api):
    cfg = _cfg(c1_api, WHOLE, "2024-03-01", "2024-05-31")
    everything = [f["id"] for f in _fixture_items()]
    raw, notes = _api_items(c1_api, cfg, limit=3)
    assert sorted(f["id"] for f in raw) == sorted(everything)  # each item once
    assert any("10 items in 4 page(s)" in n and "POST /search" in n and "limit 3" in n for n in notes), notes
    raw, notes = _api_items(c1_api, cfg)
    assert sorted(f["id"] for f in raw) == sorted(everything)
    assert any("in 1 page(s)" in n and "limit 100" in n for n in notes), notes
    # rustac's own next link is a POST whose JSON body carries the search and the position
    page = get_json(f"{c1_api}/search", {"limit": 3, "bbox": list(WHOLE)})
    (nxt,) = [lk for lk in page["links"] if lk["rel"] == "next"]
    assert nxt["method"] == "POST" and nxt["body"]["bbox"] == list(WHOLE)


def test_rustac_ignores_query_which_is_why_it_is_never_sent_blind(c1_api):
    # The trap, shown with a raw request: the memory backend answers 0 items to any `query`.
    body = {"limit": 100, "query": {"eo:cloud_cover": {"lte": 100}}}
    assert get_json(f"{c1_api}/search", body)["features"] == []
    assert len(get_json(f"{c1_api}/search", {"limit": 100})["features"]) == 10
    res = search(_cfg(c1_api, WHOLE, "2024-04-01", "2024-04-30", max_cloud=50))
    assert len(res.items) == 5


def test_profile_of_a_known_url_is_used(c1_api, monkeypatch):
    """A bare URL that is a profile's API gets the profile: collections, page limit, asset keys; the
    server-side query only if the API advertises it (rustac does not), the client-side filter always."""
    _fake_profile(monkeypatch, c1_api, page_limit=3, collections=("sentinel-2-c1-l2a",),
                  server_side_query=True)
    res = search(_cfg(c1_api + "/", WHOLE, "2024-04-01", "2024-04-30", max_cloud=50))
    want, cloudy = _expected(_fixture_items(), WHOLE, "2024-04-01", "2024-04-30", 50)
    assert [it.id for it in res.items] == want and sorted(s.id for s in res.skipped) == cloudy
    assert res.profile == "test-api"
    text = " | ".join(res.notes)
    assert "collections sentinel-2-c1-l2a, limit 3" in text and "9 items in 3 page(s)" in text
    assert "advertises neither the query nor the filter extension" in text
    # another collection on the same API: nothing there
    _fake_profile(monkeypatch, c1_api, page_limit=3, collections=("sentinel-2-l2a",))
    with pytest.raises(NoScenesError, match="no Sentinel-2 L2A scenes found"):
        search(_cfg(c1_api, WHOLE, "2024-04-01", "2024-04-30"))


def test_nothing_found_says_why(c1_api):
    with pytest.raises(NoScenesError, match=r"no Sentinel-2 L2A scenes found in STAC API .*widen"):
        search(_cfg(c1_api, OUTSIDE, "2024-04-01", "2024-04-30"))
    with pytest.raises(NoScenesError, match=r"4 skipped \(cloud cover above max_cloud 5% x4\)"):
        search(_cfg(c1_api, WEST, "2024-04-01", "2024-04-22", max_cloud=5))


def test_summary_lists_scenes_dates_tiles_crs_and_skip_reasons(c1_api):
    res = search(_cfg(c1_api, WHOLE, "2024-04-01", "2024-04-30", max_cloud=50))
    assert res.summary() == (
        "5 scenes on 5 dates (2024-04-02, 2024-04-05, 2024-04-07, 2024-04-12, 2024-04-15), tiles 13TDE, "
        "CRS EPSG:32613; 4 skipped (cloud cover above max_cloud 50% x4)"
    )
    res = search(_cfg(c1_api, WHOLE, "2024-03-01", "2024-04-30"))
    assert res.summary().startswith("10 scenes on 10 dates (2024-03-31 .. 2024-04-22), tiles 13TDE")
    mixed = SearchResult(
        tuple(dataclasses.replace(it, epsg=32614 if i % 2 else it.epsg) for i, it in enumerate(res.items[:3]))
    )
    assert "CRS EPSG:32613 x2, EPSG:32614 x1; 0 skipped" in mixed.summary()


def test_unreachable_api_fails_fast_with_one_clear_error():
    from servers import closed_port

    t0 = time.monotonic()
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(CatalogError, match=rf"cannot search STAC API {url}"):
        search(_cfg(url, WHOLE, "2024-04-01", "2024-04-30"))
    assert time.monotonic() - t0 < 5  # refused connections are retried only CONNECT_RETRIES times


# -------------------------------------------------------------------------- a GET ?token= API + retry policy


def _pc_pages():
    return [json.loads(p.read_text()) for p in PC_PAGES]


AMERICAS = (-67.0, 14.0, -53.0, 53.0)  # both fixture items: 19PHS (Caribbean) and 21UYT (Newfoundland)


def test_get_token_paging_returns_every_page_once():
    with TokenPagingAPI(_pc_pages()) as api:
        res = search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16", max_cloud=80))
        assert [it.id for it in res.items] == ["S2A_MSIL2A_20230216T150721_R082_T19PHS_20230217T082924"]
        assert [s.id for s in res.skipped] == ["S2A_MSIL2A_20230216T145731_R082_T21UYT_20230217T083102"]
        assert res.skipped[0].reason == "cloud cover above max_cloud 80% (eo:cloud_cover 99.9238)"
        searches = [q for m, p, q in api.requests if p == "/search"]
        assert [m for m, p, _ in api.requests if p == "/search"] == ["GET", "GET"]  # GET only is advertised
        first, second = searches
        assert "token" not in first
        assert second["token"] == ["next:S2A_MSIL2A_20230216T150721_R082_T19PHS_20230217T082924"]
        assert [float(v) for v in first["bbox"][0].split(",")] == list(AMERICAS) and first["limit"] == ["100"]
        assert first["datetime"] == ["2023-02-16T00:00:00Z/2023-02-16T23:59:59.999Z"]
        assert "query" not in first  # no profile: never a server-side query
        assert any("2 items in 2 page(s)" in n and "GET /search" in n for n in res.notes)
        # hrefs stay unsigned at search time (signed at load time)
        assert all("?" not in b.href for it in res.items for b in it.bands.values())


def test_profile_sends_query_where_the_api_advertises_it_and_uses_its_asset_keys(monkeypatch):
    pages = _pc_pages()
    for page in pages:
        for f in page["features"]:
            f["assets"]["rouge"] = f["assets"].pop("B04")
            f["assets"]["rouge"].pop("eo:bands", None)  # found by its key only, not by its band description
    with TokenPagingAPI(pages) as api:
        _fake_profile(
            monkeypatch,
            api.url,
            assets=profiles._merge_aliases({"red": ["rouge"]}),
            collections=("sentinel-2-l2a",),
            page_limit=1,
        )
        res = search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16", max_cloud=100))
        assert [it.bands["red"].key for it in res.items] == ["rouge", "rouge"]
        assert not any(w for it in res.items for w in it.warnings if "description" in w)
        (first, *_) = [q for _, p, q in api.requests if p == "/search"]
        assert "query" not in first  # max_cloud 100: nothing to filter
        res = search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16", max_cloud=80))
        last_first = [q for _, p, q in api.requests if p == "/search" and "token" not in q][-1]
        assert json.loads(last_first["query"][0]) == {"eo:cloud_cover": {"lte": 80.0}}
        assert last_first["collections"] == ["sentinel-2-l2a"] and last_first["limit"] == ["1"]
        assert any("filtered server-side (query extension) and client-side" in n for n in res.notes)
        # the server ignored the query: the client-side filter still drops the 99.9 % scene
        assert len(res.items) == 1 and len(res.skipped) == 1
    # without the profile, the same items lack a known red key
    items = [normalize_item(f) for f in pages[0]["features"]]
    assert "missing asset red" in items[0].reason


def test_cql2_filter_where_the_api_advertises_filter_but_not_query(monkeypatch):
    with TokenPagingAPI(_pc_pages(), extensions=("filter",)) as api:
        _fake_profile(monkeypatch, api.url, collections=("sentinel-2-l2a",), server_side_query=True)
        res = search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16", max_cloud=80))
        first = [q for _, p, q in api.requests if p == "/search"][0]
        assert "query" not in first and first["filter-lang"] == ["cql2-json"]
        assert json.loads(first["filter"][0]) == {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 80.0]}
        assert any("filtered server-side (CQL2 filter) and client-side" in n for n in res.notes)
        assert len(res.items) == 1


def test_next_links_going_round_in_a_loop_are_an_error():
    page = _pc_pages()[0]
    with TokenPagingAPI([page, page]) as api:  # page 2 repeats page 1
        with pytest.raises(CatalogError, match=r"sent page 2 with only items of earlier pages"):
            search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16"))


def test_retries_503_with_retry_after_and_429_then_succeeds():
    failures = {(0, 0): Failure(503, retry_after="0"), (1, 0): Failure(429, retry_after="0"),
                (1, 1): Failure(502)}
    with TokenPagingAPI(_pc_pages(), failures=failures) as api:
        res = search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16"))
        assert len(res.items) == 2
        assert api.attempts(0) == 2 and api.attempts(1) == 3


def test_retry_after_is_honoured_but_capped(monkeypatch):
    monkeypatch.setattr(nhttp, "RETRY_AFTER_MAX", 0.3)
    with TokenPagingAPI(_pc_pages(), failures={(0, 0): Failure(429, retry_after="3600")}) as api:
        t0 = time.monotonic()
        res = search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16"))
        took = time.monotonic() - t0
        assert len(res.items) == 2 and api.attempts(0) == 2
        assert 0.3 <= took < 5


def test_read_timeout_is_retried(monkeypatch):
    monkeypatch.setattr(nhttp, "READ_TIMEOUT", 0.5)
    with TokenPagingAPI(_pc_pages(), failures={(1, 0): Failure(None, delay=1.5)}) as api:
        res = search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16"))
        assert len(res.items) == 2 and api.attempts(1) == 2


def test_attempts_are_bounded_and_the_last_status_is_reported():
    failures = {(1, i): Failure(503) for i in range(20)}
    with TokenPagingAPI(_pc_pages(), failures=failures) as api:
        with pytest.raises(CatalogError, match=r"refused the search HTTP 503"):
            search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16"))
        assert api.attempts(1) == nhttp.MAX_ATTEMPTS


def test_client_errors_are_not_retried():
    with TokenPagingAPI(_pc_pages(), failures={(0, 0): Failure(404)}) as api:
        with pytest.raises(CatalogError, match=r"HTTP 404"):
            search(_cfg(api.url, AMERICAS, "2023-02-16", "2023-02-16"))
        assert api.attempts(0) == 1


def test_one_policy_for_stac_and_gdal():
    retry = nhttp.stac_retry()
    assert retry.total == nhttp.MAX_ATTEMPTS - 1 and set(retry.status_forcelist) == set(nhttp.RETRY_STATUS)
    assert retry.respect_retry_after_header and retry.allowed_methods is None  # POST searches are retried too
    from ndvi_scale.engine.handles import GDAL_READ_OPTIONS as opts

    assert opts["GDAL_HTTP_MAX_RETRY"] == str(nhttp.MAX_ATTEMPTS - 1)
    assert opts["GDAL_HTTP_RETRY_CODES"] == ",".join(map(str, nhttp.RETRY_STATUS))
    assert float(opts["GDAL_HTTP_TIMEOUT"]) == nhttp.READ_TIMEOUT


# -------------------------------------------------------------------------------- Planetary Computer signing


@pytest.fixture
def fake_pc_sign(monkeypatch):
    """planetary_computer.sign replaced by a counter: each call hands out a new token (no network)."""
    with warnings.catch_warnings():  # the PC SDK's pydantic models warn on import (not ours to fix)
        warnings.simplefilter("ignore", DeprecationWarning)
        import planetary_computer

    calls: list[str] = []

    def sign(href, copy=True):
        calls.append(href)
        return f"{href}?sig=token{len(calls)}" if ".blob.core.windows.net/" in href else href

    monkeypatch.setattr(planetary_computer, "sign", sign)
    return calls


def test_hrefs_are_signed_at_load_time_and_re_signed_on_every_run(fake_pc_sign, monkeypatch):
    raw, base = read_items(PC_ITEM)
    pc_item = normalize_item(raw[0], base_href=base)
    es_raw, es_base = read_items(DATA / "stac" / "earth-search-v1" / "S2A_13TDE_20231008_0_L2A.json")
    es_item = normalize_item(es_raw[0], base_href=es_base)
    assert pc_item.provider == "planetary-computer" and es_item.provider == "earth-search-v1"

    from ndvi_scale.engine.grid import output_grid
    from ndvi_scale.engine.sources import item_source

    bbox = RunConfig.create(bbox=(-148.0, 60.6, -147.8, 60.7), start="2019-06-29", end="2019-06-29").bbox
    grid = output_grid(bbox.as_tuple(), 32606, 100.0)

    def build_sources() -> dict[str, str]:  # what pipeline.plan_sources does for each build: nothing is read
        src = item_source(pc_item, 0, grid, load.sign_items([pc_item])[0])
        return {a.band: a.href for a in src.assets}

    first = build_sources()
    second = build_sources()  # a retried run
    assert len(fake_pc_sign) == 6
    assert all(h.endswith(f"?sig=token{i}") for i, h in enumerate(first.values(), start=1))
    assert all(h.endswith(f"?sig=token{i}") for i, h in enumerate(second.values(), start=4))  # fresh tokens
    assert all("?" not in b.href for b in pc_item.bands.values())  # the item keeps unsigned hrefs

    load.sign_items([es_item])
    assert len(fake_pc_sign) == 6  # a provider without signing is never sent to the signer


def test_crs_fallback_signs_the_header_read(fake_pc_sign, tmp_path):
    spec = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 20), end=dt.date(2024, 4, 20))
    generate(tmp_path, spec)
    raw, base = read_items(tmp_path / "items.json")
    it = normalize_item(raw[0], base_href=base)
    bands = {k: dataclasses.replace(b, epsg=None, transform=None, shape=None) for k, b in it.bands.items()}
    no_crs = dataclasses.replace(it, epsg=None, bands=bands, provider="planetary-computer")
    filled = load.with_crs_from_cog(no_crs)
    assert filled.epsg == 32631 and filled.bands["scl"].shape == (48, 48)
    assert filled.bands["red"].transform == it.bands["red"].transform
    assert sorted(fake_pc_sign) == sorted(b.href for b in it.bands.values())  # signed for the read
    assert filled.bands["red"].href == it.bands["red"].href  # and kept unsigned

    gone = dataclasses.replace(no_crs, provider="local", bands={
        k: dataclasses.replace(b, href=str(tmp_path / "missing" / f"{k}.tif")) for k, b in bands.items()
    })
    with pytest.raises(ItemError, match=r"has no CRS in its metadata and the file cannot be opened"):
        load.with_crs_from_cog(gone)


# ------------------------------------------------------------------- end to end: the CLI against a STAC API

SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 20), end=dt.date(2024, 5, 15))


@pytest.fixture(scope="module")
def sample_api(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-sample")
    generate(root, SPEC)
    server = _start([root / "items.json"], tmp_path_factory.mktemp("rustac-sample"))
    yield server.endpoint, root / "items.json"
    server.stop()


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_compute_from_a_stac_api_equals_the_items_file(sample_api, tmp_path):
    url, items_json = sample_api
    common = [
        "compute",
        "--bbox",
        *(f"{v:.5f}" for v in SPEC.bbox_lonlat()),
        "--start",
        "2024-04-20",
        "--end",
        "2024-05-15",
        "--chunk",
        "64",
        "--max-cloud",
        "60",
    ]
    # rustac serves the sample's items with their local file hrefs: a remote catalog may not point at local
    # files (issue K: href policy) unless --allow-local says so.
    refused = _cli(*common, "--catalog", url, "--out", str(tmp_path / "refused.zarr"))
    assert refused.returncode == 4 and "asset href not allowed" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused.zarr").exists()
    from_api = _cli(*common, "--catalog", url, "--out", str(tmp_path / "api.zarr"), "--allow-local")
    assert from_api.returncode == 0, from_api.stderr
    from_file = _cli(*common, "--catalog", str(items_json), "--out", str(tmp_path / "file.zarr"))
    assert from_file.returncode == 0, from_file.stderr
    summary = [ln for ln in from_api.stderr.splitlines() if "scenes on" in ln]
    assert summary and summary[0] in from_file.stderr  # same scenes, same skipped
    a = xr.open_zarr(tmp_path / "api.zarr", consolidated=False)
    b = xr.open_zarr(tmp_path / "file.zarr", consolidated=False)
    assert a.sizes == b.sizes and a.sizes["time"] == 2
    for name in ("ndvi", "valid_count"):
        x, y = a[name].values, b[name].values
        assert x.dtype == y.dtype
        assert x.tobytes() == y.tobytes(), name  # bit for bit (NaN payloads included)
    assert np.isfinite(a.ndvi.values).any() and (a.valid_count.values > 0).any()
    assert json.loads(a.attrs["ndvi_scale_items"]) == json.loads(b.attrs["ndvi_scale_items"])
