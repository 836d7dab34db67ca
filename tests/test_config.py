"""Run-config normalisation: every rejection names the field, the bad value and the fix."""

from __future__ import annotations

import datetime as dt

import pytest

from ndvi_scale.config import DEFAULT_MASK_FILTERS, BBox, RunConfig, format_bbox
from ndvi_scale.errors import InputError

OK = dict(bbox=(1.4, 48.1, 1.6, 48.3), start="2024-01-01", end="2024-02-29")


@pytest.mark.parametrize(
    "value", [(1.4, 48.1, 1.6, 48.3), [1.4, 48.1, 1.6, 48.3], "1.4,48.1,1.6,48.3", "1.4 48.1 1.6 48.3"]
)
def test_bbox_loose_forms(value):
    assert format_bbox(value) == BBox(1.4, 48.1, 1.6, 48.3)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ((1.6, 48.1, 1.4, 48.3), "west 1.6 >= east 1.4"),
        ((1.4, 48.3, 1.6, 48.1), "south 48.3 >= north 48.1"),
        ((1.4, 95, 1.6, 96), "south 95 is out of range"),
        ((-181, 0, 1, 1), "west -181 is out of range"),
        ((1, 2, 3), "has 3 values"),
        ("a,b,c,d", "non-number"),
        ((float("nan"), 0, 1, 1), "out of range"),
        ((170, 0, -170, 1), "antimeridian"),
    ],
)
def test_bad_bbox_is_named(value, needle):
    with pytest.raises(InputError, match="bbox") as e:
        RunConfig.create(**{**OK, "bbox": value})
    assert needle in str(e.value)


def test_start_after_end():
    with pytest.raises(InputError, match=r"start 2024-03-01 is after end 2024-02-01; give --start before"):
        RunConfig.create(**{**OK, "start": "2024-03-01", "end": "2024-02-01"})


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("start", "2024-13-01", "start '2024-13-01' is not a date; expected YYYY-MM-DD"),
        ("period", "fortnight", "period 'fortnight' is unknown; expected one of"),
        ("method", "mode", "method 'mode' is unknown"),
        ("method", "q100", "method 'q100' is unknown"),
        ("max_cloud", 120, "max_cloud 120 is out of range"),
        ("mask_classes", "3,14", "mask classes [14] are not SCL classes"),
        ("resolution", -10, "resolution -10 is out of range"),
        ("crs", "utm", "crs 'utm' is invalid"),
        ("chunk", 1000, "chunk 1000 is invalid"),
        ("zarr_format", 4, "zarr_format 4 is invalid"),
        ("out", "  ", "out is empty"),
        ("catalog", "", "catalog is empty"),
        ("overwrite", "maybe", "overwrite 'maybe' is not a boolean"),
        ("colour", "red", "unknown config field(s) colour"),
    ],
)
def test_bad_fields_are_named(field, value, needle):
    with pytest.raises(InputError) as e:
        RunConfig.create(**{**OK, field: value})
    assert needle in str(e.value)


def test_normalised_values():
    cfg = RunConfig.create(**OK, method="Q5", period="MONTH", crs="epsg:32631", mask_classes=[9, 3, 3])
    assert cfg.method == "q05" and cfg.period == "month" and cfg.crs == "EPSG:32631"
    assert cfg.mask_classes == (3, 9)
    assert cfg.start == dt.date(2024, 1, 1)
    assert cfg.to_dict()["bbox"] == [1.4, 48.1, 1.6, 48.3]
    with pytest.raises(AttributeError):
        cfg.method = "mean"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("opening:20,dilation:60", (("opening", 20.0), ("dilation", 60.0))),
        ("Dilation = 40 ; erosion 10", (("dilation", 40.0), ("erosion", 10.0))),
        ([("opening", 20), ["dilation", "60"]], (("opening", 20.0), ("dilation", 60.0))),
        ([{"op": "closing", "metres": 30}], (("closing", 30.0),)),
        (["dilation:0", "opening:20"], (("opening", 20.0),)),
        ("none", ()),
        ([], ()),
        (None, ()),
    ],
)
def test_mask_filters_loose_forms(value, expected):
    cfg = RunConfig.create(**OK, mask_filters=value)
    assert cfg.mask_filters == expected
    assert cfg.to_dict()["mask_filters"] == [list(f) for f in expected]


def test_mask_filters_default_and_dea_pair():
    assert RunConfig.create(**OK).mask_filters == DEFAULT_MASK_FILTERS
    assert [op for op, _ in DEFAULT_MASK_FILTERS] == ["opening", "dilation"]  # DEA's order
    default = dict(DEFAULT_MASK_FILTERS)
    pair = (("opening", default["opening"]), ("dilation", 100))
    assert RunConfig.create(**OK, mask_dilation=100).mask_filters == pair
    assert RunConfig.create(**OK, mask_opening="0", mask_dilation=30).mask_filters == (("dilation", 30.0),)
    assert RunConfig.create(**OK, mask_opening=0, mask_dilation=0).mask_filters == ()


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"mask_filters": "blur:20"}, "mask filters op 'blur' is unknown; expected a list of op:metres"),
        ({"mask_filters": "dilation:-5"}, "mask filters dilation radius -5 m is out of range; expected metres 0-1000"),
        ({"mask_filters": "dilation:5000"}, "mask filters dilation radius 5000 m is out of range"),
        ({"mask_filters": "dilation:nan"}, "mask filters dilation radius 'nan' is not a finite number"),
        ({"mask_filters": "dilation"}, "mask filters entry 'dilation' is not op and radius"),
        ({"mask_filters": {"op": "dilation"}}, "mask filters {'op': 'dilation'} are not a list"),
        ({"mask_dilation": "wide"}, "mask filters dilation radius 'wide' is not a number"),
        ({"mask_filters": "dilation:20", "mask_opening": 10}, "mask filters are given both as a list and as"),
        ({"mask_filters": ["dilation:1"] * 100}, "are more than 64"),
    ],
)
def test_bad_mask_filters_are_named(kw, needle):
    with pytest.raises(InputError) as e:
        RunConfig.create(**OK, **kw)
    assert needle in str(e.value) and len(str(e.value)) <= 300
