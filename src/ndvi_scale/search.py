"""Search stage: resolve ``--catalog`` and find the Sentinel-2 L2A scenes over a bbox and a period.

``--catalog`` is one of: ``sample`` (the embedded offline sample, generated once into the cache), a provider profile
name (``ndvi-scale catalogs``), a STAC API URL (searched with pystac-client), or a local item-collection file
(item, FeatureCollection, API page or JSON array; filtered here, client-side).
"""

from __future__ import annotations

import collections
import datetime as dt
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import BBox, RunConfig
from .errors import CatalogError, NoScenesError
from .items import S2Item, Skipped, normalize_item, read_items

#: Scenes whose footprint only touches the bbox on its border are useless; items without bbox are kept.
_SAMPLE_NAMES = ("sample",)


@dataclass(frozen=True)
class SearchResult:
    """What a search found: usable L2A items (sorted by time, id) and the items skipped with a reason."""

    items: tuple[S2Item, ...]
    """Normalised Sentinel-2 L2A items, sorted by acquisition time then id."""
    skipped: tuple[Skipped, ...] = ()
    """Items that are not usable (not L2A, missing bands, filtered by cloud cover) with the reason."""
    source: str = ""
    """What was searched (for messages and provenance)."""
    profile: str | None = None
    """Provider profile name when the catalog was a profile."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Warnings gathered while searching."""

    def summary(self) -> str:
        """One line: items, dates, tiles, CRSs."""
        days = sorted({it.datetime.date() for it in self.items})
        tiles = sorted({it.tile for it in self.items if it.tile})
        crss = sorted({f"EPSG:{it.epsg}" for it in self.items if it.epsg})
        span = f"{days[0]} .. {days[-1]}" if days else "-"
        return (
            f"{len(self.items)} scenes on {len(days)} dates ({span}), tiles {', '.join(tiles) or '-'}, "
            f"CRS {', '.join(crss) or 'from files'}; {len(self.skipped)} skipped"
        )


def _intersects(a: Sequence[float] | None, b: BBox) -> bool:
    if not a or len(a) < 4:
        return True
    w, s, e, n = a[0], a[1], a[-2], a[-1]
    return w < b.east and e > b.west and s < b.north and n > b.south


def _in_dates(when: dt.datetime, start: dt.date, end: dt.date) -> bool:
    day = when.astimezone(dt.UTC).date()
    return start <= day <= end


def filter_items(
    raw: Iterable[Mapping[str, Any]], cfg: RunConfig, *, base_href: str | None = None
) -> tuple[list[S2Item], list[Skipped]]:
    """Normalise raw item dicts and keep those inside bbox/dates/cloud limit (client-side filtering)."""
    keep: list[S2Item] = []
    skipped: list[Skipped] = []
    for obj in raw:
        it = normalize_item(obj, base_href=base_href)
        if isinstance(it, Skipped):
            skipped.append(it)
            continue
        if not _in_dates(it.datetime, cfg.start, cfg.end) or not _intersects(it.bbox, cfg.bbox):
            continue  # outside the request: not "skipped", simply not matched
        if it.cloud_cover is not None and it.cloud_cover > cfg.max_cloud:
            skipped.append(Skipped(it.id, f"eo:cloud_cover {it.cloud_cover:g} > max_cloud {cfg.max_cloud:g}"))
            continue
        keep.append(it)
    keep.sort(key=lambda it: (it.datetime, it.id))
    return keep, skipped


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _api_items(url: str, cfg: RunConfig, collections_: Sequence[str] | None, server_query: bool) -> list[dict]:
    """Search a STAC API with pystac-client, paging through all results, as plain dicts (no pystac migration)."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    # One retry policy for 429/5xx: exponential backoff, honouring Retry-After (CDSE throttles with 429).
    retry = Retry(
        total=5, backoff_factor=1.0, status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None, respect_retry_after_header=True,
    )
    try:
        client = Client.open(url, stac_io=StacApiIO(max_retries=retry, timeout=60))
        kwargs: dict[str, Any] = dict(
            bbox=cfg.bbox.as_tuple(),
            datetime=f"{cfg.start.isoformat()}T00:00:00Z/{cfg.end.isoformat()}T23:59:59.999Z",
            limit=100,  # pystac-client's default page of 10 turns a year of scenes into dozens of round trips
        )
        if collections_:
            kwargs["collections"] = list(collections_)
        if server_query and cfg.max_cloud < 100:
            kwargs["query"] = {"eo:cloud_cover": {"lte": cfg.max_cloud}}
        return list(client.search(**kwargs).items_as_dicts())
    except APIError as e:
        raise CatalogError(f"STAC API {url} refused the search: {str(e)[:300]}; check the URL and collection") from None
    except CatalogError:
        raise
    except Exception as e:  # connection errors, JSON errors, not an API
        raise CatalogError(
            f"cannot search STAC API {url}: {type(e).__name__}: {str(e)[:300]}; check the URL (a STAC API root "
            "with /search) or pass a local item-collection file"
        ) from None


def search(cfg: RunConfig) -> SearchResult:
    """Find the usable scenes for ``cfg``; raise :class:`NoScenesError` if there are none."""
    cat = cfg.catalog
    profile_name: str | None = None
    if cat in _SAMPLE_NAMES:
        from .sample import sample_catalog

        path = str(sample_catalog())
        raw, base = read_items(path)
        items, skipped = filter_items(raw, cfg, base_href=base)
        source = f"sample catalog ({path})"
    elif _is_url(cat) and not cat.lower().endswith(".json"):
        raw = _api_items(cat, cfg, None, server_query=False)
        items, skipped = filter_items(raw, cfg)
        source = f"STAC API {cat}"
    elif _is_url(cat) or cat.startswith("file://") or os.path.exists(cat) or cat.endswith(".json") or os.sep in cat:
        raw, base = read_items(cat)
        items, skipped = filter_items(raw, cfg, base_href=base)
        source = f"item collection {cat}"
    else:
        from .profiles import get_profile

        prof = get_profile(cat)
        profile_name = prof.name
        raw = _api_items(prof.url, cfg, prof.collections, server_query=prof.server_side_query)
        items, skipped = filter_items(raw, cfg)
        source = f"{prof.title} ({prof.url})"
    result = SearchResult(tuple(items), tuple(skipped), source=source, profile=profile_name)
    if not items:
        reasons = collections.Counter(s.reason.split(";")[0] for s in skipped).most_common(3)
        why = f"; {len(skipped)} skipped ({', '.join(f'{r} x{n}' for r, n in reasons)})" if skipped else ""
        raise NoScenesError(
            f"no Sentinel-2 L2A scenes found in {source} for bbox {cfg.bbox} between {cfg.start} and {cfg.end} "
            f"with cloud cover <= {cfg.max_cloud:g}%{why}; widen the bbox or the dates, raise --max-cloud, "
            "or check the catalog"
        )
    return result
