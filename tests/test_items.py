"""Tests of ndvi_scale.items on real STAC items of every provider (tests/data/stac, copied from the shared
fixtures).

Expected values come from the fixture READMEs and the ESA rule, written out by hand here:
reflectance = DN * 0.0001 + offset, offset = -0.1 for processing baseline >= 04.00, else 0.
"""

import copy
import datetime as dt
import functools
import http.server
import importlib.util
import json
import os
import re
import sys
import threading
from pathlib import Path

if importlib.util.find_spec("ndvi_scale") is None:  # running from the source tree, package not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
import pytest

from ndvi_scale.errors import CatalogError, InputError, ItemError
from ndvi_scale.items import (
    DEFAULT_ASSET_ALIASES,
    BandAsset,
    S2Item,
    Skipped,
    epsg_from_mgrs,
    expected_offset,
    inspect,
    normalize_item,
    normalize_items,
    processing_baseline,
    read_items,
)

DATA = Path(__file__).parent / "data" / "stac"

ES_2023 = "earth-search-v1/S2A_13TDE_20231008_0_L2A.json"
ES_2020 = "earth-search-v1/S2A_29RKH_20200219_0_L2A.json"
ES_C1 = "earth-search-v1/c1-l2a_item-collection_13TDE_2024-04.json"
ES_SEARCH = "earth-search-v1/search_13TDE_2023-10-08_s2l2a+landsat.json"
V0_ITEM = "earth-search-v0/S2A_28QCH_20200714_0_L2A.json"
V0_SANTAFE = "earth-search-v0/santafe_13S_2020_74items.json"
PC_ITEM = "planetary-computer/S2B_MSIL2A_20190629T212529_R043_T06VVN_20201006T080531.json"
PC_RASTER = "planetary-computer/S2B_MSIL2A_20190629T212529_R043_T06VVN_20201006T080531_raster_ext.json"
PC_PAGE1 = "planetary-computer/search-page-1_04.00.json"
PC_PAGE2 = "planetary-computer/search-page-2_04.00.json"
PC_ZONES = "planetary-computer/search_2019-01-01_33items_zones58-60.json"
PC_TWO = "planetary-computer/two-items_13TDE_2024-08_05.11.json"
CDSE = "copernicus-dataspace/search_S2C_55WFR_2026-05-27.json"
ST_33XWJ = "stactools-sentinel2/S2B_T33XWJ_20220413T150756_L2A.json"
ST_22HBD = "stactools-sentinel2/S2B_T22HBD_20210122T133224_L2A.json"
COLLECTIONS = [
    "earth-search-v1/collection_sentinel-2-c1-l2a.json",
    "planetary-computer/collection_sentinel-2-l2a.json",
]

# file -> (features, usable L2A, baseline, EPSG ("zone": from the tile in the id), red/nir offset, provider,
#          tiles)
CASES = {
    ES_2023: (1, 1, "05.09", 32613, -0.1, "earth-search-v1", {"13TDE"}),
    ES_2020: (1, 1, "02.14", 32629, 0.0, "earth-search-v1", {"29RKH"}),
    ES_C1: (10, 10, "05.10", 32613, -0.1, "earth-search-v1", {"13TDE"}),
    ES_SEARCH: (2, 1, "05.09", 32613, -0.1, "earth-search-v1", {"13TDE"}),
    V0_ITEM: (1, 1, "02.14", 32628, 0.0, "earth-search-v0", {"28QCH"}),
    V0_SANTAFE: (74, 74, "02.14", 32613, 0.0, "earth-search-v0", {"13SCV", "13SDV"}),
    PC_ITEM: (1, 1, "02.12", 32606, 0.0, "planetary-computer", {"06VVN"}),
    PC_RASTER: (1, 1, "02.12", 32606, 0.0, "planetary-computer", {"06VVN"}),
    PC_PAGE1: (1, 1, "04.00", 32619, -0.1, "planetary-computer", {"19PHS"}),
    PC_PAGE2: (1, 1, "04.00", 32621, -0.1, "planetary-computer", {"21UYT"}),
    PC_ZONES: (33, 33, "02.12", "zone", 0.0, "planetary-computer", None),
    PC_TWO: (2, 2, "05.11", 32613, -0.1, "planetary-computer", {"13TDE"}),
    CDSE: (1, 1, "05.12", 32655, -0.1, "cdse", {"55WFR"}),
    ST_33XWJ: (1, 1, "04.00", 32633, -0.1, "stactools", {"33XWJ"}),
    ST_22HBD: (1, 1, "02.14", 32722, 0.0, "stactools", {"22HBD"}),
}

