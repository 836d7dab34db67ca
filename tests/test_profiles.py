"""Tests of ndvi_scale.profiles and the catalogs/ YAML files."""

import importlib.util
import json
import sys
import types
from pathlib import Path

if importlib.util.find_spec("ndvi_scale") is None:  # running from the source tree, package not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pytest

from ndvi_scale import profiles as profiles_mod
from ndvi_scale.errors import CatalogError
from ndvi_scale.items import DEFAULT_ASSET_ALIASES, S2Item, normalize_item, read_items
from ndvi_scale.profiles import Profile, get_profile, list_profiles, profile_for_url, sign_href

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "stac"

EXPECTED = {
    # name: (url, collections, signing, (red, nir, scl) keys of its items, fixture)
    "earth-search": (
        "https://earth-search.aws.element84.com/v1",
        ("sentinel-2-l2a",),
        None,
        ("red", "nir", "scl"),
        "earth-search-v1/S2A_13TDE_20231008_0_L2A.json",
    ),
    "earth-search-c1": (
        "https://earth-search.aws.element84.com/v1",
        ("sentinel-2-c1-l2a",),
        None,
        ("red", "nir", "scl"),
        "earth-search-v1/c1-l2a_item-collection_13TDE_2024-04.json",
    ),
    "earth-search-v0": (
        "https://earth-search.aws.element84.com/v0",
        ("sentinel-s2-l2a-cogs",),
        None,
        ("B04", "B08", "SCL"),
        "earth-search-v0/santafe_13S_2020_74items.json",
    ),
    "planetary-computer": (
        "https://planetarycomputer.microsoft.com/api/stac/v1",
        ("sentinel-2-l2a",),
        "planetary-computer",
        ("B04", "B08", "SCL"),
        "planetary-computer/search_2019-01-01_33items_zones58-60.json",
    ),
    "cdse": (
        "https://stac.dataspace.copernicus.eu/v1",
        ("sentinel-2-l2a",),
        None,
        ("B04_10m", "B08_10m", "SCL_20m"),
        "copernicus-dataspace/search_S2C_55WFR_2026-05-27.json",
    ),
}


def test_every_yaml_loads_into_a_profile():
    yamls = sorted(p.stem for p in (REPO / "catalogs").glob("*.yaml"))
    profiles = list_profiles()
    assert [p.name for p in profiles] == yamls
    assert set(EXPECTED) <= set(yamls)
    assert (REPO / "catalogs" / "__init__.py").is_file()  # shipped as the subpackage ndvi_scale.catalogs
    for p in profiles:
        assert isinstance(p, Profile)
        assert p.title and p.notes and p.url.startswith("https://")
        assert p.collections and all(isinstance(c, str) for c in p.collections)
        assert set(p.assets) == {"red", "nir", "scl"}
        assert isinstance(p.page_limit, int) and 1 <= p.page_limit <= 10000
        assert isinstance(p.server_side_query, bool)
        json.dumps(p.to_dict())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_contents(name):
    url, collections, signing, keys, _ = EXPECTED[name]
    p = get_profile(name)
    assert p.url == url and p.collections == collections and p.signing == signing
    assert tuple(p.assets[b][0] for b in ("red", "nir", "scl")) == keys  # the provider's own key comes first


def test_cdse_auth_mentions_the_s3_setup():
    auth = get_profile("cdse").auth
    for word in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_S3_ENDPOINT=eodata.dataspace.copernicus.eu",
    ):
        assert word in auth
    assert get_profile("earth-search").auth is None


