"""Index stage: surface reflectance from digital numbers with per-item scale and offset (tabulated by
:mod:`ndvi_scale.kernel`; NDVI itself is computed there).
"""

from __future__ import annotations

import numpy as np


def reflectance(dn: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """Surface reflectance (float32) = DN * scale + offset, clipped at 0.

    Negative reflectances occur over dark water after the -0.1 offset of baseline >= 04.00; clipping keeps NDVI in
    [-1, 1] instead of exploding when the denominator approaches 0.
    """
    r = dn.astype(np.float32) * np.float32(scale) + np.float32(offset)
    np.maximum(r, np.float32(0), out=r)
    return r