RED_FILE = re.compile(r"(^|[/_])B04(_10m)?\.(tif|jp2)$")
NIR_FILE = re.compile(r"(^|[/_])B08(_10m)?\.(tif|jp2)$")
SCL_FILE = re.compile(r"(^|[/_])SCL(_20m)?\.(tif|jp2)$")


def load(rel: str) -> dict:
    return json.loads((DATA / rel).read_text())


def first_feature(rel: str) -> dict:
    doc = load(rel)
    return copy.deepcopy(doc["features"][0] if doc.get("type") == "FeatureCollection" else doc)


def strip_baseline(item: dict) -> dict:
    """Remove every place a processing baseline can be read from (properties and id)."""
    props = item["properties"]
    for key in list(props):
        if key in (
            "s2:processing_baseline",
            "sentinel:processing_baseline",
            "processing:version",
        ) or re.search(r"N\d\d\.?\d\d", str(props[key])):
            del props[key]
    item["id"] = re.sub(r"_N\d{4}", "", item["id"])
    return item


# ----------------------------------------------------------------------------------------------------
# every fixture item


def test_every_fixture_file_is_covered():
    on_disk = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*.json")}
    assert on_disk == set(CASES) | set(COLLECTIONS)


@pytest.mark.parametrize("rel", sorted(CASES))
def test_fixture_items_normalise_per_rule(rel):
    n_features, n_l2a, baseline, epsg, offset, provider, tiles = CASES[rel]
    raw, base = read_items(DATA / rel)
    assert len(raw) == n_features
    results = [normalize_item(it, base_href=base) for it in raw]
    ok = [r for r in results if isinstance(r, S2Item)]
    assert len(ok) == n_l2a
    for it, src in zip(results, raw, strict=True):
        if isinstance(it, Skipped):
            continue
        assert it.id == src["id"]
        assert it.provider == provider
        assert it.processing_baseline == baseline
        if epsg == "zone":  # 3 UTM zones in one search: EPSG from the tile named in the id (T60VUK -> 32660)
            zone = int(re.search(r"_T(\d\d)[A-Z]{3}_", it.id).group(1))
            assert it.epsg == 32600 + zone
        else:
            assert it.epsg == epsg
        assert it.tile in (tiles if tiles is not None else {re.search(r"_T(\d\d[A-Z]{3})_", it.id).group(1)})
        assert set(it.bands) == {"red", "nir", "scl"}
        for name in ("red", "nir"):
            band = it.bands[name]
            assert band.scale == pytest.approx(0.0001)
            assert band.offset == pytest.approx(offset, abs=1e-12)
            assert band.nodata == 0
        assert it.bands["scl"].scale == 1 and it.bands["scl"].offset == 0 and it.bands["scl"].nodata == 0
        assert RED_FILE.search(it.bands["red"].href), it.bands["red"].href
        assert NIR_FILE.search(it.bands["nir"].href), it.bands["nir"].href
        assert SCL_FILE.search(it.bands["scl"].href), it.bands["scl"].href
        assert "B8A" not in it.bands["nir"].href
        # acquisition time: tz-aware UTC and equal to the item's datetime
        assert it.datetime.utcoffset() == dt.timedelta(0)
        stated = dt.datetime.fromisoformat(src["properties"]["datetime"].replace("Z", "+00:00"))
        assert abs((it.datetime - stated).total_seconds()) < 1e-3
        assert it.cloud_cover == pytest.approx(src["properties"]["eo:cloud_cover"])
        assert it.bbox == pytest.approx(tuple(src["bbox"]))
        # no contradiction in these real items -> no offset warning (Earth Search's flag is another warning)
        assert not [w for w in it.warnings if "contradicts" in w or "no processing baseline" in w]


