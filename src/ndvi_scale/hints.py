"""Hints that lead to the fix: the words added to a refusal so that the user sees *why* and *what to change*.

* :func:`config_changes`: the settings that differ between the run that started a cube and this one
  (``method 'median' -> 'max'``), for a refused re-run.
* :func:`coverage_hint`: what a catalog covers (the embedded sample: its bbox and year) and whether the bbox
  would match with longitude and latitude swapped, for a search that found no scene.

Pure functions of plain values: no stage is imported here, every stage may use them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import cut, shown

__all__ = ["config_changes", "coverage_hint", "describe_changes", "swapped_matches"]

#: RunConfig fields that do not change what a run computes (where and how it writes, how it reads).
_NOT_THE_RUN = frozenset({"out", "overwrite", "append", "skip_bad_assets", "allow_local", "zarr_format", "codec"})


def _norm(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """``(field, old value, new value)`` for every setting of two run configs (``RunConfig.to_dict()``, as
    stored in a cube's ``ndvi_scale_config``) that differs, in the order of ``new``; output options left out."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return []
    keys = [k for k in new if k not in _NOT_THE_RUN] + [k for k in old if k not in new and k not in _NOT_THE_RUN]
    return [(k, old.get(k), new.get(k)) for k in keys if _norm(old.get(k)) != _norm(new.get(k))]


def _value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, _norm(value)))
    return shown(_norm(value), 40) if isinstance(value, str) else cut(str(_norm(value)), 40)


def describe_changes(changes: Sequence[tuple[str, Any, Any]], limit: int = 4) -> str:
    """``method 'median' -> 'max', period 'week' -> 'month'`` (at most ``limit`` settings, then ``+N more``)."""
    parts = [f"{k} {_value(a)} -> {_value(b)}" for k, a, b in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"+{len(changes) - limit} more")
    return ", ".join(parts)


def swapped_matches(bbox: Sequence[float], coverage: Sequence[float]) -> bool:
    """True if ``bbox`` (W, S, E, N) does not meet ``coverage`` but does with longitude and latitude swapped
    (``S W N E``: the usual mistake of lat/lon order)."""
    w, s, e, n = (float(v) for v in bbox)
    return not _meets((w, s, e, n), coverage) and _meets((s, w, n, e), coverage)


def _meets(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def coverage_hint(
    bbox: Sequence[float],
    start: dt.date,
    end: dt.date,
    coverage: Sequence[float] | None,
    first: dt.date | None = None,
    last: dt.date | None = None,
    what: str = "the catalog",
) -> str:
    """A clause naming what ``what`` covers and what to change: ``the sample covers bbox 1.706 48.307 1.878
    48.382 in 2024-01-02..2024-12-31; your bbox lies outside it, but would match with lon/lat swapped: --bbox
    ...``. Empty when nothing useful is known."""
    if coverage is None:
        return ""
    box = " ".join(f"{v:g}" for v in coverage)
    span = f" from {first} to {last}" if first and last else ""
    if first and last and first.year == last.year and first.month == 1 and last.month == 12:
        span = f" in {first.year}"
    text = f"{what} covers bbox {box}{span}"
    advice = []
    if swapped_matches(bbox, coverage):
        w, s, e, n = (float(v) for v in bbox)
        advice.append(f"your bbox would match with longitude and latitude swapped: --bbox {s:g} {w:g} {n:g} {e:g} "
                      "(W S E N)")
    elif not _meets(bbox, coverage):
        advice.append("your bbox lies outside it")
    if first and last and (end < first or start > last):
        advice.append(f"your dates {start}..{end} lie outside it")
    return text + ("; " + "; ".join(advice) if advice else "")
