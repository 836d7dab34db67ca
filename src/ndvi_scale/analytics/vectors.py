"""Vector inputs of the analytics: zones (polygons) and points, read from files or Python objects, in any CRS.

Files: GeoJSON, GeoPackage, Shapefile, FlatGeobuf (through pyogrio's bundled GDAL) and GeoParquet (through
pyarrow, WKB ``geometry`` column, CRS from the ``geo`` metadata). Every problem with a file is an
:class:`~ndvi_scale.errors.InputError` (exit code 2) naming the file and the fix, on one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import CRS, Transformer

from ..errors import InputError, shown

__all__ = ["Zones", "read_zones", "parse_points", "to_crs"]

_FORMATS = "GeoJSON, GeoPackage, GeoParquet or Shapefile"


@dataclass(frozen=True)
class Zones:
    """Polygons with their ids and CRS."""

    geoms: np.ndarray
    """shapely (Multi)Polygons, object array."""
    ids: np.ndarray
    """One id per polygon (the ``--id`` field, else the feature index)."""
    crs: CRS
    source: str

    def __len__(self) -> int:
        return len(self.geoms)


def _detail(exc: BaseException, path: str) -> str:
    """The reader's own reason, short and last in the line (the fix comes first and is never cut): its first
    line, without the path the message already names."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text.replace(repr(path), 'it').replace(path, 'it')[:100]}"


def _read_geoparquet(path: str) -> tuple[np.ndarray, dict[str, np.ndarray], CRS | None]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"zones file {path} is GeoParquet, which needs pyarrow; pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"zones file {path} is not a readable GeoParquet file; give a {_FORMATS} file ({_detail(exc, path)})"
        ) from None
    meta = json.loads((table.schema.metadata or {}).get(b"geo", b"{}") or b"{}")
    column = meta.get("primary_column", "geometry")
    if column not in table.column_names:
        raise InputError(f"zones file {path} has no geometry column {column!r}; write it as GeoParquet (WKB)")
    geoms = shapely.from_wkb(np.asarray(table.column(column).to_pylist(), dtype=object))
    crs_meta = meta.get("columns", {}).get(column, {}).get("crs", "missing")
    crs: CRS | None
    if crs_meta == "missing":  # GeoParquet: an absent crs means OGC:CRS84
        crs = CRS.from_user_input("OGC:CRS84")
    elif crs_meta is None:
        crs = None
    else:
        crs = CRS.from_user_input(crs_meta)
    fields = {name: np.asarray(table.column(name).to_pylist(), dtype=object)
              for name in table.column_names if name != column}
    return geoms, fields, crs


def _read_ogr(path: str) -> tuple[np.ndarray, dict[str, np.ndarray], CRS | None]:
    import pyogrio.raw

    try:
        meta, _fids, wkb, field_data = pyogrio.raw.read(path)
    except Exception as exc:  # noqa: BLE001  (pyogrio/GDAL errors of all kinds: say which file and what to give)
        raise InputError(
            f"zones file {path} cannot be read as vector data; give a {_FORMATS} file ({_detail(exc, path)})"
        ) from None
    if wkb is None:
        raise InputError(f"zones file {path} has no geometry column; give a {_FORMATS} file with polygons")
    geoms = shapely.from_wkb(wkb)
    fields = {str(name): np.asarray(col) for name, col in zip(meta["fields"], field_data, strict=True)}
    crs = CRS.from_user_input(meta["crs"]) if meta.get("crs") else None
    return geoms, fields, crs


def read_zones(
    zones: Any, id_field: str | None = None, crs: Any = None, *, polygons: bool = True
) -> Zones:
    """Zones from a file path, a GeoDataFrame (``.geometry``, ``.crs``) or a sequence of shapely geometries.

    ``crs`` is the CRS of plain shapely geometries (default EPSG:4326), or of a file that has none. With
    ``polygons`` every geometry must be a (Multi)Polygon with a non-zero area.
    """
    fields: dict[str, np.ndarray]
    if isinstance(zones, str | os.PathLike):
        path = os.fspath(zones)
        source = path
        if not Path(path).exists():
            raise InputError(f"zones file {path} does not exist; give a {_FORMATS} file")
        if path.lower().endswith((".parquet", ".geoparquet")):
            geoms, fields, file_crs = _read_geoparquet(path)
        else:
            geoms, fields, file_crs = _read_ogr(path)
        if file_crs is None:
            if crs is None:
                raise InputError(f"zones file {path} has no CRS; write one into the file (e.g. EPSG:4326)")
            file_crs = CRS.from_user_input(crs)
        zone_crs = file_crs
    elif hasattr(zones, "geometry") and hasattr(zones, "crs"):  # a GeoDataFrame, without importing geopandas
        source = "GeoDataFrame"
        geoms = np.asarray(zones.geometry.values, dtype=object)
        fields = {str(c): np.asarray(zones[c].values) for c in zones.columns if c != zones.geometry.name}
        if zones.crs is None and crs is None:
            raise InputError("zones GeoDataFrame has no CRS; set one with .set_crs('EPSG:4326') or pass crs=")
        zone_crs = CRS.from_user_input(zones.crs if zones.crs is not None else crs)
    else:
        source = "geometries"
        geoms = np.asarray(list(zones), dtype=object)
        if not all(isinstance(g, shapely.Geometry) for g in geoms):
            raise InputError("zones must be a file path, a GeoDataFrame or shapely geometries")
        fields = {}
        zone_crs = CRS.from_user_input(crs if crs is not None else "EPSG:4326")
    if len(geoms) == 0:
        raise InputError(f"zones {source} holds no features; give at least one polygon")
    if id_field is not None:
        if id_field not in fields:
            have = ", ".join(sorted(fields)) or "none"
            raise InputError(f"zones {source} has no field {shown(id_field)} (fields: {have}); give --id one of them")
        ids = fields[id_field]
        if len(set(ids.tolist())) != len(ids):
            raise InputError(f"zones {source}: field {shown(id_field)} has duplicate values; give a unique --id field")
    else:
        ids = np.arange(len(geoms))
    if polygons:
        _check_polygons(geoms, ids, source)
    return Zones(geoms=geoms, ids=ids, crs=zone_crs, source=source)


