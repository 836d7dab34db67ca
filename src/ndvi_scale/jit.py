"""numba, when installed: the compiled loops of :mod:`ndvi_scale.kernel` and :mod:`ndvi_scale.maskfilters`.

Every compiled loop has a numpy twin with the same results bit for bit; ``NDVI_SCALE_NUMBA=0`` (read at each call)
runs the numpy twins even where numba is installed (tests run both).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["NUMBA", "njit", "use_numba"]

numba: Any
try:
    import numba
except ImportError:  # the [fast] extra is not installed: numpy everywhere
    numba = None

#: True when numba is installed (``NDVI_SCALE_NUMBA=0`` still switches to numpy at run time).
NUMBA = numba is not None


def njit(func: Any, signatures: list[Any] | None = None) -> Any:
    """``func`` compiled by numba (cached on disk, GIL released, no bounds checks, numpy's division semantics),
    or None when numba is not installed. ``signatures``: compile those now, and only those (arguments of other
    types are converted to them), instead of one specialisation per argument types met."""
    if numba is None:
        return None

    def compiled(cache: bool) -> Any:
        options = {"cache": cache, "nogil": True, "error_model": "numpy", "boundscheck": False}
        jit = numba.njit(signatures, **options) if signatures is not None else numba.njit(**options)
        return jit(func)

    try:
        return compiled(True)
    except RuntimeError:  # no writable cache location (read-only image, no NUMBA_CACHE_DIR): compile per process
        return compiled(False)


def use_numba() -> bool:
    """Whether the compiled loops run: numba installed and ``NDVI_SCALE_NUMBA`` is not ``0``."""
    return NUMBA and os.environ.get("NDVI_SCALE_NUMBA", "1") != "0"
