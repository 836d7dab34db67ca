"""Index stage: NDVI from red/nir digital numbers with per-item scale and offset."""

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


def ndvi(
    red_dn: np.ndarray,
    nir_dn: np.ndarray,
    scale: float,
    offset: float,
    clear: np.ndarray | None = None,
    nir_scale: float | None = None,
    nir_offset: float | None = None,
) -> np.ndarray:
    """NDVI = (nir - red) / (nir + red) as float32, NaN where not ``clear`` or where both reflectances are 0."""
    red = reflectance(red_dn, scale, offset)
    nir = reflectance(nir_dn, scale if nir_scale is None else nir_scale, offset if nir_offset is None else nir_offset)
    den = nir + red
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (nir - red) / den
    bad = den <= 0
    if clear is not None:
        bad |= ~clear
    out[bad] = np.nan
    return out