def test_es_v1_picks_cogs_not_jp2_duplicates_and_not_nir08():
    it = normalize_item(first_feature(ES_2023))
    prefix = "https://sentinel-cogs.s3.us-west-2.amazonaws.com/sentinel-s2-l2a-cogs/13/T/DE/2023/10/S2A_13TDE_20231008_0_L2A/"
    assert it.bands["red"].href == prefix + "B04.tif"
    assert it.bands["nir"].href == prefix + "B08.tif"
    assert it.bands["scl"].href == prefix + "SCL.tif"
    assert it.bands["red"].transform == (10, 0, 399960, 0, -10, 4500000)
    assert it.bands["red"].shape == (10980, 10980)
    assert it.bands["scl"].transform == (20, 0, 399960, 0, -20, 4500000)


def test_es_v1_without_cog_falls_back_to_jp2():
    item = first_feature(ES_2023)
    del item["assets"]["red"]
    it = normalize_item(item)
    assert it.bands["red"].href == "s3://sentinel-s2-l2a/tiles/13/T/DE/2023/10/8/0/B04.jp2"
    assert it.bands["red"].offset == pytest.approx(-0.1)


def test_landsat_in_mixed_search_is_skipped():
    raw, _ = read_items(DATA / ES_SEARCH)
    results = [normalize_item(it) for it in raw]
    skipped = [r for r in results if isinstance(r, Skipped)]
    assert [s.id for s in skipped] == ["LC08_L2SP_033032_20231008_02_T1"]
    assert "Landsat" in skipped[0].reason
    assert skipped[0].inspect_record() == {
        "id": "LC08_L2SP_033032_20231008_02_T1",
        "skipped": skipped[0].reason,
    }


def test_es_v0_baseline_only_in_product_id():
    item = load(V0_ITEM)
    assert "s2:processing_baseline" not in item["properties"]
    assert processing_baseline(item) == "02.14"  # from ..._N0214_... in sentinel:product_id
    it = normalize_item(item)
    assert (it.bands["red"].key, it.bands["nir"].key, it.bands["scl"].key) == ("B04", "B08", "SCL")
    assert it.bands["red"].transform == (10.0, 0.0, 300000.0, 0.0, -10.0, 2300040.0)  # 9 numbers in the item
    assert it.epsg == 32628 and it.bands["red"].epsg is None  # item-level proj:epsg only
    assert it.warnings == ()


def test_pc_baseline_0400_gives_offset_although_nothing_else_says_so():
    for rel in (PC_PAGE1, PC_PAGE2):
        item = first_feature(rel)
        assert not any("raster:bands" in a or "raster:offset" in a for a in item["assets"].values())
        it = normalize_item(item)
        assert it.bands["red"].offset == pytest.approx(-0.1)
        assert it.bands["nir"].offset == pytest.approx(-0.1)
        assert it.bands["red"].href.startswith(
            "https://sentinel2l2a01.blob.core.windows.net/"
        )  # unsigned here


def test_cdse_uses_processing_version_10m_bands_20m_scl_and_asset_proj_code():
    item = first_feature(CDSE)
    assert "proj:epsg" not in item["properties"] and "proj:code" not in item["properties"]
    it = normalize_item(item)
    assert it.processing_baseline == "05.12"
    assert (it.bands["red"].key, it.bands["nir"].key, it.bands["scl"].key) == (
        "B04_10m",
        "B08_10m",
        "SCL_20m",
    )
    assert it.bands["red"].href.endswith("/IMG_DATA/R10m/T55WFR_20260527T014651_B04_10m.jp2")
    assert it.bands["nir"].href.endswith("/IMG_DATA/R10m/T55WFR_20260527T014651_B08_10m.jp2")
    assert it.bands["scl"].href.endswith("/IMG_DATA/R20m/T55WFR_20260527T014651_SCL_20m.jp2")
    assert all(b.href.startswith("s3://eodata/") for b in it.bands.values())
    assert {b.epsg for b in it.bands.values()} == {32655}
    assert it.bands["scl"].transform == (20, 0, 600000, 0, -20, 7600020)
    # processing:version removed: the id still says N0512
    del item["properties"]["processing:version"]
    assert processing_baseline(item) == "05.12"


