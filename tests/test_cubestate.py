"""ndvi_scale.cubestate and the pictures of an incomplete cube: regions an interrupted write has not computed are
found from its progress markers, announced by a banner and drawn hatched, never like "no clear observation"."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import ndvi_scale
from ndvi_scale import viz
from ndvi_scale.cubestate import completeness
from ndvi_scale.sample import SampleSpec, generate

SPEC = SampleSpec(size=192, blocksize=128, start=dt.date(2024, 4, 20), end=dt.date(2024, 6, 15))
HATCH_PINK = np.array([0xE8, 0xA0, 0xA0])
BANNER_PINK = np.array([0xFD, 0xE8, 0xE8])


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("state-sample")
    generate(root, SPEC)
    return str(root / "items.json")


def interrupted_cube(catalog: str, out: Path, regions: int, **options: Any) -> dict[str, Any]:
    """Write a monthly cube (3 periods, chunks of 64 px) and stop it after ``regions`` regions."""
    from ndvi_scale import write as write_module

    args: dict[str, Any] = dict(bbox=SPEC.bbox_lonlat(), start="2024-04-20", end="2024-06-15", catalog=catalog,
                                out=str(out), chunk=64, **options)
    real = write_module._write_region
    calls = {"n": 0}

    def some(*a: Any, block_info: Any = None, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > regions:
            raise KeyboardInterrupt
        return real(*a, block_info=block_info, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(write_module, "_write_region", some)
    try:
        with pytest.raises(KeyboardInterrupt):
            ndvi_scale.compute(**args)
        # regions already running in other threads finish after the interruption: wait until no marker appears
        seen = -1
        for _ in range(40):
            now = len([p for p in (out / ".ndvi-scale" / "done").rglob("*") if p.is_file()])
            if now == seen:
                break
            seen = now
            time.sleep(0.25)
    finally:
        mp.undo()
    return args


def _share(png: Path, rgb: np.ndarray) -> float:
    with Image.open(png) as im:
        px = np.asarray(im.convert("RGB"), dtype=int)
    return float((np.abs(px - rgb).sum(axis=2) <= 6).mean())


def test_incomplete_cube_is_found_announced_and_hatched(catalog: str, tmp_path: Path) -> None:
    out = tmp_path / "c.zarr"
    args = interrupted_cube(catalog, out, regions=4)
    markers = [p for p in (out / ".ndvi-scale" / "done").rglob("*") if p.is_file()]
    ds = viz.open_cube(out)
    state = completeness(ds)
    blocks = (-(-ds.sizes["y"] // 64), -(-ds.sizes["x"] // 64))
    assert state.computed.shape == (3, *blocks) and int(state.computed.sum()) == len(markers) >= 4
    assert not state.complete and len(markers) < 24 and state.periods_missing() == [0, 1, 2]  # no period whole
    banner = state.banner()
    assert banner.startswith("INCOMPLETE CUBE") and "re-run the same command" in banner
    # never-computed regions read as NaN, exactly like no clear observation: only the markers tell them apart
    nan = np.isnan(ds.ndvi.values)
    for t in range(3):
        assert nan[t][~state.pixel_mask(t, ds.sizes["y"], ds.sizes["x"])].all()

    png = tmp_path / "partial.png"
    viz.show(out, png)
    assert _share(png, HATCH_PINK) > 0.05, "regions not computed are not hatched"
    assert _share(png, BANNER_PINK) > 0.001, "no banner"

    ndvi_scale.compute(**args)  # the same command finishes it
    done = viz.open_cube(out)
    assert completeness(done).complete and completeness(done).banner() == ""
    viz.show(out, png)
    assert _share(png, HATCH_PINK) == 0.0 and _share(png, BANNER_PINK) == 0.0


def test_a_dataset_without_write_state_is_complete(catalog: str) -> None:
    lazy = ndvi_scale.compute(bbox=SPEC.bbox_lonlat(), start="2024-05-01", end="2024-05-31", catalog=catalog,
                              chunk=64)
    state = completeness(lazy)
    assert state.complete and state.computed.shape == (1, -(-lazy.sizes["y"] // 64), -(-lazy.sizes["x"] // 64))
