from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers import SPEC_ONE_TILE, SPEC_TILED

from ndvi_scale.engine.reader import forget_readers
from ndvi_scale.engine.tiles import TILE_CACHE
from ndvi_scale.engine.warm import WARM
from ndvi_scale.sample import SampleSpec, generate


@pytest.fixture(scope="module", params=[SPEC_ONE_TILE, SPEC_TILED], ids=["one-tile", "tiled"])
def sample(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[SampleSpec, Any]:
    spec = request.param
    root = tmp_path_factory.mktemp("engine-sample")
    generate(root, spec)
    return spec, root / "items.json"


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    """Every test starts without cached tiles, readers or open handles of another."""
    TILE_CACHE.clear()
    WARM.clear()
    forget_readers()
    yield
    TILE_CACHE.clear()
    WARM.clear()
    forget_readers()