def test_stactools_relative_hrefs_resolved_against_the_file_folder():
    raw, base = read_items(DATA / ST_33XWJ)
    assert raw[0]["assets"]["red"]["href"].startswith("./GRANULE/")
    it = normalize_item(raw[0], base_href=base)
    granule = DATA / "stactools-sentinel2" / "GRANULE" / "L2A_T33XWJ_A026649_20220413T150756" / "IMG_DATA"
    assert it.bands["red"].href == str(granule / "R10m" / "T33XWJ_20220413T150759_B04_10m.tif")
    assert it.bands["nir"].href == str(granule / "R10m" / "T33XWJ_20220413T150759_B08_10m.tif")
    assert it.bands["scl"].href == str(granule / "R20m" / "T33XWJ_20220413T150759_SCL_20m.tif")
    assert it.epsg == 32633  # item-level proj:code "EPSG:32633"
    # a URL base works too, and a file path base means its folder
    it2 = normalize_item(raw[0], base_href="https://example.org/safe/S2B.SAFE/item.json")
    assert it2.bands["red"].href == (
        "https://example.org/safe/S2B.SAFE/GRANULE/L2A_T33XWJ_A026649_20220413T150756/IMG_DATA/R10m/"
        "T33XWJ_20220413T150759_B04_10m.tif"
    )
    # no base at all: left relative, with a warning saying how to fix it
    it3 = normalize_item(raw[0])
    assert it3.bands["red"].href.startswith("./GRANULE/")
    assert any("base_href" in w for w in it3.warnings)


def test_item_with_local_hrefs_is_provider_local():
    item = first_feature(ES_2020)  # the real item of the decimated pixels in shared/fixtures/raster
    for key, name in (("red", "B04"), ("nir", "B08"), ("scl", "SCL")):
        item["assets"][key]["href"] = f"/data/S2A_29RKH_20200219_0_L2A/{name}.tif"
    it = normalize_item(item)
    assert it.provider == "local"
    assert it.bands["nir"].href == "/data/S2A_29RKH_20200219_0_L2A/B08.tif"
    assert it.bands["red"].offset == 0.0 and it.epsg == 32629


def test_stactools_pre_0400_item_has_zero_offset():
    it = normalize_item(first_feature(ST_22HBD), base_href=str(DATA / "stactools-sentinel2") + "/")
    assert it.processing_baseline == "02.14"
    assert it.bands["red"].offset == 0.0 and it.bands["nir"].offset == 0.0
    assert it.bands["red"].href.endswith("T22HBD_20210122T133229_B04_10m.jp2")


# ----------------------------------------------------------------------------------------------------
# the rule: baseline decides; contradictions are warned


def test_expected_offset_compares_numbers_not_strings():
    assert expected_offset("04.00") == pytest.approx(-0.1)
    assert expected_offset("03.99") == 0.0
    assert expected_offset("02.14") == 0.0
    assert expected_offset("05.12") == pytest.approx(-0.1)
    assert expected_offset("N0400") == pytest.approx(-0.1)
    assert expected_offset("3.10") == 0.0  # as strings "3.10" > "04.00" would wrongly give -0.1
    assert expected_offset("10.00") == pytest.approx(-0.1)
    with pytest.raises(InputError, match="'abc'"):
        expected_offset("abc")


