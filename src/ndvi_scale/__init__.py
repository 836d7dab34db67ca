"""ndvi-scale: cloud-free Sentinel-2 L2A NDVI composites as Zarr, from a notebook, the CLI or a scheduled job.

>>> import ndvi_scale
>>> ds = ndvi_scale.compute(bbox=ndvi_scale.SAMPLE_BBOX, start="2024-05-01", end="2024-06-30")  # lazy
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import BBox, RunConfig  # noqa: E402
from .errors import NdviScaleError  # noqa: E402


def __getattr__(name: str):  # lazy: `import ndvi_scale` stays cheap for the CLI's --help
    if name in ("compute", "build", "run", "make_plan", "plan", "stack"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("series", "zonal"):
        from . import analytics

        return getattr(analytics, name)
    if name in ("SAMPLE_BBOX", "SAMPLE_START", "SAMPLE_END"):
        from . import sample

        return getattr(sample, name)
    raise AttributeError(name)


__all__ = [
    "BBox", "NdviScaleError", "RunConfig", "__version__", "compute", "build", "run", "make_plan", "plan", "stack",
    "series", "zonal",
]
