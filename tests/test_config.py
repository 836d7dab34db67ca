"""Run-config normalisation: every rejection names the field, the bad value and the fix."""

from __future__ import annotations

import datetime as dt

import pytest

from ndvi_scale.config import BBox, RunConfig, format_bbox
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
