"""stackstac, the optional extra: ndvi_scale.stack (its public API) and the engine agree with it.

stackstac 0.5.1 pins pandas<3, so it is not in the test environment (which runs the current pandas): the tests
marked ``stackstac`` run in a second environment layered on the first (tests/stackstac_env.py), driven by
:func:`test_stackstac_suite_in_its_own_environment`. Where stackstac is importable they run directly too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def two_zone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    import datetime as dt

    from ndvi_scale.sample import generate_zones, straddling_specs

    specs = straddling_specs(size=128, blocksize=128, start=dt.date(2024, 4, 1), end=dt.date(2024, 5, 10))
    root = tmp_path_factory.mktemp("stackstac-zones")
    generate_zones(root, specs)
    return specs, root / "items.json"


def _small_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    import datetime as dt

    from ndvi_scale.sample import SampleSpec, generate

    spec = SampleSpec(size=96, blocksize=32, start=dt.date(2024, 4, 1), end=dt.date(2024, 5, 20))
    root = tmp_path_factory.mktemp("stackstac-sample")
    generate(root, spec)
    return spec, root / "items.json"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    return _small_sample(tmp_path_factory)


def _cfg(catalog: Path, bbox: Any, **kw: Any) -> Any:
    from ndvi_scale.config import RunConfig

    return RunConfig.create(bbox=bbox, start="2024-04-01", end="2024-05-20", catalog=str(catalog), **kw)


@pytest.mark.stackstac
@pytest.mark.parametrize("crs", ["auto", "EPSG:32632"])
def test_stack_api_equals_the_engine_grid_and_pixels(small, crs):
    """ndvi_scale.stack (stackstac.stack) on the run's items gives the engine's grid, coordinate for coordinate,
    and the reference stack's pixels (the engine's reads are tested against that reference)."""
    from ndvi_scale.load import stack
    from ndvi_scale.pipeline import make_plan, plan_grid
    from ndvi_scale.testing.reference import reference_stack

    spec, catalog = small
    plan = make_plan(_cfg(catalog, spec.bbox_lonlat(), crs=crs))
    grid = plan_grid(plan)
    items = [it for p in plan.plans if p for it in p.items]
    arr = stack(items, epsg=plan.epsg, bbox=plan.config.bbox, resolution=10.0, chunk=64)
    assert arr.shape[2:] == grid.shape
    np.testing.assert_array_equal(arr.x.values, grid.xs())
    np.testing.assert_array_equal(arr.y.values, grid.ys())
    got = arr.data.compute(scheduler="threads")
    np.testing.assert_array_equal(got, reference_stack(items, grid))


@pytest.mark.stackstac
def test_engine_equals_stackstac_stack_then_reduce(small):
    """The composites of build() equal the stage functions run on stackstac's own stack, bit for bit."""
    from ndvi_scale.composite import reduce_days
    from ndvi_scale.load import stack
    from ndvi_scale.pipeline import build, make_plan
    from ndvi_scale.testing.reference import clear_mask, mosaic_days, ndvi

    spec, catalog = small
    # plain SCL classes: this checks the pixels of stackstac's stack (the filters are checked in tests/engine)
    cfg = _cfg(catalog, spec.bbox_lonlat(), chunk=64, method="median", mask_filters=())
    plan = make_plan(cfg)
    got = build(cfg, plan).compute()
    for t, p in enumerate(plan.plans):
        if p is None:
            continue
        block = stack(list(p.items), epsg=plan.epsg, bbox=cfg.bbox, resolution=10.0).data.compute()
        per_item = np.stack([
            ndvi(block[i, 0], block[i, 1], p.red_scale[i], p.red_offset[i],
                 clear_mask(block[i, 2], block[i, 0], block[i, 1], cfg.mask_classes), p.nir_scale[i],
                 p.nir_offset[i])
            for i in range(len(p.items))
        ])
        value, count = reduce_days(mosaic_days(per_item, p.day_index), "median", np.asarray(p.day_numbers))
        np.testing.assert_array_equal(got.ndvi.values[t], value)
        np.testing.assert_array_equal(got.valid_count.values[t], count.astype(np.uint16))


@pytest.mark.stackstac
def test_top_level_stack_is_the_runs_scenes_on_its_grid(small):
    """ndvi_scale.stack(bbox, start, end, catalog): the scenes compute() would use, one time chunk per period."""
    import ndvi_scale
    from ndvi_scale.pipeline import make_plan, plan_grid

    spec, catalog = small
    arr = ndvi_scale.stack(spec.bbox_lonlat(), "2024-04-01", "2024-05-20", str(catalog), chunk=64)
    plan = make_plan(_cfg(catalog, spec.bbox_lonlat(), chunk=64))
    live = [p for p in plan.plans if p]
    assert list(arr.id.values) == [it.id for p in live for it in p.items]
    assert arr.data.chunks[0] == tuple(len(p.items) for p in live) and arr.dtype == np.uint16
    np.testing.assert_array_equal(arr.x.values, plan_grid(plan).xs())


def test_stack_without_stackstac_says_how_to_get_it(small, monkeypatch):
    import ndvi_scale
    from ndvi_scale.errors import InputError

    monkeypatch.setitem(sys.modules, "stackstac", None)  # as if not installed
    spec, catalog = small
    with pytest.raises(InputError, match=r"pip install 'ndvi-scale\[stackstac\]'"):
        ndvi_scale.stack(spec.bbox_lonlat(), "2024-04-01", "2024-05-20", str(catalog))


@pytest.mark.stackstac
def test_two_zone_grid_equals_stackstac(two_zone):
    """Across a UTM zone boundary (items in two CRSs): same grid as stackstac's with epsg= given."""
    from ndvi_scale.config import RunConfig
    from ndvi_scale.load import stack
    from ndvi_scale.pipeline import make_plan, plan_grid

    specs, catalog = two_zone
    # about 1/3 in zone 30 (reprojected when the output is in 31), 2/3 in zone 31
    bbox = (-0.015, 48.3395, 0.0285, 48.3495)
    cfg = RunConfig.create(bbox=bbox, start="2024-04-01", end="2024-05-10", catalog=str(catalog))
    plan = make_plan(cfg)
    grid = plan_grid(plan)
    items = [it for p in plan.plans if p for it in p.items]
    arr = stack(items, epsg=plan.epsg, bbox=cfg.bbox, resolution=10.0)
    np.testing.assert_array_equal(arr.x.values, grid.xs())
    np.testing.assert_array_equal(arr.y.values, grid.ys())


@pytest.mark.integration
def test_stackstac_suite_in_its_own_environment(tmp_path):
    """The ``stackstac`` tests, in an environment with stackstac 0.5.1 and pandas<3 layered on this one (the
    package itself runs on pandas 3 here): they must all pass."""
    try:
        import stackstac  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.fail("stackstac is installed in the test environment: the stackstac tests ran directly; this "
                    "test is for the pandas 3 environment", pytrace=False)
    sys.path.insert(0, str(TESTS))
    from stackstac_env import stackstac_python

    python = stackstac_python()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "stackstac", "--basetemp",
         str(tmp_path / "t"), str(TESTS / "test_stackstac_compat.py"), str(TESTS / "test_items.py")],
        capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=900,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout, tail