def test_processing_baseline_sources():
    assert processing_baseline({"id": "x", "properties": {"s2:processing_baseline": "05.09"}}) == "05.09"
    assert (
        processing_baseline({"id": "x", "properties": {"sentinel:processing_baseline": "04.00"}}) == "04.00"
    )
    assert processing_baseline({"id": "x", "properties": {"processing:version": "05.12"}}) == "05.12"
    uri = "S2A_MSIL2A_20200714T115221_N0214_R123_T28QCH_20200714T191310.SAFE"
    assert processing_baseline({"id": "x", "properties": {"s2:product_uri": uri}}) == "02.14"
    granule = "S2A_OPER_MSI_L2A_TL_2APS_20231008T233154_A043324_T13TDE_N05.09"
    assert processing_baseline({"id": "x", "properties": {"s2:granule_id": granule}}) == "05.09"
    assert (
        processing_baseline({"id": "S2C_MSIL2A_20260527T014651_N0512_R017_T55WFR_20260527T042005"}) == "05.12"
    )
    assert processing_baseline({"id": "S2A_13TDE_20231008_0_L2A", "properties": {}}) is None


def test_raster_offset_0_contradicting_baseline_0509_follows_baseline():
    item = first_feature(ES_2023)
    for key in ("red", "nir"):
        item["assets"][key]["raster:bands"][0]["offset"] = 0
    it = normalize_item(item)
    assert it.bands["red"].offset == pytest.approx(-0.1)
    assert it.bands["nir"].offset == pytest.approx(-0.1)
    warning = next(w for w in it.warnings if "contradicts" in w)
    assert "raster offset 0" in warning and "05.09" in warning and "-0.1" in warning
    assert "red" in warning and "nir" in warning


def test_raster_offset_minus01_on_pre_0400_item_follows_baseline():
    item = first_feature(ES_2020)
    item["assets"]["red"]["raster:bands"][0]["offset"] = -0.1
    it = normalize_item(item)
    assert it.bands["red"].offset == 0.0
    assert it.bands["nir"].offset == 0.0
    warning = next(w for w in it.warnings if "contradicts" in w)
    assert "-0.1" in warning and "02.14" in warning and "red" in warning and "nir" not in warning


def test_cdse_asset_level_raster_offset_contradiction():
    item = first_feature(CDSE)
    item["assets"]["B08_10m"]["raster:offset"] = 0.0
    it = normalize_item(item)
    assert it.bands["nir"].offset == pytest.approx(-0.1)
    assert any("contradicts" in w and "nir" in w and "05.12" in w for w in it.warnings)


def test_reprocessed_old_scene_follows_baseline_not_date():
    text = (DATA / PC_ITEM).read_text().replace("N02.12", "N05.00").replace("N0212", "N0500")
    item = json.loads(text)
    item["properties"]["s2:processing_baseline"] = "05.00"
    it = normalize_item(item)
    assert it.datetime.year == 2019
    assert it.processing_baseline == "05.00"
    assert it.bands["red"].offset == pytest.approx(-0.1)
    assert it.warnings == ()


def test_no_baseline_no_raster_metadata_assumes_zero_with_warning():
    item = strip_baseline(first_feature(PC_PAGE1))
    assert processing_baseline(item) is None
    it = normalize_item(item)
    assert it.processing_baseline is None
    assert it.bands["red"].offset == 0.0 and it.bands["nir"].offset == 0.0
    assert it.bands["red"].scale == pytest.approx(0.0001)
    assert any("no processing baseline" in w and "offset 0" in w for w in it.warnings)


def test_no_baseline_uses_raster_metadata_with_warning():
    item = strip_baseline(first_feature(ES_2023))
    assert processing_baseline(item) is None
    it = normalize_item(item)
    assert it.bands["red"].offset == pytest.approx(-0.1)  # the assets' raster:bands offset
    assert any("no processing baseline" in w for w in it.warnings)


def test_disagreeing_baseline_sources_are_warned():
    item = first_feature(ES_2023)
    item["properties"]["s2:processing_baseline"] = "03.01"  # product uri and ids still say 05.09
    it = normalize_item(item)
    assert it.processing_baseline == "03.01"  # the explicit field wins
    assert it.bands["red"].offset == 0.0
    assert any("disagree" in w and "05.09" in w for w in it.warnings)


