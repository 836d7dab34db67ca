"""A small multi-chunk cube of a sample spec, built once per test session for tests/test_zonal.py and
tests/test_series.py (3 monthly median composites, 64-px chunks: 4 x 6 spatial chunks)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from ndvi_scale.sample import SampleSpec, generate

# A perfect SCL, no mask filters: zonal statistics and series are held to the truth's composite; the SCL's errors
# and the filters are measured in tests/test_pipeline.py and tests/engine.
SPEC = SampleSpec(
    size=192, blocksize=128, start=dt.date(2024, 5, 2), end=dt.date(2024, 7, 30), field_size=320, scl_errors=False
)
START, END = "2024-05-01", "2024-07-31"
CHUNK = 64


def cube_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = Path(tmp_path_factory.getbasetemp()) / "analytics-cube"
    out = root / "cube.zarr"
    if not (out / "zarr.json").exists() and not (out / ".zgroup").exists():
        import ndvi_scale

        root.mkdir(parents=True, exist_ok=True)
        generate(root / "catalog", SPEC)
        ndvi_scale.compute(bbox=SPEC.bbox_lonlat(), start=START, end=END, catalog=str(root / "catalog" / "items.json"),
                           out=str(out), chunk=CHUNK, mask_filters=())
    return os.fspath(out)