def _check_polygons(geoms: np.ndarray, ids: np.ndarray, source: str) -> None:
    def first(mask: np.ndarray) -> str:
        bad = ids[mask][:5].tolist()
        more = f" and {int(mask.sum()) - 5} more" if mask.sum() > 5 else ""
        return f"{', '.join(map(str, bad))}{more}"

    missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    if missing.any():
        raise InputError(f"zones {source}: features {first(missing)} have no geometry; drop them or fix the file")
    kinds = shapely.get_type_id(geoms)
    not_poly = ~np.isin(kinds, (3, 6))  # Polygon, MultiPolygon
    if not_poly.any():
        raise InputError(
            f"zones {source}: features {first(not_poly)} are not polygons "
            f"({shapely.get_type_id(geoms[not_poly][0])} = {geoms[not_poly][0].geom_type}); give polygons only"
        )
    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        reason = shapely.is_valid_reason(geoms[invalid][0])
        raise InputError(
            f"zones {source}: features {first(invalid)} are invalid polygons ({reason}); repair them first, e.g. "
            "ogr2ogr -makevalid out.gpkg in.gpkg or shapely.make_valid"
        )
    flat = shapely.area(geoms) <= 0
    if flat.any():
        raise InputError(f"zones {source}: features {first(flat)} have zero area; drop them or fix the file")


def to_crs(geoms: np.ndarray, src: CRS, dst: CRS) -> np.ndarray:
    """``geoms`` transformed from ``src`` to ``dst`` (lon/lat order for geographic CRSs)."""
    if src == dst:
        return geoms
    tr = Transformer.from_crs(src, dst, always_xy=True)
    out = shapely.transform(geoms, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    return np.asarray(out, dtype=object)


def parse_points(points: Any, crs: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, CRS]:
    """``(ids, x, y, crs)`` of points given as ``"LON,LAT"`` strings, ``(lon, lat)`` pairs, shapely Points, a
    CSV file with lon/lat (or x/y) columns and an optional id/name column, or a vector file of Points."""
    if isinstance(points, str | os.PathLike) and Path(os.fspath(points)).exists():
        path = os.fspath(points)
        if path.lower().endswith(".csv"):
            return _points_csv(path, crs)
        z = read_zones(path, crs=crs, polygons=False)
        kinds = shapely.get_type_id(z.geoms)
        if not (kinds == 0).all():
            raise InputError(f"points file {path} holds non-point geometries; give Points (or a CSV with lon,lat)")
        return z.ids, shapely.get_x(z.geoms), shapely.get_y(z.geoms), z.crs
    if isinstance(points, str | os.PathLike):
        points = [os.fspath(points)]
    ids, xs, ys = [], [], []
    for k, p in enumerate(points if isinstance(points, Sequence | np.ndarray) else list(points)):
        if isinstance(p, str):
            parts = p.split(",")
            try:
                if len(parts) != 2:
                    raise ValueError
                x, y = float(parts[0]), float(parts[1])
            except ValueError:
                raise InputError(
                    f"point {shown(p)} is neither an existing file nor LON,LAT; give e.g. 1.79,48.34 or a "
                    "CSV/GeoJSON file"
                ) from None
        elif isinstance(p, shapely.Point):
            x, y = p.x, p.y
        else:
            try:
                x, y = (float(v) for v in p)
            except (TypeError, ValueError):
                raise InputError(f"point {shown(p)} is not a (lon, lat) pair; give e.g. (1.79, 48.34)") from None
        ids.append(f"p{k}")
        xs.append(x)
        ys.append(y)
    if not ids:
        raise InputError("no points given; give --points LON,LAT (repeatable) or a file")
    return np.asarray(ids, dtype=object), np.asarray(xs), np.asarray(ys), CRS.from_user_input(crs or "EPSG:4326")


def _points_csv(path: str, crs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, CRS]:
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"points file {path} is not a readable CSV ({type(exc).__name__}); give lon,lat columns"
        ) from None
    cols = {c.lower(): c for c in df.columns}
    for xname, yname in (("lon", "lat"), ("longitude", "latitude"), ("x", "y")):
        if xname in cols and yname in cols:
            break
    else:
        raise InputError(
            f"points file {path} has no lon/lat columns (columns: {', '.join(map(str, df.columns))}); "
            "give a header lon,lat (or x,y with a CRS)"
        )
    idcol = next((cols[c] for c in ("id", "name", "point") if c in cols), None)
    ids = df[idcol].to_numpy(dtype=object) if idcol else np.asarray([f"p{k}" for k in range(len(df))], dtype=object)
    try:
        x = df[cols[xname]].to_numpy(dtype=float)
        y = df[cols[yname]].to_numpy(dtype=float)
    except ValueError:
        raise InputError(f"points file {path}: {xname}/{yname} are not all numbers; fix the file") from None
    return ids, x, y, CRS.from_user_input(crs or "EPSG:4326")