def test_earthsearch_boa_flag_is_not_trusted_only_warned():
    it = normalize_item(first_feature(ES_2023))  # flag true, baseline 05.09
    assert it.bands["red"].offset == pytest.approx(-0.1)
    assert [w for w in it.warnings if "boa_offset_applied" in w]
    old = normalize_item(first_feature(ES_2020))  # flag false, baseline 02.14: consistent, silent
    assert old.warnings == ()
    item = first_feature(ES_2020)
    item["properties"]["earthsearch:boa_offset_applied"] = True
    flipped = normalize_item(item)
    assert flipped.bands["red"].offset == 0.0
    assert any("boa_offset_applied" in w and "02.14" in w for w in flipped.warnings)


def test_unusual_scale_is_used_and_recorded():
    item = first_feature(ES_2023)
    item["assets"]["red"]["raster:bands"][0]["scale"] = 0.001
    it = normalize_item(item)
    assert it.bands["red"].scale == pytest.approx(0.001)
    assert any("scale" in w and "red" in w for w in it.warnings)


# ----------------------------------------------------------------------------------------------------
# skips and errors


def test_missing_nir_is_skipped_and_never_replaced_by_b8a():
    item = first_feature(ES_2023)
    del item["assets"]["nir"], item["assets"]["nir-jp2"]  # nir08 (B8A) is still there
    r = normalize_item(item)
    assert isinstance(r, Skipped)
    assert r.reason.startswith("missing asset nir; expected one of ")
    assert "B08" in r.reason and "nir08" not in r.reason


def test_unknown_keys_found_by_band_description():
    item = first_feature(PC_ITEM)
    item["assets"]["band_4"] = item["assets"].pop("B04")
    it = normalize_item(item)
    assert it.bands["red"].key == "band_4" and it.bands["red"].href.endswith("_B04_10m.tif")
    assert any("band description" in w for w in it.warnings)


@pytest.mark.parametrize(
    ("edit", "word"),
    [
        ({"collection": "sentinel-2-l1c"}, "L1C"),
        ({"properties.s2:product_type": "S2MSI1C"}, "L1C"),
        ({"properties.processing:level": "L1C"}, "L1C"),
        ({"collection": "sentinel-1-grd", "properties.platform": "sentinel-1a"}, "Sentinel-1"),
        ({"collection": "landsat-c2-l2", "properties.platform": "landsat-9"}, "Landsat"),
    ],
)
def test_non_l2a_items_are_skipped(edit, word):
    item = first_feature(ES_2023)
    for key, value in edit.items():
        if key.startswith("properties."):
            item["properties"][key.split(".", 1)[1]] = value
        else:
            item[key] = value
    r = normalize_item(item)
    assert isinstance(r, Skipped) and word in r.reason and r.id == item["id"]


def test_item_without_any_l2a_marker_is_skipped():
    item = {
        "type": "Feature",
        "id": "thing",
        "properties": {"datetime": "2024-01-01T00:00:00Z"},
        "assets": {},
    }
    r = normalize_item(item)
    assert isinstance(r, Skipped) and "Sentinel-2 L2A" in r.reason


def test_not_an_item_raises_item_error():
    with pytest.raises(ItemError):
        normalize_item(42)
    with pytest.raises(ItemError, match="Collection"):
        normalize_item(load(COLLECTIONS[0]))


def test_pystac_item_input_keeps_the_crs():
    pystac = pytest.importorskip("pystac")
    item = pystac.Item.from_dict(first_feature(CDSE))
    it = normalize_item(item)
    assert it.epsg == 32655 and it.processing_baseline == "05.12"


def test_cdse_without_any_crs_leaves_epsg_none():
    item = first_feature(CDSE)
    for asset in item["assets"].values():
        asset.pop("proj:code", None)
    it = normalize_item(item)
    assert it.epsg is None
    d = it.to_stackstac()
    assert "proj:epsg" not in d["properties"] and all("proj:epsg" not in a for a in d["assets"].values())
    assert epsg_from_mgrs(it.tile) == 32655  # the loader's fallback


def test_epsg_from_mgrs():
    assert epsg_from_mgrs("13TDE") == 32613
    assert epsg_from_mgrs("6VVN") == 32606
    assert epsg_from_mgrs("22HBD") == 32722  # H: southern hemisphere
    assert epsg_from_mgrs("MGRS-55WFR") == 32655
    with pytest.raises(InputError):
        epsg_from_mgrs("nope")


