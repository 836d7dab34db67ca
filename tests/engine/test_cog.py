"""engine.cog: the tile layout parsed from a TIFF's header equals what GDAL reports, tiles decoded without GDAL
equal GDAL's pixels (codecs, predictor, BigTIFF, edge tiles, sparse tiles), and files it does not decode exactly
as GDAL would are left to GDAL (None)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from ndvi_scale.engine.cog import CogLayout, decode_tile, parse_cog

REAL = Path(__file__).parents[1] / "data" / "raster" / "earth-search_S2A_29RKH_20200219_decimated"


def file_reader(path: Path) -> Any:
    data = path.read_bytes()
    return lambda offset, length: data[offset : offset + length]


def decoded_image(path: Path, layout: CogLayout) -> np.ndarray:
    """The whole image assembled from tiles decoded by :func:`decode_tile`."""
    read = file_reader(path)
    out = np.zeros((layout.height, layout.width), dtype=layout.dtype)
    for r in range(layout.tiles_down):
        for c in range(layout.tiles_across):
            offset, count = layout.tile_range(r, c)
            if count == 0:
                tile = np.full((layout.tile_height, layout.tile_width), layout.nodata or 0, dtype=layout.dtype)
            else:
                tile = decode_tile(layout, read(offset, count))
            y, x = r * layout.tile_height, c * layout.tile_width
            h, w = min(layout.tile_height, layout.height - y), min(layout.tile_width, layout.width - x)
            out[y : y + h, x : x + w] = tile[:h, :w]
    return out


def assert_same_as_gdal(path: Path) -> CogLayout:
    layout = parse_cog(file_reader(path))
    assert layout is not None, path
    with rasterio.open(path) as ds:
        assert (layout.height, layout.width) == ds.shape
        assert (layout.tile_height, layout.tile_width) == ds.block_shapes[0]
        assert layout.transform == tuple(ds.transform)[:6]
        assert layout.epsg == ds.crs.to_epsg()
        assert layout.nodata == ds.nodata
        assert np.dtype(layout.dtype) == np.dtype(ds.dtypes[0])
        np.testing.assert_array_equal(decoded_image(path, layout), ds.read(1))
    return layout


@pytest.mark.parametrize("name", ["B04.tif", "B08.tif", "SCL.tif"])
def test_real_earth_search_cogs(name: str) -> None:
    assert_same_as_gdal(REAL / name)


def write(path: Path, data: np.ndarray, **profile: Any) -> Path:
    base = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype,
                crs="EPSG:32631", transform=from_origin(399960.0, 5400000.0, 10.0, 10.0), tiled=True,
                blockxsize=64, blockysize=64)
    with rasterio.open(path, "w", **{**base, **profile}) as ds:
        ds.write(data, 1)
    return path


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    rng = np.random.default_rng(7)
    smooth = np.cumsum(rng.integers(0, 40, size=(150, 210)), axis=1).astype(np.uint16)  # predictor's case
    smooth[:10] = 0  # nodata rows
    return smooth


@pytest.mark.parametrize(
    "profile",
    [
        dict(compress="deflate", nodata=0),
        dict(compress="deflate", predictor=2),
        dict(compress="lzw", predictor=2, nodata=0),
        dict(compress="zstd"),
        dict(compress="none"),
        dict(compress="deflate", BIGTIFF="YES", blockxsize=128, blockysize=32),
    ],
    ids=["deflate", "deflate-predictor", "lzw-predictor", "zstd", "raw", "bigtiff"],
)
def test_codecs_predictor_bigtiff_and_edge_tiles(tmp_path: Path, pixels: np.ndarray, profile: dict[str, Any]) -> None:
    layout = assert_same_as_gdal(write(tmp_path / "a.tif", pixels, **profile))
    assert layout.width % layout.tile_width != 0  # edge tiles stored whole, cropped on assembly


def test_other_sample_types(tmp_path: Path, pixels: np.ndarray) -> None:
    assert_same_as_gdal(write(tmp_path / "u8.tif", (pixels % 250).astype(np.uint8), compress="deflate"))
    assert_same_as_gdal(write(tmp_path / "i16.tif", pixels.astype(np.int16) - 300, compress="deflate", nodata=-1))


def test_sparse_tiles_are_nodata(tmp_path: Path, pixels: np.ndarray) -> None:
    data = pixels.copy()
    data[:64, :64] = 0
    path = write(tmp_path / "sparse.tif", data, compress="deflate", nodata=0, SPARSE_OK="TRUE")
    layout = parse_cog(file_reader(path))
    assert layout is not None and layout.counts[0] == 0  # GDAL really left the tile out
    assert_same_as_gdal(path)


@pytest.mark.parametrize(
    ("why", "profile", "tags"),
    [
        ("strips", dict(tiled=False, compress="deflate"), {}),
        ("three bands", dict(count=3, compress="deflate"), {}),
        ("jpeg", dict(compress="jpeg", dtype="uint8"), {}),
        ("float samples", dict(dtype="float32", compress="deflate"), {}),
        ("PixelIsPoint", dict(compress="deflate"), {"AREA_OR_POINT": "Point"}),
    ],
)
def test_files_left_to_gdal(tmp_path: Path, pixels: np.ndarray, why: str, profile: dict[str, Any],
                            tags: dict[str, str]) -> None:
    count = profile.pop("count", 1)
    dtype = profile.pop("dtype", "uint16")
    data = (pixels % 200).astype(dtype)
    path = tmp_path / "x.tif"
    base = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=count, dtype=dtype,
                crs="EPSG:32631", transform=from_origin(399960.0, 5400000.0, 10.0, 10.0), tiled=True,
                blockxsize=64, blockysize=64)
    with rasterio.open(path, "w", **{**base, **profile}) as ds:
        ds.update_tags(**tags)
        for b in range(1, count + 1):
            ds.write(data, b)
    assert parse_cog(file_reader(path)) is None, why


def test_mask_band_is_left_to_gdal(tmp_path: Path, pixels: np.ndarray) -> None:
    path = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        write(path, pixels, compress="deflate")
        with rasterio.open(path, "r+") as ds:
            ds.write_mask(pixels > 100)
    with rasterio.open(path) as ds:
        assert ds.mask_flag_enums[0] != [rasterio.enums.MaskFlags.all_valid]
    assert parse_cog(file_reader(path)) is None


@pytest.mark.parametrize("data", [b"<html>403 Forbidden</html>", b"II*\x00\x08", b""])
def test_not_a_tiff_is_an_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="TIFF"):
        parse_cog(lambda offset, length: data[offset : offset + length])


def test_corrupt_tile_is_an_error(tmp_path: Path, pixels: np.ndarray) -> None:
    path = write(tmp_path / "a.tif", pixels, compress="deflate")
    layout = parse_cog(file_reader(path))
    assert layout is not None
    offset, count = layout.tile_range(0, 0)
    raw = file_reader(path)(offset, count)
    with pytest.raises(Exception):  # noqa: B017 - libdeflate's own error type
        decode_tile(layout, raw[: count // 2])
