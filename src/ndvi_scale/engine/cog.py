"""The layout of a tiled GeoTIFF (a COG) from its header bytes, and decoding its tiles without GDAL.

Reading a window of a COG through GDAL fetches the tiles' bytes and inflates them in the same call, in the thread
that waits for the network. Over object storage 20-100 ms away, the engine keeps tens of reads in flight to hide
that wait, so with GDAL tens of inflates would run at once on two cores. Knowing where each tile is (this module)
lets :mod:`ndvi_scale.engine.reader` fetch tiles with as many requests in flight as it likes and decode them with
one thread per core: the waiting costs no CPU and the decoding no oversubscription.

:func:`parse_cog` reads the first IFD (the full-resolution image) of a classic or BigTIFF file through a
``read(offset, length)`` callable: size, tiling, sample type, compression, predictor, the tile offsets and byte
counts, and the GeoTIFF tags that place it (pixel scale + tie point, EPSG code, GDAL's nodata tag). It returns
None for anything it does not decode exactly as GDAL would (strips, several samples, big-endian, a mask IFD, a
rotated or user-defined georeferencing, PixelIsPoint, other codecs): the reader then uses GDAL for that file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CODECS", "CogLayout", "decode_tile", "parse_cog"]

#: TIFF compression codes decoded here (libdeflate / zlib-ng / libzstd through imagecodecs): none, LZW, Adobe
#: and old-style deflate, zstd. Sentinel-2 COGs of Earth Search and Planetary Computer are deflate.
CODECS = frozenset({1, 5, 8, 32946, 50000})

# TIFF tags used
_WIDTH, _HEIGHT, _BITS, _COMPRESSION, _SAMPLES = 256, 257, 258, 259, 277
_PLANAR, _PREDICTOR, _TILE_W, _TILE_H, _TILE_OFFSETS, _TILE_COUNTS = 284, 317, 322, 323, 324, 325
_STRIP_OFFSETS, _SUBFILE, _SAMPLE_FORMAT, _EXTRA_SAMPLES = 273, 254, 339, 338
_PIXEL_SCALE, _TIEPOINT, _MODEL_TRANSFORM, _GEOKEYS, _GDAL_NODATA = 33550, 33922, 34264, 34735, 42113
# GeoTIFF keys
_MODEL_TYPE, _RASTER_TYPE, _GEOGRAPHIC_TYPE, _PROJECTED_TYPE = 1024, 1025, 2048, 3072

#: Field type -> (struct code, size). RATIONAL/SRATIONAL are read as pairs.
_TYPES = {1: ("B", 1), 2: ("s", 1), 3: ("H", 2), 4: ("I", 4), 5: ("I", 4), 6: ("b", 1), 7: ("B", 1), 8: ("h", 2),
          9: ("i", 4), 10: ("i", 4), 11: ("f", 4), 12: ("d", 8), 16: ("Q", 8), 17: ("q", 8), 18: ("Q", 8)}

#: Most IFDs followed after the first one when looking for a mask IFD (overviews come first in a COG).
_MAX_IFDS = 32


@dataclass(frozen=True)
class CogLayout:
    """Where the full-resolution tiles of a single-band tiled GeoTIFF are, and how to decode them."""

    width: int
    """Image width in pixels."""
    height: int
    """Image height in pixels."""
    tile_width: int
    """Internal tile width (pixels)."""
    tile_height: int
    """Internal tile height (pixels)."""
    dtype: str
    """NumPy dtype of a sample, little-endian (e.g. ``<u2``)."""
    compression: int
    """TIFF compression code (one of :data:`CODECS`)."""
    predictor: int
    """1 (none) or 2 (horizontal differencing)."""
    offsets: tuple[int, ...]
    """Byte offset of each tile, row-major."""
    counts: tuple[int, ...]
    """Byte count of each tile (0: a sparse tile, all nodata)."""
    transform: tuple[float, float, float, float, float, float]
    """Affine ``a b c d e f`` (rasterio order) of the pixel corners."""
    epsg: int
    """EPSG code of the CRS."""
    nodata: float | None
    """GDAL's nodata value (the GDAL_NODATA tag), None if absent."""

    @property
    def tiles_across(self) -> int:
        """Tiles per row."""
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        """Tile rows."""
        return -(-self.height // self.tile_height)

    def tile_range(self, row: int, col: int) -> tuple[int, int]:
        """(offset, byte count) of the tile at tile row ``row`` and column ``col``."""
        i = row * self.tiles_across + col
        return self.offsets[i], self.counts[i]


class _Ifd(dict[int, tuple[int, int, int, bytes]]):
    """tag -> (type, count, value offset or -1 if inline, inline bytes)."""


def parse_cog(read: Callable[[int, int], bytes]) -> CogLayout | None:
    """The :class:`CogLayout` of a TIFF, reading its bytes with ``read(offset, length)`` (which may return fewer
    bytes at the end of the file), or None when the file is not one this module decodes exactly as GDAL would.

    Raises ``ValueError`` for bytes that are not a TIFF at all (a truncated file, an HTML error page), so a bad
    answer is an error of the read, not a silent switch to another path.
    """
    head = read(0, 16)
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        raise ValueError("not a TIFF file (no II/MM byte-order mark at its start)")
    if head[:2] == b"MM":
        return None  # big-endian: rare for COGs; GDAL reads it
    magic = struct.unpack_from("<H", head, 2)[0]
    if magic == 42:
        big, first = False, struct.unpack_from("<I", head, 4)[0]
    elif magic == 43 and len(head) >= 16:
        big, first = True, struct.unpack_from("<Q", head, 8)[0]
    else:
        raise ValueError(f"not a TIFF file (magic number {magic})")
    ifd, after = _read_ifd(read, first, big)
    seen = 0
    while after and seen < _MAX_IFDS:  # a mask IFD (NewSubfileType bit 2) changes what GDAL calls nodata
        other, after = _read_ifd(read, after, big)
        if int(_values(read, other, _SUBFILE, big, (0,))[0]) & 4:
            return None
        seen += 1
    return _layout(read, ifd, big)


def _read_ifd(read: Callable[[int, int], bytes], offset: int, big: bool) -> tuple[_Ifd, int]:
    n_size, entry, next_size = (8, 20, 8) if big else (2, 12, 4)
    raw = read(offset, n_size)
    if len(raw) < n_size:
        raise ValueError("truncated TIFF (IFD beyond the end of the file)")
    n = struct.unpack("<Q" if big else "<H", raw)[0]
    if n > 4096:
        raise ValueError(f"implausible TIFF IFD ({n} entries)")
    body = read(offset + n_size, n * entry + next_size)
    if len(body) < n * entry + next_size:
        raise ValueError("truncated TIFF (IFD beyond the end of the file)")
    ifd = _Ifd()
    inline = 8 if big else 4
    for k in range(n):
        e = body[k * entry : (k + 1) * entry]
        tag, typ = struct.unpack_from("<HH", e, 0)
        count, value = struct.unpack_from("<QQ" if big else "<II", e, 4)
        size = _TYPES.get(typ, ("B", 1))[1] * count * (2 if typ in (5, 10) else 1)
        raw_value = e[4 + inline : 4 + 2 * inline] if big else e[8:12]
        ifd[tag] = (typ, count, -1 if size <= inline else value, raw_value[:size] if size <= inline else b"")
    nxt = struct.unpack_from("<Q" if big else "<I", body, n * entry)[0]
    return ifd, nxt


def _values(read: Callable[[int, int], bytes], ifd: _Ifd, tag: int, big: bool,
            default: tuple[float | int, ...] | None = None) -> tuple[float | int, ...]:
    if tag not in ifd:
        if default is None:
            raise KeyError(tag)
        return default
    typ, count, offset, inline = ifd[tag]
    code, size = _TYPES.get(typ, ("B", 1))
    n = count * (2 if typ in (5, 10) else 1)
    data = inline if offset < 0 else read(offset, n * size)
    if len(data) < n * size:
        raise ValueError("truncated TIFF (a tag's values beyond the end of the file)")
    if code == "s":
        return (data.decode("latin-1"),)  # type: ignore[return-value]
    values = struct.unpack(f"<{n}{code}", data)
    if typ in (5, 10):
        return tuple(values[i] / values[i + 1] if values[i + 1] else 0.0 for i in range(0, n, 2))
    return values


def _layout(read: Callable[[int, int], bytes], ifd: _Ifd, big: bool) -> CogLayout | None:
    def one(tag: int, default: float | int | None = None) -> float | int:
        return _values(read, ifd, tag, big, None if default is None else (default,))[0]

    if _TILE_OFFSETS not in ifd or _STRIP_OFFSETS in ifd or _MODEL_TRANSFORM in ifd:
        return None
    if one(_SAMPLES, 1) != 1 or _EXTRA_SAMPLES in ifd or one(_PLANAR, 1) not in (1, 2):
        return None
    compression, predictor = int(one(_COMPRESSION, 1)), int(one(_PREDICTOR, 1))
    if compression not in CODECS or predictor not in (1, 2):
        return None
    bits, fmt = int(one(_BITS, 1)), int(one(_SAMPLE_FORMAT, 1))
    kind = {1: "u", 2: "i"}.get(fmt)
    if kind is None or bits not in (8, 16, 32):
        return None
    width, height = int(one(_WIDTH)), int(one(_HEIGHT))
    tw, th = int(one(_TILE_W)), int(one(_TILE_H))
    offsets = tuple(int(v) for v in _values(read, ifd, _TILE_OFFSETS, big))
    counts = tuple(int(v) for v in _values(read, ifd, _TILE_COUNTS, big))
    if tw <= 0 or th <= 0 or len(offsets) != len(counts) or len(offsets) != -(-width // tw) * -(-height // th):
        return None
    geo = _georef(read, ifd, big)
    if geo is None:
        return None
    transform, epsg = geo
    nodata: float | None = None
    if _GDAL_NODATA in ifd:
        text = str(one(_GDAL_NODATA)).strip("\x00 ")
        try:
            nodata = float(text)
        except ValueError:
            return None
    return CogLayout(width, height, tw, th, f"<{kind}{bits // 8}", compression, predictor, offsets, counts,
                     transform, epsg, nodata)


def _georef(read: Callable[[int, int], bytes], ifd: _Ifd, big: bool
            ) -> tuple[tuple[float, float, float, float, float, float], int] | None:
    """(transform, EPSG) from pixel scale + one tie point and the GeoKey directory; None where GDAL would
    apply a rule of its own (PixelIsPoint, several tie points, a user-defined CRS)."""
    if _PIXEL_SCALE not in ifd or _TIEPOINT not in ifd or _GEOKEYS not in ifd:
        return None
    sx, sy = (float(v) for v in _values(read, ifd, _PIXEL_SCALE, big)[:2])
    tie = [float(v) for v in _values(read, ifd, _TIEPOINT, big)]
    if len(tie) != 6 or sx <= 0 or sy <= 0:
        return None
    i, j, _, x, y, _ = tie
    keys = [int(v) for v in _values(read, ifd, _GEOKEYS, big)]
    geokeys: dict[int, int] = {}
    for k in range(4, min(len(keys), 4 + 4 * keys[3]), 4):
        key, location, _count, value = keys[k : k + 4]
        if location == 0:  # the value is the short itself (codes); other locations hold strings and doubles
            geokeys[key] = value
    if geokeys.get(_RASTER_TYPE, 1) != 1:  # PixelIsPoint: GDAL shifts by half a pixel
        return None
    model = geokeys.get(_MODEL_TYPE)
    code = geokeys.get(_PROJECTED_TYPE) if model == 1 else geokeys.get(_GEOGRAPHIC_TYPE) if model == 2 else None
    if code is None or code in (0, 32767) or code > 99999:
        return None
    return (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy), int(code)


def decode_tile(layout: CogLayout, data: bytes | memoryview, out: np.ndarray | None = None) -> np.ndarray:
    """The (tile_height, tile_width) samples of one tile from its stored bytes (every tile is stored whole,
    edge tiles included). ``out``: a buffer of that shape and dtype to decode into. Releases the GIL."""
    import imagecodecs

    shape = (layout.tile_height, layout.tile_width)
    dtype = np.dtype(layout.dtype)
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if out is None:
        out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1).view(np.uint8)
    c = layout.compression
    if c == 1:
        got = np.frombuffer(data, dtype=np.uint8, count=min(len(data), nbytes))
        flat[: got.size] = got
    else:
        # imagecodecs' stubs do not admit a NumPy array as ``out``; it takes any writable buffer
        decoder: Any = {8: imagecodecs.deflate_decode, 32946: imagecodecs.deflate_decode,
                        5: imagecodecs.lzw_decode, 50000: imagecodecs.zstd_decode}[c]
        got = decoder(data, out=flat)
        if len(got) != nbytes:
            raise ValueError(f"a tile decoded to {len(got)} bytes, {nbytes} expected (corrupt or truncated data)")
    if layout.predictor == 2:
        imagecodecs.delta_decode(out, axis=-1, out=out)
    return out