def test_normalize_items_splits_usable_and_skipped():
    raw, base = read_items(DATA / ES_SEARCH)
    ok, skipped = normalize_items(raw, base_href=base)
    assert [i.id for i in ok] == ["S2A_13TDE_20231008_0_L2A"] and [s.id for s in skipped] == [raw[1]["id"]]


def test_aliases_parameter_extends_keys():
    item = first_feature(PC_ITEM)
    item["assets"]["RED"] = item["assets"].pop("B04")
    table = {**DEFAULT_ASSET_ALIASES, "red": ("RED", *DEFAULT_ASSET_ALIASES["red"])}
    assert normalize_item(item, aliases=table).bands["red"].key == "RED"


# ----------------------------------------------------------------------------------------------------
# read_items


def test_read_single_item_file():
    items, base = read_items(str(DATA / ES_2023))
    assert [i["id"] for i in items] == ["S2A_13TDE_20231008_0_L2A"]
    assert base == str((DATA / "earth-search-v1").resolve()) + os.sep
    assert items[0] == load(ES_2023)  # unchanged, not migrated


def test_read_feature_collection_and_api_page():
    items, _ = read_items(DATA / ES_C1)
    assert len(items) == 10 and all(i["collection"] == "sentinel-2-c1-l2a" for i in items)
    page, _ = read_items(DATA / ES_SEARCH)  # /search response with context + POST next link
    assert [i["collection"] for i in page] == ["sentinel-2-l2a", "landsat-c2-l2"]
    page1, _ = read_items(DATA / PC_PAGE1)
    assert [i["id"] for i in page1] == ["S2A_MSIL2A_20230216T150721_R082_T19PHS_20230217T082924"]


def test_read_bare_json_array(tmp_path):
    features = load(ES_C1)["features"]
    path = tmp_path / "items.json"
    path.write_text(json.dumps(features))
    items, base = read_items(path)
    assert [i["id"] for i in items] == [f["id"] for f in features]
    assert base == str(tmp_path.resolve()) + os.sep


def test_read_file_url():
    url = (DATA / ST_33XWJ).resolve().as_uri()
    assert url.startswith("file://")
    items, base = read_items(url)
    it = normalize_item(items[0], base_href=base)
    assert os.path.isabs(it.bands["red"].href)
    assert it.bands["red"].href.startswith(str((DATA / "stactools-sentinel2").resolve()))


def test_read_in_memory_documents():
    doc = load(ES_C1)
    items, base = read_items(doc)
    assert len(items) == 10 and base is None
    items, base = read_items(doc["features"][:3])
    assert len(items) == 3 and base is None


@pytest.fixture
def http_root():
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(DATA))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_read_http_url(http_root):
    items, base = read_items(f"{http_root}/{ST_33XWJ}")
    assert base == f"{http_root}/stactools-sentinel2/"
    it = normalize_item(items[0], base_href=base)
    assert it.bands["red"].href == (
        f"{http_root}/stactools-sentinel2/GRANULE/L2A_T33XWJ_A026649_20220413T150756/IMG_DATA/R10m/"
        "T33XWJ_20220413T150759_B04_10m.tif"
    )
    page, _ = read_items(f"{http_root}/{PC_PAGE2}")
    assert len(page) == 1
    with pytest.raises(CatalogError, match="HTTP 404"):
        read_items(f"{http_root}/nope.json")


def test_read_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(CatalogError, match=r"catalog file .*nope\.json does not exist"):
        read_items(missing)


def test_read_invalid_json_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "type": "FeatureCollection",\n  "features": [,]\n}\n')
    with pytest.raises(CatalogError, match=r"not valid JSON.*line 3 column"):
        read_items(bad)


@pytest.mark.parametrize("rel", COLLECTIONS)
def test_read_collection_is_refused(rel):
    with pytest.raises(
        CatalogError, match="is a STAC Collection, not items; pass an item collection or a STAC API URL"
    ):
        read_items(DATA / rel)