def test_profiles_extend_never_shrink_the_default_alias_table():
    for p in list_profiles():
        for band, keys in DEFAULT_ASSET_ALIASES.items():
            assert set(keys) <= set(p.assets[band]), (p.name, band)
        assert not {"nir08", "B8A", "nir08-jp2"} & set(p.assets["nir"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_alias_tables_cover_the_fixture_keys(name):
    *_, keys, fixture = EXPECTED[name]
    p = get_profile(name)
    raw, base = read_items(DATA / fixture)
    for item in raw:
        it = normalize_item(item, base_href=base, aliases=p.assets)
        assert isinstance(it, S2Item)
        assert (it.bands["red"].key, it.bands["nir"].key, it.bands["scl"].key) == keys
        assert item["collection"] in p.collections


def test_get_profile_unknown_lists_the_choices():
    with pytest.raises(CatalogError) as err:
        get_profile("earth-serach")
    msg = str(err.value)
    assert msg.startswith("catalog 'earth-serach' is unknown; expected 'sample', one of ")
    for name in EXPECTED:
        assert name in msg
    assert "STAC API URL" in msg and "item collection JSON" in msg


def test_get_profile_is_case_insensitive():
    assert get_profile(" CDSE ").name == "cdse"


def test_profile_for_url():
    assert (
        profile_for_url("https://planetarycomputer.microsoft.com/api/stac/v1/").name == "planetary-computer"
    )
    assert profile_for_url("https://earth-search.aws.element84.com/v1").url.endswith("/v1")
    assert profile_for_url("https://example.org/stac") is None


def test_sign_href_uses_planetary_computer_sign(monkeypatch):
    calls = []

    def fake_sign(href):
        calls.append(href)
        return href + "?sig=token"

    monkeypatch.setitem(sys.modules, "planetary_computer", types.SimpleNamespace(sign=fake_sign))
    href = "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/x/B04_10m.tif"
    assert sign_href(get_profile("planetary-computer"), href) == href + "?sig=token"
    assert sign_href("planetary-computer", href) == href + "?sig=token"
    assert calls == [href, href]
    assert sign_href(get_profile("earth-search"), "https://a/b.tif") == "https://a/b.tif"
    assert sign_href(None, "x") == "x"
    assert len(calls) == 2  # not called for unsigned providers


def test_sign_href_errors(monkeypatch):
    def broken(href):
        raise RuntimeError("token endpoint down")

    monkeypatch.setitem(sys.modules, "planetary_computer", types.SimpleNamespace(sign=broken))
    with pytest.raises(CatalogError, match="could not sign .*token endpoint down"):
        sign_href("planetary-computer", "https://x/y.tif")
    monkeypatch.setitem(sys.modules, "planetary_computer", None)  # makes `import planetary_computer` fail
    with pytest.raises(CatalogError, match="pip install planetary-computer"):
        sign_href("planetary-computer", "https://x/y.tif")


GOOD = """
name: demo
title: Demo
url: https://example.org/stac
collections: [sentinel-2-l2a]
assets: {red: [B04], nir: [B08], scl: [SCL]}
signing: null
auth: null
page_limit: 100
server_side_query: false
notes: demo profile
"""


def test_yaml_validation():
    p = profiles_mod._profile_from_yaml(GOOD, "demo.yaml", "demo")
    assert p.assets["nir"][0] == "B08" and p.server_side_query is False
    bad = {
        "nir: [B08]": ("nir: [nir08]", "assets.nir"),
        "name: demo": ("name: other", "name"),
        "page_limit: 100": ("page_limit: many", "page_limit"),
        "signing: null": ("signing: magic", "signing"),
        "url: https://example.org/stac": ("url: ftp://x", "url"),
    }
    for old, (new, field) in bad.items():
        with pytest.raises(CatalogError, match=field):
            profiles_mod._profile_from_yaml(GOOD.replace(old, new), "demo.yaml", "demo")
    with pytest.raises(CatalogError, match="lacks notes"):
        profiles_mod._profile_from_yaml(GOOD.replace("notes: demo profile\n", ""), "demo.yaml", "demo")
    with pytest.raises(CatalogError, match="not valid YAML"):
        profiles_mod._profile_from_yaml("a: [b", "demo.yaml", "demo")