def test_read_non_stac_json(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"hello": "world"}')
    with pytest.raises(CatalogError, match="not STAC items"):
        read_items(other)
    with pytest.raises(CatalogError, match="element 1 is not a STAC Item"):
        read_items([load(ES_2023), {"hello": 1}])
    with pytest.raises(InputError):
        read_items(12)  # type: ignore[arg-type]


def test_inspect_records():
    records = inspect(DATA / ES_SEARCH)
    assert records[1] == {"id": "LC08_L2SP_033032_20231008_02_T1", "skipped": records[1]["skipped"]}
    rec = records[0]
    assert set(rec) == {"id", "collection", "provider", "epsg", "processing_baseline", "bands", "warnings"}
    assert (
        rec["collection"] == "sentinel-2-l2a"
        and rec["epsg"] == 32613
        and rec["processing_baseline"] == "05.09"
    )
    assert set(rec["bands"]) == {"red", "nir", "scl"}
    assert set(rec["bands"]["red"]) == {"href", "scale", "offset", "nodata"}
    assert rec["bands"]["red"]["offset"] == pytest.approx(-0.1) and rec["bands"]["scl"]["scale"] == 1
    json.dumps(records)  # JSON-serialisable


# ----------------------------------------------------------------------------------------------------
# stackstac


def test_to_stackstac_dict_shape():
    it = normalize_item(first_feature(CDSE))
    d = it.to_stackstac()
    assert d["stac_version"] == "1.0.0" and d["stac_extensions"] == [] and d["type"] == "Feature"
    assert d["id"] == it.id and d["collection"] == "sentinel-2-l2a"
    assert d["properties"]["proj:epsg"] == 32655 and isinstance(d["properties"]["proj:epsg"], int)
    assert d["properties"]["datetime"] == "2026-05-27T01:46:51.025000Z"
    assert set(d["assets"]) == {"red", "nir", "scl"}
    for name, asset in d["assets"].items():
        assert "raster:bands" not in asset
        assert asset["href"] == it.bands[name].href and asset["type"] == "image/jp2"
        assert asset["proj:epsg"] == 32655
    assert d["assets"]["red"]["proj:transform"] == [10, 0, 600000, 0, -10, 7600020]
    assert d["assets"]["scl"]["proj:shape"] == [5490, 5490]
    assert d["bbox"] == list(it.bbox) and d["geometry"]["type"] == "Polygon"
    json.dumps(d)


@pytest.mark.stackstac
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # affine `*` inside stackstac.geom_utils
def test_stackstac_builds_lazily_for_es_c1_and_cdse():
    import stackstac
    # fill_value as np.uint16: stackstac 0.5.1 checks np.can_cast(type(fill_value), dtype) and a Python int is
    # int64 under numpy 2, so fill_value=0 with dtype="uint16" raises there.
    kw = dict(
        assets=["red", "nir", "scl"], resolution=20, rescale=False, dtype="uint16", fill_value=np.uint16(0)
    )

    raw, base = read_items(DATA / ES_C1)
    items = [normalize_item(i, base_href=base) for i in raw]
    arr = stackstac.stack([it.to_stackstac() for it in items], **kw)
    assert arr.shape == (10, 3, 5490, 5490)  # 109.8 km tile at 20 m
    assert list(arr.band.values) == ["red", "nir", "scl"]
    assert arr.attrs["crs"].lower() == "epsg:32613" and arr.dtype == np.uint16

    raw, base = read_items(DATA / CDSE)
    with pytest.raises(ValueError, match="Cannot pick a common CRS"):  # why to_stackstac exists
        stackstac.stack(raw, assets=["B04_10m"], resolution=20)
    cdse = [normalize_item(i, base_href=base) for i in raw]
    arr = stackstac.stack([it.to_stackstac() for it in cdse], **kw)
    assert arr.shape == (1, 3, 5490, 5490) and arr.attrs["crs"].lower() == "epsg:32655"
    assert float(arr.x.min()) >= 600000 and float(arr.y.max()) <= 7600020


def test_band_asset_defaults():
    b = BandAsset("x.tif", 0.0001, -0.1, 0)
    assert b.transform is None and b.shape is None and b.epsg is None
